"""The LM ablation's figures: one claim per figure, small multiples, spreads as quantiles.

Lines are medians over runs; bands run from the smallest to the largest run (with 5 seeds a
start's band is its full range); KL axes are logarithmic and hold only positive values, so
no spread crosses zero. Every figure is written atomically (``rlvr_optim.files``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

from .. import analysis, files
from .config import (FP16_MASTER, FP16_NEAREST, MASTER, NEAREST, STOCHASTIC, STORAGE_MODES,
                     LMAblation)

_MODE_LABELS = {MASTER: "fp32 master", NEAREST: "nearest", STOCHASTIC: "stochastic",
                FP16_NEAREST: "fp16 nearest", FP16_MASTER: "fp16 + master"}
from .curves import curve, read_at_gain, read_at_kl
from .stats import t_quantile

__all__ = ["draw_plots"]

FONT = 10          # points; legends and ticks at least 9 (issue 34)
COLORS = {"RL": "#1f77b4", "RL no-signal": "#7f7f7f", "RFT": "#2ca02c", "SFT own": "#d62728",
          "SFT teacher": "#9467bd", "dense": "#1f77b4", "principal frozen": "#ff7f0e",
          "non-principal frozen": "#8c564b", "random frozen": "#e377c2"}


def _median_band(columns: Sequence[Sequence[float]]) -> tuple[list, list, list]:
    med, lo, hi = [], [], []
    for col in columns:
        xs = sorted(v for v in col if v is not None)
        if not xs:
            med.append(math.nan), lo.append(math.nan), hi.append(math.nan)
            continue
        mid = len(xs) // 2
        med.append(xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid]))
        lo.append(xs[0])
        hi.append(xs[-1])
    return med, lo, hi


def _steps(run: Mapping) -> list[int]:
    return [0] + list(run["series"]["curve_step"])


def _save(plt, fig, out: str, name: str, paths: list[str], layout: bool = True) -> None:
    if layout:
        fig.tight_layout()
    path = os.path.join(out, name)
    files.write_figure(path, fig)
    plt.close(fig)
    paths.append(path)


def draw_plots(out: str, config: LMAblation, arms: Mapping[str, list[dict]], head: Any,
               targets: Mapping[str, float | None] | None) -> list[str] | None:
    """Write the figures into ``out``; their paths, or None without matplotlib."""
    plt = analysis.load_pyplot()
    if plt is None:
        return None
    plt.rcParams.update({"font.size": FONT, "legend.fontsize": FONT - 1,
                         "axes.titlesize": FONT, "axes.labelsize": FONT,
                         "xtick.labelsize": FONT - 1, "ytick.labelsize": FONT - 1})
    paths: list[str] = []
    if head.rl:
        _learning(plt, out, config, head, paths)
        _sparsity_vs_kl(plt, out, head, targets, paths)
        if targets is not None:
            _matched(plt, out, head, targets, paths)
        _precision(plt, out, head, paths)
        if head.frozen:
            _freezing(plt, out, config, head, paths)
    return paths


def _learning(plt, out: str, config: LMAblation, head: Any, paths: list[str]) -> None:
    """Held-out sampled accuracy and reward per start: does RL learn beyond its control?"""
    starts = sorted({r["start"] for r in head.rl})
    fig, axes = plt.subplots(2, len(starts), figsize=(4.2 * len(starts), 6.4), dpi=90,
                             squeeze=False, sharey="row")
    for col, s in enumerate(starts):
        ax = axes[0][col]
        for name, runs in head.named():
            mine = [r for r in runs if r["start"] == s]
            xs = _steps(mine[0])
            med, lo, hi = _median_band(list(zip(*[curve(r, "curve_sampled_accuracy")
                                                  for r in mine])))
            ax.plot(xs, [100 * v for v in med], "-", color=COLORS[name], label=name, lw=1.8)
            ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi],
                            color=COLORS[name], alpha=0.18, lw=0)
        ax.set_title(f"start {s}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax = axes[1][col]
        for name, runs in head.named():
            mine = [r for r in runs if r["start"] == s]
            if mine[0]["reward_first"] is None:
                continue
            rewards = list(zip(*[r["series"]["reward"] for r in mine]))
            window = 2
            smooth = []
            for j in range(len(rewards)):
                recent = rewards[max(0, j - window + 1):j + 1]
                smooth.append([sum(run) / len(run) for run in zip(*recent)])
            med, lo, hi = _median_band(smooth)
            xs = [(j + 1) * config.updates for j in range(len(rewards))]
            ax.plot(xs, med, "-", color=COLORS[name], label=name, lw=1.8)
            ax.fill_between(xs, lo, hi, color=COLORS[name], alpha=0.18, lw=0)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out sampled accuracy (%)")
    axes[1][0].set_ylabel("reward (2-rollout mean)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"Does RL learn? Median over {len(config.seeds)} seeds per start, band: "
                 "smallest to largest run", fontsize=FONT)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _save(plt, fig, out, "learning.png", paths, layout=False)


def _sparsity_vs_kl(plt, out: str, head: Any, targets: Mapping | None,
                    paths: list[str]) -> None:
    """Unchanged share against KL to the start, one panel per arm, one line per run."""
    named = head.named()
    fig, axes = plt.subplots(1, len(named), figsize=(3.3 * len(named), 3.6), dpi=90,
                             squeeze=False, sharex=True, sharey=True)
    start_styles = ["-", "--", ":", "-."]
    for ax, (name, runs) in zip(axes[0], named):
        starts = sorted({r["start"] for r in runs})
        for r in runs:
            kl = curve(r, "curve_kl")[1:]
            un = curve(r, "curve_unchanged")[1:]
            ax.plot(kl, [100 * u for u in un], start_styles[starts.index(r["start"]) % 4],
                    color=COLORS[name], lw=0.9, alpha=0.7)
        if targets and targets.get("kl"):
            ax.axvline(targets["kl"], color="black", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("KL(start || run) per token")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("bf16 weights unchanged (%)")
    handles = [plt.Line2D([], [], color="black", ls=start_styles[i % 4], lw=1,
                          label=f"start {s}") for i, s in enumerate(sorted({r["start"]
                                                                             for r in head.rl}))]
    handles.append(plt.Line2D([], [], color="black", ls="--", lw=0.8, label="common KL"))
    axes[0][-1].legend(handles=handles, loc="best", frameon=False)
    fig.suptitle("Sparsity along each run against its KL to the start (one line per run)",
                 fontsize=FONT)
    _save(plt, fig, out, "sparsity_vs_kl.png", paths)


def _matched(plt, out: str, head: Any, targets: Mapping, paths: list[str]) -> None:
    """Each run's measures at the common KL (and gain): dots per run, mean and 95% interval."""

    measures = [("curve_unchanged", "bf16 weights unchanged (%)", 100.0),
                ("curve_master_matched_lift", "fp32 master top-20% in principal,\n"
                                              "matched lift (1 = no preference)", 1.0),
                ("curve_angle", "largest principal angle (deg)", 1.0)]
    rows = [("KL", targets["kl"], read_at_kl)]
    if targets.get("gain"):
        rows.append(("gain", targets["gain"], read_at_gain))
    named = head.named()
    fig, axes = plt.subplots(len(rows), len(measures), figsize=(4.2 * len(measures),
                                                                 3.3 * len(rows)),
                             dpi=90, squeeze=False)
    for i, (what, target, reader) in enumerate(rows):
        for j, (key, label, scale) in enumerate(measures):
            ax = axes[i][j]
            for k, (name, runs) in enumerate(named):
                vals = [reader(r, key, target) for r in runs]
                vals = [scale * v for v in vals if v is not None]
                ax.plot([k + (0.25 * ((m % 5) - 2) / 2) for m in range(len(vals))], vals, "o",
                        ms=3, color=COLORS[name], alpha=0.6)
                if len(vals) > 1:
                    mean = sum(vals) / len(vals)
                    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                    half = t_quantile(0.975, len(vals) - 1) * sd / math.sqrt(len(vals))
                    ax.errorbar([k + 0.38], [mean], yerr=[half], fmt="s", color="black", ms=4,
                                capsize=3, lw=1)
                ax.text(k, 1.0, f"{len(vals)}/{len(runs)}", transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=FONT - 1)
            ax.set_xticks(range(len(named)))
            ax.set_xticklabels([n.replace(" ", "\n", 1) for n, _ in named])
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, axis="y")
            if key == "curve_master_matched_lift":
                ax.axhline(1.0, color="black", lw=0.8, ls=":")
        target_text = f"KL = {target:.3g}" if what == "KL" else f"gain = {target:+.3f}"
        axes[i][0].annotate(f"at {target_text}", xy=(-0.25, 1.16), xycoords="axes fraction",
                            fontsize=FONT, fontweight="bold")
    fig.suptitle("Arms at matched movement: each dot a run (runs that reached the target, "
                 "n/N above), black: mean and 95% interval", fontsize=FONT)
    _save(plt, fig, out, "matched.png", paths)


def _precision(plt, out: str, head: Any, paths: list[str]) -> None:
    """Unchanged share per storage mode, for RL and SFT own."""
    groups = [("RL", head.rl_modes), ("SFT own", head.own_modes)]
    if sum(1 for _, modes in groups for r in modes.values() if r) <= 2:
        return
    shown = sum(1 for _, modes in groups for r in modes.values() if r)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * shown), 3.4), dpi=90)
    labels = []
    x = 0
    for name, modes in groups:
        for mode in STORAGE_MODES:
            runs = modes.get(mode)
            if not runs:
                continue
            vals = [100 * r["sparsity"]["sparsity"] for r in runs]
            ax.plot([x + 0.3 * ((m % 5) - 2) / 4 for m in range(len(vals))], vals, "o", ms=3,
                    color=COLORS[name], alpha=0.7)
            labels.append(f"{name}\n{_MODE_LABELS[mode]}")
            x += 1
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    fp16 = any(modes.get(m) for _, modes in groups for m in (FP16_NEAREST, FP16_MASTER))
    ax.set_ylabel("stored bits unchanged (%)" if fp16 else "bf16 weights unchanged (%)")
    ax.set_title("The storage filter (Gate III): one dot per run", fontsize=FONT)
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, out, "precision.png", paths)


def _freezing(plt, out: str, config: LMAblation, head: Any, paths: list[str]) -> None:
    """Sampled-accuracy gain along the run for dense RL and the three frozen masks."""
    group = [("dense", head.rl)] + [(f"{k.replace('_', '-')} frozen", v)
                                    for k, v in head.frozen.items()]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=90)
    for name, runs in group:
        xs = _steps(runs[0])
        gains = [[v - r["curve_start"]["curve_sampled_accuracy"]
                  for v in curve(r, "curve_sampled_accuracy")] for r in runs]
        med, lo, hi = _median_band(list(zip(*gains)))
        axes[0].plot(xs, [100 * v for v in med], "-", color=COLORS[name], label=name, lw=1.6)
        axes[0].fill_between(xs, [100 * v for v in lo], [100 * v for v in hi],
                             color=COLORS[name], alpha=0.12, lw=0)
        kl = list(zip(*[curve(r, "curve_kl")[1:] for r in runs]))
        med, lo, hi = _median_band(kl)
        axes[1].plot(xs[1:], med, "-", color=COLORS[name], label=name, lw=1.6)
        axes[1].fill_between(xs[1:], lo, hi, color=COLORS[name], alpha=0.12, lw=0)
    axes[0].set_ylabel("held-out sampled-accuracy gain (points)")
    axes[1].set_ylabel("KL(start || run) per token")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", frameon=False)
    fig.suptitle(f"RL with masks frozen: median over {len(head.rl)} runs (all starts and "
                 "seeds), band: smallest to largest", fontsize=FONT)
    _save(plt, fig, out, "freezing.png", paths)
