"""Launch a test file as ``WORLD`` gloo processes and wait for them (shared by the 2-rank tests).

A test module that is also the ranks' entry point (``python FILE RANK WORLD PORT OUT``) calls
:func:`launch` from a module fixture: every rank runs with one OpenMP thread and the checkout
on ``PYTHONPATH``; the call fails the test with the tail of each rank's log when a rank exits
non-zero or the ranks together run past ``timeout_s``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the rendezvous of the ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, world: int, out: Path, timeout_s: float) -> None:
    """Run ``script`` as ranks ``0 .. world-1`` writing into ``out``; return when all exit 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    port = free_port()
    logs = [open(out / f"rank{r}.log", "w") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, script, str(r), str(world), str(port), str(out)],
                              env=env, stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(world)]
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    if any(proc.returncode != 0 for proc in procs):
        text = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(world))
        pytest.fail(f"{world}-rank run failed or timed out ({timeout_s} s):\n{text}")
