"""The LM ablation's outputs: ``report.md``, ``results.json``, ``series.json`` and PNG plots.

Every cell is a mean over runs (every start and seed of an arm) with its spread, the sample
standard deviation (``mean ± std``). Every verdict comes from a stated t test
(:mod:`rlvr_optim.ablation.stats`): arms are compared run against run, paired by start and
seed (they share prompts and first rollouts), a value against a fixed one by the one-sample
t; p-values are two-sided, and Holm's correction over all rows of the claims table is shown
beside them. Everything here is derived from the runs' saved results, so a report can be
rebuilt from the checkpoint folder (``--resume``) without training again.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import analysis, files
from ..optimizer import format_table
from . import stats
from .config import (FP16_MASTER, FP16_NEAREST, MASTER, NEAREST, STOCHASTIC, STORAGE_MODES,
                     LMAblation)
from .curves import curve_gain, read_at_gain, read_at_kl
from .report import PAPER_TABLE1
from .task import AdditionTask

__all__ = ["SPREAD_NOTE", "claims", "cpu_facts", "format_lm_summary",
           "matched_targets", "out_of_reach", "spread", "write_lm_report"]

SPREAD_NOTE = "mean ± std over runs (sample standard deviation, n - 1)"
ALPHA = 0.05


def spread(values: Sequence[float | None]) -> tuple[float, float, int]:
    """``(mean, sample std, n)`` of the values that are not None (std nan for n < 2)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    if not n:
        return float("nan"), float("nan"), 0
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return mean, std, n


def _scaled(spec: str) -> tuple[float, str, str]:
    if spec.endswith("%"):
        return 100.0, spec[:-1] + "f", "%"
    return 1.0, spec, ""


def _cell(values: Sequence[float | None], spec: str) -> str:
    mean, std, n = spread(values)
    if not n:
        return "-"
    scale, spec, suffix = _scaled(spec)
    text = f"{format(scale * mean, spec)}{suffix}"
    if n > 1:
        text += f" ± {format(scale * std, spec.lstrip('+'))}{suffix}"
    if n < len(values):
        text += f" ({n} of {len(values)})"
    return text


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation between order statistics)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


# --------------------------------------------------------------------------- runs and arms


def _key(run: Mapping) -> tuple[int, int]:
    return run["start"], run["seed"]


def _group(results: Sequence[dict]) -> dict[str, list[dict]]:
    """Runs by arm, arms in first-seen order, runs by (start, seed)."""
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(r["arm"], []).append(r)
    return {k: sorted(v, key=_key) for k, v in out.items()}


def _find(arms: Mapping[str, list[dict]], **match: Any) -> list[dict] | None:
    for runs in arms.values():
        if all(runs[0].get(k) == v for k, v in match.items()):
            return runs
    return None


def _gain(run: Mapping) -> float:
    return run["sampled_accuracy_end"] - run["sampled_accuracy_start"]


def _reward_gain(run: Mapping) -> float | None:
    if run["reward_first"] is None:
        return None
    return run["reward_last"] - run["reward_first"]


def _unchanged(run: Mapping) -> float:
    return run["sparsity"]["sparsity"]


def _step_unchanged(run: Mapping) -> float | None:
    """Mean over the run's steps of the share of weights a step left bit-identical (None for
    runs made before it was logged)."""
    return run.get("step_unchanged")



def _geo(key: str, master: bool = False) -> Callable[[Mapping], float | None]:
    def get(run: Mapping) -> float | None:
        source = run["master_geometry"] if master else run["geometry"]
        value = (source or {}).get(key)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) \
            else value
    return get


def _values(runs: Sequence[dict], get: Callable[[dict], float | None]) -> list[float | None]:
    return [get(r) for r in runs]


class Headline:
    """The arms the report compares, found by their settings (None where a preset lacks one)."""

    def __init__(self, arms: Mapping[str, list[dict]]) -> None:
        self.rl = _find(arms, kind="rl", mode=MASTER, freeze=None, kl_coef=0.0)
        lr = self.rl[0]["lr"] if self.rl else None
        self.lr = lr
        self.null = _find(arms, kind="rl-no-signal", mode=MASTER, freeze=None, lr=lr)
        self.rft = _find(arms, kind="rft", mode=MASTER, lr=lr)
        self.own = _find(arms, kind="sft", mode=MASTER, data="own", lr=lr)
        self.teacher = _find(arms, kind="sft", mode=MASTER, data="teacher", lr=lr)
        self.own_10x = (_find(arms, kind="sft", mode=MASTER, data="own", lr=10 * lr)
                        if lr is not None else None)
        self.rl_modes = {m: _find(arms, kind="rl", mode=m, freeze=None, kl_coef=0.0, lr=lr)
                         for m in STORAGE_MODES}
        self.own_modes = {m: _find(arms, kind="sft", mode=m, data="own", lr=lr)
                          for m in STORAGE_MODES}
        self.frozen = {runs[0]["freeze"]: runs for runs in arms.values()
                       if runs[0]["freeze"] is not None}

    def named(self) -> list[tuple[str, list[dict]]]:
        """The fp32-master arms at the headline lr that train every weight, with short names."""
        out = [("RL", self.rl), ("RL no-signal", self.null), ("RFT", self.rft),
               ("SFT own", self.own), ("SFT teacher", self.teacher)]
        return [(n, r) for n, r in out if r]


# --------------------------------------------------------------------------- tests


def _by_key(runs: Sequence[dict], get: Callable[[dict], float | None]) -> dict:
    return {_key(r): get(r) for r in runs}


def compare(a: Mapping[tuple, float | None], b: Mapping[tuple, float | None] | float,
            paired: bool = True) -> stats.Test:
    """The t test of ``a - b``: one-sample when ``b`` is a number, paired by key when
    ``paired`` (keys where both have a value), else Welch's."""
    xs = {k: v for k, v in a.items() if v is not None and not math.isnan(v)}
    if isinstance(b, (int, float)):
        return stats.one_sample_t(list(xs.values()), float(b))
    ys = {k: v for k, v in b.items() if v is not None and not math.isnan(v)}
    if paired:
        keys = sorted(set(xs) & set(ys))
        return stats.paired_t([xs[k] for k in keys], [ys[k] for k in keys])
    return stats.welch_t(list(xs.values()), list(ys.values()))


@dataclasses.dataclass
class Claim:
    """One row of the claims table."""

    group: str
    claim: str
    evidence: str
    test: stats.Test
    expect: str
    verdict: str
    p_holm: float = float("nan")
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.test.interval()
        return {"group": self.group, "claim": self.claim, "evidence": self.evidence,
                "test": self.test.name, "n": self.test.n_a, "difference": self.test.diff,
                "ci95": [lo, hi], "t": self.test.t, "df": self.test.df, "p": self.test.p,
                "p_holm": self.p_holm, "expect": self.expect, "verdict": self.verdict,
                "verdict_holm": self.verdict_holm, "note": self.note}

    @property
    def verdict_holm(self) -> str:
        if math.isnan(self.p_holm) or self.p_holm >= ALPHA:
            return "cannot say"
        return self.verdict


def _text(values: Sequence[float | None], fmt: str) -> str:
    return _cell(list(values), fmt)


def _claim(group: str, claim: str, a_name: str, a: Mapping, b_name: str | None,
           b: Mapping | float, expect: str, fmt: str, note: str = "") -> Claim:
    test = compare(a, b)

    def text(name: str, values: Mapping) -> str:
        if all(v is None for v in values.values()):
            return f"{name}: no run reached it"
        return f"{name} {_text(list(values.values()), fmt)}"

    if isinstance(b, (int, float)):
        evidence = f"{text(a_name, a)} vs {b:g}"
    else:
        evidence = f"{text(a_name, a)} vs {text(b_name or '', b)}"
    return Claim(group, claim, evidence, test, expect, stats.verdict(test, expect, ALPHA),
                 note=note)


# --------------------------------------------------------------------------- matched readings


def matched_targets(head: Headline) -> dict[str, float | None]:
    """The common KL and the common held-out sampled-accuracy gain at which arms are read.

    KL: the smallest, over the headline arms, of the 20% quantile of their runs' final KL,
    so at least 80% of every headline arm's runs reach it. Gain: the same over the arms whose
    median final gain is positive (RL, RFT, SFT own in practice); None when none gains.
    """
    named = head.named()
    kl = min(quantile([r["series"]["curve_kl"][-1] for r in runs], 0.2) for _, runs in named)
    gains = [quantile([curve_gain(r)[-1] for r in runs], 0.2) for _, runs in named
             if quantile([curve_gain(r)[-1] for r in runs], 0.5) > 0]
    gain = min(gains) if gains and min(gains) > 0 else None
    return {"kl": kl, "gain": gain}


MATCHED_MEASURES = (
    ("unchanged", "curve_unchanged", ".2%", "bf16 weights unchanged"),
    ("matched_lift", "curve_matched_lift", ".3f", "changed & principal, matched lift"),
    ("master_matched_lift", "curve_master_matched_lift", ".3f",
     "fp32 master top-20% & principal, matched lift"),
    ("angle", "curve_angle", ".3f", "largest principal angle, top-k (deg)"),
    ("drift", "curve_drift", ".2e", "spectrum drift"),
)


# --------------------------------------------------------------------------- claims


def claims(config: LMAblation, arms: Mapping[str, list[dict]]) -> list[Claim]:
    """Every row of the claims table: the paper's claims, then this ablation's controls."""
    head = Headline(arms)
    if not head.rl:
        return []
    out: list[Claim] = []
    targets = matched_targets(head)
    kl_t, gain_t = targets["kl"], targets["gain"]

    def at_kl(runs: list[dict], key: str) -> dict:
        return {_key(r): read_at_kl(r, key, kl_t) for r in runs}

    def at_gain(runs: list[dict], key: str) -> dict:
        return {_key(r): read_at_gain(r, key, gain_t) for r in runs} if gain_t else {}

    end_unchanged = lambda runs: _by_key(runs, _unchanged)  # noqa: E731
    rl = head.rl
    paper = "paper"
    # Learning: the premise of every comparison below, pooled and at every start.
    if head.null:
        out.append(_claim("premise", "RL learns: its held-out sampled accuracy gains more than "
                          "the no-signal control's (all starts)", "RL", _by_key(rl, _gain),
                          "no-signal", _by_key(head.null, _gain), ">", "+.3f"))
    for s in sorted({r["start"] for r in rl}):
        def of(runs: list[dict] | None, get) -> dict:
            return _by_key([r for r in runs or [] if r["start"] == s], get)
        if head.null:
            out.append(_claim("premise", f"RL learns from start {s}: its held-out sampled "
                              "accuracy gains more than the no-signal control's",
                              "RL", of(rl, _gain), "no-signal", of(head.null, _gain), ">",
                              "+.3f"))
            out.append(_claim("premise", f"... and its reward (last minus first 10% of "
                              f"rollouts) rises more than the control's, start {s}",
                              "RL", of(rl, _reward_gain), "no-signal",
                              of(head.null, _reward_gain), ">", "+.3f"))
    for name, sft in (("own", head.own), ("teacher", head.teacher)):
        if not sft:
            continue
        out.append(_claim(paper, f"Table 1: RL leaves more bf16 weights unchanged than SFT "
                          f"{name} (same lr and steps)", "RL", end_unchanged(rl),
                          f"SFT {name}", end_unchanged(sft), ">", ".2%"))
        out.append(_claim(paper, f"... at matched KL ({kl_t:.3g}), vs SFT {name}", "RL",
                          at_kl(rl, "curve_unchanged"), f"SFT {name}",
                          at_kl(sft, "curve_unchanged"), ">", ".2%"))
        if gain_t:
            out.append(_claim(paper, f"... at matched gain ({gain_t:+.3f} sampled accuracy), "
                              f"vs SFT {name}", "RL", at_gain(rl, "curve_unchanged"),
                              f"SFT {name}", at_gain(sft, "curve_unchanged"), ">", ".2%"))
    lo, hi = PAPER_TABLE1["rl"]
    out.append(_claim(paper, f"Table 1's size: RL keeps at least {lo:.0%} of bf16 weights "
                      "unchanged", "RL", end_unchanged(rl), None, lo, ">", ".2%",
                      note="scale: a 28k-weight model, 160 steps"))
    if head.own_10x:
        out.append(_claim(paper, "The paper's lr pair (SFT at 10x RL's lr): RL leaves more "
                          "weights unchanged", "RL", end_unchanged(rl), "SFT own 10x lr",
                          end_unchanged(head.own_10x), ">", ".2%"))
    for what, modes in (("RL", head.rl_modes), ("SFT own", head.own_modes)):
        if modes[NEAREST]:
            out.append(_claim(paper, f"Gate III: bf16 storage hides sub-ULP updates ({what} "
                              "in bf16 nearest keeps more unchanged than with an fp32 master)",
                              "nearest", end_unchanged(modes[NEAREST]), "fp32 master",
                              end_unchanged(modes[MASTER]), ">", ".2%"))
        if modes[NEAREST] and modes[STOCHASTIC]:
            out.append(_claim(paper, f"... and stochastic rounding lets them through ({what} "
                              "in bf16 stochastic keeps fewer unchanged than nearest)",
                              "stochastic", end_unchanged(modes[STOCHASTIC]), "nearest",
                              end_unchanged(modes[NEAREST]), "<", ".2%"))
    out += _fp16_claims(head)
    if gain_t:
        for name, sft in (("own", head.own),):
            if sft:
                out.append(_claim(paper, "Gate I (KL anchor): RL reaches the same gain with "
                                  f"less KL to its start than SFT {name}", "RL",
                                  at_gain(rl, "curve_kl"), f"SFT {name}",
                                  at_gain(sft, "curve_kl"), "<", ".2e"))
    for name, sft in (("own", head.own), ("teacher", head.teacher)):
        if sft:
            out.append(_claim(paper, f"SFT lags RL: at matched KL RL has gained more held-out "
                              f"sampled accuracy than SFT {name}", "RL", at_kl(rl, "gain"),
                              f"SFT {name}", at_kl(sft, "gain"), ">", "+.3f"))
    out.append(_claim(paper, "RL updates off the principal weights (bf16 changed mask, "
                      "magnitude-matched lift below 1)", "RL",
                      _by_key(rl, _geo("changed_in_principal_matched_lift")), None, 1.0, "<",
                      ".3f"))
    if rl[0]["master_geometry"]:
        out.append(_claim(paper, "... on fp32 master deltas (top 20% of |delta|, matched lift "
                          "below 1)", "RL", _by_key(rl, _geo("top_in_principal_matched_lift",
                                                             True)), None, 1.0, "<", ".3f"))
    for name, sft in (("own", head.own), ("teacher", head.teacher)):
        if not sft:
            continue
        out.append(_claim(paper, f"SFT targets principal weights (SFT {name}, fp32 master "
                          "deltas, matched lift above 1)", f"SFT {name}",
                          _by_key(sft, _geo("top_in_principal_matched_lift", True)), None, 1.0,
                          ">", ".3f"))
        out.append(_claim(paper, f"RL is less on principal weights than SFT {name} (fp32 "
                          "master deltas, matched lift)", "RL",
                          _by_key(rl, _geo("top_in_principal_matched_lift", True)),
                          f"SFT {name}", _by_key(sft, _geo("top_in_principal_matched_lift",
                                                            True)), "<", ".3f"))
        out.append(_claim(paper, f"... at matched KL (bf16 changed mask), vs SFT {name}", "RL",
                          at_kl(rl, "curve_matched_lift"), f"SFT {name}",
                          at_kl(sft, "curve_matched_lift"), "<", ".3f"))
        out.append(_claim(paper, f"RL drifts the spectrum less than SFT {name} (fp32 master, "
                          "per unit of update size)", "RL",
                          _by_key(rl, _geo("drift_per_update", True)), f"SFT {name}",
                          _by_key(sft, _geo("drift_per_update", True)), "<", ".3f"))
        out.append(_claim(paper, f"... at matched KL, vs SFT {name}", "RL",
                          at_kl(rl, "curve_drift"), f"SFT {name}", at_kl(sft, "curve_drift"),
                          "<", ".2e"))
        out.append(_claim(paper, f"RL rotates the top-k subspaces less than SFT {name} (fp32 "
                          "master, largest angle per unit of update size)", "RL",
                          _by_key(rl, _geo("angle_left_per_update", True)), f"SFT {name}",
                          _by_key(sft, _geo("angle_left_per_update", True)), "<", ".3g"))
        out.append(_claim(paper, f"... at matched KL (largest angle), vs SFT {name}", "RL",
                          at_kl(rl, "curve_angle"), f"SFT {name}", at_kl(sft, "curve_angle"),
                          "<", ".3f"))
    if head.null:
        out.append(_claim(paper, "Updates are consistent across runs: RL's changed weights "
                          "coincide across seeds more than the no-signal control's (Jaccard "
                          "over its chance value, mean over seed pairs, paired by start)", "RL",
                          _seed_overlap(rl), "no-signal", _seed_overlap(head.null), ">",
                          ".3f"))
    frozen = head.frozen
    for other in ("non_principal", "random"):
        if "principal" in frozen and other in frozen:
            what = ("their complement" if other == "non_principal"
                    else "a random set of that size")
            out.append(_claim(paper, "Freezing: RL with the principal weights frozen gains "
                              f"more held-out sampled accuracy than with {what} frozen",
                              "principal frozen", _by_key(frozen["principal"], _gain),
                              f"{other.replace('_', '-')} frozen", _by_key(frozen[other], _gain),
                              ">", "+.3f",
                              note=("the complement is four times the principal mask: sizes "
                                    "differ" if other == "non_principal" else "same sizes")))
    ours = "beyond the paper"
    if head.null:
        out.append(_claim(ours, "RL's sparsity is not what its noise does alone: RL leaves "
                          "more weights unchanged than the no-signal control at matched KL",
                          "RL", at_kl(rl, "curve_unchanged"), "no-signal",
                          at_kl(head.null, "curve_unchanged"), ">", ".2%"))
    if head.rft:
        out.append(_claim(ours, "The RL objective, not on-policy data, keeps weights "
                          "unchanged: RL leaves more unchanged than RFT (SFT on its own correct "
                          "samples) at matched KL", "RL", at_kl(rl, "curve_unchanged"), "RFT",
                          at_kl(head.rft, "curve_unchanged"), ">", ".2%"))
        if head.own:
            out.append(_claim(ours, "On-policy data keeps weights unchanged: RFT leaves more "
                              "unchanged than SFT own at matched KL", "RFT",
                              at_kl(head.rft, "curve_unchanged"), "SFT own",
                              at_kl(head.own, "curve_unchanged"), ">", ".2%"))
    if head.own and head.teacher:
        out.append(_claim(ours, "Off-policy data moves more weights: SFT teacher leaves fewer "
                          "unchanged than SFT own at matched KL", "SFT teacher",
                          at_kl(head.teacher, "curve_unchanged"), "SFT own",
                          at_kl(head.own, "curve_unchanged"), "<", ".2%"))
    adjusted = stats.holm([c.test.p for c in out])
    for c, p in zip(out, adjusted):
        c.p_holm = p
    return out


FP16_GROUP = "float16 filter"


def _fp16_claims(head: Headline) -> list[Claim]:
    """What the float16 storage filter (8x finer than bf16's) changes, where the preset has
    float16 arms: per-step and end-of-run bit identity against the bf16 twins, the master's
    effect, and whether RL stays sparser than SFT under the finer filter (the paper's
    Table 1 with float16 checkpoints)."""
    out: list[Claim] = []
    per_step = lambda runs: _by_key(runs, _step_unchanged)  # noqa: E731
    end = lambda runs: _by_key(runs, _unchanged)  # noqa: E731
    for what, modes in (("RL", head.rl_modes), ("SFT own", head.own_modes)):
        for fp16, bf16, label in ((FP16_NEAREST, NEAREST, "nearest"),
                                  (FP16_MASTER, MASTER, "fp32 master")):
            if not (modes[fp16] and modes[bf16]):
                continue
            out.append(_claim(FP16_GROUP, f"The finer filter lets more updates through: a "
                              f"{what} step leaves fewer weights bit-identical in float16 than "
                              f"in bf16 ({label})", "fp16", per_step(modes[fp16]), "bf16",
                              per_step(modes[bf16]), "<", ".2%"))
            out.append(_claim(FP16_GROUP, f"... and after the run fewer {what} weights are "
                              f"unchanged from the start in float16 than in bf16 ({label})",
                              "fp16", end(modes[fp16]), "bf16", end(modes[bf16]), "<", ".2%"))
        if modes[FP16_NEAREST] and modes[FP16_MASTER]:
            out.append(_claim(FP16_GROUP, f"Gate III in float16: {what} in fp16 nearest keeps "
                              "more weights unchanged than with an fp32 master",
                              "fp16 nearest", end(modes[FP16_NEAREST]), "fp16 + master",
                              end(modes[FP16_MASTER]), ">", ".2%"))
    for mode in (FP16_NEAREST, FP16_MASTER):
        rl, own = head.rl_modes[mode], head.own_modes[mode]
        if rl and own:
            out.append(_claim(FP16_GROUP, f"Table 1 in float16: RL leaves more weights unchanged "
                              f"than SFT own ({mode})", "RL", end(rl), "SFT own", end(own), ">",
                              ".2%"))
    return out


def _seed_overlap(runs: Sequence[dict]) -> dict[tuple, float | None]:
    """Per start (key ``(start, 0)``): the mean over its runs of their cross-seed Jaccard lift
    (one value per start: seeds of one start are not independent in this measure)."""
    out: dict[tuple, float | None] = {}
    for s in sorted({r["start"] for r in runs}):
        values = [r.get("seed_jaccard_lift") for r in runs if r["start"] == s]
        mean, _, n = spread(values)
        out[(s, 0)] = mean if n else None
    return out


# --------------------------------------------------------------------------- the report


def cpu_facts() -> dict[str, str]:
    """The CPU kernels torch dispatched to here, and whether the CPU has AVX-512."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return {"cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "(not set)"),
            "avx512f_in_cpu_flags": ("yes" if " avx512f" in flags else "no") if flags
            else "unknown (no /proc/cpuinfo)"}


def _environment(config: LMAblation) -> dict[str, str]:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "machine": platform.machine(),
           "torch threads in the runs": str(config.threads or torch.get_num_threads())}
    env.update(cpu_facts())
    if config.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _range(results: Sequence[dict], key: str, spec: str) -> str:
    values = sorted({r[key] for r in results})
    if not values:
        return "-"
    low, high = format(values[0], spec), format(values[-1], spec)
    return low if low == high else f"{low} to {high}"


def _setup(config: LMAblation, starts: Sequence[Any], results: Sequence[dict]) -> list[str]:
    task = AdditionTask(config.digits)
    d = config.digits
    spec = config.start_spec(config.starts[0])
    params = sum(t.numel() for t in starts[0].weights.values())
    rollout = config.prompts * config.group
    per_step = rollout // config.minibatches
    lines = [
        f"- Model: a Llama-style causal LM (RMSNorm, SiLU-gated MLP, learned positions), "
        f"{params:,} parameters (hidden {config.hidden}, {config.layers} layers, "
        f"{config.heads} heads, MLP {config.intermediate}), {task.vocab_size} tokens. Weights "
        "stored as each mode dictates, forward and backward in fp32 (weights upcast at use).",
        f"- Task: {d}-digit addition with two correct answers per prompt: `<bos>{'1' * d}+"
        f"{'2' * d}=` -> `{'0' + '3' * d}<eos>` (forward) or `{'3' * d + '0'}<eos>` "
        f"(reversed); reward 1 when the whole answer is exact in either format. "
        f"{config.held_out} problems are held out (no start or run trains on them).",
        f"- Starts ({len(starts)}): warm-ups of {spec.steps} fp32 cross-entropy steps (lr "
        f"{spec.lr:g}, linear ramp over 5%, cosine decay to 0, batch {spec.batch}), "
        f"{spec.reversed:.0%} of answers reversed and each answer digit replaced by a random "
        f"digit with probability {spec.noise:g}. Their bf16 images: greedy accuracy "
        f"{_range(results, 'accuracy_start', '.1%')}, sampled accuracy "
        f"{_range(results, 'sampled_accuracy_start', '.1%')} at temperature "
        f"{config.temperature:g}, of which {_range(results, 'sampled_reversed_start', '.1%')} "
        "in the reversed format (where each start comes from: the table below).",
        f"- RL: GRPO-style. A rollout: {config.prompts} prompts x {config.group} samples at "
        f"temperature {config.temperature:g}, advantages normalised within each prompt's group; "
        f"{config.updates} optimizer steps per rollout, over {config.minibatches} minibatches "
        f"of {per_step} samples, {config.updates // config.minibatches} epochs (OpenAI "
        "baselines' PPO2 defaults are 4 epochs over 4 minibatches), ratio to the rollout "
        f"policy clipped at 1 ± {config.clip:g}; {config.steps // config.updates} rollouts, "
        f"{config.steps} optimizer steps per run. No KL term.",
        "- RL no-signal: the same, with each rollout's rewards permuted across its samples "
        "before the advantages: the same reward counts on random samples, so the expected "
        "advantage of every sample is 0 (the control that shows what noise alone does).",
        "- RFT: cross-entropy on the rollout's own correct samples (rejection-sampling "
        "fine-tuning), same rollouts, minibatches and steps as RL.",
        f"- SFT: cross-entropy on {per_step} fresh problems per step, answers forward (\"own\": "
        "the start's majority format) or reversed (\"teacher\": its minority format, i.e. "
        "off-policy data); same steps.",
        f"- Optimizer: rlvr_optim.AdamW, betas (0.9, 0.999), eps 1e-8, weight decay "
        f"{config.weight_decay:g}, constant lr. Seeds {list(config.seeds)} from each start "
        "(prompts, sampling, shuffles, SFT problems; arms of one start and seed see the same "
        "prompts and the same first rollout).",
        f"- Headline mode: {MASTER} (fp32 master weights, bf16 weights and checkpoints, as "
        f"verl-style trainers run); {NEAREST} and {STOCHASTIC} (no master) are the "
        "storage-filter contrasts."
        + (f" {FP16_NEAREST} and {FP16_MASTER}: float16 weights (the start's float16 image), "
           "rounded to nearest, without and with an fp32 master, bf16 moments as in the bf16 "
           "modes; their changes are counted on their float16 bits."
           if any(r["mode"] in (FP16_NEAREST, FP16_MASTER) for r in results) else ""),
        f"- Measures: \"sampled accuracy\" is the exact chance that a sample at the rollout "
        f"temperature is correct (forward plus reversed answer probability, teacher-forced), "
        f"averaged over {config.eval_problems} held-out problems ({config.curve_problems} on "
        "the curves): no sampling noise. Greedy accuracy beside it. KL: KL(start || run) per "
        f"answer token on {config.kl_samples} fixed samples of each start.",
        f"- Statistics: {SPREAD_NOTE}; tests are two-sided t tests (paired by start and seed "
        "unless said otherwise, t quantiles for 95% intervals), a verdict needs p < 0.05 "
        "(Holm-adjusted p beside it). Pooled tests count every start-and-seed pair as one "
        "observation: pairing removes each start's level, not a difference that depends on "
        "the start, so the per-start rows are the stricter reading where they exist.",
    ]
    return lines


def _start_table(starts: Sequence[Any], runs: Sequence[dict]) -> list[str]:
    rows = []
    for s in starts:
        first = next((r for r in runs if r["start"] == s.seed), None)
        digest = s.made["files"].get(f"start-{s.seed}.safetensors", "")
        rows.append({"start": s.seed,
                     "greedy": f"{first['accuracy_start']:.1%}" if first else "-",
                     "sampled": f"{first['sampled_accuracy_start']:.1%}" if first else "-",
                     "rev": f"{first['sampled_reversed_start']:.1%}" if first else "-",
                     "file": s.source, "sha": digest[:16]})
    return [analysis.markdown_table(rows, ["start", "greedy", "sampled", "rev", "file", "sha"],
                                    ["start", "greedy accuracy", "sampled accuracy",
                                     "reversed share of correct samples", "weights",
                                     "SHA-256 (first 16)"]), ""]


def _learning_section(config: LMAblation, head: Headline, claim_rows: Sequence[Claim]) -> list[str]:
    rows = []
    for s in sorted({r["start"] for r in head.rl}):
        for name, runs in head.named():
            mine = [r for r in runs if r["start"] == s]
            sampling = mine[0]["reward_first"] is not None
            rows.append({
                "start": s, "arm": name,
                "sacc": f"{100 * mine[0]['sampled_accuracy_start']:.1f}% -> "
                        + _cell(_values(mine, lambda r: r["sampled_accuracy_end"]), ".1%"),
                "gain": _cell(_values(mine, _gain), "+.1%"),
                "greedy": _cell(_values(mine, lambda r: r["accuracy_end"]), ".1%"),
                "reward": (_cell(_values(mine, lambda r: r["reward_first"]), ".3f") + " -> "
                           + _cell(_values(mine, lambda r: r["reward_last"]), ".3f"))
                if sampling else "-",
                "clip": _cell(_values(mine, lambda r: r["clipped_share"]), ".2e")
                if mine[0]["clipped_share"] is not None else "-",
                "rev": _cell(_values(mine, lambda r: r["sampled_reversed_end"]), ".1%"),
            })
    premise = [c for c in claim_rows if c.group == "premise"]
    lines = ["## Does RL learn? Every start, against the no-signal control", "",
             f"Per start, {len(config.seeds)} seeds per arm. Held-out sampled accuracy (exact, "
             f"at temperature {config.temperature:g}) at the start -> after {config.steps} "
             "steps; greedy accuracy after; reward: mean over the first -> last 10% of "
             "rollouts; clipped: share of answer tokens whose ratio left the clip range, over "
             "all updates; reversed: the reversed format's share of the correct samples' "
             "probability at the end.", "",
             analysis.markdown_table(rows, ["start", "arm", "sacc", "gain", "greedy", "reward",
                                            "clip", "rev"],
                                     ["start", "arm", "sampled accuracy", "gain", "greedy",
                                      "reward", "clipped", "reversed"]), "",
             "Tests (paired by seed within each start, df = seeds - 1):", ""]
    lines += [f"- {c.claim}: {c.evidence}; {c.test.describe()}: **{c.verdict}**."
              for c in premise]
    return lines + [""]


def _arms_section(config: LMAblation, arms: Mapping[str, list[dict]]) -> list[str]:
    rows = []
    for runs in arms.values():
        rows.append({
            "arm": runs[0]["label"], "n": len(runs),
            "unchanged": _cell(_values(runs, _unchanged), ".2%"),
            "kl": _cell(_values(runs, lambda r: r["kl_final"]), ".2e"),
            "gain": _cell(_values(runs, _gain), "+.1%"),
            "greedy": _cell(_values(runs, lambda r: r["accuracy_end"]), ".1%"),
            "reward": _cell(_values(runs, _reward_gain), "+.3f")
            if runs[0]["reward_first"] is not None else "-",
            "clip": _cell(_values(runs, lambda r: r["clipped_share"]), ".2e")
            if runs[0]["clipped_share"] is not None else "-",
        })
    return [f"## Every arm after {config.steps} steps", "",
            f"All starts and seeds pooled ({SPREAD_NOTE}). unchanged: bf16 bits equal to the "
            "start's (Table 1's measure); KL: to the start, per answer token; gain: held-out "
            "sampled accuracy, end minus start; reward gain: last minus first 10% of rollouts.",
            "", analysis.markdown_table(rows, ["arm", "n", "unchanged", "kl", "gain", "greedy",
                                               "reward", "clip"],
                                        ["arm", "runs", "unchanged", "KL to start",
                                         "sampled-accuracy gain", "greedy accuracy",
                                         "reward gain", "clipped"]), ""]


def _matched_section(config: LMAblation, head: Headline) -> list[str]:
    targets = matched_targets(head)
    lines = ["## Matched movement: the arms read at a common KL and a common gain", "",
             "Each run's logged curve (every "
             f"{config.log_every} steps and the start) is read where it first reaches the "
             "target, interpolating between the two logged points around it (in log KL). "
             f"Common KL: {targets['kl']:.3g} (the smallest 20% quantile of final KL over the "
             "headline arms). Common gain: "
             + (f"{targets['gain']:+.3f} held-out sampled accuracy (the smallest 20% quantile "
                "of final gain over the arms that gain)" if targets["gain"] else
                "none (no arm's median run gained)")
             + ". \"reached\": runs of the arm that reach the target; comparisons pair runs "
             "by start and seed where both reached it.", ""]
    for what, target, reader in (("KL", targets["kl"], read_at_kl),
                                 ("gain", targets["gain"], read_at_gain)):
        if target is None:
            continue
        rows = []
        for name, runs in head.named():
            row = {"arm": name}
            reached = None
            for short, key, fmt, _ in MATCHED_MEASURES:
                vals = [reader(r, key, target) for r in runs]
                row[short] = _cell(vals, fmt) if any(v is not None for v in vals) else "-"
                if short == "unchanged":
                    reached = sum(v is not None for v in vals)
            if what == "KL":
                vals = [reader(r, "gain", target) for r in runs]
                row["other"] = _cell(vals, "+.3f") if any(v is not None for v in vals) else "-"
            else:
                vals = [reader(r, "curve_kl", target) for r in runs]
                row["other"] = _cell(vals, ".2e") if any(v is not None for v in vals) else "-"
            row["reached"] = f"{reached} of {len(runs)}"
            rows.append(row)
        columns = ["arm", "reached"] + [m[0] for m in MATCHED_MEASURES] + ["other"]
        headers = ["arm", "reached"] + [m[3] for m in MATCHED_MEASURES] + [
            "sampled-accuracy gain" if what == "KL" else "KL to start"]
        label = (f"KL = {target:.3g}" if what == "KL" else f"gain = {target:+.3f}")
        lines += [f"At {label}:", "", analysis.markdown_table(rows, columns, headers), ""]
    return lines


def _overlap_section(config: LMAblation, arms: Mapping[str, list[dict]]) -> list[str]:
    rows = []
    for runs in arms.values():
        rows.append({
            "arm": runs[0]["label"],
            "density": _cell(_values(runs, _geo("changed_baseline")), ".2%"),
            "p_lift": _cell(_values(runs, _geo("changed_in_principal_lift")), ".2f"),
            "p_matched": _cell(_values(runs, _geo("changed_in_principal_matched_lift")), ".3f"),
            "pnl_matched": _cell(_values(runs, _geo("changed_in_principal_not_low_matched_lift")),
                                 ".3f"),
            "m_p_matched": _cell(_values(runs, _geo("top_in_principal_matched_lift", True)),
                                 ".3f"),
            "jac": _cell(_values(runs, lambda r: r.get("seed_jaccard_lift")), ".3f"),
        })
    return ["## Where the updates fall: principal weights, against a magnitude-matched null",
            "",
            f"Masks of each start's matrices: principal = top {config.alpha:g} of |rank-k "
            f"reconstruction| (k = {config.rank} of the smaller dimension), principal minus "
            f"low-magnitude = the paper's split. Lift = overlap / the update's density (1: "
            "placed at random); matched lift = overlap / the expected overlap of the update "
            f"mask permuted within {config.bins} bins of |W0| per matrix (a bf16 weight changes "
            "only past half a ULP, which grows with |W0|, so the plain lift confounds magnitude). "
            "fp32 master: the top 20% of |delta| of the master weights. Seeds: the Jaccard of two "
            "seeds' changed masks over its chance value, mean over seed pairs of one start.", "",
            analysis.markdown_table(rows, ["arm", "density", "p_lift", "p_matched",
                                           "pnl_matched", "m_p_matched", "jac"],
                                    ["arm", "changed", "& principal: lift", "matched lift",
                                     "& principal - low: matched lift",
                                     "fp32 master top: matched lift", "across seeds"]), ""]


def _spectrum_section(arms: Mapping[str, list[dict]]) -> list[str]:
    rows = []
    for runs in arms.values():
        rows.append({"arm": runs[0]["label"],
                     "size": _cell(_values(runs, _geo("update_norm")), ".2e"),
                     "drift": _cell(_values(runs, _geo("drift_per_update", True)), ".3f"),
                     "angle": _cell(_values(runs, _geo("angle_left_per_update", True)), ".3g"),
                     "b_drift": _cell(_values(runs, _geo("drift_per_update")), ".3f")})
    return ["## Spectrum drift and subspace rotation per unit of update size", "",
            "Means over weight matrices: update size ||W1 - W0|| / ||W0|| (bf16 weights), "
            "spectrum drift ||sigma(W1) - sigma(W0)|| / ||sigma(W0)|| and the largest principal "
            "angle between the top-k left singular subspaces, each divided by the matrix's "
            "update size, on the fp32 master weights (drift per update is at most 1: 1 = the "
            "update only rescales singular values); last column on the bf16 weights.", "",
            analysis.markdown_table(rows, ["arm", "size", "drift", "angle", "b_drift"],
                                    ["arm", "update size", "fp32 master: drift per update",
                                     "fp32 master: angle per update (deg)",
                                     "bf16: drift per update"]), ""]


def _freeze_section(head: Headline) -> list[str]:
    if not head.frozen or not head.rl:
        return []
    rows = []
    for name, runs in [("dense", head.rl)] + [(f"{k.replace('_', '-')} frozen", v)
                                              for k, v in head.frozen.items()]:
        rows.append({
            "arm": name,
            "frozen": _cell(_values(runs, lambda r: r.get("frozen_share", 0.0)), ".1%"),
            "moved": str(sum(r.get("frozen_changed", 0) for r in runs)),
            "gain": _cell(_values(runs, _gain), "+.1%"),
            "reward": _cell(_values(runs, _reward_gain), "+.3f"),
            "kl": _cell(_values(runs, lambda r: r["kl_final"]), ".2e"),
            "unchanged": _cell(_values(runs, _unchanged), ".2%")})
    return ["## Freezing: which weights does RL need?", "",
            "RL (fp32 master, same lr, starts and seeds) with a mask of its start's weights "
            "frozen through AdamW.set_freeze_mask: the principal mask, its complement, or a "
            "random mask of the principal mask's size per matrix, beside the dense run. "
            "\"frozen moved\": frozen weights whose bf16 bits differ from the start at the end, "
            "summed over runs (0 = the freeze held bit for bit).", "",
            analysis.markdown_table(rows, ["arm", "frozen", "moved", "gain", "reward", "kl",
                                           "unchanged"],
                                    ["arm", "frozen", "frozen moved", "sampled-accuracy gain",
                                     "reward gain", "KL to start", "unchanged"]), ""]


def _claims_section(claim_rows: Sequence[Claim]) -> list[str]:
    rows = []
    for c in claim_rows:
        lo, hi = c.test.interval()
        rows.append({"group": c.group, "claim": c.claim + (f" ({c.note})" if c.note else ""),
                     "evidence": c.evidence,
                     "test": f"{c.test.name}, n {c.test.n_a}",
                     "diff": (f"{c.test.diff:+.3g} [{lo:+.3g}, {hi:+.3g}]"
                              if not math.isnan(lo) else "n/a" if math.isnan(c.test.diff)
                              else f"{c.test.diff:+.3g}"),
                     "p": stats.format_p(c.test.p), "holm": stats.format_p(c.p_holm),
                     "verdict": f"**{c.verdict}**" + ("" if c.verdict_holm == c.verdict
                                                      else " (not after Holm)")})
    counts = {v: sum(c.verdict == v for c in claim_rows)
              for v in ("agrees", "does not", "cannot say")}
    return ["## Against the paper, claim by claim", "",
            "\"The Path Not Taken\" (arXiv 2511.08567): each row a claim of the paper or what "
            "its account predicts, then this ablation's premise and controls. Verdict: "
            "\"agrees\" / \"does not\" when a two-sided t test rejects no difference at p < 0.05 "
            "with / against the claim's sign, else \"cannot say\". Difference: first minus "
            "second, with its 95% interval (t quantiles). Multiple comparisons: "
            f"{len(claim_rows)} tests; at p < 0.05 about {0.05 * len(claim_rows):.1f} would "
            "reject by chance if no effect were real, so Holm's step-down adjusted p (family-wise "
            "error 0.05 over the whole table) is shown beside p, and a verdict that does not "
            f"survive it says so. Counts: {counts['agrees']} agree, {counts['does not']} do "
            f"not, {counts['cannot say']} cannot say.", "",
            analysis.markdown_table(rows, ["group", "claim", "evidence", "test", "diff", "p",
                                           "holm", "verdict"],
                                    ["", "claim", "ours (mean ± std)", "test", "difference "
                                     "[95% CI]", "p", "Holm p", "verdict"]), ""]


def out_of_reach(weights: Mapping[str, torch.Tensor], dtype: torch.dtype, lr: float) -> float:
    """Share of ``weights`` whose half ULP, stored in ``dtype`` (bf16 or float16), exceeds
    ``lr``: Adam moves a weight by about ``lr`` a step (exactly ``lr`` at the first), so
    rounded to nearest these stay put whatever the gradient says (a magnitude-only
    prediction of the nearest modes' unchanged share)."""
    x = torch.cat([t.reshape(-1) for t in weights.values()]).to(dtype).float().abs()
    mantissa, lowest = (7, -126) if dtype == torch.bfloat16 else (10, -14)
    exponent = torch.floor(torch.log2(x.clamp(min=2.0 ** lowest))).clamp(min=lowest)
    return float((torch.pow(2.0, exponent - mantissa - 1) > lr).double().mean())


def _precision_section(head: Headline, claim_rows: Sequence[Claim] = (),
                       starts: Sequence[Any] = ()) -> list[str]:
    rows = []
    for what, modes in (("RL", head.rl_modes), ("SFT own", head.own_modes)):
        for mode, runs in modes.items():
            if not runs:
                continue
            reach = "-"
            if mode in (NEAREST, FP16_NEAREST) and starts:
                dtype = torch.float16 if mode == FP16_NEAREST else torch.bfloat16
                reach = _cell([out_of_reach(s.weights, dtype, runs[0]["lr"]) for s in starts
                               if any(r["start"] == s.seed for r in runs)], ".2%")
            rows.append({"arm": what, "mode": mode, "reach": reach,
                         "step": _cell(_values(runs, _step_unchanged), ".2%"),
                         "unchanged": _cell(_values(runs, _unchanged), ".2%"),
                         "kl": _cell(_values(runs, lambda r: r["kl_final"]), ".2e"),
                         "gain": _cell(_values(runs, _gain), "+.1%")})
    if len(rows) <= 2:
        return []
    present = [m for m in STORAGE_MODES if head.rl_modes[m] or head.own_modes[m]]
    fp16 = [m for m in present if m in (FP16_NEAREST, FP16_MASTER)]
    lines = [f"## The storage filter: {', '.join(present)}", "",
             "The same arms, same lr, starts and seeds, with the weights kept only in bf16 "
             "(rounded to nearest, or stochastically) instead of beside an fp32 master"
             + (", or stored in float16 (8x finer: a float16 weight moves once its update "
                "reaches about 2**-12 of its magnitude, a bf16 one 2**-9), without and with an "
                "fp32 master" if fp16 else "")
             + ". Bit-identical per step: the share of weights whose stored bits (bf16, or "
             "float16 for the float16 modes) a step left as they were, mean over the run's "
             "steps; unchanged: stored bits equal to the start's (float16 modes: to the "
             "start's float16 image) after the run; out of reach (nearest modes): the share "
             "of the start's weights whose half ULP in that format exceeds the lr, which an "
             "Adam step of about lr cannot cross, mean over starts: where unchanged is close "
             "to it, the weights' magnitudes and the lr decide which weights stay, not the "
             "objective.", "",
             analysis.markdown_table(rows, ["arm", "mode", "step", "unchanged", "reach", "kl",
                                            "gain"],
                                     ["arm", "mode", "bit-identical per step", "unchanged",
                                      "out of reach", "KL to start", "sampled-accuracy gain"]),
             ""]
    tested = [c for c in claim_rows if c.group == FP16_GROUP]
    if tested:
        lines += ["What the finer filter changes, test by test (paired by start and seed; every "
                  "verdict as it came out, those against the paper's account included; the "
                  "claims table above has them with Holm's correction):", ""]
        lines += [f"- {c.claim}: {c.evidence}; {c.test.describe()}: **{c.verdict}**"
                  + ("" if c.verdict_holm == c.verdict else " (not after Holm)") + "."
                  for c in tested]
        against = [c for c in tested if c.verdict == "does not"]
        lines += ["", (f"Against the expectation: {len(against)} of {len(tested)} rows ("
                       + "; ".join(c.claim for c in against) + ")." if against else
                       f"No row went against the expectation at p < 0.05; "
                       f"{sum(c.verdict == 'cannot say' for c in tested)} of {len(tested)} "
                       "cannot say."), ""]
    return lines


def write_lm_report(out: str, config: LMAblation, results: Sequence[dict], *,
                    warmup: Sequence[Any], wall_s: float) -> list[str]:
    """Write the LM ablation's report files into ``out``; returns their paths.

    Args:
        out: output folder.
        config: the settings.
        results: one dict per run (:func:`rlvr_optim.ablation.cohorts.run_cohort`).
        warmup: the starts (:class:`rlvr_optim.ablation.cohorts.Start`).
        wall_s: wall time of this invocation.
    """
    from .lm_plots import draw_plots

    os.makedirs(out, exist_ok=True)
    starts = list(warmup)
    arms = _group(results)
    head = Headline(arms)
    claim_rows = claims(config, arms)
    md: list[str] = [f"# Precision ablation, preset `{config.name}`", ""]
    md += _setup(config, starts, results) + [""]
    md += ["## Starts", ""] + _start_table(starts, results)
    if head.rl:
        md += _learning_section(config, head, claim_rows)
    md += _arms_section(config, arms)
    if head.rl:
        md += _matched_section(config, head)
    md += _claims_section(claim_rows)
    md += _precision_section(head, claim_rows, starts)
    md += _freeze_section(head)
    md += _overlap_section(config, arms)
    md += _spectrum_section(arms)
    plots = draw_plots(out, config, arms, head, matched_targets(head) if head.rl else None)
    if plots is None:
        md += ["(plots skipped: matplotlib is not installed)", ""]
    else:
        md += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                  for p in plots] + [""]
    env = _environment(config)
    train = sum(runs[0]["cohort_wall_s"] for runs in _cohorts(results).values())
    md += ["## Files", "",
           "- `results.json`: settings, environment, the starts, every run's measures (one "
           "entry per run: kind, mode, lr, seed, start, accuracies, rewards, KL, clipped share, "
           "sparsity, geometry on bf16 and fp32 master weights; per-module sparsity stays in "
           "the checkpoint folder's cohort results) and every claim's test.",
           "- `series.json`: every run's series: per rollout (or per `updates` SFT steps) "
           "`loss`, and for the sampling kinds `reward`, `clip_fraction`; every "
           f"{config.log_every} steps (`curve_step`) the `curve_*` measures; `curve_start` in "
           "results.json holds their values at step 0.", "",
           "## Environment", "",
           ", ".join(f"{k} {v}" for k, v in env.items())
           + f"; the runs' training and curves took {train:.1f} s in all; "
           + (f"this invocation took {wall_s:.1f} s." if wall_s >= train else
              f"this invocation rendered the report from the finished runs in {wall_s:.1f} s.")
           + " Runs from these starts round differently on another CPU (fp32 "
             "matmuls and reductions reassociate with the kernel's vector width): expect "
             "agreement within the spread there, bit equality only on this kind of CPU.", ""]
    md_path = os.path.join(out, "report.md")
    files.write_text(md_path, "\n".join(md))
    summary = {"preset": config.name, "config": dataclasses.asdict(config), "environment": env,
               "wall_s": wall_s, "paper_table1": PAPER_TABLE1, "spread": SPREAD_NOTE,
               "starts": [{"seed": s.seed, "source": s.source, "files": s.made.get("files"),
                           "made_with": s.made.get("made_with")} for s in starts],
               "matched_targets": matched_targets(head) if head.rl else None,
               "claims": [c.as_dict() for c in claim_rows],
               "runs": [{k: v for k, v in r.items() if k not in ("series", "modules")}
                        for r in results]}
    res_path = os.path.join(out, "results.json")
    files.write_json(res_path, _finite(summary), indent=1)
    series = {r["name"]: r["series"] for r in results}
    series_path = os.path.join(out, "series.json")
    files.write_json(series_path, _rounded(series), separators=(",", ":"))
    return [md_path, res_path, series_path] + list(plots or [])


def _finite(value: Any) -> Any:
    """``value`` with every nan or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _cohorts(results: Sequence[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in results:
        out.setdefault((r["kind"] == "sft", r["mode"], r["lr"], r["start"]), []).append(r)
    return out


def _rounded(series: Mapping[str, Mapping[str, list]]) -> dict:
    """Series with 7 significant digits (None kept)."""
    return {run: {k: [None if v is None else float(f"{v:.7g}") for v in values]
                  for k, values in s.items()} for run, s in series.items()}


def format_lm_summary(summary: Mapping[str, Any], config: LMAblation) -> str:
    """The terminal table of the arms, the learning tests per start, and a legend."""
    arms = _group(summary["results"])
    head = Headline(arms)
    rows = []
    for runs in arms.values():
        rows.append({"arm": runs[0]["label"],
                     "sampled acc. gain": _cell(_values(runs, _gain), "+.1%"),
                     "reward gain": _cell(_values(runs, _reward_gain), "+.3f")
                     if runs[0]["reward_first"] is not None else "-",
                     "KL to start": _cell(_values(runs, lambda r: r["kl_final"]), ".2e"),
                     "unchanged": _cell(_values(runs, _unchanged), ".2%")})
    lines = [format_table(rows), ""]
    if head.rl and head.null:
        for c in claims(config, arms):
            if c.group == "premise" and "held-out" in c.claim:
                lines.append(f"{c.claim}: {c.test.describe()} -> {c.verdict}")
        if len(config.seeds) < 3:
            lines.append(f"(with {len(config.seeds)} seeds a start's own test has "
                         f"{len(config.seeds) - 1} degree of freedom and little power; "
                         "rlvr-optim ablate --preset tiny runs 5 seeds per start)")
    starts = sorted({r["start"] for r in summary["results"]})
    lines += [
        "",
        f"Each cell: {SPREAD_NOTE}; {len(starts)} starts x {len(config.seeds)} seeds per arm, "
        f"{config.steps} optimizer steps per run.",
        "sampled acc. gain: exact chance that a sample at the rollout temperature is correct, "
        f"on {config.eval_problems} held-out problems, end minus start.",
        "reward gain: share of correct samples, last minus first 10% of rollouts.",
        f"KL to start: KL(start || run) per answer token on {config.kl_samples} fixed samples "
        "of each start.",
        "unchanged: share of weights whose bf16 bits equal the start's (the paper's Table 1 "
        "measure; paper: RL 36-92%, SFT 0.6-18.8%).",
    ]
    if any(r["mode"] in (FP16_NEAREST, FP16_MASTER) for r in summary["results"]):
        lines.append("fp16 arms: their float16 bits against the start's float16 image (the "
                     "report's storage-filter section has the per-step shares and tests).")
    return "\n".join(lines)
