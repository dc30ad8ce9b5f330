"""``backend="eager"``: the Conv-LoRA layer in plain PyTorch, with no host synchronisation.

Unlike :func:`convlora_kernels.reference.conv_lora_experts`, which gathers each expert's samples
(a host sync on a GPU), this evaluates every expert on every sample and keeps each sample's own
through a mask. That costs E times the expert compute of routed code but is capture- and
compile-friendly, and experts no sample chose get an exact zero gradient (DDP needs no
``find_unused_parameters``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..gate import gate_probability, routing
from .._nvtx import nvtx_ranges


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
    """The layer's forward; autograd differentiates it.

    Args:
        x: (N, H, W, C_in) input of the frozen Linear.
        x_down: (N, H, W, C_in) input of the down-projection (``x`` after LoRA dropout; may be x).
        weight: (C_out, C_in); bias: (C_out,) or None.
        lora_A: (r, C_in); lora_B: (C_out, r).
        expert_weight: (E, r, r, 3, 3) or (E, r, 1, 3, 3); expert_bias: (E, r).
        w_gate, w_noise: (r, E).
        scaling: lora_alpha / r.
        expert_index: (N,) long forced routing, or None to route with the gate.
        noise: (N, E) standard normal draws for the training-mode gate, or None.
        multiply_by_gate: scale each sample's expert output by
            :func:`convlora_kernels.gate.gate_probability` (off: the official factor of 1).
    Returns:
        out (N, H, W, C_out), expert_index (N,) long, moe_loss (0-dim, float32 or float64).
    """
    num_experts = expert_weight.shape[0]
    rng = nvtx_ranges()
    with rng("convlora.down_proj"):
        z = F.linear(x_down, lora_A)
    with rng("convlora.gate"):
        g = z.mean(dim=(1, 2))
        expert_index, moe_loss = routing(g, w_gate, w_noise, noise, expert_index)
        gate_p = None
        if multiply_by_gate:
            gate_p = gate_probability(g, w_gate, w_noise, noise, expert_index)
            gate_p = gate_p.to(z.dtype).view(-1, 1, 1, 1)
    with rng("convlora.experts"):
        zc = z.permute(0, 3, 1, 2)
        y = z
        for e in range(num_experts):
            d = reference.expert_forward(zc, expert_weight[e], expert_bias[e], e + 1)
            d = d.permute(0, 2, 3, 1)
            if gate_p is not None:
                d = d * gate_p
            chosen = (expert_index == e).view(-1, 1, 1, 1)
            y = y + torch.where(chosen, d, 0.0)
    with rng("convlora.up_proj"):
        out = F.linear(x, weight, bias) + scaling * F.linear(y, lora_B)
    return out, expert_index, moe_loss


def unavailable_reason(x: torch.Tensor) -> str | None:
    """The eager backend runs every floating dtype on every device."""
    return None
