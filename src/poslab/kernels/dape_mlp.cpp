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
// vectors of a key chunk stay in registers (16 on AVX2) for the common head counts. Every weight is
// broadcast once per call into a full vector, read as a memory operand of the multiply-adds. The
// backward runs two passes over D per chunk (the first keeps f and dL/dlogits in registers and
// stores dL/dpre for D vectors; the second sums it into dL/dA and dL/dB), so neither pass needs
// more than about 16 live vectors.
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
constexpr T NEG_INF = -std::numeric_limits<T>::infinity();

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

// The weights as full vectors, d-major: w1[(d * C + c) * K + j], b1[d], w2[(d * H + h) * K + j]
// (W2 transposed); K taps per weight (1 for the MLP, 3 for V2's convolutions).
template <typename T>
struct Broadcast {
  std::vector<Vec<T>> w1, b1, w2;
  explicit Broadcast(const Problem<T>& p, int K = 1)
      : w1(p.width * p.channels * K), b1(p.width), w2(p.width * p.heads * K) {
    const int64_t D = p.width, C = p.channels, H = p.heads;
    for (int64_t d = 0; d < D; ++d) {
      b1[d] = Vec<T>{} + p.b1[d];
      for (int64_t j = 0; j < C * K; ++j) w1[d * C * K + j] = Vec<T>{} + p.w1[d * C * K + j];
      for (int64_t h = 0; h < H; ++h)
        for (int j = 0; j < K; ++j) w2[(d * H + h) * K + j] = Vec<T>{} + p.w2[(h * D + d) * K + j];
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
            std::fill(out_row + h * t * S + len, out_row + h * t * S + S, NEG_INF<T>);
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

// DAPE V2 with kernel_size 3: Conv(1 x 3) -> leaky -> Conv(1 x 3) along the keys of each query row,
// features and hidden map zero past the row's visible keys (causal masking of both) and outside the
// row (the convolutions' zero padding). W1 (D, C, 3) and W2 (H, D, 3) as Conv2d stores them
// (out[s] = sum_j w[j] in[s + j - 1]). Per row the features, the hidden map and, in backward,
// dL/dlogits and dL/dpre live in zero-padded row buffers (entry s at index s + 1), so every shifted
// read is a plain vector load; the work is one multiply-add per weight and key, the hidden map
// touches only the thread's row buffer, never a (B, t, S, D) tensor.
template <typename T, int H, bool BIAS>
struct Conv3 {
  static constexpr int C = BIAS ? 2 * H : H;
  static constexpr int W = LANES<T>;

  // Padded row buffers of n_channels x stride; stride covers S keys, both pads and a vector overrun.
  struct Rows {
    int64_t stride;
    std::vector<T> data;
    Rows(int64_t channels, int64_t keys) : stride(keys + 2 * W + 2), data(channels * stride) {}
    T* operator[](int64_t c) { return data.data() + c * stride; }
    // Copy len entries from src into channel c (at index 1), zeros around.
    void fill(int64_t c, const T* src, int64_t len) {
      T* row = (*this)[c];
      row[0] = T(0);
      std::memcpy(row + 1, src, len * sizeof(T));
      std::fill(row + 1 + len, row + stride, T(0));
    }
  };

  // Lanes of the chunk at s0 past len are zeroed (masked keys).
  static inline Vec<T> mask_tail(Vec<T> v, int n) {
    for (int l = n; l < W; ++l) v[l] = T(0);
    return v;
  }

  static inline Vec<T> at(const T* row, int64_t s0, int j) {  // keys s0 + j - 1 .. of a padded row
    return load(row + s0 + j, W);
  }

  // Row (b, i): features into F; the pre-activation into P (unpadded layout: P[d][s]) and the
  // masked hidden map into Hd (padded).
  static void hidden(const Problem<T>& p, const Broadcast<T>& w, int64_t b, int64_t i, int64_t len, Rows& F,
                     Rows& P, Rows& Hd) {
    const int64_t t = p.rows, S = p.keys, D = p.width;
    for (int h = 0; h < H; ++h) F.fill(h, p.scores + ((b * H + h) * t + i) * S, len);
    if (BIAS)
      for (int h = 0; h < H; ++h) F.fill(H + h, p.bias + (h * t + i) * S, len);
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) hidden_channels<4>(p, w, d, len, F, P, Hd);
    for (; d < D; ++d) hidden_channels<1>(p, w, d, len, F, P, Hd);
  }

  // NB hidden channels from d0 at once: each feature vector loaded is used for NB multiply-adds.
  template <int NB>
  static void hidden_channels(const Problem<T>& p, const Broadcast<T>& w, int64_t d0, int64_t len, Rows& F,
                              Rows& P, Rows& Hd) {
    for (int64_t s0 = 0; s0 < len; s0 += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, len - s0));
      Vec<T> acc[NB];
      for (int q = 0; q < NB; ++q) acc[q] = w.b1[d0 + q];
      for (int c = 0; c < C; ++c) {
        const T* frow = F[c];
        const Vec<T> x0 = at(frow, s0, 0), x1 = at(frow, s0, 1), x2 = at(frow, s0, 2);
        for (int q = 0; q < NB; ++q) {
          const Vec<T>* wd = &w.w1[((d0 + q) * C + c) * 3];
          acc[q] += x0 * wd[0] + x1 * wd[1] + x2 * wd[2];
        }
      }
      for (int q = 0; q < NB; ++q) {
        std::memcpy(P[d0 + q] + s0, &acc[q], sizeof acc[q]);
        const Vec<T> hid = mask_tail(leaky(acc[q], acc[q], p.slope), n);
        std::memcpy(Hd[d0 + q] + 1 + s0, &hid, sizeof hid);  // the overrun past len is re-zeroed below
      }
    }
    for (int q = 0; q < NB; ++q) {
      T* hrow = Hd[d0 + q];
      hrow[0] = T(0);
      std::fill(hrow + 1 + len, hrow + Hd.stride, T(0));
    }
  }

  static void forward(const Problem<T>& p, T* logits, bool add_base, int threads) {
    const int64_t t = p.rows, S = p.keys, D = p.width;
    const Broadcast<T> w(p, 3);
    parallel_rows(t, threads, [&](int tid, int n_threads) {
      Rows F(C, S), P(D, S), Hd(D, S);
      Vec<T> acc[H];
      for (int64_t i = tid; i < t; i += n_threads) {
        const int64_t len = std::max<int64_t>(0, std::min(p.row_len[i], S));
        for (int64_t b = 0; b < p.batch; ++b) {
          hidden(p, w, b, i, len, F, P, Hd);
          T* out_row = logits + ((b * H) * t + i) * S;
          for (int64_t s0 = 0; s0 < len; s0 += W) {
            const int n = static_cast<int>(std::min<int64_t>(W, len - s0));
            for (int h = 0; h < H; ++h) acc[h] = at(F[h], s0, 1) + p.b2[h];
            if (BIAS && add_base)
              for (int h = 0; h < H; ++h) acc[h] += at(F[H + h], s0, 1);
            for (int64_t d = 0; d < D; ++d) {
              const T* hrow = Hd[d];
              const Vec<T> x0 = at(hrow, s0, 0), x1 = at(hrow, s0, 1), x2 = at(hrow, s0, 2);
              const Vec<T>* wd = &w.w2[d * H * 3];
              for (int h = 0; h < H; ++h) acc[h] += x0 * wd[h * 3] + x1 * wd[h * 3 + 1] + x2 * wd[h * 3 + 2];
            }
            for (int h = 0; h < H; ++h) store(out_row + h * t * S + s0, acc[h], n);
          }
          for (int h = 0; h < H; ++h)
            std::fill(out_row + h * t * S + len, out_row + h * t * S + S, NEG_INF<T>);
        }
      }
    });
  }

  // acc[q * 3 + j] += sum_s over the row's keys of x[s + j - 1] y_q[s] (SHIFT_ROWS: x[s] y_q[s + j - 1]),
  // x a padded row, y_q = rows + q * stride the NB rows of a padded buffer (key s at index s + 1).
  template <int NB, bool SHIFT_ROWS>
  static void row_products(const T* x, const T* rows, int64_t stride, int64_t len, Vec<T>* acc) {
    Vec<T> sum[NB][3];
    for (int q = 0; q < NB; ++q) sum[q][0] = sum[q][1] = sum[q][2] = Vec<T>{};
    for (int64_t s0 = 0; s0 < len; s0 += W) {  // the unshifted side is zero past len
      if (SHIFT_ROWS) {
        const Vec<T> x1 = at(x, s0, 1);
        for (int q = 0; q < NB; ++q)
          for (int j = 0; j < 3; ++j) sum[q][j] += x1 * at(rows + q * stride, s0, j);
      } else {
        const Vec<T> x0 = at(x, s0, 0), x1 = at(x, s0, 1), x2 = at(x, s0, 2);
        for (int q = 0; q < NB; ++q) {
          const Vec<T> y = at(rows + q * stride, s0, 1);
          sum[q][0] += y * x0;
          sum[q][1] += y * x1;
          sum[q][2] += y * x2;
        }
      }
    }
    for (int q = 0; q < NB; ++q)
      for (int j = 0; j < 3; ++j) acc[q * 3 + j] += sum[q][j];
  }

  // As Kernel::backward, with grad_w1 (D, C, 3) and grad_w2 (H, D, 3).
  static void backward(const Problem<T>& p, T* grad, T* grad_bias, T* grad_w1, T* grad_b1, T* grad_w2,
                       int threads) {
    const int64_t t = p.rows, S = p.keys, D = p.width;
    const int n_threads_used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, t)));
    const Broadcast<T> w(p, 3);
    const int64_t n_params = D * C * 3 + D + D * H * 3;  // d-major, as the broadcast weights
    std::vector<double> totals(static_cast<size_t>(n_threads_used) * n_params, 0.0);
    const bool want_bias = BIAS && grad_bias != nullptr;
    parallel_rows(t, n_threads_used, [&](int tid, int n_threads) {
      Rows F(C, S), P(D, S), Hd(D, S), G(H, S), GP(D, S);
      std::vector<Vec<T>> lane_acc(n_params);
      Vec<T>* acc_w1 = lane_acc.data();
      Vec<T>* acc_b1 = acc_w1 + D * C * 3;
      Vec<T>* acc_w2 = acc_b1 + D;
      double* total = totals.data() + tid * n_params;
      Vec<T> g[H], gf[C];
      for (int64_t i = tid; i < t; i += n_threads) {
        const int64_t len = std::max<int64_t>(0, std::min(p.row_len[i], S));
        if (len == 0) continue;
        std::fill(lane_acc.begin(), lane_acc.end(), Vec<T>{});
        for (int64_t b = 0; b < p.batch; ++b) {
          hidden(p, w, b, i, len, F, P, Hd);
          T* g_row = grad + ((b * H) * t + i) * S;
          for (int h = 0; h < H; ++h) G.fill(h, g_row + h * t * S, len);
          // dL/dpre = leaky'(pre) * sum_{h, j} W2[h, d, j] dL/dlogits[h, s + 1 - j], then the weight
          // gradients as sums over the row, in registers (no read-modify-write per chunk).
          for (int64_t d = 0; d < D; ++d) {
            T* gp_row = GP[d];
            gp_row[0] = T(0);
            const Vec<T>* wd = &w.w2[d * H * 3];
            Vec<T> db = Vec<T>{};
            for (int64_t s0 = 0; s0 < len; s0 += W) {
              const int n = static_cast<int>(std::min<int64_t>(W, len - s0));
              Vec<T> gh = Vec<T>{}, gh2 = Vec<T>{};
              for (int h = 0; h < H; ++h) {
                const T* grow = G[h];
                gh += at(grow, s0, 2) * wd[h * 3] + at(grow, s0, 0) * wd[h * 3 + 2];
                gh2 += at(grow, s0, 1) * wd[h * 3 + 1];
              }
              Vec<T> x;
              std::memcpy(&x, P[d] + s0, sizeof x);
              const Vec<T> gp = mask_tail(leaky(x, gh + gh2, p.slope), n);
              std::memcpy(gp_row + 1 + s0, &gp, sizeof gp);
              db += gp;
            }
            std::fill(gp_row + 1 + len, gp_row + GP.stride, T(0));
            acc_b1[d] += db;
            row_products<H, false>(Hd[d], G[0], G.stride, len, acc_w2 + d * H * 3);
            int c0 = 0;
            for (; c0 + 4 <= C; c0 += 4)
              row_products<4, true>(gp_row, F[c0], F.stride, len, acc_w1 + (d * C + c0) * 3);
            for (; c0 < C; ++c0)
              row_products<1, true>(gp_row, F[c0], F.stride, len, acc_w1 + (d * C + c0) * 3);
          }
          // dL/dfeatures[c, s] = sum_{d, j} W1[d, c, j] dL/dpre[d, s + 1 - j], zero past len.
          for (int64_t s0 = 0; s0 < len; s0 += W) {
            const int n = static_cast<int>(std::min<int64_t>(W, len - s0));
            for (int c = 0; c < C; ++c) gf[c] = Vec<T>{};
            for (int64_t d = 0; d < D; ++d) {
              const T* gp_row = GP[d];
              const Vec<T> y0 = at(gp_row, s0, 2), y1 = at(gp_row, s0, 1), y2 = at(gp_row, s0, 0);
              const Vec<T>* wd = &w.w1[d * C * 3];
              for (int c = 0; c < C; ++c) gf[c] += y0 * wd[c * 3] + y1 * wd[c * 3 + 1] + y2 * wd[c * 3 + 2];
            }
            for (int h = 0; h < H; ++h) g[h] = at(G[h], s0, 1) + gf[h];
            for (int h = 0; h < H; ++h) store(g_row + h * t * S + s0, g[h], n);
            if (want_bias)
              for (int h = 0; h < H; ++h) {
                T* dst = grad_bias + (h * t + i) * S + s0;
                store(dst, load(dst, n) + gf[H + h], n);
              }
          }
        }
        for (int64_t j = 0; j < n_params; ++j) {
          double sum = 0.0;
          for (int l = 0; l < W; ++l) sum += lane_acc[j][l];
          total[j] += sum;
        }
      }
    });
    auto sum = [&](int64_t j) {
      double s = 0.0;
      for (int tid = 0; tid < n_threads_used; ++tid) s += totals[tid * n_params + j];
      return static_cast<T>(s);
    };
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t j = 0; j < C * 3; ++j) grad_w1[d * C * 3 + j] = sum(d * C * 3 + j);
      grad_b1[d] = sum(D * C * 3 + d);
      for (int h = 0; h < H; ++h)
        for (int j = 0; j < 3; ++j) grad_w2[(h * D + d) * 3 + j] = sum(D * C * 3 + D + (d * H + h) * 3 + j);
    }
  }
};

#ifndef POSLAB_HEADS
#error "compile with -DPOSLAB_HEADS=<the head count>"
#endif

template <typename T, template <typename, int, bool> class K, typename Fn>
void dispatch(const Problem<T>& p, Fn fn) {
  if (p.bias != nullptr) return fn(K<T, POSLAB_HEADS, true>{});
  return fn(K<T, POSLAB_HEADS, false>{});
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

// kernel_size 1 (the MLP) or 3 (V2); W1 (D, C, kernel_size), W2 (H, D, kernel_size).
#define POSLAB_DAPE_ENTRY_POINTS(T, SUFFIX)                                                              \
  extern "C" void dape_mlp_forward_##SUFFIX(const T* scores, const T* bias, const T* w1, const T* b1,     \
                                            const T* w2, const T* b2, const int64_t* row_len,            \
                                            int64_t batch, int64_t heads, int64_t rows, int64_t keys,     \
                                            int64_t width, double slope, int add_base, T* logits,        \
                                            int threads, int kernel_size) {                              \
    const auto p = problem(scores, bias, w1, b1, w2, b2, row_len, batch, heads, rows, keys, width, slope); \
    auto run = [&](auto k) { k.forward(p, logits, add_base != 0, threads); };                            \
    kernel_size == 3 ? dispatch<T, Conv3>(p, run) : dispatch<T, Kernel>(p, run);                         \
  }                                                                                                      \
  extern "C" void dape_mlp_backward_##SUFFIX(const T* scores, const T* bias, const T* w1, const T* b1,    \
                                             const T* w2, const int64_t* row_len, int64_t batch,         \
                                             int64_t heads, int64_t rows, int64_t keys, int64_t width,     \
                                             double slope, T* grad, T* grad_bias, T* grad_w1,            \
                                             T* grad_b1, T* grad_w2, int threads, int kernel_size) {     \
    const auto p = problem(scores, bias, w1, b1, w2, static_cast<const T*>(nullptr), row_len, batch,      \
                           heads, rows, keys, width, slope);                                             \
    auto run = [&](auto k) { k.backward(p, grad, grad_bias, grad_w1, grad_b1, grad_w2, threads); };      \
    kernel_size == 3 ? dispatch<T, Conv3>(p, run) : dispatch<T, Kernel>(p, run);                         \
  }

POSLAB_DAPE_ENTRY_POINTS(float, f32)
POSLAB_DAPE_ENTRY_POINTS(double, f64)
