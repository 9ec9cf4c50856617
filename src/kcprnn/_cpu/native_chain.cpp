// A format's product on a few rows as a chain of pairwise contractions, forward and backward,
// for float32 and float64 (Python side: kcprnn/_cpu/native_chain.py; the chain itself:
// kcprnn/formats/_chain.py).
//
// Step s of the chain packs the current state into A_s (n, M, K) by a permuted copy, the
// format's tensor into W_s (n, K, P) the same way, and writes the next state Z_{s+1} = A_s W_s
// (n, M, P), which is the next step's source. The last state is copied into the output in the
// output's order. The backward runs the chain back: G is the gradient of the current state
// (laid out as the state), dW_s = A_s^T G is scattered into the tensor's gradient through the
// inverse of the packing, and dA_s = G W_s^T scattered the same way becomes the previous
// state's gradient (the input's at the first step).
//
// Each step is described by a record of int64 (see kRecord): the packing of A and of W
// (number of axes, the permuted sizes, the source's strides for each), the GEMM sizes, and the
// offsets of A, W and Z in one workspace that the forward fills and the backward reads. These
// products are small (a cell's matrix on one row: a few thousand multiply-adds a step), so all
// of it runs on the calling thread; the point is two calls instead of dozens of torch
// operations and autograd nodes.

#include <cstdint>

using i64 = int64_t;

namespace {

constexpr int kMaxAxes = 16;
// a packing: axes, sizes[kMaxAxes], source strides[kMaxAxes]; no axes: the identity
constexpr int kPack = 1 + 2 * kMaxAxes;
// a step: the packing of A, of W, then n M K P, then the offsets of A, W and Z
constexpr int kRecord = 2 * kPack + 7;

struct Pack {
  int axes;
  const i64* size;
  const i64* stride;
  explicit Pack(const i64* p) : axes(static_cast<int>(p[0])), size(p + 1), stride(p + 1 + kMaxAxes) {}
};

// dst[contiguous index] = src[strided index] (gather) or dst[strided] = src[contiguous]
// (scatter) over the packing's axes, the last axis innermost. A packing is a permutation of
// its source, so a scatter writes every element once.
template <typename T, bool Scatter>
void copy(const Pack& pk, const T* src, T* dst) {
  i64 idx[kMaxAxes] = {0};
  const int last = pk.axes - 1;
  const i64 inner = pk.size[last], step = pk.stride[last];
  i64 outer = 1;
  for (int a = 0; a < last; ++a) outer *= pk.size[a];
  i64 flat = 0;
  for (i64 o = 0; o < outer; ++o) {
    i64 off = 0;
    for (int a = 0; a < last; ++a) off += idx[a] * pk.stride[a];
    if (Scatter) {
      for (i64 i = 0; i < inner; ++i) dst[off + i * step] = src[flat + i];
    } else {
      for (i64 i = 0; i < inner; ++i) dst[flat + i] = src[off + i * step];
    }
    flat += inner;
    for (int a = last - 1; a >= 0; --a) {  // odometer over the outer axes
      if (++idx[a] < pk.size[a]) break;
      idx[a] = 0;
    }
  }
}

// C[n] = A[n] B[n]: (M, K) (K, P) -> (M, P), row-major
template <typename T>
void gemm_nn(i64 n, i64 m, i64 k, i64 p, const T* a, const T* b, T* c) {
  for (i64 q = 0; q < n; ++q, a += m * k, b += k * p, c += m * p) {
    for (i64 i = 0; i < m; ++i) {
      T* row = c + i * p;
      for (i64 j = 0; j < p; ++j) row[j] = 0;
      for (i64 l = 0; l < k; ++l) {
        const T v = a[i * k + l];
        const T* brow = b + l * p;
        for (i64 j = 0; j < p; ++j) row[j] += v * brow[j];
      }
    }
  }
}

// C[n] = A[n]^T G[n]: (M, K)^T (M, P) -> (K, P)
template <typename T>
void gemm_tn(i64 n, i64 m, i64 k, i64 p, const T* a, const T* g, T* c) {
  for (i64 q = 0; q < n; ++q, a += m * k, g += m * p, c += k * p) {
    for (i64 l = 0; l < k * p; ++l) c[l] = 0;
    for (i64 i = 0; i < m; ++i) {
      const T* grow = g + i * p;
      for (i64 l = 0; l < k; ++l) {
        const T v = a[i * k + l];
        T* crow = c + l * p;
        for (i64 j = 0; j < p; ++j) crow[j] += v * grow[j];
      }
    }
  }
}

// C[n] = G[n] B[n]^T: (M, P) (K, P)^T -> (M, K)
template <typename T>
void gemm_nt(i64 n, i64 m, i64 k, i64 p, const T* g, const T* b, T* c) {
  for (i64 q = 0; q < n; ++q, g += m * p, b += k * p, c += m * k) {
    for (i64 i = 0; i < m; ++i) {
      const T* grow = g + i * p;
      for (i64 l = 0; l < k; ++l) {
        const T* brow = b + l * p;
        T s = 0;
        for (i64 j = 0; j < p; ++j) s += grow[j] * brow[j];
        c[i * k + l] = s;
      }
    }
  }
}

struct Step {
  Pack a, w;
  i64 n, m, k, p, off_a, off_w, off_z;
  explicit Step(const i64* r)
      : a(r), w(r + kPack), n(r[2 * kPack]), m(r[2 * kPack + 1]), k(r[2 * kPack + 2]),
        p(r[2 * kPack + 3]), off_a(r[2 * kPack + 4]), off_w(r[2 * kPack + 5]),
        off_z(r[2 * kPack + 6]) {}
};

// A packing with no axes is the identity: its operand is the source itself, not a copy.
template <typename T>
const T* operand_a(const Step& st, int s, const i64* plan, const T* x, const T* ws) {
  if (st.a.axes != 0) return ws + st.off_a;
  return s == 0 ? x : ws + Step(plan + (s - 1) * kRecord).off_z;
}

template <typename T>
const T* operand_w(const Step& st, const T* tensor, const T* ws) {
  return st.w.axes == 0 ? tensor : ws + st.off_w;
}

// plan: `steps` records, then the output's packing (the last state read in the output's order)
template <typename T>
void forward(int steps, const i64* plan, const T* x, const T* const* tensors, T* out, T* ws) {
  const T* z = x;
  for (int s = 0; s < steps; ++s) {
    const Step st(plan + s * kRecord);
    if (st.a.axes != 0) copy<T, false>(st.a, z, ws + st.off_a);
    if (st.w.axes != 0) copy<T, false>(st.w, tensors[s], ws + st.off_w);
    T* next = ws + st.off_z;
    gemm_nn(st.n, st.m, st.k, st.p, operand_a(st, s, plan, x, ws), operand_w(st, tensors[s], ws),
            next);
    z = next;
  }
  const Pack out_pack(plan + steps * kRecord);
  if (out_pack.axes == 0) {
    const Step last(plan + (steps - 1) * kRecord);
    for (i64 i = 0, n = last.n * last.m * last.p; i < n; ++i) out[i] = z[i];
  } else {
    copy<T, false>(out_pack, z, out);
  }
}

// grads[s] (nullable): the tensors' gradients, written; grad_x (nullable); g0, g1: two
// buffers of the largest state; ga: of the largest A; gw: of the largest W
template <typename T>
void backward(int steps, const i64* plan, const T* grad_out, const T* x, const T* const* tensors,
              const T* ws, T* const* grads, T* grad_x, T* g0, T* g1, T* ga, T* gw) {
  const Pack out_pack(plan + steps * kRecord);
  const T* g = grad_out;  // the gradient of the last state, in its layout
  if (out_pack.axes != 0) {
    copy<T, true>(out_pack, grad_out, g0);
    g = g0;
  }
  for (int s = steps - 1; s >= 0; --s) {
    const Step st(plan + s * kRecord);
    if (grads[s] != nullptr) {
      T* dw = st.w.axes == 0 ? grads[s] : gw;
      gemm_tn(st.n, st.m, st.k, st.p, operand_a(st, s, plan, x, ws), g, dw);  // (n, K, P)
      if (st.w.axes != 0) copy<T, true>(st.w, gw, grads[s]);
    }
    if (s == 0 && grad_x == nullptr) break;
    T* prev = s == 0 ? grad_x : (g == g0 ? g1 : g0);  // never the buffer g is read from
    T* da = st.a.axes == 0 ? prev : ga;
    gemm_nt(st.n, st.m, st.k, st.p, g, operand_w(st, tensors[s], ws), da);  // (n, M, K)
    if (st.a.axes != 0) copy<T, true>(st.a, ga, prev);
    g = prev;
  }
}

}  // namespace

extern "C" {

int kcprnn_chain_record() { return kRecord; }
int kcprnn_chain_max_axes() { return kMaxAxes; }

void kcprnn_chain_forward_f32(int steps, const i64* plan, const float* x,
                              const float* const* tensors, float* out, float* ws) {
  forward<float>(steps, plan, x, tensors, out, ws);
}
void kcprnn_chain_forward_f64(int steps, const i64* plan, const double* x,
                              const double* const* tensors, double* out, double* ws) {
  forward<double>(steps, plan, x, tensors, out, ws);
}
void kcprnn_chain_backward_f32(int steps, const i64* plan, const float* grad_out, const float* x,
                               const float* const* tensors, const float* ws, float* const* grads,
                               float* grad_x, float* g0, float* g1, float* ga, float* gw) {
  backward<float>(steps, plan, grad_out, x, tensors, ws, grads, grad_x, g0, g1, ga, gw);
}
void kcprnn_chain_backward_f64(int steps, const i64* plan, const double* grad_out,
                               const double* x, const double* const* tensors, const double* ws,
                               double* const* grads, double* grad_x, double* g0, double* g1,
                               double* ga, double* gw) {
  backward<double>(steps, plan, grad_out, x, tensors, ws, grads, grad_x, g0, g1, ga, gw);
}

}  // extern "C"
