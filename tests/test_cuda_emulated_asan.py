"""The extension's CUDA kernels, emulated on the CPU (``tests/cuda_emu``), in subprocesses: the
CUDA backend's layer tests with the emulated kernels in place of the CPU twins, and the kernels
rebuilt with AddressSanitizer and UBSan's alignment check: every global and shared memory
access of the kernels and their launchers is bounds-checked, and every typed access
alignment-checked, which the value comparisons of ``test_cuda_emulated.py`` cannot do (an
out-of-bounds read may return a plausible value; x86 forgives the misaligned vector load a GPU
faults on). The sanitizer runs preload its runtime; the mutants prove each check fires.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from convlora_kernels.ops import cuda_conv_lora as cc

from . import cuda_emu

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not cc.extension_loaded(), reason="extension not built (tests/test_cuda_ext.py says why)"),
]


def _asan_env() -> dict[str, str]:
    if os.environ.get("CONVLORA_EMU_SANITIZE"):  # (this file run by hand under the sanitizer)
        pytest.skip("already running under the sanitizer")
    cxx = os.environ.get("CXX", "g++")
    libs = [subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
            for name in ("libasan.so", "libstdc++.so.6")]
    if not all(os.path.isabs(lib) for lib in libs):
        pytest.skip(f"{cxx} has no AddressSanitizer runtime")
    # libstdc++ preloaded too: ASan's __cxa_throw interceptor must find the real one.
    return dict(os.environ, CONVLORA_EMU_SANITIZE="address", LD_PRELOAD=" ".join(libs),
                ASAN_OPTIONS="detect_leaks=0", PYTHONPATH=str(cuda_emu.ROOT))


def test_kernels_under_address_sanitizer():
    """The emulated-kernel tests (one thread order, SAM shapes left out: ASan costs ~3x)."""
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda_emulated.py", "-q", "-p", "no:cacheprovider",
           "-p", "no:xdist", "-k", "forward and not sam_shapes and not catches"]
    proc = subprocess.run(cmd, env=_asan_env(), cwd=cuda_emu.ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]


def test_cuda_backend_layer_tests_on_the_emulated_kernels():
    """tests/test_cuda_ext.py (the CUDA backend on the CPU: whole-layer forward and every
    gradient against the float64 reference, the gate, autocast, torch.compile, opcheck) with
    the emulated CUDA kernels registered as the ops' CPU kernels in place of the CPU twins. Left
    out: the two tests of the twins' host-side index validation (the CUDA kernels assert on the
    device instead; test_cuda_emulated.py checks that)."""
    env = dict(os.environ, **{cuda_emu.ENV_AS_CPU: "1"})
    env.pop("CONVLORA_EMU_SANITIZE", None)
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda_ext.py", "-p", "no:cacheprovider",
           "-p", "no:xdist", "-k", "not validation"]  # (not -q: the report header says it took)
    proc = subprocess.run(cmd, env=env, cwd=cuda_emu.ROOT, capture_output=True, text=True)
    assert "emulated CUDA kernels registered as the CPU kernels" in proc.stdout, proc.stdout[-3000:]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]


def _run_mutant(replace: tuple[str, str], namespace: str, call: str) -> subprocess.CompletedProcess:
    """Build the .cu file with one textual change under the sanitizers and run ``call`` (Python,
    with torch, ``ops`` and ``_experts_case`` in scope) in a subprocess."""
    old, new = replace
    assert old in cuda_emu.SOURCE.read_text(), f"the source changed; update the mutant ({old!r})"
    script = f"""
import torch
from tests import cuda_emu
from tests.test_cuda_emulated import _experts_case
ops = cuda_emu.load(cuda_emu.SOURCE.read_text().replace({old!r}, {new!r}), namespace={namespace!r})
{call}
print("NOT CAUGHT")
"""
    return subprocess.run([sys.executable, "-c", script], env=_asan_env(), cwd=cuda_emu.ROOT,
                          capture_output=True, text=True)


def test_address_sanitizer_catches_an_overflow():
    """A mutant whose dz kernel runs one thread past the end must be reported."""
    proc = _run_mutant(
        ("if (k >= M * g.r) return;", "if (k > M * g.r) return;"), "convlora_cuda_emu_overflow",
        # 8 samples x 5 x 7 pixels at r = 3: 840 threads' work in 4 blocks of 256, the last
        # partial (its thread 840 then reads and writes one element past the end).
        "ops.experts_bwd(*_experts_case(8, 5, 7, 3, False, torch.float64))")
    assert proc.returncode != 0 and "heap-buffer-overflow" in proc.stderr, (proc.stdout + proc.stderr)[-4000:]


def test_alignment_sanitizer_catches_a_misaligned_vector_load():
    """A mutant that always takes the down projection's 16-byte vector path: with C_in = 6 bf16
    (12-byte rows) a GPU would fault; the alignment check must report it."""
    proc = _run_mutant(
        ("if (vec_ok)\n    convlora_down_proj_kernel", "if (true)\n    convlora_down_proj_kernel"),
        "convlora_cuda_emu_misaligned",
        "ops.down_proj(torch.randn(1, 2, 3, 6).bfloat16(), torch.randn(3, 6).bfloat16(), 0)")
    assert proc.returncode != 0 and "misaligned address" in proc.stderr, (proc.stdout + proc.stderr)[-4000:]
