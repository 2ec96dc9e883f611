"""How the CPU extension ``rlvr_optim._cpu`` is compiled, for setup.py and for the
first-use build of :mod:`rlvr_optim.cpu_backend` alike. Imports neither torch nor the
package (setup.py loads this file by path).

``csrc/cpu_step.cpp`` is compiled once per instruction set (on x86-64: the baseline and
``-mavx2``, picked at run time by the CPU's flags; elsewhere: the baseline only), then
linked with ``csrc/cpu_binding.cpp`` into one module.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

SOURCES = ("cpu_step.cpp", "cpu_binding.cpp", "cpu_step.h", "step_table.h", "adamw_element.cuh")
# -ffp-contract=off: no fused multiply-add, each fp32 operation rounds once (the spec).
# -fno-math-errno: sqrt becomes an instruction (vectorizable); no value changes.
CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off",
             "-fno-math-errno", "-fopenmp")


def compiler() -> str | None:
    """The C++ compiler: $CXX, else g++, else c++ on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def isas() -> list[tuple[str, list[str]]]:
    """(name, extra flags) of each instruction set cpu_step.cpp is compiled for."""
    out = [("generic", [])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        out.append(("avx2", ["-mavx2"]))
    return out


def target_name() -> str:
    return f"_cpu{sysconfig.get_config_var('EXT_SUFFIX')}"


def commands(cxx: str, src: Path, build: Path, target: Path, pybind11_include: str):
    """The compile commands (one per object, independent) and the link command."""
    include = [f"-I{pybind11_include}", f"-I{sysconfig.get_paths()['include']}", f"-I{src}"]
    compiles, objects = [], []
    have = []
    for name, extra in isas():
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


def _ninja_path(path) -> str:
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def build(src: Path, build_dir: Path, target: Path, pybind11_include: str) -> None:
    """Compile the extension into ``target``, with ninja when it is on PATH, else with
    the compiles started together; raises RuntimeError naming the failed command."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler ($CXX, g++ or c++ on PATH)")
    # ninja -C runs in build_dir: relative paths would name files there.
    src, build_dir, target = Path(src).resolve(), Path(build_dir).resolve(), Path(target).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    compiles, link = commands(cxx, src, build_dir, target, pybind11_include)
    ninja = shutil.which("ninja")
    if ninja is not None:
        lines = ["ninja_required_version = 1.3", "rule run", "  command = $cmd"]
        for cmd in [*compiles, link]:
            out = cmd[-1]
            inputs = [c for c in cmd[:-2] if c.endswith((".cpp", ".o"))]  # before "-o out"
            lines += [f"build {_ninja_path(out)}: run {' '.join(map(_ninja_path, inputs))}",
                      f"  cmd = {' '.join(cmd)}"]
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        result = subprocess.run([ninja, "-C", str(build_dir)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError("compiling rlvr_optim._cpu failed (ninja -C "
                               f"{build_dir}):\n{(result.stdout + result.stderr)[-3000:]}")
        return
    running = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for cmd in compiles]
    failures = []
    for cmd, proc in zip(compiles, running):
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{' '.join(cmd)}\n{out[-2000:]}")
    if failures:
        raise RuntimeError("compiling rlvr_optim._cpu failed:\n" + "\n".join(failures))
    result = subprocess.run(link, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"linking rlvr_optim._cpu failed: {' '.join(link)}\n"
                           f"{result.stderr[-2000:]}")
