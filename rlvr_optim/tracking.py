"""Summaries of change tracking: per-param rows, the flat dict loggers take, and a plain-text
table. Used by the optimizers, :mod:`rlvr_optim.distributed` and the integrations; a leaf
module (it imports nothing of the package but the counter names).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from .table import COUNTER_NAMES

__all__ = ["change_log_from_rows", "format_table", "summary_rows"]


def summary_rows(names: Sequence[str], numels: Sequence[int], counts: Sequence[Sequence[int]],
                 cumulative: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """``change_summary`` rows: per param its name, element count and counters (in the
    order of :data:`rlvr_optim.table.COUNTER_NAMES`), and with cumulative tracking
    ``cumulative_changed`` (``cumulative``: row index -> set bits of its cumulative bitmap)."""
    rows = []
    for i, (name, numel, c) in enumerate(zip(names, numels, counts)):
        row = {"name": name, "numel": numel}
        row.update(zip(COUNTER_NAMES, c))
        if cumulative and i in cumulative:
            row["cumulative_changed"] = cumulative[i]
        rows.append(row)
    return rows


def change_log_from_rows(rows: Iterable[Mapping[str, Any]], prefix: str = "rlvr_optim/"
                         ) -> dict[str, float]:
    """The flat dict of ``AdamW.change_log`` from ``change_summary``-style rows."""
    rows = list(rows)
    if not rows:
        return {}
    numel = sum(r["numel"] for r in rows)
    changed = sum(r["bf16_changed"] for r in rows)
    moved = sum(r["fp32_moved"] for r in rows)
    out = {
        "changed_fraction": changed / numel if numel else 0.0,
        "moved_fraction": moved / numel if numel else 0.0,
        "filtered_fraction": (moved - changed) / moved if moved else 0.0,
        "nonfinite_grads": float(sum(r["nonfinite_grads"] for r in rows)),
    }
    cum_rows = [r for r in rows if "cumulative_changed" in r]
    if cum_rows:
        cum_numel = sum(r["numel"] for r in cum_rows)
        frac = sum(r["cumulative_changed"] for r in cum_rows) / cum_numel if cum_numel else 0.0
        out["cumulative_changed_fraction"] = frac
        out["never_changed_fraction"] = 1.0 - frac
    return {prefix + k: v for k, v in out.items()}


def format_table(rows: Iterable[Mapping[str, Any]], columns: Iterable[str] | None = None) -> str:
    """A plain-text table of dict rows (floats with 4 significant digits)."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    columns = list(columns) if columns is not None else list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
