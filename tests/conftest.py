"""Test configuration: Triton runs in its CPU interpreter unless a GPU is present.

The variable must be set before any Triton kernel module is imported. Under
pytest-xdist, each worker gets its share of the cores as torch's intra-op threads.

Without ``-m``, tests marked ``exhaustive`` are left out: the cases of a cross product
beyond the covering design the default run keeps (tests/adamw_cases.py ``matrix``);
``pytest -m exhaustive`` runs them, ``RLVR_OPTIM_EXHAUSTIVE=1`` keeps them in a run
without ``-m``. An explicit ``-m`` expression is taken as it is (``-m gpu`` runs every
GPU case).

``--shard I/N`` keeps every N-th collected test starting at the I-th (0-based), so that N
processes run a suite side by side: bench/gpu_check.sh runs the GPU tests that way, because
compiling the Triton variants, one process at a time, would dominate its time budget.
"""

import fcntl
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _threads_per_worker() -> int | None:
    """torch's intra-op threads for one pytest-xdist worker: the cores divided among the
    workers (None outside xdist). With ``-n auto`` the workers already fill the cores, and
    intra-op threads on top of them make every torch op wait for a descheduled thread: the
    reference's step of 98,317 elements took 0.66 s on 2 threads beside another busy
    process on the 2-core machine, 0.013 s on one."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, int(workers)))


_WORKER_THREADS = _threads_per_worker()
if _WORKER_THREADS is not None:
    torch.set_num_threads(_WORKER_THREADS)
    # the processes tests start (the CLI, bench/gpu_check.sh) too, unless asked otherwise
    os.environ.setdefault("OMP_NUM_THREADS", str(_WORKER_THREADS))


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter patches ``triton.language`` for a launch, then again, by
    ``inspect.getmembers`` over its modules, on every call of a ``@triton.jit`` helper
    inside it, where that finds nothing left to patch: 17 of the 43 s of an interpreted
    bit-exactness case (cProfile, triton 3.9). Inside a launch, each set of language
    modules is patched once; the launch's own patch is undone at its end as before.
    Private API: where it is not what is expected, nothing changes."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch, executor = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "GridExecutor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if patch is None or executor is None or scope_type is None:
        return
    launches: list[set] = []  # per running launch, the language modules it has patched
    modules: dict[int, frozenset] = {}  # id of a module's globals -> its language modules
    run = executor.__call__

    def launch(self, *args, **kwargs):
        launches.append(set())
        try:
            return run(self, *args, **kwargs)
        finally:
            launches.pop()

    def patch_once(fn):
        langs = modules.get(id(fn.__globals__))
        if langs is None:
            langs = modules[id(fn.__globals__)] = frozenset(
                id(v) for v in fn.__globals__.values()
                if v is interpreter.tl or v is interpreter.tl.core)
        if launches and langs in launches[-1]:
            return scope_type()  # nothing to undo
        scope = patch(fn)
        if launches:
            launches[-1].add(langs)
        return scope

    executor.__call__ = launch
    interpreter._patch_lang = patch_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_language_once_per_launch()


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only the tests whose collection index is I modulo N")


def pytest_configure(config):
    if not config.option.markexpr and os.environ.get("RLVR_OPTIM_EXHAUSTIVE", "0") != "1":
        config.option.markexpr = "not exhaustive"


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard takes I/N with integers, got {text!r}") from None
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


# Fixtures that compile for minutes (nvcc, Triton's compiler, a Triton install): the tests
# that use them run first, so that the compiles overlap the rest of the suite on every
# worker instead of ending the run alone.
COMPILING_FIXTURES = ("report_rows", "triton_sites", "variant_reports", "linked_ext")


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(name in getattr(item, "fixturenames", ())
                                        for name in COMPILING_FIXTURES))
    shard = config.getoption("--shard")
    if shard is None:
        return
    index, count = _parse_shard(shard)
    keep = [item for i, item in enumerate(items) if i % count == index]
    dropped = [item for i, item in enumerate(items) if i % count != index]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


@pytest.fixture(scope="session")
def once_per_run(tmp_path_factory):
    """``once(name, make)``: the JSON value ``make()`` returns, made by one process of this
    test run; pytest-xdist's other workers wait for it and read it. A module fixture that
    compiles (the static report) otherwise runs in every worker its tests are sent to, all
    at once. The value lives in this run's temporary folder (the workers share its parent),
    never beyond the run; a ``make()`` that raises leaves nothing, so a waiting worker makes
    it again and meets the same failure."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # .../pytest-N, this run's; popen-gwK is the worker's own
    from rlvr_optim import files

    def once(name: str, make):
        path = Path(base) / f"once-{name}.json"
        with open(Path(base) / f"once-{name}.lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                if path.is_file():
                    return json.loads(path.read_text())
                value = make()
                files.write_json(path, value)
                return value
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    return once


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
