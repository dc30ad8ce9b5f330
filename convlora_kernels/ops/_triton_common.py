"""What the Triton op files share: interpreter detection, why the ops are custom ops, the launch
indirection, the buffer allocator (poisoned buffers for tests), host-side integer helpers."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

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


def allocator(device: torch.device) -> Callable[[tuple[int, ...], torch.dtype], torch.Tensor]:
    """The buffer allocator of one op call, ``alloc(shape, dtype)``: torch.empty on ``device``,
    or, when CONVLORA_POISON=1 (tests: an element a kernel fails to write then shows up),
    buffers full of NaN (floating dtypes) or -1 (integer ones).

    The environment is read here, once per op call, not once per buffer: a lookup costs ~0.6 us
    and a layer's forward+backward allocates 23 buffers (py-spy of the Triton backend's host
    code with launches stubbed out, 2026-11-28: the lookups were ~6% of it)."""
    if os.environ.get(ENV_POISON, "0") == "1":
        def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.full(shape, float("nan") if dtype.is_floating_point else -1,
                              dtype=dtype, device=device)
        return poisoned
    return functools.partial(_empty, device=device)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


# Host-side integer helpers. Not triton.cdiv / triton.next_power_of_2: since Triton 3.6 those are
# ConstexprFunctions, and a host call costs ~1.5-2.5 us (argument unwrapping) where this costs
# ~0.1 us; a layer forward+backward made 37 such calls (~12% of the Triton backend's host code,
# py-spy, launches stubbed out, 2026-11-28).
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
