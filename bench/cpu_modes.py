"""Step time of the CPU backend in every mode beside ``torch.optim.AdamW(fused=True)`` on the
same params: a benchmark of the CPU backend (CPU-backend results only; they say nothing
about GPU speed), not a test.

The model: 14.0e6 elements in 27 tensors (an 8192 x 512 embedding, three transformer layers
of width 512 with a 4x MLP and two norms each, a final norm and a 768 x 512 head), bf16
params and grads (fp32 for the ``fp32 params`` modes, float16 for the ``fp16`` ones). Every mode has its own copy of the
model's params (the same values) and its own optimizer over them, and its anchor is torch's
fused AdamW over that copy with the options torch has (amsgrad, maximize, grad_scale / found_inf); modes torch
has no counterpart for (stochastic rounding, masters, remainders, freeze masks, change
tracking) are compared with plain torch fused on the same params.

The machine is shared, and a 2-core VM's speed drifts by tens of percent within seconds, so
every optimizer (ours and the anchors) is built first and then timed in rounds: each round
times one step of each, in an order rotated from round to round. A row reports the median
step time over the rounds with its min and max, and the ratio ours / anchor as the median of
the per-round ratios (each from one round, seconds apart) with their min and max. The load
average (``os.getloadavg``) is recorded before and after.

    python bench/cpu_modes.py [--threads 2] [--rounds 15] [--mode NAME ...] [--note TEXT]
                              [--cpu-time] [--out DIR]

``--cpu-time`` times each step by the process's CPU time (``time.process_time``) instead
of the wall clock: with one thread, what the step itself costs, less exposed to a loaded
machine's preemptions (with more threads it sums theirs).

``--out DIR`` writes ``DIR/cpu_modes.json`` (every number, the environment) and
``DIR/cpu_modes.md`` (the table); without it the table is printed only. ``--note`` adds a
line of context (what was built, how loaded the machine was) to both.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlvr_optim import AdamW, cpu_backend
from rlvr_optim.files import write_json, write_text

WIDTH, LAYERS, VOCAB, HEAD = 512, 3, 8192, 768


def model_shapes() -> list[tuple[int, ...]]:
    """14,028,288 elements in 27 tensors."""
    layer = [(WIDTH, WIDTH)] * 4 + [(4 * WIDTH, WIDTH), (WIDTH, 4 * WIDTH), (WIDTH,), (WIDTH,)]
    return [(VOCAB, WIDTH)] + layer * LAYERS + [(WIDTH,), (HEAD, WIDTH)]


# name -> (our AdamW options, torch AdamW options, param dtype, freeze mask, grad scaler).
MODES: dict[str, tuple[dict, dict, torch.dtype, bool, bool]] = {
    "default (bf16)": ({}, {}, torch.bfloat16, False, False),
    "default, track step": ({"track_changes": "step"}, {}, torch.bfloat16, False, False),
    "fp32 params": ({}, {}, torch.float32, False, False),
    "stochastic": ({"rounding": "stochastic"}, {}, torch.bfloat16, False, False),
    "stochastic + fp32 states": ({"rounding": "stochastic", "state_dtype": torch.float32}, {},
                                 torch.bfloat16, False, False),
    "fp32 master": ({"master_weights": "fp32"}, {}, torch.bfloat16, False, False),
    "stochastic + fp32 master + cumulative": (
        {"rounding": "stochastic", "master_weights": "fp32", "track_changes": "cumulative"}, {},
        torch.bfloat16, False, False),
    "remainder": ({"master_weights": "remainder"}, {}, torch.bfloat16, False, False),
    "remainder + track step": ({"master_weights": "remainder", "track_changes": "step"}, {},
                               torch.bfloat16, False, False),
    "freeze mask": ({}, {}, torch.bfloat16, True, False),
    "freeze mask + track step": ({"track_changes": "step"}, {}, torch.bfloat16, True, False),
    "amsgrad": ({"amsgrad": True}, {"amsgrad": True}, torch.bfloat16, False, False),
    "maximize": ({"maximize": True}, {"maximize": True}, torch.bfloat16, False, False),
    "grad_scale + found_inf": ({}, {}, torch.bfloat16, False, True),
    "fp32 params, amsgrad + track step": ({"amsgrad": True, "track_changes": "step"},
                                          {"amsgrad": True}, torch.float32, False, False),
    # float16 params (and grads): the options that send them through the fused backends
    # (docs/fp16.md); the anchor is torch fused over the same float16 params (its states
    # float16, ours fp32 unless state_dtype says bf16).
    "fp16 stochastic": ({"rounding": "stochastic"}, {}, torch.float16, False, False),
    "fp16 fp32 states": ({"state_dtype": torch.float32}, {}, torch.float16, False, False),
    "fp16 bf16 states": ({"state_dtype": torch.bfloat16}, {}, torch.float16, False, False),
    "fp16 fp32 master": ({"master_weights": "fp32"}, {}, torch.float16, False, False),
    "fp16 stochastic + fp32 master + cumulative": (
        {"rounding": "stochastic", "master_weights": "fp32", "track_changes": "cumulative"}, {},
        torch.float16, False, False),
    "fp16 stochastic + bf16 states + track step": (
        {"rounding": "stochastic", "state_dtype": torch.bfloat16, "track_changes": "step"}, {},
        torch.float16, False, False),
    "fp16 freeze mask + track step": ({"state_dtype": torch.float32, "track_changes": "step"},
                                      {}, torch.float16, True, False),
    "fp16 amsgrad": ({"state_dtype": torch.float32, "amsgrad": True}, {"amsgrad": True},
                     torch.float16, False, False),
    "fp16 grad_scale + found_inf": ({"state_dtype": torch.float32}, {}, torch.float16, False,
                                    True),
    "fp32 params, fp16 change image + track step": (
        {"change_dtype": torch.float16, "track_changes": "step"}, {}, torch.float32, False,
        False),
}

LR, WEIGHT_DECAY = 1e-4, 0.01


def _params(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in model_shapes():
        p = (torch.randn(shape, generator=gen) * 0.02).to(dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
        out.append(p)
    return out


CLOCK = time.perf_counter  # main() sets time.process_time for --cpu-time


class Timed:
    """One optimizer to step, and its step times."""

    def __init__(self, name: str, opt: torch.optim.Optimizer, scaler: bool):
        self.name, self.opt, self.times = name, opt, []
        if scaler:  # what GradScaler hands a fused optimizer: a scale and a found_inf flag
            opt.grad_scale = torch.tensor(1024.0)
            opt.found_inf = torch.tensor(0.0)

    def step(self) -> float:
        start = CLOCK()
        self.opt.step()
        return CLOCK() - start


def build(modes: list[str]) -> list[tuple[str, Timed, Timed]]:
    """(mode, ours, anchor) for each mode, over a param set of its own: with one set
    shared by a dozen of our optimizers, ours took 1.6-1.9x as long per step as with four
    (bench/results/cpu/2026-12-07/cpu_modes), an effect of the sharing that a training
    loop, one optimizer per param, never meets."""
    rows = []
    for mode in modes:
        ours_options, torch_options, dtype, freeze, scaler = MODES[mode]
        ps = _params(dtype, seed=0)
        ours = AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, backend="cpu", **ours_options)
        if freeze:
            gen = torch.Generator().manual_seed(7)
            for p in ps:
                ours.set_freeze_mask(p, torch.rand(p.shape, generator=gen) < 0.5)
        anchor = torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, fused=True,
                                   **torch_options)
        rows.append((mode, Timed(mode, ours, scaler), Timed("torch fused", anchor, scaler)))
    return rows


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(modes: list[str], rounds: int, warmup: int) -> dict:
    rows = build(modes)
    # The CPU backend keeps the checks of its last few calls; with a dozen optimizers taking
    # turns each step would miss them and check every tensor again, which a single
    # optimizer in a training loop never does. Room for all of them: the steady state.
    calls = getattr(cpu_backend, "_checked_calls", None)
    if calls is not None and hasattr(calls, "capacity"):
        calls.capacity = max(calls.capacity, len(rows) + 4)
    timed = [t for _, ours, anchor in rows for t in (ours, anchor)]
    for _ in range(warmup):
        for t in timed:
            t.step()
    load_before = os.getloadavg()
    for r in range(rounds):
        shift = r % len(timed)
        for t in timed[shift:] + timed[:shift]:
            t.times.append(t.step())
    load_after = os.getloadavg()
    result = []
    for mode, ours, anchor in rows:
        ratios = [a / b for a, b in zip(ours.times, anchor.times)]
        result.append({
            "mode": mode,
            "ours_ms": _spread([1e3 * x for x in ours.times]),
            "torch_fused_ms": _spread([1e3 * x for x in anchor.times]),
            "ratio": _spread(ratios),
        })
    return {"rows": result, "load_before": load_before, "load_after": load_after}


def environment(threads: int, rounds: int, note: str | None) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
        flags = open("/proc/cpuinfo").read()
        isa = [x for x in ("avx512f", "avx2") if f" {x} " in flags]
    except OSError:
        isa = []
    return {
        "what": "CPU-backend results (rlvr_optim backend='cpu' vs torch.optim.AdamW(fused=True) "
                "on CPU tensors); not GPU results",
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "cpu": cpu,
        "cpu_flags": isa,
        "cpu_extension_isa": cpu_backend.load_extension().ISAS[0],
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "rounds": rounds,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "elements": sum(torch.Size(s).numel() for s in model_shapes()),
        "tensors": len(model_shapes()),
        "note": note,
    }


def render(env: dict, res: dict) -> str:
    lines = [
        f"# CPU backend vs torch fused AdamW, every mode ({env['utc']})",
        "",
        f"CPU-backend results: {env['cpu']} ({env['logical_cpus']} logical CPUs, shared), "
        f"{env['threads']} threads, extension ISA {env['cpu_extension_isa']}, torch "
        f"{env['torch']}, commit {env['commit']}. Model: {env['elements']:,} elements in "
        f"{env['tensors']} tensors. {env['rounds']} interleaved rounds, {env.get('clock', 'wall')} clock; "
        "median (min-max). "
        f"Load average before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f} "
        "(1-minute).",
        "",
        *([env["note"], ""] if env.get("note") else []),
        "| mode | ours ms | torch fused ms | ours / torch (per round) |",
        "|---|---|---|---|",
    ]
    for row in res["rows"]:
        o, t, r = row["ours_ms"], row["torch_fused_ms"], row["ratio"]
        lines.append(f"| {row['mode']} | {o['median']:.1f} ({o['min']:.1f}-{o['max']:.1f}) | "
                     f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) | "
                     f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mode", action="append", choices=list(MODES),
                        help="a mode to time (repeatable; default: all)")
    parser.add_argument("--note", help="a line of context for the table and the JSON")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time steps by the process's CPU time (one thread), not wall time")
    parser.add_argument("--out", type=Path, help="folder for cpu_modes.json and cpu_modes.md")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        print("cpu_modes.py: --threads and --rounds must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    modes = args.mode or list(MODES)
    env = environment(args.threads, args.rounds, args.note)
    env["clock"] = "process CPU time" if args.cpu_time else "wall"
    res = run(modes, args.rounds, args.warmup)
    table = render(env, res)
    print(table, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "cpu_modes.json", {"environment": env, **res}, indent=1)
        write_text(args.out / "cpu_modes.md", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
