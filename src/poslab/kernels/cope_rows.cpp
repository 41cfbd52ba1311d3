// CoPE's per-row elementwise work (arXiv 2405.18719, eq. 3 to 5) fused, forward and backward.
//
// The matrix products stay in PyTorch (BLAS): A = q k^T / sqrt(Dh) (B, H, t, S) and
// z = q e^T / sqrt(Dh) (B, H, t, P). For every query row (b, h, i) with its n = row_len[i] visible
// keys (a prefix: causal attention), this file does what the PyTorch kernel does in some twenty
// passes over (B, H, t, S) tensors, in a few passes over one row that stays in the L1 cache:
//   gates g_j = sigmoid(A_j); positions p_j = sum_{t=j..n-1} g_t, a running sum from the row's last
//   key backwards (rounded once per entry, as PyTorch's cumsum of the flipped gates), clamped at
//   P - 1; logits A_j + z[floor p] + (p - floor p)(z[ceil p] - z[floor p]) (+ bias); their softmax
//   (zero past n) and log-sum-exp.
// The backward recomputes the row from A, z and the log-sum-exp, writes the probabilities (for
// dV = P^T dO) and turns dP = dO v^T in place into dA / sqrt(Dh):
//   dlogits = prob (dP - rowdot), dz[floor p] += dlogits (1 - w), dz[ceil p] += dlogits w,
//   dg_t = sum_{j<=t} dlogits_j (z[ceil p_j] - z[floor p_j]), dA = dlogits + dg g (1 - g).
// The running sums are sequential per row and accumulate in double; the exponentials (sigmoid,
// softmax) use a vectorised exp on GCC vector extensions (one machine register: 8 floats with AVX2,
// 16 with AVX-512); the gathers from z are plain loops the compiler vectorises for the -march it
// is given (poslab/kernels/native.py builds one library per x86-64 level).
//
// Plain C ABI (loaded with ctypes), templated over float and double. Work is split over query rows
// (row i, for every b and h, to thread i mod n), so threads write disjoint rows, and the bias
// gradient (H, t, S) summed over the batch needs no locks.

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

// GCC/Clang vector extension: arithmetic on Vec<T> is elementwise over one machine register; Bits<T>
// is the integer vector of the same lanes, for building powers of two in exp.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(VECTOR_BYTES)));
  typedef int32_t bits __attribute__((vector_size(VECTOR_BYTES)));
  // exp: below LOW the result is 0 (underflow), above HIGH it would overflow; Taylor terms of
  // exp(r), |r| <= ln 2 / 2, up to r^7 / 7! (relative error about 1e-8, below float's rounding).
  static constexpr float LOW = -87.33654f, HIGH = 88.37626f, SHIFTER = 12582912.0f;  // 1.5 * 2^23
  static constexpr float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
  static constexpr int TERMS = 7, MANTISSA = 23, EXP_BIAS = 127;
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(VECTOR_BYTES)));
  typedef int64_t bits __attribute__((vector_size(VECTOR_BYTES)));
  // up to r^13 / 13!: relative error about 1e-17
  static constexpr double LOW = -708.39641853226408, HIGH = 709.78271289338397,
                          SHIFTER = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double LN2_HI = 6.93147180369123816490e-01, LN2_LO = 1.90821492927058770002e-10;
  static constexpr int TERMS = 13, MANTISSA = 52, EXP_BIAS = 1023;
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
using Bits = typename VecOf<T>::bits;
template <typename T>
constexpr int LANES = VECTOR_BYTES / sizeof(T);

template <typename T>
inline Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

// exp on every lane: x = k ln 2 + r with k an integer (rounded by adding 1.5 * 2^mantissa, whose
// low bits then hold k), exp(r) by its Taylor series, and 2^k written straight into the exponent.
template <typename T>
inline Vec<T> vexp(Vec<T> x) {
  using C = VecOf<T>;
  const Vec<T> low = splat<T>(C::LOW), high = splat<T>(C::HIGH), shifter = splat<T>(C::SHIFTER);
  Vec<T> xc = x < high ? x : high;
  xc = xc > low ? xc : low;
  const Vec<T> t = xc * static_cast<T>(1.4426950408889634) + shifter;
  const Vec<T> k = t - shifter;
  const Vec<T> r = xc - k * static_cast<T>(C::LN2_HI) - k * static_cast<T>(C::LN2_LO);
  T coef = 1;
  for (int n = 2; n <= C::TERMS; ++n) coef /= n;  // 1 / TERMS!, folded at compile time
  Vec<T> poly = splat<T>(coef);
  for (int n = C::TERMS; n >= 1; --n) {
    coef *= n;  // 1 / (n - 1)!
    poly = poly * r + coef;
  }
  const Bits<T> k_int = (Bits<T>)t - (Bits<T>)shifter;
  const Bits<T> two_k = (k_int + C::EXP_BIAS) << C::MANTISSA;
  const Vec<T> result = poly * (Vec<T>)two_k;
  return x < low ? Vec<T>{} : result;
}

template <typename T>
inline Vec<T> load(const T* src) {
  Vec<T> v;
  std::memcpy(&v, src, sizeof v);
  return v;
}

template <typename T>
inline void store(T* dst, Vec<T> v) {
  std::memcpy(dst, &v, sizeof v);
}

// out[j] = f(in[j]) for j < n, f elementwise on vectors: full vectors, then one padded tail.
template <typename T, typename Fn>
inline void map_row(const T* in, T* out, int64_t n, Fn f) {
  int64_t j = 0;
  for (; j + LANES<T> <= n; j += LANES<T>) store(out + j, f(load(in + j)));
  if (j < n) {
    T tail[LANES<T>] = {};
    std::memcpy(tail, in + j, (n - j) * sizeof(T));
    const Vec<T> v = f(load(tail));
    std::memcpy(out + j, &v, (n - j) * sizeof(T));
  }
}

template <typename T>
inline Vec<T> sigmoid(Vec<T> a) {
  return T(1) / (T(1) + vexp<T>(-a));
}

template <typename T>
struct Problem {
  const T* scores;         // A (B, H, t, S)
  const T* z;              // (B, H, t, P)
  const T* bias;           // (H, t, S) or nullptr
  const int64_t* row_len;  // (t,): keys visible to each query row (a prefix of the row)
  int64_t batch, heads, rows, keys, npos;
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

// Per-thread row buffers: the gates and the clamped positions of one row, the slopes of its z,
// and (backward) the table gradient with one spare slot (see ``backward``).
template <typename T>
struct Row {
  std::vector<T> gates, pos, slope;
  std::vector<double> grad_z;
  Row(int64_t keys, int64_t npos) : gates(keys), pos(keys), slope(npos), grad_z(npos + 1) {}
};

// slope[c] = z[c + 1] - z[c], 0 for the last row: z[ceil p] - z[floor p] wherever p is not whole.
template <typename T>
inline void slopes(const T* zr, int64_t npos, T* slope) {
  for (int64_t c = 0; c + 1 < npos; ++c) slope[c] = zr[c + 1] - zr[c];
  slope[npos - 1] = 0;
}

// The logits of the row's first n keys (the visible ones) into ``logits`` (which may be ``a``), and
// its gates, clamped positions and z slopes into ``row``:
//   g_j = sigmoid(a_j), p_j = min(sum_{t=j..n-1} g_t, P - 1), w = p - floor p,
//   logits_j = a_j + z[floor p] + w (z[ceil p] - z[floor p]) (+ bias_j),
// where p is whole (or clamped) w = 0 and ceil p = floor p. The running sum is the one sequential
// dependency; the interpolation rides along in the same loop.
template <typename T>
inline void row_logits(const T* a, const T* zr, const T* bias, int64_t n, int64_t npos, Row<T>& row, T* logits) {
  T* g = row.gates.data();
  T* pos = row.pos.data();
  T* slope = row.slope.data();
  map_row<T>(a, g, n, [](Vec<T> x) { return sigmoid<T>(x); });
  slopes(zr, npos, slope);
  const T max_pos = static_cast<T>(npos - 1);
  double run = 0;
  for (int64_t j = n - 1; j >= 0; --j) {
    run += g[j];
    const T p = std::min(static_cast<T>(run), max_pos);
    const int lo = static_cast<int>(p);  // floor: positions are >= 0
    const T w = p - static_cast<T>(lo);
    pos[j] = p;
    logits[j] = a[j] + zr[lo] + w * slope[lo];
  }
  if (bias != nullptr)
    for (int64_t j = 0; j < n; ++j) logits[j] += bias[j];
}

// x[j] = exp(x[j] - shift) for j < n; returns their sum.
template <typename T>
inline T exp_shifted(T* x, int64_t n, T shift) {
  Vec<T> total{};
  int64_t j = 0;
  for (; j + LANES<T> <= n; j += LANES<T>) {
    const Vec<T> e = vexp<T>(load(x + j) - shift);
    store(x + j, e);
    total += e;
  }
  T sum = 0;
  for (int l = 0; l < LANES<T>; ++l) sum += total[l];
  if (j < n) {
    T tail[LANES<T>] = {};
    std::memcpy(tail, x + j, (n - j) * sizeof(T));
    const Vec<T> e = vexp<T>(load(tail) - shift);
    for (int l = 0; l < n - j; ++l) sum += e[l];
    std::memcpy(x + j, &e, (n - j) * sizeof(T));
  }
  return sum;
}

template <typename T>
inline T row_max(const T* x, int64_t n) {
  Vec<T> m = splat<T>(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + LANES<T> <= n; j += LANES<T>) {
    const Vec<T> v = load(x + j);
    m = v > m ? v : m;
  }
  T best = -std::numeric_limits<T>::infinity();
  for (int l = 0; l < LANES<T>; ++l) best = std::max(best, m[l]);
  for (; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

template <typename T>
void forward(const Problem<T>& p, T* probs, T* lse, int threads) {
  const int64_t B = p.batch, H = p.heads, t = p.rows, S = p.keys, P = p.npos;
  parallel_rows(t, threads, [&](int tid, int n_threads) {
    Row<T> row(S, P);
    for (int64_t i = tid; i < t; i += n_threads) {
      const int64_t n = std::clamp<int64_t>(p.row_len[i], 0, S);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t r = (b * H + h) * t + i;
          const T* a = p.scores + r * S;
          T* out = probs + r * S;
          if (n == 0) {
            std::fill(out, out + S, T(0));
            lse[r] = -std::numeric_limits<T>::infinity();
            continue;
          }
          const T* bias = p.bias == nullptr ? nullptr : p.bias + (h * t + i) * S;
          row_logits(a, p.z + r * P, bias, n, P, row, out);
          const T m = row_max(out, n);
          const T sum = exp_shifted(out, n, m);
          const T inv = T(1) / sum;
          map_row<T>(out, out, n, [&](Vec<T> x) { return x * inv; });
          std::fill(out + n, out + S, T(0));
          lse[r] = m + std::log(sum);
        }
    }
  });
}

template <typename T>
void backward(const Problem<T>& p, const T* lse, const T* rowdot, T scale, T* probs, T* grad, T* grad_z,
              T* grad_bias, int threads) {
  const int64_t B = p.batch, H = p.heads, t = p.rows, S = p.keys, P = p.npos;
  parallel_rows(t, threads, [&](int tid, int n_threads) {
    Row<T> row(S, P);
    for (int64_t i = tid; i < t; i += n_threads) {
      const int64_t n = std::clamp<int64_t>(p.row_len[i], 0, S);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t r = (b * H + h) * t + i;
          const T* a = p.scores + r * S;
          const T* zr = p.z + r * P;
          T* prob = probs + r * S;
          T* g_row = grad + r * S;  // in: dP = dO v^T; out: dA / sqrt(Dh)
          T* dzr = grad_z + r * P;
          std::fill(prob + n, prob + S, T(0));
          std::fill(g_row + n, g_row + S, T(0));
          if (n == 0) {
            std::fill(dzr, dzr + P, T(0));
            continue;
          }
          const T* bias = p.bias == nullptr ? nullptr : p.bias + (h * t + i) * S;
          row_logits(a, zr, bias, n, P, row, prob);
          const T* slope = row.slope.data();
          const T dot = rowdot[r];
          // probabilities exp(logits - lse), and dlogits = prob (dP - rowdot) in dP's buffer
          const T shift = lse[r];
          int64_t j = 0;
          for (; j + LANES<T> <= n; j += LANES<T>) {
            const Vec<T> e = vexp<T>(load(prob + j) - shift);
            store(prob + j, e);
            store(g_row + j, e * (load(g_row + j) - dot));
          }
          if (j < n) {
            exp_shifted(prob + j, n - j, shift);
            for (; j < n; ++j) g_row[j] = prob[j] * (g_row[j] - dot);
          }
          if (grad_bias != nullptr) {
            T* gb = grad_bias + (h * t + i) * S;
            for (j = 0; j < n; ++j) gb[j] += g_row[j];
          }
          // The table's gradient and dg, both sequential along the row. Positions never increase
          // along it, so floor p stays on one table row for runs of keys: the run's contributions to
          // dz[floor p] and dz[floor p + 1] are summed in registers and stored when the row changes
          // (dz has a spare slot past the end, which receives only w = 0 terms).
          double* dz = row.grad_z.data();
          std::fill(dz, dz + P + 1, 0.0);
          T* dg = row.pos.data();  // the positions, overwritten with dg once read
          double run = 0;
          T to_floor = 0, to_ceil = 0;  // within a run, in the working precision (as scatter_add)
          int current = static_cast<int>(dg[0]);
          for (j = 0; j < n; ++j) {
            const int lo = static_cast<int>(dg[j]);
            const T w = dg[j] - static_cast<T>(lo);
            if (lo != current) {
              dz[current] += to_floor;
              dz[current + 1] += to_ceil;
              to_floor = to_ceil = 0;
              current = lo;
            }
            const T dl = g_row[j];
            const T upper = dl * w;
            to_ceil += upper;
            to_floor += dl - upper;
            run += dl * slope[lo] * static_cast<T>(w > T(0));  // no branch: w = 0 is data-dependent
            dg[j] = static_cast<T>(run);
          }
          dz[current] += to_floor;
          dz[current + 1] += to_ceil;
          for (int64_t c = 0; c < P; ++c) dzr[c] = static_cast<T>(dz[c]);
          const T* g = row.gates.data();
          for (j = 0; j < n; ++j) {
            const T x = dg[j] * g[j];
            g_row[j] = (g_row[j] + (x - x * g[j])) * scale;
          }
        }
    }
  });
}

}  // namespace

extern "C" const char* cope_rows_isa() { return ISA; }
extern "C" int cope_rows_vector_bytes() { return VECTOR_BYTES; }

#define COPE_ENTRY_POINTS(T, SUFFIX)                                                                      \
  extern "C" void cope_rows_forward_##SUFFIX(const T* scores, const T* z, const T* bias,                  \
                                             const int64_t* row_len, int64_t batch, int64_t heads,        \
                                             int64_t rows, int64_t keys, int64_t npos, T* probs, T* lse,  \
                                             int threads) {                                               \
    const Problem<T> p{scores, z, bias, row_len, batch, heads, rows, keys, npos};                         \
    forward<T>(p, probs, lse, threads);                                                                   \
  }                                                                                                       \
  extern "C" void cope_rows_backward_##SUFFIX(                                                            \
      const T* scores, const T* z, const T* bias, const int64_t* row_len, int64_t batch, int64_t heads,   \
      int64_t rows, int64_t keys, int64_t npos, const T* lse, const T* rowdot, double scale, T* probs,    \
      T* grad, T* grad_z, T* grad_bias, int threads) {                                                    \
    const Problem<T> p{scores, z, bias, row_len, batch, heads, rows, keys, npos};                         \
    backward<T>(p, lse, rowdot, static_cast<T>(scale), probs, grad, grad_z, grad_bias, threads);          \
  }

COPE_ENTRY_POINTS(float, f32)
COPE_ENTRY_POINTS(double, f64)
