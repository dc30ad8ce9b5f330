"""Shared fixtures: random (never zero) Conv-LoRA layers and the reference call on their weights."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from convlora_kernels import ConvLoRALinear, reference


def randomize_adapter(layer: ConvLoRALinear, generator: torch.Generator | None = None) -> ConvLoRALinear:
    """Give every adapter tensor non-zero random values (lora_B, biases and gates start at 0)."""
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "expert_weight", "expert_bias", "w_gate", "w_noise"):
            p = getattr(layer, name)
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) * 0.5)
    return layer


def gate_case(n: int, r: int, e: int, seed: int) -> list[torch.Tensor]:
    """Random float64 gate inputs: g (N, r), w_gate (r, E), w_noise (r, E), noise (N, E)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((n, r), (r, e), (r, e), (n, e))]


#: (N, r, E) for the gate kernels: N = 300 spans several row blocks / thread strides; E = 1 has a
#: constant loss; N = 1 puts the load terms in Phi's tails (gradients below float32's range).
GATE_CASES = [(1, 1, 2), (2, 1, 2), (7, 3, 8), (300, 8, 8), (300, 32, 8), (5, 3, 5), (6, 4, 1),
              (40, 1, 8)]


def make_layer(c_in=12, c_out=20, r=3, num_experts=4, depthwise=False, dtype=torch.float64, **kw):
    """A randomly initialised layer (adapter included) on the CPU."""
    layer = ConvLoRALinear(c_in, c_out, r=r, num_experts=num_experts, depthwise=depthwise, dtype=dtype, **kw)
    return randomize_adapter(layer)


def reference_out(layer: ConvLoRALinear, x, expert_index=None, noise=None):
    """reference.conv_lora_linear with ``layer``'s parameters: (out, expert_index, moe_loss)."""
    return reference.conv_lora_linear(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.expert_weight,
        layer.expert_bias, layer.w_gate, layer.w_noise, layer.scaling, expert_index, noise,
    )


PARAM_NAMES = ("lora_A", "lora_B", "expert_weight", "expert_bias", "w_gate", "w_noise")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor, rtol: float, name: str = "",
                              atol: float = 0.0) -> None:
    """|got - want| <= rtol * (|want| + max|want|) + atol, elementwise, with ``want`` from a
    float64 reference. The max|want| term scales the absolute slack to the tensor: gradients are
    long sums with cancellation, so an element far below the tensor's scale only carries the error
    of its large terms. ``atol`` is for a floor measured on the same inputs (twice eager
    PyTorch's error in the same precision), never a guess."""
    want = want.to(torch.float64)
    got = got.to(torch.float64)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any() or torch.isnan(want).any(), f"{name}: NaN in result"
    scale = want.abs().max() if want.numel() else torch.zeros((), dtype=torch.float64)
    err = (got - want).abs()
    bound = rtol * (want.abs() + scale) + atol
    worst = int((err - bound).argmax()) if err.numel() else 0
    assert bool((err <= bound).all()), (
        f"{name}: max error {float(err.max()):.3e} over bound at flat index {worst} "
        f"(got {float(got.flatten()[worst]):.6e}, want {float(want.flatten()[worst]):.6e}, "
        f"scale {float(scale):.3e}, rtol {rtol}, atol {atol:.3e})"
    )


def seeded_step(model: torch.nn.Module, loss_fn, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """One backward of ``loss_fn(x)`` from torch's RNG seeded with ``seed`` (gate noise and
    dropout draw alike in every call), gradients zeroed first: [loss, x's gradient, the
    gradient of every parameter of ``model`` that has one, in ``model.parameters()`` order]."""
    model.zero_grad()
    xi = x.clone().requires_grad_()
    torch.manual_seed(seed)
    loss = loss_fn(xi)
    loss.backward()
    return [loss.detach(), xi.grad] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.fixture
def triton_race_check():
    """Checks every interpreted Triton launch of the test for races between programs, missing
    barriers inside a program and out-of-bounds accesses (tests/triton_race.py), which the
    sequential interpreter would otherwise hide. On a GPU (no interpreter) it does nothing:
    the parity tests at SAM shapes are the check there. CONVLORA_RACECHECK=0 turns it off."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or os.environ.get("CONVLORA_RACECHECK") == "0":
        yield None
        return
    from .triton_race import race_check

    with race_check() as checker:
        yield checker


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped on CPU machines (CI), run by
    scripts/gpu_check.sh on a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    """CONVLORA_EMU_AS_CPU=1 (set by tests/test_cuda_emulated_asan.py in a subprocess): the CUDA
    kernels, emulated on the CPU, replace the extension's CPU kernels for this run."""
    from .cuda_emu import ENV_AS_CPU, override_cpu_kernels

    if os.environ.get(ENV_AS_CPU) == "1":
        with warnings.catch_warnings():  # "overriding a previously registered kernel": intended
            warnings.simplefilter("ignore")
            config._convlora_emulated_ops = override_cpu_kernels()


def pytest_report_header(config):
    ops = getattr(config, "_convlora_emulated_ops", None)
    if ops:
        return f"convlora: emulated CUDA kernels registered as the CPU kernels of {', '.join(ops)}"
    return None
