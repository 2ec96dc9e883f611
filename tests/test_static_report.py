"""bench/static_report.py: the SASS reading on hand-written code and on small known Triton
kernels, and the static budget of DESIGN.md's performance model checked on every row of the
report for sm_90: CUDA, the installed Triton and the GPU machine's Triton (3.6.0).

The budget: no spill bytes; no more programs launched per SM than fit there; on tracking
"step" loads that overlap the math, and at most 90 SASS instructions per element in the
default mode and 105 with stochastic rounding (the same for float16 params: "fp16",
"fp16-stochastic"); full chunks load 16 bytes per access and touch nothing narrower than 8
(the change-bitmap word). A row not yet within it is an xfail(strict=True) that names what
the report measured and the issue that tracks it, so the test turns red the day it is
fixed and the mark must go.

The report runs in a subprocess without TRITON_INTERPRET (Triton's compiler is needed for
its rows); triton==3.6.0 is installed once into the cache (``pip install --target``), and
compiled kernels and rows are cached by source hash, so only a first run pays for them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("static_report", ROOT / "bench" / "static_report.py")
S = importlib.util.module_from_spec(_spec)
sys.modules["static_report"] = S  # dataclasses look their module up there
_spec.loader.exec_module(S)

# The Triton the GPU machine runs (DESIGN.md, performance model), beside the installed one.
GPU_MACHINE_TRITON = "3.6.0"
# float16 storage is held to the bf16 budgets of the same layouts (issue #37).
BUDGET = {"default": 90, "stochastic": 105, "stochastic-fp32-states": 105,
          "fp16": 90, "fp16-stochastic": 105, "fp16-stochastic-fp32-states": 105}


def _without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# ---------------------------------------------------------------------------------------
# SASS parsing and the CUDA loop path, on SASS written here.
# ---------------------------------------------------------------------------------------


def _sass(lines: list[str]) -> str:
    """cuobjdump-style text from instructions at 16-byte steps."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {text} ;"
                     f"   /* 0x0000000000000000 */" for i, text in enumerate(lines))


def _path(lines: list[str]) -> list:
    return S.parse_sass(_sass(lines))


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


def test_parse_sass_reads_opcodes_targets_widths_and_registers():
    code = S.parse_sass(_sass(LOOP))
    assert [ins.address for ins in code[:3]] == [0, 16, 32]
    assert (code[1].base, code[1].target, code[1].conditional) == ("BRA", 0, True)
    assert (code[9].base, code[9].target) == ("CALL", 0x400)
    assert [code[i].global_bytes() for i in (4, 6, 13, 14, 7)] == [2, 16, 8, 16, 0]
    # "BRA P1, target" is conditional without a guard; a plain BRA is not.
    two = _path(["BRA P1, 0x40", "BRA 0x40"])
    assert [i.conditional for i in two] == [True, False]
    assert two[0].target == 0x40
    # A load writes as many registers as it moves words; an address pair names two; a wide
    # store's data register stands for the registers it stores.
    load, store, math = _path(["@P0 LDG.E.128 R8, desc[UR4][R6.64]",
                               "STG.E.64 desc[UR4][R2.64], R20", "FADD R1, R31, -R4"])
    assert (load.guarded, load.is_load, load.destination()) == (True, True, {8, 9, 10, 11})
    assert load.registers() == {8, 6, 7}
    assert store.registers() == {2, 3, 20, 21} and store.destination() == set()
    assert math.registers() == {1, 31, 4}


def test_steady_state_path_moving_most_bytes_takes_vector_path_and_optional_stores():
    path = S.steady_state_path(S.parse_sass(_sass(LOOP)))
    assert path.span == (0x20, 0x130)
    # Head (2), vector load .. branch (3), skip the call, FMUL + branch (2), bitmap store (1),
    # vector store .. back edge (5 without the NOP).
    assert path.instructions == 2 + 3 + 2 + 1 + 5
    assert path.accesses == [(16, True), (8, False), (16, False)]


def test_steady_state_path_takes_the_accesses_the_mode_executes():
    """Given the accesses one group executes, the path holds exactly those: without the
    bitmap store it skips that block; a group that no path executes is an error."""
    code = S.parse_sass(_sass(LOOP))
    without = S.steady_state_path(code, Counter({(16, True): 1, (16, False): 1}))
    assert without.instructions == 2 + 3 + 2 + 5 and without.groups == 1
    assert sorted(without.accesses) == [(16, False), (16, True)]
    with_bitmap = S.steady_state_path(code, Counter({(16, True): 1, (16, False): 1,
                                                     (8, False): 1}))
    assert with_bitmap.instructions == 2 + 3 + 2 + 1 + 5
    with pytest.raises(ValueError, match="no path of the steady-state loop executes exactly"):
        S.steady_state_path(code, Counter({(16, True): 2, (16, False): 1}))


# The CUDA kernel's shape: a predicated freeze-mask load that runs only with a mask, a
# branch between a specialised path (every element trained) and a general one, a
# cumulative-bitmap read-modify-write behind a branch, and two tiles per pass (unrolled).
OPTIONAL = [
    "LDG.E.128 R8, desc[UR4][R2.64]",         # 0x00 loop head: tile A's vector
    "@P0 LDG.E.64 R12, desc[UR4][R4.64]",     # 0x10 freeze mask, only with one
    "@!P1 BRA 0x50",                          # 0x20 every element trained?
    "FADD R8, R8, R9",                        # 0x30 general path: one more instruction
    "FSEL R8, R8, R9, P2",                    # 0x40
    "FMUL R8, R8, R9",                        # 0x50 the join
    "STG.E.128 desc[UR4][R2.64], R8",         # 0x60
    "@P3 STG.E.64 desc[UR4][R6.64], R14",     # 0x70 change bitmap (one lane in eight)
    "@!P4 BRA 0xb0",                          # 0x80 no cumulative bitmap: skip it
    "LDG.E.64 R16, desc[UR4][R6.64]",         # 0x90
    "STG.E.64 desc[UR4][R6.64], R16",         # 0xa0
    "LDG.E.128 R20, desc[UR4][R2.64+0x10]",   # 0xb0 tile B
    "FMUL R20, R20, R21",                     # 0xc0
    "STG.E.128 desc[UR4][R2.64+0x10], R20",   # 0xd0
    "@P3 STG.E.64 desc[UR4][R6.64+0x8], R22",  # 0xe0
    "@P5 BRA 0x0",                            # 0xf0 back edge
    "EXIT",                                   # 0x100
]


def test_steady_state_path_counts_what_tracking_step_executes():
    """Tracking "step" without freeze mask or cumulative bitmap: the freeze-mask load is
    off (its predicate), the cumulative read-modify-write is skipped, the bitmap store is
    on; of the two compute paths the shorter is the one without per-element selects."""
    code = S.parse_sass(_sass(OPTIONAL))
    step = S.steady_state_path(code, Counter({(16, True): 1, (16, False): 1, (8, False): 1}))
    assert step.groups == 2
    assert [ins.address for ins in step.code] == [
        0x00, 0x10, 0x20, 0x50, 0x60, 0x70, 0x80, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0]
    # Tracking off: the bitmap stores are guarded, so they are off too.
    off = S.steady_state_path(code, Counter({(16, True): 1, (16, False): 1}))
    assert off.groups == 2 and off.instructions == step.instructions
    # The path moving the most bytes takes the freeze mask and the cumulative bitmap, which
    # tracking "step" never executes (the report counted them so before).
    most = S.steady_state_path(code)
    assert Counter(most.accesses)[(8, True)] == 2
    assert most.instructions == step.instructions + 2


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


# Four 16-byte loads (default layout: 8 elements), math, stores of param and both states,
# the bitmap word, back edge.
ROW_LOOP = [
    "LDG.E.128 R8, desc[UR4][R6.64]",
    "LDG.E.128.CONSTANT R12, desc[UR4][R6.64+0x10]",
    "LD.E.128 R16, desc[UR4][R6.64+0x20]",
    "LD.E.128 R20, desc[UR4][R6.64+0x30]",
    "FADD R1, R8, R12",
    "FMUL R2, R16, R20",
    "STG.E.128 desc[UR4][R6.64], R8",
    "STG.E.128 desc[UR4][R6.64+0x10], R16",
    "STG.E.128 desc[UR4][R6.64+0x20], R20",
    "@P1 STG.E.64 desc[UR4][R6.64+0x40], R2",
    "@P0 BRA 0x0",
    "EXIT",
]
PTXAS = ("ptxas info    : Used 40 registers, used 1 barriers, 8 bytes smem\n"
         "    0 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n")


def test_cuda_row_reads_ptxas_and_divides_by_the_elements_of_its_loads():
    row = S.cuda_row("default", "step", PTXAS, _sass(ROW_LOOP))
    assert set(row) == set(S.KEYS)
    assert (row["backend"], row["triton_version"], row["mode"], row["tracking"]) == (
        "cuda", None, "default", "step")
    assert (row["registers"], row["spill_bytes"]) == (40, 12)
    assert row["instructions_per_element"] == round(11 / 8, 1)
    assert (row["narrowest_access_bytes"], row["narrowest_load_bytes"],
            row["widest_access_bytes"]) == (8, 16, 16)
    # 40 registers x 256 threads: 6 blocks by registers, 8 by warps; the launcher asks
    # the runtime for the same number.
    assert row["resident_per_sm"] == row["launched_per_sm"] == 6
    assert row["loads_overlap_math"] is False  # each load is used right away
    # Tracking off executes no bitmap store: the guarded one is off, same instructions.
    assert S.cuda_row("default", "off", PTXAS, _sass(ROW_LOOP))["instructions_per_element"] \
        == row["instructions_per_element"]
    # fp32 needs eight 16-byte loads per 8 elements: four cannot be a whole iteration.
    with pytest.raises(ValueError, match="no path of the steady-state loop executes exactly"):
        S.cuda_row("fp32", "step", PTXAS, _sass(ROW_LOOP))
    with pytest.raises(ValueError, match="no register or spill line"):
        S.cuda_row("default", "step", "ptxas info: nothing\n", _sass(ROW_LOOP))


def test_layout_accesses_follow_the_modes():
    assert S.vector_loads_per_8("default") == 4
    assert S.vector_loads_per_8("fp32-states") == 6
    assert S.vector_loads_per_8("master") == 6  # bf16 states, as AdamW launches it
    assert S.vector_loads_per_8("remainder") == 5
    assert S.vector_loads_per_8("fp32") == 8
    assert S.vector_loads_per_8("fp16") == 4
    assert S.vector_loads_per_8("fp16-master") == 8  # float16 params: fp32 states
    assert S.vector_loads_per_8("fp32-fp16-image") == 8
    assert S.executed_accesses("default", "off") == Counter({(16, True): 4, (16, False): 3})
    assert S.executed_accesses("master", "step") == Counter(
        {(16, True): 6, (16, False): 5, (8, False): 1})
    assert S.executed_accesses("fp32", "step")[(16, False)] == 6
    assert S.executed_accesses("fp16", "step") == S.executed_accesses("default", "step")


def test_the_backends_report_the_same_layouts():
    """Each mode is the same layout for CUDA (MODES) and Triton (codegen.STATIC_MODES),
    and it is what AdamW launches: bf16 params get bf16 states unless asked otherwise,
    float16 params fp32 states unless asked otherwise."""
    from rlvr_optim.triton_kernels import codegen

    assert list(codegen.STATIC_MODES) == list(S.MODES)
    for mode, (store, param16, grad16, state_bf16, half) in S.MODES.items():
        flags = codegen.STATIC_MODES[mode]
        fp16 = half == "fp16"
        assert (flags.get("PARAM_BF16", False), flags.get("GRAD_BF16", False),
                flags.get("STATE_BF16", False)) == (param16 and not fp16, grad16 and not fp16,
                                                    state_bf16), mode
        assert (flags.get("PARAM_FP16", False), flags.get("GRAD_FP16", False)) == (
            param16 and fp16, grad16 and fp16), mode
        assert flags.get("IMAGE_FP16", False) == (fp16 and not param16), mode
        assert flags.get("STOCHASTIC", False) == ("Stochastic" in store), mode
        assert flags.get("HAS_MASTER", False) == store.startswith("kMaster"), mode
        assert flags.get("HAS_REMAINDER", False) == (store == "kRemainder"), mode
        if fp16:
            assert state_bf16 == (mode in ("fp16", "fp16-stochastic")), mode
        else:
            assert state_bf16 == (param16 and "fp32-states" not in mode), mode
    assert codegen.STATIC_TRACKING["step"] == dict(HAS_CHANGE_BITMAP=True, HAS_COUNTERS=True)


# ---------------------------------------------------------------------------------------
# Load/math overlap and occupancy, on SASS written here.
# ---------------------------------------------------------------------------------------

_MATH = ["FMUL R30, R31, R32", "FADD R30, R30, R33", "MUFU.RSQ R34, R30", "FFMA R35, R34, R30, R31"]


def test_overlap_of_async_copies_depends_on_how_many_groups_the_head_leaves_outstanding():
    """Two stages as Triton compiles them: the head waits for every group (DEPBAR.LE SB0,
    0x0), and the next chunk's copies issue after this chunk's math, so they overlap
    nothing; leaving one group outstanding (three stages) waits for the copy of the chunk
    before, so each copy overlaps a whole chunk of math."""
    def loop(allowed):
        return _path([f"DEPBAR.LE SB0, {allowed}", "BAR.SYNC.DEFER_BLOCKING 0x0",
                      "LDS.128 R4, [R48]", *_MATH, "STG.E.128 desc[UR4][R2.64], R30",
                      "LDGSTS.E.128 [R48], desc[UR4][R6.64], !P0", "LDGDEPBAR",
                      "@P0 BRA 0x0"])
    assert S.loads_overlap_math(loop("0x0")) is False
    assert S.loads_overlap_math(loop("0x1")) is True
    math_flags = [i.base in S._MATH_OPS for i in loop("0x1")]
    assert S._math_in_flight(loop("0x1"), 8, math_flags) == 4
    assert S._math_in_flight(loop("0x0"), 8, math_flags) == 0
    # Waiting for the group itself later in the same pass: the math before it is in flight.
    late = _path(["LDGSTS.E.128 [R48], desc[UR4][R6.64], !P0", "LDGDEPBAR", *_MATH,
                  "DEPBAR.LE SB0, 0x0", "LDS.128 R4, [R48]", "FADD R40, R4, R5",
                  "@P0 BRA 0x0"])
    assert S.loads_overlap_math(late) is True


def test_overlap_of_register_loads_is_the_math_before_the_first_use():
    """A register-pipelined loop (the CUDA kernel's): the next tile's load issues before
    this tile's math and is first read after it; loaded and used at once: no overlap."""
    prefetch = _path(["FADD R20, R8, R9",  # this tile's value, loaded one pass before
                      "LDG.E.128 R8, desc[UR4][R2.64]", *_MATH,
                      "STG.E.128 desc[UR4][R4.64], R20", "@P0 BRA 0x0"])
    assert S.loads_overlap_math(prefetch) is True
    at_once = _path(["LDG.E.128 R8, desc[UR4][R2.64]", "FADD R20, R8, R9", *_MATH,
                     "STG.E.128 desc[UR4][R4.64], R20", "@P0 BRA 0x0"])
    assert S.loads_overlap_math(at_once) is False
    # Unrolled by two (tiles A and B per pass), each load in flight over the other tile's
    # math: that is one chunk's math, less than half of the pass's.
    unrolled = _path(["FADD R20, R8, R9", "LDG.E.128 R12, desc[UR4][R2.64+0x10]", *_MATH,
                      "FADD R21, R12, R13", "LDG.E.128 R8, desc[UR4][R2.64]", *_MATH,
                      "@P0 BRA 0x0"])
    assert S.loads_overlap_math(unrolled, chunks=2) is True
    assert S.loads_overlap_math(unrolled, chunks=1) is False
    # Only the loads given count (the CUDA rows leave out guarded loads they do not execute,
    # such as the freeze mask's).
    guarded = _path(["FADD R20, R8, R9", "LDG.E.128 R8, desc[UR4][R2.64]",
                     "@P1 LDG.E.64 R40, desc[UR4][R6.64]", "FADD R41, R40, R40", *_MATH,
                     "STG.E.128 desc[UR4][R4.64], R20", "@P0 BRA 0x0"])
    assert S.loads_overlap_math(guarded) is False
    assert S.loads_overlap_math(guarded, loads=[1]) is True


def test_overlap_refuses_a_loop_it_cannot_read():
    """Negative controls: no math, no load, or a copy nothing waits for is an error, never
    a vacuous answer. (A register load is always waited for: at the latest, its own next
    issue writes the same registers.)"""
    with pytest.raises(ValueError, match="no floating-point math"):
        S.loads_overlap_math(_path(["LDG.E.128 R8, desc[UR4][R2.64]", "IADD3 R1, R8, R9, RZ",
                                    "@P0 BRA 0x0"]))
    with pytest.raises(ValueError, match="no global load"):
        S.loads_overlap_math(_path([*_MATH, "@P0 BRA 0x0"]))
    with pytest.raises(ValueError, match="nothing on the loop path waits for"):
        S.loads_overlap_math(_path(["LDGSTS.E.128 [R48], desc[UR4][R6.64], !P0", "LDGDEPBAR",
                                    *_MATH, "@P0 BRA 0x0"]))


@pytest.mark.parametrize("registers,threads,shared,arch,blocks", [
    (128, 128, 0, 90, 4),      # the Triton grid's assumption: fits at <= 128 registers
    (129, 128, 0, 90, 3),      # rounded up to 136: 3 warps in each quarter of the file
    (168, 128, 9344, 90, 3),
    (128, 256, 8, 90, 2),      # the CUDA kernel's __launch_bounds__(256, 2)
    (168, 256, 4, 90, 1),
    (32, 128, 0, 90, 16),      # 64 warps per SM
    (16, 32, 0, 90, 32),       # 32 blocks per SM
    (32, 128, 100_000, 90, 2),  # 228 KiB of shared memory, 1 KiB reserved per block
    (32, 128, 80_000, 80, 2),  # 164 KiB on sm_80
])
def test_resident_per_sm_follows_the_occupancy_rules(registers, threads, shared, arch, blocks):
    assert S.resident_per_sm(registers, threads, shared, arch) == blocks


def test_resident_per_sm_refuses_an_unknown_arch():
    with pytest.raises(ValueError, match="no SM limits for sm_75"):
        S.resident_per_sm(32, 128, 0, 75)


# ---------------------------------------------------------------------------------------
# Small known kernels, compiled by each Triton: the reading is not vacuous.
# ---------------------------------------------------------------------------------------


def _installed_triton() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


INSTALLED_TRITON = _installed_triton()
TRITONS = [v for v in dict.fromkeys((INSTALLED_TRITON, GPU_MACHINE_TRITON)) if v]


def _has_nvidia_backend() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and spec.origin is not None and \
        (Path(spec.origin).parent / "backends" / "nvidia").is_dir()


@pytest.fixture(scope="session")
def triton_sites() -> dict[str, Path | None]:
    """{version: folder to put first on PYTHONPATH (None: the installed Triton)}; the GPU
    machine's Triton is installed into the cache on first use (needs the package index)."""
    if not _has_nvidia_backend():
        pytest.skip("the installed triton has no NVIDIA backend to compile for")
    sites: dict[str, Path | None] = {INSTALLED_TRITON: None}
    if GPU_MACHINE_TRITON not in sites:
        sites[GPU_MACHINE_TRITON] = S.install_triton(GPU_MACHINE_TRITON)
    return sites


def _env_for(site: Path | None) -> dict:
    env = _without_interpreter()
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(site), env.get("PYTHONPATH"))))
    return env


def test_install_triton_uses_the_cache_and_waits_for_another_installer(tmp_path, monkeypatch):
    """A copy in the cache is used as it is; while another process holds the cache folder's
    lock (installing), a caller waits for it, here until its patience ends."""
    from rlvr_optim import files

    monkeypatch.setenv("RLVR_OPTIM_CACHE", str(tmp_path))
    sites = S._cached_sites()
    (sites / "9.9.9" / "triton").mkdir(parents=True)
    (sites / "9.9.9" / "triton" / "__init__.py").write_text("")
    (sites / ".rlvr-optim-8.8.8.tmp" / "triton").mkdir(parents=True)  # an install under way
    (sites / ".rlvr-optim-8.8.8.tmp" / "triton" / "__init__.py").write_text("")
    assert S.install_triton("9.9.9") == sites / "9.9.9"
    assert S.cached_triton_sites() == [sites / "9.9.9"]
    with files.folder_lock(sites):
        with pytest.raises(RuntimeError, match="waited 0 s for another process"):
            S.install_triton("8.8.8", wait_s=0.1)
    with pytest.raises(ValueError, match="numbers and dots"):
        S.install_triton("3.6; rm -rf /")


@pytest.mark.parametrize("version", TRITONS)
def test_known_kernels_read_as_compiled(triton_sites, version):
    """tests/sass_controls.py's bf16 loop: 8 elements per thread load 16 bytes at once and
    4 elements 8; one stage waits for each load at once, three stages overlap the math."""
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "sass_controls.py")],
                          capture_output=True, text=True, env=_env_for(triton_sites[version]),
                          cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert found["triton_version"] == version
    plain, narrow, staged = (found["block1024-stages1"], found["block512-stages1"],
                             found["block1024-stages3"])
    assert (plain["narrowest_load_bytes"], plain["widest_access_bytes"]) == (16, 16), plain
    assert (narrow["narrowest_load_bytes"], narrow["widest_access_bytes"]) == (8, 8), narrow
    assert plain["loads_overlap_math"] is False and narrow["loads_overlap_math"] is False
    assert all(op.startswith("LDGSTS") for op in staged["loads"]), staged
    assert staged["loads_overlap_math"] is True, staged


# ---------------------------------------------------------------------------------------
# The budget, on the real report: every row of every backend and Triton version.
# ---------------------------------------------------------------------------------------


def _row_id(backend: str, version: str | None, mode: str, tracking: str) -> str:
    return " ".join(x for x in (backend, version, mode, tracking) if x)


ROWS = [("cuda", None, m, t) for m in S.MODES for t in S.TRACKINGS] + [
    ("triton", v, m, t) for v in TRITONS for m in S.MODES for t in S.TRACKINGS]

# Rows that miss a check today, as {check: {row id: what the report measured (issue)}}:
# each becomes a strict xfail. None now: every row of CUDA and of both Tritons is within
# the budget (sm_90, nvcc 13.0, Triton 3.9.0 and 3.6.0).
KNOWN: dict[str, dict[str, str]] = {}


CHECKED = {
    "spill_bytes": ROWS, "launched_per_sm": ROWS, "narrowest_load_bytes": ROWS,
    "narrowest_access_bytes": ROWS,
    "loads_overlap_math": [r for r in ROWS if r[3] == "step"],
    "instructions_per_element": [r for r in ROWS if r[3] == "step" and r[2] in BUDGET],
}


# The untracked ("off") rows the default run compiles: the negative controls' modes (the
# tracked "step" rows, every budget and the heaviest variants, are all compiled). The
# other "off" rows are checked in the exhaustive run (``pytest -m exhaustive``).
CONTROL_MODES = ("default", "stochastic", "fp16", "fp16-stochastic")


def _exhaustive_row(row) -> bool:
    return row[3] == "off" and row[2] not in CONTROL_MODES


def _params(check: str):
    params = []
    for row in CHECKED[check]:
        rid = _row_id(*row)
        known = KNOWN.get(check, {}).get(rid)
        marks = [] if known is None else [pytest.mark.xfail(
            strict=True, reason=f"{check}: {known}")]
        if _exhaustive_row(row):
            marks.append(pytest.mark.exhaustive)
        params.append(pytest.param(rid, marks=marks, id=rid.replace(" ", "-")))
    return params


def test_known_failures_name_rows_that_are_checked():
    """Every xfail mark names a row the check runs on (or a Triton not installed here)."""
    for check, rows in KNOWN.items():
        ids = {_row_id(*row) for row in CHECKED[check]}
        for rid in rows:
            assert rid in ids or (rid.startswith("triton ") and rid.split()[1] not in TRITONS), \
                (check, rid)


def _needs_every_row(session) -> bool:
    """Whether a test of this run checks a row outside the default selection."""
    outside = {_row_id(*row) for row in ROWS if _exhaustive_row(row)}
    return any(item.module.__name__ == __name__ and hasattr(item, "callspec")
               and item.callspec.params.get("rid") in outside for item in session.items)


@pytest.fixture(scope="module")
def report_rows(request, triton_sites, once_per_run) -> dict[str, dict]:
    """{row id: row} of the report, every Triton of TRITONS and CUDA when nvcc and
    cuobjdump are there: every row when a test of the run checks one outside the default
    selection (``_exhaustive_row``), else the tracked rows and the controls' untracked
    ones; made once per test run (tests/conftest.py ``once_per_run``)."""
    backends = ["triton"]
    if shutil.which("nvcc") is not None and S.cuobjdump_path() is not None:
        backends.append("cuda")
    command = [sys.executable, str(ROOT / "bench" / "static_report.py"), "--json",
               *(f"--backend={b}" for b in backends),
               *(f"--triton={site}" for site in triton_sites.values() if site is not None)]
    every = _needs_every_row(request.session)
    selections = [[]] if every else [["--track=step"], [
        "--track=off", *(f"--mode={m}" for m in CONTROL_MODES)]]

    def make():
        rows = []
        for selection in selections:
            done = subprocess.run(command + selection, capture_output=True, text=True,
                                  env=_without_interpreter(), cwd=ROOT)
            assert done.returncode == 0, done.stderr[-3000:]
            rows += json.loads(done.stdout)
        return rows

    rows = once_per_run("static-report" + ("-every-row" if every else ""), make)
    for row in rows:
        assert set(row) == set(S.KEYS), row
    return {_row_id(r["backend"], r["triton_version"], r["mode"], r["tracking"]): r
            for r in rows}


def _row(report_rows, rid):
    if rid.startswith("cuda") and not any(r.startswith("cuda") for r in report_rows):
        pytest.skip("the CUDA rows need nvcc and cuobjdump")
    assert rid in report_rows, f"the report has no row {rid!r} (rows: {sorted(report_rows)})"
    return report_rows[rid]


@pytest.mark.parametrize("rid", _params("spill_bytes"))
def test_no_spills(report_rows, rid):
    assert _row(report_rows, rid)["spill_bytes"] == 0


@pytest.mark.parametrize("rid", _params("launched_per_sm"))
def test_launched_programs_fit_on_the_sm_at_once(report_rows, rid):
    row = _row(report_rows, rid)
    assert 1 <= row["launched_per_sm"] <= row["resident_per_sm"], row


@pytest.mark.parametrize("rid", _params("loads_overlap_math"))
def test_loads_overlap_math_when_tracking(report_rows, rid):
    assert _row(report_rows, rid)["loads_overlap_math"] is True


@pytest.mark.parametrize("rid", _params("instructions_per_element"))
def test_instruction_budget_tracking_step(report_rows, rid):
    row = _row(report_rows, rid)
    assert row["instructions_per_element"] <= BUDGET[row["mode"]], row


@pytest.mark.parametrize("rid", _params("narrowest_load_bytes"))
def test_full_chunks_load_16_bytes_at_a_time(report_rows, rid):
    row = _row(report_rows, rid)
    assert row["narrowest_load_bytes"] == row["widest_access_bytes"] == 16, row


@pytest.mark.parametrize("backend,version", [("cuda", None)] + [("triton", v) for v in TRITONS])
def test_counts_respond_to_the_code_they_count(report_rows, backend, version):
    """Negative controls of the instruction count: tracking adds work to the loop of every
    layout, and so does stochastic rounding (Philox)."""
    modes = [m for m in S.MODES if _row_id(backend, version, m, "off") in report_rows]
    assert set(CONTROL_MODES) <= set(modes) or not any(
        r.startswith(backend) for r in report_rows)  # no CUDA rows: _row skips
    per = {(m, t): _row(report_rows, _row_id(backend, version, m, t))["instructions_per_element"]
           for m in modes for t in S.TRACKINGS}
    for mode in modes:  # CONTROL_MODES, every mode in the exhaustive run
        assert per[mode, "step"] > per[mode, "off"], mode
    assert per["stochastic", "off"] > per["default", "off"] + 4
    assert per["fp16-stochastic", "off"] > per["fp16", "off"] + 4


@pytest.mark.parametrize("rid", _params("narrowest_access_bytes"))
def test_no_global_access_narrower_than_8_bytes(report_rows, rid):
    """8 bytes: the change-bitmap word of 64 elements (8 threads' bytes)."""
    assert _row(report_rows, rid)["narrowest_access_bytes"] >= 8
