"""Host-side caching shared by the fused backends: a step over thousands of small tensors
must not pay per-tensor checks and per-tensor cache keys every time (the many-small preset
of the benchmark), so each backend keeps the calls whose tensors it has checked and, when
the next call passes the same tensors, checks only what can change between steps.

A kept call holds no reference to its tensors (that would keep a model's states alive
after its optimizer is gone): it remembers their ``id`` and a weak reference to each, and
leaves the cache as soon as one of them is freed, so an id it holds always names the
object it was taken from. A call made of :class:`OperandList` s (lists that cannot change,
as the optimizer passes) is recognized by the lists' identity: one comparison per list
instead of one per tensor.
"""

from __future__ import annotations

import weakref
from array import array
from typing import Callable, Sequence

import torch
from torch import Tensor

from .extensions import CPU

# torch's C++ loop `all(t.data_ptr() == p for t, p in zip(tensors, ptrs))` over the given
# indices, which its CUDA graph trees run on their hot path; CUDA builds of torch have it
# (the CPU wheels do not). The params' addresses are compared by the CPU extension's
# addresses_equal where that is built, else by this where present, else by a Python pass
# over the params, which costs about half as much as reading the grads.
_pointers_equal = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)

# extension_function's answers by name, once known (a test may set or drop one).
EXTENSION_FUNCTIONS: dict[str, Callable | bool] = {}


def extension_function(name: str) -> Callable | bool:
    """``rlvr_optim._cpu.<name>`` if that module is loaded or was built at install time
    (never compiled here), else False; looked up once per name."""
    found = EXTENSION_FUNCTIONS.get(name)
    if found is None:
        module = CPU.module or CPU.prebuilt()
        found = EXTENSION_FUNCTIONS[name] = getattr(module, name, None) or False
    return found


class OperandList(list):
    """A list of a call's operands that cannot change once built, so that a kept call can
    recognize it by identity (the optimizer builds new ones whenever its state changes)."""

    __slots__ = ("__weakref__",)

    def _refuse(self, *args, **kwargs):
        raise TypeError("an OperandList cannot change once built; build a new one")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse


def _ids(lists: Sequence[Sequence | None]) -> tuple:
    return tuple(None if x is None else list(map(id, x)) for x in lists)


def _frozen(lists: Sequence[Sequence | None]) -> bool:
    return all(x is None or type(x) is OperandList for x in lists)


class Addresses:
    """The storage addresses of a list of tensors, as taken, and the check that they are
    still there: one pass of the CPU extension's ``addresses_equal`` over a byte key where
    it is built, else torch's C++ loop where present, else a Python pass."""

    __slots__ = ("pointers", "key", "_indices")

    def __init__(self, tensors: Sequence[Tensor]):
        self.pointers = list(map(Tensor.data_ptr, tensors))
        self.key = array("Q", self.pointers).tobytes()  # for addresses_equal
        self._indices = list(range(len(tensors)))  # for _pointers_equal

    def unchanged(self, tensors: Sequence[Tensor]) -> bool:
        """Every tensor of ``tensors`` (of the taken length) still at its address; False,
        not an error, for a tensor without storage or a non-tensor."""
        check = extension_function("addresses_equal")  # one C pass against a byte key
        if check:
            return check(tensors, self.key, Tensor.data_ptr)
        try:
            if _pointers_equal is not None and isinstance(tensors, list):
                return _pointers_equal(tensors, self.pointers, self._indices)
            return list(map(Tensor.data_ptr, tensors)) == self.pointers
        except (RuntimeError, TypeError, IndexError):  # not a tensor, no storage
            return False


class CheckedCall:
    """Base of a backend's kept call: the identities of the operand lists it was checked
    with (every list but the grads), and the params' storage."""

    def __init__(self, statics: Sequence[Sequence | None]):
        self.lists = (tuple(None if x is None else weakref.ref(x) for x in statics)
                      if _frozen(statics) else None)
        self.ids = _ids(statics) if self.lists is None else None
        params = statics[0]
        self.param_addresses = Addresses(params)
        self.numels = list(map(Tensor.numel, params))
        self._refs: list[weakref.ref] = []

    def _params_in_place(self, params: Sequence[Tensor]) -> bool:
        """Every param of ``params`` still at the address it was checked with."""
        return self.param_addresses.unchanged(params)

    def same_tensors(self, statics: Sequence[Sequence | None]) -> bool:
        """The very tensor objects (a tensor replaced in a list, even by an equal one, is a
        different call), the params still at their addresses (an object whose ``.data``
        was swapped, as FSDP1's flat params are, keeps its identity) and, for lists that
        are not :class:`OperandList` s, their sizes. An OperandList call skips that pass
        over the params: with thousands of tensors it cost as much as reading the grads,
        and a new ``.data`` that keeps the address (a view of the old storage from its
        first element) is all it misses."""
        if self.lists is not None:
            if len(statics) != len(self.lists) or not all(
                    (ref is None and x is None) or (ref is not None and ref() is x)
                    for ref, x in zip(self.lists, statics)):
                return False
        elif _ids(statics) != self.ids:
            return False
        params = statics[0]
        if len(params) != len(self.numels) or not self._params_in_place(params):
            return False
        return self.lists is not None or list(map(Tensor.numel, params)) == self.numels


class CheckedCalls:
    """The last few checked calls, most recent first; ``find`` asks each ``matches``."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._entries: list[CheckedCall] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, k: int) -> CheckedCall:
        return self._entries[k]

    def clear(self) -> None:
        self._entries.clear()

    def find(self, *args):
        for k, entry in enumerate(self._entries):
            if entry.matches(*args):
                if k:
                    self._entries.insert(0, self._entries.pop(k))
                return entry
        return None

    def add(self, entry: CheckedCall, statics: Sequence[Sequence | None]) -> None:
        """Keep ``entry`` until it is pushed out or a tensor of ``statics`` is freed."""
        entries = self._entries

        def forget(_ref, entry=entry):
            if entry in entries:
                entries.remove(entry)

        seen = set()
        for tensors in statics:
            if type(tensors) is OperandList:
                entry._refs.append(weakref.ref(tensors, forget))
            for t in tensors or ():
                if isinstance(t, Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    entry._refs.append(weakref.ref(t, forget))
        entries.insert(0, entry)
        del entries[self.capacity:]
