#!/usr/bin/env python3
"""What Triton made of a kernel, without a GPU: layout conversions, shared memory and the
SASS instructions that cross threads, for the launches the layer records at a SAM shape.

The launch configurations come from ``scripts/triton_resource_usage.py`` (the module's own
launchers run on meta tensors); each chosen kernel is compiled for the target and summarised:
registers and spills (ptxas), ``ttg.convert_layout`` count in the TTGIR, shared memory, and a
static count of BAR / LDS / STS / SHFL / LDG / STG / FFMA in the SASS, whole kernel and per loop
body (a backward branch). A conversion between equivalent layouts costs nothing; one through
shared memory shows as STS + BAR + LDS and in ``shared``. This is how the Triton expert
kernels' v6 layout was found and checked (NOTES.md, "Versions of the Triton backend"); run it
with the device's Triton too (e.g. a venv with torch 2.11 / Triton 3.6), the two versions
choose layouts differently.

    python scripts/triton_layout_stats.py --kernel experts_fwd --dtype bf16 --r 8
    python scripts/triton_layout_stats.py --kernel experts --shape global --loops --dump /tmp/k
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_resource_usage as tru  # noqa: E402
from sass_stats import loop_bodies, report, sass_counts  # noqa: E402

sys.path.insert(0, str(tru.REPO))  # the checkout's convlora_kernels, installed or not


def summarise(launch: dict, arch: int, dump: Path | None) -> dict:
    import triton
    from triton import knobs

    spec = tru.specialise(launch, arch)  # fn, signature, constexprs, attrs, options
    ck, usage = tru.compile_specialised(*spec, arch)
    options = spec[4]
    ttgir = ck.asm["ttgir"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout.splitlines()
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{launch['kernel']}.sm{arch}.ttgir").write_text(ttgir)
        (dump / f"{launch['kernel']}.sm{arch}.sass").write_text("\n".join(sass))
    return {"kernel": launch["kernel"], "arch": arch, "triton": triton.__version__,
            "num_warps": options.num_warps, "regs": usage["regs"],
            "spill_stores": usage["spill_stores"], "shared": int(ck.metadata.shared),
            "convert_layout": ttgir.count("ttg.convert_layout"),
            "sass": sass_counts(sass), "loops": loop_bodies(sass)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", default="experts", help="substring of the kernel names to compile")
    p.add_argument("--dtype", default="bf16", choices=tru.DTYPES)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--depthwise", action="store_true")
    p.add_argument("--shape", default="window", choices=sorted(tru.SHAPES))
    p.add_argument("--arch", type=int, default=90, choices=(80, 90))
    p.add_argument("--loops", action="store_true", help="also print every loop body's counts")
    p.add_argument("--dump", type=Path, help="write each kernel's TTGIR and SASS here")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # Triton reads it at import: re-execute clean
        return subprocess.run([sys.executable, __file__, *sys.argv[1:]],
                              env=tru.clean_env()).returncode
    why = tru.unavailable_reason()
    if why:
        print(f"cannot compile: {why}")
        return 2
    case = tru.Case(args.dtype, args.r, args.depthwise, args.shape)
    seen, rows = set(), []
    for launch in tru.record_launches(case):
        key = tru.config_key(launch, args.arch)
        if args.kernel in launch["kernel"] and key not in seen:
            seen.add(key)
            rows.append(summarise(launch, args.arch, args.dump))
    if not rows:
        print(f"no recorded launch of a kernel matching {args.kernel!r}")
        return 1
    report(f"{case.label}, sm_{args.arch}, Triton {rows[0]['triton']}", rows,
           lambda row: (f"{row['kernel']:<40} warps {row['num_warps']} regs {row['regs']} spills "
                        f"{row['spill_stores']} B shared {row['shared']} B converts "
                        f"{row['convert_layout']}"),
           args.loops, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
