"""Routing shared by every backend: the noisy top-1 gate, always evaluated in float32.

The gate is tiny (N x r times r x E). The eager backend runs it as PyTorch ops; the fused
backends run :func:`routing` as one kernel each way, and the optional gate factor
(:func:`gate_probability`, ``multiply_by_gate``) as the PyTorch ops below. It runs with autocast
disabled: rounding the logits to bf16 (as eager code under autocast does) makes near-ties route
differently between backends for no gain.
"""

from __future__ import annotations

import torch

import torch.nn.functional as F

from . import reference


def _gate_dtype(g: torch.Tensor) -> torch.dtype:
    return torch.float64 if g.dtype == torch.float64 else torch.float32


def routing(
    g: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    noise: torch.Tensor | None,
    expert_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each sample's expert and the auxiliary loss, with no host synchronisation.

    Args:
        g: (N, r) per-sample mean of z.
        w_gate, w_noise: (r, E).
        noise: (N, E) standard normal draws (training) or None (eval).
        expert_index: (N,) forced routing, or None to let the gate decide.
    Returns:
        expert_index (N,) long, moe_loss (0-dim, float32, or float64 for float64 g; differentiable with noisy gating).
    """
    num_experts = w_gate.shape[1]
    dtype = _gate_dtype(g)
    with torch.autocast(g.device.type, enabled=False):
        if expert_index is not None:
            return expert_index, reference.moe_loss_from_index(expert_index, num_experts, dtype)
        return reference.route(
            g.to(dtype),
            w_gate.to(dtype),
            w_noise.to(dtype),
            None if noise is None else noise.to(dtype),
        )


def gate_probability(
    g: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    noise: torch.Tensor | None,
    expert_index: torch.Tensor,
) -> torch.Tensor:
    """The ``multiply_by_gate`` factor: softmax of the gate's E logits at each sample's expert.

    Args:
        g: (N, r) per-sample mean of z.
        w_gate, w_noise: (r, E).
        noise: (N, E) standard normal draws (training, routed) or None (clean logits).
        expert_index: (N,) long, the routed or forced expert.
    Returns:
        p: (N,) float32 (float64 for float64 g), differentiable (autograd) w.r.t. g, w_gate and
        w_noise; :func:`gate_probability_backward` is the same gradient by hand.
    """
    dtype = _gate_dtype(g)
    with torch.autocast(g.device.type, enabled=False):
        logits = reference.gate_logits(
            g.to(dtype), w_gate.to(dtype), w_noise.to(dtype),
            None if noise is None else noise.to(dtype),
        )
        return reference.gate_probability(logits, expert_index)


def gate_probability_backward(
    g: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    noise: torch.Tensor | None,
    expert_index: torch.Tensor,
    dp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of :func:`gate_probability`, written out (no autograd graph), for
    the fused backends' backward ops.

    With q = softmax(logits) and p = q[e]: d logits = dp p (onehot(e) - q); logits = g w_gate
    + noise (softplus(g w_noise) + eps), so d w_gate = g^T d logits and the noise term adds
    d w_noise = g^T (d logits * noise * sigmoid(g w_noise)).

    Args:
        g, w_gate, w_noise, noise, expert_index: as :func:`gate_probability`.
        dp: (N,) gradient of p.
    Returns:
        dg (N, r), d_w_gate (r, E), d_w_noise (r, E), in g's float32/float64 dtype.
    """
    dtype = _gate_dtype(g)
    with torch.autocast(g.device.type, enabled=False):
        g, w_gate, w_noise = g.to(dtype), w_gate.to(dtype), w_noise.to(dtype)
        logits = reference.gate_logits(g, w_gate, w_noise, None if noise is None else noise.to(dtype))
        q = torch.softmax(logits.logits, dim=1)
        onehot = F.one_hot(expert_index, w_gate.shape[1]).to(dtype)
        p = (q * onehot).sum(1, keepdim=True)
        dlogits = (dp.to(dtype).view(-1, 1) * p) * (onehot - q)
        dg = dlogits @ w_gate.t()
        d_w_gate = g.t() @ dlogits
        if noise is None:
            return dg, d_w_gate, torch.zeros_like(w_noise)
        dh = dlogits * noise.to(dtype) * torch.sigmoid(g @ w_noise)  # softplus' = sigmoid
        return dg + dh @ w_noise.t(), d_w_gate, g.t() @ dh
