"""Step-time benchmark of rlvr_optim.AdamW beside what users run today (``rlvr-optim bench``).

Every row times optimizer steps after warm-up (device events on a GPU) and reports the
median with min and max, the effective bandwidth from the bytes-per-element model of
DESIGN.md, and its share of the device-to-device copy bandwidth measured in the same run.
Rows without a number say why (``missing``: not installed; ``unavailable``: no such backend
in this version; ``error``: it raised). ``run`` returns the result and can stream it to a
JSONL file as it goes (the run's environment first, then one line per finished row), so a
run that is cut short keeps what it measured; ``load`` reads such a file, complete or cut
off, and ``render`` turns a result file into a markdown table and a PNG plot, separately,
so results can be re-rendered.

On a CPU the same code runs the ``cpu-tiny`` shapes so that the test suite keeps the harness
working (those timings are marked in every output as not being performance results), and
the ``cpu-10m`` preset, which times the CPU backend against torch's fused CPU AdamW (marked
as CPU rows: results for the CPU backend only, saying nothing about GPU speed).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import backends, files
from ._checked import extension_function
from .errors import InputError, check_device

__all__ = ["BACKENDS_TIMED", "DEFAULT_OUT", "OUR_MODES", "PLOT_COLORS", "PRESETS",
           "bytes_per_element", "default_backends", "environment", "load", "plot_figure",
           "plot_title", "render", "render_markdown", "render_plot", "render_short",
           "resolve_device", "row_line", "run", "save", "why_not_timed"]

# DeepSeek-R1-Distill-Qwen-1.5B (Qwen2 architecture, untied lm_head): 28 layers of
# q/k/v (with bias), o, gate/up/down and two norms, plus embeddings, final norm and head.
_HIDDEN, _KV, _FFN, _VOCAB, _LAYERS = 1536, 256, 8960, 151936, 28


def _qwen_1_5b_shapes() -> list[tuple[int, ...]]:
    layer = [
        (_HIDDEN, _HIDDEN), (_HIDDEN,), (_KV, _HIDDEN), (_KV,), (_KV, _HIDDEN), (_KV,),
        (_HIDDEN, _HIDDEN), (_FFN, _HIDDEN), (_FFN, _HIDDEN), (_HIDDEN, _FFN),
        (_HIDDEN,), (_HIDDEN,),
    ]
    return [(_VOCAB, _HIDDEN)] + layer * _LAYERS + [(_HIDDEN,), (_VOCAB, _HIDDEN)]


def _mixed_shapes() -> list[tuple[int, ...]]:
    """A few large tensors among thousands of small ones, the host-bound part of a deep
    model: embedding and head (32768 x 2048) and two (8192, 2048) matrices, then 100 layers
    of 30 vectors of 2048 (biases, norm weights, per-channel scales): 3004 tensors,
    1.74e8 elements."""
    return ([(32768, 2048), (8192, 2048)] + [(2048,)] * (30 * 100)
            + [(8192, 2048), (32768, 2048)])


PRESETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "r1-distill-qwen-1.5b": _qwen_1_5b_shapes,  # 339 tensors, 1.78e9 elements
    "many-small": lambda: [(4096,)] * 4000,  # launch-bound
    "mixed": _mixed_shapes,  # launch-bound in count, a few large tensors in bytes
    "flat": lambda: [(1 << 28,)],
    **{f"sweep-{label}": (lambda n=n: [(n,)]) for label, n in (
        ("1e6", 10**6), ("1e7", 10**7), ("1e8", 10**8), ("1e9", 10**9), ("2e9", 2 * 10**9))},
    "cpu-tiny": lambda: [(33, 7), (4099,), (1,), (64, 64)],  # the test suite's CPU mode
    # The CPU backend's speed preset: 10.0e6 elements in 20 tensors (a small model's mix of
    # matrices and vectors).
    "cpu-10m": lambda: [(2048, 1024)] * 4 + [(1024, 512)] * 3 + [(1024,)] * 6 + [(64, 80)] * 7,
}
# Presets sized for a CPU; the others are refused there.
CPU_PRESETS = ("cpu-tiny", "cpu-10m")

# Our modes: name -> (AdamW options, uses a freeze mask).
OUR_MODES: dict[str, tuple[dict, bool]] = {
    "default": ({}, False),
    "sr + fp32 states": ({"rounding": "stochastic", "state_dtype": torch.float32}, False),
    "fp32 master": ({"master_weights": "fp32"}, False),
    "remainder": ({"master_weights": "remainder"}, False),
    "freeze mask": ({}, True),
    # fp32 params (and their fp32 states): "param_dtype" is the benchmark's, not an option.
    "fp32 params": ({"param_dtype": torch.float32}, False),
}

# Where ``rlvr-optim bench`` writes results without --out: a folder of the current
# directory, named for the tool, never the package's own bench/results (which holds
# committed device runs only).
DEFAULT_OUT = "rlvr-optim-bench"

# Our backends, in the order their rows appear. Each gets rows where it runs, else one
# row saying why not (the reference only on a CPU: on a GPU it is the spec, not a path).
BACKENDS_TIMED = ("cuda", "triton", "cpu", "reference")


def bytes_per_element(
    *, param=2, grad=2, state=2, master=0, remainder=False, track="off", freeze=False,
    amsgrad=False,
) -> float:
    """Bytes one element moves per step (DESIGN.md's model: each read and write once).

    Args:
        param, grad, state: element sizes of the param, its gradient and each moment.
        master: element size of a master copy (0: none).
        remainder, track ("off" | "step" | "cumulative"), freeze, amsgrad: the modes.
    """
    total = 2 * param + grad + 2 * 2 * state + 2 * master
    total += 2 * state if amsgrad else 0
    total += 2 * 2 if remainder else 0
    total += {"off": 0, "step": 1 / 8, "cumulative": 1 / 8 + 2 / 8}[track]
    return total + (1 / 8 if freeze else 0)


@dataclass
class Row:
    """One benchmark row."""

    name: str
    group: str  # "ours", "anchor" or "tune"
    preset: str
    variant: str = "eager"  # or "graph"
    status: str = "ok"  # ok | missing | unavailable | error
    reason: str = ""
    bytes_per_element: float | None = None
    ms: list[float] = field(default_factory=list)
    ms_median: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    gbps: float | None = None
    share_of_copy: float | None = None
    speedup: dict[str, float] = field(default_factory=dict)
    step_peak_extra_bytes: int | None = None
    state_bytes_per_param: float | None = None


class _Timer:
    """Times a callable: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None], steps: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(steps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return out


def copy_bandwidth(device: torch.device, nbytes: int, steps: int = 15) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.

    On a CPU it is a buffer rewritten in place: a copy into a second buffer makes the
    cores read each destination line before writing it, traffic that an optimizer step
    (in place too) does not have, so the copy understated what the step can reach (the
    CPU rows came out at up to twice "the copy bandwidth")."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    if device.type == "cpu":
        ms = _Timer(device)(lambda: src.mul_(1.0), steps, 3)
    else:
        dst = torch.empty_like(src)
        ms = _Timer(device)(lambda: dst.copy_(src), steps, 3)
    return 2 * nbytes / (statistics.median(ms) * 1e-3) / 1e9


def _make(shapes, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [
        (torch.randn(s, generator=gen, device=device) * 0.02).to(dtype).requires_grad_()
        for s in shapes
    ]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen, device=device) * 1e-3).to(dtype)
    return params


# ---------------------------------------------------------------------- the rows


def _torch_fused(shapes, device, fused=True, dtype=torch.bfloat16, capturable=False):
    params = _make(shapes, dtype, device)
    kwargs = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=1e-4, capturable=capturable, **kwargs)
    return params, opt, opt.step


def _torch_with_change_mask(shapes, device):
    """What users write today to see which bf16 weights changed: clone, step, compare, count."""
    params, opt, _ = _torch_fused(shapes, device)

    def step():
        before = [p.detach().clone() for p in params]
        opt.step()
        counts = [(p.detach() != b).sum() for p, b in zip(params, before)]
        return counts

    return params, opt, step


def _snapshot_diff(shapes, device):
    """A one-byte snapshot-and-diff detector, as async RL trainers use to find changed bf16
    weights: keep one byte per element (high byte xor low byte of the bf16 pattern), diff
    it after the step."""
    params, opt, _ = _torch_fused(shapes, device)

    def fingerprint(p):
        bits = p.detach().view(torch.int16)
        return ((bits >> 8) ^ bits).to(torch.uint8)

    snapshots = [fingerprint(p) for p in params]
    changed = [None] * len(params)

    def step():
        opt.step()
        for i, p in enumerate(params):
            now = fingerprint(p)
            changed[i] = (now != snapshots[i]).sum()
            snapshots[i] = now

    return params, opt, step


def _fp32_master_cast(shapes, device, fused=True):
    """fp32 params (the master) through torch's AdamW, then a cast into bf16 model weights."""
    masters = _make(shapes, torch.float32, device)
    model = [m.detach().bfloat16() for m in masters]
    kwargs = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(masters, lr=1e-4, **kwargs)

    def step():
        opt.step()
        torch._foreach_copy_(model, [m.detach() for m in masters])

    return masters, opt, step


def _torchao_sr(shapes, device):
    from torchao.optim import _AdamW  # noqa: PLC0415 - optional anchor

    params = _make(shapes, torch.bfloat16, device)
    opt = _AdamW(params, lr=1e-4, bf16_stochastic_round=True)
    return params, opt, opt.step


def _optimi_kahan(shapes, device):
    from optimi import AdamW as OptimiAdamW  # noqa: PLC0415 - optional anchor

    params = _make(shapes, torch.bfloat16, device)
    opt = OptimiAdamW(params, lr=1e-4, kahan_sum=True, triton=True)
    return params, opt, opt.step


def _ours(shapes, device, backend, options, freeze, track, capturable=False):
    from .optimizer import AdamW  # noqa: PLC0415 - keep import light for the CLI

    options = dict(options)
    params = _make(shapes, options.pop("param_dtype", torch.bfloat16), device)
    opt = AdamW(params, lr=1e-4, backend=backend, track_changes=track, capturable=capturable,
                **options)
    if freeze:
        for i, p in enumerate(params):
            opt.set_freeze_mask(p, torch.arange(p.numel(), device=device).reshape(p.shape) % 2 == i % 2)
    return params, opt, opt.step


ANCHORS: dict[str, tuple[Callable, float, str]] = {
    # name: (builder, bytes/element, variant)
    "torch fused": (_torch_fused, bytes_per_element(), "eager"),
    "torch foreach": (lambda s, d: _torch_fused(s, d, fused=False), bytes_per_element(), "eager"),
    "torch fused, fp32 params": (lambda s, d: _torch_fused(s, d, dtype=torch.float32),
                                 bytes_per_element(param=4, grad=4, state=4), "eager"),
    "torch fused + clone/compare/count": (_torch_with_change_mask, bytes_per_element(), "eager"),
    "torch fused + 1-byte snapshot diff": (_snapshot_diff, bytes_per_element(), "eager"),
    "torchao _AdamW bf16 SR": (_torchao_sr, bytes_per_element(), "eager"),
    "optimi AdamW Kahan (Triton)": (_optimi_kahan, bytes_per_element(remainder=True), "eager"),
    "torch fused fp32 master + bf16 cast": (
        _fp32_master_cast, bytes_per_element(param=4, grad=4, state=4) + 4 + 2, "eager"),
    "torch foreach fp32 master + bf16 cast": (
        lambda s, d: _fp32_master_cast(s, d, fused=False),
        bytes_per_element(param=4, grad=4, state=4) + 4 + 2, "eager"),
    "torch fused (CUDA graph)": (
        lambda s, d: _torch_fused(s, d, capturable=True), bytes_per_element(), "graph"),
}

# Which anchor each of our modes is compared with.
_COMPARE = {
    "default": ("torch fused", "torch fused + clone/compare/count"),
    "sr + fp32 states": ("torchao _AdamW bf16 SR",),
    "fp32 master": ("torch fused fp32 master + bf16 cast",),
    "remainder": ("optimi AdamW Kahan (Triton)",),
    "freeze mask": ("torch fused",),
    "fp32 params": ("torch fused, fp32 params",),
}


# The Triton launch configurations ``--tune`` times (elements per chunk, warps, pipeline
# stages, persistent programs per SM; None: as many as fit, from the compiled kernel),
# default mode with per-step tracking. Every entry keeps 8 consecutive elements per thread
# (chunk = 256 x warps), so a bitmap byte is one thread's; what each compiles to:
# ``python -m rlvr_optim.triton_kernels.codegen``. Only a GPU run can pick among them.
TUNE_GRID = ((1024, 4, 3, None), (1024, 4, 2, None), (1024, 4, 4, None), (1024, 4, 3, 2),
             (1024, 4, 3, 8), (2048, 8, 3, 2), (2048, 8, 3, None), (512, 2, 3, None))
_TUNED = ("DEFAULT_BLOCK_GPU", "DEFAULT_NUM_WARPS_GPU", "DEFAULT_STAGES_GPU",
          "DEFAULT_PROGRAMS_PER_SM")


def tune_label(config: tuple[int, ...]) -> str:
    """How a :data:`TUNE_GRID` entry is named in its row."""
    block, warps, stages, programs = config
    return (f"[BLOCK {block}, {warps} warps, {stages} stages, "
            f"{'as many as fit' if programs is None else programs} per SM]")


def _tuned(build: Callable, *config: int) -> Callable:
    """``build`` with the Triton backend's GPU launch defaults (:data:`_TUNED`) set to
    ``config`` around each step (and restored after), so a row times that configuration."""
    from .triton_kernels import adamw as triton_adamw  # noqa: PLC0415

    def configured(fn):
        def call():
            saved = [getattr(triton_adamw, name) for name in _TUNED]
            for name, value in zip(_TUNED, config):
                setattr(triton_adamw, name, value)
            try:
                return fn()
            finally:
                for name, value in zip(_TUNED, saved):
                    setattr(triton_adamw, name, value)
        return call

    def wrapped():
        params, opt, step = build()
        return params, opt, configured(step)

    return wrapped


def _our_bytes(mode: str, track: str) -> float:
    options, freeze = OUR_MODES[mode]
    if options.get("param_dtype") == torch.float32:
        return bytes_per_element(param=4, grad=4, state=4, track=track, freeze=freeze)
    state = 4 if options.get("state_dtype") == torch.float32 else 2
    master = 4 if options.get("master_weights") == "fp32" else 0
    return bytes_per_element(state=state, master=master, track=track, freeze=freeze,
                             remainder=options.get("master_weights") == "remainder")


def _graph_step(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Capture ``step`` in a CUDA graph (after warm-up on a side stream) and return replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _measure(row: Row, build: Callable, device, timer, steps, warmup, numel) -> None:
    """Fill ``row`` with timings, or with the reason there are none."""
    try:
        _time_row(row, build, device, timer, steps, warmup, numel)
    except ImportError as exc:
        row.status, row.reason = "missing", f"not installed ({exc.name or exc})"
    except Exception as exc:  # a failing row is reported, not fatal
        row.status, row.reason = "error", f"{type(exc).__name__}: {exc}"[:300]
    if device.type == "cuda":  # the row's tensors are gone now; return their memory
        torch.cuda.empty_cache()


def _interleaved(entries: list, device, steps: int, warmup: int) -> None:
    """Time the rows of ``entries`` ((row, build, numel), on a CPU) step by step in turn.

    A CPU shared with other work (a VM's neighbours, its own housekeeping) drifts by tens
    of percent over seconds, more than the differences the CPU rows are there to show;
    timed one after another, two rows would each see a different machine. Here every row
    is built first, then each round times one step of every row, its order rotated from
    round to round, so each row's k-th time is taken within the same round as every other
    row's. Rows that fail to build are reported as :func:`_measure` does."""
    ready = []
    for row, build, numel in entries:
        try:
            _, opt, step = build()  # opt keeps the params alive
            for _ in range(warmup):
                step()
        except ImportError as exc:
            row.status, row.reason = "missing", f"not installed ({exc.name or exc})"
            continue
        except Exception as exc:  # a failing row is reported, not fatal
            row.status, row.reason = "error", f"{type(exc).__name__}: {exc}"[:300]
            continue
        row.ms = []
        ready.append((row, opt, step, numel))
    failed = set()
    for r in range(steps):
        for k in range(len(ready)):
            row, _, step, _ = ready[(k + r) % len(ready)]
            if id(row) in failed:
                continue
            try:
                t0 = time.perf_counter()
                step()
                row.ms.append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:
                row.status, row.reason = "error", f"{type(exc).__name__}: {exc}"[:300]
                row.ms = []
                failed.add(id(row))
    for row, opt, _, numel in ready:
        if id(row) not in failed:
            row.state_bytes_per_param = _state_bytes(opt) / numel


def _state_bytes(opt) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values() for v in st.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )


def _time_row(row: Row, build: Callable, device, timer, steps, warmup, numel) -> None:
    params, opt, step = build()
    if row.variant == "graph":
        step = _graph_step(step, device)
    if device.type == "cuda":
        step()  # lazily created state belongs to the resident baseline
        torch.cuda.synchronize(device)
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        row.step_peak_extra_bytes = torch.cuda.max_memory_allocated(device) - resident
    row.ms = timer(step, steps, warmup)
    row.state_bytes_per_param = _state_bytes(opt) / numel


# nvidia-smi fields recorded with a GPU run: the clocks it ran at and its limits, since a
# throttled or capped GPU explains a share of the copy bandwidth that looks wrong.
_GPU_QUERY = ("driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "power.limit", "temperature.gpu")


def _gpu_query(device: torch.device) -> dict:
    """``_GPU_QUERY`` of ``device`` from nvidia-smi (matched by UUID), or {} without it."""
    command = ["nvidia-smi", f"--query-gpu=uuid,{','.join(_GPU_QUERY)}",
               "--format=csv,noheader,nounits"]
    try:
        lines = subprocess.run(command, capture_output=True, text=True, check=True,
                               timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", ""))
    rows = [[v.strip() for v in line.split(",")] for line in lines]
    mine = next((r for r in rows if uuid and r[0].endswith(uuid)), rows[0] if rows else None)
    if mine is None or len(mine) != len(_GPU_QUERY) + 1:
        return {}
    return dict(zip(_GPU_QUERY, mine[1:]))


def environment(device: str | torch.device) -> dict:
    """What a result needs to be read later: date, device, its clocks (GPU), versions, commit."""
    device = torch.device(device)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        # How a steady-state step reads its grads and checks its params (rlvr_optim/plan.py):
        # one C pass each with the CPU extension, Python passes without; with thousands of
        # tensors that is most of an eager step's host time.
        "host_path": "cpu extension" if extension_function("read_gradients") else "python",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        # The abbreviated hash, "-dirty" when tracked files differ from it: numbers of
        # uncommitted code must not be credited to the commit.
        env["commit"] = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--exclude=*"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        # A copied tree without its .git (as a GPU machine may get) names it this way.
        env["commit"] = os.environ.get("RLVR_OPTIM_COMMIT")
    if device.type == "cuda":
        gpu = _gpu_query(device)
        env["driver"] = gpu.pop("driver_version", None)
        env["gpu"] = gpu
    return env


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and backends.unavailable_reason("triton") is None


def why_not_timed(backend: str, device: torch.device, chosen: tuple[str, ...]) -> str | None:
    """Why ``backend`` does not run on ``device`` in a run that chose the backends
    ``chosen``, or None when it runs (here: gets rows; in :mod:`rlvr_optim.smoke`: is checked)."""
    reason = backends.unavailable_reason(backend)
    if reason is not None:
        return reason
    if backend == "cuda" and device.type != "cuda":
        return "needs a CUDA device"
    if backend == "cpu" and device.type != "cpu":
        return "runs CPU tensors only"
    if backend == "triton" and device.type != "cuda" and not _interpreter_on():
        return "on a CPU only under Triton's interpreter (TRITON_INTERPRET=1)"
    if backend not in chosen:
        if backend == "reference":
            return ("not timed unless asked (--backend reference): the reference is the "
                    "specification, not a fast path")
        return "not selected (--backend)"
    return None


def default_backends(device: torch.device, preset: str) -> tuple[str, ...]:
    """Our backends a run times on ``device`` for ``preset`` when none are named: the fused
    backends available; on a CPU the CPU backend, and for ``cpu-tiny`` (which only keeps
    the harness working) also the reference and, under its interpreter, Triton. The
    reference is the specification, not a fast path: a timed preset leaves it out unless
    asked (on ``cpu-10m`` it took most of the run's minutes and memory)."""
    if device.type == "cuda":
        return tuple(b for b in ("cuda", "triton") if backends.unavailable_reason(b) is None)
    ours = ("cpu",) if backends.unavailable_reason("cpu") is None else ()
    if preset == "cpu-tiny":
        ours += ("reference",) + (("triton",) if _interpreter_on() else ())
    return ours


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device of a run: ``device``, or by default CUDA when torch finds a GPU, else the CPU.

    Raises :class:`~rlvr_optim.errors.InputError` for a device this machine lacks.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device("--device", device)


def run(
    presets=("r1-distill-qwen-1.5b", "many-small"),
    *,
    device: str | torch.device | None = None,
    steps: int = 15,
    warmup: int = 3,
    backends_to_time: tuple[str, ...] | None = None,
    tracks: tuple[str, ...] = ("off", "step"),
    anchors: tuple[str, ...] | None = None,
    progress: bool = True,
    graph: bool = True,
    tune: bool = False,
    modes: tuple[str, ...] | None = None,
    jsonl: str | os.PathLike | None = None,
    echo: bool = False,
) -> dict:
    """Run the benchmark and return its results (JSON-ready).

    Every argument is checked before anything is measured or written; bad ones raise
    :class:`~rlvr_optim.errors.InputError`.

    Args:
        presets: keys of :data:`PRESETS` (default: the 1.5B shapes and the many-small set).
        device: default: CUDA if available, else CPU (then only tiny presets make sense).
        steps, warmup: timed and untimed steps per row (default 15 and 3). On a CPU, the
            rows of each preset but ``cpu-tiny`` are timed in turn, a step of each per round
            (:func:`_interleaved`), and so stream to ``jsonl`` when the preset is done.
        backends_to_time: our backends to time (default: :func:`default_backends` of
            each preset: the fused backends available, never the reference but in the
            harness check ``cpu-tiny``).
        tracks: change-tracking settings for our rows (default off and per step).
        anchors: names of :data:`ANCHORS` to run (default all; graph rows need CUDA).
        progress: tqdm progress bar on stderr.
        graph: also time our default mode (tracking per step) replayed from a CUDA graph,
            per timed backend (rows marked unavailable without CUDA).
        tune: also time the Triton backend's default mode (tracking per step) at every
            (chunk, warps, stages, programs per SM) of :data:`TUNE_GRID` (group "tune").
        modes: names of :data:`OUR_MODES` to time (default all; ``()`` for none, e.g. a
            tuning run).
        jsonl: a file to append the run to as it goes (default None: none): first a header
            line (environment, copy bandwidth, steps, warm-up, the CPU flag, rows planned),
            then one line per finished row (the :class:`Row` fields), each flushed, so a
            run cut short leaves its finished rows complete (:func:`load` reads the file).
            Timed anchors of earlier runs in the file count for this run's speed-ups.
        echo: print a header and one short line per finished row on stdout.
    """
    from tqdm import tqdm  # noqa: PLC0415

    device = resolve_device(device)
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise InputError(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    unknown = [a for a in (anchors or ()) if a not in ANCHORS]
    if unknown:
        raise InputError(f"unknown anchor(s) {unknown}; choose from {sorted(ANCHORS)}")
    unknown = [m for m in (modes or ()) if m not in OUR_MODES]
    if unknown:
        raise InputError(f"unknown mode(s) {unknown}; choose from {list(OUR_MODES)}")
    chosen_modes = tuple(OUR_MODES) if modes is None else tuple(modes)
    too_big = [p for p in presets if device.type == "cpu" and p not in CPU_PRESETS]
    if too_big:
        raise InputError(f"preset(s) {too_big} are sized for a GPU; on a CPU use "
                         f"{' or '.join(map(repr, CPU_PRESETS))}")
    unknown = [b for b in (backends_to_time or ()) if b not in BACKENDS_TIMED]
    if unknown:
        raise InputError(f"unknown backend(s) {unknown}; choose from {list(BACKENDS_TIMED)} "
                         "(--backend none: anchors only)")
    earlier = []
    if jsonl is not None:
        if Path(jsonl).is_dir() or not Path(jsonl).parent.is_dir():
            raise InputError(f"--jsonl {str(jsonl)!r} must be a file in an existing folder")
        if Path(jsonl).is_file() and Path(jsonl).stat().st_size > 0:
            earlier = load(jsonl)["rows"]  # refuses a file that is not a result before we append
    anchor_names = anchors if anchors is not None else tuple(ANCHORS)
    timer = _Timer(device)
    plan = []
    for preset in presets:
        shapes = PRESETS[preset]()
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        for name in anchor_names:
            build, nbytes, variant = ANCHORS[name]
            plan.append((Row(name, "anchor", preset, variant, bytes_per_element=nbytes),
                         (lambda b=build, s=shapes: b(s, device)), numel))
        chosen = (default_backends(device, preset) if backends_to_time is None
                  else backends_to_time)
        for backend in BACKENDS_TIMED:
            reason = why_not_timed(backend, device, chosen)
            if reason is not None:  # one row says why the backend has no numbers
                row = Row(f"rlvr_optim {backend} (all modes)", "ours", preset,
                          status="unavailable", reason=reason)
                plan.append((row, None, numel))
                continue
            for mode, (options, freeze) in OUR_MODES.items():
                if mode not in chosen_modes:
                    continue
                for track in tracks:
                    name = f"rlvr_optim {backend} {mode}, tracking {track}"
                    row = Row(name, "ours", preset, bytes_per_element=_our_bytes(mode, track))
                    plan.append((row, (lambda s=shapes, b=backend, o=options, f=freeze, t=track:
                                       _ours(s, device, b, o, f, t)), numel))
            if graph:
                row = Row(f"rlvr_optim {backend} default, tracking step (CUDA graph)", "ours",
                          preset, "graph", bytes_per_element=_our_bytes("default", "step"))
                plan.append((row, (lambda s=shapes, b=backend:
                                   _ours(s, device, b, {}, False, "step", capturable=True)),
                             numel))
            if tune and backend == "triton":
                for config in TUNE_GRID:
                    row = Row(f"rlvr_optim triton default, tracking step {tune_label(config)}",
                              "tune", preset, bytes_per_element=_our_bytes("default", "step"))
                    build = (lambda s=shapes: _ours(s, device, "triton", {}, False, "step"))
                    plan.append((row, _tuned(build, *config), numel))
    copy_bytes = (1 << 30) if device.type == "cuda" else (1 << 26)
    header = {
        "environment": environment(device),
        "copy_gbps": copy_bandwidth(device, copy_bytes),
        "steps": steps,
        "warmup": warmup,
        # cpu-tiny timings only keep the harness working; cpu-10m rows are CPU results.
        "cpu_timings_are_not_performance_results": device.type == "cpu"
        and set(presets) <= {"cpu-tiny"},
        "cpu_rows": device.type == "cpu",
        "planned_rows": len(plan),
        # Presets whose rows were timed in turn, a step of each per round (_interleaved):
        # the CPU results (cpu-tiny rows only keep the harness working, streamed row by row).
        "interleaved_presets": [p for p in presets if device.type == "cpu" and p != "cpu-tiny"],
    }
    cpu = header["cpu_timings_are_not_performance_results"]
    timed = _timed_medians(earlier)
    rows = []
    sink = open(jsonl, "a", encoding="utf-8") if jsonl is not None else None  # noqa: SIM115
    bar = tqdm(total=len(plan), desc="bench", disable=not progress, unit="row")
    try:
        _append_line(sink, header)
        if echo:
            _echo(bar, f"bench on {header['environment']['device']} ({device}): copy bandwidth "
                       f"{header['copy_gbps']:.0f} GB/s, {len(plan)} rows")
            if cpu or header["cpu_rows"]:
                _echo(bar, _CPU_NOTE if cpu else _CPU_ROWS_NOTE)
        if device.type != "cuda":
            for row, _, _ in plan:
                if row.status == "ok" and row.variant == "graph":
                    row.status, row.reason = "unavailable", "CUDA graphs need a GPU"
        pretimed = set()
        for index, (row, build, numel) in enumerate(plan, 1):
            bar.set_postfix_str(f"{row.preset}: {row.name}"[:60])
            if row.preset in header["interleaved_presets"] and row.status == "ok" \
                    and id(row) not in pretimed:
                # this row's preset: every timed row of it, interleaved, before the first
                batch = [e for e in plan if e[0].preset == row.preset and e[0].status == "ok"]
                _interleaved(batch, device, steps, warmup)
                pretimed.update(id(e[0]) for e in batch)
            elif row.status == "ok" and id(row) not in pretimed:
                _measure(row, build, device, timer, steps, warmup, numel)
            if row.ms:
                row.ms_median, row.ms_min, row.ms_max = statistics.median(row.ms), min(row.ms), max(row.ms)
                row.gbps = row.bytes_per_element * numel / (row.ms_median * 1e-3) / 1e9
                row.share_of_copy = row.gbps / header["copy_gbps"]
            record = vars(row)
            record["speedup"] = _speedups(record, timed)  # anchors come first in the plan
            if record["ms_median"]:
                timed[(row.preset, row.name)] = row.ms_median
            _append_line(sink, record)
            rows.append(record)
            if echo:
                _echo(bar, f"[{index}/{len(plan)}] {row_line(record, cpu)}")
            bar.update(1)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    return {**header, "rows": rows}


_CPU_NOTE = ("CPU run: these timings only keep the harness working; they are not "
             "performance results.")
_CPU_ROWS_NOTE = ("CPU rows: the CPU backend beside torch's CPU AdamW on this machine's "
                  "cores; they say nothing about GPU speed.")


def _append_line(sink, record: dict) -> None:
    """One JSON line, written in one call and flushed, so a kill leaves whole lines."""
    if sink is not None:
        sink.write(json.dumps(record) + "\n")
        sink.flush()


def _echo(bar, line: str) -> None:
    bar.write(line, file=sys.stdout)  # above the progress bar, which is on stderr
    sys.stdout.flush()


def row_line(row: dict, cpu: bool) -> str:
    """One short line for a finished row: time and share of the copy bandwidth, with the
    speed-up over the anchors it replaces on a GPU, or why there is no number."""
    where = f"{row['preset']}: {row['name']}"
    if row["ms_median"] is None:
        return f"{where}: {row['status']}: {row['reason']}"[:200]
    line = f"{where}: {row['ms_median']:.3f} ms, {100 * row['share_of_copy']:.1f}% of copy"
    if cpu:
        return line + " (CPU timing, not a performance result)"
    return line + "".join(f", {v:.2f}x vs {k}" for k, v in row["speedup"].items())


def _timed_medians(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["preset"], r["name"]): r["ms_median"] for r in rows if r["ms_median"]}


def _speedups(row: dict, timed: dict[tuple[str, str], float]) -> dict[str, float]:
    """Speed-up of one of our rows over each anchor it replaces that ``timed`` holds."""
    if row["group"] not in ("ours", "tune") or not row["ms_median"]:
        return {}
    mode = next((m for m in OUR_MODES if f" {m}, tracking" in row["name"]), None)
    if mode is None:
        return {}
    compare = ("torch fused (CUDA graph)",) if row["variant"] == "graph" else _COMPARE[mode]
    return {anchor: timed[(row["preset"], anchor)] / row["ms_median"]
            for anchor in compare if (row["preset"], anchor) in timed}


# ---------------------------------------------------------------------- reading results


def load(path: str | os.PathLike) -> dict:
    """A result from a file: the JSON that :func:`save` writes, or a ``.jsonl`` file that
    :func:`run` streamed (one run or several appended, complete or cut off).

    From JSONL: the first run's environment, copy bandwidth, steps and warm-up at the top;
    ``runs``, each run's header with ``rows_found`` (fewer than ``planned_rows``: that run
    was cut off); and the rows merged over the runs, one per (preset, name): the last
    timed one, else the last. A backend's "(all modes)" row, which says why a run did not
    time it, is dropped where another run did. Speed-ups are recomputed over all rows, so
    a row is compared with an anchor measured in an earlier run. A last line cut off in
    the middle is skipped (``cut_off_line`` is True). Raises
    :class:`~rlvr_optim.errors.InputError` for a file that is not a result.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read benchmark result {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not text, so not a benchmark result; pass a file that "
                         "rlvr-optim bench wrote (.json, or .jsonl with --jsonl)") from None
    if path.suffix != ".jsonl":
        try:
            result = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not JSON ({exc}); pass a result that "
                             "rlvr-optim bench wrote (.json, or .jsonl with --jsonl)") from None
        if not isinstance(result, dict) or not {"environment", "rows"} <= result.keys():
            raise InputError(f"{path} is JSON but not a benchmark result (no environment "
                             "and rows); pass a file that rlvr-optim bench wrote")
        return result
    lines = text.split("\n")
    runs, rows, cut_off = [], [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the writer was stopped mid-line
                cut_off = True
                break
            raise InputError(f"{path}, line {number}: not JSON; only the last line of a "
                             "run that was stopped may be incomplete") from None
        if isinstance(record, dict) and "environment" in record:
            runs.append({**record, "rows_found": 0})
            continue
        if not runs:
            raise InputError(f"{path} does not start with a run's header (the environment "
                             "line); pass a file written by rlvr-optim bench --jsonl")
        try:
            rows.append(vars(Row(**record)))
        except TypeError:
            raise InputError(f"{path}, line {number}: not a benchmark row (its keys must be "
                             "the fields of rlvr_optim.bench.Row)") from None
        runs[-1]["rows_found"] += 1
    if not runs:
        raise InputError(f"{path} holds no benchmark run; was it written by rlvr-optim "
                         "bench --jsonl?")
    rows = _merge_rows(rows)
    timed = _timed_medians(rows)
    for row in rows:
        row["speedup"] = _speedups(row, timed)
    first = runs[0]
    return {
        "environment": first["environment"],
        "copy_gbps": first["copy_gbps"],
        "steps": first["steps"],
        "warmup": first["warmup"],
        "cpu_timings_are_not_performance_results": any(
            r["cpu_timings_are_not_performance_results"] for r in runs),
        "cpu_rows": any(r.get("cpu_rows", False) for r in runs),
        "runs": runs,
        "cut_off_line": cut_off,
        "rows": rows,
    }


def _merge_rows(rows: list[dict]) -> list[dict]:
    """One row per (preset, name), in order of first appearance (see :func:`load`)."""
    merged: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["preset"], row["name"])
        if key not in merged or row["ms_median"] is not None or merged[key]["ms_median"] is None:
            merged[key] = row
    has_rows = {(r["preset"], r["name"].split(" ")[1]) for r in merged.values()
                if r["name"].startswith("rlvr_optim ") and not r["name"].endswith("(all modes)")}
    return [r for r in merged.values()
            if not (r["name"].endswith("(all modes)")
                    and (r["preset"], r["name"].split(" ")[1]) in has_rows)]


# ---------------------------------------------------------------------- rendering


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def _result(source: dict | str | os.PathLike) -> dict:
    return source if isinstance(source, dict) else load(source)


def _runs_summary(result: dict) -> list[str]:
    """Sentences on how the rows were measured: timing, copy bandwidth, cut-off runs."""
    runs = result.get("runs") or [result]
    timing = "; ".join(f"median of {s} steps after {w} warm-up steps"
                       for s, w in dict.fromkeys((r["steps"], r["warmup"]) for r in runs))
    copies = ", ".join(f"{r['copy_gbps']:.0f}" for r in runs)
    where = ("in this run" if len(runs) == 1 else
             f"in each of its {len(runs)} runs (a row's share is of its own run's)")
    lines = [f"{timing[0].upper()}{timing[1:]}; copy bandwidth {copies} GB/s (read + write) "
             f"measured {where}."]
    stopped = [f"run {i} stopped after {r['rows_found']} of {r['planned_rows']} rows"
               for i, r in enumerate(runs, 1)
               if "rows_found" in r and r["rows_found"] < r["planned_rows"]]
    if stopped:
        lines.append("Cut off: " + "; ".join(stopped) + ".")
    return lines


def render_markdown(result: dict | str | os.PathLike) -> str:
    """A markdown table of a result or result file (one section per preset)."""
    result = _result(result)
    env = result["environment"]
    cpu = result.get("cpu_timings_are_not_performance_results", False)
    gpu = env.get("gpu") or {}
    clocks = (f" GPU at start: SM {gpu.get('clocks.sm')} of {gpu.get('clocks.max.sm')} MHz, "
              f"memory {gpu.get('clocks.mem')} of {gpu.get('clocks.max.mem')} MHz, power limit "
              f"{gpu.get('power.limit')} W, {gpu.get('temperature.gpu')} °C." if gpu else "")
    lines = [
        f"# rlvr_optim step benchmark — {env['device']}"
        f"{' (CPU timings)' if result.get('cpu_rows') or cpu else ''}",
        "",
        f"{env['date']}, commit {env.get('commit')}, torch {env['torch']}, triton "
        f"{env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')}.{clocks} "
        + " ".join(_runs_summary(result)),
        "",
    ]
    if cpu:
        lines += [f"**{_CPU_NOTE}** Speed-ups are not shown for a CPU run.", ""]
    elif result.get("cpu_rows"):
        lines += [f"**{_CPU_ROWS_NOTE}**", ""]
    columns = ["row", "variant", "ms (min–max)", "B/elem", "GB/s", "share of copy BW",
               *([] if cpu else ["speed-up"]), "step peak extra", "state B/param", "status"]
    for preset in dict.fromkeys(r["preset"] for r in result["rows"]):
        lines += [f"## {preset}", "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]
        for r in (r for r in result["rows"] if r["preset"] == preset):
            spread = (f"{r['ms_median']:.3f} ({r['ms_min']:.3f}–{r['ms_max']:.3f})"
                      if r["ms_median"] is not None else "—")
            extra = (f"{r['step_peak_extra_bytes'] / 2**20:.1f} MiB"
                     if r["step_peak_extra_bytes"] is not None else "—")
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            share = ("—" if r["share_of_copy"] is None else f"{100 * r['share_of_copy']:.0f}%")
            cells = [r["name"], r["variant"], spread, _fmt(r["bytes_per_element"], ".3g"),
                     _fmt(r["gbps"], ".0f"), share]
            if not cpu:
                cells.append(", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup"].items()) or "—")
            cells += [extra, _fmt(r["state_bytes_per_param"], ".2f"), status]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def render_short(result: dict | str | os.PathLike) -> str:
    """A compact plain-text table of a result or result file (what gpu_check.sh prints
    last): per row the median time, its share of the copy bandwidth and, on a GPU, its
    speed-up over each anchor it replaces; rows without a number say why."""
    result = _result(result)
    cpu = result.get("cpu_timings_are_not_performance_results", False)
    runs = result.get("runs") or [result]
    copies = ", ".join(f"{r['copy_gbps']:.0f}" for r in runs)
    lines = [f"{result['environment']['device']}: copy {copies} GB/s"]
    if cpu:
        lines.append(_CPU_NOTE)
    elif result.get("cpu_rows"):
        lines.append(_CPU_ROWS_NOTE)
    lines += _runs_summary(result)[1:]  # the cut-off runs, if any
    lines.append(f"{'preset':20} {'row':52} {'ms':>9}    {'copy':>6}"
                 + ("" if cpu else "  speed-up over the anchor replaced"))
    for r in result["rows"]:
        if r["ms_median"] is None:
            if r["status"] != "unavailable":
                lines.append(f"{r['preset'][:20]:20} {r['name'][:52]:52} {r['status']}: "
                             f"{r['reason'][:60]}")
            continue
        speed = "" if cpu else "  " + ", ".join(f"{v:.2f}x {k}" for k, v in r["speedup"].items())
        lines.append(f"{r['preset'][:20]:20} {r['name'][:52]:52} {r['ms_median']:9.3f} ms "
                     f"{100 * r['share_of_copy']:5.1f}%{speed}".rstrip())
    return "\n".join(lines)


def plot_title(result: dict) -> str:
    """The PNG's title: device and date, and on a CPU that the timings are no results."""
    title = f"{result['environment']['device']} ({result['environment']['date']})"
    if result.get("cpu_timings_are_not_performance_results"):
        title += "\nCPU timings: they keep the harness working and are not performance results"
    elif result.get("cpu_rows"):
        title += "\nCPU rows: the CPU backend beside torch's CPU AdamW, not GPU speed"
    return title


# The plot's colours: one per backend of ours, grey for the anchors, one for tuning rows.
PLOT_COLORS = {"cuda": "tab:green", "triton": "tab:blue", "cpu": "tab:orange",
               "reference": "tab:purple", "anchor": "tab:gray", "tune": "tab:olive"}
_PLOT_LEGEND = {"cuda": "rlvr_optim cuda", "triton": "rlvr_optim triton",
                "cpu": "rlvr_optim cpu", "reference": "rlvr_optim reference",
                "anchor": "anchors (what users run today)", "tune": "triton tuning rows"}


def _plot_kind(row: dict) -> str:
    """The colour key of a row: its group, or for our rows its backend."""
    if row["group"] != "ours":
        return "anchor" if row["group"] == "anchor" else "tune"
    backend = row["name"].split(" ")[1]
    return backend if backend in PLOT_COLORS else "anchor"


def _plot_label(row: dict) -> str:
    """A row's name without the package prefix (the legend says whose rows are whose)."""
    name = row["name"]
    return name[len("rlvr_optim "):] if name.startswith("rlvr_optim ") else name


def render_plot(result: dict | str | os.PathLike, path: str | os.PathLike) -> None:
    """A PNG of :func:`plot_figure`."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig = plot_figure(result)
    try:
        files.write_figure(path, fig, dpi=100)
    finally:
        plt.close(fig)


def plot_figure(result: dict | str | os.PathLike):
    """A matplotlib figure with, per preset, the median step time of every timed row on a
    log axis (so sub-millisecond rows stay visible beside the slow ones) and its share of
    the copy bandwidth, each bar labelled with its value, coloured by backend (legend
    below)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    result = _result(result)
    timed = [r for r in result["rows"] if r["ms_median"] is not None]
    presets = list(dict.fromkeys(r["preset"] for r in timed)) or ["(no timed rows)"]
    counts = [max(1, sum(r["preset"] == p for r in timed)) for p in presets]
    fig, axes = plt.subplots(
        len(presets), 2, squeeze=False, figsize=(15, 1.6 + 0.32 * sum(counts) + 0.9 * len(presets)),
        gridspec_kw={"height_ratios": [c + 2 for c in counts], "width_ratios": [3, 2]},
        layout="constrained")
    for (ax_t, ax_s), preset in zip(axes, presets):
        rows = [r for r in timed if r["preset"] == preset]
        ax_t.set_title(preset, loc="left", fontsize=11, fontweight="bold")
        if not rows:
            ax_t.text(0.5, 0.5, "no timed rows", ha="center", transform=ax_t.transAxes)
            ax_t.set_axis_off()
            ax_s.set_axis_off()
            continue
        y = list(range(len(rows)))
        colors = [PLOT_COLORS[_plot_kind(r)] for r in rows]
        ms = [r["ms_median"] for r in rows]
        ax_t.barh(y, ms, color=colors)
        ax_t.set_xscale("log")
        ax_t.set_xlim(min(ms) / 2, max(ms) * 6)  # room for the value labels
        ax_t.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax_t.set_yticks(y, [_plot_label(r) for r in rows], fontsize=9)
        ax_t.invert_yaxis()
        ax_t.set_xlabel("ms per step (median, log scale)", fontsize=9)
        ax_t.grid(axis="x", which="both", alpha=0.25)
        for i, value in zip(y, ms):
            ax_t.text(value * 1.08, i, f"{value:.3g} ms", va="center", fontsize=8)
        shares = [100 * (r["share_of_copy"] or 0) for r in rows]
        ax_s.barh(y, shares, color=colors)
        ax_s.set_yticks(y, [""] * len(rows))
        ax_s.invert_yaxis()
        ax_s.set_xlim(0, max(100.0, max(shares) * 1.15))
        ax_s.set_xlabel("% of copy bandwidth (same run)", fontsize=9)
        ax_s.grid(axis="x", alpha=0.25)
        for i, value in zip(y, shares):
            ax_s.text(value + 1, i, f"{value:.1f}%", va="center", fontsize=8)
    kinds = [k for k in PLOT_COLORS if any(_plot_kind(r) == k for r in timed)]
    if kinds:
        fig.legend(handles=[Patch(color=PLOT_COLORS[k], label=_PLOT_LEGEND[k]) for k in kinds],
                   loc="outside lower center", ncol=len(kinds), fontsize=9, frameon=False)
    fig.suptitle(plot_title(result), fontsize=11)
    return fig


def render(path: str | os.PathLike) -> tuple[Path, ...]:
    """Render a result file beside itself: ``<stem>.md`` and ``<stem>.png``, and for a
    ``.jsonl`` file (complete or cut off) first ``<stem>.json``, the merged result of
    :func:`load`. Returns the paths written."""
    path = Path(path)
    result = load(path)
    written = []
    if path.suffix == ".jsonl":
        written.append(path.with_suffix(".json"))
        files.write_json(written[-1], result, indent=1)
    md, png = path.with_suffix(".md"), path.with_suffix(".png")
    files.write_text(md, render_markdown(result) + "\n")
    render_plot(result, png)
    return (*written, md, png)


def save(result: dict, out_dir: str | os.PathLike) -> Path:
    """Write a result as ``<out_dir>/<device>/<date>.json`` and render it; returns the JSON path.

    The three files are added to the folder together or not at all
    (:func:`rlvr_optim.files.atomic_files`)."""
    env = result["environment"]
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-") or "cpu"
    folder = Path(out_dir) / slug
    stamp = env["date"].replace(":", "").replace("+0000", "Z")
    with files.atomic_files(folder) as temp:
        files.write_json(temp / f"{stamp}.json", result, indent=1)
        render(temp / f"{stamp}.json")
    return folder / f"{stamp}.json"
