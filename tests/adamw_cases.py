"""The bit-exactness cases that tests/test_csrc.py (the CUDA extension and its header on
the host), tests/test_cpu_backend.py (the CPU extension) and, for its forms,
tests/test_triton_kernels.py run against the reference, so that every compiled backend
meets the same cases. Not a test module; the tests import it from their own folder."""

import numpy as np
import pytest
import torch

BETAS = (0.9, 0.999)
EPS = 1e-8

# (param dtype, master form, rounding, change_dtype): every combination the reference
# accepts (rounding only affects 16-bit params, change_dtype only fp32 params).
FP16 = torch.float16
FORMS = [
    (torch.float32, None, "nearest", torch.bfloat16),
    (torch.float32, None, "stochastic", torch.bfloat16),
    (torch.bfloat16, None, "nearest", torch.bfloat16),
    (torch.bfloat16, None, "stochastic", torch.bfloat16),
    (torch.bfloat16, "fp32", "nearest", torch.bfloat16),
    (torch.bfloat16, "fp32", "stochastic", torch.bfloat16),
    (torch.bfloat16, "remainder", "nearest", torch.bfloat16),
    (torch.float32, None, "nearest", FP16),
    (FP16, None, "nearest", torch.bfloat16),
    (FP16, None, "stochastic", torch.bfloat16),
    (FP16, "fp32", "nearest", torch.bfloat16),
    (FP16, "fp32", "stochastic", FP16),
]
FORM_IDS = ["fp32", "fp32-sr", "bf16", "bf16-sr", "master", "master-sr", "remainder",
            "fp32-image16", "fp16", "fp16-sr", "fp16-master", "fp16-master-sr"]


def other_grad_dtype(param_dtype, change_dtype):
    """A grad dtype other than the param's that every backend reads: fp32 beside a 16-bit
    param, the 16-bit format of its change image beside an fp32 param."""
    return change_dtype if param_dtype == torch.float32 else torch.float32

# Which fp32 patterns the all-patterns rounding tests sweep: "sample" in the default run,
# "all" (every one of the 2**32) in the exhaustive one.
PATTERN_SWEEPS = ["sample", pytest.param("all", marks=pytest.mark.exhaustive)]


def fp32_pattern_runs(which: str) -> list[tuple[int, int]]:
    """(first, count) runs of consecutive fp32 bit patterns (unsigned). ``"all"``: the
    2**32 patterns in runs of 2**24. ``"sample"`` (12.8M patterns, 0.3% of them): for each
    sign and each of the 256 exponents, 2**13 patterns at the lowest mantissas, around the
    middle one and at the highest, so every value of the 13 bits fp32 -> float16 rounding
    drops meets every exponent (zeros, subnormals, Inf and NaNs included); and for the
    exponents whose float16 result is subnormal or at its edge (101 to 113, where more bits
    are dropped), 2**13 patterns around each power of two from 2**13 to 2**22 of the
    mantissa, where a tie sits when that many bits are dropped."""
    if which == "all":
        return [(first, 1 << 24) for first in range(0, 2**32, 1 << 24)]
    if which != "sample":
        raise ValueError(f"which: 'all' or 'sample', got {which!r}")
    runs = []
    for sign in (0, 1 << 31):
        for exponent in range(256):
            base = sign | exponent << 23
            starts = [0, (1 << 22) - (1 << 12), (1 << 23) - (1 << 13)]
            if 101 <= exponent <= 113:
                starts += [(1 << k) - (1 << 12) for k in range(13, 23)]
            for start in sorted(starts):  # overlapping runs merged
                last = runs[-1] if runs and runs[-1][0] >= sign else None  # one sign
                if last is not None and last[0] + last[1] >= base + start:
                    runs[-1] = (last[0], base + start + (1 << 13) - last[0])
                else:
                    runs.append((base + start, 1 << 13))
    return runs


def fp16_edge_patterns() -> np.ndarray:
    """fp32 patterns at the float16 rounding edges (uint32): both signs; fp32 exponents of
    zero and the fp32 subnormals, of float16's subnormal range (2**-25 .. 2**-15: 14 to 24
    discarded bits), its normal range's ends and overflow (2**15 .. 2**16), and 1.0;
    mantissas at, around and between ties with even and odd kept LSB; specials (inf, NaN,
    65504, 65520)."""
    exponents = np.array([0, 1, *range(101, 115), 0x7F, 141, 142, 143, 0xFE], dtype=np.uint64)
    mantissas = [0, 1, 0x7FFFFF]
    for k in (13, 14, 16, 17, 24):  # discarded bits: the tie is bit k - 1
        tie = 1 << (k - 1)
        for lsb in (0, 1 << k):
            mantissas += [lsb | tie, lsb | (tie - 1), lsb | (tie + 1)]
    mantissas = np.array(mantissas, dtype=np.uint64) & 0x7FFFFF
    sign = np.array([0, 0x80000000], dtype=np.uint64)
    grid = (sign[:, None, None] | (exponents << 23)[None, :, None]
            | mantissas[None, None, :]).reshape(-1)
    specials = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0xFF812345, 0x477FE000,
                         0x477FF000, 0xC77FF000, 0x477FEFFF, 0x387FE000, 0x33000000],
                        dtype=np.uint64)
    return np.concatenate([grid, specials]).astype(np.uint32)


FEATURES = {
    "plain": {},
    "amsgrad-freeze-nonfinite-scale": dict(amsgrad=True, freeze=True, nonfinite=True,
                                           grad_scale=3.0),
    "maximize-skip-offset-othergrad": dict(
        maximize=True, freeze=True, nonfinite=True, found_inf=(0.0, 1.0, 0.0),
        # Not a multiple of 8, so a group of 8 elements spans two Philox calls, and the
        # counter (index >> 3) crosses 2**32: its high word matters.
        element_offset=2**35 - 603,
        other_grad_dtype=True,
    ),
    "untracked-amsgrad": dict(amsgrad=True, track=False, nonfinite=True),
    # torch's Adam: the weight decay an L2 term in the gradient.
    "adam-l2": dict(l2_decay=True, amsgrad=True, freeze=True, nonfinite=True, maximize=True),
}


STATE_DTYPES = [torch.float32, torch.bfloat16]
STATE_IDS = ["m-fp32", "m-bf16"]


def matrix(sizes, *, sizes_per_case=1, shift=0):
    """The bit-exactness matrix, (form, state dtype, feature set, numel), as pytest params:
    the whole cross product, of which the default run keeps a covering design and
    ``pytest -m exhaustive`` runs the rest (tests/conftest.py). Kept: every form x state
    dtype x feature set, each with ``sizes_per_case`` of ``sizes``, rotated so that every
    form, every state dtype and every feature set meets every size (``shift`` turns the
    rotation, so that two backends that share code keep different cases)."""
    n = len(sizes)
    params = []
    for i, (form, form_id) in enumerate(zip(FORMS, FORM_IDS)):
        for s, (state_dtype, state_id) in enumerate(zip(STATE_DTYPES, STATE_IDS)):
            for f, features in enumerate(FEATURES):
                first = i + len(FEATURES) * s + f + shift
                kept = {(first + k * n // sizes_per_case) % n for k in range(sizes_per_case)}
                for j, numel in enumerate(sizes):
                    params.append(pytest.param(
                        form, state_dtype, features, numel,
                        id=f"{form_id}-{state_id}-{features}-{numel}",
                        marks=() if j in kept else pytest.mark.exhaustive))
    return params


def layouts(features_sets=FEATURES):
    """(form, state dtype, feature set of ``features_sets``) as pytest params, for a
    matrix that runs every size in one call: the whole cross product, of which the default
    run keeps every form x feature set once, with the state dtypes alternating so that
    every form and every feature set meets both; ``pytest -m exhaustive`` runs the other
    half."""
    params = []
    for i, (form, form_id) in enumerate(zip(FORMS, FORM_IDS)):
        for s, (state_dtype, state_id) in enumerate(zip(STATE_DTYPES, STATE_IDS)):
            for f, features in enumerate(features_sets):
                params.append(pytest.param(
                    form, state_dtype, features, id=f"{form_id}-{state_id}-{features}",
                    marks=() if (i + f) % len(STATE_DTYPES) == s else pytest.mark.exhaustive))
    return params


def poison(state, gen):
    """Garbage in the outputs the step only writes."""
    if "change_bitmap" in state:
        b = state["change_bitmap"]
        b.copy_(torch.randint(0, 256, b.shape, generator=gen, dtype=torch.uint8))
    if "counters" in state:
        state["counters"].copy_(torch.randint(-(2**40), 2**40, (3,), generator=gen))


def grad(gen, numel, dtype, device="cpu", scale=1.0, nonfinite=False):
    """Fresh grads with exact zeros and, with nonfinite, NaN / +inf / -inf at random
    elements of every step (NaNs of both signs meet: the spec makes computed NaNs canonical)."""
    g = torch.randn(numel, generator=gen) * 0.1 * scale
    g[torch.rand(numel, generator=gen) < 0.03] = 0.0
    if nonfinite:
        u = torch.rand(numel, generator=gen)
        g[u < 0.02] = float("nan")
        g[(u >= 0.02) & (u < 0.03)] = -float("nan")
        g[(u >= 0.03) & (u < 0.04)] = float("inf")
        g[(u >= 0.04) & (u < 0.05)] = -float("inf")
    return g.to(dtype).to(device)


def call(adamw, states, grads, **kwargs):
    """One call of a backend over lists built from per-tensor state dicts."""
    def listed(key):
        values = [s.get(key) for s in states]
        return None if all(v is None for v in values) else values

    adamw(
        [s["param"] for s in states], grads,
        [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        max_exp_avg_sqs=listed("max_exp_avg_sq") if kwargs.get("amsgrad") else None,
        masters=listed("master"), remainders=listed("remainder"),
        freeze_masks=[s.get("freeze_mask") for s in states],
        change_bitmaps=listed("change_bitmap"), cumulative_bitmaps=listed("cumulative_bitmap"),
        counters=listed("counters"), **kwargs,
    )


def bits(t):
    """A float tensor's bit patterns (bf16 and float16 as int16, fp32 as int32); other
    tensors as they are."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


def assert_same_bits(name, expected, got):
    """torch.equal on bit patterns (NaN payloads included: the spec makes them canonical)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, name
    e, g = bits(expected).reshape(-1).cpu(), bits(got).reshape(-1).cpu()
    if not torch.equal(e, g):
        bad = (e != g).nonzero().reshape(-1)
        mask = 2 ** (8 * e.element_size()) - 1
        show = [(i, hex(int(e[i]) & mask), hex(int(g[i]) & mask)) for i in bad[:4].tolist()]
        raise AssertionError(f"{name}: {bad.numel()} of {e.numel()} differ; "
                             f"(index, reference, got): {show}")


def compare(ref, got, label):
    """Every tensor of the state dict ``ref`` bit for bit against the same key of ``got``."""
    for key in ref:
        assert_same_bits(f"{label}: {key}", ref[key], got[key])
