"""Training runs of the LM ablation: the starts, then each cohort of arms x seeds.

A cohort is every run of one ``(family, mode, lr, start)``: their weights are stacked along a
leading run dimension and trained by one :class:`rlvr_optim.AdamW` (an elementwise update,
so each run's slice evolves as it would alone), which makes tens of small runs cost little
more than one in Python overhead. The ``"sample"`` family (RL, RL no-signal, RFT) samples a
rollout per iteration; the ``"sft"`` family reads fixed-format answers.

Random streams, per start and seed, shared by the arms of that start and seed (common random
numbers, so arms differ by their treatment, not their draws): the rollout prompts, the
sampling generator (so every sampling arm's first rollout is the same), the no-signal
shuffles and the SFT problems.

Everything resumes from checkpoints bit for bit (:func:`rlvr_optim.ablation.runs.drive`).
One drive iteration is one rollout, or as many SFT steps, of ``config.updates`` optimizer
steps.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from .. import analysis, bitmaps, files
from ..optimizer import AdamW
from .config import MASTER, MODES, Arm, LMAblation, storage_dtype
from .lm import LMShape, forward, generate, kl_to_reference
from .runs import StepBudget, Workspace, derive_seed, drive
from .starts import (STARTS_DIR, correct_probability, greedy_accuracy, load_start, make_start,
                     save_start, start_shape)
from .task import AdditionTask

__all__ = ["CURVE_GEOMETRY", "Start", "curve_geometry", "fixed_sample_kl", "freeze_masks",
           "group_advantages", "lm_shape", "load_starts", "no_signal_rewards", "rft_weights",
           "run_cohort", "sampling_loss",
           "unchanged_fraction"]


class Start:
    """One start of the ablation: bf16 weights, KL samples, held-out problems, its facts."""

    def __init__(self, seed: int, weights: dict[str, Tensor], kl_samples: Tensor,
                 source: str, made: dict[str, Any]) -> None:
        self.seed, self.weights, self.kl_samples = seed, weights, kl_samples
        self.source, self.made = source, made
        self.base_cache: dict = {}          # the SVDs and masks of its matrices, once
        self.measured: dict[str, float] = {}


def lm_shape(config: LMAblation, task: AdditionTask) -> LMShape:
    return start_shape(config.start_spec(config.starts[0]), task)


def load_starts(config: LMAblation, workspace: Workspace, budget: StepBudget,
                bar) -> list[Start]:
    """Every start of ``config``: the committed file when one was made with these settings,
    else a warm-up trained (resumably) into ``<out>/checkpoints/starts``."""
    out = []
    folder = os.path.join(workspace.root, "starts")
    for seed in config.starts:
        spec = config.start_spec(seed)
        found = load_start(STARTS_DIR, spec)
        source = f"committed file rlvr_optim/ablation/starts/{spec.name}.safetensors"
        if found is None and workspace.resume:
            found = load_start(folder, spec)
            source = f"trained by this ablation ({folder})"
        if found is None:
            bar.set_postfix_str(spec.name)
            bar.total += spec.steps
            weights, samples, info = make_start(spec, workspace, budget, bar,
                                                device=config.device)
            save_start(folder, spec, weights, samples, info)
            # The warm-up's checkpoint goes: a resume reads the start from ``folder``, and
            # Workspace.saved() reports it finished.
            workspace.save_result(spec.name, {"name": spec.name, **info})
            found = load_start(folder, spec)
            source = f"trained by this ablation ({folder})"
        weights, samples, entry = found
        out.append(Start(seed, weights, samples, source, entry))
    return out


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
                    shape: LMShape, prompt_length: int, temperature: float = 1.0) -> Tensor:
    """KL(start policy || each run's policy) per answer token, on fixed samples; ``[A]``.

    ``samples`` ``[K, T]`` (or ``[A, K, T]``, one set per run) were drawn once from the start
    policy, and ``start_logp`` ``[K, answer_length, vocab]`` (or ``[A, ...]``) is that
    policy's log-probabilities on them: the exact KL over the vocabulary at each answer
    position of each sample, averaged. The same contexts for every arm and every step, so
    KL values compare across arms and along a run.
    """
    runs = next(iter(weights.values())).shape[0]
    if samples.dim() == 2:
        samples = samples[None].expand(runs, -1, -1)
    if start_logp.dim() == 3:
        start_logp = start_logp[None]
    logp = _answer_logp(weights, samples, shape, prompt_length, temperature)
    # Clamped at 0 per position: the exact KL is never negative, and the start weights in a
    # stack of runs give about -1e-9, the rounding of matmuls blocked for another shape.
    return kl_to_reference(start_logp, logp).clamp(min=0).mean(dim=(1, 2))


@torch.no_grad()
def unchanged_fraction(params: dict[str, Tensor], start_bits: dict[str, Tensor],
                       image: torch.dtype = torch.bfloat16) -> Tensor:
    """Per run ``[A]``: share of weights whose ``image`` bits (bf16 or float16: the
    storage format, :func:`~rlvr_optim.ablation.config.storage_dtype`) equal the start's.

    ``start_bits`` holds each weight's start bits, ``[...]`` (one start) or ``[A, ...]``."""
    same = total = 0
    for name, p in params.items():
        bits = start_bits[name]
        bits = bits if bits.dim() == p.dim() else bits[None]
        same = same + (analysis.image_bits(p, image) == bits).reshape(p.shape[0], -1).sum(1)
        total += p[0].numel()
    return same.double() / total


@torch.no_grad()
def stored_bits(params: dict[str, Tensor], image: torch.dtype) -> dict[str, Tensor]:
    """A copy of every weight's ``image`` bits (taken before a step)."""
    return {n: analysis.image_bits(p.detach(), image).clone() for n, p in params.items()}


def group_advantages(rewards: Tensor, group: int) -> Tensor:
    """GRPO's advantages ``[A, B]``: rewards ``[A, B]`` normalised within consecutive groups of
    ``group`` samples (mean 0, and std 1 unless the group's rewards are all equal: then 0)."""
    grouped = rewards.view(rewards.shape[0], -1, group)
    centred = grouped - grouped.mean(2, keepdim=True)
    return (centred / (grouped.std(2, correction=0, keepdim=True) + 1e-6)).view_as(rewards)


def no_signal_rewards(rewards: Tensor, generator: torch.Generator) -> Tensor:
    """The rewards ``[B]`` of one rollout permuted across all of its samples: the same reward
    counts, carried by random samples, so an advantage says nothing about its sample."""
    return rewards[torch.randperm(rewards.shape[0], generator=generator,
                                  device=rewards.device)]


def rft_weights(rewards: Tensor, answer_length: int) -> Tensor:
    """Per-token weights ``[A, B, answer_length]`` of RFT's cross-entropy: the sampled answers
    that were correct, each token ``1 / (correct answers x answer_length)``; 0 elsewhere."""
    count = rewards.sum(1, keepdim=True).clamp(min=1.0)
    return (rewards / count)[:, :, None].expand(-1, -1, answer_length) / answer_length


def sampling_loss(taken_logp: Tensor, old_logp: Tensor, advantages: Tensor, rewards: Tensor,
                  is_rft: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """The loss ``[A]`` of one update of the sampling kinds, and each run's clipped share.

    Args:
        taken_logp: log-probabilities ``[A, B, L]`` of the sampled answer tokens now.
        old_logp: the same under the rollout policy.
        advantages: ``[A, B]`` (:func:`group_advantages`; shuffled rewards for no-signal).
        rewards: ``[A, B]``, 1 for a correct sample.
        is_rft: ``[A]`` bool: RFT's cross-entropy on the correct samples
            (:func:`rft_weights`) instead of the clipped policy-gradient surrogate
            ``-mean(min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A))``.
        clip: the clipping range.

    The clipped share is the share of answer tokens whose ratio left ``1 +- clip``.
    """
    ratio = torch.exp(taken_logp - old_logp)
    bounded = ratio.clamp(1 - clip, 1 + clip)
    adv = advantages[:, :, None]
    policy = -torch.minimum(ratio * adv, bounded * adv).mean(dim=(1, 2))
    rft = -(taken_logp * rft_weights(rewards, taken_logp.shape[-1])).sum(dim=(1, 2))
    clipped = ((ratio.detach() - 1).abs() > clip).double().mean(dim=(1, 2))
    return torch.where(is_rft, rft, policy), clipped


@torch.no_grad()
def _start_logp(start: Start, shape: LMShape, p_len: int, temperature: float,
                device: torch.device) -> Tensor:
    weights = _stack(start.weights, 1, torch.float32, device)
    return _answer_logp(weights, start.kl_samples[None].to(device), shape, p_len,
                        temperature)[0]


def freeze_masks(config: LMAblation, start: Start,
                 runs: list[tuple[Arm, int]]) -> dict[str, Tensor]:
    """Stacked trained-masks ``{name: bool [A, ...]}`` of a cohort (True = trained).

    Masks come from the start weights (:func:`rlvr_optim.analysis.build_masks`, packed
    bit 1 = in the set): an arm that freezes a set trains its complement. Arms without a
    freeze, and tensors without a mask (norm weights), train every element.
    """
    if not any(arm.freeze for arm, _ in runs):
        return {}
    key = ("freeze masks", config.alpha, config.rank, config.seed)
    if key not in start.base_cache:
        start.base_cache[key] = analysis.build_masks(
            start.weights, ("principal", "non_principal", "random"), alpha=config.alpha,
            rank=config.rank, seed=derive_seed(config.seed, start.seed, "random mask"))
    masks = start.base_cache[key]
    out = {}
    for name, numel in masks["principal"]["numels"].items():
        per_run = []
        for arm, _ in runs:
            if arm.freeze is None:
                per_run.append(torch.ones(numel, dtype=torch.bool))
            else:
                frozen = masks[arm.freeze]["bitmaps"][name]
                per_run.append(~bitmaps.unpack(frozen, numel).bool())
        out[name] = torch.stack(per_run).reshape(len(runs), *start.weights[name].shape)
    return out


# The geometry read along each run's curve: curve key -> the key of
# rlvr_optim.analysis.geometry()["overall"] it equals (same masks, nulls and means).
CURVE_GEOMETRY = {
    "curve_matched_lift": "changed_in_principal_matched_lift",         # bf16 changed mask
    "curve_master_matched_lift": "top_in_principal_matched_lift",      # fp32 master top-alpha
    "curve_angle": "angle_left",          # fp32 master where there is one, else bf16 weights
    "curve_drift": "spectrum_drift",      # likewise
}


def _curve_facts(config: LMAblation, start: Start) -> dict[str, dict[str, Tensor]]:
    """Per matrix of a start, what the curve geometry compares against: the principal mask,
    the magnitude bins of the matched null, the spectrum and the top-k left singular vectors
    (as :func:`rlvr_optim.analysis.geometry` defines them). Computed once per start."""
    key = ("curve facts", config.alpha, config.rank, config.bins)
    if key not in start.base_cache:
        facts = {}
        for name, w0 in start.weights.items():
            if w0.dim() != 2 or min(w0.shape) < 2:
                continue
            k = analysis.resolve_rank(config.rank, w0.shape)
            u, s, _ = torch.linalg.svd(w0.double(), full_matrices=False)
            facts[name] = {"principal": analysis.principal_mask(w0, config.alpha, config.rank),
                           "bins": analysis.magnitude_bins(w0, config.bins).reshape(-1),
                           "s": s, "u": u[:, :k], "k": k}
        start.base_cache[key] = facts
    return start.base_cache[key]


def _matched_null(update: Tensor, mask: Tensor, bins: Tensor, nbins: int) -> float:
    """Expected ``|update & mask|`` when ``update`` is permuted at random within magnitude
    bins: the sum over bins of ``|update in b| * |mask in b| / |b|``."""
    n = torch.bincount(bins, minlength=nbins).double().clamp(min=1)
    u = torch.bincount(bins, weights=update.reshape(-1).double(), minlength=nbins)
    m = torch.bincount(bins, weights=mask.reshape(-1).double(), minlength=nbins)
    return float((u * m / n).sum())


def curve_geometry(config: LMAblation, start: Start, bf16: dict[str, Tensor],
                    master: dict[str, Tensor] | None,
                    image: torch.dtype = torch.bfloat16) -> dict[str, float | None]:
    """The :data:`CURVE_GEOMETRY` measures of one run's weights (``bf16``: the stored
    weights, bf16 or float16 (``image``); and the fp32 master when there is one): the few
    that matched comparisons read, not all of ``geometry``."""
    facts = _curve_facts(config, start)
    inter = null = inter_m = null_m = 0.0
    angles, drifts = [], []
    for name, f in facts.items():
        w0 = start.weights[name]
        changed = ~analysis.unchanged_bitwise(w0, bf16[name], image)
        inter += float((changed & f["principal"]).sum())
        null += _matched_null(changed, f["principal"], f["bins"], config.bins)
        spectral = master[name] if master is not None else bf16[name]
        if master is not None:
            top = analysis.top_update_mask(w0, master[name], config.alpha)
            inter_m += float((top & f["principal"]).sum())
            null_m += _matched_null(top, f["principal"], f["bins"], config.bins)
        u1, s1, _ = torch.linalg.svd(spectral.double(), full_matrices=False)
        drifts.append(float(torch.linalg.vector_norm(s1 - f["s"])
                            / torch.linalg.vector_norm(f["s"])))
        cosines = torch.linalg.svdvals(f["u"].T @ u1[:, :f["k"]]).clamp(-1.0, 1.0)
        angles.append(float(torch.rad2deg(torch.arccos(cosines.min()))))
    return {"curve_matched_lift": inter / null if null else None,
            "curve_master_matched_lift": (inter_m / null_m if master is not None and null_m
                                          else None),
            "curve_angle": sum(angles) / len(angles) if angles else None,
            "curve_drift": sum(drifts) / len(drifts) if drifts else None}


def run_cohort(config: LMAblation, cohort: tuple[str, str, float, int], task: AdditionTask,
               start: Start, workspace: Workspace, budget: StepBudget, bar) -> list[dict]:
    """Every run (arm x seed) of one ``(family, mode, lr, start)``; one result per run.

    Logged per iteration and run: ``loss``; in designs that compare storage modes (an arm
    not in fp32-master mode), ``step_unchanged`` (the share of weights whose stored bits,
    bf16 or float16 (:func:`~rlvr_optim.ablation.config.storage_dtype`), are identical
    before and after a step, mean over the iteration's steps; a copy of the bits per step,
    which the headline design does without); for the sampling
    kinds ``reward`` (share of the rollout's samples that are correct) and ``clip_fraction``
    (share of answer tokens whose ratio left ``1 +- clip``, over the iteration's updates).
    Every ``log_every`` steps and at the end (``curve_step``): ``curve_kl``
    (:func:`fixed_sample_kl`), ``curve_unchanged`` (stored bits equal to the start's image
    in that format), ``curve_sampled_accuracy`` and ``curve_sampled_reversed``
    (exact chance that a sample at the rollout temperature is correct, and the reversed
    format's part of it, on ``curve_problems`` held-out problems) and the geometry of
    :data:`CURVE_GEOMETRY`.
    """
    family, mode, lr, start_seed = cohort
    runs = [(arm, seed) for arm in config.arms if (arm.family, arm.mode, arm.lr) == cohort[:3]
            for seed in config.seeds]
    name = f"cohort-{family}-{_slug(mode)}-lr{lr:g}-start{start_seed}"
    iterations = config.steps // config.updates
    done = workspace.finished(name)
    if done is not None:
        bar.update(iterations)
        return done["runs"]
    device = torch.device(config.device)
    dtype, options = MODES[mode]
    image = storage_dtype(mode)
    shape = lm_shape(config, task)
    n_runs = len(runs)
    params = {n: t.requires_grad_() for n, t in _stack(start.weights, n_runs, dtype,
                                                       device).items()}
    # A float16 run starts from the float16 image of the (bf16) start: its changes are
    # counted against that.
    start_bits = {n: analysis.image_bits(t, image).to(device) for n, t in start.weights.items()}
    opt = AdamW(list(params.items()), lr=lr, weight_decay=config.weight_decay,
                seed=derive_seed(config.seed, name, "rounding"), **options)
    trained = freeze_masks(config, start, runs)
    for pname, mask in trained.items():
        opt.set_freeze_mask(params[pname], mask.to(device))
    train_ids, held_ids = task.split(config.held_out, config.split_seed)

    def gens(what: str, on_device: bool = False) -> list[torch.Generator]:
        dev = device if on_device else torch.device("cpu")
        return [torch.Generator(device=dev).manual_seed(
            derive_seed(config.seed, start_seed, seed, what)) for _, seed in runs]

    prompt_gens, sample_gens, shuffle_gens = gens("prompts"), gens("sample", True), gens("shuffle")
    kinds = [arm.kind for arm, _ in runs]
    no_signal = [k == "rl-no-signal" for k in kinds]
    is_rft = torch.tensor([k == "rft" for k in kinds], device=device)
    kl_coefs = torch.tensor([arm.kl_coef for arm, _ in runs], device=device)
    teacher = torch.tensor([arm.data == "teacher" for arm, _ in runs], device=device)
    start_ref = _stack(start.weights, 1, torch.float32, device)
    kl_samples = start.kl_samples.to(device)
    p_len, a_len = task.prompt_length, task.answer_length
    start_logp = _start_logp(start, shape, p_len, config.temperature, device)
    curve_problems = tuple(t.to(device) for t in task.problems(held_ids[:config.curve_problems]))
    batch = config.prompts * config.group
    has_master = opt.param_groups[0]["master_weights"] == "fp32"

    def draw(generators: list[torch.Generator], n: int) -> tuple[Tensor, Tensor]:
        drawn = [task.sample(n, g, train_ids) for g in generators]
        return (torch.stack([p for p, _ in drawn]).to(device),
                torch.stack([a for _, a in drawn]).to(device))

    def sample_iteration() -> dict[str, Any]:
        prompts, answers = draw(prompt_gens, config.prompts)
        prompts = prompts.repeat_interleave(config.group, 1)
        answers = answers.repeat_interleave(config.group, 1)
        seq = generate(params, prompts, a_len, shape, sample_gens, config.temperature)
        rewards = task.reward(seq[:, :, p_len:], answers)
        signal = torch.stack([no_signal_rewards(r, g) if shuffled else r
                              for r, g, shuffled in zip(rewards, shuffle_gens, no_signal)])
        advantages = group_advantages(signal, config.group)
        taken = seq[:, :, p_len:, None]
        with torch.no_grad():
            old = _answer_logp(params, seq, shape, p_len, config.temperature).gather(-1, taken)
            ref = (_answer_logp(start_ref, seq, shape, p_len, config.temperature)
                   if bool(kl_coefs.any()) else None)
        losses, clipped, kept = [], [], []
        size = config.prompts // config.minibatches * config.group
        for update in range(config.updates):
            part = slice(update % config.minibatches * size,
                         (update % config.minibatches + 1) * size)
            logp = _answer_logp(params, seq[:, part], shape, p_len, config.temperature)
            loss, clip_share = sampling_loss(logp.gather(-1, taken[:, part]).squeeze(-1),
                                             old[:, part].squeeze(-1), advantages[:, part],
                                             rewards[:, part], is_rft, config.clip)
            if ref is not None:
                loss = loss + kl_coefs * kl_to_reference(logp, ref[:, part]).mean(dim=(1, 2))
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            kept.append(tracked_step())
            losses.append(loss.detach())
            clipped.append(clip_share)
        return {"reward": rewards.mean(1).tolist(),
                "loss": torch.stack(losses).mean(0).tolist(),
                "clip_fraction": torch.stack(clipped).mean(0).tolist(), **kept_share(kept)}

    per_step = any(arm.mode != MASTER for arm in config.arms)

    def tracked_step() -> Tensor | None:
        """``opt.step()``; returns per run the share of weights whose stored bits it left
        identical (a copy of the bits before it: 2 bytes per weight), or None where the
        design does not log it."""
        if not per_step:
            opt.step()
            return None
        before = stored_bits(params, image)
        opt.step()
        return unchanged_fraction(params, before, image)

    def kept_share(kept: list[Tensor | None]) -> dict[str, Any]:
        return {"step_unchanged": torch.stack(kept).mean(0).tolist()} if per_step else {}

    sft_gens = gens("sft")

    def sft_iteration() -> dict[str, Any]:
        losses, kept = [], []
        for _ in range(config.updates):
            prompts, answers = draw(sft_gens, batch // config.minibatches)
            answers = torch.where(teacher[:, None, None], task.reverse(answers), answers)
            seq = torch.cat([prompts, answers], dim=2)
            logp = _answer_logp(params, seq, shape, p_len)
            loss = -logp.gather(-1, answers[..., None]).mean(dim=(1, 2, 3))
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            kept.append(tracked_step())
            losses.append(loss.detach())
        return {"loss": torch.stack(losses).mean(0).tolist(), **kept_share(kept)}

    def curve_point() -> dict[str, Any]:
        detached = {n: p.detach() for n, p in params.items()}
        correct, reversed_part = correct_probability(detached, task, shape, *curve_problems,
                                                     temperature=config.temperature)
        point: dict[str, Any] = {
            "curve_kl": fixed_sample_kl(detached, kl_samples, start_logp, shape, p_len,
                                        config.temperature).tolist(),
            "curve_unchanged": unchanged_fraction(detached, start_bits, image).tolist(),
            "curve_sampled_accuracy": correct.mean(1).tolist(),
            "curve_sampled_reversed": (reversed_part.sum(1) / correct.sum(1)).tolist(),
        }
        geometry = [curve_geometry(config, start,
                                    {n: t[a].cpu() for n, t in detached.items()},
                                    {n: opt.state[p]["master"][a].cpu()
                                     for n, p in params.items()} if has_master else None,
                                    image)
                    for a in range(n_runs)]
        for key in CURVE_GEOMETRY:
            point[key] = [g[key] for g in geometry]
        return point

    def start_point() -> dict[str, Any]:
        """The curves' values at step 0 (the start itself)."""
        weights = _stack(start.weights, 1, torch.float32, device)
        correct, reversed_part = correct_probability(weights, task, shape, *curve_problems,
                                                     temperature=config.temperature)
        return {"curve_step": 0, "curve_kl": 0.0, "curve_unchanged": 1.0,
                "curve_sampled_accuracy": float(correct.mean()),
                "curve_sampled_reversed": float(reversed_part.sum() / correct.sum()),
                "curve_matched_lift": None, "curve_master_matched_lift": None,
                "curve_angle": 0.0, "curve_drift": 0.0}

    def step() -> dict[str, Any]:
        out = sample_iteration() if family == "sample" else sft_iteration()
        done_steps = (state["step"] + 1) * config.updates
        if done_steps % config.log_every == 0 or done_steps == config.steps:
            out.update(curve_step=done_steps, **curve_point())
        return out

    def save() -> dict:
        return {"params": {n: p.detach() for n, p in params.items()},
                "optimizer": opt.state_dict(),
                "generators": {what: [g.get_state() for g in gs] for what, gs in
                               (("prompts", prompt_gens), ("sample", sample_gens),
                                ("shuffle", shuffle_gens), ("sft", sft_gens))}}

    def load(ckpt: dict) -> None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ckpt["params"][n])
        opt.load_state_dict(ckpt["optimizer"])
        for what, gs in (("prompts", prompt_gens), ("sample", sample_gens),
                         ("shuffle", shuffle_gens), ("sft", sft_gens)):
            for g, s in zip(gs, ckpt["generators"][what]):
                g.set_state(s)

    state: dict[str, Any] = {"step": 0, "series": defaultdict(list), "wall_s": 0.0}
    bar.set_postfix_str(name)
    drive(name, workspace, iterations, max(1, config.checkpoint_every // config.updates), budget,
          bar, state, step, save, load)
    results = _measure(config, task, shape, start, runs, params, opt, trained, state, workspace)
    first = start_point()
    for r in results:
        r["curve_start"] = first
    workspace.save_result(name, {"runs": results})
    return results


def _slug(mode: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in mode.lower())
    return "-".join(p for p in slug.split("-") if p)


def _mean_if_whole(values: list[float], iterations: int) -> float | None:
    """The mean of a per-iteration series, or None when it misses iterations (a run resumed
    from checkpoints of a version that did not log it)."""
    return sum(values) / len(values) if values and len(values) == iterations else None


def _tail_mean(values: list[float], share: float = 0.1) -> float:
    n = max(1, int(round(share * len(values))))
    return sum(values[-n:]) / n


def _measure(config: LMAblation, task: AdditionTask, shape: LMShape, start: Start,
             runs: list[tuple[Arm, int]], params: dict[str, Tensor], opt: AdamW,
             trained: dict[str, Tensor], state: dict, workspace: Workspace) -> list[dict]:
    """End-of-run measures per run; writes each run's ``final.safetensors`` (its stored
    weights: bf16, float16, or fp32 for the control) and, with an fp32 master,
    ``master.safetensors``. ``trained``: the cohort's freeze masks. Changed and unchanged
    weights are counted on the stored bits (float16 runs: against the start's float16
    image)."""
    detached = {n: p.detach() for n, p in params.items()}
    device = next(iter(detached.values())).device
    _, held_ids = task.split(config.held_out, config.split_seed)
    problems = tuple(t.to(device) for t in task.problems(held_ids[:config.eval_problems]))
    acc, rev = greedy_accuracy(detached, task, shape, *problems)
    correct, reversed_part = correct_probability(detached, task, shape, *problems,
                                                 temperature=config.temperature)
    start_facts = start_measures(config, task, shape, start, problems)
    has_master = opt.param_groups[0]["master_weights"] == "fp32"
    image = storage_dtype(runs[0][0].mode)
    kw = dict(alpha=config.alpha, rank=config.rank, bins=config.bins,
              base_cache=start.base_cache)
    results = []
    finals = []
    for a, (arm, seed) in enumerate(runs):
        run_name = f"{arm.name}-start{start.seed}-seed{seed}"
        folder = workspace.folder(run_name)
        final = {n: t[a].cpu().contiguous() for n, t in detached.items()}
        finals.append(final)
        files.write_safetensors(os.path.join(folder, "final.safetensors"), final)
        geometry = analysis.geometry(start.weights, final, image_dtype=image, **kw)
        master_geometry = None
        if has_master:
            master = {n: opt.state[p]["master"][a].cpu().contiguous() for n, p in params.items()}
            files.write_safetensors(os.path.join(folder, "master.safetensors"), master)
            master_geometry = analysis.geometry(start.weights, master, image_dtype=image,
                                                **kw)["overall"]
        sparsity = analysis.update_sparsity(start.weights, final, image_dtype=image)
        frozen = frozen_changed = 0
        for pname, mask in trained.items():
            held = ~mask[a]
            frozen += int(held.sum())
            frozen_changed += int((held & ~analysis.unchanged_bitwise(
                start.weights[pname], final[pname], image)).sum())
        series = {k: [v[a] for v in values] for k, values in state["series"].items()
                  if k != "curve_step"}
        series["curve_step"] = list(state["series"]["curve_step"])
        sampling = arm.family == "sample"
        results.append({
            "name": run_name, "arm": arm.name, "label": arm.label, "kind": arm.kind,
            "mode": arm.mode, "lr": arm.lr, "data": arm.data, "kl_coef": arm.kl_coef,
            "freeze": arm.freeze, "seed": seed, "start": start.seed, "steps": config.steps,
            "cohort_wall_s": state["wall_s"], "series": series,
            "accuracy_start": start_facts["accuracy"], "accuracy_end": float(acc[a]),
            "sampled_accuracy_start": start_facts["sampled_accuracy"],
            "sampled_accuracy_end": float(correct[a].mean()),
            "sampled_reversed_start": start_facts["sampled_reversed_share"],
            "sampled_reversed_end": float(reversed_part[a].sum() / correct[a].sum()),
            "reversed_share_end": float(rev[a]),
            "reward_first": _tail_mean(series["reward"][::-1]) if sampling else None,
            "reward_last": _tail_mean(series["reward"]) if sampling else None,
            "clipped_share": (sum(series["clip_fraction"]) / len(series["clip_fraction"])
                              if arm.kind in ("rl", "rl-no-signal") else None),
            "kl_final": series["curve_kl"][-1],
            "sparsity": sparsity["overall"], "modules": sparsity["modules"],
            "storage_bits": sparsity["bits"],
            "step_unchanged": _mean_if_whole(series.get("step_unchanged", []),
                                             len(series["loss"])),
            "geometry": geometry["overall"], "master_geometry": master_geometry,
            "frozen_share": frozen / sparsity["overall"]["numel"],
            "frozen_changed": frozen_changed,
        })
    _seed_overlap(runs, start, finals, results, image)
    return results


def start_measures(config: LMAblation, task: AdditionTask, shape: LMShape, start: Start,
                   problems: tuple[Tensor, Tensor]) -> dict[str, float]:
    """Greedy and exact sampled accuracy of a start on the ``eval_problems`` (computed once)."""
    if not start.measured:
        weights = _stack(start.weights, 1, torch.float32, problems[0].device)
        acc, rev = greedy_accuracy(weights, task, shape, *problems)
        correct, reversed_part = correct_probability(weights, task, shape, *problems,
                                                     temperature=config.temperature)
        start.measured = {"accuracy": float(acc[0]), "reversed_share": float(rev[0]),
                          "sampled_accuracy": float(correct.mean()),
                          "sampled_reversed_share": float(reversed_part.sum() / correct.sum())}
    return start.measured


def _seed_overlap(runs: list[tuple[Arm, int]], start: Start, finals: list[dict[str, Tensor]],
                  results: list[dict], image: torch.dtype = torch.bfloat16) -> None:
    """Per run, how far its changed weights coincide with those of the same arm's other seeds
    (same start): the mean over the other seeds of the Jaccard index of the two bf16 update
    masks, and of the same divided by the Jaccard two independent masks of those densities
    would have (1: no more overlap than chance)."""
    changed = [{n: ~analysis.unchanged_bitwise(start.weights[n], f[n], image) for n in f}
               for f in finals]
    numel = sum(t.numel() for t in start.weights.values())
    by_arm: dict[str, list[int]] = defaultdict(list)
    for a, (arm, _) in enumerate(runs):
        by_arm[arm.name].append(a)
    for members in by_arm.values():
        pairs: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for a, b in itertools.combinations(members, 2):
            inter = sum(int((changed[a][n] & changed[b][n]).sum()) for n in changed[a])
            union = sum(int((changed[a][n] | changed[b][n]).sum()) for n in changed[a])
            da = sum(int(m.sum()) for m in changed[a].values()) / numel
            db = sum(int(m.sum()) for m in changed[b].values()) / numel
            chance = da * db / (da + db - da * db) if da + db > 0 else float("nan")
            jac = inter / union if union else float("nan")
            for x in (a, b):
                pairs[x].append((jac, jac / chance if chance else float("nan")))
        for a in members:
            got = pairs.get(a, [])
            results[a]["seed_jaccard"] = sum(j for j, _ in got) / len(got) if got else None
            results[a]["seed_jaccard_lift"] = sum(r for _, r in got) / len(got) if got else None
