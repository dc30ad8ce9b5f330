"""Run the extension's CUDA kernels on the CPU: ``csrc/convlora_cuda.cu`` rewritten for
``cuda_emu.h`` (fibers for threads, real barriers and warp shuffles), compiled with the host
compiler and registered as ``torch.ops.convlora_cuda_emu.*`` (CPU tensors), with the schemas of
``torch.ops.convlora_cuda``.

CI has no GPU. The CPU twins of the ops (``csrc/convlora_cpu.cpp``) share the per-element math
with the CUDA kernels but not the parallel decomposition; this runs the decomposition itself:
grids, thread strides, shared-memory layouts, barriers, shuffles, tiles and partial sums, and the
host launchers around them. ``load()`` builds once per source version (cached under
``build/cuda_emu``, serialised by a file lock so parallel test workers build it once).

The rewrite is textual and checks that each rule matched; a change to the .cu file that a rule no
longer recognises fails the build with the rule's name rather than silently testing less.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import sysconfig
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent
SOURCE = CSRC / "convlora_cuda.cu"
NAMESPACE = "convlora_cuda_emu"
_CXXFLAGS = ["-O1", "-std=c++20", "-fPIC", "-shared", "-w"]
# CONVLORA_EMU_SANITIZE=address builds with AddressSanitizer, every global and shared memory
# access of the kernels bounds-checked, plus UBSan's alignment check (a GPU faults on a
# misaligned vector access; x86 does not). The process must preload libasan: see
# tests/test_cuda_emulated_asan.py.
_SANITIZE_FLAGS = {"address": ["-fsanitize=address,alignment", "-fno-sanitize-recover=alignment",
                               "-fno-omit-frame-pointer"]}


def _cxxflags() -> list[str]:
    mode = os.environ.get("CONVLORA_EMU_SANITIZE", "")
    if mode and mode not in _SANITIZE_FLAGS:
        raise ValueError(f"CONVLORA_EMU_SANITIZE={mode!r}: expected one of {sorted(_SANITIZE_FLAGS)}")
    return _CXXFLAGS + _SANITIZE_FLAGS.get(mode, [])


def _rewrite_launches(src: str) -> tuple[str, int]:
    """``kernel<T, ...><<<grid, block, smem, stream>>>(args)`` ->
    ``::convlora_emu::launch(kernel<T, ...>, grid, block, smem, stream, args)``."""
    out, pos, count = [], 0, 0
    while (start := src.find("<<<", pos)) >= 0:
        # The kernel expression: an identifier, optionally with balanced template arguments.
        k = start
        while src[k - 1].isspace():
            k -= 1
        if src[k - 1] == ">":
            depth = 0
            while True:
                k -= 1
                depth += {">": 1, "<": -1}.get(src[k], 0)
                if depth == 0:
                    break
        while src[k - 1].isalnum() or src[k - 1] in "_:":
            k -= 1
        kernel = src[k:start].strip()
        end_cfg = src.index(">>>", start)
        config = src[start + 3 : end_cfg]
        a = end_cfg + 3
        while src[a].isspace():
            a += 1
        if src[a] != "(":
            raise RuntimeError(f"cuda_emu: launch of {kernel!r} without an argument list")
        depth, b = 0, a
        while True:
            depth += {"(": 1, ")": -1}.get(src[b], 0)
            if depth == 0:
                break
            b += 1
        args = src[a + 1 : b].strip()
        out.append(src[pos:k])
        out.append(f"::convlora_emu::launch({kernel}, {config}{', ' + args if args else ''})")
        pos, count = b + 1, count + 1
    out.append(src[pos:])
    return "".join(out), count


# (name, pattern, replacement): each must match at least once.
_RULES = [
    ("CUDA runtime headers", r"#include <c10/cuda/[^>]+>\n", ""),
    # (Its emulation, cuda_emu_mma.h, goes in after cuda_emu.h, whose names it uses.)
    ("tensor-core primitives", r'#include "convlora_mma.h"\n', ""),
    ("emulator headers after the last include",
     r"((?:#include [^\n]+\n)+)(?![\s\S]*#include)",
     r'\1#include "cuda_emu.h"\n#include "cuda_emu_mma.h"\n'),
    ("c10::cuda names", r"\bc10::cuda::", "::convlora_emu::"),
    ("dynamic shared memory",
     r"extern __shared__ __align__\(16\) unsigned char (\w+)\[\];",
     r"unsigned char* \1 = ::convlora_emu::dynamic_shared_memory();"),
    ("static shared arrays",
     r"__shared__ ([\w:<>]+) (\w+)((?:\[[^\]]+\])+);",
     r"static \1 \2\3; ::convlora_emu::declare_shared(\2);"),
    ("device checks", r"\.is_cuda\(\)", ".is_cpu()"),
    ("registration", r"TORCH_LIBRARY_IMPL\(convlora_cuda, CUDA, m\)",
     f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)"),
]


def emulated_source(src: str | None = None, namespace: str = NAMESPACE) -> str:
    """The .cu text (``src``, default the file) rewritten for the CPU emulator, registering its
    ops in ``namespace``."""
    src = SOURCE.read_text() if src is None else src
    for name, pattern, repl in _RULES:
        repl = repl.replace(NAMESPACE, namespace)
        src, n = re.subn(pattern, repl, src)
        if n == 0:
            raise RuntimeError(f"cuda_emu: rewrite rule {name!r} matched nothing in {SOURCE.name}")
    src, n = _rewrite_launches(src)
    if n == 0:
        raise RuntimeError("cuda_emu: no kernel launch found")
    if "__shared__" in src:
        raise RuntimeError("cuda_emu: a __shared__ declaration no rule rewrote")
    return src


def op_names(src: str | None = None) -> list[str]:
    """The ops the .cu file registers for CUDA."""
    src = SOURCE.read_text() if src is None else src
    return re.findall(r'm\.impl\("(\w+)"', src.split("TORCH_LIBRARY_IMPL(convlora_cuda, CUDA, m)")[1])


def _compile(source: str, out: Path) -> None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "g++")
    torch_lib = Path(torch.__file__).parent / "lib"
    cpp = out.with_suffix(".cpp")
    cpp.write_text(source)
    cmd = [cxx, *_cxxflags(), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *(f"-I{p}" for p in cpp_extension.include_paths()), f"-I{CSRC}", f"-I{HERE}",
           f"-I{sysconfig.get_paths()['include']}", str(cpp), "-o", str(out) + ".tmp",
           f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuda_emu: compiling the emulated kernels failed:\n{proc.stderr[-6000:]}")
    os.replace(str(out) + ".tmp", out)


# namespace -> its schema library: the definitions must outlive the tests that call the ops.
_LIBRARIES: dict[str, torch.library.Library] = {}


def load(src: str | None = None, namespace: str = NAMESPACE):
    """Build (once per source) and load the emulated kernels of ``src`` (default: the .cu file)
    as ``torch.ops.<namespace>``; returns that namespace. A namespace is loaded once per process."""
    if namespace in _LIBRARIES:
        return getattr(torch.ops, namespace)
    from convlora_kernels import _C  # noqa: F401  (the real schemas)

    source = emulated_source(src, namespace)
    deps = [source, *(p.read_text() for p in sorted(HERE.glob("*.h"))),
            *(p.read_text() for p in sorted(CSRC.glob("*.h"))),
            torch.__version__, " ".join(_cxxflags())]
    key = hashlib.sha256("\0".join(deps).encode()).hexdigest()[:16]
    build = ROOT / "build" / "cuda_emu"
    build.mkdir(parents=True, exist_ok=True)
    out = build / f"{namespace}_{key}.so"
    with open(build / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            _compile(source, out)
    lib = torch.library.Library(namespace, "DEF")
    for name in op_names(src):
        schema = str(getattr(torch.ops.convlora_cuda, name).default._schema)
        lib.define(schema.split("::", 1)[1])
    torch.ops.load_library(str(out))
    _LIBRARIES[namespace] = lib
    return getattr(torch.ops, namespace)


#: Tests set this to "1" in a subprocess: the emulated CUDA kernels replace the extension's CPU
#: kernels (see tests/conftest.py), so every CPU test of the CUDA backend runs the CUDA kernels.
ENV_AS_CPU = "CONVLORA_EMU_AS_CPU"
_OVERRIDES: list[torch.library.Library] = []


def override_cpu_kernels() -> list[str]:
    """Register the emulated CUDA kernels as the CPU kernels of ``torch.ops.convlora_cuda``
    (replacing the CPU twins for the rest of the process); returns the op names."""
    emu = load()
    lib = torch.library.Library("convlora_cuda", "IMPL")
    names = op_names()
    for name in names:
        op = getattr(emu, name)
        lib.impl(name, lambda *args, _op=op: _op(*args), "CPU")
    _OVERRIDES.append(lib)
    return names
