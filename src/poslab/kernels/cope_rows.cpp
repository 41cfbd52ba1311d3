// CoPE's per-row elementwise work (arXiv 2405.18719, eq. 3 to 5) fused, forward and backward.
//
// The matrix products stay in PyTorch (BLAS): A = q k^T / sqrt(Dh) (B, H, t, S) and
// z = q e^T / sqrt(Dh) (B, H, t, P). For every query row (b, h, i) with its n = row_len[i] visible
// keys (a prefix: causal attention), this file does what the PyTorch kernel does in some twenty
// passes over (B, H, t, S) tensors, in a few passes over one row that stays in the L1 cache:
//   gates g_j = sigmoid(A_j); positions p_j = sum_{t=j..n-1} g_t, a running sum from the row's last
//   key backwards (summed in double, rounded once per entry), clamped at
//   P - 1; logits A_j + z[floor p] + (p - floor p)(z[ceil p] - z[floor p]) (+ bias); their softmax
//   (zero past n) and log-sum-exp.
// The backward turns dP = dO v^T in place into dA / sqrt(Dh):
//   dlogits = prob (dP - rowdot), dz[floor p] += dlogits (1 - w), dz[ceil p] += dlogits w,
//   dg_t = sum_{j<=t} dlogits_j (z[ceil p_j] - z[floor p_j]), dA = dlogits + dg g (1 - g),
// either from the probabilities and gates the forward kept (``cope_rows_backward_saved``: only the
// positions are summed again) or recomputing the row from A, z and the log-sum-exp, and writing the
// probabilities for dV = P^T dO (``cope_rows_backward``).
// The running sums accumulate in double, several stretches of a row at a time (a single sum is bound
// by the latency of one addition per key); the exponentials (sigmoid, softmax) use a vectorised exp on
// GCC vector extensions (one machine register: 8 floats with AVX2, 16 with AVX-512), and the lookups
// z[floor p] the gather instruction where there is one; the table gradient is summed per run of keys
// on one table row without a branch per key. poslab/kernels/native.py builds one library per x86-64
// level.
//
// Plain C ABI (loaded with ctypes), templated over float and double. Work is split over query rows
// (``for_each_row``).

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the gather instructions
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

#include "simd.h"  // VECTOR_BYTES, ISA, Vec<T>, Bits<T>, LANES<T>, splat

// exp: below LOW the result is 0 (underflow), above HIGH it would overflow.
template <typename T>
struct ExpOf;
template <>
struct ExpOf<float> {
  // Taylor terms of exp(r), |r| <= ln 2 / 2, up to r^7 / 7! (relative error about 1e-8, below
  // float's rounding).
  static constexpr float LOW = -87.33654f, HIGH = 88.37626f, SHIFTER = 12582912.0f;  // 1.5 * 2^23
  static constexpr float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
  static constexpr int TERMS = 7, MANTISSA = 23, EXP_BIAS = 127;
};
template <>
struct ExpOf<double> {
  // up to r^13 / 13!: relative error about 1e-17
  static constexpr double LOW = -708.39641853226408, HIGH = 709.78271289338397,
                          SHIFTER = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double LN2_HI = 6.93147180369123816490e-01, LN2_LO = 1.90821492927058770002e-10;
  static constexpr int TERMS = 13, MANTISSA = 52, EXP_BIAS = 1023;
};

// exp on every lane: x = k ln 2 + r with k an integer (rounded by adding 1.5 * 2^mantissa, whose
// low bits then hold k), exp(r) by its Taylor series, and 2^k written straight into the exponent.
template <typename T>
inline Vec<T> vexp(Vec<T> x) {
  using C = ExpOf<T>;
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

// inout[j] = f(in[j], inout[j]) for j < n, f elementwise on vectors: full vectors, then one padded tail.
template <typename T, typename Fn>
inline void map_row2(const T* in, T* inout, int64_t n, Fn f) {
  int64_t j = 0;
  for (; j + LANES<T> <= n; j += LANES<T>) store(inout + j, f(load(in + j), load(inout + j)));
  if (j < n) {
    T a[LANES<T>] = {}, b[LANES<T>] = {};
    std::memcpy(a, in + j, (n - j) * sizeof(T));
    std::memcpy(b, inout + j, (n - j) * sizeof(T));
    const Vec<T> v = f(load(a), load(b));
    std::memcpy(inout + j, &v, (n - j) * sizeof(T));
  }
}

// total[j] += x[j] for j < n (the bias gradient, summed over the batch).
template <typename T>
inline void add_row(const T* x, int64_t n, T* total) {
  for (int64_t j = 0; j < n; ++j) total[j] += x[j];
}

template <typename T>
inline Vec<T> sigmoid(Vec<T> a) {
  return T(1) / (T(1) + vexp<T>(-a));
}

// base[idx[l]] on every lane: the gather instruction where the ISA has one for the type, else lane by
// lane.
template <typename T>
inline Vec<T> gather(const T* base, Bits<T> idx) {
  Vec<T> out;
  for (int l = 0; l < LANES<T>; ++l) out[l] = base[idx[l]];
  return out;
}
#if defined(__AVX512F__)
template <>
inline Vec<float> gather<float>(const float* base, Bits<float> idx) {
  return (Vec<float>)_mm512_i32gather_ps((__m512i)idx, base, 4);
}
template <>
inline Vec<double> gather<double>(const double* base, Bits<double> idx) {
  return (Vec<double>)_mm512_i64gather_pd((__m512i)idx, base, 8);
}
#elif defined(__AVX2__)
template <>
inline Vec<float> gather<float>(const float* base, Bits<float> idx) {
  return (Vec<float>)_mm256_i32gather_ps(base, (__m256i)idx, 4);
}
template <>
inline Vec<double> gather<double>(const double* base, Bits<double> idx) {
  return (Vec<double>)_mm256_i64gather_pd(base, (__m256i)idx, 8);
}
#endif

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

// Per-thread row buffers: the gates and the clamped positions of one row, the running sums behind
// the positions, the slopes of its z, and (backward) per table row the running sums where its run of
// keys ends (see ``backward``).
template <typename T>
struct Row {
  std::vector<T> gates, pos, slope;
  std::vector<double> sums, end_lower, end_upper;
  std::vector<char> seen;
  Row(int64_t keys, int64_t npos)
      : gates(keys), pos(keys), slope(npos), sums(keys), end_lower(npos), end_upper(npos), seen(npos) {}
};

// slope[c] = z[c + 1] - z[c], 0 for the last row: z[ceil p] - z[floor p] wherever p is not whole.
template <typename T>
inline void slopes(const T* zr, int64_t npos, T* slope) {
  for (int64_t c = 0; c + 1 < npos; ++c) slope[c] = zr[c + 1] - zr[c];
  slope[npos - 1] = 0;
}

// pos[j] = min(sum_{t=j..n-1} g_t, max_pos), summed in double and rounded once. A single running sum
// is one dependent addition per key (its latency, not the arithmetic, bounds the loop); here
// STRETCHES running sums over as many stretches of the row advance side by side, and each stretch
// then adds the total of the stretches after it (the keys past the last whole stretch are summed
// first, on their own).
template <typename T>
inline void suffix_sums(const T* g, int64_t n, T max_pos, double* sums, T* pos) {
  constexpr int STRETCHES = 4;
  const int64_t m = n / STRETCHES, whole = m * STRETCHES;
  double carry = 0;
  for (int64_t j = n - 1; j >= whole; --j) sums[j] = carry += g[j];
  double run[STRETCHES] = {};
  for (int64_t k = m - 1; k >= 0; --k)
    for (int s = 0; s < STRETCHES; ++s) sums[s * m + k] = run[s] += g[s * m + k];
  for (int s = STRETCHES - 1; s >= 0; --s) {
    for (int64_t j = s * m; j < (s + 1) * m; ++j) sums[j] += carry;
    carry += run[s];
  }
  for (int64_t j = 0; j < n; ++j) {
    const T sum = static_cast<T>(sums[j]);
    pos[j] = sum < max_pos ? sum : max_pos;  // NaN (a NaN query) -> max_pos: a table row, not past it
  }
}

// The logits of the row's first n keys (the visible ones) into ``logits`` (which may be ``a``), its
// gates into ``g`` (the row buffer, or the caller's row of saved gates), and its clamped positions
// and z slopes into ``row``:
//   g_j = sigmoid(a_j), p_j = min(sum_{t=j..n-1} g_t, P - 1), w = p - floor p,
//   logits_j = a_j + z[floor p] + w (z[ceil p] - z[floor p]) (+ bias_j),
// where p is whole (or clamped) w = 0 and ceil p = floor p. Once the positions are known the keys are
// independent of each other: a vector of them at a time, the z lookups gathered.
template <typename T>
inline void row_logits(const T* a, const T* zr, const T* bias, int64_t n, int64_t npos, Row<T>& row, T* g,
                       T* logits) {
  T* __restrict pos = row.pos.data();
  T* __restrict slope = row.slope.data();
  map_row<T>(a, g, n, [](Vec<T> x) { return sigmoid<T>(x); });
  slopes(zr, npos, slope);
  suffix_sums(g, n, static_cast<T>(npos - 1), row.sums.data(), pos);
  int64_t j = 0;
  for (; j + LANES<T> <= n; j += LANES<T>) {
    const Vec<T> p = load(pos + j);
    const Bits<T> lo = __builtin_convertvector(p, Bits<T>);  // floor: positions are >= 0
    const Vec<T> w = p - __builtin_convertvector(lo, Vec<T>);
    store(logits + j, load(a + j) + gather(zr, lo) + w * gather(slope, lo));
  }
  for (; j < n; ++j) {
    const int lo = static_cast<int>(pos[j]);
    logits[j] = a[j] + zr[lo] + (pos[j] - static_cast<T>(lo)) * slope[lo];
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

// The gradient half of a row's backward, from its dlogits = prob (dP - rowdot) in ``g_row``, its gates
// ``g`` and the positions and slopes in ``row``: the table gradient into ``dzr`` (P,) and ``g_row``
// turned into dA * scale, dA = dlogits + dg g (1 - g), dg_t = sum_{j<=t} dlogits_j (z[ceil p_j] - z[floor p_j]).
template <typename T>
inline void row_gradients(const T* g, int64_t n, int64_t P, Row<T>& row, T scale, T* g_row, T* dzr) {
  const T* slope = row.slope.data();
  int64_t j;
  // The table's gradient and dg, both running sums along the row, in one pass without
  // branches. Positions never increase along the row, so the keys on table row c (floor p = c)
  // are one run, and the keys with floor p >= c a prefix of the row: with running sums of
  // dlogits (1 - w) and dlogits w, the sum over run c is the running sum where the run ends
  // minus the one where run c + 1 ended. Every key stores its running sums at its table row
  // (the run's last key stores last); rows no key falls on are filled in after.
  double* end_lower = row.end_lower.data();
  double* end_upper = row.end_upper.data();
  char* seen = row.seen.data();
  std::fill(seen, seen + P, 0);
  T* dg = row.pos.data();  // the positions, overwritten with dg once read
  double run = 0, lower = 0, upper = 0;
  for (j = 0; j < n; ++j) {
    const int lo = static_cast<int>(dg[j]);
    const T w = dg[j] - static_cast<T>(lo);
    const T dl = g_row[j];
    const T up = dl * w;
    upper += up;
    lower += dl - up;
    end_upper[lo] = upper;
    end_lower[lo] = lower;
    seen[lo] = 1;
    run += dl * slope[lo] * static_cast<T>(w > T(0));  // w = 0: p whole or clamped, no slope
    dg[j] = static_cast<T>(run);
  }
  // Table rows from the last. Row c + 1 gets the lower weights of its own run and the upper
  // weights of run c; row P - 1's keys are clamped or whole (w = 0), so nothing goes past it.
  double after_lower = 0, after_upper = 0, lower_above = 0;
  for (int64_t c = P - 1; c >= 0; --c) {
    // the running sums where the keys with floor p >= c end
    const double at_lower = seen[c] ? end_lower[c] : after_lower;
    const double at_upper = seen[c] ? end_upper[c] : after_upper;
    if (c + 1 < P) dzr[c + 1] = static_cast<T>(lower_above + (at_upper - after_upper));
    lower_above = at_lower - after_lower;
    after_lower = at_lower;
    after_upper = at_upper;
  }
  dzr[0] = static_cast<T>(lower_above);
  for (j = 0; j < n; ++j) {
    const T x = dg[j] * g[j];
    g_row[j] = (g_row[j] + (x - x * g[j])) * scale;
  }
}

// Calls fn(row, h, i, n, r) for every query row (b, h, i): n = its visible keys, r = its index in
// the (B, H, t) rows, row = the calling thread's buffers. Rows go to threads by i mod n, so threads
// write disjoint rows and the bias gradient (H, t, S), summed over the batch, needs no locks; each
// thread visits its rows in memory order (b, h outer, i inner): short rows taken i outer jumped t * S
// floats from one to the next, which the hardware prefetcher cannot follow.
template <typename T, typename Fn>
void for_each_row(const Problem<T>& p, int threads, Fn fn) {
  parallel_rows(p.rows, threads, [&](int tid, int n_threads) {
    Row<T> row(p.keys, p.npos);
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads; ++h)
        for (int64_t i = tid; i < p.rows; i += n_threads)
          fn(row, h, i, std::clamp<int64_t>(p.row_len[i], 0, p.keys), (b * p.heads + h) * p.rows + i);
  });
}

template <typename T>
void forward(const Problem<T>& p, T* probs, T* lse, T* gates, int threads) {
  const int64_t t = p.rows, S = p.keys, P = p.npos;
  for_each_row(p, threads, [&](Row<T>& row, int64_t h, int64_t i, int64_t n, int64_t r) {
    const T* a = p.scores + r * S;
    T* out = probs + r * S;
    if (n == 0) {
      std::fill(out, out + S, T(0));
      lse[r] = -std::numeric_limits<T>::infinity();
      return;
    }
    const T* bias = p.bias == nullptr ? nullptr : p.bias + (h * t + i) * S;
    T* g = gates == nullptr ? row.gates.data() : gates + r * S;
    row_logits(a, p.z + r * P, bias, n, P, row, g, out);
    if (gates != nullptr) std::fill(g + n, g + S, T(0));
    bool nan = false;  // a NaN logit makes the row NaN, as softmax does (row_max would skip it)
    for (int64_t j = 0; j < n; ++j) nan |= out[j] != out[j];
    if (nan) {
      std::fill(out, out + n, std::numeric_limits<T>::quiet_NaN());
      std::fill(out + n, out + S, T(0));
      lse[r] = std::numeric_limits<T>::quiet_NaN();
      return;
    }
    const T m = row_max(out, n);
    const T sum = exp_shifted(out, n, m);
    const T inv = T(1) / sum;
    map_row<T>(out, out, n, [&](Vec<T> x) { return x * inv; });
    std::fill(out + n, out + S, T(0));
    lse[r] = m + std::log(sum);
  });
}

template <typename T>
void backward(const Problem<T>& p, const T* lse, const T* rowdot, T scale, T* probs, T* grad, T* grad_z,
              T* grad_bias, int threads) {
  const int64_t t = p.rows, S = p.keys, P = p.npos;
  for_each_row(p, threads, [&](Row<T>& row, int64_t h, int64_t i, int64_t n, int64_t r) {
    const T* a = p.scores + r * S;
    const T* zr = p.z + r * P;
    T* prob = probs + r * S;
    T* g_row = grad + r * S;  // in: dP = dO v^T; out: dA / sqrt(Dh)
    std::fill(prob + n, prob + S, T(0));
    std::fill(g_row + n, g_row + S, T(0));
    if (n == 0) {
      std::fill(grad_z + r * P, grad_z + (r + 1) * P, T(0));
      return;
    }
    const T* bias = p.bias == nullptr ? nullptr : p.bias + (h * t + i) * S;
    row_logits(a, zr, bias, n, P, row, row.gates.data(), prob);
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
    if (grad_bias != nullptr) add_row(g_row, n, grad_bias + (h * t + i) * S);
    row_gradients(row.gates.data(), n, P, row, scale, g_row, grad_z + r * P);
  });
}

// The backward from what the forward saved instead of the scores: the probabilities and the gates
// (B, H, t, S, zero past row_len). Only the positions are summed again (from the saved gates) and the
// z slopes taken; no sigmoid, exponential or z lookup for the logits. ``p.scores`` and ``p.bias`` are
// not read.
template <typename T>
void backward_saved(const Problem<T>& p, const T* probs, const T* gates, const T* rowdot, T scale, T* grad,
                    T* grad_z, T* grad_bias, int threads) {
  const int64_t t = p.rows, S = p.keys, P = p.npos;
  for_each_row(p, threads, [&](Row<T>& row, int64_t h, int64_t i, int64_t n, int64_t r) {
    const T* prob = probs + r * S;
    const T* g = gates + r * S;
    T* g_row = grad + r * S;  // in: dP = dO v^T; out: dA / sqrt(Dh)
    std::fill(g_row + n, g_row + S, T(0));
    if (n == 0) {
      std::fill(grad_z + r * P, grad_z + (r + 1) * P, T(0));
      return;
    }
    slopes(p.z + r * P, P, row.slope.data());
    suffix_sums(g, n, static_cast<T>(P - 1), row.sums.data(), row.pos.data());
    const T dot = rowdot[r];
    map_row2<T>(prob, g_row, n, [dot](Vec<T> pr, Vec<T> dp) { return pr * (dp - dot); });  // dlogits
    if (grad_bias != nullptr) add_row(g_row, n, grad_bias + (h * t + i) * S);
    row_gradients(g, n, P, row, scale, g_row, grad_z + r * P);
  });
}

}  // namespace

extern "C" const char* cope_rows_isa() { return ISA; }
extern "C" int cope_rows_vector_bytes() { return VECTOR_BYTES; }

// forward: ``gates`` may be null (not kept); otherwise it receives the gates (zero past row_len).
#define COPE_ENTRY_POINTS(T, SUFFIX)                                                                      \
  extern "C" void cope_rows_forward_##SUFFIX(const T* scores, const T* z, const T* bias,                  \
                                             const int64_t* row_len, int64_t batch, int64_t heads,        \
                                             int64_t rows, int64_t keys, int64_t npos, T* probs, T* lse,  \
                                             T* gates, int threads) {                                     \
    const Problem<T> p{scores, z, bias, row_len, batch, heads, rows, keys, npos};                         \
    forward<T>(p, probs, lse, gates, threads);                                                            \
  }                                                                                                       \
  extern "C" void cope_rows_backward_##SUFFIX(                                                            \
      const T* scores, const T* z, const T* bias, const int64_t* row_len, int64_t batch, int64_t heads,   \
      int64_t rows, int64_t keys, int64_t npos, const T* lse, const T* rowdot, double scale, T* probs,    \
      T* grad, T* grad_z, T* grad_bias, int threads) {                                                    \
    const Problem<T> p{scores, z, bias, row_len, batch, heads, rows, keys, npos};                         \
    backward<T>(p, lse, rowdot, static_cast<T>(scale), probs, grad, grad_z, grad_bias, threads);          \
  }                                                                                                       \
  extern "C" void cope_rows_backward_saved_##SUFFIX(                                                      \
      const T* probs, const T* gates, const T* z, const int64_t* row_len, int64_t batch, int64_t heads,   \
      int64_t rows, int64_t keys, int64_t npos, const T* rowdot, double scale, T* grad, T* grad_z,        \
      T* grad_bias, int threads) {                                                                        \
    const Problem<T> p{nullptr, z, nullptr, row_len, batch, heads, rows, keys, npos};                     \
    backward_saved<T>(p, probs, gates, rowdot, static_cast<T>(scale), grad, grad_z, grad_bias, threads);  \
  }

COPE_ENTRY_POINTS(float, f32)
COPE_ENTRY_POINTS(double, f64)
