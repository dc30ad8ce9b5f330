"""``backend="triton"``: the Conv-LoRA layer as fused Triton kernels (``docs/DESIGN.md``).

One autograd-registered op covers the whole layer (schema, fakes and autograd formula in
``_layer_op.py``, shared with the cuda backend):

forward  ``convlora_triton::conv_lora_fwd``
  1. ``_convlora_down_fwd_kernel``     z = x_down A^T (M, r) fp32 + per-(sample, token block) sums of z
  2. ``_convlora_gate_fwd_kernel``     g = mean_HW z, routing and moe_loss (``triton_gate.py``)
  3. ``_convlora_experts_fwd_kernel``  y = z + D(z), only the U/V values the downsample reads
  4. ``_convlora_up_gemm_kernel``      out = x W^T + b + scaling * y B^T (extra K segment)

backward ``convlora_triton::conv_lora_bwd`` (the training gate's gradients come first, from
``convlora_triton::gate_bwd``, one launch, in the autograd glue; y saved by the forward, r wide)
  1. ``_convlora_dy_db_kernel``        dy = scaling * dout B and dB partials = dout^T y: one read
                                       of dout for both (fixed-order sum of the partials)
  2. ``_convlora_experts_bwd_kernel``  recompute U patch / pre; dpre; dU patches; dEW, dEB partials
  3. ``_convlora_experts_dz_cols_kernel`` / ``_convlora_experts_dz_rows_kernel``:
     dZ gathered from the neighbours' dU patches (separable, no atomics); dz = dy + dZ + dg/(HW)
  4. ``_convlora_expert_grad_reduce_kernel``     per-expert fixed-order sum of the partials
                                                 (straight into dEW and dEB)
  5. dx = dout W + dz A                          (the up-GEMM kernel again); dA = dz^T x_down
                                                 (``_convlora_tsmm_kernel``, partials stored
                                                 in dA's layout, + fixed-order sum)

Everything is deterministic (no atomics), free of host syncs and CUDA-graph capturable.
Intermediates are float32. Inputs may be float32, bfloat16 or float16 (float64 goes to eager).

The ops are ``torch.library.custom_op``s on every device, opaque to ``torch.compile`` (their
fakes stand in): see ``_triton_common`` for the measured reason (not ``triton_op``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .._nvtx import nvtx_ranges
from ._layer_op import apply_gate_factor, define_layer_ops, gate_factor_backward, prepare_inputs
from ._triton_common import ENV_POISON, allocator, cdiv, kernel_launcher, next_power_of_2
from ._triton_common import INTERPRET as _INTERPRET
from .triton_gate import gate_backward, gate_forward
from .triton_gate import _gate_bwd_impl as gate_backward_impl

__all__ = ["ENV_AUTOTUNE", "ENV_POISON", "conv_lora_forward", "unavailable_reason"]

_NAMESPACE = "convlora_triton"
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
#: U-patch slots per pixel: 6x6 for even s (3x3 for odd s uses the first 9).
_PATCH = 36
#: dpre slots per pixel in the expert backward: 4x4 V taps for even s (1 for odd s).
_TAPS = 16
#: Slots per pixel of the separable U-patch pass (7 Z columns) and of the dZ gather's column
#: pass (6 U rows), padded to 8.
_TSLOTS = 8


# ----------------------------------------------------------------------------- small helpers
@triton.jit
def _cubic_weights(t):
    """PyTorch's bicubic weights (A = -0.75) for taps i0-1..i0+2, in its evaluation order."""
    x0 = t + 1.0
    w0 = ((-0.75 * x0 + 3.75) * x0 - 6.0) * x0 + 3.0
    w1 = ((1.25 * t - 2.25) * t) * t + 1.0
    x2 = 1.0 - t
    w2 = ((1.25 * x2 - 2.25) * x2) * x2 + 1.0
    x3 = 2.0 - t
    w3 = ((-0.75 * x3 + 3.75) * x3 - 6.0) * x3 + 3.0
    return w0, w1, w2, w3


@triton.jit
def _up_floor_weights(p, inv_s):
    """First-but-one tap i0 = floor(src) (unclamped, int32) and the 4 bicubic weights of
    U coordinate ``p``, for the taps i0-1..i0+2."""
    src = (p.to(tl.float32) + 0.5) * inv_s - 0.5
    f = tl.floor(src)
    w0, w1, w2, w3 = _cubic_weights(src - f)
    return f.to(tl.int32), w0, w1, w2, w3


@triton.jit
def _up_taps(p, inv_s, size):
    """Bicubic upsample taps of U coordinate ``p`` (any shape, int32): 4 clamped Z indices and
    4 weights. ``inv_s`` is float32(1/s), the scale PyTorch uses for ``scale_factor=s``."""
    i0, w0, w1, w2, w3 = _up_floor_weights(p, inv_s)
    c0 = tl.minimum(tl.maximum(i0 - 1, 0), size - 1)
    c1 = tl.minimum(tl.maximum(i0, 0), size - 1)
    c2 = tl.minimum(tl.maximum(i0 + 1, 0), size - 1)
    c3 = tl.minimum(tl.maximum(i0 + 2, 0), size - 1)
    return c0, c1, c2, c3, w0, w1, w2, w3


@triton.jit
def _down_weight(vb, k, size_up, NT: tl.constexpr):
    """Weight of V coordinate ``vb + k`` in the downsample of an output whose first tap is ``vb``.

    Even s (NT = 4): taps vb..vb+3 with weights (-0.09375, 0.59375, 0.59375, -0.09375), clamped
    into [0, size_up - 1]; clamped taps merge, so the weight of a coordinate is the sum of the
    taps landing on it (0 for coordinates outside the V grid). Odd s (NT = 1): weight 1.
    """
    if NT == 1:
        w = tl.full(vb.shape, 1.0, tl.float32)
    else:
        w = tl.zeros(vb.shape, tl.float32)
        for a in tl.static_range(4):
            tgt = tl.minimum(tl.maximum(vb + a, 0), size_up - 1)
            if a == 0 or a == 3:
                w += tl.where(tgt == vb + k, -0.09375, 0.0)
            else:
                w += tl.where(tgt == vb + k, 0.59375, 0.0)
    return w


@triton.jit
def _gelu_and_grad(x):
    """Exact (erf) GELU and its derivative."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return x * cdf, cdf + x * pdf


@triton.jit
def _z_row_interp(z_base, zr, wr, c0, c1, c2, c3, w0, w1, w2, w3, c, m, W, R):
    """wr * sum_b w_b Z[zr, c_b, c] for each pixel: [P] (zr, wr, c_b, w_b, m: [P]; channel c).
    Zero weights skip their load (s = 1 has a single non-zero tap per axis)."""
    rmask = m & (wr != 0.0)
    v = _z_weighted(z_base, zr, c0, w0, c, rmask, W, R)
    v += _z_weighted(z_base, zr, c1, w1, c, rmask, W, R)
    v += _z_weighted(z_base, zr, c2, w2, c, rmask, W, R)
    v += _z_weighted(z_base, zr, c3, w3, c, rmask, W, R)
    return wr * v


@triton.jit
def _z_weighted(z_base, zr, zc, wgt, c, m, W, R):
    """wgt * Z[zr, zc, c] for each pixel: [P] (zr, zc, wgt, m: [P]); a zero weight skips the load."""
    return wgt * tl.load(z_base + (zr * W + zc) * R + c, mask=m & (wgt != 0.0), other=0.0)


@triton.jit
def _plane_ptrs(base, pix, slot, co, R, HW):
    """Pointers to slot ``slot`` (all channels) of each pixel: [BR, P] into a sample's scratch
    planes (SLOTS, R, HW), pixels fastest, so a warp's 32 pixels read 128 contiguous bytes.

    ``HW`` is a kernel argument Triton must not specialise (do_not_specialize): when it
    knows HW divisible by 16 (64x64 maps) it vectorises 4 pixels per thread and puts the
    channels on different warps, unlike the [BR, BR, P] conv products, which keep one pixel
    per thread with all its channels: a conversion through shared memory at every conv
    offset (TTGIR of the expert kernels at 64x64, sm_90; tl.max_contiguous(pix, 1) does not
    stop it)."""
    return base + (slot * R + co[:, None]) * HW + pix[None, :]


@triton.jit
def _plane_row(base, pix, slot, c, R, HW):
    """Pointers to slot ``slot`` (a scalar or [P]), channel ``c`` of each pixel: [P]."""
    return base + (slot * R + c) * HW + pix


@triton.jit
def _load_rows(base, pix, pmask, co, R):
    """[BR, P] tile of a pixel-major (pixels, R) fp32 tensor (z, dy), channel ``co[k]`` of pixel
    ``pix[p]`` at k, p; zero past R and on masked pixels.

    One [P] load per channel, merged by selects that stay in each thread: a [BR, P] load of a
    pixel-major tensor lets Triton 3.6 (the device's) spread a pixel's channels over 8 threads,
    and the tile then crossed shared memory at every use in a loop (see _u_patch_to_scratch)."""
    tile = tl.zeros((co.shape[0], pix.shape[0]), tl.float32)
    for c in range(R):
        row = tl.load(base + pix * R + c, mask=pmask, other=0.0)
        tile = tl.where(co[:, None] == c, row[None, :], tile)
    return tile


@triton.jit
def _store_rows(base, pix, pmask, co, R, tile):
    """Store a [BR, P] tile into a pixel-major (pixels, R) tensor one channel at a time (the
    counterpart of _load_rows; the channel sums pick one element each, inside a thread)."""
    for c in range(R):
        tl.store(base + pix * R + c, tl.sum(tl.where(co[:, None] == c, tile, 0.0), axis=0),
                 mask=pmask)


@triton.jit
def _u_patch_to_scratch(z_base, usc_base, tsc_base, pix, pmask, j, ub_i, ub_j, s, inv_s, H, W,
                        HW, R, NU: tl.constexpr):
    """U patch (NU x NU, all channels) of each pixel into its scratch slots ``ku*NU + lu``.

    Computed once per pixel and read back by the conv (L1/L2 resident): each U value feeds up
    to 9 conv taps of up to 4 V taps. Zero padding of the conv lives in the U grid: U outside
    [0, sH) x [0, sW) is stored as 0. ``pmask``, ``j``: [P] pixel mask and column; ``tsc``: 8
    scratch slots per pixel for the separable pass.

    Even s (NU = 6), separably: every patch column's taps fall in the 7 Z columns j-3..j+3
    (i0(q) - j is in [-2, 1]), so each patch row first interpolates those 7 columns
    vertically (28 loads), then each U value combines 4 of them (4 loads): 6 * (28 + 24)
    loads per pixel instead of 36 * 16. Odd s (NU = 3): direct, 16 loads per U value (s = 1:
    one, the other weights are 0), which the separable pass would not beat.

    One channel at a time, in [P] vectors: a [BR, P] gather of z has no contiguous axis, and
    Triton breaks that tie by version (3.8: pixels across threads, as the conv wants; 3.6, the
    device's: channels across 8 threads, then a conversion through shared memory per load
    group). A 1-D tile has one layout in both. The per-pixel taps and weights are computed once
    per patch row / column, outside the channel loop.
    """
    # Runtime loops throughout the expert kernels, never tl.static_range: fully unrolled, the
    # first expert forward took ~14 min to compile for sm_90 (LLVM NVPTX codegen on an
    # 87k-line function) and spilled ~75 KB per thread (scripts/triton_resource_usage.py).
    for ku in range(NU):
        p = ub_i + ku  # [P] U row
        r0, r1, r2, r3, v0, v1, v2, v3 = _up_taps(p, inv_s, H)
        validr = (p >= 0) & (p < s * H)
        if NU == 6:
            for o in range(7):  # T[o] = sum_a v_a Z[r_a, clamp(j + o - 3)]
                cz = tl.minimum(tl.maximum(j + o - 3, 0), W - 1)
                for c in range(R):
                    t = _z_weighted(z_base, r0, cz, v0, c, pmask, W, R)
                    t += _z_weighted(z_base, r1, cz, v1, c, pmask, W, R)
                    t += _z_weighted(z_base, r2, cz, v2, c, pmask, W, R)
                    t += _z_weighted(z_base, r3, cz, v3, c, pmask, W, R)
                    tl.store(_plane_row(tsc_base, pix, o, c, R, HW), t, mask=pmask)
            tl.debug_barrier()  # T slots written by other threads
        for lu in range(NU):
            q = ub_j + lu  # [P] U column
            mm = pmask & validr & (q >= 0) & (q < s * W)
            if NU == 6:
                i0, w0, w1, w2, w3 = _up_floor_weights(q, inv_s)
                o0 = i0 - j + 2  # T slot of tap i0 - 1
                for c in range(R):
                    u = w0 * tl.load(_plane_row(tsc_base, pix, o0, c, R, HW), mask=mm, other=0.0)
                    u += w1 * tl.load(_plane_row(tsc_base, pix, o0 + 1, c, R, HW), mask=mm,
                                      other=0.0)
                    u += w2 * tl.load(_plane_row(tsc_base, pix, o0 + 2, c, R, HW), mask=mm,
                                      other=0.0)
                    u += w3 * tl.load(_plane_row(tsc_base, pix, o0 + 3, c, R, HW), mask=mm,
                                      other=0.0)
                    tl.store(_plane_row(usc_base, pix, ku * NU + lu, c, R, HW), u, mask=pmask)
            else:
                c0, c1, c2, c3, w0, w1, w2, w3 = _up_taps(q, inv_s, W)
                for c in range(R):
                    u = _z_row_interp(z_base, r0, v0, c0, c1, c2, c3, w0, w1, w2, w3, c, mm, W, R)
                    u += _z_row_interp(z_base, r1, v1, c0, c1, c2, c3, w0, w1, w2, w3, c, mm, W,
                                       R)
                    u += _z_row_interp(z_base, r2, v2, c0, c1, c2, c3, w0, w1, w2, w3, c, mm, W,
                                       R)
                    u += _z_row_interp(z_base, r3, v3, c0, c1, c2, c3, w0, w1, w2, w3, c, mm, W,
                                       R)
                    tl.store(_plane_row(usc_base, pix, ku * NU + lu, c, R, HW), u, mask=pmask)
        if NU == 6:
            tl.debug_barrier()  # the next patch row overwrites the T slots


@triton.jit
def _conv_weight(ew_base, d, co, R, stride_ew_o, stride_ew_i,
                 TRANSPOSED: tl.constexpr, DEPTHWISE: tl.constexpr, DOT: tl.constexpr):
    """Conv offset d = dy*3 + dx of the expert as the float32 operand of ``_conv_mac``.

    The product is out[a] = sum_b M[a, b] in[b] with M[a, b] = W[a, b, d] (the conv) or, when
    TRANSPOSED, W[b, a, d] (its transpose, for dU). Full: [BR, BR], M itself for tl.dot (DOT),
    else M^T (indexed [b, a], summed over axis 0). Depthwise: [BR], w[c] = W[c, 0, d].
    """
    cm = co < R
    if DEPTHWISE:
        w = tl.load(ew_base + co * stride_ew_o + d, mask=cm, other=0.0)
    else:
        if TRANSPOSED:
            stride_a = stride_ew_i
            stride_b = stride_ew_o
        else:
            stride_a = stride_ew_o
            stride_b = stride_ew_i
        if DOT:
            w = tl.load(ew_base + co[:, None] * stride_a + co[None, :] * stride_b + d,
                        mask=cm[:, None] & cm[None, :], other=0.0)
        else:
            w = tl.load(ew_base + co[None, :] * stride_a + co[:, None] * stride_b + d,
                        mask=cm[:, None] & cm[None, :], other=0.0)
    return w.to(tl.float32)


@triton.jit
def _conv_mac(acc, t, wd, DEPTHWISE: tl.constexpr, PREC: tl.constexpr):
    """acc + M t (full) or acc + w * t (depthwise, per channel): t, acc [BR, P]; wd from
    ``_conv_weight``.

    BLOCK_R < 16 (r <= 8) multiplies on the CUDA cores, [BR, BR, P] broadcast products summed
    over axis 0 in fp32: with one pixel per thread (P = 32 * num_warps, see _expert_block_p)
    both channel axes sit in one thread, so the sum stays in registers and no layout
    conversion happens (the TTGIR of the pixel-major v1-v5 kernels had two conversions through
    shared memory and a cross-warp reduction at every one of the 144 conv offsets of a
    program). tl.dot needs BR >= 16; padding r = 3 or 8 to 16 would mask most lanes."""
    if DEPTHWISE:
        acc = acc + wd[:, None] * t
    elif t.shape[0] >= 16:
        acc = tl.dot(wd, t, acc, input_precision=PREC)
    else:
        acc = acc + tl.sum(wd[:, :, None] * t[:, None, :], axis=0)
    return acc


@triton.jit
def _conv_pre(usc_base, ew_base, bias, pix, m, kr, kc, R, HW, stride_ew_o, stride_ew_i, co,
              NU: tl.constexpr, DEPTHWISE: tl.constexpr, PREC: tl.constexpr):
    """pre = conv3x3(U) + b at V tap (kr, kc) of each pixel's patch: [BR, P].

    One [BR, BR] x [BR, P] product per conv offset rather than one im2col product with
    K = 9*BR: the [P, 16*BR] im2col tile (and, in the backward, its dEW and dU twins) held
    255 registers and spilled 20 KB per thread (scripts/triton_resource_usage.py, sm_90).
    """
    pre = tl.zeros(m.shape, tl.float32) + bias[:, None]
    for d in range(9):
        u = tl.load(_plane_ptrs(usc_base, pix, (kr + d // 3) * NU + kc + d % 3, co, R, HW),
                    mask=m, other=0.0)
        wd = _conv_weight(ew_base, d, co, R, stride_ew_o, stride_ew_i, False, DEPTHWISE,
                          co.shape[0] >= 16)
        pre = _conv_mac(pre, u, wd, DEPTHWISE, PREC)
    return pre


@triton.jit
def _expert_tile_setup(z_base, usc_base, tsc_base, eb_base, pix, pmask, i, j, s, inv_s, H, W, HW,
                       R, NT: tl.constexpr, BLOCK_R: tl.constexpr):
    """Shared start of the expert forward and backward tiles: the first V row / column the
    downsample reads (s - NT is even), channel arange and [BR, P] mask, the U patches in the
    scratch (barrier included) and the expert's bias."""
    vb_i = s * i + (s - NT) // 2
    vb_j = s * j + (s - NT) // 2
    co = tl.arange(0, BLOCK_R)
    m = (co < R)[:, None] & pmask[None, :]
    _u_patch_to_scratch(z_base, usc_base, tsc_base, pix, pmask, j, vb_i - 1, vb_j - 1, s, inv_s,
                        H, W, HW, R, NT + 2)
    tl.debug_barrier()  # the scratch written by other threads of this program
    bias = tl.load(eb_base + co, mask=co < R, other=0.0).to(tl.float32)
    return vb_i, vb_j, co, m, bias


@triton.jit
def _v_tap(t, usc_base, ew_base, bias, pix, m, vb_i, vb_j, s, H, W, HW, R, stride_ew_o, stride_ew_i,
           co, NT: tl.constexpr, DEPTHWISE: tl.constexpr, PREC: tl.constexpr):
    """V tap t (row-major in NT x NT) of each pixel: conv pre-activation [BR, P] and the
    downsample weight [P] of that tap."""
    kr = t // NT
    kc = t % NT
    pre = _conv_pre(usc_base, ew_base, bias, pix, m, kr, kc, R, HW, stride_ew_o, stride_ew_i,
                    co, NT + 2, DEPTHWISE, PREC)
    wd = _down_weight(vb_i, kr, s * H, NT) * _down_weight(vb_j, kc, s * W, NT)
    return pre, wd


@triton.jit
def _expert_program(eidx_ptr, H, W, HW, BLOCK_P: tl.constexpr):
    """What an expert program of grid (cdiv(H*W, BLOCK_P), N) works on: its sample n (int64),
    expert e and scale s = e + 1 (read on the device), float32(1/s), and its pixels."""
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    e = tl.load(eidx_ptr + n)
    s = (e + 1).to(tl.int32)
    # PyTorch's bicubic scale: the double 1/s rounded to float. fp64 division is IEEE-exact on
    # the GPU (Triton's fp32 '/' is an approximate div.full.f32); this replaced a table built by
    # three tiny launches per use (nine per training step).
    inv_s = (1.0 / s.to(tl.float64)).to(tl.float32)
    pix = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pix < HW
    return pid, n, e, s, inv_s, HW, pix, pmask, pix // W, pix % W


# ----------------------------------------------------------------------------- 1. down
@triton.jit
def _convlora_down_fwd_kernel(
    x_ptr, a_ptr, z_ptr, gpart_ptr,
    HW, C, R,
    stride_xm, stride_xc, stride_ar, stride_ac,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """z[m, :] = x[m, :] A^T for the tokens of one sample, plus their column sums.

    x: (N*HW, C) any strides; A: (R, C) via strides; z: (N*HW, R) fp32 contiguous;
    gpart: (N, NBLK, R) fp32. Grid (NBLK = cdiv(HW, BLOCK_M), N): a block never straddles two
    samples, so g is a fixed-order sum of the partials.
    """
    pb = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    loc = pb * BLOCK_M + tl.arange(0, BLOCK_M)
    lmask = loc < HW
    rows = n * HW + loc  # int64: M * C can exceed 2^31
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < C
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xc,
                     mask=lmask[:, None] & kmask[None, :], other=0.0)
        # A in x's dtype, as autocast would round it; the products accumulate in fp32.
        at = tl.load(a_ptr + rr[None, :] * stride_ar + kk[:, None] * stride_ac,
                     mask=kmask[:, None] & rmask[None, :], other=0.0).to(xt.dtype)
        if UPCAST_DOT:  # see _upcast_dot
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PREC)
    tl.store(z_ptr + rows[:, None] * R + rr[None, :], acc, mask=lmask[:, None] & rmask[None, :])
    nblk = tl.num_programs(0)
    tl.store(gpart_ptr + (n * nblk + pb) * R + rr, tl.sum(acc, axis=0), mask=rmask)


# ----------------------------------------------------------------------------- 3. experts fwd
@triton.jit
def _expert_fwd_tile(
    z_base, usc_base, tsc_base, ew_base, eb_base, pix, pmask, i, j, s, inv_s, H, W, HW, R,
    stride_ew_o, stride_ew_i,
    DEPTHWISE: tl.constexpr, NT: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr,
):
    """D = downsample(GELU(conv(U) + b)) at the NT x NT V taps of each pixel: [BR, P]."""
    vb_i, vb_j, co, m, bias = _expert_tile_setup(z_base, usc_base, tsc_base, eb_base, pix, pmask,
                                                 i, j, s, inv_s, H, W, HW, R, NT, BLOCK_R)
    acc = tl.zeros(m.shape, tl.float32)
    for t in range(NT * NT):
        pre, wd = _v_tap(t, usc_base, ew_base, bias, pix, m, vb_i, vb_j, s, H, W, HW, R,
                         stride_ew_o, stride_ew_i, co, NT, DEPTHWISE, PREC)
        v, _ = _gelu_and_grad(pre)
        acc += wd[None, :] * v
    return acc


@triton.jit(do_not_specialize=["HW"])
def _convlora_experts_fwd_kernel(
    z_ptr, eidx_ptr, ew_ptr, eb_ptr, usc_ptr, tsc_ptr, y_ptr,
    H, W, HW, R: tl.constexpr,
    stride_ew_e, stride_ew_o: tl.constexpr, stride_ew_i: tl.constexpr, stride_eb_e,
    DEPTHWISE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr,
):
    """y = z + D(z) for a block of BLOCK_P pixels of one sample, all r channels.

    z, y: (N*H*W, R) fp32; usc: (N, 36, R, H*W), tsc: (N, 8, R, H*W) fp32 scratch planes (U
    patches, their separable pass); expert_weight (E, R, R|1, 3, 3)
    contiguous in its last 3 dims. Grid (cdiv(H*W, BLOCK_P), N). s = expert_index[n] + 1 is
    read on the device; even and odd s take different static paths (6x6 vs 3x3 U patch).

    R and the weight's channel strides are constexpr (one compile per rank): known, they make
    the conv's 64 weight loads per offset immediate offsets without masks (sm_90, bf16,
    r = 8: 427 -> 272 instructions per conv offset, 161 -> 96 registers; in the backward
    255 registers with 40 B of spills -> 143 and none).
    """
    pid, n, e, s, inv_s, HW, pix, pmask, i, j = _expert_program(
        eidx_ptr, H, W, HW, BLOCK_P)
    z_base = z_ptr + n * HW * R
    usc_base = usc_ptr + n * HW * (36 * R)
    tsc_base = tsc_ptr + n * HW * (8 * R)
    ew_base = ew_ptr + e * stride_ew_e
    eb_base = eb_ptr + e * stride_eb_e
    if s % 2 == 0:
        dv = _expert_fwd_tile(z_base, usc_base, tsc_base, ew_base, eb_base, pix, pmask, i, j, s,
                              inv_s, H, W, HW, R, stride_ew_o, stride_ew_i,
                              DEPTHWISE, 4, BLOCK_R, PREC)
    else:
        dv = _expert_fwd_tile(z_base, usc_base, tsc_base, ew_base, eb_base, pix, pmask, i, j, s,
                              inv_s, H, W, HW, R, stride_ew_o, stride_ew_i,
                              DEPTHWISE, 1, BLOCK_R, PREC)
    co = tl.arange(0, BLOCK_R)
    zc = _load_rows(z_base, pix, pmask, co, R)
    _store_rows(y_ptr + n * HW * R, pix, pmask, co, R, zc + dv)


# ----------------------------------------------------------------------------- 4. up GEMM
@triton.jit
def _convlora_up_gemm_kernel(
    a_ptr, w_ptr, bias_ptr, y_ptr, b_ptr, out_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_wk, stride_wn, stride_ym, stride_br, stride_bn,
    stride_om, stride_on,
    scaling,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, PREC_MAIN: tl.constexpr, PREC_EXTRA: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """out = a @ w + scaling * y @ b (+ bias): a (M, K), w (K, N), y (M, R) fp32, b (R, N).

    The low-rank term is an extra K segment of the same accumulator, so no (M, N) temporary.
    Forward: a = x, w = W^T, b = B^T. Backward: a = dout, w = W, y = dz, b = A.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
        at = tl.load(a_ptr + rm64[:, None] * stride_am + kk[None, :] * stride_ak,
                     mask=mmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn,
                     mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST_DOT:  # see _upcast_dot
            at = at.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(at, wt, acc, input_precision=PREC_MAIN)
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        kr = r0 + rr
        krmask = kr < R
        yt = tl.load(y_ptr + rm64[:, None] * stride_ym + kr[None, :],
                     mask=mmask[:, None] & krmask[None, :], other=0.0) * scaling
        bt = tl.load(b_ptr + kr[:, None] * stride_br + rn[None, :] * stride_bn,
                     mask=krmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        # y stays fp32 (tf32 at worst) instead of being rounded to x's dtype as eager autocast does.
        acc = tl.dot(yt, bt, acc, input_precision=PREC_EXTRA)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------- backward kernels
@triton.jit
def _convlora_dy_db_kernel(
    dout_ptr, b_ptr, y_ptr, dy_ptr, part_ptr,
    M, N, R,
    stride_dm, stride_dn, stride_bn, stride_br,
    scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """One pass over dout for both products it feeds:
    dy[m, :] = scaling * dout[m, :] B and part[pid, n, :] = scaling * sum_{m in block} dout[m, n] y[m, :].

    dout: (M, N) any strides; B: (N, R) via strides; y, dy: (M, R) fp32 contiguous;
    part: (NBLK, N, R) fp32, summed over NBLK afterwards in a fixed order (dB = the sum).
    Grid (NBLK = cdiv(M, BLOCK_M),): each program streams its rows of dout once.
    """
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * N can exceed 2^31
    mmask = rows < M
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    yt = tl.load(y_ptr + rows[:, None] * R + rr[None, :], mask=mmask[:, None] & rmask[None, :],
                 other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    part_base = part_ptr + pid.to(tl.int64) * N * R
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        nmask = nn < N
        dt = tl.load(dout_ptr + rows[:, None] * stride_dm + nn[None, :] * stride_dn,
                     mask=mmask[:, None] & nmask[None, :], other=0.0)
        # B in dout's dtype, as autocast would round it; the products accumulate in fp32.
        bt = tl.load(b_ptr + nn[:, None] * stride_bn + rr[None, :] * stride_br,
                     mask=nmask[:, None] & rmask[None, :], other=0.0).to(dt.dtype)
        if UPCAST_DOT:  # see _upcast_dot
            acc = tl.dot(dt.to(tl.float32), bt.to(tl.float32), acc, input_precision=PREC)
        else:
            acc = tl.dot(dt, bt, acc, input_precision=PREC)
        # y is fp32: dout goes to fp32 too (tf32 products for half inputs).
        pb = tl.dot(tl.trans(dt.to(tl.float32)), yt, input_precision=PREC)
        tl.store(part_base + nn[:, None] * R + rr[None, :], pb * scaling,
                 mask=nmask[:, None] & rmask[None, :])
    tl.store(dy_ptr + rows[:, None] * R + rr[None, :], acc * scaling,
             mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _convlora_tsmm_kernel(
    x_ptr, y_ptr, part_ptr,
    M, C, R, M_PER_SPLIT,
    stride_xm, stride_xc, stride_ym,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr,
):
    """part[split, k, c] = scale * sum_{m in split} y[m, k] x[m, c]: skinny y^T x partials.

    x: (M, C) any dtype; y: (M, R) fp32 contiguous; part: (SPLIT, R, C) fp32, summed over
    SPLIT afterwards in a fixed order (the sum is then dA = dz^T x, (r, C_in), as stored).
    Grid (cdiv(C, BLOCK_C), SPLIT).
    """
    pc = tl.program_id(0)
    sp = tl.program_id(1)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    acc = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
    m_start = sp * M_PER_SPLIT
    for m0 in range(m_start, m_start + M_PER_SPLIT, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mmask = rows < M
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :] * stride_xc,
                     mask=mmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        yt = tl.load(y_ptr + rows[:, None] * stride_ym + rr[None, :],
                     mask=mmask[:, None] & rmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(xt), yt, acc, input_precision=PREC)
    tl.store(part_ptr + sp.to(tl.int64) * R * C + rr[None, :] * C + c[:, None], acc * scale,
             mask=cmask[:, None] & rmask[None, :])


@triton.jit
def _expert_bwd_tile(
    z_base, dy_base, usc_base, tsc_base, dps_base, ew_base, eb_base, part_row,
    pix, pmask, i, j, s, inv_s, H, W, HW, R, KW,
    stride_ew_o, stride_ew_i,
    DEPTHWISE: tl.constexpr, NT: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr,
):
    """Backward of the expert at the NT x NT V taps of each pixel: writes this program's dEW,
    dEB partials and leaves each pixel's dU patch in its U-patch scratch slots (``usc``,
    overwritten).

    Three phases over per-pixel scratch, each slot written once (no read-modify-write):
    1. U patch; at every V tap: pre, dpre = wd * dD * GELU'(pre) into ``dps`` (16 slots);
    2. dEW[d] = sum over taps of U_{tap+d} dpre_tap^T (one [BR, BR] accumulator per offset d);
    3. dU[slot] = sum over the taps reading it of W_d^T dpre_tap (the conv's transpose).
    Sums over pixels (dEB, dEW) accumulate per pixel first and cross threads once.
    """
    NU: tl.constexpr = NT + 2
    DOT: tl.constexpr = BLOCK_R >= 16
    vb_i, vb_j, co, m, bias = _expert_tile_setup(z_base, usc_base, tsc_base, eb_base, pix, pmask,
                                                 i, j, s, inv_s, H, W, HW, R, NT, BLOCK_R)
    comask = co < R
    dyv = _load_rows(dy_base, pix, pmask, co, R)
    deb = tl.zeros(m.shape, tl.float32)
    for t in range(NT * NT):  # 1. V taps
        pre, wd = _v_tap(t, usc_base, ew_base, bias, pix, m, vb_i, vb_j, s, H, W, HW, R,
                         stride_ew_o, stride_ew_i, co, NT, DEPTHWISE, PREC)
        _, dv = _gelu_and_grad(pre)
        dpre = (wd[None, :] * dyv) * dv  # zero on masked pixels / channels (dyv = 0)
        deb += dpre
        tl.store(_plane_ptrs(dps_base, pix, t, co, R, HW), dpre, mask=m)
    tl.store(part_row + KW + co, tl.sum(deb, axis=1), mask=comask)
    tl.debug_barrier()  # dpre slots written by other threads
    for d in range(9):  # 2. dEW, one conv offset at a time
        if DEPTHWISE:
            dw2 = tl.zeros(m.shape, tl.float32)
        elif DOT:
            dw = tl.zeros((BLOCK_R, BLOCK_R), tl.float32)
        else:  # CUDA-core outer products (see _conv_mac), summed over pixels once per d
            dw3 = tl.zeros((BLOCK_R, BLOCK_R, pix.shape[0]), tl.float32)
        for t in range(NT * NT):
            u = tl.load(_plane_ptrs(usc_base, pix, (t // NT + d // 3) * NU + t % NT + d % 3,
                                    co, R, HW), mask=m, other=0.0)
            dp = tl.load(_plane_ptrs(dps_base, pix, t, co, R, HW), mask=m, other=0.0)
            if DEPTHWISE:
                dw2 += u * dp
            elif DOT:
                dw = tl.dot(u, tl.trans(dp), dw, input_precision=PREC)  # [ci, co]
            else:
                dw3 += u[:, None, :] * dp[None, :, :]
        if DEPTHWISE:
            tl.store(part_row + co * 9 + d, tl.sum(dw2, axis=1), mask=comask)
        else:
            if not DOT:
                dw = tl.sum(dw3, axis=2)  # [ci, co]
            tl.store(part_row + co[None, :] * (R * 9) + co[:, None] * 9 + d, dw,
                     mask=comask[:, None] & comask[None, :])
    tl.debug_barrier()  # phase 3 overwrites U slots other threads read in phase 2
    for slot in range(NU * NU):  # 3. dU patch
        a = slot // NU
        b = slot % NU
        du = tl.zeros(m.shape, tl.float32)
        # Only the offsets d = (a - kr, b - kc) of taps inside the NT x NT grid.
        for dy in range(tl.maximum(a - NT + 1, 0), tl.minimum(a, 2) + 1):
            for dx in range(tl.maximum(b - NT + 1, 0), tl.minimum(b, 2) + 1):
                dp = tl.load(_plane_ptrs(dps_base, pix, (a - dy) * NT + b - dx, co, R, HW),
                             mask=m, other=0.0)
                wt = _conv_weight(ew_base, dy * 3 + dx, co, R, stride_ew_o, stride_ew_i, True,
                                  DEPTHWISE, DOT)
                du = _conv_mac(du, dp, wt, DEPTHWISE, PREC)
        tl.store(_plane_ptrs(usc_base, pix, slot, co, R, HW), du, mask=m)


@triton.jit(do_not_specialize=["HW"])
def _convlora_experts_bwd_kernel(
    z_ptr, dy_ptr, eidx_ptr, ew_ptr, eb_ptr, usc_ptr, tsc_ptr, dps_ptr, part_ptr,
    H, W, HW, R: tl.constexpr, KW,
    stride_ew_e, stride_ew_o: tl.constexpr, stride_ew_i: tl.constexpr, stride_eb_e,
    DEPTHWISE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr,
):
    """Expert backward for a block of pixels of one sample (grid as the forward).

    dy: (N*H*W, R) fp32 (= dD); scratch planes: usc (N, 36, R, H*W), left holding the dU
    patches; tsc (N, 8, R, H*W) of the U patches' separable pass; dps (N, 16, R, H*W), dpre at
    each V tap;
    part: (N*NBLK, KW + R) this program's dEW (flattened like expert_weight[e]) and dEB.
    """
    nblk = tl.num_programs(0)
    pid, n, e, s, inv_s, HW, pix, pmask, i, j = _expert_program(
        eidx_ptr, H, W, HW, BLOCK_P)
    z_base = z_ptr + n * HW * R
    dy_base = dy_ptr + n * HW * R
    usc_base = usc_ptr + n * HW * (36 * R)
    tsc_base = tsc_ptr + n * HW * (8 * R)
    dps_base = dps_ptr + n * HW * (16 * R)
    ew_base = ew_ptr + e * stride_ew_e
    eb_base = eb_ptr + e * stride_eb_e
    part_row = part_ptr + (n * nblk + pid) * (KW + R)
    if s % 2 == 0:
        _expert_bwd_tile(z_base, dy_base, usc_base, tsc_base, dps_base, ew_base, eb_base,
                         part_row, pix, pmask, i, j, s, inv_s, H, W, HW, R, KW, stride_ew_o,
                         stride_ew_i, DEPTHWISE, 4, BLOCK_R, PREC)
    else:
        _expert_bwd_tile(z_base, dy_base, usc_base, tsc_base, dps_base, ew_base, eb_base,
                         part_row, pix, pmask, i, j, s, inv_s, H, W, HW, R, KW, stride_ew_o,
                         stride_ew_i, DEPTHWISE, 1, BLOCK_R, PREC)


@triton.jit
def _tap_weight_on(p, target, inv_s, size, s):
    """Total upsample weight U coordinate ``p`` gives Z coordinate ``target`` (0 if p is padding)."""
    c0, c1, c2, c3, w0, w1, w2, w3 = _up_taps(p, inv_s, size)
    w = tl.where(c0 == target, w0, 0.0) + tl.where(c1 == target, w1, 0.0)
    w += tl.where(c2 == target, w2, 0.0) + tl.where(c3 == target, w3, 0.0)
    return tl.where((p >= 0) & (p < s * size), w, 0.0)


@triton.jit
def _dz_cols_tile(dup_base, t_base, pix, pmask, wz, s, inv_s, W, R, HW,
                  NT: tl.constexpr, BLOCK_R: tl.constexpr):
    """T[i, wz, ku] = sum over outputs (i, j) and patch columns lu of the column weight that
    U column q(j, lu) gives Z column wz, times dU[(i, j), ku, lu]. Outputs reach at most 3
    columns away (taps i0-1..i0+2 with |i0 - j| <= 1 for s >= 2; s = 1 has weight only on i0).

    One [BR, P] accumulator per patch row ku (recomputing the column weights per ku): with all
    rows in one [P, 8*BR] tile this kernel held 236-255 registers (sm_80: 96 B of spills)."""
    NU: tl.constexpr = NT + 2
    co = tl.arange(0, BLOCK_R)
    cmask = co < R
    for ku in range(NU):
        acc = tl.zeros((BLOCK_R, pix.shape[0]), tl.float32)
        acc = _dz_gather_axis(acc, dup_base, pix, 1, wz, W, ku * NU, s, inv_s, pmask, co, cmask,
                              R, HW, NT)
        tl.store(_plane_ptrs(t_base, pix, ku, co, R, HW), acc,
                 mask=cmask[:, None] & pmask[None, :])


@triton.jit
def _dz_gather_axis(acc, base, pix, stride_k, c, size, slot0, s, inv_s, pmask, co, cmask, R,
                    HW, NT: tl.constexpr):
    """acc + sum over the outputs k = c-3..c+3 along one axis and the patch positions l < NU of
    the upsample weight U coordinate q(k, l) gives Z coordinate c, times the scratch slot
    ``slot0 + l`` of the pixel k - c steps of ``stride_k`` from ``pix`` (c: pix's coordinate on
    that axis): the transpose of one axis of the upsample (the column pass reads dU patches,
    the row pass the column pass's T). acc: [BR, P].

    The neighbour is addressed as ``pix + const``, not rebuilt from its row and column: Triton
    then sees the pixel axis contiguous and keeps one pixel per thread. From the coordinates
    it saw no contiguous axis, and Triton 3.6 (the device's) broke the tie by spreading a
    pixel's channels over 8 threads (sm_90 SASS at SAM windows, r = 8: 4 KB of shared memory
    and 96-110 registers per dz kernel; Triton 3.8 chose pixels)."""
    NU: tl.constexpr = NT + 2
    for d in range(7):
        k = c + 3 - d
        kvalid = pmask & (k >= 0) & (k < size)
        ub = s * k + (s - NT) // 2 - 1
        for l in range(NU):
            w = tl.where(kvalid, _tap_weight_on(ub + l, c, inv_s, size, s), 0.0)
            v = tl.load(_plane_ptrs(base, pix + (3 - d) * stride_k, slot0 + l, co, R, HW),
                        mask=cmask[:, None] & (w != 0.0)[None, :], other=0.0)
            acc += w[None, :] * v
    return acc


@triton.jit(do_not_specialize=["HW"])
def _convlora_experts_dz_cols_kernel(
    dup_ptr, eidx_ptr, t_ptr,
    H, W, HW, R: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Column pass of the dZ gather. dup: (N, 36, R, H*W); t: (N, 8, R, H*W), indexed by
    (output row i, Z column wz). Grid (cdiv(H*W, BLOCK_P), N)."""
    pid, n, e, s, inv_s, HW, pix, pmask, _, wz = _expert_program(eidx_ptr, H, W, HW, BLOCK_P)
    dup_base = dup_ptr + n * HW * (36 * R)
    t_base = t_ptr + n * HW * (8 * R)
    if s % 2 == 0:
        _dz_cols_tile(dup_base, t_base, pix, pmask, wz, s, inv_s, W, R, HW, 4, BLOCK_R)
    else:
        _dz_cols_tile(dup_base, t_base, pix, pmask, wz, s, inv_s, W, R, HW, 1, BLOCK_R)


@triton.jit(do_not_specialize=["HW"])
def _convlora_experts_dz_rows_kernel(
    t_ptr, dy_ptr, dgs_ptr, eidx_ptr, dz_ptr,
    H, W, HW, R: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Row pass of the dZ gather and the assembly dz = dy + dZ + dg / (H*W).

    t: (N, 8, R, H*W); dy, dz: (N*H*W, R) fp32; dgs: (N, R) fp32 = dg / (H*W).
    Grid (cdiv(H*W, BLOCK_P), N).
    """
    pid, n, e, s, inv_s, HW, pix, pmask, hz, wz = _expert_program(
        eidx_ptr, H, W, HW, BLOCK_P)
    t_base = t_ptr + n * HW * (8 * R)
    co = tl.arange(0, BLOCK_R)
    comask = co < R
    acc = tl.zeros((BLOCK_R, BLOCK_P), tl.float32)
    # dZ[hz, wz] = sum over output rows i and patch rows ku of the row weight U row p(i, ku)
    # gives Z row hz, times T[i, wz, ku].
    if s % 2 == 0:
        acc = _dz_gather_axis(acc, t_base, pix, W, hz, H, 0, s, inv_s, pmask, co, comask, R, HW,
                              4)
    else:
        acc = _dz_gather_axis(acc, t_base, pix, W, hz, H, 0, s, inv_s, pmask, co, comask, R, HW,
                              1)
    acc += _load_rows(dy_ptr + n * HW * R, pix, pmask, co, R)
    acc += tl.load(dgs_ptr + n * R + co, mask=comask, other=0.0)[:, None]
    _store_rows(dz_ptr + n * HW * R, pix, pmask, co, R, acc)


@triton.jit
def _convlora_expert_grad_reduce_kernel(
    part_ptr, eidx_ptr, dw_ptr, db_ptr,
    NPROG, NBLK, K, KW,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """sum over programs p whose sample chose e of part[p, k], in a fixed order: columns
    k < KW to dw[e, k], the rest to db[e, k - KW] (two outputs: no copies afterwards).

    part: (NPROG, K) fp32, program p belongs to sample p // NBLK; dw: (E, KW), db: (E, K - KW)
    fp32. Experts no sample chose get exact zeros. Grid (cdiv(K, BLOCK_K), E).
    """
    pk = tl.program_id(0)
    e = tl.program_id(1)
    k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for j0 in range(0, NPROG, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        jmask = jj < NPROG
        ej = tl.load(eidx_ptr + jj // NBLK, mask=jmask, other=-1)
        sel = jmask & (ej == e)
        v = tl.load(part_ptr + jj.to(tl.int64)[:, None] * K + k[None, :],
                    mask=sel[:, None] & kmask[None, :], other=0.0)
        acc += tl.sum(v, axis=0)
    tl.store(dw_ptr + e * KW + k, acc, mask=kmask & (k < KW))
    tl.store(db_ptr + e * (K - KW) + (k - KW), acc, mask=kmask & (k >= KW))


# ----------------------------------------------------------------------------- launchers
#: Smallest channel tile of the expert-stage kernels. 2 (v3): r <= 8 convolves on the CUDA cores
#: in tiles of r rounded up to a power of two; 16 restores v2 (tl.dot for every r, r padded).
_EXPERT_MIN_BLOCK_R = 2


def _expert_block_r(r: int) -> int:
    """Channel tile of the expert-stage kernels: r rounded up to a power of two. Below 16 the
    conv runs on the CUDA cores (see _conv_mac); from 16 on it uses tl.dot."""
    return max(_EXPERT_MIN_BLOCK_R, next_power_of_2(r))


def _expert_warps(r: int) -> int:
    return 4 if _expert_block_r(r) <= 16 else 8


def _block_r(r: int) -> int:
    return max(16, next_power_of_2(r))  # tl.dot needs every dim >= 16


def _expert_block_p(r: int, hw: int) -> int:
    """Pixels per expert program. BLOCK_R < 16: one pixel per thread (128 with 4 warps), all
    its channels in that thread: the layout that keeps the CUDA-core conv free of layout
    conversions (see _conv_mac). BLOCK_R >= 16 (tl.dot): about 4 elements of a [BLOCK_R, P]
    tile per thread (32 pixels at BLOCK_R 16 with 4 warps, 32 at 32 with 8 warps); at 32 pixels
    and BLOCK_R 16 the v2 kernels took 96-168 registers without spills on sm_90 at SAM shapes,
    64 pixels up to 255 (scripts/triton_resource_usage.py)."""
    return _block_p(r, hw, 128 * _expert_warps(r))


def _block_p(r: int, hw: int, elements: int) -> int:
    """Pixels per program of an expert-stage kernel (4 warps unless _expert_warps says 8):
    one per thread below BLOCK_R 16, else ``elements`` // BLOCK_R (the dZ gather kernels: 512
    and 1024). Interpreter: its cost is per operation, not per element, so one big block."""
    if _INTERPRET:
        return max(16, min(256, next_power_of_2(hw)))
    br = _expert_block_r(r)
    if br < 16:
        return 32 * _expert_warps(r)
    return max(16, min(128, elements // br))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot precision of fp32 operands: exact fp32 for fp32 inputs, tf32 for half inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast_dot(dtype: torch.dtype) -> bool:
    """Triton's interpreter (3.8) computes bfloat16 tl.dot wrongly: there, the operands go
    through float32 (the same products, exact in fp32, and fp32 accumulation as on the GPU)."""
    return _INTERPRET and dtype == torch.bfloat16


def _launch_down(x2d: torch.Tensor, lora_A: torch.Tensor, z: torch.Tensor, gpart: torch.Tensor,
                 n: int, hw: int) -> None:
    """z (N*HW, r) fp32 = x2d (N*HW, C) @ A^T (A: (r, C), any strides); gpart
    (N, cdiv(HW, 64), r) fp32 the per-block column sums of z."""
    r = z.shape[1]
    block_m = 64
    grid = (cdiv(hw, block_m), n)
    kernel_launcher(_convlora_down_fwd_kernel)[grid](
        x2d, lora_A, z, gpart,
        hw, x2d.shape[1], r,
        x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1),
        BLOCK_M=block_m, BLOCK_K=64, BLOCK_R=_block_r(r),
        PREC=_precision(x2d.dtype), UPCAST_DOT=_upcast_dot(x2d.dtype), num_warps=4,
    )


def _down_blocks(hw: int) -> int:
    return cdiv(hw, 64)


def _gemm_config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                         num_warps=warps, num_stages=stages)


#: Up-GEMM tiles the autotuner tries on the GPU; the first of each list is the fixed
#: configuration used with CONVLORA_AUTOTUNE=0 (and under the interpreter). BLOCK_K is the same
#: within a list, so every tile accumulates K in the same chunk order.
#: Left out because they spill on sm_90 with the bias epilogue (resource script): 128x128 at 4
#: warps (192 B/thread), 256x128 at 8 warps (80 B), fp32 128x64 at 4 warps (48 B).
_GEMM_CONFIGS = {
    "half": [_gemm_config(*c) for c in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4))],
    "fp32": [_gemm_config(*c) for c in ((64, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                                        (128, 128, 32, 8, 3))],
}
#: Read once at import: the autotuned kernels are built here, not per call.
ENV_AUTOTUNE = "CONVLORA_AUTOTUNE"
_AUTOTUNE = not _INTERPRET and os.environ.get(ENV_AUTOTUNE, "1") != "0"
if _AUTOTUNE:
    _up_gemm_tuned = {
        kind: triton.autotune(configs, key=["M", "N", "K", "R"])(_convlora_up_gemm_kernel)
        for kind, configs in _GEMM_CONFIGS.items()
    }


def _launch_up_gemm(a: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int],
                    bias: torch.Tensor | None, y: torch.Tensor, b: torch.Tensor,
                    b_strides: tuple[int, int], scaling: float, out: torch.Tensor) -> None:
    """out (M, N) = a (M, K) @ w (K, N) + scaling * y (M, r) @ b (r, N) (+ bias (N,)).
    ``w`` and ``b`` are given by their (k, n) strides so W, W^T, A, B^T need no copy.
    On the GPU the tile is autotuned per (M, N, K, r) and dtype (see _GEMM_CONFIGS)."""
    m, k = a.shape
    nn = out.shape[1]
    r = y.shape[1]
    kind = "fp32" if a.dtype == torch.float32 else "half"
    if _AUTOTUNE:
        kernel, tile = _up_gemm_tuned[kind], {}
    else:
        kernel, cfg = _convlora_up_gemm_kernel, _GEMM_CONFIGS[kind][0]
        tile = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(nn, meta["BLOCK_N"]),)

    kernel_launcher(kernel)[grid](
        a, w, out if bias is None else bias, y, b, out,
        m, nn, k, r,
        a.stride(0), a.stride(1), w_strides[0], w_strides[1], y.stride(0), b_strides[0],
        b_strides[1], out.stride(0), out.stride(1),
        scaling,
        HAS_BIAS=bias is not None, BLOCK_R=min(32, _block_r(r)), GROUP_M=8,
        PREC_MAIN=_precision(a.dtype), PREC_EXTRA=_precision(a.dtype),
        UPCAST_DOT=_upcast_dot(a.dtype), **tile,
    )


def _ew_strides(expert_weight: torch.Tensor) -> tuple[int, int, int]:
    return expert_weight.stride(0), expert_weight.stride(1), expert_weight.stride(2)


def _launch_experts_fwd(z: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor,
                        expert_bias: torch.Tensor, n: int, h: int, w: int, usc: torch.Tensor,
                        tsc: torch.Tensor, y: torch.Tensor, prec: str) -> None:
    """y (N*H*W, r) fp32 = z + D(z); usc (N, 36, r, H*W), tsc (N, 8, r, H*W) fp32 scratch."""
    r = z.shape[1]
    bp = _expert_block_p(r, h * w)
    grid = (cdiv(h * w, bp), n)
    kernel_launcher(_convlora_experts_fwd_kernel)[grid](
        z, expert_index, expert_weight, expert_bias, usc, tsc, y,
        h, w, h * w, r,
        *_ew_strides(expert_weight), expert_bias.stride(0),
        DEPTHWISE=expert_weight.shape[2] == 1 and r > 1, BLOCK_P=bp, BLOCK_R=_expert_block_r(r),
        PREC=prec, num_warps=_expert_warps(r),
    )


def _launch_experts_bwd(z: torch.Tensor, dy: torch.Tensor, expert_index: torch.Tensor,
                        expert_weight: torch.Tensor, expert_bias: torch.Tensor, n: int, h: int,
                        w: int, usc: torch.Tensor, tsc: torch.Tensor, dps: torch.Tensor,
                        part: torch.Tensor, prec: str) -> None:
    """Expert backward: usc (N, 36, r, H*W) left holding the dU patches, tsc (N, 8, r, H*W) and
    dps (N, 16, r, H*W) scratch, part (N*NBLK, KW + r) the per-program dEW / dEB partials
    (NBLK = cdiv(H*W, _expert_block_p(r, H*W)))."""
    r = z.shape[1]
    bp = _expert_block_p(r, h * w)
    grid = (cdiv(h * w, bp), n)
    kernel_launcher(_convlora_experts_bwd_kernel)[grid](
        z, dy, expert_index, expert_weight, expert_bias, usc, tsc, dps, part,
        h, w, h * w, r, part.shape[1] - r,
        *_ew_strides(expert_weight), expert_bias.stride(0),
        DEPTHWISE=expert_weight.shape[2] == 1 and r > 1, BLOCK_P=bp, BLOCK_R=_expert_block_r(r),
        PREC=prec, num_warps=_expert_warps(r),
    )


def _launch_dz(dup: torch.Tensor, dy: torch.Tensor, dgs: torch.Tensor, expert_index: torch.Tensor,
               n: int, h: int, w: int, tbuf: torch.Tensor, dz: torch.Tensor) -> None:
    """dz (N*H*W, r) fp32 = dy + gather of the dU patches (dup: (N, 36, r, H*W)) + dgs[n]
    (dg / (H*W)); tbuf (N, 8, r, H*W) fp32 scratch of the column pass."""
    r = dy.shape[1]
    br = _expert_block_r(r)
    bp = _block_p(r, h * w, 512)
    grid = (cdiv(h * w, bp), n)
    kernel_launcher(_convlora_experts_dz_cols_kernel)[grid](
        dup, expert_index, tbuf, h, w, h * w, r, BLOCK_P=bp, BLOCK_R=br, num_warps=4,
    )
    bp = _block_p(r, h * w, 1024)
    grid = (cdiv(h * w, bp), n)
    kernel_launcher(_convlora_experts_dz_rows_kernel)[grid](
        tbuf, dy, dgs, expert_index, dz, h, w, h * w, r, BLOCK_P=bp, BLOCK_R=br, num_warps=4,
    )


def _launch_expert_reduce(part: torch.Tensor, expert_index: torch.Tensor, nblk: int,
                          dw: torch.Tensor, db: torch.Tensor) -> None:
    """[dw | db] (E, KW + r) fp32 = per-expert fixed-order sum of part (NPROG, KW + r)."""
    nprog, k = part.shape
    block_k = 256
    grid = (cdiv(k, block_k), dw.shape[0])
    kernel_launcher(_convlora_expert_grad_reduce_kernel)[grid](
        part, expert_index, dw, db, nprog, nblk, k, dw.shape[1], BLOCK_J=32, BLOCK_K=block_k,
        num_warps=4,
    )


def _dy_db_block_m(r: int) -> int:
    """Rows per program of the dy/dB pass. The dB partials take 4 * M * C_out * r / BLOCK_M
    bytes, written then read by the sum: with BLOCK_M = 4 * BLOCK_R that traffic equals one
    read of 16-bit dout at r = 32, half of one at r = 8 and a fifth at r = 3 (the alternative,
    a separate dB pass, reads dout again). Larger blocks would leave SMs idle at SAM shapes."""
    return min(256, 4 * _block_r(r))


def _dy_db(dout2d: torch.Tensor, lora_B: torch.Tensor, y: torch.Tensor, scaling: float,
           alloc: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """dy = scaling * dout B (M, r) fp32 and dB = scaling * dout^T y (C_out, r) fp32 from one
    read of dout (M, C_out); deterministic."""
    m, c_out = dout2d.shape
    r = y.shape[1]
    block_m = _dy_db_block_m(r)
    nblk = cdiv(m, block_m)
    dy = alloc((m, r), torch.float32)
    part = alloc((nblk, c_out, r), torch.float32)
    kernel_launcher(_convlora_dy_db_kernel)[(nblk,)](
        dout2d, lora_B, y, dy, part,
        m, c_out, r,
        dout2d.stride(0), dout2d.stride(1), lora_B.stride(0), lora_B.stride(1),
        scaling,
        # fp32 tiles at BLOCK_N 64 spill on sm_80 (2 KB/thread at r = 32; resource script).
        BLOCK_M=block_m, BLOCK_N=32 if dout2d.dtype == torch.float32 else 64,
        BLOCK_R=_block_r(r), PREC=_precision(dout2d.dtype),
        UPCAST_DOT=_upcast_dot(dout2d.dtype), num_warps=4 if block_m <= 64 else 8,
    )
    return dy, part.sum(0)


def _launch_tsmm(x2d: torch.Tensor, y: torch.Tensor, scale: float, part: torch.Tensor) -> None:
    """part (SPLIT, r, C) fp32: scale * y^T x2d over SPLIT chunks of rows (see _tsmm_split)."""
    m, c = x2d.shape
    r = y.shape[1]
    split = part.shape[0]
    block_m, block_c = 64, 64
    m_per = cdiv(cdiv(m, split), block_m) * block_m
    grid = (cdiv(c, block_c), split)
    kernel_launcher(_convlora_tsmm_kernel)[grid](
        x2d, y, part, m, c, r, m_per, x2d.stride(0), x2d.stride(1), y.stride(0), scale,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=_block_r(r), PREC=_precision(x2d.dtype),
        num_warps=4,
    )


def _tsmm_split(m: int, c: int) -> int:
    """Row chunks of the skinny x^T y: about 2 programs per SM of an H100 in total."""
    return max(1, min(cdiv(m, 256), 264 // max(1, cdiv(c, 64))))


def _tsmm(x2d: torch.Tensor, y: torch.Tensor, scale: float, alloc: Callable) -> torch.Tensor:
    """scale * y^T x2d: (r, C) fp32 (dA's layout: no transpose copy), deterministic."""
    part = alloc((_tsmm_split(*x2d.shape), y.shape[1], x2d.shape[1]), torch.float32)
    _launch_tsmm(x2d, y, scale, part)
    return part.sum(0)


# ----------------------------------------------------------------------------- ops
def _fwd_impl(
    x: torch.Tensor, x_down: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_A: torch.Tensor, lora_B: torch.Tensor, expert_weight: torch.Tensor,
    expert_bias: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor, scaling: float,
    expert_index: torch.Tensor | None, noise: torch.Tensor | None, multiply_by_gate: bool,
) -> tuple[torch.Tensor, ...]:
    n, h, w, c_in = x.shape
    hw, m = h * w, n * h * w
    r = lora_A.shape[0]
    c_out = weight.shape[0]
    dev = x.device
    xd = x if x_down is None else x_down
    x2d = x.reshape(m, c_in)
    xd2d = xd.reshape(m, c_in)
    ew = expert_weight.contiguous()
    alloc, rng = allocator(dev), nvtx_ranges()
    with rng("convlora.triton.down_proj"):
        z = alloc((m, r), torch.float32)
        gpart = alloc((n, _down_blocks(hw), r), torch.float32)
        _launch_down(xd2d, lora_A, z, gpart, n, hw)
    with rng("convlora.triton.gate"):
        g, index, moe_loss = gate_forward(gpart, hw, w_gate, w_noise, noise, expert_index)
    with rng("convlora.triton.experts"):
        usc = alloc((n, _PATCH, r, hw), torch.float32)
        tsc = alloc((n, _TSLOTS, r, hw), torch.float32)
        y = alloc((m, r), torch.float32)
        _launch_experts_fwd(z, index, ew, expert_bias, n, h, w, usc, tsc, y, _precision(x.dtype))
        del usc, tsc
        gate_outputs = ()
        if multiply_by_gate:
            y, gate_p, d = apply_gate_factor(z, y, g, w_gate, w_noise, noise, index)
            gate_outputs = (gate_p, d)
    with rng("convlora.triton.up_proj"):
        out = alloc((m, c_out), x.dtype)
        _launch_up_gemm(x2d, weight, (weight.stride(1), weight.stride(0)), bias, y, lora_B,
                        (lora_B.stride(1), lora_B.stride(0)), scaling, out)
    return (out.view(n, h, w, c_out), index, moe_loss, z, g, y) + gate_outputs


def _bwd_impl(
    dout: torch.Tensor, x: torch.Tensor, x_down: torch.Tensor | None, weight: torch.Tensor,
    lora_A: torch.Tensor, lora_B: torch.Tensor, expert_weight: torch.Tensor,
    expert_bias: torch.Tensor, z: torch.Tensor, y: torch.Tensor, dgs: torch.Tensor,
    expert_index: torch.Tensor, scaling: float, need_dx: bool, gate: tuple | None,
) -> tuple[torch.Tensor, ...]:
    n, h, w, c_in = x.shape
    hw, m = h * w, n * h * w
    r = lora_A.shape[0]
    c_out = weight.shape[0]
    num_experts = expert_weight.shape[0]
    dev = x.device
    prec = _precision(x.dtype)
    dout2d = dout.reshape(m, c_out)
    xd2d = (x if x_down is None else x_down).reshape(m, c_in)
    ew = expert_weight.contiguous()
    alloc, rng = allocator(dev), nvtx_ranges()
    with rng("convlora.triton.bwd.dy_dB"):
        dy, d_b = _dy_db(dout2d, lora_B, y, scaling, alloc)
        d_b = d_b.to(lora_B.dtype)
    dd, gate_grads = dy, ()  # dd: the expert output's gradient
    if gate:
        with rng("convlora.triton.bwd.gate_factor"):
            dd, dgs, *gate_grads = gate_factor_backward(dy, dgs, *gate, expert_index)
    with rng("convlora.triton.bwd.experts"):
        nblk = cdiv(hw, _expert_block_p(r, hw))
        kw = ew[0].numel()
        dup = alloc((n, _PATCH, r, hw), torch.float32)  # U patches, then dU patches
        dps = alloc((n, _TAPS, r, hw), torch.float32)
        part = alloc((n * nblk, kw + r), torch.float32)
        # tbuf: the U patches' separable pass here, then the dZ gather's column pass.
        tbuf = alloc((n, _TSLOTS, r, hw), torch.float32)
        _launch_experts_bwd(z, dd, expert_index, ew, expert_bias, n, h, w, dup, tbuf, dps, part,
                            prec)
        del dps
        dz = alloc((m, r), torch.float32)
        _launch_dz(dup, dy, dgs, expert_index, n, h, w, tbuf, dz)  # residual: dy itself
        del dup, tbuf
        d_ew = alloc((num_experts, kw), torch.float32)
        d_eb = alloc((num_experts, r), torch.float32)
        _launch_expert_reduce(part, expert_index, nblk, d_ew, d_eb)
        d_ew = d_ew.view(expert_weight.shape).to(expert_weight.dtype)
        d_eb = d_eb.to(expert_bias.dtype)
    with rng("convlora.triton.bwd.dx"):
        a_strides = (lora_A.stride(0), lora_A.stride(1))
        w_strides = (weight.stride(0), weight.stride(1))
        if not need_dx:
            dx = x.new_empty((0,))
        elif x_down is None:
            dx = alloc((m, c_in), x.dtype)
            _launch_up_gemm(dout2d, weight, w_strides, None, dz, lora_A, a_strides, 1.0, dx)
            dx = dx.view(x.shape)
        else:
            dx = alloc((m, c_in), x.dtype)
            _launch_up_gemm(dout2d, weight, w_strides, None, dz[:, :0], lora_A, a_strides, 1.0, dx)
            dx = dx.view(x.shape)
        if x_down is None:
            dx_down = x.new_empty((0,))
        else:
            dx_down = alloc((m, c_in), x_down.dtype)
            # main K segment empty: dx_down = dz A only
            _launch_up_gemm(dout2d[:, :0], weight, w_strides, None, dz, lora_A, a_strides, 1.0,
                            dx_down)
            dx_down = dx_down.view(x_down.shape)
    with rng("convlora.triton.bwd.dA"):
        d_a = _tsmm(xd2d, dz, 1.0, alloc).to(lora_A.dtype)
    return (dx, dx_down, d_a, d_b, d_ew, d_eb, *gate_grads)


_LAYER = define_layer_ops(
    _NAMESPACE, _fwd_impl, _bwd_impl, gate_backward,
    gate_backward_impl=gate_backward_impl,
)
conv_lora_fwd, conv_lora_bwd, conv_lora_gated_fwd, conv_lora_gated_bwd = _LAYER[:4]


# ----------------------------------------------------------------------------- backend API
def conv_lora_forward(
    x: torch.Tensor,
    x_down: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    scaling: float,
    expert_index: torch.Tensor | None,
    noise: torch.Tensor | None,
    multiply_by_gate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's forward (signature of :func:`convlora_kernels.ops.eager.conv_lora_forward`).

    Args:
        x: (N, H, W, C_in) float32/bfloat16/float16; x_down: x itself, or x after LoRA dropout.
        weight: (C_out, C_in); bias: (C_out,) or None (same dtype as x, or autocast).
        lora_A: (r, C_in); lora_B: (C_out, r); expert_weight: (E, r, r|1, 3, 3);
        expert_bias: (E, r); w_gate, w_noise: (r, E); any floating dtype (float32 inside).
        scaling: lora_alpha / r.
        expert_index: (N,) long forced routing, or None to route with the gate.
        noise: (N, E) standard normal draws for the training-mode gate, or None.
        multiply_by_gate: scale each sample's expert output by the gate's probability.
    Returns:
        out (N, H, W, C_out) in x's dtype (the autocast dtype under autocast), expert_index (N,)
        long, moe_loss (0-dim float32).
    """
    x, x_down, weight, bias = prepare_inputs(x, x_down, weight, bias)
    out, index, moe_loss = _LAYER(
        multiply_by_gate, x, x_down, weight, bias, lora_A, lora_B, expert_weight, expert_bias,
        w_gate, w_noise, float(scaling), expert_index, noise,
    )[:3]
    return out, index, moe_loss


def unavailable_reason(x: torch.Tensor) -> str | None:
    """None when these kernels can run ``x``: a float32/bfloat16/float16 tensor on a CUDA
    device, or on the CPU when Triton's interpreter is active (TRITON_INTERPRET=1 set before
    triton was imported). float64 is left to the eager backend."""
    if x.dtype not in _SUPPORTED:
        return f"the Triton kernels take float32, bfloat16 or float16 inputs, not {x.dtype} (use eager)"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu":
        if _INTERPRET and os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return ("Triton kernels need a CUDA device; on the CPU they run only through Triton's "
                "interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    return f"Triton kernels do not run on {x.device.type} tensors"
