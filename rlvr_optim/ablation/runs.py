"""Training runs of the LM ablation, resumable: the SFT phase, then RLVR and SFT runs per mode.

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
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import analysis, bitmaps
from ..demo import MODES
from ..optimizer import AdamW
from .config import LMAblation, RunSpec
from .lm import answer_logits, build_model, generate, greedy_accuracy, kl_to_reference
from .task import AdditionTask

__all__ = ["Interrupted", "StepBudget", "Workspace", "derive_seed", "drive", "eval_set",
           "measure_run", "run_lm_unit", "run_warmup"]

_LOG_PREFIX = "rlvr_optim/"


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


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def _build(config: LMAblation, task: AdditionTask) -> nn.Module:
    return build_model(task.vocab_size, hidden=config.hidden, layers=config.layers,
                       heads=config.heads, intermediate=config.intermediate,
                       max_length=task.prompt_length + task.answer_length, bos=task.bos,
                       eos=task.eos, seed=config.seed)


def eval_set(config: LMAblation, task: AdditionTask) -> tuple[Tensor, Tensor]:
    """The held-out problems every model is scored on."""
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "eval"))
    return task.sample(config.eval_problems, gen)


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


def run_warmup(config: LMAblation, task: AdditionTask, workspace: Workspace,
               budget: StepBudget, bar) -> tuple[dict[str, Tensor], dict]:
    """The fp32 SFT phase; returns the bf16 start weights and the phase's result."""
    name = "warmup"
    folder = workspace.folder(name)
    start_path = os.path.join(folder, "start.safetensors")
    done = workspace.finished(name)
    if done is not None and os.path.exists(start_path):
        bar.update(config.warmup_steps)
        return load_file(start_path), done
    device = torch.device(config.device)
    model = _build(config, task).to(device)
    opt = AdamW(model.parameters(), lr=config.warmup_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "warmup"))
    p_len = task.prompt_length

    def step() -> dict[str, float]:
        prompts, answers = task.sample(config.warmup_batch, gen)
        seq = torch.cat([prompts, answers], dim=1).to(device)
        logits = answer_logits(model, seq, p_len)
        loss = nn.functional.cross_entropy(logits.reshape(-1, task.vocab_size),
                                           answers.to(device).reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    def save() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(),
                "gen": gen.get_state()}

    def load(ckpt: dict) -> None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["gen"])

    state: dict[str, Any] = {"step": 0, "series": defaultdict(list), "wall_s": 0.0}
    bar.set_postfix_str(name)
    model.train()
    drive(name, workspace, config.warmup_steps, config.checkpoint_every, budget, bar, state,
           step, save, load)
    start = {n: p.detach().cpu().bfloat16().contiguous() for n, p in model.named_parameters()}
    save_file(start, start_path)
    prompts, answers = eval_set(config, task)
    start_model = _build(config, task)
    _load_weights(start_model, start)
    start_model = start_model.to(device=device, dtype=torch.bfloat16).eval()
    result = {
        "name": name, "steps": config.warmup_steps, "lr": config.warmup_lr,
        "batch": config.warmup_batch, "series": dict(state["series"]), "wall_s": state["wall_s"],
        "accuracy_fp32": greedy_accuracy(model.eval(), prompts.to(device), answers.to(device)),
        "accuracy": greedy_accuracy(start_model, prompts.to(device), answers.to(device)),
        "params": sum(p.numel() for p in model.parameters()),
    }
    workspace.save_result(name, result)
    return start, result


def _load_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    params = {n for n, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise RuntimeError(f"weights do not fit the model: missing {missing}, "
                           f"unexpected {unexpected}")


def run_lm_unit(config: LMAblation, spec: RunSpec, task: AdditionTask,
                start: dict[str, Tensor], workspace: Workspace, budget: StepBudget,
                bar) -> dict:
    """One RL or SFT run from the start weights in one precision mode; returns its result.

    Logged per step: ``changed_fraction`` and ``filtered_fraction`` (the optimizer's
    counters), ``never_changed_fraction`` (its cumulative bitmaps), ``unchanged_vs_start``
    (bf16 bits equal to the start's, the paper's end-vs-start measure), ``loss``, ``kl``
    (exact KL to the start policy per answer token) and, for RL, ``reward``.
    """
    done = workspace.finished(spec.name)
    if done is not None:
        bar.update(config.steps)
        return done
    device = torch.device(config.device)
    dtype, options = MODES[spec.mode]
    model = _build(config, task)
    _load_weights(model, start)
    model = model.to(device=device, dtype=dtype).train()
    ref = _build(config, task)
    _load_weights(ref, start)
    ref = ref.to(device=device, dtype=dtype).eval().requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    # The model's order (a start read back from its file comes sorted by name).
    start = {n: start[n] for n in names}
    start_bits = [analysis.bf16_bits(start[n]).to(device) for n in names]
    numel = sum(p.numel() for p in params)
    opt = AdamW(model.named_parameters(), lr=spec.lr, weight_decay=config.weight_decay,
                track_changes="cumulative", seed=spec.seed, **options)
    data_gen = torch.Generator().manual_seed(derive_seed(config.seed, spec.seed, spec.kind, "data"))
    sample_gen = torch.Generator(device=device).manual_seed(
        derive_seed(config.seed, spec.seed, spec.kind, "sample"))
    p_len, a_len = task.prompt_length, task.answer_length

    def step() -> dict[str, float]:
        out: dict[str, float] = {}
        if spec.kind == "rl":
            prompts, answers = task.sample(config.prompts, data_gen)
            prompts = prompts.repeat_interleave(config.group, 0).to(device)
            answers = answers.repeat_interleave(config.group, 0).to(device)
            seq = generate(model, prompts, a_len, sample_gen, config.temperature)
            rewards = task.reward(seq[:, p_len:], answers)
            grouped = rewards.view(config.prompts, config.group)
            advantages = ((grouped - grouped.mean(1, keepdim=True))
                          / (grouped.std(1, correction=0, keepdim=True) + 1e-6)).view(-1)
            logp = torch.log_softmax(answer_logits(model, seq, p_len) / config.temperature, -1)
            token_logp = logp.gather(-1, seq[:, p_len:, None]).squeeze(-1)
            loss = -(advantages[:, None] * token_logp).mean()
            out["reward"] = float(rewards.mean())
        else:
            prompts, answers = task.sample(config.prompts * config.group, data_gen)
            seq = torch.cat([prompts, answers], dim=1).to(device)
            logp = torch.log_softmax(answer_logits(model, seq, p_len), -1)
            loss = nn.functional.nll_loss(logp.reshape(-1, task.vocab_size),
                                          answers.to(device).reshape(-1))
        with torch.no_grad():
            ref_logp = torch.log_softmax(answer_logits(ref, seq, p_len)
                                         / (config.temperature if spec.kind == "rl" else 1.0), -1)
        kl = kl_to_reference(logp, ref_logp).mean()
        total = loss + config.kl_coef * kl if spec.kind == "rl" and config.kl_coef else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        log = opt.change_log(prefix=_LOG_PREFIX)
        with torch.no_grad():
            same = sum(int((analysis.bf16_bits(p) == b).sum()) for p, b in zip(params, start_bits))
        out.update(
            loss=float(loss.detach()), kl=float(kl.detach()),
            changed_fraction=log[_LOG_PREFIX + "changed_fraction"],
            filtered_fraction=log[_LOG_PREFIX + "filtered_fraction"],
            never_changed_fraction=log[_LOG_PREFIX + "never_changed_fraction"],
            unchanged_vs_start=same / numel,
        )
        return out

    def save() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(),
                "data_gen": data_gen.get_state(), "sample_gen": sample_gen.get_state()}

    def load(ckpt: dict) -> None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        data_gen.set_state(ckpt["data_gen"])
        sample_gen.set_state(ckpt["sample_gen"])

    state: dict[str, Any] = {"step": 0, "series": defaultdict(list), "wall_s": 0.0}
    bar.set_postfix_str(spec.name)
    drive(spec.name, workspace, config.steps, config.checkpoint_every, budget, bar, state,
           step, save, load)
    final = _cpu_state(model)
    folder = workspace.folder(spec.name)
    save_file({n: t.contiguous() for n, t in final.items()},
              os.path.join(folder, "final.safetensors"))
    result = measure_run(config, spec, start, final, state, folder, workspace.base_cache)
    prompts, answers = eval_set(config, task)
    result["accuracy"] = greedy_accuracy(model.eval(), prompts.to(device), answers.to(device))
    workspace.save_result(spec.name, result)
    return result


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
