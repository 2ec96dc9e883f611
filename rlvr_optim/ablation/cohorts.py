"""Training runs of the LM ablation: the warm-up, then each cohort of arms x seeds.

A cohort is every run of one ``(kind, mode, lr)``: their weights are stacked along a leading
run dimension and trained by one :class:`rlvr_optim.AdamW` (an elementwise update, so each
run's slice evolves as it would alone), which makes 10-20 small runs cost little more than
one in Python overhead. Each run has its own random generators: RL sampling per (arm, seed);
prompts and SFT problems per seed, shared by the arms of that seed (common random numbers,
so arms differ by their treatment, not their draws).

Everything resumes from checkpoints bit for bit (:func:`rlvr_optim.ablation.runs.drive`).
One drive iteration is one RL rollout, or as many SFT steps, of ``config.updates`` optimizer
steps.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from .. import analysis, bitmaps, files
from ..demo import MODES
from ..optimizer import AdamW
from .config import Arm, LMAblation
from .lm import (LMShape, forward, generate, greedy, init_weights, kl_to_reference,
                 weight_shapes)
from .runs import StepBudget, Workspace, derive_seed, drive
from .task import AdditionTask

__all__ = ["fixed_sample_kl", "freeze_masks", "lm_shape", "run_cohort", "run_warmup",
           "unchanged_fraction"]


def lm_shape(config: LMAblation, task: AdditionTask) -> LMShape:
    return LMShape(vocab=task.vocab_size, hidden=config.hidden, layers=config.layers,
                   heads=config.heads, intermediate=config.intermediate,
                   max_length=task.prompt_length + task.answer_length)


def _problems(config: LMAblation, task: AdditionTask, what: str, n: int) -> tuple[Tensor, Tensor]:
    return task.sample(n, torch.Generator().manual_seed(derive_seed(config.seed, what)))


def _stack(weights: dict[str, Tensor], runs: int, dtype: torch.dtype,
           device: torch.device) -> dict[str, Tensor]:
    return {n: t[None].expand(runs, *t.shape).to(device=device, dtype=dtype).contiguous()
            for n, t in weights.items()}


def _answer_logp(weights: dict[str, Tensor], seq: Tensor, shape: LMShape, prompt_length: int,
                 temperature: float = 1.0) -> Tensor:
    """Log-probabilities ``[A, B, answer_length, vocab]`` of the answer positions of ``seq``."""
    logits = forward(weights, seq, shape)[:, :, prompt_length - 1:-1]
    return torch.log_softmax(logits / temperature, dim=-1)


@torch.no_grad()
def fixed_sample_kl(weights: dict[str, Tensor], samples: Tensor, start_logp: Tensor,
                    shape: LMShape, prompt_length: int) -> Tensor:
    """KL(start policy || each run's policy) per answer token, on fixed samples; ``[A]``.

    ``samples`` ``[K, T]`` were drawn once from the start policy and ``start_logp``
    ``[K, answer_length, vocab]`` is that policy's log-probabilities on them: the exact KL
    over the vocabulary at each answer position of each sample, averaged. The same contexts
    for every arm and every step, so KL values compare across arms and along a run.
    """
    runs = next(iter(weights.values())).shape[0]
    logp = _answer_logp(weights, samples[None].expand(runs, -1, -1), shape, prompt_length)
    # Clamped at 0 per position: the exact KL is never negative, and the start weights in a
    # stack of runs give about -1e-9, the rounding of matmuls blocked for another shape.
    return kl_to_reference(start_logp[None], logp).clamp(min=0).mean(dim=(1, 2))


@torch.no_grad()
def unchanged_fraction(params: dict[str, Tensor], start_bits: dict[str, Tensor]) -> Tensor:
    """Per run ``[A]``: share of weights whose bf16 bits equal the start's (end vs start)."""
    same = total = 0
    for name, p in params.items():
        same = same + (analysis.bf16_bits(p) == start_bits[name][None]).reshape(
            p.shape[0], -1).sum(1)
        total += start_bits[name].numel()
    return same.double() / total


@torch.no_grad()
def _accuracy(weights: dict[str, Tensor], task: AdditionTask, shape: LMShape,
              problems: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Per run: greedy accuracy (either format counts) and the share written reversed."""
    prompts, answers = problems
    runs = next(iter(weights.values())).shape[0]
    out = greedy(weights, prompts[None].expand(runs, -1, -1), task.answer_length, shape)
    answers = answers[None].expand(runs, -1, -1)
    return (task.reward(out, answers).mean(1).double(),
            task.is_reversed(out, answers).double().mean(1))


def _drive_state() -> dict[str, Any]:
    return {"step": 0, "series": defaultdict(list), "wall_s": 0.0}


def run_warmup(config: LMAblation, task: AdditionTask, workspace: Workspace, budget: StepBudget,
               bar) -> tuple[dict[str, Tensor], dict, Tensor]:
    """The fp32 warm-up; returns the bf16 start weights, its result, and the fixed KL samples.

    Cross-entropy on fresh problems, ``warmup_reversed`` of the answers written reversed; the
    learning rate ramps up over the first 5% of the steps and decays to 0 by a cosine, so
    the last steps barely move the weights and the start does not hinge on the last batch.
    """
    name = "warmup"
    folder = workspace.folder(name)
    start_path = os.path.join(folder, "start.safetensors")
    samples_path = os.path.join(folder, "kl_samples.safetensors")
    done = workspace.finished(name)
    shape = lm_shape(config, task)
    if done is not None and os.path.exists(start_path):
        bar.update(config.warmup_steps)
        # The model's order, not the file's (sorted): optimizer states are kept by position.
        loaded = workspace.read_tensors(start_path, weight_shapes(shape))
        return (loaded, done, workspace.read_tensors(samples_path, ["samples"])["samples"])
    device = torch.device(config.device)
    weights = {n: t[None].to(device).requires_grad_() for n, t in
               init_weights(shape, config.seed).items()}
    opt = AdamW(list(weights.items()), lr=config.warmup_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "warmup"))
    ramp = max(1, config.warmup_steps // 20)
    p_len = task.prompt_length

    def lr_at(step: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * step / config.warmup_steps))
        return config.warmup_lr * min((step + 1) / ramp, decay)

    def step() -> dict[str, float]:
        for group in opt.param_groups:
            group["lr"] = lr_at(state["step"])
        prompts, answers = task.sample(config.warmup_batch, gen)
        flip = torch.rand(config.warmup_batch, generator=gen) < config.warmup_reversed
        answers = torch.where(flip[:, None], task.reverse(answers), answers)
        seq = torch.cat([prompts, answers], dim=1)[None].to(device)
        logp = _answer_logp(weights, seq, shape, p_len)
        loss = nn.functional.nll_loss(logp.reshape(-1, task.vocab_size),
                                      answers.to(device).reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach()), "lr": lr_at(state["step"])}

    def save() -> dict:
        return {"weights": {n: t.detach() for n, t in weights.items()},
                "optimizer": opt.state_dict(), "gen": gen.get_state()}

    def load(ckpt: dict) -> None:
        with torch.no_grad():
            for n, t in weights.items():
                t.copy_(ckpt["weights"][n])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["gen"])

    state = _drive_state()
    bar.set_postfix_str(name)
    drive(name, workspace, config.warmup_steps, config.checkpoint_every, budget, bar, state,
          step, save, load)
    start = {n: t.detach()[0].cpu().bfloat16().contiguous() for n, t in weights.items()}
    files.write_safetensors(start_path, start)
    start_dev = _stack(start, 1, torch.float32, device)
    prompts, _ = _problems(config, task, "kl-prompts", config.kl_samples)
    sample_gen = torch.Generator(device=device).manual_seed(derive_seed(config.seed, "kl-samples"))
    samples = generate(start_dev, prompts[None].to(device), task.answer_length, shape,
                       [sample_gen])[0].cpu()
    files.write_safetensors(samples_path, {"samples": samples.contiguous()})
    fp32_acc, _ = _accuracy({n: t.detach() for n, t in weights.items()}, task, shape,
                            tuple(t.to(device) for t in
                                  _problems(config, task, "eval", config.eval_problems)))
    acc, reversed_share = _accuracy(start_dev, task, shape, tuple(
        t.to(device) for t in _problems(config, task, "eval", config.eval_problems)))
    curve_acc, _ = _accuracy(start_dev, task, shape, tuple(
        t.to(device) for t in _problems(config, task, "curve", config.curve_problems)))
    result = {
        "name": name, "steps": config.warmup_steps, "lr": config.warmup_lr,
        "batch": config.warmup_batch, "series": dict(state["series"]), "wall_s": state["wall_s"],
        "accuracy_fp32": float(fp32_acc[0]), "accuracy": float(acc[0]),
        "reversed_share": float(reversed_share[0]), "curve_accuracy": float(curve_acc[0]),
        "params": sum(t.numel() for t in start.values()),
    }
    workspace.save_result(name, result)
    return start, result, samples


def freeze_masks(config: LMAblation, start: dict[str, Tensor], runs: list[tuple[Arm, int]],
                 cache: dict) -> dict[str, Tensor]:
    """Stacked trained-masks ``{name: bool [A, ...]}`` of a cohort (True = trained).

    Masks come from the start weights (:func:`rlvr_optim.analysis.build_masks`, packed
    bit 1 = in the set): an arm that freezes a set trains its complement. Arms without a
    freeze, and tensors without a mask (norm weights), train every element.
    """
    if not any(arm.freeze for arm, _ in runs):
        return {}
    key = ("freeze masks", config.alpha, config.rank, config.seed)
    if key not in cache:
        cache[key] = analysis.build_masks(start, ("principal", "non_principal", "random"),
                                          alpha=config.alpha, rank=config.rank,
                                          seed=config.seed)
    masks = cache[key]
    out = {}
    for name, numel in masks["principal"]["numels"].items():
        per_run = []
        for arm, _ in runs:
            if arm.freeze is None:
                per_run.append(torch.ones(numel, dtype=torch.bool))
            else:
                frozen = masks[arm.freeze]["bitmaps"][name]
                per_run.append(~bitmaps.unpack(frozen, numel).bool())
        out[name] = torch.stack(per_run).reshape(len(runs), *start[name].shape)
    return out


def run_cohort(config: LMAblation, cohort: tuple[str, str, float], task: AdditionTask,
               start: dict[str, Tensor], kl_samples: Tensor, workspace: Workspace,
               budget: StepBudget, bar) -> list[dict]:
    """Every run (arm x seed) of one ``(kind, mode, lr)``; returns one result per run.

    Logged per iteration and run: ``loss``, and for RL ``reward`` (mean over the rollout)
    and ``clip_fraction`` (share of answer tokens whose ratio left ``1 +- clip``). Every
    ``log_every`` steps and at the end: ``curve_kl`` (:func:`fixed_sample_kl`), ``curve_unchanged`` (bf16
    bits equal to the start), ``curve_accuracy`` and ``curve_reversed`` (greedy, on
    ``curve_problems`` held-out problems), at ``curve_step``.
    """
    kind, mode, lr = cohort
    runs = [(arm, seed) for arm in config.arms if (arm.kind, arm.mode, arm.lr) == cohort
            for seed in config.seeds]
    slug = "".join(c if c.isalnum() else "-" for c in mode.lower())
    name = f"cohort-{kind}-{'-'.join(p for p in slug.split('-') if p)}-lr{lr:g}"
    iterations = config.steps // config.updates
    done = workspace.finished(name)
    if done is not None:
        bar.update(iterations)
        return done["runs"]
    device = torch.device(config.device)
    dtype, options = MODES[mode]
    shape = lm_shape(config, task)
    n_runs = len(runs)
    params = {n: t.requires_grad_() for n, t in _stack(start, n_runs, dtype, device).items()}
    start_bits = {n: analysis.bf16_bits(t).to(device) for n, t in start.items()}
    opt = AdamW(list(params.items()), lr=lr, weight_decay=config.weight_decay,
                seed=derive_seed(config.seed, name, "rounding"), **options)
    trained = freeze_masks(config, start, runs, workspace.base_cache)
    for pname, mask in trained.items():
        opt.set_freeze_mask(params[pname], mask.to(device))
    data_gens = [torch.Generator().manual_seed(derive_seed(config.seed, seed, kind, "data"))
                 for _, seed in runs]
    sample_gens = [torch.Generator(device=device).manual_seed(
        derive_seed(config.seed, seed, arm.name, "sample")) for arm, seed in runs]
    kl_coefs = torch.tensor([arm.kl_coef for arm, _ in runs], device=device)
    teacher = torch.tensor([arm.data == "teacher" for arm, _ in runs], device=device)
    start_ref = _stack(start, 1, torch.float32, device)
    kl_samples = kl_samples.to(device)
    p_len, a_len = task.prompt_length, task.answer_length
    start_logp = _answer_logp(start_ref, kl_samples[None], shape, p_len)[0].detach()
    curve_problems = tuple(t.to(device) for t in _problems(config, task, "curve",
                                                           config.curve_problems))
    batch = config.prompts * config.group

    def draw(n: int) -> tuple[Tensor, Tensor]:
        drawn = [task.sample(n, g) for g in data_gens]
        return (torch.stack([p for p, _ in drawn]).to(device),
                torch.stack([a for _, a in drawn]).to(device))

    def rl_iteration() -> dict[str, Any]:
        prompts, answers = draw(config.prompts)
        prompts = prompts.repeat_interleave(config.group, 1)
        answers = answers.repeat_interleave(config.group, 1)
        seq = generate(params, prompts, a_len, shape, sample_gens, config.temperature)
        rewards = task.reward(seq[:, :, p_len:], answers)
        grouped = rewards.view(n_runs, config.prompts, config.group)
        advantages = ((grouped - grouped.mean(2, keepdim=True))
                      / (grouped.std(2, correction=0, keepdim=True) + 1e-6)).view(n_runs, -1, 1)
        taken = seq[:, :, p_len:, None]
        with torch.no_grad():
            old = _answer_logp(params, seq, shape, p_len, config.temperature).gather(-1, taken)
            ref = (_answer_logp(start_ref, seq, shape, p_len, config.temperature)
                   if bool(kl_coefs.any()) else None)
        losses, clipped = [], []
        for _ in range(config.updates):
            logp = _answer_logp(params, seq, shape, p_len, config.temperature)
            ratio = torch.exp(logp.gather(-1, taken) - old).squeeze(-1)
            bounded = ratio.clamp(1 - config.clip, 1 + config.clip)
            loss = -torch.minimum(ratio * advantages, bounded * advantages).mean(dim=(1, 2))
            if ref is not None:
                loss = loss + kl_coefs * kl_to_reference(logp, ref).mean(dim=(1, 2))
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            losses.append(loss.detach())
            clipped.append(((ratio.detach() - 1).abs() > config.clip).double().mean(dim=(1, 2)))
        return {"reward": rewards.mean(1).tolist(),
                "loss": torch.stack(losses).mean(0).tolist(),
                "clip_fraction": torch.stack(clipped).mean(0).tolist()}

    def sft_iteration() -> dict[str, Any]:
        losses = []
        for _ in range(config.updates):
            prompts, answers = draw(batch)
            answers = torch.where(teacher[:, None, None], task.reverse(answers), answers)
            seq = torch.cat([prompts, answers], dim=2)
            logp = _answer_logp(params, seq, shape, p_len)
            loss = -logp.gather(-1, answers[..., None]).mean(dim=(1, 2, 3))
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            losses.append(loss.detach())
        return {"loss": torch.stack(losses).mean(0).tolist()}

    def step() -> dict[str, Any]:
        out = rl_iteration() if kind == "rl" else sft_iteration()
        done_steps = (state["step"] + 1) * config.updates
        if done_steps % config.log_every == 0 or done_steps == config.steps:
            detached = {n: p.detach() for n, p in params.items()}
            acc, rev = _accuracy(detached, task, shape, curve_problems)
            out.update(curve_step=done_steps,
                       curve_kl=fixed_sample_kl(detached, kl_samples, start_logp, shape,
                                                p_len).tolist(),
                       curve_unchanged=unchanged_fraction(detached, start_bits).tolist(),
                       curve_accuracy=acc.tolist(), curve_reversed=rev.tolist())
        return out

    def save() -> dict:
        return {"params": {n: p.detach() for n, p in params.items()},
                "optimizer": opt.state_dict(),
                "data_gens": [g.get_state() for g in data_gens],
                "sample_gens": [g.get_state() for g in sample_gens]}

    def load(ckpt: dict) -> None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ckpt["params"][n])
        opt.load_state_dict(ckpt["optimizer"])
        for g, s in zip(data_gens, ckpt["data_gens"]):
            g.set_state(s)
        for g, s in zip(sample_gens, ckpt["sample_gens"]):
            g.set_state(s)

    state = _drive_state()
    bar.set_postfix_str(name)
    drive(name, workspace, iterations, max(1, config.checkpoint_every // config.updates), budget,
          bar, state, step, save, load)
    results = _measure(config, task, shape, runs, params, opt, start, trained, state, workspace)
    workspace.save_result(name, {"runs": results})
    return results


def _measure(config: LMAblation, task: AdditionTask, shape: LMShape, runs: list[tuple[Arm, int]],
             params: dict[str, Tensor], opt: AdamW, start: dict[str, Tensor],
             trained: dict[str, Tensor], state: dict, workspace: Workspace) -> list[dict]:
    """End-of-run measures per run; writes each run's ``final.safetensors`` (bf16 weights) and,
    with an fp32 master, ``master.safetensors``. ``trained``: the cohort's freeze masks."""
    detached = {n: p.detach() for n, p in params.items()}
    device = next(iter(detached.values())).device
    acc, rev = _accuracy(detached, task, shape, tuple(
        t.to(device) for t in _problems(config, task, "eval", config.eval_problems)))
    has_master = opt.param_groups[0]["master_weights"] == "fp32"
    results = []
    for a, (arm, seed) in enumerate(runs):
        run_name = f"{arm.name}-seed{seed}"
        folder = workspace.folder(run_name)
        final = {n: t[a].cpu().contiguous() for n, t in detached.items()}
        files.write_safetensors(os.path.join(folder, "final.safetensors"), final)
        geometry = analysis.geometry(start, final, alpha=config.alpha, rank=config.rank,
                                     bins=config.bins, base_cache=workspace.base_cache)
        master_geometry = None
        if has_master:
            master = {n: opt.state[p]["master"][a].cpu().contiguous() for n, p in params.items()}
            files.write_safetensors(os.path.join(folder, "master.safetensors"), master)
            master_geometry = analysis.geometry(start, master, alpha=config.alpha,
                                                rank=config.rank, bins=config.bins,
                                                base_cache=workspace.base_cache)["overall"]
        sparsity = analysis.update_sparsity(start, final)
        frozen = frozen_changed = 0
        for pname, mask in trained.items():
            held = ~mask[a]
            frozen += int(held.sum())
            frozen_changed += int((held & ~analysis.unchanged_bitwise(start[pname],
                                                                       final[pname])).sum())
        series = {k: [v[a] for v in values] for k, values in state["series"].items()
                  if k != "curve_step"}
        series["curve_step"] = list(state["series"]["curve_step"])
        results.append({
            "name": run_name, "arm": arm.name, "label": arm.label, "kind": arm.kind,
            "mode": arm.mode, "lr": arm.lr, "data": arm.data, "kl_coef": arm.kl_coef,
            "freeze": arm.freeze, "seed": seed, "steps": config.steps,
            "cohort_wall_s": state["wall_s"], "series": series,
            "sparsity": sparsity["overall"], "modules": sparsity["modules"],
            "geometry": geometry["overall"], "master_geometry": master_geometry,
            "accuracy": float(acc[a]), "reversed_share": float(rev[a]),
            "frozen_share": frozen / sparsity["overall"]["numel"],
            "frozen_changed": frozen_changed,
        })
    return results
