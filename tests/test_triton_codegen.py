"""The Triton table kernel's code, checked without a GPU: cross-compiled for sm_90 and
sm_80 (Triton bundles LLVM, ptxas and cuobjdump) and read from its SASS: the optional
bitmaps move words on full chunks, aligned pointers
give vector accesses, computed values round to bf16 by the hardware conversion, and sm_80
builds the same loop. Every layout's row (registers, spills, instructions per element,
access widths, occupancy, load/math overlap; for Triton 3.6 too) and the budget DESIGN.md
holds them to are tests/test_static_report.py's, over the same compiles; speed is measured
only by the benchmark.

The compiles run in a subprocess: this test process has ``TRITON_INTERPRET=1`` on a CPU
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


def _compiled(code: str):
    """The JSON that ``code`` (given ``codegen``) prints, run without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", "import json\nfrom rlvr_optim.triton_kernels import codegen\n"
         + code], capture_output=True, text=True, env=env, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_freeze_mask_and_cumulative_bitmap_move_words_too():
    """The other bitmaps of a full chunk are words as well; the negative control: chunks
    of 32 elements hold no whole word, so their bitmaps move a byte per thread."""
    rows = _compiled(
        "flags = dict(codegen.STATIC_MODES['default'], HAS_CHANGE_BITMAP=True,"
        " HAS_COUNTERS=True, HAS_FREEZE_MASK=True, HAS_CUMULATIVE_BITMAP=True)\n"
        "print(json.dumps([codegen.kernel_row(flags, 90),"
        " codegen.kernel_row(flags, 90, block=32, warps=1)]))")
    words, bytes_ = rows
    assert words["narrowest_access_bytes"] == 8 and words["spill_bytes"] == 0, words
    assert bytes_["narrowest_access_bytes"] == 1, bytes_


def test_negative_control_unaligned_pointers_get_one_element_accesses():
    """The widths above come from the alignment the host vouches for: without it, pointers
    read from the table tell the compiler nothing and every access is one element wide."""
    row = _compiled("print(json.dumps(codegen.kernel_row(dict(codegen.STATIC_MODES['default'],"
                    " ALIGNED=False), 90)))")
    assert row["narrowest_access_bytes"] == 2, row  # one bf16


@pytest.mark.parametrize("hardware", [True, False])
def test_computed_values_round_with_the_hardware_conversion(hardware):
    """On the GPU param, m and v round by F2FP (two values per instruction); the integer
    formula the interpreter runs (HW_BF16 off, the negative control) has none."""
    found = _compiled(
        f"k = codegen.compile_table_kernel(dict(codegen.STATIC_MODES['default'], "
        f"HW_BF16={hardware}))\n"
        "loop = codegen.steady_state_loop(codegen.sass_instructions(k.asm['cubin']))\n"
        "from rlvr_optim.triton_kernels import adamw as K\n"
        "per_thread = K.DEFAULT_BLOCK_GPU // (32 * K.DEFAULT_NUM_WARPS_GPU)\n"
        "print(json.dumps([sum(t.startswith('F2FP.BF16') for _, t in loop), per_thread]))")
    f2fp, per_thread = found
    assert f2fp == (3 * per_thread // 2 if hardware else 0), found


def test_sm80_compiles_the_same_loop_with_vector_accesses():
    """sm_80 (A100) builds the same chunk loop, bitmap words included. Its ptxas spills a
    few bytes in some layouts (codegen --arch 80 prints them), which only sm_90's budget
    rules out."""
    rows = _compiled("print(json.dumps(codegen.static_rows(80, modes=['default', 'master'], "
                     "tracking=['off', 'step'])))")
    assert len(rows) == 4
    for row in rows:
        assert row["instructions_per_element"] > 0 and row["narrowest_access_bytes"] >= 8, row


def test_codegen_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        codegen.compile_table_kernel(codegen.STATIC_MODES["default"])


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
    assert codegen.steady_state_loop(sass) == sass[2:7]


def test_hot_path_skips_slow_path_call_stubs_only():
    """The two shapes ptxas gives tl.sqrt_rn and tl.div_rn: a stub the fast path jumps
    over, before it (ending in a branch past it) or after it; a predicated branch over
    code without a call stays on the path."""
    sass = _sass(
        "@!P1 BRA 0x40",                   # 0x00: sqrt: jump over the stub to the fast path
        "MOV R10, 0x30",                   # 0x10: stub
        "CALL.REL.NOINC 0x400",            # 0x20: stub
        "BRA 0x50",                        # 0x30: stub, back past the fast path
        "FMUL.FTZ R9, R82, R119",          # 0x40: fast path
        "FCHK P1, R114, R45",              # 0x50: division
        "FFMA R36, R9, R113, R36",         # 0x60
        "@!P1 BRA 0xa0",                   # 0x70: jump over the stub
        "IMAD.MOV.U32 R9, RZ, RZ, R45",    # 0x80: stub
        "CALL.REL.NOINC 0x500",            # 0x90: stub
        "BSYNC B2",                        # 0xa0
        "@P0 BRA 0xd0",                    # 0xb0: a branch over ordinary code
        "FADD R1, R1, R2",                 # 0xc0: stays
        "STG.E.64 desc[UR4][R2.64], R4",   # 0xd0
    )
    kept = [sass[i] for i in (0, 4, 5, 6, 7, 10, 11, 12, 13)]
    assert codegen.hot_path(sass) == kept


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
    ("LDGSTS.E.64 [R48+0x8], desc[UR12][R2.64+-0x7f8], !P0", 8),
    ("STG.E.U16 desc[UR4][R10.64], R41", 2),
    ("@P6 STG.E.U8 desc[UR4][R6.64], R5", 1),
    ("REDG.E.ADD.64.STRONG.GPU desc[UR4][R10.64], R2", None),
    ("LDS.U8 R3, [R2]", None),
])
def test_access_bytes(text, width):
    assert codegen.access_bytes(text) == width
