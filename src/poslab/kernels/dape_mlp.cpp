// Fused DAPE pointwise MLP (kernel_size 1) over channel-first score maps, forward and backward.
//
// For every (batch b, query i, key s) the MLP reads the feature column f = [A[b, :, i, s]; B[:, i, s]]
// (C = 2H channels, or H without a base bias), computes hidden = leaky(W1 f + b1) (D channels) and
// adds W2 hidden + b2 to the logits. The hidden map never touches memory: each thread takes one
// SIMD vector of consecutive keys at a time, every feature channel one register, so the work is
// arithmetic, not the eight to ten passes over a (B, t, S, D) tensor that the PyTorch path makes.
// Keys past a row's causal limit (row_len[i]) are skipped: the forward writes -inf there, the
// backward adds nothing.
//
// Built once per instruction set and head count (poslab/kernels/native.py passes -march=x86-64-v3,
// x86-64-v4, ... and -DPOSLAB_HEADS=H): the vector is one machine register (8 floats with AVX2, 16
// with AVX-512), and H is a compile-time constant, so that the channel loops unroll and the C + H
// vectors of a key chunk stay in registers (16 on AVX2) for the common head counts. Every weight is broadcast once per call into a
// full vector, read as a memory operand of the multiply-adds. The backward runs two passes over D
// per chunk (the first keeps f and dL/dlogits in registers and stores dL/dpre for D vectors; the
// second sums it into dL/dA and dL/dB), so neither pass needs more than about 16 live vectors.
//
// Plain C ABI (loaded with ctypes), templated over float and double so that tests can compare it
// with the float64 reference. Work is split over query rows (row i to thread i mod n), so threads
// write disjoint rows; weight gradients are accumulated per lane in the working precision within a
// row, then in double per thread.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int VECTOR_BYTES = 64;
constexpr const char* ISA = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VECTOR_BYTES = 32;
constexpr const char* ISA = "avx2";
#elif defined(__AVX__)
constexpr int VECTOR_BYTES = 32;
constexpr const char* ISA = "avx";
#else
constexpr int VECTOR_BYTES = 16;
constexpr const char* ISA = "sse/neon";
#endif

// GCC/Clang vector extension: arithmetic on Vec<T> is elementwise over one machine register.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(VECTOR_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(VECTOR_BYTES)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int LANES = VECTOR_BYTES / sizeof(T);

template <typename T>
struct Problem {
  const T* scores;  // (B, H, t, S)
  const T* bias;    // (H, t, S) or nullptr
  const T* w1;      // (D, C), C = 2H with a bias, H without
  const T* b1;      // (D,)
  const T* w2;      // (H, D)
  const T* b2;      // (H,)
  const int64_t* row_len;  // (t,): keys visible to each query row
  int64_t batch, heads, rows, keys, width, channels;
  T slope;
};

// The weights as full vectors, d-major: w1[d * C + c], b1[d], w2[d * H + h] (W2 transposed).
template <typename T>
struct Broadcast {
  std::vector<Vec<T>> w1, b1, w2;
  explicit Broadcast(const Problem<T>& p) : w1(p.width * p.channels), b1(p.width), w2(p.width * p.heads) {
    for (int64_t d = 0; d < p.width; ++d) {
      b1[d] = Vec<T>{} + p.b1[d];
      for (int64_t c = 0; c < p.channels; ++c) w1[d * p.channels + c] = Vec<T>{} + p.w1[d * p.channels + c];
      for (int64_t h = 0; h < p.heads; ++h) w2[d * p.heads + h] = Vec<T>{} + p.w2[h * p.width + d];
    }
  }
};

template <typename Fn>
void parallel_rows(int64_t rows, int threads, Fn fn) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
  if (threads == 1) {
    fn(0, 1);
    return;
  }
  std::vector<std::thread> pool;
  for (int tid = 1; tid < threads; ++tid) pool.emplace_back(fn, tid, threads);
  fn(0, threads);
  for (auto& th : pool) th.join();
}

// n keys from src: a plain vector load when the chunk is full, zeros past n otherwise.
template <typename T>
inline Vec<T> load(const T* src, int n) {
  Vec<T> v;
  if (n == LANES<T>) {
    std::memcpy(&v, src, sizeof v);
    return v;
  }
  v = Vec<T>{};
  for (int l = 0; l < n; ++l) v[l] = src[l];
  return v;
}

template <typename T>
inline void store(T* dst, const Vec<T>& v, int n) {
  if (n == LANES<T>) {
    std::memcpy(dst, &v, sizeof v);
    return;
  }
  for (int l = 0; l < n; ++l) dst[l] = v[l];
}

template <typename T>
inline Vec<T> leaky(const Vec<T>& x, const Vec<T>& y, T slope) {  // y where x > 0, else slope * y
  return x > T(0) ? y : slope * y;
}

// One instance per (precision, bias or not) for this library's head count.
template <typename T, int H, bool BIAS>
struct Kernel {
  static constexpr int C = BIAS ? 2 * H : H;

  // W1 f + b1 for hidden channel d, in two chains of multiply-adds (half the latency of one).
  static inline Vec<T> pre(const Vec<T>* f, const Vec<T>* w, const Vec<T>& b) {
    Vec<T> even = b + f[0] * w[0], odd = Vec<T>{};
    for (int c = 1; c < C; ++c) {
      if (c % 2) odd += f[c] * w[c];
      else even += f[c] * w[c];
    }
    return even + odd;
  }

  // logits[b, h, i, s] = A + [B if add_base] + b2 + W2 leaky(W1 f + b1); -inf past row_len[i].
  static void forward(const Problem<T>& p, T* logits, bool add_base, int threads) {
    const int64_t t = p.rows, S = p.keys, D = p.width;
    const Broadcast<T> w(p);
    parallel_rows(t, threads, [&](int tid, int n_threads) {
      Vec<T> f[C], acc[H];
      for (int64_t i = tid; i < t; i += n_threads) {
        const int64_t len = std::max<int64_t>(0, std::min(p.row_len[i], S));
        for (int64_t b = 0; b < p.batch; ++b) {
          const T* a_row = p.scores + ((b * H) * t + i) * S;
          const T* b_row = BIAS ? p.bias + i * S : nullptr;
          T* out_row = logits + ((b * H) * t + i) * S;
          for (int64_t s0 = 0; s0 < len; s0 += LANES<T>) {
            const int n = static_cast<int>(std::min<int64_t>(LANES<T>, len - s0));
            for (int h = 0; h < H; ++h) f[h] = load(a_row + h * t * S + s0, n);
            if (BIAS)
              for (int h = 0; h < H; ++h) f[H + h] = load(b_row + h * t * S + s0, n);
            for (int h = 0; h < H; ++h) acc[h] = f[h] + p.b2[h];
            if (BIAS && add_base)
              for (int h = 0; h < H; ++h) acc[h] += f[H + h];
            for (int64_t d = 0; d < D; ++d) {
              const Vec<T> x = pre(f, &w.w1[d * C], w.b1[d]);
              const Vec<T> hid = leaky(x, x, p.slope);
              const Vec<T>* w2 = &w.w2[d * H];
              for (int h = 0; h < H; ++h) acc[h] += hid * w2[h];
            }
            for (int h = 0; h < H; ++h) store(out_row + h * t * S + s0, acc[h], n);
          }
          for (int h = 0; h < H; ++h)
            std::fill(out_row + h * t * S + len, out_row + h * t * S + S, -std::numeric_limits<T>::infinity());
        }
      }
    });
  }

  // grad (B, H, t, S) holds dL/dlogits on entry and dL/dA (before the 1/sqrt(Dh) scale) on return.
  // grad_bias (H, t, S), when given, gets the MLP's dL/dB added (the caller adds the base's own term).
  // grad_w1 (D, C), grad_b1 (D,), grad_w2 (H, D) are overwritten.
  static void backward(const Problem<T>& p, T* grad, T* grad_bias, T* grad_w1, T* grad_b1, T* grad_w2,
                       int threads) {
    const int64_t t = p.rows, S = p.keys, D = p.width;
    const int n_threads_used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, t)));
    const Broadcast<T> w(p);
    // Per thread: dW1 (D*C, d-major as W1), db1 (D), dW2 (D*H, d-major) in double.
    const int64_t n_params = D * C + D + D * H;
    std::vector<double> totals(static_cast<size_t>(n_threads_used) * n_params, 0.0);
    const bool want_bias = BIAS && grad_bias != nullptr;
    parallel_rows(t, n_threads_used, [&](int tid, int n_threads) {
      Vec<T> f[C], g[H], ga[H], gb[H];
      std::vector<Vec<T>> lane_acc(n_params);  // per-lane partial sums of the weight gradients
      std::vector<Vec<T>> grad_pre(D);         // dL/d(W1 f + b1) of the current chunk
      Vec<T>* acc_w1 = lane_acc.data();
      Vec<T>* acc_b1 = acc_w1 + D * C;
      Vec<T>* acc_w2 = acc_b1 + D;
      double* total = totals.data() + tid * n_params;
      for (int64_t i = tid; i < t; i += n_threads) {
        const int64_t len = std::max<int64_t>(0, std::min(p.row_len[i], S));
        if (len == 0) continue;
        std::fill(lane_acc.begin(), lane_acc.end(), Vec<T>{});
        for (int64_t b = 0; b < p.batch; ++b) {
          const T* a_row = p.scores + ((b * H) * t + i) * S;
          const T* b_row = BIAS ? p.bias + i * S : nullptr;
          T* g_row = grad + ((b * H) * t + i) * S;
          for (int64_t s0 = 0; s0 < len; s0 += LANES<T>) {
            const int n = static_cast<int>(std::min<int64_t>(LANES<T>, len - s0));
            for (int h = 0; h < H; ++h) f[h] = load(a_row + h * t * S + s0, n);
            if (BIAS)
              for (int h = 0; h < H; ++h) f[H + h] = load(b_row + h * t * S + s0, n);
            for (int h = 0; h < H; ++h) g[h] = load(g_row + h * t * S + s0, n);
            // Pass 1: the hidden channel's pre-activation and gradient; W1, b1, W2 gradients.
            for (int64_t d = 0; d < D; ++d) {
              const Vec<T> x = pre(f, &w.w1[d * C], w.b1[d]);
              const Vec<T> hid = leaky(x, x, p.slope);
              const Vec<T>* w2 = &w.w2[d * H];
              Vec<T> gh = g[0] * w2[0];
              for (int h = 0; h < H; ++h) {
                if (h > 0) gh += g[h] * w2[h];
                acc_w2[d * H + h] += g[h] * hid;
              }
              const Vec<T> gp = leaky(x, gh, p.slope);
              grad_pre[d] = gp;
              acc_b1[d] += gp;
              for (int c = 0; c < C; ++c) acc_w1[d * C + c] += gp * f[c];
            }
            // Pass 2: dL/dA = dL/dlogits + W1[:, :H]^T gp, dL/dB = W1[:, H:]^T gp.
            for (int h = 0; h < H; ++h) {
              ga[h] = g[h];
              gb[h] = Vec<T>{};
            }
            for (int64_t d = 0; d < D; ++d) {
              const Vec<T> gp = grad_pre[d];
              const Vec<T>* w1 = &w.w1[d * C];
              for (int h = 0; h < H; ++h) ga[h] += gp * w1[h];
              if (want_bias)
                for (int h = 0; h < H; ++h) gb[h] += gp * w1[H + h];
            }
            for (int h = 0; h < H; ++h) store(g_row + h * t * S + s0, ga[h], n);
            if (want_bias)
              for (int h = 0; h < H; ++h) {
                T* dst = grad_bias + (h * t + i) * S + s0;
                store(dst, load(dst, n) + gb[h], n);
              }
          }
        }
        for (int64_t j = 0; j < n_params; ++j) {
          double sum = 0.0;
          for (int l = 0; l < LANES<T>; ++l) sum += lane_acc[j][l];
          total[j] += sum;
        }
      }
    });
    for (int64_t d = 0; d < D; ++d) {
      auto sum = [&](int64_t j) {
        double s = 0.0;
        for (int tid = 0; tid < n_threads_used; ++tid) s += totals[tid * n_params + j];
        return static_cast<T>(s);
      };
      for (int c = 0; c < C; ++c) grad_w1[d * C + c] = sum(d * C + c);
      grad_b1[d] = sum(D * C + d);
      for (int h = 0; h < H; ++h) grad_w2[h * D + d] = sum(D * C + D + d * H + h);
    }
  }
};

#ifndef POSLAB_HEADS
#error "compile with -DPOSLAB_HEADS=<the head count>"
#endif

template <typename T, typename Fn>
void dispatch(const Problem<T>& p, Fn fn) {
  if (p.bias != nullptr) return fn(Kernel<T, POSLAB_HEADS, true>{});
  return fn(Kernel<T, POSLAB_HEADS, false>{});
}

template <typename T>
Problem<T> problem(const T* scores, const T* bias, const T* w1, const T* b1, const T* w2, const T* b2,
                   const int64_t* row_len, int64_t batch, int64_t heads, int64_t rows, int64_t keys,
                   int64_t width, double slope) {
  const int64_t channels = bias != nullptr ? 2 * heads : heads;
  return Problem<T>{scores, bias, w1, b1, w2, b2, row_len, batch, heads, rows, keys, width, channels,
                    static_cast<T>(slope)};
}

}  // namespace

// The instruction set the library was compiled for and its vector width in bytes.
extern "C" const char* dape_mlp_isa() { return ISA; }
extern "C" int dape_mlp_vector_bytes() { return VECTOR_BYTES; }
extern "C" int dape_mlp_heads() { return POSLAB_HEADS; }

#define POSLAB_DAPE_ENTRY_POINTS(T, SUFFIX)                                                          \
  extern "C" void dape_mlp_forward_##SUFFIX(const T* scores, const T* bias, const T* w1, const T* b1, \
                                            const T* w2, const T* b2, const int64_t* row_len,        \
                                            int64_t batch, int64_t heads, int64_t rows, int64_t keys, \
                                            int64_t width, double slope, int add_base, T* logits,    \
                                            int threads) {                                           \
    const auto p = problem(scores, bias, w1, b1, w2, b2, row_len, batch, heads, rows, keys, width, slope); \
    dispatch<T>(p, [&](auto k) { k.forward(p, logits, add_base != 0, threads); });           \
  }                                                                                                  \
  extern "C" void dape_mlp_backward_##SUFFIX(const T* scores, const T* bias, const T* w1, const T* b1,\
                                             const T* w2, const int64_t* row_len, int64_t batch,     \
                                             int64_t heads, int64_t rows, int64_t keys, int64_t width, \
                                             double slope, T* grad, T* grad_bias, T* grad_w1,        \
                                             T* grad_b1, T* grad_w2, int threads) {                  \
    const auto p = problem(scores, bias, w1, b1, w2, static_cast<const T*>(nullptr), row_len, batch,  \
                           heads, rows, keys, width, slope);                                         \
    dispatch<T>(p, [&](auto k) { k.backward(p, grad, grad_bias, grad_w1, grad_b1, grad_w2, threads); }); \
  }

POSLAB_DAPE_ENTRY_POINTS(float, f32)
POSLAB_DAPE_ENTRY_POINTS(double, f64)
