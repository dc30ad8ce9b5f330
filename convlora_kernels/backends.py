"""Backend selection: which implementation of the layer runs for a given input.

Each backend lives in ``convlora_kernels.ops.<module>`` and provides
``conv_lora_forward(...)`` (signature of :func:`convlora_kernels.ops.eager.conv_lora_forward`)
and ``unavailable_reason(x) -> str | None``. The modules are imported once, here, with an
import failure (no triton, extension not built) recorded as the reason the backend is missing:
resolving a backend is then plain attribute access that ``torch.compile`` traces without a
graph break.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

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


def resolve(name: str, x: torch.Tensor) -> str:
    """The concrete backend that runs ``x``: ``name`` itself, or for "auto" eager on the CPU
    and for float64, else the first available of triton and cuda (a fixed preference: no GPU
    benchmark has ranked them yet, see NOTES.md).

    Raises:
        BackendUnavailableError: an explicit backend that cannot run ``x``, with what is
            missing and how to get it.
    """
    check_backend_name(name)
    if name == "auto":
        if x.device.type != "cuda" or x.dtype == torch.float64:
            return "eager"
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
