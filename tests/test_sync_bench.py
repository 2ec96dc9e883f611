"""rlvr_optim.sync_bench: a short run of the delta-sync benchmark checks what it measures."""

import json

from rlvr_optim import sync_bench


def test_short_run_checks_every_delta_and_writes_labelled_cpu_rows(tmp_path):
    result = sync_bench.run(("ablation-tiny",), steps=4, warmup_steps=10, progress=False)
    rows = result["rows"]
    assert {(r["lr"], r["sync_every"]) for r in rows} == {(lr, k) for lr in sync_bench.LRS
                                                         for k in (1, 4)}
    for row in rows:
        assert row["verified"] and row["peak_bytes_from_identical_run"]
        # A window is a bitmap (1/16 of the bf16 weights, rounded up per tensor); the
        # snapshot a bf16 copy.
        assert row["held_bytes_snapshot"] == row["full_bf16_bytes"]
        assert 0 <= row["held_bytes_ours"] - row["full_bf16_bytes"] / 16 < row["tensors"]
        assert 0 < row["file_bytes"] and row["full_bf16_bytes"] == 2 * row["params"]
        assert row["ours_ms"] > 0 and row["snapshot_ms"] > 0
    path = sync_bench.save(result, tmp_path)
    assert path.parent.parent.name == "cpu"
    assert json.loads(path.read_text())["cpu_timings_are_not_performance_results"] is True
    text = path.with_suffix(".md").read_text()
    assert "CPU rows" in text and "not performance results" in text
