"""The compiled extension ``convlora_kernels._C`` (ops ``torch.ops.convlora_cuda.*``).

CI has no GPU: it builds the extension and runs its CPU kernels, which share every per-element
formula with the CUDA kernels (``csrc/convlora_math.h``), against the float64 reference. Tests
marked ``gpu`` check the CUDA kernels at SAM shapes on a CUDA machine.

A missing extension is a failure, not a skip, whenever the build was supposed to produce it (a
CUDA toolkit is present and ``CONVLORA_BUILD_CUDA`` does not disable the build).
"""

from __future__ import annotations

import os

import pytest
import torch

from convlora_kernels import reference
from convlora_kernels.modules import ConvLoRALinear
from convlora_kernels.ops import cuda_conv_lora as cc
from convlora_kernels.ops import eager

from .conftest import GATE_CASES, assert_close_to_reference, gate_case, make_layer, seeded_step


def _build_expected() -> tuple[bool, str]:
    flag = os.environ.get("CONVLORA_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False, "CONVLORA_BUILD_CUDA disables the extension build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and flag not in ("1", "true", "yes", "on"):
        return False, "no CUDA toolkit: setup.py skips the extension"
    return True, ""


_EXPECTED, _WHY_NOT = _build_expected()
pytestmark = pytest.mark.skipif(
    not cc.extension_loaded() and not _EXPECTED, reason=f"extension not built: {_WHY_NOT}"
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every output and scratch buffer of the ops starts as NaN: unwritten elements show up."""
    monkeypatch.setenv("CONVLORA_POISON", "1")


def test_extension_is_built():
    assert cc.extension_loaded(), cc.unavailable_reason(torch.empty(0))
    assert cc.unavailable_reason(torch.empty(1, 1, 1, 4)) is None


# ----------------------------------------------------------------------------------- helpers
def _layer_inputs(n, h, w, c_in, c_out, r, depthwise, dtype, device="cpu", num_experts=8, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    return dict(
        x=rnd(n, h, w, c_in),
        weight=rnd(c_out, c_in, scale=c_in**-0.5),
        bias=rnd(c_out),
        lora_A=rnd(r, c_in, scale=c_in**-0.5),
        lora_B=rnd(c_out, r),
        expert_weight=rnd(num_experts, r, 1 if depthwise else r, 3, 3, scale=0.5),
        expert_bias=rnd(num_experts, r, scale=0.5),
        w_gate=rnd(r, num_experts),
        w_noise=rnd(r, num_experts),
    )


_GRAD_NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "expert_weight", "expert_bias", "w_gate", "w_noise")


def _run(fn, inputs, scaling, expert_index, noise, dout, loss_weight=0.0):
    """Forward with fn, backward of sum(out * dout) + loss_weight * moe_loss; out and grads."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out, index, moe_loss = fn(
        leaves["x"], leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"],
        leaves["lora_B"], leaves["expert_weight"], leaves["expert_bias"], leaves["w_gate"],
        leaves["w_noise"], scaling, expert_index, noise,
    )
    loss = (out * dout).sum() + loss_weight * moe_loss
    grads = torch.autograd.grad(loss, [leaves[k] for k in _GRAD_NAMES], allow_unused=True)
    return out, index, moe_loss, dict(zip(_GRAD_NAMES, grads))


def _reference_fn(x, x_down, weight, bias, lora_A, lora_B, ew, eb, w_gate, w_noise, scaling, index, noise):
    return reference.conv_lora_linear(x, weight, bias, lora_A, lora_B, ew, eb, w_gate, w_noise, scaling, index, noise)


def _assert_close(actual, expected, rtol, atol, what):
    assert actual is not None and expected is not None, what
    assert not torch.isnan(actual).any(), f"{what}: NaN (an element was never written)"
    # atol relative to the tensor's magnitude: cancellation makes single elements tiny.
    atol = atol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_layer(n, h, w, c_in, c_out, r, depthwise, dtype, index, noise=None, rtol=1e-10, atol=1e-10):
    inputs = _layer_inputs(n, h, w, c_in, c_out, r, depthwise, dtype)
    dout = torch.randn(n, h, w, c_out, dtype=torch.float64).to(dtype)
    weight_loss = 0.0 if index is not None else 3.0
    got = _run(cc.conv_lora_forward, inputs, 1.7, index, noise, dout, weight_loss)
    ref_inputs = {k: v.double() for k, v in inputs.items()}
    want = _run(_reference_fn, ref_inputs, 1.7, index, None if noise is None else noise.double(), dout.double(), weight_loss)
    assert torch.equal(got[1], want[1]), "routing differs"
    _assert_close(got[0], want[0], rtol, atol, "out")
    _assert_close(got[2], want[2], rtol, atol, "moe_loss")
    for name in _GRAD_NAMES:
        if want[3][name] is None:
            continue
        _assert_close(got[3][name], want[3][name], rtol, atol, f"d{name}")
    return got


# ----------------------------------------------------------------------------------- CPU: layer
# Each call forces sample k to expert k: all scales s = 1..8 are exercised in every case.
_ALL_SCALES = torch.arange(8)


@pytest.mark.parametrize("depthwise", [False, True], ids=["full", "depthwise"])
@pytest.mark.parametrize("r", [1, 3, 8])
@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 7), (14, 14)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_float64_all_scales(hw, r, depthwise):
    # C_in < C_out takes the concatenated single-GEMM path, C_in > C_out the addmm_ one.
    c_in, c_out = (6, 10) if (r + hw[0]) % 2 else (12, 5)
    _check_layer(8, hw[0], hw[1], c_in, c_out, r, depthwise, torch.float64, _ALL_SCALES)


@pytest.mark.parametrize("depthwise", [False, True], ids=["full", "depthwise"])
def test_layer_float64_64x64(depthwise):
    _check_layer(2, 64, 64, 8, 12, 3, depthwise, torch.float64, torch.tensor([1, 6]))


@pytest.mark.parametrize("hw", [(5, 7), (14, 14)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("depthwise", [False, True], ids=["full", "depthwise"])
def test_layer_float32_all_scales(hw, depthwise):
    _check_layer(8, hw[0], hw[1], 16, 24, 8, depthwise, torch.float32, _ALL_SCALES, rtol=1e-5, atol=1e-5)


def test_layer_gated_float64():
    """Routing by the noisy gate: moe_loss and the w_gate / w_noise gradients flow through g."""
    n = 12
    noise = torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = _check_layer(n, 5, 7, 8, 12, 3, False, torch.float64, None, noise=noise)
    assert got[3]["w_gate"].abs().sum() > 0 and got[3]["w_noise"].abs().sum() > 0


def test_unchosen_experts_get_zero_gradients():
    inputs = _layer_inputs(3, 5, 7, 6, 10, 3, False, torch.float64)
    dout = torch.randn(3, 5, 7, 10, dtype=torch.float64)
    _, _, _, grads = _run(cc.conv_lora_forward, inputs, 2.0, torch.tensor([2, 2, 5]), None, dout)
    chosen = torch.zeros(8, dtype=torch.bool)
    chosen[[2, 5]] = True
    for name in ("expert_weight", "expert_bias"):
        g = grads[name]
        assert g is not None
        assert torch.equal(g[~chosen], torch.zeros_like(g[~chosen])), name
        assert (g[chosen].abs().flatten(1).sum(1) > 0).all(), name


def test_deterministic():
    inputs = _layer_inputs(8, 14, 14, 16, 24, 8, False, torch.float32)
    dout = torch.randn(8, 14, 14, 24)
    a = _run(cc.conv_lora_forward, inputs, 1.0, _ALL_SCALES, None, dout)
    b = _run(cc.conv_lora_forward, inputs, 1.0, _ALL_SCALES, None, dout)
    assert torch.equal(a[0], b[0])
    for name in _GRAD_NAMES:
        if a[3][name] is not None:
            assert torch.equal(a[3][name], b[3][name]), name


def test_autocast_bfloat16_cpu():
    inputs = _layer_inputs(8, 5, 7, 16, 24, 8, False, torch.float32)
    dout = torch.randn(8, 5, 7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(cc.conv_lora_forward, inputs, 1.0, _ALL_SCALES, None, dout)
    want = _run(_reference_fn, {k: v.double() for k, v in inputs.items()}, 1.0, _ALL_SCALES, None, dout.double())
    assert got[0].dtype == torch.bfloat16
    _assert_close(got[0], want[0], 3e-2, 5e-2, "out")
    _assert_close(got[3]["lora_A"], want[3]["lora_A"], 5e-2, 5e-2, "dlora_A")


def test_module_backend_cuda_matches_eager_on_cpu():
    torch.manual_seed(0)
    layer = ConvLoRALinear(16, 24, r=3, num_experts=8, backend="eager").double()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.expert_bias.normal_()
    x = torch.randn(4, 49, 16, dtype=torch.float64)
    index = torch.tensor([0, 3, 4, 7])
    want = layer(x, expert_index=index)
    layer.backend = "cuda"
    got = layer(x, expert_index=index)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_torch_compile_fullgraph():
    inputs = _layer_inputs(8, 5, 7, 16, 24, 3, False, torch.float32)

    def f(x, weight, bias, a, b, ew, eb, wg, wn):
        return cc.conv_lora_forward(x, x, weight, bias, a, b, ew, eb, wg, wn, 1.5, _ALL_SCALES, None)[0]

    args = [inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "expert_weight", "expert_bias", "w_gate", "w_noise")]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), f(*args))


def test_inductor_training_step():
    """Inductor (not just AOT tracing) around the layer ops: it plans buffers from the fakes,
    so the backward's strided dx (row stride C_in + r rounded up to 8) must be declared right.
    A training step with the noisy gate (Inductor told to draw torch's random numbers, so both
    runs route alike) against the same step uncompiled."""
    import torch._inductor.config as inductor_config

    layer = make_layer(c_in=16, c_out=24, r=3, num_experts=8, dtype=torch.float32,
                       backend="cuda").train()
    x = torch.randn(8, 5, 7, 16)
    upstream = torch.randn(8, 5, 7, 24)

    def step(inp):
        return (layer(inp) * upstream).sum() + 10 * layer.moe_loss

    with inductor_config.patch(fallback_random=True):
        got = seeded_step(layer, torch.compile(step, backend="inductor", fullgraph=True), x, seed=2)
    want = seeded_step(layer, step, x, seed=2)
    assert len(got) == len(want) == 8  # loss, x and the six adapter parameters
    for g, w in zip(got, want):
        assert_close_to_reference(g, w, 1e-5)  # Inductor may sum the loss in another order


# ----------------------------------------------------------------------------------- CPU: ops
def _op_samples(dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    z = rnd(8, 5, 7, 3)
    return dict(
        down=(rnd(8, 5, 7, 6), rnd(3, 6)),
        experts=(z, torch.arange(8, device=device), rnd(8, 3, 3, 3, 3), rnd(8, 3)),
        experts_dw=(z, torch.arange(8, device=device), rnd(8, 3, 1, 3, 3), rnd(8, 3)),
        down_cat=(rnd(8, 5, 7, 6), rnd(3, 6), 16),
    )


def _requires_grad(args):
    return tuple(
        a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )


@pytest.mark.parametrize("which", ["down", "down_cat", "experts", "experts_dw", "experts_bwd"])
def test_opcheck_cpu(which):
    ops = torch.ops.convlora_cuda
    s = _op_samples()
    if which == "experts_bwd":
        z, idx, ew, eb = s["experts"]
        torch.library.opcheck(ops.experts_bwd, (z, idx, ew, eb, torch.randn_like(z)))
        dg = torch.randn(z.shape[0], z.shape[3], dtype=z.dtype)
        torch.library.opcheck(ops.experts_bwd, (z, idx, ew, eb, torch.randn_like(z), dg))
        return
    if which.startswith("down"):  # a building block of the layer op, which owns the autograd
        torch.library.opcheck(ops.down_proj, s[which])
        return
    torch.library.opcheck(ops.experts_fwd, s[which])
    torch.library.opcheck(ops.experts_fwd, _requires_grad(s[which]))


def _layer_op_args(requires_grad, gated, x_down=False):
    inputs = _layer_inputs(4, 2, 3, 6, 10, 3, False, torch.float64, num_experts=4, seed=5)
    p = {k: v.clone().requires_grad_(requires_grad) for k, v in inputs.items()}
    noise = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    xd = (p["x"] * 0.5).detach().requires_grad_(requires_grad) if x_down else None
    return (p["x"], xd, p["weight"], p["bias"], p["lora_A"], p["lora_B"], p["expert_weight"],
            p["expert_bias"], p["w_gate"], p["w_noise"], 1.5,
            None if gated else torch.tensor([0, 3, 1, 2]), noise if gated else None)


@pytest.mark.parametrize("multiply_by_gate", [False, True], ids=["p1", "gate_factor"])
@pytest.mark.parametrize("x_down", [False, True], ids=["x", "x_down"])
def test_opcheck_layer_ops(x_down, multiply_by_gate):
    """The layer op pair: schema, fakes (dx's strided layout included), autograd registration."""
    fwd, bwd = ((cc.conv_lora_gated_fwd, cc.conv_lora_gated_bwd) if multiply_by_gate
                else (cc.conv_lora_fwd, cc.conv_lora_bwd))
    torch.library.opcheck(fwd, _layer_op_args(True, gated=True, x_down=x_down))
    for gated in (False, True):
        args = _layer_op_args(False, gated=gated, x_down=x_down)
        out, index, _, z, g, y, *gate_p_d = fwd(*args)
        x, xd, weight, _, a, b, ew, eb, wg, wn, _, _, noise = args
        for need_dx in (True, False):
            bwd_args = (torch.randn_like(out), x, xd, weight, a, b, ew, eb, z, y,
                        torch.randn_like(g), index, 1.5, need_dx)
            if multiply_by_gate:
                bwd_args += (g, wg, wn, noise, *gate_p_d)
            torch.library.opcheck(bwd, bwd_args)


@pytest.mark.parametrize("x_down", [False, True], ids=["x", "x_down"])
def test_opcheck_composition_ops(x_down):
    """The C++ composition's four ops (csrc/layer.cpp): schemas (xcat and dxy are declared
    mutated, nothing aliases), their fake-tensor and traced behaviour. They are not
    differentiable (their callers own the backward): inputs do not require grad."""
    ops = torch.ops.convlora_cuda
    x, xd, weight, bias, a, b, ew, eb, wg, wn, scaling, _, noise = _layer_op_args(
        False, gated=True, x_down=x_down)
    head_args = (x, xd, weight, a, ew, eb, wg, wn, None, noise)
    torch.library.opcheck(ops.layer_fwd_head, head_args)
    z, g, xcat, index, _, y = ops.layer_fwd_head(*head_args)
    assert (xcat.numel() > 0) == (not x_down)  # C_in 6 <= C_out 10: x folded into the up GEMM
    torch.library.opcheck(ops.layer_fwd_up, (x, xcat, y, weight, bias, b, scaling))
    dout = torch.randn(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    for need_dx in (True, False):
        torch.library.opcheck(ops.layer_bwd_dy, (dout, x, weight, b, scaling, need_dx))
        dxy, dy = ops.layer_bwd_dy(dout, x, weight, b, scaling, need_dx)
        for dd in (None, dy * 0.5):
            rest = (dout, x, xd, a, b, ew, eb, z, y, torch.randn_like(g), index, dxy.clone(), dy,
                    dd, scaling)
            torch.library.opcheck(ops.layer_bwd_rest, rest)


@pytest.mark.parametrize("n, r, e", GATE_CASES)
@pytest.mark.parametrize("mode", ["train", "eval", "forced"])
def test_gate_fwd_cpu_float64(n, r, e, mode):
    g, wg, wn, noise = gate_case(n, r, e, seed=n + r + e)
    forced = torch.randint(0, e, (n,), generator=torch.Generator().manual_seed(1)) if mode == "forced" else None
    nz = noise if mode == "train" else None
    index, loss = torch.ops.convlora_cuda.gate_fwd(g, wg, wn, nz, forced)
    if forced is None:
        want_index, want_loss = reference.route(g, wg, wn, nz)
    else:
        want_index, want_loss = forced, reference.moe_loss_from_index(forced, e, torch.float64)
    assert torch.equal(index, want_index)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n, r, e", [c for c in GATE_CASES if c[2] > 1])
def test_gate_bwd_cpu_float64(n, r, e):
    g, wg, wn, noise = gate_case(n, r, e, seed=3 * n + r)
    leaves = [t.clone().requires_grad_(True) for t in (g, wg, wn)]
    _, loss = reference.route(*leaves, noise)
    want = torch.autograd.grad(loss * 1.7, leaves)
    got = torch.ops.convlora_cuda.gate_bwd(g, wg, wn, noise, torch.tensor(1.7, dtype=torch.float64), 0.25)
    for name, a, b in zip(("dg", "dw_gate", "dw_noise"), got, (want[0] * 0.25, want[1], want[2])):
        _assert_close(a, b, 1e-10, 1e-12, name)


def test_gate_opcheck_and_validation():
    ops = torch.ops.convlora_cuda
    g, wg, wn, noise = gate_case(5, 3, 4, seed=2)
    torch.library.opcheck(ops.gate_fwd, (g, wg, wn, noise, None))
    torch.library.opcheck(ops.gate_fwd, (g, wg, wn, None, torch.tensor([0, 3, 1, 1, 2])))
    torch.library.opcheck(ops.gate_bwd, (g, wg, wn, noise, torch.tensor(0.5, dtype=torch.float64), 0.5))
    with pytest.raises(RuntimeError, match="1 to 32 experts"):
        ops.gate_fwd(g, torch.randn(3, 33, dtype=torch.float64), torch.randn(3, 33, dtype=torch.float64), None, None)
    with pytest.raises(RuntimeError, match="noise must be"):
        ops.gate_fwd(g, wg, wn, noise[:2], None)
    with pytest.raises(RuntimeError, match="expert_index values must lie in"):
        ops.gate_fwd(g, wg, wn, None, torch.tensor([0, 4, 1, 1, 2]))


def test_down_proj_writes_the_gemm_operand():
    """cat_cols > 0: x in the first C_in columns, zeros after, z and g unchanged."""
    x, a, cols = _op_samples()["down_cat"]
    z, g, xcat = torch.ops.convlora_cuda.down_proj(x, a, cols)
    z0, g0, empty = torch.ops.convlora_cuda.down_proj(x, a)
    assert empty.shape == (0,) and xcat.shape == x.shape[:3] + (cols,)
    assert torch.equal(z, z0) and torch.equal(g, g0)
    assert torch.equal(xcat[..., :6], x) and torch.equal(xcat[..., 6:], torch.zeros_like(xcat[..., 6:]))
    with pytest.raises(RuntimeError, match="cat_cols must be 0 or >= C_in"):
        torch.ops.convlora_cuda.down_proj(x, a, 5)


def test_ops_low_precision_inputs_cpu():
    """bf16 / fp16 storage: z and g stay float32, out keeps the storage dtype."""
    s = _op_samples()
    x, a = s["down"]
    for dtype in (torch.bfloat16, torch.float16):
        z, g, _ = torch.ops.convlora_cuda.down_proj(x.to(dtype), a.to(dtype))
        assert z.dtype == g.dtype == torch.float32
        want = x.to(dtype).double() @ a.to(dtype).double().t()
        torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.double(), want.mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)


def test_input_validation_messages():
    ops = torch.ops.convlora_cuda
    z, idx, ew, eb = _op_samples()["experts"]
    with pytest.raises(RuntimeError, match="expert_index values must lie in"):
        ops.experts_fwd(z, torch.full((8,), 8), ew, eb)
    with pytest.raises(RuntimeError, match="expert_index must have shape"):
        ops.experts_fwd(z, idx[:3], ew, eb)
    with pytest.raises(RuntimeError, match="z must be float32 or float64"):
        ops.experts_fwd(z.half(), idx, ew, eb)
    with pytest.raises(RuntimeError, match="expert_weight must be"):
        ops.experts_fwd(z, idx, ew[:, :2], eb)
    with pytest.raises(RuntimeError, match="lora_A must be"):
        ops.down_proj(torch.randn(1, 2, 2, 6), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="lora_A dtype"):
        ops.down_proj(torch.randn(1, 2, 2, 6), torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="dy must have z's shape"):
        ops.experts_bwd(z, idx, ew, eb, z[:1])
    with pytest.raises(RuntimeError, match="or float16 / bfloat16 with float32 z"):
        ops.experts_bwd(z.double(), idx, ew, eb, z.bfloat16())
    with pytest.raises(RuntimeError, match="or float16 / bfloat16 with float32 z"):
        ops.experts_bwd(z.float(), idx, ew, eb, z.double())
    with pytest.raises(RuntimeError, match="dg must be"):
        ops.experts_bwd(z, idx, ew, eb, z, z[:, 0, 0, :1])
    with pytest.raises(RuntimeError, match="dg must be"):
        ops.experts_bwd(z, idx, ew, eb, z, z[:, 0, 0].float() if z.dtype == torch.float64
                        else z[:, 0, 0].double())


def test_experts_bwd_dg_is_added_per_sample():
    """dg (N, r) lands on every pixel of its sample's dz and nowhere else: dz with dg minus dz
    without is dg broadcast over the map (the two differ only by that add, so exactly); the
    weight gradients do not see it."""
    z, idx, ew, eb = _op_samples()["experts"]
    dy = torch.randn_like(z)
    dg = torch.randn(z.shape[0], z.shape[3], dtype=z.dtype)
    ops = torch.ops.convlora_cuda
    plain, with_dg = ops.experts_bwd(z, idx, ew, eb, dy), ops.experts_bwd(z, idx, ew, eb, dy, dg)
    torch.testing.assert_close(with_dg[0], plain[0] + dg[:, None, None, :], rtol=0, atol=0)
    assert torch.equal(with_dg[1], plain[1]) and torch.equal(with_dg[2], plain[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_experts_bwd_takes_a_16bit_strided_dy(dtype):
    """With float32 z, dy may come in the layer's 16-bit dtype and strided (the cuda layer passes
    a column slice of its backward GEMM's output): widened exactly, and dz returned in dy's dtype,
    rounded once, bit for bit float32 dy's dz rounded; the weight gradients unchanged. The fake
    kernel agrees on dz's dtype."""
    z, idx, ew, eb = (t.float() if t.is_floating_point() else t for t in _op_samples()["experts"])
    dy = torch.randn(*z.shape[:3], 3 * z.shape[3]).to(dtype)[..., z.shape[3]:2 * z.shape[3]]
    assert not dy.is_contiguous()
    ops = torch.ops.convlora_cuda
    got, wide = ops.experts_bwd(z, idx, ew, eb, dy), ops.experts_bwd(z, idx, ew, eb, dy.float())
    assert got[0].dtype == dtype and torch.equal(got[0], wide[0].to(dtype))
    assert torch.equal(got[1], wide[1]) and torch.equal(got[2], wide[2])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = ops.experts_bwd(*(mode.from_tensor(t) for t in (z, idx, ew, eb, dy)))
    assert fake[0].dtype == dtype and fake[0].shape == z.shape


def test_non_contiguous_inputs():
    s = _op_samples()
    z, idx, ew, eb = s["experts"]
    zt = z.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    assert not zt.is_contiguous()
    torch.testing.assert_close(torch.ops.convlora_cuda.experts_fwd(zt, idx, ew, eb),
                               torch.ops.convlora_cuda.experts_fwd(z, idx, ew, eb), rtol=0, atol=0)


# ----------------------------------------------------------------------------------- GPU
def _sam_case(kind):
    # (N, H, W, C_in, C_out, r): SAM ViT-B qkv, windowed (100 windows) and global (4 images).
    return {"windows": (100, 14, 14, 768, 2304, 8), "global": (4, 64, 64, 768, 2304, 8)}[kind]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["windows", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("depthwise", [False, True], ids=["full", "depthwise"])
def test_gpu_sam_shapes_vs_reference(kind, dtype, depthwise):
    n, h, w, c_in, c_out, r = _sam_case(kind)
    inputs = _layer_inputs(n, h, w, c_in, c_out, r, depthwise, torch.float32, device="cuda")
    index = (torch.arange(n, device="cuda") * 5) % 8
    dout = torch.randn(n, h, w, c_out, device="cuda")
    low = {k: v.to(dtype) for k, v in inputs.items()}
    got = _run(cc.conv_lora_forward, low, 4.0, index, None, dout.to(dtype))
    base = _run(eager.conv_lora_forward, low, 4.0, index, None, dout.to(dtype))
    want = _run(eager.conv_lora_forward, {k: v.double() for k, v in low.items()}, 4.0, index, None, dout.double())
    atol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    pairs = [("out", got[0], base[0], want[0])] + [
        (f"d{k}", got[3][k], base[3][k], want[3][k]) for k in _GRAD_NAMES if want[3][k] is not None
    ]
    for name, g, b, ref in pairs:
        assert not torch.isnan(g).any(), name
        scale = ref.abs().max().item()
        assert _max_err(g, ref) <= 2 * _max_err(b, ref) + atol * max(scale, 1.0), (
            f"{name}: cuda err {_max_err(g, ref):.3e}, eager {dtype} err {_max_err(b, ref):.3e}"
        )


@gpu
@needs_cuda
def test_gpu_gated_training_sam_windows():
    """The training gate (routing, moe_loss, gate gradients) at SAM's windowed shape, fp32."""
    n, h, w, c_in, c_out, r = _sam_case("windows")
    noise = torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    inputs = _layer_inputs(n, h, w, c_in, c_out, r, False, torch.float32, device="cuda")
    dout = torch.randn(n, h, w, c_out, dtype=torch.float64).to("cuda")
    got = _run(cc.conv_lora_forward, inputs, 4.0, None, noise.float().cuda(), dout.float(), 3.0)
    want = _run(_reference_fn, {k: v.double() for k, v in inputs.items()}, 4.0, None,
                noise.cuda(), dout, 3.0)
    assert torch.equal(got[1], want[1]), "routing differs"
    _assert_close(got[0], want[0], 3e-5, 1e-5, "out")
    _assert_close(got[2], want[2], 3e-5, 1e-6, "moe_loss")
    for name in ("w_gate", "w_noise", "lora_A", "x"):
        _assert_close(got[3][name], want[3][name], 3e-5, 1e-5, f"d{name}")


@gpu
@needs_cuda
@pytest.mark.parametrize("depthwise", [False, True], ids=["full", "depthwise"])
def test_gpu_kernels_match_cpu_kernels_float64(depthwise):
    """The CUDA kernels against the CPU kernels (same formulas) at float64: all scales."""
    ops = torch.ops.convlora_cuda
    z, idx, ew, eb = _op_samples()["experts_dw" if depthwise else "experts"]
    dy = torch.randn_like(z)
    cpu = (ops.experts_fwd(z, idx, ew, eb),) + tuple(ops.experts_bwd(z, idx, ew, eb, dy))
    gpu_ = (ops.experts_fwd(z.cuda(), idx.cuda(), ew.cuda(), eb.cuda()),) + tuple(
        ops.experts_bwd(z.cuda(), idx.cuda(), ew.cuda(), eb.cuda(), dy.cuda())
    )
    for a, b in zip(cpu, gpu_):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-12)
    x, a, cols = _op_samples()["down_cat"]
    for got, want in zip(ops.down_proj(x.cuda(), a.cuda(), cols), ops.down_proj(x, a, cols)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    for dtype in (torch.bfloat16, torch.float16):  # the vectorised copy path of xcat
        xl, al = (t.to(dtype).cuda() for t in (x, a))
        got = ops.down_proj(xl, al, cols)[2]
        assert torch.equal(got[..., :6], xl) and not got[..., 6:].any()


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("r", [3, 5, 8, 16, 32, 33])
def test_gpu_expert_kernels_every_rank_path(r, dtype):
    """Every layout of the expert kernels on the device, against the CPU twins at float64
    (float32 inputs: 1e-5): 4-channel chunks (r = 3, with the 3-channel fill), 8-channel chunks
    (r = 5, padded; r = 8; r = 16), the staged weight past 48 KB per block (r = 32: 65 KB in
    float32, 129 KB in float64, which need the launch's shared-memory opt-in) and the unstaged
    path (r = 33). 8 samples at the 8 scales, a 9 x 11 map (several tiles per sample)."""
    gen = torch.Generator().manual_seed(r)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    z, ew, eb, dy = rnd(8, 9, 11, r), rnd(8, r, r, 3, 3) * 0.3, rnd(8, r) * 0.3, rnd(8, 9, 11, r)
    idx = torch.arange(8)
    ops = torch.ops.convlora_cuda
    want = (ops.experts_fwd(z, idx, ew, eb),) + tuple(ops.experts_bwd(z, idx, ew, eb, dy))
    dev = [t.to(dtype).cuda() for t in (z, ew, eb, dy)]
    got = (ops.experts_fwd(dev[0], idx.cuda(), dev[1], dev[2]),) + tuple(
        ops.experts_bwd(dev[0], idx.cuda(), dev[1], dev[2], dev[3]))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_to_reference(g.cpu().double(), w, rtol, f"output {i}")


@gpu
@needs_cuda
@pytest.mark.parametrize("r", [16, 20, 32])
def test_gpu_expert_kernels_tf32(r):
    """The tf32 tensor-core paths on the device (the tap loop, mma.m16n8k8; the backward's
    3xTF32 weight gradient) against the CPU twins at float64, at tf32's class (3e-4): a
    fragment-layout error on hardware gives O(1) errors. The weights at a conv's init scale,
    as in the emulated test; 8 samples at the 8 scales, a 9 x 11 map. On sm_80+ the results
    must differ from the float32 path's (the path ran)."""
    gen = torch.Generator().manual_seed(r)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    z, dy = rnd(8, 9, 11, r), rnd(8, 9, 11, r)
    ew, eb = rnd(8, r, r, 3, 3) * (1 / (3 * r ** 0.5)), rnd(8, r) * 0.3
    idx = torch.arange(8)
    ops = torch.ops.convlora_cuda
    want = (ops.experts_fwd(z, idx, ew, eb),) + tuple(ops.experts_bwd(z, idx, ew, eb, dy))
    dev = [t.float().cuda() for t in (z, ew, eb, dy)]
    def run(tf32):
        return (ops.experts_fwd(dev[0], idx.cuda(), dev[1], dev[2], tf32),) + tuple(
            ops.experts_bwd(dev[0], idx.cuda(), dev[1], dev[2], dev[3], None, tf32))
    got = run(True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_to_reference(g.cpu().double(), w, 3e-4, f"output {i}")
    if torch.cuda.get_device_capability()[0] >= 8:
        assert not torch.equal(got[0], run(False)[0])


@gpu
@needs_cuda
def test_gpu_gate_matches_cpu_float64():
    """The gate kernels on the GPU against their CPU twins (same formulas) at float64."""
    ops = torch.ops.convlora_cuda
    for n, r, e in GATE_CASES:
        g, wg, wn, noise = gate_case(n, r, e, seed=7)
        forced = torch.arange(n) % e
        for nz, idx in ((noise, None), (None, None), (None, forced)):
            cpu = ops.gate_fwd(g, wg, wn, nz, idx)
            cuda = ops.gate_fwd(*(None if t is None else t.cuda() for t in (g, wg, wn, nz, idx)))
            assert torch.equal(cuda[0].cpu(), cpu[0])
            torch.testing.assert_close(cuda[1].cpu(), cpu[1], rtol=1e-12, atol=1e-15)
        if e > 1:
            dl = torch.tensor(1.3, dtype=torch.float64)
            cpu = ops.gate_bwd(g, wg, wn, noise, dl, 0.5)
            cuda = ops.gate_bwd(g.cuda(), wg.cuda(), wn.cuda(), noise.cuda(), dl.cuda(), 0.5)
            for a, b in zip(cuda, cpu):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-11, atol=1e-14)


@gpu
@needs_cuda
def test_gpu_deterministic_and_opcheck():
    n, h, w, c_in, c_out, r = _sam_case("windows")
    inputs = _layer_inputs(n, h, w, c_in, c_out, r, False, torch.bfloat16, device="cuda")
    index = torch.arange(n, device="cuda") % 8
    dout = torch.randn(n, h, w, c_out, device="cuda", dtype=torch.bfloat16)
    a = _run(cc.conv_lora_forward, inputs, 4.0, index, None, dout)
    b = _run(cc.conv_lora_forward, inputs, 4.0, index, None, dout)
    for name in ("expert_weight", "expert_bias", "lora_A", "lora_B", "x"):
        assert torch.equal(a[3][name], b[3][name]), name
    ops = torch.ops.convlora_cuda
    s = _op_samples(torch.float32, "cuda")
    torch.library.opcheck(ops.down_proj, s["down_cat"])
    torch.library.opcheck(ops.experts_fwd, _requires_grad(s["experts"]))
    args = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in _layer_op_args(True, gated=True))
    torch.library.opcheck(cc.conv_lora_fwd, args)
    z, idx, ew, eb = s["experts"]
    torch.library.opcheck(ops.experts_bwd, (z, idx, ew, eb, torch.randn_like(z)))
