"""NVTX ranges around the stages of the layer, for Nsight Systems and Nsight Compute.

A range is pushed only when ``CONVLORA_NVTX=1`` is set and a CUDA device is present; under
``torch.compile`` tracing it is a no-op, so it never causes a graph break. When nobody profiles,
``nvtx_range`` costs one environment lookup (``nvtx_ranges``: one per op call) and returns a
shared no-op context: measured reason, the ``contextlib.contextmanager`` version cost ~5 us per
range on the 2-core development machine (a generator per call), and the fused backends enter up
to nine ranges per forward+backward. (The cuda backend's stages are ranges pushed from C++:
csrc/layer.cpp.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

ENV_NVTX = "CONVLORA_NVTX"

_OFF = contextlib.nullcontext()  # stateless, so one instance serves every call


def nvtx_enabled() -> bool:
    """True when NVTX ranges should be emitted now."""
    return (
        os.environ.get(ENV_NVTX, "0") == "1"
        and torch.cuda.is_available()
        and not torch.compiler.is_compiling()
    )


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc) -> None:
        torch.cuda.nvtx.range_pop()


def _off(name: str) -> contextlib.AbstractContextManager:
    return _OFF


def nvtx_ranges() -> Callable[[str], contextlib.AbstractContextManager]:
    """``nvtx_range`` with the decision taken once: an op that enters several ranges calls
    ``rng = nvtx_ranges()`` at its start, then ``with rng(name):`` per stage. Measured reason:
    an environment lookup costs ~0.7 us alone but ~3-5 us between the layer's other host work
    (2026-11-28, development CPU: the cuda backend's native op 50.1 us, 55.2 us with one lookup
    before it), and the Triton backend entered eight ranges per forward+backward."""
    return _Range if nvtx_enabled() else _off


def nvtx_range(name: str) -> contextlib.AbstractContextManager:
    """Bracket a block (``with nvtx_range(name):``) with an NVTX range named ``name`` when
    profiling is enabled."""
    return nvtx_ranges()(name)
