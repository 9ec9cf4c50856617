// The per-row arithmetic of the LSTM, GRU and Elman cells (forward and backward) and the rows of
// one time step, shared by the whole recurrences and the single steps of native_rnn.cpp. The
// activations come from native_simd.h.

#pragma once

#include "native_simd.h"

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
  lanes(2 * h, [=](auto t, i64 j) { st(g + j, sigmoid_(ld(t, g + j))); });
  float* R gg = g + 2 * h;
  float* R go = g + 3 * h;
  lanes(h, [=](auto t, i64 j) { st(gg + j, tanh_(ld(t, gg + j))); });
  lanes(h, [=](auto t, i64 j) { st(go + j, sigmoid_(ld(t, go + j))); });
  lanes(h, [=](auto t, i64 k) {
    auto cv = ld(t, g + h + k) * ld(t, cp + k) + ld(t, g + k) * ld(t, gg + k);
    auto tv = tanh_(cv);
    st(c + k, cv);
    st(tc + k, tv);
    st(hn + k, ld(t, go + k) * tv);
  });
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
  lanes(2 * h, [=](auto t, i64 j) { st(rz + j, sigmoid_(ld(t, x + j) + ld(t, g + j))); });
  lanes(h, [=](auto t, i64 k) {
    auto nv = tanh_(ld(t, x + 2 * h + k) + ld(t, rz + k) * ld(t, g + 2 * h + k));
    st(n + k, nv);
    st(hn + k, nv + ld(t, rz + h + k) * (ld(t, hp + k) - nv));
  });
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
    lanes(n, [=](auto t, i64 j) { st(p + j, tanh_(ld(t, p + j))); });
}

static void rnn_back(i64 n, const float* R hs, const float* R dh, const float* R gh, float* R d,
                     int relu) {
  if (relu)
    lanes(n, [=](auto t, i64 j) {  // a select: GCC leaves the float version's branch scalar
      auto zero = splat<decltype(t)>(0.0f);
      st(d + j, ld(t, hs + j) > zero ? ld(t, dh + j) + ld(t, gh + j) : zero);
    });
  else
    for (i64 j = 0; j < n; j++) d[j] = (dh[j] + gh[j]) * (1.0f - hs[j] * hs[j]);
}

static void add_rows(i64 rows, i64 n, const float* R d, float* R sum) {
  for (i64 b = 0; b < rows; b++)
    for (i64 j = 0; j < n; j++) sum[j] += d[b * n + j];
}

// ---------------------------------------------------------------------------------------------
// The rows of one step t, shared by the whole loops below and the single steps with a dense W_hh
// at the end of the file. a: W_hh h of the state before the step (batch rows of the product's
// outputs, in natural order through oi where oi is given) or null where the product is skipped.
// The forward rows read the step's input projections from gxt, its first row, ldx apart.

// the step's gates into gates[tg], its cell states and their tanh into cs[tc], tcs[tc], its h
// into hs[t]; tg, tc are t where a backward reads them, else scratch rows (see the loops)
static void lstm_forward_rows(i64 t, i64 tg, i64 tc, i64 batch, i64 hidden, const float* gxt,
                              i64 ldx, const float* bias, const float* a, const int32_t* oi,
                              float* gates, const float* c, float* hs, float* cs, float* tcs) {
  const i64 g4 = 4 * hidden;
  for (i64 b = 0; b < batch; b++) {
    float* g = gates + (tg * batch + b) * g4;
    pre_activation(g4, g, gxt + b * ldx, bias, a ? a + b * g4 : nullptr, oi);
    i64 o = (tc * batch + b) * hidden;
    lstm_cell(hidden, g, c + b * hidden, cs + o, tcs + o, hs + (t * batch + b) * hidden);
  }
}

// dgates[t] from dh (the gradient of the step's h, grad_hs' share added here) and dc; returns
// dgates[t], summed into dbias where given
static const float* lstm_backward_rows(i64 t, i64 batch, i64 hidden, const float* acts,
                                       const float* tcs, const float* cprev, const float* grad_hs,
                                       const float* dh, float* dc, float* dgates, float* dbias) {
  const i64 g4 = 4 * hidden;
  float* d = dgates + t * batch * g4;
  for (i64 b = 0; b < batch; b++) {
    i64 o = (t * batch + b) * hidden, og = b * g4;
    lstm_cell_back(hidden, acts + t * batch * g4 + og, tcs + o, cprev + b * hidden, grad_hs + o,
                   dh + b * hidden, dc + b * hidden, d + og);
  }
  if (dbias) add_rows(batch, g4, d, dbias);
  return d;
}

// gh[ts] = a + bias (W_hh h + b_hh), then the cell from the state before the step, h, into
// hs[t]; ts is t where the backward reads gh, rz and ns, else 0 (one step's scratch rows)
static void gru_forward_rows(i64 t, i64 ts, i64 batch, i64 hidden, const float* gxt, i64 ldx,
                             const float* bias, const float* a, const int32_t* oi, const float* h,
                             float* gh, float* rz, float* ns, float* hs) {
  const i64 g3 = 3 * hidden;
  for (i64 b = 0; b < batch; b++) {
    i64 og = (ts * batch + b) * g3, o = (ts * batch + b) * hidden;
    float* g = gh + og;
    if (a)
      set_product(g3, g, a + b * g3, oi);
    else
      for (i64 j = 0; j < g3; j++) g[j] = 0.0f;
    if (bias)
      for (i64 j = 0; j < g3; j++) g[j] += bias[j];
    gru_cell(hidden, gxt + b * ldx, g, h + b * hidden, rz + (ts * batch + b) * 2 * hidden, ns + o,
             hs + (t * batch + b) * hidden);
  }
}

// dgx[t], dgh[t] from dh (replaced by its direct path, z dh); returns dgh[t], summed into dbias
static const float* gru_backward_rows(i64 t, i64 batch, i64 hidden, const float* rz,
                                      const float* ns, const float* gh, const float* hprev,
                                      const float* grad_hs, float* dh, float* dgx, float* dgh,
                                      float* dbias) {
  const i64 g3 = 3 * hidden;
  for (i64 b = 0; b < batch; b++) {
    i64 og = (t * batch + b) * g3, o = (t * batch + b) * hidden;
    gru_cell_back(hidden, rz + (t * batch + b) * 2 * hidden, ns + o, gh + og, hprev + b * hidden,
                  grad_hs + o, dh + b * hidden, dgx + og, dgh + og);
  }
  const float* d = dgh + t * batch * g3;
  if (dbias) add_rows(batch, g3, d, dbias);
  return d;
}

static void rnn_forward_rows(i64 t, i64 batch, i64 hidden, const float* gxt, i64 ldx,
                             const float* bias, const float* a, const int32_t* oi, float* hs,
                             int relu) {
  for (i64 b = 0; b < batch; b++) {
    float* p = hs + (t * batch + b) * hidden;
    pre_activation(hidden, p, gxt + b * ldx, bias, a ? a + b * hidden : nullptr, oi);
    rnn_act(hidden, p, relu);
  }
}

// dpre[t] from dh (the gradient of the step's h without grad_hs' share); returns it
static const float* rnn_backward_rows(i64 t, i64 batch, i64 hidden, const float* hs,
                                      const float* grad_hs, const float* dh, float* dpre,
                                      float* dbias, int relu) {
  const i64 bh = batch * hidden;
  float* d = dpre + t * bh;
  rnn_back(bh, hs + t * bh, dh, grad_hs + t * bh, d, relu);
  if (dbias) add_rows(batch, hidden, d, dbias);
  return d;
}
