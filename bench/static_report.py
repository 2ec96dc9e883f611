"""What the fused kernels compile to for sm_90, on a machine without a GPU.

    python bench/static_report.py [--json] [--arch 90] [--mode M ...] [--track off|step]

Per kernel (backend x mode x tracking) it reports registers, spill bytes, SASS
instructions per element in the steady-state loop and the narrowest global access on that
loop's path. DESIGN.md's performance model sets the budget these numbers are held to
(tests/test_static_report.py): at most 90 instructions per element in the default mode and
105 with stochastic rounding, for bf16 and float16 params alike, no spills, no global access narrower than 8 bytes on full
chunks.

CUDA: each kernel variant is instantiated alone in a generated ``.cu``, compiled with
``nvcc -cubin`` (the extension's device flags, ``-Xptxas -v`` for registers and spills) and
disassembled with ``cuobjdump -sass`` (Triton's bundled copy, or any on PATH). Compiled
objects are cached by source hash under ``$RLVR_OPTIM_CACHE/static_report``.

Triton: the rows of ``rlvr_optim.triton_kernels.codegen.static_rows(arch)`` when that
function exists; otherwise one row per (mode, tracking) with null numbers and an
``"unavailable"`` reason.

The steady-state loop is an innermost backward branch among those whose span holds 16-byte
global accesses (of several such, the one holding the most; a loop around it also holds the
loads a software-pipelined loop issues before its first iteration). Its path is found on
the control-flow graph of that span: blocks holding a call (the out-of-line slow paths of
IEEE division and square root) or a barrier (a change of tensor) are off it; of the
remaining paths from the loop head to the back edge it takes the one moving the most global
bytes, then the one with the fewest instructions (so a vector access beats eight
element-wise ones, and an optional bitmap or freeze-mask access is counted, not skipped).
Elements per iteration follow from the 16-byte loads on the path and the layout's 16-byte
loads per 8 elements.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# mode -> (store mode of csrc/adamw_launch.h, param 16-bit, grad 16-bit, states bf16,
# 16-bit format: "bf16" or "fp16", that of a 16-bit param and grad or of an fp32 param's
# change image). "default" is what rlvr_optim.AdamW runs without options on bf16 params:
# bf16 states, nearest; the "fp16-" modes are the same layouts with float16 params and grads.
MODES = {
    "default": ("kNearest", True, True, True, "bf16"),
    "stochastic": ("kStochastic", True, True, True, "bf16"),
    "fp32-states": ("kNearest", True, True, False, "bf16"),
    "stochastic-fp32-states": ("kStochastic", True, True, False, "bf16"),
    "master": ("kMasterNearest", True, True, False, "bf16"),
    "master-stochastic": ("kMasterStochastic", True, True, False, "bf16"),
    "remainder": ("kRemainder", True, True, False, "bf16"),
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
KEYS = ("backend", "mode", "tracking", "registers", "spill_bytes", "instructions_per_element",
        "narrowest_access_bytes")

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
_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16, "256": 32}


@dataclass
class Instruction:
    address: int
    text: str
    opcode: str  # with modifiers, e.g. "LDG.E.128.CONSTANT"
    target: int | None  # branch or call target
    conditional: bool

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    def global_bytes(self) -> int:
        """Bytes one thread moves to or from global memory (0: not a global access).

        Generic LD/ST count: the kernels reach global memory only through them.
        """
        if self.base not in _GLOBAL_OPS:
            return 0
        width = 4
        for part in self.opcode.split(".")[1:]:
            width = _WIDTHS.get(part, width)
        return width


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of cuobjdump -sass output (one function)."""
    out = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if m is None:
            continue
        address, body = int(m.group(1), 16), m.group(2)
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
        out.append(Instruction(address, body, opcode, target, conditional))
    return out


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
    accesses: list[tuple[int, bool]]  # (bytes, is a load) of each global access on the path
    span: tuple[int, int]
    code: list[Instruction]  # the path's instructions


def steady_state_path(code: list[Instruction]) -> LoopPath:
    """The path of one iteration of the steady-state loop (see the module docstring)."""
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

    # best[i]: (global bytes, -instructions, accesses) of the best path from the head to the
    # start of block i; blocks come in address order and only forward edges are followed.
    best: list[tuple | None] = [None] * len(blocks)
    best[0] = (0, 0, [], [])
    result = None
    for i, block in enumerate(blocks):
        if best[i] is None or cold(block):
            continue
        nbytes, neg, accesses, taken = best[i]
        here = [(ins.global_bytes(), ins.base in ("LDG", "LD"))
                for ins in block if ins.global_bytes()]
        state = (nbytes + sum(b for b, _ in here), neg - sum(1 for ins in block if ins.base != "NOP"),
                 accesses + here, taken + [ins for ins in block if ins.base != "NOP"])
        last = block[-1]
        successors = []
        if last.base == "BRA" and last.target is not None:
            if last.address == tail:
                result = state if result is None or state[:2] > result[:2] else result
            elif last.target > last.address and last.target in index:
                successors.append(index[last.target])
            if last.conditional and i + 1 < len(blocks):
                successors.append(i + 1)
        elif last.base not in ("EXIT", "RET") or last.conditional:
            if i + 1 < len(blocks):
                successors.append(i + 1)
        for j in successors:
            if best[j] is None or state[:2] > best[j][:2]:
                best[j] = state
    if result is None:
        raise ValueError("the steady-state loop has no path from its head to its back edge")
    return LoopPath(instructions=-result[1], accesses=result[2], span=(head, tail),
                    code=result[3])


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
# CUDA.
# ---------------------------------------------------------------------------------------

_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


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


def _compile_cuda(mode: str, tracking: str, arch: int, nvcc: str, cuobjdump: str,
                  version: str) -> tuple[str, str]:
    """(ptxas report, SASS) of one variant, cached by the hash of csrc/ and the command."""
    source = _instantiation(*_variant(mode, tracking))
    command = [nvcc, "-cubin", *_DEVICE_FLAGS, f"-arch=sm_{arch}", "-Xptxas", "-v",
               f"-I{CSRC}"]
    h = hashlib.sha256()
    for path in sorted([*CSRC.glob("*.cuh"), *CSRC.glob("*.h")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(repr((source, command[1:], version)).encode())
    folder = _cache_root() / h.hexdigest()[:16]
    report, sass = folder / "ptxas.txt", folder / "kernel.sass"
    if not (report.is_file() and sass.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            unit, cubin = Path(tmp) / "variant.cu", Path(tmp) / "variant.cubin"
            unit.write_text(source)
            done = subprocess.run([*command, str(unit), "-o", str(cubin)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed on {mode}/{tracking}:\n{done.stderr}")
            dump = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True,
                                  text=True, check=True)
            (Path(tmp) / "ptxas.txt").write_text(done.stdout + done.stderr)
            (Path(tmp) / "kernel.sass").write_text(dump.stdout)
            os.replace(Path(tmp) / "kernel.sass", sass)
            os.replace(Path(tmp) / "ptxas.txt", report)
    return report.read_text(), sass.read_text()


def cuda_row(mode: str, tracking: str, report: str, sass: str) -> dict:
    """A report row from one variant's ptxas report and SASS."""
    spills = _PTXAS.search(report)
    registers = _REGISTERS.search(report)
    if spills is None or registers is None:
        raise ValueError(f"{mode}/{tracking}: no register or spill line in the ptxas report")
    path = steady_state_path(parse_sass(sass))
    vectors = sum(1 for b, load in path.accesses if b >= 16 and load)
    per_8 = vector_loads_per_8(mode)
    if vectors == 0 or vectors % per_8:
        raise ValueError(f"{mode}/{tracking}: {vectors} 16-byte loads on the loop path is "
                         f"not a multiple of the layout's {per_8} per 8 elements")
    elements = 8 * vectors // per_8
    return {
        "backend": "cuda", "mode": mode, "tracking": tracking,
        "registers": int(registers.group(1)),
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
        "instructions_per_element": round(path.instructions / elements, 1),
        "narrowest_access_bytes": min(b for b, _ in path.accesses),
    }


def cuda_rows(arch: int = 90, modes=tuple(MODES), trackings=TRACKINGS) -> list[dict]:
    """One row per (mode, tracking) of the CUDA kernel; raises when a tool is missing."""
    from rlvr_optim import cuda_backend

    nvcc, cuobjdump = cuda_backend._nvcc(), cuobjdump_path()
    if nvcc is None or cuobjdump is None:
        raise RuntimeError("the CUDA rows need nvcc and cuobjdump (Triton bundles one; or "
                           "pip install nvidia-cuda-cuobjdump)")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    cases = [(mode, tracking) for mode in modes for tracking in trackings]

    def one(case):
        report, sass = _compile_cuda(*case, arch, nvcc, cuobjdump, version)
        return cuda_row(*case, report, sass)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(one, cases))


# ---------------------------------------------------------------------------------------
# Triton, and the report.
# ---------------------------------------------------------------------------------------


def triton_rows(arch: int = 90, modes=tuple(MODES), trackings=TRACKINGS) -> list[dict]:
    """The Triton backend's rows, or unavailable rows saying why."""
    reason = None
    try:
        from rlvr_optim.triton_kernels import codegen

        static_rows = getattr(codegen, "static_rows", None)
        if static_rows is None:
            reason = "rlvr_optim.triton_kernels.codegen has no static_rows() yet"
        else:
            return [dict(row, backend="triton") for row in static_rows(arch=arch)
                    if row["mode"] in modes and row["tracking"] in trackings]
    except Exception as error:  # a report line, not a crash: say what failed
        reason = f"{type(error).__name__}: {error}"
    return [dict(backend="triton", mode=mode, tracking=tracking, registers=None,
                 spill_bytes=None, instructions_per_element=None, narrowest_access_bytes=None,
                 unavailable=reason)
            for mode in modes for tracking in trackings]


def report(arch: int = 90, modes=tuple(MODES), trackings=TRACKINGS) -> list[dict]:
    """Every backend's rows for these modes and trackings."""
    return [*cuda_rows(arch, modes, trackings), *triton_rows(arch, modes, trackings)]


def _table(rows: list[dict]) -> str:
    lines = [f"{'backend':8} {'mode':24} {'tracking':8} {'regs':>4} {'spill B':>7} "
             f"{'instr/elem':>10} {'narrowest B':>11}"]
    for r in rows:
        if r.get("unavailable"):
            lines.append(f"{r['backend']:8} {r['mode']:24} {r['tracking']:8} "
                         f"unavailable: {r['unavailable']}")
            continue
        lines.append(f"{r['backend']:8} {r['mode']:24} {r['tracking']:8} {r['registers']:>4} "
                     f"{r['spill_bytes']:>7} {r['instructions_per_element']:>10} "
                     f"{r['narrowest_access_bytes']:>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    parser.add_argument("--mode", action="append", choices=tuple(MODES),
                        help="only this mode (repeatable; default: every mode)")
    parser.add_argument("--track", action="append", choices=TRACKINGS,
                        help="only this tracking (repeatable; default: both)")
    args = parser.parse_args(argv)
    rows = report(args.arch, tuple(args.mode or MODES), tuple(args.track or TRACKINGS))
    print(json.dumps(rows, indent=1) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
