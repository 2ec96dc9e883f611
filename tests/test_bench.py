"""The benchmark harness in its CPU mode: schema, bytes model, every anchor accounted for."""

import json

import pytest
import torch

from rlvr_optim import bench
from rlvr_optim.cli import main


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


def test_cpu_result_schema_and_every_anchor_accounted_for(result):
    env = result["environment"]
    for key in ("date", "device", "torch", "triton", "commit", "python"):
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

    before = (triton_adamw.DEFAULT_BLOCK_GPU, triton_adamw.DEFAULT_NUM_WARPS_GPU,
              triton_adamw.DEFAULT_CHUNKS_GPU)
    result = bench.run(presets=("cpu-tiny",), device="cpu", steps=1, warmup=0, progress=False,
                       backends_to_time=("triton",), anchors=("torch fused",), graph=False,
                       tune=True, tracks=("step",), modes=())
    assert not [r for r in result["rows"] if r["group"] == "ours" and r["status"] == "ok"]
    tune = [r for r in result["rows"] if r["group"] == "tune"]
    assert [r["name"] for r in tune] == [
        f"rlvr_optim triton default, tracking step [BLOCK {b}, {w} warps, {c} per program]"
        for b, w, c in bench.TUNE_GRID]
    assert all(r["status"] == "ok" and "torch fused" in r["speedup"] for r in tune), tune
    assert (triton_adamw.DEFAULT_BLOCK_GPU, triton_adamw.DEFAULT_NUM_WARPS_GPU,
            triton_adamw.DEFAULT_CHUNKS_GPU) == before
    with pytest.raises(ValueError, match="unknown anchor"):
        bench.run(presets=("cpu-tiny",), device="cpu", anchors=("torch slow",), progress=False)
    with pytest.raises(ValueError, match="unknown mode"):
        bench.run(presets=("cpu-tiny",), device="cpu", modes=("fast",), progress=False)


def test_tuned_step_sees_its_configuration():
    from rlvr_optim.triton_kernels import adamw as triton_adamw

    def now():
        return (triton_adamw.DEFAULT_BLOCK_GPU, triton_adamw.DEFAULT_NUM_WARPS_GPU,
                triton_adamw.DEFAULT_CHUNKS_GPU)

    seen = []
    step = bench._tuned(lambda: (None, None, lambda: seen.append(now())), 2048, 16, 4)
    before = now()
    step()[2]()
    assert seen == [(2048, 16, 4)]
    assert now() == before


def test_save_render_and_cli(result, tmp_path, capsys):
    path = bench.save(result, tmp_path)
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    md = path.with_suffix(".md").read_text()
    assert "not performance results" in md and "| torch fused |" in md
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "--preset", "cpu-tiny", "--steps", "1", "--warmup", "0",
                 "--backend", "reference", "--anchor", "torch fused", "--anchor",
                 "torch foreach", "--no-graph", "--no-progress", "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "torch fused" in printed and "not performance results" in printed
    saved = json.loads(next((tmp_path / "cli").glob("*/*.json")).read_text())
    names = {r["name"] for r in saved["rows"]}
    assert {"torch fused", "torch foreach"} <= names and "torch fused (CUDA graph)" not in names
    assert not any("CUDA graph" in n for n in names)  # --no-graph
    assert "not selected" in next(r["reason"] for r in saved["rows"]
                                  if r["name"] == "rlvr_optim triton (all modes)")


def test_gpu_presets_are_refused_on_cpu_before_any_work():
    with pytest.raises(ValueError, match="sized for a GPU"):
        bench.run(presets=("r1-distill-qwen-1.5b",), device="cpu", progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        bench.run(presets=("llama-405b",), device="cpu", progress=False)


def test_cli_refuses_a_gpu_preset_on_cpu_with_a_message(capsys):
    assert main(["bench", "--preset", "many-small", "--device", "cpu", "--no-progress"]) == 2
    assert "sized for a GPU" in capsys.readouterr().err
