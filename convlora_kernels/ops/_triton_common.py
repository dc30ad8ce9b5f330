"""What the Triton op files share: interpreter detection, why the ops are custom ops, the launch
indirection, poisoned buffers."""

from __future__ import annotations

import os

import torch

#: Triton decides at decoration time whether kernels run in its interpreter; so do we.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Tests set this to "1": every buffer the kernels write is allocated full of NaN.
ENV_POISON = "CONVLORA_POISON"
#: The Triton ops are ``torch.library.custom_op``s on every device, opaque to Inductor (their fake
#: implementations stand in for them under tracing), not ``triton_op``s whose kernels Inductor
#: traces through ``wrap_triton``.
#: Measured reason (H200, torch 2.11 + Triton 3.6, 2026-11-28): torch's TTIR mutation analysis
#: follows the results of the kernels' helper-function calls conservatively and reports the
#: expert backward's read-only inputs (z, expert_bias, the routing index) as written; AOTAutograd
#: then copies "mutated" values back into expert_bias, a leaf that requires grad, and Inductor
#: fails ("a leaf Variable that requires grad is being used in an in-place operation"). Opaque
#: ops compile with ``fullgraph=True`` just the same, and are exactly what the CPU tests (the
#: interpreter) exercise.


def kernel_launcher(kernel):
    """The one indirection every launch goes through: ``kernel_launcher(k)[grid](...)``. It is the
    kernel itself (launches run only inside the opaque ops); tests and
    ``scripts/triton_resource_usage.py`` replace it to count or record launches."""
    return kernel


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer when CONVLORA_POISON=1 (tests: an element a kernel
    fails to write then shows up): NaN for floating dtypes, -1 for integer ones."""
    if os.environ.get(ENV_POISON, "0") == "1":
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype,
                          device=device)
    return torch.empty(shape, dtype=dtype, device=device)
