"""Step-time benchmark of rlvr_optim.AdamW beside what users run today (``rlvr-optim bench``).

Every row times optimizer steps after warm-up (device events on a GPU) and reports the
median with min and max, the effective bandwidth from the bytes-per-element model of
DESIGN.md, and its share of the device-to-device copy bandwidth measured in the same run.
Rows without a number say why (``missing``: not installed; ``unavailable``: no such backend
in this version; ``error``: it raised). ``run`` writes JSON; ``render`` turns JSON into a
markdown table and a PNG plot, separately, so results can be re-rendered.

On a CPU the same code runs the ``cpu-tiny`` shapes so that the test suite keeps the harness
working (those timings are marked as not being performance results), and the ``cpu-10m``
preset, which times the CPU backend against torch's fused CPU AdamW (CPU rows).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import backends

__all__ = ["PRESETS", "bytes_per_element", "render", "run"]

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


PRESETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "r1-distill-qwen-1.5b": _qwen_1_5b_shapes,  # 339 tensors, 1.78e9 elements
    "many-small": lambda: [(4096,)] * 4000,  # launch-bound
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
    group: str  # "ours" or "anchor"
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
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
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


# The Triton launch configurations ``--tune`` times (elements per block, warps, blocks per
# program), default mode with per-step tracking. 4 elements per thread gives 16-byte fp32
# and 8-byte bf16 accesses, 8 per thread 16-byte ones for both at more registers
# (codegen.py reports them); more blocks per program cut per-program work and atomics.
TUNE_GRID = ((1024, 4, 1), (1024, 8, 1), (2048, 8, 1), (2048, 16, 1), (1024, 8, 4),
             (1024, 8, 16), (2048, 8, 8))
_TUNED = ("DEFAULT_BLOCK_GPU", "DEFAULT_NUM_WARPS_GPU", "DEFAULT_CHUNKS_GPU")


def _tuned(build: Callable, block: int, warps: int, chunks: int = 1) -> Callable:
    """``build`` with the Triton backend's default block, warps and blocks per program set
    to ``block``, ``warps`` and ``chunks`` around each step (and restored after), so a row
    times that configuration."""
    from .triton_kernels import adamw as triton_adamw  # noqa: PLC0415

    def configured(fn):
        def call():
            saved = [getattr(triton_adamw, name) for name in _TUNED]
            for name, value in zip(_TUNED, (block, warps, chunks)):
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
    state_bytes = sum(
        v.numel() * v.element_size()
        for st in opt.state.values() for v in st.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    row.state_bytes_per_param = state_bytes / numel


def _environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None
    if device.type == "cuda":
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = None
    return env


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and backends.unavailable_reason("triton") is None


def _why_not_timed(backend: str, device: torch.device, chosen: tuple[str, ...]) -> str | None:
    """Why ``backend`` gets no rows in this run, or None when it is timed."""
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
        if backend == "reference" and device.type == "cuda":
            return "not timed on a GPU: the reference is the specification, not a fast path"
        return "not selected (--backend)"
    return None


def run(
    presets=("r1-distill-qwen-1.5b", "many-small"),
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
) -> dict:
    """Run the benchmark and return its results (JSON-ready).

    Args:
        presets: keys of :data:`PRESETS` (default: the 1.5B shapes and the many-small set).
        device: default: CUDA if available, else CPU (then only tiny presets make sense).
        steps, warmup: timed and untimed steps per row (default 15 and 3).
        backends_to_time: our backends to time (default on a GPU: the fused backends
            available; on a CPU: the reference, and Triton when its interpreter is on, which
            keeps the harness working; the reference is the specification and is not timed
            on a GPU).
        tracks: change-tracking settings for our rows (default off and per step).
        anchors: names of :data:`ANCHORS` to run (default all; graph rows need CUDA).
        progress: tqdm progress bar on stderr.
        graph: also time our default mode (tracking per step) replayed from a CUDA graph,
            per timed backend (rows marked unavailable without CUDA).
        tune: also time the Triton backend's default mode (tracking per step) at every
            (block, warps, blocks per program) of :data:`TUNE_GRID` (group "tune").
        modes: names of :data:`OUR_MODES` to time (default all; ``()`` for none, e.g. a
            tuning run).
    """
    from tqdm import tqdm  # noqa: PLC0415

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    unknown = [a for a in (anchors or ()) if a not in ANCHORS]
    if unknown:
        raise ValueError(f"unknown anchor(s) {unknown}; choose from {sorted(ANCHORS)}")
    unknown = [m for m in (modes or ()) if m not in OUR_MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {list(OUR_MODES)}")
    chosen_modes = tuple(OUR_MODES) if modes is None else tuple(modes)
    too_big = [p for p in presets if device.type == "cpu" and p not in CPU_PRESETS]
    if too_big:
        raise ValueError(f"preset(s) {too_big} are sized for a GPU; on a CPU use "
                         f"{' or '.join(map(repr, CPU_PRESETS))}")
    if backends_to_time is None:
        if device.type == "cuda":
            backends_to_time = tuple(b for b in ("cuda", "triton")
                                     if backends.unavailable_reason(b) is None)
        else:  # the CPU backend, the reference, and Triton's kernels under its interpreter
            backends_to_time = (("cpu",) if backends.unavailable_reason("cpu") is None else ()) \
                + ("reference",) + (("triton",) if _interpreter_on() else ())
    anchor_names = anchors if anchors is not None else tuple(ANCHORS)
    timer = _Timer(device)
    copy_bytes = (1 << 30) if device.type == "cuda" else (1 << 26)
    result = {
        "environment": _environment(device),
        "copy_gbps": copy_bandwidth(device, copy_bytes),
        "steps": steps,
        "warmup": warmup,
        "cpu_timings_are_not_performance_results": device.type == "cpu"
        and set(presets) <= {"cpu-tiny"},
        "rows": [],
    }
    plan = []
    for preset in presets:
        shapes = PRESETS[preset]()
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        for name in anchor_names:
            build, nbytes, variant = ANCHORS[name]
            plan.append((Row(name, "anchor", preset, variant, bytes_per_element=nbytes),
                         (lambda b=build, s=shapes: b(s, device)), numel))
        for backend in ("cuda", "triton", "cpu", "reference"):
            reason = _why_not_timed(backend, device, backends_to_time)
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
                for block, warps, chunks in TUNE_GRID:
                    row = Row(f"rlvr_optim triton default, tracking step [BLOCK {block}, "
                              f"{warps} warps, {chunks} per program]", "tune", preset,
                              bytes_per_element=_our_bytes("default", "step"))
                    build = (lambda s=shapes: _ours(s, device, "triton", {}, False, "step"))
                    plan.append((row, _tuned(build, block, warps, chunks), numel))
    bar = tqdm(total=len(plan), desc="bench", disable=not progress, unit="row")
    for row, build, numel in plan:
        bar.set_postfix_str(f"{row.preset}: {row.name}"[:60])
        if row.status == "ok":
            if row.variant == "graph" and device.type != "cuda":
                row.status, row.reason = "unavailable", "CUDA graphs need a GPU"
            else:
                _measure(row, build, device, timer, steps, warmup, numel)
        if row.ms:
            row.ms_median, row.ms_min, row.ms_max = statistics.median(row.ms), min(row.ms), max(row.ms)
            row.gbps = row.bytes_per_element * numel / (row.ms_median * 1e-3) / 1e9
            row.share_of_copy = row.gbps / result["copy_gbps"]
        result["rows"].append(row)
        bar.update(1)
    bar.close()
    _add_speedups(result["rows"])
    result["rows"] = [vars(r) for r in result["rows"]]
    return result


def _add_speedups(rows: list[Row]) -> None:
    timed = {(r.preset, r.name): r.ms_median for r in rows if r.ms_median}
    for r in rows:
        if r.group not in ("ours", "tune") or not r.ms_median:
            continue
        mode = next(m for m in OUR_MODES if f" {m}, tracking" in r.name)
        compare = ("torch fused (CUDA graph)",) if r.variant == "graph" else _COMPARE[mode]
        for anchor in compare:
            if (r.preset, anchor) in timed:
                r.speedup[anchor] = timed[(r.preset, anchor)] / r.ms_median


# ---------------------------------------------------------------------- rendering


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def render_markdown(result: dict) -> str:
    """A markdown table of a result (one section per preset)."""
    env = result["environment"]
    lines = [
        f"# rlvr_optim step benchmark — {env['device']}",
        "",
        f"{env['date']}, commit {env.get('commit')}, torch {env['torch']}, triton "
        f"{env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')}. "
        f"Median of {result['steps']} steps after {result['warmup']} warm-up steps; "
        f"copy bandwidth {result['copy_gbps']:.0f} GB/s (read + write) measured in this run.",
        "",
    ]
    if result.get("cpu_timings_are_not_performance_results"):
        lines += ["**CPU run: these timings only keep the harness working; they are not "
                  "performance results.**", ""]
    for preset in dict.fromkeys(r["preset"] for r in result["rows"]):
        lines += [f"## {preset}", "",
                  "| row | variant | ms (min–max) | B/elem | GB/s | share of copy BW | "
                  "speed-up | step peak extra | state B/param | status |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if r["preset"] == preset):
            spread = (f"{r['ms_median']:.3f} ({r['ms_min']:.3f}–{r['ms_max']:.3f})"
                      if r["ms_median"] is not None else "—")
            speed = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup"].items()) or "—"
            extra = (f"{r['step_peak_extra_bytes'] / 2**20:.1f} MiB"
                     if r["step_peak_extra_bytes"] is not None else "—")
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            share = _fmt(None if r["share_of_copy"] is None else 100 * r["share_of_copy"], ".0f")
            lines.append(
                f"| {r['name']} | {r['variant']} | {spread} | {_fmt(r['bytes_per_element'], '.3g')} | "
                f"{_fmt(r['gbps'], '.0f')} | {share}{'%' if r['share_of_copy'] is not None else ''} | "
                f"{speed} | {extra} | {_fmt(r['state_bytes_per_param'], '.2f')} | {status} |")
        lines.append("")
    return "\n".join(lines)


def render_short(result: dict) -> str:
    """A compact plain-text table of the timed rows (what gpu_check.sh prints last)."""
    lines = [f"{result['environment']['device']}: copy {result['copy_gbps']:.0f} GB/s"]
    for r in result["rows"]:
        if r["ms_median"] is None:
            if r["status"] != "unavailable":
                lines.append(f"{r['preset'][:20]:20} {r['name'][:52]:52} {r['status']}")
            continue
        speed = " ".join(f"{v:.2f}x" for v in r["speedup"].values())
        lines.append(f"{r['preset'][:20]:20} {r['name'][:52]:52} {r['ms_median']:9.3f} ms "
                     f"{100 * r['share_of_copy']:5.1f}% {speed}")
    return "\n".join(lines)


def render_plot(result: dict, path: str | os.PathLike) -> None:
    """A PNG with, per preset, time and share of copy bandwidth of every timed row."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    presets = list(dict.fromkeys(r["preset"] for r in result["rows"]))
    fig, axes = plt.subplots(len(presets), 2, figsize=(14, 1 + 0.35 * len(result["rows"])),
                             squeeze=False)
    for (ax_t, ax_s), preset in zip(axes, presets):
        rows = [r for r in result["rows"] if r["preset"] == preset and r["ms_median"] is not None]
        names = [r["name"] for r in rows]
        colors = ["tab:blue" if r["group"] == "ours" else "tab:gray" for r in rows]
        ax_t.barh(names, [r["ms_median"] for r in rows], color=colors)
        ax_t.set_xlabel("ms per step (median)")
        ax_t.set_title(preset)
        ax_t.invert_yaxis()
        ax_s.barh(names, [100 * r["share_of_copy"] for r in rows], color=colors)
        ax_s.set_xlabel("% of copy bandwidth")
        ax_s.set_yticks([])
        ax_s.invert_yaxis()
    fig.suptitle(f"{result['environment']['device']} ({result['environment']['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render(json_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.png`` beside a result JSON; returns their paths."""
    json_path = Path(json_path)
    result = json.loads(json_path.read_text())
    md, png = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md.write_text(render_markdown(result) + "\n")
    render_plot(result, png)
    return md, png


def save(result: dict, out_dir: str | os.PathLike) -> Path:
    """Write a result as ``<out_dir>/<device>/<date>.json`` and render it; returns the JSON path."""
    env = result["environment"]
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-") or "cpu"
    folder = Path(out_dir) / slug
    folder.mkdir(parents=True, exist_ok=True)
    stamp = env["date"].replace(":", "").replace("+0000", "Z")
    path = folder / f"{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    render(path)
    return path
