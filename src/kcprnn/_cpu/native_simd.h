// Vector types, branch-free activations and small row-major GEMMs for the compiled
// recurrences (native_rnn.cpp): GCC vector extensions, AVX-512 or AVX2 + FMA, float32.
// Everything is static: each translation unit that includes it gets its own copy.

#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

typedef int64_t i64;

#if defined(__AVX512F__)
static const int W = 16;  // floats per vector
static const int NB = 4;  // vectors per GEMM tile row
#else
static const int W = 8;
static const int NB = 2;
#endif
static const int MR = 4;  // rows per GEMM tile

typedef float vf __attribute__((vector_size(W * 4), aligned(4)));

static inline vf vload(const float* p) { return *(const vf*)p; }
static inline void vstore(float* p, vf v) { *(vf*)p = v; }

typedef int32_t vi __attribute__((vector_size(W * 4)));

// ---------------------------------------------------------------------------------------------
// activations, each one template for a float and for a vector of W floats (explicit vectors:
// GCC leaves the float versions' clamps as branches and does not vectorize their loops)

// s, or s in every lane
template <class T>
static inline T splat(float s) {
  return T{} + s;
}

// the W floats at p (t a vector), or the one float at p; overloads rather than a template on
// the type, which would drop vf's 4-byte alignment (GCC ignores attributes on template arguments)
static inline float ld(float, const float* p) { return *p; }
static inline vf ld(vf, const float* p) { return vload(p); }
static inline void st(float* p, float v) { *p = v; }
static inline void st(float* p, vf v) { vstore(p, v); }

// 2^n for an integral n held in a float (or in each lane)
static inline float pow2_(float n) { return __builtin_bit_cast(float, ((int32_t)n + 127) << 23); }
static inline vf pow2_(vf n) {
  return __builtin_bit_cast(vf, (__builtin_convertvector(n, vi) + 127) << 23);
}

// f(T{}, k) for k = 0, W, 2W, ... with T = vf while W lanes remain, then with T = float for
// each of the rest: a loop body written once for both
template <class F>
static inline void lanes(i64 n, F f) {
  i64 k = 0;
  for (; k + W <= n; k += W) f(vf{}, k);
  for (; k < n; k++) f(0.0f, k);
}

template <class T>
static inline T exp_(T x) {
  const T hi = splat<T>(88.0f), lo = splat<T>(-88.3762626647949f);  // keep 2^fx finite
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  // round to the nearest integer by the float32 magic number
  T fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - fx * 0.693359375f;
  x = x - fx * -2.12194440e-4f;
  T z = x * x;
  T y = splat<T>(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  return y * pow2_(fx);
}

template <class T>
static inline T sigmoid_(T x) {
  return 1.0f / (1.0f + exp_(-x));
}

// tanh as a rational function (odd degree 13 over even degree 6, the minimax approximation
// Eigen uses) on [-7.905, 7.905], where it reaches float32's 1: one division and no exp, within
// 4e-7 of tanh (relative) everywhere; below 4e-4 tanh(x) is x in float32
template <class T>
static inline T tanh_(T x) {
  const T hi = splat<T>(7.90531110763549805f), lo = splat<T>(-7.90531110763549805f);
  T c = x > hi ? hi : x;
  c = c < lo ? lo : c;
  T z = c * c;
  T p = splat<T>(-2.76076847742355e-16f);
  p = p * z + 2.00018790482477e-13f;
  p = p * z - 8.60467152213735e-11f;
  p = p * z + 5.12229709037114e-08f;
  p = p * z + 1.48572235717979e-05f;
  p = p * z + 6.37261928875436e-04f;
  p = p * z + 4.89352455891786e-03f;
  T q = splat<T>(1.19825839466702e-06f);
  q = q * z + 1.18534705686654e-04f;
  q = q * z + 2.26843463243900e-03f;
  q = q * z + 4.89352518554385e-03f;
  T r = c * p / q;
  T a = x < splat<T>(0.0f) ? -x : x;
  return a < splat<T>(0.0004f) ? x : r;
}

// ---------------------------------------------------------------------------------------------
// small row-major GEMMs: C (M, N) (+)= A (M, K) B (K, N)

template <int R, int V>
static inline void tile(i64 K, const float* a, i64 lda, const float* b, i64 ldb, float* c,
                        i64 ldc, bool acc) {
  vf s[R][V];
  for (int m = 0; m < R; m++)
    for (int v = 0; v < V; v++) s[m][v] = acc ? vload(c + m * ldc + v * W) : (vf){};
  for (i64 k = 0; k < K; k++) {
    vf bv[V];
    for (int v = 0; v < V; v++) bv[v] = vload(b + k * ldb + v * W);
    for (int m = 0; m < R; m++) {
      float am = a[m * lda + k];
      for (int v = 0; v < V; v++) s[m][v] += am * bv[v];
    }
  }
  for (int m = 0; m < R; m++)
    for (int v = 0; v < V; v++) vstore(c + m * ldc + v * W, s[m][v]);
}

template <int R, int V>
static inline void tile_rows(i64 M, i64 K, const float* a, i64 lda, const float* b, i64 ldb,
                             float* c, i64 ldc, bool acc) {
  i64 m = 0;
  for (; m + R <= M; m += R) tile<R, V>(K, a + m * lda, lda, b, ldb, c + m * ldc, ldc, acc);
  for (; m + 2 <= M; m += 2) tile<2, V>(K, a + m * lda, lda, b, ldb, c + m * ldc, ldc, acc);
  for (; m < M; m++) tile<1, V>(K, a + m * lda, lda, b, ldb, c + m * ldc, ldc, acc);
}

// the tiles hold about 16 vectors of C: MR rows of NB vectors on wide products, more rows of
// fewer vectors on narrow ones (a product NB vectors wide or less keeps every register busy)
static void gemm(i64 M, i64 N, i64 K, const float* a, i64 lda, const float* b, i64 ldb,
                 float* c, i64 ldc, bool acc) {
  i64 n = 0;
  for (; n + NB * W <= N; n += NB * W)
    tile_rows<MR, NB>(M, K, a, lda, b + n, ldb, c + n, ldc, acc);
  i64 left = (N - n) / W;
  if (NB >= 3 && left == 3) {
    tile_rows<MR, 3>(M, K, a, lda, b + n, ldb, c + n, ldc, acc);
    n += 3 * W;
  } else if (left >= 2) {
    tile_rows<2 * MR, 2>(M, K, a, lda, b + n, ldb, c + n, ldc, acc);
    n += 2 * W;
  }
  for (; n + W <= N; n += W) tile_rows<2 * MR, 1>(M, K, a, lda, b + n, ldb, c + n, ldc, acc);
  if (n < N) {
    for (i64 m = 0; m < M; m++) {
      float* cm = c + m * ldc;
      const float* am = a + m * lda;
      for (i64 j = n; j < N; j++) {
        float s = acc ? cm[j] : 0.0f;
        for (i64 k = 0; k < K; k++) s += am[k] * b[k * ldb + j];
        cm[j] = s;
      }
    }
  }
}
