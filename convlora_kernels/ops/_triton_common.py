"""What the Triton op files share: interpreter detection, op registration, poisoned buffers."""

from __future__ import annotations

import os

import torch
from torch.library import triton_op

#: Triton decides at decoration time whether kernels run in its interpreter; so do we.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Tests set this to "1": every buffer the kernels write is allocated full of NaN.
ENV_POISON = "CONVLORA_POISON"
#: Under the interpreter ops are plain custom ops (``torch.library.custom_op``): wrap_triton hands
#: back the interpreted function, which graph tracing would run on fake tensors. On a GPU they are
#: ``triton_op``s, whose kernels Inductor sees.
register_op = torch.library.custom_op if INTERPRET else triton_op


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer when CONVLORA_POISON=1 (tests: an element a kernel
    fails to write then shows up): NaN for floating dtypes, -1 for integer ones."""
    if os.environ.get(ENV_POISON, "0") == "1":
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype,
                          device=device)
    return torch.empty(shape, dtype=dtype, device=device)
