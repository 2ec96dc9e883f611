"""bench/gpu_check.sh without a GPU: DEVICE=cpu runs every phase in order on the CPU."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlvr_optim import bench

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
ALLOWED = {"run.log", "rows.jsonl", "env.json", "tests.log", "tune.jsonl", "ncu.log"}
PHASES = ["1", "2", "3", "4", "5", "6", "7"]


def _run_script(out: Path, **settings) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "PYTHON": sys.executable, **settings}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=900)


def _phases(text: str) -> list[str]:
    return re.findall(r"^== phase (\d):", text, flags=re.MULTILINE)


def _checkout_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    before = _checkout_state()
    done = _run_script(out, DEADLINE="300")
    return out, done, before


def test_cpu_run_goes_through_every_phase_in_order(full_run):
    out, done, before = full_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _phases(done.stdout) == PHASES
    assert done.stdout.rstrip().splitlines()[-1].startswith("done in ")
    assert done.stdout.index("== phase 7") < done.stdout.index("== short table")
    assert (out / "run.log").read_text() == done.stdout  # everything printed is logged
    # The GPU-only parts say that they were skipped.
    for what in ("the CUDA extension build (GPU only)", "the CPU extension build (GPU only",
                 "the many-small and mixed presets",
                 "the GPU tests (pytest -m gpu) need a GPU", "not asked (TUNE=1, PROFILE=1)"):
        assert f"skipped: {what}" in done.stdout
    # The smoke check ran on the CPU: Triton under its interpreter against the reference.
    assert "smoke triton default: bit-exact" in done.stdout
    assert "smoke cuda (all modes): skipped: needs a CUDA device" in done.stdout
    assert _checkout_state() == before  # DEVICE=cpu leaves the checkout as it was


def test_cpu_run_writes_at_most_six_known_files_and_the_table_renders(full_run):
    out, done, _ = full_run
    files = {p.name for p in out.rglob("*")}
    assert files <= ALLOWED and len(files) <= 6
    assert files == {"run.log", "rows.jsonl", "env.json"}
    result = bench.load(out / "rows.jsonl")
    assert len(result["runs"]) == 3  # the anchors, the headline rows, the remaining modes
    assert all(r["rows_found"] == r["planned_rows"] for r in result["runs"])
    names = {r["name"] for r in result["rows"] if r["status"] == "ok"}
    assert {"torch fused", "rlvr_optim triton default, tracking off",
            "rlvr_optim triton remainder, tracking step"} <= names
    env = json.loads((out / "env.json").read_text())
    assert env["device_type"] == "cpu" and env["cpu_timings_are_not_performance_results"]
    table = done.stdout.split("== short table")[1]
    assert "not performance results" in table
    assert re.search(r"^cpu-tiny +torch fused +[0-9.]+ ms +[0-9.]+%$", table, flags=re.MULTILINE)
    assert re.search(r"^cpu-tiny +rlvr_optim triton default, tracking step +[0-9.]+ ms",
                     table, flags=re.MULTILINE)


def test_a_short_deadline_skips_what_does_not_fit_and_still_finishes_in_order(tmp_path):
    done = _run_script(tmp_path, DEADLINE="20")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _phases(done.stdout) == PHASES
    # 20 s less the 15 s kept for the table leaves no phase its 10 s minimum: the anchors,
    # the smoke check, the headline rows and the remaining modes say so, in order.
    assert done.stdout.count(" s of them kept for the short table") == 4
    assert "bench on " not in done.stdout and "smoke triton" not in done.stdout
    assert "no rows were measured" in done.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"run.log", "env.json"}


def test_settings_that_cannot_work_are_refused():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "set OUT to the folder for the results" in done.stderr
    done = subprocess.run(["bash", str(SCRIPT)], env={**env, "OUT": "/tmp", "DEVICE": "tpu"},
                          capture_output=True, text=True)
    assert done.returncode == 2 and "DEVICE must be cuda or cpu, got 'tpu'" in done.stderr
