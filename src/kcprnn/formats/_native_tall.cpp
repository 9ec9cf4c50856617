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

}  // extern "C"
