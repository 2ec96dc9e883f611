"""Tests of the bit-level building blocks of rlvr_optim.reference.

bf16 and float16 conversions against torch's own casts and direct integer formulas (float16
stochastic rounding: exact share over all 16-bit draws, statistics with a negative
control), the remainder split, Philox4x32-10 against Triton's ``tl.randint4x`` (run by the interpreter on CPU) and
the Random123 known-answer vectors, the per-element stochastic-rounding draw (8 elements per
Philox call) and its statistics, the stochastic-rounding key derivation and the host scalars.
"""

import math

import numpy as np
import pytest
import torch

# conftest.py has set TRITON_INTERPRET=1 (no GPU) before this module is imported.
import triton
import triton.language as tl

from rlvr_optim import reference as R

MASK32 = 0xFFFFFFFF
SEEDS = [0, 1, 7, 2024]


# ---------------------------------------------------------------------------------------
# Helpers, independent of the module under test.
# ---------------------------------------------------------------------------------------


def _u32_to_fp32(u: np.ndarray) -> torch.Tensor:
    """fp32 tensor whose bit patterns are the uint32 values u."""
    return torch.from_numpy(np.ascontiguousarray(u, dtype=np.uint32).view(np.float32).copy())


def _bits64(u: np.ndarray) -> torch.Tensor:
    """uint32 patterns as the int64 tensor the reference works on."""
    return torch.from_numpy(np.asarray(u, dtype=np.uint32).astype(np.int64))


def _torch_bf16_bits(x: torch.Tensor) -> np.ndarray:
    """bf16 bit patterns of torch's own fp32 -> bf16 cast (round to nearest even on CPU)."""
    return x.bfloat16().view(torch.int16).numpy().view(np.uint16).astype(np.int64)


def _bf16_is_nan(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.int64)
    return ((b & 0x7F80) == 0x7F80) & ((b & 0x007F) != 0)


def _fp32_is_nan(u: np.ndarray) -> np.ndarray:
    return (np.asarray(u, dtype=np.int64) & 0x7FFFFFFF) > 0x7F800000


def _random_patterns(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)


def _edge_patterns(seed: int) -> np.ndarray:
    """Every sign and exponent, with low halves at and around the rounding boundary."""
    rng = np.random.default_rng([seed, 99])
    sign = np.array([0, 0x80000000], dtype=np.uint64)[:, None, None, None]
    exponent = (np.arange(256, dtype=np.uint64) << 23)[None, :, None, None]
    mant_hi = np.array([0, 1, 2, 0x7E, 0x7F], dtype=np.uint64)  # the 7 bf16 mantissa bits
    mant_hi = np.concatenate([mant_hi, rng.integers(0, 128, size=3, dtype=np.uint64)])
    mant_hi = (mant_hi << 16)[None, None, :, None]
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint64)
    low = np.concatenate([low, rng.integers(0, 0x10000, size=4, dtype=np.uint64)])
    low = low[None, None, None, :]
    patterns = (sign | exponent | mant_hi | low).reshape(-1)
    specials = np.array(
        [
            0x00000000, 0x80000000,  # +-0
            0x7F800000, 0xFF800000,  # +-inf
            0x7F7FFFFF, 0xFF7FFFFF,  # max finite: rounds to inf
            0x7F7F7FFF, 0x7F7F8000,  # just below / at the tie below max finite
            0x00000001, 0x80000001,  # smallest subnormals
            0x00007FFF, 0x00008000, 0x00008001, 0x00018000,  # subnormal ties
            0x80008000, 0x80018000, 0x807FFFFF, 0x007FFFFF,
            0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # normal ties, even / odd LSB
        ],
        dtype=np.uint64,
    )
    return np.concatenate([patterns, specials]).astype(np.uint32)


def _nan_patterns() -> np.ndarray:
    return np.array(
        [
            0x7FC00000, 0xFFC00000,  # canonical quiet NaNs
            0x7F800001, 0xFF800001,  # signalling NaNs whose truncation would be inf
            0x7F80FFFF, 0x7FBFFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
            0x7F808000, 0x7FC08000, 0xFF8000FF, 0x7FA12345,
        ],
        dtype=np.uint32,
    )


# ---------------------------------------------------------------------------------------
# fp32 -> bf16, nearest even
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_nearest_matches_torch_cast(seed):
    u = np.concatenate([_random_patterns(seed, 200_000), _edge_patterns(seed)])
    finite_or_inf = ~_fp32_is_nan(u)
    u = u[finite_or_inf]
    got = R.fp32_to_bf16_bits_nearest(_bits64(u)).numpy()
    expected = _torch_bf16_bits(_u32_to_fp32(u))
    bad = np.nonzero(got != expected)[0]
    assert bad.size == 0, (
        f"{bad.size} mismatches, first: fp32 {u[bad[0]]:#010x} -> got {got[bad[0]]:#06x}, "
        f"torch {expected[bad[0]]:#06x}"
    )
    # Every exponent was exercised, in both signs.
    exps = (u.astype(np.int64) >> 23) & 0x1FF
    assert np.unique(exps).size == 512


def test_nearest_known_values():
    cases = {
        0x3F808000: 0x3F80,  # tie, even LSB: down
        0x3F818000: 0x3F82,  # tie, odd LSB: up
        0xBF808000: 0xBF80,
        0xBF818000: 0xBF82,
        0x3F807FFF: 0x3F80,
        0x3F808001: 0x3F81,
        0x7F7FFFFF: 0x7F80,  # max finite -> +inf
        0xFF7FFFFF: 0xFF80,  # -max finite -> -inf
        0x7F7F7FFF: 0x7F7F,
        0x7F800000: 0x7F80,
        0xFF800000: 0xFF80,
        0x00000000: 0x0000,
        0x80000000: 0x8000,
        0x00000001: 0x0000,  # tiny subnormal -> +0
        0x80000001: 0x8000,  # -> -0
        0x00008000: 0x0000,  # subnormal tie, even
        0x00018000: 0x0002,  # subnormal tie, odd
        0x007FFFFF: 0x0080,  # largest subnormal -> smallest normal
    }
    u = np.array(list(cases), dtype=np.uint32)
    got = R.fp32_to_bf16_bits_nearest(_bits64(u)).tolist()
    assert got == list(cases.values())
    assert got == _torch_bf16_bits(_u32_to_fp32(u)).tolist()


def test_nearest_nan_is_quiet_nan():
    u = _nan_patterns()
    got = R.fp32_to_bf16_bits_nearest(_bits64(u)).numpy()
    assert np.all(_bf16_is_nan(got)), [hex(g) for g in got]
    assert np.all(got & 0x0040), "quiet bit not set"
    assert np.all((got >= 0) & (got <= 0xFFFF))
    assert torch.isnan(R.bf16_from_bits(torch.from_numpy(got))).all()
    # torch agrees that these are NaN (payloads may differ).
    assert np.all(_bf16_is_nan(_torch_bf16_bits(_u32_to_fp32(u))))


# ---------------------------------------------------------------------------------------
# fp32 -> bf16, stochastic
# ---------------------------------------------------------------------------------------

SR_VALUES = [
    0x3F800000,  # exact: low half 0
    0x3F800001,
    0x3F808000,
    0x3F80FFFF,
    0xBF80ABCD,
    0xC2F71234,
    0x00000001,  # subnormal
    0x80007FFF,
    0x7F7FFFFF,  # ceil neighbour is +inf
    0xFF7F0001,  # ceil neighbour is -inf
    0x00000000,
    0x80000000,
]


@pytest.mark.parametrize("seed", [0, 1])
def test_stochastic_exhaustive(seed):
    extra = _random_patterns(seed + 100, 4)
    extra = extra[~_fp32_is_nan(extra) & ((extra & 0x7F800000) != 0x7F800000)]
    values = np.concatenate([np.array(SR_VALUES, dtype=np.uint32), extra])
    bits = _bits64(values)[:, None]
    r = torch.arange(65536, dtype=torch.int64)[None, :]
    out = R.fp32_to_bf16_bits_stochastic(bits.expand(-1, 65536), r.expand(bits.shape[0], -1))
    for i, u in enumerate(values.tolist()):
        row = out[i]
        low16 = u & 0xFFFF
        floor = u >> 16  # truncation = the neighbour of smaller magnitude
        ceil = floor + 1  # next magnitude (sign-magnitude: +1 on the pattern in both signs)
        assert bool(((row == floor) | (row == ceil)).all()), f"{u:#010x}: not a neighbour"
        n_up = int((row == ceil).sum())
        assert n_up == low16, f"{u:#010x}: {n_up} values of r round up, expected {low16}"
        # The rounded-up draws are exactly the top low16 values of r.
        assert bool((row[65536 - low16:] == ceil).all())
        # The neighbours bracket the value in magnitude.
        x = abs(float(_u32_to_fp32(np.array([u]))[0]))
        lo = abs(float(R.bf16_bits_to_fp32(torch.tensor([floor]))[0]))
        hi = abs(float(R.bf16_bits_to_fp32(torch.tensor([ceil]))[0]))
        assert lo <= x <= hi
        if low16 == 0:
            assert lo == x


def test_stochastic_unbiased_mean():
    # Exhaustive over r the mean of the rounded value is the fp32 value exactly.
    u = np.array([0x3F80ABCD, 0xC0123456, 0x00001234], dtype=np.uint32)
    r = torch.arange(65536, dtype=torch.int64)
    for v in u.tolist():
        out = R.fp32_to_bf16_bits_stochastic(torch.full((65536,), v, dtype=torch.int64), r)
        mean = R.bf16_bits_to_fp32(out).double().mean().item()
        x = float(_u32_to_fp32(np.array([v]))[0])
        assert mean == pytest.approx(x, rel=1e-12, abs=1e-300)


def test_stochastic_inf_and_nan():
    r = torch.arange(65536, dtype=torch.int64)
    for inf in (0x7F800000, 0xFF800000):
        out = R.fp32_to_bf16_bits_stochastic(torch.full((65536,), inf, dtype=torch.int64), r)
        assert bool((out == inf >> 16).all()), f"{inf:#010x} left inf"
    for nan in _nan_patterns().tolist():
        out = R.fp32_to_bf16_bits_stochastic(torch.full((65536,), nan, dtype=torch.int64), r)
        assert np.all(_bf16_is_nan(out.numpy())), f"{nan:#010x} did not stay NaN"
        assert bool(((out & 0x0040) != 0).all())


# ---------------------------------------------------------------------------------------
# remainder split / join
# ---------------------------------------------------------------------------------------


def _ties_away(u: np.ndarray) -> np.ndarray:
    """bf16 pattern of u rounded to nearest with ties away from zero, on the magnitude."""
    u = u.astype(np.int64)
    sign = u & 0x80000000
    mag = u & 0x7FFFFFFF
    hi_mag = (mag >> 16) + ((mag & 0xFFFF) >= 0x8000)
    return (sign >> 16) | hi_mag


@pytest.mark.parametrize("seed", SEEDS)
def test_split_join_round_trip(seed):
    u = np.concatenate([_random_patterns(seed, 200_000), _edge_patterns(seed)])
    u = u[~_fp32_is_nan(u)]
    bits = _bits64(u)
    hi, rem = R.split_remainder(bits)
    assert torch.equal(R.join_remainder(hi, rem), bits)
    assert int(rem.min()) >= -32768 and int(rem.max()) <= 32767
    # The remainder fits the int16 it is stored in, and survives the round trip through it.
    assert torch.equal(R.join_remainder(hi, rem.to(torch.int16).to(torch.int64)), bits)
    assert int(hi.min()) >= 0 and int(hi.max()) <= 0xFFFF
    np.testing.assert_array_equal(hi.numpy(), _ties_away(u))
    # Against nearest-even (torch's cast): equal except at exact ties with an even LSB,
    # where ties-away is one ULP larger in magnitude.
    rne = _torch_bf16_bits(_u32_to_fp32(u))
    u64 = u.astype(np.int64)
    even_tie = ((u64 & 0xFFFF) == 0x8000) & ((u64 & 0x10000) == 0)
    differ = hi.numpy() != rne
    np.testing.assert_array_equal(differ, even_tie)
    np.testing.assert_array_equal(hi.numpy()[even_tie], rne[even_tie] + 1)
    assert even_tie.sum() > 0  # the edge set contains such ties


def test_split_known_values():
    cases = {
        # fp32 pattern: (hi, remainder)
        0x3F808000: (0x3F81, -0x8000),  # tie, even LSB: away from zero (RNE would go down)
        0x3F818000: (0x3F82, -0x8000),  # tie, odd LSB
        0xBF808000: (0xBF81, -0x8000),
        0x3F807FFF: (0x3F80, 0x7FFF),
        0x3F808001: (0x3F81, -0x7FFF),
        0xBF807FFF: (0xBF80, 0x7FFF),
        0xBF808001: (0xBF81, -0x7FFF),
        0x7F7FFFFF: (0x7F80, -1),  # max finite: hi is +inf, the remainder brings it back
        0xFF7FFFFF: (0xFF80, -1),
        0x7F800000: (0x7F80, 0),
        0xFF800000: (0xFF80, 0),
        0x00000001: (0x0000, 1),
        0x80000001: (0x8000, 1),
        0x00008000: (0x0001, -0x8000),
        0x80008000: (0x8001, -0x8000),
        0x00000000: (0x0000, 0),
        0x80000000: (0x8000, 0),
    }
    u = np.array(list(cases), dtype=np.uint32)
    bits = _bits64(u)
    hi, rem = R.split_remainder(bits)
    assert list(zip(hi.tolist(), rem.tolist())) == list(cases.values())
    assert torch.equal(R.join_remainder(hi, rem), bits)


def test_split_nan():
    u = _nan_patterns()
    hi, rem = R.split_remainder(_bits64(u))
    assert np.all(_bf16_is_nan(hi.numpy()))
    assert bool(((hi & 0x0040) != 0).all())
    assert bool((rem == 0).all())


# ---------------------------------------------------------------------------------------
# Philox4x32-10
# ---------------------------------------------------------------------------------------

# Random123 kat_vectors: philox4x32 10, counter (4 words), key (2 words) -> output (4 words).
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (MASK32, MASK32, MASK32, MASK32),
        (MASK32, MASK32),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", RANDOM123_KAT)
def test_philox_random123_known_answers(counter, key, expected):
    c = tuple(torch.tensor([w], dtype=torch.int64) for w in counter)
    out = R.philox4x32(key, c)
    got = tuple(int(w[0]) & MASK32 for w in out)
    assert got == expected, f"got {[hex(w) for w in got]}, expected {[hex(w) for w in expected]}"
    # Keys given as tensors give the same words.
    out_t = R.philox4x32(tuple(torch.tensor(k, dtype=torch.int64) for k in key), c)
    assert tuple(int(w[0]) & MASK32 for w in out_t) == expected


def test_philox_rounds_matter():
    # Negative control: fewer rounds do not reproduce the 10-round answer.
    counter, key, expected = RANDOM123_KAT[2]
    c = tuple(torch.tensor([w], dtype=torch.int64) for w in counter)
    got = tuple(int(w[0]) & MASK32 for w in R.philox4x32(key, c, rounds=9))
    assert got != expected


@triton.jit
def _randint4x_kernel(offsets_ptr, out4_ptr, out1_ptr, seed, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    offset = tl.load(offsets_ptr + i, mask=mask, other=0)
    r0, r1, r2, r3 = tl.randint4x(seed, offset)
    tl.store(out4_ptr + i * 4 + 0, r0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out4_ptr + i * 4 + 1, r1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out4_ptr + i * 4 + 2, r2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out4_ptr + i * 4 + 3, r3.to(tl.int32, bitcast=True), mask=mask)
    r = tl.randint(seed, offset)
    tl.store(out1_ptr + i, r.to(tl.int32, bitcast=True), mask=mask)


def _triton_randint(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(randint4x words [n, 4], randint [n]) as uint32 values in int64."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    offsets = offsets.to(device)
    n = offsets.numel()
    out4 = torch.full((n, 4), 0x5A5A5A5A, dtype=torch.int32, device=device)  # poisoned
    out1 = torch.full((n,), 0x5A5A5A5A, dtype=torch.int32, device=device)
    block = 64
    _randint4x_kernel[(triton.cdiv(n, block),)](offsets, out4, out1, seed, n, BLOCK=block)
    return out4.cpu().to(torch.int64) & MASK32, out1.cpu().to(torch.int64) & MASK32


def _reference_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    idx = offsets.to(torch.int64)
    zero = torch.zeros_like(idx)
    counter = (idx & MASK32, (idx >> 32) & MASK32, zero, zero)
    words = R.philox4x32((seed & MASK32, seed >> 32), counter)
    return torch.stack(words, dim=1)


PHILOX_SEEDS = [0, 1, 12345, 2**31 + 11, 2**32 + 7, 0xDEADBEEF_CAFEF00D, 2**63 + 5, 2**64 - 1]


@pytest.mark.parametrize("seed", PHILOX_SEEDS)
def test_philox_matches_triton_int32_offsets(seed):
    rng = np.random.default_rng(seed % 2**32)
    offs = np.concatenate(
        [np.arange(70), [2**31 - 1, 2**31 - 2, 2**16, 2**24 + 3], rng.integers(0, 2**31, size=50)]
    )
    offsets = torch.from_numpy(offs.astype(np.int32))
    got4, got1 = _triton_randint(seed, offsets)
    ref = _reference_randint(seed, offsets)
    assert torch.equal(got4, ref), f"seed {seed:#x}: randint4x differs from reference"
    assert torch.equal(got1, ref[:, 0]), f"seed {seed:#x}: randint differs from reference word 0"


@pytest.mark.parametrize("seed", PHILOX_SEEDS)
def test_philox_matches_triton_int64_offsets(seed):
    rng = np.random.default_rng(seed % 2**32 + 1)
    offs = np.concatenate(
        [
            np.arange(5),
            [2**32 - 1, 2**32, 2**32 + 1, 2**33 + 5, 2**40 + 2**33 + 9, 2**62, 2**63 - 1],
            rng.integers(2**32, 2**63, size=40, dtype=np.int64),
            rng.integers(0, 2**32, size=20, dtype=np.int64),
        ]
    )
    offsets = torch.from_numpy(offs.astype(np.int64))
    got4, got1 = _triton_randint(seed, offsets)
    ref = _reference_randint(seed, offsets)
    assert torch.equal(got4, ref), f"seed {seed:#x}: randint4x differs from reference"
    assert torch.equal(got1, ref[:, 0])


def test_triton_uses_both_seed_and_offset_words():
    # Controls: the high words of the seed and of a 64-bit offset both change the stream,
    # so the agreement above is not an accident of ignoring them.
    offsets = torch.arange(16, dtype=torch.int64)
    a, _ = _triton_randint(7, offsets)
    b, _ = _triton_randint(7 + 2**32, offsets)
    c, _ = _triton_randint(7 + 2**63, offsets)
    assert not torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(b, c)
    d, _ = _triton_randint(7, offsets + 2**32)
    assert not torch.equal(a, d)
    assert torch.equal(d, _reference_randint(7, offsets + 2**32))


def _triton_random16(key_lo: int, key_hi: int, index: torch.Tensor) -> torch.Tensor:
    """The spec's per-element draw built from tl.randint4x: half (i & 7) of call i >> 3."""
    words, _ = _triton_randint(key_lo | key_hi << 32, index >> 3)
    rows = torch.arange(index.numel())
    word = words[rows, (index & 7) >> 1]
    return (word >> (16 * (index & 1))) & 0xFFFF


@pytest.mark.parametrize(
    "key_lo,key_hi,first,numel",
    [
        (0x1234, 0xABCDEF01, 0, 37),
        (MASK32, 0x80000000, 2**32 - 10, 37),  # index crosses 2**32
        (7, 0, 2**35 - 13, 29),  # counter crosses 2**32: its high word is used
        (0, 1, 3, 1),  # one element, not at a multiple of 8
    ],
)
def test_random16_is_triton_randint4x_halves(key_lo, key_hi, first, numel):
    key = torch.tensor([key_lo, key_hi], dtype=torch.int64)
    r16 = R._random16(key, first, numel, torch.device("cpu"))
    index = torch.arange(first, first + numel, dtype=torch.int64)
    assert torch.equal(r16, _triton_random16(key_lo, key_hi, index))
    assert int(r16.min()) >= 0 and int(r16.max()) <= 0xFFFF


def test_random16_element_to_bits_mapping_known_answer():
    # Random123's first known answer (key 0, counter 0) serves elements 0..7: element i takes
    # word i >> 1, low half for even i. Element 8 starts the next call (counter 1).
    words = RANDOM123_KAT[0][2]
    expected = [(words[i >> 1] >> (16 * (i & 1))) & 0xFFFF for i in range(8)]
    assert expected == [0xE8D5, 0x6627, 0xC58D, 0xE169, 0xAC4C, 0xBC57, 0xDBD8, 0x9B00]
    key = torch.tensor([0, 0], dtype=torch.int64)
    r16 = R._random16(key, 0, 16, torch.device("cpu"))
    assert r16[:8].tolist() == expected
    one = tuple(torch.tensor([w]) for w in (1, 0, 0, 0))
    call1 = [int(w[0]) for w in R.philox4x32((0, 0), one)]
    assert r16[8:].tolist() == [(call1[i >> 1] >> (16 * (i & 1))) & 0xFFFF for i in range(8)]
    # Control: the old one-call-per-element draw (word 0 of counter i) is a different stream.
    assert r16[1:8].tolist() != [int(R.philox4x32((0, 0), tuple(
        torch.tensor([w]) for w in (i, 0, 0, 0)))[0][0]) & 0xFFFF for i in range(1, 8)]


@pytest.mark.parametrize("base", [0, 2**32 - 21, 2**40 + 5])
def test_random16_shard_offset_invariance(base):
    # A shard starting anywhere (not only at multiples of 8) draws the bits of the same
    # global indices as the whole tensor.
    key = torch.tensor([0x9E3779B9, 0x7F4A7C15], dtype=torch.int64)
    cpu = torch.device("cpu")
    whole = R._random16(key, base, 1000, cpu)
    for start, length in [(0, 1000), (1, 7), (3, 8), (7, 9), (8, 16), (13, 500), (993, 7),
                          (999, 1), (500, 0)]:
        shard = R._random16(key, base + start, length, cpu)
        assert torch.equal(shard, whole[start:start + length]), (start, length)
    # Control: a different key gives a different stream over the same indices.
    other = R._random16(key + torch.tensor([1, 0]), base, 1000, cpu)
    assert (other != whole).float().mean() > 0.99


def _sr_statistics_failures(rounded: torch.Tensor, value_bits: int) -> list[str]:
    """What is wrong with bf16 patterns from rounding one fp32 value at many indices
    (:func:`_share_failures` with the bf16 neighbours and share of ``value_bits``)."""
    floor = value_bits >> 16
    return _share_failures(rounded, floor, floor + 1, (value_bits & 0xFFFF) / 65536)


def _share_failures(rounded: torch.Tensor, floor: int, ceil: int, p: float) -> list[str]:
    """What is wrong with 16-bit patterns from rounding one value at many indices, whose
    neighbours are the patterns ``floor`` (smaller magnitude) and ``ceil``.

    Checks, at 5 sigma: both neighbours only; the share rounded up is ``p`` (unbiased:
    ``p`` is where the value lies between its neighbours); within each group of 8 elements
    (one Philox call) the up/down choices are independent: the number of groups whose 8
    choices agree is binomial.
    """
    if not bool(((rounded == floor) | (rounded == ceil)).all()):
        return ["not a neighbour"]
    failures = []
    up = (rounded == ceil).double()
    n = up.numel()
    if abs(up.mean().item() - p) > 5 * math.sqrt(p * (1 - p) / n):
        failures.append(f"share rounded up {up.mean().item():.5f}, expected {p:.5f}")
    groups = up.reshape(-1, 8).sum(dim=1)
    agree = ((groups == 0) | (groups == 8)).double()
    q = p**8 + (1 - p) ** 8
    if abs(agree.mean().item() - q) > 5 * math.sqrt(q * (1 - q) / agree.numel()):
        failures.append(f"{agree.mean().item():.5f} of groups of 8 agree, expected {q:.5f}")
    return failures


@pytest.mark.parametrize("value_bits", [0x3F808000, 0xBF813000, 0x4049C001])
def test_sr_statistics_with_negative_controls(value_bits):
    n = 2**17
    key = torch.tensor([0x2468ACE0, 0x13579BDF], dtype=torch.int64)
    bits = torch.full((n,), value_bits, dtype=torch.int64)
    r16 = R._random16(key, 5, n, torch.device("cpu"))  # starts off a multiple of 8
    assert _sr_statistics_failures(R.fp32_to_bf16_bits_stochastic(bits, r16), value_bits) == []
    # Negative controls, each caught by one of the checks: nearest rounding is biased, and
    # one draw shared by the 8 elements of a call makes the groups agree far too often.
    nearest = R.fp32_to_bf16_bits_nearest(bits)
    assert _sr_statistics_failures(nearest, value_bits) != []
    shared = r16.reshape(-1, 8)[:, :1].expand(-1, 8).reshape(-1)
    failures = _sr_statistics_failures(R.fp32_to_bf16_bits_stochastic(bits, shared), value_bits)
    assert any("groups of 8" in f for f in failures), failures


# ---------------------------------------------------------------------------------------
# float16: fp32 -> float16 nearest even and stochastic, float16 -> fp32
# ---------------------------------------------------------------------------------------


def _torch_fp16_bits(x: torch.Tensor) -> np.ndarray:
    """float16 bit patterns of torch's own fp32 -> float16 cast (nearest even)."""
    return x.half().view(torch.int16).numpy().view(np.uint16).astype(np.int64)


def _fp16_value(bits: int) -> float:
    """The value of a float16 pattern, by torch's float16 -> float64 conversion."""
    return float(torch.tensor([bits - 2**16 if bits >= 2**15 else bits],
                              dtype=torch.int16).view(torch.float16).double()[0])


def _fp32_value(bits: int) -> float:
    return float(_u32_to_fp32(np.array([bits]))[0])


def _fp16_edge_patterns(seed: int) -> np.ndarray:
    """Every sign and fp32 exponent, with mantissas at and around the float16 rounding
    boundary for each count of discarded bits (13 in the normal float16 range, 14 .. 24
    below it, all of them further down), even and odd kept LSB, and random mantissas."""
    rng = np.random.default_rng([seed, 16])
    mantissas = [0, 1, 0x400000, 0x7FFFFF]
    for k in range(13, 25):  # k discarded bits: the tie is bit k - 1
        tie = 1 << (k - 1)
        for lsb in (0, 1 << k):
            mantissas += [lsb | tie, lsb | (tie - 1), lsb | (tie + 1), lsb | ((1 << k) - 1)]
    mantissas = np.array(mantissas, dtype=np.uint64) & 0x7FFFFF
    mantissas = np.concatenate([mantissas, rng.integers(0, 1 << 23, size=64, dtype=np.uint64)])
    sign = np.array([0, 0x80000000], dtype=np.uint64)[:, None, None]
    exponent = (np.arange(256, dtype=np.uint64) << 23)[None, :, None]
    patterns = (sign | exponent | mantissas[None, None, :]).reshape(-1)
    return np.concatenate([patterns, np.array(list(FP16_NEAREST), dtype=np.uint64)]).astype(np.uint32)


# fp32 pattern -> float16 pattern by nearest even (torch's cast agrees, checked below).
FP16_NEAREST = {
    0x3F800000: 0x3C00,  # 1.0
    0x3F801000: 0x3C00,  # 1 + 2**-11: tie, even LSB: down
    0x3F803000: 0x3C02,  # 1 + 3 * 2**-11: tie, odd LSB: up
    0x3F801001: 0x3C01,  # just above the tie
    0xBF803000: 0xBC02,
    0x477FE000: 0x7BFF,  # 65504, the largest float16
    0x477FEFFF: 0x7BFF,  # just below the tie with 65536
    0x477FF000: 0x7C00,  # the tie rounds to even: +inf
    0xC77FF000: 0xFC00,
    0x47800000: 0x7C00,  # 2**16 and up: +inf
    0x7F7FFFFF: 0x7C00,
    0x7F800000: 0x7C00,
    0xFF800000: 0xFC00,
    0x38800000: 0x0400,  # 2**-14, the smallest normal float16
    0x387FC000: 0x03FF,  # the largest subnormal
    0x387FE000: 0x0400,  # tie between it and 2**-14, odd LSB: up
    0x33800000: 0x0001,  # 2**-24, the smallest subnormal
    0x33000000: 0x0000,  # 2**-25: tie with 0, even: down
    0x33000001: 0x0001,  # just above it (24 discarded bits, sticky)
    0x33C00000: 0x0002,  # 1.5 * 2**-24: tie, odd LSB: up
    0x32FFFFFF: 0x0000,
    0x00000001: 0x0000,  # fp32 subnormals: +0
    0x80000001: 0x8000,
    0x00000000: 0x0000,
    0x80000000: 0x8000,
}


@pytest.mark.parametrize("seed", SEEDS)
def test_fp16_nearest_matches_torch_cast(seed):
    """NaN included: the spec keeps torch's quiet NaN with the sign and top payload bits."""
    u = np.concatenate([_random_patterns(seed, 100_000), _fp16_edge_patterns(seed),
                        _nan_patterns()])
    got = R.fp32_to_fp16_bits_nearest(_bits64(u)).numpy()
    expected = _torch_fp16_bits(_u32_to_fp32(u))
    bad = np.nonzero(got != expected)[0]
    assert bad.size == 0, (
        f"{bad.size} mismatches, first: fp32 {u[bad[0]]:#010x} -> got {got[bad[0]]:#06x}, "
        f"torch {expected[bad[0]]:#06x}")
    assert np.unique((u.astype(np.int64) >> 23) & 0x1FF).size == 512  # every sign and exponent


def test_fp16_nearest_known_values():
    u = np.array(list(FP16_NEAREST), dtype=np.uint32)
    got = R.fp32_to_fp16_bits_nearest(_bits64(u)).tolist()
    assert got == list(FP16_NEAREST.values())
    assert got == _torch_fp16_bits(_u32_to_fp32(u)).tolist()


def test_fp16_nan_is_quiet_nan_with_sign_and_payload():
    u = _nan_patterns()
    r = torch.arange(65536, dtype=torch.int64)
    expected = ((u.astype(np.int64) >> 16) & 0x8000) | 0x7E00 | ((u.astype(np.int64) >> 13) & 0x3FF)
    assert R.fp32_to_fp16_bits_nearest(_bits64(u)).tolist() == expected.tolist()
    for v, e in zip(u.tolist(), expected.tolist()):
        out = R.fp32_to_fp16_bits_stochastic(torch.full((65536,), v, dtype=torch.int64), r)
        assert bool((out == e).all()), f"{v:#010x}"
    # The step's canonical NaN becomes float16's canonical quiet NaN.
    assert R.fp32_to_fp16_bits_nearest(torch.tensor([R.CANONICAL_NAN_BITS])).item() == 0x7E00


def test_fp16_to_fp32_is_exact_on_every_pattern():
    bits = torch.arange(65536, dtype=torch.int64)
    got = R.fp32_bits(R.fp16_bits_to_fp32(bits))
    torch_cast = R.fp32_bits(R.fp16_from_bits(bits).float())
    nan = ((bits & 0x7C00) == 0x7C00) & ((bits & 0x3FF) != 0)
    assert torch.equal(got[~nan], torch_cast[~nan])
    # A NaN keeps its sign and payload, unquieted (a bf16 NaN's shift does the same).
    assert torch.equal(got[nan], ((bits[nan] & 0x8000) << 16) | 0x7F800000 | ((bits[nan] & 0x3FF) << 13))
    # And back: every float16 pattern is its own nearest image (NaNs: the quiet ones).
    back = R.fp32_to_fp16_bits_nearest(got)
    assert torch.equal(back[~nan], bits[~nan])
    assert torch.equal(back[nan], bits[nan] | 0x200)


# (fp32 pattern, discarded bits): where the value lies between its float16 neighbours.
FP16_SR_VALUES = [
    (0x3F800000, 13),  # exact
    (0x3F800001, 13),
    (0x3F801000, 13),  # halfway
    (0xBF80ABCD, 13),
    (0x477FE001, 13),  # just above 65504: the neighbour above is +inf
    (0x387FE000, 14),  # largest subnormal .. 2**-14
    (0x37ABCDEF, 15),  # subnormal: 15 discarded bits, all in the window
    (0x37000001, 16),  # 2**-17 (+): 16 discarded bits
    (0x36ABCDEF, 17),  # below 2**-17: one bit beyond the window
    (0xB3000001, 24),  # about -2**-25
    (0x00000001, 40),  # fp32 subnormal: every bit discarded
]


@pytest.mark.parametrize("value_bits,discarded", FP16_SR_VALUES)
def test_fp16_stochastic_exhaustive_over_random_bits(value_bits, discarded):
    """Over all 2**16 random draws: both float16 neighbours only, and the number rounded up
    is where the value lies between them times 2**16: exact (unbiased) with at most 16
    discarded bits, below it by less than one draw (the spec's bound) with more."""
    r = torch.arange(65536, dtype=torch.int64)
    out = R.fp32_to_fp16_bits_stochastic(torch.full((65536,), value_bits, dtype=torch.int64), r)
    truncated = R.fp32_to_fp16_bits_stochastic(torch.tensor([value_bits]), torch.tensor([0])).item()
    floor, ceil = truncated, truncated + 1  # sign-magnitude: +1 is the next magnitude
    assert bool(((out == floor) | (out == ceil)).all())
    n_up = int((out == ceil).sum())
    # The rounded-up draws are the top n_up values of r.
    assert bool((out[65536 - n_up:] == ceil).all()) and bool((out[:65536 - n_up] == floor).all())
    x, lo, hi = abs(_fp32_value(value_bits)), abs(_fp16_value(floor)), abs(_fp16_value(ceil))
    assert lo <= x <= hi and (lo < hi)
    if math.isinf(hi):  # above the largest float16: up means +-inf, as for the window
        assert n_up == (value_bits & 0x1FFF) << 3
        return
    share = (x - lo) / (hi - lo) * 65536  # exact in float64: few significant bits
    if discarded <= 16:
        assert n_up == share, (n_up, share)
    else:
        assert n_up <= share < n_up + 1, (n_up, share)


def test_fp16_stochastic_overflow_and_inf():
    r = torch.arange(65536, dtype=torch.int64)
    for v, e in ((0x47800000, 0x7C00), (0xC7800000, 0xFC00), (0x7F7FFFFF, 0x7C00),
                 (0x7F800000, 0x7C00), (0xFF800000, 0xFC00)):
        out = R.fp32_to_fp16_bits_stochastic(torch.full((65536,), v, dtype=torch.int64), r)
        assert bool((out == e).all()), f"{v:#010x}"


@pytest.mark.parametrize("value_bits", [0x3F801000, 0xBF80ABCD, 0x37ABCDEF, 0x42C83000])
def test_fp16_sr_statistics_with_negative_controls(value_bits):
    """With the element draws of the spec's Philox stream: the share rounded up is where
    the value lies between its float16 neighbours (unbiased), groups of 8 independent; the
    negative control, nearest rounding, fails the same test."""
    n = 2**17
    key = torch.tensor([0x0F1E2D3C, 0x4B5A6978], dtype=torch.int64)
    bits = torch.full((n,), value_bits, dtype=torch.int64)
    r16 = R._random16(key, 2**33 + 3, n, torch.device("cpu"))
    floor = R.fp32_to_fp16_bits_stochastic(bits[:1], torch.tensor([0])).item()
    x, lo, hi = abs(_fp32_value(value_bits)), abs(_fp16_value(floor)), abs(_fp16_value(floor + 1))
    p = (x - lo) / (hi - lo)
    assert 0.0 < p < 1.0
    stochastic = R.fp32_to_fp16_bits_stochastic(bits, r16)
    assert _share_failures(stochastic, floor, floor + 1, p) == []
    mean = R.fp16_bits_to_fp32(stochastic).double().abs().mean().item()
    assert abs(mean - x) < 5 * (hi - lo) * math.sqrt(p * (1 - p) / n)
    nearest = R.fp32_to_fp16_bits_nearest(bits)
    assert any("share rounded up" in f for f in _share_failures(nearest, floor, floor + 1, p))


# ---------------------------------------------------------------------------------------
# stochastic_rounding_keys
# ---------------------------------------------------------------------------------------


def _keys(seed, steps, tensor_keys):
    return R.stochastic_rounding_keys(
        seed, torch.tensor(steps, dtype=torch.int64), torch.tensor(tensor_keys, dtype=torch.int64)
    )


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 3, 2**64 - 1])
def test_sr_keys_deterministic_and_sensitive(seed):
    steps = [1, 1, 2, 3, 2**32 + 1, 1000]
    tkeys = [0, 1, 0, 5, 5, 2**31 - 1]
    k = _keys(seed, steps, tkeys)
    assert k.shape == (6, 2) and k.dtype == torch.int64
    assert int(k.min()) >= 0 and int(k.max()) <= MASK32
    assert torch.equal(k, _keys(seed, steps, tkeys))
    # All (step, tensor key) pairs above are distinct, so are their keys.
    pairs = {tuple(row) for row in k.tolist()}
    assert len(pairs) == 6
    # Changing any one input changes every key.
    other_seed = seed ^ 1 if seed != 2**64 - 1 else seed - 2**32
    changed = [
        _keys(other_seed, steps, tkeys),
        _keys(seed, [s + 1 for s in steps], tkeys),
        _keys(seed, steps, [t + 1 for t in tkeys]),
    ]
    for c in changed:
        assert bool((c != k).any(dim=1).all())
    # The seed's high word matters.
    if seed < 2**63:
        assert bool((_keys(seed + 2**40, steps, tkeys) != k).any(dim=1).all())


def test_sr_keys_match_documented_formula():
    seed, steps, tkeys = 0x0123456789ABCDEF, [1, 2**33 + 2], [3, 4]
    k = _keys(seed, steps, tkeys)
    for i, (s, t) in enumerate(zip(steps, tkeys)):
        words = R.philox4x32(
            (seed & MASK32, seed >> 32),
            tuple(torch.tensor([w]) for w in (s & MASK32, s >> 32, t, R.SR_KEY_TAG)),
        )
        assert k[i].tolist() == [int(words[0][0]), int(words[1][0])]


def test_sr_keys_reject_bad_seeds():
    steps = torch.ones(2, dtype=torch.int64)
    tkeys = torch.arange(2, dtype=torch.int64)
    for bad in (-1, 2**64, 2**70):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
            R.stochastic_rounding_keys(bad, steps, tkeys)
    R.stochastic_rounding_keys(0, steps, tkeys)
    R.stochastic_rounding_keys(2**64 - 1, steps, tkeys)


# ---------------------------------------------------------------------------------------
# step_scalars
# ---------------------------------------------------------------------------------------


def _expected_scalars(t, lr, beta1, beta2, wd, eps):
    return [
        np.float32(lr / (1.0 - beta1**t)),
        np.float32(math.sqrt(1.0 - beta2**t)),
        np.float32(1.0 - lr * wd),
        np.float32(beta1),
        np.float32(1.0 - beta1),
        np.float32(beta2),
        np.float32(1.0 - beta2),
        np.float32(eps),
    ]


@pytest.mark.parametrize(
    "lr,beta1,beta2,wd,eps",
    [
        (1e-3, 0.9, 0.999, 0.01, 1e-8),
        (1e-6, 0.9, 0.95, 0.1, 1e-8),
        (3e-7, 0.8, 0.9999, 0.0, 1e-6),
        (0.1, 0.0, 0.5, 1.0, 1e-15),
    ],
)
def test_step_scalars(lr, beta1, beta2, wd, eps):
    ts = [1, 2, 3, 10, 100, 1000, 12345, 2**20]
    for lr_arg in (lr, torch.tensor([lr], dtype=torch.float64), torch.tensor(lr)):
        out = R.step_scalars(torch.tensor(ts, dtype=torch.int64), lr_arg, beta1, beta2, wd, eps)
        assert out.dtype == torch.float32
        assert out.shape == (len(ts), len(R.SCALAR_COLUMNS))
        # An fp32 lr tensor holds lr already rounded to fp32: that value is the input.
        lr_value = float(lr_arg.double()) if isinstance(lr_arg, torch.Tensor) else lr_arg
        expected = np.array(
            [_expected_scalars(t, lr_value, beta1, beta2, wd, eps) for t in ts], dtype=np.float32
        )
        got = out.numpy()
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), (
            f"lr={lr_arg}: got\n{got}\nexpected\n{expected}"
        )


def test_step_scalars_are_rounded_once():
    # bc2_sqrt at t=1 for beta2=0.999 is sqrt(0.001) rounded from float64, and the columns
    # follow SCALAR_COLUMNS.
    out = R.step_scalars(torch.tensor([1]), 1e-3, 0.9, 0.999, 0.01, 1e-8)[0]
    row = dict(zip(R.SCALAR_COLUMNS, out.tolist()))
    assert row["bc2_sqrt"] == float(np.float32(math.sqrt(1.0 - 0.999)))
    assert row["step_size"] == float(np.float32(1e-3 / (1.0 - 0.9)))
    assert row["one_minus_beta2"] == float(np.float32(1.0 - 0.999))
    assert row["one_minus_beta2"] != float(np.float32(1.0) - np.float32(0.999))
    assert row["eps"] == float(np.float32(1e-8))
