"""ConvLoRALinear with backend="eager" against the reference: forward and every gradient."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn

from convlora_kernels import BackendUnavailableError, ConvLoRALinear
from convlora_kernels import backends as backends_mod
from convlora_kernels.ops import _layer_op as layer_op

from .conftest import PARAM_NAMES, assert_close_to_reference, make_layer, reference_out, seeded_step

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}

CASES = [  # (r, num_experts, depthwise, n, h, w)
    (1, 1, False, 2, 1, 1),
    (1, 8, True, 3, 2, 3),
    (3, 2, False, 3, 5, 7),
    (3, 8, False, 4, 6, 4),
    (3, 8, True, 2, 14, 14),
    (8, 8, False, 3, 7, 5),
    (8, 2, True, 2, 9, 16),
    (8, 8, False, 2, 64, 64),
    (3, 1, True, 1, 64, 33),
]


def _grads(layer, x):
    return [x.grad] + [getattr(layer, p).grad for p in PARAM_NAMES]


def _reference_grads(layer, x, expert_index, noise, upstream, loss_weight):
    """The reference's output, routing, loss and gradients, evaluated in float64."""
    params = {p: getattr(layer, p).detach().double().requires_grad_() for p in PARAM_NAMES}
    x = x.detach().double().requires_grad_()
    upstream = upstream.double()
    noise = None if noise is None else noise.double()
    ref = ConvLoRALinear.__new__(ConvLoRALinear)  # a namespace carrying the cloned tensors
    nn.Module.__init__(ref)
    for p in ("weight", "bias"):
        object.__setattr__(ref, p, getattr(layer, p).double())
    for p, v in params.items():
        object.__setattr__(ref, p, v)
    object.__setattr__(ref, "scaling", layer.scaling)
    out, idx, loss = reference_out(ref, x, expert_index, noise)
    total = (out * upstream).sum() + loss_weight * loss
    total.backward()
    return out, idx, loss, [x.grad] + [params[p].grad for p in PARAM_NAMES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("r, num_experts, depthwise, n, h, w", CASES)
@pytest.mark.parametrize("mode", ["forced", "gate_train"])
def test_eager_matches_reference(dtype, r, num_experts, depthwise, n, h, w, mode):
    layer = make_layer(c_in=10, c_out=14, r=r, num_experts=num_experts, depthwise=depthwise, dtype=dtype, backend="eager")
    x = torch.randn(n, h, w, 10, dtype=dtype, requires_grad=True)
    upstream = torch.randn(n, h, w, 14, dtype=dtype)
    if mode == "forced":
        layer.eval()
        expert_index = torch.randint(0, num_experts, (n,))
        noise, seed_noise = None, None
    else:
        layer.train()
        expert_index = None
        torch.manual_seed(7)
        seed_noise = torch.randn(n, num_experts)
        noise = seed_noise.to(dtype)
        torch.manual_seed(7)  # the layer draws the same noise
    out = layer(x, expert_index)
    loss_weight = 3.0
    ((out * upstream).sum() + loss_weight * layer.moe_loss).backward()

    ref_out, ref_idx, ref_loss, ref_grads = _reference_grads(layer, x, expert_index, noise, upstream, loss_weight)
    assert torch.equal(layer.last_expert_index, ref_idx)
    rtol = RTOL[dtype]
    assert_close_to_reference(out, ref_out, rtol, "out")
    assert_close_to_reference(layer.moe_loss, ref_loss, rtol, "moe_loss")
    for name, got, want in zip(("x",) + PARAM_NAMES, _grads(layer, x), ref_grads):
        if want is None:  # e.g. the gate in forced mode: the layer must give zeros or nothing
            assert got is None or not got.any(), name
            continue
        assert got is not None, f"{name} got no gradient"
        assert got.dtype == dtype, name
        assert_close_to_reference(got, want, rtol, f"grad {name}")


def test_unchosen_experts_get_zero_gradient_not_none():
    layer = make_layer(r=3, num_experts=8, backend="eager")
    x = torch.randn(2, 4, 4, 12, dtype=torch.float64)
    layer(x, torch.tensor([1, 1])).sum().backward()
    assert layer.expert_weight.grad is not None and layer.expert_bias.grad is not None
    untouched = [e for e in range(8) if e != 1]
    assert not layer.expert_weight.grad[untouched].any() and not layer.expert_bias.grad[untouched].any()
    assert layer.expert_weight.grad[1].abs().sum() > 0


def test_init_is_noop_and_shapes():
    layer = ConvLoRALinear(12, 20, r=4, num_experts=3, depthwise=True)
    assert layer.scaling == 32 / 4
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (20, 4)
    assert layer.expert_weight.shape == (3, 4, 1, 3, 3) and layer.expert_bias.shape == (3, 4)
    assert layer.w_gate.shape == (4, 3) and layer.w_noise.shape == (4, 3)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    bound = 1 / math.sqrt(12)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0
    for name in ("lora_B", "expert_bias", "w_gate", "w_noise"):
        assert not getattr(layer, name).any(), name
    x = torch.randn(2, 3, 5, 12)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    assert ConvLoRALinear(12, 20).expert_weight.shape == (8, 3, 3, 3, 3)


def test_from_linear_shares_weights_and_to_linear_restores():
    linear = nn.Linear(12, 20)
    layer = ConvLoRALinear.from_linear(linear, r=2, num_experts=2)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad
    assert layer.lora_A.device == linear.weight.device and layer.lora_A.abs().sum() > 0
    x = torch.randn(3, 16, 12)  # 3-D: L = 16 is a 4x4 map
    out = layer(x)
    assert out.shape == (3, 16, 20)
    torch.testing.assert_close(out, linear(x))
    back = layer.to_linear()
    assert isinstance(back, nn.Linear) and back.weight is linear.weight and back.weight.requires_grad
    no_bias = ConvLoRALinear.from_linear(nn.Linear(4, 6, bias=False), r=1, num_experts=1)
    assert no_bias.bias is None and no_bias(torch.randn(1, 2, 2, 4)).shape == (1, 2, 2, 6)


def test_moe_loss_and_index_after_forward():
    layer = make_layer(backend="eager", dtype=torch.float32).train()
    x = torch.randn(5, 3, 3, 12)
    layer(x)
    assert layer.moe_loss.dim() == 0 and layer.moe_loss.requires_grad
    assert layer.last_expert_index.shape == (5,) and layer.last_expert_index.dtype == torch.long
    layer.moe_loss.backward()
    assert layer.w_gate.grad.abs().sum() > 0 and layer.w_noise.grad.abs().sum() > 0
    assert layer.lora_A.grad.abs().sum() > 0  # through the mean that feeds the gate


def test_eval_is_deterministic_and_training_noise_uses_torch_rng():
    layer = make_layer(num_experts=8, backend="eager", dtype=torch.float32)
    x = torch.randn(16, 2, 2, 12)
    layer.eval()
    first = layer(x).detach()
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
    layer.train()
    torch.manual_seed(3)
    a = layer(x).detach(), layer.last_expert_index
    torch.manual_seed(3)
    b = layer(x).detach(), layer.last_expert_index
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_lora_dropout_only_on_adapter_input():
    layer = make_layer(backend="eager", dtype=torch.float64, lora_dropout=0.5)
    x = torch.randn(2, 3, 3, 12, dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(layer(x, torch.tensor([0, 1])), reference_out(layer, x, torch.tensor([0, 1]))[0])
    layer.train()
    out = layer(x, torch.tensor([0, 1]))
    assert torch.isfinite(out).all() and not torch.allclose(out, reference_out(layer, x, torch.tensor([0, 1]))[0])


def test_bf16_autocast_close_to_float32():
    layer = make_layer(backend="eager", dtype=torch.float32).eval()
    x = torch.randn(2, 5, 5, 12)
    idx = torch.tensor([3, 1])
    want = layer(x, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x, idx)
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 bits: a few roundings of z, U, V and the GEMM inputs stay within 2^-6.
    assert_close_to_reference(got, want, 2.0**-6, "bf16 autocast")


def test_backend_setting_and_errors():
    layer = make_layer(dtype=torch.float32)
    for name in ("eager", "auto", "triton", "cuda"):
        layer.backend = name
    with pytest.raises(ValueError, match="unknown backend"):
        layer.backend = "tpu"
    with pytest.raises(ValueError, match="unknown backend"):
        ConvLoRALinear(4, 4, backend="fast")
    assert backends_mod.resolve("auto", torch.randn(1, 1, 1, 12)) == "eager"
    layer.backend = "cuda"
    if backends_mod.unavailable_reason("cuda", torch.randn(1, 1, 1, 12)) is not None:
        with pytest.raises(BackendUnavailableError, match="To get it"):
            layer(torch.randn(1, 2, 2, 12))


def test_nan_propagates():
    layer = make_layer(backend="eager", dtype=torch.float32).eval()
    x = torch.randn(2, 4, 4, 12)
    x[0, 1, 2, 3] = float("nan")
    out = layer(x)
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda: torch.randn(2, 3, 3, 11), ValueError, "last dimension 12"),
        (lambda: torch.randn(2, 15, 12), ValueError, "perfect square"),
        (lambda: torch.randn(12), ValueError, "4-D"),
        (lambda: torch.randn(1, 2, 2, 2, 12), ValueError, "4-D"),
        (lambda: torch.randint(0, 3, (2, 3, 3, 12)), TypeError, "dtype"),
        (lambda: torch.randn(2, 3, 3, 12, dtype=torch.float64), TypeError, "differs"),
        (lambda: torch.randn(2, 3, 3, 12, device="meta"), RuntimeError, "on meta"),
        (lambda: [[1.0] * 12], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(bad, error, match):
    layer = make_layer(backend="eager", dtype=torch.float32)
    with pytest.raises(error, match=match):
        layer(bad())


@pytest.mark.parametrize(
    "index, error, match",
    [
        (torch.tensor([0, 4]), ValueError, r"\[0, 4\)"),
        (torch.tensor([-1, 0]), ValueError, r"\[0, 4\)"),
        (torch.tensor([0, 1, 2]), ValueError, "shape"),
        (torch.tensor([[0, 1]]), ValueError, "shape"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"),
        (torch.tensor([0, 1], device="meta"), RuntimeError, "meta"),
    ],
)
def test_bad_expert_index(index, error, match):
    layer = make_layer(backend="eager", dtype=torch.float32)
    with pytest.raises(error, match=match):
        layer(torch.randn(2, 3, 3, 12), index)


@pytest.mark.parametrize("kw, match", [({"r": -1}, "r must"), ({"r": 1.5}, "r must"), ({"num_experts": 0}, "num_experts"), ({"lora_dropout": 1.0}, "dropout")])
def test_bad_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        ConvLoRALinear(4, 4, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["eager", "triton", "cuda"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("multiply_by_gate", [False, True], ids=["p1", "gate_factor"])
def test_no_host_sync_on_gpu(training, backend, multiply_by_gate):
    """Forward and backward never synchronise the host (gate, routing, kernels, gate backward;
    the gate factor's one_hot included)."""
    x = torch.randn(8, 14, 14, 64, device="cuda", requires_grad=True)
    why = backends_mod.unavailable_reason(backend, x)
    if why is not None:
        pytest.fail(f"{backend} must run on a CUDA machine: {why}")
    layer = make_layer(c_in=64, c_out=96, r=3, num_experts=8, dtype=torch.float32, backend=backend,
                       multiply_by_gate=multiply_by_gate).cuda()
    layer.train(training)
    layer(x).sum().backward()  # warm-up: lazy CUDA init may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        (out.sum() + layer.moe_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend, multiply_by_gate", [("triton", False), ("cuda", False),
                                                       ("cuda", True)])
def test_gpu_cuda_graph_routed_autocast_training(backend, multiply_by_gate):
    """A CUDA graph of SAM's training setting (float32 parameters, bf16 autocast, the noisy gate
    drawing its noise inside the graph) replays what an eager step with the replay's routing
    computes, bit for bit. The setting a batch-1 user would capture to take the host out of the
    step (the layer is host-bound there: H200, 2026-11-28). The cuda native node with the gate
    factor too, with forced routing (its p then comes from the clean logits, which an eager step
    reproduces; its one_hot must not synchronise: on CUDA the scatter asserts instead)."""
    from .conftest import randomize_adapter

    layer = randomize_adapter(ConvLoRALinear(768, 2304, r=8, backend=backend, device="cuda",
                                             multiply_by_gate=multiply_by_gate))
    layer.train()
    x = torch.randn(100, 14, 14, 768, device="cuda", requires_grad=True)
    params = [x] + [getattr(layer, p) for p in ("lora_A", "lora_B", "expert_weight", "expert_bias")]

    def step(expert_index=None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x, expert_index=expert_index)
        # moe_loss stays out of the loss: its gradient reaches only the gate, whose routing
        # the eager comparison below forces.
        return out, layer.last_expert_index, torch.autograd.grad(out.float().square().mean(), params)

    forced = torch.arange(100, device="cuda") % 8 if multiply_by_gate else None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(forced)  # warm-up outside the capture (Triton compiles, cuBLAS picks kernels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_index, static_grads = step(forced)
    indices = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        indices.append(static_index.clone())
        out, index, grads = step(static_index.clone())
        assert torch.equal(index, static_index)
        assert torch.equal(out, static_out)
        for name, a, b in zip(("x",) + PARAM_NAMES[:4], grads, static_grads):
            assert torch.equal(a, b), name
    if forced is None:
        # New noise each replay: 100 samples over 8 experts routed the same twice: ~impossible.
        assert not torch.equal(indices[0], indices[1])


@pytest.mark.parametrize("training", [False, True])
def test_compiles_fullgraph_without_graph_breaks(training):
    """Backend resolution, validation and the eager backend trace as one graph (dynamo's
    "eager" backend: checks graph breaks without paying for Inductor's C++ build on the CPU)."""
    layer = make_layer(dtype=torch.float32, backend="auto").train(training)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 4, 4, 12)
    torch.manual_seed(5)
    got = compiled(x)
    got_index = layer.last_expert_index
    torch.manual_seed(5)
    want = layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got_index, layer.last_expert_index)
    compiled(x, torch.tensor([1, 2]))
    assert torch.equal(layer.last_expert_index, torch.tensor([1, 2]))


class _CheckpointedStack(nn.Module):
    """Two adapted layers, each optionally under torch.utils.checkpoint (non-reentrant)."""

    def __init__(self, backend: str):
        super().__init__()
        self.layers = nn.ModuleList(
            make_layer(c_in=8, c_out=8, r=3, num_experts=4, dtype=torch.float32, lora_dropout=0.2,
                       backend=backend) for _ in range(2))
        self.checkpointed = False

    def forward(self, x):
        for layer in self.layers:
            fn = lambda t, layer=layer: torch.tanh(layer(t))  # noqa: E731
            x = torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False) if self.checkpointed else fn(x)
        return x


@pytest.mark.parametrize("backend", ["eager", "triton", "cuda"])
def test_activation_checkpointing_gives_the_same_gradients(backend):
    """SAM fine-tuning often recomputes blocks in the backward: the recomputed forward must draw
    the same gate noise and dropout mask (torch's RNG state, restored by checkpoint) and the
    fused ops must give bit-identical results, so every gradient equals the plain run's."""
    x = torch.randn(2, 2, 3, 8)  # small: the interpreter runs the Triton kernels
    why = backends_mod.unavailable_reason(backend, x)
    if why is not None:
        pytest.skip(why)
    model = _CheckpointedStack(backend).train()

    def run(checkpointed):
        model.checkpointed = checkpointed
        outs = []

        def loss_fn(xi):
            outs.append(model(xi))
            return (outs[0] * outs[0]).sum() + sum(layer.moe_loss for layer in model.layers)

        grads = seeded_step(model, loss_fn, x, seed=7)
        return [outs[0].detach()] + grads

    plain, recomputed = run(False), run(True)
    assert len(plain) == len(recomputed) > 2
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_parameters(backend, dtype):
    """A model cast to bf16/fp16 as a whole (adapter weights included, no autocast): forward and
    every gradient within twice the eager backend's error at the same precision, both judged
    against the float64 reference on the same (rounded) weights; all 8 scales (forced)."""
    x = torch.randn(8, 3, 4, 16).to(dtype)
    why = backends_mod.unavailable_reason(backend, x)
    if why is not None:
        pytest.skip(why)
    base = make_layer(c_in=16, c_out=24, r=3, num_experts=8, dtype=torch.float32).to(dtype).train()
    upstream = torch.randn(8, 3, 4, 24).to(dtype)
    index = torch.arange(8)

    def run(layer):
        xi = x.clone().requires_grad_()
        out = layer(xi, index)
        ((out * upstream).sum() + 10 * layer.moe_loss).backward()
        return [out.detach(), xi.grad] + [getattr(layer, p).grad for p in PARAM_NAMES]

    results = {}
    for name in ("eager", backend):
        layer = ConvLoRALinear(16, 24, r=3, num_experts=8, dtype=dtype, backend=name).train()
        layer.load_state_dict(base.state_dict())
        results[name] = run(layer)
    want_out, _, _, want_grads = _reference_grads(base, x, index, None, upstream, 10.0)
    want = [want_out] + want_grads
    names = ["out", "x"] + list(PARAM_NAMES)
    for name, got, eager_, ref in zip(names, results[backend], results["eager"], want):
        if ref is None or name in ("w_gate", "w_noise"):  # forced routing: no gate gradient
            continue
        ref = ref.double()
        err = (got.double() - ref).abs().max().item()
        eager_err = (eager_.double() - ref).abs().max().item()
        slack = torch.finfo(dtype).eps / 4 * max(ref.abs().max().item(), 1.0)
        assert err <= 2 * eager_err + slack, f"{name}: {backend} err {err:.3e}, eager {dtype} {eager_err:.3e}"



@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_deterministic_algorithms_mode(monkeypatch, backend, device):
    """Under torch.use_deterministic_algorithms(True) the fused backends raise nothing (no op
    PyTorch flags as nondeterministic is on their path) and a training step repeats bit for
    bit. cuBLAS (the CUDA backend's GEMMs, like any nn.Linear) needs CUBLAS_WORKSPACE_CONFIG in
    this mode: set here as a user would."""
    if device == "cuda" and (not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs a CUDA device (and no interpreter)")
    x = torch.randn(2, 2, 3, 16, device=device)
    why = backends_mod.unavailable_reason(backend, x)
    if why is not None:
        pytest.skip(why)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    layer = make_layer(c_in=16, c_out=24, r=3, num_experts=8, dtype=torch.float32,
                       backend=backend).to(device).train()

    def run():
        return seeded_step(layer, lambda xi: layer(xi).square().sum() + layer.moe_loss, x, seed=4)

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(first) == len(second) == 2 + len(PARAM_NAMES)  # loss, x, the adapter
    for name, a, b in zip(("loss", "x") + PARAM_NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("training", [False, True])
def test_rank_zero_is_the_frozen_linear(training):
    """r = 0 (the official code fails there, SPEC section 4) is loralib's "no adapter": exactly
    the frozen Linear, no gate, no RNG draw, a zero loss, empty adapter tensors that need no
    gradient, and the adapter file round trip still works."""
    layer = ConvLoRALinear(12, 20, r=0, num_experts=4, lora_dropout=0.3).train(training)
    assert layer.scaling == 0.0 and "r=0" in repr(layer)
    for p in PARAM_NAMES:
        assert getattr(layer, p).numel() == 0 and not getattr(layer, p).requires_grad
    x = torch.randn(3, 4, 4, 12, requires_grad=True)
    rng = torch.get_rng_state()
    for inp, index in ((x, None), (x.reshape(3, 16, 12), torch.tensor([3, 0, 1]))):
        out = layer(inp, index)
        assert torch.equal(out, nn.functional.linear(inp, layer.weight, layer.bias))
        assert layer.moe_loss.item() == 0 and layer.moe_loss.dtype == torch.float32
        assert layer.last_expert_index is index
    assert torch.equal(torch.get_rng_state(), rng)
    (out.sum() + layer.moe_loss).backward()
    assert x.grad is not None
    layer.double()
    layer(x.double().detach())
    assert layer.moe_loss.dtype == torch.float64


def test_rank_zero_in_a_model(tmp_path):
    from convlora_kernels import collect_moe_loss, inject_conv_lora, load_adapter, save_adapter

    model = nn.Sequential(nn.Module(), nn.Linear(24, 24))
    model[0].qkv = nn.Linear(12, 24)
    layers = inject_conv_lora(model, r=0, num_experts=3)
    model[1].requires_grad_(True)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.weight", "1.bias"]
    out = model[1](model[0].qkv(torch.randn(2, 3, 3, 12)))
    assert collect_moe_loss(model).item() == 0
    out.sum().backward()
    save_adapter(model, tmp_path / "a.safetensors")
    load_adapter(model, tmp_path / "a.safetensors")
    assert layers[0].lora_A.shape == (0, 12)



def _layer_node(out: torch.Tensor) -> str | None:
    """Name of the layer's autograd node behind the module's reshapes: the Python eager Function
    (``*_eager``), the cuda backend's native node (``...LayerFunction>``) or a custom op's
    (``GeneratedBackwardFor...``)."""
    frontier = [out.grad_fn]
    for _ in range(4):
        for fn in frontier:
            name = type(fn).__name__
            if "eager" in name or name.startswith("GeneratedBackwardFor"):
                return name
            if name == "CppFunction" and "LayerFunction" in fn.name():
                return "native"
        frontier = [nxt for fn in frontier for nxt, _ in fn.next_functions if nxt is not None]
    return None


# Triton (interpreted, ~1-2 min per case) on the fuller case only. cuda takes the native node
# (csrc/layer.cpp, LayerFunction), with multiply_by_gate too (session 12); Triton the Python
# eager Function.
@pytest.mark.parametrize("backend, multiply_by_gate, dropout, eager_node", [
    ("cuda", False, 0.0, "native"), ("cuda", False, 0.3, "native"), ("cuda", True, 0.3, "native"),
    ("cuda", True, 0.0, "native"), ("triton", True, 0.3, "eager")])
def test_eager_path_equals_op_path(backend, multiply_by_gate, dropout, eager_node, monkeypatch):
    """Eager calls skip the dispatcher (an autograd Function on the implementations, or the
    backend's native node: ``_layer_op.LayerOps.__call__``); CONVLORA_DISPATCH=op, a dispatch
    mode or tracing take the registered ops. Both must give bit-identical outputs and gradients
    (training gate, noise, dropout), and each must really be the one taken."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.randn(3, 2, 5, 12)
    why = backends_mod.unavailable_reason(backend, x)
    if why is not None:
        pytest.skip(why)
    layer = make_layer(dtype=torch.float32, lora_dropout=dropout, multiply_by_gate=multiply_by_gate)
    layer.backend = backend
    layer.train()
    upstream = torch.randn(3, 2, 5, 20)

    def loss_fn(xi):
        out = layer(xi)
        loss_fn.node = _layer_node(out)
        return (out * upstream).sum() + 10 * layer.moe_loss

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(layer_op, "DISPATCH_OP", False)
    eager_path = seeded_step(layer, loss_fn, x, seed=3)
    assert loss_fn.node is not None and eager_node in loss_fn.node, loss_fn.node
    monkeypatch.setattr(layer_op, "DISPATCH_OP", True)
    op_path = seeded_step(layer, loss_fn, x, seed=3)
    assert loss_fn.node is not None and loss_fn.node.startswith("GeneratedBackwardFor"), loss_fn.node
    monkeypatch.setattr(layer_op, "DISPATCH_OP", False)
    with Passthrough():
        moded = seeded_step(layer, loss_fn, x, seed=3)
    assert loss_fn.node is not None and loss_fn.node.startswith("GeneratedBackwardFor"), loss_fn.node
    assert len(eager_path) == len(op_path) == len(moded) == 8  # loss, dx, 6 adapter params
    for a, b, c in zip(eager_path, op_path, moded):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("case", ["eval_forced", "partial_grads", "loss_only", "trainable_linear",
                                  "no_bias_one_expert", "autocast", "autocast_partial_grads",
                                  "autocast_wide_input", "autocast_trainable_linear"])
@pytest.mark.parametrize("multiply_by_gate", [False, True], ids=["p1", "gate_factor"])
def test_native_node_equals_op_path(case, multiply_by_gate, monkeypatch):
    """The cuda backend's native node (csrc/layer.cpp) against the registered ops on the inputs
    its backward branches on: eval with forced routing (no gate gradient), gradients requested
    for some inputs only (needs_input_grad counts edges, absent tensors have none), a backward
    from moe_loss alone (no output gradient), the frozen Linear made trainable (its weight and
    bias gradients), no bias and one expert (a constant loss), float32 parameters under bf16
    autocast (the node keeps lora_A cast and the packed [W | s B | 0] from its forward; the
    backward then uses the packed operand whole, or only its s B columns when x needs no
    gradient; with C_in > C_out the forward's two GEMMs read its column slices; the weight's
    own gradient goes back to float32). Each with and without multiply_by_gate (the gate
    factor's C++ port against the Python the ops run: clean logits in eval and with forced
    routing, noisy ones in training; one expert, p = 1). Bitwise equal, every gradient."""
    wide = case == "autocast_wide_input"
    x = torch.randn(2, 3, 4, 20 if wide else 12)
    why = backends_mod.unavailable_reason("cuda", x)
    if why is not None:
        pytest.skip(why)
    kw = {"bias": False, "num_experts": 1} if case == "no_bias_one_expert" else {}
    if wide:  # no dropout either: the down-projection reads x, and still no [x | y] copy
        kw.update(c_in=20, c_out=12, lora_dropout=0.0)
    layer = make_layer(dtype=torch.float32, multiply_by_gate=multiply_by_gate,
                       **{"lora_dropout": 0.2, **kw})
    layer.backend = "cuda"
    layer.train(case != "eval_forced")
    if case.endswith("trainable_linear"):
        layer.weight.requires_grad_(True)
        if layer.bias is not None:
            layer.bias.requires_grad_(True)
    upstream = torch.randn(2, 3, 4, layer.out_features)
    forced = torch.tensor([2, 0]) if case == "eval_forced" else None

    def run() -> tuple[str | None, list[torch.Tensor]]:
        torch.manual_seed(5)
        xi = x.clone().requires_grad_(not case.endswith("partial_grads"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.startswith("autocast")):
            out = layer(xi, forced)
        node = _layer_node(out)
        loss = 10 * layer.moe_loss if case == "loss_only" else (out * upstream).sum() + layer.moe_loss
        inputs = [layer.lora_A, layer.expert_weight] if case.endswith("partial_grads") else (
            [xi] + [p for p in layer.parameters() if p.requires_grad])
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        return node, [out.detach(), loss.detach(), layer.last_expert_index, *grads]

    monkeypatch.setattr(layer_op, "DISPATCH_OP", False)
    native_node, native = run()
    monkeypatch.setattr(layer_op, "DISPATCH_OP", True)
    op_node, op = run()
    assert native_node == "native" and op_node.startswith("GeneratedBackwardFor")
    assert len(native) == len(op)
    for i, (a, b) in enumerate(zip(native, op)):
        assert (a is None) == (b is None), i
        assert a is None or torch.equal(a, b), i


@pytest.mark.parametrize("multiply_by_gate", [False, True], ids=["p1", "gate_factor"])
@pytest.mark.parametrize("dispatch_op", [False, True], ids=["eager_path", "op_path"])
def test_fused_backward_is_once_differentiable(multiply_by_gate, dispatch_op, monkeypatch):
    """The fused backward's ops have no derivatives: under create_graph the first-order
    gradients are unchanged, and differentiating them raises (the native node's own message,
    or @once_differentiable's) instead of silently missing the second-order terms. (The Triton
    backend shares the Python formula; the eager backend has real double backward.)"""
    x = torch.randn(2, 3, 3, 12)
    why = backends_mod.unavailable_reason("cuda", x)
    if why is not None:
        pytest.skip(why)
    monkeypatch.setattr(layer_op, "DISPATCH_OP", dispatch_op)
    layer = make_layer(dtype=torch.float32, multiply_by_gate=multiply_by_gate)
    layer.backend = "cuda"
    layer.train()

    def grad_x(create_graph: bool) -> torch.Tensor:
        torch.manual_seed(7)  # the same gate noise both times
        xi = x.clone().requires_grad_()
        return torch.autograd.grad(layer(xi).square().sum(), xi, create_graph=create_graph)[0]

    plain, graphed = grad_x(False), grad_x(True)
    assert torch.equal(plain, graphed.detach()) and graphed.requires_grad
    with pytest.raises(RuntimeError, match="not differentiable|differentiate twice"):
        graphed.square().sum().backward()
