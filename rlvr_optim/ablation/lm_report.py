"""The LM ablation's outputs: ``report.md``, ``results.json``, ``series.json`` and PNG plots.

Every cell is a mean over the seeds of an arm with its spread, the sample standard deviation
over those seeds (``mean ± std``); comparisons with the paper are read from those spreads.
Everything here is derived from the runs' saved results, so a report can be rebuilt from
the checkpoint folder (``--resume``) without training again.
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
from .config import MASTER, NEAREST, LMAblation
from .report import PAPER_TABLE1
from .task import AdditionTask

__all__ = ["at_matched", "format_lm_summary", "spread", "verdict",
           "write_lm_report"]

SPREAD_NOTE = "mean ± std over seeds (sample standard deviation, n - 1)"


def spread(values: Sequence[float | None]) -> tuple[float, float, int]:
    """``(mean, sample std, n)`` of the values that are not None (std nan for n < 2)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    if not n:
        return float("nan"), float("nan"), 0
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return mean, std, n


def _cell(values: Sequence[float | None], spec: str) -> str:
    mean, std, n = spread(values)
    if not n:
        return "-"
    scale, suffix = (100.0, "%") if spec.endswith("%") else (1.0, "")
    spec = spec[:-1] + "f" if spec.endswith("%") else spec
    text = f"{format(scale * mean, spec)}{suffix}"
    if n > 1:
        text += f" ± {format(scale * std, spec)}{suffix}"
    if n < len(values):
        text += f" ({n} of {len(values)})"
    return text


def verdict(a: Sequence[float], b: Sequence[float] | float, expect: str) -> tuple[str, str]:
    """Read ``mean(a) - mean(b)`` (or ``mean(a) - b``) against the paper's expected sign.

    ``expect`` is ``">"`` or ``"<"``. Returns ``(verdict, evidence)``: "agrees" or "does not"
    when the difference exceeds two standard errors (from the seeds' spreads), else
    "cannot say".
    """
    ma, sa, na = spread(a)
    if isinstance(b, (int, float)):
        mb, var_b = float(b), 0.0
    else:
        mb, sb, nb = spread(b)
        var_b = sb * sb / nb if nb > 1 else float("nan")
    se = math.sqrt(sa * sa / na + var_b) if na > 1 else float("nan")
    diff = ma - mb
    evidence = f"difference {diff:+.4g}, two standard errors {2 * se:.2g}"
    if math.isnan(se) or abs(diff) <= 2 * se:
        return "cannot say", evidence
    return ("agrees" if (diff > 0) == (expect == ">") else "does not"), evidence


def at_matched(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """``y`` where the curve ``x`` first reaches ``target`` (linear interpolation), or None."""
    for i in range(1, len(xs)):
        x0, x1 = xs[i - 1], xs[i]
        if x1 >= target:
            if x1 == x0:
                return ys[i]
            t = max(0.0, (target - x0) / (x1 - x0))
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return None


def _curve(run: Mapping, key: str, start: float) -> list[float]:
    return [start] + list(run["series"][key])


def _group(results: Sequence[dict]) -> dict[str, list[dict]]:
    """Runs by arm, arms in first-seen order, runs by seed."""
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(r["arm"], []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def _tail_mean(values: Sequence[float], share: float = 0.1) -> float:
    n = max(1, int(round(share * len(values))))
    return sum(values[-n:]) / n


def _find(arms: Mapping[str, list[dict]], **match: Any) -> list[dict] | None:
    for runs in arms.values():
        r = runs[0]
        if all(r.get(k) == v for k, v in match.items()):
            return runs
    return None


def _values(runs: Sequence[dict], get: Callable[[dict], float | None]) -> list[float | None]:
    return [get(r) for r in runs]


def _unchanged(r: dict) -> float:
    return r["sparsity"]["sparsity"]


def _kl_end(r: dict) -> float:
    return r["series"]["curve_kl"][-1]


def format_lm_summary(summary: Mapping[str, Any], config: LMAblation) -> str:
    """The terminal table of the headline arms, with a legend under it."""
    warmup = summary["warmup"] or {}
    arms = _group(summary["results"])
    rows = []
    for runs in arms.values():
        row = {"arm": runs[0]["label"],
               "unchanged": _cell(_values(runs, _unchanged), ".2%"),
               "accuracy": _cell(_values(runs, lambda r: r["accuracy"]), ".1%"),
               "KL to start": _cell(_values(runs, _kl_end), ".2e"),
               "reward, last 10%": (_cell(_values(runs, lambda r: _tail_mean(
                   r["series"]["reward"])), ".3f") if runs[0]["kind"] == "rl" else "-")}
        rows.append(row)
    start = warmup.get("accuracy")
    legend = [
        "",
        f"Each cell: {SPREAD_NOTE}, {len(config.seeds)} seeds per arm, {config.steps} optimizer "
        "steps per run, all from one start.",
        "unchanged: share of weights whose bf16 bits equal the start's at the end (the paper's "
        "Table 1 measure; paper: RL 36-92%, SFT 0.6-18.8%).",
        f"accuracy: greedy, either answer format, {config.eval_problems} held-out problems"
        + (f" (start {start:.1%})." if start is not None else "."),
        f"KL to start: KL(start || run) per answer token on {config.kl_samples} fixed samples "
        "of the start policy (one measure for every arm).",
        "reward: share of correct sampled answers over the last 10% of rollouts (RL arms).",
        "SFT own / teacher: cross-entropy on the forward / the reversed answer format.",
    ]
    return format_table(rows) + "\n" + "\n".join(legend)


def _environment(device: str, threads: int | None) -> dict[str, str]:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "machine": platform.machine(),
           "torch threads in the runs": str(threads or torch.get_num_threads())}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _setup(config: LMAblation, warmup: Mapping) -> list[str]:
    task = AdditionTask(config.digits)
    d = config.digits
    return [
        f"- Model: a Llama-style causal LM (RMSNorm, SiLU-gated MLP, learned positions), "
        f"{warmup['params']:,} parameters (hidden {config.hidden}, {config.layers} layers, "
        f"{config.heads} heads, MLP {config.intermediate}), vocabulary of {task.vocab_size} "
        "tokens. Weights stored as each mode dictates; forward and backward in fp32 (weights "
        "upcast at use), so results agree across CPUs up to float reassociation.",
        f"- Task: {d}-digit addition, two correct answers per prompt: `<bos>{'1' * d}+"
        f"{'2' * d}=` -> `{'0' + '3' * d}<eos>` (forward) or `{'3' * d + '0'}<eos>` "
        "(reversed); reward 1 when the whole answer is exact in either format.",
        f"- Warm-up: {config.warmup_steps} steps of cross-entropy in fp32, lr {config.warmup_lr:g} "
        f"(linear ramp over 5%, cosine decay to 0), batch {config.warmup_batch}, "
        f"{config.warmup_reversed:.0%} of answers reversed. Its bf16 image is the start of every "
        f"run: greedy accuracy {warmup['accuracy']:.1%} on {config.eval_problems} held-out "
        f"problems, {warmup['reversed_share']:.1%} of its answers reversed.",
        f"- RL: GRPO-style, {config.prompts} prompts x {config.group} samples per rollout, "
        f"advantages normalised within each group, temperature {config.temperature:g}, "
        f"{config.updates} optimizer steps per rollout with the ratio to the rollout policy "
        f"clipped at 1 ± {config.clip:g}; KL weight 0 unless the arm says otherwise (exact KL "
        "to the start policy over the vocabulary).",
        f"- SFT: cross-entropy on {config.prompts * config.group} fresh problems per step, "
        "answers forward (\"own\": the start model's usual format) or reversed (\"teacher\": "
        "a format the start model rarely writes, i.e. off-policy data).",
        f"- Optimizer: rlvr_optim.AdamW, betas (0.9, 0.999), eps 1e-8, weight decay "
        f"{config.weight_decay:g}, {config.steps} steps per run; seeds {list(config.seeds)} per "
        "arm (RL sampling, prompts, SFT problems; arms of one seed see the same prompts).",
        f"- Headline mode: {MASTER} (fp32 master weights, bf16 weights and checkpoints, as "
        f"verl-style trainers run); {NEAREST} (no master: sub-half-ULP updates are lost each "
        "step) is the storage-filter contrast.",
        f"- Spread: {SPREAD_NOTE}. A comparison is read as agreeing or not only when the "
        "difference of means exceeds two standard errors; otherwise \"cannot say\".",
    ]


def write_lm_report(out: str, config: LMAblation, results: Sequence[dict], *,
                    warmup: Mapping, wall_s: float) -> list[str]:
    """Write the LM ablation's report files into ``out``; returns their paths.

    Args:
        out: output folder.
        config: the settings.
        results: one dict per run (:func:`rlvr_optim.ablation.cohorts.run_cohort`).
        warmup: the warm-up's result.
        wall_s: wall time of this invocation.
    """
    os.makedirs(out, exist_ok=True)
    arms = _group(results)
    start_acc = warmup["accuracy"]
    start_curve_acc = warmup["curve_accuracy"]
    md: list[str] = [f"# Precision ablation, preset `{config.name}`", ""]
    md += _setup(config, warmup) + [""]

    md += [f"## Arms after {config.steps} steps", "",
           f"Every cell: {SPREAD_NOTE}, {len(config.seeds)} seeds. \"unchanged\": bf16 bits equal "
           "to the start's (Table 1's measure); \"KL\": KL(start || run) per answer token on "
           f"{config.kl_samples} fixed samples of the start policy; accuracy: greedy, either "
           f"format, {config.eval_problems} held-out problems (start {start_acc:.1%}); "
           "\"reversed\": share of greedy answers in the reversed format; reward: the first and "
           "last 10% of rollouts; clipped: share of answer tokens whose ratio left the clip "
           "range.", ""]
    rows = []
    for runs in arms.values():
        rl = runs[0]["kind"] == "rl"
        rows.append({
            "arm": runs[0]["label"], "unchanged": _cell(_values(runs, _unchanged), ".2%"),
            "acc": _cell(_values(runs, lambda r: r["accuracy"]), ".1%"),
            "gain": _cell(_values(runs, lambda r: r["accuracy"] - start_acc), ".1%"),
            "kl": _cell(_values(runs, _kl_end), ".2e"),
            "rev": _cell(_values(runs, lambda r: r["reversed_share"]), ".1%"),
            "r0": _cell(_values(runs, lambda r: _tail_mean(r["series"]["reward"][::-1])), ".3f")
            if rl else "-",
            "r1": _cell(_values(runs, lambda r: _tail_mean(r["series"]["reward"])), ".3f")
            if rl else "-",
            "clip": _cell(_values(runs, lambda r: sum(r["series"]["clip_fraction"])
                                  / len(r["series"]["clip_fraction"])), ".2e") if rl else "-",
        })
    md.append(analysis.markdown_table(
        rows, ["arm", "unchanged", "acc", "gain", "kl", "rev", "r0", "r1", "clip"],
        ["arm", "unchanged", "accuracy", "accuracy gain", "KL to start", "reversed",
         "reward, first 10%", "reward, last 10%", "clipped"]))
    md.append("")

    md += _matched_section(config, arms, start_acc, start_curve_acc)
    md += _overlap_section(config, arms)
    md += _spectrum_section(arms)
    md += _freeze_section(config, arms, start_curve_acc)
    md += _paper_section(config, arms)

    plots = _plots(out, config, arms, start_curve_acc)
    if plots is None:
        md += ["(plots skipped: matplotlib is not installed)", ""]
    else:
        md += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                  for p in plots] + [""]

    md += ["## Files", "", "- `results.json`: settings, environment, the warm-up and every "
           "run's measures (sparsity, geometry on bf16 weights and on fp32 master weights).",
           "- `series.json`: every run's series: per rollout (or per `updates` SFT steps) "
           "`loss`, `reward`, `clip_fraction`; every "
           f"{config.log_every} steps (`curve_step`) `curve_kl`, `curve_unchanged`, "
           "`curve_accuracy`, `curve_reversed`.", ""]
    env = _environment(config.device, config.threads)
    train = sum(runs[0]["cohort_wall_s"] for runs in _cohorts(results).values())
    md += ["## Environment", "", ", ".join(f"{k} {v}" for k, v in env.items())
           + f"; wall time of this invocation {wall_s:.1f} s (warm-up {warmup['wall_s']:.1f} s, "
           f"cohorts {train:.1f} s).", ""]

    md_path = os.path.join(out, "report.md")
    files.write_text(md_path, "\n".join(md))
    summary = {"preset": config.name, "config": dataclasses.asdict(config), "environment": env,
               "wall_s": wall_s, "paper_table1": PAPER_TABLE1, "spread": SPREAD_NOTE,
               "warmup": {k: v for k, v in warmup.items() if k != "series"},
               "runs": [{k: v for k, v in r.items() if k != "series"} for r in results]}
    res_path = os.path.join(out, "results.json")
    files.write_json(res_path, summary, indent=1)
    series = {"warmup": warmup["series"], **{r["name"]: r["series"] for r in results}}
    series_path = os.path.join(out, "series.json")
    files.write_json(series_path, _rounded(series), separators=(",", ":"))
    return [md_path, res_path, series_path] + list(plots or [])


def _cohorts(results: Sequence[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in results:
        out.setdefault((r["kind"], r["mode"], r["lr"]), []).append(r)
    return out


def _rounded(series: Mapping[str, Mapping[str, list]]) -> dict:
    """Series with 7 significant digits (fractions of 10^5-10^7 weights stay exact enough)."""
    return {run: {k: [float(f"{v:.7g}") for v in values] for k, values in s.items()}
            for run, s in series.items()}


def _headline(arms: Mapping[str, list[dict]]) -> list[list[dict]]:
    """The fp32-master arms that train every weight."""
    return [runs for runs in arms.values()
            if runs[0]["mode"] == MASTER and runs[0]["freeze"] is None]


def _matched_section(config: LMAblation, arms: Mapping[str, list[dict]], start_acc: float,
                     start_curve_acc: float) -> list[str]:
    headline = _headline(arms)
    kl_target = min(spread(_values(runs, _kl_end))[0] for runs in headline)
    gains = [spread(_values(runs, lambda r: r["series"]["curve_accuracy"][-1]
                            - start_curve_acc))[0] for runs in headline]
    positive = [g for g in gains if g > 0]
    gain_target = min(positive) if positive else None
    rows = []
    for runs in arms.values():
        def at_kl(r: dict) -> float | None:
            return at_matched(_curve(r, "curve_kl", 0.0), _curve(r, "curve_unchanged", 1.0),
                              kl_target)

        def at_gain(r: dict) -> float | None:
            if gain_target is None:
                return None
            gain = [a - start_curve_acc for a in _curve(r, "curve_accuracy", start_curve_acc)]
            return at_matched(gain, _curve(r, "curve_unchanged", 1.0), gain_target)

        steps = runs[0]["series"]["curve_step"]
        mid = min(range(len(steps)), key=lambda i: abs(steps[i] - config.steps // 2))
        half = steps[mid]

        def at_half(r: dict) -> float:
            return r["series"]["curve_unchanged"][mid]

        rows.append({"arm": runs[0]["label"], "half": _cell(_values(runs, at_half), ".2%"),
                     "end": _cell(_values(runs, _unchanged), ".2%"),
                     "kl": _cell(_values(runs, at_kl), ".2%"),
                     "gain": _cell(_values(runs, at_gain), ".2%")})
    lines = ["## Sparsity at matched steps, KL and accuracy gain", "",
             "Share of weights unchanged (bf16 bits) read off each run's logged curve "
             f"(every {config.log_every} steps, linear interpolation between points): at step "
             f"{half} and {config.steps}; where the run's KL to the start first "
             f"reached {kl_target:.3g} (the smallest mean final KL of the fp32-master arms that "
             "train every weight, so each of them reaches it); where its accuracy gain on "
             f"{config.curve_problems} held-out problems first reached "
             + (f"{gain_target:+.1%} (the smallest positive mean gain among those arms)"
                if gain_target is not None else
                "a common level (none: no such arm gained accuracy, so this column is empty)")
             + ". \"(k of n)\": only k seeds reached the level; \"-\": none did.", "",
             analysis.markdown_table(rows, ["arm", "half", "end", "kl", "gain"],
                                     ["arm", f"step {half}", f"step {config.steps}",
                                      f"KL = {kl_target:.3g}",
                                      "accuracy gain = " + (f"{gain_target:+.1%}"
                                                            if gain_target is not None
                                                            else "n/a")]), ""]
    return lines


def _overlap_section(config: LMAblation, arms: Mapping[str, list[dict]]) -> list[str]:
    rows = []
    for runs in arms.values():
        def g(key: str, master: bool = False) -> list[float | None]:
            return [(r["master_geometry"] or {}).get(key) if master else r["geometry"].get(key)
                    for r in runs]

        rows.append({
            "arm": runs[0]["label"],
            "density": _cell(g("changed_baseline"), ".2%"),
            "p_lift": _cell(g("changed_in_principal_lift"), ".2f"),
            "p_matched": _cell(g("changed_in_principal_matched_lift"), ".2f"),
            "pnl_lift": _cell(g("changed_in_principal_not_low_lift"), ".2f"),
            "pnl_matched": _cell(g("changed_in_principal_not_low_matched_lift"), ".2f"),
            "low_lift": _cell(g("changed_in_low_magnitude_lift"), ".2f"),
            "m_p_lift": _cell(g("top_in_principal_lift", True), ".2f"),
            "m_p_matched": _cell(g("top_in_principal_matched_lift", True), ".2f"),
            "m_pnl_matched": _cell(g("top_in_principal_not_low_matched_lift", True), ".2f"),
        })
    return ["## Where the updates fall: principal weights, against two nulls", "",
            f"Masks of the start weights per matrix: principal = top {config.alpha:g} of "
            f"|rank-k reconstruction| (k = {config.rank} of the smaller dimension), "
            f"low-magnitude = bottom {config.alpha:g} of |W0|, principal minus low-magnitude = "
            "the paper's split. Lift = overlap / the update's density (1: a randomly placed "
            "update). Matched lift = overlap / the expected overlap of the update mask "
            f"permuted within {config.bins} bins of |W0| per matrix: a bf16 weight changes only "
            "past half a ULP, which grows with |W0|, so an update with no preference already "
            "avoids the (mostly large) principal weights under the plain null; the matched null "
            "removes that. Left: the bf16 update mask (bits changed); right: the top "
            f"{config.alpha:g} of |delta| of the fp32 master weights (arms with a master).", "",
            analysis.markdown_table(rows, ["arm", "density", "p_lift", "p_matched", "pnl_lift",
                                           "pnl_matched", "low_lift", "m_p_lift", "m_p_matched",
                                           "m_pnl_matched"],
                                    ["arm", "changed", "& principal: lift", "matched lift",
                                     "& principal - low: lift", "matched lift",
                                     "& low-mag.: lift", "fp32 master top: & principal, lift",
                                     "matched lift", "& principal - low, matched lift"]), ""]


def _spectrum_section(arms: Mapping[str, list[dict]]) -> list[str]:
    rows = []
    for runs in arms.values():
        def g(key: str, master: bool = False) -> list[float | None]:
            return [(r["master_geometry"] or {}).get(key) if master else r["geometry"][key]
                    for r in runs]

        rows.append({"arm": runs[0]["label"], "size": _cell(g("update_norm"), ".2e"),
                     "drift": _cell(g("spectrum_drift"), ".2e"),
                     "dpu": _cell(g("drift_per_update"), ".3f"),
                     "angle": _cell(g("angle_left"), ".3f"),
                     "apu": _cell(g("angle_left_per_update"), ".3g"),
                     "m_dpu": _cell(g("drift_per_update", True), ".3f")})
    return ["## Spectrum drift and subspace rotation, per unit of update size", "",
            "Means over weight matrices of the bf16 weights: update size ||W1 - W0|| / ||W0|| "
            "(Frobenius), spectrum drift ||sigma(W1) - sigma(W0)|| / ||sigma(W0)||, the largest "
            "principal angle between the top-k left singular subspaces, and each divided by "
            "the matrix's update size (drift per update is at most 1: 1 = the update only "
            "rescales singular values). Last column: the same on the fp32 master weights.", "",
            analysis.markdown_table(rows, ["arm", "size", "drift", "dpu", "angle", "apu",
                                           "m_dpu"],
                                    ["arm", "update size", "spectrum drift",
                                     "drift per update", "angle (deg)",
                                     "angle per update (deg)", "fp32 master: drift per update"]),
            ""]


def _freeze_arms(arms: Mapping[str, list[dict]]) -> list[list[dict]]:
    dense = _find(arms, kind="rl", mode=MASTER, freeze=None, kl_coef=0.0)
    frozen = [runs for runs in arms.values() if runs[0]["freeze"] is not None]
    return ([dense] if dense and frozen else []) + frozen


def _freeze_section(config: LMAblation, arms: Mapping[str, list[dict]],
                    start_curve_acc: float) -> list[str]:
    group = _freeze_arms(arms)
    if not group:
        return []
    rows = []
    for runs in group:
        rows.append({
            "arm": runs[0]["label"],
            "frozen": _cell(_values(runs, lambda r: r.get("frozen_share", 0.0)), ".1%"),
            "moved": str(sum(r.get("frozen_changed", 0) for r in runs)),
            "reward": _cell(_values(runs, lambda r: _tail_mean(r["series"]["reward"])), ".3f"),
            "acc": _cell(_values(runs, lambda r: r["accuracy"]), ".1%"),
            "kl": _cell(_values(runs, _kl_end), ".2e"),
            "unchanged": _cell(_values(runs, _unchanged), ".2%")})
    return ["## Freezing experiment", "",
            "RL (fp32 master, same lr and seeds) with a mask of the start weights frozen "
            "through AdamW.set_freeze_mask: the principal mask, its complement, or a random "
            "mask of the principal mask's size per matrix; beside the dense run. \"frozen\": "
            "share of all weights frozen; \"frozen moved\": frozen weights whose bf16 bits "
            "differ from the start at the end, summed over seeds (0 = the freeze held "
            "bit for bit). Curves in `freezing.png`.", "",
            analysis.markdown_table(rows, ["arm", "frozen", "moved", "reward", "acc", "kl",
                                           "unchanged"],
                                    ["arm", "frozen", "frozen moved", "reward, last 10%",
                                     "accuracy", "KL to start", "unchanged"]), ""]


def _paper_section(config: LMAblation, arms: Mapping[str, list[dict]]) -> list[str]:
    rl = _find(arms, kind="rl", mode=MASTER, freeze=None, kl_coef=0.0)
    lines = ["## Against the paper, point by point", "",
             "\"The Path Not Taken\" (arXiv 2511.08567). Each point: the paper's claim or "
             "what its account predicts, our arms, and a verdict from the seeds' spread "
             "(agrees / does not: the difference of means exceeds two standard errors; "
             "cannot say: it does not). The toy has "
             f"{sum(r['sparsity']['numel'] for r in rl[:1]) if rl else 0:,} weights and "
             f"{config.steps} steps: directions, not sizes.", ""]
    if rl is None:
        return lines + ["(no dense fp32-master RL arm: nothing to compare)", ""]
    points: list[tuple[str, str, str]] = []

    def add(claim: str, a: list[dict], b: list[dict] | float, get: Callable, expect: str,
            what: str) -> None:
        va = _values(a, get)
        vb = b if isinstance(b, float) else _values(b, get)
        result, evidence = verdict(va, vb, expect)
        b_text = f"{b:g}" if isinstance(b, float) else _cell(vb, what)
        points.append((claim, f"{_cell(va, what)} vs {b_text} ({evidence})", result))

    rl_lr = rl[0]["lr"]
    master_sft = [runs for runs in arms.values()
                  if runs[0]["kind"] == "sft" and runs[0]["mode"] == MASTER]
    for sft in master_sft:
        add(f"Table 1: RL leaves more bf16 weights unchanged than SFT (RL lr {rl_lr:g} vs SFT "
            f"{sft[0]['data']} lr {sft[0]['lr']:g})", rl, sft, _unchanged, ">", ".2%")
    lo, hi = PAPER_TABLE1["rl"]
    mean_rl = spread(_values(rl, _unchanged))[0]
    points.append(("Table 1's size: RL keeps 36-92% of bf16 weights",
                   f"ours {_cell(_values(rl, _unchanged), '.2%')}",
                   "agrees" if lo <= mean_rl <= hi else "does not (another scale: toy model, "
                   "few steps)"))
    nearest = _find(arms, kind="rl", mode=NEAREST, freeze=None)
    if nearest:
        add("Gate III: bf16 storage hides sub-ULP updates (RL in bf16 nearest keeps more "
            "unchanged than with an fp32 master)", nearest, rl, _unchanged, ">", ".2%")
    sft_own = _find(arms, kind="sft", mode=MASTER, data="own", lr=rl_lr)
    sft_teacher = _find(arms, kind="sft", mode=MASTER, data="teacher", lr=rl_lr)

    def geo(key: str, master: bool = False) -> Callable:
        return lambda r: ((r["master_geometry"] or {}).get(key) if master
                          else r["geometry"].get(key))

    add("RL updates off the principal weights (bf16 mask, magnitude-matched lift below 1)",
        rl, 1.0, geo("changed_in_principal_matched_lift"), "<", ".2f")
    add("... and off principal-minus-low-magnitude weights (matched lift below 1)",
        rl, 1.0, geo("changed_in_principal_not_low_matched_lift"), "<", ".2f")
    if rl[0]["master_geometry"]:
        add("... measured on fp32 master deltas (top-alpha, matched lift below 1)",
            rl, 1.0, geo("top_in_principal_matched_lift", True), "<", ".2f")
    for sft, name in ((sft_own, "own"), (sft_teacher, "teacher")):
        if sft:
            add(f"RL puts fewer updates on principal weights than SFT {name} (matched lift, "
                "bf16 mask)", rl, sft, geo("changed_in_principal_matched_lift"), "<", ".2f")
            add(f"RL preserves the spectrum better than SFT {name} (drift per unit of update "
                "size, fp32 master)", rl, sft, geo("drift_per_update", True), "<", ".3f")
            add(f"RL rotates the top-k subspaces less than SFT {name} (angle per unit of "
                "update size)", rl, sft, geo("angle_left_per_update"), "<", ".3g")
    frozen = {runs[0]["freeze"]: runs for runs in arms.values() if runs[0]["freeze"]}
    reward = lambda r: _tail_mean(r["series"]["reward"])  # noqa: E731
    if "principal" in frozen and "non_principal" in frozen:
        add("Freezing: RL with the principal weights frozen learns more than with their "
            "complement frozen (reward, last 10%)", frozen["principal"],
            frozen["non_principal"], reward, ">", ".3f")
    if "principal" in frozen and "random" in frozen:
        add("Freezing: the principal weights matter less to RL than a random set of the same "
            "size (reward, last 10%)", frozen["principal"], frozen["random"], reward, ">",
            ".3f")
    if sft_own and sft_teacher:
        add("Not the paper's (issue 15's toy finding): off-policy SFT data moves more weights "
            "than the model's own format (unchanged, teacher vs own)", sft_teacher, sft_own,
            _unchanged, "<", ".2%")
    lines.append(analysis.markdown_table(
        [{"claim": c, "ours": o, "verdict": v} for c, o, v in points],
        ["claim", "ours", "verdict"], ["claim", "ours (mean ± std)", "verdict"]))
    return lines + [""]


def _plots(out: str, config: LMAblation, arms: Mapping[str, list[dict]],
           start_curve_acc: float) -> list[str] | None:
    folder = analysis.FigureFolder.open(out)
    if folder is None:
        return None
    plt, colors, save = folder.plt, folder.colors, folder.save

    def mean_curve(runs: list[dict], key: str, start: float) -> tuple[list, list, list]:
        xs = [0] + runs[0]["series"]["curve_step"]
        cols = list(zip(*[_curve(r, key, start) for r in runs]))
        stats = [spread(c) for c in cols]
        return xs, [s[0] for s in stats], [0.0 if math.isnan(s[1]) else s[1] for s in stats]

    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    for i, runs in enumerate(arms.values()):
        _, kl, kl_sd = mean_curve(runs, "curve_kl", 0.0)
        _, un, un_sd = mean_curve(runs, "curve_unchanged", 1.0)
        style = "o-" if runs[0]["kind"] == "rl" else "s--"
        ax.errorbar(kl, [100 * u for u in un], xerr=kl_sd, yerr=[100 * s for s in un_sd],
                    fmt=style, ms=3, lw=1, capsize=2, color=colors[i % len(colors)],
                    label=runs[0]["label"])
    ax.set_xscale("symlog", linthresh=1e-5)
    ax.set_xlabel("KL(start || run) per answer token, fixed start samples")
    ax.set_ylabel("bf16 weights unchanged vs start (%)")
    ax.set_title(f"sparsity vs KL along the runs (mean ± std, {len(config.seeds)} seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    save(fig, "sparsity_vs_kl.png")

    group = _freeze_arms(arms)
    if group:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=80)
        for i, runs in enumerate(group):
            color = colors[i % len(colors)]
            label = "dense" if runs[0]["freeze"] is None else f"frozen {runs[0]['freeze']}"
            rewards = list(zip(*[r["series"]["reward"] for r in runs]))
            window = max(1, len(rewards) // 15)
            smooth = [spread([sum(col[max(0, j - window + 1):j + 1])
                              / len(col[max(0, j - window + 1):j + 1]) for col in zip(*rewards)])
                      for j in range(len(rewards))]
            xs = [(j + 1) * config.updates for j in range(len(rewards))]
            m = [s[0] for s in smooth]
            sd = [0.0 if math.isnan(s[1]) else s[1] for s in smooth]
            axes[0].plot(xs, m, color=color, label=label)
            axes[0].fill_between(xs, [a - b for a, b in zip(m, sd)],
                                 [a + b for a, b in zip(m, sd)], color=color, alpha=0.15)
            for ax, key, start, scale in ((axes[1], "curve_accuracy", start_curve_acc, 100),
                                          (axes[2], "curve_kl", 0.0, 1)):
                xs2, m2, sd2 = mean_curve(runs, key, start)
                ax.plot(xs2, [scale * v for v in m2], "o-", ms=3, color=color, label=label)
                ax.fill_between(xs2, [scale * (a - b) for a, b in zip(m2, sd2)],
                                [scale * (a + b) for a, b in zip(m2, sd2)], color=color,
                                alpha=0.15)
        axes[0].set_ylabel(f"reward ({window}-rollout mean)")
        axes[1].set_ylabel(f"greedy accuracy (%), {config.curve_problems} problems")
        axes[2].set_ylabel("KL(start || run) per token")
        for ax in axes:
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"RL with masks frozen (fp32 master, mean ± std over {len(config.seeds)} "
                     "seeds)", fontsize=9)
        save(fig, "freezing.png")

    rl_arms = [runs for runs in arms.values() if runs[0]["kind"] == "rl"]
    if rl_arms:
        fig, ax = plt.subplots(figsize=(7, 3.4), dpi=80)
        for i, runs in enumerate(rl_arms):
            xs, m, sd = mean_curve(runs, "curve_accuracy", start_curve_acc)
            ax.plot(xs, [100 * v for v in m], "o-", ms=3, color=colors[i % len(colors)],
                    label=runs[0]["label"])
        for j, runs in enumerate(runs for runs in arms.values() if runs[0]["kind"] == "sft"):
            xs, m, sd = mean_curve(runs, "curve_accuracy", start_curve_acc)
            ax.plot(xs, [100 * v for v in m], "s--", ms=3,
                    color=colors[(len(rl_arms) + j) % len(colors)], label=runs[0]["label"])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("greedy accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        save(fig, "accuracy.png")
    return folder.paths
