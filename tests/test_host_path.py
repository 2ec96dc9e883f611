"""The steady-state host path (rlvr_optim/plan.py): a step reuses the optimizer's plan and
the backend's kept launches, and every change between steps is still seen.

Each scenario steps an optimizer whose caches are kept against an uncached twin (a
reference-backend optimizer that drops its plans before every step, i.e. one freshly
built from its state) on the same inputs and compares every bit of params and states.
The CUDA backend's host path runs with its launch recorded (no GPU): there the table a
cached step launches must equal the one a fresh planner builds.
"""

import copy
import operator

import numpy as np
import pytest
import torch

from rlvr_optim import AdamW, cuda_backend
from rlvr_optim import reference as R
from rlvr_optim.plan import Gradients, OperandList, ScalarRows, read_gradients

from test_optimizer import assert_same_snapshot, snapshot

SIZES = (5, 33, 64, 9)
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors: interpreter path")


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * 0.1).bfloat16().requires_grad_() for n in SIZES]


def _grads(params, seed, dtype=None):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=g) * 1e-2).to(dtype or p.dtype) for p in params]


def _planner(backend):
    if backend == "triton":
        from rlvr_optim.triton_kernels import adamw as TK

        return TK.planner
    return None


class _Twins:
    """``opt`` (the backend under test, caches kept) and ``fresh`` (reference, no plan)."""

    def __init__(self, backend, **kwargs):
        self.params, self.fresh_params = _model(), _model()
        self.opt = AdamW(self.params, lr=1e-2, backend=backend, **kwargs)
        self.fresh = AdamW(self.fresh_params, lr=1e-2, backend="reference", **kwargs)
        self.planner = _planner(backend)
        self.seed = 0

    def both(self, change):
        change(self.opt, self.params)
        change(self.fresh, self.fresh_params)

    def step(self, grads=None):
        """One step of both on the same new grads (fresh tensors, as after
        ``zero_grad(set_to_none=True)``); returns the planner's build count."""
        self.seed += 1
        grads = grads or _grads(self.params, self.seed)
        for p, q, g in zip(self.params, self.fresh_params, grads):
            p.grad = g.clone()
            q.grad = g.clone()
        self.opt.step()
        self.fresh._forget_plans()
        self.fresh.step()
        assert_same_snapshot(snapshot(self.fresh, self.fresh_params),
                             snapshot(self.opt, self.params))
        return self.planner.builds if self.planner is not None else None

    def step_held(self):
        """One step of both on the grads they hold."""
        self.opt.step()
        self.fresh._forget_plans()
        self.fresh.step()
        assert_same_snapshot(snapshot(self.fresh, self.fresh_params),
                             snapshot(self.opt, self.params))

    def steady(self):
        """A step, then one with the grads kept in place, which reuses everything."""
        self.step()
        plan = self.opt._plans[0]
        builds = self.planner.builds if self.planner is not None else None
        for p, q, g in zip(self.params, self.fresh_params, _grads(self.params, 99)):
            p.grad.copy_(g)
            q.grad.copy_(g)
        self.opt.step()
        self.fresh._forget_plans()
        self.fresh.step()
        assert_same_snapshot(snapshot(self.fresh, self.fresh_params),
                             snapshot(self.opt, self.params))
        assert self.opt._plans[0] is plan
        if self.planner is not None:
            assert self.planner.builds == builds


@pytest.fixture(params=["one pass", "three passes"])
def reader(request, monkeypatch):
    """read_gradients (and same_items) by the CPU extension, or by their Python passes."""
    from rlvr_optim import _checked, cpu_backend, plan

    if request.param == "one pass":
        if cpu_backend.unavailable_reason() is not None:
            pytest.skip("the CPU extension is not built")
        native = cpu_backend.load_extension().read_gradients
        for name in ("read_gradients", "same_items"):  # found again, as a first step would
            monkeypatch.delitem(_checked.EXTENSION_FUNCTIONS, name, raising=False)
        assert plan.extension_function("read_gradients") is not False
        assert plan.extension_function("read_gradients").__name__ == native.__name__
    else:  # and the params' identity by an `is` per param
        monkeypatch.setitem(_checked.EXTENSION_FUNCTIONS, "read_gradients", False)
        monkeypatch.setitem(_checked.EXTENSION_FUNCTIONS, "same_items", False)
    return request.param


@pytest.fixture(params=["one pass", "torch's loop", "python pass"])
def param_check(request, monkeypatch):
    """The params' addresses compared by the CPU extension's one pass (addresses_equal),
    by torch's C++ loop (CUDA builds of torch; on a CPU wheel a stand-in with its contract)
    or by a Python pass."""
    from rlvr_optim import _checked, cpu_backend

    if request.param == "one pass":
        if cpu_backend.unavailable_reason() is not None:
            pytest.skip("the CPU extension is not built")
        monkeypatch.delitem(_checked.EXTENSION_FUNCTIONS, "addresses_equal", raising=False)
        assert _checked.extension_function("addresses_equal") is \
            cpu_backend.load_extension().addresses_equal  # found again
        return request.param
    monkeypatch.setitem(_checked.EXTENSION_FUNCTIONS, "addresses_equal", False)
    if request.param == "python pass":
        monkeypatch.setattr(_checked, "_pointers_equal", None)
    elif _checked._pointers_equal is None:
        def stand_in(tensors, ptrs, indices):
            if not all(isinstance(tensors[i], torch.Tensor) for i in indices):
                raise TypeError("not a tensor")  # as pybind11's cast to at::Tensor
            return all(tensors[i].data_ptr() == ptrs[i] for i in indices)

        monkeypatch.setattr(_checked, "_pointers_equal", stand_in)
    return request.param


BACKENDS = ["reference", "cpu", pytest.param("triton", marks=cpu_only)]


@pytest.fixture(params=BACKENDS)
def twins(request, reader):
    """Per backend, with the grads (and the params' addresses) read in one pass by the CPU
    extension or in Python passes (the ``reader`` fixture)."""
    if request.param == "triton":
        pytest.importorskip("triton")
    if request.param == "cpu":
        from rlvr_optim import cpu_backend

        if cpu_backend.unavailable_reason() is not None:
            pytest.skip("the CPU extension is not built")
    return lambda **kwargs: _Twins(request.param, **kwargs)


def test_reassigned_param_data_is_stepped_and_the_old_storage_left(twins, param_check):
    t = twins(track_changes="step")
    t.step()  # the first step creates the state, so the second makes the plan it keeps
    t.steady()
    old = t.params[1].data
    kept = old.clone()
    t.both(lambda o, ps: setattr(ps[1], "data", ps[1].data.clone()))
    t.step()
    assert torch.equal(old.view(torch.int16), kept.view(torch.int16))
    t.steady()


def test_replaced_grads_and_a_grad_of_another_dtype(twins):
    t = twins(rounding="stochastic", track_changes="step")
    t.step()
    t.steady()
    t.both(lambda o, ps: o.zero_grad(set_to_none=True))
    t.step()  # new grad tensors
    # An fp32 grad for a bf16 param (torch refuses it unless grad_dtype is cleared).
    t.both(lambda o, ps: setattr(ps[2], "grad_dtype", None))
    grads = _grads(t.params, 50)
    grads[2] = grads[2].float()
    before = t.planner.builds if t.planner is not None else None
    t.step(grads)
    if t.planner is not None:
        assert t.planner.builds > before  # another layout: another launch
    grads = _grads(t.params, 51)
    t.step(grads)  # back to bf16


def test_a_grad_of_another_dtype_at_the_same_address(twins):
    # The grad's address is the one the kept launches were built for, its dtype is not: the
    # step must see the dtype (the one-pass reader's key holds both) and not read bf16 as
    # fp32. The bf16 grad is a view of the fp32 grad's storage from its first element.
    t = twins(track_changes="step")
    t.step()
    t.steady()
    values = _grads(t.params, 80)[2]

    def fp32_grad(o, ps):
        ps[2].grad_dtype = None
        ps[2].grad = values.float()

    t.both(fp32_grad)
    t.step_held()
    t.step_held()  # the same grads again: the kept launches, by the key
    before = t.planner.builds if t.planner is not None else None

    def bf16_view(o, ps):
        storage = ps[2].grad
        view = storage.view(torch.bfloat16)[: storage.numel()]
        view.copy_(values * 3)
        assert view.data_ptr() == storage.data_ptr()
        ps[2].grad = view

    t.both(bf16_view)
    t.step_held()
    if t.planner is not None:
        assert t.planner.builds > before  # another layout at the same address
    t.step_held()


def test_loaded_state_dict_and_new_freeze_mask(twins):
    t = twins(track_changes="cumulative", master_weights="fp32")
    t.step()
    t.steady()
    saved = copy.deepcopy(t.opt.state_dict())
    t.step()
    t.both(lambda o, ps: o.load_state_dict(saved))
    t.step()
    t.both(lambda o, ps: o.set_freeze_mask(ps[2], torch.arange(64) % 3 != 0))
    t.step()
    t.steady()


def test_add_param_group_and_option_changes(twins):
    t = twins(track_changes="step")
    t.step()
    t.steady()
    # lr and betas: read every step, no rebuild needed (steady() checks the plan is kept).
    t.both(lambda o, ps: o.param_groups[0].update(lr=3e-3, betas=(0.8, 0.99)))
    t.steady()
    # An option the plan depends on: a new plan, same bits as a fresh optimizer.
    t.both(lambda o, ps: o.param_groups[0].update(track_changes="cumulative",
                                                          rounding="stochastic"))
    t.step()
    assert "cumulative_bitmap" in t.opt.state[t.params[0]]
    extra = [torch.full((17,), 0.5, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    t.opt.add_param_group({"params": [extra[0]], "lr": 1e-3})
    t.fresh.add_param_group({"params": [extra[1]], "lr": 1e-3})
    t.params.append(extra[0])
    t.fresh_params.append(extra[1])
    t.step()
    t.step()


def test_a_missing_grad_then_back(twins):
    t = twins(track_changes="step")
    t.step()
    t.steady()
    grads = _grads(t.params, 70)
    for p, q, g in zip(t.params, t.fresh_params, grads):
        p.grad, q.grad = g.clone(), g.clone()
    t.params[1].grad = t.fresh_params[1].grad = None
    t.opt.step()
    t.fresh._forget_plans()
    t.fresh.step()
    assert_same_snapshot(snapshot(t.fresh, t.fresh_params), snapshot(t.opt, t.params))
    t.steady()


# ---------------------------------------------------------------------------------------
# The pieces.
# ---------------------------------------------------------------------------------------


def test_scalar_rows_equal_the_reference_bit_for_bit():
    """Every step count to 20000 and random ones to 2**24: a column computed in float32
    rather than float64 before its one rounding (a sqrt of the float32 1 - beta2 ** t)
    differs from the reference in about a tenth of these rows for beta2 = 0.999."""
    g = torch.Generator().manual_seed(0)
    steps = torch.cat([torch.arange(1, 20001, dtype=torch.float32),
                       torch.randint(1, 2**24, (20000,), generator=g).float()])
    rows = ScalarRows(steps)
    configs = ((1e-3, (0.9, 0.999), 0.01, 1e-8), (1e-3, (0.9, 0.999), 0.1, 1e-8),
               (3e-4, (0.8, 0.95), 0.1, 1e-6), (torch.tensor(2e-5), (0.9, 0.9999), 0.0, 1e-12),
               (3e-4, (0.8, 0.95), 0.1, 1e-6))
    for lr, betas, wd, eps in configs:
        for _ in range(2):  # the second call keeps the columns written by the first
            got = rows(steps, lr, *betas, wd, eps)
            want = R.step_scalars(steps, lr, *betas, wd, eps)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))
            steps += 1


def test_a_checked_call_sees_each_param_address(param_check):
    from rlvr_optim._checked import CheckedCall

    params = _model()
    frozen = OperandList(params)
    for statics in ((frozen, None), (list(params), None)):
        call = CheckedCall(statics)
        assert call.same_tensors(statics)
        kept = params[3].data
        params[3].data = kept.clone()  # same object, new storage
        assert not call.same_tensors(statics)
        params[3].data = kept
        assert call.same_tensors(statics)
    call = CheckedCall((frozen, None))
    assert not call.same_tensors((OperandList(params[:2]), None))  # another list
    assert not call._params_in_place(params[:3] + [5] + params[4:])  # no error


def test_read_gradients_and_operand_lists(reader):
    params = _model()
    for p, g in zip(params, _grads(params, 1)):
        p.grad = g
    params[2].grad_dtype = None  # allows a grad of another dtype: read as it is
    params[2].grad = torch.ones(params[2].shape)
    grads = read_gradients(params)
    assert type(grads) is Gradients
    assert list(grads) == [p.grad for p in params]
    assert all(map(operator.is_, grads, [p.grad for p in params]))
    if reader == "one pass":  # (address, dtype object's address) per grad, uint64s
        key = np.frombuffer(grads.key, dtype=np.uint64).reshape(-1, 2)
        assert key[:, 0].tolist() == [p.grad.data_ptr() for p in params]
        assert key[:, 1].tolist() == [id(p.grad.dtype) for p in params]
    else:
        assert grads.key is None
    assert grads.pointers == [p.grad.data_ptr() for p in params]
    assert grads.dtypes == [torch.bfloat16] * 2 + [torch.float32] + [torch.bfloat16] * (len(params) - 3)
    assert read_gradients([]) == [] and read_gradients(params[:0]).pointers == []
    with pytest.raises(AttributeError):
        read_gradients([params[0], 5])
    params[1].grad = None
    assert read_gradients(params) is None
    params[1].grad = torch.zeros(33, dtype=torch.bfloat16).to_sparse()
    assert read_gradients(params) is None  # no storage: the optimizer's full checks name it
    frozen = OperandList(params)
    with pytest.raises(TypeError, match="cannot change"):
        frozen[0] = params[1]
    with pytest.raises(TypeError, match="cannot change"):
        frozen.append(params[0])


def _extension():
    from rlvr_optim import cpu_backend

    if cpu_backend.unavailable_reason() is not None:
        pytest.skip("the CPU extension is not built")
    return cpu_backend.load_extension()


def _key(grads):
    return np.frombuffer(grads[1], dtype=np.uint64).reshape(-1, 2).tolist()


def test_the_one_pass_reader_reads_attributes_as_getattr_does():
    """The reader calls the grad and dtype getters directly for the last type it saw; a
    type changed since, one with its own __getattribute__ and a grad that is no tensor
    must still read as getattr reads them."""
    ext = _extension()
    data_ptr = torch.Tensor.data_ptr

    class Param(torch.nn.Parameter):
        pass

    params = [Param(torch.zeros(n, dtype=torch.bfloat16)) for n in SIZES]
    for p, g in zip(params, _grads(params, 3)):
        p.grad = g
    grads, key = ext.read_gradients(params, data_ptr)
    assert all(map(operator.is_, grads, [p.grad for p in params]))
    assert _key((grads, key)) == [[p.grad.data_ptr(), id(p.grad.dtype)] for p in params]
    assert ext.read_gradients(params, data_ptr)[1] == key  # again, by the kept getters

    other = _grads(params, 4, torch.float32)
    Param.grad = property(lambda self: other[SIZES.index(self.numel())])  # modifies the type
    grads, key = ext.read_gradients(params, data_ptr)
    assert all(map(operator.is_, grads, other))
    assert _key((grads, key)) == [[g.data_ptr(), id(torch.float32)] for g in other]
    del Param.grad  # back to the tensor's own grad
    grads, _ = ext.read_gradients(params, data_ptr)
    assert all(map(operator.is_, grads, [p.grad for p in params]))

    class Odd(torch.nn.Parameter):
        def __getattribute__(self, name):
            return other[0] if name == "grad" else super().__getattribute__(name)

    odd = Odd(torch.zeros(5, dtype=torch.bfloat16))
    grads, key = ext.read_gradients([params[0], odd, params[1]], data_ptr)
    assert grads[1] is other[0] and _key((grads, key))[1] == [other[0].data_ptr(), id(torch.float32)]

    class OtherDtype(torch.Tensor):  # a tensor type whose dtype attribute says otherwise
        @property
        def dtype(self):
            return torch.float16

    viewed = torch.zeros(5).as_subclass(OtherDtype)
    params[0].grad = None
    Param.grad = property(lambda self: viewed)
    try:
        assert _key(ext.read_gradients(params[:1], data_ptr)) == [[viewed.data_ptr(), id(torch.float16)]]
        Param.grad = property(lambda self: 7)  # no tensor: no storage, not a crash
        assert ext.read_gradients(params[:1], data_ptr) is None
        Param.grad = property(lambda self: params.clear() or viewed)  # changes the list
        with pytest.raises(ValueError, match="changed size"):
            ext.read_gradients(params, data_ptr)
    finally:
        del Param.grad


def test_addresses_equal_and_same_items(monkeypatch):
    from rlvr_optim import _checked, plan

    ext = _extension()
    data_ptr = torch.Tensor.data_ptr
    params = _model()
    key = np.array([p.data_ptr() for p in params], dtype=np.uint64).tobytes()
    assert ext.addresses_equal(params, key, data_ptr)
    assert ext.addresses_equal(tuple(params), key, data_ptr)
    assert not ext.addresses_equal(params[:-1], key, data_ptr)  # another length
    assert not ext.addresses_equal(params[:-1] + [params[0]], key, data_ptr)  # the last differs
    assert not ext.addresses_equal(params[:2] + [5] + params[3:], key, data_ptr)  # no tensor
    sparse = torch.zeros(3).to_sparse()
    assert not ext.addresses_equal(params[:-1] + [sparse], key, data_ptr)  # no storage
    params[0].data = params[0].data.clone()
    assert not ext.addresses_equal(params, key, data_ptr)
    assert ext.addresses_equal([], b"", data_ptr)

    copy_ = list(params)
    assert ext.same_items(params, copy_) and ext.same_items(tuple(params), copy_)
    assert ext.same_items([], ())
    assert not ext.same_items(params, copy_[:-1])
    copy_[-1] = params[-1].detach()  # an equal tensor, another object
    assert not ext.same_items(params, copy_)
    with pytest.raises(TypeError):
        ext.same_items(params, 5)
    for native in (None, False):  # plan.same_items: the extension's, or its `is` per item
        monkeypatch.setitem(_checked.EXTENSION_FUNCTIONS, "same_items", native)
        assert plan.same_items(params, list(params)) and plan.same_items([], ())
        assert not plan.same_items(params, copy_) and not plan.same_items(params, params[:-1])


@cpu_only
def test_triton_counters_need_no_zeroing_across_work_items():
    """Counters reach their value through the table's workspace: no launch zeroes them,
    a tensor split over several work items sums all of them, and the workspace is zero
    again after each launch (stale counters would otherwise add up step after step)."""
    pytest.importorskip("triton")
    from rlvr_optim.triton_kernels import adamw as TK

    sizes = (4099, 7, 130)
    g = torch.Generator().manual_seed(5)

    def state():
        return ([torch.randn(n, generator=torch.Generator().manual_seed(n)).bfloat16()
                 for n in sizes], [torch.zeros(n) for n in sizes],
                [torch.zeros(n) for n in sizes],
                [torch.full((3,), 12345, dtype=torch.int64) for _ in sizes])

    ref, tri = state(), state()
    for step in (1, 2, 3):
        grads = [torch.randn(n, generator=g).bfloat16() for n in sizes]
        grads[1][3] = float("inf")
        scalars = R.step_scalars(torch.full((3,), float(step)), 1e-2, 0.9, 0.999, 0.01, 1e-8)
        R.adamw(ref[0], grads, ref[1], ref[2], scalars=scalars, counters=ref[3])
        TK.adamw(tri[0], grads, tri[1], tri[2], scalars=scalars, counters=tri[3],
                 block_size=32, item_size=256)  # 4099 elements: 17 work items
        assert [c.tolist() for c in tri[3]] == [c.tolist() for c in ref[3]], step
        launch = TK.planner.calls[0].last[2][0]
        assert not launch.workspace.any()


# ---------------------------------------------------------------------------------------
# The CUDA backend's host path, launch recorded.
# ---------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, ext):
        self._ext = ext
        self.tables = []

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def launch_adamw(self, variant, table, num_tensors, *rest):
        self.tables.append((table, num_tensors))


@pytest.fixture
def recorded_cuda(monkeypatch):
    from rlvr_optim import extensions

    ext = extensions.CUDA.prebuilt()
    if ext is None:
        pytest.skip("no prebuilt rlvr_optim._C of this ABI to read the table layout from")
    recorder = _Recorder(ext)
    monkeypatch.setattr(cuda_backend, "load_extension", lambda: recorder)
    monkeypatch.setattr(cuda_backend, "_POLICY", cuda_backend._POLICY._replace(
        check_device=lambda i, param: None))
    monkeypatch.setattr(cuda_backend, "_stream", lambda device: 0)
    cuda_backend.planner.clear()
    yield recorder
    cuda_backend.planner.clear()


def _launched_rows(recorder):
    """The rows of every table launched since the last call (sorted by their params)."""
    width = len(cuda_backend.ROW_FIELDS)
    buffers = {launch.table.buffer.data_ptr(): launch.table.buffer
               for call in cuda_backend.planner.calls._entries
               for kept in call.launches.values() for launch in kept}
    rows = [buffers[t][: n * width].reshape(n, width) for t, n in recorder.tables]
    recorder.tables.clear()
    return sorted((r.tolist() for r in rows), key=lambda r: r[0][0])


def test_cuda_host_path_launches_what_a_fresh_planner_builds(recorded_cuda):
    params = _model()
    params[3] = params[3].detach().float().requires_grad_()  # a second layout
    opt = AdamW(params, lr=1e-2, backend="cuda", track_changes="step")
    col = cuda_backend.ROW_FIELDS.index

    def step_and_compare(grads=None):
        for p, g in zip(params, grads or _grads(params, 3)):
            p.grad = g
        opt.step()
        cached = _launched_rows(recorded_cuda)
        cuda_backend.planner.clear()
        opt._forget_plans()
        opt.step()
        assert cached == _launched_rows(recorded_cuda)
        return cached

    def addresses(rows, name):
        return {r[col(name)] for table in rows for r in table}

    rows = step_and_compare()
    assert len(rows) == 2
    builds = cuda_backend.planner.builds
    opt.step()  # same grads: the kept launches, no build
    assert _launched_rows(recorded_cuda) == rows and cuda_backend.planner.builds == builds
    params[0].data = params[0].data.clone()
    assert params[0].data_ptr() in addresses(step_and_compare(), "param")
    opt.zero_grad(set_to_none=True)
    grads = _grads(params, 4)
    rows = step_and_compare(grads)
    assert {g.data_ptr() for g in grads} == addresses(rows, "grad")
    params[1].grad_dtype = None
    grads = _grads(params, 5)
    grads[1] = grads[1].float()
    step_and_compare(grads)
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)
    rows = step_and_compare()
    assert opt.state[params[2]]["exp_avg"].data_ptr() in addresses(rows, "exp_avg")
    opt.set_freeze_mask(params[2], torch.arange(64) % 2 == 0)
    rows = step_and_compare()
    assert opt.freeze_mask(params[2]).data_ptr() in addresses(rows, "freeze_mask")


@cpu_only
def test_sr_keys_in_one_launch_equal_the_reference():
    """The GPU step derives its keys in one Triton launch (checked here under the
    interpreter): the same bits as the reference's tensor ops, for seeds and steps that
    use both 32-bit words."""
    pytest.importorskip("triton")
    from rlvr_optim.step_plan import _sr_keys_function
    from rlvr_optim.triton_kernels.sr_keys import stochastic_rounding_keys

    assert _sr_keys_function(torch.device("cpu")) is R.stochastic_rounding_keys
    steps = torch.cat([torch.tensor([1.0, 2.0, 2.0**31 + 3, 2.0**33]),
                       torch.arange(5.0, 2000.0)])  # more than one block of 1024
    keys = torch.cat([torch.tensor([0, 2**31, 2**32 - 1, 5]), torch.arange(1995)])
    for seed in (0, 1, 2**32 + 7, 2**64 - 1):
        want = R.stochastic_rounding_keys(seed, steps.to(torch.int64), keys)
        assert torch.equal(stochastic_rounding_keys(seed, steps, keys), want), seed
    with pytest.raises(ValueError, match="seed must be in"):
        stochastic_rounding_keys(2**64, steps, keys)
