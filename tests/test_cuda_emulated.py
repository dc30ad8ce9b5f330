"""The extension's CUDA kernels, run on the CPU by the emulator in ``tests/cuda_emu``, against
their CPU twins and the float64 reference arithmetic.

The CPU twins (``csrc/convlora_cpu.cpp``) share the per-element math with the CUDA kernels; these
tests cover what only the CUDA file has: the grids, thread strides, shared-memory tiles, barriers,
warp shuffles and per-tile partial sums, plus the launchers' vector/scalar and rank-bucket
choices. Every case runs with the block's threads scheduled first-to-last and last-to-first, with
shared memory and outputs poisoned (NaN), so a missing barrier shows in one of the two orders.
"""

from __future__ import annotations

import pytest
import torch

from convlora_kernels import reference
from convlora_kernels.ops import cuda_conv_lora as cc

from . import cuda_emu
from .conftest import GATE_CASES, assert_close_to_reference, gate_case

pytestmark = pytest.mark.skipif(
    not cc.extension_loaded(), reason="extension not built (tests/test_cuda_ext.py says why)"
)


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.load()


@pytest.fixture(autouse=True, params=["forward", "reverse"])
def thread_order(request, monkeypatch):
    monkeypatch.setenv("CONVLORA_EMU_THREAD_ORDER", request.param)
    monkeypatch.setenv("CONVLORA_POISON", "1")
    return request.param


def _rand(*shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _check(got, want, rtol, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close_to_reference(a, b, rtol, f"{what}[{i}]")


# ------------------------------------------------------------------------------ down projection
# (N, H, W, C_in, r, cat_cols): blocks of 64 tokens with an inactive tail (2*5*7 = 70 tokens), a
# 1x1 map, C_in not a multiple of the 16-byte vector (scalar path), every rank bucket of the
# launcher (r <= 8, <= 32, <= 64), and A wider than one shared-memory chunk (33 * 300 * 4 B > 32 KB).
DOWN_CASES = [
    (2, 5, 7, 40, 3, 48),
    (1, 1, 1, 16, 1, 0),
    (1, 3, 2, 6, 8, 8),
    (3, 2, 3, 24, 9, 40),
    (1, 4, 5, 300, 33, 304),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", DOWN_CASES, ids=lambda c: "x".join(map(str, c)))
def test_down_proj(emu, case, dtype):
    n, h, w, c, r, cols = case
    x, a = _rand(n, h, w, c, dtype=dtype, seed=1), _rand(r, c, dtype=dtype, seed=2)
    z, g, xcat = emu.down_proj(x, a, cols)
    z64 = torch.einsum("nhwc,kc->nhwk", x.double(), a.double())
    rtol = 1e-12 if dtype == torch.float64 else 1e-5  # float32 accumulation for the others
    assert z.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_reference(z, z64, rtol, "z")
    assert_close_to_reference(g, z64.mean((1, 2)), rtol, "g")
    if cols:
        assert torch.equal(xcat[..., :c], x) and not xcat[..., c:].any()
    else:
        assert xcat.numel() == 0


# ------------------------------------------------------------------------------ experts
def _experts_case(n, h, w, r, depthwise, dtype, index=None, num_experts=8):
    z = _rand(n, h, w, r, dtype=dtype, seed=3)
    idx = torch.arange(n) % num_experts if index is None else index
    ew = _rand(num_experts, r, 1 if depthwise else r, 3, 3, dtype=dtype, seed=4) * 0.5
    eb = _rand(num_experts, r, dtype=dtype, seed=5) * 0.5
    dy = _rand(n, h, w, r, dtype=dtype, seed=6)
    return z, idx, ew, eb, dy


def _experts_both(ops, z, idx, ew, eb, dy):
    return (ops.experts_fwd(z, idx, ew, eb), *ops.experts_bwd(z, idx, ew, eb, dy))


def _twins_float64(args):
    """_experts_both of the CPU twins on float64 copies of args (the reference of float32 runs)."""
    return _experts_both(torch.ops.convlora_cuda, *(t.double() if t.is_floating_point() else t for t in args))


@pytest.mark.parametrize("depthwise", [False, True], ids=["full", "depthwise"])
@pytest.mark.parametrize("r", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 7), (14, 14)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_experts_every_scale_float64(emu, hw, r, depthwise):
    """8 samples routed to scales 1..8; 14x14 at r = 8 spans 22 tiles of 9 pixels per sample.
    r <= 4 takes the 4-channel chunks (r = 4: whole chunks, the tap gradients' vector loads) and
    r = 3 the fill's 3-channel items with scalar loads."""
    args = _experts_case(8, *hw, r, depthwise, torch.float64)
    _check(_experts_both(emu, *args), _experts_both(torch.ops.convlora_cuda, *args), 1e-12, "experts")


@pytest.mark.parametrize("r", [12, 16, 32, 33])
def test_experts_wide_rank_float64(emu, r):
    """Ranks above the channel chunk (8) of the tap loop and the weight-gradient stage: two
    chunks (r = 12, the second padded; r = 16), four (r = 32, the largest rank whose weight is
    staged in shared memory: 4 pixels and 129 KB per float64 block, which needs the kernels'
    opt-in above 48 KB) and five (r = 33, not staged: one channel per tap-loop item; 2 pixels
    per block); more weight-gradient items than threads (strided)."""
    args = _experts_case(8, 3, 5, r, False, torch.float64)
    _check(_experts_both(emu, *args), _experts_both(torch.ops.convlora_cuda, *args), 1e-12, "experts")


def test_experts_rank_32_float32(emu):
    """r = 32 in float32, the staged path's widest case (65 KB per block, opted in): against the
    float64 twin."""
    index = torch.tensor([1, 7, 3, 0, 5, 1])
    args = _experts_case(6, 4, 5, 32, False, torch.float32, index=index)
    _check(_experts_both(emu, *args), _twins_float64(args), 1e-5, "experts")


@pytest.mark.parametrize("r", [2, 3, 5, 7])
@pytest.mark.parametrize("hw", [(5, 7), (14, 14)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_experts_every_scale_float32(emu, hw, r):
    """float32 blocks hold twice float64's pixels, so only they reach the tap loop's two-tap
    items (more single-tap items than threads: even s, r = 2..7; r = 3: 29 pixels per block,
    464 items), besides a last block of a few pixels that keeps single taps. Every scale,
    against the float64 twin."""
    args = _experts_case(8, *hw, r, False, torch.float32)
    _check(_experts_both(emu, *args), _twins_float64(args), 1e-5, "experts")


def test_experts_staging_falls_back_on_a_smaller_device(emu, monkeypatch):
    """On a device whose opt-in shared memory (sm_86: 99 KB) cannot hold r = 32's staged float64
    block (129 KB), the launchers take the unstaged path: the same sums per output, so y and dz
    to the bit; dEW / dEB come from a different tiling (2 pixels per block, not 4)."""
    args = _experts_case(8, 3, 5, 32, False, torch.float64)
    staged = _experts_both(emu, *args)
    monkeypatch.setenv("CONVLORA_EMU_OPTIN_SMEM", "101376")
    unstaged = _experts_both(emu, *args)
    assert torch.equal(staged[0], unstaged[0]) and torch.equal(staged[1], unstaged[1])
    _check(unstaged[2:], staged[2:], 1e-12, "experts weight gradients")


@pytest.mark.parametrize("depthwise", [False, True], ids=["full", "depthwise"])
def test_experts_random_routing_float32(emu, depthwise):
    """Several samples per expert and an unchosen expert (exact zero gradients); float32 against
    the float64 twin."""
    index = torch.tensor([2, 2, 5, 0, 5, 3, 2, 6, 1, 3])
    args = _experts_case(10, 6, 5, 3, depthwise, torch.float32, index=index)
    got = _experts_both(emu, *args)
    want = _twins_float64(args)
    _check(got, want, 1e-5, "experts")
    assert not got[2][4].any() and not got[3][7].any()


@pytest.mark.parametrize("r", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_experts_z_not_16_byte_aligned(emu, dtype, r):
    """z one element into its storage (contiguous, not 16-byte aligned): the U-patch fill's
    vector path (16 bytes of channels per load) must fall back to one channel per item, with the
    same values to the bit (the sanitizer run checks the alignment of every load)."""
    z, idx, ew, eb, dy = _experts_case(8, 5, 7, r, False, dtype)
    shifted = torch.empty(z.numel() + 1, dtype=dtype)[1:].view_as(z).copy_(z)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    aligned = _experts_both(emu, z, idx, ew, eb, dy)
    for i, (a, b) in enumerate(zip(_experts_both(emu, shifted, idx, ew, eb, dy), aligned)):
        assert torch.equal(a, b), f"output {i}"


@pytest.mark.parametrize("depthwise", [False, True], ids=["full", "depthwise"])
def test_experts_bwd_with_dg_float64(emu, depthwise):
    """The dz kernel adds dg[n] (the per-sample mean's gradient) to every pixel of sample n, after
    the residual and the gather as the CPU twin does: against the twin, and exactly dg more than
    without it; 3x5 maps at r = 3 put pixels of several samples in one dz block."""
    args = _experts_case(8, 3, 5, 3, depthwise, torch.float64)
    dg = _rand(8, 3, seed=12)
    got = emu.experts_bwd(*args, dg)
    _check(got, torch.ops.convlora_cuda.experts_bwd(*args, dg), 1e-12, "experts_bwd")
    plain = emu.experts_bwd(*args)
    assert torch.equal(got[0], plain[0] + dg[:, None, None, :])
    assert torch.equal(got[1], plain[1]) and torch.equal(got[2], plain[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("depthwise", [False, True], ids=["full", "depthwise"])
def test_experts_bwd_reads_a_strided_16bit_dy(emu, depthwise, dtype):
    """The layer's dy: a column slice (row stride 13) of the backward GEMM's 16-bit output, read
    in place by both kernels: exactly float32 dy's results (the same kernels on the widened dy)
    with dz rounded once to dy's dtype, dz bit for bit the CPU twin's (float32 dEW sums differ
    from the twin's in order: 1e-5 against the float64 twin, as in the other float32 tests);
    dg added as before; 3x5 maps at r = 3."""
    z, idx, ew, eb, dy = _experts_case(8, 3, 5, 3, depthwise, torch.float32)
    wide = _rand(8, 3, 5, 13, dtype=dtype, seed=7)
    dy16 = wide[..., 6:9]  # strides (195, 65, 13, 1)
    dg = _rand(8, 3, dtype=torch.float32, seed=12)
    got = emu.experts_bwd(z, idx, ew, eb, dy16, dg)
    assert got[0].dtype == dtype and got[0].is_contiguous()
    wide_f = emu.experts_bwd(z, idx, ew, eb, dy16.float(), dg)
    assert torch.equal(got[0], wide_f[0].to(dtype))
    assert torch.equal(got[1], wide_f[1]) and torch.equal(got[2], wide_f[2])
    assert torch.equal(got[0], torch.ops.convlora_cuda.experts_bwd(z, idx, ew, eb, dy16, dg)[0])
    twin64 = torch.ops.convlora_cuda.experts_bwd(z.double(), idx, ew.double(), eb.double(),
                                                 dy16.double(), dg.double())
    _check(got[1:], twin64[1:], 1e-5, "experts_bwd")


# The tf32 tap loop (mma_tap_loop): full conv, 16 <= r <= 32, float32 z, sm_80+. Its class is
# tf32's, 3e-4 against the float64 twin: inputs rounded to 10 mantissa bits (a relative 2^-11),
# float32 sums. (Measured here, emulated: max errors 1.6-3.4e-4 of each output's scale; the
# float32 path's are 2-9e-7.)
TF32_CASES = [(16, 3, 5), (20, 1, 1), (24, 2, 7), (32, 4, 3)]


def _experts_tf32(ops, z, idx, ew, eb, dy):
    return (ops.experts_fwd(z, idx, ew, eb, True), *ops.experts_bwd(z, idx, ew, eb, dy, None, True))


@pytest.mark.parametrize("case", TF32_CASES, ids=lambda c: f"r{c[0]}-{c[1]}x{c[2]}")
def test_experts_tf32_tensor_cores(emu, case):
    """Every scale (8 samples, 8 experts), m-tiles 1 and 2, channel chunks with padding (r = 20,
    24), a 1x1 map and a block's last, partial n-tile: the tf32 path against the float64 twin, and
    not the float32 path's bits (it ran)."""
    r, h, w = case
    z, idx, ew, eb, dy = _experts_case(8, h, w, r, False, torch.float32)
    # The weight at a conv's init scale, std 1 / sqrt(9 r), so the pre-activations are O(|U|):
    # tf32's error is relative to the sum's terms. At _experts_case's std 0.5 (pre ~ 6 at r = 16)
    # y's error is the sum's absolute error against a scale GELU passes linearly (r = 16:
    # 6.1e-3 at scale 18, 3.3e-4 of it).
    args = (z, idx, ew * (2 / (3 * r ** 0.5)), eb, dy)
    got = _experts_tf32(emu, *args)
    _check(got, _twins_float64(args), 3e-4, "experts tf32")
    assert not torch.equal(got[0], emu.experts_fwd(*args[:4]))


def test_experts_tf32_only_where_the_kernels_have_it(emu, monkeypatch):
    """tf32=True changes nothing where the launchers keep the CUDA-core loop: r < 16, depthwise,
    float64, a device without tf32 tensor cores (sm_75); the CPU twins ignore it."""
    for r, depthwise, dtype in [(8, False, torch.float32), (16, True, torch.float32),
                                (16, False, torch.float64)]:
        args = _experts_case(3, 2, 3, r, depthwise, dtype)
        assert all(torch.equal(a, b) for a, b in zip(_experts_tf32(emu, *args), _experts_both(emu, *args)))
    args = _experts_case(3, 2, 3, 16, False, torch.float32)
    twins = torch.ops.convlora_cuda
    assert all(torch.equal(a, b) for a, b in zip(_experts_tf32(twins, *args), _experts_both(twins, *args)))
    monkeypatch.setenv("CONVLORA_EMU_CC_MAJOR", "7")
    assert all(torch.equal(a, b) for a, b in zip(_experts_tf32(emu, *args), _experts_both(emu, *args)))


# ------------------------------------------------------------------------------ gate
@pytest.mark.parametrize("n, r, e", GATE_CASES)
@pytest.mark.parametrize("mode", ["train", "eval", "forced"])
def test_gate_fwd(emu, n, r, e, mode):
    g, wg, wn, noise = gate_case(n, r, e, seed=7)
    args = (g, wg, wn, noise if mode == "train" else None, torch.arange(n) % e if mode == "forced" else None)
    got, want = emu.gate_fwd(*args), torch.ops.convlora_cuda.gate_fwd(*args)
    assert torch.equal(got[0], want[0]), "routing differs"
    assert_close_to_reference(got[1], want[1], 1e-12, "moe_loss")


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("n, r, e, seed", [(300, 8, 8, 12), (300, 8, 8, 5), (7, 3, 8, 1), (2, 1, 2, 3)])
def test_gate_float32(emu, n, r, e, seed):
    """float32, the dtype the GPU runs the gate in. Routing and loss against the float64 twin on
    the same (float32-rounded) inputs; the gradients against the float64 reference, with the
    error allowed up to twice that of the eager float32 gate. Seed 12 is ill-conditioned: there
    eager float32 itself is off by 6e-5 (of the largest element) in d w_noise, and so is any
    float32 implementation of the same formula."""
    f32 = [t.float() for t in gate_case(n, r, e, seed=seed)]
    g, wg, wn, noise = (t.double() for t in f32)
    got, want = emu.gate_fwd(*f32, None), torch.ops.convlora_cuda.gate_fwd(g, wg, wn, noise, None)
    assert torch.equal(got[0], want[0]), "routing differs"
    assert_close_to_reference(got[1], want[1], 1e-5, "moe_loss")

    def eager_grads(dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (g, wg, wn)]
        _, loss = reference.route(*leaves, noise.to(dtype))
        return torch.autograd.grad(loss * 1.3, leaves)

    want, eager = eager_grads(torch.float64), eager_grads(torch.float32)
    got = emu.gate_bwd(*f32, torch.tensor(1.3), 1.0)
    for name, a, b, w in zip(("dg", "d w_gate", "d w_noise"), got, eager, want):
        assert not torch.isnan(a).any(), name
        assert _max_rel(a, w) <= max(2 * _max_rel(b, w), 1e-5), (
            f"{name}: {_max_rel(a, w):.2e} relative error, eager float32 {_max_rel(b, w):.2e}")


@pytest.mark.parametrize("n, r, e", [c for c in GATE_CASES if c[2] > 1])
def test_gate_bwd(emu, n, r, e):
    g, wg, wn, noise = gate_case(n, r, e, seed=8)
    args = (g, wg, wn, noise, torch.tensor(1.3, dtype=torch.float64), 0.5)
    _check(emu.gate_bwd(*args), torch.ops.convlora_cuda.gate_bwd(*args), 1e-11, "gate_bwd")


def test_device_assertion_on_an_out_of_range_expert(emu):
    """The CUDA path checks expert_index on the device (no host sync): a failed assertion must
    surface as an error of the call (the CPU twin raises its own host-side message instead)."""
    z, idx, ew, eb, dy = _experts_case(4, 3, 2, 3, False, torch.float64)
    bad = torch.tensor([0, 8, 1, 2])
    with pytest.raises(RuntimeError, match="device-side assertion failed.*expert_index out of range"):
        emu.experts_fwd(z, bad, ew, eb)
    with pytest.raises(RuntimeError, match="device-side assertion failed"):
        emu.experts_bwd(z, bad, ew, eb, dy)


def test_experts_bwd_host_launches(emu, thread_order, monkeypatch):
    """The CUDA launcher's own ATen work around its three kernels (the CPU twin is organised
    differently, so tests/test_launch_count.py cannot see it): one reduction over tiles. The
    per-expert sums are a kernel (session 12: the one-hot GEMM, its operand and two output copies
    were six more launches per backward on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    from .test_launch_count import _launches

    monkeypatch.setenv("CONVLORA_POISON", "0")  # the NaN fills are a test aid, not launches
    args = _experts_case(8, 5, 7, 8, False, torch.float32)
    # dy as the layer passes it under autocast: a bf16 column slice, read in place (no copy).
    dy = _rand(8, 5, 7, 24, dtype=torch.bfloat16, seed=7)[..., 8:16]
    args = (*args[:4], dy)
    emu.experts_bwd(*args)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        emu.experts_bwd(*args)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    assert dict(_launches(events)) == {"sum": 1}


# ------------------------------------------------------------------------------ SAM shapes
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["windows", "global"])
def test_sam_shapes(emu, kind):
    """ViT-B's qkv input: 100 windows of 14x14 (full conv) or one 64x64 map (depthwise), r = 8,
    random routing; bf16 x for the down projection (its 16-byte vector path), float32 experts
    against the float64 twins. Grids of 1100-2200 expert blocks and 300 down-projection blocks."""
    n, h, w = (100, 14, 14) if kind == "windows" else (1, 64, 64)
    c, r, depthwise = 768, 8, kind == "global"
    x = _rand(n, h, w, c, dtype=torch.bfloat16, seed=9)
    a = (_rand(r, c, seed=10) * c**-0.5).to(torch.bfloat16)
    z, g, xcat = emu.down_proj(x, a, 776)
    z64 = torch.einsum("nhwc,kc->nhwk", x.double(), a.double())
    assert_close_to_reference(z, z64, 1e-5, "z")
    assert_close_to_reference(g, z64.mean((1, 2)), 1e-5, "g")
    assert torch.equal(xcat[..., :c], x) and not xcat[..., c:].any()
    index = torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(11))
    args = _experts_case(n, h, w, r, depthwise, torch.float32, index=index)
    _check(_experts_both(emu, *args), _twins_float64(args), 1e-5, "experts")


# ------------------------------------------------------------------------------ the emulator
def test_rewrite_rules_fail_loudly():
    with pytest.raises(RuntimeError, match="matched nothing"):
        cuda_emu.emulated_source("int main() {}")


def test_launch_rewrite():
    src = "k<T,\n  A<B>>\n    <<<grid, 256, smem(a), stream>>>(p, f(q, r));"
    out, n = cuda_emu._rewrite_launches(src)
    assert n == 1
    assert out == "::convlora_emu::launch(k<T,\n  A<B>>, grid, 256, smem(a), stream, p, f(q, r));"


# Each mutant drops one barrier of the real source (its first occurrence after the needle's
# start): the emulator must notice, or it would prove nothing.
MUTANTS = {
    # Expert tiles: the tap loop reads U patches other threads have not written yet (NaN).
    "experts_patch_barrier": "b.uty, b.utx, b.up);\n  __syncthreads();\n",
    # Expert tiles: the patch fill reads upsample taps other threads have not written yet.
    "experts_taps_barrier": "q - 1 - kPatch, b.s, g.W);\n  }\n  __syncthreads();\n",
    # Expert backward: a thread's dEW partial overwrites U patches others still read.
    "experts_weight_partials_barrier": "__syncthreads();       // the U patches are read\n",
    # Expert backward (c8): patch gradients read the weight before every thread restaged it.
    "experts_restage_barrier": "ew_e[(c * g.r + ci) * 9 + tap] : T(0);\n    }\n    __syncthreads();  // the weight",
    # Expert backward (c9, depthwise: no restaging barrier): patch gradients overwrite the U
    # patches (and the weight-gradient groups' partials there) that others still read.
    "experts_weight_du_barrier": "__syncthreads();  // the U patches are read\n    const int per",
    # Expert backward (c9): window weights overwrite tap gradients others still read.
    "experts_dz_window_weights_barrier": "__syncthreads();  // the tap gradients are read:",
    # Expert backward (c9): the window contraction reads weights and patch gradients other
    # threads have not written yet.
    "experts_dz_window_barrier": "ww[p].col[q - kWindow]);\n  }\n  __syncthreads();\n",
    # Down projection: a thread overwrites A's next chunk while others still read this one.
    "down_proj_chunk_barrier": "__syncthreads();  // the previous chunk is consumed\n",
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_emulator_catches_a_missing_barrier(mutant, thread_order):
    src = cuda_emu.SOURCE.read_text()
    needle = MUTANTS[mutant]
    assert needle in src, f"{mutant}: the source changed; update the mutant"
    ops = cuda_emu.load(src.replace(needle, needle.replace("__syncthreads();", ""), 1),
                        namespace=f"convlora_cuda_emu_{mutant}")
    real = torch.ops.convlora_cuda
    if mutant.startswith("experts_weight"):
        z, idx, ew, eb, dy = _experts_case(8, 5, 7, 8, mutant.endswith("du_barrier"), torch.float64)
        got, want = ops.experts_bwd(z, idx, ew, eb, dy)[1], real.experts_bwd(z, idx, ew, eb, dy)[1]
    elif mutant.startswith(("experts_restage", "experts_dz")):
        z, idx, ew, eb, dy = _experts_case(8, 5, 7, 8, False, torch.float64)
        got, want = ops.experts_bwd(z, idx, ew, eb, dy)[0], real.experts_bwd(z, idx, ew, eb, dy)[0]
    elif mutant.startswith("experts"):
        z, idx, ew, eb, _ = _experts_case(8, 5, 7, 8, False, torch.float64)
        got, want = ops.experts_fwd(z, idx, ew, eb), real.experts_fwd(z, idx, ew, eb)
    else:
        x, a = _rand(1, 4, 5, 300, seed=1), _rand(33, 300, seed=2)
        got, want = ops.down_proj(x, a, 0)[0], real.down_proj(x, a, 0)[0]
    broken = bool(torch.isnan(got).any()) or not torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    assert broken, f"{mutant}: the kernel ran without its barrier unnoticed ({thread_order} order)"


def test_emulator_catches_the_expert_sums_barrier(thread_order):
    """The per-expert sums' first lane adds the other lanes' sums from shared memory. Without the
    barrier, first-to-last order runs lane 0 before the others have written (NaN: caught);
    last-to-first runs it after them, where the missing barrier does not show (the numbers
    are right), so only the forward order can catch this one."""
    needle = "lanes[lane][col] = acc;\n  __syncthreads();\n"
    src = cuda_emu.SOURCE.read_text()
    assert needle in src, "the source changed; update the mutant"
    ops = cuda_emu.load(src.replace(needle, needle.replace("  __syncthreads();\n", ""), 1),
                        namespace="convlora_cuda_emu_expert_sums_barrier")
    z, idx, ew, eb, dy = _experts_case(20, 5, 7, 8, False, torch.float64)
    got = ops.experts_bwd(z, idx, ew, eb, dy)[1:]
    want = torch.ops.convlora_cuda.experts_bwd(z, idx, ew, eb, dy)[1:]
    broken = any(bool(torch.isnan(a).any()) or not torch.allclose(a, b, rtol=1e-9, atol=1e-9)
                 for a, b in zip(got, want))
    assert broken == (thread_order == "forward"), (thread_order, broken)


def test_emulator_reports_a_divergent_shuffle(thread_order):
    """A mutant whose down-projection shuffles only in the threads of real tokens: the last
    block's idle lanes skip __shfl_xor_sync, undefined behaviour on a GPU (a hang or garbage).
    The emulator must raise, not hang or return numbers."""
    src = cuda_emu.SOURCE.read_text()
    needle = "if (k < r) {  // r is uniform"
    assert needle in src, "the source changed; update the mutant"
    ops = cuda_emu.load(src.replace(needle, "if (k < r && active) {  // r is uniform"),
                        namespace="convlora_cuda_emu_divergent_shuffle")
    x, a = _rand(2, 5, 7, 16, seed=1), _rand(3, 16, seed=2)  # 70 tokens: block 2 has 6
    with pytest.raises(RuntimeError, match="__shfl_xor_sync needs every lane"):
        ops.down_proj(x, a, 0)


def test_tf32_fragment_mutant_fails(thread_order):
    """A mutant whose lanes put A's rows g + 8 and columns t + 4 in each other's registers (a
    fragment-layout slip the PTX would accept) must fail the tf32 test's check: the emulated mma
    rebuilds the operands from the documented layout, so such a slip cannot pass unnoticed."""
    src = cuda_emu.SOURCE.read_text()
    needle = "const uint32_t a[4] = {f.v[0], f.v[1], f.v[2], f.v[3]};"
    assert needle in src, "the source changed; update the mutant"
    ops = cuda_emu.load(src.replace(needle, "const uint32_t a[4] = {f.v[0], f.v[2], f.v[1], f.v[3]};"),
                        namespace="convlora_cuda_emu_tf32_fragments")
    args = _experts_case(8, 3, 5, 16, False, torch.float32)
    with pytest.raises(AssertionError):
        _check(_experts_tf32(ops, *args)[:1], _twins_float64(args)[:1], 3e-4, "experts tf32")


def test_tf32_weight_gradient_mutant_fails(thread_order):
    """The same slip in the tf32 weight-gradient stage (mma_weight_partials: A's rows g + 8 and
    columns t + 4 swapped in the large terms' fragment) must fail the check of dEW, at r = 32
    (both m-tiles), where the unmutated stage passes it."""
    src = cuda_emu.SOURCE.read_text()
    needle = "const uint32_t ah[4] = {d[0].hi, d[1].hi, d[2].hi, d[3].hi};"
    assert needle in src, "the source changed; update the mutant"
    ops = cuda_emu.load(src.replace(needle, "const uint32_t ah[4] = {d[0].hi, d[2].hi, d[1].hi, d[3].hi};"),
                        namespace="convlora_cuda_emu_tf32_weight_fragments")
    z, idx, ew, eb, dy = _experts_case(8, 3, 5, 32, False, torch.float32)
    args = (z, idx, ew * (2 / (3 * 32 ** 0.5)), eb, dy)
    want = _twins_float64(args)
    _check(_experts_tf32(cuda_emu.load(), *args)[2:3], want[2:3], 3e-4, "experts tf32 dEW")
    with pytest.raises(AssertionError):
        _check(_experts_tf32(ops, *args)[2:3], want[2:3], 3e-4, "experts tf32 dEW")


def test_emulator_enforces_the_shared_memory_opt_in(thread_order):
    """A mutant whose launchers never opt in to more than 48 KB of shared memory: r = 32's staged
    float64 block (129 KB) must fail to launch, as on a GPU, not run past the limit."""
    src = cuda_emu.SOURCE.read_text()
    needle = "  if (smem > kDefaultSmemBytes)\n    C10_CUDA_CHECK(cudaFuncSetAttribute("
    assert needle in src, "the source changed; update the mutant"
    ops = cuda_emu.load(src.replace(needle, needle.replace("smem > kDefaultSmemBytes", "false")),
                        namespace="convlora_cuda_emu_no_smem_opt_in")
    z, idx, ew, eb, _ = _experts_case(8, 3, 5, 32, False, torch.float64)
    with pytest.raises(RuntimeError, match="above the kernel's limit"):
        ops.experts_fwd(z, idx, ew, eb)


def test_tap_pairs_run_where_the_tests_look(emu, thread_order):
    """c14: the tap loop's two-tap items, which only blocks with more single-tap items than
    threads take (even s, one chunk, r = 2..7, float32: float64 blocks hold half the pixels),
    run in the float32 tests above. A mutant whose pairs convolve the first tap's window twice
    must break r = 3's even-s samples at a 5 x 7 map (a block of 29 pixels: 464 items for 256
    threads) and only those, and leave r = 8 (14 pixels per block, 224 items) untouched."""
    src = cuda_emu.SOURCE.read_text()
    needle = "k % (kTaps / 2) * 2, 0, emit);"
    assert needle in src, "the source changed; update the mutant"
    ops = cuda_emu.load(src.replace(needle, "0, 0, emit);"), namespace="convlora_cuda_emu_tap_pairs")
    args = _experts_case(8, 5, 7, 3, False, torch.float32)
    got, want = ops.experts_fwd(*args[:4]), _twins_float64(args)[0]
    wrong = [not torch.allclose(got[n].double(), want[n], rtol=1e-5, atol=1e-5) for n in range(8)]
    assert wrong == [(n + 1) % 2 == 0 for n in range(8)], wrong  # sample n has scale n + 1
    args = _experts_case(8, 5, 7, 8, False, torch.float32)
    assert torch.equal(ops.experts_fwd(*args[:4]), emu.experts_fwd(*args[:4]))
