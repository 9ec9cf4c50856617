// Whole single-direction LSTM, GRU and Elman recurrences whose hidden-to-hidden matrix is a
// Kronecker sum, forward and backward through time, for float32 on x86-64 CPUs (AVX-512, or
// AVX2 + FMA). The Python side (kcprnn/rnn/fused.py) computes the input projections of all
// steps before the loop and the factor gradients after it, in one product over all steps each;
// these functions run the loop in between, where torch would launch about a dozen operations per
// step from Python.
//
// The Kronecker sum (kcprnn/rnn/kron.py): W = Pi_out (sum_p A_p^(0) x ... x A_p^(N-1)) Pi_in^T,
// factor n of term p a dense (J_n, I_n) matrix. y = W x for rows x is: gather x into
// factor-major order (in_index), multiply by the factors one at a time, sum the terms, and
// gather the result back (out_index). The factors are applied in the order with the fewest
// multiply-accumulates (Kron::cheapest_order; a factor mapping few inputs to many outputs
// goes last). Before factor n the rows are (rows * pre_n, I_n, post_n), pre_n and post_n the
// products of the sizes of the modes before and after n (J_k for the factors already applied,
// I_k for the others); after it (rows * pre_n, J_n, post_n). Each factor is one small row-major
// GEMM C = A B:
//  - "row" mode (post_n below a vector's width): C (rows pre_n, J_n post_n) = Z (rows pre_n,
//    I_n post_n) K, with K = (A^(n) x I_post)^T expanded once per sequence (post_n times the
//    MACs, but whole vectors along J_n post_n);
//  - "column" mode: for every row r, C_r (J_n, post_n) = A^(n) (J_n, I_n) Z_r (I_n, post_n).
// The GEMM holds a tile of MR rows x NV vectors of C in registers (GCC vector extensions, no
// intrinsics) and broadcasts the entries of its left operand. The output gather is fused into
// the gate arithmetic that reads the product.
//
// The activations are branch-free and vectorized by GCC: sigmoid from a polynomial exp (Cephes'
// single-precision one, about 2 ulp), tanh a rational function (within 4e-7 relative); results
// differ from torch's by about float32 rounding.
//
// Everything runs on the calling thread: at batch 16 a step's work is a few microseconds per
// part, below what an OpenMP parallel region per step costs on a loaded machine.
//
// The vector types, activations and GEMM tiles are in native_simd.h. Built together with
// native_tall.cpp into one library by kcprnn/_cpu/native.py.

#include "native_simd.h"

#include <algorithm>
#include <vector>

// ---------------------------------------------------------------------------------------------
// the Kronecker sum

// dst[m] = x[index[m]] (a separate function so that __restrict lets GCC vectorize it)
static void gather_row(i64 n, const float* __restrict x, const int32_t* __restrict index,
                       float* __restrict dst) {
  for (i64 m = 0; m < n; m++) dst[m] = x[index[m]];
}

struct Kron {
  int n, terms;
  i64 in, out, rows;  // features, and the batch rows it was sized for
  std::vector<i64> in_sz, out_sz, pre, post;  // pre, post: per factor, as applied
  std::vector<int> order;                     // the factors in the order they are applied
  std::vector<char> row;                  // row mode per factor
  std::vector<const float*> mats;         // factor n: (terms, J_n, I_n)
  std::vector<std::vector<float>> kt;     // row mode: (terms, I_n post_n, J_n post_n)
  std::vector<int32_t> in_index, out_index;  // empty: identity
  std::vector<float> xf, buf0, buf1, acc;

  // sizes: I_0..I_{N-1} then J_0..J_{N-1}; mats: N pointers; indices may be null
  Kron(int n_, int terms_, const i64* sizes, const float* const* mats_, const i64* in_idx,
       const i64* out_idx, i64 rows_)
      : n(n_), terms(terms_), in(1), out(1), rows(rows_) {
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
    i64 big = in;
    for (int k : order) {
      i64 p = 1, q = 1;
      for (int m = 0; m < k; m++) p *= cur[m];
      for (int m = k + 1; m < n; m++) q *= cur[m];
      pre[k] = p, post[k] = q;
      cur[k] = out_sz[k];
      big = big > p * out_sz[k] * q ? big : p * out_sz[k] * q;
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
    xf.resize((size_t)(rows * in));
    buf0.resize((size_t)(rows * big));
    buf1.resize((size_t)(rows * big));
    acc.resize((size_t)(rows * out));
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
  void gather(const float* x, float* dst) const {
    if (in_index.empty()) {
      memcpy(dst, x, sizeof(float) * rows * in);
      return;
    }
    for (i64 b = 0; b < rows; b++) gather_row(in, x + b * in, in_index.data(), dst + b * in);
  }

  // acc (rows, out) in factor-major order = W x for x (rows, in) contiguous, natural order;
  // read the natural output j at acc[b * out + index(j)]
  void apply(const float* x) {
    if (in_index.empty()) return apply_fm(x);
    gather(x, xf.data());
    apply_fm(xf.data());
  }

  // the same for x already in factor-major order
  void apply_fm(const float* src) {
    for (int t = 0; t < terms; t++) {
      const float* z = src;
      for (int step = 0; step < n; step++) {
        int k = order[step];
        bool last = step == n - 1;
        float* dst = last ? acc.data() : (z == buf0.data() ? buf1.data() : buf0.data());
        bool add = last && t > 0;
        i64 ik = in_sz[k], jk = out_sz[k], q = post[k], r = rows * pre[k];
        if (row[k]) {
          const float* e = kt[k].data() + t * ik * q * jk * q;
          gemm(r, jk * q, ik * q, z, ik * q, e, jk * q, dst, jk * q, add);
        } else {
          const float* a = mats[k] + t * jk * ik;
          for (i64 s = 0; s < r; s++)
            gemm(jk, q, ik, a, ik, z + s * ik * q, q, dst + s * jk * q, q, add);
        }
        z = dst;
      }
    }
  }

  inline i64 at(i64 j) const { return out_index.empty() ? j : out_index[j]; }
};

#define KRON_ARGS \
  int n_factors, int terms, const i64 *sizes, const float *const *mats, const i64 *in_index, \
      const i64 *out_index

#define KRON(rows) Kron kron(n_factors, terms, sizes, mats, in_index, out_index, rows)

// step t of the s-th iteration of a loop that runs forward (or backward in time for reverse)
static inline i64 forward_step(i64 s, i64 steps, int reverse) {
  return reverse ? steps - 1 - s : s;
}

// ---------------------------------------------------------------------------------------------
// per-row elementwise parts (separate functions so that __restrict lets GCC vectorize them)

#define R __restrict

// g[j] = x[j] (+ bias[j]) (+ a[index(j)] where a is given): a step's pre-activations from its
// input projection, the bias and the natural outputs of the product
static void pre_activation(i64 n, float* R g, const float* R x, const float* R bias,
                           const float* R a, const int32_t* R oi) {
  if (bias)
    for (i64 j = 0; j < n; j++) g[j] = x[j] + bias[j];
  else
    for (i64 j = 0; j < n; j++) g[j] = x[j];
  if (a && oi)
    for (i64 j = 0; j < n; j++) g[j] += a[oi[j]];
  else if (a)
    for (i64 j = 0; j < n; j++) g[j] += a[j];
}

// g[j] += a[index(j)], the natural outputs of a product added to g
static void add_product(i64 n, float* R g, const float* R a, const int32_t* R oi) {
  if (oi)
    for (i64 j = 0; j < n; j++) g[j] += a[oi[j]];
  else
    for (i64 j = 0; j < n; j++) g[j] += a[j];
}

// g[j] = a[index(j)]
static void set_product(i64 n, float* R g, const float* R a, const int32_t* R oi) {
  if (oi)
    for (i64 j = 0; j < n; j++) g[j] = a[oi[j]];
  else
    for (i64 j = 0; j < n; j++) g[j] = a[j];
}

static void lstm_cell(i64 h, float* R g, const float* R cp, float* R c, float* R tc,
                      float* R hn) {
  for (i64 j = 0; j < 2 * h; j++) g[j] = sigmoid_(g[j]);
  for (i64 j = 2 * h; j < 3 * h; j++) g[j] = tanh_(g[j]);
  for (i64 j = 3 * h; j < 4 * h; j++) g[j] = sigmoid_(g[j]);
  for (i64 k = 0; k < h; k++) {
    float cv = g[h + k] * cp[k] + g[k] * g[2 * h + k];
    c[k] = cv;
    float tv = tanh_(cv);
    tc[k] = tv;
    hn[k] = g[3 * h + k] * tv;
  }
}

// dh: the gradient of h (without grad_h's share, added here); dc: of c, replaced by c_prev's
static void lstm_cell_back(i64 h, const float* R g, const float* R tc, const float* R cp,
                           const float* R gh, const float* R dh, float* R dc, float* R d) {
  for (i64 k = 0; k < h; k++) {
    float i = g[k], f = g[h + k], gg = g[2 * h + k], o = g[3 * h + k];
    float tv = tc[k];
    float dhv = dh[k] + gh[k];
    float dcv = dc[k] + dhv * o * (1.0f - tv * tv);
    d[k] = dcv * gg * i * (1.0f - i);
    d[h + k] = dcv * cp[k] * f * (1.0f - f);
    d[2 * h + k] = dcv * i * (1.0f - gg * gg);
    d[3 * h + k] = dhv * tv * o * (1.0f - o);
    dc[k] = dcv * f;
  }
}

static void gru_cell(i64 h, const float* R x, const float* R g, const float* R hp, float* R rz,
                     float* R n, float* R hn) {
  for (i64 j = 0; j < 2 * h; j++) rz[j] = sigmoid_(x[j] + g[j]);
  for (i64 k = 0; k < h; k++) {
    float nv = tanh_(x[2 * h + k] + rz[k] * g[2 * h + k]);
    n[k] = nv;
    hn[k] = nv + rz[h + k] * (hp[k] - nv);
  }
}

// dh: the gradient of h, grad_h's share added here, replaced by z times it (the direct path)
static void gru_cell_back(i64 h, const float* R rz, const float* R n, const float* R g,
                          const float* R hp, const float* R gh, float* R dh, float* R dx,
                          float* R dhh) {
  for (i64 k = 0; k < h; k++) {
    float r = rz[k], z = rz[h + k], nv = n[k];
    float dhv = dh[k] + gh[k];
    float dn = dhv * (1.0f - z) * (1.0f - nv * nv);
    float dr = dn * g[2 * h + k] * r * (1.0f - r);
    float dz = dhv * (hp[k] - nv) * z * (1.0f - z);
    dx[k] = dr;
    dx[h + k] = dz;
    dx[2 * h + k] = dn;
    dhh[k] = dr;
    dhh[h + k] = dz;
    dhh[2 * h + k] = dn * r;
    dh[k] = dhv * z;
  }
}

static void rnn_act(i64 n, float* R p, int relu) {
  if (relu)
    for (i64 j = 0; j < n; j++) p[j] = p[j] > 0.0f ? p[j] : 0.0f;
  else
    for (i64 j = 0; j < n; j++) p[j] = tanh_(p[j]);
}

static void rnn_back(i64 n, const float* R hs, const float* R dh, const float* R gh, float* R d,
                     int relu) {
  if (relu)
    for (i64 j = 0; j < n; j++) d[j] = hs[j] > 0.0f ? dh[j] + gh[j] : 0.0f;
  else
    for (i64 j = 0; j < n; j++) d[j] = (dh[j] + gh[j]) * (1.0f - hs[j] * hs[j]);
}

// ---------------------------------------------------------------------------------------------
// The optional outputs every sequence function takes for the factor gradients (computed by the
// caller over all steps at once): x_fm (t, b, in) receives the product's input of every step
// (the state before it) in factor-major order, indexed by time (forward); d_fm (t, b, in of
// W^T) the gradient that the transposed product reads, in factor-major order (backward); and
// dbias (g) the sum over all steps and rows of the gradient of W_hh h + b_hh.

// x_fm[t] = the state before step t (h, of rows x in) in factor-major order; returns where the
// product reads it
static const float* product_input(const Kron& kron, const float* h, float* x_fm, i64 t) {
  if (!x_fm) return h;
  float* dst = x_fm + t * kron.rows * kron.in;
  kron.gather(h, dst);
  return dst;
}

// the product of step t's state, from the state itself (natural order) or its factor-major copy
static void forward_product(Kron& kron, const float* h, const float* fm) {
  if (fm != h)
    kron.apply_fm(fm);
  else
    kron.apply(h);
}

// the transposed product of d (rows, in of W^T), its factor-major copy kept in d_fm[t] when
// given; apply: whether the product is needed (else only the copy is made)
static void backward_product(Kron& kron, const float* d, float* d_fm, i64 t, bool apply) {
  if (d_fm) {
    float* dst = d_fm + t * kron.rows * kron.in;
    kron.gather(d, dst);
    if (apply) kron.apply_fm(dst);
  } else if (apply) {
    kron.apply(d);
  }
}

static void add_rows(i64 rows, i64 n, const float* R d, float* R sum) {
  for (i64 b = 0; b < rows; b++)
    for (i64 j = 0; j < n; j++) sum[j] += d[b * n + j];
}

// ---------------------------------------------------------------------------------------------
// LSTM: gates (t, b, 4h) in the order i, f, g, o

// gx: the input projections, row (t, b) at gx + (t * batch + b) * ldx; bias (4h) or null;
// gates (t, b, 4h): receives the activated gates; hs, cs, tcs (t, b, h): the hidden states, the
// cell states and tanh of the cell states; skip_first: h0 is zero.
extern "C" void kcprnn_lstm_forward(i64 steps, i64 batch, i64 hidden, const float* gx, i64 ldx,
                                    const float* bias, float* gates, const float* h0,
                                    const float* c0, float* hs, float* cs, float* tcs,
                                    float* x_fm, int reverse, int skip_first, KRON_ARGS) {
  KRON(batch);
  const i64 g4 = 4 * hidden, bh = batch * hidden;
  const int32_t* oi = kron.out_index.empty() ? nullptr : kron.out_index.data();
  const float* h = h0;
  const float* c = c0;
  for (i64 s = 0; s < steps; s++) {
    i64 t = forward_step(s, steps, reverse);
    bool product = !(s == 0 && skip_first);
    const float* fm = product_input(kron, h, x_fm, t);
    if (product) forward_product(kron, h, fm);
    for (i64 b = 0; b < batch; b++) {
      float* g = gates + (t * batch + b) * g4;
      const float* a = product ? kron.acc.data() + b * g4 : nullptr;
      pre_activation(g4, g, gx + (t * batch + b) * ldx, bias, a, oi);
      i64 o = t * bh + b * hidden;
      lstm_cell(hidden, g, c + b * hidden, cs + o, tcs + o, hs + o);
    }
    h = hs + t * bh;
    c = cs + t * bh;
  }
}

// acts, cs, tcs: the forward's outputs; grad_hs (t, b, h); dh, dc (b, h): the gradients of
// h_n and c_n, overwritten with those of h0 and c0 (dh only when need_h0); dgates (t, b, 4h):
// the pre-activation gradients. The Kronecker sum is W^T's.
extern "C" void kcprnn_lstm_backward(i64 steps, i64 batch, i64 hidden, const float* acts,
                                     const float* cs, const float* tcs, const float* c0,
                                     const float* grad_hs, float* dh, float* dc, float* dgates,
                                     float* d_fm, float* dbias, int reverse, int need_h0,
                                     KRON_ARGS) {
  KRON(batch);
  const i64 g4 = 4 * hidden, bh = batch * hidden;
  const int32_t* oi = kron.out_index.empty() ? nullptr : kron.out_index.data();
  for (i64 s = 0; s < steps; s++) {
    i64 t = forward_step(steps - 1 - s, steps, reverse);  // backward in time
    bool first = s == steps - 1;                           // the forward's first step
    i64 tp = reverse ? t + 1 : t - 1;                      // the step before t
    const float* cprev = first ? c0 : cs + tp * bh;
    float* d = dgates + t * batch * g4;
    for (i64 b = 0; b < batch; b++) {
      i64 o = t * bh + b * hidden, og = b * g4;
      lstm_cell_back(hidden, acts + t * batch * g4 + og, tcs + o, cprev + b * hidden,
                     grad_hs + o, dh + b * hidden, dc + b * hidden, d + og);
    }
    if (dbias) add_rows(batch, g4, d, dbias);
    bool apply = !first || need_h0;
    backward_product(kron, d, d_fm, t, apply);
    if (apply)
      for (i64 b = 0; b < batch; b++)
        set_product(hidden, dh + b * hidden, kron.acc.data() + b * hidden, oi);
  }
}

// ---------------------------------------------------------------------------------------------
// GRU: gates (t, b, 3h) in the order r, z, n; b_hn stays inside the reset gate

// gx: the input projections, row (t, b) at gx + (t * batch + b) * ldx; bias: b_hh (3h) or
// null; gh: W_hh h + b_hh of every step; rz, ns: the r, z gates and the candidate n; hs: the
// hidden states.
extern "C" void kcprnn_gru_forward(i64 steps, i64 batch, i64 hidden, const float* gx, i64 ldx,
                                   const float* bias, const float* h0, float* gh, float* rz,
                                   float* ns, float* hs, float* x_fm, int reverse,
                                   int skip_first, KRON_ARGS) {
  KRON(batch);
  const i64 g3 = 3 * hidden, bh = batch * hidden;
  const int32_t* oi = kron.out_index.empty() ? nullptr : kron.out_index.data();
  const float* h = h0;
  for (i64 s = 0; s < steps; s++) {
    i64 t = forward_step(s, steps, reverse);
    bool product = !(s == 0 && skip_first);
    const float* fm = product_input(kron, h, x_fm, t);
    if (product) forward_product(kron, h, fm);
    for (i64 b = 0; b < batch; b++) {
      i64 og = (t * batch + b) * g3, o = t * bh + b * hidden;
      float* g = gh + og;
      if (product)
        set_product(g3, g, kron.acc.data() + b * g3, oi);
      else
        for (i64 j = 0; j < g3; j++) g[j] = 0.0f;
      if (bias)
        for (i64 j = 0; j < g3; j++) g[j] += bias[j];
      gru_cell(hidden, gx + (t * batch + b) * ldx, g, h + b * hidden,
               rz + (t * batch + b) * 2 * hidden, ns + o, hs + o);
    }
    h = hs + t * bh;
  }
}

// dgx, dgh (t, b, 3h): the gradients of the input projections and of W_hh h + b_hh; dh (b, h):
// the gradient of h_n, overwritten with h0's (complete only when need_h0). The Kronecker sum is
// W^T's.
extern "C" void kcprnn_gru_backward(i64 steps, i64 batch, i64 hidden, const float* rz,
                                    const float* ns, const float* gh, const float* hs,
                                    const float* h0, const float* grad_hs, float* dh, float* dgx,
                                    float* dgh, float* d_fm, float* dbias, int reverse,
                                    int need_h0, KRON_ARGS) {
  KRON(batch);
  const i64 g3 = 3 * hidden, bh = batch * hidden;
  const int32_t* oi = kron.out_index.empty() ? nullptr : kron.out_index.data();
  for (i64 s = 0; s < steps; s++) {
    i64 t = forward_step(steps - 1 - s, steps, reverse);
    bool first = s == steps - 1;
    i64 tp = reverse ? t + 1 : t - 1;
    const float* hprev = first ? h0 : hs + tp * bh;
    for (i64 b = 0; b < batch; b++) {
      i64 og = (t * batch + b) * g3, o = t * bh + b * hidden;
      gru_cell_back(hidden, rz + (t * batch + b) * 2 * hidden, ns + o, gh + og,
                    hprev + b * hidden, grad_hs + o, dh + b * hidden, dgx + og, dgh + og);
    }
    const float* d = dgh + t * batch * g3;
    if (dbias) add_rows(batch, g3, d, dbias);
    bool apply = !first || need_h0;
    backward_product(kron, d, d_fm, t, apply);
    if (apply)
      for (i64 b = 0; b < batch; b++)
        add_product(hidden, dh + b * hidden, kron.acc.data() + b * hidden, oi);
  }
}

// ---------------------------------------------------------------------------------------------
// Elman: h = tanh(pre) or relu(pre)

// gx: the input projections, row (t, b) at gx + (t * batch + b) * ldx; bias (h) or null;
// hs (t, b, h): receives the hidden states.
extern "C" void kcprnn_rnn_forward(i64 steps, i64 batch, i64 hidden, const float* gx, i64 ldx,
                                   const float* bias, float* hs, const float* h0, float* x_fm,
                                   int reverse, int relu, int skip_first, KRON_ARGS) {
  KRON(batch);
  const i64 bh = batch * hidden;
  const int32_t* oi = kron.out_index.empty() ? nullptr : kron.out_index.data();
  const float* h = h0;
  for (i64 s = 0; s < steps; s++) {
    i64 t = forward_step(s, steps, reverse);
    bool product = !(s == 0 && skip_first);
    const float* fm = product_input(kron, h, x_fm, t);
    if (product) forward_product(kron, h, fm);
    for (i64 b = 0; b < batch; b++) {
      float* p = hs + t * bh + b * hidden;
      const float* a = product ? kron.acc.data() + b * hidden : nullptr;
      pre_activation(hidden, p, gx + (t * batch + b) * ldx, bias, a, oi);
      rnn_act(hidden, p, relu);
    }
    h = hs + t * bh;
  }
}

// dpre (t, b, h): the pre-activation gradients; dh (b, h): the gradient of h_n, overwritten
// with h0's (complete only when need_h0). The Kronecker sum is W^T's.
extern "C" void kcprnn_rnn_backward(i64 steps, i64 batch, i64 hidden, const float* hs,
                                    const float* grad_hs, float* dh, float* dpre, float* d_fm,
                                    float* dbias, int reverse, int relu, int need_h0,
                                    KRON_ARGS) {
  KRON(batch);
  const i64 bh = batch * hidden;
  const int32_t* oi = kron.out_index.empty() ? nullptr : kron.out_index.data();
  for (i64 s = 0; s < steps; s++) {
    i64 t = forward_step(steps - 1 - s, steps, reverse);
    bool first = s == steps - 1;
    float* d = dpre + t * bh;
    rnn_back(bh, hs + t * bh, dh, grad_hs + t * bh, d, relu);
    if (dbias) add_rows(batch, hidden, d, dbias);
    bool apply = !first || need_h0;
    backward_product(kron, d, d_fm, t, apply);
    if (apply)
      for (i64 b = 0; b < batch; b++)
        set_product(hidden, dh + b * hidden, kron.acc.data() + b * hidden, oi);
  }
}

// ---------------------------------------------------------------------------------------------
// one product, for tests: y (rows, out) natural order = W x

extern "C" void kcprnn_kron_apply(i64 rows, const float* x, float* y, KRON_ARGS) {
  KRON(rows);
  kron.apply(x);
  for (i64 b = 0; b < rows; b++)
    for (i64 j = 0; j < kron.out; j++) y[b * kron.out + j] = kron.acc[b * kron.out + kron.at(j)];
}
