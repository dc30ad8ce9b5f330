"""What the Triton op files share: interpreter detection, op registration, poisoned buffers."""

from __future__ import annotations

import os

import torch
from torch.library import triton_op, wrap_triton

#: Triton decides at decoration time whether kernels run in its interpreter; so do we.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Tests set this to "1": every buffer the kernels write is allocated full of NaN.
ENV_POISON = "CONVLORA_POISON"
#: Under the interpreter ops are plain custom ops (``torch.library.custom_op``): wrap_triton hands
#: back the interpreted function, which graph tracing would run on fake tensors. On a GPU they are
#: ``triton_op``s, whose kernels Inductor sees.
register_op = torch.library.custom_op if INTERPRET else triton_op


def traceable(kernel):
    """``wrap_triton(kernel)`` (Inductor then sees the launch) on a GPU; the kernel itself under
    the interpreter, where the ops are opaque custom ops anyway, and where torch 2.11 with
    Triton 3.6 (the lent GPU machine's versions) refuses to wrap an interpreted function."""
    return kernel if INTERPRET else wrap_triton(kernel)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer when CONVLORA_POISON=1 (tests: an element a kernel
    fails to write then shows up): NaN for floating dtypes, -1 for integer ones."""
    if os.environ.get(ENV_POISON, "0") == "1":
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype,
                          device=device)
    return torch.empty(shape, dtype=dtype, device=device)
