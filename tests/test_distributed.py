"""DTensor, FSDP2 and DDP params: a run on 2 gloo ranks stores the same bits as on 1.

The 2-rank runs happen in two subprocesses started once per module (this file is also
their entry point: ``python test_distributed.py RANK WORLD PORT OUT``); each writes what
it saw to ``OUT/rank<r>.pt`` and the tests compare that with the same run in this
process on plain tensors. Every run is deterministic, so "same run" means same weights,
same data, same seeds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gloo_ranks
from rlvr_optim import AdamW, bitmaps, distributed
from rlvr_optim.reference import bf16_to_bits

WORLD = 2
STEPS = 3
TIMEOUT_S = 150  # both ranks together; a run takes ~15 s on 2 busy cores
SHAPES = [(7, 5), (13,), (1, 9), (3, 33)]  # odd row counts; (1, 9) leaves rank 1 empty
OPTIONS = dict(lr=1e-2, rounding="stochastic", track_changes="cumulative", seed=3)


# ------------------------------------------------------------------ runs (shared by both sides)


def _full(t):
    if not distributed.is_dtensor(t):
        return t
    if t.dtype == torch.int16:  # gloo cannot gather int16 (the remainder)
        return t.to(torch.int32).full_tensor().to(torch.int16)
    return t.full_tensor()


def _local(t):
    return distributed.local_tensor(t)


def _dtensor_run(mesh=None):
    """Sharded (Shard(0)) and replicated bf16 params over three option groups, 3 SR steps."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    shapes = SHAPES + [(4, 4)]
    full = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    grads = [[torch.randn(s, generator=g).bfloat16() for s in shapes] for _ in range(STEPS)]
    mask = torch.rand(shapes[0], generator=g) < 0.7
    placements = [[Shard(0)]] * len(SHAPES) + [[Replicate()]]

    def place(t, i):
        return t.clone() if mesh is None else distribute_tensor(t, mesh, placements[i])

    params = [nn.Parameter(place(t, i)) for i, t in enumerate(full)]
    opt = AdamW(
        [
            {"params": [params[0], params[1], params[4]]},
            {"params": [params[2]], "master_weights": "fp32"},
            {"params": [params[3]], "master_weights": "remainder", "rounding": "nearest"},
        ],
        **OPTIONS,
    )
    opt.set_freeze_mask(params[0], mask)  # a whole-tensor mask; each rank keeps its range
    for step_grads in grads:
        for i, (p, gr) in enumerate(zip(params, step_grads)):
            p.grad = place(gr, i)
        opt.step()
    out = {"full": [], "bitmap": [], "cumulative": [], "counts": [], "mask": []}
    for p in params:
        n = _local(p).numel()
        out["full"].append({"param": _full(p.detach()).clone(),
                            **{k: _full(v).clone() for k, v in opt.state[p].items()
                               if k in ("exp_avg", "exp_avg_sq", "master", "remainder")}})
        out["bitmap"].append(bitmaps.unpack(opt.change_bitmap(p), n))
        out["cumulative"].append(bitmaps.unpack(opt.cumulative_bitmap(p), n))
        out["counts"].append(opt.change_counts(p).clone())
        mask_bits = opt.freeze_mask(p)
        out["mask"].append(None if mask_bits is None else bitmaps.unpack(mask_bits, n))
    reduced = distributed.all_reduce_change_counts(opt)
    out["global_counts"] = [reduced[p].clone() for p in params]
    out["global_log"] = distributed.global_change_log(opt)
    out["local_log"] = opt.change_log()
    return out


def _tiny_model():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model.bfloat16()


def _batches(steps):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 6, generator=g).bfloat16() for _ in range(steps)]


def _train(model, opt, batches):
    for x in batches:
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _model_run(wrap=None):
    """The tiny model under ``wrap`` (FSDP2 / DDP / None) with SR and change tracking."""
    model = _tiny_model()
    module = wrap(model) if wrap is not None else model
    opt = AdamW(model.named_parameters(), **OPTIONS)
    _train(module, opt, _batches(STEPS))
    return {
        "params": {n: _full(p.detach()).clone() for n, p in model.named_parameters()},
        "global_log": distributed.global_change_log(opt),
    }


def _grouped_optimizer(model, mask):
    opt = AdamW(
        [
            {"params": list(model[0].parameters()), "master_weights": "fp32"},
            {"params": list(model[2].parameters()), "master_weights": "remainder",
             "rounding": "nearest"},
        ],
        **OPTIONS,
    )
    opt.set_freeze_mask(model[0].weight, mask)
    return opt


def _snapshot(opt, model):
    """Local bits of every param and state tensor (cumulative bitmaps and masks included)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = bf16_to_bits(_local(p.detach())).clone()
        for key, value in opt.state[p].items():
            value = _local(value)
            out[f"{name}/{key}"] = value.view(torch.int16) if value.dtype == torch.bfloat16 \
                else value.clone()
    return out


# ------------------------------------------------------------------ the 2-rank side


def _fsdp2(mesh):
    from torch.distributed.fsdp import fully_shard

    def wrap(model):
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        return fully_shard(model, mesh=mesh)

    return wrap


def _checkpoint_run(mesh, directory):
    """FSDP2 run with masks, fp32 master and remainder: straight vs. resumed through DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )

    mask = torch.arange(60).reshape(10, 6) % 3 != 0
    batches = _batches(4)

    model = _fsdp2(mesh)(_tiny_model())
    opt = _grouped_optimizer(model, mask)
    _train(model, opt, batches[:2])
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=directory)
    _train(model, opt, batches[2:])
    straight = _snapshot(opt, model)

    fresh = _fsdp2(mesh)(_tiny_model())
    # A different (all-True) mask, so that the loaded one must replace it.
    fresh_opt = _grouped_optimizer(fresh, torch.ones(10, 6, dtype=torch.bool))
    distributed.init_optimizer_state(fresh_opt)
    state = {"model": get_model_state_dict(fresh),
             "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    _train(fresh, fresh_opt, batches[2:])
    return {"straight": straight, "resumed": _snapshot(fresh_opt, fresh)}


def _placement_errors(mesh, world):
    """Messages of the errors for placements the optimizer cannot step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    errors = {}
    cases = {
        "shard1": ("col", lambda: distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)])),
        "mesh2d": ("hsdp", lambda: distribute_tensor(
            torch.zeros(4, 6), init_device_mesh("cpu", (1, world)), [Replicate(), Shard(0)])),
    }
    for key, (name, make) in cases.items():
        try:
            AdamW([(name, nn.Parameter(make()))])
        except ValueError as e:
            errors[key] = str(e)
    p = nn.Parameter(distribute_tensor(torch.zeros(4, 6), mesh, [Shard(0)]))
    opt = AdamW([p])
    p.grad = distribute_tensor(torch.zeros(4, 6), mesh, [Replicate()])  # not reduce-scattered
    try:
        opt.step()
    except ValueError as e:
        errors["grad_placements"] = str(e)
    return errors


def _worker(rank: str, world: str, port: str, out: str) -> int:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    result = {
        "dtensor": _dtensor_run(mesh),
        "fsdp2": _model_run(_fsdp2(mesh)),
        "ddp": _model_run(lambda m: DistributedDataParallel(m)),
        "checkpoint": _checkpoint_run(mesh, os.path.join(out, "checkpoint")),
        "errors": _placement_errors(mesh, world),
    }
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of 2 gloo ranks saw, from one launch of two processes."""
    out = tmp_path_factory.mktemp("two_ranks")
    gloo_ranks.launch(__file__, WORLD, out, TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    return _dtensor_run(None)


def test_dtensor_params_and_states_are_bit_identical_to_one_process(ranks, single):
    for rank in ranks:
        for got, want in zip(rank["dtensor"]["full"], single["full"]):
            assert got.keys() == want.keys()
            for key in want:
                a, b = got[key], want[key]
                if a.dtype == torch.bfloat16:
                    a, b = a.view(torch.int16), b.view(torch.int16)
                assert torch.equal(a, b), key
    # The runs did something: stochastic rounding moved weights that nearest would keep.
    start = torch.randn(SHAPES[0], generator=torch.Generator().manual_seed(0)).bfloat16()
    assert not torch.equal(single["full"][0]["param"], start)


def test_bitmaps_are_per_local_shard_and_concatenate_to_the_whole(ranks, single):
    sharded = len(SHAPES)
    for i in range(len(single["bitmap"])):
        for key in ("bitmap", "cumulative", "mask"):
            if single[key][i] is None:
                assert all(r["dtensor"][key][i] is None for r in ranks)
                continue
            locals_ = [r["dtensor"][key][i] for r in ranks]
            if i < sharded:
                assert sum(t.numel() for t in locals_) == single[key][i].numel()
                assert torch.equal(torch.cat(locals_), single[key][i]), (key, i)
            else:  # replicated: every rank has the whole bitmap
                assert all(torch.equal(t, single[key][i]) for t in locals_), (key, i)
    assert bool(single["bitmap"][0].any()) and not bool(single["bitmap"][0].all())
    assert ranks[1]["dtensor"]["bitmap"][2].numel() == 0  # the empty shard of the (1, 9) param


def test_all_reduced_counters_equal_one_process(ranks, single):
    for rank in ranks:
        for got, want in zip(rank["dtensor"]["global_counts"], single["counts"]):
            assert got.tolist() == want.tolist()
        assert rank["dtensor"]["global_log"] == single["local_log"]
    # Local counters are per shard: they sum to the global ones for sharded params.
    for i in range(len(SHAPES)):
        total = sum(r["dtensor"]["counts"][i] for r in ranks)
        assert total.tolist() == single["counts"][i].tolist()
    assert ranks[0]["dtensor"]["local_log"] != single["local_log"]


@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_wrapped_model_matches_one_process(ranks, kind):
    want = _model_run(None)
    for rank in ranks:
        got = rank[kind]
        assert got["params"].keys() == want["params"].keys()
        for name in want["params"]:
            assert torch.equal(bf16_to_bits(got["params"][name]),
                               bf16_to_bits(want["params"][name])), name
        assert got["global_log"] == want["global_log"]
    assert 0 < want["global_log"]["rlvr_optim/changed_fraction"] < 1


def test_distributed_checkpoint_resume_is_bit_identical(ranks):
    for rank in ranks:
        straight, resumed = rank["checkpoint"]["straight"], rank["checkpoint"]["resumed"]
        assert straight.keys() == resumed.keys()
        keys = set(straight)
        for suffix in ("freeze_mask", "cumulative_bitmap", "master", "remainder"):
            assert any(k.endswith("/" + suffix) for k in keys), suffix
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), key
    # The loaded mask replaced the fresh optimizer's all-True one.
    mask = ranks[0]["checkpoint"]["resumed"]["0.weight/freeze_mask"]
    assert not bool(bitmaps.unpack(mask, mask.numel() * 8).all())


def test_unsupported_placements_are_refused_by_name(ranks):
    for rank in ranks:
        errors = rank["errors"]
        assert "'col' is a DTensor with placement Shard(dim=1)" in errors["shard1"]
        assert "'hsdp' is a DTensor on a 2-D device mesh" in errors["mesh2d"]
        assert "Shard(0)" in errors["shard1"] and "Replicate()" in errors["mesh2d"]
        assert "must be a DTensor with the param's placements (Shard(dim=0),), got " \
            "(Replicate(),)" in errors["grad_placements"]


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:]))
