"""setup.py: which extensions an install builds, decided without torch, and the build cache
that lets a later install (an extra added) reuse what an earlier one compiled.

setup.py runs in a subprocess with ``setuptools.setup`` recorded instead of run, PATH
holding only stand-in tools (an ``nvcc``, an ``nvidia-smi`` that lists a GPU or fails, the
C++ compiler), and the torch version setup.py can see set by the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_GPU_NODE = any(p.name[len("nvidia"):].isdigit() for p in Path("/dev").glob("nvidia*"))

_RUNNER = """
import importlib.metadata, json, runpy, setuptools, sys
torch_version = sys.argv[1]
real = importlib.metadata.version
def version(name):
    if name == "torch":
        if torch_version == "none":
            raise importlib.metadata.PackageNotFoundError(name)
        return torch_version
    return real(name)
importlib.metadata.version = version
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)
sys.argv = ["setup.py"]
try:
    runpy.run_path("setup.py", run_name="__main__")
except SystemExit as exc:
    print(json.dumps({"exit": str(exc)}))
else:
    print(json.dumps({"built": [e.name for e in captured["ext_modules"]]}))
"""


def _tools(tmp_path: Path, nvcc: bool, smi: str | None) -> Path:
    """A bin folder: the C++ compiler, and stand-ins for nvcc and nvidia-smi."""
    folder = tmp_path / "bin"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is not None:
        (folder / "g++").symlink_to(cxx)
    scripts = {}
    if nvcc:
        scripts["nvcc"] = "echo 'Cuda compilation tools, release 13.0'"
    if smi == "gpu":
        scripts["nvidia-smi"] = "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)'"
    elif smi == "fails":
        scripts["nvidia-smi"] = "echo 'NVIDIA-SMI has failed: no driver' >&2; exit 9"
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def _setup(tmp_path, *, nvcc=True, smi=None, torch="none", **env) -> dict:
    folder = _tools(tmp_path, nvcc, smi)
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("RLVR_OPTIM_") and k != "CXX"}
    environment.update(PATH=str(folder), RLVR_OPTIM_CACHE=str(tmp_path / "cache"), **env)
    done = subprocess.run([sys.executable, "-c", _RUNNER, torch], capture_output=True,
                          text=True, cwd=ROOT, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cuda(result: dict) -> bool:
    return "rlvr_optim._C" in result["built"]


@pytest.mark.parametrize("torch_version", ["2.11.0+cu128", "2.11.0", "none"])
def test_cuda_extension_is_built_where_a_gpu_can_use_it(tmp_path, torch_version):
    """nvcc and a GPU, and a torch that is no CPU-only build (or none visible, as in an
    isolated build): built."""
    assert _cuda(_setup(tmp_path, smi="gpu", torch=torch_version))


def test_cuda_extension_is_not_built_for_a_cpu_only_torch(tmp_path):
    assert not _cuda(_setup(tmp_path, smi="gpu", torch="2.13.0+cpu"))


@pytest.mark.skipif(_GPU_NODE, reason="this machine has a GPU device node")
@pytest.mark.parametrize("smi", [None, "fails"])
def test_cuda_extension_is_not_built_without_a_gpu_unless_asked(tmp_path, smi):
    assert not _cuda(_setup(tmp_path, smi=smi))
    assert _cuda(_setup(tmp_path, smi=smi, RLVR_OPTIM_BUILD_CUDA="1"))
    assert not _cuda(_setup(tmp_path, smi=smi, torch="2.13.0+cpu"))


def test_skip_wins_and_asking_without_nvcc_says_why(tmp_path):
    assert not _cuda(_setup(tmp_path, smi="gpu", RLVR_OPTIM_SKIP_CUDA_BUILD="1"))
    assert not _cuda(_setup(tmp_path, smi="gpu", RLVR_OPTIM_SKIP_CUDA_BUILD="1",
                            RLVR_OPTIM_BUILD_CUDA="1"))
    assert not _cuda(_setup(tmp_path, nvcc=False, smi="gpu"))
    assert "nvcc is not on PATH" in _setup(tmp_path, nvcc=False, RLVR_OPTIM_BUILD_CUDA="1")["exit"]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="no C++ compiler")
def test_cpu_extension_follows_the_compiler_and_its_switch(tmp_path):
    assert "rlvr_optim._cpu" in _setup(tmp_path)["built"]
    assert "rlvr_optim._cpu" not in _setup(tmp_path, RLVR_OPTIM_SKIP_CPU_BUILD="1")["built"]


_CACHE_RUNNER = """
import json, runpy, setuptools, sys
from pathlib import Path
setuptools.setup = lambda **kw: None
ns = runpy.run_path("setup.py", run_name="__main__")
tmp = Path(sys.argv[1])
source = tmp / "kernel.cu"
calls = []
def build(target):
    calls.append(str(target))
    target.write_bytes(b"built from " + source.read_bytes())
results = []
for text in (b"one", b"one", b"two"):
    source.write_bytes(text)
    out = tmp / f"build{len(results)}" / "_C.so"  # a fresh build folder each time, as pip's
    out.parent.mkdir()
    key = ns["build_key"]([source], ["-O3"], "nvcc 13.0")
    ns["cached_build"]("rlvr_optim._C", key, out, build)
    results.append([key, out.read_bytes().decode(), len(calls)])
print(json.dumps(results))
"""


def test_build_cache_reuses_an_extension_built_from_the_same_sources(tmp_path):
    """pip builds each install in a fresh folder: the second build of the same sources and
    recipe copies the cached module; changed sources build again."""
    environment = {**os.environ, "RLVR_OPTIM_CACHE": str(tmp_path / "cache"),
                   "RLVR_OPTIM_SKIP_CUDA_BUILD": "1", "RLVR_OPTIM_SKIP_CPU_BUILD": "1"}
    done = subprocess.run([sys.executable, "-c", _CACHE_RUNNER, str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=environment,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (key1, out1, calls1), (key2, out2, calls2), (key3, out3, calls3) = json.loads(
        done.stdout.strip().splitlines()[-1])
    assert (calls1, calls2, calls3) == (1, 1, 2)
    assert key1 == key2 != key3
    assert out1 == out2 == "built from one" and out3 == "built from two"
    kept = list((tmp_path / "cache" / "build" / "rlvr_optim._C").glob("*/*.so"))
    assert len(kept) == 2 and not list((tmp_path / "cache").rglob("*.tmp"))
