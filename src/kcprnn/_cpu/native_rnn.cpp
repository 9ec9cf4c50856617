// Whole single-direction LSTM, GRU and Elman recurrences whose hidden-to-hidden matrix is a
// Kronecker sum, forward and backward through time, for float32 on x86-64 CPUs (AVX-512, or
// AVX2 + FMA). The Python side (kcprnn/rnn/fused.py) computes the input projections of all
// steps before the loop and the factor gradients after it, in one product over all steps each;
// these functions run the loop in between, where torch would launch about a dozen operations per
// step from Python. The last part of the file is a single cell step with W_ih and W_hh each a
// Kronecker sum or dense (kcprnn_step; Python side in kcprnn/_cpu/native_step.py), for
// streaming inference one row at a time.
//
// The Kronecker sum and its products are in native_kron.h; each call plans the product afresh
// (the factors change between training steps). The GEMM holds a tile of MR rows x NV vectors of C in registers (GCC vector extensions, no
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
// native_tall.cpp and native_step.cpp into one library by kcprnn/_cpu/native.py.

#include "native_kron.h"

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

// ---------------------------------------------------------------------------------------------
// One cell step, W_ih and W_hh each a Kronecker sum or a dense matrix, prepared once per version
// of the weights (kcprnn_step_new: the plans, their expanded factors and index arrays) and run
// on any number of rows with a workspace per thread: the streaming case, one row at a time,
// where a torch step reads every weight of a dense W_hh.

struct CellStep {
  int mode;  // 0 LSTM, 1 GRU, 2 Elman tanh, 3 Elman relu
  i64 hidden, in, gates;
  KronPlan* ih = nullptr;  // a Kronecker sum, or else ...
  const float* w_ih;       // ... a dense (gates, in) matrix, or else the caller gives W_ih x
  const float* b_ih;       // (gates) or null
  KronPlan* hh = nullptr;
  const float* w_hh;  // (gates, hidden) where hh is null
  const float* b_hh;
  ~CellStep() {
    delete ih;
    delete hh;
  }
};

// floats of workspace a product of plan over rows needs
static i64 plan_work(const KronPlan* p, i64 rows) {
  return p ? rows * (p->in + 2 * p->big + p->out) : 0;
}

// g (rows, n) (+)= W x (+ bias) for x (rows, in; row stride ldx), on the plan or the dense w;
// work: plan_work floats
static void step_product(const KronPlan* p, const float* w, const float* bias, i64 rows, i64 in,
                         i64 n, const float* x, i64 ldx, float* g, bool add, float* work) {
  if (p) {
    float *xf = work, *b0 = xf + rows * p->in, *b1 = b0 + rows * p->big, *acc = b1 + rows * p->big;
    const float* src = x;
    if (!p->in_index.empty()) {
      for (i64 b = 0; b < rows; b++) gather_row(in, x + b * ldx, p->in_index.data(), xf + b * in);
      src = xf;
    } else if (ldx != in) {
      for (i64 b = 0; b < rows; b++) memcpy(xf + b * in, x + b * ldx, sizeof(float) * in);
      src = xf;
    }
    p->apply_fm(rows, src, b0, b1, acc);
    const int32_t* oi = p->out_index.empty() ? nullptr : p->out_index.data();
    for (i64 b = 0; b < rows; b++) {
      if (add)
        add_product(n, g + b * n, acc + b * n, oi);
      else
        set_product(n, g + b * n, acc + b * n, oi);
    }
  } else {
    dense_nt(rows, in, n, x, ldx, w, g, add);
  }
  if (bias)
    for (i64 b = 0; b < rows; b++)
      for (i64 j = 0; j < n; j++) g[b * n + j] += bias[j];
}

static KronPlan* plan_or_null(KRON_ARGS) {
  if (n_factors == 0) return nullptr;
  return new KronPlan(n_factors, terms, sizes, mats, in_index, out_index);
}

// ih_* and hh_*: a Kronecker sum (n_factors > 0) or none (0: w_ih / w_hh dense, or w_ih null
// for an input product the caller computes); the weights are read through these pointers at
// every step (the caller keeps them), the expanded factors and indices are copied
extern "C" void* kcprnn_step_new(int mode, i64 hidden, i64 in, int ih_n, int ih_terms,
                                 const i64* ih_sizes, const float* const* ih_mats,
                                 const i64* ih_in, const i64* ih_out, const float* w_ih,
                                 const float* b_ih, int hh_n, int hh_terms, const i64* hh_sizes,
                                 const float* const* hh_mats, const i64* hh_in,
                                 const i64* hh_out, const float* w_hh, const float* b_hh) {
  CellStep* s = new CellStep;
  s->mode = mode, s->hidden = hidden, s->in = in;
  s->gates = hidden * (mode == 0 ? 4 : mode == 1 ? 3 : 1);
  s->ih = plan_or_null(ih_n, ih_terms, ih_sizes, ih_mats, ih_in, ih_out);
  s->hh = plan_or_null(hh_n, hh_terms, hh_sizes, hh_mats, hh_in, hh_out);
  s->w_ih = w_ih, s->b_ih = b_ih, s->w_hh = w_hh, s->b_hh = b_hh;
  return s;
}

extern "C" void kcprnn_step_free(void* step) { delete (CellStep*)step; }

// one step on rows: x (rows, in; row stride ldx), or gx (rows, gates; row stride ldgx) = W_ih x
// + b_ih where the step has no W_ih; h, c (rows, hidden) contiguous (c: LSTM only); writes
// h_out and c_out (rows, hidden)
extern "C" void kcprnn_step(const void* step, i64 rows, const float* x, i64 ldx, const float* gx,
                            i64 ldgx, const float* h, const float* c, float* h_out,
                            float* c_out) {
  const CellStep& s = *(const CellStep*)step;
  const i64 hd = s.hidden, g = s.gates;
  thread_local std::vector<float> work;
  i64 need = rows * 2 * g + 3 * hd + std::max(plan_work(s.ih, rows), plan_work(s.hh, rows));
  if ((i64)work.size() < need) work.resize((size_t)need);
  // gi, gh (rows, gates); t0 (2 hidden), t1 (hidden): per-row scratch of the cell arithmetic
  float *gi = work.data(), *gh = gi + rows * g, *t0 = gh + rows * g, *t1 = t0 + 2 * hd;
  float* pw = t1 + hd;
  if (s.ih || s.w_ih) {
    step_product(s.ih, s.w_ih, s.b_ih, rows, s.in, g, x, ldx, gi, false, pw);
  } else {
    for (i64 b = 0; b < rows; b++) memcpy(gi + b * g, gx + b * ldgx, sizeof(float) * g);
  }
  bool gru = s.mode == 1;  // GRU: W_hh h + b_hh kept apart (r multiplies its n part)
  step_product(s.hh, s.w_hh, s.b_hh, rows, hd, g, h, hd, gru ? gh : gi, !gru, pw);
  for (i64 b = 0; b < rows; b++) {
    float *gb = gi + b * g, *hn = h_out + b * hd;
    if (s.mode == 0) {
      lstm_cell(hd, gb, c + b * hd, c_out + b * hd, t0, hn);
    } else if (gru) {
      gru_cell(hd, gb, gh + b * g, h + b * hd, t0, t1, hn);
    } else {
      rnn_act(hd, gb, s.mode == 3);
      memcpy(hn, gb, sizeof(float) * hd);
    }
  }
}
