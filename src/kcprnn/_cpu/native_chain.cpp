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
// A step whose state already lies as (n, K, M) reads it in place as A_s^T (a transposed step):
// the same three products with the operands' roles swapped, and no copy either way.
//
// Each step is described by a record of int64 (see kRecord): the packing of A and of W
// (number of axes, the permuted sizes, the source's strides for each), the GEMM sizes, the
// offsets of A, W and Z in one workspace that the forward fills and the backward reads, and
// whether the step is transposed. These
// products are small (a cell's matrix on one row: a few thousand multiply-adds a step), so all
// of it runs on the calling thread; the point is two calls instead of dozens of torch
// operations and autograd nodes.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

using i64 = int64_t;

namespace {

constexpr int kMaxAxes = 16;
// a packing: axes, sizes[kMaxAxes], source strides[kMaxAxes]; no axes: the identity
constexpr int kPack = 1 + 2 * kMaxAxes;
// a step: the packing of A, of W, then n M K P, the offsets of A, W and Z, and 1 where A lies
// as (n, K, M)
constexpr int kRecord = 2 * kPack + 8;

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

// The three products of a step, row-major. `Width` > 0 fixes P at compile time (a power of two
// up to 16, the small P of most steps of a chain). From 2 up to a vector register's width a
// row of P is one vector (`Row`, GCC's vector extension) held in registers over the whole
// reduction, with several independent accumulators (one chain of FMAs would wait on their
// latency at every term).
// `Width` 0 reads P from `p`: a P up to kNarrow that is no such width runs along the other,
// longer side of the product with the narrow operand transposed into a scratch buffer (a
// vector loop along P would run a few lanes at a time); a longer P runs a plain loop along P.

constexpr int kUnroll = 4;  // independent accumulators per output row
#if defined(__AVX512F__)
constexpr size_t kVectorBytes = 64;  // the widest vector register
#elif defined(__AVX__)
constexpr size_t kVectorBytes = 32;
#else
constexpr size_t kVectorBytes = 16;
#endif

// Whether a row of `Width` elements of T is one vector register (a wider one would be split
// into several, passed through memory where not inlined: slower than the plain loop).
template <typename T, int Width>
constexpr bool kRowVector = Width > 1 && Width * sizeof(T) <= kVectorBytes;
constexpr i64 kNarrow = 16;  // the widest P run along the other side
constexpr i64 kLong = 8;     // ... where that side is at least this long

template <typename T, int Width>
struct Row {
  typedef T type __attribute__((vector_size(Width * sizeof(T))));
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, const type& v) { std::memcpy(p, &v, sizeof(v)); }
};

// A buffer of at least `size` elements for this thread, kept between calls.
template <typename T>
T* scratch(i64 size) {
  thread_local std::vector<T> buffer;
  if (static_cast<i64>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// out (cols, rows) = in (rows, cols) transposed
template <typename T>
void transpose(i64 rows, i64 cols, const T* __restrict__ in, T* __restrict__ out) {
  for (i64 r = 0; r < rows; ++r) {
    for (i64 c = 0; c < cols; ++c) out[c * rows + r] = in[r * cols + c];
  }
}

// y += v x
template <typename T>
void axpy(i64 len, T v, const T* __restrict__ x, T* __restrict__ y) {
#pragma omp simd
  for (i64 i = 0; i < len; ++i) y[i] += v * x[i];
}

template <typename T>
T dot(i64 len, const T* __restrict__ x, const T* __restrict__ y) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (i64 i = 0; i < len; ++i) s += x[i] * y[i];
  return s;
}

// C[n] = A[n] B[n]: (M, K) (K, P) -> (M, P)
template <typename T, int Width>
void gemm_nn_at(i64 n, i64 m, i64 k, i64 p_, const T* __restrict__ a, const T* __restrict__ b,
                T* __restrict__ c) {
  const i64 p = Width > 0 ? Width : p_;
  const bool narrow = Width == 0 && p <= kNarrow && k >= kLong;
  T* __restrict__ bt = narrow ? scratch<T>(k * p) : nullptr;
  for (i64 q = 0; q < n; ++q, a += m * k, b += k * p, c += m * p) {
    if constexpr (kRowVector<T, Width>) {  // C's row i = sum over l of A[i, l] B's row l
      using R = Row<T, Width>;
      for (i64 i = 0; i < m; ++i) {
        const T* __restrict__ arow = a + i * k;
        if (k < kUnroll) {
          typename R::type acc = arow[0] * R::load(b);
          for (i64 l = 1; l < k; ++l) acc += arow[l] * R::load(b + l * Width);
          R::store(c + i * Width, acc);
          continue;
        }
        typename R::type acc[kUnroll] = {};
        i64 l = 0;
        for (; l + kUnroll <= k; l += kUnroll) {
          for (int h = 0; h < kUnroll; ++h) acc[h] += arow[l + h] * R::load(b + (l + h) * Width);
        }
        for (; l < k; ++l) acc[0] += arow[l] * R::load(b + l * Width);
        R::store(c + i * Width, (acc[0] + acc[1]) + (acc[2] + acc[3]));
      }
    } else if (narrow) {  // dot products along K with B's columns
      transpose(k, p, b, bt);  // (P, K)
      for (i64 i = 0; i < m; ++i) {
        for (i64 j = 0; j < p; ++j) c[i * p + j] = dot(k, a + i * k, bt + j * k);
      }
    } else {
      for (i64 i = 0; i < m; ++i) {
        T* __restrict__ row = c + i * p;
        for (i64 j = 0; j < p; ++j) row[j] = 0;
        for (i64 l = 0; l < k; ++l) axpy(p, a[i * k + l], b + l * p, row);
      }
    }
  }
}

// C[n] = A[n]^T G[n]: (M, K)^T (M, P) -> (K, P)
template <typename T, int Width>
void gemm_tn_at(i64 n, i64 m, i64 k, i64 p_, const T* __restrict__ a, const T* __restrict__ g,
                T* __restrict__ c) {
  const i64 p = Width > 0 ? Width : p_;
  const bool narrow = Width == 0 && p <= kNarrow && k >= kLong;
  T* __restrict__ ct = narrow ? scratch<T>(k * p) : nullptr;
  for (i64 q = 0; q < n; ++q, a += m * k, g += m * p, c += k * p) {
    if constexpr (kRowVector<T, Width>) {  // kUnroll rows of C at a time, the reduction along M
      using R = Row<T, Width>;
      i64 l = 0;
      for (; l + kUnroll <= k; l += kUnroll) {
        typename R::type acc[kUnroll] = {};
        for (i64 i = 0; i < m; ++i) {
          const typename R::type grow = R::load(g + i * Width);
          for (int h = 0; h < kUnroll; ++h) acc[h] += a[i * k + l + h] * grow;
        }
        for (int h = 0; h < kUnroll; ++h) R::store(c + (l + h) * Width, acc[h]);
      }
      for (; l < k; ++l) {  // the last rows, two accumulators each
        typename R::type acc[2] = {};
        i64 i = 0;
        for (; i + 2 <= m; i += 2) {
          acc[0] += a[i * k + l] * R::load(g + i * Width);
          acc[1] += a[(i + 1) * k + l] * R::load(g + (i + 1) * Width);
        }
        if (i < m) acc[0] += a[i * k + l] * R::load(g + i * Width);
        R::store(c + l * Width, acc[0] + acc[1]);
      }
    } else if (narrow) {  // C^T's row j = sum over i of G[i, j] A's row i, along K
      for (i64 e = 0; e < k * p; ++e) ct[e] = 0;
      for (i64 i = 0; i < m; ++i) {
        const T* __restrict__ arow = a + i * k;
        for (i64 j = 0; j < p; ++j) axpy(k, g[i * p + j], arow, ct + j * k);
      }
      transpose(p, k, ct, c);
    } else {
      for (i64 l = 0; l < k * p; ++l) c[l] = 0;
      for (i64 i = 0; i < m; ++i) {
        const T* __restrict__ grow = g + i * p;
        for (i64 l = 0; l < k; ++l) axpy(p, a[i * k + l], grow, c + l * p);
      }
    }
  }
}

// C[n] = G[n] B[n]^T: (M, P) (K, P)^T -> (M, K). Where P is at most kNarrow and K is long, B
// is first transposed so that the vector lanes run along K; else dot products along P.
template <typename T, int Width>
void gemm_nt_at(i64 n, i64 m, i64 k, i64 p_, const T* __restrict__ g, const T* __restrict__ b,
                T* __restrict__ c) {
  const i64 p = Width > 0 ? Width : p_;
  if (p <= kNarrow && k >= kLong) {
    T* __restrict__ bt = scratch<T>(k * p);
    for (i64 q = 0; q < n; ++q, g += m * p, b += k * p, c += m * k) {
      transpose(k, p, b, bt);  // (P, K)
      for (i64 i = 0; i < m; ++i) {
        const T* __restrict__ grow = g + i * p;
        T* __restrict__ crow = c + i * k;
        if constexpr (Width > 0) {  // P fixed: each element's P terms at once
#pragma omp simd
          for (i64 l = 0; l < k; ++l) {
            T s = 0;
            for (int j = 0; j < Width; ++j) s += grow[j] * bt[j * k + l];
            crow[l] = s;
          }
        } else {  // a pass along the row per term
#pragma omp simd
          for (i64 l = 0; l < k; ++l) crow[l] = grow[0] * bt[l];
          for (i64 j = 1; j < p; ++j) axpy(k, grow[j], bt + j * k, crow);
        }
      }
    }
    return;
  }
  for (i64 q = 0; q < n; ++q, g += m * p, b += k * p, c += m * k) {
    for (i64 i = 0; i < m; ++i) {
      const T* __restrict__ grow = g + i * p;
      for (i64 l = 0; l < k; ++l) c[i * k + l] = dot(p, grow, b + l * p);
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
  bool trans;
  explicit Step(const i64* r)
      : a(r), w(r + kPack), n(r[2 * kPack]), m(r[2 * kPack + 1]), k(r[2 * kPack + 2]),
        p(r[2 * kPack + 3]), off_a(r[2 * kPack + 4]), off_w(r[2 * kPack + 5]),
        off_z(r[2 * kPack + 6]), trans(r[2 * kPack + 7] != 0) {}
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
    const T* a = operand_a(st, s, plan, x, ws);
    const T* w = operand_w(st, tensors[s], ws);
    if (st.trans) {
      gemm_tn(st.n, st.k, st.m, st.p, a, w, next);  // (K, M)^T (K, P)
    } else {
      gemm_nn(st.n, st.m, st.k, st.p, a, w, next);
    }
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
    const T* w = operand_w(st, tensors[s], ws);
    if (grads[s] != nullptr) {
      T* dw = st.w.axes == 0 ? grads[s] : gw;
      const T* a = operand_a(st, s, plan, x, ws);
      if (st.trans) {
        gemm_nn(st.n, st.k, st.m, st.p, a, g, dw);  // (K, M) (M, P)
      } else {
        gemm_tn(st.n, st.m, st.k, st.p, a, g, dw);  // (n, K, P)
      }
      if (st.w.axes != 0) copy<T, true>(st.w, gw, grads[s]);
    }
    if (s == 0 && grad_x == nullptr) break;
    T* prev = s == 0 ? grad_x : (g == g0 ? g1 : g0);  // never the buffer g is read from
    T* da = st.a.axes == 0 ? prev : ga;
    if (st.trans) {
      gemm_nt(st.n, st.k, st.m, st.p, w, g, da);  // (n, K, M)
    } else {
      gemm_nt(st.n, st.m, st.k, st.p, g, w, da);  // (n, M, K)
    }
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
