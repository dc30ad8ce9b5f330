"""Build script: the Python package, plus the optional CUDA extension ``convlora_kernels._C``.

The extension is built when a CUDA toolkit is found (``CUDA_HOME`` or ``nvcc`` on PATH) and
``csrc/`` has sources, or when ``CONVLORA_BUILD_CUDA=1`` forces it; ``CONVLORA_BUILD_CUDA=0``
skips it. Without it the package installs and works (eager and Triton backends). Build with
``pip install --no-build-isolation -e .`` so the extension is compiled against the installed torch.
"""

import glob
import os
import shutil

from setuptools import setup


def _set_cuda_home():
    """torch takes the toolkit from ``dirname(dirname(which nvcc))`` before /usr/local/cuda: with
    an nvcc wrapper in /usr/local/bin that is /usr/local, which has no libcudart. Prefer
    /usr/local/cuda, then the directory of a linked nvcc."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        return
    nvcc = shutil.which("nvcc")
    if nvcc:
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _extensions():
    flag = os.environ.get("CONVLORA_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    _set_cuda_home()
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag in ("1", "true", "yes", "on"):
            raise
        print("convlora_kernels: torch is not importable at build time; skipping the CUDA extension")
        return [], {}
    if CUDA_HOME is None:
        if flag in ("1", "true", "yes", "on"):
            raise RuntimeError("CONVLORA_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        print("convlora_kernels: no CUDA toolkit found; skipping the CUDA extension")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc_flags = ["-O3", "-std=c++20", "-lineinfo"]
    ext = CUDAExtension(
        name="convlora_kernels._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
