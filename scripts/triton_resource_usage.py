#!/usr/bin/env python3
"""Compile every Triton kernel of ``convlora_kernels/ops/triton_conv_lora.py`` ahead of time for
sm_90 (H100) and sm_80 (A100), with no GPU, and print registers / spills / shared memory per
kernel and launch configuration.

The configurations are not a hand-written table: the module's own launchers are run on ``meta``
tensors of SAM shapes with ``kernel_launcher`` (their wrap_triton) replaced by a recorder, so the
recorded arguments, constexprs (BLOCK sizes, PREC, DEPTHWISE, ...) and num_warps / num_stages
are exactly those a GPU launch would use. Each recorded launch is then bound and specialised by Triton's own binder
(the one ``JITFunction.run`` uses: integer == 1 and divisibility-by-16 specialisation included)
against a CUDA backend for the target, and compiled with ``triton.compile``. Registers, spills
and stack come from the ``ptxas -v`` log Triton's CUDA backend writes; shared memory from the
compiled kernel's metadata.

Triton decides at import time whether ``@triton.jit`` kernels are interpreted, and the module
picks interpreter-only block sizes when ``TRITON_INTERPRET=1``; so everything here runs in a
process without TRITON_INTERPRET (the script re-executes itself in a clean environment when it
is set). ``tests/test_triton_aot.py`` runs this script and checks its JSON output.

    python scripts/triton_resource_usage.py                 # full matrix, both archs
    python scripts/triton_resource_usage.py --preset test   # the test's representative subset
    python scripts/triton_resource_usage.py --dtype bf16 --arch 90 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = "convlora_kernels.ops.triton_conv_lora"
#: The layer's kernels live in MODULE, the gate's in GATE_MODULE.
GATE_MODULE = "convlora_kernels.ops.triton_gate"
MODULES = (MODULE, GATE_MODULE)


def _kernel(name: str):
    """The @triton.jit function ``name`` of whichever module defines it."""
    import importlib

    for module in MODULES:
        fn = getattr(importlib.import_module(module), name, None)
        if fn is not None:
            return fn
    raise KeyError(f"no kernel {name} in {', '.join(MODULES)}")

#: Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin):
#: H100 228 KB per SM, 227 KB per block; A100 164 KB per SM, 163 KB per block.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

#: SAM ViT-B qkv at 1024x1024: windowed blocks (4 images x 25 windows of 14x14) and global blocks
#: (4 images of 64x64); C_in 768, C_out 2304.
SHAPES = {"window": (100, 14, 14), "global": (4, 64, 64)}
C_IN, C_OUT, NUM_EXPERTS = 768, 2304, 8
DTYPES = ("fp32", "bf16", "fp16")
RANKS = (1, 3, 8, 32)


@dataclass(frozen=True)
class Case:
    """One layer call (forward + backward) whose launches are recorded."""

    dtype: str  # of x, W, bias (and dout)
    r: int
    depthwise: bool
    shape: str  # key of SHAPES
    adapter_fp32: bool = False  # adapter params float32 (autocast training) vs in x's dtype
    dropout: bool = False  # x_down is a distinct tensor (lora_dropout > 0): the dx_down GEMM

    @property
    def label(self) -> str:
        s = f"{self.dtype} r{self.r} {'dw' if self.depthwise else 'full'} {self.shape}"
        if self.adapter_fp32:
            s += " amp"
        if self.dropout:
            s += " drop"
        return s


#: The kernels whose compile dominates: 10-100 s each on one core (the rest about 1 s).
HEAVY = ("_convlora_experts_fwd_kernel", "_convlora_experts_bwd_kernel")


@dataclass(frozen=True)
class Item:
    """Compile the launches of ``case`` for ``archs``; the HEAVY kernels only when ``heavy``."""

    case: Case
    archs: tuple[int, ...] = (90, 80)
    heavy: bool = True


def plan(preset: str, dtypes=DTYPES, ranks=RANKS, archs=(90, 80)) -> list[Item]:
    """``full``: every dtype x r x full/depthwise x both SAM shapes, adapter in x's dtype and in
    float32 (autocast), plus the lora-dropout path (dx_down GEMM), every kernel, every arch.

    ``test`` (about 2.5 min on 2 cores): every kernel on both archs; the light kernels for
    every dtype and r (every pointer type, BLOCK_R, PREC and integer specialisation they get)
    plus depthwise, the global shape, autocast and dropout; the expert fwd/bwd kernels for
    bf16 r=8 (sm_90) and bf16 r=32 depthwise at 64x64 (both archs)."""
    items: list[Item] = []
    if preset == "full":
        for dt, r, dw, shp, amp in itertools.product(dtypes, ranks, (False, True), SHAPES,
                                                     (False, True)):
            if (dw and r == 1) or (amp and dt == "fp32"):
                continue  # r = 1 depthwise == full; fp32 has no autocast
            items.append(Item(Case(dt, r, dw, shp, amp), archs))
        items += [Item(Case(dt, 8, False, "global", dropout=True), archs) for dt in dtypes]
    elif preset == "test":
        # Heavy kernels: BLOCK_R 16 (r <= 16) on sm_90; BLOCK_R 32 (r = 32, 8 warps, the most
        # shared memory) on both archs.
        heavy = {Case("bf16", 8, False, "window"): (90,), Case("bf16", 32, True, "global"): (90, 80)}
        light = [Case(dt, r, False, "window") for dt in dtypes for r in ranks]
        light += [Case("fp16", 8, True, "window"),
                  Case("bf16", 8, False, "global", adapter_fp32=True, dropout=True)]
        items += [Item(c, archs, heavy=False) for c in light if c not in heavy]
        for case, on in heavy.items():
            items.append(Item(case, tuple(a for a in archs if a in on)))
            if set(archs) - set(on):
                items.append(Item(case, tuple(a for a in archs if a not in on), heavy=False))
    else:
        raise ValueError(preset)
    return [it for it in items
            if it.case.dtype in dtypes and it.case.r in ranks and it.archs]


# ----------------------------------------------------------------------------- recording
class _Ptr:
    """What a recorded tensor argument becomes: Triton's binder reads only ``dtype`` and
    ``data_ptr()`` (alignment). Bases are taken as 16-byte aligned (CUDA allocations are)."""

    def __init__(self, dtype, offset_bytes: int):
        self.dtype = dtype
        self._off = offset_bytes

    def data_ptr(self) -> int:
        return self._off


def _encode(v):
    import torch

    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).replace("torch.", ""),
                "offset": v.storage_offset() * v.element_size()}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"unexpected kernel argument {type(v)}")


def _decode(v):
    import torch

    if isinstance(v, dict) and "tensor" in v:
        return _Ptr(getattr(torch, v["tensor"]), v["offset"])
    return v


def record_launches(case: Case) -> list[dict]:
    """Run the module's forward and backward implementations on meta tensors with every kernel
    launch replaced by a record of (kernel, args, kwargs)."""
    import importlib

    import torch

    from triton.runtime.autotuner import Autotuner

    mod = importlib.import_module(MODULE)
    gate = importlib.import_module(GATE_MODULE)
    assert not mod._INTERPRET, "record in a process without TRITON_INTERPRET=1"
    launches: list[dict] = []

    class _Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                # An autotuned kernel is recorded once per configuration it may pick.
                fn, configs = self.fn, [None]
                if isinstance(fn, Autotuner):
                    fn, configs = fn.fn, fn.configs
                for cfg in configs:
                    kw = dict(kwargs)
                    if cfg is not None:
                        kw.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    g = grid(kw) if callable(grid) else grid
                    launches.append({"kernel": fn.__name__, "args": [_encode(a) for a in args],
                                     "kwargs": {k: _encode(v) for k, v in kw.items()},
                                     "grid": [int(v) for v in g]})
            return launch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    adt = torch.float32 if case.adapter_fp32 else dt
    n, h, w = SHAPES[case.shape]
    r = case.r
    meta = {"device": "meta"}
    x = torch.empty(n, h, w, C_IN, dtype=dt, **meta)
    x_down = torch.empty_like(x) if case.dropout else None
    weight = torch.empty(C_OUT, C_IN, dtype=dt, **meta)
    bias = torch.empty(C_OUT, dtype=dt, **meta)
    lora_a = torch.empty(r, C_IN, dtype=adt, **meta)
    lora_b = torch.empty(C_OUT, r, dtype=adt, **meta)
    ew = torch.empty(NUM_EXPERTS, r, 1 if case.depthwise else r, 3, 3, dtype=adt, **meta)
    eb = torch.empty(NUM_EXPERTS, r, dtype=adt, **meta)
    w_gate = torch.empty(r, NUM_EXPERTS, dtype=adt, **meta)
    w_noise = torch.empty(r, NUM_EXPERTS, dtype=adt, **meta)
    index = torch.zeros(n, dtype=torch.long, **meta)
    scaling = 32.0 / r
    noise = torch.empty(n, NUM_EXPERTS, dtype=torch.float32, **meta)
    saved = mod.kernel_launcher, gate.kernel_launcher
    mod.kernel_launcher = gate.kernel_launcher = _Recorder
    try:
        # training (noisy gate) forward, then the forced-routing gate variant
        _, idx, _, z, g, y = mod._fwd_impl(x, x_down, weight, bias, lora_a, lora_b, ew, eb, w_gate,
                                           w_noise, scaling, None, noise, False)
        gate.gate_forward(torch.empty(n, 1, r, dtype=torch.float32, **meta), h * w, w_gate,
                          w_noise, None, index)
        dout = torch.empty(n, h, w, C_OUT, dtype=dt, **meta)
        dgs = torch.empty(n, r, dtype=torch.float32, **meta)
        gate._gate_bwd_impl(g, w_gate, w_noise, noise, torch.empty((), **meta), 1.0 / (h * w))
        mod._bwd_impl(dout, x, x_down, weight, lora_a, lora_b, ew, eb, z, y, dgs, idx, scaling,
                      True, None)
    finally:
        mod.kernel_launcher, gate.kernel_launcher = saved
    return launches


# ----------------------------------------------------------------------------- compiling
def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def specialise(launch: dict, arch: int):
    """Bind a recorded launch exactly as ``JITFunction.run`` does on a GPU of ``arch``:
    returns (fn, signature, constexprs, attrs, options)."""
    import importlib

    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(launch["kernel"])
    backend = make_backend(_target(arch))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {k: _decode(v) for k, v in launch["kwargs"].items()}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, spec, options = binder(*[_decode(a) for a in launch["args"]], **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return fn, signature, constexprs, attrs, options


def config_key(launch: dict, arch: int) -> str:
    _, signature, constexprs, attrs, options = specialise(launch, arch)
    return repr((launch["kernel"], arch, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), sorted(options.__dict__.items())))


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def compile_specialised(fn, signature, constexprs, attrs, options, arch: int):
    """``triton.compile`` of a specialised launch (see ``specialise``) for ``arch``: returns the
    compiled kernel and its registers / spills / stack from the ptxas log (from the cubin when
    the compile came from Triton's cache and ptxas did not run)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # printed to stdout by the backend's make_cubin
    with contextlib.redirect_stdout(log):
        ck = triton.compile(src, target=_target(arch), options=options.__dict__)
    text = log.getvalue()
    usage = {k: (int(m.group(1)) if (m := rx.search(text)) else None) for k, rx in _PTXAS.items()}
    if usage["regs"] is None:
        usage.update(_cuobjdump_usage(ck.asm["cubin"]))
    return ck, usage


def compile_one(job: tuple[dict, int]) -> dict:
    """Compile one recorded launch for ``arch``; never raises (errors are reported)."""
    launch, arch = job
    t0 = time.perf_counter()
    res = {"kernel": launch["kernel"], "arch": arch}
    try:
        fn, signature, constexprs, attrs, options = specialise(launch, arch)
        # Declared tl.constexpr meta-parameters, and int arguments Triton specialised to 1.
        res["constexprs"] = {fn.arg_names[k[0]]: v for k, v in constexprs.items()
                             if fn.params[k[0]].is_constexpr}
        res["ones"] = [fn.arg_names[k[0]] for k in constexprs if not fn.params[k[0]].is_constexpr]
        res["num_warps"], res["num_stages"] = options.num_warps, options.num_stages
        res["ptrs"] = "".join(_PTR.get(t, "?") for t in signature.values() if t.startswith("*"))
        ck, usage = compile_specialised(fn, signature, constexprs, attrs, options, arch)
        res["shared"] = int(ck.metadata.shared)
        res.update(usage)
        res["error"] = None
    except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
        # Triton's CompilationError names the call site; the cause (innermost) says why.
        chain, err = [], e
        while err is not None and len(chain) < 8:
            chain.append(f"{type(err).__name__}: {err}")
            err = err.__cause__ or err.__context__
        res["error"] = ("\n  caused by ".join(chain))[-6000:]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _cuobjdump_usage(cubin: bytes) -> dict:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    def get(key):
        m = re.search(rf"{key}:(\d+)", out)
        return int(m.group(1)) if m else None

    return {"regs": get("REG"), "stack": get("STACK"), "spill_stores": None, "spill_loads": None,
            "local": get("LOCAL")}


def unavailable_reason() -> str | None:
    """Why Triton cannot compile for CUDA here (None when it can)."""
    try:
        import triton.backends as tb
        from triton import knobs
    except Exception as e:  # noqa: BLE001
        return f"triton not importable: {e}"
    if "nvidia" not in tb.backends:
        return "Triton's CUDA (nvidia) backend is not installed"
    try:
        path = knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001
        return f"ptxas not found for Triton's CUDA backend: {e}"
    if not path or not os.path.exists(path):
        return f"ptxas not found for Triton's CUDA backend ({path})"
    return None


def collect(items: list[Item], workers: int = 2, dry_run: bool = False,
            kernel_filter: str = "") -> dict:
    """Record every case, dedupe the launches per arch by their full specialisation, compile
    the distinct ones whose kernel name contains ``kernel_filter`` (``workers`` processes) and
    return {"rows": [...], "unavailable": ..., "kernels": every @triton.jit kernel of the
    module}."""
    why = unavailable_reason()
    if why:
        return {"unavailable": why, "rows": []}
    t0 = time.perf_counter()
    jobs: dict[str, tuple[dict, int]] = {}
    users: dict[str, list[str]] = {}
    for item in items:
        for launch in record_launches(item.case):
            if (launch["kernel"] in HEAVY and not item.heavy) or kernel_filter not in launch["kernel"]:
                continue
            for arch in item.archs:
                key = config_key(launch, arch)
                jobs.setdefault(key, (launch, arch))
                users.setdefault(key, []).append(item.case.label)
    t_rec = time.perf_counter() - t0
    keys = list(jobs)
    if dry_run:
        return {"unavailable": None, "kernels": module_kernels(), "record_seconds": round(t_rec, 2),
                "jobs": [(jobs[k][0]["kernel"], jobs[k][1], users[k][0]) for k in keys]}
    if workers > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(compile_one, [jobs[k] for k in keys]))
    else:
        results = [compile_one(jobs[k]) for k in keys]
    rows = []
    for k, res in zip(keys, results):
        res["cases"] = sorted(set(users[k]))
        res["smem_limit"] = SMEM_LIMIT[res["arch"]]
        rows.append(res)
    return {"unavailable": None, "rows": rows, "kernels": module_kernels(),
            "record_seconds": round(t_rec, 2), "total_seconds": round(time.perf_counter() - t0, 2)}


def module_kernels() -> list[str]:
    """Names of the module's kernels (its @triton.jit functions named ``*_kernel``)."""
    import importlib

    from triton.runtime.jit import JITFunction

    return sorted(k for module in MODULES for k, v in vars(importlib.import_module(module)).items()
                  if isinstance(v, JITFunction) and k.endswith("_kernel"))


# ----------------------------------------------------------------------------- table
_SHORT = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK", "BLOCK_R": "BR", "BLOCK_P": "BP",
          "BLOCK_C": "BC", "BLOCK_J": "BJ", "GROUP_M": "GM", "DEPTHWISE": "DW",
          "PREC_MAIN": "PREC", "PREC_EXTRA": "PREC_X", "HAS_BIAS": "BIAS",
          "UPCAST_DOT": "UPC"}
_PTR = {"*fp32": "f", "*bf16": "b", "*fp16": "h", "*i64": "l", "*i32": "i"}


def _describe(row: dict) -> str:
    """Meta-parameters (True flags by name), then the integer arguments Triton specialised to
    the constant 1 (strides of contiguous dims, R = 1)."""
    parts = []
    for k, v in (row.get("constexprs") or {}).items():
        name = _SHORT.get(k, k)
        if isinstance(v, bool):
            if v and k != "UPCAST_DOT":
                parts.append(name)
        elif not (k == "PREC_EXTRA" and v == row["constexprs"].get("PREC_MAIN")):
            parts.append(f"{name}={v}")
    ones = [k.replace("stride_", "s_") for k in row.get("ones", [])]
    return " ".join(parts) + (f" [=1: {','.join(ones)}]" if ones else "")


def format_table(rows: list[dict]) -> str:
    """One line per compiled configuration, sorted by kernel, arch and configuration."""
    head = ("kernel", "arch", "warps", "stg", "regs", "spill st/ld", "stack", "smem KB", "ptrs",
            "configuration", "used by (example)", "s")
    lines = []
    for row in sorted(rows, key=lambda x: (x["kernel"], -x["arch"], _describe(x), x.get("ptrs", ""))):
        if row["error"]:
            lines.append((row["kernel"].replace("_convlora_", ""), str(row["arch"]), "", "", "",
                          "", "", "", "", "COMPILE ERROR", row["cases"][0], str(row["seconds"])))
            continue
        spill = "-" if row["spill_stores"] is None else f"{row['spill_stores']}/{row['spill_loads']}"
        extra = f" (+{len(row['cases']) - 1})" if len(row["cases"]) > 1 else ""
        lines.append((
            row["kernel"].replace("_convlora_", "").replace("_kernel", ""), str(row["arch"]),
            str(row["num_warps"]), str(row["num_stages"]), str(row["regs"]), spill,
            str(row["stack"]), f"{row['shared'] / 1024:.1f}", row.get("ptrs", ""), _describe(row),
            row["cases"][0] + extra, f"{row['seconds']:.1f}",
        ))
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) if lines else len(h)
              for i, h in enumerate(head)]

    def fmt(cols):
        return "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()

    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(ln) for ln in lines]
    for row in rows:
        if row["error"]:
            out.append(f"\n{row['kernel']} sm_{row['arch']} {row['cases']}:\n{row['error']}")
    out.append("ptrs: pointer arguments in order, f fp32 / b bf16 / h fp16 / l int64. "
               "spill st/ld: bytes of spill stores / loads per thread (ptxas -v); "
               "smem: c.metadata.shared (limit per block: sm_90 227 KB, sm_80 163 KB). "
               "s: compile seconds on one core.")
    return "\n".join(out)


# ----------------------------------------------------------------------------- CLI
def clean_env() -> dict:
    """The environment for a real (non-interpreted) Triton import on a machine without a GPU."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("full", "test"), default="full")
    p.add_argument("--dtype", default=",".join(DTYPES), help="comma list of fp32, bf16, fp16")
    p.add_argument("--r", default=",".join(map(str, RANKS)), help="comma list of ranks")
    p.add_argument("--arch", default="90,80", help="comma list of compute capabilities")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kernel", default="", help="only kernels whose name contains this")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    p.add_argument("--dry-run", action="store_true",
                   help="only list the distinct configurations that would be compiled")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        # Triton reads TRITON_INTERPRET at import: start over without it.
        args = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, str(Path(__file__).resolve()), *args],
                               env=clean_env())
    sys.path.insert(0, str(REPO))
    items = plan(a.preset, tuple(a.dtype.split(",")), tuple(int(v) for v in a.r.split(",")),
                 tuple(int(v) for v in a.arch.split(",")))
    with contextlib.ExitStack() as stack:
        if "TRITON_CACHE_DIR" not in os.environ:  # a fresh cache: really compile, run ptxas -v
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="convlora-aot-"))
            os.environ["TRITON_CACHE_DIR"] = tmp
        result = collect(items, a.workers, a.dry_run, a.kernel)
    if a.dry_run:
        for kernel, arch, case in result["jobs"]:
            print(f"{kernel:40s} sm_{arch}  {case}")
        print(f"{len(result['jobs'])} configurations")
        return 0
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    if result["unavailable"]:
        print(f"cannot compile: {result['unavailable']}", file=sys.stderr)
        return 2
    if not a.quiet:
        print(format_table(result["rows"]))
        print(f"\n{len(result['rows'])} configurations from {len(items)} layer calls, "
              f"{result['total_seconds']:.0f} s")
    return 1 if any(r["error"] for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
