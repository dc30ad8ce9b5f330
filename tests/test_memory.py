"""Activation memory saved for backward (convlora_kernels.memory) and the Triton issue's target:
the fused backends keep at most 10% of what the eager reference keeps."""

from __future__ import annotations

import pytest
import torch

from convlora_kernels import _bench_core as core, backends
from convlora_kernels.memory import saved_activation_bytes


def test_counts_distinct_storages_beyond_the_excluded() -> None:
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(5))

    def forward() -> torch.Tensor:
        y = x * w  # saves x and w: excluded
        return y.sin().sum() + y.view(-1).cos().sum()  # both save y's storage: counted once

    nbytes, out = saved_activation_bytes(forward, [x, w])
    assert nbytes == x.numel() * 4
    out.backward()  # the graph still works: the hooks return the tensors unchanged
    assert x.grad is not None and w.grad is not None
    assert saved_activation_bytes(forward)[0] == 2 * x.numel() * 4 + w.numel() * 4


def test_nothing_saved_without_grad() -> None:
    x = torch.randn(4, 3)
    assert saved_activation_bytes(lambda: x.exp().sin())[0] == 0


def _saved(layer: torch.nn.Module, x: torch.Tensor, index: torch.Tensor) -> int:
    exclude = [x, *layer.parameters(), *layer.buffers()]
    return saved_activation_bytes(lambda: layer(x, index), exclude)[0]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_backends_save_at_most_a_tenth_of_the_reference(backend: str) -> None:
    """Windows of 14x14 (SAM's windowed blocks), every scale once, r = 8, training mode."""
    n, side, c_in, c_out, r = 8, 14, 32, 96, 8
    torch.manual_seed(0)
    x = torch.randn(n, side, side, c_in, requires_grad=True)
    index = torch.arange(n) % 8
    why = backends.unavailable_reason(backend, x)
    if why is not None:
        pytest.skip(why)
    linear = torch.nn.Linear(c_in, c_out).requires_grad_(False)
    reference = core.conv_lora_layer(linear, "reference", r).train()
    fused = core.conv_lora_layer(linear, backend, r).train()
    ref_bytes = _saved(reference, x, index)
    fused_bytes = _saved(fused, x, index)
    # z and y: two (tokens x r) float32 tensors, plus the per-sample mean and expert index.
    tokens = n * side * side
    assert fused_bytes <= 2 * tokens * r * 4 + 4096
    assert fused_bytes <= 0.10 * ref_bytes, (fused_bytes, ref_bytes)
