"""scripts/cuda_sass_stats.py (registers, spills and static SASS of the extension's kernels) runs
on the CPU, and pins the compiled form of the expert kernels' two inner loops (NOTES.md,
"Versions of the CUDA backend's expert kernels", c5, c6 and c12): the tap loop convolves a
chunk of 8 (or, for r <= 4, 4) output channels per U value from the staged weight, and the
weight-gradient stage reads shared memory only, ~1 load per FMA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cuda_sass_stats.py"
sys.path.insert(0, str(SCRIPT.parent))
import cuda_sass_stats as css  # noqa: E402


def test_expert_kernels_compiled_form(tmp_path):
    if css.unavailable_reason():
        pytest.skip(css.unavailable_reason())
    out = tmp_path / "stats.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--kernel", "experts_", "--type", "float", "--json",
         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["kernel"]: row for row in json.loads(out.read_text())}
    # One kernel per channel chunk CH (c12: 4 for r <= 4, else 8) and dy's type.
    for ch in (8, 4):
        fwd_name = f"convlora_experts_fwd_kernel<float, {ch}>"
        bwd_name = f"convlora_experts_bwd_kernel<float, float, {ch}>"  # (dy's type: float32 dy)
        assert {fwd_name, bwd_name} <= set(rows), sorted(rows)
        # 16-bit dy (the layer's, read in place): the same compiled form as float32 dy's.
        for dy_type in ("c10::BFloat16", "c10::Half"):
            other = rows[f"convlora_experts_bwd_kernel<float, {dy_type}, {ch}>"]
            assert other["regs"] == rows[bwd_name]["regs"], other
            assert other["spill_stores"] == rows[bwd_name]["spill_stores"], other

        def tap_loops(row):  # c6: 9 CH FMAs per input channel, 9 U loads + 16-byte weight loads
            return [lp for lp in row["loops"]
                    if lp["FFMA"] >= 8 * ch and 2 * (lp["LDS"] + lp["LDG"]) <= lp["FFMA"]]

        for name in (fwd_name, bwd_name):
            row = rows[name]
            assert row["regs"] > 0 and row["loops"], row
            assert tap_loops(row), f"{name}: no tap loop with <= 1 load per 2 FMAs: {row['loops']}"
            # No spill stores in any loop, and at most one spill reload per 100 instructions of
            # a loop's body (c8 had 144 B of spills in its patch-gradient loop, a reload per
            # ~10 instructions). At the 80-register budget ptxas leaves a reload or two per
            # work item of the long loops, and where it puts them moves with unrelated changes:
            # c10/c11 one in the fill's or the tap loop's item loop (~500-900 instructions);
            # c12 one in the window-weight loop (~320) and, r <= 4, in the 3-channel fill's
            # row step (~110).
            spilling = [lp for lp in row["loops"]
                        if lp["STL"] or 100 * lp["LDL"] > lp["total"]]
            assert not spilling, f"{name}: register spills inside loops: {spilling}"
        # c5: the weight-gradient stage's pixel loop, shared memory only, <= 1.5 loads per FMA
        # (one weight element per item had 2.25 with 16 FMAs per body).
        bwd = rows[bwd_name]
        weight_loops = [lp for lp in bwd["loops"] if lp not in tap_loops(bwd) and lp["FFMA"] >= 8 * ch
                        and lp["LDG"] == 0 and lp["LDS"] <= 1.5 * lp["FFMA"]]
        assert weight_loops, f"{bwd_name}: no weight-gradient loop of the c5 form: {bwd['loops']}"


def test_kernel_names_from_mangled_symbols():
    prefix = "_ZN8convlora55_GLOBAL__N__d1edbee1_16_convlora_cuda_cu_585a2a16_21252"
    assert css.kernel_name(prefix + "27convlora_experts_fwd_kernelIfEEvPKT_") == \
        "convlora_experts_fwd_kernel<float>"
    assert css.kernel_name(prefix + "26convlora_experts_dz_kernelIfN3c108BFloat16EEEvPKlPKT0_") == \
        "convlora_experts_dz_kernel<float, c10::BFloat16>"
    assert css.kernel_name(prefix + "27convlora_experts_bwd_kernelIddEEvPKT_") == \
        "convlora_experts_bwd_kernel<double, double>"
    assert css.kernel_name(prefix + "27convlora_experts_bwd_kernelIfN3c104HalfELi4EEvPKT_") == \
        "convlora_experts_bwd_kernel<float, c10::Half, 4>"
    assert css.kernel_name("_Z3foov") == "_Z3foov"
