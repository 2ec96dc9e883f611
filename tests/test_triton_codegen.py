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


# ---------------------------------------------------------------------------------------
# The static budget (codegen.static_rows): how the SASS is read.
# ---------------------------------------------------------------------------------------


def _sass(*texts):
    return [(16 * i, text) for i, text in enumerate(texts)]


def test_steady_state_loop_is_the_largest_innermost_loop():
    sass = _sass(
        "S2R R0, SR_TID.X",                # 0x00
        "LDG.E.64 R2, desc[UR4][R4.64]",   # 0x10: outer loop head (a work item)
        "IADD3 R6, R6, 0x1, RZ",           # 0x20: inner loop head (a full chunk)
        "LDG.E.128 R8, desc[UR4][R4.64]",  # 0x30
        "FADD R8, R8, R9",                 # 0x40
        "STG.E.128 desc[UR4][R4.64], R8",  # 0x50
        "@P0 BRA 0x20",                    # 0x60: back to the inner head
        "STG.E.U8 desc[UR4][R4.64], R8",   # 0x70: the tail
        "@P1 BRA 0x10",                    # 0x80: back to the outer head
        "EXIT",                            # 0x90
        "BRA 0xa0",                        # 0xa0: the end-of-kernel self loop
    )
    assert codegen.steady_state_loop(sass) == [text for _, text in sass[2:7]]


def test_steady_state_loop_refuses_a_kernel_without_a_loop():
    """Negative control: forward branches and the end-of-kernel self loop are no loop."""
    sass = _sass("ISETP.GE.AND P0, PT, R0, 0x4, PT", "@P0 BRA 0x30", "FADD R1, R1, R2",
                 "EXIT", "BRA 0x40")
    with pytest.raises(ValueError, match="no loop"):
        codegen.steady_state_loop(sass)


@pytest.mark.parametrize("text, width", [
    ("LDG.E.128 R8, desc[UR4][R2.64]", 16),
    ("@!P0 STG.E.64 desc[UR4][R2.64+0x8], R6", 8),
    ("LDG.E R3, desc[UR4][R8.64]", 4),
    ("LDG.E.EF.64 R4, desc[UR4][R2.64]", 8),
    ("STG.E.U16 desc[UR4][R10.64], R41", 2),
    ("@P6 STG.E.U8 desc[UR4][R6.64], R5", 1),
    ("REDG.E.ADD.64.STRONG.GPU desc[UR4][R10.64], R2", None),
    ("LDS.U8 R3, [R2]", None),
])
def test_access_bytes(text, width):
    assert codegen.access_bytes(text) == width
