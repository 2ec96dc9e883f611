"""The step planner of the fused backends: one description of a step, built once and reused.

Both fused backends (``triton_kernels/adamw.py`` and :mod:`rlvr_optim.cuda_backend`) hand a
call's operand lists to one :class:`Planner`, which checks them once and describes the step
as :class:`Group` s, one launch each:

- per tensor (a *call row* ``i``: its index in the call's lists, which is also its row of
  ``scalars`` and ``sr_keys``): the address of every operand of :data:`OPERANDS` (0 when
  absent), its element count and the global index of its element 0 (``element_offset``,
  for the stochastic rounding stream);
- per group: the device, the backend's launch key (dtypes, which optional tensors are
  present, alignment) and the call rows of its tensors, in call order. Tensors without
  elements are in no group; the planner sets their counters (0) itself.

Each backend encodes a group into the table its kernel reads (one int64 row per tensor of
``csrc/step_table.h``, :mod:`rlvr_optim.table`; Triton adds a work table) and the planner
keeps the encoded launches, so a steady-state
step is one pass over the grads: their addresses and dtypes are compared with those the
launches were built for (and the params' addresses with the checked ones), then the
kept launches run. A table is rebuilt only when an address, the tensors or an option
changed; a table used inside a CUDA graph capture is kept for the life of the process,
because the graph holds its address.

What the planner sees and what it does not (so that no step is silently wrong):

- the operand lists by identity: a tensor replaced in a list makes another call. The
  optimizer passes :class:`OperandList` s (lists that cannot change), so recognizing its
  call costs one comparison per list; other lists are compared tensor by tensor;
- a param whose ``.data`` was reassigned (new address): its call is checked again;
- a grad with new storage or another dtype (``zero_grad(set_to_none=True)`` and new
  grads, a grad cast in place of the old one): its launches are rebuilt after the grads
  pass the checks. Grads in a plain list are checked in bulk (size, device, contiguity)
  in every call; the optimizer's :class:`Gradients` only when their addresses or dtypes
  change, because torch checks the shape and device of an assigned ``.grad``;
- tensors other than params and grads are recognized by identity alone: give a state new
  storage as a new tensor object, never by assigning its ``.data`` between calls.
  :class:`rlvr_optim.AdamW` makes new operand lists whenever its state changes through it
  (``load_state_dict``, ``set_freeze_mask``, ``add_param_group``, an option).
"""

from __future__ import annotations

from operator import attrgetter, is_
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from ._checked import CheckedCall, CheckedCalls, OperandList, extension_function
from .operands import Operands

__all__ = ["Gradients", "Group", "OperandList", "PlannedCall", "Planner", "ScalarRows",
           "read_gradients", "same_items"]

_GRAD = attrgetter("grad")
_DTYPE = attrgetter("dtype")
_MAX_GRAD_SIGNATURES = 4  # grad layouts kept per checked call (e.g. two alternating buffers)


class Gradients(list):
    """Grads read once per step, with what a steady-state step compares: their data
    pointers and dtypes.

    The optimizer reads them to know that its plan still holds (a missing or sparse grad
    has no data pointer); a backend given this list reads the grads' addresses and dtypes
    here instead of reading every grad again. Read by the CPU extension, they come as
    ``key``: bytes, compared whole with those of the previous step, and ``pointers`` and
    ``dtypes`` are read from the grads only when asked for (a step that builds its
    launches). Read in Python, ``key`` is None and the lists are read at once.
    """

    __slots__ = ("key", "_pointers", "_dtypes")

    def __init__(self, grads, key: bytes | None = None):
        super().__init__(grads)
        self.key = key
        self._pointers = self._dtypes = None

    @property
    def pointers(self) -> list[int]:
        if self._pointers is None:
            self._pointers = list(map(Tensor.data_ptr, self))
        return self._pointers

    @property
    def dtypes(self) -> list[torch.dtype]:
        if self._dtypes is None:
            self._dtypes = list(map(_DTYPE, self))
        return self._dtypes


def read_gradients(params: Sequence[Tensor]) -> Gradients | None:
    """The params' grads as :class:`Gradients`, or None when one has no storage (None,
    sparse): the caller then takes its full checks, which name the param.

    Read in one pass by ``rlvr_optim._cpu.read_gradients`` where the CPU extension is
    built (it is not compiled for this), else in three ``map`` passes here; the same
    grads, addresses and dtypes either way."""
    reader = extension_function("read_gradients")
    if reader:
        read = reader(params, Tensor.data_ptr)
        return None if read is None else Gradients(read[0], read[1])
    grads = Gradients(map(_GRAD, params))
    try:
        grads._pointers = list(map(Tensor.data_ptr, grads))
    except (TypeError, RuntimeError):
        return None
    grads._dtypes = list(map(_DTYPE, grads))
    return grads


def same_items(a: Sequence, b: Sequence) -> bool:
    """Whether ``a`` and ``b`` hold the very same objects in the same order: one memcmp of
    their item pointers by ``rlvr_optim._cpu.same_items`` where the CPU extension is built,
    else an ``is`` per item here."""
    native = extension_function("same_items")
    if native:
        return native(a, b)
    return len(a) == len(b) and all(map(is_, a, b))


class Group(NamedTuple):
    """One launch: tensors of one device and launch key, described by their columns."""

    key: Any
    device: torch.device
    rows: tuple[int, ...]
    columns: dict[str, np.ndarray]  # fields of rlvr_optim.table.ROW_FIELDS and "remainder"
    grad_dtypes: tuple  # of each row's grad
    grad_contiguous: tuple[bool, ...]  # of each row's grad (a lenient backend copies others)


def _addresses(tensors, n: int) -> np.ndarray:
    if tensors is None:
        return np.zeros(n, dtype=np.int64)
    return np.array([0 if t is None else t.data_ptr() for t in tensors], dtype=np.int64)


class _Call(CheckedCall):
    """A checked call: its static columns (every operand but the grad, under the names of
    the table's fields: one "master" field holds the fp32 master or the remainder, whichever
    the tensor has; "remainder" apart as well) and the launches built for the grads seen
    with it, by (grad addresses, grad dtypes)."""

    def __init__(self, statics: Operands, offsets, options, static_keys):
        super().__init__(statics)
        self.offsets = offsets
        self.options = options
        params = statics.param
        self.devices = [p.device for p in params]
        self.device_indices = [p.get_device() for p in params]
        self.static_keys = static_keys
        self.empty = [i for i, numel in enumerate(self.numels) if numel == 0]
        n = len(params)
        columns = {name: _addresses(getattr(statics, name), n) for name in (
            "param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "remainder", "freeze_mask",
            "change_bitmap", "cumulative_bitmap")}
        masters = _addresses(statics.master, n)
        columns["master"] = np.where(masters != 0, masters, columns["remainder"])
        columns["counters"] = _addresses(statics.counter, n)
        columns["numel"] = np.array(self.numels, dtype=np.int64)
        columns["element_offset"] = np.array(offsets, dtype=np.int64)
        columns["scalar_row"] = np.arange(n, dtype=np.int64)
        self.columns = columns
        self.last = None  # (pointers, dtypes, launches, grad contiguity) of the latest step
        self.last_key = None  # its Gradients.key, when it had one
        self.launches: dict[tuple, list] = {}

    def matches(self, statics, offsets, options) -> bool:
        return (options == self.options
                and (offsets == self.offsets or list(offsets) == self.offsets)
                and self.same_tensors(statics))


class Planner:
    """A backend's kept step descriptions and the launches encoded from them.

    Args:
        check: ``check(statics, grads, offsets, options)`` makes every per-tensor check of
            the backend and raises naming the tensor (``statics``: the call's
            :class:`rlvr_optim.operands.Operands`); called before anything is kept.
        static_key: ``static_key(operands, offset, options)``: the part of a tensor's
            launch key that does not depend on its grad (``operands``: its
            :class:`rlvr_optim.operands.Operands`), computed once per checked call.
        group_key: ``group_key(static, grad_dtype, grad_address)``: the launch key.
        encode: ``encode(group, options)``: the backend's launch of a :class:`Group`,
            built on the host and copied to the device once.
        grad_dtypes: the grad dtypes the backend takes (a grad of another dtype sends the
            call through ``check``, which names it).
        capturing: ``capturing(device)``: whether a CUDA graph is being captured on it.
    """

    def __init__(self, check: Callable, static_key: Callable, group_key: Callable,
                 encode: Callable, grad_dtypes: frozenset, capturing: Callable,
                 capacity: int = 4):
        self._check = check
        self._static_key = static_key
        self._group_key = group_key
        self._encode = encode
        self._grad_dtypes = grad_dtypes
        self._capturing = capturing
        self.calls = CheckedCalls(capacity)
        self.builds = 0  # launches lists encoded, for tests
        self._pinned: list = []  # launches used in a CUDA graph capture

    def clear(self) -> None:
        self.calls.clear()
        self.builds = 0

    def launches(self, statics: Operands, grads: Sequence[Tensor], offsets: list[int],
                 options: tuple) -> list:
        """The encoded launches of this call (see the module docstring), in call order; a
        call of a recent one's tensors is found among the kept ones (a few: see
        :class:`PlannedCall` for a caller that keeps its own)."""
        call = self.calls.find(statics, offsets, options)
        return self.launches_of(call, statics, grads, offsets, options)[0]

    def launches_of(self, call: _Call | None, statics: Operands, grads: Sequence[Tensor],
                    offsets: list[int], options: tuple) -> tuple[list, _Call]:
        """The launches of ``call``, the checked call of these operands (None: check and
        plan them now), and the call they belong to."""
        key = grads.key if isinstance(grads, Gradients) else None
        if key is not None and call is not None and call.last is not None \
                and call.last_key == key:
            # The grads of the latest step, at its addresses and with its dtypes (their keys
            # compared whole): its launches, as below, without the lists.
            launches = call.last[2]
        else:
            launches, call = self._launches_slow(call, statics, grads, offsets, options)
            call.last_key = key
        if call.empty and statics.counter is not None:
            # No launch reaches a tensor without elements; its counters get their value, 0,
            # here (one op, in steps that have such tensors).
            counters = [c for c in map(statics.counter.__getitem__, call.empty) if c is not None]
            if counters:
                torch._foreach_zero_(counters)
        if not launches.pinned and self._capturing(call.devices[0]):
            self._pinned.append(launches)
            launches.pinned = True
        return launches, call

    def _launches_slow(self, call: _Call | None, statics: tuple, grads: Sequence[Tensor],
                       offsets: list[int], options: tuple) -> tuple[list, _Call]:
        """``launches`` by the lists of grad addresses and dtypes, checking the grads (and
        the call, when it is new) unless they are those of the latest step."""
        if isinstance(grads, Gradients):
            pointers, dtypes = grads.pointers, grads.dtypes
        else:
            try:
                pointers = list(map(Tensor.data_ptr, grads))
                dtypes = list(map(_DTYPE, grads))
            except (TypeError, RuntimeError, AttributeError):
                pointers = dtypes = None
        contiguous = None  # every grad contiguous: what _grads_fit accepts
        if call is None or pointers is None or not self._grads_fit(call, grads, pointers,
                                                                   dtypes):
            self._check(statics, grads, offsets, options)
            if call is None:
                call = self._new_call(statics, offsets, options)
            if pointers is None:  # the checks passed, so every grad has storage now
                pointers = list(map(Tensor.data_ptr, grads))
                dtypes = list(map(_DTYPE, grads))
            contiguous = tuple(map(Tensor.is_contiguous, grads))
            if all(contiguous):
                contiguous = None
        last = call.last
        if last is not None and last[0] == pointers and last[1] == dtypes \
                and last[3] == contiguous:
            return last[2], call
        return self._launches_for(call, pointers, dtypes, contiguous), call

    def _new_call(self, statics: Operands, offsets, options) -> _Call:
        keys = [self._static_key(statics.at(i), offsets[i], options)
                for i in range(statics.count)]
        call = _Call(statics, list(offsets), options, keys)
        self.calls.add(call, statics)
        return call

    def _grads_fit(self, call: _Call, grads, pointers, dtypes) -> bool:
        """The checks of ``check`` on the grads, in bulk; False sends the call through
        ``check``, which names the tensor. :class:`Gradients` at the addresses and dtypes
        of the latest step (checked then) skip them: they are the ``.grad`` s of the
        checked params, whose shape and device torch checks when a grad is assigned."""
        last = call.last
        if (isinstance(grads, Gradients) and last is not None and last[0] == pointers
                and last[1] == dtypes):
            return True
        try:
            return (len(grads) == len(call.numels)
                    and set(dtypes) <= self._grad_dtypes
                    and list(map(Tensor.numel, grads)) == call.numels
                    and list(map(Tensor.get_device, grads)) == call.device_indices
                    and all(map(Tensor.is_contiguous, grads)))
        except (AttributeError, TypeError):
            return False

    def _launches_for(self, call: _Call, pointers: list[int], dtypes: list,
                      contiguous: tuple[bool, ...] | None) -> list:
        signature = (tuple(pointers), tuple(dtypes), contiguous)
        launches = call.launches.get(signature)
        if launches is None:
            device = call.devices[0]
            if self._capturing(device):
                raise RuntimeError(
                    "the fused backends build a device table of the tensors' addresses on the "
                    "first step that sees them, which cannot happen during CUDA graph capture: "
                    "run one step with the same tensors before capturing (warm-up), then capture"
                )
            launches = _Launches(self._encode(group, call.options)
                                 for group in self._groups(call, pointers, dtypes,
                                                           contiguous))
            self.builds += 1
            kept = call.launches
            kept[signature] = launches
            for old in [k for k, v in kept.items() if not v.pinned]:
                if len(kept) <= _MAX_GRAD_SIGNATURES:
                    break
                del kept[old]
        call.last = (pointers, dtypes, launches, contiguous)
        return launches

    def _groups(self, call: _Call, pointers: list[int], dtypes: list,
                contiguous: tuple[bool, ...] | None) -> list[Group]:
        by_key: dict[tuple, list[int]] = {}
        for i, numel in enumerate(call.numels):
            if numel:
                key = (call.devices[i], self._group_key(call.static_keys[i], dtypes[i],
                                                        pointers[i]))
                by_key.setdefault(key, []).append(i)
        grad = np.array(pointers, dtype=np.int64)
        groups = []
        for (device, key), rows in by_key.items():
            index = np.array(rows, dtype=np.int64)
            columns = {name: values[index] for name, values in call.columns.items()}
            columns["grad"] = grad[index]
            groups.append(Group(key, device, tuple(rows), columns,
                                tuple(dtypes[i] for i in rows),
                                tuple(True if contiguous is None else contiguous[i]
                                      for i in rows)))
        return groups


class PlannedCall:
    """A call of one set of operands planned by a backend's :class:`Planner` and kept by
    its caller (the optimizer's plan of a param group), so that a step neither looks the
    call up among the planner's few kept ones nor checks its tensors again: it compares
    the grads' addresses and dtypes with the launches' (see the module docstring) and runs
    the launches. Its caller checks that the params are where they were (and plans anew
    when they are not): the optimizer's plan does. A call is a backend's
    ``prepare(ops, ...)``: ``call(grads, StepInputs)``.

    Args:
        planner: the backend's planner.
        run: ``run(launches, statics, offsets, grads, inputs)``: the backend's launches
            of a step.
        statics: the call's :class:`rlvr_optim.operands.Operands` (lists that do not
            change: the optimizer's :class:`OperandList` s).
        offsets: each tensor's global index of its element 0.
        options: the backend's planner options of the call.
    """

    __slots__ = ("planner", "run", "statics", "offsets", "options", "call")

    def __init__(self, planner: "Planner", run: Callable, statics: Operands,
                 offsets: list[int], options: tuple):
        self.planner = planner
        self.run = run
        self.statics = statics
        self.offsets = list(offsets)
        self.options = options
        self.call: _Call | None = None

    def __call__(self, grads: Sequence[Tensor], inputs) -> None:
        launches, self.call = self.planner.launches_of(self.call, self.statics, grads,
                                                       self.offsets, self.options)
        self.run(launches, self.statics, self.offsets, grads, inputs)


class _Launches(list):
    """A call's encoded launches; ``pinned`` once a CUDA graph captured them."""

    __slots__ = ("pinned",)

    def __init__(self, launches):
        super().__init__(launches)
        self.pinned = False


class ScalarRows:
    """The per-tensor scalar rows of :func:`rlvr_optim.reference.step_scalars`, bit for bit,
    in five tensor ops per step into kept buffers.

    The columns that depend on the hyperparameters alone (1 - lr * weight_decay for a float lr,
    betas, eps) are written when those change; each step computes the bias corrections
    from the device step counts and ``lr``, so no value comes from host memory (the step is
    capturable in a CUDA graph), and an ``lr`` changed between steps takes effect in the
    next step. A tensor ``lr`` (changed in place by a scheduler) is read every step.

    The five ops: the steps into a float64 buffer; ``beta ** t`` for both betas in one
    broadcast pow; ``1 - that``; the two columns written by ``div`` and ``sqrt`` straight
    into the float32 rows. Each computes in float64 and rounds once to float32 (out= takes
    the inputs' float64 as its computation type), as the reference's ops then ``.float()``
    do. It was nine ops with a temporary each; on a CPU most of what is left is the pow
    over every row.
    """

    def __init__(self, steps: Tensor):
        n, device = steps.numel(), steps.device
        self.out = torch.empty(n, 8, dtype=torch.float32, device=device)
        self._t = torch.empty(n, dtype=torch.float64, device=device)
        self._powers = torch.empty(2, n, dtype=torch.float64, device=device)
        self._one = torch.ones((), dtype=torch.float64, device=device)
        self._constants = None  # (beta1, beta2, eps) written into columns 3..7
        self._betas = None  # float64 [[beta1], [beta2]] on the device
        self._lr = None  # (lr, weight_decay, decoupled) of column 2, and the 0-d float64 lr

    def _write_decay(self, lr64: Tensor, weight_decay: float, decoupled: bool) -> None:
        """The decay column: 1 - lr * weight_decay (float64, rounded once), or Adam's
        weight_decay (a fill: rounded once from the Python float)."""
        if decoupled:
            self.out[:, 2].copy_(1.0 - lr64 * weight_decay)
        else:
            self.out[:, 2].fill_(weight_decay)

    def __call__(self, steps: Tensor, lr: float | Tensor, beta1: float, beta2: float,
                 weight_decay: float, eps: float, *, decoupled_weight_decay: bool = True
                 ) -> Tensor:
        out = self.out
        device = out.device
        constants = (float(beta1), float(beta2), float(eps))
        if self._constants != constants:
            b1, b2, e = constants
            values = torch.tensor([b1, 1.0 - b1, b2, 1.0 - b2, e], dtype=torch.float64)
            out[:, 3:].copy_(values.float().to(device).expand(out.shape[0], 5))
            self._betas = values[[0, 2]].view(2, 1).to(device)
            self._constants = constants
        wd = float(weight_decay)
        if isinstance(lr, Tensor):
            lr64 = lr.to(device=device, dtype=torch.float64).reshape(())
            self._write_decay(lr64, wd, decoupled_weight_decay)
            self._lr = None
        elif self._lr is not None and self._lr[0] == (float(lr), wd, decoupled_weight_decay):
            lr64 = self._lr[1]
        else:
            lr64 = torch.full((), float(lr), dtype=torch.float64, device=device)
            self._write_decay(lr64, wd, decoupled_weight_decay)
            self._lr = ((float(lr), wd, decoupled_weight_decay), lr64)
        powers = self._powers
        torch.pow(self._betas, self._t.copy_(steps), out=powers)
        torch.sub(self._one, powers, out=powers)  # 1 - beta ** t
        torch.div(lr64, powers[0], out=out[:, 0])
        torch.sqrt(powers[1], out=out[:, 1])
        return out
