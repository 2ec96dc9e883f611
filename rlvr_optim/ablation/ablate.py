"""``run_ablation``: train every run of a preset, resumably, and write the report."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from ..optimizer import format_table
from .config import LMAblation, MiniLMAblation, fingerprint
from .report import write_report
from .runs import Interrupted, StepBudget, Workspace, run_lm_unit, run_warmup
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
        progress: a tqdm bar over all training steps on stderr (default True).
        stop_after: stop after this many training steps, as an interruption would (the
            last checkpoints stay; ``resume=True`` continues). None: run to the end.

    Returns ``{"interrupted", "wall_s", "warmup", "results", "files"}``; ``results`` holds one
    dict per run (``name, kind, mode, lr, seed, sparsity, accuracy, geometry, series, ...``).
    """
    t0 = time.perf_counter()
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"preset {config.name!r} runs on {config.device!r}, and torch sees no "
                           "CUDA device here; pass device='cpu' (--device cpu) to run it on the "
                           "CPU, slowly")
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
            start, warmup = run_warmup(config, task, workspace, budget, bar)
            results = [run_lm_unit(config, spec, task, start, workspace, budget, bar)
                       for spec in config.runs()]
            setup = _lm_setup(config, warmup)
            label = f"{warmup['params'] / 1e3:.0f}k params, {config.steps} steps"
            if warmup["params"] >= 1e6:
                label = f"{warmup['params'] / 1e6:.1f}M params, {config.steps} steps"
            title = f"Precision ablation, preset `{config.name}`"
    except Interrupted:
        return {"interrupted": True, "wall_s": time.perf_counter() - t0, "warmup": None,
                "results": [], "files": []}
    finally:
        bar.close()
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    files = write_report(out, config, results, warmup=warmup, wall_s=wall, root=root,
                         title=title, setup=setup, model_label=label)
    return {"interrupted": False, "wall_s": wall, "warmup": warmup, "results": results,
            "files": files}


def _lm_setup(config: LMAblation, warmup: dict) -> list[str]:
    task = AdditionTask(config.digits)
    n_runs = len(config.runs())
    return [
        f"- Model: Llama-style causal LM from a `transformers` config, {warmup['params']:,} "
        f"parameters (hidden {config.hidden}, {config.layers} layers, {config.heads} heads, MLP "
        f"{config.intermediate}), vocabulary of {task.vocab_size} tokens (own tokenizer).",
        f"- Task: {config.digits}-digit addition, fixed width (`<bos>{'1' * config.digits}+"
        f"{'2' * config.digits}=` -> `{'0' + '3' * config.digits}<eos>`); reward 1 when the "
        "whole answer is exact.",
        f"- SFT phase (gives the model structure): {config.warmup_steps} steps of cross-entropy in "
        f"fp32, lr {config.warmup_lr:g}, batch {config.warmup_batch}; its bf16 image is the "
        f"start of every run (greedy accuracy {warmup['accuracy']:.1%} on {config.eval_problems} "
        "held-out problems).",
        f"- RLVR: GRPO-style, {config.prompts} prompts x {config.group} samples per step, "
        f"advantages normalised within each group, temperature {config.temperature:g}, "
        f"KL coefficient {config.kl_coef:g} (the KL to the start policy is logged either way); "
        f"one policy-gradient step per batch.",
        f"- SFT contrast: cross-entropy on {config.prompts * config.group} fresh problems per "
        "step, same start, steps, learning rate and optimizer.",
        f"- Optimizer: rlvr_optim.AdamW, betas (0.9, 0.999), eps 1e-8, weight decay "
        f"{config.weight_decay:g}, {config.steps} steps per run, {n_runs} runs.",
        "- Precision modes: " + "; ".join(config.modes) + ". \"fp32 (bf16 images)\" trains "
        "fp32 weights and measures their bf16 images, what a bf16 checkpoint would hold.",
    ]


def format_summary(summary: dict[str, Any], config: Any) -> str:
    """The headline table for the terminal: sparsity and accuracy per mode, RL vs SFT."""
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
    went; returns the exit status (1, with the message on stderr, for a missing dependency
    or a bad setting)."""
    try:
        summary = run_ablation(config, out, resume=resume, progress=progress,
                               stop_after=stop_after)
    except (ImportError, ValueError, RuntimeError) as e:
        print(f"rlvr-optim ablate: error: {e}", file=sys.stderr)
        return 1
    if summary["interrupted"]:
        print(f"stopped after {stop_after} training steps; checkpoints are in "
              f"{os.path.join(out, 'checkpoints')}, continue with --resume")
        return 0
    print(format_summary(summary, config))
    print(f"\nreport: {os.path.join(out, 'report.md')} ({summary['wall_s']:.0f} s)")
    return 0
