"""Ahead-of-time compile of every Triton kernel for sm_90 (H100) and sm_80 (A100), on the CPU.

``make test`` runs the Triton kernels through the interpreter, which never lowers them to PTX;
this test compiles them the way a GPU launch would. The launch configurations are recorded from
the module's own launchers on meta tensors of SAM shapes (``scripts/triton_resource_usage.py``,
which does the work and also prints the table standalone), in a subprocess without
TRITON_INTERPRET: Triton reads it at import, and the launchers pick interpreter-only block sizes
under it. Run with ``-s`` to see registers / spills / shared memory per configuration.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "triton_resource_usage.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("triton_resource_usage", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_kernels_compile_for_sm90_and_sm80_within_shared_memory(tmp_path):
    """One test (not a fixture shared by several): under ``pytest -n 2`` a module fixture would
    compile everything once per worker."""
    tru = _script_module()
    env = tru.clean_env()  # no TRITON_INTERPRET, no visible GPU
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # really compile (and run ptxas)
    out = tmp_path / "usage.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "test", "--json", str(out), "--quiet"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    if not out.exists():
        pytest.fail(f"{SCRIPT.name} exited {proc.returncode} without results:\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    if result["unavailable"]:
        pytest.skip(result["unavailable"])
    rows = result["rows"]
    print(f"\nTriton AOT compile at SAM shapes ({result['total_seconds']:.0f} s):")
    print(tru.format_table(rows))

    errors = [f"{r['kernel']} sm_{r['arch']} ({r['cases'][0]}): {r['error']}" for r in rows if r["error"]]
    assert not errors, "compile errors:\n" + "\n\n".join(errors)
    # Every kernel of the module was launched by the recorded forward + backward, and compiled
    # for both architectures.
    for arch in (90, 80):
        compiled = {r["kernel"] for r in rows if r["arch"] == arch}
        assert compiled == set(result["kernels"]), (arch, set(result["kernels"]) ^ compiled)
    assert all(r["regs"] is not None for r in rows), "no register count from ptxas / cuobjdump"
    # Per-block shared memory within 227 KB (sm_90) / 163 KB (sm_80), or the launch fails.
    too_big = [f"{r['kernel']} sm_{r['arch']} ({', '.join(r['cases'])}): "
               f"{r['shared']} B > {r['smem_limit']} B" for r in rows if r["shared"] > r["smem_limit"]]
    assert not too_big, "shared memory over the per-block limit:\n" + "\n".join(too_big)
    # The CUDA-core conv (BLOCK_R < 16) keeps one pixel per thread with all its channels, so
    # the expert forward and the dZ gathers need no shared memory at all: any layout
    # conversion Triton inserts (at every conv offset before v6; again whenever it could
    # specialise H*W, or loaded z as a [r, P] tile) goes through shared memory and shows here.
    converted = [f"{r['kernel']} sm_{r['arch']} ({', '.join(r['cases'])}): {r['shared']} B"
                 for r in rows
                 if r["kernel"] in ("_convlora_experts_fwd_kernel", "_convlora_experts_dz_cols_kernel",
                                    "_convlora_experts_dz_rows_kernel")
                 and r["constexprs"].get("BLOCK_R", 16) < 16 and r["shared"] != 0]
    assert not converted, "layout conversions through shared memory:\n" + "\n".join(converted)
