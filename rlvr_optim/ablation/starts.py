"""Start checkpoints of the LM ablation: warm-ups run once and kept as files.

A warm-up trains a fresh model with cross-entropy in fp32; its bf16 image is the *start* of
every run. fp32 training rounds differently on different CPUs (an AVX-512 machine once ended
a warm-up at another accuracy than an AVX2 one), so the starts the presets use are files in
the package (``rlvr_optim/ablation/starts/``), made once by::

    python -m rlvr_optim.ablation.starts            # writes rlvr_optim/ablation/starts/

and loaded bit for bit on any machine. ``starts.json`` there lists, per start, its settings
(:class:`StartSpec`), the SHA-256 of each file, what the start measured when it was made and
where. A start file is data: safetensors, read with a checksum check, never unpickled.

Each start is two safetensors files: ``<name>.safetensors`` (the bf16 weights) and
``<name>-kl-samples.safetensors`` (``samples``: sequences drawn once from the start at the
rollout temperature, on which every run's KL to its start is measured).

The warm-up's data: answers written reversed with probability ``reversed``, and each answer
digit replaced by a uniformly random digit with probability ``noise``. The noise makes the
start a calibrated but unsure policy: its greedy answer is almost always right while a sample
at temperature 1 is right about 60% of the time, the gap RLVR closes first ("sharpening").
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
from collections import defaultdict
from typing import Any, Sequence

import torch
from safetensors.torch import load, save
from torch import Tensor

from .. import files
from ..errors import InputError
from ..optimizer import AdamW
from .config import StartSpec
from .lm import LMShape, forward, generate, greedy, init_weights, weight_shapes
from .runs import StepBudget, Workspace, derive_seed, drive
from .task import AdditionTask

__all__ = ["STARTS_DIR", "StartSpec", "committed_spec", "correct_probability", "find_start",
           "greedy_accuracy", "load_start", "main", "make_start", "save_start", "start_shape"]

STARTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "starts")
MANIFEST = "starts.json"
COMMAND = "python -m rlvr_optim.ablation.starts"


def start_shape(spec: StartSpec, task: AdditionTask) -> LMShape:
    return LMShape(vocab=task.vocab_size, hidden=spec.hidden, layers=spec.layers,
                   heads=spec.heads, intermediate=spec.intermediate,
                   max_length=task.prompt_length + task.answer_length)


def _answer_logp(weights: dict[str, Tensor], seq: Tensor, shape: LMShape, prompt_length: int,
                 temperature: float = 1.0) -> Tensor:
    logits = forward(weights, seq, shape)[:, :, prompt_length - 1:-1]
    return torch.log_softmax(logits / temperature, dim=-1)


@torch.no_grad()
def correct_probability(weights: dict[str, Tensor], task: AdditionTask, shape: LMShape,
                        prompts: Tensor, answers: Tensor,
                        temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Exact chance that a sample at ``temperature`` is correct, per run and problem.

    Returns ``(correct, reversed)``, each ``[A, N]``: the probability of the forward answer
    plus that of the reversed one (counted once when they are the same string), and the
    reversed answer's part of it. Two teacher-forced passes replace sampling: no sampling
    noise in the held-out "sampled accuracy".
    """
    runs = next(iter(weights.values())).shape[0]
    p_len = task.prompt_length
    out = []
    for answer in (answers, task.reverse(answers)):
        seq = torch.cat([prompts, answer], dim=1)[None].expand(runs, -1, -1)
        logp = _answer_logp(weights, seq, shape, p_len, temperature)
        out.append(logp.gather(-1, seq[..., p_len:, None]).squeeze(-1).double().sum(-1).exp())
    palindrome = (answers == task.reverse(answers)).all(-1)[None]
    rev = torch.where(palindrome, torch.zeros_like(out[1]), out[1])
    return out[0] + rev, rev


@torch.no_grad()
def greedy_accuracy(weights: dict[str, Tensor], task: AdditionTask, shape: LMShape,
                    prompts: Tensor, answers: Tensor) -> tuple[Tensor, Tensor]:
    """Per run ``[A]``: greedy accuracy (either format counts) and the share written reversed."""
    runs = next(iter(weights.values())).shape[0]
    out = greedy(weights, prompts[None].expand(runs, -1, -1), task.answer_length, shape)
    answers = answers[None].expand(runs, -1, -1)
    return (task.reward(out, answers).double().mean(1),
            task.is_reversed(out, answers).double().mean(1))


def make_start(spec: StartSpec, workspace: Workspace | None = None,
               budget: StepBudget | None = None, bar=None,
               device: str = "cpu") -> tuple[dict[str, Tensor], Tensor, dict[str, Any]]:
    """Run the warm-up of ``spec``; returns (bf16 weights, KL samples, what the start measured).

    With a ``workspace`` the warm-up checkpoints into it and resumes from it, and ``budget``
    and ``bar`` count its steps (:func:`rlvr_optim.ablation.runs.drive`); without one it runs
    straight through.
    """
    task = AdditionTask(spec.digits)
    shape = start_shape(spec, task)
    train_ids, held_ids = task.split(spec.held_out, spec.split_seed)
    dev = torch.device(device)
    weights = {n: t[None].to(dev).requires_grad_()
               for n, t in init_weights(shape, derive_seed("start weights", spec.seed)).items()}
    opt = AdamW(list(weights.items()), lr=spec.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(derive_seed("start data", spec.seed))
    ramp = max(1, spec.steps // 20)
    p_len = task.prompt_length

    def lr_at(step: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * step / spec.steps))
        return spec.lr * min((step + 1) / ramp, decay)

    def step() -> dict[str, float]:
        for group in opt.param_groups:
            group["lr"] = lr_at(state["step"])
        prompts, answers = task.sample(spec.batch, gen, train_ids)
        flip = torch.rand(spec.batch, generator=gen) < spec.reversed
        answers = torch.where(flip[:, None], task.reverse(answers), answers)
        noisy = torch.rand(answers.shape, generator=gen) < spec.noise
        noisy[:, -1] = False                     # <eos> stays: every answer has one length
        answers = torch.where(noisy, torch.randint(0, 10, answers.shape, generator=gen), answers)
        seq = torch.cat([prompts, answers], dim=1)[None].to(dev)
        logp = _answer_logp(weights, seq, shape, p_len)
        loss = -logp.gather(-1, answers.to(dev)[None, ..., None]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach()), "lr": lr_at(state["step"])}

    def save_state() -> dict:
        return {"weights": {n: t.detach() for n, t in weights.items()},
                "optimizer": opt.state_dict(), "gen": gen.get_state()}

    def load_state(ckpt: dict) -> None:
        with torch.no_grad():
            for n, t in weights.items():
                t.copy_(ckpt["weights"][n])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["gen"])

    state: dict[str, Any] = {"step": 0, "series": defaultdict(list), "wall_s": 0.0}
    with tempfile.TemporaryDirectory() as scratch:
        ws = workspace or Workspace(scratch, "start", resume=False)
        every = 500 if workspace is not None else spec.steps
        drive(spec.name, ws, spec.steps, every, budget or StepBudget(None), bar or _NoBar(),
              state, step, save_state, load_state)
    start = {n: t.detach()[0].cpu().bfloat16().contiguous() for n, t in weights.items()}
    stacked = {n: t[None].float() for n, t in start.items()}
    prompts, _ = task.sample(spec.kl_samples,
                             torch.Generator().manual_seed(derive_seed("kl prompts", spec.seed)),
                             held_ids)
    sample_gen = torch.Generator().manual_seed(derive_seed("kl samples", spec.seed))
    samples = generate(stacked, prompts[None], task.answer_length, shape, [sample_gen],
                       spec.temperature)[0].contiguous()
    info = {"wall_s": state["wall_s"], "final_loss": state["series"]["loss"][-1],
            **measure_start(spec, start, {n: t.detach().cpu() for n, t in weights.items()})}
    return start, samples, info


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


def measure_start(spec: StartSpec, start: dict[str, Tensor],
                  fp32: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Greedy and exact sampled accuracy of a start on its held-out problems (all of them)."""
    task = AdditionTask(spec.digits)
    shape = start_shape(spec, task)
    _, held_ids = task.split(spec.held_out, spec.split_seed)
    prompts, answers = task.problems(held_ids)
    stacked = {n: t[None].float() for n, t in start.items()}
    acc, rev = greedy_accuracy(stacked, task, shape, prompts, answers)
    p, p_rev = correct_probability(stacked, task, shape, prompts, answers, spec.temperature)
    out = {"accuracy": float(acc[0]), "reversed_share": float(rev[0]),
           "sampled_accuracy": float(p.mean()),
           "sampled_reversed_share": float(p_rev.sum() / p.sum())}
    if fp32 is not None:
        out["accuracy_fp32"] = float(greedy_accuracy(fp32, task, shape, prompts, answers)[0][0])
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spec_dict(spec: StartSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _cpu_capability() -> str:
    return str(torch.backends.cpu.get_cpu_capability())


def save_start(folder: str, spec: StartSpec, weights: dict[str, Tensor], samples: Tensor,
               info: dict[str, Any]) -> None:
    """Write a start's two files into ``folder`` and add (or replace) its entry in
    ``starts.json``: the three files together (:func:`rlvr_optim.files.atomic_files`). The
    files are serialized in memory first, so the manifest's SHA-256 is of the bytes written."""
    blobs = {f"{spec.name}.safetensors": save(weights, {"format": "pt"}),
             f"{spec.name}-kl-samples.safetensors": save({"samples": samples})}
    manifest = _read_manifest(folder)
    manifest["starts"] = [s for s in manifest["starts"] if s["name"] != spec.name]
    manifest["starts"].append({
        "name": spec.name, "spec": _spec_dict(spec),
        "files": {name: _sha256(blob) for name, blob in blobs.items()},
        "measured": info,
        "made_with": {"command": COMMAND, "torch": torch.__version__,
                      "cpu_capability": _cpu_capability(), "machine": platform.machine()},
    })
    manifest["starts"].sort(key=lambda s: s["name"])
    with files.atomic_files(folder) as temp:
        for name, blob in blobs.items():
            files.write_bytes(os.path.join(temp, name), blob)
        files.write_json(os.path.join(temp, MANIFEST), manifest, indent=1)


def _read_manifest(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return {"about": "start checkpoints of the LM ablation (rlvr_optim.ablation.starts); "
                         f"made by `{COMMAND}`", "starts": []}
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable start manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("starts"), list):
        raise InputError(f"{path}: not a start manifest (no list 'starts')")
    return manifest


def find_start(folder: str, spec: StartSpec) -> dict[str, Any] | None:
    """The manifest entry of ``folder`` made with exactly ``spec``, or None."""
    if not os.path.exists(os.path.join(folder, MANIFEST)):
        return None
    wanted = _spec_dict(spec)
    for entry in _read_manifest(folder)["starts"]:
        if entry.get("spec") == wanted:
            return entry
    return None


def load_start(folder: str, spec: StartSpec) -> tuple[dict[str, Tensor], Tensor, dict] | None:
    """(bf16 weights in the model's order, KL samples, manifest entry) of ``spec`` from
    ``folder``, or None when the folder holds no start of these settings.

    Raises :class:`~rlvr_optim.errors.InputError` when a file's SHA-256 differs from the
    manifest's, or its tensors are not the model's.
    """
    entry = find_start(folder, spec)
    if entry is None:
        return None
    blobs = {}
    for name, digest in entry["files"].items():
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                blobs[name] = f.read()
        except OSError as e:
            raise InputError(f"{path}: cannot read the start file ({e.strerror})") from None
        if _sha256(blobs[name]) != digest:
            raise InputError(f"{path}: SHA-256 differs from {MANIFEST}'s; the start file was "
                             f"changed (remake it with `{COMMAND}`)")
    loaded = load(blobs[f"{spec.name}.safetensors"])
    task = AdditionTask(spec.digits)
    shapes = weight_shapes(start_shape(spec, task))
    if set(loaded) != set(shapes) or any(tuple(loaded[n].shape) != s for n, s in shapes.items()):
        raise InputError(f"{os.path.join(folder, spec.name)}.safetensors: its tensors are not "
                         "the model's its manifest entry describes")
    weights = {n: loaded[n] for n in shapes}       # the model's order: optimizer state by position
    samples = load(blobs[f"{spec.name}-kl-samples.safetensors"])["samples"]
    return weights, samples, entry


def committed_spec(seed: int) -> StartSpec:
    """The settings of the committed start ``seed``."""
    return StartSpec(seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    """Make start checkpoints (``python -m rlvr_optim.ablation.starts --help``)."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="start seeds (default 0 1 2)")
    parser.add_argument("--out", default=STARTS_DIR, help=f"folder (default {STARTS_DIR})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)          # one thread: the results do not depend on a pool's size
    for seed in args.seeds:
        spec = committed_spec(seed)
        weights, samples, info = make_start(spec)
        save_start(args.out, spec, weights, samples, info)
        print(f"{spec.name}: greedy {info['accuracy']:.1%}, sampled {info['sampled_accuracy']:.1%}"
              f", reversed {info['sampled_reversed_share']:.1%} of the correct mass, "
              f"{info['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
