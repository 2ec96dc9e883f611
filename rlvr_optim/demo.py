"""A quick look at the bf16 filter: train a tiny MLP under each precision mode.

Every mode starts from the same weights and sees the same batches, so the table shows
what the storage format alone does to which weights change (DESIGN.md, "Gate III").
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .optimizer import AdamW, format_table

__all__ = ["COLUMNS", "LEGEND", "MODES", "format_rows", "run_demo"]

# name -> (param dtype, rlvr_optim.AdamW options beyond the shared ones)
MODES: dict[str, tuple[torch.dtype, dict[str, Any]]] = {
    "bf16 nearest": (torch.bfloat16, {}),
    "bf16 stochastic": (torch.bfloat16, {"rounding": "stochastic"}),
    "bf16 + fp32 master": (torch.bfloat16, {"master_weights": "fp32"}),
    "bf16 + remainder": (torch.bfloat16, {"master_weights": "remainder"}),
    "fp32 (bf16 images)": (torch.float32, {}),
}

# "changed/step" and "filtered/step" are the means over steps of change_log()'s
# changed_fraction and filtered_fraction; "cumulative changed" and "never changed" are
# its values after the last step. The last two are measured outside the optimizer, from the
# bf16 images of the weights: "never changed (diffs)" by diffing them around every step,
# "bf16 unchanged vs start" by comparing the last with the first (the paper's measure).
COLUMNS = (
    "mode",
    "final loss",
    "changed/step",
    "filtered/step",
    "cumulative changed",
    "never changed (bitmaps)",
    "never changed (diffs)",
    "bf16 unchanged vs start",
)

# Printed under the table, one line per column after "mode"; all shares are of every weight
# and bias, except "filtered/step".
LEGEND = {
    "final loss": "mean squared error on a held-out batch after the last step",
    "changed/step": "share of weights whose bf16 bits changed in a step (mean over steps)",
    "filtered/step": "of the weights whose value moved in a step, the share bf16 storage "
                     "did not show (mean over steps)",
    "cumulative changed": "share whose bf16 bits changed in at least one step (cumulative "
                          "bitmap)",
    "never changed (bitmaps)": "its complement: share never changed, by the optimizer's bitmaps",
    "never changed (diffs)": "the same share measured outside the optimizer, by diffing the "
                             "weights around every step",
    "bf16 unchanged vs start": "share whose last bf16 bits equal the first (the paper's "
                               "measure, two checkpoints); at least the never-changed share",
}

IN_FEATURES = 32
OUT_FEATURES = 8
BATCH = 64
_PREFIX = "rlvr_optim/"


def _make_data(
    seed: int, steps: int, hidden: int
) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    """Training batches and one held-out batch of a noisy regression on a random teacher MLP."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(IN_FEATURES, hidden, generator=gen) / IN_FEATURES**0.5
    w2 = torch.randn(hidden, OUT_FEATURES, generator=gen) / hidden**0.5

    def batch() -> tuple[Tensor, Tensor]:
        x = torch.randn(BATCH, IN_FEATURES, generator=gen)
        y = torch.tanh(x @ w1) @ w2 + 0.05 * torch.randn(BATCH, OUT_FEATURES, generator=gen)
        return x, y

    return [batch() for _ in range(steps)], batch()


def _initial_model(seed: int, hidden: int) -> nn.Module:
    """The fp32 MLP every mode starts from (the caller's global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(IN_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, OUT_FEATURES)
        )


def _bf16_image_bits(t: Tensor) -> Tensor:
    """The bf16 bit pattern a checkpoint of ``t`` would store (nearest-even for fp32)."""
    return t.detach().bfloat16().view(torch.int16)


def _loss(model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    # The loss itself is taken in fp32 in every mode; only the model's dtype differs.
    return nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def _train_one_mode(
    name: str, initial: nn.Module, data: list, held_out: tuple[Tensor, Tensor], seed: int,
    lr: float, bar: tqdm,
) -> dict[str, Any]:
    """Train a copy of ``initial`` in mode ``name`` and return its row of the table."""
    dtype, options = MODES[name]
    model = copy.deepcopy(initial).to(dtype)
    params = list(model.parameters())
    start_bits = [_bf16_image_bits(p).clone() for p in params]
    # Snapshot-and-diff of every step, the way tools measure it today: an independent
    # check of the optimizer's cumulative bitmap.
    ever_changed = [torch.zeros(p.shape, dtype=torch.bool) for p in params]
    opt = AdamW(params, lr=lr, track_changes="cumulative", seed=seed, **options)
    changed, filtered = [], []
    log: dict[str, float] = {}
    for x, y in data:
        before = [_bf16_image_bits(p).clone() for p in params]
        opt.zero_grad()
        _loss(model, x, y, dtype).backward()
        opt.step()
        for p, b, ever in zip(params, before, ever_changed):
            ever |= _bf16_image_bits(p) != b
        log = opt.change_log(prefix=_PREFIX)
        changed.append(log[_PREFIX + "changed_fraction"])
        filtered.append(log[_PREFIX + "filtered_fraction"])
        bar.update(1)
    numel = sum(p.numel() for p in params)
    never_changed = numel - sum(int(e.sum()) for e in ever_changed)
    # The paper's measure compares two checkpoints, end vs start. It can exceed
    # "never changed (bitmaps)", never fall below it: a weight that leaves its start bits and comes
    # back counts as changed in the cumulative OR but as unchanged here. For the fp32
    # control the value can also drift across a bf16 rounding boundary and back.
    unchanged = sum(int((_bf16_image_bits(p) == s).sum()) for p, s in zip(params, start_bits))
    with torch.no_grad():
        final_loss = _loss(model, *held_out, dtype).item()
    return {
        "mode": name,
        "final loss": final_loss,
        "changed/step": sum(changed) / len(changed),
        "filtered/step": sum(filtered) / len(filtered),
        "cumulative changed": log[_PREFIX + "cumulative_changed_fraction"],
        "never changed (bitmaps)": log[_PREFIX + "never_changed_fraction"],
        "never changed (diffs)": never_changed / numel,
        "bf16 unchanged vs start": unchanged / numel,
    }


def run_demo(
    steps: int = 40, seed: int = 0, hidden: int = 64, progress: bool = True, lr: float = 1e-4
) -> list[dict]:
    """Train a tiny MLP on CPU under every mode of :data:`MODES`; one table row per mode.

    Args:
        steps: optimizer steps per mode (default 40).
        seed: seeds the initial weights, the data and the stochastic rounding stream (default 0).
        hidden: width of the MLP's hidden layer (default 64).
        progress: show a tqdm bar over modes x steps on stderr (default True).
        lr: learning rate (default 1e-4). Its ratio to the weights' magnitude (~0.1 here)
            decides how much bf16 filters: at 1e-3 nearly every weight changes within a few
            steps; at 1e-4, closer to RL post-training's ratio, most updates are filtered.

    Returns rows keyed by :data:`COLUMNS`. Fractions are over all weights and biases;
    "final loss" is the mean squared error on a held-out batch after the last step.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if hidden < 1:
        raise ValueError(f"hidden must be at least 1, got {hidden}")
    initial = _initial_model(seed, hidden)
    data, held_out = _make_data(seed, steps, hidden)
    threads = torch.get_num_threads()
    # Tensors of a few thousand elements gain nothing from a thread pool, and its waits
    # cost: default run 3.6-5.2 s with one thread against 13.6-14.6 s with two, on a
    # 2-core machine shared with other jobs.
    torch.set_num_threads(1)
    try:
        with tqdm(total=len(MODES) * steps, file=sys.stderr, disable=not progress,
                  desc="rlvr-optim demo") as bar:
            rows = []
            for name in MODES:
                bar.set_postfix_str(name)
                rows.append(_train_one_mode(name, initial, data, held_out, seed, lr, bar))
    finally:
        torch.set_num_threads(threads)
    return rows


def format_rows(rows: list[dict]) -> str:
    """The demo's rows as a plain-text table in :data:`COLUMNS` order, with its legend.

    Shares are printed as percents (the rows hold fractions), the loss as a number.
    """
    shares = COLUMNS[2:]
    shown = [{c: f"{r[c]:.2%}" if c in shares else r[c] for c in COLUMNS} for r in rows]
    width = max(len(c) for c in LEGEND)
    legend = [f"  {c.ljust(width)}  {LEGEND[c]}" for c in COLUMNS[1:]]
    return "\n".join([format_table(shown, COLUMNS), "", *legend])
