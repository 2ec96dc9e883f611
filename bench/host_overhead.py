"""Host-side work of one rlvr_optim.AdamW step, kernels stubbed out, on CPU tensors.

With thousands of small tensors (the benchmark's many-small preset: 4000 x 4096) a step is
bound by Python work on the host, not by the GPU, and that part can be measured on any
machine: this script runs steps on CPU tensors with each backend's kernel launch replaced
by a no-op and prints milliseconds per step, beside the floor: reading the grads and their
data pointers in Python (``[p.grad.data_ptr() for p in params]``), what any step over these
tensors costs at least. It is a development tool, not a performance result: the real step
time on a GPU comes from ``rlvr-optim bench`` (many-small rows).

    python bench/host_overhead.py [--tensors 4000] [--numel 4096] [--track step] [--steps 30]
                                  [--json]

The floor and the backends are timed in turns within each round (each going first in turn),
so that load from other processes on the machine reaches them alike; medians over the
rounds. They all read one set of params and grads: with a set each, reading the grads of
the set built first took 1.3-1.6x as long as reading those of the next one (measured in one
process on the 2-core VM, whichever backend owned it), which decided their ratios to the
floor more than their own work. ``--json`` prints one JSON object ``{"floor_ms",
"reference_ms", "triton_ms", "cuda_ms"}`` after the table (null for a backend that cannot
run here). The ``cuda`` row needs the extension module
(``rlvr_optim._C``, or one linked by the tests in the cache folder); it only reads the
module's constants and table layout.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import time

import torch

BACKENDS = ("reference", "triton", "cuda")


def _linked_extension():
    """The CUDA extension, or else the newest module tests/test_csrc.py linked (binding.cu
    with stand-in launchers) that is of this package's version; None when there is none."""
    from rlvr_optim import cuda_backend, extensions

    try:
        return cuda_backend.load_extension()
    except Exception:  # noqa: BLE001 - fall back to a module the tests linked
        root = os.path.join(extensions.cache_root(), "test_csrc")
        found = glob.glob(os.path.join(root, "*", "*", "_C*.so"))
        for path in sorted(found, key=os.path.getmtime, reverse=True):
            spec = importlib.util.spec_from_file_location("rlvr_optim._C", path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except ImportError:  # built against another torch
                continue
            if extensions.CUDA.usable(module):
                return module
        return None


def _stub(backend: str) -> bool:
    """Replace ``backend``'s launch with a no-op; False when it cannot run here."""
    if backend == "reference":
        from rlvr_optim import reference

        reference.adamw = lambda *args, **kwargs: None
        return True
    if backend == "triton":
        from rlvr_optim.triton_kernels import adamw as triton_adamw

        class NoLaunch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: None

        triton_adamw.adamw_table_kernel = NoLaunch()
        return True
    from rlvr_optim import cuda_backend

    ext = _linked_extension()
    if ext is None:
        return False

    class Recorder:
        def __getattr__(self, name):
            return getattr(ext, name)

        def launch_adamw(self, *args):
            pass

    cuda_backend.load_extension = Recorder
    cuda_backend._POLICY = cuda_backend._POLICY._replace(check_device=lambda i, param: None)
    cuda_backend._stream = lambda device: 0
    return True


def _model(args) -> list[torch.Tensor]:
    params = [torch.zeros(args.numel, dtype=torch.bfloat16, requires_grad=True)
              for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.zeros_like(p)
    return params


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=4000)
    parser.add_argument("--numel", type=int, default=4096)
    parser.add_argument("--track", default="step", choices=["off", "step", "cumulative"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--backend", action="append", choices=BACKENDS)
    parser.add_argument("--json", action="store_true", help="also print the medians as JSON")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: the interpreter's host path
    # One intra-op thread: the few tensor ops of a step stand in for GPU launches here. With
    # two, the OpenMP thread that a float64 sqrt of 4000 elements wakes keeps spinning and
    # slowed the Python work after it 2-3x on the shared 2-core machine (floor included).
    torch.set_num_threads(1)
    from rlvr_optim import AdamW

    params = _model(args)  # one set for all: see the docstring
    steps = {"floor": lambda: [p.grad.data_ptr() for p in params]}
    missing = []
    for backend in args.backend or BACKENDS:
        if not _stub(backend):
            missing.append(backend)
            continue
        opt = AdamW(params, lr=1e-4, backend=backend, track_changes=args.track)
        opt.step()  # first step: checks, state, tables
        steps[backend] = opt.step
    times = {name: [] for name in steps}
    names = list(steps)
    for k in range(args.steps):
        for name in names[k % len(names):] + names[:k % len(names)]:  # each goes first in turn
            times[name].append(_timed(steps[name]))
    # The median: a step that triggers Python's cyclic garbage collector takes tens of ms
    # more here, whatever the optimizer does; the max shows it.
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        ratio = f"{medians[name] / medians['floor']:5.2f}x floor" if name != "floor" else ""
        print(f"{name:9}  median {medians[name]:7.2f} ms, max {max(t):7.2f} ms  {ratio}")
    for backend in missing:
        print(f"{backend:9}  no extension module to read the table layout from")
    print(f"(per step on the host: {args.tensors} tensors of {args.numel}, tracking "
          f"{args.track}; kernels stubbed, CPU tensors; {args.steps} rounds)")
    if args.json:
        print(json.dumps({f"{name}_ms": medians.get(name) for name in ("floor", *BACKENDS)}))


if __name__ == "__main__":
    main()
