"""What every ablation's runs share: checkpoint folders, a step budget, a resumable loop.

Every run checkpoints its model, optimizer, random generators and logged series every
``checkpoint_every`` steps (atomically), so a run resumed from a checkpoint repeats the
same steps bit for bit: CPU runs use a fixed thread count, and all randomness comes from
generators saved in the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from typing import Any, Callable

import torch

from torch import Tensor

from .. import analysis, bitmaps
from .config import RunSpec

__all__ = ["Interrupted", "StepBudget", "Workspace", "derive_seed", "drive", "measure_run"]


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

    A run folder holds ``checkpoint.pt`` while the run is under way and, once it finished,
    ``result.json``, ``final.safetensors`` (weights) and ``changed.safetensors`` (packed
    bitmaps of the weights whose bf16 bits differ from the start). ``base_cache`` keeps the
    start weights' SVDs and masks between runs (:func:`rlvr_optim.analysis.geometry`).
    """

    def __init__(self, root: str, fingerprint: str, resume: bool) -> None:
        self.root = root
        self.fingerprint = fingerprint
        self.resume = resume
        self.base_cache: dict = {}
        os.makedirs(root, exist_ok=True)
        stamp = os.path.join(root, "fingerprint.txt")
        if resume and os.path.exists(stamp):
            with open(stamp, encoding="utf-8") as f:
                found = f.read().strip()
            if found != fingerprint:
                raise ValueError(
                    f"{root} holds checkpoints of other settings (fingerprint {found}, these "
                    f"settings {fingerprint}); resume with the same preset and options, or "
                    "choose another --out"
                )
        with open(stamp, "w", encoding="utf-8") as f:
            f.write(fingerprint + "\n")

    def folder(self, name: str) -> str:
        path = os.path.join(self.root, name)
        os.makedirs(path, exist_ok=True)
        return path

    def finished(self, name: str) -> dict | None:
        """The saved result of a finished run (only when resuming), else None."""
        path = os.path.join(self.root, name, "result.json")
        if not self.resume or not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def checkpoint(self, name: str) -> dict | None:
        path = os.path.join(self.root, name, "checkpoint.pt")
        if not self.resume or not os.path.exists(path):
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def save_checkpoint(self, name: str, payload: dict) -> None:
        path = os.path.join(self.folder(name), "checkpoint.pt")
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)

    def save_result(self, name: str, result: dict) -> None:
        path = os.path.join(self.folder(name), "result.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
        ckpt = os.path.join(self.root, name, "checkpoint.pt")
        if os.path.exists(ckpt):
            os.remove(ckpt)


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
        load(ckpt)
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
