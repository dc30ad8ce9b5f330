"""NVTX ranges around the stages of the layer, for Nsight Systems and Nsight Compute.

A range is pushed only when ``CONVLORA_NVTX=1`` is set and a CUDA device is present, so the
layer pays nothing (one environment lookup) when nobody profiles; under ``torch.compile``
tracing it is a no-op, so it never causes a graph break.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

ENV_NVTX = "CONVLORA_NVTX"


def nvtx_enabled() -> bool:
    """True when NVTX ranges should be emitted now."""
    return (
        os.environ.get(ENV_NVTX, "0") == "1"
        and torch.cuda.is_available()
        and not torch.compiler.is_compiling()
    )


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Bracket a block with an NVTX range named ``name`` when profiling is enabled."""
    if not nvtx_enabled():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
