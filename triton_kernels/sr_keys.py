"""The stochastic rounding keys of a step in one launch.

:func:`stochastic_rounding_keys` equals :func:`rlvr_optim.reference.stochastic_rounding_keys`
bit for bit: the key of tensor i is the first two words of Philox4x32-10 keyed by the seed,
on the counter (step_lo, step_hi, tensor key, ``SR_KEY_TAG``), with the same rounds,
constants and word order as the reference (whose docstring states the match with
``tl.philox``). In torch ops that derivation is ~270 small ops per step, one launch each on
a GPU; here it is one launch that reads the device step counts, so no value comes from
host memory and the step stays capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rlvr_optim.reference import PHILOX_ROUNDS, SR_KEY_TAG

__all__ = ["stochastic_rounding_keys"]

_BLOCK = 1024


@triton.jit
def _sr_keys_kernel(steps_ptr, tensor_keys_ptr, out_ptr, seed, n, TAG: tl.constexpr,
                    ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    step = tl.load(steps_ptr + offs, mask=mask, other=0).to(tl.int64)
    key = tl.load(tensor_keys_ptr + offs, mask=mask, other=0).to(tl.int64)
    c0 = (step & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = (key & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.full(offs.shape, TAG, tl.uint32)
    x0, x1, _, _ = tl.philox(seed, c0, c1, c2, c3, ROUNDS)
    tl.store(out_ptr + 2 * offs, x0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 2 * offs + 1, x1.to(tl.int64), mask=mask)


def stochastic_rounding_keys(seed: int, steps: Tensor, tensor_keys: Tensor) -> Tensor:
    """As :func:`rlvr_optim.reference.stochastic_rounding_keys`, in one launch.

    Args:
        seed: the optimizer's seed, 0 <= seed < 2**64.
        steps: tensor [n] of 1-based step counts (float or integer; truncated to int64 as
            the reference does), on the device of the launch.
        tensor_keys: int64 tensor [n] of stable per-tensor keys, on the same device.

    Returns an int64 tensor [n, 2] of (key_lo, key_hi) uint32 words.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    n = steps.numel()
    out = torch.empty(n, 2, dtype=torch.int64, device=steps.device)
    if n:
        _sr_keys_kernel[(triton.cdiv(n, _BLOCK),)](
            steps.contiguous(), tensor_keys.contiguous(), out, seed, n,
            TAG=SR_KEY_TAG, ROUNDS=PHILOX_ROUNDS, BLOCK=_BLOCK)
    return out
