#!/usr/bin/env python3
"""Host time of one Conv-LoRA layer call, per backend, against the frozen nn.Linear.

At a tiny shape (default 2 maps of 2x2, C_in 8, C_out 24, r 3) the kernels' own work is small,
so a call's wall time is mostly host time: Python, dispatch, autograd and launches. That is what
bounds the fused layer on a GPU when its kernels are shorter than the host's time to issue them
(H200, 2026-11-28: ~2.1 ms of host time per forward+backward against ~1.25 ms of kernels). On
the CPU the figure also includes the CPU kernels' work, which the Linear's row puts in scale.

Usage:
    python scripts/host_time.py [--device cuda] [--backends cuda,triton] [--rounds 7] [--calls 100]
    python scripts/host_time.py --against /path/to/other/checkout   # A/B, interleaved processes
    python scripts/host_time.py --autocast ...   # SAM fine-tuning's setting: float32 parameters,
                                                 # bf16 autocast (the casts are launches too)
    python scripts/host_time.py --multiply-by-gate ...   # the layers' gate factor on

Prints, per row, the median over rounds of the mean time per call (us) and its ratio to the
Linear's forward+backward measured in the same process. Only ratios from one run mean anything
on a shared machine; ``--against`` alternates processes of this checkout and the other one
(each imports its own ``convlora_kernels`` through PYTHONPATH) and reports both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(backends: list[str], rounds: int, calls: int, device: str,
            autocast: bool = False, multiply_by_gate: bool = False) -> dict[str, float]:
    """Median over ``rounds`` of the mean us per call, for each row; rows interleave per round."""
    import torch

    try:
        from convlora_kernels import ConvLoRALinear
    except ImportError:  # run as `python scripts/host_time.py` from a checkout not installed
        sys.path.insert(0, str(ROOT))
        from convlora_kernels import ConvLoRALinear

    torch.manual_seed(0)
    n, h, w, c_in, c_out, r = 2, 2, 2, 8, 24, 3
    x = torch.randn(n, h, w, c_in, device=device, requires_grad=True)
    linear = torch.nn.Linear(c_in, c_out, device=device).requires_grad_(False)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def region():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)

    def linear_fwdbwd() -> None:
        with region():
            out = linear(x)
        out.float().sum().backward()

    rows = {"linear fwdbwd": linear_fwdbwd}
    for name in backends:
        layer = ConvLoRALinear(c_in, c_out, r=r, backend=name, device=device,
                               multiply_by_gate=multiply_by_gate).train()
        with torch.no_grad():  # a non-trivial adapter (B, gate weights are zero at init)
            for p in (layer.lora_B, layer.expert_bias, layer.w_gate, layer.w_noise):
                p.normal_()

        def fwdbwd(layer=layer) -> None:
            with region():
                out = layer(x)
            (out.float().sum() + layer.moe_loss).backward()

        def fwd(layer=layer) -> None:
            with torch.no_grad(), region():
                layer(x)

        rows[f"{name} fwdbwd"] = fwdbwd
        rows[f"{name} fwd"] = fwd
    for fn in rows.values():  # warm-up: compilation, autotuning, allocator
        for _ in range(10):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def report(label: str, result: dict[str, float]) -> None:
    base = result["linear fwdbwd"]
    print(f"{label}")
    for name, us in result.items():
        print(f"  {name:16s} {us:9.1f} us  {us / base:6.2f}x linear fwdbwd")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=None,
                        help="comma list (default: cuda,triton on a GPU, cuda on the CPU, where "
                             "Triton's interpreter would time the interpreter)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--against", help="another checkout to compare with (A/B)")
    parser.add_argument("--processes", type=int, default=3, help="A/B: processes per side")
    parser.add_argument("--json", action="store_true", help="print one JSON result line only")
    parser.add_argument("--autocast", action="store_true",
                        help="run every row under bf16 autocast (float32 parameters)")
    parser.add_argument("--multiply-by-gate", action="store_true",
                        help="layers with multiply_by_gate=True")
    args = parser.parse_args(argv)
    if args.backends is None:
        args.backends = "cuda,triton" if args.device == "cuda" else "cuda"
    backends = [b for b in args.backends.split(",") if b]
    if args.against is None:
        result = measure(backends, args.rounds, args.calls, args.device, args.autocast,
                         args.multiply_by_gate)
        if args.json:
            print(json.dumps(result))
        else:
            setting = "".join((f"{args.device}", ", bf16 autocast" if args.autocast else "",
                               ", multiply_by_gate" if args.multiply_by_gate else ""))
            report(f"this checkout ({setting})", result)
        return 0
    sides = {"this": ROOT, "other": Path(args.against).resolve()}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    for _ in range(args.processes):  # alternate, so drifts of the machine hit both sides
        for side, root in sides.items():
            env = dict(os.environ, PYTHONPATH=str(root))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--json", "--backends",
                   args.backends, "--rounds", str(args.rounds), "--calls", str(args.calls),
                   "--device", args.device] + (["--autocast"] if args.autocast else []) + (
                       ["--multiply-by-gate"] if args.multiply_by_gate else [])
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                                 cwd=root).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
    for side, root in sides.items():
        # Per process: each row over that process's own Linear, then the median of the ratios.
        results = runs[side]
        merged = {k: statistics.median(r[k] for r in results) for k in results[0]}
        ratios = {k: statistics.median(r[k] / r["linear fwdbwd"] for r in results)
                  for k in results[0]}
        print(f"{side} ({root}): median us per call, median of per-process ratios")
        for name, us in merged.items():
            print(f"  {name:16s} {us:9.1f} us  {ratios[name]:6.2f}x linear fwdbwd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
