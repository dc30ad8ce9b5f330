"""``backend="cuda"``: the Conv-LoRA layer on the compiled extension ``convlora_kernels._C``.

The extension registers three dispatcher ops in the namespace ``convlora_cuda`` (schemas in
``csrc/ops.cpp``), each with a CUDA kernel and a CPU kernel built from the same per-element
arithmetic (``csrc/convlora_math.h``):

- ``down_proj(x, lora_A, cat_cols=0) -> (z, g, xcat)``: ``z = x A^T`` (N, H, W, r) and
  ``g = mean_{H,W} z`` (N, r), both float32 (float64 for float64 x) whatever x's dtype; with
  ``cat_cols > 0`` it also writes the up-projection's ``[x | 0]`` operand (N, H, W, cat_cols) from
  the x it reads anyway.
- ``experts_fwd(z, expert_index, expert_weight, expert_bias) -> y``: ``y = z + D(z)`` computing
  only the V samples the downsample reads (differentiable: its backward is ``experts_bwd``).
- ``experts_bwd(z, expert_index, expert_weight, expert_bias, dy) -> (dz, dweight, dbias)``:
  deterministic (no floating-point atomics), residual included in dz.
- ``gate_fwd(g, w_gate, w_noise, noise?, expert_index?) -> (expert_index, moe_loss)`` and
  ``gate_bwd(g, w_gate, w_noise, noise, dloss, dg_scale) -> (dg, dw_gate, dw_noise)``: the
  gate and the gradient of its loss, one launch each (the eager gate is ~160 small ops).

The layer is the op pair ``convlora_cuda_layer::conv_lora_fwd`` / ``conv_lora_bwd``
(:mod:`convlora_kernels.ops._layer_op`: the same signatures, fakes and autograd as the Triton
backend) built from those ops and cuBLAS GEMMs (through ATen):

- forward: ``out = [x | y | 0] [W | s B | 0]^T + b``, one GEMM with K = C_in + r rounded up to 8
  (tensor-core alignment), whose left operand down_proj wrote (one extra write of x, no extra
  read). When C_in > C_out the copy of x costs more than it saves: ``x W^T + b`` then
  ``out += s y B^T`` (a second pass over out).
- backward: ``[dx | dy | .] = dout [W | B | 0]`` (one GEMM reads dout for both), the expert
  backward, then ``dx += dz A`` in place (beta = 1: one read and write of dx instead of a second
  dx tensor and autograd's sum of the two, 60 MB less at SAM ViT-B's windowed shape in bf16);
  dB = dout^T y (the second read of dout); dA = dz^T x. dx is a column slice of the first GEMM's
  output: row stride C_in + r rounded up to 8 (the fake declares it).

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

#: The ops this module needs from the extension (csrc/ops.cpp).
_OPS = ("down_proj", "experts_fwd", "experts_bwd", "gate_fwd", "gate_bwd")


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
    """Run ``fn(t, ...)`` with autocast disabled on ``t``'s device: the layer picks its own
    precisions (float32 intermediates), and the ATen GEMMs inside it must not be re-cast by an
    enclosing autocast region."""
    @functools.wraps(fn)
    def wrapper(t, *args):
        with torch.autocast(t.device.type, enabled=False):
            return fn(t, *args)
    return wrapper


def _round_up(v: int, k: int) -> int:
    return (v + k - 1) // k * k


def _gemm_cols(c_in: int, r: int) -> int:
    """Width of the [x | y | 0] and [dx | dy | 0] GEMM operands: 16-byte aligned rows."""
    return _round_up(c_in + r, 8)


def _up_proj(x2d: torch.Tensor, xcat: torch.Tensor | None, y: torch.Tensor,
             weight: torch.Tensor, bias: torch.Tensor | None, lora_B: torch.Tensor,
             scaling: float) -> torch.Tensor:
    """out = x W^T + b + scaling y B^T, (M, C_out) in x's dtype.

    x2d: (M, C_in); xcat: (M, _gemm_cols) with x in its first C_in columns and zeros after, or
    None; y: (M, r) float32/64, rounded to x's dtype for the GEMM as eager autocast code would.
    """
    m, c_in = x2d.shape
    c_out, r = lora_B.shape
    b_low = lora_B.to(x2d.dtype)
    if c_in > c_out:  # the copy of x would cost more than a second pass over out
        out = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        return out.addmm_(y.to(x2d.dtype), b_low.t(), beta=1, alpha=scaling)
    cols = _gemm_cols(c_in, r)
    if xcat is None:  # x_down differs from x (dropout): down_proj could not write the copy
        xcat = _with_columns(x2d, None, cols)
    xcat[:, c_in:c_in + r].copy_(y)  # rounds y to x's dtype
    wcat = _with_columns(weight, b_low * scaling, cols)
    return torch.addmm(bias, xcat, wcat.t()) if bias is not None else xcat @ wcat.t()


def _with_columns(a: torch.Tensor, extra: torch.Tensor | None, width: int) -> torch.Tensor:
    """[a | extra | 0], width columns in all: one concatenation launch.

    a: (rows, C); extra: (rows, r) or None (zeros there too)."""
    parts = [a] if extra is None else [a, extra]
    pad = width - sum(p.shape[1] for p in parts)
    return torch.cat(parts + ([a.new_zeros((a.shape[0], pad))] if pad else []), dim=1)


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
    def _experts_fwd_fake(z, expert_index, expert_weight, expert_bias):
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    @torch.library.register_fake("convlora_cuda::experts_bwd")
    def _experts_bwd_fake(z, expert_index, expert_weight, expert_bias, dy):
        return (
            torch.empty_like(z, memory_format=torch.contiguous_format),
            torch.empty_like(expert_weight, memory_format=torch.contiguous_format),
            torch.empty_like(expert_bias, memory_format=torch.contiguous_format),
        )

    @torch.library.register_fake("convlora_cuda::gate_fwd")
    def _gate_fwd_fake(g, w_gate, w_noise, noise, expert_index):
        return g.new_empty((g.shape[0],), dtype=torch.long), g.new_empty(())

    @torch.library.register_fake("convlora_cuda::gate_bwd")
    def _gate_bwd_fake(g, w_gate, w_noise, noise, dloss, dg_scale):
        return torch.empty_like(g), g.new_empty(w_gate.shape), g.new_empty(w_gate.shape)

    def _gate_forward(g, w_gate, w_noise, noise, expert_index):
        """routing (gate.py) in one launch: (expert_index (N,) long, moe_loss 0-dim)."""
        return _ops.gate_fwd(g, w_gate.to(g.dtype), w_noise.to(g.dtype),
                             None if noise is None else noise.to(g.dtype), expert_index)

    def _gate_backward(g, w_gate, w_noise, noise, dmoe, dg_scale):
        """The training gate's loss gradient in one launch (the _layer_op gate_backward)."""
        if w_gate.shape[1] == 1:  # one expert: the loss is the constant 0
            return torch.zeros_like(g), torch.zeros_like(w_gate), torch.zeros_like(w_noise)
        return _ops.gate_bwd(g, w_gate.to(g.dtype), w_noise.to(g.dtype), noise.to(g.dtype),
                             dmoe.to(g.dtype), float(dg_scale))

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

    # ------------------------------------------------------------------ the layer
    @_autocast_off
    def _fwd_impl(x, x_down, weight, bias, lora_A, lora_B, expert_weight, expert_bias, w_gate,
                  w_noise, scaling, expert_index, noise, multiply_by_gate):
        n, h, w, c_in = x.shape
        m = n * h * w
        r = lora_A.shape[0]
        c_out = weight.shape[0]
        fold = x_down is None and c_in <= c_out  # down_proj writes [x | 0] for the up GEMM
        xd = x if x_down is None else x_down
        with nvtx_range("convlora.cuda.down_proj"):
            z, g, xcat = _ops.down_proj(xd.contiguous(), lora_A.to(x.dtype).contiguous(),
                                        _gemm_cols(c_in, r) if fold else 0)
        with nvtx_range("convlora.cuda.gate"):
            index, moe_loss = _gate_forward(g, w_gate, w_noise, noise, expert_index)
        with nvtx_range("convlora.cuda.experts"):
            y = _ops.experts_fwd(z, index, expert_weight, expert_bias).view(m, r)
            gate_outputs = ()
            if multiply_by_gate:
                y, gate_p, d = apply_gate_factor(z.view(m, r), y, g, w_gate, w_noise, noise, index)
                gate_outputs = (gate_p, d)
        with nvtx_range("convlora.cuda.up_proj"):
            out = _up_proj(x.reshape(m, c_in), xcat.view(m, -1) if fold else None,
                           y, weight, bias, lora_B, scaling)
        return (out.view(n, h, w, c_out), index, moe_loss, z.view(m, r), g, y) + gate_outputs

    @_autocast_off
    def _bwd_impl(dout, x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias, z, y,
                  dgs, expert_index, scaling, need_dx, gate):
        n, h, w, c_in = x.shape
        m = n * h * w
        r = lora_A.shape[0]
        c_out = weight.shape[0]
        d2 = dout.reshape(m, c_out).to(x.dtype)
        a_low, b_low = lora_A.to(x.dtype), lora_B.to(x.dtype)
        with nvtx_range("convlora.cuda.bwd.dx_dy"):
            if need_dx:  # dx and dy from one read of dout
                both = d2 @ _with_columns(weight, b_low, _gemm_cols(c_in, r))
                dx, dy = both[:, :c_in], both[:, c_in:c_in + r]
            else:
                dx, dy = x.new_empty((0,)), d2 @ b_low
            dy = (dy.to(z.dtype) * scaling).view(n, h, w, r)
        dd, gate_grads = dy, ()  # dd: the expert output's gradient
        if gate:
            with nvtx_range("convlora.cuda.bwd.gate_factor"):
                dd, dgs, *gate_grads = gate_factor_backward(dy.view(m, r), dgs, *gate, expert_index)
                dd = dd.view(n, h, w, r)
        with nvtx_range("convlora.cuda.bwd.experts"):
            dz, d_ew, d_eb = _ops.experts_bwd(z.view(n, h, w, r), expert_index, expert_weight,
                                              expert_bias, dd)
            dz = dz + dgs.view(n, 1, 1, r)  # g = mean: each token gets dg / HW
            if gate:  # the kernel's residual term was dd = p dy, not dy
                dz += dy - dd
            dz = dz.view(m, r)
            dz_low = dz.to(x.dtype)
        with nvtx_range("convlora.cuda.bwd.dx"):
            if x_down is None:
                if need_dx:
                    dx.addmm_(dz_low, a_low)  # in place, beta = 1: no second dx, no sum
                dx_down = x.new_empty((0,))
            else:
                dx_down = (dz_low @ a_low).view(x_down.shape)
            if need_dx:
                dx = dx.view(n, h, w, c_in)
        with nvtx_range("convlora.cuda.bwd.dA_dB"):
            xd2d = (x if x_down is None else x_down).reshape(m, c_in)
            d_a = (dz_low.t() @ xd2d).to(lora_A.dtype)
            d_b = ((d2.t() @ y.to(x.dtype)) * scaling).to(lora_B.dtype)
        return (dx, dx_down, d_a, d_b, d_ew, d_eb, *gate_grads)

    _LAYER = define_layer_ops(
        "convlora_cuda_layer", _fwd_impl, _bwd_impl, _gate_backward,
        dx_row_stride=lambda c_in, r: _gemm_cols(c_in, r),
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

    Under autocast the GEMM operands (x, x_down, weight, bias; lora_A and lora_B inside the op)
    are cast to the autocast dtype, as F.linear would; z, y and the expert arithmetic stay
    float32.
    """
    why = unavailable_reason(x)
    if why is not None:
        raise RuntimeError(f"convlora cuda backend: {why}")
    x, x_down, weight, bias = prepare_inputs(x, x_down, weight, bias)
    if expert_index is not None:
        expert_index = expert_index.long()
    out, index, moe_loss = _LAYER(
        multiply_by_gate, x, x_down, weight, bias, lora_A, lora_B, expert_weight, expert_bias,
        w_gate, w_noise, float(scaling), expert_index, noise,
    )[:3]
    return out, index, moe_loss
