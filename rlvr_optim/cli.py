"""The ``rlvr-optim`` command line.

Each subcommand is a pair: ``_add_<name>(subparsers)`` declares its options and
``_<name>(args) -> exit status`` runs it; :func:`build_parser` lists the pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .demo import format_rows, run_demo

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a tiny MLP on CPU under each precision mode and print what bf16 filtered",
        description="Train a tiny MLP on CPU under each precision mode (same weights, same "
        "data) and print, per mode, the loss and the shares of weights whose bf16 bits changed.",
    )
    p.add_argument("--steps", type=_positive_int, default=40,
                   help="optimizer steps per mode (default 40)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of weights, data and stochastic rounding (default 0)")
    p.add_argument("--hidden", type=_positive_int, default=64,
                   help="hidden width of the MLP (default 64)")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="learning rate (default 1e-4; at 1e-3 nearly every weight of this toy changes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", metavar="PATH", help="also write the rows to PATH as JSON")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    """Run :func:`rlvr_optim.demo.run_demo`, print its table, optionally write JSON rows."""
    rows = run_demo(steps=args.steps, seed=args.seed, hidden=args.hidden,
                    progress=not args.no_progress, lr=args.lr)
    print(format_rows(rows))
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
    return 0


def _add_bench(subparsers) -> None:
    from .bench import PRESETS  # noqa: PLC0415

    p = subparsers.add_parser(
        "bench",
        help="time optimizer steps beside torch/torchao/optimi anchors (GPU; CPU mode for tests)",
        description="Time rlvr_optim.AdamW steps beside what users run today, report GB/s "
        "and the share of the copy bandwidth measured in the same run, and write JSON, a "
        "markdown table and a PNG under OUT/<device>/.",
    )
    p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                   help="shape preset, repeatable (default: r1-distill-qwen-1.5b and "
                   "many-small on a GPU, cpu-tiny on a CPU)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--steps", type=_positive_int, default=15, help="timed steps per row (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    """Run :func:`rlvr_optim.bench.run`, save and render it, print the markdown table."""
    import torch  # noqa: PLC0415

    from . import bench  # noqa: PLC0415

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default = ("r1-distill-qwen-1.5b", "many-small") if device.startswith("cuda") else ("cpu-tiny",)
    result = bench.run(presets=tuple(args.preset or default), device=device, steps=args.steps,
                       warmup=args.warmup, progress=not args.no_progress)
    path = bench.save(result, args.out)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} (+ .md, .png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="rlvr-optim",
        description="AdamW for RL post-training that shows what bf16 rounding does to each "
        "update.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_demo(subparsers)
    _add_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2, after the help, without a command).

    Args:
        argv: arguments without the program name (default None: ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)
