"""The Triton AdamW kernel against the reference, bit for bit, in several launch shapes.

Every mode the reference allows (param dtype x state dtype x master form x rounding, with
amsgrad, maximize, freeze masks, grad_scale, found_inf, non-finite grads and SR element
offsets), odd sizes, one crossing a chunk edge and one crossing work items, several seeds,
three steps, each step run by the reference and by the table launch (one launch of
persistent programs per group of tensors of one layout) with one work item per tensor or
with short items walked by fewer programs than items. Outputs that the kernel only writes (change bitmaps,
counters) are poisoned first, so an unwritten byte fails. Calls with many tensors of mixed
layouts check the grouping, the pointer-table cache and per-tensor scalar rows. On CPU the
kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1); with a GPU the
same tests run there against the reference on the GPU.
"""

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from rlvr_optim import reference as R  # noqa: E402
from rlvr_optim.bitmaps import bitmap_bytes  # noqa: E402
from rlvr_optim.triton_kernels import adamw as TK  # noqa: E402
from adamw_cases import BETAS, EPS, fp16_edge_patterns, layouts  # noqa: E402

pytestmark = [
    # numpy warns about inf / inf and NaN arithmetic inside the interpreter; it is intended.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":  # then these are GPU checks, run by bench/gpu_check.sh (-m gpu)
    pytestmark.append(pytest.mark.gpu)
BLOCK = 1024  # small, so that 2 * BLOCK + 3 and BLOCK + 13 span several chunks cheaply
# The interpreter's cost is per chunk (Python per operation, not per element): each size
# beyond a chunk is as many chunks as its edge cases need.
SIZES = [1, 7, 8, 33, 2 * BLOCK + 3, BLOCK + 13]
SEEDS = [0, 1]
STEPS = 3
# Launch shapes: chunk size, elements per work item, programs. "one-item": each tensor one
# item (a chunk loop, then a masked tail); "items": items of two chunks (2 * BLOCK + 3
# elements are two items, the second a tail of 3), walked by two persistent programs.
SHAPES = {
    "one-item": dict(block_size=BLOCK, item_size=8 * BLOCK),
    "items": dict(block_size=BLOCK, item_size=2 * BLOCK, num_programs=2),
}
# The launch shape each seed of the matrix runs: every mode meets both. (Running both on
# every seed would double the file's runtime: the interpreter's cost per chunk bounds it.)
SEED_SHAPE = {0: "one-item", 1: "items"}

# FORMS (param dtype, master form, rounding, change_dtype) come from adamw_cases. Rounding
# is ignored for fp32 params by the reference, and must be here too.

# Options layered on every form; each case uses change + cumulative bitmaps and counters.
FEATURES = {
    "plain": {},
    "amsgrad-freeze-nonfinite-scale": dict(
        amsgrad=True, freeze=True, nonfinite=True, grad_scale=3.0
    ),
    "maximize-skip-offset": dict(
        maximize=True, freeze=True, nonfinite=True, found_inf=(0.0, 1.0, 0.0),
        # Tensor k starts at 2**32 - 600 - 13 k: the larger ones cross the low Philox word.
        element_offset=2**32 - 600,
    ),
    # torch's Adam: the weight decay an L2 term in the gradient.
    "adam-l2-amsgrad-scale": dict(l2_decay=True, amsgrad=True, freeze=True, grad_scale=3.0),
}


# ---------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns of a tensor, as an integer tensor of the same width."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


def _assert_same_bits(name: str, expected: torch.Tensor, got: torch.Tensor):
    """torch.equal on bit patterns (computed NaNs are canonical in the spec, so exact)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, name
    e, g = _bits(expected).reshape(-1), _bits(got).reshape(-1)
    if not torch.equal(e, g):
        bad = (e != g).nonzero().reshape(-1)
        mask = 2 ** (8 * e.element_size()) - 1
        show = [(i, hex(int(e[i]) & mask), hex(int(g[i]) & mask)) for i in bad[:4].tolist()]
        raise AssertionError(
            f"{name}: {bad.numel()} of {e.numel()} differ; (index, reference, triton): {show}"
        )


def _random_bf16_or_fp32(gen, numel, dtype, scale=1.0, nonneg=False):
    x = torch.randn(numel, generator=gen) * scale
    if nonneg:
        x = x.abs()
    x[torch.rand(numel, generator=gen) < 0.05] = 0.0  # exact zeros
    return x.to(dtype).to(DEVICE)


def _make_state(gen, numel, param_dtype, state_dtype, master, amsgrad, freeze):
    """Fresh inputs of one tensor; the same values feed the reference and the kernel."""
    nbytes = bitmap_bytes(numel)
    state = {
        "param": _random_bf16_or_fp32(gen, numel, param_dtype),
        "exp_avg": _random_bf16_or_fp32(gen, numel, state_dtype, 0.05),
        "exp_avg_sq": _random_bf16_or_fp32(gen, numel, state_dtype, 1e-3, nonneg=True),
        # Cumulative bitmap starts with arbitrary bits, padding included: the kernel ORs.
        "cumulative_bitmap": torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8).to(DEVICE),
        "change_bitmap": torch.empty(nbytes, dtype=torch.uint8, device=DEVICE),
        "counters": torch.empty(3, dtype=torch.int64, device=DEVICE),
    }
    if amsgrad:
        # Maxima at or above the old second moment; the new one overtakes some of them.
        extra = _random_bf16_or_fp32(gen, numel, torch.float32, 1e-5, nonneg=True)
        state["max_exp_avg_sq"] = (state["exp_avg_sq"].float() + extra).to(state_dtype)
    if master is not None:
        # An fp32 master near the param: noise of about a bf16 ULP.
        p = state["param"].float()
        noise = torch.randn(numel, generator=gen).to(DEVICE) * p.abs() * 2.0**-8
        w = p + noise
        if master == "fp32":
            state["master"] = w
        else:
            # The state a remainder run holds: the split of an fp32 value. (An arbitrary
            # int16 beside a zero param would rebuild a NaN; rounding_edge_patterns covers
            # arbitrary pairs.)
            hi, remainder = R.split_remainder(R.fp32_bits(w))
            state["param"] = R.bf16_from_bits(hi)
            state["remainder"] = remainder.to(torch.int16)
    if freeze:
        # Padding bits random too: the kernel must ignore them.
        state["freeze_mask"] = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8).to(DEVICE)
    return state


def _clone(state):
    return {k: v.clone() for k, v in state.items()}


def _poison(state, gen):
    """Garbage in the write-only outputs."""
    if "change_bitmap" in state:
        bitmap = state["change_bitmap"]
        bitmap.copy_(torch.randint(0, 256, bitmap.shape, generator=gen, dtype=torch.uint8))
    if "counters" in state:
        counters = state["counters"]
        counters.copy_(torch.randint(-(2**40), 2**40, (3,), generator=gen, dtype=torch.int64))


def _nonfinite_elements(gen, numel):
    """About 6% of the elements, which get non-finite grads at some steps."""
    return torch.rand(numel, generator=gen) < 0.06


def _grad(gen, numel, dtype, scale, nonfinite=None):
    """Fresh grads with exact zeros and, on the ``nonfinite`` elements at about half of the
    steps, NaN, +inf or -inf drawn afresh each step: kinds mix on one element across steps,
    which the spec's canonical NaNs keep well defined."""
    g = torch.randn(numel, generator=gen) * 0.1 * scale
    g[torch.rand(numel, generator=gen) < 0.03] = 0.0
    if nonfinite is not None:
        now = nonfinite & (torch.rand(numel, generator=gen) < 0.5)
        kind = torch.randint(0, 3, (numel,), generator=gen)
        g[now & (kind == 0)] = float("nan")
        g[now & (kind == 1)] = float("inf")
        g[now & (kind == 2)] = -float("inf")
    return g.to(dtype).to(DEVICE)


def _step(backend, states, grads, *, scalars, amsgrad, master, rounding, sr_keys,
          element_offsets, maximize, grad_scale, found_inf, **extra):
    """One call of a backend's adamw over lists built from per-tensor state dicts."""
    backend(
        [s["param"] for s in states],
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        scalars=scalars,
        max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if amsgrad else None,
        masters=[s.get("master") for s in states] if master == "fp32" else None,
        remainders=[s.get("remainder") for s in states] if master == "remainder" else None,
        freeze_masks=[s.get("freeze_mask") for s in states],
        change_bitmaps=[s.get("change_bitmap") for s in states],
        cumulative_bitmaps=[s.get("cumulative_bitmap") for s in states],
        counters=[s.get("counters") for s in states],
        rounding=rounding,
        sr_keys=sr_keys,
        element_offsets=element_offsets,
        amsgrad=amsgrad,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
        **extra,
    )


def _compare(ref, tri, label):
    for key in ref:
        _assert_same_bits(f"{label}: {key}", ref[key], tri[key])


class _LaunchCounter:
    """Stands in for a kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    """Launch count of the table kernel."""
    counter = _LaunchCounter(TK.adamw_table_kernel)
    monkeypatch.setattr(TK, "adamw_table_kernel", counter)
    return counter


# ---------------------------------------------------------------------------------------
# The matrix: every form x feature set, the state dtypes alternating (the other half: -m
# exhaustive); every size in each call, several seeds, three steps.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form,state_dtype,features", layouts(FEATURES))
def test_matches_reference_bit_for_bit(form, state_dtype, features):
    """Every size in one call (one group for the table launch), each tensor with its own
    row of scalars (its own step count) and its own SR key and element offset."""
    param_dtype, master, rounding, change_dtype = form
    f = FEATURES[features]
    amsgrad = f.get("amsgrad", False)
    n = len(SIZES)
    changed = [0] * n
    for seed in SEEDS:
        shape = SEED_SHAPE[seed]
        gen = torch.Generator().manual_seed(seed * 7919 + 1)
        lr = [1e-2, 2e-3, 5e-3][seed]
        weight_decay = [0.1, 0.01, 0.0][seed]
        ref = [_make_state(gen, numel, param_dtype, state_dtype, master, amsgrad, f.get("freeze"))
               for numel in SIZES]
        tri = [_clone(s) for s in ref]
        scale = f.get("grad_scale")
        kinds = [_nonfinite_elements(gen, numel) if f.get("nonfinite") else None for numel in SIZES]
        offsets = None
        if "element_offset" in f:
            offsets = [f["element_offset"] - 13 * k for k in range(n)]
        for step in range(1, STEPS + 1):
            grads = [_grad(gen, numel, param_dtype, scale or 1.0, k)
                     for numel, k in zip(SIZES, kinds)]
            steps = torch.arange(step, step + n, device=DEVICE)
            decoupled = not f.get("l2_decay", False)
            scalars = R.step_scalars(steps, lr, *BETAS, weight_decay, EPS,
                                     decoupled_weight_decay=decoupled)
            tensor_keys = torch.arange(n, device=DEVICE) + 17
            keys = R.stochastic_rounding_keys(1000 + seed, steps, tensor_keys)
            found_inf = f.get("found_inf")
            kwargs = dict(
                scalars=scalars, amsgrad=amsgrad, master=master, rounding=rounding,
                sr_keys=keys if rounding == "stochastic" else None,
                element_offsets=offsets, maximize=f.get("maximize", False),
                decoupled_weight_decay=decoupled,
                grad_scale=torch.tensor(scale, device=DEVICE) if scale else None,
                found_inf=torch.tensor(found_inf[step - 1], device=DEVICE) if found_inf else None,
                change_dtype=change_dtype,
            )
            for s in ref + tri:
                _poison(s, gen)
            _step(R.adamw, ref, [g.clone() for g in grads], **kwargs)
            _step(TK.adamw, tri, [g.clone() for g in grads], **SHAPES[shape], **kwargs)
            for k, (r, t) in enumerate(zip(ref, tri)):
                _compare(r, t, f"{shape}, seed {seed}, step {step}, numel {SIZES[k]}")
            changed = [c + int(s["counters"][0]) for c, s in zip(changed, ref)]
    # The comparison saw 16-bit changes, not only untouched tensors.
    assert all(c > 0 for c, numel in zip(changed, SIZES) if numel >= 33), changed


# ---------------------------------------------------------------------------------------
# Several tensors in one call, mixed dtypes, per-entry None, per-tensor scalars and keys.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("launch_shape", list(SHAPES))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_tensor_list_with_mixed_dtypes_and_missing_entries(rounding, launch_shape):
    gen = torch.Generator().manual_seed(5)
    shapes = [(3, 5), (64,), (2, 3, 7), (1,), (0,)]
    param_dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16]
    ref = []
    for i, (shape, dtype) in enumerate(zip(shapes, param_dtypes)):
        numel = int(np.prod(shape))
        master = "fp32" if dtype == torch.bfloat16 else None
        s = _make_state(gen, numel, dtype, torch.float32, master, amsgrad=True, freeze=i % 2 == 0)
        for key in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master"):
            if key in s:
                s[key] = s[key].reshape(shape)
        # Mixed state dtypes across tensors: bf16 states on some tensors only.
        if i == 2:
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                s[key] = s[key].bfloat16()
        if i == 1:
            del s["change_bitmap"]  # per-entry None for an output
        ref.append(s)
    tri = [_clone(s) for s in ref]
    kinds = [_nonfinite_elements(gen, s["param"].numel()) for s in ref]
    for step in (1, 2):
        grads = [_grad(gen, s["param"].numel(), s["param"].dtype, 1.0, k).reshape(s["param"].shape)
                 for s, k in zip(ref, kinds)]
        steps = torch.tensor([step, step + 3, step, step + 10, step], device=DEVICE)
        scalars = R.step_scalars(steps, 5e-3, *BETAS, 0.05, EPS)
        keys = R.stochastic_rounding_keys(2**63 + 11, steps, torch.arange(5, device=DEVICE) * 3 + 1)
        kwargs = dict(scalars=scalars, amsgrad=True, master="fp32", rounding=rounding,
                      sr_keys=keys, element_offsets=[0, 15, 2**40, 7, 0], maximize=False,
                      grad_scale=None, found_inf=None)
        for s in ref + tri:
            _poison(s, gen)
        _step(R.adamw, ref, [g.clone() for g in grads], **kwargs)
        _step(TK.adamw, tri, [g.clone() for g in grads], **SHAPES[launch_shape], **kwargs)
        for i, (r, t) in enumerate(zip(ref, tri)):
            _compare(r, t, f"tensor {i} step {step}")


# ---------------------------------------------------------------------------------------
# Many tensors of several layouts in one call: one table launch per layout, the cached
# pointer tables, per-tensor rows of scalars and keys, element offsets with SR.
# ---------------------------------------------------------------------------------------

# Layouts: param, grad and state dtypes, and which optional tensors are present.
BF16, FP32 = torch.bfloat16, torch.float32
MIXED_LAYOUTS = {
    "A": dict(param=BF16, grad=BF16, m=FP32, v=FP32, master=True, freeze=True,
              change=True, cumulative=True, counters=True),
    "B": dict(param=BF16, grad=FP32, m=BF16, v=BF16, master=False, freeze=False,
              change=True, cumulative=False, counters=False),
    "C": dict(param=FP32, grad=BF16, m=FP32, v=FP32, master=False, freeze=True,
              change=False, cumulative=True, counters=True),
    "D": dict(param=BF16, grad=FP32, m=BF16, v=BF16, master=True, freeze=False,
              change=True, cumulative=False, counters=True),
}
# (numel, layout): every odd size, one crossing a block edge, zero-size tensors in a group.
MIXED_TENSORS = [
    (0, "A"), (1, "A"), (7, "B"), (8, "C"), (33, "A"), (4099, "D"), (BLOCK + 13, "B"),
    (5, "C"), (64, "D"), (300, "A"), (1, "B"), (17, "C"), (0, "D"), (2 * BLOCK, "D"),
]
MIXED_CALLS = {
    "master-sr": dict(master="fp32", rounding="stochastic", amsgrad=True, maximize=True,
                      grad_scale=4.0, found_inf=None),
    "remainder": dict(master="remainder", rounding="nearest", amsgrad=False, maximize=False,
                      grad_scale=None, found_inf=0.0),
}


def _make_mixed_states(gen, tensors, master, amsgrad):
    states = []
    for numel, name in tensors:
        lay = MIXED_LAYOUTS[name]
        s = _make_state(gen, numel, lay["param"], lay["m"], master if lay["master"] else None,
                        amsgrad, lay["freeze"])
        s["exp_avg_sq"] = s["exp_avg_sq"].to(lay["v"])
        if amsgrad:
            s["max_exp_avg_sq"] = s["max_exp_avg_sq"].to(lay["v"])
        for key, present in (("change_bitmap", lay["change"]),
                             ("cumulative_bitmap", lay["cumulative"]),
                             ("counters", lay["counters"])):
            if not present:
                del s[key]
        states.append(s)
    return states


def _mixed_grads(gen, tensors, kinds, scale):
    return [_grad(gen, numel, MIXED_LAYOUTS[name]["grad"], scale, k)
            for (numel, name), k in zip(tensors, kinds)]


def _mixed_kwargs(call, step, n, offsets):
    """Per-tensor step counts (rows of scalars) and keys, on the CPU even for GPU tensors:
    the backend moves each whole tensor once."""
    steps = torch.arange(step, step + n)
    c = MIXED_CALLS[call]
    return dict(
        scalars=R.step_scalars(steps, 3e-3, *BETAS, 0.05, EPS),
        sr_keys=R.stochastic_rounding_keys(2**64 - 5, steps, torch.arange(n) * 7 + 3),
        element_offsets=offsets, amsgrad=c["amsgrad"], master=c["master"],
        rounding=c["rounding"], maximize=c["maximize"],
        grad_scale=torch.tensor(c["grad_scale"], device=DEVICE) if c["grad_scale"] else None,
        found_inf=(torch.tensor(c["found_inf"], device=DEVICE)
                   if c["found_inf"] is not None else None),
    )


@pytest.mark.parametrize("call", list(MIXED_CALLS))
def test_many_tensors_of_mixed_layouts_take_one_launch_per_layout(call, launches):
    gen = torch.Generator().manual_seed(21)
    n = len(MIXED_TENSORS)
    c = MIXED_CALLS[call]
    ref = _make_mixed_states(gen, MIXED_TENSORS, c["master"], c["amsgrad"])
    runs = {shape: [_clone(s) for s in ref] for shape in SHAPES}
    kinds = [_nonfinite_elements(gen, numel) for numel, _ in MIXED_TENSORS]
    # Global indices around 2**32 (the low Philox word wraps inside some tensors) and 2**40.
    offsets = [2**32 - 40 * k if k % 3 else 2**40 + k for k in range(n)]
    for step in (1, 2):
        grads = _mixed_grads(gen, MIXED_TENSORS, kinds, c["grad_scale"] or 1.0)
        kwargs = _mixed_kwargs(call, step, n, offsets)
        for s in ref + [s for states in runs.values() for s in states]:
            _poison(s, gen)
        _step(R.adamw, ref, [g.clone() for g in grads], **kwargs)
        for shape, states in runs.items():
            _step(TK.adamw, states, [g.clone() for g in grads], **SHAPES[shape], **kwargs)
            for k, (r, t) in enumerate(zip(ref, states)):
                numel, name = MIXED_TENSORS[k]
                _compare(r, t, f"{shape}, step {step}, tensor {k} ({numel}, layout {name})")
    # One launch per layout with work (zero-size tensors have none); with SR, tensors whose
    # element offset is not a multiple of 8 draw Philox per element: a layout of their own.
    stochastic = c["rounding"] == "stochastic"
    groups = {(name, not (stochastic and MIXED_LAYOUTS[name]["param"] == BF16) or off % 8 == 0)
              for (numel, name), off in zip(MIXED_TENSORS, offsets) if numel > 0}
    assert len(groups) == (6 if stochastic else 4)  # tensors 6 and 9 split off with SR
    assert launches.launches == 2 * len(SHAPES) * len(groups)


@pytest.mark.parametrize("chunks, programs", [(1, 1), (3, 2), (4, 64)])
def test_persistent_programs_over_work_items_match_the_reference(chunks, programs):
    """Work items of ``chunks`` chunks (a tensor's last item shorter), walked by
    ``programs`` persistent programs (more than there are items: the launch starts one per
    item), counts added once per item."""
    gen = torch.Generator().manual_seed(31)
    n = len(MIXED_TENSORS)
    c = MIXED_CALLS["master-sr"]
    ref = _make_mixed_states(gen, MIXED_TENSORS, c["master"], c["amsgrad"])
    tri = [_clone(s) for s in ref]
    kinds = [_nonfinite_elements(gen, numel) for numel, _ in MIXED_TENSORS]
    offsets = [2**32 - 40 * k for k in range(n)]
    for step in (1, 2):
        grads = _mixed_grads(gen, MIXED_TENSORS, kinds, c["grad_scale"])
        kwargs = _mixed_kwargs("master-sr", step, n, offsets)
        for s in ref + tri:
            _poison(s, gen)
        _step(R.adamw, ref, [g.clone() for g in grads], **kwargs)
        _step(TK.adamw, tri, [g.clone() for g in grads], block_size=BLOCK,
              item_size=chunks * BLOCK, num_programs=programs, **kwargs)
        for k, (r, t) in enumerate(zip(ref, tri)):
            numel, name = MIXED_TENSORS[k]
            _compare(r, t, f"{chunks} chunks per item, {programs} programs, step {step}, "
                           f"tensor {k} ({numel}, {name})")
    work = TK._work_table((4099, 1, 2 * BLOCK), chunks * BLOCK)
    per_tensor = [-(-5 // chunks), 1, -(-2 // chunks)]
    assert work[:, 0].tolist() == [t for t, count in enumerate(per_tensor) for _ in range(count)]
    assert work[:, 1].tolist() == [k for count in per_tensor for k in range(count)]


def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """``t``'s values in a view that starts ``offset`` elements into a larger buffer, so its
    data pointer is not 16-byte aligned when ``offset * element size`` is not (as a param
    carved out of a flat buffer)."""
    buf = torch.zeros(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def _plant(t: torch.Tensor, gen, patterns) -> None:
    """Write bit patterns at random places of ``t`` (some of them frozen, some not)."""
    bits = _bits(t).view(-1)
    where = torch.randint(0, t.numel(), (len(patterns) * 4,), generator=gen).to(t.device)
    values = torch.tensor(patterns * 4, dtype=torch.int64).to(bits.dtype).to(t.device)
    bits[where] = values


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtypes", ["bf16-master-sr", "fp32"])
def test_unaligned_views_and_kept_bits_in_full_chunks(dtypes, shape, launches):
    """Full chunks take an unmasked path that writes every element, storing back the loaded
    bits where an element is frozen or the step is skipped; its 16-byte accesses need
    aligned pointers, so a tensor with any unaligned operand goes to a group of its own.
    Checked: unaligned views beside aligned tensors, sizes that are whole blocks and ones
    with a tail, and signaling-NaN and other odd state patterns on frozen elements, which
    must come back bit for bit (rounding a bf16 NaN on the way back would quiet it)."""
    bf16 = dtypes == "bf16-master-sr"
    param_dtype = torch.bfloat16 if bf16 else torch.float32
    master, rounding = ("fp32", "stochastic") if bf16 else (None, "nearest")
    numels = [2 * BLOCK, 3 * BLOCK + 5, 2 * BLOCK, BLOCK + 13]
    # Which operand of tensor k sits at an unaligned address (None: all aligned).
    shifted = [None, "param", "exp_avg_sq", "freeze_mask"]
    gen = torch.Generator().manual_seed(33)
    ref = []
    for numel in numels:
        s = _make_state(gen, numel, param_dtype, torch.bfloat16 if bf16 else torch.float32,
                        master, amsgrad=False, freeze=True)
        if bf16:  # one state dtype per tensor (the backend refuses two)
            _plant(s["exp_avg"], gen, [0x7F81, 0xFF81, 0x7FC1, 0x0001, -0x8000])
            _plant(s["exp_avg_sq"], gen, [0x7F81, 0x7FC1, -0x7FFF, 1])
        else:
            _plant(s["exp_avg_sq"], gen, [0x7F800001, 0x7FC00123, -0x7FFFFFFF, 1])
        ref.append(s)
    tri = [_clone(s) for s in ref]
    for s, key in zip(tri, shifted):
        if key is not None:
            s[key] = _at_offset(s[key], 1)
    assert tri[1]["param"].data_ptr() % 16 and not tri[0]["param"].data_ptr() % 16
    kinds = [_nonfinite_elements(gen, numel) for numel in numels]
    frozen_before = None
    for step, skip in ((1, 0.0), (2, 1.0), (3, 0.0)):
        grads = [_grad(gen, numel, param_dtype, 1.0, k) for numel, k in zip(numels, kinds)]
        steps = torch.full((len(numels),), step, device=DEVICE)
        kwargs = dict(
            scalars=R.step_scalars(steps, 1e-2, *BETAS, 0.1, EPS), amsgrad=False,
            master=master, rounding=rounding,
            sr_keys=R.stochastic_rounding_keys(9, steps, torch.arange(len(numels), device=DEVICE)),
            element_offsets=None, maximize=False, grad_scale=None,
            found_inf=torch.tensor(skip, device=DEVICE),
        )
        for s in ref + tri:
            _poison(s, gen)
        if skip:
            frozen_before = [_clone(s) for s in tri]
        _step(R.adamw, ref, [g.clone() for g in grads], **kwargs)
        _step(TK.adamw, tri, [g.clone() for g in grads], **SHAPES[shape], **kwargs)
        for k, (r, t) in enumerate(zip(ref, tri)):
            _compare(r, t, f"{shape}, step {step}, tensor {k} (unaligned: {shifted[k]})")
        if skip:  # a skipped step leaves every state bit as it was
            for before, after in zip(frozen_before, tri):
                for key in ("param", "exp_avg", "exp_avg_sq", "master"):
                    if key in before:
                        _assert_same_bits(f"skipped step, {key}", before[key], after[key])
    assert launches.launches == 3 * 2  # aligned tensor 0, and the three unaligned ones


# ---------------------------------------------------------------------------------------
# Bitmaps as 8-byte words: full chunks of an aligned tensor move the bitmaps a word (64
# elements) at a time, tail chunks and chunks below 64 elements a byte at a time.
# ---------------------------------------------------------------------------------------

# name -> (chunk, elements per work item, sizes): sizes around a word and a chunk edge, a
# last word shared by a full chunk and nothing else (64), tails of one element, work
# items crossed (1025 and 16385 end in an item of one element).
WORD_SHAPES = {
    "chunk-32": (32, 256, [57, 64, 65, 1023]),
    "chunk-64": (64, 512, [57, 64, 65, 1023, 1025]),
    "chunk-1024": (BLOCK, 4 * BLOCK, [1023, 1025, 16 * BLOCK + 1]),
}


def _guarded(t: torch.Tensor, gen, guard: int = 16):
    """``t``'s values at the start of a larger buffer (so as aligned as any allocation),
    and the buffer, whose last ``guard`` random bytes no store may touch."""
    buf = torch.randint(0, 256, (t.numel() + guard,), generator=gen, dtype=torch.uint8).to(t.device)
    buf[:t.numel()].copy_(t)
    return buf[:t.numel()], buf


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", list(WORD_SHAPES))
def test_bitmap_words_at_tensor_edges(shape, rounding):
    """Change and cumulative bitmaps and freeze masks (padding bits random) of tensors
    around word and chunk edges, each followed by guard bytes no store may touch; non-finite
    grads, grad_scale, two steps; SR element offsets that are not multiples of 8 on every
    other tensor."""
    block, item, sizes = WORD_SHAPES[shape]
    gen = torch.Generator().manual_seed(41)
    n = len(sizes)
    ref = [_make_state(gen, numel, torch.bfloat16, torch.bfloat16, None, amsgrad=False,
                       freeze=True) for numel in sizes]
    tri = [_clone(s) for s in ref]
    buffers = []
    for s in tri:
        for key in ("change_bitmap", "cumulative_bitmap", "freeze_mask"):
            s[key], buf = _guarded(s[key], gen)
            buffers.append((key, buf, buf[s[key].numel():].clone()))
    assert all(s["change_bitmap"].data_ptr() % 16 == 0 for s in tri)  # the word path's case
    kinds = [_nonfinite_elements(gen, numel) for numel in sizes]
    offsets = [0 if k % 2 == 0 else 2**32 - 8 * k - 3 for k in range(n)]
    for step in (1, 2):
        grads = [_grad(gen, numel, torch.bfloat16, 2.0, k) for numel, k in zip(sizes, kinds)]
        steps = torch.full((n,), step, device=DEVICE)
        kwargs = dict(
            scalars=R.step_scalars(steps, 1e-2, *BETAS, 0.1, EPS), amsgrad=False, master=None,
            rounding=rounding, element_offsets=offsets, maximize=False,
            sr_keys=R.stochastic_rounding_keys(3, steps, torch.arange(n, device=DEVICE)),
            grad_scale=torch.tensor(2.0, device=DEVICE), found_inf=None,
        )
        for s in ref + tri:
            _poison(s, gen)
        _step(R.adamw, ref, [g.clone() for g in grads], **kwargs)
        _step(TK.adamw, tri, [g.clone() for g in grads], block_size=block, item_size=item,
              **kwargs)
        for k, (r, t) in enumerate(zip(ref, tri)):
            _compare(r, t, f"{shape}, step {step}, numel {sizes[k]}")
        for key, buf, guard in buffers:
            assert torch.equal(buf[-guard.numel():], guard), f"{key}: a byte past its end moved"
    assert all(int(s["counters"][0]) > 0 for s in ref)  # bf16 changes were compared


def test_tables_are_reused_and_rebuilt_when_a_tensor_moves():
    tensors = [(7, "A"), (33, "B"), (BLOCK + 13, "A"), (1, "B")]  # two groups
    n = len(tensors)
    gen = torch.Generator().manual_seed(8)
    ref = _make_mixed_states(gen, tensors, "fp32", amsgrad=True)
    tri = [_clone(s) for s in ref]
    # Gradients kept in place between steps, as with zero_grad(set_to_none=False).
    grads = _mixed_grads(gen, tensors, [None] * n, 4.0)
    # Multiples of 8: with SR an offset inside a group of 8 would split its tensor off.
    offsets = [8, 2**32 - 96, 2**40, 0]
    TK.planner.clear()

    def step(number):
        for g, new in zip(grads, _mixed_grads(gen, tensors, [None] * n, 4.0)):
            g.copy_(new)
        kwargs = _mixed_kwargs("master-sr", number, n, offsets)
        _step(R.adamw, ref, [g.clone() for g in grads], **kwargs)
        _step(TK.adamw, tri, grads, block_size=BLOCK, **kwargs)
        for k, (r, t) in enumerate(zip(ref, tri)):
            _compare(r, t, f"step {number}, tensor {k}")
        return TK.planner.builds, len(TK.planner.calls[0].last[2])

    assert step(1) == (1, 2)  # one call, two launches
    assert step(2) == (1, 2)  # the same tensors: both launches reused
    # New storage for one state of tensor 2 (group A); the old one stays alive, so a stale
    # table would write there and leave the new tensor behind the reference.
    old = tri[2]["exp_avg"]
    tri[2]["exp_avg"] = old.clone()
    before = old.clone()
    assert step(3) == (2, 2)
    assert torch.equal(_bits(old), _bits(before))
    # Another element offset for tensor 1 (group B): another SR stream, other tables.
    offsets[1] += 8
    assert step(4) == (3, 2)
    # Fresh gradient tensors (zero_grad(set_to_none=True)): new pointers, new tables.
    grads = [g.clone() for g in grads]
    assert step(5) == (4, 2)
    assert step(6) == (4, 2)


def test_work_table():
    # (tensor, item) per work item: 1, 3, 0 and 2 items of 8 elements.
    work = TK._work_table((1, 17, 0, 9), 8)
    assert work.dtype == torch.int32
    assert work.tolist() == [[0, 0], [1, 0], [1, 1], [1, 2], [3, 0], [3, 1]]


def test_the_optimizer_steps_through_the_table_launch(launches):
    from rlvr_optim import AdamW

    gen = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).bfloat16().to(DEVICE))
              for n in (3, 40, 9, 1)]
    opt = AdamW(params, lr=1e-3, backend="triton")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).bfloat16().to(DEVICE)
    opt.step()
    assert launches.launches == 1


# ---------------------------------------------------------------------------------------
# Rounding edge cases, reached through the kernel: with lr = 0 the step leaves w as it was,
# so the stored bf16 param is the rounding of the master / the split of the rebuilt value.
# ---------------------------------------------------------------------------------------


def _edge_fp32_patterns() -> np.ndarray:
    rng = np.random.default_rng(3)
    exponents = np.array([0, 1, 0x7F, 0x80, 0xFE], dtype=np.uint64) << 23
    mant_hi = np.array([0, 1, 0x7E, 0x7F], dtype=np.uint64) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint64)
    sign = np.array([0, 0x80000000], dtype=np.uint64)
    grid = (sign[:, None, None, None] | exponents[None, :, None, None]
            | mant_hi[None, None, :, None] | low[None, None, None, :]).reshape(-1)
    specials = np.array([
        0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA12345,
        0x00008000, 0x00018000, 0x80008000, 0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,
    ], dtype=np.uint64)
    randoms = rng.integers(0, 2**32, size=200, dtype=np.uint64)
    return np.concatenate([grid, specials, randoms]).astype(np.uint32)


@pytest.mark.parametrize("master,rounding,half", [
    ("fp32", "nearest", "bf16"), ("fp32", "stochastic", "bf16"), ("remainder", "nearest", "bf16"),
    (None, "nearest", "bf16"), ("fp32", "nearest", "fp16"), ("fp32", "stochastic", "fp16"),
    (None, "nearest", "fp16")])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rounding_edge_patterns(master, rounding, half, shape):
    """``half``: the 16-bit format of the param (or of an fp32 param's change image);
    float16 cases take float16's edges (subnormals, overflow, ties)."""
    fp16 = half == "fp16"
    patterns = fp16_edge_patterns() if fp16 else _edge_fp32_patterns()
    numel = patterns.size
    w = torch.from_numpy(patterns.view(np.float32).copy()).to(DEVICE)
    gen = torch.Generator().manual_seed(9)
    if master is None:
        param_dtype = torch.float32  # fp32 params: the change bit compares nearest-even images
    else:
        param_dtype = torch.float16 if fp16 else torch.bfloat16
    ref = _make_state(gen, numel, param_dtype, torch.float32, master, amsgrad=False, freeze=False)
    if master == "fp32":
        ref["master"] = w.clone()
    elif master == "remainder":
        # Params and remainders with edge bits: the rebuilt fp32 value, split again.
        ref["param"] = R.bf16_from_bits(torch.from_numpy(patterns.astype(np.int64) >> 16)).to(DEVICE)
        edges = torch.tensor([-(2**15), -1, 0, 1, 2**15 - 1, -(2**14)], dtype=torch.int16)
        ref["remainder"] = edges.repeat(numel // 6 + 1)[:numel].to(DEVICE)
    else:
        ref["param"] = w.clone()
    tri = _clone(ref)
    grad = _grad(gen, numel, param_dtype, 1.0)
    steps = torch.tensor([1], device=DEVICE)
    kwargs = dict(scalars=R.step_scalars(steps, 0.0, *BETAS, 0.0, EPS), amsgrad=False,
                  master=master, rounding=rounding,
                  sr_keys=R.stochastic_rounding_keys(4, steps, torch.tensor([2], device=DEVICE)),
                  element_offsets=None, maximize=False, grad_scale=None, found_inf=None,
                  change_dtype=torch.float16 if fp16 else torch.bfloat16)
    _poison(ref, gen)
    _poison(tri, gen)
    _step(R.adamw, [ref], [grad.clone()], **kwargs)
    _step(TK.adamw, [tri], [grad.clone()], **SHAPES[shape], **kwargs)
    _compare(ref, tri, "edge patterns")
    if master == "fp32":
        # The edge patterns did reach the param store: the param is now their rounding.
        assert int(ref["counters"][0]) > numel // 2


@triton.jit
def _fp16_stochastic_probe(w_ptr, r_ptr, out_ptr, N: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    r = tl.load(r_ptr + offs).to(tl.uint32)
    out = TK._round_stochastic_fp16(tl.load(w_ptr + offs), r)
    tl.store(out_ptr + offs, out.to(tl.int32))


def test_fp16_stochastic_rounding_formula_on_every_exponent_and_extreme_draws():
    """The kernel's float16 stochastic rounding (one aligned word, a truncating conversion
    below 2**-14) against reference.fp32_to_fp16_bits_stochastic on every fp32 exponent of
    both signs (mantissas from the float16 edges and at random) with draws 0, 0xFFFF and
    random; a NaN is the canonical one's image, as the step makes every computed NaN."""
    rng = np.random.default_rng(37)
    exponents = np.arange(256, dtype=np.uint32)
    mantissas = np.unique(np.concatenate([fp16_edge_patterns() & 0x7FFFFF,
                                          rng.integers(0, 2**23, 64, dtype=np.uint32)]))
    patterns = ((exponents[:, None] << 23) | mantissas[None, :]).reshape(-1)
    patterns = np.concatenate([patterns, patterns | 0x80000000])
    n = 1 << int(np.ceil(np.log2(patterns.size)))
    patterns = np.resize(patterns, n)
    bits = torch.from_numpy(patterns.astype(np.int64))
    spec_bits = torch.where(R._is_nan_bits(bits), torch.tensor(0x7FC00000), bits)
    for draws in (np.zeros(n, np.int64), np.full(n, 0xFFFF, np.int64),
                  rng.integers(0, 2**16, n, dtype=np.int64)):
        out = torch.zeros(n, dtype=torch.int32, device=DEVICE)
        with np.errstate(invalid="ignore", over="ignore"):
            _fp16_stochastic_probe[(n // 1024,)](
                torch.from_numpy(patterns.view(np.float32).copy()).to(DEVICE),
                torch.from_numpy(draws.astype(np.int32)).to(DEVICE), out, N=1024)
        expected = R.fp32_to_fp16_bits_stochastic(spec_bits, torch.from_numpy(draws))
        got = out.cpu().to(torch.int64) & 0xFFFF
        bad = (got != expected).nonzero().flatten()[:4].tolist()
        assert not bad, [(hex(patterns[i]), int(draws[i]), hex(got[i]), hex(expected[i]))
                         for i in bad]


# ---------------------------------------------------------------------------------------
# found_inf and grad_scale of other dtypes and values.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("found_inf", [
    torch.tensor(True), torch.tensor(False), torch.tensor([1], dtype=torch.int32),
    torch.tensor(float("nan")), torch.tensor(-0.0), torch.tensor(2.0, dtype=torch.float64),
    torch.tensor(1.0, dtype=torch.bfloat16),
], ids=["bool-true", "bool-false", "int32-one", "nan", "minus-zero", "fp64-two", "bf16-one"])
def test_found_inf_values_and_dtypes(found_inf):
    numel = 300
    gen = torch.Generator().manual_seed(12)
    ref = _make_state(gen, numel, torch.bfloat16, torch.float32, None, amsgrad=True, freeze=True)
    tri = _clone(ref)
    grad = _grad(gen, numel, torch.bfloat16, 1.0, _nonfinite_elements(gen, numel))
    steps = torch.tensor([2], device=DEVICE)
    kwargs = dict(scalars=R.step_scalars(steps, 1e-2, *BETAS, 0.1, EPS), amsgrad=True,
                  master=None, rounding="nearest", sr_keys=None, element_offsets=None,
                  maximize=False, grad_scale=torch.tensor(0.5, dtype=torch.float64),
                  found_inf=found_inf.to(DEVICE))
    _poison(ref, gen)
    _poison(tri, gen)
    before = _clone(ref)
    _step(R.adamw, [ref], [grad.clone()], **kwargs)
    _step(TK.adamw, [tri], [grad.clone()], block_size=BLOCK, **kwargs)
    _compare(ref, tri, "found_inf")
    skipped = bool(found_inf.to(torch.float64) != 0)
    if skipped:
        for key in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "cumulative_bitmap"):
            assert torch.equal(_bits(tri[key]), _bits(before[key])), key
        assert int(tri["counters"][0]) == int(tri["counters"][1]) == 0
    else:
        for key in ("param", "exp_avg", "exp_avg_sq"):
            assert not torch.equal(_bits(tri[key]), _bits(before[key])), key
    assert int(tri["counters"][2]) > 0  # non-finite grads are counted on a skipped step too


# ---------------------------------------------------------------------------------------
# Zero-size tensors, errors, and negative controls.
# ---------------------------------------------------------------------------------------


def test_zero_size_tensor_zeroes_counters_and_writes_nothing(launches):
    gen = torch.Generator().manual_seed(0)
    tri = _make_state(gen, 0, torch.bfloat16, torch.float32, None, amsgrad=False, freeze=True)
    _poison(tri, gen)
    steps = torch.tensor([1], device=DEVICE)
    _step(TK.adamw, [tri], [torch.empty(0, dtype=torch.bfloat16, device=DEVICE)],
          scalars=R.step_scalars(steps, 1e-3, *BETAS, 0.0, EPS), amsgrad=False, master=None,
          rounding="nearest", sr_keys=None, element_offsets=None, maximize=False,
          grad_scale=None, found_inf=None)
    assert tri["counters"].tolist() == [0, 0, 0]
    assert launches.launches == 0


def _one_tensor_call(**overrides):
    n = 16
    p = torch.randn(n, device=DEVICE).bfloat16()
    steps = torch.tensor([1], device=DEVICE)
    args = dict(
        params=[p], grads=[torch.randn(n, device=DEVICE).bfloat16()],
        exp_avgs=[torch.zeros(n, device=DEVICE)], exp_avg_sqs=[torch.zeros(n, device=DEVICE)],
        scalars=R.step_scalars(steps, 1e-3, *BETAS, 0.0, EPS),
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,error,match", [
    (dict(exp_avgs=[torch.zeros(32, device=DEVICE)[::2]]), ValueError, r"exp_avgs\[0\] is not contiguous"),
    (dict(params=[torch.zeros(4, 4, device=DEVICE).t().contiguous().t()]), ValueError, "contiguous"),
    (dict(params=[torch.zeros(16, device=DEVICE)], masters=[torch.zeros(16, device=DEVICE)]),
     ValueError, "need bf16 or float16 params"),
    (dict(exp_avgs=[torch.zeros(16, dtype=torch.float16, device=DEVICE)]), TypeError, "float16"),
    (dict(grads=[torch.zeros(16, dtype=torch.float64, device=DEVICE)]), TypeError,
     r"grads\[0\] has dtype torch.float64; the Triton backend takes"),
    (dict(exp_avg_sqs=[torch.zeros(16, dtype=torch.bfloat16, device=DEVICE)]), TypeError,
     "one state dtype per tensor"),
    (dict(counters=[torch.zeros(3, dtype=torch.int32, device=DEVICE)]), TypeError, "counters"),
    (dict(change_bitmaps=[torch.zeros(3, dtype=torch.uint8, device=DEVICE)]), ValueError, "elements"),
    (dict(block_size=12), ValueError, "power of two"),
    (dict(num_warps=3), ValueError, "num_warps must be a power of two"),
    (dict(num_warps=64), ValueError, "num_warps must be a power of two"),
    (dict(item_size=0), ValueError, "item_size must be from 1"),
    (dict(item_size=2**31), ValueError, "item_size must be from 1"),
    (dict(block_size=16, item_size=24), ValueError, r"multiple of block_size \(16\), got 24"),
    (dict(num_programs=0), ValueError, "num_programs must be at least 1"),
])
def test_triton_input_errors_name_the_value_and_touch_nothing(overrides, error, match):
    args = dict(_one_tensor_call(**overrides))
    counters = torch.full((3,), 7, dtype=torch.int64, device=DEVICE)
    args.setdefault("counters", [counters])
    params = args.pop("params")
    before = [_bits(p).clone() for p in params]
    with pytest.raises(error, match=match):
        TK.adamw(params, args.pop("grads"), args.pop("exp_avgs"), args.pop("exp_avg_sqs"),
                 **args)
    assert all(torch.equal(_bits(p), b) for p, b in zip(params, before))
    if args["counters"][0] is counters:
        assert counters.tolist() == [7, 7, 7]


def test_signature_is_the_reference_signature_plus_the_launch_shape():
    import inspect

    ref = inspect.signature(R.adamw).parameters
    tri = inspect.signature(TK.adamw).parameters
    assert list(tri)[: len(ref)] == list(ref)
    assert list(tri)[len(ref):] == ["block_size", "item_size", "num_warps", "num_programs"]
    for name, p in ref.items():
        assert tri[name].kind == p.kind and tri[name].default == p.default, name


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("wrong", ["key", "offset"])
def test_negative_control_wrong_random_stream_is_caught(wrong, shape):
    """The comparison can fail: the kernel with another key, or another element offset,
    stores different bf16 params than the reference."""
    numel = 2000
    gen = torch.Generator().manual_seed(1)
    ref = _make_state(gen, numel, torch.bfloat16, torch.float32, "fp32", amsgrad=False, freeze=False)
    tri = _clone(ref)
    grad = _grad(gen, numel, torch.bfloat16, 1.0)
    steps = torch.tensor([1], device=DEVICE)
    keys = R.stochastic_rounding_keys(0, steps, torch.tensor([0], device=DEVICE))
    kwargs = dict(scalars=R.step_scalars(steps, 1e-3, *BETAS, 0.0, EPS), amsgrad=False,
                  master="fp32", rounding="stochastic", maximize=False, grad_scale=None,
                  found_inf=None)
    _step(R.adamw, [ref], [grad.clone()], sr_keys=keys, element_offsets=[100], **kwargs)
    if wrong == "key":
        _step(TK.adamw, [tri], [grad.clone()], sr_keys=keys ^ 1, element_offsets=[100],
              **SHAPES[shape], **kwargs)
    else:
        _step(TK.adamw, [tri], [grad.clone()], sr_keys=keys, element_offsets=[101],
              **SHAPES[shape], **kwargs)
    # Same master (the rounding does not feed back), different stored params.
    _assert_same_bits("master", ref["master"], tri["master"])
    with pytest.raises(AssertionError, match="param"):
        _assert_same_bits("param", ref["param"], tri["param"])


# ---------------------------------------------------------------------------------------
# The grid: as many persistent programs per SM as the compiled kernel lets fit at once.
# ---------------------------------------------------------------------------------------

H100 = TK.SM_LIMITS[9, 0]


@pytest.mark.parametrize("registers,warps,shared,limits,programs", [
    # 4 warps of 128 registers: 4096 per warp, 4 warps in each quarter's 16384: 4 programs
    (128, 4, 0, H100, 4),
    # 150 registers: 4800 per warp, rounded up to 4864 (units of 256): 3 warps per quarter
    (150, 4, 0, H100, 3),
    (168, 4, 0, H100, 3),    # 5376 per warp: 3 per quarter
    (166, 4, 0, H100, 3),    # 5312 -> 5376
    (130, 4, 0, H100, 3),    # 4160 -> 4352: 3 per quarter (16384 // 4352)
    (120, 4, 0, H100, 4),    # 3840: 4 per quarter
    (64, 4, 0, H100, 8),     # 2048: 8 per quarter, 32 warps
    (32, 4, 0, H100, 16),    # 1024: 16 per quarter, but 2048 threads = 64 warps: 16
    (16, 1, 0, H100, 32),    # 64 warps would fit by registers; 32 blocks per SM
    (255, 8, 0, H100, 1),    # 8160 -> 8192: 2 warps per quarter, 8 per SM: one program
    # shared memory: 228 KiB per SM, 1 KiB kept per block, in units of 128 bytes
    (64, 4, 24576, H100, 8),       # 25600 per block: 9 fit, registers allow 8
    (64, 4, 49152, H100, 4),       # 50176: 4 (233472 // 50176)
    (64, 4, 57344, H100, 4),       # 58368: exactly a quarter of 228 KiB
    (64, 4, 57345, H100, 3),       # 58369 -> 58496: 3
    (64, 4, 45568, H100, 5),       # 46592 = 364 units of 128: 5
    (64, 4, 45576, H100, 4),       # 46600 -> 46720: 4 (5 would fit without the units)
    (64, 4, 300_000, H100, 1),     # does not fit at all: the launch refuses it, not us
    (64, 4, 40_000, TK.SM_LIMITS[8, 0], 4),   # 41024 -> 41088 of 164 KiB: 4
    (32, 4, 0, TK.SM_LIMITS[8, 6], 12),       # 1536 threads per SM on sm_86
])
def test_programs_per_sm_by_hand(registers, warps, shared, limits, programs):
    assert TK.programs_per_sm(registers, warps, shared, limits) == programs


def test_sm_limits_by_compute_capability_else_from_the_device(monkeypatch):
    from types import SimpleNamespace

    h100 = SimpleNamespace(major=9, minor=0, multi_processor_count=132)
    other = SimpleNamespace(major=12, minor=0, multi_processor_count=84,
                            regs_per_multiprocessor=65536, max_threads_per_multi_processor=1536,
                            shared_memory_per_multiprocessor=102400)
    for props, expected in ((h100, (132, H100)),
                            (other, (84, TK.SmLimits(65536, 1536, 16, 102400)))):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, p=props: p)
        assert TK.sm_limits(torch.device("cuda", 0)) == expected


class _Compiled:
    """What ``warmup`` returns, as far as the grid reads it."""

    def __init__(self, registers, warps, shared):
        self.n_regs, self.n_spills = registers, 0
        self.metadata = type("Metadata", (), dict(num_warps=warps, shared=shared))()

    def _init_handles(self):
        pass


class _GridRecorder:
    """The table kernel as a compiled GPU launch sees it: ``warmup`` (counted) returns a
    kernel of the given registers; a launch records its grid and runs nothing."""

    def __init__(self, registers, shared):
        self.registers, self.shared = registers, shared
        self.warmups, self.grids = 0, []

    def warmup(self, *args, grid, num_warps, **kwargs):
        self.warmups += 1
        return _Compiled(self.registers, num_warps, self.shared)

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("registers,shared,per_sm", [(150, 24576, 3), (120, 24576, 4),
                                                      (120, 60000, 3)])
def test_launch_sizes_its_grid_from_the_compiled_kernel(monkeypatch, registers, shared, per_sm):
    """On a GPU the grid is ``programs_per_sm`` of the compiled kernel times the SMs (132,
    an H100), compiled once per launch configuration, and never more than the work items;
    ``num_programs`` and DEFAULT_PROGRAMS_PER_SM override it."""
    recorder = _GridRecorder(registers, shared)
    monkeypatch.setattr(TK, "adamw_table_kernel", recorder)
    monkeypatch.setattr(TK, "_interpreting", lambda: False)
    monkeypatch.setattr(TK, "_POLICY", TK._POLICY._replace(check_device=lambda i, param: None))
    monkeypatch.setattr(TK, "sm_limits", lambda device: (132, H100))
    monkeypatch.setattr(TK, "_PROGRAMS", {})
    TK.planner.clear()
    n = 1000 * 8  # items of 8 elements: 1000 work items, more than fit at once
    p = torch.zeros(n, dtype=torch.bfloat16)
    args = dict(scalars=R.step_scalars(torch.tensor([1]), 1e-3, *BETAS, 0.0, EPS),
                block_size=8, item_size=8)
    states = [torch.zeros(n, dtype=torch.bfloat16) for _ in range(2)]
    TK.adamw([p], [p.clone()], states[:1], states[1:], **args)
    TK.adamw([p], [p.clone()], states[:1], states[1:], **args)
    assert recorder.grids == [(per_sm * 132,)] * 2
    assert recorder.warmups == 1  # cached per launch configuration
    TK.adamw([p], [p.clone()], states[:1], states[1:], amsgrad=False, maximize=True, **args)
    assert recorder.warmups == 2 and recorder.grids[-1] == (per_sm * 132,)
    # Fewer items than programs: one program per item.
    small = torch.zeros(40, dtype=torch.bfloat16)
    TK.adamw([small], [small.clone()], [small.clone()], [small.clone()], **args)
    assert recorder.grids[-1] == (5,)
    TK.adamw([p], [p.clone()], states[:1], states[1:], num_programs=7, **args)
    assert recorder.grids[-1] == (7,)
    monkeypatch.setattr(TK, "DEFAULT_PROGRAMS_PER_SM", 2)
    TK.adamw([p], [p.clone()], states[:1], states[1:], **args)
    assert recorder.grids[-1] == (2 * 132,)
    TK.planner.clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
def test_cpu_tensors_without_interpreter_get_a_readable_error():
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from rlvr_optim import reference as R\n"
        "from rlvr_optim.triton_kernels.adamw import adamw\n"
        "p = torch.zeros(4)\n"
        "adamw([p], [p.clone()], [p.clone()], [p.clone()],\n"
        "      scalars=R.step_scalars(torch.tensor([1]), 1e-3, 0.9, 0.999, 0.0, 1e-8))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "TRITON_INTERPRET=1" in run.stderr and "backend='reference'" in run.stderr
