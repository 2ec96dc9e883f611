"""The Triton table kernel's code, checked without a GPU: cross-compiled for sm_90 and
sm_80 (Triton bundles LLVM and ptxas), its full-block path must use 8- or 16-byte global
accesses for every element stream, no local memory, and registers that leave room for
several 256-thread programs per SM. Speed itself is measured only by the benchmark.

The compile runs in a subprocess: this test process has ``TRITON_INTERPRET=1`` on a CPU
machine (conftest), under which the kernels are interpreted functions.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
if not os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")):
    pytest.skip("this triton has no NVIDIA backend to compile for", allow_module_level=True)

from rlvr_optim.triton_kernels import codegen  # noqa: E402

# 65536 registers per SM; at most 128 per thread keeps at least two 256-thread programs
# resident (the default has 8 warps). Today's kernels use 72-80 (triton 3.9).
MAX_REGISTERS = 128


def _codegen(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "rlvr_optim.triton_kernels.codegen", "--json", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def sm90():
    return _codegen("--arch", "90")


@pytest.mark.parametrize("mode", list(codegen.MODES))
def test_full_blocks_use_vector_accesses_for_every_stream(sm90, mode):
    r = sm90[mode]
    reads, writes = r["streams"]
    assert codegen.vector_accesses(r["loads"]) >= reads, r["loads"]
    assert codegen.vector_accesses(r["stores"]) >= writes, r["stores"]


@pytest.mark.parametrize("mode", list(codegen.MODES))
def test_no_local_memory_and_registers_in_bounds(sm90, mode):
    r = sm90[mode]
    assert r["local"] == 0
    if r["registers"] is None:
        pytest.skip("no cuobjdump in this triton to read the resource usage")
    assert r["stack"] == 0, r
    assert r["registers"] <= MAX_REGISTERS, r


def test_sm80_compiles_to_the_same_vector_accesses():
    r = _codegen("--arch", "80", "--mode", "bf16", "--mode", "master")
    for mode in ("bf16", "master"):
        reads, writes = r[mode]["streams"]
        assert codegen.vector_accesses(r[mode]["loads"]) >= reads, r[mode]
        assert codegen.vector_accesses(r[mode]["stores"]) >= writes, r[mode]
        assert r[mode]["local"] == 0


def test_negative_control_unaligned_pointers_get_no_vector_accesses():
    """The counts above come from the alignment the host vouches for: without it, pointers
    read from the table tell the compiler nothing and every access is one element wide."""
    r = _codegen("--unaligned", "--mode", "bf16")["bf16"]
    assert codegen.vector_accesses(r["loads"]) == 0, r["loads"]
    assert codegen.vector_accesses(r["stores"]) == 0, r["stores"]


def test_codegen_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        codegen.compile_table_kernel(codegen.MODES["bf16"], 1024, 8)
