"""What the Triton table kernel compiles to, without a GPU: cross-compile it for an NVIDIA
target and read the PTX (vector width of each global access) and the cubin's resource usage
(registers, stack). Triton compiles with its bundled LLVM and ptxas, so this runs on a CPU
machine; it cannot run in a process with ``TRITON_INTERPRET=1`` (the kernels are then
interpreted functions), so tests call it in a subprocess.

    python -m rlvr_optim.triton_kernels.codegen [--block 1024] [--warps 8] [--arch 90] [--json]

The numbers say whether the fast path is what we meant it to be (16-byte accesses on full
blocks, no local memory, registers that leave room for several programs per SM); they say
nothing about speed, which only the benchmark on a GPU measures.
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


def _cuobjdump() -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
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
    tool = _cuobjdump()
    if tool is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            report = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                                    text=True, check=True).stdout
        for key, field in (("registers", "REG"), ("stack", "STACK"), ("shared", "SHARED")):
            found = re.search(rf"\b{field}:(\d+)", report)
            out[key] = int(found.group(1)) if found else None
    return out


def vector_accesses(counts: dict) -> int:
    """How many of ``counts`` (a summary's loads or stores) move 8 or 16 bytes at once."""
    return sum(n for op, n in counts.items() if re.search(r"\.v[24]\.", op))


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
    args = parser.parse_args(argv)
    from . import adamw as K

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
