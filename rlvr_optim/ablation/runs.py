"""What every ablation's runs share: checkpoint folders, a step budget, a resumable loop.

Every run checkpoints its model, optimizer, random generators and logged series every
``checkpoint_every`` steps (atomically), so a run resumed from a checkpoint repeats the
same steps bit for bit: CPU runs use a fixed thread count, and all randomness comes from
generators saved in the checkpoint.

A checkpoint is data, never code (a shared ablation folder must not run anything on
``--resume``): one safetensors file holding the tensors, with the rest of the state (step,
series, optimizer options) as JSON in its metadata, where each tensor is a reference
``{"$tensor": key}`` (:func:`save_checkpoint`, :func:`load_checkpoint`). Pickles are not
read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping

import torch

from torch import Tensor

from .. import analysis, bitmaps, files
from ..errors import InputError
from .config import RunSpec

__all__ = ["Interrupted", "StepBudget", "Workspace", "derive_seed", "drive", "load_checkpoint",
           "measure_run", "save_checkpoint"]

CHECKPOINT_FORMAT = "rlvr_optim.ablation.checkpoint/1"


class Interrupted(Exception):
    """Raised when a :class:`StepBudget` runs out: the state on disk is the last checkpoint."""


class StepBudget:
    """Counts training steps and raises :class:`Interrupted` past ``limit`` (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def take(self) -> None:
        if self.left is None:
            return
        if self.left <= 0:
            raise Interrupted
        self.left -= 1


class Workspace:
    """The checkpoint folder of one ablation: ``<out>/checkpoints/<run name>/``.

    A run folder holds ``checkpoint.safetensors`` (:func:`save_checkpoint`) while the run is
    under way and, once it finished, ``result.json``, ``final.safetensors`` (weights) and
    ``changed.safetensors`` (packed bitmaps of the weights whose bf16 bits differ from the
    start). ``base_cache`` keeps the start weights' SVDs and masks between runs
    (:func:`rlvr_optim.analysis.geometry`). Every file is written atomically; a file that
    a resume cannot use raises :class:`~rlvr_optim.errors.InputError` naming it, before
    anything is written where it could be.
    """

    CHECKPOINT = "checkpoint.safetensors"
    PICKLED = "checkpoint.pt"  # what rlvr_optim wrote before; refused, never unpickled

    def __init__(self, root: str, fingerprint: str, resume: bool) -> None:
        self.root = root
        self.fingerprint = fingerprint
        self.resume = resume
        self.base_cache: dict = {}
        stamp = os.path.join(root, "fingerprint.txt")
        if resume and os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                pickled = os.path.join(root, name, self.PICKLED)
                if os.path.lexists(pickled):
                    raise InputError(
                        f"{pickled} is a pickle checkpoint (earlier versions wrote them); it "
                        "is not read, since unpickling a file can run code: delete it to "
                        f"restart run {name} from its start")
        if resume and os.path.isfile(stamp):
            with open(stamp, "rb") as f:
                found = f.read(256).decode("utf-8", errors="replace").strip()
            if found != fingerprint:
                raise InputError(
                    f"{root} holds checkpoints of other settings (fingerprint {found!r}, these "
                    f"settings {fingerprint}); resume with the same preset and options, or "
                    "choose another --out"
                )
        os.makedirs(root, exist_ok=True)
        files.write_text(stamp, fingerprint + "\n")

    def folder(self, name: str) -> str:
        path = os.path.join(self.root, name)
        os.makedirs(path, exist_ok=True)
        return path

    def finished(self, name: str) -> dict | None:
        """The saved result of a finished run (only when resuming), else None."""
        path = os.path.join(self.root, name, "result.json")
        if not self.resume or not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON
            raise InputError(f"{path} is not a run result ({type(exc).__name__}); delete it "
                             f"to run {name} again") from None
        if not isinstance(result, dict):
            raise InputError(f"{path} holds a JSON {type(result).__name__}, not a run result; "
                             f"delete it to run {name} again")
        return result

    def checkpoint_path(self, name: str) -> str:
        return os.path.join(self.root, name, self.CHECKPOINT)

    def checkpoint(self, name: str) -> dict | None:
        """The last checkpoint of run ``name`` (only when resuming), else None; checked to
        be one of these settings, with a step, series and wall time."""
        path = self.checkpoint_path(name)
        if not self.resume or not os.path.exists(path):
            return None
        ckpt = load_checkpoint(path)
        problem = None
        if not isinstance(ckpt, dict):
            problem = f"holds a {type(ckpt).__name__}, not a checkpoint"
        elif ckpt.get("fingerprint") != self.fingerprint:
            problem = (f"is of other settings (fingerprint {ckpt.get('fingerprint')!r}, these "
                       f"settings {self.fingerprint})")
        elif not (isinstance(ckpt.get("step"), int) and not isinstance(ckpt["step"], bool)
                  and ckpt["step"] >= 0):
            problem = f"has no step count (step {ckpt.get('step')!r})"
        elif not (isinstance(ckpt.get("series"), dict)
                  and all(isinstance(v, list) for v in ckpt["series"].values())):
            problem = "has no logged series"
        elif not (isinstance(ckpt.get("wall_s"), (int, float))
                  and math.isfinite(ckpt["wall_s"])):
            problem = "has no wall time"
        if problem is not None:
            raise InputError(f"{path} {problem}; delete it to restart run {name}")
        return ckpt

    def save_checkpoint(self, name: str, payload: dict) -> None:
        save_checkpoint(os.path.join(self.folder(name), self.CHECKPOINT), payload)

    def save_result(self, name: str, result: dict) -> None:
        files.write_json(os.path.join(self.folder(name), "result.json"), result)
        for stale in (self.CHECKPOINT, self.PICKLED):
            path = os.path.join(self.root, name, stale)
            if os.path.lexists(path):
                os.remove(path)

    def read_tensors(self, path: str, names: Iterable[str] | Mapping[str, tuple]
                     ) -> dict[str, Tensor]:
        """The tensors ``names`` (in that order) of a safetensors file this workspace wrote,
        checked to have the shapes ``names`` maps them to, if it is a mapping; InputError
        naming the file if it is unreadable, lacks one or holds another shape."""
        handle = analysis.open_safetensors(path, folder=None)
        run = os.path.basename(os.path.dirname(path))
        missing = [n for n in names if n not in handle.keys()]
        if missing:
            raise InputError(f"{path} lacks the tensor(s) {missing[:3]}; delete it to run "
                             f"{run} again")
        if isinstance(names, Mapping):
            for name, shape in names.items():
                found = tuple(handle.get_slice(name).get_shape())
                if found != tuple(shape):
                    raise InputError(f"{path}: {name} has shape {found}, this run needs "
                                     f"{tuple(shape)}; delete it to run {run} again")
        return {n: handle.get_tensor(n) for n in names}

    def saved(self) -> list[str]:
        """What a resume would start from, one entry per run folder: ``"NAME (finished)"``
        or ``"NAME at step S"``."""
        found = []
        for name in sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []:
            if os.path.isfile(os.path.join(self.root, name, "result.json")):
                found.append(f"{name} (finished)")
            elif os.path.isfile(self.checkpoint_path(name)):
                try:  # the step from the header alone: no tensor is read
                    meta = analysis.open_safetensors(self.checkpoint_path(name)).metadata()
                    step = json.loads((meta or {}).get("tree", "{}")).get("step", "?")
                except (InputError, ValueError, AttributeError):
                    step = "?"
                found.append(f"{name} at step {step}")
        return found


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` (nested dicts, lists and tuples of tensors, numbers, strings, None
    and dtypes, e.g. ``optimizer.state_dict()``) as one safetensors file, atomically: the
    tensors as tensors (CPU copies), the rest as JSON in the metadata."""
    tensors: dict[str, Tensor] = {}
    tree = _encode(payload, tensors)
    files.write_safetensors(path, tensors, {"format": CHECKPOINT_FORMAT,
                                            "tree": json.dumps(tree)})


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Read a file of :func:`save_checkpoint` (CPU tensors). Only tensors, JSON values,
    tuples and torch dtypes come out of it: nothing in the file is run. Raises
    :class:`~rlvr_optim.errors.InputError` naming a file that is not such a checkpoint."""
    path = os.fspath(path)
    handle = analysis.open_safetensors(path, folder=None)
    meta = handle.metadata() or {}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not an ablation checkpoint (format "
                         f"{meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); delete it "
                         "to restart that run")
    try:
        tree = json.loads(meta.get("tree", ""))
        return _decode(tree, handle)
    except (ValueError, RecursionError, TypeError) as exc:
        raise InputError(f"{path} is a damaged ablation checkpoint ({exc}); delete it to "
                         "restart that run") from None


def _encode(value: Any, tensors: dict[str, Tensor]) -> Any:
    """The JSON form of ``value``; its tensors go to ``tensors`` (see :func:`save_checkpoint`)."""
    if isinstance(value, Tensor):
        key = str(len(tensors))
        # A copy: the file needs contiguous CPU tensors that share no memory.
        tensors[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
        return {"$tensor": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"$items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"a checkpoint holds tensors, numbers, strings, dtypes, lists, tuples and "
                    f"dicts, got a {type(value).__name__}")


def _decode(value: Any, handle) -> Any:
    """The inverse of :func:`_encode`, reading tensors from the open safetensors file."""
    if isinstance(value, list):
        return [_decode(v, handle) for v in value]
    if not isinstance(value, dict):
        return value
    tags = [k for k in value if k.startswith("$")]
    if not tags:
        return {k: _decode(v, handle) for k, v in value.items()}
    if len(value) != 1:
        raise ValueError(f"an object mixes the tag {tags[0]!r} with other keys")
    (tag, inner), = value.items()
    if tag == "$tensor":
        if not isinstance(inner, str) or inner not in handle.keys():
            raise ValueError(f"it names a tensor {inner!r} that the file lacks")
        return handle.get_tensor(inner)
    if tag == "$dtype":
        dtype = getattr(torch, inner, None) if isinstance(inner, str) else None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{inner!r} is not a torch dtype")
        return dtype
    if tag in ("$tuple", "$items") and isinstance(inner, list):
        items = [_decode(v, handle) for v in inner]
        if tag == "$tuple":
            return tuple(items)
        if not all(isinstance(kv, list) and len(kv) == 2 for kv in items):
            raise ValueError("a $items entry is not a [key, value] pair")
        if not all(k is None or isinstance(k, (bool, int, float, str, tuple)) for k, _ in items):
            raise ValueError("a $items key is not a number, string or tuple")
        return dict(items)
    raise ValueError(f"unknown tag {tag!r}")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def drive(name: str, workspace: Workspace, steps: int, checkpoint_every: int,
           budget: StepBudget, bar, state: dict, step_fn: Callable[[], dict[str, float]],
           save: Callable[[], dict], load: Callable[[dict], None]) -> None:
    """Run ``step_fn`` until ``state["step"] == steps``, from the last checkpoint if resuming.

    ``state`` holds ``step``, ``series`` (key -> list) and ``wall_s``; ``save``/``load``
    give and take the rest of the run's state.
    """
    ckpt = workspace.checkpoint(name)
    if ckpt is not None:
        try:
            load(ckpt)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise InputError(f"{workspace.checkpoint_path(name)} does not fit this run "
                             f"({type(exc).__name__}: {reason}); delete it to restart run "
                             f"{name}") from None
        if ckpt["step"] > steps:
            raise InputError(f"{workspace.checkpoint_path(name)} is at step {ckpt['step']}, "
                             f"past this run's {steps}; delete it to restart run {name}")
        state.update(step=ckpt["step"], series=defaultdict(list, ckpt["series"]),
                     wall_s=ckpt["wall_s"])
        bar.update(state["step"])
    while state["step"] < steps:
        budget.take()
        t0 = time.perf_counter()
        for key, value in step_fn().items():
            state["series"][key].append(value)
        state["step"] += 1
        state["wall_s"] += time.perf_counter() - t0
        bar.update(1)
        if state["step"] % checkpoint_every == 0 and state["step"] < steps:
            payload = save()
            payload.update(step=state["step"], series=dict(state["series"]),
                           wall_s=state["wall_s"], fingerprint=workspace.fingerprint)
            workspace.save_checkpoint(name, payload)


def measure_run(config: Any, spec: RunSpec, start: dict[str, Tensor], final: dict[str, Tensor],
                state: dict, folder: str, base_cache: dict | None = None) -> dict:
    """The end-of-run measures: sparsity and geometry; writes ``changed.safetensors``.

    Final weights are measured as a bf16 checkpoint would hold them: fp32 weights (the
    control mode) by their nearest-even bf16 images, for the absolute-tolerance test and the
    geometry too.
    """
    final = {n: t.bfloat16() for n, t in final.items()}
    changed = {n: analysis.pack_mask(~analysis.unchanged_bitwise(start[n], final[n]))
               for n in final}
    bitmaps.save_bitmaps(os.path.join(folder, "changed.safetensors"), changed,
                         {n: t.numel() for n, t in final.items()})
    sparsity = analysis.update_sparsity(start, final)
    geometry = analysis.geometry(start, final, alpha=config.alpha, rank=config.rank,
                                 device=config.device, base_cache=base_cache)
    result = {
        "name": spec.name, "kind": spec.kind, "mode": spec.mode, "lr": spec.lr,
        "seed": spec.seed, "steps": config.steps, "wall_s": state["wall_s"],
        "series": dict(state["series"]),
        "sparsity": sparsity["overall"], "modules": sparsity["modules"],
        "layers": sparsity["layers"], "geometry": geometry["overall"],
    }
    return result
