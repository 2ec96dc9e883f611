"""Build script: a pure-Python install always; the CUDA and CPU extensions when they can be built.

The extension ``rlvr_optim._C`` is compiled with nvcc + pybind11 from ``csrc/*.cu`` and
takes raw device pointers, so it needs no CUDA build of torch (torch is not imported here).
It is built when nvcc is found and ``csrc/`` has sources, unless
``RLVR_OPTIM_SKIP_CUDA_BUILD=1``. Without it the package still installs and runs
(reference and Triton backends; the CUDA backend then compiles the extension on first use).

``RLVR_OPTIM_CUDA_ARCHS`` (default ``"80;90"``) lists the GPU architectures to build
machine code for; PTX of the newest one is embedded too, so newer GPUs can load it.

The CPU extension ``rlvr_optim._cpu`` (``csrc/cpu_*.cpp``, the backend ``cpu``) is built with
the C++ compiler ($CXX, g++ or c++) whenever one is found, a CPU-only machine included,
unless ``RLVR_OPTIM_SKIP_CPU_BUILD=1``. A failed build warns and the install goes on: the
backend then compiles it on first use, or ``auto`` runs the reference.
"""

import importlib.util
import os
import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
DEFAULT_ARCHS = "80;90"


def _load_recipes():
    """rlvr_optim/extensions.py, the compiler recipes of both extensions, loaded by path:
    importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_extensions", ROOT / "rlvr_optim" / "extensions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPES = _load_recipes()


def want_cpu() -> bool:
    if os.environ.get("RLVR_OPTIM_SKIP_CPU_BUILD", "0") == "1":
        return False
    return RECIPES.cpu_compiler() is not None


def want_cuda() -> bool:
    if os.environ.get("RLVR_OPTIM_SKIP_CUDA_BUILD", "0") == "1":
        return False
    return bool(CUDA_SOURCES) and shutil.which("nvcc") is not None


def gencode_flags(archs: str) -> list[str]:
    """-gencode flags: machine code for each arch, PTX for the last."""
    names = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    return RECIPES.gencode_flags(names, ptx=True)


class NvccBuildExt(build_ext):
    """Compile each .cu with nvcc (in parallel), link one shared object; no torch headers.
    The flags and the CPU extension's commands are rlvr_optim/extensions.py's."""

    def build_extension(self, ext):
        if ext.name == "rlvr_optim._cpu":
            self.build_cpu(ext)
            return
        import sysconfig

        import pybind11

        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp) / "csrc"
        tmp.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("RLVR_OPTIM_CUDA_ARCHS", DEFAULT_ARCHS)
        flags = [*RECIPES.NVCC_FLAGS, *gencode_flags(archs), f"-I{pybind11.get_include()}",
                 f"-I{sysconfig.get_paths()['include']}"]
        objects = [str(tmp / (Path(src).stem + ".o")) for src in ext.sources]
        compiles = [["nvcc", "-c", *flags, src, "-o", obj] for src, obj in zip(ext.sources, objects)]
        print(f"building rlvr_optim._C for sm {archs} from {len(compiles)} sources "
              f"(nvcc {' '.join(flags)})")
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for result in pool.map(lambda cmd: subprocess.run(cmd, cwd=ROOT), compiles):
                if result.returncode != 0:
                    raise RuntimeError(f"nvcc failed: {' '.join(result.args)}")
        subprocess.check_call(["nvcc", "-shared", *objects, "-o", str(out)], cwd=ROOT)

    def build_cpu(self, ext):
        """The CPU extension, or a warning: it must never break an install."""
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            import pybind11

            print(f"building rlvr_optim._cpu ({RECIPES.cpu_compiler()} "
                  f"{' '.join(RECIPES.CXX_FLAGS)})")
            RECIPES.build_cpu(ROOT / "csrc", Path(self.build_temp).resolve() / "cpu",
                              out.resolve(), pybind11.get_include())
        except Exception as exc:  # noqa: BLE001 - any failure leaves a pure-Python install
            warnings.warn(f"rlvr_optim._cpu was not built ({exc}); the CPU backend will be "
                          "compiled on first use, or backend='auto' runs the reference")
            self._not_built = [*getattr(self, "_not_built", []), ext.name]

    def _built_only(self):
        return [e for e in self.extensions if e.name not in getattr(self, "_not_built", [])]

    # An extension that was not built has no file to copy or to list in the wheel.
    def copy_extensions_to_source(self):
        self.extensions = self._built_only()
        super().copy_extensions_to_source()

    def get_outputs(self):
        self.extensions = self._built_only()
        return super().get_outputs()


ext_modules = [Extension("rlvr_optim._C", CUDA_SOURCES)] if want_cuda() else []
if want_cpu():
    ext_modules.append(Extension("rlvr_optim._cpu", [f"csrc/{name}" for name in RECIPES.CPU_SOURCES[:2]]))
setup(ext_modules=ext_modules, cmdclass={"build_ext": NvccBuildExt})
