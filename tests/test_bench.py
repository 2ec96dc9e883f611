"""The benchmark harness in its CPU mode: schema, bytes model, every anchor accounted for."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlvr_optim import bench
from rlvr_optim.cli import main
from rlvr_optim.errors import InputError


@pytest.fixture(scope="module")
def result():
    return bench.run(presets=("cpu-tiny",), device="cpu", steps=2, warmup=1, progress=False)


def test_bytes_model_matches_design():
    # DESIGN.md: bf16 param r+w 4, bf16 grad 2, fp32 m and v r+w 16, master r+w 8,
    # remainder 4, bitmap 1/8, cumulative bitmap 1/4, freeze mask 1/8.
    assert bench.bytes_per_element() == 14  # bf16 params, grads and states
    assert bench.bytes_per_element(state=4) == 22
    assert bench.bytes_per_element(state=4, master=4) == 30
    assert bench.bytes_per_element(state=4, remainder=True) == 26
    assert bench.bytes_per_element(state=4, track="step") == 22 + 1 / 8
    assert bench.bytes_per_element(state=4, track="cumulative", freeze=True) == 22 + 1 / 8 + 1 / 4 + 1 / 8


def test_presets_have_the_documented_shapes():
    shapes = bench.PRESETS["r1-distill-qwen-1.5b"]()
    assert len(shapes) == 339
    assert sum(torch.Size(s).numel() for s in shapes) == pytest.approx(1.78e9, rel=0.005)
    assert bench.PRESETS["many-small"]() == [(4096,)] * 4000
    mixed = bench.PRESETS["mixed"]()
    large = [s for s in mixed if len(s) == 2]
    assert len(large) == 4 and len(mixed) - len(large) == 3000  # 100 layers x 30 vectors
    assert sum(torch.Size(s).numel() for s in mixed) == pytest.approx(1.74e8, rel=0.005)


def test_the_launch_bound_presets_plan_eager_and_graph_rows(monkeypatch):
    """many-small and mixed get our default mode and torch fused, eager and replayed from
    a CUDA graph; on a CPU (the presets are refused there) the plan is checked with the
    CPU limit lifted, and the graph rows say why they have no numbers."""
    monkeypatch.setattr(bench, "CPU_PRESETS", ("many-small", "mixed"))
    monkeypatch.setitem(bench.PRESETS, "many-small", lambda: [(16,)] * 3)
    monkeypatch.setitem(bench.PRESETS, "mixed", lambda: [(64, 8), (16,), (16,), (8,)])
    result = bench.run(presets=("many-small", "mixed"), device="cpu", steps=1, warmup=0,
                       progress=False, backends_to_time=("reference",),
                       anchors=("torch fused", "torch fused (CUDA graph)"),
                       modes=("default",), tracks=("step",))
    for preset in ("many-small", "mixed"):
        rows = {r["name"]: r for r in result["rows"] if r["preset"] == preset}
        eager = [rows["torch fused"], rows["rlvr_optim reference default, tracking step"]]
        assert all(r["status"] == "ok" and r["ms_median"] > 0 for r in eager)
        for name in ("torch fused (CUDA graph)",
                     "rlvr_optim reference default, tracking step (CUDA graph)"):
            assert rows[name]["variant"] == "graph"
            assert rows[name]["status"] == "unavailable"
            assert rows[name]["reason"] == "CUDA graphs need a GPU"


def test_host_overhead_prints_one_json_object_of_positive_medians():
    script = Path(__file__).resolve().parents[1] / "bench" / "host_overhead.py"
    out = subprocess.run([sys.executable, str(script), "--tensors", "40", "--numel", "64",
                          "--steps", "3", "--json"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    lines = out.strip().splitlines()
    medians = json.loads(lines[-1])
    assert set(medians) == {"floor_ms", "reference_ms", "triton_ms", "cuda_ms"}
    timed = ["floor_ms", "reference_ms", "triton_ms"]
    if medians["cuda_ms"] is None:  # only without an extension module to read
        assert any(line.startswith("cuda") and "no extension" in line for line in lines)
    else:
        timed.append("cuda_ms")
    for key in timed:
        assert isinstance(medians[key], float) and medians[key] > 0, key
    assert any(line.startswith("triton") and "x floor" in line for line in lines)


@pytest.mark.parametrize("native", [True, False])
def test_environment_names_the_host_path_the_steps_took(native, monkeypatch):
    from rlvr_optim import _checked, cpu_backend

    if native:
        if cpu_backend.unavailable_reason() is not None:
            pytest.skip("the CPU extension is not built")
        cpu_backend.load_extension()
        monkeypatch.delitem(_checked.EXTENSION_FUNCTIONS, "read_gradients", raising=False)
    else:
        monkeypatch.setitem(_checked.EXTENSION_FUNCTIONS, "read_gradients", False)
    expected = "cpu extension" if native else "python"
    assert bench.environment("cpu")["host_path"] == expected


def test_cpu_result_schema_and_every_anchor_accounted_for(result):
    env = result["environment"]
    for key in ("date", "device", "torch", "triton", "commit", "python", "host_path"):
        assert key in env
    assert result["cpu_timings_are_not_performance_results"] is True
    assert result["copy_gbps"] > 0
    rows = result["rows"]
    names = {r["name"] for r in rows}
    assert set(bench.ANCHORS) <= names  # nothing silently dropped
    for r in rows:
        assert r["status"] in ("ok", "missing", "unavailable", "error"), r
        if r["status"] == "ok":
            assert len(r["ms"]) == 2 and r["ms_min"] <= r["ms_median"] <= r["ms_max"]
            numel = sum(torch.Size(s).numel() for s in bench.PRESETS["cpu-tiny"]())
            seconds = r["ms_median"] * 1e-3
            assert r["gbps"] == pytest.approx(r["bytes_per_element"] * numel / seconds / 1e9)
            assert r["share_of_copy"] == pytest.approx(r["gbps"] / result["copy_gbps"])
            assert r["state_bytes_per_param"] > 0
        else:
            assert r["reason"] and r["ms_median"] is None
    by_name = {r["name"]: r for r in rows}
    # Installed here: torch's own anchors have numbers; the graph row needs a GPU.
    assert by_name["torch fused"]["status"] == "ok"
    assert by_name["torch fused fp32 master + bf16 cast"]["state_bytes_per_param"] == 8
    assert by_name["torch fused (CUDA graph)"]["status"] == "unavailable"
    # Our reference rows are timed in the CPU mode, with state bytes from the real state.
    ours = by_name["rlvr_optim reference fp32 master, tracking step"]
    assert ours["status"] == "ok"
    # bf16 moments 2 + 2, fp32 master 4, bitmap 1/8, plus the per-tensor counters.
    assert 8 + 1 / 8 < ours["state_bytes_per_param"] < 8.5
    assert "torch fused fp32 master + bf16 cast" in ours["speedup"]
    # Triton runs here under its interpreter (conftest): its rows keep the harness honest
    # for a second backend. The CUDA extension needs a GPU, whether built or not.
    assert by_name["rlvr_optim triton default, tracking step"]["status"] == "ok"
    cuda = by_name["rlvr_optim cuda (all modes)"]
    assert cuda["status"] == "unavailable" and cuda["ms_median"] is None
    for backend in ("reference", "triton"):
        graph = by_name[f"rlvr_optim {backend} default, tracking step (CUDA graph)"]
        assert graph["variant"] == "graph" and graph["status"] == "unavailable"


def test_tune_rows_time_each_triton_configuration_and_restore_the_default():
    from rlvr_optim.triton_kernels import adamw as triton_adamw

    before = [getattr(triton_adamw, name) for name in bench._TUNED]
    result = bench.run(presets=("cpu-tiny",), device="cpu", steps=1, warmup=0, progress=False,
                       backends_to_time=("triton",), anchors=("torch fused",), graph=False,
                       tune=True, tracks=("step",), modes=())
    assert not [r for r in result["rows"] if r["group"] == "ours" and r["status"] == "ok"]
    tune = [r for r in result["rows"] if r["group"] == "tune"]
    assert [r["name"] for r in tune] == [
        f"rlvr_optim triton default, tracking step {bench.tune_label(c)}"
        for c in bench.TUNE_GRID]
    assert all(r["status"] == "ok" and "torch fused" in r["speedup"] for r in tune), tune
    assert [getattr(triton_adamw, name) for name in bench._TUNED] == before
    with pytest.raises(ValueError, match="unknown anchor"):
        bench.run(presets=("cpu-tiny",), device="cpu", anchors=("torch slow",), progress=False)
    with pytest.raises(ValueError, match="unknown mode"):
        bench.run(presets=("cpu-tiny",), device="cpu", modes=("fast",), progress=False)
    with pytest.raises(InputError, match=r"unknown backend\(s\) \['cudnn'\]"):
        bench.run(presets=("cpu-tiny",), device="cpu", backends_to_time=("cudnn",), progress=False)


def test_tuned_step_sees_its_configuration():
    from rlvr_optim.triton_kernels import adamw as triton_adamw

    def now():
        return tuple(getattr(triton_adamw, name) for name in bench._TUNED)

    seen = []
    step = bench._tuned(lambda: (None, None, lambda: seen.append(now())), 2048, 8, 3, 2)
    before = now()
    step()[2]()
    assert seen == [(2048, 8, 3, 2)]
    assert now() == before


def test_save_render_and_cli(result, tmp_path, capsys, monkeypatch):
    path = bench.save(result, tmp_path)
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    md = path.with_suffix(".md").read_text()
    assert "not performance results" in md and "| torch fused |" in md
    # A CPU run shows no speed-up column: it would read as a performance claim.
    assert "speed-up" not in md.split("## cpu-tiny")[1]
    assert "not performance results" in bench.plot_title(result)
    assert "not performance results" in bench.render_short(result)
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.chdir(tmp_path)  # the default --out is a folder of the current directory
    assert main(["bench", "--preset", "cpu-tiny", "--steps", "1", "--warmup", "0",
                 "--backend", "reference", "--anchor", "torch fused", "--anchor",
                 "torch foreach", "--no-graph", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "torch fused" in printed and "not performance results" in printed
    # One line per finished row even without the progress bar.
    assert "] cpu-tiny: torch foreach: " in printed and "(CPU timing, not a performance result)" in printed
    saved = json.loads(next((tmp_path / bench.DEFAULT_OUT).glob("*/*.json")).read_text())
    names = {r["name"] for r in saved["rows"]}
    assert {"torch fused", "torch foreach"} <= names and "torch fused (CUDA graph)" not in names
    assert not any("CUDA graph" in n for n in names)  # --no-graph
    assert "not selected" in next(r["reason"] for r in saved["rows"]
                                  if r["name"] == "rlvr_optim triton (all modes)")


def _quick_run(**kwargs):
    """A CPU run of the reference's default mode beside two anchors (about a second)."""
    options = dict(presets=("cpu-tiny",), device="cpu", steps=1, warmup=0, progress=False,
                   backends_to_time=("reference",), anchors=("torch fused", "torch foreach"),
                   graph=False, modes=("default",), tracks=("off", "step"))
    return bench.run(**{**options, **kwargs})


def test_jsonl_run_stopped_after_its_first_rows_keeps_them_complete_and_renderable(
        tmp_path, monkeypatch):
    measured = []
    real = bench._measure

    def stop_at_the_third(row, *args):
        if len(measured) == 2:
            raise KeyboardInterrupt  # as a timeout's SIGINT would, in the middle of a row
        real(row, *args)
        measured.append(row.name)

    monkeypatch.setattr(bench, "_measure", stop_at_the_third)
    path = tmp_path / "rows.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _quick_run(jsonl=path)
    lines = path.read_text().splitlines()
    header, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert header["environment"]["device_type"] == "cpu" and header["copy_gbps"] > 0
    assert header["planned_rows"] > 3
    # Every row before the interruption (in the third timed row), complete: the Row
    # fields, timings included; the rows that say why a backend was not timed are rows too.
    assert [r["name"] for r in rows] == ["torch fused", "torch foreach",
                                         "rlvr_optim cuda (all modes)",
                                         "rlvr_optim triton (all modes)",
                                         "rlvr_optim cpu (all modes)"]
    assert [r["name"] for r in rows if r["ms"]] == measured == ["torch fused", "torch foreach"]
    assert all(set(r) == set(vars(bench.Row("", "", ""))) for r in rows)
    loaded = bench.load(path)
    assert loaded["runs"][0]["rows_found"] == len(rows) < header["planned_rows"]
    short = bench.render_short(path)
    assert "Cut off: run 1 stopped after 5 of" in short
    assert [line[21:73].strip() for line in short.splitlines()  # the name column
            if line.startswith("cpu-tiny")] == ["torch fused", "torch foreach"]
    written = bench.render(path)
    assert [p.suffix for p in written] == [".json", ".md", ".png"]
    md = written[1].read_text()
    assert f"run 1 stopped after {len(rows)} of {header['planned_rows']} rows" in md
    assert "| torch foreach |" in md and "not performance results" in md
    assert json.loads(written[0].read_text())["rows"] == loaded["rows"]


def test_jsonl_killed_mid_run_in_a_subprocess_leaves_whole_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    command = [sys.executable, "-m", "rlvr_optim", "bench", "--device", "cpu", "--steps", "2",
               "--warmup", "1", "--backend", "triton", "--anchor", "none", "--no-graph",
               "--no-progress", "--jsonl", str(path)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # interpreted kernels: rows of ~1 s
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if path.is_file() and path.read_text().count("\n") >= 4:  # header + 3 rows
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be stopped"
        process.kill()  # SIGKILL: no handler runs, only what was flushed survives
    finally:
        process.kill()
        process.wait()
    result = bench.load(path)
    (run,) = result["runs"]
    assert 3 <= run["rows_found"] < run["planned_rows"]
    timed = [r for r in result["rows"] if r["status"] == "ok"]
    assert timed and all(len(r["ms"]) == 2 and r["ms_median"] > 0 for r in timed)
    assert "rlvr_optim triton default, tracking off" in bench.render_short(path)


def test_load_skips_a_line_cut_mid_write_and_refuses_other_damage(tmp_path):
    path = tmp_path / "rows.jsonl"
    _quick_run(jsonl=path)
    whole = path.read_text()
    path.write_text(whole + whole.splitlines()[-1][:25])  # killed while writing a row
    loaded = bench.load(path)
    assert loaded["cut_off_line"] is True
    assert [r["name"] for r in loaded["rows"]] == [r["name"] for r in bench.load(
        tmp_path.joinpath("rows.jsonl"))["rows"]]
    lines = whole.splitlines()
    path.write_text("\n".join([lines[0], lines[1][:25], *lines[2:]]) + "\n")
    with pytest.raises(InputError, match="line 2: not JSON"):
        bench.load(path)
    path.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(InputError, match="does not start with a run's header"):
        bench.load(path)
    other = tmp_path / "other.json"
    other.write_text('{"loss": 1}')
    with pytest.raises(InputError, match="not a benchmark result"):
        bench.render(other)


def test_runs_appended_to_one_jsonl_merge_and_compare_with_earlier_anchors(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    _quick_run(jsonl=path, backends_to_time=(), modes=())  # anchors only
    second = _quick_run(jsonl=path, anchors=(), echo=True)  # our rows only
    # The second run found the first run's anchor in the file for its speed-ups.
    ours = next(r for r in second["rows"] if r["name"] == "rlvr_optim reference default, tracking off")
    assert set(ours["speedup"]) == {"torch fused"}
    assert "] cpu-tiny: rlvr_optim reference default, tracking off: " in capsys.readouterr().out
    loaded = bench.load(path)
    assert len(loaded["runs"]) == 2
    names = [r["name"] for r in loaded["rows"]]
    assert names.count("rlvr_optim cuda (all modes)") == 1  # one placeholder per backend
    # The first run's "not selected" row for the reference is gone: the second timed it.
    assert "rlvr_optim reference (all modes)" not in names
    assert "rlvr_optim reference default, tracking step" in names and "torch fused" in names
    merged = next(r for r in loaded["rows"] if r["name"] == ours["name"])
    assert merged["speedup"]["torch fused"] == pytest.approx(ours["speedup"]["torch fused"])
    assert "in each of its 2 runs" in bench.render_markdown(path)


def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    out, rows = tmp_path / "out", tmp_path / "rows.jsonl"
    for device, says in (("cuda", "has no CUDA device"), ("cuda:1", "has no CUDA device"),
                         ("tpu", "not a device name"),
                         ("mps", "only cpu and cuda devices")):
        assert main(["bench", "--device", device, "--no-progress", "--out", str(out),
                     "--jsonl", str(rows)]) == 2
        err = capsys.readouterr().err
        assert f"--device {device}" in err and says in err and "--device cpu" in err
        assert err.count("\n") == 1
        with pytest.raises(InputError, match=says):
            bench.run(presets=("cpu-tiny",), device=device, progress=False)
    assert not out.exists() and not rows.exists()
    with pytest.raises(InputError, match="must be a file in an existing folder"):
        bench.run(presets=("cpu-tiny",), device="cpu", jsonl=tmp_path, progress=False)
    with pytest.raises(InputError, match="must be a file in an existing folder"):
        bench.run(presets=("cpu-tiny",), device="cpu", jsonl=out / "rows.jsonl", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match=r"1 CUDA device\(s\), cuda:0 to cuda:0"):
        bench.resolve_device("cuda:1")


def test_jsonl_without_out_writes_only_the_jsonl(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--device", "cpu", "--steps", "1", "--warmup", "0", "--backend",
                 "none", "--anchor", "torch fused", "--no-graph", "--no-progress",
                 "--jsonl", "rows.jsonl"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
    assert "appended 5 rows to rows.jsonl" in capsys.readouterr().out
    assert [r["name"] for r in bench.load("rows.jsonl")["rows"]][0] == "torch fused"


def test_gpu_presets_are_refused_on_cpu_before_any_work():
    with pytest.raises(ValueError, match="sized for a GPU"):
        bench.run(presets=("r1-distill-qwen-1.5b",), device="cpu", progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        bench.run(presets=("llama-405b",), device="cpu", progress=False)


def test_cli_refuses_a_gpu_preset_on_cpu_with_a_message(capsys):
    assert main(["bench", "--preset", "many-small", "--device", "cpu", "--no-progress"]) == 2
    assert "sized for a GPU" in capsys.readouterr().err


def _gpu_like_rows(path):
    """A JSONL as a GPU run would stream it (made-up numbers: this tests rendering only)."""
    header = {"environment": {"date": "2026-12-01T10:00:00+00:00", "device": "NVIDIA H200",
                              "device_type": "cuda", "torch": "2.11", "cuda": "12.8",
                              "triton": "3.6", "commit": "abc1234", "driver": "570",
                              "gpu": {"clocks.sm": "1980", "clocks.max.sm": "1980"}},
              "copy_gbps": 4000.0, "steps": 15, "warmup": 3,
              "cpu_timings_are_not_performance_results": False, "planned_rows": 2}
    rows = [bench.Row("torch fused", "anchor", "r1-distill-qwen-1.5b", ms_median=12.0,
                      ms_min=11.0, ms_max=13.0, ms=[12.0], share_of_copy=0.5, gbps=2000.0),
            bench.Row("rlvr_optim cuda default, tracking step", "ours", "r1-distill-qwen-1.5b",
                      ms_median=10.0, ms_min=9.0, ms_max=11.0, ms=[10.0], share_of_copy=0.6,
                      gbps=2400.0)]
    path.write_text("\n".join(json.dumps(r) for r in [header, *map(vars, rows)]) + "\n")


def test_gpu_results_render_with_speed_ups_and_no_cpu_note(tmp_path):
    path = tmp_path / "rows.jsonl"
    _gpu_like_rows(path)
    short = bench.render_short(path)
    assert "1.20x torch fused" in short and "not performance results" not in short
    md = bench.render_markdown(path)
    assert "| speed-up |" in md and "1.20x vs torch fused" in md and "SM 1980 of 1980 MHz" in md
    assert "not performance results" not in bench.plot_title(bench.load(path))


def test_gpu_clocks_are_read_for_the_device_in_use(monkeypatch):
    class Done:
        stdout = ("GPU-aaaa, 570.1, 1500, 2619, 1980, 2619, 700.00, 40\n"
                  "GPU-bbbb, 570.1, 1980, 2619, 1980, 2619, 700.00, 35\n")

    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: Done())
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: type("Props", (), {"uuid": "bbbb"})())
    gpu = bench._gpu_query(torch.device("cuda", 1))
    assert gpu["driver_version"] == "570.1" and gpu["clocks.sm"] == "1980"
    assert gpu["temperature.gpu"] == "35"


def test_commit_is_marked_dirty_or_taken_from_the_environment_without_git(monkeypatch):
    commit = bench.environment("cpu")["commit"]
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout != ""
    assert commit.endswith("-dirty") == dirty

    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(bench.subprocess, "run", no_git)
    monkeypatch.setenv("RLVR_OPTIM_COMMIT", "0123abc")
    assert bench.environment("cpu")["commit"] == "0123abc"


def test_cpu_rows_of_a_preset_are_timed_in_turn_with_the_order_rotated():
    calls = []

    def builder(name, fail_build=False, fail_at=None):
        def build():
            if fail_build:
                raise RuntimeError("no such row")
            count = [0]

            def step():
                count[0] += 1
                if fail_at is not None and count[0] == fail_at:
                    raise ValueError("step failed")
                calls.append(name)

            opt = torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1)
            opt.state[0] = {"buf": torch.zeros(6)}  # 24 bytes over numel 3: 8 B/param
            return [], opt, step
        return build

    rows = [bench.Row(n, "ours", "p") for n in "abcd"]
    builds = [builder("a"), builder("b", fail_build=True), builder("c", fail_at=3), builder("d")]
    bench._interleaved([(r, b, 3) for r, b in zip(rows, builds)], torch.device("cpu"),
                       steps=4, warmup=1)
    a, b, c, d = rows
    # warm-up steps of each row first, then one step of every timed row per round, the
    # first row of round k being row k of the order; c's third step (its 2nd timed) fails
    assert calls[:3] == ["a", "c", "d"]
    assert calls[3:] == ["a", "c", "d", "d", "a", "d", "a", "a", "d"]
    assert len(a.ms) == len(d.ms) == 4 and all(t >= 0 for t in a.ms)
    assert a.state_bytes_per_param == d.state_bytes_per_param == 8
    assert (b.status, b.reason) == ("error", "RuntimeError: no such row") and not b.ms
    assert (c.status, c.reason) == ("error", "ValueError: step failed") and not c.ms


def test_a_cpu_results_preset_is_timed_interleaved_and_cpu_tiny_row_by_row(monkeypatch):
    monkeypatch.setitem(bench.PRESETS, "cpu-10m", lambda: [(64, 8), (33,)])  # small stand-in
    timed_alone = []
    real = bench._measure
    monkeypatch.setattr(bench, "_measure", lambda row, *a: (timed_alone.append(row.preset),
                                                          real(row, *a)))
    result = _quick_run(presets=("cpu-tiny", "cpu-10m"), steps=3)
    assert result["interleaved_presets"] == ["cpu-10m"]
    assert set(timed_alone) == {"cpu-tiny"}
    timed = [r for r in result["rows"] if r["preset"] == "cpu-10m" and r["status"] == "ok"]
    assert [r["name"] for r in timed] == ["torch fused", "torch foreach",
                                          "rlvr_optim reference default, tracking off",
                                          "rlvr_optim reference default, tracking step"]
    assert all(len(r["ms"]) == 3 and r["ms_median"] > 0 and r["state_bytes_per_param"] > 0
               for r in timed)


def test_timed_presets_leave_the_reference_out_unless_asked(monkeypatch):
    """cpu-10m times the CPU backend beside the anchors; the reference (the specification,
    once most of that run's minutes and memory) gets a row saying how to ask for it.
    cpu-tiny, the harness check, still times it."""
    cpu = torch.device("cpu")
    assert "reference" not in bench.default_backends(cpu, "cpu-10m")
    assert "reference" in bench.default_backends(cpu, "cpu-tiny")
    monkeypatch.setitem(bench.PRESETS, "cpu-10m", lambda: [(64, 8), (33,)])  # small stand-in
    result = bench.run(presets=("cpu-10m",), device="cpu", steps=1, warmup=0, progress=False,
                       anchors=("torch fused",), graph=False, modes=("default",),
                       tracks=("off",))
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["rlvr_optim reference (all modes)"]["status"] == "unavailable"
    assert "--backend reference" in rows["rlvr_optim reference (all modes)"]["reason"]
    assert not any(name.startswith("rlvr_optim reference default") for name in rows)
    if bench.backends.unavailable_reason("cpu") is None:
        assert rows["rlvr_optim cpu default, tracking off"]["status"] == "ok"
    asked = _quick_run(presets=("cpu-10m",), anchors=())
    assert [r["name"] for r in asked["rows"] if r["status"] == "ok"] == [
        "rlvr_optim reference default, tracking off", "rlvr_optim reference default, tracking step"]


def test_plot_has_a_log_time_axis_a_legend_and_labelled_bars(tmp_path):
    path = tmp_path / "rows.jsonl"
    _gpu_like_rows(path)
    fig = bench.plot_figure(path)
    time_axis, share_axis = fig.axes[:2]
    assert time_axis.get_xscale() == "log" and share_axis.get_xscale() == "linear"
    labels = [t.get_text() for t in time_axis.get_yticklabels()]
    assert labels == ["torch fused", "cuda default, tracking step"]
    assert {t.get_text() for t in time_axis.texts} == {"12 ms", "10 ms"}
    assert {t.get_text() for t in share_axis.texts} == {"50.0%", "60.0%"}
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["rlvr_optim cuda",
                                                         "anchors (what users run today)"]
    colors = [bar.get_facecolor() for bar in time_axis.patches]
    assert colors[0] != colors[1]
    bench.render_plot(path, tmp_path / "rows.png")
    assert (tmp_path / "rows.png").read_bytes()[:4] == b"\x89PNG"


def test_help_lists_anchor_and_mode_names_one_per_line(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    lines = capsys.readouterr().out.splitlines()
    assert "torch fused, fp32 params" in bench.ANCHORS  # a name with a comma
    for name in [*bench.ANCHORS, *bench.OUR_MODES]:
        assert f"  {name}" in lines, name
