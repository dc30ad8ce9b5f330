"""The Triton gate kernels (convlora_kernels/ops/triton_gate.py) against the float64 reference:
routing, moe_loss and the gradients of the training gate's loss, over sample counts that span
several row blocks, r = 1 .. 32 and 1 .. 8 experts; outputs start poisoned (NaN / -1), and the
interpreted launches run under the race and bounds checker (tests/triton_race.py)."""

from __future__ import annotations

import pytest
import torch

from convlora_kernels import reference

from .conftest import GATE_CASES, assert_close_to_reference, gate_case

TG = pytest.importorskip("convlora_kernels.ops.triton_gate")
import convlora_kernels.ops.triton_conv_lora as T  # noqa: E402
from convlora_kernels.ops._triton_common import INTERPRET  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = [
    pytest.mark.skipif(T.unavailable_reason(torch.empty(0, device=DEVICE)) is not None,
                       reason="Triton backend unavailable here (needs CUDA or TRITON_INTERPRET=1)"),
    pytest.mark.usefixtures("triton_race_check"),  # interpreted launches: races, bounds
]
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv(T.ENV_POISON, "1")


@pytest.mark.parametrize("n, r, e", GATE_CASES)
@pytest.mark.parametrize("mode", ["train", "eval", "forced"])
def test_gate_forward(n, r, e, mode):
    g, wg, wn, noise = gate_case(n, r, e, seed=n + r + e)
    forced = torch.randint(0, e, (n,), generator=torch.Generator().manual_seed(1)) if mode == "forced" else None
    nz = noise if mode == "train" else None
    if forced is None:
        want_index, want_loss = reference.route(g, wg, wn, nz)
    else:
        want_index, want_loss = forced, reference.moe_loss_from_index(forced, e, torch.float64)
    dev = lambda t: None if t is None else t.float().to(DEVICE)  # noqa: E731
    # g as partial sums over 3 token blocks of 5 tokens: the kernel sums them and divides.
    parts = torch.stack([g * 1.5, g * 2.0, g * 1.5], dim=1)
    got_g, index, loss = TG.gate_forward(dev(parts), 5, dev(wg), dev(wn), dev(nz),
                                         None if forced is None else forced.to(DEVICE))
    assert_close_to_reference(got_g.cpu(), g, RTOL, "g")
    assert index.dtype == torch.int64 and loss.dtype == torch.float32 and loss.shape == ()
    assert torch.equal(index.cpu(), want_index)
    assert_close_to_reference(loss.cpu(), want_loss, RTOL, "moe_loss")


# N = 1 is left out: with one sample the load terms sit in Phi's tails and the float64
# gradients are ~1e-55, below float32's range (the kernel, like a float32 gate, gives 0).
@pytest.mark.parametrize("n, r, e", [c for c in GATE_CASES if c[2] > 1 and c[0] > 1])
def test_gate_backward(n, r, e):
    g, wg, wn, noise = gate_case(n, r, e, seed=3 * n + r)
    leaves = [t.clone().requires_grad_(True) for t in (g, wg, wn)]
    _, loss = reference.route(*leaves, noise)
    want = torch.autograd.grad(loss * 1.7, leaves)
    assert min(w.abs().max().item() for w in want) > 1e-6, "degenerate case: pick another seed"
    dev = lambda t: t.float().to(DEVICE)  # noqa: E731
    dg, dwg, dwn = TG.gate_backward(dev(g), dev(wg), dev(wn), dev(noise), torch.tensor(1.7, device=DEVICE), 0.25)
    assert_close_to_reference(dg.cpu(), want[0] * 0.25, RTOL, "dg")
    assert_close_to_reference(dwg.cpu(), want[1], RTOL, "d w_gate")
    assert_close_to_reference(dwn.cpu(), want[2], RTOL, "d w_noise")


def test_gate_backward_one_expert_is_zero():
    g, wg, wn, noise = (t.float().to(DEVICE) for t in gate_case(4, 3, 1, seed=0))
    for t in TG.gate_backward(g, wg, wn, noise, torch.tensor(1.0, device=DEVICE), 1.0):
        assert torch.equal(t, torch.zeros_like(t))


def test_gate_backward_opcheck():
    g, wg, wn, noise = (t.float().to(DEVICE) for t in gate_case(5, 3, 4, seed=2))
    torch.library.opcheck(TG.gate_backward, (g, wg, wn, noise, torch.tensor(0.5, device=DEVICE), 0.5))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (and no interpreter)")
def test_gpu_gate_all_cases():
    """Every case above on the GPU in one test (the gpu-marked suite runs first in gpu_check)."""
    for n, r, e in GATE_CASES:
        for mode in ("train", "eval", "forced"):
            test_gate_forward(n, r, e, mode)
        if e > 1 and n > 1:
            test_gate_backward(n, r, e)
