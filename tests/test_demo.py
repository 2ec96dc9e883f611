"""Tests of the demo table and the ``rlvr-optim`` command line."""

import json
import math
import subprocess
import sys

import pytest

from rlvr_optim import cli, demo

MODE_NAMES = [
    "bf16 nearest",
    "bf16 stochastic",
    "bf16 + fp32 master",
    "bf16 + remainder",
    "fp32 (bf16 images)",
]
FRACTIONS = [c for c in demo.COLUMNS if c not in ("mode", "final loss")]
HIDDEN = 16
# Weights and biases of the demo MLP: one changed weight moves a fraction by 1 / NUMEL.
NUMEL = demo.IN_FEATURES * HIDDEN + HIDDEN + HIDDEN * demo.OUT_FEATURES + demo.OUT_FEATURES


@pytest.fixture(scope="module")
def rows():
    # lr 1e-4 (the default): at 1e-3 every weight of this small model
    # changes within six steps, never_changed_fraction is 0 in every mode, and the comparisons
    # below would hold trivially.
    return {r["mode"]: r for r in demo.run_demo(steps=6, hidden=HIDDEN, progress=False, lr=1e-4)}


def _same_count(a: float, b: float) -> bool:
    """Two fractions of NUMEL name the same count (they may differ by float rounding)."""
    return abs(a - b) * NUMEL < 1e-6


def test_one_row_per_mode(rows):
    assert list(rows) == MODE_NAMES
    for row in rows.values():
        assert set(row) == set(demo.COLUMNS)


def test_fractions_and_loss_are_in_range(rows):
    for name, row in rows.items():
        for column in FRACTIONS:
            assert 0.0 <= row[column] <= 1.0, (name, column, row[column])
        assert math.isfinite(row["final loss"]) and row["final loss"] > 0.0, name
        assert row["changed/step"] > 0.0, name
        assert _same_count(row["cumulative changed"] + row["never changed (bitmaps)"], 1.0), name


def test_never_changed_fraction_matches_independent_diffs(rows):
    for name, row in rows.items():
        # The cumulative bitmap is the OR of every step's changes: exactly what diffing the
        # bf16 images around every step finds.
        assert _same_count(row["never changed (bitmaps)"], row["never changed (diffs)"]), name
        # End vs start can only find more unchanged weights (those that came back).
        assert row["bf16 unchanged vs start"] >= row["never changed (bitmaps)"], name
    # Not a trivial 0 == 0 or 1 == 1.
    assert 0.0 < rows["bf16 nearest"]["never changed (bitmaps)"] < 1.0


def test_modes_differ_as_the_numerics_predict(rows):
    nearest, stochastic = rows["bf16 nearest"], rows["bf16 stochastic"]
    assert any(nearest[c] != stochastic[c] for c in demo.COLUMNS[1:])
    # Without a master copy, updates under half a bf16 ULP are lost at every step, so more
    # weights stay put than with an fp32 master (0.86 against 0.22 in this setting).
    assert nearest["never changed (bitmaps)"] > rows["bf16 + fp32 master"]["never changed (bitmaps)"] + 0.3
    # The remainder form rebuilds the same fp32 values as an fp32 master.
    assert rows["bf16 + remainder"]["final loss"] == pytest.approx(
        rows["bf16 + fp32 master"]["final loss"], rel=1e-3
    )


def test_table_prints_shares_as_percents_and_a_legend_of_every_column(rows):
    text = demo.format_rows(list(rows.values()))
    nearest = next(line for line in text.splitlines() if line.strip().startswith("bf16 nearest"))
    assert f"{rows['bf16 nearest']['final loss']:.4g}" in nearest
    for column in FRACTIONS:
        assert f"{rows['bf16 nearest'][column]:.2%}" in nearest, column
    legend = text.split("\n\n", 1)[1].splitlines()
    assert [line.split("  ")[1] for line in legend] == [c for c in demo.COLUMNS[1:]]


def test_cli_demo_prints_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "demo.json"
    status = cli.main(["demo", "--quick", "--steps", "3", "--hidden", "8", "--no-progress",
                       "--json", str(path)])
    assert status == 0
    out = capsys.readouterr().out
    for name in MODE_NAMES:
        assert name in out
    written = json.loads(path.read_text())
    assert [r["mode"] for r in written] == MODE_NAMES
    assert written == demo.run_demo(steps=3, hidden=8, progress=False)
    assert demo.format_rows(written) in out


def test_cli_without_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "rlvr_optim", "demo", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--no-progress" in result.stdout
