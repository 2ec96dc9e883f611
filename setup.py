"""Build script: a pure-Python install always; the CUDA and CPU extensions when they can be used.

The extension ``rlvr_optim._C`` is compiled with nvcc + pybind11 from ``csrc/*.cu`` and
takes raw device pointers, so it needs no CUDA build of torch to compile (torch is not
imported here: an isolated build environment has none). It is built only where it can be
used: nvcc is found, the machine has an NVIDIA GPU (a ``/dev/nvidia<N>`` device node, or
``nvidia-smi -L`` listing one) and the torch this build can see, if any, is not a CPU-only
build (a ``+cpu`` version; in an isolated build no torch is visible and the GPU decides).
``RLVR_OPTIM_BUILD_CUDA=1`` builds it anyway (nvcc must be found), e.g. for a wheel made on
a machine without a GPU; ``RLVR_OPTIM_SKIP_CUDA_BUILD=1`` never builds it (it wins over
``RLVR_OPTIM_BUILD_CUDA``). Without it the package still installs and runs (reference, CPU
and Triton backends; the CUDA backend then compiles the extension on first use).

``RLVR_OPTIM_CUDA_ARCHS`` (default ``"80;90"``) lists the GPU architectures to build
machine code for; PTX of the newest one is embedded too, so newer GPUs can load it.

The CPU extension ``rlvr_optim._cpu`` (``csrc/cpu_*.cpp``, the backend ``cpu``) is built with
the C++ compiler ($CXX, g++ or c++) whenever one is found, a CPU-only machine included,
unless ``RLVR_OPTIM_SKIP_CPU_BUILD=1``. A failed build warns and the install goes on: the
backend then compiles it on first use, or ``auto`` runs the reference.

Built extensions are kept in ``$RLVR_OPTIM_CACHE/build`` (default
``~/.cache/rlvr_optim/build``), keyed by the hash of their sources, flags, compiler version,
Python ABI and pybind11: pip builds each install in a fresh folder, so without it adding an
extra later (``pip install -e ".[trainer]"``) recompiled both extensions from scratch.
"""

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
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


def has_gpu() -> bool:
    """An NVIDIA GPU on this machine: a /dev/nvidia<N> device node (containers given a GPU
    have one), or nvidia-smi listing one."""
    if any(re.fullmatch(r"nvidia\d+", p.name) for p in Path("/dev").glob("nvidia*")):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def cpu_only_torch() -> bool:
    """The torch this build can see (none in an isolated build) is a CPU-only build."""
    try:
        return "+cpu" in importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False


def want_cuda() -> bool:
    """Build rlvr_optim._C? (module docstring: where it can be used, or when asked)."""
    if os.environ.get("RLVR_OPTIM_SKIP_CUDA_BUILD", "0") == "1" or not CUDA_SOURCES:
        return False
    nvcc = shutil.which("nvcc")
    if os.environ.get("RLVR_OPTIM_BUILD_CUDA", "0") == "1":
        if nvcc is None:
            raise SystemExit("RLVR_OPTIM_BUILD_CUDA=1 but nvcc is not on PATH")
        return True
    if nvcc is None:
        return False
    if not has_gpu() or cpu_only_torch():
        print("rlvr_optim._C is not built: no NVIDIA GPU or a CPU-only torch here (the CUDA "
              "backend compiles it on first use; RLVR_OPTIM_BUILD_CUDA=1 builds it now)")
        return False
    return True


def _cache_root() -> Path:
    """As rlvr_optim.cuda_backend._cache_root, which setup.py cannot import (torch)."""
    if os.environ.get("RLVR_OPTIM_CACHE"):
        return Path(os.environ["RLVR_OPTIM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlvr_optim"


def _tool_version(tool: str) -> str:
    done = subprocess.run([tool, "--version"], capture_output=True, text=True)
    return done.stdout + done.stderr


def build_key(sources, *recipe) -> str:
    """Hash of an extension's inputs (file names and contents) and its build recipe."""
    import pybind11

    h = hashlib.sha256()
    for path in sorted(sources):
        h.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    h.update(repr((recipe, pybind11.__version__, sysconfig.get_config_var("EXT_SUFFIX"),
                   sysconfig.get_paths()["include"], sys.version)).encode())
    return h.hexdigest()[:20]


def cached_build(name: str, key: str, out: Path, build) -> None:
    """``out`` from the build cache when an extension of this key was built before, else
    ``build(out)`` and a copy into the cache (written beside, then renamed into place)."""
    cached = _cache_root() / "build" / name / key / out.name
    if cached.is_file():
        print(f"{name}: the build of these sources and flags from {cached.parent}")
        shutil.copyfile(cached, out)
        return
    build(out)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        shutil.copyfile(out, partial)
        os.replace(partial, cached)
    except OSError as exc:  # a read-only cache costs the next install a rebuild, no more
        warnings.warn(f"could not keep {name} in the build cache ({exc})")


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

        def build(target):
            print(f"building rlvr_optim._C for sm {archs} from {len(compiles)} sources "
                  f"(nvcc {' '.join(flags)})")
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                for result in pool.map(lambda cmd: subprocess.run(cmd, cwd=ROOT), compiles):
                    if result.returncode != 0:
                        raise RuntimeError(f"nvcc failed: {' '.join(result.args)}")
            subprocess.check_call(["nvcc", "-shared", *objects, "-o", str(target)], cwd=ROOT)

        sources = [*(ROOT / src for src in ext.sources), *(ROOT / "csrc").glob("*.cuh"),
                   *(ROOT / "csrc").glob("*.h")]
        cached_build(ext.name, build_key(sources, flags, _tool_version("nvcc")), out, build)

    def build_cpu(self, ext):
        """The CPU extension, or a warning: it must never break an install."""
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            import pybind11

            cxx = RECIPES.cpu_compiler()

            def build(target):
                print(f"building rlvr_optim._cpu ({cxx} {' '.join(RECIPES.CXX_FLAGS)})")
                RECIPES.build_cpu(ROOT / "csrc", Path(self.build_temp).resolve() / "cpu",
                                  target.resolve(), pybind11.get_include())

            sources = [ROOT / "csrc" / name for name in RECIPES.CPU_SOURCES]
            sources.append(ROOT / "rlvr_optim" / "extensions.py")  # the recipe
            key = build_key(sources, RECIPES.CXX_FLAGS, RECIPES.cpu_isas(), _tool_version(cxx))
            cached_build(ext.name, key, out, build)
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
