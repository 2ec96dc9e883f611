"""``run_ablation``: train every run of a preset, resumably, and write the report."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from .. import files
from ..errors import InputError
from ..optimizer import format_table
from .config import LMAblation, MiniLMAblation, fingerprint
from .cohorts import load_starts, run_cohort
from .lm_report import format_lm_summary, write_lm_report
from .report import write_report
from .runs import Interrupted, StepBudget, Workspace
from .task import AdditionTask

__all__ = ["format_summary", "run_ablation", "run_for_cli"]


def run_ablation(config: LMAblation | MiniLMAblation, out: str, *, resume: bool = False,
                 progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Run a precision ablation and write ``report.md``, ``results.json``, ``series.json``, PNGs.

    Args:
        config: the settings (:data:`rlvr_optim.ablation.PRESETS` or your own).
        out: output folder; checkpoints go to ``<out>/checkpoints``.
        resume: continue from the checkpoints in ``out`` (finished runs are not rerun).
            Without it every run starts from scratch and overwrites them.
        progress: a tqdm bar over all training iterations on stderr (default True).
        stop_after: stop after this many training iterations, as an interruption would (the
            last checkpoints stay; ``resume=True`` continues). None: run to the end. An
            iteration is (LM presets) a warm-up step of a start that is not a committed file,
            one rollout or as many SFT steps (``updates`` optimizer steps), or (minilm) one
            step.

    Returns ``{"interrupted", "wall_s", "warmup", "results", "files"}``; ``results`` holds one
    dict per run (``name, kind, mode, lr, seed, sparsity, geometry, series, ...``; LM runs
    also ``arm, label, start, data, kl_coef, freeze, master_geometry``, the accuracies,
    rewards, KL and clipped share of :func:`rlvr_optim.ablation.cohorts.run_cohort`);
    ``warmup`` is, for LM presets, the list of :class:`~rlvr_optim.ablation.cohorts.Start`.
    An interrupted run also has ``saved``, what a resume would start from
    (:meth:`Workspace.saved`).

    ``out`` is locked while the ablation runs (:func:`rlvr_optim.files.folder_lock`): a
    second ablation on it raises :class:`~rlvr_optim.errors.InputError`.
    """
    t0 = time.perf_counter()
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"preset {config.name!r} runs on {config.device!r}, and torch sees no "
                           "CUDA device here; pass device='cpu' (--device cpu) to run it on the "
                           "CPU, slowly")
    with files.folder_lock(out):
        return _run_locked(config, out, resume, progress, stop_after, t0)


def _run_locked(config: LMAblation | MiniLMAblation, out: str, resume: bool, progress: bool,
                stop_after: int | None, t0: float) -> dict[str, Any]:
    """:func:`run_ablation` once ``out`` is locked."""
    root = os.path.join(out, "checkpoints")
    workspace = Workspace(root, fingerprint(config), resume)
    budget = StepBudget(stop_after)
    threads = torch.get_num_threads()
    if config.threads is not None:
        # Small tensors gain nothing from a thread pool, and a fixed count keeps CPU results
        # bit-reproducible across an interruption.
        torch.set_num_threads(config.threads)
    bar = tqdm(total=config.total_steps(), desc=f"ablation {config.name}", file=sys.stderr,
               disable=not progress, smoothing=0.0)
    try:
        if isinstance(config, MiniLMAblation):
            from .minilm import run_minilm

            warmup, results, setup, label = run_minilm(config, workspace, budget, bar)
            title = "RL vs cross-entropy on all-MiniLM-L6-v2 (precision ablation)"
        else:
            task = AdditionTask(config.digits)
            starts = load_starts(config, workspace, budget, bar)
            by_seed = {s.seed: s for s in starts}
            results = [r for cohort in config.cohorts()
                       for r in run_cohort(config, cohort, task, by_seed[cohort[3]], workspace,
                                           budget, bar)]
            warmup = starts
    except Interrupted:
        return {"interrupted": True, "wall_s": time.perf_counter() - t0, "warmup": None,
                "results": [], "files": [], "saved": workspace.saved()}
    finally:
        bar.close()
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    with files.atomic_files(out) as temp:  # the report's files together, or none of them
        if isinstance(config, MiniLMAblation):
            written = write_report(str(temp), config, results, warmup=warmup, wall_s=wall,
                                   root=root, title=title, setup=setup, model_label=label)
        else:
            written = write_lm_report(str(temp), config, results, warmup=warmup, wall_s=wall)
    return {"interrupted": False, "wall_s": wall, "warmup": warmup, "results": results,
            "files": [os.path.join(out, os.path.basename(p)) for p in written]}


def format_summary(summary: dict[str, Any], config: Any) -> str:
    """The headline table for the terminal, with its legend."""
    if isinstance(config, MiniLMAblation):
        return _minilm_summary(summary, config)
    return format_lm_summary(summary, config)


def _minilm_summary(summary: dict[str, Any], config: MiniLMAblation) -> str:
    main = {(r["kind"], r["mode"]): r for r in summary["results"]
            if r["lr"] == config.lr and r["seed"] == config.seed}
    rows = []
    for mode in config.modes:
        rl, sft = main.get(("rl", mode)), main.get(("sft", mode))
        if rl is None or sft is None:
            continue
        rows.append({"mode": mode,
                     "RL unchanged": f"{rl['sparsity']['sparsity']:.2%}",
                     "SFT unchanged": f"{sft['sparsity']['sparsity']:.2%}",
                     "RL accuracy": f"{rl['accuracy']:.1%}",
                     "SFT accuracy": f"{sft['accuracy']:.1%}"})
    return format_table(rows)


def run_for_cli(config: Any, out: str, *, resume: bool = False, progress: bool = True,
                stop_after: int | None = None) -> int:
    """Run an ablation for the command line: print the headline table and where the report
    went; returns the exit status. A missing optional dependency or a setting this machine
    cannot run raises :class:`~rlvr_optim.errors.InputError` (the command line prints it as one
    line and exits 2)."""
    try:
        summary = run_ablation(config, out, resume=resume, progress=progress,
                               stop_after=stop_after)
    except ImportError as e:
        raise InputError(f"{e}; pip install -e \".[ablation]\" (or \".[minilm]\" for the "
                         "minilm preset)") from None
    if summary["interrupted"]:
        if summary["saved"]:
            print(f"stopped after {stop_after} training steps; continue with --resume from "
                  f"{os.path.join(out, 'checkpoints')}: {', '.join(summary['saved'])}")
        else:
            print(f"stopped after {stop_after} training steps, before the first checkpoint "
                  f"(a run writes one every {config.checkpoint_every} steps, "
                  "--checkpoint-every): nothing is saved, and --resume would start over")
        return 0
    print(format_summary(summary, config))
    print(f"\nreport: {os.path.join(out, 'report.md')} ({summary['wall_s']:.0f} s)")
    return 0
