"""Test configuration: Triton runs in its CPU interpreter unless a GPU is present.

The variable must be set before any Triton kernel module is imported.

``--shard I/N`` keeps every N-th collected test starting at the I-th (0-based), so that N
processes run a suite side by side: bench/gpu_check.sh runs the GPU tests that way, because
compiling the Triton variants, one process at a time, would dominate its time budget.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only the tests whose collection index is I modulo N")


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard takes I/N with integers, got {text!r}") from None
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard is None:
        return
    index, count = _parse_shard(shard)
    keep = [item for i, item in enumerate(items) if i % count == index]
    dropped = [item for i, item in enumerate(items) if i % count != index]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
