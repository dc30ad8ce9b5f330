"""Backend selection: which implementation of the layer runs for a given input.

Each backend lives in ``convlora_kernels.ops.<module>`` and provides
``conv_lora_forward(...)`` (signature of :func:`convlora_kernels.ops.eager.conv_lora_forward`)
and ``unavailable_reason(x) -> str | None``. The modules are imported once, here, with an
import failure (no triton, extension not built) recorded as the reason the backend is missing:
resolving a backend is then plain attribute access that ``torch.compile`` traces without a
graph break.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from types import ModuleType

import torch

from . import auto_rule

BACKENDS = ("auto", "eager", "triton", "cuda")
_MODULE_NAMES = {
    "eager": "convlora_kernels.ops.eager",
    "triton": "convlora_kernels.ops.triton_conv_lora",
    "cuda": "convlora_kernels.ops.cuda_conv_lora",
}


def _import(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_MODULE_NAMES[name]), None
    except ImportError as exc:  # triton missing, or the ops module / extension not built
        return None, f"{_MODULE_NAMES[name]} cannot be imported ({exc})"


#: name -> (module or None, why it is missing); fixed at import.
_LOADED = {name: _import(name) for name in _MODULE_NAMES}
_HOW_TO_GET = {
    "triton": "install triton (pip install 'triton>=3.2') and run on a CUDA GPU, or set "
    "TRITON_INTERPRET=1 before importing triton to run its kernels on the CPU (slow; for tests)",
    "cuda": "build the extension: CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e . "
    "(see the README, 'CUDA extension')",
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this input here."""


def check_backend_name(name: str) -> str:
    """Return ``name`` if it is a known backend, else raise ValueError."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def unavailable_reason(name: str, x: torch.Tensor) -> str | None:
    """Why backend ``name`` cannot run input ``x`` here, or None if it can."""
    module, why = _LOADED[name]
    if module is None:
        return why
    return module.unavailable_reason(x)


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# Memoised pure functions (a device's capability and the shipped rule never change in a
# process): "auto" resolves on every layer call, and the rule lookup (sorting ranks, logs) and
# the capability query cost ~3-4 us per call before the memo, several times that between the
# layer's other host work.
@functools.lru_cache(maxsize=None)
def _capability(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{major}.{minor}"


@functools.lru_cache(maxsize=None)
def _shipped_lookup(capability: str, dtype: str, r: int) -> str:
    return auto_rule.lookup(auto_rule.RULES, capability, dtype, r) or ""


@torch.compiler.assume_constant_result
def _shipped_rule_choice(index: int, dtype: str, r: int) -> str:
    # Evaluated once while torch.compile traces, its result a constant of the graph: the card
    # and the shipped rule cannot change under a compiled graph. "" means no rule.
    return _shipped_lookup(_capability(index), dtype, r)


def _measured_choice(x: torch.Tensor, r: int | None, rules: Mapping | None) -> str | None:
    if x.dtype not in _DTYPE_NAMES:
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    dtype = _DTYPE_NAMES[x.dtype]
    if rules is None:
        return _shipped_rule_choice(index, dtype, -1 if r is None else r) or None
    return auto_rule.lookup(rules, _capability(index), dtype, r)


def resolve(name: str, x: torch.Tensor, r: int | None = None,
            rules: Mapping | None = None) -> str:
    """The concrete backend that runs ``x``: ``name`` itself, or for "auto":

    - eager on the CPU and for float64;
    - on a GPU, the fused backend the measured rule picks for this architecture, dtype and
      LoRA rank ``r`` (``convlora_kernels/auto_rule.json``, derived from ``convlora-bench``
      forward+backward results), if it is available here;
    - otherwise the first available of triton and cuda (the fixed preference), else eager.

    ``rules`` replaces the shipped rule (tests); ``r`` None means unknown (taken as 8).

    Raises:
        BackendUnavailableError: an explicit backend that cannot run ``x``, with what is
            missing and how to get it.
    """
    check_backend_name(name)
    if name == "auto":
        if x.device.type != "cuda" or x.dtype == torch.float64:
            return "eager"
        measured = _measured_choice(x, r, rules)
        if measured is not None and unavailable_reason(measured, x) is None:
            return measured
        for candidate in ("triton", "cuda"):
            if unavailable_reason(candidate, x) is None:
                return candidate
        return "eager"
    why = unavailable_reason(name, x)
    if why is not None:
        how = _HOW_TO_GET.get(name, "")
        raise BackendUnavailableError(
            f"backend {name!r} is not available for a {x.dtype} input on {x.device}: {why}."
            + (f" To get it: {how}." if how else "")
        )
    return name


def forward_fn(name: str) -> Callable:
    """``conv_lora_forward`` of a concrete (already resolved) backend."""
    module, why = _LOADED[name]
    if module is None:
        raise BackendUnavailableError(why)
    return module.conv_lora_forward
