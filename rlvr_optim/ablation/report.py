"""The MiniLM ablation's outputs: ``report.md``, ``results.json``, ``series.json`` and PNG plots
(the LM ablation's are in :mod:`rlvr_optim.ablation.lm_report`).

Everything here is derived from the runs' saved results and change bitmaps, so a report
can be rebuilt from the checkpoint folder without training again.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import platform
from typing import Any, Mapping, Sequence

import torch

from .. import analysis, bitmaps, files

__all__ = ["PAPER_TABLE1", "jaccard_pairs", "write_report"]

# "The Path Not Taken" (arXiv 2511.08567), Table 1: share of bf16 weights bit-identical
# between public checkpoint pairs.
PAPER_TABLE1 = {"rl": (0.36, 0.92), "sft": (0.006, 0.188)}

_PCT = ".2%"


def jaccard_pairs(root: str, pairs: Sequence[tuple[str, str, str]]) -> list[dict]:
    """Jaccard of the update masks (bf16 bits changed vs the start) of pairs of runs.

    Args:
        root: the checkpoint folder (one sub-folder per run, with ``changed.safetensors``).
        pairs: ``(what, run a, run b)`` triples; ``what`` labels the row.
    """
    cache: dict[str, tuple[dict, dict]] = {}
    rows = []
    for what, a, b in pairs:
        for name in (a, b):
            if name not in cache:
                packed, numels, _ = bitmaps.load_bitmaps(
                    os.path.join(root, name, "changed.safetensors"))
                cache[name] = (packed, numels)
        (ma, numels), (mb, _) = cache[a], cache[b]
        inter = union = na = nb = 0
        for key in ma:
            x, y = ma[key], mb[key]
            inter += int(bitmaps.popcount(x & y))
            union += int(bitmaps.popcount(x | y))
            na += int(bitmaps.popcount(x))
            nb += int(bitmaps.popcount(y))
        row = analysis.jaccard_from_counts(inter, union, na, nb, sum(numels.values()))
        rows.append({"what": what, "a": a, "b": b, **row})
    return rows


def _environment(device: str) -> dict[str, str]:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "machine": platform.machine(), "cpu_threads": str(torch.get_num_threads())}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _index(results: Sequence[dict]) -> dict[tuple, dict]:
    return {(r["kind"], r["mode"], r["lr"], r["seed"]): r for r in results}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _pair_specs(config: Any, results: Sequence[dict]) -> list[tuple[str, str, str]]:
    idx = _index(results)
    main = lambda kind, mode: idx.get((kind, mode, config.lr, config.seed))  # noqa: E731
    pairs = []
    for kind in ("rl", "sft"):
        for m1, m2 in itertools.combinations(config.modes, 2):
            a, b = main(kind, m1), main(kind, m2)
            if a and b:
                pairs.append((f"{kind.upper()}: {m1} vs {m2}", a["name"], b["name"]))
    for mode in config.modes:
        a, b = main("rl", mode), main("sft", mode)
        if a and b:
            pairs.append((f"{mode}: RL vs SFT", a["name"], b["name"]))
    return pairs


def write_report(out: str, config: Any, results: Sequence[dict], *, warmup: dict | None,
                 wall_s: float, root: str, title: str, setup: Sequence[str],
                 model_label: str) -> list[str]:
    """Write the report files into ``out``; returns their paths.

    Args:
        out: output folder.
        config: the ablation's settings (:class:`~rlvr_optim.ablation.config.MiniLMAblation`).
        results: the runs' results (:func:`rlvr_optim.ablation.runs.measure_run` and more).
        warmup: the SFT phase's result, or None.
        wall_s: wall time of this invocation.
        root: checkpoint folder (for the change bitmaps).
        title: the report's title.
        setup: markdown lines describing the setting.
        model_label: "our model" in the comparison with the paper, e.g. "10.6M encoder weights".
    """
    os.makedirs(out, exist_ok=True)
    main = {(r["kind"], r["mode"]): r for r in results
            if r["lr"] == config.lr and r["seed"] == config.seed}
    jaccards = jaccard_pairs(root, _pair_specs(config, results))
    md: list[str] = [f"# {title}", ""]
    md += list(setup) + [""]

    md += ["## Update sparsity, RL vs SFT", "",
           f"Share of weights whose bf16 bits are identical to the start after {config.steps} "
           f"steps at lr {config.lr:g} (seed {config.seed}); the absolute-tolerance columns "
           "count |delta| <= 1e-5 instead. The eta = 1e-3 relative test of the paper's Def. 2.1 "
           "is the bitwise test (see rlvr_optim.analysis.unchanged_relative).", ""]
    rows = []
    for mode in config.modes:
        rl, sft = main.get(("rl", mode)), main.get(("sft", mode))
        if rl is None or sft is None:
            continue
        rows.append({
            "mode": mode, "rl": rl["sparsity"]["sparsity"], "sft": sft["sparsity"]["sparsity"],
            "rl_atol": rl["sparsity"]["sparsity_atol"],
            "sft_atol": sft["sparsity"]["sparsity_atol"],
            "rl_never": rl["series"]["never_changed_fraction"][-1],
            "sft_never": sft["series"]["never_changed_fraction"][-1],
            "rl_filtered": _mean(rl["series"]["filtered_fraction"]),
            "sft_filtered": _mean(sft["series"]["filtered_fraction"]),
        })
    md.append(analysis.markdown_table(
        rows, ["mode", "rl", "sft", "rl_atol", "sft_atol", "rl_never", "sft_never",
               "rl_filtered", "sft_filtered"],
        ["mode", "RL unchanged", "SFT unchanged", "RL abs. tol.", "SFT abs. tol.",
         "RL never changed", "SFT never changed", "RL filtered/step", "SFT filtered/step"],
        {k: _PCT for k in ("rl", "sft", "rl_atol", "sft_atol", "rl_never", "sft_never",
                           "rl_filtered", "sft_filtered")}))
    md += ["", "\"never changed\": no step changed the weight's bf16 bits (the optimizer's "
           "cumulative bitmaps); \"filtered/step\": mean share of the fp32 moves that bf16 "
           "storage did not show.", ""]

    md += ["## Training", ""]
    rows = []
    for mode in config.modes:
        for kind in ("rl", "sft"):
            r = main.get((kind, mode))
            if r is None:
                continue
            s = r["series"]
            rows.append({"run": f"{kind.upper()} {mode}", "acc": r.get("accuracy"),
                         "reward": _window(s.get("reward"), first=True),
                         "reward_end": _window(s.get("reward")),
                         "kl": s["kl"][-1], "changed": _mean(s["changed_fraction"]),
                         "wall": r["wall_s"]})
    start_acc = warmup.get("accuracy") if warmup else None
    md.append(analysis.markdown_table(
        rows, ["run", "acc", "reward", "reward_end", "kl", "changed", "wall"],
        ["run", "accuracy at the end" + (f" (start {start_acc:.1%})" if start_acc is not None
                                         else ""),
         "reward, first 10 steps", "reward, last 10 steps", "KL to start, last step",
         "changed/step", "run time (s)"],
        {"acc": ".1%", "reward": ".3f", "reward_end": ".3f", "kl": ".2e", "changed": _PCT,
         "wall": ".1f"}))
    md.append("")

    paper_lines = _paper_section(config, main, model_label)
    md += paper_lines

    md += ["## Principal and low-magnitude weights", "",
           f"Masks of the start weights per matrix: principal = top {config.alpha:g} of |rank-k "
           f"reconstruction| (k = {config.rank} of the smaller dimension), low-magnitude = bottom "
           f"{config.alpha:g} of |W0|. Overlap = |update & mask| / |mask|; a randomly placed "
           "update mask would give its own density (the baseline); lift = overlap / baseline. "
           f"\"top-{config.alpha:g} update\" takes the largest |delta| instead of the changed "
           f"bits, so its baseline is {config.alpha:g}.", ""]
    rows = []
    for mode in config.modes:
        for kind in ("rl", "sft"):
            r = main.get((kind, mode))
            if r is None or not r["geometry"].get("matrices"):
                continue
            g = r["geometry"]
            rows.append({"run": f"{kind.upper()} {mode}", "base": g["changed_baseline"],
                         "p": g["changed_in_principal"], "pl": g["changed_in_principal_lift"],
                         "l": g["changed_in_low_magnitude"],
                         "ll": g["changed_in_low_magnitude_lift"],
                         "tp": g["top_in_principal_lift"], "tl": g["top_in_low_magnitude_lift"]})
    md.append(analysis.markdown_table(
        rows, ["run", "base", "p", "pl", "l", "ll", "tp", "tl"],
        ["run", "changed (baseline)", "changed & principal", "lift", "changed & low-mag.",
         "lift", f"top-{config.alpha:g} update & principal, lift", "& low-mag., lift"],
        {"base": _PCT, "p": _PCT, "l": _PCT, "pl": ".2f", "ll": ".2f", "tp": ".2f", "tl": ".2f"}))
    md.append("")

    md += ["## Spectrum drift and subspace rotation", "",
           "Mean over weight matrices of ||sigma(W1) - sigma(W0)|| / ||sigma(W0)|| and of the "
           "largest principal angle between the top-k singular subspaces of W0 and W1.", ""]
    rows = [{"run": f"{kind.upper()} {mode}", "drift": r["geometry"]["spectrum_drift"],
             "left": r["geometry"]["angle_left"], "right": r["geometry"]["angle_right"]}
            for mode in config.modes for kind in ("rl", "sft")
            if (r := main.get((kind, mode))) is not None and r["geometry"].get("matrices")]
    md.append(analysis.markdown_table(
        rows, ["run", "drift", "left", "right"],
        ["run", "spectrum drift", "angle, left subspace (deg)", "angle, right subspace (deg)"],
        {"drift": ".3e", "left": ".3g", "right": ".3g"}))
    md.append("")

    md += ["## Per-layer sparsity", "", "Share unchanged per block (\"other\": the tensors "
           "outside the blocks, e.g. embeddings, final norm, head).", ""]
    md += [_per_group_table(config, main, "layers", "layer"), ""]
    md += ["## Per module type", ""]
    md += [_per_group_table(config, main, "modules", "module"), ""]

    if jaccards:
        md += ["## Jaccard of update masks", "",
               "Update mask = weights whose bf16 bits differ from the start. Baseline: two "
               "independent random masks of the same densities p, q give pq / (p + q - pq).", ""]
        md.append(analysis.markdown_table(
            jaccards, ["what", "jaccard", "baseline", "density_a", "density_b"],
            ["runs", "Jaccard", "independent baseline", "density a", "density b"],
            {"jaccard": ".3f", "baseline": ".3f", "density_a": _PCT, "density_b": _PCT}))
        md.append("")

    plots = _plots(out, config, main)
    if plots is None:
        md += ["(plots skipped: matplotlib is not installed)", ""]
    else:
        md += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
        md.append("")

    md += ["## Files", "", "- `results.json`: settings, environment and every table above.",
           "- `series.json`: every per-step series of every run (loss, reward, kl, "
           "changed_fraction, filtered_fraction, never_changed_fraction, unchanged_vs_start).",
           ""]
    env = _environment(config.device)
    md += ["## Environment", "", ", ".join(f"{k} {v}" for k, v in env.items())
           + f"; wall time of this invocation {wall_s:.1f} s, "
           f"training time summed over runs {sum(r['wall_s'] for r in results):.1f} s.", ""]

    paths = []
    md_path = os.path.join(out, "report.md")
    files.write_text(md_path, "\n".join(md))
    paths.append(md_path)
    summary = {
        "preset": config.name, "config": dataclasses.asdict(config), "environment": env,
        "wall_s": wall_s, "paper_table1": PAPER_TABLE1,
        "warmup": {k: v for k, v in (warmup or {}).items() if k != "series"},
        "runs": [{k: v for k, v in r.items() if k != "series"} for r in results],
        "jaccard": jaccards,
    }
    res_path = os.path.join(out, "results.json")
    files.write_json(res_path, summary, indent=1)
    series = {r["name"]: r["series"] for r in results}
    if warmup:
        series = {"warmup": warmup["series"], **series}
    series_path = os.path.join(out, "series.json")
    files.write_json(series_path, _rounded(series), separators=(",", ":"))
    return paths + [res_path, series_path] + list(plots or [])


def _rounded(series: Mapping[str, Mapping[str, list]]) -> dict:
    """Series with 7 significant digits (fractions of up to 10^7 weights stay exact enough)."""
    return {run: {k: [float(f"{v:.7g}") for v in values] for k, values in s.items()}
            for run, s in series.items()}


def _window(values: Sequence[float] | None, first: bool = False, n: int = 10) -> float | None:
    if not values:
        return None
    part = values[:n] if first else values[-n:]
    return sum(part) / len(part)


def _paper_section(config: Any, main: Mapping[tuple, dict], model_label: str) -> list[str]:
    lo_rl, hi_rl = PAPER_TABLE1["rl"]
    lo_sft, hi_sft = PAPER_TABLE1["sft"]
    rows = [{"source": "paper, Table 1 (public checkpoint pairs)",
             "rl": f"{lo_rl:.0%} - {hi_rl:.0%}", "sft": f"{lo_sft:.1%} - {hi_sft:.1%}"}]
    facts = []
    more = fewer = 0
    for mode in config.modes:
        rl, sft = main.get(("rl", mode)), main.get(("sft", mode))
        if rl is None or sft is None:
            continue
        a, b = rl["sparsity"]["sparsity"], sft["sparsity"]["sparsity"]
        rows.append({"source": f"ours, {mode} ({model_label})", "rl": f"{a:.2%}",
                     "sft": f"{b:.2%}"})
        more += a > b
        fewer += a < b
        rl_where = "inside" if lo_rl <= a <= hi_rl else "outside"
        sft_where = "inside" if lo_sft <= b <= hi_sft else "outside"
        facts.append(
            f"- {mode}: RL {a:.2%} unchanged ({rl_where} the paper's RL range), SFT {b:.2%} "
            f"({sft_where} its SFT range); RL - SFT = {100 * (a - b):+.2f} points.")
    lines = ["## Beside the paper", "",
             "\"The Path Not Taken\" (arXiv 2511.08567), Table 1, reports the share of bf16 "
             "weights bit-identical between public base and fine-tuned checkpoints of large "
             "language models. Ours is a toy at another scale (model size and steps in each "
             "row); read it for the direction of effects, not their size.", "",
             analysis.markdown_table(rows, ["source", "rl", "sft"],
                                     ["", "RL: unchanged", "SFT: unchanged"]), ""]
    lines += [f"RL left more weights unchanged than SFT in {more} of {more + fewer} modes "
              f"(fewer in {fewer})." if more + fewer else "No complete RL/SFT pair.", ""]
    lines += facts + [""]
    lifts = []
    for mode in config.modes:
        rl, sft = main.get(("rl", mode)), main.get(("sft", mode))
        if rl is None or sft is None or not rl["geometry"].get("matrices"):
            continue
        lifts.append(
            f"- {mode}: changed weights over-represented in the principal mask by x"
            f"{rl['geometry']['changed_in_principal_lift']:.2f} (RL) vs x"
            f"{sft['geometry']['changed_in_principal_lift']:.2f} (SFT); in the low-magnitude mask "
            f"by x{rl['geometry']['changed_in_low_magnitude_lift']:.2f} (RL) vs "
            f"x{sft['geometry']['changed_in_low_magnitude_lift']:.2f} (SFT); spectrum drift "
            f"{rl['geometry']['spectrum_drift']:.2e} (RL) vs "
            f"{sft['geometry']['spectrum_drift']:.2e} (SFT).")
    if lifts:
        lines += ["The paper finds RL updates off the principal weights and SFT on them, with "
                  "less spectrum drift under RL. Here (lift 1 = random placement):", ""]
        lines += lifts + [""]
    return lines


def _per_group_table(config: Any, main: Mapping[tuple, dict], key: str, label: str) -> str:
    columns, headers, rows_by_group = [label], [label], {}
    for mode in config.modes:
        for kind in ("rl", "sft"):
            r = main.get((kind, mode))
            if r is None:
                continue
            col = f"{kind}:{mode}"
            columns.append(col)
            headers.append(f"{kind.upper()} {mode}")
            for g in r[key]:
                group = g[label] if g[label] is not None else "other"
                rows_by_group.setdefault(group, {label: group})[col] = g["sparsity"]
    return analysis.markdown_table(list(rows_by_group.values()), columns, headers,
                                   {c: _PCT for c in columns[1:]})


def _plots(out: str, config: Any,
           main: Mapping[tuple, dict]) -> list[str] | None:
    folder = analysis.FigureFolder.open(out)
    if folder is None:
        return None
    plt, colors, save = folder.plt, folder.colors, folder.save

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), dpi=80)
    for i, mode in enumerate(config.modes):
        for kind, style in (("rl", "-"), ("sft", "--")):
            r = main.get((kind, mode))
            if r is None:
                continue
            s = r["series"]
            xs = range(1, len(s["unchanged_vs_start"]) + 1)
            label = f"{kind.upper()} {mode}"
            axes[0].plot(xs, [100 * v for v in s["unchanged_vs_start"]], style,
                         color=colors[i % len(colors)], label=label)
            axes[1].plot(xs, [100 * v for v in s["filtered_fraction"]], style,
                         color=colors[i % len(colors)], label=label)
            axes[2].plot(xs, s["kl"], style, color=colors[i % len(colors)], label=label)
    axes[0].set_ylabel("bf16 unchanged vs start (%)")
    axes[1].set_ylabel("fp32 moves filtered by bf16 (%)")
    axes[2].set_ylabel("KL to start policy (per token)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    save(fig, "series.png")

    rl_runs = [(mode, main[("rl", mode)]) for mode in config.modes
               if ("rl", mode) in main and "reward" in main[("rl", mode)]["series"]]
    if rl_runs:
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=80)
        for i, (mode, r) in enumerate(rl_runs):
            rewards = r["series"]["reward"]
            smooth = [_mean(rewards[max(0, j - 9): j + 1]) for j in range(len(rewards))]
            ax.plot(range(1, len(smooth) + 1), smooth, color=colors[i % len(colors)], label=mode)
        ax.set_xlabel("step")
        ax.set_ylabel("RL reward (10-step mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        save(fig, "reward.png")

    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=80)
    for i, mode in enumerate(config.modes):
        for kind, style in (("rl", "o-"), ("sft", "s--")):
            r = main.get((kind, mode))
            if r is None:
                continue
            layers = [g for g in r["layers"] if g["layer"] is not None]
            other = [g for g in r["layers"] if g["layer"] is None]
            xs = [g["layer"] for g in layers] + ([len(layers)] if other else [])
            ys = [100 * g["sparsity"] for g in layers + other]
            ax.plot(xs, ys, style, color=colors[i % len(colors)], label=f"{kind.upper()} {mode}")
    ax.set_xlabel("layer (last point: embeddings, final norm, head)")
    ax.set_ylabel("unchanged (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    save(fig, "sparsity_per_layer.png")

    runs = [(f"{kind.upper()}\n{mode}", main[(kind, mode)]) for mode in config.modes
            for kind in ("rl", "sft") if (kind, mode) in main
            and main[(kind, mode)]["geometry"].get("matrices")]
    if runs:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(runs)), 3.4), dpi=80)
        xs = range(len(runs))
        ax.bar([x - 0.2 for x in xs], [r["geometry"]["changed_in_principal_lift"] for _, r in runs],
               0.4, label="changed & principal")
        ax.bar([x + 0.2 for x in xs],
               [r["geometry"]["changed_in_low_magnitude_lift"] for _, r in runs], 0.4,
               label="changed & low-magnitude")
        ax.axhline(1.0, color="k", lw=1, ls=":", label="random placement")
        ax.set_xticks(list(xs), [label for label, _ in runs], fontsize=6)
        ax.set_ylabel("overlap / random baseline")
        ax.legend(fontsize=7)
        save(fig, "overlap_vs_random.png")

    return folder.paths
