// Per-element arithmetic of one Conv-LoRA expert (SPEC sections 2.4 and 3), shared verbatim by
// the CPU kernels (convlora_cpu.cpp) and the CUDA kernels (convlora_cuda.cu). CI has no GPU, so
// everything that decides a value (bicubic taps and weights, index clamping, the conv's zero
// padding, GELU) lives here and is tested on the CPU; the CUDA file only decides who computes what.
//
// Layouts (all contiguous):
//   z, y, dy, dz      (N, H, W, r) channels-last, element (n, i, j, c) at ((n*H + i)*W + j)*r + c
//   expert weight     (E, r, g, 3, 3) with g = r (full conv) or g = 1 (depthwise, groups = r)
//   expert bias       (E, r)
//   U patch           (r, 6, 6): the U values one low-res output pixel reads, rows/cols from the
//                     patch origin (patch_origin); odd s uses the top-left 3x3 only
//   tap gradient      (4, 4, r): d pre at the V samples one output reads, channels innermost
//                     (tap_grad_index; odd s: tap (0, 0) only)
//
// T is the accumulation type: float for float32/bfloat16/float16 storage, double for float64.
// The bicubic source coordinate is evaluated in T like PyTorch's upsample_bicubic2d (opmath_t /
// accscalar_t), so float32 results agree with F.interpolate to rounding.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CONVLORA_HD __host__ __device__ __forceinline__
#define CONVLORA_UNROLL _Pragma("unroll")
#else
#define CONVLORA_HD inline
#define CONVLORA_UNROLL
#endif

namespace convlora {

constexpr int kPatch = 6;        // U patch side for even s (4 V taps + 1 conv halo each side)
constexpr int kPatchArea = kPatch * kPatch;
constexpr int kTaps = 4;         // V taps per axis for even s
constexpr int kTapArea = kTaps * kTaps;

template <typename T>
CONVLORA_HD T cubic_a() { return T(-0.75); }

// PyTorch's get_cubic_upsample_coefficients, same operation order (w3 from (1 - t) + 1).
template <typename T>
CONVLORA_HD void cubic_weights(T t, T w[4]) {
  const T A = cubic_a<T>();
  const T x1 = t;
  const T x0 = x1 + T(1);
  w[0] = ((A * x0 - T(5) * A) * x0 + T(8) * A) * x0 - T(4) * A;
  w[1] = ((A + T(2)) * x1 - (A + T(3))) * x1 * x1 + T(1);
  const T x2 = T(1) - t;
  w[2] = ((A + T(2)) * x2 - (A + T(3))) * x2 * x2 + T(1);
  const T x3 = x2 + T(1);
  w[3] = ((A * x3 - T(5) * A) * x3 + T(8) * A) * x3 - T(4) * A;
}

CONVLORA_HD int clamp_index(int v, int size) { return v < 0 ? 0 : (v > size - 1 ? size - 1 : v); }

// Upsample by integer factor s (F.interpolate(scale_factor=s)): output index p reads input rows
// clamp(i0 - 1 + a), a = 0..3, with weights w[a]. PyTorch computes the scale as T(1.0 / s) (the
// double reciprocal rounded to T), then src = scale * (p + 0.5) - 0.5; a negative src is not
// clamped, only the taps are (edge replication).
template <typename T>
CONVLORA_HD int upsample_taps(int p, int s, T w[4]) {
  const T scale = static_cast<T>(1.0 / static_cast<double>(s));
  const T src = scale * (static_cast<T>(p) + T(0.5)) - T(0.5);
  const int i0 = static_cast<int>(floor(src));
  cubic_weights<T>(src - static_cast<T>(i0), w);
  return i0;
}

// Downsample from s*n to n (F.interpolate(size=n)): scale = s exactly, src = s*i + (s-1)/2.
// Odd s: t = 0, weights (0, 1, 0, 0): one V sample. Even s: t = 0.5, four samples. Returns the
// number of taps written to rows/w (rows already clamped into [0, size_v - 1]).
template <typename T>
CONVLORA_HD int downsample_taps(int i, int s, int size_v, int rows[4], T w[4]) {
  if (s % 2 == 1) {
    rows[0] = s * i + (s - 1) / 2;  // always inside [0, s*n - 1]
    w[0] = T(1);
    return 1;
  }
  const T src = static_cast<T>(s) * (static_cast<T>(i) + T(0.5)) - T(0.5);
  const int i0 = static_cast<int>(floor(src));
  cubic_weights<T>(src - static_cast<T>(i0), w);
  for (int a = 0; a < 4; ++a) rows[a] = clamp_index(i0 - 1 + a, size_v);
  return 4;
}

// First U row (or column) of the patch output i reads: the unclamped first V tap minus the conv
// halo. Clamped V taps still lie inside [origin + 1, origin + patch_side - 2] (they only move
// toward the map, never past the last unclamped tap).
CONVLORA_HD int patch_origin(int i, int s) {
  return (s % 2 == 1) ? s * i + (s - 1) / 2 - 1 : s * i + s / 2 - 3;
}
CONVLORA_HD int patch_side(int s) { return (s % 2 == 1) ? 3 : kPatch; }

template <typename T>
CONVLORA_HD T gelu(T x) {
  const T inv_sqrt2 = T(0.70710678118654752440);
  return T(0.5) * x * (T(1) + erf(x * inv_sqrt2));
}

template <typename T>
CONVLORA_HD T gelu_grad(T x) {
  const T inv_sqrt2 = T(0.70710678118654752440);
  const T inv_sqrt_2pi = T(0.39894228040143267794);
  return T(0.5) * (T(1) + erf(x * inv_sqrt2)) + x * inv_sqrt_2pi * exp(T(-0.5) * x * x);
}

// The column taps of one U column resolved into element offsets within a z row: the clamped
// columns x0 - 1 .. x0 + 2, times r (channels last), shared by every row sum of that column.
// (W * r fits an int: the kernels' checks bound W by 2^24 / E and r by shared memory, ~50.)
CONVLORA_HD void u_columns(int x0, int W, int r, int xoff[4]) {
  for (int b = 0; b < 4; ++b) xoff[b] = clamp_index(x0 - 1 + b, W) * r;
}

// V consecutive values read as one vector (V * sizeof(T) bytes, aligned to it).
template <typename T, int V>
struct alignas(sizeof(T) * V) Lanes {
  T v[V];
};

// The horizontal sums of the bicubic filter over z row y (clamped into the map) for channels
// c .. c + V - 1, at one U column's taps (u_columns offsets, weights wx): per channel the same
// operations as u_row. With kVector each tap's V channels are one vector load, so zn + c must be
// aligned to V elements and r a multiple of V (the CUDA fill checks both); without, V scalar
// loads, any alignment and any V (the fill's small ranks, r = 2 or 3: one work item for all of a
// pixel's channels instead of one per channel).
template <typename T, int V, bool kVector, typename Z>
CONVLORA_HD void u_rows(const Z* zn, int H, int W, int r, int c, int y, const int xoff[4],
                        const T wx[4], T out[V]) {
  const Z* zrow = zn + static_cast<int64_t>(clamp_index(y, H)) * W * r + c;
  CONVLORA_UNROLL
  for (int v = 0; v < V; ++v) out[v] = T(0);
  CONVLORA_UNROLL
  for (int b = 0; b < 4; ++b) {
    if constexpr (kVector) {
      const Lanes<Z, V> zv = *reinterpret_cast<const Lanes<Z, V>*>(zrow + xoff[b]);
      CONVLORA_UNROLL
      for (int v = 0; v < V; ++v) out[v] += wx[b] * static_cast<T>(zv.v[v]);
    } else {
      CONVLORA_UNROLL
      for (int v = 0; v < V; ++v) out[v] += wx[b] * static_cast<T>(zrow[xoff[b] + v]);
    }
  }
}

// u_rows for one channel.
template <typename T, typename Z>
CONVLORA_HD T u_row(const Z* zn, int H, int W, int r, int c, int y, const int xoff[4],
                    const T wx[4]) {
  T out[1];
  u_rows<T, 1, true>(zn, H, W, r, c, y, xoff, wx, out);
  return out[0];
}

// The vertical sum of the four row sums of z rows y0 - 1 .. y0 + 2 (u_row) at the row taps wy.
template <typename T>
CONVLORA_HD T u_from_rows(const T wy[4], T r0, T r1, T r2, T r3) {
  T acc = T(0);
  acc += wy[0] * r0;
  acc += wy[1] * r1;
  acc += wy[2] * r2;
  acc += wy[3] * r3;
  return acc;
}

// The bicubic sum of one U value from its taps: rows first, then columns, like PyTorch's
// separable filter (y0, x0 from upsample_taps; taps clamped into the map). Kernels that fill a
// whole patch column reuse each row sum for the U rows that share it, with the same two
// helpers: the same operations, so the same bits.
template <typename T, typename Z>
CONVLORA_HD T u_from_taps(const Z* zn, int H, int W, int r, int c, int y0, const T wy[4], int x0,
                          const T wx[4]) {
  int xoff[4];
  u_columns(x0, W, r, xoff);
  return u_from_rows<T>(wy, u_row<T>(zn, H, W, r, c, y0 - 1, xoff, wx),
                        u_row<T>(zn, H, W, r, c, y0, xoff, wx),
                        u_row<T>(zn, H, W, r, c, y0 + 1, xoff, wx),
                        u_row<T>(zn, H, W, r, c, y0 + 2, xoff, wx));
}

// The upsample taps of U row (or column) p along an axis of `size` input rows, for kernels that
// share them across a patch: p outside [0, s * size) (the conv's zero padding) gets zero weights,
// so u_from_taps gives 0 there; s = 1 gets weights (0, 1, 0, 0) exactly (t = 0), i.e. z itself.
// (Both as u_value for finite z: 0 * z is 0.)
template <typename T>
struct UTaps {
  int first;
  T w[4];
};

template <typename T>
CONVLORA_HD UTaps<T> u_taps(int p, int s, int size) {
  UTaps<T> t;
  if (p < 0 || p >= s * size) {
    t.first = 0;
    for (int a = 0; a < 4; ++a) t.w[a] = T(0);
  } else {
    t.first = upsample_taps<T>(p, s, t.w);
  }
  return t;
}

// U[c, p, q] of sample n: bicubic upsample of the (H, W) map z_n by s, zero outside the U grid
// [0, sH) x [0, sW) (that zero is the conv's padding, which lives in the U grid). zn points at
// z[n, 0, 0, 0]. s = 1 is the identity (its weights are exactly (0, 1, 0, 0)).
template <typename T, typename Z>
CONVLORA_HD T u_value(const Z* zn, int H, int W, int r, int c, int p, int q, int s) {
  if (p < 0 || q < 0 || p >= s * H || q >= s * W) return T(0);
  if (s == 1) return static_cast<T>(zn[(static_cast<int64_t>(p) * W + q) * r + c]);
  T wy[4], wx[4];
  const int y0 = upsample_taps<T>(p, s, wy);
  const int x0 = upsample_taps<T>(q, s, wx);
  return u_from_taps<T>(zn, H, W, r, c, y0, wy, x0, wx);
}

// The geometry of one low-res output pixel (i, j) for scale s: its V taps (in V coordinates,
// clamped) and its U patch origin.
template <typename T>
struct PixelTaps {
  int ny, nx;           // taps per axis: 1 (odd s) or 4 (even s)
  int ry[4], rx[4];     // V rows / cols
  T wy[4], wx[4];       // downsample weights
  int oy, ox;           // U patch origin
  int side;             // U patch side: 3 or 6
};

template <typename T>
CONVLORA_HD void pixel_taps(int i, int j, int s, int H, int W, PixelTaps<T>& t) {
  t.ny = downsample_taps<T>(i, s, s * H, t.ry, t.wy);
  t.nx = downsample_taps<T>(j, s, s * W, t.rx, t.wx);
  t.oy = patch_origin(i, s);
  t.ox = patch_origin(j, s);
  t.side = patch_side(s);
}

// Pre-activation of V channel c at the V tap (a, b): bias + 3x3 conv over the U patch.
// up: (r, 6, 6) patch; ew: (r, g, 3, 3) this expert's weight; depthwise when g == 1.
template <typename T, typename WT>
CONVLORA_HD T pre_value(const T* up, const WT* ew, const WT* eb, int r, bool depthwise, int c,
                        const PixelTaps<T>& t, int a, int b) {
  const int py = t.ry[a] - t.oy - 1;  // patch row of the conv window's top-left
  const int px = t.rx[b] - t.ox - 1;
  T acc = static_cast<T>(eb[c]);
  const int c_lo = depthwise ? c : 0;
  const int c_hi = depthwise ? c + 1 : r;
  for (int ci = c_lo; ci < c_hi; ++ci) {
    const WT* w = ew + (static_cast<int64_t>(c) * (depthwise ? 1 : r) + (ci - c_lo)) * 9;
    const T* u = up + ci * kPatchArea + py * kPatch + px;
    for (int ky = 0; ky < 3; ++ky)
      for (int kx = 0; kx < 3; ++kx)
        acc += static_cast<T>(w[ky * 3 + kx]) * u[ky * kPatch + kx];
  }
  return acc;
}

// Expert output D of channel c at one pixel from its pre-activations at the taps:
// sum_ab wy[a] wx[b] GELU(pre[a][b]); pre has layout (4, 4) for this channel.
template <typename T>
CONVLORA_HD T downsample_gelu(const T* pre_c, const PixelTaps<T>& t) {
  T acc = T(0);
  for (int a = 0; a < t.ny; ++a) {
    T row = T(0);
    for (int b = 0; b < t.nx; ++b) row += t.wx[b] * gelu(pre_c[a * kTaps + b]);
    acc += t.wy[a] * row;
  }
  return acc;
}

// Element (a, b, c) of one pixel's tap gradients (4, 4, r): channels innermost, so the 8
// channels a weight-gradient item multiplies are one 32-byte run in the CUDA kernel (c11).
CONVLORA_HD int tap_grad_index(int r, int a, int b, int c) { return (a * kTaps + b) * r + c; }

// Backward through the downsample and GELU at the tap (a, b): d pre = wy wx dD gelu'(pre).
template <typename T>
CONVLORA_HD T tap_grad(T pre, T dd, const PixelTaps<T>& t, int a, int b) {
  return t.wy[a] * t.wx[b] * dd * gelu_grad(pre);
}

// The V taps, along one axis, whose 3x3 conv window covers patch row (or column) u: [lo, hi).
// Tap a's window starts at patch row rows[a] - origin - 1, which never decreases with a (clamped
// taps keep their order), so the taps with a start in [u - 2, u] are one contiguous range.
CONVLORA_HD void taps_covering(const int rows[4], int n, int origin, int u, int& lo, int& hi) {
  lo = 0;
  while (lo < n && rows[lo] - origin - 1 < u - 2) ++lo;
  hi = lo;
  while (hi < n && rows[hi] - origin - 1 <= u) ++hi;
}

// d U[ci, uy, ux] (patch coordinates) of one pixel: the transposed conv of its tap gradients.
// dpre: (4, 4, r) tap gradients of this pixel. Only the taps whose window covers (uy, ux) are
// visited (at most 3 x 3 of the 4 x 4), in the order of a full scan that skips the others, so the
// sum is the same to the bit. Why: this is the GPU expert backward's largest stage by instruction
// count (36 r patch values per pixel, each scanning 16 taps per channel with two bound checks);
// the covering taps are 4 of the 16 on average, so the stage should need ~4x fewer instructions
// on the GPU (predicted experts_bwd 541 -> ~250-300 us at 100 windows, r = 8; not measured yet:
// NOTES.md "Versions", c4). On the CPU (branch prediction) the time did not change.
template <typename T, typename WT>
CONVLORA_HD T patch_grad(const T* dpre, const WT* ew, int r, bool depthwise, int ci, int uy, int ux,
                         const PixelTaps<T>& t) {
  int a_lo, a_hi, b_lo, b_hi;
  taps_covering(t.ry, t.ny, t.oy, uy, a_lo, a_hi);
  taps_covering(t.rx, t.nx, t.ox, ux, b_lo, b_hi);
  T acc = T(0);
  const int c_lo = depthwise ? ci : 0;
  const int c_hi = depthwise ? ci + 1 : r;
  for (int c = c_lo; c < c_hi; ++c) {
    const WT* w = ew + (static_cast<int64_t>(c) * (depthwise ? 1 : r) + (depthwise ? 0 : ci)) * 9;
    const T* d = dpre + c;
    for (int a = a_lo; a < a_hi; ++a) {
      const WT* wrow = w + (uy - (t.ry[a] - t.oy - 1)) * 3;
      for (int b = b_lo; b < b_hi; ++b)
        acc += static_cast<T>(wrow[ux - (t.rx[b] - t.ox - 1)]) * d[tap_grad_index(r, a, b, 0)];
    }
  }
  return acc;
}

// Gradient of the expert weight element (c, gi, ky, kx) and of nothing else, from one pixel:
// sum over its taps of dpre[c] * U[ci, tap + k - 1], ci = c (depthwise) or gi (full). (The CPU
// twin's form; the CUDA kernel makes the same products for 8 channels c per U read:
// weight_partials in convlora_cuda.cu.)
template <typename T>
CONVLORA_HD T weight_grad(const T* up, const T* dpre, int r, int c, int ci, int ky, int kx,
                          const PixelTaps<T>& t) {
  T acc = T(0);
  for (int a = 0; a < t.ny; ++a) {
    const int py = t.ry[a] - t.oy - 1 + ky;
    for (int b = 0; b < t.nx; ++b) {
      const int px = t.rx[b] - t.ox - 1 + kx;
      acc += dpre[tap_grad_index(r, a, b, c)] * up[ci * kPatchArea + py * kPatch + px];
    }
  }
  return acc;
}

// Largest |i - zi| between an output pixel i and an input pixel zi its U patch reads, on one axis
// (the patch spans src within oi +- 1.25, so taps within oi +- 3; clamping moves taps toward the
// edge row, which then lies within 3 of the outputs near that edge as well).
constexpr int kGatherRadius = 3;
// The input pixels one output pixel's U patch reads, per axis: its window oi - 3 .. oi + 3.
constexpr int kWindow = 2 * kGatherRadius + 1;
constexpr int kWindowArea = kWindow * kWindow;

// Layout of U-patch gradients: (pixels, 6, 6, r), channels innermost (a warp's consecutive
// channels read and write consecutive words).
CONVLORA_HD int64_t dup_index(int64_t m, int r, int uy, int ux, int c) {
  return (m * kPatchArea + uy * kPatch + ux) * r + c;
}

// Layout of the window gradients ("dzw"): (pixels, 7, 7, r), channels innermost. Element
// (q, t, c) of output pixel m = (i, j) is the gradient its U patch sends to input pixel
// (i - 3 + q, j - 3 + t), channel c (zero where that pixel is off the map).
CONVLORA_HD int64_t dzw_index(int64_t m, int r, int q, int t, int c) {
  return ((m * kWindow + q) * kWindow + t) * r + c;
}

// The weights of output row (or column) o's patch rows on input row o - 3 + q, along an axis of
// `size` pixels: w[u] = the sum of patch row u's upsample weights whose clamped tap is that row
// (several taps can clamp onto the same edge row); zero when the input row is off the map, u is
// past the patch side or the U row is padding (u_taps gives it zero weights). ut: the upsample
// taps of the 6 patch rows, u_taps(patch_origin(o, s) + u, s, size), which the expert kernels
// keep in shared memory for the fill (recomputing the taps here cost ~850 SASS instructions per
// call, sm_90, float).
template <typename T>
CONVLORA_HD void window_axis_weights(const UTaps<T> ut[kPatch], int o, int q, int s, int size,
                                     T w[kPatch]) {
  const int zq = o - kGatherRadius + q;
  const bool on_map = zq >= 0 && zq < size;
  const int side = patch_side(s);
  CONVLORA_UNROLL
  for (int u = 0; u < kPatch; ++u) {
    T acc = T(0);
    if (on_map && u < side) {
      CONVLORA_UNROLL
      for (int a = 0; a < 4; ++a)
        if (clamp_index(ut[u].first - 1 + a, size) == zq) acc += ut[u].w[a];
    }
    w[u] = acc;
  }
}

// One output pixel (i, j)'s window weights: row[q] for input row i - 3 + q, col[t] for input
// column j - 3 + t.
template <typename T>
struct WindowWeights {
  T row[kWindow][kPatch];
  T col[kWindow][kPatch];
};

template <typename T>
CONVLORA_HD void window_weights(int H, int W, int i, int j, int s, WindowWeights<T>& w) {
  UTaps<T> uty[kPatch], utx[kPatch];
  for (int u = 0; u < kPatch; ++u) {
    uty[u] = u_taps<T>(patch_origin(i, s) + u, s, H);
    utx[u] = u_taps<T>(patch_origin(j, s) + u, s, W);
  }
  for (int q = 0; q < kWindow; ++q) {
    window_axis_weights<T>(uty, i, q, s, H, w.row[q]);
    window_axis_weights<T>(utx, j, q, s, W, w.col[q]);
  }
}

// Row q of one output pixel's window gradient, one channel: out[t] = the gradient its U patch
// sends to input pixel (i - 3 + q, j - 3 + t) = sum_v col[t][v] * (sum_u row[u] * dU[u][v]), the
// transposed bicubic upsample, rows first (u, v < side: odd s has a 3 x 3 patch). du: the
// channel's dU[0][0] in the dup_index layout (element (u, v) at du[(u * kPatch + v) * r]); row:
// WindowWeights::row[q]. 78 FMAs for 7 outputs. Why a window per output and not a gather per
// input: the gather (c3/c4) read, per input pixel and channel, each of the 49 neighbouring
// outputs' 6 x 6 patch gradients it lies under (~600 global loads and as many FMAs); here the
// expert backward contracts each patch while it is in shared memory, and the dz kernel adds 49
// values (c9, session 14).
template <typename T>
CONVLORA_HD void window_row_grad(const T* du, int r, int side, const T row[kPatch],
                                 const T col[kWindow][kPatch], T out[kWindow]) {
  T rows[kPatch];
  CONVLORA_UNROLL
  for (int v = 0; v < kPatch; ++v) {
    T acc = T(0);
    CONVLORA_UNROLL
    for (int u = 0; u < kPatch; ++u)
      if (u < side && v < side) acc += row[u] * du[(u * kPatch + v) * r];
    rows[v] = acc;
  }
  CONVLORA_UNROLL
  for (int t = 0; t < kWindow; ++t) {
    T acc = T(0);
    CONVLORA_UNROLL
    for (int v = 0; v < kPatch; ++v)
      if (v < side) acc += col[t][v] * rows[v];
    out[t] = acc;
  }
}

// dZ[n, zi, zj, c] less dy: the window gradients the outputs around (zi, zj) send it, summed in
// a fixed order (deterministic, no atomics). dzw_n: sample n's (H*W, 7, 7, r) (dzw_index).
template <typename T>
CONVLORA_HD T gather_window(const T* dzw_n, int H, int W, int r, int c, int zi, int zj) {
  const int64_t step = static_cast<int64_t>(kWindowArea - 1) * r;
  T acc = T(0);
  for (int di = 0; di < kWindow; ++di) {
    const int i = zi - kGatherRadius + di;  // the output; zi is its window row 6 - di
    if (i < 0 || i >= H) continue;
    // dzw_index(i * W + j, r, 6 - di, 6 - dj, c) at j = zj - 3 + dj, as one index per row: a
    // step of one neighbour is one pixel forward and one window column back. (Written out per
    // dj, the 64-bit index products took ~30 SASS instructions per load.)
    const int64_t row = dzw_index(static_cast<int64_t>(i) * W + zj - kGatherRadius, r,
                                  kWindow - 1 - di, kWindow - 1, c);
    CONVLORA_UNROLL
    for (int dj = 0; dj < kWindow; ++dj) {
      const int j = zj - kGatherRadius + dj;
      if (j < 0 || j >= W) continue;
      acc += dzw_n[row + dj * step];
    }
  }
  return acc;
}

// ----------------------------------------------------------------------------- gate
// The noisy top-1 gate and its load-balancing loss (SPEC section 2 step 3 and the auxiliary
// loss), one sample at a time; the CPU and CUDA gate kernels only sum the per-sample terms over
// samples. E is at most kMaxExperts (the per-sample arrays live in registers / local memory).
constexpr int kMaxExperts = 32;
constexpr double kNoiseEpsilon = 0.01;
constexpr double kMoeLossWeight = 0.01;

// F.softplus (beta 1, threshold 20) and its derivative.
template <typename T>
CONVLORA_HD T softplus(T x) { return x > T(20) ? x : log1p(exp(x)); }
template <typename T>
CONVLORA_HD T softplus_grad(T x) { return x > T(20) ? T(1) : T(1) / (T(1) + exp(-x)); }

template <typename T>
CONVLORA_HD T normal_cdf(T u) { return T(0.5) * (T(1) + erf(u * T(0.70710678118654752440))); }
template <typename T>
CONVLORA_HD T normal_pdf(T u) { return exp(T(-0.5) * u * u) * T(0.39894228040143267794); }

template <typename T>
struct GateRow {
  T clean[kMaxExperts];  // g W_gate
  T raw[kMaxExperts];    // g W_noise (noisy gate only)
  T sigma[kMaxExperts];  // softplus(raw) + 0.01 (noisy gate), else 1
  T u[kMaxExperts];      // (clean - t) / sigma, t the logit the load term compares with
  bool in_top[kMaxExperts];  // logit above the second largest (t = second largest, else largest)
  int top1, top2;        // index of the largest logit (the chosen expert) and of the second
};

// One sample: g (r,), w_gate / w_noise (r, E) row-major, noise (E,) or null (eval gate), forced
// the expert to use or -1. Ties go to the lower index, as torch.argmax does.
template <typename T>
CONVLORA_HD void gate_row(const T* g, const T* wg, const T* wn, const T* noise, int64_t forced,
                          int r, int E, GateRow<T>& row) {
  T logits[kMaxExperts];
  for (int e = 0; e < E; ++e) {
    T c = T(0), w = T(0);
    for (int k = 0; k < r; ++k) {
      c += g[k] * wg[k * E + e];
      if (noise != nullptr) w += g[k] * wn[k * E + e];
    }
    row.clean[e] = c;
    row.raw[e] = w;
    row.sigma[e] = noise != nullptr ? softplus(w) + T(kNoiseEpsilon) : T(1);
    logits[e] = noise != nullptr ? c + noise[e] * row.sigma[e] : c;
  }
  int top1 = 0;
  for (int e = 1; e < E; ++e)
    if (logits[e] > logits[top1]) top1 = e;
  const T t_out = logits[top1];
  if (forced >= 0) top1 = static_cast<int>(forced);
  int top2 = -1;
  for (int e = 0; e < E; ++e)
    if (e != top1 && (top2 < 0 || logits[e] > logits[top2])) top2 = e;
  row.top1 = top1;
  row.top2 = top2;
  if (top2 < 0) {  // one expert: no load term
    row.in_top[0] = true;
    row.u[0] = T(0);
    return;
  }
  const T t_in = logits[top2];
  for (int e = 0; e < E; ++e) {
    row.in_top[e] = logits[e] > t_in;
    row.u[e] = (row.clean[e] - (row.in_top[e] ? t_in : t_out)) / row.sigma[e];
  }
}

// cv2(v) = var(v) / (mean(v)^2 + 1e-10), unbiased variance, 0 for one element; with dv non-null
// also d cv2 / d v.
template <typename T>
CONVLORA_HD T cv_squared(const T* v, int E, T* dv) {
  if (E <= 1) {
    if (dv != nullptr) dv[0] = T(0);
    return T(0);
  }
  T mean = T(0);
  for (int e = 0; e < E; ++e) mean += v[e];
  mean /= T(E);
  T var = T(0);
  for (int e = 0; e < E; ++e) var += (v[e] - mean) * (v[e] - mean);
  var /= T(E - 1);
  const T denom = mean * mean + T(1e-10);
  if (dv != nullptr)
    for (int e = 0; e < E; ++e)
      dv[e] = T(2) * (v[e] - mean) / T(E - 1) / denom - var * T(2) * mean / (T(E) * denom * denom);
  return var / denom;
}

// One sample's contribution to the load gradient: given dload (E,) = d loss / d load, the
// gradients reaching clean (dclean) and raw = g W_noise (draw), both (E,).
template <typename T>
CONVLORA_HD void gate_row_grad(const GateRow<T>& row, const T* noise, const T* dload, int E,
                               T* dclean, T* draw) {
  T dsigma[kMaxExperts];
  T dt_in = T(0), dt_out = T(0);
  for (int e = 0; e < E; ++e) {
    const T du = dload[e] * normal_pdf(row.u[e]);  // load_e += Phi(u)
    dclean[e] = du / row.sigma[e];
    dsigma[e] = -du * row.u[e] / row.sigma[e];
    if (row.in_top[e]) dt_in -= du / row.sigma[e];
    else dt_out -= du / row.sigma[e];
  }
  // t_in is the second-largest logit, t_out the largest: back to those two logits.
  T dlogits[kMaxExperts];
  for (int e = 0; e < E; ++e) dlogits[e] = T(0);
  dlogits[row.top2] += dt_in;
  dlogits[row.top1] += dt_out;
  for (int e = 0; e < E; ++e) {  // logits = clean + noise * sigma
    dclean[e] += dlogits[e];
    draw[e] = (dsigma[e] + dlogits[e] * noise[e]) * softplus_grad(row.raw[e]);
  }
}

}  // namespace convlora
