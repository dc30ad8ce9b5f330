"""Routing shared by every backend: the noisy top-1 gate, always evaluated in float32.

The gate is tiny (N x r times r x E), so it stays in PyTorch. It runs with autocast disabled:
rounding the logits to bf16 (as eager code under autocast does) makes near-ties route
differently between backends for no gain.
"""

from __future__ import annotations

import torch

from . import reference


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
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    with torch.autocast(g.device.type, enabled=False):
        if expert_index is not None:
            return expert_index, reference.moe_loss_from_index(expert_index, num_experts, dtype)
        return reference.route(
            g.to(dtype),
            w_gate.to(dtype),
            w_noise.to(dtype),
            None if noise is None else noise.to(dtype),
        )
