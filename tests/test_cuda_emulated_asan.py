"""The extension's CUDA kernels, emulated on the CPU (``tests/cuda_emu``), rebuilt with
AddressSanitizer: every global and shared memory access of the kernels and their launchers is
bounds-checked, which the value comparisons of ``test_cuda_emulated.py`` cannot do (an
out-of-bounds read may return a plausible value). Each test runs in a subprocess that preloads
the sanitizer's runtime.
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


def test_address_sanitizer_catches_an_overflow():
    """A mutant whose dz gather's last block runs one thread past the end must be reported."""
    needle = "if (k >= total) return;"
    assert needle in cuda_emu.SOURCE.read_text(), "the source changed; update the mutant"
    script = f"""
import torch
from tests import cuda_emu
from tests.test_cuda_emulated import _experts_case
src = cuda_emu.SOURCE.read_text().replace({needle!r}, {needle.replace(">=", ">")!r})
ops = cuda_emu.load(src, namespace="convlora_cuda_emu_overflow")
z, idx, ew, eb, dy = _experts_case(8, 5, 7, 3, False, torch.float64)  # 840 = 3 * 256 + 72 threads
ops.experts_bwd(z, idx, ew, eb, dy)
print("NOT CAUGHT")
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_asan_env(), cwd=cuda_emu.ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "heap-buffer-overflow" in proc.stderr, (proc.stdout + proc.stderr)[-4000:]
