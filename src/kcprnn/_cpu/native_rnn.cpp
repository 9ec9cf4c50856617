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

#include "native_cells.h"
#include "native_kron.h"

#define KRON(rows) Kron kron(n_factors, terms, sizes, mats, in_index, out_index, rows)

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

// ---------------------------------------------------------------------------------------------
// LSTM: gates (t, b, 4h) in the order i, f, g, o

// gx: the input projections, row (t, b) at gx + (t * batch + b) * ldx; bias (4h) or null;
// gates (t, b, 4h): receives the activated gates; hs, cs, tcs (t, b, h): the hidden states, the
// cell states and tanh of the cell states; skip_first: h0 is zero. With keep = 0 (no backward to
// come) gates holds one step's rows and cs, tcs two (steps alternate between them; the last
// step's cell state is in row (steps - 1) % 2).
extern "C" void kcprnn_lstm_forward(i64 steps, i64 batch, i64 hidden, const float* gx, i64 ldx,
                                    const float* bias, float* gates, const float* h0,
                                    const float* c0, float* hs, float* cs, float* tcs,
                                    float* x_fm, int reverse, int skip_first, int keep,
                                    KRON_ARGS) {
  KRON(batch);
  const i64 bh = batch * hidden;
  const int32_t* oi = kron.out_index.empty() ? nullptr : kron.out_index.data();
  const float* h = h0;
  const float* c = c0;
  for (i64 s = 0; s < steps; s++) {
    i64 t = forward_step(s, steps, reverse);
    i64 tc = keep ? t : s % 2;
    bool product = !(s == 0 && skip_first);
    const float* fm = product_input(kron, h, x_fm, t);
    if (product) forward_product(kron, h, fm);
    const float* a = product ? kron.acc.data() : nullptr;
    lstm_forward_rows(t, keep ? t : 0, tc, batch, hidden, gx + t * batch * ldx, ldx, bias, a, oi,
                      gates, c, hs, cs, tcs);
    h = hs + t * bh;
    c = cs + tc * bh;
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
  const i64 bh = batch * hidden;
  const int32_t* oi = kron.out_index.empty() ? nullptr : kron.out_index.data();
  for (i64 s = 0; s < steps; s++) {
    i64 t = forward_step(steps - 1 - s, steps, reverse);  // backward in time
    bool first = s == steps - 1;                           // the forward's first step
    i64 tp = reverse ? t + 1 : t - 1;                      // the step before t
    const float* d = lstm_backward_rows(t, batch, hidden, acts, tcs, first ? c0 : cs + tp * bh,
                                        grad_hs, dh, dc, dgates, dbias);
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
// hidden states. With keep = 0 (no backward to come) gh, rz and ns are one step's rows, rewritten
// at every step.
extern "C" void kcprnn_gru_forward(i64 steps, i64 batch, i64 hidden, const float* gx, i64 ldx,
                                   const float* bias, const float* h0, float* gh, float* rz,
                                   float* ns, float* hs, float* x_fm, int reverse,
                                   int skip_first, int keep, KRON_ARGS) {
  KRON(batch);
  const i64 bh = batch * hidden;
  const int32_t* oi = kron.out_index.empty() ? nullptr : kron.out_index.data();
  const float* h = h0;
  for (i64 s = 0; s < steps; s++) {
    i64 t = forward_step(s, steps, reverse);
    bool product = !(s == 0 && skip_first);
    const float* fm = product_input(kron, h, x_fm, t);
    if (product) forward_product(kron, h, fm);
    const float* a = product ? kron.acc.data() : nullptr;
    gru_forward_rows(t, keep ? t : 0, batch, hidden, gx + t * batch * ldx, ldx, bias, a, oi, h, gh,
                     rz, ns, hs);
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
  const i64 bh = batch * hidden;
  const int32_t* oi = kron.out_index.empty() ? nullptr : kron.out_index.data();
  for (i64 s = 0; s < steps; s++) {
    i64 t = forward_step(steps - 1 - s, steps, reverse);
    bool first = s == steps - 1;
    i64 tp = reverse ? t + 1 : t - 1;
    const float* d = gru_backward_rows(t, batch, hidden, rz, ns, gh, first ? h0 : hs + tp * bh,
                                       grad_hs, dh, dgx, dgh, dbias);
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
    const float* a = product ? kron.acc.data() : nullptr;
    rnn_forward_rows(t, batch, hidden, gx + t * batch * ldx, ldx, bias, a, oi, hs, relu);
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
  const int32_t* oi = kron.out_index.empty() ? nullptr : kron.out_index.data();
  for (i64 s = 0; s < steps; s++) {
    i64 t = forward_step(steps - 1 - s, steps, reverse);
    bool first = s == steps - 1;
    const float* d = rnn_backward_rows(t, batch, hidden, hs, grad_hs, dh, dpre, dbias, relu);
    bool apply = !first || need_h0;
    backward_product(kron, d, d_fm, t, apply);
    if (apply)
      for (i64 b = 0; b < batch; b++)
        set_product(hidden, dh + b * hidden, kron.acc.data() + b * hidden, oi);
  }
}

// ---------------------------------------------------------------------------------------------
// One iteration s of the loops above with a dense W_hh whose products the caller computes
// between the calls (oneDNN's GEMM on a prepacked W_hh: kcprnn/_cpu/native_dense.py). Forward,
// a = W_hh h of the state before the step (batch, gates), null where it is skipped (h0 zero);
// row (t, b) of the input projections at gx + t * ldt + b * ldx (time-major rows: ldt = batch
// ldx; batch-major ones, as a batch-first input's product leaves them: ldt = ldx, ldx = steps ldt).
// Backward, a is the previous iteration's W_hh^T d (batch, hidden), null at the first (then dh
// holds h_n's gradient): the LSTM and Elman steps read it as the step's dh, the GRU adds it to dh.

static inline i64 previous_step(i64 s, i64 steps, int reverse) {  // of forward iteration s > 0
  return forward_step(s - 1, steps, reverse);
}

extern "C" void kcprnn_lstm_forward_step(i64 s, i64 steps, i64 batch, i64 hidden, const float* gx,
                                         i64 ldx, i64 ldt, const float* bias, const float* a,
                                         float* gates, const float* c0, float* hs, float* cs,
                                         float* tcs, int reverse, int keep) {
  i64 cprev = keep ? previous_step(s, steps, reverse) : (s + 1) % 2;
  const float* c = s == 0 ? c0 : cs + cprev * batch * hidden;
  i64 t = forward_step(s, steps, reverse);
  lstm_forward_rows(t, keep ? t : 0, keep ? t : s % 2, batch, hidden, gx + t * ldt, ldx, bias, a,
                    nullptr, gates, c, hs, cs, tcs);
}

extern "C" void kcprnn_lstm_backward_step(i64 s, i64 steps, i64 batch, i64 hidden,
                                          const float* acts, const float* cs, const float* tcs,
                                          const float* c0, const float* grad_hs, const float* a,
                                          float* dh, float* dc, float* dgates, float* dbias,
                                          int reverse) {
  i64 f = steps - 1 - s;  // the forward iteration
  const float* cprev = f == 0 ? c0 : cs + previous_step(f, steps, reverse) * batch * hidden;
  lstm_backward_rows(forward_step(f, steps, reverse), batch, hidden, acts, tcs, cprev, grad_hs,
                     a ? a : dh, dc, dgates, dbias);
}

extern "C" void kcprnn_gru_forward_step(i64 s, i64 steps, i64 batch, i64 hidden, const float* gx,
                                        i64 ldx, i64 ldt, const float* bias, const float* a,
                                        const float* h0, float* gh, float* rz, float* ns,
                                        float* hs, int reverse, int keep) {
  const float* h = s == 0 ? h0 : hs + previous_step(s, steps, reverse) * batch * hidden;
  i64 t = forward_step(s, steps, reverse);
  gru_forward_rows(t, keep ? t : 0, batch, hidden, gx + t * ldt, ldx, bias, a, nullptr, h, gh, rz,
                   ns, hs);
}

extern "C" void kcprnn_gru_backward_step(i64 s, i64 steps, i64 batch, i64 hidden,
                                         const float* rz, const float* ns, const float* gh,
                                         const float* hs, const float* h0, const float* grad_hs,
                                         const float* a, float* dh, float* dgx, float* dgh,
                                         float* dbias, int reverse) {
  i64 f = steps - 1 - s;
  const float* hprev = f == 0 ? h0 : hs + previous_step(f, steps, reverse) * batch * hidden;
  if (a)
    for (i64 j = 0; j < batch * hidden; j++) dh[j] += a[j];
  gru_backward_rows(forward_step(f, steps, reverse), batch, hidden, rz, ns, gh, hprev, grad_hs, dh,
                    dgx, dgh, dbias);
}

extern "C" void kcprnn_rnn_forward_step(i64 s, i64 steps, i64 batch, i64 hidden, const float* gx,
                                        i64 ldx, i64 ldt, const float* bias, const float* a,
                                        float* hs, int reverse, int relu) {
  i64 t = forward_step(s, steps, reverse);
  rnn_forward_rows(t, batch, hidden, gx + t * ldt, ldx, bias, a, nullptr, hs, relu);
}

extern "C" void kcprnn_rnn_backward_step(i64 s, i64 steps, i64 batch, i64 hidden, const float* hs,
                                         const float* grad_hs, const float* a, const float* dh,
                                         float* dpre, float* dbias, int reverse, int relu) {
  rnn_backward_rows(forward_step(steps - 1 - s, steps, reverse), batch, hidden, hs, grad_hs,
                    a ? a : dh, dpre, dbias, relu);
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
