// The dense matrix of one KCP Kronecker factor from its CP factors, and its gradient, for
// float32 and float64 (Python side: kcprnn/_cpu/native_factor.py).
//
// A factor with D modes, P terms and rank R has CP factors F_d of shape (P, R, J_d, I_d); its
// matrix is M_p = sum_r kron_d F_d[p, r], of shape (P, J, I) with J = prod J_d and I = prod I_d,
// rows (j_1, ..., j_D) and columns (i_1, ..., i_D) each in row-major order. With each mode's
// block (j_d, i_d) kept together ("blocked" order, axes (j_1 i_1, ..., j_D i_D)) every rank's
// term is the outer product of the D flattened blocks f_d = vec F_d[p, r], so
//
//   forward:  H = sum_r f_1 o f_2 o ... o f_D (blocked), then M_p = H permuted to (J, I);
//   backward: G = dM_p permuted to blocked order, and for each rank and mode k
//             dF_k[p, r] = G contracted with every f_d but f_k,
//
// the backward by one sweep from the first mode (C_k = G contracted with f_1, ..., f_{k-1}) with
// the products of the later modes (S_k = f_{k+1} o ... o f_D): dF_k = C_k S_k, about 2 J I
// multiply-adds per rank, every inner loop along the long trailing axis. These matrices are small (a cell's factors have a few thousand
// entries) and the point is one call instead of a few dozen torch operations, so everything
// runs on the calling thread. Built with native_tall.cpp and native_rnn.cpp into one library.

#include <algorithm>
#include <cstdint>
#include <vector>

using i64 = int64_t;

namespace {

// The modes of one factor: each mode's block size J_d I_d, and offset[n], where the blocked
// entry n sits in the (J, I) matrix (a table the caller keeps per shape).
struct FactorShape {
  int nd;
  const i64* block;
  const i64* offset;
  i64 size = 1;

  FactorShape(int nd_, const i64* block_, const i64* offset_)
      : nd(nd_), block(block_), offset(offset_) {
    for (int d = 0; d < nd; ++d) size *= block[d];
  }
};

// out (length n * m) = a (n) outer b (m), or += when accumulate; the long axis b innermost
template <typename T>
inline void outer(const T* a, i64 n, const T* b, i64 m, T* out, bool accumulate) {
  for (i64 x = 0; x < n; ++x) {
    const T s = a[x];
    T* o = out + x * m;
    if (accumulate) {
#pragma omp simd
      for (i64 y = 0; y < m; ++y) o[y] += s * b[y];
    } else {
#pragma omp simd
      for (i64 y = 0; y < m; ++y) o[y] = s * b[y];
    }
  }
}

// A scratch vector per thread and purpose, grown as needed and never shrunk or cleared (the
// Python side sends factors of at most a few hundred thousand entries: at most a few MB).
template <typename T, int Which>
T* scratch(i64 n) {
  thread_local std::vector<T> buf;
  if (static_cast<i64>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// suffix[k] (at suffix + start[k]) = f_{k+1} o ... o f_D of rank pr: length rest[k]
template <typename T>
void suffixes(const FactorShape& sh, const T* const* f, i64 pr, const i64* rest,
              const i64* start, T* suffix) {
  const int nd = sh.nd;
  suffix[start[nd - 1]] = T(1);
  for (int k = nd - 1; k > 0; --k)
    outer(f[k] + pr * sh.block[k], sh.block[k], suffix + start[k], rest[k], suffix + start[k - 1],
          false);
}

// rest[k] = prod of block[d] for d > k, start[k] = where suffix k begins; returns their total
inline i64 suffix_layout(const FactorShape& sh, i64* rest, i64* start) {
  i64 len = 1, total = 0;
  for (int k = sh.nd - 1; k >= 0; --k) {
    rest[k] = len;
    start[k] = total;
    total += len;
    len *= sh.block[k];
  }
  return total;
}

template <typename T>
void factor_dense(const FactorShape& sh, i64 p_terms, i64 rank, const T* const* f, T* out) {
  const int nd = sh.nd;
  std::vector<i64> rest(nd), start(nd);
  const i64 total = suffix_layout(sh, rest.data(), start.data());
  T* h = scratch<T, 0>(sh.size);
  T* suffix = scratch<T, 1>(total);
  for (i64 p = 0; p < p_terms; ++p) {
    for (i64 r = 0; r < rank; ++r) {
      const i64 pr = p * rank + r;
      suffixes(sh, f, pr, rest.data(), start.data(), suffix);
      // h (+)= f_1 o (f_2 o ... o f_D)
      outer(f[0] + pr * sh.block[0], sh.block[0], suffix + start[0], rest[0], h, r > 0);
    }
    T* o = out + p * sh.size;
    if (rank == 0) {
      for (i64 n = 0; n < sh.size; ++n) o[n] = T(0);
      continue;
    }
    for (i64 n = 0; n < sh.size; ++n) o[sh.offset[n]] = h[n];
  }
}

template <typename T>
void factor_dense_grad(const FactorShape& sh, i64 p_terms, i64 rank, const T* const* f,
                       const T* grad, T* const* df) {
  const int nd = sh.nd;
  std::vector<i64> rest(nd), start(nd);
  const i64 total = suffix_layout(sh, rest.data(), start.data());
  T* g = scratch<T, 0>(sh.size);
  T* suffix = scratch<T, 1>(total);
  T* left = scratch<T, 2>(2 * sh.size);  // two halves: the contraction and the next one
  for (i64 p = 0; p < p_terms; ++p) {
    const T* gp = grad + p * sh.size;
    for (i64 n = 0; n < sh.size; ++n) g[n] = gp[sh.offset[n]];
    for (i64 r = 0; r < rank; ++r) {
      const i64 pr = p * rank + r;
      suffixes(sh, f, pr, rest.data(), start.data(), suffix);
      // cur = G contracted with f_1 .. f_{k-1}, axes (block k, rest k):
      // dF_k[b] = sum_y cur[b, y] suffix_k[y]; next[y] = sum_b f_k[b] cur[b, y]
      const T* cur = g;
      for (int k = 0; k < nd; ++k) {
        const i64 n_b = sh.block[k], n_y = rest[k];
        const T* fk = f[k] + pr * n_b;
        const T* sk = suffix + start[k];
        T* dk = df[k] + pr * n_b;
        for (i64 b = 0; b < n_b; ++b) {
          const T* row = cur + b * n_y;
          T s = T(0);
#pragma omp simd reduction(+ : s)
          for (i64 y = 0; y < n_y; ++y) s += row[y] * sk[y];
          dk[b] = s;
        }
        if (k + 1 < nd) {
          T* next = left + (k % 2) * sh.size;
          for (i64 y = 0; y < n_y; ++y) next[y] = T(0);
          for (i64 b = 0; b < n_b; ++b) {
            const T s = fk[b];
            const T* row = cur + b * n_y;
#pragma omp simd
            for (i64 y = 0; y < n_y; ++y) next[y] += s * row[y];
          }
          cur = next;
        }
      }
    }
  }
}

// c (m, n) = a (m, k) b (k, n), all row-major; the long axis n innermost
template <typename T>
void matmul(const T* a, const T* b, T* c, i64 m, i64 k, i64 n) {
  for (i64 x = 0; x < m * n; ++x) c[x] = T(0);
  for (i64 x = 0; x < m; ++x)
    for (i64 y = 0; y < k; ++y) {
      const T s = a[x * k + y];
      const T* row = b + y * n;
#pragma omp simd
      for (i64 z = 0; z < n; ++z) c[x * n + z] += s * row[z];
    }
}

// One row through one term of two Kronecker factors, y = (A_0 kron A_1) x: from the row x
// (I_0 I_1) and its output gradient g (J_0 J_1), each read through a gather (in_index: x's entry
// at each factor-major position; out_index: g's, or in place where null), the factor matrices'
// gradients dA_0 = G A_1 X^T (J_0, I_0) and dA_1 = G^T A_0 X (J_1, I_1), then each one's CP
// factors' gradients (factor_dense_grad), written one after another from df: factor 0's modes
// first, then factor 1's (P = 1, rank[n] each).
template <typename T>
void kcp_row_grads(const i64* in_index, const i64* out_index, const i64* dims, const T* a0,
                   const T* a1, const int* nd, const i64* const* blocks,
                   const i64* const* offsets, const i64* rank, const T* const* f0,
                   const T* const* f1, const T* x, const T* g, T* df) {
  const i64 j0 = dims[0], i0 = dims[1], j1 = dims[2], i1 = dims[3];
  T* xs = scratch<T, 3>(i0 * i1 + j0 * j1 + 2 * j0 * i1 + j0 * i0 + j1 * i1);
  T* gs = xs + i0 * i1;
  T* ga = gs + j0 * j1;  // G A_1: (J_0, I_1)
  T* ax = ga + j0 * i1;  // A_0 X: (J_0, I_1)
  T* d0 = ax + j0 * i1;
  T* d1 = d0 + j0 * i0;
  for (i64 n = 0; n < i0 * i1; ++n) xs[n] = in_index ? x[in_index[n]] : x[n];
  for (i64 n = 0; n < j0 * j1; ++n) gs[n] = out_index ? g[out_index[n]] : g[n];
  matmul(gs, a1, ga, j0, j1, i1);
  for (i64 a = 0; a < j0; ++a)  // dA_0 = (G A_1) X^T
    for (i64 c = 0; c < i0; ++c) {
      T s = T(0);
      const T* u = ga + a * i1;
      const T* v = xs + c * i1;
#pragma omp simd reduction(+ : s)
      for (i64 e = 0; e < i1; ++e) s += u[e] * v[e];
      d0[a * i0 + c] = s;
    }
  matmul(a0, xs, ax, j0, i0, i1);
  for (i64 b = 0; b < j1 * i1; ++b) d1[b] = T(0);
  for (i64 a = 0; a < j0; ++a)  // dA_1 = G^T (A_0 X)
    for (i64 b = 0; b < j1; ++b) {
      const T s = gs[a * j1 + b];
      const T* row = ax + a * i1;
#pragma omp simd
      for (i64 e = 0; e < i1; ++e) d1[b * i1 + e] += s * row[e];
    }
  const T* const* fs[2] = {f0, f1};
  const T* ds[2] = {d0, d1};
  for (int n = 0; n < 2; ++n) {
    std::vector<T*> out(nd[n]);
    for (int d = 0; d < nd[n]; ++d) {
      out[d] = df;
      df += rank[n] * blocks[n][d];
    }
    factor_dense_grad(FactorShape(nd[n], blocks[n], offsets[n]), 1, rank[n], fs[n], ds[n],
                      out.data());
  }
}

}  // namespace

extern "C" {

// blocks: J_d I_d of each mode; offsets: the (J, I) position of each blocked entry; factors: nd
// pointers to contiguous (P, R, J_d, I_d) arrays; out: (P, J, I)
void kcprnn_factor_dense_f32(int nd, const i64* blocks, const i64* offsets, i64 p_terms, i64 rank,
                             const float* const* factors, float* out) {
  factor_dense<float>(FactorShape(nd, blocks, offsets), p_terms, rank, factors, out);
}

void kcprnn_factor_dense_f64(int nd, const i64* blocks, const i64* offsets, i64 p_terms, i64 rank,
                             const double* const* factors, double* out) {
  factor_dense<double>(FactorShape(nd, blocks, offsets), p_terms, rank, factors, out);
}

// grad: (P, J, I), the gradient of out; grads: nd pointers to (P, R, J_d, I_d) arrays,
// overwritten with the factors' gradients
void kcprnn_factor_dense_grad_f32(int nd, const i64* blocks, const i64* offsets, i64 p_terms,
                                  i64 rank, const float* const* factors, const float* grad,
                                  float* const* grads) {
  factor_dense_grad<float>(FactorShape(nd, blocks, offsets), p_terms, rank, factors, grad, grads);
}

void kcprnn_factor_dense_grad_f64(int nd, const i64* blocks, const i64* offsets, i64 p_terms,
                                  i64 rank, const double* const* factors, const double* grad,
                                  double* const* grads) {
  factor_dense_grad<double>(FactorShape(nd, blocks, offsets), p_terms, rank, factors, grad, grads);
}

// in_index, out_index: the gathers (or null); dims: J_0, I_0, J_1, I_1; a0, a1: (J_0, I_0),
// (J_1, I_1); per factor n: nd[n] modes, blocks[n] and offsets[n] its tables (as
// kcprnn_factor_dense), rank[n], and f0 / f1 its nd[n] CP factors (1, R, J_d, I_d); x, g: the row
// and its output gradient; df: the CP factors' gradients, one after another
void kcprnn_kcp_row_grads_f32(const i64* in_index, const i64* out_index, const i64* dims,
                              const float* a0, const float* a1, const int* nd,
                              const i64* const* blocks, const i64* const* offsets,
                              const i64* rank, const float* const* f0, const float* const* f1,
                              const float* x, const float* g, float* df) {
  kcp_row_grads<float>(in_index, out_index, dims, a0, a1, nd, blocks, offsets, rank, f0, f1, x, g,
                       df);
}

void kcprnn_kcp_row_grads_f64(const i64* in_index, const i64* out_index, const i64* dims,
                              const double* a0, const double* a1, const int* nd,
                              const i64* const* blocks, const i64* const* offsets,
                              const i64* rank, const double* const* f0, const double* const* f1,
                              const double* x, const double* g, double* df) {
  kcp_row_grads<double>(in_index, out_index, dims, a0, a1, nd, blocks, offsets, rank, f0, f1, x,
                        g, df);
}

}  // extern "C"
