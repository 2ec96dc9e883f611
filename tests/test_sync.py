"""rlvr_optim.sync: deltas from the optimizer's bitmaps rebuild the trainer's weights exactly.

Every run here is real: params stepped by ``rlvr_optim.AdamW`` under each precision mode,
some params without a gradient in some steps, trackers collecting every 1, 3 and 7 steps,
receivers fed through bytes. The receiver must hold the trainer's synced values bit for
bit; every delta must hold at least the elements that a snapshot diff finds, and a tracker
that syncs every step exactly those (a step that skips a param must send nothing of it).
The FSDP2 test runs 2 gloo processes (this file is their entry point:
``python test_sync.py RANK WORLD PORT OUT``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import gloo_ranks
from rlvr_optim import AdamW, sync
from rlvr_optim.sync import Delta, DeltaError, DeltaTracker, apply_delta, merge_deltas

STEPS = 50
INTERVALS = (1, 3, 7)
SHAPES = {"emb": (37, 13), "proj": (33, 7), "bias": (33,), "one": (1,), "tail": (4099,)}
MODES = {
    "nearest": dict(),
    "stochastic": dict(rounding="stochastic", seed=5),
    "fp32 master": dict(master_weights="fp32"),
    "remainder": dict(master_weights="remainder"),
    "freeze mask": dict(),
    "fp32 params": dict(),
}


def _bits(t):
    t = sync.synced_values(t)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                   8: torch.int64}[t.element_size()])


def _equal(received, params):
    return all(torch.equal(_bits(received[n]), _bits(p)) for n, p in params.items())


def _params(mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if mode == "fp32 params" else torch.bfloat16
    return {n: torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(dtype))
            for n, s in SHAPES.items()}


def _skipped(step):
    """Names without a gradient in ``step``: each is skipped in some steps."""
    return {n for k, n in enumerate(SHAPES) if (step + k) % (k + 3) == 0}


def _grads(params, step, g):
    for k, (n, p) in enumerate(params.items()):
        grad = (torch.randn(p.shape, generator=g) * (1 + k)).to(p.dtype)
        p.grad = None if n in _skipped(step) else grad


def _optimizer(mode, params, **options):
    options = {"lr": 2e-3, "weight_decay": 0.01, "track_changes": "step", **MODES[mode],
               **options}
    opt = AdamW(list(params.items()), **options)
    if mode == "freeze mask":
        g = torch.Generator().manual_seed(9)
        for name in ("emb", "tail"):
            opt.set_freeze_mask(params[name], torch.rand(SHAPES[name], generator=g) < 0.6)
    return opt


def _receiver(params):
    return {n: sync.synced_values(p).clone() for n, p in params.items()}


@pytest.mark.parametrize("mode", list(MODES))
def test_receivers_stay_bit_identical_for_every_interval(mode):
    params = _params(mode)
    opt = _optimizer(mode, params)
    trackers = {k: DeltaTracker(opt, params.items()) for k in INTERVALS}
    receivers = {k: _receiver(params) for k in INTERVALS}
    snapshots = {k: _receiver(params) for k in INTERVALS}
    g = torch.Generator().manual_seed(1)
    sent = {k: 0 for k in INTERVALS}
    for step in range(1, STEPS + 1):
        _grads(params, step, g)
        opt.step()
        for k in INTERVALS:
            if step % k and step != STEPS:
                continue
            delta = Delta.from_bytes(trackers[k].collect().to_bytes())
            for name, p in params.items():
                diff = torch.nonzero(_bits(p).reshape(-1) != _bits(snapshots[k][name]).reshape(-1))
                got = delta.indices.get(name, torch.zeros(0, dtype=torch.int32)).long()
                if k == 1:
                    # One step's bitmap is exactly the diff; a skipped param sends nothing.
                    assert torch.equal(got, diff.reshape(-1)), (step, name)
                    if name in _skipped(step):
                        assert got.numel() == 0
                else:
                    assert set(diff.reshape(-1).tolist()) <= set(got.tolist()), (step, name)
            apply_delta(receivers[k], delta)
            snapshots[k] = _receiver(params)
            sent[k] += delta.changed
            assert _equal(receivers[k], params), (mode, k, step)
    numel = sum(p.numel() for p in params.values())
    for k in INTERVALS:  # the runs changed weights, and not all of them
        assert 0 < sent[k] < STEPS * numel
    assert sent[7] < sent[1]


def test_fp32_params_send_bf16_images_and_keep_fp32_moves_out():
    params = _params("fp32 params")
    opt = AdamW(list(params.items()), lr=1e-5, track_changes="step")
    tracker = DeltaTracker(opt, params.items())
    _grads(params, 1, torch.Generator().manual_seed(0))
    opt.step()
    delta = tracker.collect()
    assert set(delta.dtypes.values()) == {torch.bfloat16}
    moved = sum(int(c[1]) for c in (opt.change_counts(p) for p in params.values()))
    assert delta.changed < moved  # fp32 moved more elements than bf16 images changed


# float16: float16 params (their own bits, whichever code steps them) and fp32 params whose
# change_dtype is float16 (their float16 images). Each mode: param dtype, options.
FP16_MODES = {
    "float16, torch's step": (torch.float16, dict()),
    "float16 + fp32 master": (torch.float16, dict(master_weights="fp32")),
    "float16 stochastic": (torch.float16, dict(rounding="stochastic", seed=3,
                                               state_dtype=torch.bfloat16)),
    "fp32, change_dtype float16": (torch.float32, dict(change_dtype=torch.float16)),
}


def _fp16_run(mode, steps, *, lr=2e-4, image=None):
    """Params of ``mode``, an optimizer and a tracker over them (``image``: force the dtype
    the tracker sends fp32 params in, as a tracker blind to ``change_dtype`` would)."""
    dtype, options = FP16_MODES[mode]
    g = torch.Generator().manual_seed(11)
    params = {n: torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(dtype))
              for n, s in SHAPES.items()}
    opt = AdamW(list(params.items()), lr=lr, weight_decay=0.01, track_changes="step", **options)
    tracker = DeltaTracker(opt, params.items())
    if image is not None:
        for slot in tracker._slots:
            slot.image = image
    return params, opt, tracker


def _fp16_images(params):
    return {n: sync.synced_values(p, torch.float16).clone() for n, p in params.items()}


@pytest.mark.parametrize("mode", list(FP16_MODES))
def test_float16_receivers_hold_the_images_the_bitmaps_speak_of(mode):
    params, opt, tracker = _fp16_run(mode, 12)
    receiver = _fp16_images(params)
    g = torch.Generator().manual_seed(12)
    finer = 0  # elements whose float16 image changed in a step and whose bf16 image did not
    payloads = set()  # safetensors dtypes of the files' values
    for step in range(1, 13):
        before = _fp16_images(params)
        before_bf16 = {n: p.detach().float().bfloat16() for n, p in params.items()}
        _grads(params, step, g)
        opt.step()
        data = tracker.collect().to_bytes()
        delta = Delta.from_bytes(data)
        assert set(delta.dtypes.values()) == {torch.float16}
        payloads |= _payload_dtypes(data)
        now = _fp16_images(params)
        for name in params:
            diff = torch.nonzero(_bits(now[name]).reshape(-1) != _bits(before[name]).reshape(-1))
            got = delta.indices.get(name, torch.zeros(0, dtype=torch.int32)).long()
            assert torch.equal(got, diff.reshape(-1)), (mode, step, name)
            bf16_same = _bits(params[name].detach().float().bfloat16()) == \
                _bits(before_bf16[name])
            finer += int((bf16_same.reshape(-1)[diff.reshape(-1)]).sum())
        apply_delta(receiver, delta)
        assert _equal(receiver, now), (mode, step)
    assert finer > 0  # the run moved weights that a bf16 image would not have shown
    assert payloads == {"F16"}


def _payload_dtypes(data):
    """The safetensors dtypes of a delta file's ``.values`` tensors, read from its header."""
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return {v["dtype"] for k, v in header.items() if k.endswith(".values")}


def test_fp32_images_other_than_the_bitmaps_lose_changes(monkeypatch):
    """The negative control: a tracker that sends fp32 params as float16 images whatever
    their change_dtype (as the tracker sent bf16 images before float16) follows bitmaps of
    bf16 images when change_dtype is left at bf16, misses every float16 change that no bf16
    image showed, and its receiver drifts from the weights. (The other way round, bf16
    images picked by float16 bitmaps, loses a change only where a bf16 image moves while
    the float16 one does not, which steps this size do not reach.)"""
    monkeypatch.setattr(sync, "synced_dtype", lambda dtype, change: (
        torch.float16 if dtype == torch.float32 else dtype))

    def run(options):
        g = torch.Generator().manual_seed(11)
        params = {n: torch.nn.Parameter(torch.randn(s, generator=g) * 0.05)
                  for n, s in SHAPES.items()}
        opt = AdamW(list(params.items()), lr=2e-4, track_changes="step", **options)
        tracker = DeltaTracker(opt, params.items())
        receiver = _fp16_images(params)
        g = torch.Generator().manual_seed(12)
        for step in range(1, 4):
            _grads(params, step, g)
            opt.step()
            apply_delta(receiver, tracker.collect())
        return _equal(receiver, _fp16_images(params))

    assert run(dict(change_dtype=torch.float16))
    assert not run(dict())


def test_changing_change_dtype_stops_collect_until_an_anchor():
    params, opt, tracker = _fp16_run("fp32, change_dtype float16", 2)
    g = torch.Generator().manual_seed(13)
    _grads(params, 1, g)
    opt.step()
    first = tracker.collect()
    assert set(first.dtypes.values()) == {torch.float16}
    opt.param_groups[0]["change_dtype"] = "bfloat16"
    _grads(params, 2, g)
    opt.step()
    with pytest.raises(RuntimeError, match="change_dtype=bfloat16.*float16 images.*anchor"):
        tracker.collect()
    anchor = tracker.anchor()
    assert set(anchor.dtypes.values()) == {torch.bfloat16}
    receiver = {n: torch.zeros_like(p, dtype=torch.bfloat16) for n, p in params.items()}
    apply_delta(receiver, anchor)
    _grads(params, 3, g)
    opt.step()
    apply_delta(receiver, tracker.collect())
    assert _equal(receiver, params)


def test_a_loaded_state_dict_with_another_change_dtype_is_noticed():
    params, opt, tracker = _fp16_run("fp32, change_dtype float16", 2)
    g = torch.Generator().manual_seed(14)
    _grads(params, 1, g)
    opt.step()
    tracker.collect()
    saved = opt.state_dict()
    saved["param_groups"][0]["change_dtype"] = "bfloat16"
    opt.load_state_dict(saved)                  # new group dicts, another change_dtype
    _grads(params, 2, g)
    opt.step()
    with pytest.raises(RuntimeError, match="change_dtype=bfloat16"):
        tracker.collect()


def test_synced_values_round_fp32_to_either_image_as_torch_casts():
    t = torch.tensor([1.0 + 2**-12, 1.0 + 3 * 2**-12, 70000.0, -1e-7, float("-inf"), 2**-20,
                      float("nan")])
    # torch's CPU cast to bf16 writes NaN as 0xFFFF; the spec (and the optimizer) 0x7FC0.
    assert torch.equal(sync.synced_values(t[:-1]).view(torch.int16),
                       t[:-1].bfloat16().view(torch.int16))
    assert int(sync.synced_values(t[-1:]).view(torch.int16)) == 0x7FC0
    assert torch.equal(sync.synced_values(t, torch.float16).view(torch.int16),
                       t.half().view(torch.int16))
    with pytest.raises(ValueError, match="change_dtype"):
        sync.synced_values(t, torch.float32)


def test_two_trackers_on_one_optimizer_keep_their_own_windows():
    params = _params("nearest")
    opt = _optimizer("nearest", params)
    every, fourth = DeltaTracker(opt, params.items()), DeltaTracker(opt, params.items())
    assert every.chain != fourth.chain
    g = torch.Generator().manual_seed(2)
    union = {}
    for step in range(1, 9):
        _grads(params, step, g)
        opt.step()
        for name, idx in every.collect().indices.items():
            union[name] = union.get(name, set()) | set(idx.tolist())
        if step % 4 == 0:
            collected = fourth.collect()
            assert {n: set(i.tolist()) for n, i in collected.indices.items()} == union
            union = {}


def test_cumulative_tracking_and_trackers_made_after_steps():
    params = _params("stochastic")
    opt = _optimizer("stochastic", params, track_changes="cumulative")
    g = torch.Generator().manual_seed(3)
    for step in range(1, 4):
        _grads(params, step, g)
        opt.step()
    received = _receiver(params)
    tracker = DeltaTracker(opt, params.items())  # starts from the weights of step 3
    for step in range(4, 9):
        _grads(params, step, g)
        opt.step()
    apply_delta(received, tracker.collect())
    assert _equal(received, params)


def test_anchor_starts_any_receiver_and_clears_the_window():
    params = _params("nearest")
    opt = _optimizer("nearest", params)
    tracker = DeltaTracker(opt, params.items(), label="tiny")
    g = torch.Generator().manual_seed(4)
    for step in range(1, 4):
        _grads(params, step, g)
        opt.step()
    anchor = tracker.anchor()
    assert anchor.sequence == 1 and anchor.anchor and anchor.changed == anchor.numel
    fresh = {n: torch.zeros_like(p, dtype=torch.bfloat16) for n, p in params.items()}
    apply_delta(fresh, Delta.from_bytes(anchor.to_bytes()))
    assert _equal(fresh, params)
    _grads(params, 4, g)
    opt.step()
    delta = tracker.collect()
    assert delta.sequence == 2 and delta.anchor_sequence == 1 and delta.changed < delta.numel
    apply_delta(fresh, delta)
    assert _equal(fresh, params)


def test_receiver_may_be_a_module_on_any_device():
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Linear(6, 2)).bfloat16()
    engine = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Linear(6, 2)).bfloat16()
    engine.load_state_dict(model.state_dict())
    opt = AdamW(model.parameters(), lr=1e-2, track_changes="step")
    tracker = DeltaTracker(opt, model.named_parameters())
    for _ in range(3):
        model(torch.randn(4, 5).bfloat16()).float().sum().backward()
        opt.step()
        opt.zero_grad()
        apply_delta(engine, tracker.collect())
    assert sync.position(engine) == (tracker.chain, 3)
    for a, b in zip(model.parameters(), engine.parameters()):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_tracker_refuses_params_it_cannot_follow():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="track_changes='off'"):
        DeltaTracker(AdamW([p]), [("p", p)])
    with pytest.raises(ValueError, match="not a param of this optimizer"):
        DeltaTracker(AdamW([p], track_changes="step"), [("q", torch.nn.Parameter(torch.zeros(2)))])
    with pytest.raises(TypeError, match="rlvr_optim.AdamW"):
        DeltaTracker(torch.optim.AdamW([p]), [("p", p)])


def test_a_step_without_bitmaps_stops_collect_until_an_anchor():
    params = _params("nearest")
    opt = _optimizer("nearest", params)
    tracker = DeltaTracker(opt, params.items())
    g = torch.Generator().manual_seed(5)
    opt.param_groups[0]["track_changes"] = "off"
    _grads(params, 1, g)
    opt.step()
    with pytest.raises(RuntimeError, match="track_changes='off'.*anchor"):
        tracker.collect()
    opt.param_groups[0]["track_changes"] = "step"
    receiver = {n: torch.zeros_like(p) for n, p in params.items()}
    apply_delta(receiver, tracker.anchor())
    _grads(params, 2, g)
    opt.step()
    apply_delta(receiver, tracker.collect())
    assert _equal(receiver, params)


# ------------------------------------------------------------------ refusals


@pytest.fixture(scope="module")
def chain():
    """A tracker's first three deltas (as bytes), the start and the weights after each."""
    params = _params("stochastic", seed=7)
    opt = _optimizer("stochastic", params)
    tracker = DeltaTracker(opt, params.items())
    other = DeltaTracker(opt, params.items())
    start = _receiver(params)
    g = torch.Generator().manual_seed(8)
    files, states = [], []
    for step in range(1, 4):
        _grads(params, step, g)
        opt.step()
        files.append(tracker.collect().to_bytes())
        states.append(_receiver(params))
    return {"start": start, "files": files, "states": states,
            "other": [other.collect().to_bytes(), other.collect().to_bytes()]}


def _copy(weights):
    return {n: t.clone() for n, t in weights.items()}


def _refused(weights, data, match):
    before = _copy(weights)
    with pytest.raises(DeltaError, match=match) as info:
        apply_delta(weights, Delta.from_bytes(data))
    assert "\n" not in str(info.value)
    assert _equal(weights, before)


def test_another_base_is_refused(chain):
    weights = _copy(chain["start"])
    weights["bias"][4] += 1  # not the tracker's start
    _refused(weights, chain["files"][0], "applies to other weights: tensor 'bias'")
    weights = _copy(chain["start"])
    apply_delta(weights, Delta.from_bytes(chain["files"][0]))
    # Another tracker's deltas: its first names its base, the next ones their chain.
    _refused(weights, chain["other"][0], "applies to other weights")
    _refused(weights, chain["other"][1], "is of chain .* these weights follow chain .* for "
                                         "another base")


def test_out_of_order_and_repeated_deltas_are_refused(chain):
    weights = _copy(chain["start"])
    _refused(weights, chain["files"][1], "no position in chain")
    apply_delta(weights, Delta.from_bytes(chain["files"][0]))
    _refused(weights, chain["files"][2], r"apply deltas 2\.\.2 first \(out of order\)")
    _refused(weights, chain["files"][0], "already applied")
    apply_delta(weights, Delta.from_bytes(chain["files"][1]))
    _refused(weights, chain["files"][1], "already applied")
    apply_delta(weights, Delta.from_bytes(chain["files"][2]))
    assert _equal(weights, chain["states"][2])


def test_weights_changed_in_place_since_the_last_delta_are_refused(chain):
    weights = _copy(chain["start"])
    apply_delta(weights, Delta.from_bytes(chain["files"][0]))
    weights["tail"].mul_(1)  # same values, but written by other code
    _refused(weights, chain["files"][1], "'tail' was changed in place")


def test_every_flipped_byte_and_truncation_is_refused():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.nn.Parameter(torch.randn(4, 5, generator=g).bfloat16()),
              "b": torch.nn.Parameter(torch.randn(3, generator=g).bfloat16())}
    opt = AdamW(list(params.items()), lr=0.1, track_changes="step")
    tracker = DeltaTracker(opt, params.items())
    weights = _receiver(params)
    for _ in range(2):
        _grads(params, 0, g)
        opt.step()
        data = tracker.collect().to_bytes()
        if tracker.sequence == 1:
            apply_delta(weights, Delta.from_bytes(data))
    before = _copy(weights)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0xFF
        with pytest.raises(DeltaError) as info:
            apply_delta(weights, Delta.from_bytes(bytes(bad)))
        assert "\n" not in str(info.value), i
    for cut in (0, 7, 8, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(DeltaError):
            apply_delta(weights, Delta.from_bytes(data[:cut]))
    assert _equal(weights, before)
    apply_delta(weights, Delta.from_bytes(data))  # the intact file still applies
    assert _equal(weights, params)


def test_corrupt_values_in_memory_are_refused(chain):
    weights = _copy(chain["start"])
    delta = Delta.from_bytes(chain["files"][0])
    name = next(iter(delta.values))
    delta.values[name] = delta.values[name].clone()
    delta.values[name][0] = -delta.values[name][0] + 1
    with pytest.raises(DeltaError, match=f"tensor {name!r}: its indices and values hash"):
        apply_delta(weights, delta)
    assert _equal(weights, chain["start"])


def test_bad_indices_are_refused_naming_the_first_bad_one():
    values = torch.ones(4, dtype=torch.bfloat16)
    cases = {(0, 5, 5, 9): r"index 2 \(5\) is not above index 1 \(5\)",
             (0, 7, 3, 9): r"index 2 \(3\) is not above index 1 \(7\)",
             (-2, 1, 3, 4): r"index 0 is negative \(-2\)",
             (0, 1, 300, 400): r"index 2 \(300\) is past the tensor's 100 elements"}
    for indices, message in cases.items():
        with pytest.raises(DeltaError, match=message):
            sync._checked_entries("w", torch.tensor(indices, dtype=torch.int32), values, 100)


# ------------------------------------------------------------------ no whole-tensor copies


class _Counter(TorchDispatchMode):
    """Bytes of every op's new outputs (not views of its inputs), and the largest one."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr()
                  for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                size = t.numel() * t.element_size()
                self.total += size
                self.largest = max(self.largest, size)
        return out


class _NoHostCopies(torch.overrides.TorchFunctionMode):
    """Refuses to move any tensor of more than 4 KiB to the host (or to numpy/lists)."""

    NAMES = {"cpu", "numpy", "tolist", "to", "__array__", "item"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.NAMES and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            to_host = name != "to" or "cpu" in map(str, (*args[1:], *kwargs.values()))
            if to_host and t.numel() * t.element_size() > 4096:
                raise AssertionError(f"{name}() of a {tuple(t.shape)} tensor in collect()")
        return func(*args, **kwargs)


def test_collect_copies_no_whole_tensor_to_the_host():
    g = torch.Generator().manual_seed(0)
    params = {f"w{i}": torch.nn.Parameter((torch.randn(1024, 512, generator=g)).bfloat16())
              for i in range(3)}
    opt = AdamW(list(params.items()), lr=1e-6, track_changes="step")
    tracker = DeltaTracker(opt, params.items())
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g).bfloat16()
    opt.step()
    weights_bytes = sum(p.numel() * p.element_size() for p in params.values())
    counter = _Counter()
    with _NoHostCopies(), counter:
        delta = tracker.collect()
    assert 0 < delta.changed < 0.001 * delta.numel
    # Every op's new outputs together: some tens of bytes per changed element, nothing
    # that grows with the weights (the windows are compacted in place).
    assert counter.total < 64 * delta.changed + 4096
    assert counter.largest < 32 * delta.changed
    # A control: the snapshot diff that the tracker replaces trips both checks.
    with pytest.raises(AssertionError, match="in collect"), _NoHostCopies():
        {n: p.detach().cpu() for n, p in params.items()}


# ------------------------------------------------------------------ the file format


def test_files_are_trl_sparse_patches_that_a_plain_reader_applies(chain):
    """Read the file as TRL's delta engine documents it (safe_open, ``changed_params``,
    ``<name>.indices`` / ``<name>.values``, ``flat[indices] = values``); trl 1.16, installed
    here, has no delta-sync module to run."""
    weights = _copy(chain["start"])
    for data, state in zip(chain["files"], chain["states"]):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"trl-{os.getpid()}.safetensors"
        path.write_bytes(data)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                assert meta["format"] == "sparse_weight_patch" and meta["version"] == "1"
                assert int(meta["prev_model_version"]) == int(meta["model_version"]) - 1
                for name in json.loads(meta["changed_params"]):
                    indices = f.get_tensor(f"{name}.indices")
                    assert indices.dtype == torch.int32
                    weights[name].view(-1)[indices.long()] = f.get_tensor(f"{name}.values")
        finally:
            path.unlink()
        assert _equal(weights, state)


def test_anchor_files_are_trl_anchor_checkpoints():
    params = _params("nearest")
    opt = _optimizer("nearest", params)
    data = DeltaTracker(opt, params.items()).anchor().to_bytes()
    from safetensors.torch import load
    tensors = load(data)
    assert tensors.keys() == params.keys()
    assert all(torch.equal(tensors[n], p.detach()) for n, p in params.items())


def test_files_written_by_trl_are_read_and_checked_by_their_sha256():
    import hashlib

    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(6, 4, generator=g).bfloat16(),
               "b": torch.randn(9, generator=g).bfloat16()}
    anchor = save({n: t.clone() for n, t in weights.items()},
                  metadata={"format": "anchor_checkpoint", "version": "1", "model_version": "4"})
    after = {n: t.clone() for n, t in weights.items()}
    after["a"].view(-1)[torch.tensor([1, 5])] = torch.tensor([2.0, -3.0], dtype=torch.bfloat16)
    digest = hashlib.sha256()
    for name in sorted(after):
        digest.update(after[name].view(torch.uint8).numpy().tobytes())
    meta = {"format": "sparse_weight_patch", "version": "1", "model_version": "5",
            "prev_model_version": "4", "changed_params": '["a"]',
            "checksum_sha256": digest.hexdigest()}
    tensors = {"a.indices": torch.tensor([1, 5], dtype=torch.int32),
               "a.values": torch.tensor([2.0, -3.0], dtype=torch.bfloat16)}
    receiver = {n: torch.zeros_like(t) for n, t in weights.items()}
    apply_delta(receiver, Delta.from_bytes(anchor))
    wrong = dict(meta, checksum_sha256="0" * 64)
    with pytest.raises(DeltaError, match="SHA-256"):
        apply_delta(receiver, Delta.from_bytes(save(tensors, metadata=wrong)))
    assert _equal(receiver, weights)
    apply_delta(receiver, Delta.from_bytes(save(tensors, metadata=meta)))
    assert _equal(receiver, after)


def test_same_delta_gives_the_same_bytes_and_reports_its_sizes(chain, tmp_path):
    delta = Delta.from_bytes(chain["files"][0])
    assert delta.to_bytes() == chain["files"][0]
    size = delta.save(tmp_path / "d.safetensors")
    assert (tmp_path / "d.safetensors").read_bytes() == chain["files"][0]
    assert os.listdir(tmp_path) == ["d.safetensors"]
    report = delta.report()
    assert report["file_bytes"] == size and report["full_bytes"] == 2 * delta.numel
    assert delta.nbytes == 6 * delta.changed  # int32 index + bf16 value per element


def test_int64_indices_from_2_31_elements():
    assert sync._index_dtype(2**31 - 1) == torch.int32
    assert sync._index_dtype(2**31) == torch.int64
    delta = Delta(sequence=1, chain="c", shapes={"w": (10,)}, dtypes={"w": torch.bfloat16},
                  indices={"w": torch.tensor([2, 7])},
                  values={"w": torch.tensor([1.0, 2.0]).bfloat16()},
                  base_sums=sync.state_checksums({"w": torch.zeros(10, dtype=torch.bfloat16)}))
    delta.sums = {"w": sync._sum_of_entries([(delta.indices["w"], delta.values["w"])])[0]}
    back = Delta.from_bytes(delta.to_bytes())
    assert back.indices["w"].dtype == torch.int64
    weights = {"w": torch.zeros(10, dtype=torch.bfloat16)}
    apply_delta(weights, back)
    assert weights["w"][7] == 2


def test_checksum_is_the_sum_of_its_parts():
    """State checksums add over disjoint pieces and follow single-element changes (what
    merging shards and updating a receiver incrementally rely on)."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1000, generator=g).bfloat16()
    whole = sync.state_checksums({"t": t})["t"]
    first = sync._sum_of_entries([(torch.arange(400), t[:400])])[0]
    rest = sync._sum_of_entries([(torch.arange(400, 1000), t[400:])])[0]
    assert sync._add(first, rest) == whole
    changed = t.clone()
    changed[17] = 5.0
    other = sync.state_checksums({"t": changed})["t"]
    assert other != whole
    old = sync._sum_of_entries([(torch.tensor([17]), t[17:18])])[0]
    new = sync._sum_of_entries([(torch.tensor([17]), changed[17:18])])[0]
    assert sync._add(sync._add(whole, old, -1), new) == other


# ------------------------------------------------------------------ a TRL GRPO run


def test_trl_grpo_example_syncs_a_fake_engine(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import importlib.util

    path = Path(__file__).parents[1] / "docs" / "examples" / "trl_grpo_delta_sync.py"
    spec = importlib.util.spec_from_file_location("trl_grpo_delta_sync", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    engine, model = example.main(str(tmp_path), steps=3)
    assert [d["sequence"] for d in engine.received] == [1, 2, 3]
    assert all(0 < d["changed"] < d["numel"] for d in engine.received)
    for name, p in model.named_parameters():
        assert torch.equal(engine.weights[name].view(torch.int16), p.detach().view(torch.int16))


# ------------------------------------------------------------------ GPU


@pytest.mark.parametrize("capturable", [False, True])
def test_receivers_stay_bit_identical_on_cuda(cuda_device, capturable):
    """CPU step counts (read on the host) and device step counts (compared on the device)."""
    params = {n: torch.nn.Parameter(p.detach().to(cuda_device))
              for n, p in _params("stochastic").items()}
    opt = _optimizer("stochastic", params, capturable=capturable)
    trackers = {k: DeltaTracker(opt, params.items()) for k in INTERVALS}
    receivers = {k: _receiver(params) for k in INTERVALS}
    g = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        for n, p in params.items():
            p.grad = None if n in _skipped(step) else torch.randn(p.shape, generator=g).to(p)
        opt.step()
        for k in INTERVALS:
            if step % k == 0 or step == STEPS:
                apply_delta(receivers[k], trackers[k].collect())
    for k in INTERVALS:
        assert _equal(receivers[k], params)


# ------------------------------------------------------------------ FSDP2 on 2 gloo ranks

WORLD = 2
TIMEOUT_S = 150


def _tiny_model():
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.Tanh(), torch.nn.Linear(11, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model.bfloat16()


def _worker(rank: str, world: str, port: str, out: str) -> int:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = _tiny_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = AdamW(model.parameters(), lr=1e-2, rounding="stochastic", track_changes="step", seed=3)
    tracker = DeltaTracker(opt, model.named_parameters())
    g = torch.Generator().manual_seed(2)
    for step in range(1, 7):
        model(torch.randn(8, 6, generator=g).bfloat16()).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            delta = tracker.anchor() if step == 4 else tracker.collect()
            delta.save(os.path.join(out, f"delta{step // 2}-rank{rank}.safetensors"))
            full = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
            if rank == 0:
                save_file(full, os.path.join(out, f"full{step // 2}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_ranks")
    gloo_ranks.launch(__file__, WORLD, out, TIMEOUT_S)
    from safetensors.torch import load_file

    return [{"parts": [Delta.load(out / f"delta{k}-rank{r}.safetensors") for r in range(WORLD)],
             "full": load_file(out / f"full{k}.safetensors")} for k in (1, 2, 3)]


def test_fsdp2_shards_rebuild_the_full_weights(ranks):
    start = {n: p.detach() for n, p in _tiny_model().named_parameters()}
    receiver = {n: t.clone() for n, t in start.items()}
    late = None  # a receiver that starts from the anchor (sync 2) instead
    for k, sync_point in enumerate(ranks):
        parts = sync_point["parts"]
        assert [p.part for p in parts] == [(0, 2), (1, 2)]
        assert parts[0].chain == parts[1].chain
        with pytest.raises(DeltaError, match="merge the parts"):
            apply_delta(receiver, parts[0])
        merged = merge_deltas(parts[::-1])
        assert merged.part is None and merged.anchor == (k == 1)
        apply_delta(receiver, Delta.from_bytes(merged.to_bytes()))
        full = sync_point["full"]
        assert _equal(receiver, full), k
        if merged.anchor:
            late = {n: torch.zeros_like(t) for n, t in start.items()}
        if late is not None:
            apply_delta(late, merged)
            assert _equal(late, full), k
    assert late is not None and not _equal(start, ranks[-1]["full"])
    with pytest.raises(DeltaError, match="one part of each of the 2 ranks"):
        merge_deltas([ranks[0]["parts"][0]] * 2)


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:]))
