"""The CPU backend (rlvr_optim.cpu_backend, the extension rlvr_optim._cpu): bit for bit the
reference in every mode, dtype and odd size, with every instruction set built here;
``auto`` picks it for CPU tensors, and falls back to the reference, saying so once, when
the extension cannot be built."""

import inspect
import itertools
import warnings

import numpy as np
import pytest
import torch

from rlvr_optim import AdamW, backends, cpu_backend, extensions
from rlvr_optim import reference as R

from adamw_cases import (BETAS, EPS, FEATURES, PATTERN_SWEEPS, fp16_edge_patterns,
                         fp32_pattern_runs, matrix, other_grad_dtype)
from adamw_cases import assert_same_bits as _assert_same_bits
from adamw_cases import bits as _bits
from adamw_cases import compare as _compare
from adamw_cases import call as _call
from adamw_cases import grad as _grad
from adamw_cases import poison as _poison

SIZES = [1, 7, 8, 33, 4099, 3 * (1 << 15) + 13]  # the last spans four OpenMP work items
SEEDS = [0, 1]
STEPS = 3


@pytest.fixture(scope="module")
def ext():
    reason = cpu_backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return cpu_backend.load_extension()


# OpenMP threads of the backend's calls in the tests that pin an instruction set: work
# items run side by side (the largest size is four of them) even where the test run gives
# torch one intra-op thread (tests/conftest.py, under pytest-xdist).
BACKEND_THREADS = 3


@pytest.fixture(params=["avx2", "generic"])
def isa(request, ext, monkeypatch):
    """Runs the backend with one instruction set's build (the best one is the default)."""
    if request.param not in ext.ISAS:
        pytest.skip(f"{request.param} is not built or not supported by this CPU")
    step = ext.step

    class Pinned:
        ISAS = (request.param,)

        def __getattr__(self, name):
            return getattr(ext, name)

        @staticmethod
        def step(_isa, *args):
            # the last argument is the OpenMP team: at least BACKEND_THREADS
            return step(request.param, *args[:-1], max(args[-1], BACKEND_THREADS))

    monkeypatch.setattr(extensions.CPU, "module", Pinned())
    return request.param


def _values(gen, numel, dtype, scale=1.0, nonneg=False):
    x = torch.randn(numel, generator=gen) * scale
    if nonneg:
        x = x.abs()
    x[torch.rand(numel, generator=gen) < 0.05] = 0.0
    return x.to(dtype)


def _bytes(gen, count):
    return torch.randint(0, 256, (count,), generator=gen, dtype=torch.uint8)


def _make_state(gen, numel, param_dtype, state_dtype, master, *, amsgrad, freeze, track):
    nbytes = (numel + 7) // 8
    s = {
        "param": _values(gen, numel, param_dtype),
        "exp_avg": _values(gen, numel, state_dtype, 0.05),
        "exp_avg_sq": _values(gen, numel, state_dtype, 1e-3, nonneg=True),
    }
    if track:
        s["change_bitmap"] = torch.zeros(nbytes, dtype=torch.uint8)
        s["cumulative_bitmap"] = _bytes(gen, nbytes)  # padding bits too
        s["counters"] = torch.zeros(3, dtype=torch.int64)
    if amsgrad:
        extra = _values(gen, numel, torch.float32, 1e-5, nonneg=True)
        s["max_exp_avg_sq"] = (s["exp_avg_sq"].float() + extra).to(state_dtype)
    if master is not None:
        p = s["param"].float()
        w = p + torch.randn(numel, generator=gen) * p.abs() * 2.0**-8
        if master == "fp32":
            s["master"] = w
        else:
            hi, remainder = R.split_remainder(R.fp32_bits(w))
            s["param"] = R.bf16_from_bits(hi)
            s["remainder"] = remainder.to(torch.int16)
    if freeze:
        s["freeze_mask"] = _bytes(gen, nbytes)
    return s


@pytest.mark.parametrize("form,state_dtype,features,numel", matrix(SIZES))
def test_matches_reference_bit_for_bit(isa, form, state_dtype, features, numel):
    param_dtype, master, rounding, change_dtype = form
    f = FEATURES[features]
    track = f.get("track", True)
    grad_dtype = param_dtype
    if f.get("other_grad_dtype"):
        grad_dtype = other_grad_dtype(param_dtype, change_dtype)
    changed_total = 0
    for seed in SEEDS:
        gen = torch.Generator().manual_seed(seed * 7919 + numel)
        lr, weight_decay = [(1e-2, 0.1), (2e-3, 0.01)][seed % 2]
        ref = _make_state(gen, numel, param_dtype, state_dtype, master,
                          amsgrad=f.get("amsgrad", False), freeze=f.get("freeze", False),
                          track=track)
        got = {k: v.clone() for k, v in ref.items()}
        scale = f.get("grad_scale")
        for step in range(1, STEPS + 1):
            grad = _grad(gen, numel, grad_dtype, "cpu", scale or 1.0, f.get("nonfinite", False))
            steps = torch.tensor([step])
            found_inf = f.get("found_inf")
            kwargs = dict(
                scalars=R.step_scalars(steps, lr, *BETAS, weight_decay, EPS,
                                       decoupled_weight_decay=not f.get("l2_decay", False)),
                rounding=rounding, amsgrad=f.get("amsgrad", False),
                sr_keys=(R.stochastic_rounding_keys(1000 + seed, steps, torch.tensor([17]))
                         if rounding == "stochastic" else None),
                element_offsets=[f["element_offset"]] if "element_offset" in f else None,
                maximize=f.get("maximize", False),
                decoupled_weight_decay=not f.get("l2_decay", False),
                grad_scale=torch.tensor(scale) if scale else None,
                found_inf=torch.tensor(found_inf[step - 1]) if found_inf else None,
                change_dtype=change_dtype,
            )
            _poison(ref, gen)
            _poison(got, gen)
            _call(R.adamw, [ref], [grad.clone()], **kwargs)
            _call(cpu_backend.adamw, [got], [grad.clone()], **kwargs)
            _compare(ref, got, f"{isa} seed {seed} step {step}")
            if track:
                changed_total += int(ref["counters"][0])
    if numel >= 33 and track:
        assert changed_total > 0  # the comparison saw 16-bit changes


def _random_patterns(gen, t, share):
    """``t`` with a ``share`` of its elements replaced by uniformly random bit patterns:
    NaNs of every sign and payload, infinities, subnormals and huge values among them."""
    bits = _bits(t).clone()
    width = 16 if t.dtype == torch.bfloat16 else 32
    lo, hi = -(2 ** (width - 1)), 2 ** (width - 1)
    pick = torch.rand(t.numel(), generator=gen) < share
    noise = torch.randint(lo, hi, (t.numel(),), generator=gen, dtype=torch.int64)
    bits[pick] = noise[pick].to(bits.dtype)
    return bits.view(t.dtype)


def _signed(bits, width):
    return bits - (1 << width) if bits >= 1 << (width - 1) else bits


_EDGE_NANS = {
    torch.float32: [_signed(b, 32) for b in (
        0x7F800001, 0x7F80FFFF, 0x7FBF8000, 0x7FBFFFFF, 0x7FC00001, 0x7FC08000, 0x7FC08001,
        0x7FC0FFFF, 0x7FFFFFFF, 0xFF800001, 0xFFC00000, 0xFFFFFFFF)],
    torch.bfloat16: [_signed(b, 16) for b in (0x7F81, 0x7FBF, 0x7FC0, 0x7FC1, 0x7FFF, 0xFF81, 0xFFC0)],
}


# The default layouts (every stream bf16, or every stream fp32; nearest rounding, or
# stochastic for bf16; no freeze mask, no amsgrad, no grad_scale or maximize) have a loop
# of their own on AVX2; sizes around its 16- and 8-element groups, its 512-element blocks
# of random bits and the spec loop that finishes a tensor. Under stochastic rounding an
# element offset that is not a multiple of 8 (a group's bits then come from two Philox
# calls), one whose Philox counters cross 2**32, and two keys.
@pytest.mark.parametrize("numel", [15, 16, 17, 31, 513, 4099, 3 * (1 << 15) + 13])
@pytest.mark.parametrize("track", [True, False], ids=["track", "untracked"])
@pytest.mark.parametrize("dtype, rounding", [
    (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic"), (torch.float32, "nearest")],
    ids=["bf16", "bf16-sr", "fp32"])
def test_default_layouts_match_reference_on_every_bit_pattern(isa, dtype, rounding, track,
                                                              numel):
    gen = torch.Generator().manual_seed(numel * 31 + (dtype == torch.float32))
    offset = [5, 2**35 - 8 * 20 - 3][numel % 2] if rounding == "stochastic" else 0
    ref = _make_state(gen, numel, dtype, dtype, None, amsgrad=False, freeze=False, track=track)
    for key in ("param", "exp_avg", "exp_avg_sq"):
        ref[key] = _random_patterns(gen, ref[key], 0.1)
    got = {k: v.clone() for k, v in ref.items()}
    for step, found_inf in enumerate([None, 0.0, 1.0, None], start=1):
        # Stored NaN params whose bf16 image is (or, rounded as a number, would be) the
        # canonical NaN's or a neighbour: random patterns rarely hit these.
        edges = _EDGE_NANS[dtype]
        at = torch.arange(len(edges)) * 7 % numel
        for state in (ref, got):
            _bits(state["param"])[at] = torch.tensor(edges, dtype=torch.int64).to(
                _bits(state["param"]).dtype)
        grad = _random_patterns(gen, _grad(gen, numel, dtype), 0.1)
        grad[[3, 11]] = torch.tensor([float("inf"), float("nan")], dtype=dtype)
        steps = torch.tensor([step])
        kwargs = dict(scalars=R.step_scalars(steps, [1e-2, 1.0][step % 2], *BETAS, 0.1, EPS),
                      found_inf=None if found_inf is None else torch.tensor(found_inf),
                      rounding=rounding, element_offsets=[offset],
                      sr_keys=(R.stochastic_rounding_keys(3 + numel % 2, steps, torch.tensor([9]))
                               if rounding == "stochastic" else None))
        _poison(ref, gen)
        _poison(got, gen)
        _call(R.adamw, [ref], [grad.clone()], **kwargs)
        _call(cpu_backend.adamw, [got], [grad.clone()], **kwargs)
        _compare(ref, got, f"{isa} step {step}")
        if track and numel >= 16 and found_inf != 1.0:
            assert int(ref["counters"][0]) > 0  # the comparison saw bf16 changes
            assert int(ref["counters"][2]) >= 2  # and non-finite gradients


# Every layout the AVX2 build's eight-element loop has, in one call per (master form,
# rounding) and per set of grad options: param, grad and state dtypes, an amsgrad maximum
# or not, a freeze mask or not, tracking or not (one of three sets of outputs), per tensor.
# Sizes around the 8-element groups, the loop's 512-element blocks and the 32768-element
# work items; element offsets of every residue mod 8 (a group's random bits then come from
# two Philox calls) and one whose Philox counters cross 2**32 within a block; random bit
# patterns in every stream (NaNs of every payload, infinities, subnormals, huge values)
# and non-finite grads. The generic build runs the spec loop in every layout, which
# test_matches_reference_bit_for_bit covers.
_LAYOUT_SIZES = [1, 7, 8, 9, 15, 16, 17, 33, 255, 511, 512, 513, 1031, 4099]
_LAYOUT_LARGE = (1 << 15) + 517  # two work items: one tensor per call (bf16, amsgrad, frozen)
_LAYOUT_OFFSETS = [0, 3, 5, 8, 1, 7, 2**35 - 8 * 20 - 3, 6, 2, 4, 16 * 1024 + 5]
_TRACKED = [("change_bitmap", "cumulative_bitmap", "counters"), ("cumulative_bitmap", "counters"),
            ("change_bitmap",)]


def _layout_state(gen, numel, param_dtype, grad_dtype, state_dtype, master, amsgrad, freeze,
                  tracking):
    sixteen = param_dtype in (torch.bfloat16, torch.float16)  # a master needs a 16-bit param
    s = _make_state(gen, numel, param_dtype, state_dtype, master if sixteen else None,
                    amsgrad=amsgrad, freeze=freeze, track=True)
    for key in ("change_bitmap", "cumulative_bitmap", "counters"):
        if key not in tracking:
            s.pop(key)
    for key in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master"):
        if key in s:
            s[key] = _random_patterns(gen, s[key], 0.03)
    if "remainder" in s:  # every int16 is a remainder
        s["remainder"] = torch.randint(-(2**15), 2**15, (numel,), generator=gen,
                                       dtype=torch.int16)
    return s, grad_dtype


def _no_reference_step(*args, **kwargs):
    raise AssertionError("the CPU backend stepped a tensor with the reference")


def _step_layouts_against_the_reference(isa, gen, ref, grad_dtypes, combos, rounding,
                                        grad_options, change_dtype) -> int:
    """STEPS steps of the states ``ref`` (and of copies, through the CPU loops only: a
    tensor the loops do not take fails) on random grads of ``grad_dtypes``, compared after
    each step; the number of stored values the steps changed (the reference's counters)."""
    got = [{key: v.clone() for key, v in s.items()} for s in ref]
    n = len(ref)
    offsets = [_LAYOUT_OFFSETS[k % len(_LAYOUT_OFFSETS)] for k in range(n)]
    changed = 0
    for step in range(1, STEPS + 1):
        steps = torch.full((n,), step)
        grads = [_random_patterns(gen, _grad(gen, s["param"].numel(), g, nonfinite=True), 0.02)
                 for s, g in zip(ref, grad_dtypes)]
        kwargs = dict(scalars=R.step_scalars(steps, [1e-2, 3e-3, 1.0][step - 1], *BETAS, 0.1, EPS),
                      amsgrad=True, rounding=rounding, element_offsets=offsets,
                      change_dtype=change_dtype,
                      sr_keys=(R.stochastic_rounding_keys(11, steps, torch.arange(n) + 5)
                               if rounding == "stochastic" else None))
        if grad_options == "scale-maximize-l2":  # rlvr_optim.Adam's L2 term as well
            kwargs.update(grad_scale=torch.tensor(0.37), maximize=True,
                          decoupled_weight_decay=False)
        elif grad_options == "skip":
            kwargs.update(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(float(step == 2)))
        for states in (ref, got):
            for s in states:
                _poison(s, gen)
        _call(R.adamw, ref, [g.clone() for g in grads], **kwargs)
        with pytest.MonkeyPatch.context() as mp:  # every tensor through the loops
            mp.setattr(cpu_backend.reference, "step_tensor", _no_reference_step)
            _call(cpu_backend.adamw, got, [g.clone() for g in grads], **kwargs)
        for k, (s_ref, s_got) in enumerate(zip(ref, got)):
            _compare(s_ref, s_got, f"{isa} step {step} tensor {k} {combos[k]}")
            if "counters" in s_ref:
                changed += int(s_ref["counters"][0])
    return changed


@pytest.mark.parametrize("isa", ["avx2"], indirect=True)
@pytest.mark.parametrize("grad_options", ["plain", "scale-maximize-l2", "skip"])
@pytest.mark.parametrize("master, rounding", [
    (None, "nearest"), (None, "stochastic"), ("fp32", "nearest"), ("fp32", "stochastic"),
    ("remainder", "nearest")], ids=["nearest", "stochastic", "master", "master-sr", "remainder"])
def test_every_layout_in_one_call_on_random_patterns(isa, master, rounding, grad_options):
    gen = torch.Generator().manual_seed(len(grad_options) * 101 + len(rounding) + 7 * len(master or ""))
    dtypes = [torch.bfloat16, torch.float32]
    combos = list(itertools.product(dtypes, dtypes, dtypes, *[[False, True]] * 3))
    ref, grad_dtypes = [], []
    for k, (param, grad, state, amsgrad, freeze, track) in enumerate(combos):
        tracking = _TRACKED[k % len(_TRACKED)] if track else ()
        numel = _LAYOUT_SIZES[k % len(_LAYOUT_SIZES)] if k != 15 else _LAYOUT_LARGE
        s, g = _layout_state(gen, numel, param, grad, state, master, amsgrad, freeze, tracking)
        ref.append(s)
        grad_dtypes.append(g)
    changed = _step_layouts_against_the_reference(
        isa, gen, ref, grad_dtypes, combos, rounding, grad_options, torch.bfloat16)
    assert changed > 0  # the comparison saw bf16 changes


def test_many_tensors_of_mixed_layouts_in_one_call(isa):
    """One call over tensors of every dtype layout, missing entries, views the loop cannot
    take (stepped by the reference) and grads of other dtypes; several steps."""
    gen = torch.Generator().manual_seed(5)
    specs = [  # (numel, param, state, grad, master)
        (4099, torch.bfloat16, torch.bfloat16, torch.bfloat16, "fp32"),
        (33, torch.bfloat16, torch.float32, torch.float32, None),
        (1, torch.float32, torch.float32, torch.bfloat16, None),
        (70000, torch.float32, torch.bfloat16, torch.float32, None),
        (8, torch.bfloat16, torch.float32, torch.float16, "fp32"),
        (515, torch.bfloat16, torch.bfloat16, torch.float64, None),
    ]
    ref = []
    for numel, param, state, _, master in specs:
        ref.append(_make_state(gen, numel, param, state, master, amsgrad=True, freeze=True,
                               track=True))
    ref[1]["max_exp_avg_sq"] = None  # amsgrad with a missing entry: plain Adam for it
    ref[2].pop("freeze_mask")
    # A param that is a transposed (not contiguous) view goes through the reference.
    ref[5]["param"] = ref[5]["param"][:510].reshape(30, 17).t()
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        ref[5][key] = ref[5][key][:510].reshape(17, 30)
    ref[5]["change_bitmap"] = ref[5]["change_bitmap"][:64]
    ref[5]["cumulative_bitmap"] = ref[5]["cumulative_bitmap"][:64]
    ref[5]["freeze_mask"] = ref[5]["freeze_mask"][:64]
    got = [{k: (v.clone() if v is not None and not k == "param" else v) for k, v in s.items()}
           for s in ref]
    for s_ref, s_got in zip(ref, got):
        s_got["param"] = s_ref["param"].clone() if s_ref["param"].is_contiguous() else \
            s_ref["param"].t().clone().t()
    n = len(specs)
    offsets = [0, 5, 2**33 + 3, 11, 1, 0]
    for step in range(1, STEPS + 1):
        steps = torch.full((n,), step)
        grads = [_grad(gen, s["param"].numel(), g, nonfinite=True).reshape(s["param"].shape)
                 for s, (_, _, _, g, _) in zip(ref, specs)]
        kwargs = dict(scalars=R.step_scalars(steps, 1e-2, *BETAS, 0.1, EPS), amsgrad=True,
                      rounding="stochastic",
                      sr_keys=R.stochastic_rounding_keys(3, steps, torch.arange(n)),
                      element_offsets=offsets)
        for states in (ref, got):
            for s in states:
                _poison(s, gen)
        _call(R.adamw, ref, [g.clone() for g in grads], **kwargs)
        _call(cpu_backend.adamw, got, [g.clone() for g in grads], **kwargs)
        for i, (s_ref, s_got) in enumerate(zip(ref, got)):
            _compare({k: v for k, v in s_ref.items() if v is not None}, s_got,
                     f"{isa} step {step} tensor {i}")


def test_negative_control_wrong_element_offset_is_caught(ext):
    """The comparison can fail: another element offset draws other random bits."""
    numel = 2000
    gen = torch.Generator().manual_seed(1)
    ref = _make_state(gen, numel, torch.bfloat16, torch.float32, "fp32", amsgrad=False,
                      freeze=False, track=True)
    got = {k: v.clone() for k, v in ref.items()}
    grad = _grad(gen, numel, torch.bfloat16)
    steps = torch.tensor([1])
    kwargs = dict(scalars=R.step_scalars(steps, 1e-2, *BETAS, 0.0, EPS), rounding="stochastic",
                  sr_keys=R.stochastic_rounding_keys(4, steps, torch.tensor([2])))
    _call(R.adamw, [ref], [grad.clone()], element_offsets=[0], **kwargs)
    _call(cpu_backend.adamw, [got], [grad.clone()], element_offsets=[8], **kwargs)
    with pytest.raises(AssertionError, match="param"):
        _compare(ref, got, "offset")


def test_signature_is_the_reference_signature():
    assert inspect.signature(cpu_backend.adamw) == inspect.signature(R.adamw)


def test_repeated_calls_check_once_and_follow_new_grads(ext, monkeypatch):
    """A step with the tensors of the last call reuses its checks; new grad objects
    (other addresses, other dtype) get tables of their own, never a stale address."""
    gen = torch.Generator().manual_seed(2)
    ref = _make_state(gen, 100, torch.bfloat16, torch.float32, None, amsgrad=False,
                      freeze=False, track=True)
    got = {k: v.clone() for k, v in ref.items()}
    checked = []
    check = cpu_backend.planner._check
    monkeypatch.setattr(cpu_backend.planner, "_check",
                        lambda *a: checked.append(1) or check(*a))
    for step, dtype in ((1, torch.bfloat16), (2, torch.bfloat16), (3, torch.float32)):
        grad = _grad(gen, 100, dtype)
        steps = torch.tensor([step])
        kwargs = dict(scalars=R.step_scalars(steps, 1e-2, *BETAS, 0.0, EPS))
        _call(R.adamw, [ref], [grad.clone()], **kwargs)
        _call(cpu_backend.adamw, [got], [grad.clone()], **kwargs)
        _compare(ref, got, f"step {step}")
    assert len(checked) == 1  # the first call; the other grads pass the bulk checks


@pytest.mark.parametrize("overrides, error, match", [
    (dict(params=[torch.zeros(8, dtype=torch.float64)]), TypeError, r"params\[0\].*float64"),
    (dict(exp_avgs=[torch.zeros(9)]), ValueError, r"exp_avgs\[0\] has 9 elements"),
    (dict(counters=[torch.zeros(3, dtype=torch.int32)]), TypeError, r"counters\[0\]"),
    (dict(grads=[torch.zeros(8, dtype=torch.int64)]), TypeError, r"grads\[0\].*floating"),
    (dict(element_offsets=[-1]), ValueError, r"element_offsets\[0\].*-1"),
])
def test_bad_inputs_name_the_tensor_and_touch_nothing(ext, overrides, error, match):
    args = dict(params=[torch.randn(8)], grads=[torch.randn(8)], exp_avgs=[torch.zeros(8)],
                exp_avg_sqs=[torch.zeros(8)],
                scalars=R.step_scalars(torch.tensor([1]), 1e-3, *BETAS, 0.0, EPS))
    args.update(overrides)
    before = [t.clone() for t in args["params"]]
    with pytest.raises(error, match=match):
        cpu_backend.adamw(args.pop("params"), args.pop("grads"), args.pop("exp_avgs"),
                          args.pop("exp_avg_sqs"), **args)
    assert all(torch.equal(a, b) for a, b in zip(before, overrides.get("params", before)))


def test_auto_picks_the_cpu_backend_for_cpu_tensors(ext):
    assert "cpu" in backends.BACKENDS
    assert backends.select("auto", torch.device("cpu")) is cpu_backend
    assert backends.select("cpu", torch.device("cpu")) is cpu_backend
    p = torch.nn.Parameter(torch.randn(40).bfloat16())
    p.grad = torch.randn(40).bfloat16()
    opt = AdamW([p], lr=1e-2)
    calls = []
    original = cpu_backend._run  # what the optimizer's kept plan calls (cpu_backend.prepare)

    def recording(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    cpu_backend._run = recording
    try:
        opt.step()
    finally:
        cpu_backend._run = original
    assert calls == [1]


def test_auto_falls_back_to_the_reference_with_one_warning(monkeypatch):
    """No prebuilt module and no compiler: ``auto`` warns once and runs the reference;
    ``cpu`` itself says why it is unavailable."""
    monkeypatch.setattr(extensions.CPU, "module", None)
    monkeypatch.setattr(extensions.CPU, "failure", None)
    monkeypatch.setattr(extensions.CPU, "prebuilt", lambda: None)
    monkeypatch.setattr(cpu_backend, "_warned", False)
    monkeypatch.setattr(extensions, "cpu_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="runs the reference"):
        assert backends.select("auto", torch.device("cpu")) is R
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("auto", torch.device("cpu")) is R  # said once only
    assert "no C++ compiler" in backends.unavailable_reason("cpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available.*C\\+\\+ compiler"):
        backends.check_backend("cpu")


# ---------------------------------------------------------------------------------------
# float16 in the AVX2 loops: which loop steps them, their conversions on every pattern,
# every float16 layout in one call, and float16's rounding edges through the whole step.
# ---------------------------------------------------------------------------------------

_FP16_BITS = ("param_fp16", "image_fp16", "grad_fp16")


def _layout_codes(ext, *names):
    """Every layout code (without alignment bits) that sets one of the bits ``names``."""
    bits = ext.LAYOUT_BITS
    codes = 2 * max(v for k, v in bits.items() if not k.endswith("aligned"))
    return [c for c in range(codes) if any(c & bits[n] for n in names)]


def test_fp16_layouts_have_the_vector_loop(ext):
    """Every float16 layout with a loop (float16 params with fp32, bf16 or float16 grads,
    fp32 params with float16 change images) steps its 8-element groups in the AVX2 build's
    vector loop, the generic build's in the spec loop; the default bf16 layout (a control)
    in its own loop."""
    if "avx2" not in ext.ISAS:
        pytest.skip("the avx2 build is not usable on this CPU")
    bits = ext.LAYOUT_BITS
    loops = {c: ext.loop_of("avx2", c) for c in _layout_codes(ext, *_FP16_BITS)}
    with_loop = [c for c, loop in loops.items() if loop != "none"]
    assert set(loops.values()) == {"vector_span", "none"}
    assert {ext.loop_of("generic", c) for c in with_loop} == {"step_span"}
    # float16 params: 3 grad dtypes x 2 state dtypes x amsgrad x master x rounding x
    # tracking; fp32 params with float16 images: 2 grad dtypes x 2 x amsgrad x tracking.
    assert len(with_loop) == 96 + 16
    fp16_grad = bits["param_fp16"] | bits["grad_fp16"] | bits["stochastic"] | bits["master_fp32"]
    assert loops[fp16_grad] == "vector_span"
    assert loops[fp16_grad | bits["grad_bf16"]] == "none"  # not both grad dtypes
    default_bf16 = bits["param_bf16"] | bits["grad_bf16"] | bits["state_bf16"]
    assert ext.loop_of("avx2", default_bf16) == "fast_span, vector_span"
    assert ext.loop_of("avx2", default_bf16 | bits["stochastic"]) == "fast_span, vector_span"


def _fp16_ranges():
    """(first, count) runs of fp32 patterns at float16's edges, both signs: fp32 zero and
    subnormals, float16's subnormal range and its neighbours, 1.0, the top of the normal
    range and overflow, inf and NaNs; each run starts below an exponent's first pattern."""
    runs = []
    for sign in (0, 0x80000000):
        for exponent in (0, 1, *range(101, 115), 0x7F, 141, 142, 143, 0xFF):
            first = (sign | exponent << 23) + 3
            runs.append((first - 2**12 if first >= 2**12 else first, 2**16))
        runs.append((sign | 0x7FFF0000, 2**16))  # the last NaNs: quiet, every payload
    return runs


@pytest.mark.parametrize("which", PATTERN_SWEEPS)
def test_fp16_conversions_of_the_avx2_loops_equal_the_spec(ext, which):
    """The AVX2 loops' float16 conversions (F16C for values and nearest rounding, integer
    operations for stochastic rounding) against the header's (the spec's formulas):
    nearest on all 2**32 fp32 patterns (``all``, the exhaustive run; the default run
    sweeps ``sample``, adamw_cases.fp32_pattern_runs), values on all 2**16 float16 patterns (equal bits,
    or both NaN: vcvtph2ps quiets signalling NaNs, which no output shows, see
    cpu_step.cpp), stochastic on runs of patterns at every edge with random bits; the runs
    and values again with flush-to-zero and denormals-are-zero set, to which neither F16C
    conversion is subject."""
    if "avx2" not in ext.ISAS:
        pytest.skip("the avx2 build is not usable on this CPU")
    threads = max(1, torch.get_num_threads())
    for first, count in fp32_pattern_runs(which):
        spec, loop = torch.empty(count, dtype=torch.int16), torch.empty(count, dtype=torch.int16)
        ext.fp16_nearest_patterns(spec.data_ptr(), first, count, threads)
        ext.fp16_loop_conversions("avx2", loop.data_ptr(), first, count, 0, False)
        if not torch.equal(spec, loop):
            bad = int((spec != loop).nonzero()[0])
            raise AssertionError(f"fp32 {first + bad:#010x}: avx2 {int(loop[bad]) & 0xFFFF:#06x}, "
                                 f"spec {int(spec[bad]) & 0xFFFF:#06x}")
    gen = torch.Generator().manual_seed(12)
    halves = torch.arange(2**16, dtype=torch.int32).to(torch.int16)
    flush = torch.set_flush_denormal(False)  # whether this CPU can set the flags
    for flush_denormal in (False, True) if flush else (False,):
        torch.set_flush_denormal(flush_denormal)
        try:
            values = {}
            for isa in ("generic", "avx2"):
                values[isa] = torch.empty(2**16, dtype=torch.float32)
                ext.fp16_loop_conversions(isa, values[isa].data_ptr(), halves.data_ptr(), 2**16,
                                          0, True)
            nan = values["generic"].isnan()
            assert torch.equal(values["avx2"].isnan(), nan)
            assert torch.equal(values["avx2"][~nan].view(torch.int32),
                               values["generic"][~nan].view(torch.int32))
            for first, count in _fp16_ranges():
                random16 = torch.randint(-(2**15), 2**15, (count,), generator=gen,
                                         dtype=torch.int16)
                for random in (0, random16.data_ptr()):
                    out = {}
                    for isa in ("generic", "avx2"):
                        out[isa] = torch.empty(count, dtype=torch.int16)
                        ext.fp16_loop_conversions(isa, out[isa].data_ptr(), first, count,
                                                  random, False)
                    assert torch.equal(out["avx2"], out["generic"]), (
                        f"run {first:#010x} random {bool(random)} flush {flush_denormal}")
        finally:
            torch.set_flush_denormal(False)


@pytest.mark.parametrize("isa", ["avx2"], indirect=True)
@pytest.mark.parametrize("grad_options", ["plain", "scale-maximize-l2", "skip"])
@pytest.mark.parametrize("master, rounding", [
    (None, "nearest"), (None, "stochastic"), ("fp32", "nearest"), ("fp32", "stochastic")],
    ids=["nearest", "stochastic", "master", "master-sr"])
def test_fp16_layouts_in_one_call_on_random_patterns(isa, master, rounding, grad_options):
    """test_every_layout_in_one_call_on_random_patterns for float16: float16 params with
    float16 or fp32 grads, and fp32 params whose change image is float16 (change_dtype
    float16), in every state dtype, amsgrad or not, frozen or not, tracked or not."""
    gen = torch.Generator().manual_seed(len(grad_options) * 13 + len(rounding) + 5 * len(master or ""))
    fp16, fp32, bf16 = torch.float16, torch.float32, torch.bfloat16
    flags = list(itertools.product(*[[False, True]] * 3))
    combos = [(fp16, g, s, *f) for g in (fp16, fp32) for s in (fp32, bf16) for f in flags]
    combos += [(fp32, fp32, s, *f) for s in (fp32, bf16) for f in flags]
    ref = []
    for k, (param, grad, state, amsgrad, freeze, track) in enumerate(combos):
        tracking = _TRACKED[k % len(_TRACKED)] if track else ()
        numel = _LAYOUT_SIZES[k % len(_LAYOUT_SIZES)] if k != 5 else _LAYOUT_LARGE
        ref.append(_layout_state(gen, numel, param, grad, state, master, amsgrad, freeze,
                                 tracking)[0])
    changed = _step_layouts_against_the_reference(
        isa, gen, ref, [c[1] for c in combos], combos, rounding, grad_options, fp16)
    assert changed > 0  # the comparison saw float16 changes


@pytest.mark.parametrize("master, rounding, param", [
    ("fp32", "nearest", torch.float16), ("fp32", "stochastic", torch.float16),
    (None, "nearest", torch.float32), (None, "stochastic", torch.float16)],
    ids=["master", "master-sr", "fp32-image16", "fp16-sr"])
def test_fp16_rounding_edges_through_the_step(isa, master, rounding, param):
    """float16's rounding edges (subnormal results, overflow to inf, ties with even and odd
    kept LSB, NaN payloads: adamw_cases.fp16_edge_patterns) as the weight a step stores:
    with lr = 0 the weight stays what the master or fp32 param holds, so the stored
    float16 param (or an fp32 param's float16 change image) is its rounding."""
    patterns = fp16_edge_patterns()
    numel = patterns.size
    gen = torch.Generator().manual_seed(21)
    ref = _make_state(gen, numel, param, torch.float32, master, amsgrad=False, freeze=False,
                      track=True)
    w = torch.from_numpy(patterns.view(np.float32).copy())
    if master == "fp32":
        ref["master"] = w.clone()
    elif param == torch.float32:
        ref["param"] = w.clone()
    else:  # stored float16 params at every edge
        ref["param"] = R.fp16_from_bits(R.fp32_to_fp16_bits_nearest(torch.from_numpy(
            patterns.astype(np.int64))))
    got = {k: v.clone() for k, v in ref.items()}
    for step in (1, 2):
        steps = torch.tensor([step])
        kwargs = dict(scalars=R.step_scalars(steps, 0.0, *BETAS, 0.0, EPS), rounding=rounding,
                      sr_keys=R.stochastic_rounding_keys(4, steps, torch.tensor([2])),
                      element_offsets=[5], change_dtype=torch.float16)
        grad = _grad(gen, numel, param, nonfinite=step == 2)
        _poison(ref, gen)
        _poison(got, gen)
        _call(R.adamw, [ref], [grad.clone()], **kwargs)
        _call(cpu_backend.adamw, [got], [grad.clone()], **kwargs)
        _compare(ref, got, f"{isa} edge patterns step {step}")
        if master == "fp32" and step == 1:
            assert int(ref["counters"][0]) > numel // 2  # the edges reached the param store
