"""rlvr_optim.AdamW against torch.optim.AdamW and against independent checks of each mode."""

import copy
import io

import pytest
import torch

from rlvr_optim import AdamW, bitmaps
from rlvr_optim.reference import bf16_to_bits, fp16_to_bits, fp32_bits, fp32_to_bf16_bits_nearest

SIZES = (1, 7, 8, 33, 4099)
SEEDS = (0, 1, 2)

MODES = {
    "nearest": dict(),
    "stochastic": dict(rounding="stochastic"),
    "fp32_master": dict(master_weights="fp32"),
    "fp32_master_sr": dict(master_weights="fp32", rounding="stochastic"),
    "remainder": dict(master_weights="remainder"),
    "fp32_states": dict(state_dtype=torch.float32),
    "amsgrad_maximize": dict(amsgrad=True, maximize=True),
}


def make_params(dtype, seed, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    shapes = [(n,) if n % 2 else (n // 2 if n > 2 else 1, 2 if n > 2 else n) for n in sizes]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def grad_stream(params, seed, steps):
    g = torch.Generator().manual_seed(1000 + seed)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in params] for _ in range(steps)]


def run(opt, params, grads):
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()


def bits_of(t):
    if t.dtype in (torch.bfloat16, torch.float16):
        return bf16_to_bits(t) if t.dtype == torch.bfloat16 else fp16_to_bits(t)
    return fp32_bits(t)


def snapshot(opt, params):
    """Bit patterns of params and every state tensor."""
    out = {"params": [bits_of(p.detach()).clone() for p in params]}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            out[(i, k)] = v.clone()
    return out


def assert_same_snapshot(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "params":
            for x, y in zip(a[k], b[k]):
                assert torch.equal(x, y)
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------- against torch AdamW


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kwargs", [dict(), dict(amsgrad=True), dict(maximize=True, weight_decay=0.1)])
def test_fp32_matches_torch_fused_after_20_steps(seed, kwargs):
    # Tolerance, measured over the whole model: torch's CPU fused kernel runs the same
    # formula in vectorized fp32 but its scalar tail in double, so single steps differ from
    # ours (torch's CUDA order, fp32 throughout) by an fp32 ULP here and there; over 20
    # steps that stays within relative 1e-6 of the parameter norm, and every element
    # within 32 fp32 ULPs of its own magnitude plus 1e-5 of one update (lr = 1e-3).
    params = make_params(torch.float32, seed)
    ref = [p.detach().clone().requires_grad_() for p in params]
    grads = grad_stream(params, seed, 20)
    run(AdamW(params, lr=1e-3, **kwargs), params, grads)
    run(torch.optim.AdamW(ref, lr=1e-3, fused=True, **kwargs), ref, grads)
    ours = torch.cat([p.detach().reshape(-1) for p in params])
    theirs = torch.cat([r.detach().reshape(-1) for r in ref])
    assert (ours - theirs).norm() <= 1e-6 * theirs.norm()
    assert bool(((ours - theirs).abs() <= 32 * 2.0**-23 * theirs.abs() + 1e-8).all())
    assert not torch.equal(ours, torch.cat([p.reshape(-1) for p in make_params(torch.float32, seed)]))


@pytest.mark.parametrize("seed", SEEDS)
def test_bf16_one_step_matches_torch_fused(seed):
    params = make_params(torch.bfloat16, seed)
    ref = [p.detach().clone().requires_grad_() for p in params]
    gen = torch.Generator().manual_seed(seed)
    ours, theirs = AdamW(params, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2, fused=True)
    for opt, ps in ((ours, params), (theirs, ref)):
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.step()  # create state
    # Identical, non-trivial state before the compared step.
    for p, r in zip(params, ref):
        m = (torch.randn(p.shape, generator=gen) * 0.1).bfloat16()
        v = (torch.rand(p.shape, generator=gen) * 0.01).bfloat16()
        g = torch.randn(p.shape, generator=gen).bfloat16()
        for opt, q in ((ours, p), (theirs, r)):
            opt.state[q]["exp_avg"].copy_(m)
            opt.state[q]["exp_avg_sq"].copy_(v)
            opt.state[q]["step"].fill_(7)
            q.grad = g.clone()
    ours.step()
    theirs.step()
    ours_bits = torch.cat([bf16_to_bits(p.detach()).reshape(-1) for p in params])
    theirs_bits = torch.cat([bf16_to_bits(r.detach()).reshape(-1) for r in ref])
    same = (ours_bits == theirs_bits).float().mean().item()
    assert same >= 0.999
    ulps = (ours_bits - theirs_bits).abs()  # same sign: adjacent patterns are one ULP apart
    assert ulps.max() <= 1


# ----------------------------------------------------------------- stochastic rounding


def _sr_setup(n, lr, rounding, seed=0):
    p = torch.full((n,), 1.5, dtype=torch.bfloat16, requires_grad=True)
    opt = AdamW([p], lr=lr, weight_decay=0.0, rounding=rounding, seed=seed)
    p.grad = torch.ones_like(p)
    return p, opt


def test_stochastic_rounding_is_unbiased_and_has_negative_control():
    n, ulp = 200_000, 2.0**-7  # bf16 spacing in [1, 2)
    lr = 0.3 * ulp
    # The fp32 result of the step, for every element: 1.5 - step_size * m / denom.
    master_p = torch.full((4,), 1.5, dtype=torch.bfloat16, requires_grad=True)
    master_opt = AdamW([master_p], lr=lr, weight_decay=0.0, master_weights="fp32")
    master_p.grad = torch.ones_like(master_p)
    master_opt.step()
    w = master_opt.state[master_p]["master"][0]
    w_bits = int(fp32_bits(w))
    lower, upper = (w_bits >> 16), (w_bits >> 16) + 1  # magnitude neighbours (w > 0)
    p_up = (w_bits & 0xFFFF) / 65536  # probability of rounding the magnitude up
    assert 0.2 < p_up < 0.9

    def fraction_up(rounding):
        p, opt = _sr_setup(n, lr, rounding)
        opt.step()
        bits = bf16_to_bits(p.detach())
        assert bool(((bits == lower) | (bits == upper)).all())
        return (bits == upper).sum().item()

    sigma = (n * p_up * (1 - p_up)) ** 0.5
    assert abs(fraction_up("stochastic") - n * p_up) <= 4 * sigma
    # Negative control: nearest rounding sends every element the same way, far outside.
    assert abs(fraction_up("nearest") - n * p_up) > 4 * sigma


@pytest.mark.parametrize("seed", SEEDS)
def test_stochastic_rounding_gives_a_neighbour_of_the_fp32_result(seed):
    params = make_params(torch.bfloat16, seed)
    twins = [p.detach().clone().requires_grad_() for p in params]
    grads = grad_stream(params, seed, 1)
    run(AdamW(params, lr=1e-2, rounding="stochastic", seed=seed), params, grads)
    master_opt = AdamW(twins, lr=1e-2, master_weights="fp32")
    run(master_opt, twins, grads)
    for p, t in zip(params, twins):
        w_bits = fp32_bits(master_opt.state[t]["master"]).reshape(-1)
        got = bf16_to_bits(p.detach()).reshape(-1)
        assert bool(((got == (w_bits >> 16)) | (got == (w_bits >> 16) + 1)).all())


def test_stochastic_rounding_seed_determines_the_bits():
    def final_bits(seed):
        params = make_params(torch.bfloat16, 0)
        run(AdamW(params, lr=1e-3, rounding="stochastic", seed=seed), params,
            grad_stream(params, 0, 3))
        return torch.cat([bf16_to_bits(p.detach()).reshape(-1) for p in params])

    assert torch.equal(final_bits(5), final_bits(5))
    assert not torch.equal(final_bits(5), final_bits(6))


# ----------------------------------------------------------------- master weights


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fp32_master_param_is_rounded_master(rounding):
    params = make_params(torch.bfloat16, 3)
    opt = AdamW(params, lr=1e-3, master_weights="fp32", rounding=rounding)
    for step_grads in grad_stream(params, 3, 10):
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
        for p in params:
            master = opt.state[p]["master"]
            assert master.dtype == torch.float32
            if rounding == "nearest":
                assert torch.equal(p.detach(), master.bfloat16())
            else:
                w_bits = fp32_bits(master)
                got = bf16_to_bits(p.detach())
                assert bool(((got == w_bits >> 16) | (got == (w_bits >> 16) + 1)).all())


@pytest.mark.parametrize("seed", SEEDS)
def test_remainder_rebuilds_fp32_master_exactly_over_50_steps(seed):
    params = make_params(torch.bfloat16, seed)
    twins = [p.detach().clone().requires_grad_() for p in params]
    grads = grad_stream(params, seed, 50)
    rem_opt = AdamW(params, lr=1e-3, master_weights="remainder")
    master_opt = AdamW(twins, lr=1e-3, master_weights="fp32")
    run(rem_opt, params, grads)
    run(master_opt, twins, grads)
    for p, t in zip(params, twins):
        rem = rem_opt.state[p]["remainder"]
        assert rem.dtype == torch.int16
        rebuilt = ((bf16_to_bits(p.detach()) << 16) + rem.to(torch.int64)) & 0xFFFFFFFF
        assert torch.equal(rebuilt, fp32_bits(master_opt.state[t]["master"]))
        # The bf16 half is the master rounded to nearest (ties away from zero): it can
        # differ from the nearest-even image only at exact ties.
        nearest_even = fp32_to_bf16_bits_nearest(fp32_bits(master_opt.state[t]["master"]))
        tie = (fp32_bits(master_opt.state[t]["master"]) & 0xFFFF) == 0x8000
        assert torch.equal(bf16_to_bits(p.detach())[~tie], nearest_even[~tie])


# ----------------------------------------------------------------- bitmaps and counters


@pytest.mark.parametrize(
    "dtype, mode",
    [(torch.bfloat16, m) for m in ("nearest", "stochastic", "fp32_master", "remainder")]
    + [(torch.float32, "nearest")],  # the other modes need bf16 params
)
def test_bitmaps_and_counters_match_independent_comparison(dtype, mode):
    params = make_params(dtype, 4)
    opt = AdamW(params, lr=3e-3, track_changes="cumulative", **MODES[mode])
    cumulative = [torch.zeros(p.numel(), dtype=torch.bool) for p in params]
    for step_grads in grad_stream(params, 4, 6):
        before = [p.detach().bfloat16().clone() for p in params]  # exact for bf16 params
        w_before = [opt.state[p]["master"].clone() if mode == "fp32_master" else None
                    for p in params] if opt.state else [None] * len(params)
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
        for i, p in enumerate(params):
            changed = bf16_to_bits(p.detach().bfloat16()) != bf16_to_bits(before[i])
            changed = changed.reshape(-1)
            cumulative[i] |= changed
            assert torch.equal(bitmaps.unpack(opt.change_bitmap(p), p.numel()), changed)
            counts = opt.change_counts(p).tolist()
            assert counts[0] == int(changed.sum()) == int(bitmaps.popcount(opt.change_bitmap(p)))
            assert counts[2] == 0
            assert torch.equal(bitmaps.unpack(opt.cumulative_bitmap(p), p.numel()), cumulative[i])
            if w_before[i] is not None:
                moved = fp32_bits(opt.state[p]["master"]) != fp32_bits(w_before[i])
                assert counts[1] == int(moved.sum())
            assert counts[1] >= counts[0]
    log = opt.change_log()
    total = sum(p.numel() for p in params)
    assert log["rlvr_optim/cumulative_changed_fraction"] == pytest.approx(
        sum(int(c.sum()) for c in cumulative) / total)


def test_nonfinite_grads_are_counted_and_kept_nonfinite():
    p = torch.tensor([1.0, 2.0, 3.0, -4.0], dtype=torch.bfloat16, requires_grad=True)
    opt = AdamW([p], lr=1e-2, track_changes="step")
    p.grad = torch.tensor([float("nan"), float("inf"), 1.0, float("-inf")]).bfloat16()
    opt.step()
    assert opt.change_counts(p).tolist()[2] == 3
    assert torch.isnan(p.detach()[0]) and torch.isfinite(p.detach()[2])


# ----------------------------------------------------------------- freeze masks


@pytest.mark.parametrize("mode", list(MODES))
def test_frozen_elements_stay_bit_identical_for_20_steps(mode):
    dtype = torch.bfloat16
    params = make_params(dtype, 5)
    opt = AdamW(params, lr=1e-2, track_changes="step", **MODES[mode])
    gen = torch.Generator().manual_seed(5)
    masks = [torch.rand(p.shape, generator=gen) < 0.5 for p in params]
    opt.set_freeze_mask(params[-1], bitmaps.pack(masks[-1]))  # packed form
    for p, m in zip(params[:-1], masks[:-1]):
        opt.set_freeze_mask(p, m)
    for p in params:  # first step creates the state that must then stay frozen
        p.grad = torch.zeros_like(p)
    opt.step()
    start = snapshot(opt, params)
    run(opt, params, grad_stream(params, 5, 20))
    end = snapshot(opt, params)
    for i, (p, m) in enumerate(zip(params, masks)):
        frozen = ~m.reshape(-1)
        assert torch.equal(end["params"][i].reshape(-1)[frozen], start["params"][i].reshape(-1)[frozen])
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master", "remainder"):
            if (i, key) in start:
                a, b = start[(i, key)].reshape(-1)[frozen], end[(i, key)].reshape(-1)[frozen]
                assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                                   b.view(torch.int16) if b.dtype == torch.bfloat16 else b), key
        trained_changed = end["params"][i].reshape(-1)[~frozen] != start["params"][i].reshape(-1)[~frozen]
        assert bool(trained_changed.any()) or (~frozen).sum() == 0
        changed_bits = bitmaps.unpack(opt.change_bitmap(p), p.numel())
        assert not bool(changed_bits[frozen].any())


# ----------------------------------------------------------------- state dicts


@pytest.mark.parametrize("mode", list(MODES) + ["bf16_states"])
def test_resume_is_bit_identical(mode):
    kwargs = dict(MODES.get(mode, dict(state_dtype=torch.bfloat16)), track_changes="cumulative")
    dtype = torch.float32 if mode in ("fp32_states", "bf16_states") else torch.bfloat16
    grads = grad_stream(make_params(dtype, 6), 6, 10)

    def fresh():
        params = make_params(dtype, 6)
        opt = AdamW(params, lr=1e-3, **kwargs)
        last = params[-1]
        opt.set_freeze_mask(last, torch.arange(last.numel()).reshape(last.shape) % 3 != 0)
        return params, opt

    straight, opt_straight = fresh()
    run(opt_straight, straight, grads)

    params, opt = fresh()
    run(opt, params, grads[:5])
    buffer = io.BytesIO()
    torch.save({"model": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in saved["model"]]
    opt2 = AdamW(resumed, lr=1e-3, **kwargs)
    opt2.load_state_dict(saved["opt"])
    run(opt2, resumed, grads[5:])
    assert_same_snapshot(snapshot(opt2, resumed), snapshot(opt_straight, straight))


def test_torch_state_dict_round_trips_both_ways():
    params = make_params(torch.bfloat16, 7)
    grads = grad_stream(params, 7, 6)
    torch_params = [p.detach().clone().requires_grad_() for p in params]
    theirs = torch.optim.AdamW(torch_params, lr=1e-3)
    run(theirs, torch_params, grads[:3])
    ours = AdamW(params, lr=1e-3)
    for p, q in zip(params, torch_params):
        p.data.copy_(q.detach())
    ours.load_state_dict(theirs.state_dict())
    for p, q in zip(params, torch_params):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[p][key], theirs.state[q][key])
        assert ours.state[p]["step"].item() == 3
    run(ours, params, grads[3:])
    # ...and ours, with default options, loads into torch's AdamW.
    back = torch.optim.AdamW([q for q in torch_params], lr=1e-3)
    back.load_state_dict(ours.state_dict())
    for p, q in zip(params, torch_params):
        assert set(back.state[q]) == {"step", "exp_avg", "exp_avg_sq"}
        assert torch.equal(back.state[q]["exp_avg"], ours.state[p]["exp_avg"])
        assert back.state[q]["step"].item() == 6
    assert back.param_groups[0]["lr"] == 1e-3


def test_state_dtype_survives_load_unlike_torch_casting():
    params = make_params(torch.bfloat16, 8)
    opt = AdamW(params, master_weights="fp32", state_dtype=torch.float32, track_changes="step")
    run(opt, params, grad_stream(params, 8, 2))
    opt2 = AdamW([p.detach().clone().requires_grad_() for p in params],
                 master_weights="fp32", state_dtype=torch.float32, track_changes="step")
    opt2.load_state_dict(opt.state_dict())
    for p in opt2.param_groups[0]["params"]:
        st = opt2.state[p]
        assert st["exp_avg"].dtype == st["master"].dtype == torch.float32
        assert st["change_bitmap"].dtype == torch.uint8 and st["change_counts"].dtype == torch.int64


# ----------------------------------------------------------------- torch contract


def test_params_without_grad_are_skipped_and_hooks_and_schedulers_work():
    a, b = make_params(torch.float32, 9, sizes=(5, 6))
    opt = AdamW([a, b], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kw: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kw: calls.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    b_before = b.detach().clone()
    a.grad = torch.ones_like(a)
    opt.step()
    sched.step()
    assert calls == ["pre", "post"]
    assert torch.equal(b.detach(), b_before) and b not in opt.state
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.zero_grad()
    assert a.grad is None
    c = torch.randn(3, requires_grad=True)
    opt.add_param_group({"params": [c], "lr": 0.01, "rounding": "nearest"})
    assert opt.param_groups[1]["track_changes"] == "off"
    loss = opt.step(lambda: float(c.detach().sum()))
    assert loss == pytest.approx(float(c.detach().sum()))


def test_closure_and_named_parameters():
    model = torch.nn.Linear(4, 3)
    opt = AdamW(model.named_parameters(), lr=1e-2, track_changes="step")
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    names = [r["name"] for r in opt.change_summary()]
    assert names == ["weight", "bias"]


def test_grad_scale_and_found_inf_follow_gradscaler_semantics():
    params = make_params(torch.bfloat16, 10)
    twins = [p.detach().clone().requires_grad_() for p in params]
    grads = grad_stream(params, 10, 2)
    plain, scaled = AdamW(twins, lr=1e-3), AdamW(params, lr=1e-3, track_changes="step")
    run(plain, twins, grads)
    for step_grads in grads:  # grads scaled by 8 (exact), unscaled inside the step
        for p, g in zip(params, step_grads):
            p.grad = (g.float() * 8).bfloat16()
        scaled.grad_scale = torch.tensor(8.0)
        scaled.found_inf = torch.tensor(0.0)
        scaled.step()
    for p, t in zip(params, twins):
        assert torch.equal(bf16_to_bits(p.detach()), bf16_to_bits(t.detach()))
    before = snapshot(scaled, params)
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    scaled.found_inf = torch.tensor(1.0)
    scaled.step()
    after = snapshot(scaled, params)
    for k in before:
        if k == "params":
            assert all(torch.equal(x, y) for x, y in zip(before[k], after[k]))
        elif k[1] != "change_counts":  # a skipped step reports zero changes
            assert torch.equal(before[k], after[k]) or k[1] == "change_bitmap", k
    for p in params:
        assert opt_counts(scaled, p) == [0, 0, p.numel()]
        assert not bool(bitmaps.unpack(scaled.change_bitmap(p), p.numel()).any())


def opt_counts(opt, p):
    return opt.change_counts(p).tolist()


def test_gradscaler_end_to_end_on_cpu():
    model = torch.nn.Linear(8, 4).bfloat16()
    opt = AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(3, 8).bfloat16()).float().pow(2).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())


def test_capturable_matches_default():
    params = make_params(torch.bfloat16, 11)
    twins = [p.detach().clone().requires_grad_() for p in params]
    grads = grad_stream(params, 11, 3)
    run(AdamW(params, lr=1e-3, rounding="stochastic"), params, grads)
    run(AdamW(twins, lr=1e-3, rounding="stochastic", capturable=True), twins, grads)
    for p, t in zip(params, twins):
        assert torch.equal(bf16_to_bits(p.detach()), bf16_to_bits(t.detach()))


# ----------------------------------------------------------------- bad input


def _two_params():
    good = torch.randn(6, dtype=torch.bfloat16, requires_grad=True)
    other = torch.randn(5, dtype=torch.bfloat16, requires_grad=True)
    return good, other


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    ],
)
def test_invalid_hyperparameters_use_torch_messages(kwargs, message):
    for cls in (torch.optim.AdamW, AdamW):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            cls([torch.randn(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rounding="up"), "rounding must be one of"),
        (dict(master_weights="fp16"), "master_weights must be one of"),
        (dict(state_dtype=torch.float16), "state_dtype must be"),
        (dict(track_changes="sometimes"), "track_changes must be one of"),
        (dict(seed=-1), "seed must be an int"),
        (dict(master_weights="remainder", rounding="stochastic"), "cannot be combined"),
        (dict(backend="tpu"), "unknown backend 'tpu'; choose one of 'auto', 'reference'"),
    ],
)
def test_invalid_options(kwargs, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        AdamW([torch.randn(2, dtype=torch.bfloat16, requires_grad=True)], **kwargs)


@pytest.mark.parametrize(
    "dtype, kwargs, message",
    [
        (torch.float32, dict(rounding="stochastic"), "rounding='stochastic' rounds the 16-bit store"),
        (torch.float32, dict(master_weights="remainder"), "needs a bfloat16 param"),
        (torch.float32, dict(master_weights="fp32"), "needs a bfloat16 param"),
        (torch.float64, dict(rounding="stochastic"), "rounds the 16-bit store"),
        (torch.float16, dict(master_weights="remainder"), "master_weights='fp32' for float16"),
        (torch.float64, dict(master_weights="fp32"), "needs a bfloat16 param"),
        (torch.complex64, dict(master_weights="remainder"), "needs a bfloat16 param"),
        (torch.float64, dict(state_dtype=torch.float32), "stepped by torch's Adam code"),
    ],
)
def test_param_that_does_not_fit_the_options_is_named(dtype, kwargs, message):
    model = torch.nn.Module()
    model.ok = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
    model.bad = torch.nn.Parameter(torch.zeros(3).to(dtype))
    with pytest.raises(ValueError, match=message) as info:
        AdamW(model.named_parameters(), **kwargs)
    assert "'bad'" in str(info.value)


def _sparse_grad(p):
    return torch.zeros_like(p).to_sparse()


@pytest.mark.parametrize(
    "make_bad, error, message",
    [
        (_sparse_grad, RuntimeError, "sparse gradients"),
        (lambda p: torch.zeros(p.shape, dtype=torch.float16), ValueError, "gradient dtype"),
    ],
)
def test_bad_gradient_raises_before_anything_changes(make_bad, error, message):
    good, other = _two_params()
    opt = AdamW([{"params": [good]}, {"params": [other]}], lr=0.1, track_changes="step")
    good.grad = torch.ones_like(good)
    other.grad = torch.ones_like(other)
    opt.step()
    before = snapshot(opt, [good, other])
    good.grad = torch.ones_like(good)
    other.grad_dtype = None  # let torch accept a gradient of another dtype
    other.grad = make_bad(other)
    with pytest.raises(error, match=message) as info:
        opt.step()
    assert "group 1 param 0" in str(info.value)
    assert_same_snapshot(before, snapshot(opt, [good, other]))


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(7, dtype=torch.bool), "has 7 elements, the param has 6"),
        (torch.ones(2, 3, dtype=torch.bool), r"has shape \(2, 3\), the param has shape \(6,\)"),
        (torch.ones(6, dtype=torch.float32), "must be a bool tensor"),
        (torch.ones(2, dtype=torch.uint8), "1-D uint8 tensor of 1 bytes"),
        ([True] * 6, "must be a tensor"),
    ],
)
def test_bad_freeze_mask_is_refused(mask, message):
    good, other = _two_params()
    opt = AdamW([good, other])
    with pytest.raises((ValueError, TypeError), match=message):
        opt.set_freeze_mask(good, mask)
    assert opt.freeze_mask(good) is None
    with pytest.raises((ValueError, TypeError), match=message):
        AdamW([good, other], freeze_masks={other: torch.ones(5, dtype=torch.bool), good: mask})
    with pytest.raises(ValueError, match="not a param of this optimizer"):
        opt.set_freeze_mask(torch.zeros(6), None)


def test_bool_freeze_mask_has_the_param_shape_or_is_flat():
    p = torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True)
    opt = AdamW([p])
    keep = torch.tensor([[True, False, True], [False, True, True]])
    opt.set_freeze_mask(p, keep)
    packed = opt.freeze_mask(p)
    opt.set_freeze_mask(p, keep.reshape(-1))  # flat, the param's element order
    assert torch.equal(opt.freeze_mask(p), packed)
    with pytest.raises(ValueError, match=r"has shape \(3, 2\), the param has shape \(2, 3\)"):
        opt.set_freeze_mask(p, keep.reshape(3, 2))
    assert torch.equal(opt.freeze_mask(p), packed)


def test_mismatched_state_dict_is_refused_without_changes():
    good, other = _two_params()
    opt = AdamW([good, other], lr=0.1, master_weights="fp32")
    for p in (good, other):
        p.grad = torch.ones_like(p)
    opt.step()
    before = snapshot(opt, [good, other])

    wrong_shape = copy.deepcopy(opt.state_dict())
    wrong_shape["state"][1]["exp_avg"] = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="param group 0 param 1.*'exp_avg' has shape"):
        opt.load_state_dict(wrong_shape)

    wrong_options = copy.deepcopy(opt.state_dict())
    wrong_options["param_groups"][0]["master_weights"] = "remainder"
    with pytest.raises(ValueError, match="'master'"):
        opt.load_state_dict(wrong_options)

    fp32_params = [torch.randn(6, requires_grad=True), torch.randn(5, requires_grad=True)]
    fp32_opt = AdamW(fp32_params)
    with pytest.raises(ValueError, match="needs a bfloat16 param"):
        fp32_opt.load_state_dict(opt.state_dict())

    assert_same_snapshot(before, snapshot(opt, [good, other]))
    assert opt.param_groups[0]["master_weights"] == "fp32"


def test_deepcopy_and_pickle_keep_options_and_backend():
    import pickle

    p = torch.randn(9, dtype=torch.bfloat16, requires_grad=True)
    opt = AdamW([p], rounding="stochastic", seed=3, backend="reference", track_changes="step")
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.backend == "reference"
        assert clone.param_groups[0]["rounding"] == "stochastic"
        assert clone.param_groups[0]["seed"] == 3
        q = clone.param_groups[0]["params"][0]
        q.grad = torch.ones_like(q)
        clone.step()
        assert clone.change_counts(q) is not None


def test_freeze_masks_set_before_loading_a_maskless_dict_are_kept():
    params = make_params(torch.bfloat16, 12, sizes=(9,))
    theirs = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params])
    run(theirs, theirs.param_groups[0]["params"], grad_stream(params, 12, 1))
    ours = AdamW(params)
    mask = torch.arange(9) % 2 == 0
    ours.set_freeze_mask(params[0], mask)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(bitmaps.unpack(ours.freeze_mask(params[0]), 9), mask)


def test_bad_param_group_is_refused_and_not_added():
    opt = AdamW([torch.randn(3, requires_grad=True)])
    for group, message in (
        ({"params": [torch.randn(2, requires_grad=True)], "rounding": "up"}, "rounding must be"),
        ({"params": [torch.randn(2, requires_grad=True)], "lr": -0.5}, "Invalid learning rate"),
        ({"params": [torch.randn(2, requires_grad=True)], "rounding": "stochastic"},
         "^param 0 of the new group: rounding='stochastic' rounds the 16-bit store"),
    ):
        with pytest.raises(ValueError, match=message):
            opt.add_param_group(group)
    assert len(opt.param_groups) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_params_give_the_same_bits_as_cpu(mode, cuda_device):
    # The reference on the GPU is the same specification: IEEE fp32 ops, sqrt in float64.
    kwargs = dict(MODES[mode], track_changes="cumulative", lr=1e-3)
    cpu = make_params(torch.bfloat16, 13)
    gpu = [p.detach().to(cuda_device).requires_grad_() for p in cpu]
    grads = grad_stream(cpu, 13, 4)
    opt_cpu, opt_gpu = AdamW(cpu, **kwargs), AdamW(gpu, **kwargs)
    run(opt_cpu, cpu, grads)
    run(opt_gpu, gpu, [[g.to(cuda_device) for g in step] for step in grads])
    a, b = snapshot(opt_cpu, cpu), snapshot(opt_gpu, gpu)
    b = {k: ([t.cpu() for t in v] if k == "params" else v.cpu()) for k, v in b.items()}
    assert_same_snapshot(a, b)


# With a GPU these are GPU checks (bench/gpu_check.sh selects -m gpu); on a CPU, CI runs them.
_GPU_MARKS = [pytest.mark.gpu] if torch.cuda.is_available() else []


@pytest.mark.parametrize("mode", [pytest.param(m, marks=_GPU_MARKS) for m in MODES])
def test_triton_backend_gives_the_reference_bits_through_the_optimizer(mode):
    # On a CPU the kernel runs in Triton's interpreter (conftest.py); on a GPU, compiled.
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = dict(MODES[mode], track_changes="cumulative", lr=1e-3)
    ref = [p.detach().to(device).requires_grad_() for p in make_params(torch.bfloat16, 14)]
    tri = [p.detach().clone().requires_grad_() for p in ref]
    grads = [[g.to(device) for g in step] for step in grad_stream(ref, 14, 3)]
    opt_ref = AdamW(ref, backend="reference", **kwargs)
    opt_tri = AdamW(tri, backend="triton", **kwargs)
    opt_tri.set_freeze_mask(tri[-1], torch.arange(tri[-1].numel()).reshape(tri[-1].shape) % 3 > 0)
    opt_ref.set_freeze_mask(ref[-1], opt_tri.freeze_mask(tri[-1]))
    run(opt_ref, ref, grads)
    run(opt_tri, tri, grads)
    assert_same_snapshot(snapshot(opt_ref, ref), snapshot(opt_tri, tri))


def test_unavailable_backend_names_the_reason_and_the_choices(monkeypatch):
    from rlvr_optim import extensions

    monkeypatch.setattr(extensions.CUDA, "is_built", lambda: False)
    monkeypatch.setattr(extensions.CUDA, "build_blockers", lambda: ["nvcc is not on PATH"])
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*nvcc is not on "
                       "PATH.*Available: 'auto', 'reference'"):
        AdamW([torch.randn(2, requires_grad=True)], backend="cuda")


# ---------------------------------------------------------------------------------------
# What torch refuses, refused alike: a param whose dtype or shape changed since its state
# was made; options set through param_groups are taken as the constructor takes them.
# ---------------------------------------------------------------------------------------


def _stepped(dtype, **kwargs):
    params = make_params(dtype, 3, sizes=(33, 8))
    opt = AdamW(params, lr=1e-2, **kwargs)
    run(opt, params, grad_stream(params, 3, 2))
    return opt, params


@pytest.mark.parametrize("old,new", [(torch.bfloat16, torch.float32),
                                     (torch.float32, torch.bfloat16)])
def test_a_param_whose_dtype_changed_is_refused_and_nothing_changes(old, new):
    """model.to(dtype) after steps: torch refuses the next step (its moments are of the old
    dtype); so do we, naming the param, instead of stepping with those moments."""
    opt, params = _stepped(old)
    for p in params:
        p.data = p.data.to(new)
    for p, g in zip(params, grad_stream(params, 4, 1)[0]):
        p.grad = g
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param group 0 param 0 is torch\.\w+ but its state "
                                         r"'exp_avg' is .*dtype changed since its state"):
        opt.step()
    assert_same_snapshot(before, snapshot(opt, params))
    # torch refuses the same step.
    theirs = [p.detach().clone().to(old).requires_grad_() for p in params]
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    run(ref, theirs, grad_stream(theirs, 3, 1))
    for p in theirs:
        p.data = p.data.to(new)
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError):
        ref.step()


def test_a_param_whose_shape_changed_is_refused_at_the_step_and_by_state_dict():
    """p.data = p.data.view(other shape): refused when a step plans the group again (here:
    grads at new addresses) and by state_dict(), whose dict could not be loaded."""
    opt, params = _stepped(torch.bfloat16)
    p = params[0]
    p.data = p.data.view(3, 11)
    with pytest.raises(ValueError, match=r"param group 0 param 0: state 'exp_avg' has shape "
                                         r"\(33,\), expected \(3, 11\): the param's shape changed"):
        opt.state_dict()
    grads = [torch.randn(q.shape).bfloat16() for q in params]  # new addresses: a new plan
    before = snapshot(opt, params)
    for q, g in zip(params, grads):
        q.grad = g
    with pytest.raises(ValueError, match="the param's shape changed since its state was made"):
        opt.step()
    assert_same_snapshot(before, snapshot(opt, params))


@pytest.mark.parametrize("value", [torch.bfloat16, "bf16", torch.float32])
def test_state_dtype_set_in_param_groups_is_taken_as_the_constructor_takes_it(value):
    params = make_params(torch.float32, 5, sizes=(33,))
    theirs = [p.detach().clone().requires_grad_() for p in params]
    opt = AdamW(params, lr=1e-2)
    opt.param_groups[0]["state_dtype"] = value
    ref = AdamW(theirs, lr=1e-2, state_dtype=value)
    grads = grad_stream(params, 5, 2)
    run(opt, params, grads)
    run(ref, theirs, grads)
    assert opt.param_groups[0]["state_dtype"] == ref.param_groups[0]["state_dtype"]
    assert_same_snapshot(snapshot(ref, theirs), snapshot(opt, params))


def test_a_bad_option_set_in_param_groups_is_refused_with_the_constructor_message():
    params = make_params(torch.bfloat16, 5, sizes=(33,))
    opt = AdamW(params, lr=1e-2)
    opt.param_groups[0]["rounding"] = "upward"
    for p in params:
        p.grad = torch.ones_like(p)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="rounding must be one of"):
        opt.step()
    assert_same_snapshot(before, snapshot(opt, params))


@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=True), dict()])
def test_a_state_dict_handed_to_torch_keeps_the_flags_given(flags):
    """torch's loader takes the saved group's foreach / fused: ours saves what was passed,
    so torch's AdamW loading it runs the path the flags name (fused: its fused kernel)."""
    params = make_params(torch.float32, 6, sizes=(33,))
    opt = AdamW(params, lr=1e-2, **flags)
    run(opt, params, grad_stream(params, 6, 2))
    saved = opt.state_dict()
    assert {k: saved["param_groups"][0][k] for k in ("fused", "foreach")} == \
        {"fused": flags.get("fused"), "foreach": flags.get("foreach")}
    theirs = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW(theirs, lr=1e-2, **flags)
    ref.load_state_dict(saved)
    assert ref.param_groups[0]["fused"] == flags.get("fused")
    run(ref, theirs, grad_stream(theirs, 7, 1))


def test_handing_fp32_masters_to_torch_as_the_readme_says():
    """torch's AdamW has no master weights: the README's hand-over makes the fp32 masters
    the (fp32) params before torch loads the state, so no precision is dropped."""
    params = make_params(torch.bfloat16, 8, sizes=(33, 8))
    opt = AdamW(params, lr=1e-2, master_weights="fp32")
    run(opt, params, grad_stream(params, 8, 2))
    masters = [opt.state[p]["master"].clone() for p in params]
    # The README's recipe.
    saved = opt.state_dict()
    for p, pid in zip(params, saved["param_groups"][0]["params"]):
        p.data = saved["state"][pid].pop("master").to(p.device)
    ref = torch.optim.AdamW(params, lr=1e-2)
    ref.load_state_dict(saved)
    assert all(torch.equal(p.detach(), m) for p, m in zip(params, masters))
    assert all(ref.state[p]["exp_avg"].dtype == torch.float32 for p in params)
    run(ref, params, grad_stream(params, 9, 1))


# ---------------------------------------------------------------------------------------
# rlvr_optim.Adam (L2 weight decay) through every backend: the reference's bits.
# ---------------------------------------------------------------------------------------


def _adam_backends():
    out = ["cpu"]
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        pass
    else:
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _adam_backends())
@pytest.mark.parametrize("mode", list(MODES))
def test_adam_gives_the_reference_bits_through_every_backend(mode, backend):
    """torch's Adam (L2 decay) as rlvr_optim.Adam: every mode with cumulative tracking and a
    freeze mask, a fused backend against the reference, bit for bit (params, states,
    bitmaps, counters)."""
    from rlvr_optim import Adam, cpu_backend  # noqa: PLC0415

    if backend == "cpu" and cpu_backend.unavailable_reason() is not None:
        pytest.skip(cpu_backend.unavailable_reason())
    kwargs = dict(MODES[mode], track_changes="cumulative", lr=1e-2, weight_decay=0.1)
    ref = make_params(torch.bfloat16, 15)
    fused = [p.detach().clone().requires_grad_() for p in ref]
    grads = grad_stream(ref, 15, 3)
    opt_ref = Adam(ref, backend="reference", **kwargs)
    opt_fused = Adam(fused, backend=backend, **kwargs)
    mask = torch.arange(fused[-1].numel()).reshape(fused[-1].shape) % 3 > 0
    opt_fused.set_freeze_mask(fused[-1], mask)
    opt_ref.set_freeze_mask(ref[-1], mask)
    run(opt_ref, ref, grads)
    run(opt_fused, fused, grads)
    assert_same_snapshot(snapshot(opt_ref, ref), snapshot(opt_fused, fused))
    # Negative control: AdamW's decay gives other bits from the same start.
    other = make_params(torch.bfloat16, 15)
    run(AdamW(other, backend="reference", **kwargs), other, grads)
    assert any(not torch.equal(a.detach(), b.detach()) for a, b in zip(ref, other))


def test_torch_loading_a_master_state_dict_drops_the_precision_as_the_readme_says():
    """What the README warns of: without the hand-over, torch keeps ``master`` as an unused
    key cast to the bf16 param's dtype."""
    params = make_params(torch.bfloat16, 9, sizes=(33,))
    opt = AdamW(params, lr=1e-2, master_weights="fp32")
    run(opt, params, grad_stream(params, 9, 2))
    theirs = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    ref.load_state_dict(opt.state_dict())
    assert ref.state[theirs[0]]["master"].dtype == torch.bfloat16
    assert not torch.equal(ref.state[theirs[0]]["master"].float(), opt.state[params[0]]["master"])


# ---------------------------------------------------------------------------------------
# float16 params: through the fused backends when a group asks for one of our modes.
# ---------------------------------------------------------------------------------------

FP16_MODES = {
    "fp32_states": dict(state_dtype=torch.float32, track_changes="cumulative"),
    "stochastic": dict(rounding="stochastic", track_changes="step"),
    "fp32_master": dict(master_weights="fp32", track_changes="step"),
    "fp32_master_sr_bf16_states": dict(master_weights="fp32", rounding="stochastic",
                                       state_dtype=torch.bfloat16, track_changes="step"),
}


@pytest.mark.parametrize("backend", _adam_backends())
@pytest.mark.parametrize("mode", list(FP16_MODES))
def test_fp16_params_take_the_fused_backends_bit_for_bit(mode, backend):
    """float16 params (float16 grads) in a group with one of our modes: a fused backend
    against the reference through the optimizer, bit for bit (params, states, master,
    bitmaps, counters), a freeze mask on one param; moments float32 unless state_dtype
    says bfloat16; changes counted on the stored float16 bits."""
    from rlvr_optim import cpu_backend  # noqa: PLC0415

    if backend == "cpu" and cpu_backend.unavailable_reason() is not None:
        pytest.skip(cpu_backend.unavailable_reason())
    kwargs = dict(FP16_MODES[mode], lr=1e-2, weight_decay=0.1)
    ref = make_params(torch.float16, 21)
    fused = [p.detach().clone().requires_grad_() for p in ref]
    grads = grad_stream(ref, 21, 3)
    opt_ref = AdamW(ref, backend="reference", **kwargs)
    opt_fused = AdamW(fused, backend=backend, **kwargs)
    mask = torch.arange(fused[-1].numel()).reshape(fused[-1].shape) % 3 > 0
    opt_fused.set_freeze_mask(fused[-1], mask)
    opt_ref.set_freeze_mask(ref[-1], mask)
    before = [p.detach().clone() for p in fused]
    run(opt_ref, ref, grads)
    run(opt_fused, fused, grads)
    assert_same_snapshot(snapshot(opt_ref, ref), snapshot(opt_fused, fused))
    state = opt_fused.state[fused[0]]
    moments = kwargs.get("state_dtype", torch.float32)
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == moments
    assert all(p.dtype == torch.float16 for p in fused)
    if mode == "fp32_master":
        for p in fused:
            assert torch.equal(fp16_to_bits(p.detach()),
                               fp16_to_bits(opt_fused.state[p]["master"].half()))
    changed = sum(int(opt_fused.change_counts(p)[0]) for p in fused)
    assert changed > 0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, fused))


def test_fp16_params_with_default_options_stay_torch_s():
    """No mode of ours asked for (change tracking only observes): torch's own code steps
    float16 params (float16 states, torch's bits)."""
    ours = make_params(torch.float16, 22)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    grads = grad_stream(ours, 22, 3)
    run(AdamW(ours, lr=1e-2, track_changes="step"), ours, grads)
    opt = torch.optim.AdamW(theirs, lr=1e-2)
    run(opt, theirs, grads)
    for a, b in zip(ours, theirs):
        assert torch.equal(fp16_to_bits(a.detach()), fp16_to_bits(b.detach()))
    opt_ours = AdamW(make_params(torch.float16, 23), lr=1e-2)
    p = opt_ours.param_groups[0]["params"][0]
    p.grad = torch.ones_like(p)
    opt_ours.step()
    assert opt_ours.state[p]["exp_avg"].dtype == torch.float16


def test_fp16_remainder_is_refused_with_the_fix():
    p = torch.zeros(4, dtype=torch.float16, requires_grad=True)
    with pytest.raises(ValueError, match="master_weights='fp32' for float16"):
        AdamW([p], master_weights="remainder")


def test_change_dtype_fp16_compares_float16_images_of_fp32_params():
    """fp32 params, change_dtype=torch.float16: a change bit is set iff the float16 image
    (torch's cast) of the weight changed; the default bf16 images give fewer changes on
    the same step (the negative control: float16's filter is 8x finer)."""
    bits = {}
    for change_dtype in (torch.float16, torch.bfloat16):
        params = make_params(torch.float32, 6)
        opt = AdamW(params, lr=1e-4, track_changes="step", change_dtype=change_dtype)
        grads = grad_stream(params, 6, 2)
        for step_grads in grads:
            before = [p.detach().to(change_dtype).view(torch.int16).clone() for p in params]
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
            for i, p in enumerate(params):
                changed = (p.detach().to(change_dtype).view(torch.int16) != before[i]).reshape(-1)
                assert torch.equal(bitmaps.unpack(opt.change_bitmap(p), p.numel()), changed)
                assert int(opt.change_counts(p)[0]) == int(changed.sum())
        bits[change_dtype] = sum(int(opt.change_counts(p)[0]) for p in params)
        assert opt.param_groups[0]["change_dtype"] == str(change_dtype).split(".")[1]
    assert bits[torch.float16] > bits[torch.bfloat16] > 0
