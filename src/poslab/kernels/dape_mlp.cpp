// Fused DAPE pointwise MLP (kernel_size 1) over channel-first score maps, forward and backward.
//
// For every (batch b, query i, key s) the MLP reads the feature column f = [A[b, :, i, s]; B[:, i, s]]
// (C = 2H channels, or H without a base bias), computes hidden = leaky(W1 f + b1) (D channels) and
// adds W2 hidden + b2 to the logits. The hidden map never touches memory: each thread takes one
// query row, a tile of up to 16 SIMD vectors of its keys at a time, and computes the hidden map
// vector by vector in registers, so the work is arithmetic, not the eight to ten passes over a
// (B, t, S, D) tensor that the PyTorch path makes; only per-tile buffers of D vectors per key vector
// (a few to a few tens of KiB per thread) are written. Keys past a row's causal limit (row_len[i])
// are skipped: the forward writes -inf there, the backward adds nothing.
//
// Built once per instruction set and head count (poslab/kernels/native.py passes -march=x86-64-v3,
// x86-64-v4, ... and -DPOSLAB_HEADS=H): the vector is one machine register (8 floats with AVX2, 16
// with AVX-512), and H is a compile-time constant, so that the channel loops unroll. Every weight is
// broadcast once per call into a full vector, read as a memory operand of the multiply-adds (the
// loops read one hidden channel's weights at a time, so these stay in L1 even with AVX-512).
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
#include <type_traits>
#include <vector>

// Generic x86 tuning for every build: -march=native on Zen 3 implies -mtune=znver3, under which GCC
// folds the convolutions' input loads into each multiply-add (loading every vector once per output
// channel), which made the native build of DAPE V2 up to half again slower than the x86-64-v3 one.
#if defined(__x86_64__) && !defined(__clang__)
#pragma GCC target("tune=generic")
#endif

namespace {

#include "simd.h"  // VECTOR_BYTES, ISA, Vec<T>, LANES<T>, splat

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

// What the kernel_size-1 backward may do besides the MLP's own gradient (all off: grad holds dL/dlogits):
// with probs, grad holds grad_out v^T on entry and the kernel forms the softmax's backward
// dL/dlogits = probs * (grad - row[b, h, i]) as it reads it (row (B, H, t): rowsum(grad_out * out));
// scale multiplies dL/dA as it is stored (the scores' 1/sqrt(Dh)); base_grad adds dL/dlogits summed
// over the batch to grad_bias (the base's own term, for A + B + f); grad_b2 (H,), when given, gets
// dL/db2, the sum of dL/dlogits.
template <typename T>
struct Extras {
  const T* probs = nullptr;
  const T* row = nullptr;
  T scale = T(1);
  bool base_grad = false;
  T* grad_b2 = nullptr;
};

// The MLP's weights as full vectors, d-major: w1[d * C + c], b1[d], w2[d * H + h] (W2 transposed).
template <typename T>
struct Broadcast {
  std::vector<Vec<T>> w1, b1, w2;
  explicit Broadcast(const Problem<T>& p) : w1(p.width * p.channels), b1(p.width), w2(p.width * p.heads) {
    const int64_t D = p.width, C = p.channels, H = p.heads;
    for (int64_t d = 0; d < D; ++d) {
      b1[d] = Vec<T>{} + p.b1[d];
      for (int64_t c = 0; c < C; ++c) w1[d * C + c] = Vec<T>{} + p.w1[d * C + c];
      for (int64_t h = 0; h < H; ++h) w2[d * H + h] = Vec<T>{} + p.w2[h * D + d];
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
//
// Work goes by tiles of up to TILE_VECS vectors of one query row's keys. The base bias B[:, i, s] is the
// same for every batch element, so its share of the first layer, W1[:, H:] B + b1, is computed once
// per tile (PB, D x tile) and read by every batch element, which then adds only W1[:, :H] A. In the
// backward, the batch elements' dL/dpre is also summed over the batch per tile (GPS) and the bias
// channels' gradients (dW1[:, H:], db1, dL/dB) are taken from that sum once per tile: of the MLP's
// multiply-adds per (batch, query, key), the bias channels' half of the first layer's three products
// is done once per query and key. The backward's first pass loops over hidden channels outside and
// the tile's keys inside, so that a hidden channel's weight-gradient sums stay in registers across
// the tile (flushed once per tile, not read and written back per key vector).
template <typename T, int H, bool BIAS>
struct Kernel {
  static constexpr int C = BIAS ? 2 * H : H;
  static constexpr int W = LANES<T>;
  static constexpr int TILE_VECS = 16;  // key vectors per tile
  // Key vectors per step of the forward and of the backward's second pass: two where there are 32
  // vector registers (AVX-512) and the head count leaves room for their sums, else one.
  static constexpr int VB = VECTOR_BYTES == 64 && H <= 6 ? 2 : 1;

  // A tile's H channel rows (stride t * S from row) from key k0, nv vectors, zeros past len.
  static inline void load_tile(Vec<T> (*dst)[TILE_VECS], const T* row, int64_t stride, int64_t k0,
                               int64_t len, int nv) {
    for (int h = 0; h < H; ++h)
      for (int v = 0; v < nv; ++v) {
        const int64_t s = k0 + v * W;
        dst[h][v] = load(row + h * stride + s, static_cast<int>(std::min<int64_t>(W, len - s)));
      }
  }

  // PB[d][v] = b1[d] + W1[d, H:] B[:, v] for the tile (B's rows in FB; b1 alone without a bias).
  static inline void bias_share(const Broadcast<T>& w, int64_t D, const Vec<T> (*FB)[TILE_VECS], int nv,
                                Vec<T>* PB) {
    for (int64_t d = 0; d < D; ++d) {
      const Vec<T>* w1 = &w.w1[d * C];
      for (int v = 0; v < nv; ++v) {
        Vec<T> x = w.b1[d];
        if (BIAS)
          for (int h = 0; h < H; ++h) x += FB[h][v] * w1[H + h];
        PB[d * TILE_VECS + v] = x;
      }
    }
  }

  // The forward's logits for key vectors v .. v + V of a tile (V = VB when the registers allow: every
  // weight read then serves V vectors).
  template <int V>
  static inline void forward_vectors(const Problem<T>& p, const Broadcast<T>& w,
                                     const Vec<T> (*FA)[TILE_VECS], const Vec<T> (*FB)[TILE_VECS],
                                     const Vec<T>* PB, bool add_base, T* out_row, int64_t k0, int v,
                                     int64_t len) {
    const int64_t D = p.width, stride = p.rows * p.keys;
    Vec<T> acc[V][H];
    for (int u = 0; u < V; ++u)
      for (int h = 0; h < H; ++h) {
        acc[u][h] = FA[h][v + u] + p.b2[h];
        if (BIAS && add_base) acc[u][h] += FB[h][v + u];
      }
    for (int64_t d = 0; d < D; ++d) {
      const Vec<T>* w1 = &w.w1[d * C];
      const Vec<T>* w2 = &w.w2[d * H];
      for (int u = 0; u < V; ++u) {
        Vec<T> x = PB[d * TILE_VECS + v + u];  // one chain: the V vectors and the d's overlap
        for (int h = 0; h < H; ++h) x += FA[h][v + u] * w1[h];
        const Vec<T> hid = leaky(x, x, p.slope);
        for (int h = 0; h < H; ++h) acc[u][h] += hid * w2[h];
      }
    }
    for (int u = 0; u < V; ++u) {
      const int64_t s = k0 + (v + u) * W;
      const int n = static_cast<int>(std::min<int64_t>(W, len - s));
      for (int h = 0; h < H; ++h) store(out_row + h * stride + s, acc[u][h], n);
    }
  }

  // logits[b, h, i, s] = A + [B if add_base] + b2 + W2 leaky(W1 f + b1); -inf past row_len[i].
  static void forward(const Problem<T>& p, T* logits, bool add_base, int threads) {
    const int64_t t = p.rows, S = p.keys, D = p.width, stride = t * S;
    const Broadcast<T> w(p);
    parallel_rows(t, threads, [&](int tid, int n_threads) {
      Vec<T> FA[H][TILE_VECS], FB[H][TILE_VECS];
      std::vector<Vec<T>> pb(D * TILE_VECS);
      Vec<T>* PB = pb.data();
      for (int64_t i = tid; i < t; i += n_threads) {
        const int64_t len = std::max<int64_t>(0, std::min(p.row_len[i], S));
        for (int64_t k0 = 0; k0 < len; k0 += TILE_VECS * W) {
          const int nv = static_cast<int>(std::min<int64_t>(TILE_VECS, (len - k0 + W - 1) / W));
          if (BIAS) load_tile(FB, p.bias + i * S, stride, k0, len, nv);
          bias_share(w, D, FB, nv, PB);
          for (int64_t b = 0; b < p.batch; ++b) {
            const T* a_row = p.scores + ((b * H) * t + i) * S;
            T* out_row = logits + ((b * H) * t + i) * S;
            load_tile(FA, a_row, stride, k0, len, nv);
            int v = 0;
            for (; v + VB <= nv; v += VB)
              forward_vectors<VB>(p, w, FA, FB, PB, add_base, out_row, k0, v, len);
            for (; v < nv; ++v) forward_vectors<1>(p, w, FA, FB, PB, add_base, out_row, k0, v, len);
          }
        }
        for (int64_t b = 0; b < p.batch; ++b) {
          T* out_row = logits + ((b * H) * t + i) * S;
          for (int h = 0; h < H; ++h)
            std::fill(out_row + h * stride + len, out_row + h * stride + S, NEG_INF<T>);
        }
      }
    });
  }

  // out[h] (row h at out + h * stride) for key vectors v .. v + V of a tile: start[h] (zero without
  // start) + sum over d of gp[d] W1[d, c0 + h], times scale, stored, or added to what out holds (add).
  template <int V>
  static inline void transpose_product(const Broadcast<T>& w, int64_t D, const Vec<T>* gp,
                                       const Vec<T> (*start)[TILE_VECS], int c0, T* out, int64_t stride,
                                       int64_t k0, int v, int64_t len, bool add, T scale = T(1)) {
    Vec<T> acc[V][H];
    for (int u = 0; u < V; ++u)
      for (int h = 0; h < H; ++h) acc[u][h] = start != nullptr ? start[h][v + u] : Vec<T>{};
    for (int64_t d = 0; d < D; ++d) {
      const Vec<T>* w1 = &w.w1[d * C + c0];
      for (int u = 0; u < V; ++u) {
        const Vec<T> g = gp[d * TILE_VECS + v + u];
        for (int h = 0; h < H; ++h) acc[u][h] += g * w1[h];
      }
    }
    for (int u = 0; u < V; ++u) {
      const int64_t s = k0 + (v + u) * W;
      const int n = static_cast<int>(std::min<int64_t>(W, len - s));
      for (int h = 0; h < H; ++h) {
        T* dst = out + h * stride + s;
        store(dst, add ? load(dst, n) + acc[u][h] : acc[u][h] * scale, n);
      }
    }
  }

  // grad (B, H, t, S) holds dL/dlogits on entry (see Extras) and dL/dA times ex.scale on return (zero
  // past each row's length when ex.probs is given; untouched there otherwise).
  // grad_bias (H, t, S), when given, gets the MLP's dL/dB added (and the base's own term with
  // ex.base_grad). grad_w1 (D, C), grad_b1 (D,), grad_w2 (H, D) and ex.grad_b2 are overwritten.
  static void backward(const Problem<T>& p, T* grad, T* grad_bias, T* grad_w1, T* grad_b1, T* grad_w2,
                       int threads, const Extras<T>& ex = Extras<T>{}) {
    const int64_t t = p.rows, S = p.keys, D = p.width, stride = t * S;
    const int n_threads_used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, t)));
    const Broadcast<T> w(p);
    // Per thread: dW1 (D*C, d-major as W1), db1 (D), dW2 (D*H, d-major), db2 (H) in double.
    const int64_t n_params = D * C + D + D * H + H;
    std::vector<double> totals(static_cast<size_t>(n_threads_used) * n_params, 0.0);
    const bool want_bias = BIAS && grad_bias != nullptr;
    const Vec<T> one = splat(T(1)), slope_v = splat(p.slope);
    parallel_rows(t, n_threads_used, [&](int tid, int n_threads) {
      Vec<T> FA[H][TILE_VECS], FB[H][TILE_VECS], G[H][TILE_VECS], P[H][TILE_VECS], GS[H][TILE_VECS];
      std::vector<Vec<T>> lane_acc(n_params);  // per-lane partial sums of the weight gradients
      // Per tile: PB (W1[:, H:] B + b1), dL/dpre of the current batch element (GP) and its sum over
      // the batch (GPS), D x TILE_VECS each.
      std::vector<Vec<T>> tiles(3 * D * TILE_VECS);
      Vec<T>* PB = tiles.data();
      Vec<T>* GP = PB + D * TILE_VECS;
      Vec<T>* GPS = GP + D * TILE_VECS;
      Vec<T>* acc_w1 = lane_acc.data();
      Vec<T>* acc_b1 = acc_w1 + D * C;
      Vec<T>* acc_w2 = acc_b1 + D;
      Vec<T>* acc_b2 = acc_w2 + D * H;
      double* total = totals.data() + tid * n_params;
      for (int64_t i = tid; i < t; i += n_threads) {
        const int64_t len = std::max<int64_t>(0, std::min(p.row_len[i], S));
        if (ex.probs != nullptr)  // dL/dlogits is zero past the row's keys
          for (int64_t b = 0; b < p.batch; ++b)
            for (int h = 0; h < H; ++h) {
              T* g = grad + ((b * H + h) * t + i) * S;
              std::fill(g + len, g + S, T(0));
            }
        if (len == 0) continue;
        std::fill(lane_acc.begin(), lane_acc.end(), Vec<T>{});
        for (int64_t k0 = 0; k0 < len; k0 += TILE_VECS * W) {
          const int nv = static_cast<int>(std::min<int64_t>(TILE_VECS, (len - k0 + W - 1) / W));
          if (BIAS) load_tile(FB, p.bias + i * S, stride, k0, len, nv);
          bias_share(w, D, FB, nv, PB);
          if (BIAS) std::fill(GPS, GPS + D * TILE_VECS, Vec<T>{});
          const bool sum_g = want_bias && ex.base_grad;  // GS: dL/dlogits summed over the batch
          for (int64_t b = 0; b < p.batch; ++b) {
            const T* a_row = p.scores + ((b * H) * t + i) * S;
            T* g_row = grad + ((b * H) * t + i) * S;
            load_tile(FA, a_row, stride, k0, len, nv);
            load_tile(G, g_row, stride, k0, len, nv);
            if (ex.probs != nullptr) {  // the softmax's backward
              load_tile(P, ex.probs + ((b * H) * t + i) * S, stride, k0, len, nv);
              for (int h = 0; h < H; ++h) {
                const Vec<T> r = splat(ex.row[(b * H + h) * t + i]);
                for (int v = 0; v < nv; ++v) G[h][v] = (G[h][v] - r) * P[h][v];
              }
            }
            for (int h = 0; h < H; ++h) {
              Vec<T> sum = Vec<T>{};
              for (int v = 0; v < nv; ++v) {
                sum += G[h][v];
                if (sum_g) GS[h][v] = b == 0 ? G[h][v] : GS[h][v] + G[h][v];
              }
              acc_b2[h] += sum;
            }
            // Pass 1, per hidden channel over the tile: dL/dpre, and the gradients of W1's score
            // columns, W2 and (without a bias) b1, summed in registers.
            for (int64_t d = 0; d < D; ++d) {
              // This channel's weights as locals: registers (the stores below could alias w's).
              Vec<T> w1[H], w2[H];
              for (int h = 0; h < H; ++h) {
                w1[h] = w.w1[d * C + h];
                w2[h] = w.w2[d * H + h];
              }
              Vec<T> aw1[H], aw2[H], ab1 = Vec<T>{};
              for (int h = 0; h < H; ++h) aw1[h] = aw2[h] = Vec<T>{};
              for (int v = 0; v < nv; ++v) {
                Vec<T> x = PB[d * TILE_VECS + v];  // one chain: the key vectors overlap
                for (int h = 0; h < H; ++h) x += FA[h][v] * w1[h];
                const Vec<T> gate = x > T(0) ? one : slope_v;  // leaky = gate * x, leaky' = gate
                const Vec<T> hid = gate * x;
                Vec<T> gh = G[0][v] * w2[0];
                for (int h = 1; h < H; ++h) gh += G[h][v] * w2[h];
                for (int h = 0; h < H; ++h) aw2[h] += G[h][v] * hid;
                const Vec<T> gp = gate * gh;
                for (int h = 0; h < H; ++h) aw1[h] += gp * FA[h][v];
                GP[d * TILE_VECS + v] = gp;
                if (BIAS) GPS[d * TILE_VECS + v] += gp;
                else ab1 += gp;
              }
              for (int h = 0; h < H; ++h) {
                acc_w1[d * C + h] += aw1[h];
                acc_w2[d * H + h] += aw2[h];
              }
              if (!BIAS) acc_b1[d] += ab1;
            }
            // Pass 2: dL/dA = dL/dlogits + W1[:, :H]^T gp.
            int v = 0;
            for (; v + VB <= nv; v += VB)
              transpose_product<VB>(w, D, GP, G, 0, g_row, stride, k0, v, len, false, ex.scale);
            for (; v < nv; ++v)
              transpose_product<1>(w, D, GP, G, 0, g_row, stride, k0, v, len, false, ex.scale);
          }
          if (!BIAS) continue;
          // The bias channels, from dL/dpre summed over the batch: dW1[:, H:], db1 and dL/dB.
          for (int64_t d = 0; d < D; ++d) {
            Vec<T> aw1[H], ab1 = Vec<T>{};
            for (int h = 0; h < H; ++h) aw1[h] = Vec<T>{};
            for (int v = 0; v < nv; ++v) {
              const Vec<T> gp = GPS[d * TILE_VECS + v];
              ab1 += gp;
              for (int h = 0; h < H; ++h) aw1[h] += gp * FB[h][v];
            }
            for (int h = 0; h < H; ++h) acc_w1[d * C + H + h] += aw1[h];
            acc_b1[d] += ab1;
          }
          if (!want_bias) continue;
          const Vec<T>(*base)[TILE_VECS] = sum_g ? GS : nullptr;
          T* gb_row = grad_bias + i * S;
          int v = 0;
          for (; v + VB <= nv; v += VB)
            transpose_product<VB>(w, D, GPS, base, H, gb_row, t * S, k0, v, len, true);
          for (; v < nv; ++v) transpose_product<1>(w, D, GPS, base, H, gb_row, t * S, k0, v, len, true);
        }
        for (int64_t j = 0; j < n_params; ++j) {
          double sum = 0.0;
          for (int l = 0; l < W; ++l) sum += lane_acc[j][l];
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
    if (ex.grad_b2 != nullptr)
      for (int h = 0; h < H; ++h) {
        double s = 0.0;
        for (int tid = 0; tid < n_threads_used; ++tid) s += totals[tid * n_params + D * C + D + D * H + h];
        ex.grad_b2[h] = static_cast<T>(s);
      }
  }
};

// DAPE V2 with kernel_size 3: Conv(1 x 3) -> leaky -> Conv(1 x 3) along the keys of each query row,
// features and hidden map zero past the row's visible keys (causal masking of both) and outside the
// row (the convolutions' zero padding). W1 (D, C, 3) and W2 (H, D, 3) as Conv2d stores them
// (out[s] = sum_j w[j] in[s + j - 1]). Per row the features, the hidden map and, in backward,
// dL/dlogits and dL/dpre live in row buffers zero at key -1 and past the row's length, so every
// shifted read is a plain vector load and the hidden map touches only the thread's row buffers, never a
// (B, t, S, D) tensor.
//
// Each convolution is a small matrix product (output channels x keys, summed over input channels and
// taps), computed in register blocks of MB output channels x NB key vectors: per input channel and
// tap, NB shifted loads and MB weight broadcasts feed MB * NB multiply-adds into independent
// accumulators (enough of them to hide the multiply-add latency, few enough to stay in the 16 AVX2
// registers). The weight gradients are sums over a row's keys of products of two rows, one shifted,
// likewise in register blocks (2 x 2 rows, all three shifts). The block loops read up to a block of
// keys past the row's length: the row buffers are zero there, and outputs are stored only up to it.
template <typename T, int H, bool BIAS>
struct Conv3 {
  static constexpr int C = BIAS ? 2 * H : H;
  static constexpr int W = LANES<T>;
  static constexpr int MB = 4;         // output channels per register block
  static constexpr int NB = 2;         // key vectors per register block
  static constexpr int STEP = NB * W;  // keys per register block

  static int64_t blocks_end(int64_t len) { return (len + STEP - 1) / STEP * STEP; }

  // Row buffers of n_channels x stride, each row[c] pointing at key 0 of a cache-line aligned row
  // (a vector of padding in front), so that unshifted loads are aligned; key -1 and, once zero_tail
  // has run, the keys from the row's length to everything a block loop reads (blocks_end + 1) are zero.
  struct Rows {
    static constexpr int64_t ALIGN = 64 / sizeof(T);
    int64_t stride;
    std::vector<T> data;
    T* base;
    Rows(int64_t channels, int64_t keys)
        : stride((W + blocks_end(keys) + 1 + ALIGN - 1) / ALIGN * ALIGN), data(channels * stride + ALIGN) {
      const auto address = reinterpret_cast<std::uintptr_t>(data.data());
      base = data.data() + (ALIGN - address / sizeof(T) % ALIGN) % ALIGN + W;
    }
    T* operator[](int64_t c) { return base + c * stride; }
    void zero_tail(int64_t c, int64_t len) {
      T* row = (*this)[c];
      row[-1] = T(0);
      std::fill(row + len, row + blocks_end(len) + 1, T(0));
    }
    void fill(int64_t c, const T* src, int64_t len) {  // len entries from src, zeros around
      std::memcpy((*this)[c], src, len * sizeof(T));
      zero_tail(c, len);
    }
  };

  // acc[q][v] += sum over k < K and taps j of w[q * wm + k * wk + j * wj] * x[k * xs + s0 + v * W + j - 1]
  // (x the rows of a Rows buffer; tap j reads key s + j - 1).
  template <int M>
  static inline void conv_block(Vec<T> (&acc)[M][NB], const T* w, int64_t wm, int64_t wk, int64_t wj,
                                int64_t K, const T* x, int64_t xs, int64_t s0) {
    for (int64_t k = 0; k < K; ++k) {
      const T* xk = x + k * xs + s0;
      const T* wkp = w + k * wk;
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j) {
        Vec<T> xv[NB];
#pragma GCC unroll 4
        for (int v = 0; v < NB; ++v) xv[v] = load(xk + v * W + j - 1, W);
#pragma GCC unroll 8
        for (int q = 0; q < M; ++q) {
          const Vec<T> wq = splat(wkp[q * wm + j * wj]);
#pragma GCC unroll 4
          for (int v = 0; v < NB; ++v) acc[q][v] += wq * xv[v];
        }
      }
    }
  }

  // Stores the lanes of a register block's row q that lie before len (keys s0 .. s0 + STEP).
  static inline void store_block(T* dst, const Vec<T> (&row)[NB], int64_t s0, int64_t len) {
#pragma GCC unroll 8
    for (int v = 0; v < NB; ++v) {
      const int64_t n = std::min<int64_t>(W, len - s0 - v * W);
      if (n > 0) store(dst + s0 + v * W, row[v], static_cast<int>(n));
    }
  }

  // For output channels m0 .. m0 + M over the row's key blocks: init(m0, s0, acc), the convolution
  // conv_block(acc, ...) with the given weights and input rows, then done(m0, s0, acc).
  template <int M, typename Init, typename Done>
  static inline void conv_rows(int64_t m0, int64_t len, const T* w, int64_t wm, int64_t wk, int64_t wj,
                               int64_t K, const T* x, int64_t xs, Init init, Done done) {
    for (int64_t s0 = 0; s0 < len; s0 += STEP) {
      Vec<T> acc[M][NB];
      init(s0, acc);
      conv_block<M>(acc, w + m0 * wm, wm, wk, wj, K, x, xs, s0);
      done(s0, acc);
    }
  }

  // Runs body.template operator()<M>(m0) over m0 in 0 .. n_out, M = MB and single-channel leftovers.
  template <typename Body>
  static inline void channel_blocks(int64_t n_out, Body body) {
    int64_t m0 = 0;
    for (; m0 + MB <= n_out; m0 += MB) body(std::integral_constant<int, MB>{}, m0);
    for (; m0 < n_out; ++m0) body(std::integral_constant<int, 1>{}, m0);
  }

  // Row (b, i): features into F, the masked hidden map into Hd, the pre-activation into P when P is
  // given (backward).
  static void hidden(const Problem<T>& p, int64_t b, int64_t i, int64_t len, Rows& F, Rows& Hd, Rows* P) {
    const int64_t t = p.rows, S = p.keys, D = p.width;
    for (int h = 0; h < H; ++h) F.fill(h, p.scores + ((b * H + h) * t + i) * S, len);
    if (BIAS)
      for (int h = 0; h < H; ++h) F.fill(H + h, p.bias + (h * t + i) * S, len);
    const T slope = p.slope;
    channel_blocks(D, [&](auto m_block, int64_t d0) {
      constexpr int M = decltype(m_block)::value;
      conv_rows<M>(
          d0, len, p.w1, C * 3, 3, 1, C, F[0], F.stride,
          [&](int64_t, Vec<T>(&acc)[M][NB]) {
#pragma GCC unroll 8
            for (int q = 0; q < M; ++q)
#pragma GCC unroll 8
              for (int v = 0; v < NB; ++v) acc[q][v] = splat(p.b1[d0 + q]);
          },
          [&](int64_t s0, Vec<T>(&acc)[M][NB]) {
#pragma GCC unroll 8
            for (int q = 0; q < M; ++q)
#pragma GCC unroll 8
              for (int v = 0; v < NB; ++v) {
                if (P != nullptr) std::memcpy((*P)[d0 + q] + s0 + v * W, &acc[q][v], sizeof(Vec<T>));
                const Vec<T> hid = leaky(acc[q][v], acc[q][v], slope);
                std::memcpy(Hd[d0 + q] + s0 + v * W, &hid, sizeof hid);  // past len: zeroed below
              }
          });
#pragma GCC unroll 8
      for (int q = 0; q < M; ++q) Hd.zero_tail(d0 + q, len);
    });
  }

  static void forward(const Problem<T>& p, T* logits, bool add_base, int threads) {
    const int64_t t = p.rows, S = p.keys, D = p.width;
    parallel_rows(t, threads, [&](int tid, int n_threads) {
      Rows F(C, S), Hd(D, S);
      for (int64_t i = tid; i < t; i += n_threads) {
        const int64_t len = std::max<int64_t>(0, std::min(p.row_len[i], S));
        for (int64_t b = 0; b < p.batch; ++b) {
          T* out_row = logits + ((b * H) * t + i) * S;
          if (len > 0) hidden(p, b, i, len, F, Hd, nullptr);
          // logits = A + [B] + b2 + the second convolution, per head block.
          channel_blocks(H, [&](auto m_block, int64_t h0) {
            constexpr int M = decltype(m_block)::value;
            conv_rows<M>(
                h0, len, p.w2, D * 3, 3, 1, D, Hd[0], Hd.stride,
                [&](int64_t s0, Vec<T>(&acc)[M][NB]) {
#pragma GCC unroll 8
                  for (int q = 0; q < M; ++q)
#pragma GCC unroll 8
                    for (int v = 0; v < NB; ++v) {
                      const int64_t s = s0 + v * W;
                      acc[q][v] = load(F[h0 + q] + s, W) + p.b2[h0 + q];
                      if (BIAS && add_base) acc[q][v] += load(F[H + h0 + q] + s, W);
                    }
                },
                [&](int64_t s0, Vec<T>(&acc)[M][NB]) {
#pragma GCC unroll 8
                  for (int q = 0; q < M; ++q) store_block(out_row + (h0 + q) * t * S, acc[q], s0, len);
                });
          });
          for (int h = 0; h < H; ++h)
            std::fill(out_row + h * t * S + len, out_row + h * t * S + S, NEG_INF<T>);
        }
      }
    });
  }

  // out[a * oa + b * ob + j] += sum over the row's keys s of y_a[s] x_b[s + j - 1] for A rows y_a
  // (y + a * ys) and BB rows x_b (x + b * xs) of Rows buffers, y zero past len.
  template <int A, int BB>
  static inline void products(const T* y, int64_t ys, const T* x, int64_t xs, int64_t len, Vec<T>* out,
                              int64_t oa, int64_t ob) {
    Vec<T> sum[A][BB][3];
#pragma GCC unroll 8
    for (int a = 0; a < A; ++a)
#pragma GCC unroll 8
      for (int bb = 0; bb < BB; ++bb) sum[a][bb][0] = sum[a][bb][1] = sum[a][bb][2] = Vec<T>{};
    for (int64_t s0 = 0; s0 < len; s0 += W) {
      Vec<T> ya[A];
#pragma GCC unroll 8
      for (int a = 0; a < A; ++a) ya[a] = load(y + a * ys + s0, W);
#pragma GCC unroll 8
      for (int bb = 0; bb < BB; ++bb)
#pragma GCC unroll 8
        for (int j = 0; j < 3; ++j) {
          Vec<T> xv = load(x + bb * xs + s0 + j - 1, W);
          asm("" : "+x"(xv));  // one load into a register: GCC would otherwise reload it per row a
#pragma GCC unroll 8
          for (int a = 0; a < A; ++a) sum[a][bb][j] += ya[a] * xv;
        }
    }
#pragma GCC unroll 8
    for (int a = 0; a < A; ++a)
#pragma GCC unroll 8
      for (int bb = 0; bb < BB; ++bb)
#pragma GCC unroll 8
        for (int j = 0; j < 3; ++j) out[a * oa + bb * ob + j] += sum[a][bb][j];
  }

  // products() over all n_y x n_x row pairs, in blocks of 2 x 2.
  static void all_products(Rows& Y, int64_t n_y, Rows& X, int64_t n_x, int64_t len, Vec<T>* out, int64_t oa,
                           int64_t ob) {
    for (int64_t a0 = 0; a0 < n_y; a0 += 2) {
      const bool two_a = a0 + 1 < n_y;
      for (int64_t b0 = 0; b0 < n_x; b0 += 2) {
        const bool two_b = b0 + 1 < n_x;
        Vec<T>* o = out + a0 * oa + b0 * ob;
        if (two_a && two_b) products<2, 2>(Y[a0], Y.stride, X[b0], X.stride, len, o, oa, ob);
        else if (two_a) products<2, 1>(Y[a0], Y.stride, X[b0], X.stride, len, o, oa, ob);
        else if (two_b) products<1, 2>(Y[a0], Y.stride, X[b0], X.stride, len, o, oa, ob);
        else products<1, 1>(Y[a0], Y.stride, X[b0], X.stride, len, o, oa, ob);
      }
    }
  }

  // As Kernel::backward, with grad_w1 (D, C, 3) and grad_w2 (H, D, 3).
  static void backward(const Problem<T>& p, T* grad, T* grad_bias, T* grad_w1, T* grad_b1, T* grad_w2,
                       int threads) {
    const int64_t t = p.rows, S = p.keys, D = p.width;
    const int n_threads_used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, t)));
    const int64_t n_params = D * C * 3 + D + D * H * 3;  // d-major: dW1 (D, C, 3), db1, dW2 as (D, H, 3)
    std::vector<double> totals(static_cast<size_t>(n_threads_used) * n_params, 0.0);
    const bool want_bias = BIAS && grad_bias != nullptr;
    const T slope = p.slope;
    parallel_rows(t, n_threads_used, [&](int tid, int n_threads) {
      Rows F(C, S), P(D, S), Hd(D, S), G(H, S), GP(D, S);
      std::vector<Vec<T>> lane_acc(n_params);  // per-lane partial sums of the weight gradients
      Vec<T>* acc_w1 = lane_acc.data();
      Vec<T>* acc_b1 = acc_w1 + D * C * 3;
      Vec<T>* acc_w2 = acc_b1 + D;
      double* total = totals.data() + tid * n_params;
      for (int64_t i = tid; i < t; i += n_threads) {
        const int64_t len = std::max<int64_t>(0, std::min(p.row_len[i], S));
        if (len == 0) continue;
        std::fill(lane_acc.begin(), lane_acc.end(), Vec<T>{});
        for (int64_t b = 0; b < p.batch; ++b) {
          hidden(p, b, i, len, F, Hd, &P);
          T* g_row = grad + ((b * H) * t + i) * S;
          for (int h = 0; h < H; ++h) G.fill(h, g_row + h * t * S, len);
          // dL/dpre[d, s] = leaky'(pre) * sum_{h, j} W2[h, d, j] dL/dlogits[h, s + 1 - j]: the
          // convolution with the taps reversed (tap j reads x[s + j - 1] with weight W2[.., 2 - j]).
          channel_blocks(D, [&](auto m_block, int64_t d0) {
            constexpr int M = decltype(m_block)::value;
            conv_rows<M>(
                d0, len, p.w2 + 2, 3, D * 3, -1, H, G[0], G.stride,
                [&](int64_t, Vec<T>(&acc)[M][NB]) {
#pragma GCC unroll 8
                  for (int q = 0; q < M; ++q)
#pragma GCC unroll 8
                    for (int v = 0; v < NB; ++v) acc[q][v] = Vec<T>{};
                },
                [&](int64_t s0, Vec<T>(&acc)[M][NB]) {
#pragma GCC unroll 8
                  for (int q = 0; q < M; ++q)
#pragma GCC unroll 8
                    for (int v = 0; v < NB; ++v) {
                      const Vec<T> x = load(P[d0 + q] + s0 + v * W, W);
                      const Vec<T> gp = leaky(x, acc[q][v], slope);
                      std::memcpy(GP[d0 + q] + s0 + v * W, &gp, sizeof gp);  // past len: zeroed below
                    }
                });
#pragma GCC unroll 8
            for (int q = 0; q < M; ++q) GP.zero_tail(d0 + q, len);
          });
          // Weight gradients: sums over the row's keys of shifted products, zero past len.
          all_products(G, H, Hd, D, len, acc_w2, 3, H * 3);     // dW2[h, d, j] = sum G[h, s] Hd[d, s + j - 1]
          all_products(GP, D, F, C, len, acc_w1, C * 3, 3);     // dW1[d, c, j] = sum GP[d, s] F[c, s + j - 1]
          for (int64_t d = 0; d < D; ++d) {
            Vec<T> sum = Vec<T>{};
            for (int64_t s0 = 0; s0 < len; s0 += W) sum += load(GP[d] + s0, W);
            acc_b1[d] += sum;
          }
          // dL/dfeatures[c, s] = sum_{d, j} W1[d, c, j] dL/dpre[d, s + 1 - j]; the score channels go to
          // grad (with dL/dlogits), the bias channels are added to grad_bias.
          channel_blocks(want_bias ? C : H, [&](auto m_block, int64_t c0) {
            constexpr int M = decltype(m_block)::value;
            conv_rows<M>(
                c0, len, p.w1 + 2, 3, C * 3, -1, D, GP[0], GP.stride,
                [&](int64_t s0, Vec<T>(&acc)[M][NB]) {
#pragma GCC unroll 8
                  for (int q = 0; q < M; ++q)
#pragma GCC unroll 8
                    for (int v = 0; v < NB; ++v)
                      acc[q][v] = c0 + q < H ? load(G[c0 + q] + s0 + v * W, W) : Vec<T>{};
                },
                [&](int64_t s0, Vec<T>(&acc)[M][NB]) {
#pragma GCC unroll 8
                  for (int q = 0; q < M; ++q) {
                    const int64_t c = c0 + q;
                    if (c < H) {
                      store_block(g_row + c * t * S, acc[q], s0, len);
                      continue;
                    }
                    T* dst = grad_bias + ((c - H) * t + i) * S;
                    Vec<T> sum[NB];
#pragma GCC unroll 8
                    for (int v = 0; v < NB; ++v) {
                      const int64_t n = std::min<int64_t>(W, len - s0 - v * W);
                      sum[v] = n > 0 ? load(dst + s0 + v * W, static_cast<int>(n)) + acc[q][v] : Vec<T>{};
                    }
                    store_block(dst, sum, s0, len);
                  }
                });
          });
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
#pragma GCC unroll 8
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
                                             T* grad_b1, T* grad_w2, int threads, int kernel_size,       \
                                             const T* probs, const T* row, double scale, int base_grad,   \
                                             T* grad_b2) {                                               \
    const auto p = problem(scores, bias, w1, b1, w2, static_cast<const T*>(nullptr), row_len, batch,      \
                           heads, rows, keys, width, slope);                                             \
    const Extras<T> ex{probs, row, static_cast<T>(scale), base_grad != 0, grad_b2};                      \
    if (kernel_size == 3) /* V2 takes none of the extras (native.py refuses them) */                    \
      return dispatch<T, Conv3>(                                                                         \
          p, [&](auto k) { k.backward(p, grad, grad_bias, grad_w1, grad_b1, grad_w2, threads); });      \
    dispatch<T, Kernel>(                                                                                 \
        p, [&](auto k) { k.backward(p, grad, grad_bias, grad_w1, grad_b1, grad_w2, threads, ex); });    \
  }

POSLAB_DAPE_ENTRY_POINTS(float, f32)
POSLAB_DAPE_ENTRY_POINTS(double, f64)
