"""scripts/triton_layout_stats.py (what Triton made of a kernel: layout conversions, shared
memory, cross-thread SASS) runs on the CPU, and the expert forward at r = 8 has no cross-thread
traffic in its compiled form (the v6 layout: NOTES.md, "Versions of the Triton backend"), nor
have the two dZ gather kernels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "triton_layout_stats.py"
sys.path.insert(0, str(SCRIPT.parent))
import triton_resource_usage as tru  # noqa: E402


def _stats(tmp_path, kernel: str) -> list[dict]:
    """The script's JSON rows for the kernels matching ``kernel`` (bf16, r = 8, SAM windows)."""
    if tru.unavailable_reason():
        pytest.skip(tru.unavailable_reason())
    env = tru.clean_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # really compile (ptxas log included)
    out = tmp_path / "stats.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--kernel", kernel, "--dtype", "bf16", "--r", "8",
         "--loops", "--json", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_expert_forward_has_no_cross_thread_traffic(tmp_path):
    (row,) = _stats(tmp_path, "experts_fwd")
    assert row["kernel"] == "_convlora_experts_fwd_kernel" and row["regs"] > 0
    assert row["loops"], "no loop body found in the SASS"
    # One pixel per thread: no shared memory, no shuffles; the only barriers are the kernel's
    # own tl.debug_barrier()s (two phases per U-patch row and one after the patches: <= 4
    # static), none inside the conv loops.
    assert row["shared"] == 0 and row["sass"]["LDS"] == row["sass"]["STS"] == 0
    assert row["sass"]["SHFL"] == 0
    assert row["sass"]["BAR"] <= 4
    # The conv-offset loop: 64 weight loads and 8 patch loads (r = 8) per offset.
    conv_loops = [loop for loop in row["loops"] if loop["LDG"] >= 72]
    assert conv_loops and all(loop["BAR"] == 0 for loop in conv_loops)


def test_dz_gather_has_no_cross_thread_traffic(tmp_path):
    """The dZ gather's neighbour loads keep one pixel per thread (its pixel index is written as
    ``pix + const``; rebuilt from row and column, Triton 3.6 spread a pixel's channels over 8
    threads: 4 KB of shared memory per kernel and ~5x the FMAs of weight arithmetic). Triton
    3.8 (CI's) kept pixels either way; run this file under the device's Triton to check 3.6."""
    rows = _stats(tmp_path, "experts_dz")
    assert sorted(row["kernel"] for row in rows) == [
        "_convlora_experts_dz_cols_kernel", "_convlora_experts_dz_rows_kernel"]
    for row in rows:
        assert row["shared"] == 0, row
        assert {k: row["sass"][k] for k in ("BAR", "LDS", "STS", "SHFL")} == dict.fromkeys(
            ("BAR", "LDS", "STS", "SHFL"), 0), row
