// The Kronecker sum of the compiled recurrences (native_rnn.cpp) and cell steps
// (native_step.cpp): W = Pi_out (sum_p A_p^(0) x ... x A_p^(N-1)) Pi_in^T, factor n of term p a
// dense (J_n, I_n) matrix (kcprnn/rnn/kron.py). y = W x for rows x is: gather x into
// factor-major order (in_index), multiply by the factors one at a time, sum the terms, and
// gather the result back (out_index). The factors are applied in the order with the fewest
// multiply-accumulates (KronPlan::cheapest_order; a factor mapping few inputs to many outputs
// goes last). Before factor n the rows are (rows * pre_n, I_n, post_n), pre_n and post_n the
// products of the sizes of the modes before and after n (J_k for the factors already applied,
// I_k for the others); after it (rows * pre_n, J_n, post_n). Each factor is one small row-major
// GEMM C = A B:
//  - "row" mode (post_n below a vector's width): C (rows pre_n, J_n post_n) = Z (rows pre_n,
//    I_n post_n) K, with K = (A^(n) x I_post)^T expanded once when the plan is made (post_n
//    times the MACs, but whole vectors along J_n post_n);
//  - "column" mode: for every row r, C_r (J_n, post_n) = A^(n) (J_n, I_n) Z_r (I_n, post_n),
//    a matrix-vector product by dot products along I_n where post_n is 1.
//
// KronPlan holds what depends on the sizes and the factors only, and reads nothing but its
// arguments' buffers while it multiplies, so one plan serves any number of rows and threads;
// Kron adds the buffers of a product over a fixed number of rows (one per recurrence call).
// The factors are read through the pointers given (the caller keeps them alive), except the
// expanded row-mode ones, which the plan copies.

#pragma once

#include "native_simd.h"

#include <algorithm>
#include <vector>

// dst[m] = x[index[m]] (a separate function so that __restrict lets GCC vectorize it)
static void gather_row(i64 n, const float* __restrict x, const int32_t* __restrict index,
                       float* __restrict dst) {
  for (i64 m = 0; m < n; m++) dst[m] = x[index[m]];
}

static float hsum(vf v) {
  float s = 0.0f;
  for (int k = 0; k < W; k++) s += v[k];
  return s;
}

// y (rows, out) (+)= x (rows, in; row stride ldx) w^T for w (out, in) row-major: four rows of w
// at a time against every row of x (one pass over w, the memory-bound part at few rows)
static void dense_nt(i64 rows, i64 in, i64 out, const float* x, i64 ldx, const float* w,
                     float* y, bool add) {
  i64 o = 0;
  for (; o + 4 <= out; o += 4) {
    const float *w0 = w + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
    for (i64 b = 0; b < rows; b++) {
      const float* xb = x + b * ldx;
      vf s0 = {}, s1 = {}, s2 = {}, s3 = {};
      i64 k = 0;
      for (; k + W <= in; k += W) {
        vf xv = vload(xb + k);
        s0 += vload(w0 + k) * xv;
        s1 += vload(w1 + k) * xv;
        s2 += vload(w2 + k) * xv;
        s3 += vload(w3 + k) * xv;
      }
      float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (in >= W) r[0] = hsum(s0), r[1] = hsum(s1), r[2] = hsum(s2), r[3] = hsum(s3);
      for (; k < in; k++) {
        r[0] += w0[k] * xb[k], r[1] += w1[k] * xb[k];
        r[2] += w2[k] * xb[k], r[3] += w3[k] * xb[k];
      }
      float* yb = y + b * out + o;
      for (int m = 0; m < 4; m++) yb[m] = add ? yb[m] + r[m] : r[m];
    }
  }
  for (; o < out; o++)
    for (i64 b = 0; b < rows; b++) {
      float s = 0.0f;
      for (i64 k = 0; k < in; k++) s += w[o * in + k] * x[b * ldx + k];
      y[b * out + o] = add ? y[b * out + o] + s : s;
    }
}

struct KronPlan {
  int n, terms;
  i64 in, out, big;  // features, and the largest intermediate per row
  std::vector<i64> in_sz, out_sz, pre, post;  // pre, post: per factor, as applied
  std::vector<int> order;                     // the factors in the order they are applied
  std::vector<char> row;                      // row mode per factor
  std::vector<const float*> mats;             // factor n: (terms, J_n, I_n)
  std::vector<std::vector<float>> kt;         // row mode: (terms, I_n post_n, J_n post_n)
  std::vector<int32_t> in_index, out_index;   // empty: identity

  // sizes: I_0..I_{N-1} then J_0..J_{N-1}; mats: N pointers; indices may be null
  KronPlan(int n_, int terms_, const i64* sizes, const float* const* mats_, const i64* in_idx,
           const i64* out_idx)
      : n(n_), terms(terms_), in(1), out(1) {
    in_sz.assign(sizes, sizes + n);
    out_sz.assign(sizes + n, sizes + 2 * n);
    mats.assign(mats_, mats_ + n);
    for (int k = 0; k < n; k++) in *= in_sz[k], out *= out_sz[k];
    pre.resize(n);
    post.resize(n);
    row.resize(n);
    kt.resize(n);
    order = cheapest_order();
    // the sizes of the modes as the factors are applied: I_k before factor k, J_k after it
    std::vector<i64> cur(in_sz);
    big = std::max(in, out);
    for (int k : order) {
      i64 p = 1, q = 1;
      for (int m = 0; m < k; m++) p *= cur[m];
      for (int m = k + 1; m < n; m++) q *= cur[m];
      pre[k] = p, post[k] = q;
      cur[k] = out_sz[k];
      big = std::max(big, p * out_sz[k] * q);
    }
    for (int k = 0; k < n; k++) {
      i64 q = post[k], ik = in_sz[k], jk = out_sz[k];
      row[k] = q < W && ik * q * jk * q <= (1 << 16);
      if (!row[k]) continue;
      std::vector<float>& e = kt[k];
      e.assign((size_t)(terms * ik * q * jk * q), 0.0f);
      for (int t = 0; t < terms; t++) {
        const float* a = mats[k] + t * jk * ik;  // (J, I)
        float* et = e.data() + t * ik * q * jk * q;
        for (i64 i = 0; i < ik; i++)
          for (i64 j = 0; j < jk; j++)
            for (i64 s = 0; s < q; s++) et[(i * q + s) * (jk * q) + j * q + s] = a[j * ik + i];
      }
    }
    if (in_idx)
      for (i64 k = 0; k < in; k++) in_index.push_back((int32_t)in_idx[k]);
    if (out_idx)
      for (i64 k = 0; k < out; k++) out_index.push_back((int32_t)out_idx[k]);
  }

  // the order of the factors with the fewest multiply-accumulates, among all orders of up to
  // six factors (the last factor first where several tie); applying factor k multiplies a
  // (rows pre, I_k, post) array, the factors applied before it at their output sizes
  std::vector<int> cheapest_order() const {
    std::vector<int> best(n), perm(n);
    for (int k = 0; k < n; k++) best[k] = perm[k] = n - 1 - k;
    if (n > 6) return best;
    auto macs = [&](const std::vector<int>& o) {
      std::vector<i64> cur(in_sz);
      double total = 0;
      for (int k : o) {
        double size = 1;
        for (int m = 0; m < n; m++) size *= m == k ? 1 : cur[m];
        total += size * in_sz[k] * out_sz[k];
        cur[k] = out_sz[k];
      }
      return total;
    };
    double least = macs(best);
    std::sort(perm.begin(), perm.end());
    do {
      double m = macs(perm);
      if (m < least) least = m, best = perm;
    } while (std::next_permutation(perm.begin(), perm.end()));
    return best;
  }

  // dst (rows, in) = x (rows, in) in factor-major order (a copy where there is no permutation)
  void gather(i64 rows, const float* x, float* dst) const {
    if (in_index.empty()) {
      memcpy(dst, x, sizeof(float) * rows * in);
      return;
    }
    for (i64 b = 0; b < rows; b++) gather_row(in, x + b * in, in_index.data(), dst + b * in);
  }

  // acc (rows, out) in factor-major order = W z for z (rows, in) already in factor-major order;
  // buf0 and buf1 hold rows * big floats each
  void apply_fm(i64 rows, const float* src, float* buf0, float* buf1, float* acc) const {
    for (int t = 0; t < terms; t++) {
      const float* z = src;
      for (int step = 0; step < n; step++) {
        int k = order[step];
        bool last = step == n - 1;
        float* dst = last ? acc : (z == buf0 ? buf1 : buf0);
        bool add = last && t > 0;
        i64 ik = in_sz[k], jk = out_sz[k], q = post[k], r = rows * pre[k];
        if (row[k]) {
          const float* e = kt[k].data() + t * ik * q * jk * q;
          gemm(r, jk * q, ik * q, z, ik * q, e, jk * q, dst, jk * q, add);
        } else if (q == 1) {  // one matrix-vector product per row
          dense_nt(r, ik, jk, z, ik, mats[k] + t * jk * ik, dst, add);
        } else {
          const float* a = mats[k] + t * jk * ik;
          for (i64 s = 0; s < r; s++)
            gemm(jk, q, ik, a, ik, z + s * ik * q, q, dst + s * jk * q, q, add);
        }
        z = dst;
      }
    }
  }

  // where natural output j is in the factor-major result
  inline i64 at(i64 j) const { return out_index.empty() ? j : out_index[j]; }
};

// a plan with the buffers of products over a fixed number of rows
struct Kron : KronPlan {
  i64 rows;
  std::vector<float> xf, buf0, buf1, acc;

  Kron(int n_, int terms_, const i64* sizes, const float* const* mats_, const i64* in_idx,
       const i64* out_idx, i64 rows_)
      : KronPlan(n_, terms_, sizes, mats_, in_idx, out_idx), rows(rows_) {
    xf.resize((size_t)(rows * in));
    buf0.resize((size_t)(rows * big));
    buf1.resize((size_t)(rows * big));
    acc.resize((size_t)(rows * out));
  }

  void gather(const float* x, float* dst) const { KronPlan::gather(rows, x, dst); }

  // acc (rows, out) in factor-major order = W x for x (rows, in) contiguous, natural order;
  // read the natural output j at acc[b * out + at(j)]
  void apply(const float* x) {
    if (in_index.empty()) return apply_fm(x);
    gather(x, xf.data());
    apply_fm(xf.data());
  }

  // the same for x already in factor-major order
  void apply_fm(const float* src) {
    KronPlan::apply_fm(rows, src, buf0.data(), buf1.data(), acc.data());
  }
};

#define KRON_ARGS \
  int n_factors, int terms, const i64 *sizes, const float *const *mats, const i64 *in_index, \
      const i64 *out_index
