"""The compiled extensions, built and loaded in one place: ``rlvr_optim._cpu`` (the CPU
backend, ``csrc/cpu_*.cpp``) and ``rlvr_optim._C`` (the CUDA backend, ``csrc/*.cu``).

- The recipes: the compiler commands and flags of each extension, for setup.py (which
  loads this file by path, so it imports neither torch nor the package at module level)
  and for the first-use build alike.
- :class:`Extension`: an extension as the backends see it: the module setup.py built, if
  it is of this version (its ABI version and the names it exports match); else one
  compiled on first use into a cache folder (``$RLVR_OPTIM_CACHE``, default
  ``~/.cache/rlvr_optim``), one build per folder across processes (a file lock), written
  beside and renamed, so that a killed build leaves no half-written module. :data:`CPU`
  and :data:`CUDA` are the two.

``csrc/cpu_step.cpp`` is compiled once per instruction set (on x86-64: the baseline and
``-mavx2 -mf16c``, picked at run time by the CPU's flags; elsewhere: the baseline only), then
linked with ``csrc/cpu_binding.cpp``. Each ``csrc/*.cu`` is compiled by nvcc (in parallel)
and linked into one module.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Callable

__all__ = ["CPU", "CUDA", "CPU_SOURCES", "CXX_FLAGS", "NVCC_FLAGS", "Extension", "cache_root",
           "cpu_compiler", "gencode_flags", "nvcc"]

# ---------------------------------------------------------------------------------------
# Recipes.
# ---------------------------------------------------------------------------------------

CPU_SOURCES = ("cpu_step.cpp", "cpu_binding.cpp", "cpu_step.h", "step_table.h",
               "adamw_element.cuh")
"""The CPU extension's sources in csrc/ (the two .cpp compiled, the headers hashed)."""
# -ffp-contract=off: no fused multiply-add, each fp32 operation rounds once (the spec).
# -fno-math-errno: sqrt becomes an instruction (vectorizable); no value changes.
CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off",
             "-fno-math-errno", "-fopenmp")
# -fmad=false: no multiply-add contraction anywhere (the kernels also use __fmul_rn & co.),
# so the fp32 arithmetic is the reference's, operation by operation.
NVCC_FLAGS = ["-O3", "-std=c++17", "-fmad=false", "-Xcompiler", "-fPIC",
              "-Xcompiler", "-fvisibility=hidden"]


def cache_root() -> Path:
    """Where first-use builds and test artifacts go: ``$RLVR_OPTIM_CACHE``, else
    ``$XDG_CACHE_HOME/rlvr_optim``, else ``~/.cache/rlvr_optim``."""
    if os.environ.get("RLVR_OPTIM_CACHE"):
        return Path(os.environ["RLVR_OPTIM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlvr_optim"


def cpu_compiler() -> str | None:
    """The C++ compiler: $CXX, else g++, else c++ on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_isas() -> list[tuple[str, list[str]]]:
    """(name, extra flags) of each instruction set cpu_step.cpp is compiled for."""
    out = [("generic", [])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        out.append(("avx2", ["-mavx2", "-mf16c"]))
    return out


def nvcc() -> str | None:
    """nvcc in $CUDA_HOME/bin or $CUDA_PATH/bin, else on PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def gencode_flags(archs: list[str], ptx: bool = False) -> list[str]:
    """-gencode flags: machine code for each arch (``"90"``), and with ``ptx`` the PTX of
    the last one, so that newer GPUs can load it."""
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"CUDA architectures must be compute capabilities like '80;90', "
                         f"got {';'.join(archs)!r}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if ptx:
        flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def module_file(name: str) -> str:
    """The file name of extension module ``name`` (``"_cpu"``, ``"_C"``) on this Python."""
    return f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"


def _python_include() -> str:
    return sysconfig.get_paths()["include"]


def cpu_commands(src: Path, build: Path, target: Path, pybind11_include: str):
    """The CPU extension's compile commands (one per object, independent) and link."""
    cxx = cpu_compiler()
    include = [f"-I{pybind11_include}", f"-I{_python_include()}", f"-I{src}"]
    compiles, objects, have = [], [], []
    for name, extra in cpu_isas():
        obj = build / f"cpu_step_{name}.o"
        compiles.append([cxx, "-c", *CXX_FLAGS, *extra, f"-DRLVR_CPU_ISA={name}", *include,
                         str(src / "cpu_step.cpp"), "-o", str(obj)])
        objects.append(obj)
        have += [f"-DRLVR_CPU_HAVE_{name.upper()}"] if name != "generic" else []
    obj = build / "cpu_binding.o"
    compiles.append([cxx, "-c", *CXX_FLAGS, *have, *include, str(src / "cpu_binding.cpp"),
                     "-o", str(obj)])
    objects.append(obj)
    link = [cxx, "-shared", "-fopenmp", *map(str, objects), "-o", str(target)]
    return compiles, link


def cuda_commands(src: Path, build: Path, target: Path, pybind11_include: str,
                  gencode: list[str]):
    """The CUDA extension's compile commands (one per .cu) and link."""
    compiler = nvcc()
    flags = [*NVCC_FLAGS, *gencode, f"-I{pybind11_include}", f"-I{_python_include()}"]
    sources = sorted(src.glob("*.cu"))
    objects = [build / f"{s.stem}.o" for s in sources]
    compiles = [[compiler, "-c", *flags, str(s), "-o", str(o)] for s, o in zip(sources, objects)]
    link = [compiler, "-shared", *map(str, objects), "-o", str(target)]
    return compiles, link


def _ninja_path(path) -> str:
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _write_text(path: Path, text: str) -> None:
    """rlvr_optim.files.write_text; setup.py, which loads this file alone (no package), writes
    into the build folder setuptools gives it."""
    try:
        from . import files  # noqa: PLC0415
    except ImportError:
        path.write_text(text)
        return
    files.write_text(path, text)


def run_build(compiles: list[list[str]], link: list[str], build_dir: Path, what: str) -> None:
    """Run independent compile commands, then the link: with ninja when it is on PATH
    (``build_dir/build.ninja``), else the compiles started together. Raises RuntimeError
    naming the failed command."""
    build_dir.mkdir(parents=True, exist_ok=True)
    ninja = shutil.which("ninja")
    if ninja is not None:
        lines = ["ninja_required_version = 1.3", "rule run", "  command = $cmd"]
        for cmd in [*compiles, link]:
            out = cmd[-1]
            inputs = [c for c in cmd[:-2] if c.endswith((".cpp", ".cu", ".o"))]  # before -o
            lines += [f"build {_ninja_path(out)}: run {' '.join(map(_ninja_path, inputs))}",
                      f"  cmd = {' '.join(cmd)}"]
        _write_text(build_dir / "build.ninja", "\n".join(lines) + "\n")
        result = subprocess.run([ninja, "-C", str(build_dir)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {what} failed (ninja -C {build_dir}):\n"
                               f"{(result.stdout + result.stderr)[-3000:]}")
        return
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True),
                                compiles))
    failures = [f"{' '.join(r.args)}\n{(r.stdout + r.stderr)[-2000:]}" for r in results
                if r.returncode != 0]
    if failures:
        raise RuntimeError(f"compiling {what} failed:\n" + "\n".join(failures))
    result = subprocess.run(link, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"linking {what} failed: {' '.join(link)}\n{result.stderr[-2000:]}")


def build_cpu(src: Path, build_dir: Path, target: Path, pybind11_include: str) -> None:
    """Compile the CPU extension into ``target``; raises RuntimeError naming the failure."""
    if cpu_compiler() is None:
        raise RuntimeError("no C++ compiler ($CXX, g++ or c++ on PATH)")
    # ninja -C runs in build_dir: relative paths would name files there.
    src, build_dir, target = Path(src).resolve(), Path(build_dir).resolve(), Path(target).resolve()
    run_build(*cpu_commands(src, build_dir, target, pybind11_include), build_dir,
              "rlvr_optim._cpu")


def build_cuda(src: Path, build_dir: Path, target: Path, pybind11_include: str,
               gencode: list[str]) -> None:
    """Compile the CUDA extension into ``target`` for the ``gencode`` targets."""
    if nvcc() is None:
        raise RuntimeError("nvcc is not on PATH (nor in $CUDA_HOME/bin)")
    src, build_dir, target = Path(src).resolve(), Path(build_dir).resolve(), Path(target).resolve()
    run_build(*cuda_commands(src, build_dir, target, pybind11_include, gencode), build_dir,
              "rlvr_optim._C")


# ---------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------


def _source_dir(required: tuple[str, ...]) -> Path | None:
    """csrc/ beside the package (installed as package data) or in the source checkout."""
    here = Path(__file__).resolve().parent
    for folder in (here / "csrc", here.parent / "csrc"):
        if all((folder / name).is_file() for name in required):
            return folder
    return None


class Extension:
    """One compiled extension of the package, loaded once per process.

    Args:
        name: the module's name in the package (``"_cpu"``, ``"_C"``).
        abi_version: the version this package expects (csrc's ``kAbiVersion``).
        required: files in csrc/ that a first-use build needs.
        hashed: ``hashed(src)``: the source files whose contents name a build's folder.
        blockers: ``blockers()``: why a first-use build cannot run here (empty: it can).
        build: ``build(src, folder, target, pybind11_include)``: the first-use build.
        key: ``key()``: what else names a build's folder (flags, targets, compiler).
        hint: what to do when the extension can be neither loaded nor built.
    """

    def __init__(self, name: str, abi_version: int, required: tuple[str, ...],
                 hashed: Callable, blockers: Callable, build: Callable, key: Callable,
                 hint: str):
        self.name = name
        self.abi_version = abi_version
        self.required = required
        self.hashed = hashed
        self.blockers = blockers
        self.build = build
        self.key = key
        self.hint = hint
        self.module: ModuleType | None = None
        self.failure: str | None = None  # why the first-use build failed in this process

    def usable(self, module: ModuleType) -> bool:
        """Whether ``module`` is of this version: its ABI version and the table names it
        exports (rlvr_optim.table) are the package's."""
        from . import table  # noqa: PLC0415 - a leaf module; setup.py never calls this

        expected = {"ROW_FIELDS": table.ROW_FIELDS, "COUNTER_NAMES": table.COUNTER_NAMES}
        return (getattr(module, "ABI_VERSION", None) == self.abi_version
                and all(tuple(getattr(module, k, ())) == v for k, v in expected.items()))

    def prebuilt(self) -> ModuleType | None:
        """The extension setup.py built, if there is one of this version."""
        try:
            module = importlib.import_module(f"rlvr_optim.{self.name}")
        except ImportError:
            return None
        return module if self.usable(module) else None

    def is_built(self) -> bool:
        """Whether it is loaded or was built at install time (no compile needed)."""
        return self.module is not None or self.prebuilt() is not None

    def build_blockers(self) -> list[str]:
        blockers = [] if _source_dir(self.required) else [
            "the csrc/ sources are not installed with the package"]
        if importlib.util.find_spec("pybind11") is None:
            blockers.append("pybind11 is not installed (pip install pybind11)")
        return blockers + self.blockers()

    def unavailable_reason(self) -> str | None:
        """Why it can be neither loaded nor built here, or None (a first-use build that
        has not been tried yet counts as possible)."""
        if self.is_built():
            return None
        if self.failure is not None:
            return self.failure
        blockers = self.build_blockers()
        if not blockers:
            return None
        return (f"rlvr_optim.{self.name} was not built at install time and cannot be "
                f"compiled now: {'; '.join(blockers)}")

    def load(self) -> ModuleType:
        """The module: setup.py's, else compiled on first use. A failed compile is not
        retried in this process."""
        if self.module is None:
            if self.failure is not None:
                raise RuntimeError(self.failure)
            try:
                self.module = self.prebuilt() or self._build_and_import()
            except (RuntimeError, OSError) as exc:
                self.failure = str(exc)
                raise
        return self.module

    def _build_and_import(self) -> ModuleType:
        blockers = self.build_blockers()
        if blockers:
            raise RuntimeError(
                f"rlvr_optim.{self.name} was not built at install time and cannot be compiled "
                f"now: {'; '.join(blockers)}. {self.hint}"
            )
        import pybind11  # noqa: PLC0415

        from . import files  # noqa: PLC0415 - setup.py loads this file alone, without it

        src = _source_dir(self.required)
        digest = hashlib.sha256()
        for path in sorted(self.hashed(src)):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        digest.update(repr((self.key(), sys.version_info[:2])).encode())
        folder = cache_root() / f"{self.name.strip('_').lower()}_ext" / digest.hexdigest()[:16]
        target = folder / module_file(self.name)
        with files.folder_lock(folder, wait=True):  # one build per folder across processes
            if not target.is_file():
                print(f"rlvr_optim: compiling rlvr_optim.{self.name} into {folder} (first use "
                      "only; about a minute)", file=sys.stderr, flush=True)
                # Objects and the linked module in a build folder of their own, removed
                # whatever happens; the module reaches the cache through files.atomic_write
                # (temp beside, fsync, rename): a killed build leaves no half-written module.
                build_dir = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))
                try:
                    built = build_dir / target.name
                    self.build(src, build_dir, built, pybind11.get_include())
                    with open(built, "rb") as f, files.atomic_write(target) as out:
                        shutil.copyfileobj(f, out)
                finally:
                    shutil.rmtree(build_dir, ignore_errors=True)
                print(f"rlvr_optim: rlvr_optim.{self.name} compiled", file=sys.stderr,
                      flush=True)
            spec = importlib.util.spec_from_file_location(f"rlvr_optim.{self.name}", target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        if not self.usable(module):
            raise RuntimeError(f"{target} does not match this rlvr_optim; delete {folder}")
        return module


def _cuda_archs() -> list[str]:
    """The first-use build's targets: $RLVR_OPTIM_CUDA_ARCHS, else the GPU at hand."""
    archs = os.environ.get("RLVR_OPTIM_CUDA_ARCHS")
    if archs:
        return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    import torch  # noqa: PLC0415 - only a first-use CUDA build asks the GPU

    major, minor = torch.cuda.get_device_capability()
    return [f"{major}{minor}"]


def _cpu_hashed(src: Path) -> list[Path]:
    return [src / name for name in CPU_SOURCES]


def _cuda_hashed(src: Path) -> list[Path]:
    return [*src.glob("*.cu"), *src.glob("*.cuh"), *src.glob("*.h")]


CPU = Extension(
    "_cpu", 5, CPU_SOURCES, _cpu_hashed,
    blockers=lambda: [] if cpu_compiler() else ["no C++ compiler ($CXX, g++ or c++ on PATH)"],
    build=build_cpu, key=lambda: (CXX_FLAGS, cpu_isas(), cpu_compiler()),
    hint=("Reinstall with a C++ compiler on PATH (pip install -e . builds it), or use "
          "backend='reference'."),
)
"""``rlvr_optim._cpu``, the CPU backend's extension (csrc/cpu_binding.cpp)."""

CUDA = Extension(
    "_C", 6, ("binding.cu", "step_table.h"), _cuda_hashed,
    blockers=lambda: [] if nvcc() else ["nvcc is not on PATH (nor in $CUDA_HOME/bin)"],
    build=lambda src, folder, target, include: build_cuda(
        src, folder, target, include, gencode_flags(_cuda_archs())),
    key=lambda: (_cuda_archs(), NVCC_FLAGS, nvcc()),
    hint=("Reinstall with nvcc on PATH (pip install -e . builds it), or use "
          "backend='triton' or 'reference'."),
)
"""``rlvr_optim._C``, the CUDA backend's extension (csrc/binding.cu)."""
