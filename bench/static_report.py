"""What the fused kernels compile to for sm_90, on a machine without a GPU.

    python bench/static_report.py [--json] [--arch 90] [--mode M ...] [--track off|step]
        [--backend cuda|triton ...] [--triton PATH ...] [--triton-version X.Y.Z ...]
    python bench/static_report.py --all-variants [--arch 80|90] [--json]

Per kernel (backend x Triton version x mode x tracking) it reports registers, spill bytes,
SASS instructions per element of the steady-state loop, the narrowest and widest global
access on that loop's path and its narrowest load, programs resident per SM (what the
registers, warps and shared memory of the compiled kernel let fit) beside those the
launcher starts per SM, and whether the loop's loads overlap its math. DESIGN.md's
performance model sets the budget these numbers are held to (tests/test_static_report.py),
for bf16 and float16 params alike. ``--all-variants`` prints instead the registers, stack,
spill and shared-memory bytes of each of the CUDA extension's 704 kernel variants (384 bf16,
320 float16), compiled one by one (the test suite checks a representative set,
tests/test_csrc.py).

Kernels are the ones ``rlvr_optim.AdamW`` launches: "default" is bf16 params with the
default state dtype, which follows the param (bf16 states), and so are the master and
remainder rows; "fp32-states" rows are those of ``state_dtype=torch.float32``. The "fp16-"
rows have float16 params and grads, whose states AdamW makes float32 (master weights or
not) unless ``state_dtype=torch.bfloat16`` ("fp16", "fp16-stochastic");
"fp32-fp16-image" is fp32 params with ``change_dtype=torch.float16``. Tracking "step" is a
change bitmap and counters per step (no cumulative bitmap, no freeze mask); "off" is
neither.

CUDA: each kernel variant is instantiated alone in a generated ``.cu``, compiled with
``nvcc -cubin`` (the extension's device flags, ``-Xptxas -v`` for registers, spills and
shared memory) and disassembled with ``cuobjdump -sass`` (Triton's bundled copy, or any on
PATH). Compiled objects are cached by source hash under ``$RLVR_OPTIM_CACHE/static_report``.
The steady-state loop is an innermost backward branch among those whose span holds 16-byte
global accesses (of several such, the one holding the most; a loop around it also holds the
loads a software-pipelined loop issues before its first iteration). Its path is found on
the control-flow graph of that span: blocks holding a call (the out-of-line slow paths of
IEEE division and square root) or a barrier (a change of tensor) are off it. A CUDA variant
compiles every optional stream its flags allow (a freeze mask, a cumulative bitmap) behind
run-time branches and predicates, so of the paths from the loop head to the back edge only
those whose global accesses are exactly the ones the mode executes count (a predicated
access may be on or off); of those it takes the one with the fewest instructions: the
others differ by data, such as the freeze-mask byte, whose common value (all ones, the
value without a mask) has a path of its own without per-element selects.
Elements per iteration follow from the 16-byte loads on the path and the layout's 16-byte
loads per 8 elements. The launcher sizes its grid with ``cudaOccupancyMaxActiveBlocksPer
Multiprocessor`` (``launch`` in csrc/adamw_kernel.cuh), the calculation ``resident_per_sm``
repeats, so its launched count is its resident one.

Triton: the table kernel of ``rlvr_optim.triton_kernels`` compiled by
``codegen.compile_table_kernel`` at the GPU launch defaults; its loop is
``codegen.steady_state_loop`` without the slow-path stubs (``codegen.hot_path``), one chunk
of ``DEFAULT_BLOCK_GPU / (32 * warps)`` elements per thread. ``adamw()`` launches as many
programs per SM as ``programs_per_sm`` of its compiled kernel says fit (or
``DEFAULT_PROGRAMS_PER_SM`` where that is set); the report asks the same function, with the
kernel's registers, warps and shared memory and the SM limits of the arch. The rows come from every Triton it can import: the one
installed beside this Python, every copy installed in the cache by ``--triton-version``
(``$RLVR_OPTIM_CACHE/static_report/triton/``, ``pip install --target``, no dependencies)
and every folder named by ``--triton`` (a virtual environment, its site-packages, or a
``pip install --target`` folder, for this Python's version). Each compiles in its own
process, without ``TRITON_INTERPRET``, with that folder first on ``PYTHONPATH``.

Loads overlap math when every global load of the loop path has at least half of one chunk's
floating-point math issued between the load and the first instruction that waits for it:
a read or write of its destination registers, or, for ``LDGSTS`` copies to shared memory,
the ``DEPBAR.LE SB0, n`` that leaves fewer than the groups committed since it outstanding.
The walk follows the loop around, so a load issued at the end of one iteration and waited
for at the head of the next overlaps nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# mode -> (store mode of csrc/adamw_launch.h, param 16-bit, grad 16-bit, states bf16,
# 16-bit format: "bf16" or "fp16", that of a 16-bit param and grad or of an fp32 param's
# change image), as rlvr_optim.AdamW launches it: states follow a bf16 param's dtype unless
# state_dtype says otherwise, master weights or not; a float16 param's are float32 unless
# state_dtype=torch.bfloat16 ("fp16", "fp16-stochastic").
MODES = {
    "default": ("kNearest", True, True, True, "bf16"),
    "stochastic": ("kStochastic", True, True, True, "bf16"),
    "fp32-states": ("kNearest", True, True, False, "bf16"),
    "stochastic-fp32-states": ("kStochastic", True, True, False, "bf16"),
    "master": ("kMasterNearest", True, True, True, "bf16"),
    "master-stochastic": ("kMasterStochastic", True, True, True, "bf16"),
    "remainder": ("kRemainder", True, True, True, "bf16"),
    "fp32": ("kNearest", False, False, False, "bf16"),
    "fp16": ("kNearest", True, True, True, "fp16"),
    "fp16-stochastic": ("kStochastic", True, True, True, "fp16"),
    "fp16-fp32-states": ("kNearest", True, True, False, "fp16"),
    "fp16-stochastic-fp32-states": ("kStochastic", True, True, False, "fp16"),
    "fp16-master": ("kMasterNearest", True, True, False, "fp16"),
    "fp16-master-stochastic": ("kMasterStochastic", True, True, False, "fp16"),
    "fp32-fp16-image": ("kNearest", False, False, False, "fp16"),
}
# "step": per-step change bitmap and counters (the variant with tracking compiled in);
# "off": neither.
TRACKINGS = ("off", "step")
BACKENDS = ("cuda", "triton")
KEYS = ("backend", "triton_version", "mode", "tracking", "registers", "spill_bytes",
        "instructions_per_element", "narrowest_access_bytes", "narrowest_load_bytes",
        "widest_access_bytes", "resident_per_sm", "launched_per_sm", "loads_overlap_math")

# Flag bits and 16-bit formats of csrc/adamw_launch.h.
_FLAG_PARAM16, _FLAG_GRAD16, _FLAG_STATE_BF16, _FLAG_TRACK = 1, 2, 4, 16
_HALF_FORMATS = {"bf16": "kHalfBf16", "fp16": "kHalfFp16"}
# The extension's device flags (cuda_backend._NVCC_FLAGS without the host-compiler ones).
_DEVICE_FLAGS = ["-O3", "-std=c++17", "-fmad=false"]


# ---------------------------------------------------------------------------------------
# Tools.
# ---------------------------------------------------------------------------------------


def cuobjdump_path() -> str | None:
    """Triton's bundled cuobjdump, else one on PATH."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def _cache_root() -> Path:
    from rlvr_optim import cuda_backend

    return cuda_backend._cache_root() / "static_report"


# ---------------------------------------------------------------------------------------
# SASS: instructions, blocks, the steady-state loop and its path.
# ---------------------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_GLOBAL_OPS = ("LDG", "STG", "LD", "ST", "ATOMG", "ATOM", "RED", "LDGSTS")
_LOAD_OPS = ("LDG", "LD", "LDGSTS")
_STORE_OPS = ("STG", "ST")
_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16, "256": 32}
# Floating-point arithmetic: the chunk's math, as opposed to address and loop arithmetic.
_MATH_OPS = frozenset(("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK",
                       "FRND", "MUFU", "F2FP", "DADD", "DMUL", "DFMA"))
_REGISTER = re.compile(r"(?<![\w.])R(\d+)(\.64)?\b")
_DEPBAR = re.compile(r"\bSB0\s*,\s*(0x[0-9a-f]+|\d+)")


@dataclass
class Instruction:
    address: int
    text: str
    opcode: str  # with modifiers, e.g. "LDG.E.128.CONSTANT"
    operands: str
    target: int | None  # branch or call target
    conditional: bool
    guarded: bool  # "@P0 ..." / "@!P0 ...": may issue as a no-op

    @classmethod
    def of(cls, address: int, body: str) -> Instruction:
        """One instruction from its address and text (``@P0 LDG.E.128 R8, [R2.64]``)."""
        guard = body.startswith("@")
        words = body.split(None, 2 if guard else 1)
        opcode = words[1] if guard else words[0]
        operands = words[-1] if len(words) > (2 if guard else 1) else ""
        target = None
        base = opcode.split(".")[0]
        if base in ("BRA", "CALL"):
            hexes = re.findall(r"0x[0-9a-f]+", operands)
            target = int(hexes[-1], 16) if hexes else None
        # "BRA P1, target" branches on P1 as well as on its guard.
        conditional = guard or (base == "BRA" and re.match(r"!?U?P\d", operands) is not None)
        return cls(address, body, opcode, operands, target, conditional, guard)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    def global_bytes(self) -> int:
        """Bytes one thread moves to or from global memory (0: not a global access).

        Generic LD/ST count: the CUDA kernels reach global memory only through them.
        """
        if self.base not in _GLOBAL_OPS:
            return 0
        width = 4
        for part in self.opcode.split(".")[1:]:
            width = _WIDTHS.get(part, width)
        return width

    @property
    def is_load(self) -> bool:
        return self.base in _LOAD_OPS

    def registers(self) -> set[int]:
        """The general registers this instruction names (``R4.64``: R4 and R5; the data
        register of a wide store: all it covers)."""
        out = set()
        for number, pair in _REGISTER.findall(self.operands):
            out.update(range(int(number), int(number) + (2 if pair else 1)))
        if self.base in _STORE_OPS:
            data = _REGISTER.findall(self.operands.rsplit(",", 1)[-1])
            if data:
                first = int(data[-1][0])
                out.update(range(first, first + max(1, self.global_bytes() // 4)))
        return out

    def destination(self) -> set[int]:
        """The registers a global load writes (none for LDGSTS, which writes shared memory)."""
        if self.base not in ("LDG", "LD"):
            return set()
        found = _REGISTER.match(self.operands.split(",", 1)[0].strip())
        if found is None:
            return set()
        first = int(found.group(1))
        return set(range(first, first + max(1, self.global_bytes() // 4)))


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of cuobjdump -sass output (one function)."""
    return [Instruction.of(int(m.group(1), 16), m.group(2))
            for m in map(_LINE.search, text.splitlines()) if m is not None]


def _blocks(code: list[Instruction]) -> list[list[Instruction]]:
    leaders = {code[0].address} if code else set()
    for i, ins in enumerate(code):
        if ins.base == "BRA" and ins.target is not None:
            leaders.add(ins.target)
        if ins.base in ("BRA", "EXIT", "RET", "BRX", "JMX") and i + 1 < len(code):
            leaders.add(code[i + 1].address)
    blocks, current = [], []
    for ins in code:
        if ins.address in leaders and current:
            blocks.append(current)
            current = []
        current.append(ins)
    if current:
        blocks.append(current)
    return blocks


@dataclass
class LoopPath:
    instructions: int  # on the path, NOPs excluded
    accesses: list[tuple[int, bool]]  # (bytes, is a load) of each executed global access
    span: tuple[int, int]
    code: list[Instruction]  # the path's instructions, NOPs excluded
    groups: int = 1  # whole multiples of the executed accesses the path holds


Accesses = Counter  # (bytes, is a load) -> count


def steady_state_path(code: list[Instruction], executed: Accesses | None = None) -> LoopPath:
    """The path of one iteration of the steady-state loop (see the module docstring).

    ``executed``: the global accesses (bytes, is a load) one group of elements executes;
    the path's accesses must be a whole multiple of it, a predicated access counting as
    executed or not as needed. None: any path, the one moving the most global bytes.
    """
    loops = [(ins.target, ins.address) for ins in code
             if ins.base == "BRA" and ins.target is not None and ins.target <= ins.address]

    def vectors(span):
        return sum(1 for ins in code
                   if span[0] <= ins.address <= span[1] and ins.global_bytes() >= 16)

    vectored = [span for span in loops if vectors(span) > 0]
    if not vectored:
        raise ValueError("no loop with 16-byte global accesses in this kernel")
    # Innermost: a loop around the steady-state one also holds the loads before it (a
    # software-pipelined loop's prologue), so it can hold more vectors without being it.
    innermost = [s for s in vectored
                 if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in vectored)]
    head, tail = max(innermost, key=lambda s: (vectors(s), -(s[1] - s[0])))
    body = [ins for ins in code if head <= ins.address <= tail]
    blocks = _blocks(body)
    index = {b[0].address: i for i, b in enumerate(blocks)}

    def cold(block):
        return any(ins.base in ("CALL", "BAR") for ins in block)

    # Paths from the head, per block: {(certain accesses, predicated accesses): (instructions,
    # path)}, keeping the shortest of each; blocks come in address order and only forward
    # edges are followed.
    paths: list[dict] = [dict() for _ in blocks]
    paths[0][((), ())] = (0, [])
    ends: dict = {}

    def keep(table, key, value):
        if key not in table or value[0] < table[key][0]:
            table[key] = value

    for i, block in enumerate(blocks):
        if not paths[i] or cold(block):
            continue
        kept = [ins for ins in block if ins.base != "NOP"]
        last = block[-1]
        successors, back = [], False
        if last.base == "BRA" and last.target is not None:
            if last.address == tail:
                back = True
            elif last.target > last.address and last.target in index:
                successors.append(index[last.target])
            if last.conditional and i + 1 < len(blocks):
                successors.append(i + 1)
        elif last.base not in ("EXIT", "RET") or last.conditional:
            if i + 1 < len(blocks):
                successors.append(i + 1)
        for (certain, maybe), (count, path) in paths[i].items():
            sure, optional = Counter(dict(certain)), Counter(dict(maybe))
            for ins in kept:
                if ins.global_bytes():
                    (optional if ins.guarded else sure)[(ins.global_bytes(), ins.is_load)] += 1
            key = (tuple(sorted(sure.items())), tuple(sorted(optional.items())))
            value = (count + len(kept), path + kept)
            if back:
                keep(ends, key, value)
            for j in successors:
                keep(paths[j], key, value)
    if not ends:
        raise ValueError("the steady-state loop has no path from its head to its back edge")
    if executed is None:
        def moved(key):
            return sum(b * n for (b, _), n in (*key[0], *key[1]))

        count, path = ends[max(ends, key=lambda k: (moved(k), -ends[k][0]))]
        accesses = [(ins.global_bytes(), ins.is_load) for ins in path if ins.global_bytes()]
        return LoopPath(count, accesses, (head, tail), path)
    matches = []
    for (certain, maybe), (count, path) in ends.items():
        sure, optional = Counter(dict(certain)), Counter(dict(maybe))
        for groups in range(1, 65):
            need = Counter({k: n * groups for k, n in executed.items()})
            if all(sure[k] <= need[k] <= sure[k] + optional[k] for k in need) \
                    and set(sure) <= set(need):
                matches.append((count / groups, groups, count, path, need))
                break
    if not matches:
        raise ValueError(
            f"no path of the steady-state loop executes exactly {dict(executed)} per group "
            f"(paths: {[(dict(c), dict(m)) for c, m in ends]})")
    _, groups, count, path, need = min(matches, key=lambda m: m[0])
    accesses = [(b, load) for (b, load), n in sorted(need.items()) for _ in range(n)]
    return LoopPath(count, accesses, (head, tail), path, groups)


def executed_accesses(mode: str, tracking: str) -> Accesses:
    """Global accesses (bytes, is a load) of one thread's 8 elements on the vector path of
    a CUDA variant: 16-byte loads and stores of each stream, and with tracking "step" one
    8-byte store of the change bitmap (the word of 8 lanes' bytes, stored by one lane)."""
    store, param16, _, state_bf16, _ = MODES[mode]
    per = {True: 1, False: 2}  # 16 bytes of 16-bit values or of fp32 per 8 elements
    stores = per[param16] + 2 * per[state_bf16]
    if store in ("kMasterNearest", "kMasterStochastic"):
        stores += 2
    elif store == "kRemainder":
        stores += 1
    out = Counter({(16, True): vector_loads_per_8(mode), (16, False): stores})
    if tracking == "step":
        out[(8, False)] = 1
    return out


def vector_loads_per_8(mode: str) -> int:
    """16-byte global loads of one thread's 8 elements on the vector path of a layout."""
    store, param16, grad16, state_bf16, _ = MODES[mode]
    per = {True: 1, False: 2}  # 16 bytes of 16-bit values or of fp32 per 8 elements
    loads = per[param16] + per[grad16] + 2 * per[state_bf16]
    if store in ("kMasterNearest", "kMasterStochastic"):
        loads += 2
    elif store == "kRemainder":
        loads += 1
    return loads


# ---------------------------------------------------------------------------------------
# What a loop path says: access widths, load/math overlap; occupancy.
# ---------------------------------------------------------------------------------------

_LAPS = 8  # a load waited for more than this many iterations later is not understood


def _math_in_flight(path: list[Instruction], i: int, math_flags: list[bool]) -> int:
    """Floating-point instructions issued between load ``i`` of the path and the first
    instruction that waits for it, walking the loop path around."""
    load, n = path[i], len(path)
    registers = load.destination()
    committed = 0  # LDGDEPBARs since an LDGSTS: the first commits its group
    issued = 0
    for step in range(1, _LAPS * n + 1):
        other = path[(i + step) % n]
        if load.base == "LDGSTS":
            if other.base == "LDGDEPBAR":
                committed += 1
            elif other.base == "DEPBAR" and committed:
                allowed = _DEPBAR.search(other.operands)
                if allowed is not None and committed - 1 >= int(allowed.group(1), 0):
                    return issued
        elif registers & other.registers():
            return issued
        issued += math_flags[(i + step) % n]
    raise ValueError(f"nothing on the loop path waits for {load.text!r}")


def loads_overlap_math(path: list[Instruction], chunks: int = 1,
                       loads: list[int] | None = None) -> bool:
    """Whether every global load of a loop path (``loads``: their indices, default every
    one) is in flight while at least half of one chunk's floating-point math issues.

    ``chunks``: the chunks one pass over the path steps (an unrolled loop steps several).
    """
    math_flags = [ins.base in _MATH_OPS for ins in path]
    per_chunk = sum(math_flags) / chunks
    if per_chunk == 0:
        raise ValueError("no floating-point math on the loop path")
    loads = [i for i, ins in enumerate(path) if ins.is_load] if loads is None else loads
    if not loads:
        raise ValueError("no global load on the loop path")
    return all(_math_in_flight(path, i, math_flags) >= per_chunk / 2 for i in loads)


def _executed_loads(path: LoopPath) -> list[int]:
    """Indices of the loads of the path that execute: unguarded ones, and guarded ones
    of a width the executed accesses hold."""
    wanted = {b for b, load in path.accesses if load}
    return [i for i, ins in enumerate(path.code)
            if ins.is_load and (not ins.guarded or ins.global_bytes() in wanted)]


# Per-SM limits of the compute capabilities the report compiles for (CUDA C++ Programming
# Guide, "Compute Capabilities", table of technical specifications).
_SM_LIMITS = {
    80: dict(registers=65536, warps=64, blocks=32, shared=167936),
    90: dict(registers=65536, warps=64, blocks=32, shared=233472),
}


def resident_per_sm(registers: int, threads: int, shared_bytes: int, arch: int) -> int:
    """Blocks of ``threads`` that fit on one SM at once, by the occupancy calculator's rules
    (cuda_occupancy.h): registers are allocated per warp in units of 256 within each of the
    four quarters of the register file, and each block reserves 1 KiB of shared memory
    beside its own ``shared_bytes`` (static and dynamic)."""
    if arch not in _SM_LIMITS:
        raise ValueError(f"no SM limits for sm_{arch}; known: {sorted(_SM_LIMITS)}")
    limit = _SM_LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (limit["registers"] // 4 // per_warp) * 4 // warps if per_warp else limit["blocks"]
    by_warps = limit["warps"] // warps
    by_shared = limit["shared"] // (shared_bytes + 1024)
    return min(by_registers, by_warps, by_shared, limit["blocks"])


def _row(backend, triton_version, mode, tracking, registers, spill_bytes, path, *, elements,
         chunks, resident, launched, executed: LoopPath | None = None) -> dict:
    """A report row from a kernel's numbers and its loop path (``path``: instructions;
    ``executed``: the CUDA path whose accesses are those the mode executes, else every
    access of ``path`` counts)."""
    widths = [ins.global_bytes() for ins in path if ins.global_bytes()]
    loads = None
    if executed is not None:
        widths = [b for b, _ in executed.accesses]
        loads = _executed_loads(executed)
    load_widths = [path[i].global_bytes() for i in loads] if loads is not None else \
        [ins.global_bytes() for ins in path if ins.is_load]
    return {
        "backend": backend, "triton_version": triton_version, "mode": mode,
        "tracking": tracking, "registers": registers, "spill_bytes": spill_bytes,
        "instructions_per_element": round(len(path) / elements, 1),
        "narrowest_access_bytes": min(widths), "narrowest_load_bytes": min(load_widths),
        "widest_access_bytes": max(widths),
        "resident_per_sm": resident, "launched_per_sm": launched,
        "loads_overlap_math": loads_overlap_math(path, chunks, loads),
    }


# ---------------------------------------------------------------------------------------
# CUDA.
# ---------------------------------------------------------------------------------------

_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_THREADS = re.compile(r"constexpr int kThreads = (\d+);")


def _variant(mode: str, tracking: str) -> tuple[str, str, int]:
    """(16-bit format constant, store mode, flags) of a mode's kernel variant."""
    store, param16, grad16, state_bf16, half = MODES[mode]
    flags = ((_FLAG_PARAM16 if param16 else 0) | (_FLAG_GRAD16 if grad16 else 0)
             | (_FLAG_STATE_BF16 if state_bf16 else 0) | (_FLAG_TRACK if tracking == "step" else 0))
    return _HALF_FORMATS[half], store, flags


def _instantiation(half: str, store: str, flags: int) -> str:
    return ('#include "adamw_kernel.cuh"\n'
            "namespace rlvr_optim {\n"
            f"template __global__ void adamw_kernel<Variant<{half}, StoreMode::{store}, {flags}>>"
            "(const LaunchArgs);\n"
            "}\n")


def cuda_threads() -> int:
    """Threads per block of the CUDA kernel (``kThreads`` of csrc/adamw_launch.h)."""
    found = _THREADS.search((CSRC / "adamw_launch.h").read_text())
    if found is None:
        raise ValueError("csrc/adamw_launch.h defines no `constexpr int kThreads = N;`")
    return int(found.group(1))


def compile_variant(half: str, store: str, flags: int, arch: int,
                    tools: tuple[str, str, str] | None = None) -> tuple[str, str]:
    """(ptxas report, SASS) of one CUDA kernel variant (a 16-bit format constant, a
    StoreMode name of csrc/adamw_launch.h and its flag bits) alone in a cubin, cached by the
    hash of csrc/ and the command. ``tools``: (nvcc, cuobjdump, nvcc's version) as
    :func:`cuda_tools` gives."""
    nvcc, cuobjdump, version = tools or cuda_tools()
    source = _instantiation(half, store, flags)
    command = [nvcc, "-cubin", *_DEVICE_FLAGS, f"-arch=sm_{arch}", "-Xptxas", "-v",
               f"-I{CSRC}"]
    h = hashlib.sha256()
    for path in sorted([*CSRC.glob("*.cuh"), *CSRC.glob("*.h")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(repr((source, command[1:], version)).encode())
    folder = _cache_root() / h.hexdigest()[:16]
    report, sass = folder / "ptxas.txt", folder / "kernel.sass"
    if not (report.is_file() and sass.is_file()):
        # Under the folder's lock: a second process or thread asking for the same variant
        # (the test suite's workers, the report's and the ptxas checks' pools) waits for
        # this compile instead of running its own.
        from rlvr_optim.files import folder_lock

        with folder_lock(folder, wait=True):
            if not (report.is_file() and sass.is_file()):
                _compile_into(folder, source, command, cuobjdump, (half, store, flags))
    return report.read_text(), sass.read_text()


def _compile_into(folder: Path, source: str, command: list[str], cuobjdump: str,
                  variant: tuple) -> None:
    """Compile ``source`` with ``command`` into ``folder``'s ptxas.txt and kernel.sass."""
    half, store, flags = variant
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        unit, cubin = Path(tmp) / "variant.cu", Path(tmp) / "variant.cubin"
        unit.write_text(source)
        done = subprocess.run([*command, str(unit), "-o", str(cubin)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed on {half}, {store}, flags {flags}:\n"
                               f"{done.stderr}")
        dump = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True,
                              text=True, check=True)
        (Path(tmp) / "ptxas.txt").write_text(done.stdout + done.stderr)
        (Path(tmp) / "kernel.sass").write_text(dump.stdout)
        os.replace(Path(tmp) / "kernel.sass", folder / "kernel.sass")
        os.replace(Path(tmp) / "ptxas.txt", folder / "ptxas.txt")


def cuda_tools() -> tuple[str, str, str]:
    """(nvcc, cuobjdump, nvcc's version text); raises when a tool is missing."""
    from rlvr_optim import cuda_backend

    nvcc, cuobjdump = cuda_backend._nvcc(), cuobjdump_path()
    if nvcc is None or cuobjdump is None:
        raise RuntimeError("the CUDA rows need nvcc and cuobjdump (Triton bundles one; or "
                           "pip install nvidia-cuda-cuobjdump)")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return nvcc, cuobjdump, version


# Every kernel variant the extension instantiates: each 16-bit format and store mode with
# every combination of the other flag bits; fp32 params only with kNearest, and no
# remainder form in float16 (csrc/adamw_launch.h).
HALF_FORMATS = tuple(_HALF_FORMATS.values())
STORE_MODES = ("kNearest", "kStochastic", "kMasterNearest", "kMasterStochastic", "kRemainder")
FLAG_BITS = {"param16": 1, "grad16": 2, "state_bf16": 4, "amsgrad": 8, "track": 16,
             "grad_scale": 32, "l2_decay": 64}


def all_variants() -> list[tuple[str, str, int]]:
    """(16-bit format, store mode, flags) of every variant of the extension (704: 384 bf16,
    320 float16)."""
    return [(half, store, flags) for half in HALF_FORMATS for store in STORE_MODES
            for flags in range(2 * max(FLAG_BITS.values()))
            if (flags & FLAG_BITS["param16"] or store == "kNearest")
            and not (half == "kHalfFp16" and store == "kRemainder")]


def variant_resources(report: str) -> dict:
    """Registers, stack frame, spill and shared-memory bytes of a ptxas -v report of one
    kernel."""
    frame = re.search(r"(\d+) bytes stack frame", report)
    spills, registers = _PTXAS.search(report), _REGISTERS.search(report)
    if frame is None or spills is None or registers is None:
        raise ValueError("no stack, spill or register line in the ptxas report")
    smem = _SMEM.search(report)
    return {"registers": int(registers.group(1)), "stack_bytes": int(frame.group(1)),
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
            "shared_bytes": int(smem.group(1)) if smem else 0}


def variant_rows(arch: int, variants=None) -> list[dict]:
    """:func:`variant_resources` of each variant (default: :func:`all_variants`), compiled in
    parallel: the check every variant gets, where the test suite compiles a few."""
    tools = cuda_tools()
    variants = all_variants() if variants is None else variants

    def one(variant):
        half, store, flags = variant
        report, _ = compile_variant(half, store, flags, arch, tools)
        named = [name for name, bit in FLAG_BITS.items() if flags & bit]
        return {"arch": arch, "half": half, "store": store, "flags": flags, "flag_names": named,
                **variant_resources(report)}

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(one, variants))


def cuda_row(mode: str, tracking: str, report: str, sass: str, arch: int = 90,
             threads: int = 256) -> dict:
    """A report row from one variant's ptxas report and SASS."""
    spills = _PTXAS.search(report)
    registers = _REGISTERS.search(report)
    if spills is None or registers is None:
        raise ValueError(f"{mode}/{tracking}: no register or spill line in the ptxas report")
    smem = _SMEM.search(report)
    path = steady_state_path(parse_sass(sass), executed_accesses(mode, tracking))
    resident = resident_per_sm(int(registers.group(1)), threads,
                               int(smem.group(1)) if smem else 0, arch)
    return _row("cuda", None, mode, tracking, int(registers.group(1)),
                int(spills.group(1)) + int(spills.group(2)), path.code,
                elements=8 * path.groups, chunks=path.groups,
                resident=resident, launched=resident, executed=path)


def cuda_rows(arch: int = 90, modes=tuple(MODES), trackings=TRACKINGS) -> list[dict]:
    """One row per (mode, tracking) of the CUDA kernel; raises when a tool is missing."""
    tools = cuda_tools()
    threads = cuda_threads()
    cases = [(mode, tracking) for mode in modes for tracking in trackings]

    def one(case):
        report, sass = compile_variant(*_variant(*case), arch, tools)
        return cuda_row(*case, report, sass, arch, threads)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(one, cases))


# ---------------------------------------------------------------------------------------
# Triton.
# ---------------------------------------------------------------------------------------


def triton_row(mode: str, tracking: str, arch: int = 90) -> dict:
    """The row of one layout compiled by the Triton this process imports (it must not run
    the interpreter)."""
    import triton

    from rlvr_optim.triton_kernels import adamw as K
    from rlvr_optim.triton_kernels import codegen

    flags = dict(codegen.STATIC_MODES[mode], **codegen.STATIC_TRACKING[tracking])
    kernel = codegen.compile_table_kernel(flags, arch=arch)
    cubin = kernel.asm["cubin"]
    loop = codegen.hot_path(codegen.steady_state_loop(codegen.sass_instructions(cubin)))
    usage = codegen.resource_usage(cubin)
    warps = kernel.metadata.num_warps
    # static shared memory (cuobjdump) and the dynamic size the launcher passes
    shared = (usage["shared"] or 0) + kernel.metadata.shared
    launched = K.DEFAULT_PROGRAMS_PER_SM or K.programs_per_sm(
        usage["registers"], warps, kernel.metadata.shared, K.SM_LIMITS[divmod(arch, 10)])
    return _row("triton", triton.__version__, mode, tracking, usage["registers"],
                codegen.spill_bytes(kernel.asm["ptx"], arch),
                [Instruction.of(a, t) for a, t in loop],
                elements=K.DEFAULT_BLOCK_GPU // (32 * warps), chunks=1,
                resident=resident_per_sm(usage["registers"], 32 * warps, shared, arch),
                launched=launched)  # what adamw() launches per SM (K._programs)


def triton_rows(arch: int = 90, modes=tuple(MODES), trackings=TRACKINGS) -> list[dict]:
    """The rows of the Triton this process imports, each cached by the hash of the
    Triton kernel sources, this file, the Triton version and the row's arguments."""
    import triton

    from rlvr_optim import files
    from rlvr_optim import triton_kernels

    h = hashlib.sha256(repr((triton.__version__, triton.__file__, arch)).encode())
    for path in sorted([*Path(triton_kernels.__file__).parent.glob("*.py"), Path(__file__)]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    rows = []
    for mode in modes:
        for tracking in trackings:
            key = h.copy()
            key.update(repr((mode, tracking)).encode())
            cached = _cache_root() / "triton_rows" / f"{key.hexdigest()[:24]}.json"
            if not cached.is_file():
                cached.parent.mkdir(parents=True, exist_ok=True)
                files.write_json(cached, triton_row(mode, tracking, arch))
            rows.append(json.loads(cached.read_text()))
    return rows


def triton_site(folder: str | os.PathLike) -> Path:
    """The folder to put on PYTHONPATH for the Triton in ``folder``: the folder itself when
    it holds a ``triton`` package (site-packages, a ``pip install --target`` folder), else a
    virtual environment's site-packages for this Python's version."""
    folder = Path(folder)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for site in (folder, folder / "lib" / version / "site-packages"):
        if (site / "triton" / "__init__.py").is_file():
            return site.resolve()
    raise ValueError(f"{folder} holds no triton package for {version} (give a virtual "
                     "environment, its site-packages or a pip --target folder)")


def site_version(site: Path) -> str:
    """The version of the triton installed in ``site`` (its dist-info)."""
    infos = sorted(site.glob("triton-*.dist-info"))
    if len(infos) != 1:
        raise ValueError(f"{site} has {len(infos)} triton dist-info folders, expected one")
    return infos[0].name[len("triton-"):-len(".dist-info")]


def _cached_sites() -> Path:
    return _cache_root() / "triton" / f"py{sys.version_info.major}{sys.version_info.minor}"


def cached_triton_sites() -> list[Path]:
    """The Triton copies installed in the cache by :func:`install_triton`."""
    folder = _cached_sites()
    return sorted(p for p in folder.glob("*") if not p.name.startswith(".")  # no temp folders
                  and (p / "triton" / "__init__.py").is_file()) if folder.is_dir() else []


def install_triton(version: str, wait_s: float = 1800) -> Path:
    """``pip install --target`` of triton==``version`` (no dependencies) into the cache,
    once; returns the folder. The folder appears whole or not at all, and processes that
    ask at the same time (test shards) wait for the one that installs it."""
    import time

    from rlvr_optim import files
    from rlvr_optim.errors import InputError

    if not re.fullmatch(r"\d+(\.\d+)*", version):
        raise ValueError(f"a Triton version is numbers and dots, like 3.6.0; got {version!r}")
    target = _cached_sites() / version
    deadline = time.monotonic() + wait_s
    while not (target / "triton" / "__init__.py").is_file():
        lock = files.folder_lock(target.parent)
        try:
            lock.__enter__()
        except InputError:  # another process is installing it
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {wait_s:.0f} s for another process to install "
                                   f"triton=={version} into {target.parent}") from None
            time.sleep(2)
            continue
        try:
            if not (target / "triton" / "__init__.py").is_file():
                with files.atomic_folder(target) as tmp:
                    done = subprocess.run(
                        [sys.executable, "-m", "pip", "install", "--quiet",
                         "--disable-pip-version-check", "--no-deps", "--target", str(tmp),
                         f"triton=={version}"], capture_output=True, text=True)
                    if done.returncode != 0:
                        raise RuntimeError(f"pip could not install triton=={version}:\n"
                                           f"{done.stderr[-2000:]}")
        finally:
            lock.__exit__(None, None, None)
    return target


def _triton_command(arch, modes, trackings) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--json", "--backend", "triton",
            "--only-this-triton", "--arch", str(arch),
            *(f"--mode={m}" for m in modes), *(f"--track={t}" for t in trackings)]


def _start_triton(site: Path | None, arch, modes, trackings) -> subprocess.Popen:
    """A process that prints the rows of the Triton in ``site`` (None: the installed one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(site), env.get("PYTHONPATH"))))
    return subprocess.Popen(_triton_command(arch, modes, trackings), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _finish_triton(process: subprocess.Popen, site: Path | None) -> list[dict]:
    out, err = process.communicate()
    where = "the installed triton" if site is None else f"the triton in {site}"
    if process.returncode != 0:
        raise RuntimeError(f"compiling with {where} failed:\n{err[-3000:]}")
    rows = json.loads(out)
    if site is not None:
        expected = site_version(site)
        wrong = {r["triton_version"] for r in rows} - {expected}
        if wrong:
            raise RuntimeError(f"{where} is {expected}, but the rows came from {sorted(wrong)}")
    return rows


def installed_triton_version() -> str | None:
    """The version of the triton this Python imports without help, None if none."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                          capture_output=True, text=True, env=env)
    return done.stdout.strip() if done.returncode == 0 else None


# ---------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------


def report(arch: int = 90, modes=tuple(MODES), trackings=TRACKINGS, backends=BACKENDS,
           tritons=(), only_this_triton: bool = False) -> list[dict]:
    """Every backend's rows for these modes and trackings: CUDA, then Triton for the
    installed version and each other one in ``tritons`` (folders, see :func:`triton_site`)
    or in the cache. ``only_this_triton``: Triton rows of this process's Triton alone."""
    if only_this_triton:
        return [*(cuda_rows(arch, modes, trackings) if "cuda" in backends else ()),
                *(triton_rows(arch, modes, trackings) if "triton" in backends else ())]
    started = []
    if "triton" in backends:
        installed = installed_triton_version()
        sites, seen = [], {installed}
        for site in [*map(triton_site, tritons), *cached_triton_sites()]:
            if site_version(site) not in seen:
                seen.add(site_version(site))
                sites.append(site)
        # every Triton compiles in its own process while nvcc runs here
        started = [(site, _start_triton(site, arch, modes, trackings))
                   for site in ([None] if installed else []) + sites]
    try:
        rows = cuda_rows(arch, modes, trackings) if "cuda" in backends else []
    except BaseException:
        for _, process in started:
            process.kill()
        raise
    for site, process in started:
        rows += _finish_triton(process, site)
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'backend':14} {'mode':27} {'track':5} {'regs':>4} {'spill':>5} {'instr/el':>8} "
            f"{'access B':>8} {'load B':>6} {'res/SM':>6} {'run/SM':>6} {'overlap':>7}")
    lines = [head]
    for r in rows:
        name = r["backend"] + (f" {r['triton_version']}" if r["triton_version"] else "")
        lines.append(
            f"{name:14} {r['mode']:27} {r['tracking']:5} {r['registers']:>4} "
            f"{r['spill_bytes']:>5} {r['instructions_per_element']:>8} "
            f"{str(r['narrowest_access_bytes']) + '-' + str(r['widest_access_bytes']):>8} "
            f"{r['narrowest_load_bytes']:>6} {r['resident_per_sm']:>6} {r['launched_per_sm']:>6} "
            f"{'yes' if r['loads_overlap_math'] else 'no':>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(_SM_LIMITS),
                        help="compute capability (default 90)")
    parser.add_argument("--mode", action="append", choices=tuple(MODES),
                        help="only this mode (repeatable; default: every mode)")
    parser.add_argument("--track", action="append", choices=TRACKINGS,
                        help="only this tracking (repeatable; default: both)")
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="only this backend (repeatable; default: both)")
    parser.add_argument("--triton", action="append", default=[], metavar="PATH",
                        help="also compile with the Triton in PATH: a virtual environment, its "
                        "site-packages or a pip --target folder (repeatable)")
    parser.add_argument("--triton-version", action="append", default=[], metavar="X.Y.Z",
                        help="also compile with triton==X.Y.Z, installed into the cache first "
                        "if it is not there (pip install --target; repeatable)")
    parser.add_argument("--all-variants", action="store_true",
                        help="instead: registers, stack, spill and shared-memory bytes of every "
                        "CUDA kernel variant the extension builds (704), compiled one by one")
    parser.add_argument("--only-this-triton", action="store_true",
                        help="Triton rows of the triton this Python imports only, compiled in "
                        "this process (how the report runs each Triton)")
    args = parser.parse_args(argv)
    if args.all_variants:
        rows = variant_rows(args.arch)
        print(json.dumps(rows, indent=1) if args.json else "\n".join(
            f"sm_{r['arch']} {r['half']:9} {r['store']:18} {'+'.join(r['flag_names']) or '-':52} "
            f"{r['registers']:>3} registers, {r['stack_bytes']} B stack, "
            f"{r['spill_bytes']} B spilled, {r['shared_bytes']} B shared" for r in rows))
        return 0
    try:
        tritons = [triton_site(p) for p in args.triton]
        tritons += [install_triton(v) for v in args.triton_version]
    except ValueError as error:
        parser.error(str(error))
    rows = report(args.arch, tuple(args.mode or MODES), tuple(args.track or TRACKINGS),
                  tuple(args.backend or BACKENDS), tritons, args.only_this_triton)
    print(json.dumps(rows, indent=1) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
