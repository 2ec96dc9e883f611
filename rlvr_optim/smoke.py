"""Bit-exactness smoke check: each fused backend in each mode against the reference, on one device.

Per (backend, mode of :data:`rlvr_optim.bench.OUR_MODES`): a few odd-sized bf16 tensors
take :data:`STEPS` steps with per-step change tracking, once through the backend and once
through ``backend="reference"`` on the same device, from the same values and grads; every
param, optimizer state, change bitmap and counter must be equal bit for bit. Seconds on a
GPU: a last check before timing a backend (bench/gpu_check.sh runs it), not the test suite,
which compares many more sizes, seeds and options. On a CPU the Triton kernels run under
their interpreter (``TRITON_INTERPRET=1``), and what cannot run is reported as skipped.

``python -m rlvr_optim.smoke [--device cuda] [--backend NAME ...]`` prints one line per
backend and mode, and exits with status 1 when any differs or fails.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch
from torch import Tensor

from .bench import BACKENDS_TIMED, OUR_MODES, resolve_device, why_not_timed
from .errors import InputError

__all__ = ["SHAPES", "STEPS", "check", "main"]

# 4099 = 4 * 1024 + 3 straddles the kernels' block edges; 3 * 2048 + 5 gives the CUDA
# kernel's pipelined loop an odd count of full tiles (4099: two); 33 x 7 and 1 are odd
# small sizes.
SHAPES = ((4099,), (33, 7), (1,), (3 * 2048 + 5,))
STEPS = 3
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _final_tensors(backend: str, mode: str, device: torch.device) -> dict[str, Tensor]:
    """Params and every state tensor after STEPS steps of ``mode`` on ``backend``."""
    from .optimizer import AdamW  # noqa: PLC0415 - keep importing this module light

    options, freeze = OUR_MODES[mode]
    options = dict(options)
    dtype = options.pop("param_dtype", torch.bfloat16)  # the benchmark's, not an AdamW option
    gen = torch.Generator(device=device).manual_seed(0)
    params = [(torch.randn(s, generator=gen, device=device) * 0.02).to(dtype).requires_grad_()
              for s in SHAPES]
    # lr 1e-3 moves weights of magnitude 0.02 by about half a bf16 ULP: some bits change,
    # some do not, so the change bitmaps are tested with both values.
    opt = AdamW(params, lr=1e-3, backend=backend, track_changes="step", **options)
    if freeze:
        for i, p in enumerate(params):
            opt.set_freeze_mask(p, torch.arange(p.numel(), device=device).reshape(p.shape) % 3 != i)
    for _ in range(STEPS):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen, device=device) * 1e-3).to(dtype)
        opt.step()
    tensors = {}
    for i, p in enumerate(params):
        tensors[f"param {i}"] = p.detach()
        for key, value in opt.state[p].items():
            if isinstance(value, Tensor):
                tensors[f"{key} {i}"] = value
    return tensors


def _first_difference(got: dict[str, Tensor], want: dict[str, Tensor]) -> str | None:
    """What differs between two results, bit for bit (NaN payloads included), or None."""
    if got.keys() != want.keys():
        return f"state keys {sorted(got)} instead of the reference's {sorted(want)}"
    for name, expected in want.items():
        actual = got[name]
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            return (f"{name} is {actual.dtype} {tuple(actual.shape)}, the reference's "
                    f"{expected.dtype} {tuple(expected.shape)}")
        bits = _BITS[expected.element_size()]
        a = actual.detach().reshape(-1).view(bits)
        b = expected.detach().reshape(-1).view(bits)
        differ = int((a != b.to(a.device)).sum())
        if differ:
            return f"{name}: {differ} of {b.numel()} elements differ"
    return None


def check(device: str | torch.device | None = None,
          backends_to_check: Sequence[str] | None = None) -> list[dict]:
    """Run the check; one dict per (backend, mode): ``backend``, ``mode``, ``status``
    (``bit-exact``, ``differs``, ``error`` or ``skipped``) and ``detail``.

    Args:
        device: default: CUDA if available, else the CPU.
        backends_to_check: default: every fused backend of
            :data:`rlvr_optim.bench.BACKENDS_TIMED` that runs on the device.
    """
    device = resolve_device(device)
    fused = tuple(b for b in BACKENDS_TIMED if b != "reference")
    chosen = fused if backends_to_check is None else tuple(backends_to_check)
    unknown = [b for b in chosen if b not in fused]
    if unknown:
        raise InputError(f"--backend {', '.join(unknown)}: the smoke check compares the fused "
                         f"backends with the reference; choose from {', '.join(fused)}")
    reference: dict[str, dict[str, Tensor]] = {}
    results = []
    for backend in fused:
        reason = why_not_timed(backend, device, chosen)
        for mode in OUR_MODES:
            row = {"backend": backend, "mode": mode, "status": "skipped", "detail": reason}
            if reason is None:
                try:
                    if mode not in reference:
                        reference[mode] = _final_tensors("reference", mode, device)
                    difference = _first_difference(_final_tensors(backend, mode, device),
                                                   reference[mode])
                except Exception as exc:  # one failing mode is reported; the others still run
                    row["status"], row["detail"] = "error", f"{type(exc).__name__}: {exc}"[:300]
                else:
                    row["status"] = "bit-exact" if difference is None else "differs"
                    row["detail"] = (f"params, states, bitmaps, counters after {STEPS} steps"
                                     if difference is None else difference)
            results.append(row)
            if reason is not None:
                break  # one line says why the backend was skipped
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per backend and mode; 1 when any differs or fails, 2 for bad options."""
    parser = argparse.ArgumentParser(
        prog="python -m rlvr_optim.smoke",
        description="Each fused backend in each benchmark mode against the reference on the "
        "same device, bit for bit, on odd sizes over a few steps.")
    parser.add_argument("--device", help="cuda (or cuda:N) or cpu (default: cuda if available)")
    parser.add_argument("--backend", action="append", dest="backends", metavar="NAME",
                        help="fused backend to check, repeatable (default: all that run here)")
    args = parser.parse_args(argv)
    try:
        results = check(args.device, args.backends)
    except InputError as exc:
        print(f"rlvr_optim.smoke: error: {exc}", file=sys.stderr)
        return 2
    for row in results:
        mode = row["mode"] if row["status"] != "skipped" else "(all modes)"
        print(f"smoke {row['backend']} {mode}: {row['status']}: {row['detail']}", flush=True)
    return 1 if any(r["status"] in ("differs", "error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
