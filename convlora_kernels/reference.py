"""Exact eager reference of Conv-LoRA (``../shared/SPEC.md``), the ground truth for every kernel.

Everything here is plain PyTorch and runs in any floating dtype on any device, float64 on the
CPU included. It favours clarity over speed: :func:`conv_lora_experts` groups the samples of
each expert with boolean indexing, which synchronises the host on a GPU, exactly like the
official code. The drop-in layer's ``backend="eager"`` uses :mod:`convlora_kernels.ops.eager`
instead, which computes the same function without any host synchronisation.

Shapes: ``N`` samples (images, or windows in SAM's windowed blocks), ``H x W`` token map,
``C_in``/``C_out`` features of the frozen Linear, ``r`` LoRA rank, ``E`` experts. Expert ``e``
(0-based) has the scale factor ``s = e + 1``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "BICUBIC_A",
    "NOISE_EPSILON",
    "MOE_LOSS_WEIGHT",
    "cubic_weights",
    "expert_forward",
    "gate_logits",
    "GateOutput",
    "route",
    "gate_probability",
    "cv_squared",
    "moe_aux_loss",
    "moe_loss_from_index",
    "conv_lora_experts",
    "conv_lora_linear",
]

#: The cubic convolution constant PyTorch's bicubic interpolation uses.
BICUBIC_A = -0.75
#: Added to the softplus of the noise logits (the official ``noise_epsilon``).
NOISE_EPSILON = 0.01
#: Weight of the load-balancing loss (the official ``loss_coef``).
MOE_LOSS_WEIGHT = 0.01


def cubic_weights(t: float) -> tuple[float, float, float, float]:
    """The four bicubic tap weights for fractional offset ``t`` (taps ``i0-1 .. i0+2``).

    SPEC section 3; identical to PyTorch's ``upsample_bicubic2d`` with ``A = -0.75``.
    """
    a = BICUBIC_A
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    w3 = ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a
    return w0, w1, w2, w3


def expert_forward(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: int
) -> torch.Tensor:
    """One multi-scale convolution expert, without the residual.

    Args:
        z: (N, r, H, W) low-rank map, channels first.
        weight: (r, r, 3, 3) full conv, or (r, 1, 3, 3) depthwise (groups = r).
        bias: (r,).
        scale: the expert's scale factor s >= 1.
    Returns:
        D: (N, r, H, W) = bicubic_down(GELU(conv3x3(bicubic_up(z, s)) + bias)).
    """
    r = z.shape[1]
    groups = r if weight.shape[1] == 1 and r > 1 else 1
    u = F.interpolate(z, scale_factor=scale, mode="bicubic", align_corners=False) if scale > 1 else z
    v = F.gelu(F.conv2d(u, weight, bias, padding=1, groups=groups))
    if scale > 1:
        v = F.interpolate(v, size=z.shape[-2:], mode="bicubic", align_corners=False)
    return v


class GateOutput(NamedTuple):
    """What the noisy top-1 gate computes for a batch of N samples."""

    clean: torch.Tensor  #: (N, E) clean logits g @ w_gate
    logits: torch.Tensor  #: (N, E) logits used for routing (noisy in training)
    sigma: torch.Tensor | None  #: (N, E) noise standard deviation, None without noise


def gate_logits(
    g: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> GateOutput:
    """Gate logits of SPEC section 2 step 3.

    Args:
        g: (N, r) per-sample mean of z over the token map.
        w_gate, w_noise: (r, E).
        noise: (N, E) standard normal draws (training), or None (eval: clean logits).
    """
    clean = g @ w_gate
    if noise is None:
        return GateOutput(clean, clean, None)
    sigma = F.softplus(g @ w_noise) + NOISE_EPSILON
    return GateOutput(clean, clean + noise * sigma, sigma)


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(v) / (mean(v)^2 + 1e-10); 0 for one element."""
    v = v.float() if not v.is_floating_point() else v
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var() / (v.mean() ** 2 + 1e-10)


def _normal_cdf(v: torch.Tensor) -> torch.Tensor:
    """Phi(v), as torch.distributions.Normal(0, 1).cdf computes it, without the distribution's
    data-dependent argument validation (which torch.compile and opcheck cannot trace)."""
    return 0.5 * (1 + torch.erf(v / math.sqrt(2)))


def moe_aux_loss(gate: GateOutput, expert_index: torch.Tensor) -> torch.Tensor:
    """Load-balancing loss of SPEC section 2 (0-dim tensor).

    ``importance`` is the per-expert count of samples; ``load`` is the smooth estimate
    sum_n P(n, e) when the logits are noisy and there are at least two experts, else the count.
    """
    num_experts = gate.clean.shape[1]
    gates = F.one_hot(expert_index, num_experts).to(gate.clean.dtype)
    importance = gates.sum(0)
    if gate.sigma is not None and num_experts > 1:
        top2 = gate.logits.topk(2, dim=1).values
        t_out, t_in = top2[:, 0:1], top2[:, 1:2]
        prob_if_in = _normal_cdf((gate.clean - t_in) / gate.sigma)
        prob_if_out = _normal_cdf((gate.clean - t_out) / gate.sigma)
        load = torch.where(gate.logits > t_in, prob_if_in, prob_if_out).sum(0)
    else:
        load = (gates > 0).to(gate.clean.dtype).sum(0)
    return MOE_LOSS_WEIGHT * (cv_squared(importance) + cv_squared(load))


def moe_loss_from_index(expert_index: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """The auxiliary loss when routing is forced (no gate): both terms are the expert counts."""
    counts = F.one_hot(expert_index, num_experts).to(dtype).sum(0)
    return MOE_LOSS_WEIGHT * 2 * cv_squared(counts)


def route(
    g: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy top-1 routing: returns (expert_index (N,) long, moe_loss 0-dim)."""
    gate = gate_logits(g, w_gate, w_noise, noise)
    expert_index = gate.logits.argmax(dim=1)
    return expert_index, moe_aux_loss(gate, expert_index)


def gate_probability(gate: GateOutput, expert_index: torch.Tensor) -> torch.Tensor:
    """Softmax over all E logits, at each sample's expert: (N,), differentiable.

    The official code multiplies expert outputs by a softmax over the top-1 logit alone, which is
    exactly 1 (SPEC section 2): the router then learns only from the load-balancing loss. With
    ``multiply_by_gate`` this package scales each sample's expert output by this probability
    instead (as Switch-style top-1 routers do), so the task loss reaches ``w_gate``, ``w_noise``
    and z through the gate. It is at least 1/E for the routed expert (the argmax).
    """
    return torch.softmax(gate.logits, dim=1).gather(1, expert_index.view(-1, 1)).view(-1)


def conv_lora_experts(
    z: torch.Tensor,
    expert_index: torch.Tensor,
    expert_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    gate_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed expert stage with residual: y = z + D, or y = z + p D with gate_p.

    Args:
        z: (N, H, W, r).
        expert_index: (N,) integer, values in [0, E).
        expert_weight: (E, r, r, 3, 3) or (E, r, 1, 3, 3).
        expert_bias: (E, r).
        gate_p: (N,) per-sample factor of the expert output (:func:`gate_probability`), or None.
    Returns:
        y: (N, H, W, r).
    """
    zc = z.permute(0, 3, 1, 2)
    d = torch.zeros_like(zc)
    for e in range(expert_weight.shape[0]):
        sel = expert_index == e
        if not bool(sel.any()):  # host sync, like the official dispatcher
            continue
        d = d.index_put((sel,), expert_forward(zc[sel], expert_weight[e], expert_bias[e], e + 1))
    if gate_p is not None:
        d = d * gate_p.to(d.dtype).view(-1, 1, 1, 1)
    return z + d.permute(0, 2, 3, 1)


def conv_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    scaling: float,
    expert_index: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    multiply_by_gate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole Conv-LoRA layer (SPEC section 2) on a 4-D input.

    Args:
        x: (N, H, W, C_in).
        weight: (C_out, C_in) frozen; bias: (C_out,) or None.
        lora_A: (r, C_in); lora_B: (C_out, r).
        expert_weight: (E, r, r, 3, 3) or (E, r, 1, 3, 3); expert_bias: (E, r).
        w_gate, w_noise: (r, E).
        scaling: lora_alpha / r.
        expert_index: (N,) forced routing; None lets the gate decide.
        noise: (N, E) standard normal draws for the training-mode gate; None in eval.
        multiply_by_gate: scale each sample's expert output by :func:`gate_probability` of the
            gate's logits (noisy when ``noise`` is given), forced routing included. Off: the
            official behaviour (a factor of exactly 1).
    Returns:
        out (N, H, W, C_out), expert_index (N,) long, moe_loss (0-dim).
    """
    z = x @ lora_A.t()
    g = z.mean(dim=(1, 2))
    if expert_index is None:
        expert_index, moe_loss = route(g, w_gate, w_noise, noise)
    else:
        moe_loss = moe_loss_from_index(expert_index, expert_weight.shape[0], z.dtype)
    gate_p = None
    if multiply_by_gate:
        gate_p = gate_probability(gate_logits(g, w_gate, w_noise, noise), expert_index)
    y = conv_lora_experts(z, expert_index, expert_weight, expert_bias, gate_p)
    out = F.linear(x, weight, bias) + scaling * (y @ lora_B.t())
    return out, expert_index, moe_loss

