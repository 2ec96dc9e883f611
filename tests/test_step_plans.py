"""The per-step host work is cached: the optimizer keeps a plan per group (checked params,
operand lists, one buffer for the step counts) and the Triton backend keeps the calls whose
tensors it has checked. These tests change things between steps and check that the cached
paths see every change: each run is compared with a twin that drops its caches before every
step (the behaviour without caching), bit for bit."""

import copy

import pytest
import torch

from rlvr_optim import AdamW
from rlvr_optim import reference as R

from test_optimizer import assert_same_snapshot, snapshot


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * 0.1).bfloat16().requires_grad_() for n in (5, 33, 64, 9)]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype) for p in params]


def _twins(backend, **kwargs):
    cached, fresh = _model(), _model()
    return (cached, AdamW(cached, lr=1e-2, backend=backend, **kwargs),
            fresh, AdamW(fresh, lr=1e-2, backend=backend, **kwargs))


def _step_both(cached, opt, fresh, opt_fresh, seed, skip=()):
    for k, (p, q, g) in enumerate(zip(cached, fresh, _grads(cached, seed))):
        p.grad = None if k in skip else g.clone()
        q.grad = None if k in skip else g.clone()
    opt.step()
    opt_fresh._forget_plans()
    opt_fresh.step()
    assert_same_snapshot(snapshot(opt_fresh, fresh), snapshot(opt, cached))


BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU tensors: the interpreter path"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_plans_follow_every_change_between_steps(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    cached, opt, fresh, opt_fresh = _twins(backend, rounding="stochastic", track_changes="step")
    both = lambda f: (f(opt, cached), f(opt_fresh, fresh))  # noqa: E731
    seed = iter(range(100))
    _step_both(cached, opt, fresh, opt_fresh, next(seed))
    _step_both(cached, opt, fresh, opt_fresh, next(seed))  # the plan is reused here
    assert opt.__dict__.get("_plans")
    # A freeze mask set between steps.
    both(lambda o, ps: o.set_freeze_mask(ps[2], torch.arange(64) % 3 == 0))
    _step_both(cached, opt, fresh, opt_fresh, next(seed))
    # A param without a gradient this step, then with one again.
    _step_both(cached, opt, fresh, opt_fresh, next(seed), skip={1})
    _step_both(cached, opt, fresh, opt_fresh, next(seed))
    # Options changed on the group: tracking grows a cumulative bitmap, hyperparameters move.
    for o in (opt, opt_fresh):
        o.param_groups[0].update(track_changes="cumulative", lr=3e-3, betas=(0.8, 0.99))
    _step_both(cached, opt, fresh, opt_fresh, next(seed))
    assert "cumulative_bitmap" in opt.state[cached[0]]
    # Back to an earlier state dict.
    saved = copy.deepcopy(opt.state_dict())
    _step_both(cached, opt, fresh, opt_fresh, next(seed))
    opt.load_state_dict(saved)
    opt_fresh.load_state_dict(saved)
    _step_both(cached, opt, fresh, opt_fresh, next(seed))
    # A new group.
    extra = [torch.zeros(17, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    opt.add_param_group({"params": [extra[0]]})
    opt_fresh.add_param_group({"params": [extra[1]]})
    cached.append(extra[0])
    fresh.append(extra[1])
    _step_both(cached, opt, fresh, opt_fresh, next(seed))
    _step_both(cached, opt, fresh, opt_fresh, next(seed))


def _run_steps(opt, params, seeds):
    for s in seeds:
        for p, g in zip(params, _grads(params, s)):
            p.grad = g
        opt.step()


def test_step_counts_are_views_of_one_buffer_and_save_as_usual(tmp_path):
    params = _model()
    opt = AdamW(params, lr=1e-2)
    _run_steps(opt, params, range(3))
    steps = [opt.state[p]["step"] for p in params]
    assert [t.item() for t in steps] == [3.0] * 4
    assert len({t.untyped_storage().data_ptr() for t in steps}) == 1  # one buffer
    assert all(t.dim() == 0 and t.dtype == torch.float32 for t in steps)
    # Saved and loaded like torch's (into a copy of the model), then stepped on: the same
    # bits as the run that never stopped.
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    copies = [p.detach().clone().requires_grad_() for p in params]
    other = AdamW(copies, lr=1e-2)
    other.load_state_dict(torch.load(path))
    assert [other.state[p]["step"].item() for p in copies] == [3.0] * 4
    _run_steps(opt, params, [9, 10])
    _run_steps(other, copies, [9, 10])
    assert [other.state[p]["step"].item() for p in copies] == [5.0] * 4
    assert_same_snapshot(snapshot(opt, params), snapshot(other, copies))


def test_a_bad_gradient_after_cached_steps_is_named():
    params = _model()
    opt = AdamW(params, lr=1e-2)
    _run_steps(opt, params, range(2))
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="group 0 param 1.*sparse"):
        opt.step()


# ---------------------------------------------------------------------------------------
# The Triton backend's checked calls (interpreter on a CPU, compiled on a GPU).
# ---------------------------------------------------------------------------------------

triton_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-path test")


def _call(tk, params, grads, states, steps=1, **extra):
    n = len(params)
    step = torch.full((n,), steps)
    tk.adamw(params, grads, [s["m"] for s in states], [s["v"] for s in states],
             scalars=R.step_scalars(step, 1e-2, 0.9, 0.999, 0.01, 1e-8),
             change_bitmaps=[s["bitmap"] for s in states],
             counters=[s["counts"] for s in states], **extra)


def _states(params):
    return [{"m": torch.zeros(p.numel()), "v": torch.zeros(p.numel()),
             "bitmap": torch.zeros((p.numel() + 7) // 8, dtype=torch.uint8),
             "counts": torch.zeros(3, dtype=torch.int64)} for p in params]


@triton_only
def test_triton_sees_a_param_whose_storage_was_swapped():
    """Same tensor object, new storage (``p.data = ...``, as FSDP1's flat params do): a
    cached pointer table would write into the old storage."""
    pytest.importorskip("triton")
    from rlvr_optim.triton_kernels import adamw as TK

    g = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=g).bfloat16() for n in (40, 9)]
    grads = [torch.randn(p.numel(), generator=g).bfloat16() for p in params]
    states = _states(params)
    ref_params = [p.clone() for p in params]
    ref_states = copy.deepcopy(states)
    _call(TK, params, grads, states)
    _call(R, ref_params, grads, ref_states)
    old = params[0].data
    kept = old.clone()
    params[0].data = old.clone()  # new storage, same values
    ref_params[0] = ref_params[0].clone()
    _call(TK, params, grads, states, steps=2)
    _call(R, ref_params, grads, ref_states, steps=2)
    assert torch.equal(old.view(torch.int16), kept.view(torch.int16))  # old storage untouched
    for p, q in zip(params, ref_params):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
    for s, r in zip(states, ref_states):
        for key in s:
            assert torch.equal(s[key], r[key]), key


@triton_only
def test_triton_sees_a_list_changed_in_place_and_names_a_bad_grad():
    pytest.importorskip("triton")
    from rlvr_optim.triton_kernels import adamw as TK

    g = torch.Generator().manual_seed(4)
    params = [torch.randn(n, generator=g).bfloat16() for n in (16, 24)]
    grads = [torch.randn(p.numel(), generator=g).bfloat16() for p in params]
    states = _states(params)
    exp_avgs = [s["m"] for s in states]
    exp_avg_sqs = [s["v"] for s in states]
    scalars = R.step_scalars(torch.ones(2), 1e-2, 0.9, 0.999, 0.0, 1e-8)
    TK.adamw(params, grads, exp_avgs, exp_avg_sqs, scalars=scalars)
    # The same list object with a new tensor in it: the new one is the one updated.
    old = exp_avgs[1]
    exp_avgs[1] = torch.zeros(24)
    TK.adamw(params, grads, exp_avgs, exp_avg_sqs, scalars=scalars)
    assert torch.equal(old, states[1]["m"]) and not torch.equal(exp_avgs[1], torch.zeros(24))
    # A wrong gradient after cached calls: the per-tensor checks name it.
    with pytest.raises(ValueError, match=r"grads\[1\] has 23 elements, expected 24"):
        TK.adamw(params, [grads[0], grads[1][:23]], exp_avgs, exp_avg_sqs, scalars=scalars)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.int32"):
        TK.adamw(params, [grads[0].int(), grads[1]], exp_avgs, exp_avg_sqs, scalars=scalars)


@triton_only
def test_triton_follows_a_grad_dtype_change_and_keeps_no_tensor_alive():
    """The kept call describes the tensors without their grads (a grad of another dtype
    next step gets the kernel for that dtype) and holds no reference to any tensor: once
    the caller drops them, they are freed and the call leaves the cache."""
    pytest.importorskip("triton")
    import gc
    import weakref

    from rlvr_optim.triton_kernels import adamw as TK

    TK.planner.clear()
    g = torch.Generator().manual_seed(6)
    params = [torch.randn(n, generator=g).bfloat16() for n in (40, 9)]
    states = _states(params)
    ref_params, ref_states = [p.clone() for p in params], copy.deepcopy(states)
    for step, dtype in ((1, torch.bfloat16), (2, torch.float32), (3, torch.bfloat16)):
        grads = [torch.randn(p.numel(), generator=g).to(dtype) for p in params]
        _call(TK, params, grads, states, steps=step)
        _call(R, ref_params, grads, ref_states, steps=step)
        for p, q in zip(params, ref_params):
            assert torch.equal(p.view(torch.int16), q.view(torch.int16)), f"step {step} {dtype}"
        for s, r in zip(states, ref_states):
            for key in s:
                assert torch.equal(s[key], r[key]), (step, key)
    assert len(TK.planner.calls) == 1
    watched = weakref.ref(states[0]["m"])
    del params, states, s, p
    gc.collect()
    assert watched() is None and len(TK.planner.calls) == 0


def _many_groups(seed, count=40):
    g = torch.Generator().manual_seed(seed)
    params = [(torch.randn(16, generator=g) * 0.1).bfloat16().requires_grad_()
              for _ in range(count)]
    groups = [{"params": [p], "lr": (1e-3, 2e-3, 5e-3)[i % 3], "weight_decay": 0.01 * (i % 2)}
              for i, p in enumerate(params)]
    return params, groups


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_many_groups_share_scalar_rows_and_follow_changes_bit_for_bit(backend):
    """Groups of one param with a few distinct hyperparameters: the kept option checks and
    the scalar rows shared between groups of equal step counts give the bits of a twin that
    plans every step afresh, through lr and weight decay changes, a group that skips a
    step (its step count falls behind the others), and a bad lr set in param_groups."""
    from rlvr_optim import step_plan

    step_plan._scalar_memos.clear()
    cached, groups = _many_groups(3)
    fresh, fresh_groups = _many_groups(3)
    opt = AdamW(groups, backend=backend, track_changes="step")
    opt_fresh = AdamW(fresh_groups, backend=backend, track_changes="step")
    seed = iter(range(100))
    for _ in range(2):
        _step_both(cached, opt, fresh, opt_fresh, next(seed))
    for o in (opt, opt_fresh):
        o.param_groups[4]["lr"] = 7e-3
        o.param_groups[5]["weight_decay"] = 0.5
    _step_both(cached, opt, fresh, opt_fresh, next(seed), skip={7, 8})
    _step_both(cached, opt, fresh, opt_fresh, next(seed))
    assert opt.state[cached[7]]["step"].item() == opt.state[cached[6]]["step"].item() - 1
    # The rows were shared: at most the 3 x 2 (lr, weight decay) pairs and the two changed
    # groups' rows per step count, for the 40 groups.
    assert step_plan._scalar_memos and all(
        1 <= len(rows) <= 8 for rows in step_plan._scalar_memos.values())
    opt.param_groups[9]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        opt.step()
