#!/usr/bin/env python3
"""Where the Triton backward's float32 error comes from, on a GPU: a map, not a pass/fail.

The first GPU run (H200, 2026-11-28) failed ``test_gpu_sam_shapes_fp32`` on ``grad x`` alone at a
few elements (up to ~30x the 3e-5 bound), while the forward and the CUDA backend passed. This
script splits the gradient (with a separate x_down, dx = dout W and dx_down = dz A apart), prints
for every gradient max(err / bound) under the test's rule, lists the tokens whose dx_down is
over the bound with their sample, expert, position and expert block, reruns the same inputs to
see whether the result changes (a race), and sweeps forced scales 1..8.

    python scripts/triton_bwd_error_map.py            # on a CUDA machine, ~1 min
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CONVLORA_POISON", "1")

import torch  # noqa: E402

import convlora_kernels.ops.triton_conv_lora as T  # noqa: E402
from tests.test_triton import make_case, reference_fn, run  # noqa: E402

RTOL = 3e-5


def ratio(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """err / bound elementwise (the rule of tests.conftest.assert_close_to_reference)."""
    got, want = got.double(), want.double()
    scale = want.abs().max()
    return (got - want).abs() / (RTOL * (want.abs() + scale))


def report(label: str, n: int, h: int, w: int, r: int, depthwise: bool, index, gated=False,
           seed=None, c_in=768, c_out=2304, device="cuda") -> None:
    case = make_case(n, h, w, r, 8, depthwise, c_in=c_in, c_out=c_out,
                     seed=r if seed is None else seed, device=device)
    xd = case["x"] + 0.25  # distinct x_down: dx = dout W, dx_down = dz A
    want = run(case, index, gated, reference_fn, torch.float64, xd)
    got = run(case, index, gated, T.conv_lora_forward, torch.float32, xd)
    again = run(case, index, gated, T.conv_lora_forward, torch.float32, xd)
    routing = got[1].tolist()
    parts = [f"out {float(ratio(got[0], want[0]).max()):.2f}"]
    for name in want[3]:
        parts.append(f"{name} {float(ratio(got[3][name], want[3][name]).max()):.2f}")
    same = all(torch.equal(got[3][k], again[3][k]) for k in got[3]) and torch.equal(got[0], again[0])
    print(f"{label}: max err/bound  " + "  ".join(parts) + f"  | rerun bitwise equal: {same}")
    if not same:
        for k in got[3]:
            d = (got[3][k] - again[3][k]).abs().max()
            if d > 0:
                print(f"    rerun differs in {k}: max |diff| {float(d):.3e}")
    tok = ratio(got[3]["x_down"], want[3]["x_down"]).amax(-1)  # (n, h, w)
    bad = (tok > 1).nonzero().tolist()
    if bad:
        bp = T._expert_block_p(r, h * w)
        print(f"    dx_down over bound at {len(bad)} of {tok.numel()} tokens (expert BLOCK_P {bp}); first:")
        for nn_, hh, ww in bad[:12]:
            p = hh * w + ww
            e = routing[nn_]
            print(f"      n={nn_} expert={e} (s={e + 1}) h={hh} w={ww} p={p} block={p // bp} "
                  f"p%BLOCK_P={p % bp} ratio={float(tok[nn_, hh, ww]):.1f}")
        per_n = (tok > 1).flatten(1).sum(1).tolist()
        print(f"    bad tokens per sample: {per_n[:16]}{' ...' if len(per_n) > 16 else ''}")


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(torch.cuda.get_device_name(), "torch", torch.__version__,
          "autotune", os.environ.get(T.ENV_AUTOTUNE, "1"))
    ar = torch.arange
    report("global r8 full   arange%8", 4, 64, 64, 8, False, ar(4, device="cuda") % 8)
    report("global r3 full   arange%8", 4, 64, 64, 3, False, ar(4, device="cuda") % 8)
    report("window r32 full  arange%8", 100, 14, 14, 32, False, ar(100, device="cuda") % 8)
    report("window r8 full   arange%8", 100, 14, 14, 8, False, ar(100, device="cuda") % 8)
    report("window r8 dw     gated", 100, 14, 14, 8, True, None, gated=True, seed=11)
    if len(sys.argv) > 1 and sys.argv[1] == "--short":
        return 0
    for s in range(1, 9):
        report(f"global r8 full   all s={s}", 4, 64, 64, 8, False,
               torch.full((4,), s - 1, device="cuda"))
    for s in (1, 2, 3, 8):
        report(f"window r32 full  all s={s}", 100, 14, 14, 32, False,
               torch.full((100,), s - 1, device="cuda"))
    env = dict(os.environ, **{T.ENV_AUTOTUNE: "0"})
    print("--- again without the up-GEMM autotuner")
    subprocess.run([sys.executable, __file__, "--short"], env=env, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
