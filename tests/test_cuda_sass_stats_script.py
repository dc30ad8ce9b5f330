"""scripts/cuda_sass_stats.py (registers, spills and static SASS of the extension's kernels) runs
on the CPU, and pins the compiled form of the expert kernels' two inner loops (NOTES.md,
"Versions of the CUDA backend's expert kernels", c5 and c6): the tap loop convolves 8 output
channels per U value from the staged weight, and the weight-gradient stage reads shared memory
only, ~1 load per FMA."""

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
    bwd_name = "convlora_experts_bwd_kernel<float, float>"  # (dy's type: float32 dy)
    assert {"convlora_experts_fwd_kernel<float>", bwd_name} <= set(rows)
    # 16-bit dy (the layer's, read in place): the same compiled form as float32 dy's.
    for dy_type in ("c10::BFloat16", "c10::Half"):
        other = rows[f"convlora_experts_bwd_kernel<float, {dy_type}>"]
        assert other["regs"] == rows[bwd_name]["regs"] and other["spill_stores"] == rows[bwd_name]["spill_stores"]

    def tap_loops(row):  # c6: 72 FMAs per input channel, 9 U loads + 18 16-byte weight loads
        return [lp for lp in row["loops"]
                if lp["FFMA"] >= 64 and 2 * (lp["LDS"] + lp["LDG"]) <= lp["FFMA"]]

    def innermost(lp, loops):
        inside = [o for o in loops if o is not lp and int(lp["start"], 16) <= int(o["start"], 16)
                  and int(o["end"], 16) <= int(lp["end"], 16)]
        return not inside

    for name in ("convlora_experts_fwd_kernel<float>", bwd_name):
        row = rows[name]
        assert row["regs"] > 0 and row["loops"], row
        assert tap_loops(row), f"{name}: no tap loop with <= 1 load per 2 FMAs: {row['loops']}"
        # No spill stores in any loop, no spill traffic in an innermost loop (c8: 144 B of spills
        # there). An outer loop may reload one spilled word per iteration: since c10 the fill's
        # work-item loop (~520 instructions per item) reloads one (ptxas at 80 registers).
        spilling = [lp for lp in row["loops"] if lp["STL"] or lp["LDL"] > 1
                    or (lp["LDL"] and innermost(lp, row["loops"]))]
        assert not spilling, f"{name}: register spills inside loops: {spilling}"
    # c5: the weight-gradient stage's pixel loop, shared memory only, <= 1.5 loads per FMA
    # (one weight element per item had 2.25 with 16 FMAs per body).
    bwd = rows[bwd_name]
    weight_loops = [lp for lp in bwd["loops"] if lp not in tap_loops(bwd) and lp["FFMA"] >= 64
                    and lp["LDG"] == 0 and lp["LDS"] <= 1.5 * lp["FFMA"]]
    assert weight_loops, f"no weight-gradient loop of the c5 form: {bwd['loops']}"


def test_kernel_names_from_mangled_symbols():
    prefix = "_ZN8convlora55_GLOBAL__N__d1edbee1_16_convlora_cuda_cu_585a2a16_21252"
    assert css.kernel_name(prefix + "27convlora_experts_fwd_kernelIfEEvPKT_") == \
        "convlora_experts_fwd_kernel<float>"
    assert css.kernel_name(prefix + "26convlora_experts_dz_kernelIfN3c108BFloat16EEEvPKlPKT0_") == \
        "convlora_experts_dz_kernel<float, c10::BFloat16>"
    assert css.kernel_name(prefix + "27convlora_experts_bwd_kernelIddEEvPKT_") == \
        "convlora_experts_bwd_kernel<double, double>"
    assert css.kernel_name("_Z3foov") == "_Z3foov"
