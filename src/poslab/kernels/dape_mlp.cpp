// Fused DAPE pointwise MLP (kernel_size 1) over channel-first score maps, forward and backward.
//
// For every (batch b, query i, key s) the MLP reads the feature column f = [A[b, :, i, s]; B[:, i, s]]
// (C = 2H channels, or H without a base bias), computes hidden = leaky(W1 f + b1) (D channels) and
// adds W2 hidden + b2 to the logits. The hidden map never touches memory: each thread keeps LANES
// consecutive keys in registers, so the work is arithmetic, not the eight to ten passes over a
// (B, t, S, D) tensor that the PyTorch path makes. Keys past a row's causal limit (row_len[i]) are
// skipped: the forward writes -inf there, the backward adds nothing.
//
// Plain C ABI (loaded with ctypes by poslab/kernels/native.py), compiled at first use; templated
// over float and double so that tests can compare it with the float64 reference. Work is split over
// query rows (row i to thread i mod n), so threads write disjoint rows; weight gradients are
// accumulated per lane in the working precision within a row, then in double per thread.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

constexpr int LANES = 16;   // consecutive keys processed together, one SIMD vector per channel
constexpr int MAX_HEADS = 32;  // stack arrays; the Python side takes its PyTorch path beyond

// GCC/Clang vector extension: arithmetic on Vec<T> is elementwise over LANES values.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(LANES * sizeof(float))));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(LANES * sizeof(double))));
};
template <typename T>
using Vec = typename VecOf<T>::type;

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

template <typename T>
inline Vec<T> load(const T* src, int n) {
  Vec<T> v = {};
  std::memcpy(&v, src, n * sizeof(T));
  return v;
}

template <typename T>
inline void store(T* dst, const Vec<T>& v, int n) {
  std::memcpy(dst, &v, n * sizeof(T));
}

template <typename T>
inline Vec<T> leaky(const Vec<T>& x, const Vec<T>& y, T slope) {  // y where x > 0, else slope * y
  return x > T(0) ? y : slope * y;
}

// The chunk of keys [s0, s0 + n) of row (b, i): f[c], zero past n.
template <typename T>
inline void load_features(const Problem<T>& p, int64_t b, int64_t i, int64_t s0, int n, Vec<T>* f) {
  const int64_t H = p.heads, t = p.rows, S = p.keys;
  for (int64_t h = 0; h < H; ++h) f[h] = load(p.scores + ((b * H + h) * t + i) * S + s0, n);
  if (p.bias != nullptr)
    for (int64_t h = 0; h < H; ++h) f[H + h] = load(p.bias + (h * t + i) * S + s0, n);
}

// logits[b, h, i, s] = A + [B if add_base] + b2 + W2 leaky(W1 f + b1); -inf past row_len[i].
template <typename T>
void forward(const Problem<T>& p, T* logits, bool add_base, int threads) {
  const int64_t H = p.heads, t = p.rows, S = p.keys, D = p.width, C = p.channels;
  parallel_rows(t, threads, [&](int tid, int n_threads) {
    Vec<T> f[2 * MAX_HEADS], acc[MAX_HEADS];
    for (int64_t i = tid; i < t; i += n_threads) {
      const int64_t len = std::max<int64_t>(0, std::min(p.row_len[i], S));
      for (int64_t b = 0; b < p.batch; ++b) {
        for (int64_t s0 = 0; s0 < len; s0 += LANES) {
          const int n = static_cast<int>(std::min<int64_t>(LANES, len - s0));
          load_features(p, b, i, s0, n, f);
          for (int64_t h = 0; h < H; ++h) acc[h] = f[h] + p.b2[h];
          if (add_base && p.bias != nullptr)
            for (int64_t h = 0; h < H; ++h) acc[h] += f[H + h];
          for (int64_t d = 0; d < D; ++d) {
            const T* w = p.w1 + d * C;
            Vec<T> pre = f[0] * w[0] + p.b1[d];
            for (int64_t c = 1; c < C; ++c) pre += f[c] * w[c];
            const Vec<T> hid = leaky(pre, pre, p.slope);
            for (int64_t h = 0; h < H; ++h) acc[h] += hid * p.w2[h * D + d];
          }
          for (int64_t h = 0; h < H; ++h) store(logits + ((b * H + h) * t + i) * S + s0, acc[h], n);
        }
        for (int64_t h = 0; h < H; ++h) {
          T* dst = logits + ((b * H + h) * t + i) * S;
          std::fill(dst + len, dst + S, -std::numeric_limits<T>::infinity());
        }
      }
    }
  });
}

// grad (B, H, t, S) holds dL/dlogits on entry and dL/dA (before the 1/sqrt(Dh) scale) on return.
// grad_bias (H, t, S), when given, gets the MLP's dL/dB added (the caller adds the base's own term).
// grad_w1 (D, C), grad_b1 (D,), grad_w2 (H, D) are overwritten.
template <typename T>
void backward(const Problem<T>& p, T* grad, T* grad_bias, T* grad_w1, T* grad_b1, T* grad_w2, int threads) {
  const int64_t H = p.heads, t = p.rows, S = p.keys, D = p.width, C = p.channels;
  const int n_threads_used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, t)));
  // Per thread: dW1 (D*C), db1 (D), dW2 (H*D) in double.
  const int64_t n_params = D * C + D + H * D;
  std::vector<double> totals(static_cast<size_t>(n_threads_used) * n_params, 0.0);
  const bool want_bias = grad_bias != nullptr && p.bias != nullptr;
  parallel_rows(t, n_threads_used, [&](int tid, int n_threads) {
    Vec<T> f[2 * MAX_HEADS], g[MAX_HEADS], ga[MAX_HEADS], gb[MAX_HEADS];
    std::vector<Vec<T>> lane_acc(n_params);  // per-lane partial sums of the weight gradients
    Vec<T>* acc_w1 = lane_acc.data();
    Vec<T>* acc_b1 = acc_w1 + D * C;
    Vec<T>* acc_w2 = acc_b1 + D;
    double* total = totals.data() + tid * n_params;
    for (int64_t i = tid; i < t; i += n_threads) {
      const int64_t len = std::max<int64_t>(0, std::min(p.row_len[i], S));
      std::fill(lane_acc.begin(), lane_acc.end(), Vec<T>{});
      for (int64_t b = 0; b < p.batch; ++b) {
        for (int64_t s0 = 0; s0 < len; s0 += LANES) {
          const int n = static_cast<int>(std::min<int64_t>(LANES, len - s0));
          load_features(p, b, i, s0, n, f);
          for (int64_t h = 0; h < H; ++h) {
            g[h] = load(grad + ((b * H + h) * t + i) * S + s0, n);
            ga[h] = g[h];
            gb[h] = Vec<T>{};
          }
          for (int64_t d = 0; d < D; ++d) {
            const T* w = p.w1 + d * C;
            Vec<T> pre = f[0] * w[0] + p.b1[d];
            for (int64_t c = 1; c < C; ++c) pre += f[c] * w[c];
            const Vec<T> hid = leaky(pre, pre, p.slope);
            Vec<T> gh = {};
            for (int64_t h = 0; h < H; ++h) {
              acc_w2[h * D + d] += g[h] * hid;
              gh += g[h] * p.w2[h * D + d];
            }
            const Vec<T> gp = leaky(pre, gh, p.slope);
            acc_b1[d] += gp;
            for (int64_t c = 0; c < C; ++c) acc_w1[d * C + c] += gp * f[c];
            for (int64_t h = 0; h < H; ++h) ga[h] += gp * w[h];
            if (want_bias)
              for (int64_t h = 0; h < H; ++h) gb[h] += gp * w[H + h];
          }
          for (int64_t h = 0; h < H; ++h) store(grad + ((b * H + h) * t + i) * S + s0, ga[h], n);
          if (want_bias)
            for (int64_t h = 0; h < H; ++h) {
              T* dst = grad_bias + (h * t + i) * S + s0;
              store(dst, load(dst, n) + gb[h], n);
            }
        }
      }
      for (int64_t j = 0; j < n_params; ++j) {
        double sum = 0.0;
        for (int l = 0; l < LANES; ++l) sum += lane_acc[j][l];
        total[j] += sum;
      }
    }
  });
  for (int64_t j = 0; j < n_params; ++j) {
    double sum = 0.0;
    for (int tid = 0; tid < n_threads_used; ++tid) sum += totals[tid * n_params + j];
    T value = static_cast<T>(sum);
    if (j < D * C) grad_w1[j] = value;
    else if (j < D * C + D) grad_b1[j - D * C] = value;
    else grad_w2[j - D * C - D] = value;
  }
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

#define POSLAB_DAPE_ENTRY_POINTS(T, SUFFIX)                                                          \
  extern "C" void dape_mlp_forward_##SUFFIX(const T* scores, const T* bias, const T* w1, const T* b1, \
                                            const T* w2, const T* b2, const int64_t* row_len,        \
                                            int64_t batch, int64_t heads, int64_t rows, int64_t keys, \
                                            int64_t width, double slope, int add_base, T* logits,    \
                                            int threads) {                                           \
    forward(problem(scores, bias, w1, b1, w2, b2, row_len, batch, heads, rows, keys, width, slope),   \
            logits, add_base != 0, threads);                                                         \
  }                                                                                                  \
  extern "C" void dape_mlp_backward_##SUFFIX(const T* scores, const T* bias, const T* w1, const T* b1,\
                                             const T* w2, const int64_t* row_len, int64_t batch,     \
                                             int64_t heads, int64_t rows, int64_t keys, int64_t width, \
                                             double slope, T* grad, T* grad_bias, T* grad_w1,        \
                                             T* grad_b1, T* grad_w2, int threads) {                  \
    backward(problem(scores, bias, w1, b1, w2, static_cast<const T*>(nullptr), row_len, batch, heads, \
                     rows, keys, width, slope),                                                      \
             grad, grad_bias, grad_w1, grad_b1, grad_w2, threads);                                   \
  }

POSLAB_DAPE_ENTRY_POINTS(float, f32)
POSLAB_DAPE_ENTRY_POINTS(double, f64)
