#!/usr/bin/env python3
"""What nvcc made of the extension's CUDA kernels, without a GPU: registers, spills and stack
(ptxas -v), and the static SASS counts of each kernel and of each loop body.

Compiles ``csrc/convlora_cuda.cu`` alone for one architecture, with the flags ``setup.py`` uses
and this environment's torch headers (a minute or so), then reads the object with cuobjdump.
This is how the expert kernels' versions c5 and c6 were compared (NOTES.md, "Versions of the
CUDA backend's expert kernels": instructions and shared/global loads per FMA of a loop body).

    python scripts/cuda_sass_stats.py --kernel experts_fwd --loops
    python scripts/cuda_sass_stats.py --kernel experts --arch 80 --type double --json out.json
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sass_stats import functions, loop_bodies, report, sass_counts  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "csrc" / "convlora_cuda.cu"
#: Itanium mangling of the kernels' template argument: convlora_experts_fwd_kernel<float> -> ...IfE...
TYPES = {"float": "f", "double": "d"}
_TYPE_NAMES = {code: name for name, code in TYPES.items()}


def cuda_home() -> Path | None:
    """The toolkit setup.py would use: CUDA_HOME, /usr/local/cuda, or the one of nvcc on PATH."""
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").is_file():
            return Path(cand)
    nvcc = shutil.which("nvcc")
    return Path(os.path.realpath(nvcc)).parent.parent if nvcc else None


def cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the one Triton ships (CI's minimal toolkit has none)."""
    home = cuda_home()
    if home and (home / "bin" / "cuobjdump").is_file():
        return str(home / "bin" / "cuobjdump")
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - no Triton, or no bundled tools
        return shutil.which("cuobjdump")


def unavailable_reason() -> str | None:
    if cuda_home() is None:
        return "no CUDA toolkit (nvcc) found"
    if cuobjdump() is None:
        return "no cuobjdump found"
    try:
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError:
        return "torch is not importable (its headers are needed)"
    return None


def compile_object(arch: int, out: Path) -> str:
    """nvcc -c csrc/convlora_cuda.cu for sm_<arch>; returns ptxas -v's log."""
    os.environ.setdefault("CUDA_HOME", str(cuda_home()))  # before torch guesses (see setup.py)
    import torch
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(device_type="cuda"), sysconfig.get_paths()["include"],
                str(REPO / "csrc")]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [str(cuda_home() / "bin" / "nvcc"), "-O3", "-std=c++20", "-lineinfo",
           "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *(f"-I{p}" for p in includes), f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", "-c", str(SOURCE), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{proc.stderr[-4000:]}")
    return proc.stderr


def ptxas_usage(log: str) -> dict[str, dict]:
    """{mangled name: {regs, stack, spill_stores, spill_loads}} from ptxas -v's log."""
    usage: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = usage.setdefault(m.group(1), {})
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        elif m := re.search(r"Used (\d+) registers", line):
            current["regs"] = int(m.group(1))
    return usage


def _template_args(mangled: str, pos: int) -> tuple[list[str], int] | None:
    """The template arguments starting at ``mangled[pos]`` (after its ``I``) up to the closing
    ``E``: builtin types by letter, nested names (``N3c108BFloat16E`` -> ``c10::BFloat16``),
    integer literals (``Li8E`` -> ``8``)."""
    args = []
    while pos < len(mangled) and mangled[pos] != "E":
        if mangled[pos] in _TYPE_NAMES:
            args.append(_TYPE_NAMES[mangled[pos]])
            pos += 1
        elif m := re.match(r"L[a-z](n?\d+)E", mangled[pos:]):  # an integer literal (Li8E: 8)
            args.append(m.group(1).replace("n", "-"))
            pos += m.end()
        elif mangled[pos] == "N":
            parts, pos = [], pos + 1
            while (m := re.match(r"\d+", mangled[pos:])) is not None:
                length, pos = int(m.group()), pos + len(m.group())
                parts.append(mangled[pos:pos + length])
                pos += length
            if not parts or mangled[pos:pos + 1] != "E":
                return None
            args.append("::".join(parts))
            pos += 1
        else:
            return None
    return (args, pos) if args else None


def kernel_name(mangled: str) -> str:
    """convlora_experts_fwd_kernel<float> (or <float, c10::BFloat16>) from the mangled name (no
    c++filt needed); the mangled name itself when it is not a convlora kernel template."""
    m = re.search(r"\d+(convlora_\w+?_kernel)I", mangled)
    parsed = m and _template_args(mangled, m.end())
    if not parsed:
        return mangled
    return f"{m.group(1)}<{', '.join(parsed[0])}>"


def collect(kernel: str, arch: int, type_: str | None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "convlora_cuda.o"
        usage = ptxas_usage(compile_object(arch, obj))
        sass = subprocess.run([cuobjdump(), "-sass", str(obj)], capture_output=True, text=True,
                              check=True).stdout
    rows = []
    for mangled, lines in functions(sass).items():
        name = kernel_name(mangled)
        if kernel not in name or (type_ and f"<{type_}" not in name):  # the first argument
            continue
        rows.append({"kernel": name, "arch": arch, **usage.get(mangled, {}),
                     "sass": sass_counts(lines), "loops": loop_bodies(lines)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", default="experts", help="substring of the kernel names")
    p.add_argument("--arch", type=int, default=90, choices=(80, 90))
    p.add_argument("--type", choices=sorted(TYPES), help="only this element (first template) type")
    p.add_argument("--loops", action="store_true", help="also print every loop body's counts")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    why = unavailable_reason()
    if why:
        print(f"cannot compile: {why}")
        return 2
    rows = collect(args.kernel, args.arch, args.type)
    if not rows:
        print(f"no kernel matching {args.kernel!r}")
        return 1
    report(f"csrc/convlora_cuda.cu, sm_{args.arch}", rows,
           lambda row: (f"{row['kernel']:<56} regs {row.get('regs')} stack {row.get('stack')} B "
                        f"spills {row.get('spill_stores')}/{row.get('spill_loads')} B"),
           args.loops, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
