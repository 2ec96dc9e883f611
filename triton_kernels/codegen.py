"""What the Triton table kernel compiles to, without a GPU: cross-compile it for an NVIDIA
target and read the cubin (Triton bundles LLVM, ptxas and cuobjdump, so this runs on a CPU
machine). It cannot run in a process with ``TRITON_INTERPRET=1`` (the kernels are then
interpreted functions), so tests call it in a subprocess.

    python -m rlvr_optim.triton_kernels.codegen [--arch 90] [--mode M ...] [--tracking T ...]
        [--block B] [--warps W] [--item I] [--stages S] [--json]

:func:`static_rows`: per layout and tracking setting, registers, spill bytes, SASS
instructions per element of the steady-state loop and the narrowest global access in that
loop (``bench/static_report.py`` reads more from the same compiles and loop, beside the
CUDA kernels and for other Triton versions), read from the SASS
(``cuobjdump -sass``) and ptxas's report. The numbers say whether the loop is what we meant
it to be; they say nothing about speed, which only the benchmark on a GPU measures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

_ARGUMENTS = {
    "table_ptr": "*i64", "work_ptr": "*i32", "workspace_ptr": "*i64", "n_items": "i32",
    "scalars_ptr": "*fp32",
    "sr_keys_ptr": "*i64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*u8",
}
_FLAGS = (
    "ALIGNED", "PARAM_BF16", "GRAD_BF16", "STATE_BF16", "PARAM_FP16", "GRAD_FP16", "IMAGE_FP16",
    "HAS_MASTER", "HAS_REMAINDER",
    "STOCHASTIC", "AMSGRAD", "MAXIMIZE", "L2_DECAY",
    "HAS_FREEZE_MASK", "HAS_CHANGE_BITMAP", "HAS_CUMULATIVE_BITMAP", "HAS_COUNTERS",
    "HAS_GRAD_SCALE", "HAS_FOUND_INF", "SR_ROW_CALLS", "HW_BF16",
)


def compile_table_kernel(flags: dict, block: int | None = None, warps: int | None = None,
                         arch: int = 90, item: int | None = None, stages: int | None = None):
    """The compiled table kernel for ``flags`` (others off; ``ALIGNED``, ``SR_ROW_CALLS``
    and ``HW_BF16`` on unless given), at
    the GPU launch defaults of :mod:`.adamw` where ``block``, ``warps``, ``item`` (elements
    per work item) or ``stages`` (pipeline stages of the chunk loop) are None."""
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
    constexprs["SR_ROW_CALLS"] = True  # element offsets that are multiples of 8
    constexprs["HW_BF16"] = True  # compiled for a GPU
    constexprs.update(flags)
    constexprs["BLOCK"] = block or K.DEFAULT_BLOCK_GPU
    constexprs["ITEM"] = item or K.DEFAULT_ITEM_GPU
    constexprs["STAGES"] = stages or K.DEFAULT_STAGES_GPU
    signature = dict(_ARGUMENTS, **{name: "constexpr" for name in constexprs})
    # The launcher marks 16-byte-aligned pointer arguments so; do the same.
    attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(_ARGUMENTS.values())
             if kind.startswith("*")}
    source = ASTSource(K.adamw_table_kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps or K.DEFAULT_NUM_WARPS_GPU,
                                       enable_fp_fusion=False))


def _nvidia_tool(name: str) -> str | None:
    """Path of one of the tools Triton bundles (cuobjdump, ptxas), None if absent."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None




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


# The layouts bench/static_report.py reports for every backend, by its names, as
# rlvr_optim.AdamW launches them: the states follow the param's dtype (bf16 states for bf16
# params, master weights or not) unless state_dtype=torch.float32 ("fp32-states"). The
# "fp16-" modes have float16 params and grads, whose states AdamW makes float32 (master
# weights or not) unless state_dtype=torch.bfloat16 ("fp16", "fp16-stochastic");
# "fp32-fp16-image" is fp32 params with change_dtype=torch.float16.
_BF16 = dict(PARAM_BF16=True, GRAD_BF16=True)
_FP16 = dict(PARAM_FP16=True, GRAD_FP16=True)
_BF16_STATES = dict(_BF16, STATE_BF16=True)
STATIC_MODES = {
    "default": _BF16_STATES,
    "stochastic": dict(_BF16_STATES, STOCHASTIC=True),
    "fp32-states": _BF16,
    "stochastic-fp32-states": dict(_BF16, STOCHASTIC=True),
    "master": dict(_BF16_STATES, HAS_MASTER=True),
    "master-stochastic": dict(_BF16_STATES, HAS_MASTER=True, STOCHASTIC=True),
    "remainder": dict(_BF16_STATES, HAS_REMAINDER=True),
    "fp32": dict(),
    "fp16": dict(_FP16, STATE_BF16=True),
    "fp16-stochastic": dict(_FP16, STATE_BF16=True, STOCHASTIC=True),
    "fp16-fp32-states": _FP16,
    "fp16-stochastic-fp32-states": dict(_FP16, STOCHASTIC=True),
    "fp16-master": dict(_FP16, HAS_MASTER=True),
    "fp16-master-stochastic": dict(_FP16, HAS_MASTER=True, STOCHASTIC=True),
    "fp32-fp16-image": dict(IMAGE_FP16=True),
}
"""Layouts :func:`static_rows` compiles (others flags off)."""
STATIC_TRACKING = {
    "off": dict(),
    "step": dict(HAS_CHANGE_BITMAP=True, HAS_COUNTERS=True),
}
"""The optimizer's ``track_changes`` settings the budget is stated for, as layout flags."""

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH_TARGET = re.compile(r"\bBRA(?:\.\S+)?\s+.*?0x([0-9a-f]+)")
_GLOBAL_ACCESS = re.compile(r"\b(?:LDGSTS|LDG|STG)((?:\.\w+)*)\s")
_ACCESS_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def sass_instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction text) of every SASS instruction of a cubin, NOPs left out."""
    sass = _cuobjdump(cubin, "-sass")
    return [(int(address, 16), text.strip()) for address, text in _SASS_LINE.findall(sass)
            if not text.strip().startswith("NOP")]


def steady_state_loop(instructions: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The (address, text) instructions of the innermost loop with the most instructions: the body a
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
    bodies = [[(address, text) for address, text in instructions if a <= address <= b]
              for a, b in innermost]
    return max(bodies, key=len)


def hot_path(body: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """A loop body (address, text) without its slow-path call stubs: the instructions
    between a predicated forward branch and its target, where that range calls a
    subroutine. ``tl.div_rn`` and ``tl.sqrt_rn`` compile to a fast path guarded by ``FCHK``
    (or a range test) and such a stub, which calls the IEEE slow path for denormal, huge or
    special operands only; every other element jumps over it. What remains is what a chunk
    issues on ordinary data (predicated-off instructions included: they still issue)."""
    cold = set()
    for address, text in body:
        target = _BRANCH_TARGET.search(text) if text.startswith("@") else None
        if target is None or int(target.group(1), 16) <= address:
            continue
        stub = [(a, t) for a, t in body if address < a < int(target.group(1), 16)]
        if any(t.startswith("CALL") for _, t in stub):
            cold.update(a for a, _ in stub)
    return [(a, t) for a, t in body if a not in cold]


def access_bytes(text: str) -> int | None:
    """Bytes one thread moves in a global load or store instruction (``LDG.E.64``: 8; an
    ``LDGSTS`` copy to shared memory, as the pipelined loop loads, counts as a load), None
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


def kernel_row(flags: dict, arch: int = 90, **shape) -> dict:
    """Registers, spill bytes, SASS instructions per element of the steady-state loop and
    its narrowest global access (bytes per thread) of the table kernel compiled for
    ``flags`` (as :func:`compile_table_kernel`; ``shape``: its block, warps, item, stages)."""
    from . import adamw as K

    kernel = compile_table_kernel(flags, arch=arch, **shape)
    per_thread = ((shape.get("block") or K.DEFAULT_BLOCK_GPU)
                  // (32 * (shape.get("warps") or K.DEFAULT_NUM_WARPS_GPU)))
    loop = [text for _, text in hot_path(steady_state_loop(sass_instructions(kernel.asm["cubin"])))]
    widths = [w for w in map(access_bytes, loop) if w is not None]
    return dict(
        registers=resource_usage(kernel.asm["cubin"])["registers"],
        spill_bytes=spill_bytes(kernel.asm["ptx"], arch),
        instructions_per_element=len(loop) / per_thread,
        narrowest_access_bytes=min(widths) if widths else None,
    )


def static_rows(arch: int = 90, modes=None, tracking=None, **shape) -> list[dict]:
    """The table kernel's static budget per layout, cross-compiled for ``arch``.

    One dict per (mode, tracking) of :data:`STATIC_MODES` x :data:`STATIC_TRACKING`
    (``modes`` / ``tracking``: subsets of their names, default all), at the GPU launch
    defaults (``shape``: other block, warps, item or stages): ``{"backend": "triton",
    "mode", "tracking", "registers", "spill_bytes", "instructions_per_element",
    "narrowest_access_bytes"}`` (:func:`kernel_row`).
    Instructions per element are the SASS instructions of the steady-state loop
    (:func:`steady_state_loop`: one full chunk) on its :func:`hot_path` (the division and
    square-root slow-path calls left out, as bench/static_report.py does for CUDA) over the
    elements one thread steps in it.
    """
    unknown = set(modes or ()) - set(STATIC_MODES) | set(tracking or ()) - set(STATIC_TRACKING)
    if unknown:
        raise ValueError(f"unknown modes or tracking settings {sorted(unknown)}; modes: "
                         f"{list(STATIC_MODES)}, tracking: {list(STATIC_TRACKING)}")
    return [dict(backend="triton", mode=mode, tracking=track,
                 **kernel_row(dict(STATIC_MODES[mode], **STATIC_TRACKING[track]), arch, **shape))
            for mode in modes or STATIC_MODES for track in tracking or STATIC_TRACKING]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--mode", action="append", choices=list(STATIC_MODES),
                        help="layouts to compile (default: all)")
    parser.add_argument("--tracking", action="append", choices=list(STATIC_TRACKING),
                        help="tracking settings to compile (default: all)")
    for name, help_text in (("block", "elements per chunk"), ("warps", "warps per program"),
                            ("item", "elements per work item"), ("stages", "pipeline stages")):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"{help_text} (default: the GPU launch default)")
    parser.add_argument("--json", action="store_true", help="the rows as one JSON list")
    args = parser.parse_args(argv)
    shape = {k: getattr(args, k) for k in ("block", "warps", "item", "stages")}
    rows = static_rows(args.arch, args.mode, args.tracking, **shape)
    if args.json:
        json.dump(rows, sys.stdout)
        print()
        return 0
    given = ", ".join(f"{k}={v}" for k, v in shape.items() if v) or "GPU launch defaults"
    print(f"adamw_table_kernel, sm_{args.arch}, {given}")
    print(f"{'mode':24} {'tracking':8} {'regs':>4} {'spill B':>7} {'instr/elem':>10} "
          f"{'narrowest B':>11}")
    for r in rows:
        print(f"{r['mode']:24} {r['tracking']:8} {r['registers']:>4} {r['spill_bytes']:>7} "
              f"{r['instructions_per_element']:>10.1f} {r['narrowest_access_bytes']!s:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
