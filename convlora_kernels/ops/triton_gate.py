"""The noisy top-1 gate and its auxiliary loss as two Triton kernels (forward, backward).

Why kernels for N x r x E arithmetic: in PyTorch the gate is ~50 small ops in a training
forward and ~110 more when autograd recomputes it for the backward (counted with
torch.profiler, session 3). On a GPU each is a launch costing 5-10 us of host time, so the
eager gate alone (~1 ms) would cost more than the frozen Linear's whole forward+backward at
SAM's shapes (0.24 ms, SPEC section 5). Here it is one launch each way.

Both kernels run as a single program that walks the samples in blocks of BLOCK_N rows in
order: the sums over samples (expert counts, load, the weight gradients) have a fixed order,
so results are deterministic. N is the number of maps (windows), at most a few hundred.

The function (SPEC section 2, :mod:`convlora_kernels.reference`), per sample n:
``clean = g W_gate``; training: ``sigma = softplus(g W_noise) + 0.01``,
``logits = clean + noise * sigma``; eval: ``logits = clean``; ``index = argmax(logits)``
(first maximum); the loss ``0.01 (cv2(importance) + cv2(load))`` with ``importance`` the
expert counts and ``load`` the counts (eval, forced routing, one expert) or, with noise,
``sum_n Phi((clean - t) / sigma)`` where t is the second-largest logit of the sample for the
entries above it and the largest for the others.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import allocator, kernel_launcher, next_power_of_2

# reference.NOISE_EPSILON and reference.MOE_LOSS_WEIGHT (0.01 each) are literals in the kernels:
# a plain global is a compile error there, and a tl.constexpr global breaks the interpreter.
_ELEMENTS = 4096  # BLOCK_N * BLOCK_R * BLOCK_E: the [rows, r, E] products stay in registers


@triton.jit
def _log1p(a):
    # log(1 + a) accurate for tiny a (libdevice's log1p is missing from the interpreter):
    # the rounding of 1 + a cancels in log(u) * a / (u - 1).
    u = 1.0 + a
    return tl.where(u == 1.0, a, tl.log(u) * (a / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus (beta 1, threshold 20)
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x))))


@triton.jit
def _gate_block(g_ptr, wg_ptr, wn_ptr, noise_ptr, index_ptr, n0, N, R, E,
                HAS_NOISE: tl.constexpr, FORCED: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """Logits of rows n0 .. n0 + BLOCK_N and what the loss needs of them.

    Returns g [BN, BR], clean, raw (g W_noise), sigma, u = (clean - t) / sigma (all [BN, BE]),
    top1, top2 [BN] (argmax and second), in_top ([BN, BE]: the logit is above the second
    largest), the valid-element mask [BN, BE] and the row mask [BN].
    """
    rows = n0 + tl.arange(0, BLOCK_N)
    rmask = rows < N
    kr = tl.arange(0, BLOCK_R)
    ke = tl.arange(0, BLOCK_E)
    emask = ke < E
    valid = rmask[:, None] & emask[None, :]
    g = tl.load(g_ptr + rows[:, None] * R + kr[None, :],
                mask=rmask[:, None] & (kr[None, :] < R), other=0.0)
    wmask = (kr[:, None] < R) & emask[None, :]
    wg = tl.load(wg_ptr + kr[:, None] * E + ke[None, :], mask=wmask, other=0.0)
    clean = tl.sum(g[:, :, None] * wg[None, :, :], axis=1)
    if HAS_NOISE:
        wn = tl.load(wn_ptr + kr[:, None] * E + ke[None, :], mask=wmask, other=0.0)
        raw = tl.sum(g[:, :, None] * wn[None, :, :], axis=1)
        sigma = _softplus(raw) + 0.01  # NOISE_EPSILON
        noise = tl.load(noise_ptr + rows[:, None] * E + ke[None, :], mask=valid, other=0.0)
        logits = clean + noise * sigma
    else:
        raw = clean
        sigma = tl.full([BLOCK_N, BLOCK_E], 1.0, tl.float32)
        logits = clean
    logits = tl.where(emask[None, :], logits, -float("inf"))
    if FORCED:
        top1 = tl.load(index_ptr + rows, mask=rmask, other=0).to(tl.int32)
    else:
        top1 = tl.argmax(logits, axis=1, tie_break_left=True).to(tl.int32)
    t_out = tl.max(logits, axis=1)
    rest = tl.where(ke[None, :] == top1[:, None], -float("inf"), logits)
    t_in = tl.max(rest, axis=1)
    top2 = tl.argmax(rest, axis=1, tie_break_left=True).to(tl.int32)
    in_top = logits > t_in[:, None]
    t = tl.where(in_top, t_in[:, None], t_out[:, None])
    u = tl.where(valid, (clean - t) / sigma, 0.0)
    return g, clean, raw, sigma, u, top1, top2, in_top, valid, rmask


@triton.jit
def _phi(u):
    return 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))


@triton.jit
def _cv2(v, emask, E):
    """var(v) / (mean(v)^2 + 1e-10), unbiased; 0 for one element. Also returns mean, var."""
    mean = tl.sum(tl.where(emask, v, 0.0), axis=0) / E
    dev = tl.where(emask, v - mean, 0.0)
    var = tl.sum(dev * dev, axis=0) / tl.maximum(E - 1, 1)
    cv2 = tl.where(E > 1, var / (mean * mean + 1e-10), 0.0)
    return cv2, mean, var


@triton.jit
def _gate_totals(g_ptr, wg_ptr, wn_ptr, noise_ptr, index_ptr, N, R, E,
                 HAS_NOISE: tl.constexpr, FORCED: tl.constexpr, STORE_INDEX: tl.constexpr,
                 out_index_ptr,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """Walk all samples: per-expert counts and load; optionally store each sample's expert."""
    ke = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], tl.float32)
    load = tl.zeros([BLOCK_E], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        _, _, _, _, u, top1, _, _, valid, rmask = _gate_block(
            g_ptr, wg_ptr, wn_ptr, noise_ptr, index_ptr, n0, N, R, E, HAS_NOISE, FORCED,
            BLOCK_N, BLOCK_R, BLOCK_E)
        chosen = (ke[None, :] == top1[:, None]) & rmask[:, None]
        counts += tl.sum(chosen.to(tl.float32), axis=0)
        if HAS_NOISE:
            load += tl.sum(tl.where(valid, _phi(u), 0.0), axis=0)
        if STORE_INDEX:
            rows = n0 + tl.arange(0, BLOCK_N)
            tl.store(out_index_ptr + rows, top1.to(tl.int64), mask=rmask)
    if not HAS_NOISE:
        load = counts
    return counts, load


@triton.jit
def _convlora_gate_fwd_kernel(
    gpart_ptr,    # (N, NB, R) float32: per-(sample, token block) partial sums of z
    g_ptr,        # out (N, R) float32: per-sample mean of z, then read back by the gate
    wg_ptr,       # (R, E) float32 contiguous
    wn_ptr,       # (R, E) float32 contiguous
    noise_ptr,    # (N, E) float32 contiguous (read when HAS_NOISE)
    forced_ptr,   # (N,) int64 (read when FORCED)
    index_ptr,    # out (N,) int64
    loss_ptr,     # out (1,) float32
    N, R, E, NB, inv_hw,
    HAS_NOISE: tl.constexpr, FORCED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # g = sum of the down kernel's partials / (H*W), in block order (deterministic); folding it
    # here saves the two launches of gpart.sum(1) / hw.
    kr = tl.arange(0, BLOCK_R)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < N) & (kr[None, :] < R)
        acc = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
        for b in range(0, NB):
            acc += tl.load(gpart_ptr + (rows[:, None] * NB + b) * R + kr[None, :], mask=m, other=0.0)
        tl.store(g_ptr + rows[:, None] * R + kr[None, :], acc * inv_hw, mask=m)
    tl.debug_barrier()  # g is read back below by other threads of this program
    emask = tl.arange(0, BLOCK_E) < E
    counts, load = _gate_totals(g_ptr, wg_ptr, wn_ptr, noise_ptr, forced_ptr, N, R, E,
                                HAS_NOISE, FORCED, True, index_ptr, BLOCK_N, BLOCK_R, BLOCK_E)
    cv_i, _, _ = _cv2(counts, emask, E)
    cv_l, _, _ = _cv2(load, emask, E)
    tl.store(loss_ptr, 0.01 * (cv_i + cv_l))  # MOE_LOSS_WEIGHT


@triton.jit
def _convlora_gate_bwd_kernel(
    g_ptr, wg_ptr, wn_ptr, noise_ptr,  # as in the forward (training gate: noise present)
    dloss_ptr,    # (1,) float32: gradient of moe_loss
    dg_ptr,       # out (N, R) float32: dL/dg * dg_scale
    dwg_ptr,      # out (R, E) float32
    dwn_ptr,      # out (R, E) float32
    N, R, E, dg_scale,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    ke = tl.arange(0, BLOCK_E)
    kr = tl.arange(0, BLOCK_R)
    emask = ke < E
    # Pass 1: the load vector (the loss couples all samples through it).
    _, load = _gate_totals(g_ptr, wg_ptr, wn_ptr, noise_ptr, g_ptr, N, R, E, True, False,
                           False, g_ptr, BLOCK_N, BLOCK_R, BLOCK_E)
    _, mean, var = _cv2(load, emask, E)
    denom = mean * mean + 1e-10
    # d cv2 / d load_e; importance (counts) has no gradient.
    dload = (2.0 * (load - mean) / tl.maximum(E - 1, 1) / denom
             - var * 2.0 * mean / (E * denom * denom))
    dload = tl.where(emask & (E > 1), dload * 0.01 * tl.load(dloss_ptr), 0.0)  # MOE_LOSS_WEIGHT
    wmask = (kr[:, None] < R) & emask[None, :]
    wg = tl.load(wg_ptr + kr[:, None] * E + ke[None, :], mask=wmask, other=0.0)
    wn = tl.load(wn_ptr + kr[:, None] * E + ke[None, :], mask=wmask, other=0.0)
    dwg = tl.zeros([BLOCK_R, BLOCK_E], tl.float32)
    dwn = tl.zeros([BLOCK_R, BLOCK_E], tl.float32)
    # Pass 2: per sample, back through Phi, the top-2 selection, the noise and the matmuls.
    for n0 in range(0, N, BLOCK_N):
        g, clean, raw, sigma, u, top1, top2, in_top, valid, rmask = _gate_block(
            g_ptr, wg_ptr, wn_ptr, noise_ptr, g_ptr, n0, N, R, E, True, False,
            BLOCK_N, BLOCK_R, BLOCK_E)
        rows = n0 + tl.arange(0, BLOCK_N)
        noise = tl.load(noise_ptr + rows[:, None] * E + ke[None, :], mask=valid, other=0.0)
        # load_e = sum_n Phi(u_ne), u = (clean - t) / sigma
        du = tl.where(valid, dload[None, :] * tl.exp(-0.5 * u * u) * 0.3989422804014327, 0.0)
        dclean = du / sigma
        dsigma = -du * u / sigma
        dt = -du / sigma  # t is t_in (second logit) where in_top, else t_out (top logit)
        dt_in = tl.sum(tl.where(in_top, dt, 0.0), axis=1)
        dt_out = tl.sum(tl.where(in_top, 0.0, dt), axis=1)
        dlogits = (tl.where(ke[None, :] == top2[:, None], dt_in[:, None], 0.0)
                   + tl.where(ke[None, :] == top1[:, None], dt_out[:, None], 0.0))
        dclean += dlogits
        dsigma += dlogits * noise
        draw = tl.where(valid, dsigma * tl.where(raw > 20.0, 1.0, tl.sigmoid(raw)), 0.0)
        dclean = tl.where(valid, dclean, 0.0)
        dg = (tl.sum(dclean[:, None, :] * wg[None, :, :], axis=2)
              + tl.sum(draw[:, None, :] * wn[None, :, :], axis=2))
        tl.store(dg_ptr + rows[:, None] * R + kr[None, :], dg * dg_scale,
                 mask=rmask[:, None] & (kr[None, :] < R))
        dwg += tl.sum(g[:, :, None] * dclean[:, None, :], axis=0)
        dwn += tl.sum(g[:, :, None] * draw[:, None, :], axis=0)
    tl.store(dwg_ptr + kr[:, None] * E + ke[None, :], dwg, mask=wmask)
    tl.store(dwn_ptr + kr[:, None] * E + ke[None, :], dwn, mask=wmask)


def _blocks(r: int, num_experts: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_R, BLOCK_E): rows per step is the largest power of two keeping the
    [rows, r, E] products within _ELEMENTS (at most 128 rows)."""
    br = next_power_of_2(max(r, 1))
    be = next_power_of_2(max(num_experts, 1))
    bn = 1
    while bn < 128 and 2 * bn * br * be <= _ELEMENTS:
        bn *= 2
    return bn, br, be


def gate_forward(gpart: torch.Tensor, hw: int, w_gate: torch.Tensor, w_noise: torch.Tensor,
                 noise: torch.Tensor | None, expert_index: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-sample mean of z, routing and auxiliary loss in one launch.

    Args:
        gpart: (N, NB, r) float32 partial sums of z over NB token blocks of each sample.
        hw: tokens per sample (H*W).
        w_gate, w_noise: (r, E), any float dtype (float32 inside).
        noise: (N, E) standard normal draws (training gate), or None (eval: clean logits).
        expert_index: (N,) forced routing, or None.
    Returns:
        g (N, r) float32, expert_index (N,) int64 (a new tensor), moe_loss 0-dim float32.
    """
    n, nb, r = gpart.shape
    num_experts = w_gate.shape[1]
    bn, br, be = _blocks(r, num_experts)
    wg = w_gate.detach().float().contiguous()
    wn = w_noise.detach().float().contiguous()
    has_noise = noise is not None and expert_index is None and num_experts > 1
    nz = noise.float().contiguous() if has_noise else wg
    forced = expert_index is not None
    fi = expert_index.to(torch.int64).contiguous() if forced else wg
    alloc = allocator(gpart.device)
    g = alloc((n, r), torch.float32)
    index = alloc((n,), torch.int64)
    loss = alloc((1,), torch.float32)
    kernel_launcher(_convlora_gate_fwd_kernel)[(1,)](
        gpart.contiguous(), g, wg, wn, nz, fi, index, loss, n, r, num_experts, nb, 1.0 / hw,
        HAS_NOISE=has_noise, FORCED=forced, BLOCK_N=bn, BLOCK_R=br, BLOCK_E=be, num_warps=4,
    )
    return g, index, loss.view(())


def _gate_bwd_impl(g: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor,
                   noise: torch.Tensor, dloss: torch.Tensor, dg_scale: float,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the training gate's moe_loss (noise present, routing by the gate).

    Args:
        g: (N, r) float32; w_gate, w_noise: (r, E); noise: (N, E); dloss: 0-dim.
        dg_scale: multiplies dg (1 / (H*W) gives every token's share of the mean).
    Returns:
        dg * dg_scale (N, r) float32, d_w_gate (r, E) float32, d_w_noise (r, E) float32.
    """
    n, r = g.shape
    num_experts = w_gate.shape[1]
    if num_experts == 1:  # one expert: the loss is the constant 0
        return (torch.zeros((n, r), dtype=torch.float32, device=g.device),
                torch.zeros((r, 1), dtype=torch.float32, device=g.device),
                torch.zeros((r, 1), dtype=torch.float32, device=g.device))
    bn, br, be = _blocks(r, num_experts)
    alloc = allocator(g.device)
    dg = alloc((n, r), torch.float32)
    dwg = alloc((r, num_experts), torch.float32)
    dwn = alloc((r, num_experts), torch.float32)
    kernel_launcher(_convlora_gate_bwd_kernel)[(1,)](
        g.contiguous(), w_gate.detach().float().contiguous(), w_noise.detach().float().contiguous(),
        noise.float().contiguous(), dloss.float().reshape(1), dg, dwg, dwn,
        n, r, num_experts, float(dg_scale),
        BLOCK_N=bn, BLOCK_R=br, BLOCK_E=be, num_warps=4,
    )
    return dg, dwg, dwn


# The backward runs from the layer's autograd formula, outside the layer ops: an op of its own
# so that torch.compile traces it like the others.
gate_backward = torch.library.custom_op(
    "convlora_triton::gate_bwd", _gate_bwd_impl, mutates_args=(),
    schema="(Tensor g, Tensor w_gate, Tensor w_noise, Tensor noise, Tensor dloss, float dg_scale)"
    " -> (Tensor, Tensor, Tensor)",
)


@gate_backward.register_fake
def _gate_bwd_fake(g, w_gate, w_noise, noise, dloss, dg_scale):
    n, r = g.shape
    num_experts = w_gate.shape[1]
    return (g.new_empty((n, r), dtype=torch.float32),
            g.new_empty((r, num_experts), dtype=torch.float32),
            g.new_empty((r, num_experts), dtype=torch.float32))
