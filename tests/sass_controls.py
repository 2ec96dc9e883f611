"""Small Triton kernels whose SASS bench/static_report.py must read right, so that its
access widths and its load/math overlap cannot pass vacuously (tests/test_static_report.py).

    python tests/sass_controls.py        (without TRITON_INTERPRET; prints one JSON object)

Compiled for sm_90 by the Triton this Python imports and read with the report's own
functions, as it reads the AdamW kernels. ``scale`` walks chunks of a bf16 array in a
persistent loop: a chunk of 1024 elements at 4 warps is 8 elements, 16 bytes, per thread,
one of 512 is 8 bytes; without pipelining (one stage) each chunk's load is waited for at
once, while three stages issue it two chunks ahead, as LDGSTS copies into shared memory.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent


@triton.jit
def scale(x_ptr, y_ptr, chunks, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    for c in tl.range(tl.program_id(0), chunks, tl.num_programs(0), num_stages=STAGES):
        x = tl.load(x_ptr + c * BLOCK + offsets).to(tl.float32)
        y = tl.div_rn(x, tl.sqrt_rn(x * x + 1.0))
        tl.store(y_ptr + c * BLOCK + offsets, y.to(tl.bfloat16))


def _report():
    spec = importlib.util.spec_from_file_location("static_report",
                                                  ROOT / "bench" / "static_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["static_report"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def measure(block: int, stages: int) -> dict:
    """What the report reads from ``scale``'s loop at this chunk size and stage count."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rlvr_optim.triton_kernels import codegen

    S = _report()
    source = ASTSource(scale, {"x_ptr": "*bf16", "y_ptr": "*bf16", "chunks": "i32",
                               "BLOCK": "constexpr", "STAGES": "constexpr"},
                       constexprs={"BLOCK": block, "STAGES": stages},
                       attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=4, enable_fp_fusion=False))
    loop = codegen.hot_path(codegen.steady_state_loop(
        codegen.sass_instructions(kernel.asm["cubin"])))
    path = [S.Instruction.of(a, t) for a, t in loop]
    return {
        "loads": sorted({i.opcode for i in path if i.is_load}),
        "widest_access_bytes": max(i.global_bytes() for i in path),
        "narrowest_load_bytes": min(i.global_bytes() for i in path if i.is_load),
        "loads_overlap_math": S.loads_overlap_math(path),
    }


def main() -> int:
    cases = {"block1024-stages1": (1024, 1), "block512-stages1": (512, 1),
             "block1024-stages3": (1024, 3)}
    print(json.dumps({"triton_version": triton.__version__,
                      **{name: measure(*shape) for name, shape in cases.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
