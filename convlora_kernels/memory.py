"""How much activation memory a forward keeps for its backward.

The Triton issue's memory target ("adapter activation memory saved for backward <= 10% of the
eager reference's") and the benchmark's ``saved_mb`` column are measured with
:func:`saved_activation_bytes`: it records, through ``torch.autograd.graph.saved_tensors_hooks``,
every tensor autograd (or a custom op's ``ctx.save_for_backward``) saves while a forward runs,
and adds up the distinct storages that are not the inputs or parameters the caller excludes.
Inputs and parameters are alive anyway; what remains is what the layer itself adds to memory
until the backward runs. Views of one storage count once, at the storage's full size.

It works on any device (the CPU included) because it reads sizes, not allocator statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

__all__ = ["saved_activation_bytes"]

T = TypeVar("T")


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def saved_activation_bytes(
    forward: Callable[[], T], exclude: Iterable[torch.Tensor] = ()
) -> tuple[int, T]:
    """Run ``forward()`` with grad enabled; return (bytes saved for backward, its result).

    Args:
        forward: runs the forward pass whose saved tensors are counted (its graph stays alive
            for as long as the caller keeps the result).
        exclude: tensors whose storages are not counted: the inputs and parameters (and any
            buffer the caller keeps alive regardless of the backward).
    Returns:
        The total ``nbytes`` of the distinct storages saved and not excluded, and the result of
        ``forward()``.
    """
    excluded = {_storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
    seen: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    def unpack(t: Any) -> Any:
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        result = forward()
    return sum(seen.values()), result
