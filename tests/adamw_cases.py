"""The bit-exactness cases that tests/test_csrc.py (the CUDA extension and its header on
the host), tests/test_cpu_backend.py (the CPU extension) and, for its forms,
tests/test_triton_kernels.py run against the reference, so that every compiled backend
meets the same cases. Not a test module; the tests import it from their own folder."""

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8

# (param dtype, master form, rounding): every combination the reference accepts (rounding
# only affects bf16 params).
FORMS = [
    (torch.float32, None, "nearest"),
    (torch.float32, None, "stochastic"),
    (torch.bfloat16, None, "nearest"),
    (torch.bfloat16, None, "stochastic"),
    (torch.bfloat16, "fp32", "nearest"),
    (torch.bfloat16, "fp32", "stochastic"),
    (torch.bfloat16, "remainder", "nearest"),
]
FORM_IDS = ["fp32", "fp32-sr", "bf16", "bf16-sr", "master", "master-sr", "remainder"]

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
    """A float tensor's bit patterns (bf16 as int16, fp32 as int32); other tensors as they are."""
    if t.dtype == torch.bfloat16:
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
