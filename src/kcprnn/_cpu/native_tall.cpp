// The tall-skinny products of kcprnn's factorized layers, y = x @ w.T with many rows and a few
// outputs, and its weight gradient grad.T @ x, for float32 on x86-64 CPUs with AVX-512 or
// AVX2 + FMA.
//
// Rows are indexed (b, e): row (b, e) of x starts at x + b*xsb + e*xse and holds f contiguous
// values; its outputs go to y + b*ysb + e*yse + g*ysg for g < G. Writing through strides lets
// the caller ask for the transposed layout the next contraction of a factorized product needs,
// instead of transposing afterwards.
//
// Each thread takes a contiguous range of rows (OpenMP, the runtime torch already loaded: both
// are libgomp.so.1), and walks it in blocks of RB = 8 rows. A block loads one vector of each row
// and multiplies it with GB = 2 rows of w at a time: 16 accumulators, each reduced horizontally
// once at the end of the row. The next block's rows are prefetched into L1 while the current one
// runs: without it the product ran at 1.6x the time of reading x once; with it, 1.3-1.4x
// (15,360 x 360 -> 2 at 2 threads on an AMD EPYC with AVX-512, against 2.9x for MKL's sgemm).
//
// The weight gradient gives each thread a contiguous range of rows, summed in tiles of 64 rows
// with 8 accumulators held in registers per column chunk, into its own slice of a scratch
// buffer; the slices are added at the end (kcprnn_tall_weight_grad).
//
// The CP product of a small factor over many short rows (kcprnn_inner_rows) is the last step of
// KCP's sequential walk when it runs the last factor as its own two-chunk CP product: per row
// (b, e) of a x c numbers, u[a, k, o] = z[a, :] . s[k, o, :], then y[o, m] = sum over (a, k)
// of p[m, a k] u[a, k, o], written with the bias straight to the output's final layout through
// per-index offset tables (the torch path runs two GEMMs, a transposing copy and a permuted
// add, 0.15 ms after the first GEMM at the UCF11 size).
//
// The gather (kcprnn_gather) copies a strided view of each row into a contiguous one, in one
// pass: the interleaved input axes KCP's sequential walk brings together before a factor's GEMM
// (torch does it as up to three block transposes, each a full copy).
//
// Built and loaded by kcprnn/formats/_native.py (g++ -O3 -march=native -fopenmp); never
// imported by hand.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#if defined(__AVX512F__)
struct Vec {
  using T = __m512;
  static constexpr int width = 16;
  static inline T zero() { return _mm512_setzero_ps(); }
  static inline T load(const float* p) { return _mm512_loadu_ps(p); }
  static inline T load_tail(const float* p, int n) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
  }
  static inline T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static inline T add(T a, T b) { return _mm512_add_ps(a, b); }
  static inline float sum(T a) { return _mm512_reduce_add_ps(a); }
  static inline T set1(float v) { return _mm512_set1_ps(v); }
  static inline void store(float* p, T a) { _mm512_storeu_ps(p, a); }
  static inline void store_tail(float* p, T a, int n) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), a);
  }
};
static const int kIsa = 512;
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  using T = __m256;
  static constexpr int width = 8;
  static inline T zero() { return _mm256_setzero_ps(); }
  static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static inline __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline T load_tail(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static inline T set1(float v) { return _mm256_set1_ps(v); }
  static inline void store(float* p, T a) { _mm256_storeu_ps(p, a); }
  static inline void store_tail(float* p, T a, int n) { _mm256_maskstore_ps(p, mask(n), a); }
  static inline T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static inline T add(T a, T b) { return _mm256_add_ps(a, b); }
  static inline float sum(T a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
static const int kIsa = 256;
#else
#error "kcprnn's tall kernel needs AVX-512 or AVX2 with FMA"
#endif

namespace {

constexpr int RB = 8;  // rows per block
constexpr int GB = 2;  // outputs per pass over a block

// y[r][g] = x[r] . w[g] for R <= RB rows and G <= GB outputs; rows are given by pointer.
template <int R, int G>
inline void block(const float* const* xr, const float* w, int64_t f, float* const* yr,
                  int64_t ysg, const float* const* next) {
  typename Vec::T acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = Vec::zero();
  const int64_t full = f - f % Vec::width;
  int64_t k = 0;
  for (; k < full; k += Vec::width) {
    typename Vec::T xv[R];
    for (int r = 0; r < R; ++r) {
      xv[r] = Vec::load(xr[r] + k);
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next[r] + k), _MM_HINT_T0);
    }
    for (int g = 0; g < G; ++g) {
      const typename Vec::T wv = Vec::load(w + g * f + k);
      for (int r = 0; r < R; ++r) acc[r][g] = Vec::fma(xv[r], wv, acc[r][g]);
    }
  }
  if (k < f) {
    const int n = static_cast<int>(f - k);
    typename Vec::T xv[R];
    for (int r = 0; r < R; ++r) xv[r] = Vec::load_tail(xr[r] + k, n);
    for (int g = 0; g < G; ++g) {
      const typename Vec::T wv = Vec::load_tail(w + g * f + k, n);
      for (int r = 0; r < R; ++r) acc[r][g] = Vec::fma(xv[r], wv, acc[r][g]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) yr[r][g * ysg] = Vec::sum(acc[r][g]);
}

template <int R>
inline void rows(const float* const* xr, const float* w, int64_t f, int64_t n_out,
                 float* const* yr, int64_t ysg, const float* const* next) {
  int64_t g = 0;
  float* y_g[R];
  for (; g + GB <= n_out; g += GB) {
    for (int r = 0; r < R; ++r) y_g[r] = yr[r] + g * ysg;
    // the prefetch of the next block is issued once, on the first pass over this one
    block<R, GB>(xr, w + g * f, f, y_g, ysg, g == 0 ? next : nullptr);
  }
  if (g < n_out) {
    for (int r = 0; r < R; ++r) y_g[r] = yr[r] + g * ysg;
    block<R, 1>(xr, w + g * f, f, y_g, ysg, g == 0 ? next : nullptr);
  }
}

constexpr int WT = 64;  // rows per tile of the weight gradient (92 KB of x at f = 360: in L2)
constexpr int WV = 4;   // vectors of a column chunk, times GB outputs: 8 accumulators

// acc[g, k0:k0 + NV * width] += grad[m0:m1, g].T @ x[m0:m1, k0:...] for G outputs, with the
// accumulators in registers over the tile's rows; the last vector is partial when tail > 0.
template <int NV, int G>
inline void grad_chunk(const float* grad, int64_t gsm, int64_t gsg, const float* x,
                       int64_t xsm, int64_t m0, int64_t m1, int64_t k0, int tail, float* acc,
                       int64_t f) {
  typename Vec::T a[G][NV];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) {
      const float* p = acc + g * f + k0 + v * Vec::width;
      a[g][v] = (tail && v == NV - 1) ? Vec::load_tail(p, tail) : Vec::load(p);
    }
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * xsm + k0;
    typename Vec::T c[G];
    for (int g = 0; g < G; ++g) c[g] = Vec::set1(grad[m * gsm + g * gsg]);
    for (int v = 0; v < NV; ++v) {
      // the same row's next chunk, read by the next pass over the tile
      _mm_prefetch(reinterpret_cast<const char*>(xr + (NV + v) * Vec::width), _MM_HINT_T0);
      const typename Vec::T xv = (tail && v == NV - 1) ? Vec::load_tail(xr + v * Vec::width, tail)
                                                       : Vec::load(xr + v * Vec::width);
      for (int g = 0; g < G; ++g) a[g][v] = Vec::fma(c[g], xv, a[g][v]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) {
      float* p = acc + g * f + k0 + v * Vec::width;
      if (tail && v == NV - 1) Vec::store_tail(p, a[g][v], tail);
      else Vec::store(p, a[g][v]);
    }
}

template <int G>
inline void grad_tile(const float* grad, int64_t gsm, int64_t gsg, const float* x, int64_t xsm,
                      int64_t f, int64_t m0, int64_t m1, float* acc, int64_t acc_f) {
  const int64_t full = f / Vec::width;
  const int tail = static_cast<int>(f % Vec::width);
  int64_t v = 0;
  for (; v + WV <= full; v += WV)
    grad_chunk<WV, G>(grad, gsm, gsg, x, xsm, m0, m1, v * Vec::width, 0, acc, acc_f);
  for (; v < full; ++v)
    grad_chunk<1, G>(grad, gsm, gsg, x, xsm, m0, m1, v * Vec::width, 0, acc, acc_f);
  if (tail) grad_chunk<1, G>(grad, gsm, gsg, x, xsm, m0, m1, v * Vec::width, tail, acc, acc_f);
}

// acc (n_out, f) += grad[m0:m1].T @ x[m0:m1], in tiles of WT rows, GB outputs at a time.
inline void weight_grad_rows(const float* grad, int64_t gsm, int64_t gsg, const float* x,
                             int64_t xsm, int64_t f, int64_t n_out, int64_t m0, int64_t m1,
                             float* acc) {
  for (int64_t t0 = m0; t0 < m1; t0 += WT) {
    const int64_t t1 = t0 + WT < m1 ? t0 + WT : m1;
    int64_t g = 0;
    for (; g + GB <= n_out; g += GB)
      grad_tile<GB>(grad + g * gsg, gsm, gsg, x, xsm, f, t0, t1, acc + g * f, f);
    if (g < n_out) grad_tile<1>(grad + g * gsg, gsm, gsg, x, xsm, f, t0, t1, acc + g * f, f);
  }
}

constexpr int OB = 4;  // outputs o per tile of the inner product's second step
constexpr int MV = 4;  // vectors of outputs m per tile: OB x MV accumulators in registers

// Stores acc (outputs m0 .. m0 + n of one o) with the bias at the offsets off_m[m].
inline void inner_store(typename Vec::T acc, float* y, const float* by, const int64_t* off_m,
                        int64_t m0, int n, int runs) {
  if (runs) {  // the vector's outputs are contiguous
    if (by) acc = Vec::add(acc, n == Vec::width ? Vec::load(by + off_m[m0])
                                                : Vec::load_tail(by + off_m[m0], n));
    if (n == Vec::width) Vec::store(y + off_m[m0], acc);
    else Vec::store_tail(y + off_m[m0], acc, n);
  } else {
    float lanes[Vec::width];
    Vec::store(lanes, acc);
    for (int l = 0; l < n; ++l) y[off_m[m0 + l]] = lanes[l] + (by ? by[off_m[m0 + l]] : 0.0f);
  }
}

// y[o0 + i, m0 + v W ...] for i < O, v < V (the last vector holding `last` lanes):
// sum over q = (a, k) of u[q, o] pt[q, m], from O x V accumulators.
template <int O, int V>
inline void inner_tile(const float* u, int64_t n_o, int64_t o0, const float* pt, int64_t n_ak,
                       int64_t n_m, int64_t m0, int last, float* out, const float* bias,
                       const int64_t* off_o, const int64_t* off_m, int runs) {
  const int W = Vec::width;
  typename Vec::T acc[O][V];
  for (int i = 0; i < O; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = Vec::zero();
  for (int64_t q = 0; q < n_ak; ++q) {
    const float* row = pt + q * n_m + m0;
    typename Vec::T p[V];
    for (int v = 0; v < V; ++v)
      p[v] = (v == V - 1 && last < W) ? Vec::load_tail(row + v * W, last) : Vec::load(row + v * W);
    for (int i = 0; i < O; ++i) {
      const typename Vec::T s = Vec::set1(u[q * n_o + o0 + i]);
      for (int v = 0; v < V; ++v) acc[i][v] = Vec::fma(s, p[v], acc[i][v]);
    }
  }
  for (int i = 0; i < O; ++i)
    for (int v = 0; v < V; ++v)
      inner_store(acc[i][v], out + off_o[o0 + i], bias ? bias + off_o[o0 + i] : nullptr, off_m,
                  m0 + v * W, v == V - 1 ? last : W, runs);
}

template <int O>
inline void inner_tiles(const float* u, int64_t n_o, int64_t o0, const float* pt, int64_t n_ak,
                        int64_t n_m, float* out, const float* bias, const int64_t* off_o,
                        const int64_t* off_m, int runs) {
  const int W = Vec::width;
  int64_t m0 = 0;
  for (; m0 + MV * W <= n_m; m0 += MV * W)
    inner_tile<O, MV>(u, n_o, o0, pt, n_ak, n_m, m0, W, out, bias, off_o, off_m, runs);
  for (; m0 < n_m; m0 += W) {  // the last vectors, one at a time
    const int last = n_m - m0 < W ? static_cast<int>(n_m - m0) : W;
    inner_tile<O, 1>(u, n_o, o0, pt, n_ak, n_m, m0, last, out, bias, off_o, off_m, runs);
  }
}

// dst[0:run] = src[0:run]
inline void copy_run(const float* src, float* dst, int64_t run) {
  int64_t t = 0;
  for (; t + Vec::width <= run; t += Vec::width) Vec::store(dst + t, Vec::load(src + t));
  if (t < run) {
    const int n = static_cast<int>(run - t);
    Vec::store_tail(dst + t, Vec::load_tail(src + t, n), n);
  }
}

constexpr int GATHER_DIMS = 32;

// One row of kcprnn_inner_rows; u holds n_a * n_k * n_o floats.
inline void inner_row(const float* z, int64_t n_a, int64_t n_c, const float* st, int64_t n_ko,
                      int64_t n_o, const float* pt, int64_t n_ak, int64_t n_m, float* u,
                      float* out, const float* bias, const int64_t* off_o, const int64_t* off_m,
                      int runs) {
  const int W = Vec::width;
  // u[a, k o] = sum_c z[a, c] st[c, k o]
  for (int64_t a = 0; a < n_a; ++a) {
    const float* za = z + a * n_c;
    for (int64_t j = 0; j < n_ko; j += W) {
      const int n = n_ko - j < W ? static_cast<int>(n_ko - j) : W;
      typename Vec::T acc = Vec::zero();
      for (int64_t c = 0; c < n_c; ++c) {
        const float* row = st + c * n_ko + j;
        acc = Vec::fma(Vec::set1(za[c]), n == W ? Vec::load(row) : Vec::load_tail(row, n), acc);
      }
      if (n == W) Vec::store(u + a * n_ko + j, acc);
      else Vec::store_tail(u + a * n_ko + j, acc, n);
    }
  }
  // y[o, m] = sum_{a k} u[a k, o] pt[a k, m], plus the bias, at the offsets of (o, m)
  int64_t o0 = 0;
  for (; o0 + OB <= n_o; o0 += OB)
    inner_tiles<OB>(u, n_o, o0, pt, n_ak, n_m, out, bias, off_o, off_m, runs);
  for (; o0 < n_o; ++o0) inner_tiles<1>(u, n_o, o0, pt, n_ak, n_m, out, bias, off_o, off_m, runs);
}

}  // namespace

extern "C" {

int kcprnn_tall_isa(void) { return kIsa; }

// y[b, e, g] = sum_k x[b, e, k] * w[g, k]; see the top of this file for the strides.
void kcprnn_tall_matmul(const float* x, int64_t n_b, int64_t n_e, int64_t xsb, int64_t xse,
                        int64_t f, const float* w, int64_t n_out, float* y, int64_t ysb,
                        int64_t yse, int64_t ysg, int threads) {
  const int64_t m = n_b * n_e;
  const int64_t blocks = (m + RB - 1) / RB;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t start = blk * RB;
    const int r_count = static_cast<int>(m - start < RB ? m - start : RB);
    const float* xr[RB];
    const float* next[RB];
    float* yr[RB];
    int64_t b = start / n_e, e = start - b * n_e;
    for (int r = 0; r < r_count; ++r) {
      xr[r] = x + b * xsb + e * xse;
      yr[r] = y + b * ysb + e * yse;
      if (++e == n_e) e = 0, ++b;
    }
    if (r_count == RB) {
      // the next block's rows, assuming it continues the pattern (a prefetch is only a hint)
      const int64_t step = xr[RB - 1] - xr[RB - 2];
      for (int r = 0; r < RB; ++r) next[r] = xr[RB - 1] + (r + 1) * step;
      rows<RB>(xr, w, f, n_out, yr, ysg, next);
    } else {
      for (int r = 0; r < r_count; ++r) rows<1>(xr + r, w, f, n_out, yr + r, ysg, nullptr);
    }
  }
}

// out (n_out, f) = grad.T @ x for grad (m, n_out) with strides (gsm, gsg) and x (m, f) with row
// stride xsm and unit stride along f. Each thread sums its own contiguous range of rows into its
// slice of scratch (threads x n_out x f floats), then the slices are added into out.
void kcprnn_tall_weight_grad(const float* grad, int64_t m, int64_t gsm, int64_t gsg,
                             const float* x, int64_t xsm, int64_t f, int64_t n_out, float* out,
                             float* scratch, int threads) {
  const int64_t size = n_out * f;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), team = omp_get_num_threads();
    float* acc = scratch + t * size;
    for (int64_t i = 0; i < size; ++i) acc[i] = 0.0f;
    const int64_t per = (m + team - 1) / team;
    const int64_t m0 = t * per < m ? t * per : m, m1 = m0 + per < m ? m0 + per : m;
    weight_grad_rows(grad, gsm, gsg, x, xsm, f, n_out, m0, m1, acc);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t i = 0; i < size; ++i) {
      float v = 0.0f;
      for (int u = 0; u < team; ++u) v += scratch[u * size + i];
      out[i] = v;
    }
  }
}

// The CP product of kcprnn_inner_rows (top of this file) for rows (b, e): row (b, e) of z starts
// at z + b*zsb + e*zse and holds n_a x n_c contiguous values; st is (n_c, n_k n_o), pt (n_a n_k,
// n_m), both contiguous. Output (o, m) of row (b, e) goes to out + b*osb + off_e[e] + off_o[o] +
// off_m[m], plus the bias at the same offset without b*osb (bias may be null); runs != 0 says
// that off_m is contiguous within each vector of m (m = 0, width, ...).
void kcprnn_inner_rows(const float* z, int64_t n_b, int64_t n_e, int64_t zsb, int64_t zse,
                       int64_t n_a, int64_t n_c, const float* st, int64_t n_k, int64_t n_o,
                       const float* pt, int64_t n_m, float* out, int64_t osb,
                       const int64_t* off_e, const int64_t* off_o, const int64_t* off_m,
                       int runs, const float* bias, int threads) {
  const int64_t rows = n_b * n_e, n_ko = n_k * n_o, n_ak = n_a * n_k;
#pragma omp parallel num_threads(threads)
  {
    float* u = new float[n_a * n_ko + Vec::width];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / n_e, e = r - b * n_e;
      inner_row(z + b * zsb + e * zse, n_a, n_c, st, n_ko, n_o, pt, n_ak, n_m, u,
                out + b * osb + off_e[e], bias ? bias + off_e[e] : nullptr, off_o, off_m, runs);
    }
    delete[] u;
  }
}

// out (n_b, sizes[0] x ... x sizes[nd - 1]) contiguous = in[b*isb + sum_k i_k*strides[k]], for
// 3 <= nd <= GATHER_DIMS with strides[nd - 1] == 1 (the caller pads with size-1 dimensions).
// Threads take (b, i_0) pairs; within one, the dimensions 1 .. nd - 3 advance like an odometer,
// dimension nd - 2 is a loop and dimension nd - 1 a contiguous run copied by vectors. The reads
// jump between runs, which defeats the hardware prefetchers: each pair prefetches the input span
// of the next one into L2 as it goes (UCF11 interleaved, 96 rows, input in memory: 2.3 -> 1.3 ms).
void kcprnn_gather(const float* in, int64_t n_b, int64_t isb, int nd, const int64_t* sizes,
                   const int64_t* strides, float* out, int threads) {
  int64_t per_b = 1, span = 1;  // span: the floats one pair's reads cover, from its base
  for (int k = 0; k < nd; ++k) per_b *= sizes[k];
  for (int k = 1; k < nd; ++k) span += (sizes[k] - 1) * strides[k];
  const int64_t run = sizes[nd - 1], n2 = sizes[nd - 2], s2 = strides[nd - 2];
  const int64_t per_unit = per_b / (sizes[0] ? sizes[0] : 1);
  const int64_t groups = per_unit / (run * n2 ? run * n2 : 1);
  const int64_t units = n_b * sizes[0], lines = (span + 15) / 16;
  const int64_t per_group = groups ? (lines + groups - 1) / groups : 0;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t unit = 0; unit < units; ++unit) {
    const int64_t b = unit / sizes[0], i0 = unit - b * sizes[0];
    const float* src = in + b * isb + i0 * strides[0];
    float* dst = out + b * per_b + i0 * per_unit;
    const int64_t after = unit + 1 < units ? unit + 1 : unit;
    const char* next = reinterpret_cast<const char*>(
        in + (after / sizes[0]) * isb + (after % sizes[0]) * strides[0]);
    int64_t idx[GATHER_DIMS] = {0}, line = 0;
    for (int64_t r = 0; r < groups; ++r) {
      for (int64_t q = 0; q < per_group && line < lines; ++q, ++line)
        _mm_prefetch(next + line * 64, _MM_HINT_T1);
      const float* p = src;
      for (int64_t j = 0; j < n2; ++j, p += s2, dst += run) copy_run(p, dst, run);
      for (int k = nd - 3; k >= 1; --k) {
        if (++idx[k] < sizes[k]) {
          src += strides[k];
          break;
        }
        src -= (sizes[k] - 1) * strides[k];
        idx[k] = 0;
      }
    }
  }
}

}  // extern "C"
