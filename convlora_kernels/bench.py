"""``convlora-bench`` (also ``python -m convlora_kernels.bench``): the main benchmark.

Times the Conv-LoRA layer against the frozen Linear, plain LoRA, the eager reference,
torch.compile and every fused backend available, plus SAM's image-encoder training step; prints
a table (provider x case: median ms and ratio to the frozen Linear; on a GPU the same again
from CUDA-graph replays, the call's GPU time without the host's launch work), writes JSON, a
text table and a PNG plot. ``--profile`` instead brackets steady-state iterations with
cudaProfilerStart/Stop for Nsight (see the README, "Benchmarks and profiling"); ``--kernels``
prints where each row's time goes, kernel by kernel (torch.profiler).

Shapes, providers, grids and timing live in :mod:`convlora_kernels._bench_core`, shared with
``pytest benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import _bench_core as core
from . import auto_rule
from ._nvtx import ENV_NVTX

DEFAULT_OUT = "bench_out"
JSON_NAME = "convlora-bench.json"
PNG_NAME = "convlora-bench.png"
TABLE_NAME = "convlora-bench.txt"
KERNELS_NAME = "convlora-kernels.json"


def build_parser() -> argparse.ArgumentParser:
    """The command line (grid options come from the shared core)."""
    parser = argparse.ArgumentParser(
        prog="convlora-bench",
        description="Benchmark Conv-LoRA providers against the frozen Linear and plain LoRA.",
        epilog="Without a GPU, tiny shapes run on the CPU: a check of the harness, not kernel "
        "performance. Examples: convlora-bench --quick; convlora-bench --preset full --sam "
        "vit_b,vit_h; convlora-bench --shapes vitb-window-b4 --r 3,8,32 --routing all.",
    )
    core.add_grid_options(parser.add_argument)
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls after the first (excluded)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: adaptive)")
    parser.add_argument("--no-graph", action="store_true",
                        help="GPU: do not also time each row as a CUDA-graph replay (graph_ms)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"directory for {JSON_NAME}, {PNG_NAME}, {TABLE_NAME}")
    parser.add_argument("--results", default=None, metavar="DIR",
                        help="also write DIR/<gpu-name>.json (GPU runs only), e.g. benchmarks/results")
    parser.add_argument("--auto-rule", default=None, metavar="PATH",
                        help="also write the backend='auto' rule derived from this run's rows (GPU runs "
                        "only; commit it as convlora_kernels/auto_rule.json)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop starting new rows after this long; the rest are reported as skipped")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one line per row instead)")
    parser.add_argument("--list", action="store_true", help="list shapes, providers and availability, then exit")
    parser.add_argument("--profile", action="store_true",
                        help="Nsight mode: per row, warm up, then run --profile-iters iterations between "
                        f"cudaProfilerStart/Stop with {ENV_NVTX}=1; no timing, no files")
    parser.add_argument("--profile-iters", type=int, default=3)
    parser.add_argument("--kernels", action="store_true",
                        help="kernel breakdown mode: per row, warm up, then profile --profile-iters calls "
                        f"with torch.profiler; print each kernel's time per call and write {KERNELS_NAME}")
    return parser


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("convlora-bench: --device cuda but no CUDA device is available")
    return torch.device(choice)


def _grid(args: argparse.Namespace, device: torch.device) -> tuple[core.Grid, list[str]]:
    """The selected grid, and notes on providers dropped because they cannot run here."""
    preset = "quick" if args.quick else (args.preset or "default")
    grid = core.make_grid(
        device.type, preset, shapes=args.shapes, providers=args.providers, r=args.r,
        routing=args.routing, dtype=args.dtype, mode=args.mode, sam=args.sam, sam_batch=args.sam_batch,
    )
    notes = []
    providers = list(grid.providers)
    if "linear" not in providers:  # every ratio divides by it
        providers.insert(0, "linear")
    if args.providers is None:
        # Default selection: leave out what cannot run here, but say so. Asked-for providers
        # stay, and their rows read "unavailable" with the reason.
        for name in list(providers):
            why = core.provider_unavailable_reason(name, device, grid.dtypes[0])
            if why is not None:
                providers.remove(name)
                notes.append(f"{name}: not available here ({why})")
    return core.dataclasses.replace(grid, providers=tuple(providers)), notes


def _ordered_cases(grid: core.Grid) -> list[core.LayerCase | core.SamCase]:
    """Layer rows, then the SAM step, then compile rows (slowest to set up) last."""
    layer = grid.layer_cases()
    return (
        [c for c in layer if c.provider != "compile"]
        + grid.sam_cases()
        + [c for c in layer if c.provider == "compile"]
    )


def _progress(total: int, enabled: bool) -> Callable[[str, str | None], None]:
    """A progress callback: a tqdm bar on a terminal, one line per row otherwise."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True)

        def update(name: str, result: str | None) -> None:
            if result is None:
                bar.set_description(name[:60])
            else:
                bar.update(1)
                if bar.n == total:
                    bar.close()

        return update
    count = [0]

    def log(name: str, result: str | None) -> None:
        if result is not None:
            count[0] += 1
            print(f"[{count[0]}/{total}] {name}: {result}", file=sys.stderr, flush=True)

    return log


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']} ({str(row.get('reason', ''))[:120]})"
    ratio = row.get("ratio_to_linear", row.get("ratio_to_no_adapter"))
    text = f"{row['median_ms']:.3f} ms" + ("" if ratio is None else f" ({ratio:.2f}x)")
    if row.get("graph_ms") is not None:
        graph_ratio = row.get("graph_ratio_to_linear", row.get("graph_ratio_to_no_adapter"))
        text += f", graph {row['graph_ms']:.3f} ms" + ("" if graph_ratio is None else f" ({graph_ratio:.2f}x)")
    return text


def run_rows(
    session: core.Session,
    cases: Sequence[core.LayerCase | core.SamCase],
    max_minutes: float | None = None,
    progress: bool = True,
    checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every case in order; after ``max_minutes`` the rest become status "skipped".
    ``checkpoint(rows)`` runs after each measured row (partial results survive a kill)."""
    rows: list[dict[str, Any]] = []
    update = _progress(len(cases), progress)
    start = time.monotonic()
    for case in cases:
        if max_minutes is not None and time.monotonic() - start > 60 * max_minutes:
            base = core.layer_row(case) if isinstance(case, core.LayerCase) else core.sam_row(case)
            rows.append({**base, "status": "skipped", "reason": f"time budget of {max_minutes} min spent"})
            continue
        update(case.id, None)
        row = session.run_layer(case) if isinstance(case, core.LayerCase) else session.run_sam(case)
        rows.append(row)
        update(case.id, _summary(row))
        if checkpoint is not None:
            checkpoint(rows)
    return rows


def write_outputs(
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    out_dir: str | os.PathLike,
    plot: bool = True,
    results_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Write JSON (``{"meta": ..., "rows": [...]}``), the text table and the PNG; with
    ``results_dir`` (GPU runs) also ``<results_dir>/<gpu-name>.json``. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "rows": rows}
    paths = [out / JSON_NAME, out / TABLE_NAME]
    paths[0].write_text(json.dumps(document, indent=1) + "\n")
    paths[1].write_text(core.format_table(rows) + "\n")
    if plot:
        title = f"Conv-LoRA layer on {meta['device_name']} (torch {meta['torch']})"
        if meta.get("cpu_figures_are_not_kernel_performance"):
            title += " - CPU: NOT kernel performance"
        core.plot(rows, out / PNG_NAME, title)
        paths.append(out / PNG_NAME)
    if results_dir is not None:
        target = Path(results_dir)
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"{core.results_slug(meta['device_name'])}.json"
        path.write_text(json.dumps(document, indent=1) + "\n")
        paths.append(path)
    return paths


def _list(device: torch.device) -> None:
    print("Layer shapes (x: N x H x W x C_in -> C_out):")
    for shape in core.LAYER_SHAPES.values():
        print(f"  {shape.name:16s} {shape.n:4d} x {shape.h:2d} x {shape.w:2d} x {shape.c_in:4d} -> {shape.c_out:4d}  {shape.note}")
    print("SAM step models: " + ", ".join(core.SAM_CONFIGS))
    print(f"Providers on {device}:")
    for name in core.PROVIDERS:
        why = core.provider_unavailable_reason(name, device)
        print(f"  {name:10s} {'available' if why is None else 'unavailable: ' + why}")


def _profile(session: core.Session, cases: Sequence[core.LayerCase | core.SamCase], iters: int) -> int:
    if session.device.type != "cuda":
        print("convlora-bench: --profile needs a CUDA device", file=sys.stderr)
        return 2
    if len(cases) > 4:
        print(f"note: profiling {len(cases)} rows; narrow with --shapes/--providers/--r/--routing/--mode",
              file=sys.stderr)
    failures = 0
    for case in cases:
        try:
            session.profile(_builder(session, case), f"convlora-bench:{case.id}", iters)
            print(f"profiled {case.id}: {iters} iteration(s) inside cudaProfilerStart/Stop")
        except core.ProviderUnavailable as exc:
            print(f"skipped {case.id}: unavailable ({exc})")
        except Exception as exc:  # noqa: BLE001 - report and go on with the next row
            failures += 1
            print(f"FAILED {case.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failures else 0


def _builder(session: core.Session, case: core.LayerCase | core.SamCase) -> Callable[[], core.Runner]:
    if isinstance(case, core.LayerCase):
        return lambda: core.build_layer_runner(case, session.device, session.seed)
    return lambda: core.build_sam_runner(case, session.device, session.seed)


def _kernels(session: core.Session, cases: Sequence[core.LayerCase | core.SamCase], iters: int,
             meta: dict[str, Any], out_dir: str | os.PathLike) -> int:
    """Kernel breakdown of every row: printed, and written to ``out_dir/KERNELS_NAME``."""
    rows, failures = [], 0
    for case in cases:
        base = core.layer_row(case) if isinstance(case, core.LayerCase) else core.sam_row(case)
        try:
            breakdown = session.kernel_times(_builder(session, case), iters)
        except core.ProviderUnavailable as exc:
            print(f"skipped {case.id}: unavailable ({exc})")
            continue
        except Exception as exc:  # noqa: BLE001 - report and go on with the next row
            failures += 1
            print(f"FAILED {case.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        rows.append({**base, **breakdown, "iters": iters})
        print(core.format_kernel_table(case.id, breakdown) + "\n", flush=True)
    path = Path(out_dir) / KERNELS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``convlora-bench``; returns the exit status (1 if a row failed)."""
    args = build_parser().parse_args(argv)
    device = _device(args.device)
    if args.list:
        _list(device)
        return 0
    if args.profile:
        # The layer reads it at each call: set before any row runs.
        os.environ[ENV_NVTX] = "1"
    try:
        grid, notes = _grid(args, device)
    except ValueError as exc:
        print(f"convlora-bench: {exc}", file=sys.stderr)
        return 2
    timing = core.TimingConfig.for_device(device.type, warmup=args.warmup, reps=args.reps,
                                          graph=not args.no_graph)
    session = core.Session(device, timing)
    cases = _ordered_cases(grid)
    meta = core.environment(device)
    print(f"convlora-bench on {meta['device_name']} ({device}), torch {meta['torch']}, triton {meta['triton']}")
    if device.type != "cuda":
        print("!" * 8 + " " + core.CPU_WARNING)
    for note in notes:
        print(f"note: {note}")
    print(f"{len(cases)} rows: providers {', '.join(grid.providers)}; shapes {', '.join(grid.shapes)}; "
          f"r {grid.rs}; routing {grid.routings}; dtype {grid.dtypes}; modes {grid.modes}; "
          f"SAM {', '.join(grid.sam_models) or 'none'} batch {grid.sam_batches}", flush=True)
    if args.profile:
        return _profile(session, cases, args.profile_iters)
    if args.kernels:
        if device.type != "cuda":
            print("note: on the CPU the breakdown is per operator (self CPU time), not per kernel")
        return _kernels(session, cases, args.profile_iters, meta, args.out)
    if args.results is not None and device.type != "cuda":
        print("note: --results is for GPU runs (benchmarks/results/<gpu-name>.json); not written on the CPU")
        args.results = None
    start = time.monotonic()
    partial = Path(args.out) / JSON_NAME
    partial.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint(done: list[dict[str, Any]]) -> None:
        # Rewritten after every row, replaced by the full document at the end.
        document = {"meta": {**meta, "partial": True, "rows_planned": len(cases)}, "rows": done}
        partial.write_text(json.dumps(document, indent=1) + "\n")

    rows = run_rows(session, cases, args.max_minutes, progress=not args.no_progress,
                    checkpoint=checkpoint)
    meta.update(
        wall_s=round(time.monotonic() - start, 1),
        grid={k: v for k, v in core.dataclasses.asdict(grid).items()},
        argv=list(sys.argv[1:] if argv is None else argv),
        notes=notes,
    )
    paths = write_outputs(rows, meta, args.out, plot=not args.no_plot, results_dir=args.results)
    if args.auto_rule is not None:
        if device.type == "cuda":
            rule = auto_rule.derive_rule([{"meta": meta, "rows": rows}])
            Path(args.auto_rule).parent.mkdir(parents=True, exist_ok=True)
            Path(args.auto_rule).write_text(json.dumps(rule, indent=1, sort_keys=True) + "\n")
            paths.append(Path(args.auto_rule))
        else:
            print("note: --auto-rule is for GPU runs; not written on the CPU")
    print()
    print(core.format_table(rows, markdown=args.markdown))
    if device.type != "cuda":
        print(core.CPU_WARNING)
    print("wrote " + ", ".join(str(p) for p in paths) + f" in {meta['wall_s']} s")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
