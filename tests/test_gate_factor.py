"""``multiply_by_gate``: each sample's expert output scaled by the gate's softmax probability.

The official code multiplies by a softmax over the top-1 logit alone (exactly 1), so its router
learns only from the load-balancing loss; SPEC section 2 welcomes a differentiable factor as an
option. Every backend is checked against ``reference.conv_lora_linear(multiply_by_gate=True)``
in float64, forward and every gradient (the router's included), in the three gate modes:
training (noisy logits), eval (clean logits) and forced routing (every scale, so the factor of
an expert the gate did not pick, which can be far below 1/E).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from convlora_kernels import ConvLoRALinear, backends, inject_conv_lora, reference
from convlora_kernels.gate import gate_probability, gate_probability_backward

from .conftest import GATE_CASES, PARAM_NAMES, assert_close_to_reference, gate_case, make_layer

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
BACKEND_DTYPES = [
    ("eager", torch.float64), ("eager", torch.float32),
    ("cuda", torch.float64), ("cuda", torch.float32),
    ("triton", torch.float32),
]
CASES = [  # (r, num_experts, depthwise, n, h, w)
    (1, 8, False, 8, 1, 1),
    (3, 8, True, 8, 2, 3),
    (3, 4, False, 5, 5, 7),
    (8, 8, False, 8, 4, 6),
    (3, 1, False, 3, 3, 4),  # one expert: the factor is 1 and has no gradient
]
LOSS_WEIGHT = 3.0


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("CONVLORA_POISON", "1")  # fused backends' buffers start as NaN


def _need(backend: str, x: torch.Tensor, request) -> None:
    why = backends.unavailable_reason(backend, x)
    if why is not None:
        pytest.skip(why)
    if backend == "triton":
        request.getfixturevalue("triton_race_check")


@pytest.mark.parametrize("mode", ["train", "eval", "forced"])
@pytest.mark.parametrize("n, r, e", GATE_CASES)
def test_gate_probability_backward_matches_autograd(n, r, e, mode):
    g, wg, wn, noise = (t.requires_grad_(i < 3) for i, t in enumerate(gate_case(n, r, e, seed=3 * n + e)))
    noise = noise if mode == "train" else None
    if mode == "forced":  # any expert, the unlikely ones included
        index = torch.randint(0, e, (n,), generator=torch.Generator().manual_seed(n))
    else:
        index = reference.gate_logits(g, wg, wn, noise).logits.argmax(1)
    p = gate_probability(g, wg, wn, noise, index)
    assert p.dtype == torch.float64 and p.shape == (n,)
    if mode != "forced":
        assert (p >= 1 / e - 1e-15).all()  # the argmax's probability
    dp = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(e))
    want = torch.autograd.grad(p, (g, wg, wn), dp, allow_unused=True)
    got = gate_probability_backward(g.detach(), wg.detach(), wn.detach(), noise, index, dp)
    for name, a, b in zip(("g", "w_gate", "w_noise"), got, want):
        b = torch.zeros_like(a) if b is None else b
        assert_close_to_reference(a, b, 1e-12, name)


def _reference(layer, x, expert_index, noise, upstream):
    """Reference output, routing, loss and float64 gradients on the layer's parameters."""
    params = {p: getattr(layer, p).detach().double().requires_grad_() for p in PARAM_NAMES}
    x = x.detach().double().requires_grad_()
    out, idx, loss = reference.conv_lora_linear(
        x, layer.weight.double(), layer.bias.double(), *(params[p] for p in PARAM_NAMES),
        layer.scaling, expert_index, None if noise is None else noise.double(), multiply_by_gate=True,
    )
    ((out * upstream.double()).sum() + LOSS_WEIGHT * loss).backward()
    return out, idx, loss, [x.grad] + [params[p].grad for p in PARAM_NAMES]


@pytest.mark.parametrize("mode", ["train", "eval", "forced"])
@pytest.mark.parametrize("r, num_experts, depthwise, n, h, w", CASES)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_layer_matches_reference(backend, dtype, r, num_experts, depthwise, n, h, w, mode, request):
    layer = make_layer(c_in=10, c_out=14, r=r, num_experts=num_experts, depthwise=depthwise,
                       dtype=dtype, backend=backend, multiply_by_gate=True)
    layer.train(mode == "train")
    x = torch.randn(n, h, w, 10, dtype=dtype, requires_grad=True)
    _need(backend, x, request)
    upstream = torch.randn(n, h, w, 14, dtype=dtype)
    expert_index = torch.arange(n) % num_experts if mode == "forced" else None
    torch.manual_seed(11)
    noise = torch.randn(n, num_experts) if mode == "train" else None
    torch.manual_seed(11)  # the layer draws the same noise
    out = layer(x, expert_index)
    ((out * upstream).sum() + LOSS_WEIGHT * layer.moe_loss).backward()

    want_out, want_idx, want_loss, want_grads = _reference(layer, x, expert_index, noise, upstream)
    assert torch.equal(layer.last_expert_index, want_idx)
    rtol = RTOL[dtype]
    assert_close_to_reference(out, want_out, rtol, "out")
    assert_close_to_reference(layer.moe_loss, want_loss, rtol, "moe_loss")
    got_grads = [x.grad] + [getattr(layer, p).grad for p in PARAM_NAMES]
    for name, got, want in zip(("x",) + PARAM_NAMES, got_grads, want_grads):
        if want is None:  # w_noise without noise: nothing reaches it
            assert got is None or not got.any(), name
            continue
        assert got is not None and got.dtype == dtype, name
        assert_close_to_reference(got, want, rtol, f"grad {name}")
    if num_experts > 1:  # the point of the option: the task loss reaches the router
        assert layer.w_gate.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_half(backend, dtype, request):
    """Under autocast, forward and every gradient (the router's included) within twice the eager
    backend's error at the same precision, both against the float64 reference; all 8 scales."""
    layer = make_layer(c_in=16, c_out=24, r=3, num_experts=8, dtype=torch.float32,
                       multiply_by_gate=True).eval()
    x = torch.randn(8, 3, 4, 16)
    _need(backend, x, request)
    upstream = torch.randn(8, 3, 4, 24)
    index = torch.arange(8)
    results = {}
    for name in ("eager", backend):
        layer.backend = name
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            out = layer(xi, index)
        assert out.dtype == dtype
        (out.float() * upstream).sum().backward()
        results[name] = [out.detach(), xi.grad] + [getattr(layer, p).grad for p in PARAM_NAMES]
    want_out, _, _, want_grads = _reference(layer, x, index, None, upstream)
    for name, got, eager_, ref in zip(["out", "x", *PARAM_NAMES], results[backend],
                                      results["eager"], [want_out] + want_grads):
        if ref is None:  # w_noise: no noise in eval
            continue
        err = (got.double() - ref).abs().max().item()
        eager_err = (eager_.double() - ref).abs().max().item()
        slack = torch.finfo(dtype).eps / 4 * max(ref.abs().max().item(), 1.0)
        assert err <= 2 * eager_err + slack, f"{name}: {backend} {err:.3e}, eager {eager_err:.3e}"


@pytest.mark.parametrize("backend", ["eager", "cuda", "triton"])
def test_factor_changes_the_function_only_through_p(backend, request):
    """At initialisation (w_gate = 0, eval) p = 1/E: the expert output is exactly E times
    smaller than without the option, and with one expert the option changes nothing."""
    x = torch.randn(4, 3, 5, 10)
    _need(backend, x, request)
    for num_experts in (4, 1):
        layer = make_layer(c_in=10, c_out=14, r=3, num_experts=num_experts, dtype=torch.float32,
                           backend=backend).eval()
        with torch.no_grad():
            layer.w_gate.zero_()
        index = torch.arange(4) % num_experts
        lora_only = layer(x, index) - nn.functional.linear(x, layer.weight, layer.bias)
        layer.multiply_by_gate = True
        gated = layer(x, index) - nn.functional.linear(x, layer.weight, layer.bias)
        z = x @ layer.lora_A.t()
        residual = layer.scaling * (z @ layer.lora_B.t())
        # float32, and each side recovers the expert part by subtracting the Linear's output and
        # the residual (magnitudes ~1-10): a few ulps of those, not of the difference.
        torch.testing.assert_close(gated - residual, (lora_only - residual) / num_experts,
                                   rtol=1e-4, atol=1e-5)


def test_flag_plumbing():
    model = nn.Sequential(nn.Module())
    model[0].qkv = nn.Linear(8, 24)
    (layer,) = inject_conv_lora(model, r=2, num_experts=3, multiply_by_gate=True, backend="eager")
    assert layer.multiply_by_gate and "multiply_by_gate=True" in repr(layer)
    assert not ConvLoRALinear(8, 24).multiply_by_gate
    assert "multiply_by_gate" not in repr(ConvLoRALinear(8, 24))


@pytest.mark.parametrize("backend", ["eager", "cuda", "triton"])
def test_compiles_fullgraph(backend, request):
    """torch.compile(fullgraph=True) through the ops' fakes (aot_eager): no graph break, same
    output and router gradient. (The eager backend runs in float64: AOT's decompositions
    reorder its float32 sums, see NOTES session 5.)"""
    dtype = torch.float64 if backend == "eager" else torch.float32
    layer = make_layer(c_in=10, c_out=14, r=3, num_experts=4, dtype=dtype, backend=backend,
                       multiply_by_gate=True).train()
    x = torch.randn(3, 4, 5, 10, dtype=dtype)
    _need(backend, x, request)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (compiled, layer):
        layer.zero_grad()
        torch.manual_seed(2)
        out = fn(x)
        (out.square().sum() + layer.moe_loss).backward()
        grads.append((out.detach(), layer.w_gate.grad.clone(), layer.lora_A.grad.clone()))
    for name, a, b in zip(("out", "w_gate", "lora_A"), *grads):
        assert_close_to_reference(a, b, RTOL[dtype], name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_sam_windows_training(backend, request):
    """25 windows of 14 x 14 (one 1024 px image's windowed block), r = 8, training gate."""
    layer = make_layer(c_in=64, c_out=192, r=8, num_experts=8, dtype=torch.float32,
                       backend=backend, multiply_by_gate=True).cuda().train()
    x = torch.randn(25, 14, 14, 64, device="cuda", requires_grad=True)
    _need(backend, x, request)
    upstream = torch.randn(25, 14, 14, 192, device="cuda")
    torch.manual_seed(4)
    noise = torch.randn(25, 8, device="cuda")
    torch.manual_seed(4)
    out = layer(x)  # float32 GEMMs: PyTorch's default (no TF32) and the kernels' ieee dots
    ((out * upstream).sum() + LOSS_WEIGHT * layer.moe_loss).backward()
    want_out, want_idx, want_loss, want_grads = _reference(layer, x, None, noise, upstream)
    assert torch.equal(layer.last_expert_index, want_idx)
    assert_close_to_reference(out, want_out, RTOL[torch.float32], "out")
    got_grads = [x.grad] + [getattr(layer, p).grad for p in PARAM_NAMES]
    for name, got, want in zip(("x",) + PARAM_NAMES, got_grads, want_grads):
        assert_close_to_reference(got, want, RTOL[torch.float32], f"grad {name}")
