"""Delta weight sync on a real RL trajectory: the optimizer's change mask against a snapshot.

Trainers that send only the changed weights to their inference engines find them today by
keeping a bf16 snapshot of the model and diffing it at each sync (TRL's delta sync keeps a
CPU snapshot per step; verl's ``delta_sharded`` byte-diffs each shard against a pinned CPU
snapshot and updates it). This benchmark runs both detectors on the same model, the same
steps, in the same run: :class:`rlvr_optim.sync.DeltaTracker` and a snapshot-and-diff
detector as verl does it (compare with the snapshot, gather the changed elements, update the
snapshot in place), each syncing every 1, 4 and 16 steps. Per sync it records the bytes
sent against the full bf16 model, the time to build the delta, and the host memory: what
each detector holds between syncs, and the most that the tensors its build makes (the
delta included) hold at once, counted in a second, identical run, so that counting does
not slow the timed one. Torch runs on one thread: on a shared 2-core machine, ops split
over two threads waited for the busy one (12 ms for a 5,000-element op, measured).

The trajectory is real: the ablation's causal LM (``rlvr_optim.ablation.lm``, the tiny
preset's sizes, and a wider one) learns fixed-width addition by cross-entropy, then trains
GRPO-style on its own samples (reward 1 for a right answer, advantages normalised within
each prompt's group) with bf16 weights and fp32 master weights at the paper's RL lr 1e-6
and at 1e-5. Every delta is checked as it goes: it holds every element the snapshot diff
finds, and a receiver fed the deltas stays bit-identical to the trainer.

    python -m rlvr_optim.sync_bench [--out bench/results] [--steps 48] [--device cpu]

writes ``OUT/<device type>/<UTC date>/delta-sync.json`` and ``.md``. CPU timings are
CPU-backend results of this machine only, and the outputs say so.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from . import AdamW, files
from .bitmaps import bitmap_bytes
from .ablation.lm import LMShape, forward, generate, init_weights
from .ablation.task import AdditionTask
from .sync import Delta, DeltaTracker, apply_delta, synced_values

__all__ = ["MODELS", "run", "main"]

INTERVALS = (1, 4, 16)
LRS = (1e-6, 1e-5)  # the paper's RL lr, and 10x
# The tiny ablation preset's model (rlvr_optim.ablation.config.LMAblation defaults) and a
# wider one of the same architecture, so that per-tensor overheads do not decide the rows;
# with their warm-up lr (the wide model learnt nothing in 300 steps at 3e-3, 13% of answers
# right at 1e-3; the tiny one's is the preset's).
MODELS = {
    "ablation-tiny": dict(hidden=32, layers=2, heads=2, intermediate=96, warmup_lr=1e-2),
    "ablation-wide": dict(hidden=256, layers=2, heads=4, intermediate=1024, warmup_lr=1e-3),
}


@dataclass
class _Settings:
    steps: int = 48
    warmup_steps: int = 300
    prompts: int = 8
    group: int = 8
    digits: int = 2
    seed: int = 0


class _PeakBytes(TorchDispatchMode):
    """The most bytes of tensor storage that ops made while active were alive at once.

    An output whose storage is one of its inputs' (a view, an in-place op) is not new; a
    storage is freed when the last output tensor that refers to it is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, referring outputs]
        self.current = 0
        self.peak = 0

    def _release(self, address: int) -> None:
        entry = self.live.get(address)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr()
                  for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            address = t.untyped_storage().data_ptr()
            if address in inputs or address == 0:
                continue
            entry = self.live.setdefault(address, [t.untyped_storage().nbytes(), 0])
            if entry[1] == 0:
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, address)
        return out


class _Snapshot:
    """The snapshot-and-diff detector: a bf16 copy of the weights at the last sync."""

    def __init__(self, params: dict[str, Tensor]) -> None:
        self.params = params
        self.copy = {n: synced_values(p).clone() for n, p in params.items()}

    @property
    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.copy.values())

    @torch.no_grad()
    def delta(self) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (int32 indices, values) of the changed elements; updates the snapshot."""
        out = {}
        for name, p in self.params.items():
            now = synced_values(p).reshape(-1)
            old = self.copy[name].reshape(-1)
            indices = torch.nonzero(now.view(torch.int16) != old.view(torch.int16)).reshape(-1)
            if indices.numel():
                out[name] = (indices.to(torch.int32), now[indices])
            old.copy_(now)
        return out


def _shape(model: str, task: AdditionTask) -> LMShape:
    sizes = {k: v for k, v in MODELS[model].items() if k != "warmup_lr"}
    return LMShape(vocab=task.vocab_size, max_length=task.prompt_length + task.answer_length,
                   **sizes)


def _warmup(shape: LMShape, task: AdditionTask, s: _Settings, lr: float) -> dict[str, Tensor]:
    """fp32 cross-entropy training on addition (cosine lr to 0), as the ablation's warm-up."""
    weights = {n: t.unsqueeze(0).requires_grad_() for n, t in init_weights(shape, s.seed).items()}
    opt = torch.optim.AdamW(weights.values(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 1)
    for step in range(s.warmup_steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / s.warmup_steps))
        prompts, answers = task.sample(64, gen)
        ids = torch.cat([prompts, answers], dim=1)[None]
        logits = forward(weights, ids[:, :, :-1], shape)[:, :, task.prompt_length - 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, shape.vocab),
                                                 ids[:, :, task.prompt_length:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: t.detach() for n, t in weights.items()}


def _rl_step(params: dict[str, Tensor], opt, shape: LMShape, task: AdditionTask,
             s: _Settings, gen: torch.Generator) -> float:
    """One GRPO-style step on the model's own samples; returns the mean reward."""
    prompts, answers = task.sample(s.prompts, gen)
    prompts = prompts.repeat_interleave(s.group, 0)[None]
    answers = answers.repeat_interleave(s.group, 0)
    seq = generate(params, prompts, task.answer_length, shape, [gen])
    completions = seq[0, :, task.prompt_length:]
    reward = task.reward(completions, answers)
    grouped = reward.view(s.prompts, s.group)
    advantages = ((grouped - grouped.mean(1, keepdim=True))
                  / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)
    logits = forward(params, seq[:, :, :-1], shape)[0, :, task.prompt_length - 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
    loss = -(advantages * logp.sum(-1)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(reward.mean())


def _trajectory(model: str, lr: float, start: dict[str, Tensor], shape: LMShape,
                task: AdditionTask, s: _Settings, count_bytes: bool) -> dict[str, Any]:
    """One RL run from ``start`` with a tracker and a snapshot detector per interval."""
    params = {n: torch.nn.Parameter(t.to(torch.bfloat16)) for n, t in start.items()}
    opt = AdamW(list(params.items()), lr=lr, weight_decay=0.0, master_weights="fp32",
                track_changes="step")
    trackers = {k: DeltaTracker(opt, params.items()) for k in INTERVALS}
    snapshots = {k: _Snapshot(params) for k in INTERVALS}
    engines = {k: {n: synced_values(p).clone() for n, p in params.items()} for k in INTERVALS}
    syncs = {k: [] for k in INTERVALS}
    rewards = []
    gen = torch.Generator().manual_seed(s.seed + 2)
    for step in range(1, s.steps + 1):
        rewards.append(_rl_step(params, opt, shape, task, s, gen))
        for k in INTERVALS:
            if step % k:
                continue
            counter = _PeakBytes() if count_bytes else None
            start_time = time.perf_counter()
            if counter:
                with counter:
                    delta = trackers[k].collect()
            else:
                delta = trackers[k].collect()
            ours_ms = (time.perf_counter() - start_time) * 1e3
            ours_bytes = counter.peak if counter else None
            counter = _PeakBytes() if count_bytes else None
            start_time = time.perf_counter()
            if counter:
                with counter:
                    diff = snapshots[k].delta()
            else:
                diff = snapshots[k].delta()
            snapshot_ms = (time.perf_counter() - start_time) * 1e3
            snapshot_bytes = counter.peak if counter else None
            file_bytes = len(delta.to_bytes())
            apply_delta(engines[k], Delta.from_bytes(delta.to_bytes()))
            syncs[k].append({
                "step": step, "changed": delta.changed, "snapshot_changed": sum(
                    i.numel() for i, _ in diff.values()),
                "covers_diff": all(set(i.tolist()) <= set(delta.indices[n].tolist())
                                   for n, (i, _) in diff.items()),
                "receiver_identical": all(torch.equal(engines[k][n].view(torch.int16),
                                                      synced_values(p).view(torch.int16))
                                          for n, p in params.items()),
                "payload_bytes": delta.nbytes, "file_bytes": file_bytes,
                "snapshot_payload_bytes": sum(i.numel() * 4 + v.numel() * v.element_size()
                                              for i, v in diff.values()),
                "ours_ms": ours_ms, "snapshot_ms": snapshot_ms,
                "ours_peak_bytes": ours_bytes, "snapshot_peak_bytes": snapshot_bytes,
            })
    numel = sum(p.numel() for p in params.values())
    held_ours = sum(bitmap_bytes(p.numel()) for p in params.values())  # one tracker's window
    return {"model": model, "lr": lr, "numel": numel, "tensors": len(params),
            "full_bf16_bytes": 2 * numel, "held_bytes_ours": held_ours,
            "held_bytes_snapshot": snapshots[1].held_bytes, "mean_reward": rewards,
            "syncs": syncs}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _rows(runs: list[dict], counted: list[dict]) -> list[dict]:
    rows = []
    for run, count in zip(runs, counted):
        for k in INTERVALS:
            syncs, extra = run["syncs"][k], count["syncs"][k]
            if not syncs:
                continue
            same_run = [a["changed"] for a in syncs] == [b["changed"] for b in extra]
            rows.append({
                "model": run["model"], "params": run["numel"], "tensors": run["tensors"],
                "lr": run["lr"], "mean_reward": statistics.mean(run["mean_reward"]),
                "sync_every": k, "syncs": len(syncs),
                "changed_fraction": _median([x["changed"] / run["numel"] for x in syncs]),
                "full_bf16_bytes": run["full_bf16_bytes"],
                "payload_bytes": _median([x["payload_bytes"] for x in syncs]),
                "file_bytes": _median([x["file_bytes"] for x in syncs]),
                "snapshot_payload_bytes": _median([x["snapshot_payload_bytes"] for x in syncs]),
                "file_to_full": _median([x["file_bytes"] / run["full_bf16_bytes"] for x in syncs]),
                "ours_ms": _median([x["ours_ms"] for x in syncs]),
                "ours_ms_min": min(x["ours_ms"] for x in syncs),
                "ours_ms_max": max(x["ours_ms"] for x in syncs),
                "snapshot_ms": _median([x["snapshot_ms"] for x in syncs]),
                "snapshot_ms_min": min(x["snapshot_ms"] for x in syncs),
                "snapshot_ms_max": max(x["snapshot_ms"] for x in syncs),
                "held_bytes_ours": run["held_bytes_ours"],
                "held_bytes_snapshot": run["held_bytes_snapshot"],
                "ours_peak_bytes": _median([x["ours_peak_bytes"] for x in extra]),
                "snapshot_peak_bytes": _median([x["snapshot_peak_bytes"] for x in extra]),
                "peak_bytes_from_identical_run": same_run,
                "extra_elements_sent": sum(x["changed"] - x["snapshot_changed"] for x in syncs),
                "verified": all(x["covers_diff"] and x["receiver_identical"] for x in syncs),
            })
    return rows


def _machine() -> dict[str, Any]:
    from .bench import environment

    env = environment("cpu")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        env["cpu_model"] = names[0] if names else platform.processor()
    except OSError:
        env["cpu_model"] = platform.processor()
    env["cpu_count"] = os.cpu_count()
    env["torch_threads"] = torch.get_num_threads()
    env["node"] = platform.node()
    return env


def run(models=tuple(MODELS), steps: int = 48, warmup_steps: int = 300,
        progress: bool = True) -> dict[str, Any]:
    """Run the benchmark on CPU; returns ``{"environment", "settings", "rows", "runs"}``."""
    s = _Settings(steps=steps, warmup_steps=warmup_steps)
    torch.set_num_threads(1)
    machine = _machine()
    task = AdditionTask(s.digits)
    runs, counted = [], []
    for model in models:
        shape = _shape(model, task)
        start = _warmup(shape, task, s, MODELS[model]["warmup_lr"])
        for lr in LRS:
            if progress:
                print(f"{model} lr {lr:g}: {steps} steps, timed run", flush=True)
            runs.append(_trajectory(model, lr, start, shape, task, s, count_bytes=False))
            if progress:
                print(f"{model} lr {lr:g}: {steps} steps, counting run", flush=True)
            counted.append(_trajectory(model, lr, start, shape, task, s, count_bytes=True))
    settings = {"steps": s.steps, "warmup_steps": s.warmup_steps, "intervals": list(INTERVALS),
                "lrs": list(LRS), "prompts": s.prompts, "group": s.group, "digits": s.digits,
                "mode": "bf16 params, fp32 master weights, nearest rounding",
                "snapshot_detector": "verl-style: bf16 snapshot, compare, gather, update in place",
                "models": {m: MODELS[m] for m in models}}
    return {"environment": machine, "settings": settings,
            "cpu_timings_are_not_performance_results": True,
            "rows": _rows(runs, counted), "runs": runs}


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def markdown(result: dict[str, Any]) -> str:
    """The rows as a markdown table, with the machine and what the columns mean."""
    env = result["environment"]
    lines = [
        "# Delta weight sync: the optimizer's change mask vs snapshot-and-diff (CPU)",
        "",
        f"CPU rows: {env['cpu_model']}, {env['cpu_count']} cores, {env['torch_threads']} torch "
        f"threads, torch {env['torch']}, commit {env.get('commit')}, {env['date']}. CPU "
        "timings are CPU-backend results of this shared machine, not performance results.",
        "",
        f"Model: the ablation's LM, {result['settings']['mode']}; "
        f"{result['settings']['steps']} GRPO-style steps after a cross-entropy warm-up; the "
        "same run feeds our trackers and the snapshot detectors. Medians over the syncs "
        "(time: median [min, max]). \"reward\": the run's mean reward (share of right answers). "
        "\"payload\": int32 index + bf16 value per changed element; "
        "\"sent\": the delta file (TRL's sparse safetensors: the payload and a header of names, "
        "shapes and checksums) against the full bf16 model. "
        "\"held\": memory a detector keeps between syncs (our window bitmap; the snapshot). "
        "\"peak\": the most bytes the tensors made by one build (the delta included) held at "
        "once.",
        "",
        "| model | params | lr | reward | sync every | changed | payload | sent | full bf16 | "
        "sent / full | "
        "build ours ms | build snapshot ms | held ours | held snapshot | peak ours | "
        "peak snapshot | checked |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['lr']:g} | {r['mean_reward']:.2f} | "
            f"{r['sync_every']} | "
            f"{r['changed_fraction']:.3%} | {_size(r['payload_bytes'])} | "
            f"{_size(r['file_bytes'])} | "
            f"{_size(r['full_bf16_bytes'])} | {r['file_to_full']:.2%} | "
            f"{r['ours_ms']:.2f} [{r['ours_ms_min']:.2f}, {r['ours_ms_max']:.2f}] | "
            f"{r['snapshot_ms']:.2f} [{r['snapshot_ms_min']:.2f}, {r['snapshot_ms_max']:.2f}] | "
            f"{_size(r['held_bytes_ours'])} | {_size(r['held_bytes_snapshot'])} | "
            f"{_size(r['ours_peak_bytes'])} | {_size(r['snapshot_peak_bytes'])} | "
            f"{'yes' if r['verified'] else 'NO'} |")
    lines += ["", "checked: every delta held every element the snapshot diff found, and a "
              "receiver fed the deltas (through their bytes) stayed bit-identical to the trainer."]
    return "\n".join(lines) + "\n"


def save(result: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``OUT/cpu/<UTC date>/delta-sync.json`` and ``.md``; returns the JSON path."""
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    folder = Path(out) / "cpu" / day
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "delta-sync.json"
    files.write_json(path, result, indent=1)
    files.write_text(path.with_suffix(".md"), markdown(result))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlvr_optim.sync_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results",
                        help="results folder (default bench/results); files go to OUT/cpu/<date>/")
    parser.add_argument("--steps", type=int, default=48, help="RL steps per run (default 48)")
    parser.add_argument("--warmup-steps", type=int, default=300,
                        help="cross-entropy warm-up steps (default 300)")
    parser.add_argument("--model", action="append", choices=sorted(MODELS),
                        help="model, repeatable (default: all)")
    args = parser.parse_args(argv)
    result = run(tuple(args.model or MODELS), steps=args.steps, warmup_steps=args.warmup_steps)
    path = save(result, args.out)
    print(markdown(result))
    print(f"wrote {path} (+ .md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
