"""The reference against an independent formulation of SPEC.md, and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from convlora_kernels import reference

from .conftest import make_layer, reference_out


# ----------------------------------------------------------------------------- independent math
def resize_matrix(size_in: int, size_out: int, src_scale: float) -> torch.Tensor:
    """(size_out, size_in) float64 matrix of PyTorch's bicubic along one axis, written directly
    from SPEC section 3: src = scale * (i + 0.5) - 0.5, unclamped; taps clamped to the edges."""
    a = -0.75

    def cubic(d: float) -> float:  # the Keys kernel with a = -0.75, by distance
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        src = src_scale * (i + 0.5) - 0.5
        i0 = math.floor(src)
        for k in range(i0 - 1, i0 + 3):
            m[i, min(max(k, 0), size_in - 1)] += cubic(src - k)
    return m


def expert_direct(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: int) -> torch.Tensor:
    """SPEC section 2 step 4 with explicit matrices, shifted sums and the erf GELU.

    z: (N, r, H, W) float64. No F.interpolate, F.conv2d or F.gelu.
    """
    n, r, h, w = z.shape
    if s > 1:
        uy, ux = resize_matrix(h, s * h, 1.0 / s), resize_matrix(w, s * w, 1.0 / s)
        u = torch.einsum("ph,nchw,qw->ncpq", uy, z, ux)
    else:
        u = z
    hs, ws = u.shape[-2:]
    padded = torch.zeros(n, r, hs + 2, ws + 2, dtype=z.dtype)
    padded[:, :, 1:-1, 1:-1] = u
    pre = bias.view(1, r, 1, 1).expand(n, r, hs, ws).clone()
    depthwise = weight.shape[1] == 1
    for dy in range(3):
        for dx in range(3):
            tap = padded[:, :, dy : dy + hs, dx : dx + ws]
            if depthwise:
                pre += weight[:, 0, dy, dx].view(1, r, 1, 1) * tap
            else:
                pre += torch.einsum("oc,nchw->nohw", weight[:, :, dy, dx], tap)
    v = 0.5 * pre * (1 + torch.erf(pre / math.sqrt(2)))
    if s > 1:
        dy_, dx_ = resize_matrix(hs, h, float(s)), resize_matrix(ws, w, float(s))
        v = torch.einsum("hp,ncpq,wq->nchw", dy_, v, dx_)
    return v


# ----------------------------------------------------------------------------- bicubic facts
@pytest.mark.parametrize("t", [0.0, 0.125, 0.3, 0.5, 0.77, 0.999])
def test_cubic_weights_sum_to_one(t):
    assert sum(reference.cubic_weights(t)) == pytest.approx(1.0, abs=1e-12)


def test_downsample_facts():
    """Odd s picks one pixel; even s uses (-0.09375, 0.59375, 0.59375, -0.09375) (SPEC 3)."""
    assert reference.cubic_weights(0.0) == pytest.approx((0, 1, 0, 0), abs=1e-12)
    assert reference.cubic_weights(0.5) == pytest.approx((-0.09375, 0.59375, 0.59375, -0.09375), abs=1e-12)
    for s in range(2, 9):
        m = resize_matrix(5 * s, 5, float(s))
        assert (m != 0).sum(1).max() == (1 if s % 2 else 4)


@pytest.mark.parametrize("s", range(1, 9))
@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 4), (7, 7)])
def test_resize_matrix_matches_interpolate(s, hw):
    h, w = hw
    z = torch.randn(2, 3, h, w, dtype=torch.float64)
    up = torch.nn.functional.interpolate(z, scale_factor=s, mode="bicubic", align_corners=False)
    mine = torch.einsum("ph,nchw,qw->ncpq", resize_matrix(h, s * h, 1 / s), z, resize_matrix(w, s * w, 1 / s))
    torch.testing.assert_close(up, mine, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- experts
@pytest.mark.parametrize("s", range(1, 9))
@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("r, hw", [(1, (1, 1)), (3, (2, 3)), (3, (5, 7)), (8, (6, 6)), (2, (14, 14))])
def test_expert_forward_matches_direct(s, depthwise, r, hw):
    z = torch.randn(2, r, *hw, dtype=torch.float64)
    weight = torch.randn(r, 1 if depthwise else r, 3, 3, dtype=torch.float64) * 0.5
    bias = torch.randn(r, dtype=torch.float64)
    torch.testing.assert_close(
        reference.expert_forward(z, weight, bias, s), expert_direct(z, weight, bias, s), rtol=1e-10, atol=1e-12
    )


def test_expert_r1_keeps_channel_dim():
    """The official code squeezed the channel dim away at r = 1 (SPEC 4 defects)."""
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    out = reference.expert_forward(z, torch.randn(1, 1, 3, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), 2)
    assert out.shape == z.shape


def test_conv_lora_experts_routes_each_sample():
    layer = make_layer(r=3, num_experts=5)
    z = torch.randn(5, 4, 6, 3, dtype=torch.float64)
    idx = torch.tensor([4, 0, 2, 2, 1])
    y = reference.conv_lora_experts(z, idx, layer.expert_weight, layer.expert_bias)
    for n in range(5):
        e = int(idx[n])
        d = expert_direct(z[n : n + 1].permute(0, 3, 1, 2), layer.expert_weight[e], layer.expert_bias[e], e + 1)
        torch.testing.assert_close(y[n], z[n] + d[0].permute(1, 2, 0), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- gate and loss
def test_gate_and_loss_direct():
    """The gate and the auxiliary loss against SPEC section 2, evaluated by hand."""
    n, r, e = 6, 3, 4
    g = torch.randn(n, r, dtype=torch.float64)
    w_gate, w_noise = torch.randn(r, e, dtype=torch.float64), torch.randn(r, e, dtype=torch.float64)
    noise = torch.randn(n, e, dtype=torch.float64)
    idx, loss = reference.route(g, w_gate, w_noise, noise)

    clean = g @ w_gate
    sigma = torch.log1p(torch.exp(g @ w_noise)) + 0.01
    logits = clean + noise * sigma
    assert torch.equal(idx, logits.argmax(1))
    phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    load = [0.0] * e
    for i in range(n):
        srt = sorted(logits[i].tolist(), reverse=True)
        t_out, t_in = srt[0], srt[1]
        for j in range(e):
            thr = t_in if logits[i, j] > t_in else t_out
            load[j] += phi(float((clean[i, j] - thr) / sigma[i, j]))
    importance = [float((idx == j).sum()) for j in range(e)]

    def cv2(v):
        v = torch.tensor(v, dtype=torch.float64)
        return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)

    torch.testing.assert_close(loss, 0.01 * (cv2(importance) + cv2(load)), rtol=1e-12, atol=1e-15)


def test_gate_eval_and_single_expert():
    g = torch.randn(5, 2, dtype=torch.float64)
    idx, loss = reference.route(g, torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    counts = torch.bincount(idx, minlength=3).double()
    torch.testing.assert_close(loss, 0.01 * 2 * counts.var() / (counts.mean() ** 2 + 1e-10))
    idx1, loss1 = reference.route(g, torch.randn(2, 1, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64),
                                  torch.randn(5, 1, dtype=torch.float64))
    assert torch.equal(idx1, torch.zeros(5, dtype=torch.long)) and float(loss1) == 0.0


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("r, num_experts, hw", [(1, 2, (1, 1)), (2, 3, (2, 3)), (3, 4, (3, 3))])
def test_gradcheck_layer_function(depthwise, r, num_experts, hw):
    """Every input of the full function, through the output and the noisy gate's loss."""
    layer = make_layer(c_in=4, c_out=5, r=r, num_experts=num_experts, depthwise=depthwise)
    n = 3
    x = torch.randn(n, *hw, 4, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(n, num_experts, dtype=torch.float64)
    params = [layer.lora_A, layer.lora_B, layer.expert_weight, layer.expert_bias, layer.w_gate, layer.w_noise]
    params = [p.detach().clone().requires_grad_() for p in params]
    idx0 = reference_out(layer, x.detach(), noise=noise)[1]

    def fn(x, a, b, ew, eb, wg, wn):
        out, idx, loss = reference.conv_lora_linear(
            x, layer.weight, layer.bias, a, b, ew, eb, wg, wn, layer.scaling, None, noise
        )
        assert torch.equal(idx, idx0)  # routing must not flip inside the finite differences
        return out, loss

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("s", [2, 3, 4, 7])
def test_gradcheck_expert_every_scale(s):
    z = torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, w, b: reference.expert_forward(z, w, b, s), (z, w, b))
