"""Build script: a pure-Python install always; the CUDA extension only when it can be built.

The extension ``rlvr_optim._C`` is compiled with nvcc + pybind11 from ``csrc/*.cu`` and
takes raw device pointers, so it needs no CUDA build of torch. It is built when nvcc is
found and ``csrc/`` has sources, unless ``RLVR_OPTIM_SKIP_CUDA_BUILD=1``. Without it the
package still installs and runs (reference and Triton backends).
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
ARCHS = ("80", "90")


def want_cuda() -> bool:
    if os.environ.get("RLVR_OPTIM_SKIP_CUDA_BUILD", "0") == "1":
        return False
    return bool(CUDA_SOURCES) and shutil.which("nvcc") is not None


class NvccBuildExt(build_ext):
    """Compile each .cu with nvcc into one shared object (no torch headers involved)."""

    def build_extension(self, ext):
        import pybind11
        import sysconfig

        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
        cmd = [
            "nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-fmad=false",
            f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
            *gencode, *ext.sources, "-o", str(out),
        ]
        print("building rlvr_optim._C:", " ".join(cmd))
        subprocess.check_call(cmd, cwd=ROOT)


ext_modules = [Extension("rlvr_optim._C", CUDA_SOURCES)] if want_cuda() else []
setup(ext_modules=ext_modules, cmdclass={"build_ext": NvccBuildExt})
