"""bench/static_report.py: the SASS path analysis on hand-written code, and the static budget
of DESIGN.md's performance model checked on the report for sm_90.

The budget (tracking "step"): at most 90 SASS instructions per element in the default mode
and 105 with stochastic rounding (the same for float16 params: "fp16", "fp16-stochastic"), no spill bytes, no global access narrower than 8 bytes on
the steady-state path. A (backend, mode) not yet within it is an xfail(strict=True) that
names its number, so the test turns red the day it is fixed and the mark must go.

The report runs in a subprocess without TRITON_INTERPRET (Triton's compiler is needed for
its rows); compiled kernels are cached by source hash, so only a first run pays for nvcc.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("static_report", ROOT / "bench" / "static_report.py")
S = importlib.util.module_from_spec(_spec)
sys.modules["static_report"] = S  # dataclasses look their module up there
_spec.loader.exec_module(S)

# float16 storage is held to the bf16 budgets of the same layouts (issue #37).
BUDGET = {"default": 90, "stochastic": 105, "stochastic-fp32-states": 105,
          "fp16": 90, "fp16-stochastic": 105, "fp16-stochastic-fp32-states": 105}
# (backend, mode) over budget today: (the number the report gives, the issue that tracks
# it). float16 (issue #37, nvcc 13.0 and Triton 3.9, sm_90): decoding a float16 param
# exactly (its NaN payload kept) and rounding float16 subnormals stochastically take more
# than bf16's shifts (bf16's rows on the same compilers: cuda 88.3 / 100.3, triton
# 84.1 / 99.0; triton fp16 nearest is 89.8, within).
OVER_BUDGET: dict[tuple[str, str], tuple[float, str]] = {
    ("cuda", "fp16"): (94.6, "issue #37"),
    ("cuda", "fp16-stochastic"): (114.4, "issue #37"),
    ("triton", "fp16-stochastic"): (127.2, "issue #37"),
    ("triton", "fp16-stochastic-fp32-states"): (123.5, "issue #37"),
}


# ---------------------------------------------------------------------------------------
# The path analysis, on SASS written here.
# ---------------------------------------------------------------------------------------


def _sass(lines: list[str]) -> str:
    """cuobjdump-style text from instructions at 16-byte steps."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {text} ;"
                     f"   /* 0x0000000000000000 */" for i, text in enumerate(lines))


# A loop (0x20 .. 0x140) whose body chooses between one vector load and two element loads,
# holds a division with an out-of-line slow path (a CALL) and an optional bitmap store;
# before it, a setup loop without vector accesses.
LOOP = [
    "S2R R0, SR_TID.X",                       # 0x00
    "@P0 BRA 0x0",                            # 0x10 setup loop: no vector access
    "ISETP.NE.AND P1, PT, R0, RZ, PT",        # 0x20 loop head
    "@P1 BRA 0x60",                           # 0x30
    "LDG.E.U16 R2, desc[UR4][R4.64]",         # 0x40 element-wise path (one load here)
    "BRA 0x70",                               # 0x50
    "LDG.E.128 R8, desc[UR4][R6.64]",         # 0x60 vector path
    "MUFU.RCP R1, R2",                        # 0x70
    "@!P2 BRA 0xb0",                          # 0x80 fast division: skip the call
    "CALL.REL.NOINC 0x400",                   # 0x90 slow path
    "MOV R1, R0",                             # 0xa0
    "FMUL R1, R1, R3",                        # 0xb0
    "@!P3 BRA 0xe0",                          # 0xc0 no bitmap: skip its store
    "STG.E.64 desc[UR4][R10.64], R12",        # 0xd0
    "STG.E.128 desc[UR4][R6.64], R8",         # 0xe0
    "IADD3 R0, R0, 0x1, RZ",                  # 0xf0
    "NOP",                                    # 0x100
    "ISETP.LT.AND P4, PT, R0, R5, PT",        # 0x110
    "IADD3 R5, R5, -0x1, RZ",                 # 0x120
    "@P4 BRA 0x20",                           # 0x130 back edge
    "EXIT",                                   # 0x140
    "BRA 0x150",                              # 0x150
]


def test_parse_sass_reads_opcodes_targets_and_widths():
    code = S.parse_sass(_sass(LOOP))
    assert [ins.address for ins in code[:3]] == [0, 16, 32]
    assert (code[1].base, code[1].target, code[1].conditional) == ("BRA", 0, True)
    assert (code[9].base, code[9].target) == ("CALL", 0x400)
    assert [code[i].global_bytes() for i in (4, 6, 13, 14, 7)] == [2, 16, 8, 16, 0]
    # "BRA P1, target" is conditional without a guard; a plain BRA is not.
    two = S.parse_sass(_sass(["BRA P1, 0x40", "BRA 0x40"]))
    assert [i.conditional for i in two] == [True, False]
    assert two[0].target == 0x40


def test_steady_state_path_takes_vector_fast_path_and_counts_optional_stores():
    path = S.steady_state_path(S.parse_sass(_sass(LOOP)))
    assert path.span == (0x20, 0x130)
    # Head (2), vector load .. branch (3), skip the call, FMUL + branch (2), bitmap store (1),
    # vector store .. back edge (5 without the NOP).
    assert path.instructions == 2 + 3 + 2 + 1 + 5
    assert path.accesses == [(16, True), (8, False), (16, False)]


# A software-pipelined loop: the first tile's loads before it, the next tile's at its head,
# inside a loop over tensors; the outer loop holds more vector accesses, the inner one is
# the steady state.
PIPELINED = [
    "S2R R0, SR_TID.X",                         # 0x00 next tensor
    "LDG.E.128 R8, desc[UR4][R6.64]",           # 0x10 prologue: the first tile's loads
    "LDG.E.128 R12, desc[UR4][R6.64+0x10]",     # 0x20
    "LDG.E.128 R16, desc[UR4][R6.64+0x800]",    # 0x30 loop head: the next tile's loads
    "FADD R1, R8, R12",                         # 0x40
    "STG.E.128 desc[UR4][R6.64], R8",           # 0x50
    "@P0 BRA 0x30",                             # 0x60 back edge
    "@P1 BRA 0x0",                              # 0x70 tensor loop's back edge
    "EXIT",                                     # 0x80
]


def test_steady_state_path_of_a_pipelined_loop_is_the_inner_loop():
    path = S.steady_state_path(S.parse_sass(_sass(PIPELINED)))
    assert path.span == (0x30, 0x60)
    assert path.instructions == 4
    assert path.accesses == [(16, True), (16, False)]


def test_steady_state_path_without_vector_loop_is_an_error():
    with pytest.raises(ValueError, match="no loop with 16-byte global accesses"):
        S.steady_state_path(S.parse_sass(_sass(["LDG.E.128 R8, desc[UR4][R6.64]", "EXIT"])))


# Four 16-byte loads (default layout: 8 elements), math, one 4-byte store, back edge.
ROW_LOOP = [
    "LDG.E.128 R8, desc[UR4][R6.64]",
    "LDG.E.128.CONSTANT R12, desc[UR4][R6.64+0x10]",
    "LD.E.128 R16, desc[UR4][R6.64+0x20]",
    "LD.E.128 R20, desc[UR4][R6.64+0x30]",
    "FADD R1, R1, R2",
    "ST.E desc[UR4][R6.64], R8",
    "@P0 BRA 0x0",
    "EXIT",
]
PTXAS = ("ptxas info    : Used 40 registers, used 1 barriers\n"
         "    0 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n")


def test_cuda_row_reads_ptxas_and_divides_by_the_elements_of_its_loads():
    row = S.cuda_row("default", "step", PTXAS, _sass(ROW_LOOP))
    assert set(row) == set(S.KEYS)
    assert (row["backend"], row["mode"], row["tracking"]) == ("cuda", "default", "step")
    assert (row["registers"], row["spill_bytes"]) == (40, 12)
    assert row["instructions_per_element"] == round(7 / 8, 1)
    assert row["narrowest_access_bytes"] == 4
    # fp32 needs eight 16-byte loads per 8 elements: four cannot be a whole iteration.
    with pytest.raises(ValueError, match="not a multiple of the layout's 8 per 8 elements"):
        S.cuda_row("fp32", "step", PTXAS, _sass(ROW_LOOP))
    with pytest.raises(ValueError, match="no register or spill line"):
        S.cuda_row("default", "step", "ptxas info: nothing\n", _sass(ROW_LOOP))


def test_vector_loads_per_8_follow_the_layout():
    assert S.vector_loads_per_8("default") == 4
    assert S.vector_loads_per_8("fp32-states") == 6
    assert S.vector_loads_per_8("master") == 8
    assert S.vector_loads_per_8("remainder") == 7
    assert S.vector_loads_per_8("fp32") == 8
    assert S.vector_loads_per_8("fp16") == 4
    assert S.vector_loads_per_8("fp16-master") == 8
    assert S.vector_loads_per_8("fp32-fp16-image") == 8


# ---------------------------------------------------------------------------------------
# The budget, on the real report.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_rows():
    """{(backend, mode): row} of the report for the budgeted modes, tracking "step"."""
    if shutil.which("nvcc") is None or S.cuobjdump_path() is None:
        pytest.skip("the static report needs nvcc and cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(ROOT / "bench" / "static_report.py"), "--json",
               "--track", "step", *(f"--mode={mode}" for mode in BUDGET)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    for row in rows:
        assert set(row) >= set(S.KEYS), row
        assert row["tracking"] == "step"
    return {(row["backend"], row["mode"]): row for row in rows}


def _case(backend, mode):
    over = OVER_BUDGET.get((backend, mode))
    marks = [] if over is None else [pytest.mark.xfail(
        strict=True, reason=f"over budget: {over[0]} instr/elem, {over[1]}")]
    return pytest.param(backend, mode, marks=marks, id=f"{backend}-{mode}")


def _budget_row(budget_rows, backend, mode):
    assert (backend, mode) in budget_rows, (
        f"the report has no {backend} row for mode {mode!r} (rows: {sorted(budget_rows)}); "
        f"static_rows must use the mode names of static_report.MODES")
    row = budget_rows[(backend, mode)]
    if row.get("unavailable"):
        pytest.skip(f"{backend} rows unavailable: {row['unavailable']}")
    return row


@pytest.mark.parametrize("backend,mode", [_case(b, m) for b in ("cuda", "triton") for m in BUDGET])
def test_static_budget_sm90_tracking_step(budget_rows, backend, mode):
    row = _budget_row(budget_rows, backend, mode)
    assert row["spill_bytes"] == 0, row
    assert row["instructions_per_element"] <= BUDGET[mode], row


@pytest.mark.parametrize("backend,mode", [
    pytest.param(b, m, id=f"{b}-{m}") for b in ("cuda", "triton") for m in BUDGET])
def test_no_global_access_narrower_than_8_bytes_sm90_tracking_step(budget_rows, backend, mode):
    row = _budget_row(budget_rows, backend, mode)
    assert row["narrowest_access_bytes"] >= 8, row
