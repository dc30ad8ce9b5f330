"""``backend="cuda"``: the Conv-LoRA layer on the compiled extension ``convlora_kernels._C``.

The extension registers four dispatcher ops in the namespace ``convlora_cuda`` (schemas in
``csrc/ops.cpp``), each with a CUDA kernel and a CPU kernel built from the same per-element
arithmetic (``csrc/convlora_math.h``):

- ``down_proj(x, lora_A) -> (z, g)``: ``z = x A^T`` (N, H, W, r) and ``g = mean_{H,W} z`` (N, r),
  both float32 (float64 for float64 x) whatever x's dtype.
- ``experts_fwd(z, expert_index, expert_weight, expert_bias) -> y``: ``y = z + D(z)`` computing
  only the V samples the downsample reads.
- ``experts_bwd(z, expert_index, expert_weight, expert_bias, dy) -> (dz, dweight, dbias)``:
  deterministic (no floating-point atomics), residual included in dz.
- ``lora_up(x, y, weight, bias, lora_B, scaling) -> out``: ``x W^T + b + scaling y B^T``.

This module adds their fake (meta) implementations and their autograd formulas with
``torch.library``, so each op works under autograd, ``torch.compile`` and
``torch.library.opcheck``; the layer's forward is a plain composition of the ops and the shared
float32 gate (:func:`convlora_kernels.gate.routing`), whose gradient PyTorch's autograd takes
through ``g`` (no gate recomputation needed, since the gate is ordinary PyTorch code here).

The CPU kernels exist for testing (CI has no GPU) and are correct but not fast; ``"auto"`` picks
the eager backend on the CPU.
"""

from __future__ import annotations

import torch

from .._nvtx import nvtx_range
from ..gate import routing

_BUILD_HINT = (
    "build it with `CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST='8.0;9.0' "
    "pip install --no-build-isolation -e .` (a CUDA toolkit is needed at build time; "
    "CONVLORA_BUILD_CUDA=1 makes a missing toolkit an error instead of a silent skip)"
)

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.convlora_cuda.*)

    _LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _LOAD_ERROR = f"the compiled extension convlora_kernels._C cannot be loaded ({exc})"

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def extension_loaded() -> bool:
    """True when ``convlora_kernels._C`` is built and loaded (its ops are registered)."""
    return _LOAD_ERROR is None


def unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the cuda backend cannot run ``x`` here, or None if it can.

    A CUDA tensor needs the extension; a CPU tensor runs the extension's CPU kernels (a test
    path: correct, not fast; ``backend="auto"`` uses the eager backend on the CPU).
    """
    if _LOAD_ERROR is not None:
        return f"{_LOAD_ERROR}; {_BUILD_HINT}"
    if x.device.type not in ("cuda", "cpu"):
        return f"the extension has CUDA and CPU kernels only, got a tensor on {x.device}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {x.dtype}; supported: float32, bfloat16, float16, float64"
    return None


def _no_autocast(device_type: str) -> torch.autocast:
    # The ops pick their own precision (float32 intermediates); ATen calls inside them must not
    # be re-cast by an enclosing autocast region.
    return torch.autocast(device_type, enabled=False)


if _LOAD_ERROR is None:
    _ops = torch.ops.convlora_cuda

    def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    # ------------------------------------------------------------------ fake implementations
    @torch.library.register_fake("convlora_cuda::down_proj")
    def _down_proj_fake(x, lora_A):
        n, h, w, _ = x.shape
        r = lora_A.shape[0]
        acc = _acc_dtype(x.dtype)
        return x.new_empty((n, h, w, r), dtype=acc), x.new_empty((n, r), dtype=acc)

    @torch.library.register_fake("convlora_cuda::experts_fwd")
    def _experts_fwd_fake(z, expert_index, expert_weight, expert_bias):
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    @torch.library.register_fake("convlora_cuda::experts_bwd")
    def _experts_bwd_fake(z, expert_index, expert_weight, expert_bias, dy):
        return (
            torch.empty_like(z, memory_format=torch.contiguous_format),
            torch.empty_like(expert_weight, memory_format=torch.contiguous_format),
            torch.empty_like(expert_bias, memory_format=torch.contiguous_format),
        )

    @torch.library.register_fake("convlora_cuda::lora_up")
    def _lora_up_fake(x, y, weight, bias, lora_B, scaling):
        n, h, w, _ = x.shape
        return x.new_empty((n, h, w, weight.shape[0]))

    # ------------------------------------------------------------------ autograd
    def _down_proj_setup(ctx, inputs, output):
        x, lora_A = inputs
        ctx.save_for_backward(x, lora_A)

    def _down_proj_backward(ctx, dz, dg):
        x, lora_A = ctx.saved_tensors
        n, h, w, c_in = x.shape
        r = lora_A.shape[0]
        acc = _acc_dtype(x.dtype)
        dzt = torch.zeros((n, h, w, r), dtype=acc, device=x.device) if dz is None else dz
        if dg is not None:  # g = mean over the map: each token gets dg / (H*W)
            dzt = dzt + (dg / (h * w)).view(n, 1, 1, r)
        dzt = dzt.reshape(n * h * w, r).to(x.dtype)
        dx = d_a = None
        with _no_autocast(x.device.type):
            if ctx.needs_input_grad[0]:
                dx = (dzt @ lora_A).view(n, h, w, c_in)
            if ctx.needs_input_grad[1]:
                d_a = dzt.t() @ x.reshape(n * h * w, c_in)
        return dx, d_a

    torch.library.register_autograd(
        "convlora_cuda::down_proj", _down_proj_backward, setup_context=_down_proj_setup
    )

    def _experts_fwd_setup(ctx, inputs, output):
        z, expert_index, expert_weight, expert_bias = inputs
        ctx.save_for_backward(z, expert_index, expert_weight, expert_bias)

    def _experts_fwd_backward(ctx, dy):
        z, expert_index, expert_weight, expert_bias = ctx.saved_tensors
        dz, dweight, dbias = _ops.experts_bwd(
            z, expert_index, expert_weight, expert_bias, dy.to(z.dtype).contiguous()
        )
        return dz, None, dweight, dbias

    torch.library.register_autograd(
        "convlora_cuda::experts_fwd", _experts_fwd_backward, setup_context=_experts_fwd_setup
    )

    def _lora_up_setup(ctx, inputs, output):
        x, y, weight, bias, lora_B, scaling = inputs
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, y, weight, lora_B)

    def _lora_up_backward(ctx, dout):
        x, y, weight, lora_B = ctx.saved_tensors
        n, h, w, c_in = x.shape
        c_out, r = lora_B.shape
        m = n * h * w
        need_x, need_y, need_w, need_b, need_lb = ctx.needs_input_grad[:5]
        d2 = dout.reshape(m, c_out).to(x.dtype)
        dx = dy = dw = db = dlb = None
        with _no_autocast(x.device.type):
            if need_x and need_y:
                # dx and dy in one pass over dout: dout [W | B | 0] (padded so rows stay aligned).
                pad = (-(c_in + r)) % 8
                cols = [weight, lora_B] + ([weight.new_zeros(c_out, pad)] if pad else [])
                both = d2 @ torch.cat(cols, dim=1)
                dx = both[:, :c_in].view(n, h, w, c_in)
                dy = both[:, c_in : c_in + r]
            elif need_x:
                dx = (d2 @ weight).view(n, h, w, c_in)
            elif need_y:
                dy = d2 @ lora_B
            if dy is not None:
                dy = (dy.to(y.dtype) * ctx.scaling).view(n, h, w, r)
            if need_w:
                dw = d2.t() @ x.reshape(m, c_in)
            if need_b and ctx.has_bias:
                db = d2.sum(0)
            if need_lb:
                dlb = (d2.t() @ y.reshape(m, r).to(x.dtype)) * ctx.scaling
        return dx, dy, dw, db, dlb, None

    torch.library.register_autograd(
        "convlora_cuda::lora_up", _lora_up_backward, setup_context=_lora_up_setup
    )


def conv_lora_forward(
    x: torch.Tensor,
    x_down: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    scaling: float,
    expert_index: torch.Tensor | None,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's forward on the extension's ops; autograd differentiates it.

    Args:
        x: (N, H, W, C_in) input of the frozen Linear.
        x_down: (N, H, W, C_in) input of the down-projection (x after LoRA dropout; may be x).
        weight: (C_out, C_in); bias: (C_out,) or None.
        lora_A: (r, C_in); lora_B: (C_out, r).
        expert_weight: (E, r, r, 3, 3) or (E, r, 1, 3, 3); expert_bias: (E, r).
        w_gate, w_noise: (r, E).
        scaling: lora_alpha / r.
        expert_index: (N,) long forced routing, or None to route with the gate.
        noise: (N, E) standard normal draws for the training-mode gate, or None.
    Returns:
        out (N, H, W, C_out), expert_index (N,) long, moe_loss (0-dim, float32 or float64).

    Under autocast the GEMM operands (x, x_down, weight, bias, lora_A, lora_B) are cast to the
    autocast dtype, as F.linear would; z, y and the expert arithmetic stay float32.
    """
    why = unavailable_reason(x)
    if why is not None:
        raise RuntimeError(f"convlora cuda backend: {why}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, x_down, weight, lora_A, lora_B = (
            t.to(dtype) for t in (x, x_down, weight, lora_A, lora_B)
        )
        bias = None if bias is None else bias.to(dtype)
    if expert_index is not None:
        expert_index = expert_index.long()
    with _no_autocast(device_type):
        with nvtx_range("convlora.down_proj"):
            z, g = _ops.down_proj(x_down.contiguous(), lora_A.contiguous())
        with nvtx_range("convlora.gate"):
            expert_index, moe_loss = routing(g, w_gate, w_noise, noise, expert_index)
        with nvtx_range("convlora.experts"):
            y = _ops.experts_fwd(z, expert_index, expert_weight, expert_bias)
        with nvtx_range("convlora.up_proj"):
            out = _ops.lora_up(x, y, weight, bias, lora_B, float(scaling))
    return out, expert_index, moe_loss
