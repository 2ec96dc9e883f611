"""Reading a run's logged curves at a common KL or a common accuracy gain.

A run's curve is its value at the start (``run["curve_start"]``) followed by the logged
series; the LM report reads sparsity and geometry where each run's curve first reaches the
matched target, and its plots draw the same readings.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = ["at_matched", "curve", "curve_gain", "read_at_gain", "read_at_kl"]


def at_matched(xs: Sequence[float], ys: Sequence[float | None], target: float,
               log_x: bool = False) -> float | None:
    """``y`` where the curve ``x`` first reaches ``target``, interpolated, or None.

    Linear interpolation between the two logged points around the crossing, in ``log x``
    when ``log_x`` and both points are positive (KL spans decades). None when the curve
    never reaches ``target`` or ``y`` is undefined at either point.
    """
    for i in range(1, len(xs)):
        x0, x1 = xs[i - 1], xs[i]
        if x1 >= target:
            y0, y1 = ys[i - 1], ys[i]
            if y1 is None or (y0 is None and x0 < target):
                return None
            if x0 >= target or x1 == x0:
                return y0 if x0 >= target else y1
            if log_x and x0 > 0:
                t = (math.log(target) - math.log(x0)) / (math.log(x1) - math.log(x0))
            else:
                t = (target - x0) / (x1 - x0)
            return y0 + t * (y1 - y0)
    return None


def curve(run: Mapping, key: str) -> list:
    return [run["curve_start"][key]] + list(run["series"][key])


def curve_gain(run: Mapping) -> list[float]:
    start = run["curve_start"]["curve_sampled_accuracy"]
    return [v - start for v in curve(run, "curve_sampled_accuracy")]


def read_at_kl(run: Mapping, curve_key: str, target: float) -> float | None:
    if curve_key == "gain":
        ys: list = curve_gain(run)
    else:
        ys = curve(run, curve_key)
    return at_matched(curve(run, "curve_kl"), ys, target, log_x=True)


def read_at_gain(run: Mapping, curve_key: str, target: float) -> float | None:
    ys = curve(run, curve_key)
    return at_matched(curve_gain(run), ys, target)
