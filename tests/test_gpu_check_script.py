"""scripts/gpu_check.sh runs only on a lent GPU, a few minutes per session: what can be checked
without one is checked here, so a rename does not cost a GPU session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_stage_in_the_lists_exists():
    text = SCRIPT.read_text()
    defined = set(re.findall(r"^(?:\S+=\S+ )*stage ([a-z-]+) ", text, flags=re.M))
    default = re.search(r'CONVLORA_CHECK_STAGES:-([a-z,-]+)\}', text).group(1).split(",")
    assert set(default) <= defined, set(default) - defined
    assert {"sanitize", "tests", "coverage"} <= defined  # the opt-in stages the header documents


def test_named_tests_exist():
    """The pytest node ids the script names (the sanitize stage) are collected."""
    ids = sorted(set(re.findall(r"tests/[\w/]+\.py::[\w\[\].-]+", SCRIPT.read_text())))
    assert ids, "no test ids found in the script"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist", *ids], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for node in ids:
        assert node in proc.stdout, f"{node} not collected"


def test_coverage_grids_parse():
    """Every grid of the coverage stage is a valid convlora-bench command line whose GPU grid has
    the rows it is there for (an unknown shape or provider would only show on the device)."""
    from convlora_kernels import _bench_core as core
    from convlora_kernels.bench import build_parser

    text = SCRIPT.read_text()
    block = re.search(r"^COVERAGE_GRIDS=\(\n(.*?)\n\)", text, flags=re.M | re.S).group(1)
    grids = dict(line.strip().strip('"').split("|", 1) for line in block.splitlines())
    assert set(grids) == {"scales", "ranks", "fp16", "vith"}
    seen = {"routings": set(), "rs": set(), "dtypes": set(), "shapes": set()}
    for name, words in grids.items():
        args = build_parser().parse_args(["--sam", "none", *words.split()])
        grid = core.make_grid("cuda", "default", shapes=args.shapes, providers=args.providers,
                              r=args.r, routing=args.routing, dtype=args.dtype, mode=args.mode,
                              sam=args.sam, sam_batch=args.sam_batch)
        assert grid.layer_cases() and not grid.sam_cases(), name
        assert {"linear", "triton", "cuda"} <= set(grid.providers), name
        for key in seen:
            seen[key] |= set(getattr(grid, key))
    assert seen["routings"] >= {str(s) for s in range(1, 9)}
    assert seen["rs"] >= {3, 8, 32} and seen["dtypes"] >= {"bf16", "fp16"}
    assert any(s.startswith("vith") for s in seen["shapes"])
