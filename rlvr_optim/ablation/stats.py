"""The statistics of the ablation's report: Student t tests, Holm's correction, verdicts.

Plain Python (no scipy): the t distribution's tail comes from the regularised incomplete
beta function, ``P(|T| > t) = I_x(df / 2, 1 / 2)`` with ``x = df / (df + t^2)``, evaluated
by its continued fraction (Numerical Recipes, 3rd ed., section 6.4: the fraction converges
fast for ``x < (a + 1) / (a + b + 2)``; past that the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)``
is used).

A verdict reads a difference against the sign a claim predicts: "agrees" when a two-sided
test rejects "no difference" at ``alpha`` and the difference has the predicted sign, "does
not" when it rejects with the other sign, "cannot say" otherwise. Comparisons of runs that
share a start and a seed are paired (:func:`paired_t`); others use Welch's t
(:func:`welch_t`); a comparison with a fixed value uses the one-sample t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Test", "format_p", "holm", "one_sample_t", "paired_t", "t_quantile", "t_two_sided_p",
           "verdict", "welch_t"]


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (modified Lentz), valid for small ``x``."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                          -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)``, ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom (nan in, nan out)."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return float("nan")
    if math.isinf(t):
        return 0.0
    return _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (``0 < q < 1``), by bisection on the tail."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    tail = 2.0 * min(q, 1.0 - q)          # two-sided tail of |t|
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    return t if q > 0.5 else -t


@dataclass(frozen=True)
class Test:
    """One t test: the difference of means (a - b), its standard error, t, df, two-sided p,
    the sample sizes and the test's name (``paired``, ``Welch``, ``one-sample``)."""

    name: str
    diff: float
    se: float
    t: float
    df: float
    p: float
    n_a: int
    n_b: int

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The ``level`` confidence interval of the difference (t quantiles)."""
        if math.isnan(self.se) or math.isnan(self.df):
            return float("nan"), float("nan")
        half = t_quantile(0.5 + level / 2.0, self.df) * self.se
        return self.diff - half, self.diff + half

    def describe(self) -> str:
        """``"difference +0.012 (95% CI +0.004 to +0.020), Welch t = 3.1, df 7.6, p = 0.015"``."""
        if math.isnan(self.p):
            return f"difference {self.diff:+.3g}, too few runs for a test ({self.name})"
        lo, hi = self.interval()
        df = f"{self.df:.0f}" if self.name != "Welch" else f"{self.df:.1f}"
        return (f"difference {self.diff:+.3g} (95% CI {lo:+.3g} to {hi:+.3g}), "
                f"{self.name} t = {self.t:.2f}, df {df}, p = {format_p(self.p)}")


def format_p(p: float) -> str:
    """p with two significant digits, ``< 1e-6`` below that."""
    if math.isnan(p):
        return "n/a"
    return "< 1e-6" if p < 1e-6 else f"{p:.2g}"


def _mean_var(xs: Sequence[float]) -> tuple[float, float, int]:
    n = len(xs)
    mean = sum(xs) / n if n else float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else float("nan")
    return mean, var, n


def _finish(name: str, diff: float, se: float, df: float, n_a: int, n_b: int) -> Test:
    if math.isnan(se) or math.isnan(df) or df <= 0:
        return Test(name, diff, se, float("nan"), df, float("nan"), n_a, n_b)
    if se == 0.0:
        t = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    else:
        t = diff / se
    return Test(name, diff, se, t, df, 1.0 if t == 0.0 else t_two_sided_p(t, df), n_a, n_b)


def welch_t(a: Sequence[float], b: Sequence[float]) -> Test:
    """Welch's t test of ``mean(a) - mean(b)`` (unequal variances, Welch-Satterthwaite df)."""
    ma, va, na = _mean_var(a)
    mb, vb, nb = _mean_var(b)
    if na < 2 or nb < 2:
        return _finish("Welch", ma - mb, float("nan"), float("nan"), na, nb)
    sa, sb = va / na, vb / nb
    se = math.sqrt(sa + sb)
    df = (sa + sb) ** 2 / (sa * sa / (na - 1) + sb * sb / (nb - 1)) if sa + sb > 0 else na + nb - 2
    return _finish("Welch", ma - mb, se, df, na, nb)


def paired_t(a: Sequence[float], b: Sequence[float]) -> Test:
    """The paired t test of ``a[i] - b[i]`` (``a`` and ``b`` of equal length, same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have equal length, got {len(a)} and {len(b)}")
    md, vd, n = _mean_var([x - y for x, y in zip(a, b)])
    if n < 2:
        return _finish("paired", md, float("nan"), float("nan"), n, n)
    return _finish("paired", md, math.sqrt(vd / n), n - 1, n, n)


def one_sample_t(a: Sequence[float], value: float) -> Test:
    """The one-sample t test of ``mean(a) - value``."""
    m, v, n = _mean_var(a)
    if n < 2:
        return _finish("one-sample", m - value, float("nan"), float("nan"), n, 0)
    return _finish("one-sample", m - value, math.sqrt(v / n), n - 1, n, 0)


def verdict(test: Test, expect: str, alpha: float = 0.05) -> str:
    """"agrees", "does not" or "cannot say": is ``test``'s difference significantly of the sign
    ``expect`` (``">"``: a above b, ``"<"``: below) at two-sided level ``alpha``?"""
    if expect not in (">", "<"):
        raise ValueError(f"expect must be '>' or '<', got {expect!r}")
    if math.isnan(test.p) or test.p >= alpha:
        return "cannot say"
    return "agrees" if (test.diff > 0) == (expect == ">") else "does not"


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over ``ps``; nan kept as nan)."""
    order = sorted((p, i) for i, p in enumerate(ps) if not math.isnan(p))
    m = len(order)
    out = [float("nan")] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
