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
  // the last two axes as a 2-D block, the axes above it by an odometer on the offset
  const int last = pk.axes - 1, above = pk.axes - 2;
  const i64 n1 = pk.size[last], s1 = pk.stride[last];
  const i64 n0 = last >= 1 ? pk.size[last - 1] : 1, s0 = last >= 1 ? pk.stride[last - 1] : 0;
  i64 idx[kMaxAxes] = {0};
  i64 outer = 1;
  for (int a = 0; a < above; ++a) outer *= pk.size[a];
  i64 off = 0, flat = 0;
  for (i64 o = 0; o < outer; ++o) {
    for (i64 r = 0; r < n0; ++r, flat += n1) {
      const i64 base = off + r * s0;
      if (Scatter) {
        for (i64 i = 0; i < n1; ++i) dst[base + i * s1] = src[flat + i];
      } else {
        for (i64 i = 0; i < n1; ++i) dst[flat + i] = src[base + i * s1];
      }
    }
    for (int a = above - 1; a >= 0; --a) {
      off += pk.stride[a];
      if (++idx[a] < pk.size[a]) break;
      off -= pk.size[a] * pk.stride[a];
      idx[a] = 0;
    }
  }
}

// The three products of a step, row-major, each with its inner loop along P; `Width` > 0 fixes
// P at compile time (the small P of a chain's last steps, where a loop of unknown length
// costs more than its arithmetic), 0 reads it from `p`.

// C[n] = A[n] B[n]: (M, K) (K, P) -> (M, P)
template <typename T, int Width>
void gemm_nn_at(i64 n, i64 m, i64 k, i64 p_, const T* __restrict__ a, const T* __restrict__ b,
                T* __restrict__ c) {
  const i64 p = Width > 0 ? Width : p_;
  for (i64 q = 0; q < n; ++q, a += m * k, b += k * p, c += m * p) {
    for (i64 i = 0; i < m; ++i) {
      T* __restrict__ row = c + i * p;
      for (i64 j = 0; j < p; ++j) row[j] = 0;
      for (i64 l = 0; l < k; ++l) {
        const T v = a[i * k + l];
        const T* __restrict__ brow = b + l * p;
#pragma omp simd
        for (i64 j = 0; j < p; ++j) row[j] += v * brow[j];
      }
    }
  }
}

// C[n] = A[n]^T G[n]: (M, K)^T (M, P) -> (K, P)
template <typename T, int Width>
void gemm_tn_at(i64 n, i64 m, i64 k, i64 p_, const T* __restrict__ a, const T* __restrict__ g,
                T* __restrict__ c) {
  const i64 p = Width > 0 ? Width : p_;
  for (i64 q = 0; q < n; ++q, a += m * k, g += m * p, c += k * p) {
    for (i64 l = 0; l < k * p; ++l) c[l] = 0;
    for (i64 i = 0; i < m; ++i) {
      const T* __restrict__ grow = g + i * p;
      for (i64 l = 0; l < k; ++l) {
        const T v = a[i * k + l];
        T* __restrict__ crow = c + l * p;
#pragma omp simd
        for (i64 j = 0; j < p; ++j) crow[j] += v * grow[j];
      }
    }
  }
}

// C[n] = G[n] B[n]^T: (M, P) (K, P)^T -> (M, K), dot products along P in vector lanes
template <typename T, int Width>
void gemm_nt_at(i64 n, i64 m, i64 k, i64 p_, const T* __restrict__ g, const T* __restrict__ b,
                T* __restrict__ c) {
  const i64 p = Width > 0 ? Width : p_;
  for (i64 q = 0; q < n; ++q, g += m * p, b += k * p, c += m * k) {
    for (i64 i = 0; i < m; ++i) {
      const T* __restrict__ grow = g + i * p;
      for (i64 l = 0; l < k; ++l) {
        const T* __restrict__ brow = b + l * p;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (i64 j = 0; j < p; ++j) s += grow[j] * brow[j];
        c[i * k + l] = s;
      }
    }
  }
}

#define KCPRNN_BY_WIDTH(NAME)                                                              \
  template <typename T>                                                                    \
  void NAME(i64 n, i64 m, i64 k, i64 p, const T* x, const T* y, T* out) {                  \
    switch (p) {                                                                           \
      case 1: return NAME##_at<T, 1>(n, m, k, p, x, y, out);                               \
      case 2: return NAME##_at<T, 2>(n, m, k, p, x, y, out);                               \
      case 4: return NAME##_at<T, 4>(n, m, k, p, x, y, out);                               \
      case 8: return NAME##_at<T, 8>(n, m, k, p, x, y, out);                               \
      case 16: return NAME##_at<T, 16>(n, m, k, p, x, y, out);                             \
      default: return NAME##_at<T, 0>(n, m, k, p, x, y, out);                              \
    }                                                                                      \
  }

KCPRNN_BY_WIDTH(gemm_nn)
KCPRNN_BY_WIDTH(gemm_tn)
KCPRNN_BY_WIDTH(gemm_nt)

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
// bias (nullable): added to every row of the output, `cols` wide
template <typename T>
void forward(int steps, const i64* plan, const T* x, const T* const* tensors, const T* bias,
             i64 cols, T* out, T* ws) {
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
  if (bias != nullptr) {
    const Step last(plan + (steps - 1) * kRecord);
    for (i64 r = 0, rows = last.n * last.m * last.p / cols; r < rows; ++r) {
      for (i64 j = 0; j < cols; ++j) out[r * cols + j] += bias[j];
    }
  }
}

// grads[s] (nullable): the tensors' gradients, written; grad_x (nullable); g0, g1: two
// buffers of the largest state; ga: of the largest A; gw: of the largest W
template <typename T>
void backward(int steps, const i64* plan, const T* grad_out, const T* x, const T* const* tensors,
              const T* ws, T* const* grads, T* grad_x, T* grad_bias, i64 cols, T* g0, T* g1, T* ga,
              T* gw) {
  const Pack out_pack(plan + steps * kRecord);
  if (grad_bias != nullptr) {  // the bias's gradient: the output's summed over rows
    const Step last(plan + (steps - 1) * kRecord);
    for (i64 j = 0; j < cols; ++j) grad_bias[j] = 0;
    for (i64 r = 0, rows = last.n * last.m * last.p / cols; r < rows; ++r) {
      for (i64 j = 0; j < cols; ++j) grad_bias[j] += grad_out[r * cols + j];
    }
  }
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

#define KCPRNN_CHAIN(T, SUFFIX)                                                                  \
  void kcprnn_chain_forward_##SUFFIX(int steps, const i64* plan, const T* x,                     \
                                     const T* const* tensors, const T* bias, i64 cols, T* out,  \
                                     T* ws) {                                                    \
    forward<T>(steps, plan, x, tensors, bias, cols, out, ws);                                    \
  }                                                                                              \
  void kcprnn_chain_backward_##SUFFIX(int steps, const i64* plan, const T* grad_out, const T* x, \
                                      const T* const* tensors, const T* ws, T* const* grads,     \
                                      T* grad_x, T* grad_bias, i64 cols, T* g0, T* g1, T* ga,    \
                                      T* gw) {                                                   \
    backward<T>(steps, plan, grad_out, x, tensors, ws, grads, grad_x, grad_bias, cols, g0, g1,  \
                ga, gw);                                                                         \
  }

KCPRNN_CHAIN(float, f32)
KCPRNN_CHAIN(double, f64)

}  // extern "C"
