"""Host-side work of one rlvr_optim.AdamW step, kernels stubbed out, on CPU tensors.

With thousands of small tensors (the benchmark's many-small preset: 4000 x 4096) a step is
bound by Python work on the host, not by the GPU, and that part can be measured on any
machine: this script runs steps on CPU tensors with each backend's kernel launch replaced
by a no-op and prints milliseconds per step. It is a development tool, not a performance
result: the real step time on a GPU comes from ``rlvr-optim bench`` (many-small rows).

    python bench/host_overhead.py [--tensors 4000] [--numel 4096] [--track step] [--steps 10]

The ``cuda`` row needs the extension module (``rlvr_optim._C``, or one linked by the tests
in the cache folder); it only reads the module's constants and table layout.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import statistics
import time

import torch


def _linked_extension():
    from rlvr_optim import cuda_backend

    try:
        return cuda_backend.load_extension()
    except Exception:  # noqa: BLE001 - fall back to a module the tests linked
        pattern = os.path.join(cuda_backend._cache_root(), "test_csrc", "nvcc", "*", "_C*.so")
        found = glob.glob(pattern)
        if not found:
            return None
        spec = importlib.util.spec_from_file_location("rlvr_optim._C", found[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


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
    cuda_backend._require_cuda = lambda params: None
    cuda_backend._stream = lambda device: 0
    torch.cuda.is_current_stream_capturing = lambda: False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=4000)
    parser.add_argument("--numel", type=int, default=4096)
    parser.add_argument("--track", default="step", choices=["off", "step", "cumulative"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--backend", action="append", choices=["reference", "triton", "cuda"])
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: the interpreter's host path
    from rlvr_optim import AdamW

    for backend in args.backend or ["reference", "triton", "cuda"]:
        if not _stub(backend):
            print(f"{backend:9}  no extension module to read the table layout from")
            continue
        params = [torch.zeros(args.numel, dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(args.tensors)]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = AdamW(params, lr=1e-4, backend=backend, track_changes=args.track)
        opt.step()  # first step: checks, state, tables
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - start) * 1e3)
        # The median: a step that triggers Python's cyclic garbage collector takes tens of
        # ms more here, whatever the optimizer does; the max shows it.
        print(f"{backend:9}  median {statistics.median(times):7.2f} ms, max {max(times):7.2f} ms "
              f"per step on the host ({args.tensors} tensors, tracking {args.track}; kernels "
              "stubbed, CPU tensors)")


if __name__ == "__main__":
    main()
