"""One step of many param groups on the CPU backend against torch's fused AdamW.

Per-layer learning rates and no-decay groups make optimizers of hundreds of param groups
common; each group is planned once and kept (rlvr_optim/step_plan.py), so a steady-state
step should cost a pass over the grads and one call of the CPU extension per group. This
script times it against ``torch.optim.AdamW(fused=True)`` in the same process on the same
params and grads (each optimizer steps its own copy), CPU tensors:

    python bench/many_groups.py [--groups 500] [--numel 16] [--dtype bfloat16] [--steps 20]
                                [--json]

Each round times one step of each optimizer, the one going first alternating; the medians
over ``--steps`` rounds are printed (after 3 warm-up steps each) with their ratio. It is a
CPU-backend result: it says what the host work per group costs, not what a GPU step takes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _groups(args, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(args.groups):
        p = torch.randn(args.numel, generator=gen).to(DTYPES[args.dtype]).requires_grad_()
        p.grad = (torch.randn(args.numel, generator=gen) * 1e-2).to(p.dtype)
        out.append({"params": [p], "lr": 1e-3 * (1 + i % 7), "weight_decay": 0.01 * (i % 2)})
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=500)
    parser.add_argument("--numel", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--track", default="off", choices=["off", "step", "cumulative"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args()
    from rlvr_optim import AdamW

    ours = AdamW(_groups(args, 0), backend="cpu", track_changes=args.track)
    theirs = torch.optim.AdamW(_groups(args, 0), fused=True)
    steps = {"rlvr_optim cpu": ours.step, "torch fused": theirs.step}
    for step in steps.values():
        for _ in range(3):  # first step: checks, state, plans
            step()
    times = {name: [] for name in steps}
    names = list(steps)
    for k in range(args.steps):
        for name in names[k % 2:] + names[:k % 2]:
            times[name].append(_timed(steps[name]))
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["rlvr_optim cpu"] / medians["torch fused"]
    for name, t in times.items():
        print(f"{name:15} median {medians[name]:8.3f} ms  (min {min(t):.3f}, max {max(t):.3f})")
    print(f"ratio {ratio:.2f}x torch fused ({args.groups} groups of one {args.numel}-element "
          f"{args.dtype} param, tracking {args.track}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps; CPU backend)")
    if args.json:
        print(json.dumps({"groups": args.groups, "numel": args.numel, "dtype": args.dtype,
                          "track": args.track, "threads": torch.get_num_threads(),
                          "steps": args.steps, "rlvr_optim_cpu_ms": medians["rlvr_optim cpu"],
                          "torch_fused_ms": medians["torch fused"], "ratio": ratio}))


if __name__ == "__main__":
    main()
