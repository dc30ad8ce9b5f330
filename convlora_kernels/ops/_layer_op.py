"""The fused layer as two dispatcher ops plus their autograd: the glue every fused backend shares.

A fused backend (triton, cuda) supplies two implementations with these signatures and gets back
registered ops whose fake (meta) implementations and autograd formula live here, once:

``fwd(x, x_down, weight, bias, lora_A, lora_B, expert_weight, expert_bias, w_gate, w_noise,
scaling, expert_index, noise) -> (out, index, moe_loss, z, g, y)``

- x: (N, H, W, C_in); x_down: None when the down-projection reads x itself, else x after
  dropout, same shape. weight: (C_out, C_in); bias: (C_out,) or None; lora_A: (r, C_in);
  lora_B: (C_out, r); expert_weight: (E, r, r|1, 3, 3); expert_bias: (E, r); w_gate, w_noise:
  (r, E); expert_index: (N,) forced routing or None; noise: (N, E) gate noise or None.
- out: (N, H, W, C_out) in x's dtype; index: (N,) long; moe_loss: 0-dim; z, y: (N*H*W, r)
  (z = x_down A^T, y = z + expert(z)); g: (N, r) per-sample mean of z. z, g, y and moe_loss
  are float32 (float64 for float64 x). The gate runs inside fwd (the backend's gate kernel).

``bwd(dout, x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias, z, y, dgs,
expert_index, scaling, need_dx) -> (dx, dx_down, d_lora_A, d_lora_B, d_expert_weight,
d_expert_bias)``

- dout: (N, H, W, C_out) contiguous; dgs: (N, r), the gradient reaching g divided by H*W
  (every token's share of the mean). dx: (N, H, W, C_in) with row stride ``dx_row_stride``
  (see :func:`define_layer_ops`), or an empty tensor when not need_dx;
  dx_down: x_down's gradient, or an empty tensor when x_down is None (then dz A is in dx).

What the forward saves for the backward: x (and x_down), the parameters, and z, g, y: r-wide
tensors. U and V are recomputed. y is kept so dy and dB come from dout before the expert
backward runs. The gate (N x r x E) is recomputed by ``gate_backward`` when its loss has a
gradient (training with the noisy gate).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Written out (not inferred from a backend's annotations) so every backend registers the same op.
FWD_SCHEMA = (
    "(Tensor x, Tensor? x_down, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "Tensor expert_weight, Tensor expert_bias, Tensor w_gate, Tensor w_noise, float scaling, "
    "Tensor? expert_index, Tensor? noise) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor dout, Tensor x, Tensor? x_down, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor expert_weight, Tensor expert_bias, Tensor z, Tensor y, Tensor dgs, "
    "Tensor expert_index, float scaling, bool need_dx) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of z, g, y and moe_loss for storage dtype ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(x, x_down, weight, bias, lora_A, lora_B, expert_weight, expert_bias, w_gate,
              w_noise, scaling, expert_index, noise):
    n, h, w, _ = x.shape
    r = lora_A.shape[0]
    acc = acc_dtype(x.dtype)
    return (
        x.new_empty((n, h, w, weight.shape[0])),
        x.new_empty((n,), dtype=torch.long),
        x.new_empty((), dtype=acc),
        x.new_empty((n * h * w, r), dtype=acc),
        x.new_empty((n, r), dtype=acc),
        x.new_empty((n * h * w, r), dtype=acc),
    )


def _make_bwd_fake(dx_row_stride: Callable[[int, int], int]):
    def bwd_fake(dout, x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias, z, y, dgs,
                 expert_index, scaling, need_dx):
        n, h, w, c_in = x.shape
        ld = dx_row_stride(c_in, lora_A.shape[0])
        dx = x.new_empty_strided((n, h, w, c_in), (h * w * ld, w * ld, ld, 1))
        return (dx if need_dx else x.new_empty((0,)),) + _grads_fake(x, x_down, lora_A, lora_B,
                                                                      expert_weight, expert_bias)

    return bwd_fake


def _grads_fake(x, x_down, lora_A, lora_B, expert_weight, expert_bias):
    return (
        x.new_empty((0,)) if x_down is None else torch.empty_like(
            x_down, memory_format=torch.contiguous_format),
        torch.empty_like(lora_A, memory_format=torch.contiguous_format),
        torch.empty_like(lora_B, memory_format=torch.contiguous_format),
        torch.empty_like(expert_weight, memory_format=torch.contiguous_format),
        torch.empty_like(expert_bias, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    (x, x_down, weight, bias, lora_A, lora_B, expert_weight, expert_bias, w_gate, w_noise,
     scaling, expert_index, noise) = inputs
    _, index, _, z, g, y = output
    # z, g, y are outputs for the backward's sake only: no zero-filled gradients for them (three
    # launches, and M x r writes, per backward).
    ctx.set_materialize_grads(False)
    ctx.scaling = scaling
    ctx.routed = expert_index is None
    ctx.has_x_down = x_down is not None
    ctx.has_noise = noise is not None
    ctx.save_for_backward(x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias,
                          w_gate, w_noise, noise, z, g, y, index)


def _make_backward(bwd_op, gate_backward):
    def backward(ctx, dout, d_index, dmoe, d_z, d_g, d_y):
        (x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias, w_gate, w_noise, noise,
         z, g, y, index) = ctx.saved_tensors
        _, h, w, _ = x.shape
        needs = ctx.needs_input_grad
        if ctx.routed and ctx.has_noise and dmoe is not None:
            dgs, dwg, dwn = gate_backward(g, w_gate, w_noise, noise, dmoe, 1.0 / (h * w))
        else:  # eval or forced routing: the loss counts samples, it has no gradient
            dgs, dwg, dwn = torch.zeros_like(g), torch.zeros_like(w_gate), torch.zeros_like(w_noise)
        if dout is None:
            dout = x.new_zeros(x.shape[:-1] + (weight.shape[0],))
        dx, dx_down, d_a, d_b, d_ew, d_eb = bwd_op(
            dout.contiguous(), x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias, z,
            y, dgs, index, ctx.scaling, bool(needs[0]),
        )
        d_w = d_bias = None
        if needs[2] or needs[3]:  # the frozen Linear made trainable: plain PyTorch
            dout2d = dout.reshape(-1, weight.shape[0])
            if needs[2]:
                d_w = (dout2d.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
            if needs[3]:
                d_bias = dout2d.sum(0)
        return (
            dx if needs[0] else None,
            dx_down if ctx.has_x_down and needs[1] else None,
            d_w, d_bias, d_a, d_b, d_ew, d_eb,
            dwg.to(w_gate.dtype), dwn.to(w_noise.dtype),
            None, None, None,
        )

    return backward


def define_layer_ops(namespace: str, fwd_impl: Callable, bwd_impl: Callable,
                     gate_backward: Callable, register: Callable = torch.library.custom_op,
                     dx_row_stride: Callable[[int, int], int] = lambda c_in, r: c_in):
    """Register ``{namespace}::conv_lora_fwd`` / ``conv_lora_bwd`` with fakes and autograd.

    ``register(qualname, fn, mutates_args=(), schema=...)`` is ``torch.library.custom_op`` (opaque to
    Inductor) or ``torch.library.triton_op`` (Inductor sees the Triton kernels).
    ``dx_row_stride(C_in, r)`` is the row stride of the dx the backward returns (C_in when it is
    contiguous; the fake must report the real layout). ``gate_backward(g, w_gate, w_noise,
    noise, dmoe, dg_scale) -> (dg * dg_scale in g's dtype, d_w_gate, d_w_noise)`` differentiates
    the training gate's moe_loss (the backend's gate kernel). Returns (fwd_op, bwd_op).
    """
    fwd = register(f"{namespace}::conv_lora_fwd", fwd_impl, mutates_args=(), schema=FWD_SCHEMA)
    bwd = register(f"{namespace}::conv_lora_bwd", bwd_impl, mutates_args=(), schema=BWD_SCHEMA)
    fwd.register_fake(_fwd_fake)
    bwd.register_fake(_make_bwd_fake(dx_row_stride))
    fwd.register_autograd(_make_backward(bwd, gate_backward), setup_context=_setup_context)
    return fwd, bwd


def prepare_inputs(x, x_down, weight, bias):
    """Cast the frozen Linear's operands as ``F.linear`` under autocast would.

    Returns (x, x_down or None when it is x, weight, bias), all in x's (autocast) dtype.
    """
    same = x_down is x
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        x_down = x if same else x_down.to(dtype)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    return x, None if same else x_down, weight, bias
