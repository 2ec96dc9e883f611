"""What the Triton table kernel compiles to, without a GPU: cross-compile it for an NVIDIA
target and read the PTX (vector width of each global access) and the cubin's resource usage
(registers, stack). Triton compiles with its bundled LLVM and ptxas, so this runs on a CPU
machine; it cannot run in a process with ``TRITON_INTERPRET=1`` (the kernels are then
interpreted functions), so tests call it in a subprocess.

    python -m rlvr_optim.triton_kernels.codegen [--block 1024] [--warps 8] [--arch 90] [--json]

The numbers say whether the fast path is what we meant it to be (16-byte accesses on full
blocks, no local memory, registers that leave room for several programs per SM); they say
nothing about speed, which only the benchmark on a GPU measures.

:func:`static_rows` is the budget view of the same compile (``bench/static_report.py``
prints it beside the CUDA kernels): per layout and tracking setting, registers, spill bytes,
SASS instructions per element of the steady-state loop and the narrowest global access in
that loop, read from the SASS (``cuobjdump -sass``) and ptxas's report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

# Change tracking on (both bitmaps and the counters) in every mode: the targets are
# stated with tracking on, and it is the heaviest variant.
TRACKING = dict(HAS_CHANGE_BITMAP=True, HAS_CUMULATIVE_BITMAP=True, HAS_COUNTERS=True)
MODES = {
    "bf16": dict(PARAM_BF16=True, GRAD_BF16=True),
    "bf16-sr": dict(PARAM_BF16=True, GRAD_BF16=True, STOCHASTIC=True),
    "master": dict(PARAM_BF16=True, GRAD_BF16=True, HAS_MASTER=True),
    "remainder": dict(PARAM_BF16=True, GRAD_BF16=True, HAS_REMAINDER=True),
    "freeze": dict(PARAM_BF16=True, GRAD_BF16=True, HAS_FREEZE_MASK=True),
    "fp32": dict(),
}
"""Layouts of the table kernel (its constexpr flags), bf16 states off: fp32 m and v."""

_POINTERS = {
    "table_ptr": "*i64", "work_ptr": "*i32", "scalars_ptr": "*fp32", "sr_keys_ptr": "*i64",
    "grad_scale_ptr": "*fp32", "found_inf_ptr": "*u8",
}
_FLAGS = (
    "ALIGNED", "PARAM_BF16", "GRAD_BF16", "GRAD_FP16", "EXP_AVG_BF16", "EXP_AVG_SQ_BF16",
    "MAX_EXP_AVG_SQ_BF16", "HAS_MASTER", "HAS_REMAINDER", "STOCHASTIC", "AMSGRAD", "MAXIMIZE",
    "HAS_FREEZE_MASK", "HAS_CHANGE_BITMAP", "HAS_CUMULATIVE_BITMAP", "HAS_COUNTERS",
    "HAS_GRAD_SCALE", "HAS_FOUND_INF",
)


def streams(flags: dict) -> tuple[int, int]:
    """(element streams read, element streams written) by a layout: param, grad, m, v,
    master or remainder (the bitmaps are one byte per 8 elements and not counted)."""
    extra = int(bool(flags.get("HAS_MASTER") or flags.get("HAS_REMAINDER")))
    return 4 + extra, 3 + extra


def compile_table_kernel(flags: dict, block: int, warps: int, arch: int = 90, chunks: int = 1):
    """The compiled table kernel for ``flags`` (others off; ``ALIGNED`` on unless given)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("codegen needs compiled kernels: run it without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import adamw as K

    unknown = set(flags) - set(_FLAGS)
    if unknown:
        raise ValueError(f"unknown flags {sorted(unknown)}; known: {', '.join(_FLAGS)}")
    constexprs = {name: False for name in _FLAGS}
    constexprs["ALIGNED"] = True
    constexprs.update(flags)
    constexprs["BLOCK"] = block
    constexprs["CHUNKS"] = chunks
    signature = dict(_POINTERS, **{name: "constexpr" for name in constexprs})
    # The launcher marks 16-byte-aligned pointer arguments so; do the same.
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(_POINTERS))}
    source = ASTSource(K.adamw_table_kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, enable_fp_fusion=False))


def _nvidia_tool(name: str) -> str | None:
    """Path of one of the tools Triton bundles (cuobjdump, ptxas), None if absent."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None




def summary(flags: dict, block: int, warps: int, arch: int = 90, chunks: int = 1) -> dict:
    """Global loads and stores by PTX instruction (``ld.global.v4.b32``: 16 bytes), and the
    cubin's registers, stack and shared memory (None without Triton's cuobjdump)."""
    kernel = compile_table_kernel(flags, block, warps, arch, chunks)
    ptx = kernel.asm["ptx"]
    out = dict(
        block=block, warps=warps, arch=arch, chunks=chunks,
        loads=dict(Counter(re.findall(r"\bld\.global[.\w]*", ptx))),
        stores=dict(Counter(re.findall(r"\bst\.global[.\w]*", ptx))),
        local=len(re.findall(r"\b(?:ld|st)\.local", ptx)),
        registers=None, stack=None, shared=None,
    )
    if _nvidia_tool("cuobjdump") is not None:
        out.update(resource_usage(kernel.asm["cubin"]))
    return out


def _cuobjdump(cubin: bytes, *options: str) -> str:
    """What Triton's cuobjdump prints for a cubin with ``options``."""
    tool = _nvidia_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("this triton bundles no cuobjdump to read the cubin with")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, *options, path], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """The cubin's registers per thread, stack and shared memory bytes (None if unreported)."""
    report = _cuobjdump(cubin, "--dump-resource-usage")
    out = {}
    for key, field in (("registers", "REG"), ("stack", "STACK"), ("shared", "SHARED")):
        found = re.search(rf"\b{field}:(\d+)", report)
        out[key] = int(found.group(1)) if found else None
    return out


def vector_accesses(counts: dict) -> int:
    """How many of ``counts`` (a summary's loads or stores) move 8 or 16 bytes at once."""
    return sum(n for op, n in counts.items() if re.search(r"\.v[24]\.", op))


# The benchmark's modes (rlvr_optim.bench.OUR_MODES) as table-kernel layouts: bf16 params
# and grads, states in the param's dtype unless the mode says fp32.
_BF16_STATES = dict(PARAM_BF16=True, GRAD_BF16=True, EXP_AVG_BF16=True, EXP_AVG_SQ_BF16=True)
STATIC_MODES = {
    "default": _BF16_STATES,
    "sr + fp32 states": dict(PARAM_BF16=True, GRAD_BF16=True, STOCHASTIC=True),
    "fp32 master": dict(_BF16_STATES, HAS_MASTER=True),
    "remainder": dict(_BF16_STATES, HAS_REMAINDER=True),
    "freeze mask": dict(_BF16_STATES, HAS_FREEZE_MASK=True),
}
"""Layouts :func:`static_rows` compiles, named as the benchmark's modes."""
STATIC_TRACKING = {
    "off": dict(),
    "step": dict(HAS_CHANGE_BITMAP=True, HAS_COUNTERS=True),
    "cumulative": dict(HAS_CHANGE_BITMAP=True, HAS_CUMULATIVE_BITMAP=True, HAS_COUNTERS=True),
}
"""The optimizer's ``track_changes`` settings as layout flags."""

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH_TARGET = re.compile(r"\bBRA(?:\.\S+)?\s+.*?0x([0-9a-f]+)")
_GLOBAL_ACCESS = re.compile(r"\b(?:LDG|STG)((?:\.\w+)*)\s")
_ACCESS_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def sass_instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction text) of every SASS instruction of a cubin, NOPs left out."""
    sass = _cuobjdump(cubin, "-sass")
    return [(int(address, 16), text.strip()) for address, text in _SASS_LINE.findall(sass)
            if not text.strip().startswith("NOP")]


def steady_state_loop(instructions: list[tuple[int, str]]) -> list[str]:
    """The instructions of the innermost loop with the most instructions: the body a
    persistent kernel runs once per full chunk (software pipelining leaves its prologue and
    epilogue outside it). A loop is the address range from a backward branch's target to
    the branch; the branch that ends a kernel (``BRA`` to itself) is not one."""
    loops = []
    for address, text in instructions:
        target = _BRANCH_TARGET.search(text)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    innermost = [(a, b) for a, b in loops
                 if not any((a, b) != (c, d) and a <= c and d <= b for c, d in loops)]
    if not innermost:
        raise ValueError("the kernel's SASS has no loop: it has no steady state to count")
    bodies = [[text for address, text in instructions if a <= address <= b]
              for a, b in innermost]
    return max(bodies, key=len)


def access_bytes(text: str) -> int | None:
    """Bytes one thread moves in a global load or store instruction (``LDG.E.64``: 8), None
    for other instructions (atomics, shared memory)."""
    found = _GLOBAL_ACCESS.search(text)
    if found is None:
        return None
    widths = [_ACCESS_BYTES[m] for m in found.group(1).split(".") if m in _ACCESS_BYTES]
    return widths[0] if widths else 4


def spill_bytes(ptx: str, arch: int) -> int:
    """Bytes ptxas spills to local memory (stores plus loads), rerun as Triton runs it (its
    ptxas for ``arch``, its flags but line info)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [tool, "-v", "--fmad=false", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}",
             src, "-o", os.path.join(tmp, "kernel.o")],
            capture_output=True, text=True, check=True).stderr
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if found is None:
        raise RuntimeError(f"ptxas printed no spill report:\n{log}")
    return int(found.group(1)) + int(found.group(2))


def static_rows(arch: int = 90, modes=None, tracking=None) -> list[dict]:
    """The table kernel's static budget per layout, cross-compiled for ``arch``.

    One dict per (mode, tracking) of :data:`STATIC_MODES` x :data:`STATIC_TRACKING`
    (``modes`` / ``tracking``: subsets of their names, default all), at the GPU launch
    defaults: ``{"backend": "triton", "mode", "tracking", "registers", "spill_bytes",
    "instructions_per_element", "narrowest_access_bytes"}``. Instructions per element are
    the SASS instructions of the steady-state loop (:func:`steady_state_loop`) over the
    elements one thread steps per iteration; the narrowest access is the smallest global
    load or store in that loop (full chunks), in bytes per thread.
    """
    from . import adamw as K

    unknown = set(modes or ()) - set(STATIC_MODES) | set(tracking or ()) - set(STATIC_TRACKING)
    if unknown:
        raise ValueError(f"unknown modes or tracking settings {sorted(unknown)}; modes: "
                         f"{list(STATIC_MODES)}, tracking: {list(STATIC_TRACKING)}")
    block, warps = K.DEFAULT_BLOCK_GPU, K.DEFAULT_NUM_WARPS_GPU
    per_thread = block // (32 * warps)
    rows = []
    for mode in modes or STATIC_MODES:
        for track in tracking or STATIC_TRACKING:
            kernel = compile_table_kernel(dict(STATIC_MODES[mode], **STATIC_TRACKING[track]),
                                          block, warps, arch)
            loop = steady_state_loop(sass_instructions(kernel.asm["cubin"]))
            widths = [w for w in map(access_bytes, loop) if w is not None]
            rows.append(dict(
                backend="triton", mode=mode, tracking=track,
                registers=resource_usage(kernel.asm["cubin"])["registers"],
                spill_bytes=spill_bytes(kernel.asm["ptx"], arch),
                instructions_per_element=len(loop) / per_thread,
                narrowest_access_bytes=min(widths) if widths else None,
            ))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", type=int, default=None)
    parser.add_argument("--warps", type=int, default=None)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--chunks", type=int, default=None, help="blocks per program")
    parser.add_argument("--mode", action="append", choices=sorted(MODES),
                        help="layouts to compile (default: all)")
    parser.add_argument("--unaligned", action="store_true", help="ALIGNED off")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--static", action="store_true",
                        help="the budget rows of static_rows() instead (a JSON list with --json)")
    args = parser.parse_args(argv)
    from . import adamw as K

    if args.static:
        rows = static_rows(args.arch)
        if args.json:
            json.dump(rows, sys.stdout)
            print()
            return 0
        print(f"adamw_table_kernel, sm_{args.arch}, GPU launch defaults")
        print(f"{'mode':18} {'tracking':10} {'regs':>4} {'spill':>5} {'instr/elem':>10} "
              f"{'narrowest B':>11}")
        for r in rows:
            print(f"{r['mode']:18} {r['tracking']:10} {r['registers']:>4} {r['spill_bytes']:>5} "
                  f"{r['instructions_per_element']:>10.1f} {r['narrowest_access_bytes']!s:>11}")
        return 0

    block = args.block or K.DEFAULT_BLOCK_GPU
    warps = args.warps or K.DEFAULT_NUM_WARPS_GPU
    chunks = args.chunks or K.DEFAULT_CHUNKS_GPU
    results = {}
    for mode in args.mode or list(MODES):
        flags = dict(MODES[mode], **TRACKING)
        if args.unaligned:
            flags["ALIGNED"] = False
        results[mode] = summary(flags, block, warps, args.arch, chunks)
        results[mode]["streams"] = streams(flags)
    if args.json:
        json.dump(results, sys.stdout)
        print()
        return 0
    print(f"adamw_table_kernel, BLOCK={block}, {warps} warps, {chunks} block(s) per program, "
          f"sm_{args.arch}, tracking on")
    print(f"{'mode':10} {'regs':>5} {'stack':>5} {'vector ld':>9} {'vector st':>9}  streams r/w")
    for mode, r in results.items():
        reads, writes = r["streams"]
        print(f"{mode:10} {r['registers']!s:>5} {r['stack']!s:>5} "
              f"{vector_accesses(r['loads']):>9} {vector_accesses(r['stores']):>9}  {reads}/{writes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
