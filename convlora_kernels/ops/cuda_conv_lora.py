"""``backend="cuda"``: the Conv-LoRA layer on the compiled extension ``convlora_kernels._C``.

The extension registers three dispatcher ops in the namespace ``convlora_cuda`` (schemas in
``csrc/ops.cpp``), each with a CUDA kernel and a CPU kernel built from the same per-element
arithmetic (``csrc/convlora_math.h``):

- ``down_proj(x, lora_A, cat_cols=0) -> (z, g, xcat)``: ``z = x A^T`` (N, H, W, r) and
  ``g = mean_{H,W} z`` (N, r), both float32 (float64 for float64 x) whatever x's dtype; with
  ``cat_cols > 0`` it also writes the up-projection's ``[x | 0]`` operand (N, H, W, cat_cols) from
  the x it reads anyway.
- ``experts_fwd(z, expert_index, expert_weight, expert_bias, tf32=False) -> y``: ``y = z + D(z)``
  computing only the V samples the downsample reads (differentiable: its backward is
  ``experts_bwd``). ``tf32=True`` lets the expert conv run on tf32 tensor cores where the CUDA
  kernels have that path (float32 z, full conv, 16 <= r <= 32, sm_80+; the 3e-4 error class);
  the CPU kernels ignore it. The layer sets it for bfloat16 / float16 x.
- ``experts_bwd(z, expert_index, expert_weight, expert_bias, dy, dg=None, tf32=False) -> (dz,
  dweight, dbias)``: deterministic (no floating-point atomics), residual included in dz, and
  ``dg`` (N, r), when given, added to every pixel of its sample's dz. ``dy`` may also be
  float16 / bfloat16 with float32 z, and strided: read in place, and dz comes out in its dtype.
  ``tf32``: as the forward's, for the conv the backward recomputes.
- ``gate_fwd(g, w_gate, w_noise, noise?, expert_index?) -> (expert_index, moe_loss)`` and
  ``gate_bwd(g, w_gate, w_noise, noise, dloss, dg_scale) -> (dg, dw_gate, dw_noise)``: the
  gate and the gradient of its loss, one launch each (the eager gate is ~160 small ops).

The layer is the op pair ``convlora_cuda_layer::conv_lora_fwd`` / ``conv_lora_bwd``
(:mod:`convlora_kernels.ops._layer_op`: the same signatures, fakes and autograd as the Triton
backend) built from those ops and cuBLAS GEMMs (through ATen). The composition is C++
(``csrc/layer.cpp``): ``layer_fwd_head`` (down-projection, gate, experts) and ``layer_fwd_up``
forward, ``layer_bwd_dy`` and ``layer_bwd_rest`` backward, split where the optional gate factor's
PyTorch ops go, so a layer call crosses from Python into C++ twice each way:

- forward: ``out = [x | y | 0] [W | s B | 0]^T + b``, one GEMM with K = C_in + r rounded up to 8
  (tensor-core alignment), whose left operand down_proj wrote (one extra write of x, no extra
  read). When C_in > C_out the copy of x costs more than it saves: ``x W^T + b`` then
  ``out += s y B^T`` (a second pass over out).
- backward: ``[dx | dy | .] = dout [W | s B | 0]`` (one GEMM reads dout for both), the expert
  backward, then ``dx += dz A`` in place (beta = 1: one read and write of dx instead of a second
  dx tensor and autograd's sum of the two, 60 MB less at SAM ViT-B's windowed shape in bf16);
  dB = dout^T y (the second read of dout); dA = dz^T x. dx is a column slice of the first GEMM's
  output: row stride C_in + r rounded up to 8 (the fake declares it).

Eager calls go through one more op, ``convlora_cuda::layer``: the same pieces and backward
formula (multiply_by_gate's gate factor included) as one native autograd node, no Python inside
the layer in either direction (``_layer_op.LayerOps``).

The CPU kernels exist for testing (CI has no GPU) and are correct but not fast; ``"auto"`` picks
the eager backend on the CPU.
"""

from __future__ import annotations

import functools

import torch

from .._nvtx import nvtx_range
from ._layer_op import (acc_dtype, apply_gate_factor, define_layer_ops, gate_factor_backward,
                        prepare_inputs)

_BUILD_HINT = (
    "build it with `CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST='8.0;9.0' "
    "pip install --no-build-isolation -e .` (a CUDA toolkit is needed at build time; "
    "CONVLORA_BUILD_CUDA=1 makes a missing toolkit an error instead of a silent skip)"
)

#: The ops this module needs from the extension (csrc/ops.cpp, csrc/layer.cpp).
_OPS = ("down_proj", "experts_fwd", "experts_bwd", "gate_fwd", "gate_bwd", "layer_fwd_head",
        "layer_fwd_up", "layer_bwd_dy", "layer_bwd_rest", "layer")


def _load_extension() -> str | None:
    """Load ``convlora_kernels._C``; the reason it cannot serve, or None."""
    try:
        from .. import _C  # noqa: F401  (loading the library registers torch.ops.convlora_cuda.*)
    except ImportError as exc:  # not built, or built against another torch
        return f"the compiled extension convlora_kernels._C cannot be loaded ({exc})"
    missing = [op for op in _OPS if not torch._C._dispatch_has_kernel(f"convlora_cuda::{op}")]
    if missing:  # an editable install whose _C predates the Python side
        return (f"the compiled extension convlora_kernels._C is out of date (no op "
                f"{', '.join(missing)}): rebuild it")
    return None


_LOAD_ERROR = _load_extension()

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


def _autocast_off(fn):
    """Run ``fn(t, ...)`` with autocast disabled on ``t``'s device when it is enabled: the layer
    picks its own precisions (float32 intermediates). The C++ composition excludes autocast
    itself; this covers the Python gate-factor ops between its pieces."""
    @functools.wraps(fn)
    def wrapper(t, *args):
        if not torch.is_autocast_enabled(t.device.type):
            return fn(t, *args)
        with torch.autocast(t.device.type, enabled=False):
            return fn(t, *args)
    return wrapper


def _gemm_cols(c_in: int, r: int) -> int:
    """Width of the [x | y | 0] and [dx | dy | 0] GEMM operands, C_in + r rounded up to 8 (16-byte
    aligned rows): the row stride of the dx the backward returns. Must equal ``gemm_cols`` in
    csrc/layer.cpp (the fake declares it; opcheck and the compile tests compare)."""
    return (c_in + r + 7) // 8 * 8


if _LOAD_ERROR is None:
    _ops = torch.ops.convlora_cuda

    # ------------------------------------------------------------------ fake implementations
    @torch.library.register_fake("convlora_cuda::down_proj")
    def _down_proj_fake(x, lora_A, cat_cols=0):
        n, h, w, _ = x.shape
        r = lora_A.shape[0]
        acc = acc_dtype(x.dtype)
        xcat = x.new_empty((n, h, w, cat_cols) if cat_cols > 0 else (0,))
        return x.new_empty((n, h, w, r), dtype=acc), x.new_empty((n, r), dtype=acc), xcat

    @torch.library.register_fake("convlora_cuda::experts_fwd")
    def _experts_fwd_fake(z, expert_index, expert_weight, expert_bias, tf32=False):
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    @torch.library.register_fake("convlora_cuda::experts_bwd")
    def _experts_bwd_fake(z, expert_index, expert_weight, expert_bias, dy, dg=None, tf32=False):
        return (
            torch.empty_like(z, dtype=dy.dtype, memory_format=torch.contiguous_format),
            torch.empty_like(expert_weight, memory_format=torch.contiguous_format),
            torch.empty_like(expert_bias, memory_format=torch.contiguous_format),
        )

    @torch.library.register_fake("convlora_cuda::gate_fwd")
    def _gate_fwd_fake(g, w_gate, w_noise, noise, expert_index):
        return g.new_empty((g.shape[0],), dtype=torch.long), g.new_empty(())

    @torch.library.register_fake("convlora_cuda::gate_bwd")
    def _gate_bwd_fake(g, w_gate, w_noise, noise, dloss, dg_scale):
        return torch.empty_like(g), g.new_empty(w_gate.shape), g.new_empty(w_gate.shape)

    def _gate_backward(g, w_gate, w_noise, noise, dmoe, dg_scale):
        """The training gate's loss gradient in one launch (the _layer_op gate_backward)."""
        if w_gate.shape[1] == 1:  # one expert: the loss is the constant 0
            return torch.zeros_like(g), torch.zeros_like(w_gate), torch.zeros_like(w_noise)
        return _ops.gate_bwd(g, w_gate.to(g.dtype), w_noise.to(g.dtype), noise.to(g.dtype),
                             dmoe.to(g.dtype), float(dg_scale))

    def _experts_fwd_setup(ctx, inputs, output):
        z, expert_index, expert_weight, expert_bias = inputs[:4]
        ctx.tf32 = inputs[4] if len(inputs) > 4 else False
        ctx.save_for_backward(z, expert_index, expert_weight, expert_bias)

    def _experts_fwd_backward(ctx, dy):
        z, expert_index, expert_weight, expert_bias = ctx.saved_tensors
        dz, dweight, dbias = _ops.experts_bwd(
            z, expert_index, expert_weight, expert_bias, dy.to(z.dtype).contiguous(), None,
            ctx.tf32,
        )
        return dz, None, dweight, dbias, None

    torch.library.register_autograd(
        "convlora_cuda::experts_fwd", _experts_fwd_backward, setup_context=_experts_fwd_setup
    )

    # ------------------------------------------------------------------ the layer
    # The composition is C++ (csrc/layer.cpp: two ops each way, split where the optional gate
    # factor's PyTorch ops sit); see the module docstring for the GEMM layout.
    @_autocast_off
    def _fwd_impl(x, x_down, weight, bias, lora_A, lora_B, expert_weight, expert_bias, w_gate,
                  w_noise, scaling, expert_index, noise, multiply_by_gate):
        z, g, xcat, index, moe_loss, y = _ops.layer_fwd_head(
            x, x_down, weight, lora_A, expert_weight, expert_bias, w_gate, w_noise, expert_index,
            noise)
        gate_outputs = ()
        if multiply_by_gate:
            with nvtx_range("convlora.cuda.gate_factor"):
                y, gate_p, d = apply_gate_factor(z, y, g, w_gate, w_noise, noise, index)
            gate_outputs = (gate_p, d)
        out = _ops.layer_fwd_up(x, xcat, y, weight, bias, lora_B, scaling)
        return (out, index, moe_loss, z, g, y) + gate_outputs

    @_autocast_off
    def _bwd_impl(dout, x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias, z, y,
                  dgs, expert_index, scaling, need_dx, gate):
        dxy, dy = _ops.layer_bwd_dy(dout, x, weight, lora_B, scaling, need_dx)
        dd, gate_grads = None, ()  # dd: the expert output's gradient, when it is not dy
        if gate:
            with nvtx_range("convlora.cuda.bwd.gate_factor"):
                n, h, w, r = dy.shape
                dd, dgs, *gate_grads = gate_factor_backward(dy.view(-1, r), dgs, *gate,
                                                            expert_index)
                dd = dd.view(n, h, w, r)
        grads = _ops.layer_bwd_rest(dout, x, x_down, lora_A, lora_B, expert_weight, expert_bias,
                                    z, y, dgs, expert_index, dxy, dy, dd, scaling)
        # dx: the first C_in columns of the dx/dy GEMM's output (finished in place by bwd_rest).
        dx = dxy[:, :x.shape[-1]].view(x.shape) if need_dx else x.new_empty((0,))
        return (dx, *grads, *gate_grads)

    _LAYER = define_layer_ops(
        "convlora_cuda_layer", _fwd_impl, _bwd_impl, _gate_backward,
        dx_row_stride=lambda c_in, r: _gemm_cols(c_in, r), native=_ops.layer,
    )
    conv_lora_fwd, conv_lora_bwd, conv_lora_gated_fwd, conv_lora_gated_bwd = _LAYER[:4]


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
    multiply_by_gate: bool = False,
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
        multiply_by_gate: scale each sample's expert output by the gate's probability.
    Returns:
        out (N, H, W, C_out), expert_index (N,) long, moe_loss (0-dim, float32 or float64).

    Under autocast the GEMM operands (x, x_down, bias; weight, lora_A and lora_B inside the op)
    are cast to the autocast dtype, as F.linear would; z, y and the expert arithmetic stay
    float32.
    """
    why = unavailable_reason(x)
    if why is not None:
        raise RuntimeError(f"convlora cuda backend: {why}")
    # The weight stays as it is: the ops cast it into their packed [W | s B | 0] operand (one
    # launch and one C_out x C_in copy less per call under autocast than casting it here).
    x, x_down, weight, bias = prepare_inputs(x, x_down, weight, bias, cast_weight=False)
    if expert_index is not None:
        expert_index = expert_index.long()
    out, index, moe_loss = _LAYER(
        multiply_by_gate, x, x_down, weight, bias, lora_A, lora_B, expert_weight, expert_bias,
        w_gate, w_noise, float(scaling), expert_index, noise,
    )[:3]
    return out, index, moe_loss
