"""The fused layer as dispatcher ops plus their autograd: the glue every fused backend shares.

A fused backend (triton, cuda) supplies two implementations and gets back registered ops whose
fake (meta) implementations and autograd formula live here, once: the layer pair
``conv_lora_fwd`` / ``conv_lora_bwd`` and, for ``multiply_by_gate``, the pair
``conv_lora_gated_fwd`` / ``conv_lora_gated_bwd`` (same inputs, two more tensors each way).

``fwd(x, x_down, weight, bias, lora_A, lora_B, expert_weight, expert_bias, w_gate, w_noise,
scaling, expert_index, noise) -> (out, index, moe_loss, z, g, y)``; ``gated_fwd`` adds
``(gate_p, d)``.

- x: (N, H, W, C_in); x_down: None when the down-projection reads x itself, else x after
  dropout, same shape. weight: (C_out, C_in); bias: (C_out,) or None; lora_A: (r, C_in);
  lora_B: (C_out, r); expert_weight: (E, r, r|1, 3, 3); expert_bias: (E, r); w_gate, w_noise:
  (r, E); expert_index: (N,) forced routing or None; noise: (N, E) gate noise or None.
- out: (N, H, W, C_out) in x's dtype; index: (N,) long; moe_loss: 0-dim; z, y: (N*H*W, r)
  (z = x_down A^T, y = z + expert(z), or z + p expert(z) in the gated pair); g: (N, r)
  per-sample mean of z; gate_p: (N,) the factor p (``gate.gate_probability``); d: (N*H*W, r)
  the unscaled expert output. z, g, y, gate_p, d and moe_loss are float32 (float64 for
  float64 x). The gate runs inside fwd (the backend's gate kernel; the factor p as PyTorch
  ops, see :func:`apply_gate_factor`).

``bwd(dout, x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias, z, y, dgs,
expert_index, scaling, need_dx) -> (dx, dx_down, d_lora_A, d_lora_B, d_expert_weight,
d_expert_bias)``; ``gated_bwd`` takes ``g, w_gate, w_noise, noise, gate_p, d`` more and adds
``(d_w_gate, d_w_noise)``: the gate factor's share of those gradients (float32/64).

- dout: (N, H, W, C_out) contiguous; dgs: (N, r), the gradient reaching g divided by H*W
  (every token's share of the mean). dx: (N, H, W, C_in) with row stride ``dx_row_stride``
  (see :func:`define_layer_ops`), or an empty tensor when not need_dx;
  dx_down: x_down's gradient, or an empty tensor when x_down is None (then dz A is in dx).

What the forward saves for the backward: x (and x_down), the parameters, and z, g, y: r-wide
tensors (and gate_p, d in the gated pair). U and V are recomputed. y is kept so dy and dB
come from dout before the expert backward runs. The gate (N x r x E) is recomputed by
``gate_backward`` when its loss has a gradient (training with the noisy gate).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..gate import gate_probability, gate_probability_backward

# Written out (not inferred from a backend's annotations) so every backend registers the same op.
_FWD_ARGS = (
    "(Tensor x, Tensor? x_down, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "Tensor expert_weight, Tensor expert_bias, Tensor w_gate, Tensor w_noise, float scaling, "
    "Tensor? expert_index, Tensor? noise)"
)
_BWD_ARGS = (
    "Tensor dout, Tensor x, Tensor? x_down, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor expert_weight, Tensor expert_bias, Tensor z, Tensor y, Tensor dgs, "
    "Tensor expert_index, float scaling, bool need_dx"
)
FWD_SCHEMA = _FWD_ARGS + " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
BWD_SCHEMA = f"({_BWD_ARGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
# multiply_by_gate: a pair of its own, so the default pair's calls pay nothing for the option
# (every custom-op argument and output costs host time: schema walks, alias checks; widening the
# default schemas by 6 inputs and 2 outputs cost ~10% of a tiny layer's fwd+bwd host time here).
GATED_FWD_SCHEMA = _FWD_ARGS + " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
GATED_BWD_SCHEMA = (
    f"({_BWD_ARGS}, Tensor g, Tensor w_gate, Tensor w_noise, Tensor? noise, Tensor gate_p, "
    "Tensor d) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


#: ``CONVLORA_DISPATCH=op`` makes eager calls go through the registered ops too (the path
#: torch.compile, export and dispatch modes always take); the default ``auto`` skips them.
ENV_DISPATCH = "CONVLORA_DISPATCH"
#: Read once, at import (tests patch this constant). Measured reason: per call, the lookup cost
#: ~5 us in front of the cuda backend's native op (2026-11-28, development CPU, tiny layer:
#: 50.1 us for the op alone, 55.2 with an ``os.environ.get`` before it; 0.7 us in isolation).
DISPATCH_OP = os.environ.get(ENV_DISPATCH, "auto") == "op"


class LayerOps(NamedTuple):
    """The registered ops of one backend (the layer pair and the multiply_by_gate pair), and the
    two autograd Functions that run the same implementations without the dispatcher; ``native``,
    when the backend has one, is a compiled op that does what ``eager`` (or ``gated_eager``)
    does as one native autograd node (inputs as ``conv_lora_fwd``'s and multiply_by_gate,
    outputs its first three)."""

    fwd: Callable
    bwd: Callable
    gated_fwd: Callable
    gated_bwd: Callable
    eager: type[torch.autograd.Function]
    gated_eager: type[torch.autograd.Function]
    native: Callable | None = None

    def __call__(self, gated: bool, *inputs):
        """The layer forward (the 13 inputs of ``conv_lora_fwd``); returns the op's outputs, or
        only the first three (out, index, moe_loss) from ``native``.

        Eager calls on plain tensors skip the dispatcher: a ``torch.autograd.Function`` (or the
        backend's native node) runs the implementation and the same backward formula directly.
        Measured reason: the H200 run
        of 2026-11-28 found the layer host-bound (cuda backend: ~2.1 ms of host time per
        forward+backward against ~1.0-1.25 ms of kernels), and the custom-op route (Python
        dispatch of ``conv_lora_fwd`` and ``conv_lora_bwd``, ``register_autograd``'s argument
        binding, the gate backward op) costs 0.16-0.28 ms of that per step on the 2-core
        development machine (cuda backend's CPU kernels, tiny shape, interleaved A/B: 9-16%).
        Under torch.compile/export, inside a Python dispatch mode (fake tensors, opcheck, a
        user's TorchDispatchMode), for tensor subclasses, or with ``CONVLORA_DISPATCH=op`` at
        import, the registered ops run: same implementations, same formula. (torch.func
        transforms work on neither path, as before: torch 2.11-2.14's ``register_autograd`` does
        not support them.)
        """
        if _skip_dispatcher(inputs):
            if self.native is not None:
                return self.native(*inputs, gated)
            return (self.gated_eager if gated else self.eager).apply(*inputs)
        return (self.gated_fwd if gated else self.fwd)(*inputs)


#: The input types the dispatcher-free path takes: plain tensors and parameters (no subclass),
#: absent tensors, the scaling.
_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, type(None), float))


def _skip_dispatcher(inputs: tuple) -> bool:
    if DISPATCH_OP or torch.compiler.is_compiling():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    return _PLAIN_TYPES.issuperset(map(type, inputs))


def _make_eager_function(fwd_impl: Callable, backward: Callable, gated: bool, name: str):
    """An autograd Function whose forward is ``fwd_impl`` and whose backward is ``backward``
    (built on the implementations), with the op path's context setup."""

    def forward(ctx, *inputs):
        output = fwd_impl(*inputs, gated)
        _setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of z, g, y and moe_loss for storage dtype ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make_fwd_fake(gated: bool):
    def fwd_fake(x, x_down, weight, bias, lora_A, lora_B, expert_weight, expert_bias, w_gate,
                 w_noise, scaling, expert_index, noise):
        n, h, w, _ = x.shape
        m, r = n * h * w, lora_A.shape[0]
        acc = acc_dtype(x.dtype)
        out = (
            x.new_empty((n, h, w, weight.shape[0])),
            x.new_empty((n,), dtype=torch.long),
            x.new_empty((), dtype=acc),
            x.new_empty((m, r), dtype=acc),
            x.new_empty((n, r), dtype=acc),
            x.new_empty((m, r), dtype=acc),
        )
        return out + ((x.new_empty((n,), dtype=acc), x.new_empty((m, r), dtype=acc)) if gated else ())

    return fwd_fake


def _make_bwd_fake(dx_row_stride: Callable[[int, int], int]):
    def bwd_fake(dout, x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias, z, y, dgs,
                 expert_index, scaling, need_dx, *gate):
        n, h, w, c_in = x.shape
        ld = dx_row_stride(c_in, lora_A.shape[0])
        dx = x.new_empty_strided((n, h, w, c_in), (h * w * ld, w * ld, ld, 1))
        out = (dx if need_dx else x.new_empty((0,)),) + _grads_fake(
            x, x_down, lora_A, lora_B, expert_weight, expert_bias)
        if gate:  # (g, w_gate, w_noise, noise, gate_p, d): d_w_gate, d_w_noise in g's dtype
            out += (gate[0].new_empty(gate[1].shape), gate[0].new_empty(gate[1].shape))
        return out

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
    _, index, _, z, g, y = output[:6]
    # z, g, y (and gate_p, d) are outputs for the backward's sake only: no zero-filled gradients
    # for them (three launches, and M x r writes, per backward).
    ctx.set_materialize_grads(False)
    ctx.scaling = scaling
    ctx.routed = expert_index is None
    ctx.has_x_down = x_down is not None
    ctx.has_noise = noise is not None
    ctx.gated = len(output) == 8  # the multiply_by_gate pair: + gate_p, d
    ctx.save_for_backward(x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias,
                          w_gate, w_noise, noise, z, g, y, index, *output[6:])


def _make_backward(bwd: Callable, gated_bwd: Callable, gate_backward: Callable):
    """The layer's backward formula, on the registered ops (the dispatcher path) or on the
    implementations themselves (the eager path, :class:`LayerOps`). Once differentiable: the
    backward ops have no derivatives, so under create_graph the gradients raise if anything
    differentiates them, instead of silently missing second-order terms (backend "eager" has
    double backward)."""

    @once_differentiable
    def backward(ctx, dout, d_index, dmoe, *unused):
        (x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias, w_gate, w_noise, noise,
         z, g, y, index, *gate_saved) = ctx.saved_tensors
        _, h, w, _ = x.shape
        needs = ctx.needs_input_grad
        if ctx.routed and ctx.has_noise and dmoe is not None:
            dgs, dwg, dwn = gate_backward(g, w_gate, w_noise, noise, dmoe, 1.0 / (h * w))
        else:  # eval or forced routing: the loss counts samples, it has no gradient
            dgs, dwg, dwn = torch.zeros_like(g), torch.zeros_like(w_gate), torch.zeros_like(w_noise)
        if dout is None:
            dout = x.new_zeros(x.shape[:-1] + (weight.shape[0],))
        args = (dout.contiguous(), x, x_down, weight, lora_A, lora_B, expert_weight, expert_bias,
                z, y, dgs, index, ctx.scaling, bool(needs[0]))
        if ctx.gated:
            grads = gated_bwd(*args, g, w_gate, w_noise, noise, *gate_saved)
            dwg, dwn = dwg + grads[6], dwn + grads[7]
        else:
            grads = bwd(*args)
        dx, dx_down, d_a, d_b, d_ew, d_eb = grads[:6]
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
                     gate_backward: Callable,
                     dx_row_stride: Callable[[int, int], int] = lambda c_in, r: c_in,
                     gate_backward_impl: Callable | None = None,
                     native: Callable | None = None) -> LayerOps:
    """Register ``{namespace}::conv_lora_fwd`` / ``conv_lora_bwd`` and the multiply_by_gate pair
    ``conv_lora_gated_fwd`` / ``conv_lora_gated_bwd``, with fakes and autograd.

    ``fwd_impl(*fwd args, multiply_by_gate)`` returns 6 tensors, 8 with multiply_by_gate;
    ``bwd_impl(*bwd args, gate)`` takes ``gate`` = None or (g, w_gate, w_noise, noise, gate_p, d)
    and returns 6 tensors, 8 with ``gate`` (see the module docstring).
    The ops are ``torch.library.custom_op``s for both backends (see ``_triton_common`` for why
    the Triton ones are not ``triton_op``s).
    ``dx_row_stride(C_in, r)`` is the row stride of the dx the backward returns (C_in when it is
    contiguous; the fake must report the real layout). ``gate_backward(g, w_gate, w_noise,
    noise, dmoe, dg_scale) -> (dg * dg_scale in g's dtype, d_w_gate, d_w_noise)`` differentiates
    the training gate's moe_loss (the backend's gate kernel); ``gate_backward_impl`` is the same
    without the dispatcher (for the eager path; default ``gate_backward``). ``native``: see
    :class:`LayerOps` (it must compute what the eager Functions compute, bit for bit; its last
    argument is multiply_by_gate).
    """
    def layer_fwd(*args):
        return fwd_impl(*args, False)

    def layer_bwd(*args):
        return bwd_impl(*args, None)

    def gated_fwd(*args):
        return fwd_impl(*args, True)

    def gated_bwd(*args):  # the 14 layer arguments, then (g, w_gate, w_noise, noise, gate_p, d)
        return bwd_impl(*args[:14], args[14:])

    ops = {
        key: torch.library.custom_op(f"{namespace}::{name}", fn, mutates_args=(), schema=schema)
        for key, name, fn, schema in (
            ("fwd", "conv_lora_fwd", layer_fwd, FWD_SCHEMA),
            ("bwd", "conv_lora_bwd", layer_bwd, BWD_SCHEMA),
            ("gated_fwd", "conv_lora_gated_fwd", gated_fwd, GATED_FWD_SCHEMA),
            ("gated_bwd", "conv_lora_gated_bwd", gated_bwd, GATED_BWD_SCHEMA),
        )
    }
    backward = _make_backward(ops["bwd"], ops["gated_bwd"], gate_backward)
    for key in ("fwd", "gated_fwd"):
        ops[key].register_fake(_make_fwd_fake(key == "gated_fwd"))
        ops[key].register_autograd(backward, setup_context=_setup_context)
    bwd_fake = _make_bwd_fake(dx_row_stride)
    ops["bwd"].register_fake(bwd_fake)
    ops["gated_bwd"].register_fake(bwd_fake)
    eager_backward = _make_backward(layer_bwd, gated_bwd, gate_backward_impl or gate_backward)
    return LayerOps(
        **ops,
        eager=_make_eager_function(fwd_impl, eager_backward, False, f"{namespace}_eager"),
        gated_eager=_make_eager_function(fwd_impl, eager_backward, True, f"{namespace}_gated_eager"),
        native=native,
    )


def apply_gate_factor(z: torch.Tensor, y: torch.Tensor, g: torch.Tensor, w_gate: torch.Tensor,
                      w_noise: torch.Tensor, noise: torch.Tensor | None,
                      expert_index: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """multiply_by_gate in a fused forward: y = z + p d from the expert kernel's y = z + d.

    z, y: (M, r) float32/64 (M = N*H*W); g: (N, r). Returns (y, gate_p (N,), d (M, r)), the last
    two saved for :func:`gate_factor_backward`. ``d = y - z`` carries an absolute rounding error
    of half an ulp of y: p d then has the error a float32 ``z + p D`` has anyway.
    """
    n, r = g.shape
    gate_p = gate_probability(g, w_gate, w_noise, noise, expert_index)
    d = y - z
    y = torch.addcmul(z.view(n, -1, r), d.view(n, -1, r), gate_p.view(n, 1, 1))
    return y.view(-1, r), gate_p, d


def gate_factor_backward(dy: torch.Tensor, dgs: torch.Tensor, g: torch.Tensor,
                         w_gate: torch.Tensor, w_noise: torch.Tensor, noise: torch.Tensor | None,
                         gate_p: torch.Tensor, d: torch.Tensor, expert_index: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """multiply_by_gate in a fused backward, between dy and the expert backward.

    dy: (M, r), the gradient of y; dgs: (N, r), g's gradient / (H*W) so far; then the gated
    backward op's gate inputs (g, w_gate, w_noise, noise, gate_p, d). With y = z + p d:
    the expert's output gradient is p dy (the residual keeps dy), and dp_n = <dy_n, d_n> flows
    through p to g, w_gate and w_noise.

    Returns:
        dd (M, r) = p dy, the expert backward's input; dgs (N, r) with p's share of dg / (H*W)
        added; d_w_gate, d_w_noise (r, E): p's share of those gradients.
    """
    n, r = g.shape
    dy3 = dy.view(n, -1, r)
    dp = (dy3 * d.view(n, -1, r)).sum((1, 2))
    dg, dwg, dwn = gate_probability_backward(g, w_gate, w_noise, noise, expert_index, dp)
    dd = dy3 * gate_p.view(n, 1, 1)
    return dd.view(-1, r), dgs + dg / dy3.shape[1], dwg, dwn


def prepare_inputs(x, x_down, weight, bias, cast_weight: bool = True):
    """Cast the frozen Linear's operands as ``F.linear`` under autocast would.

    Returns (x, x_down or None when it is x, weight, bias), all in x's (autocast) dtype, except
    the weight when ``cast_weight`` is False: a backend whose ops cast it themselves (the cuda
    backend packs it into its GEMM operand, casting while it copies) gets it as it is.
    """
    same = x_down is x
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        x_down = x if same else x_down.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if cast_weight and weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    return x, None if same else x_down, weight, bias
