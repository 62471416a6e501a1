"""Evaluation metrics (docs/SPEC.md section 7): intervals, improvements over the base model,
the worst-objective improvement, hypervolume, Pareto fronts, and paired win rates.

Plain numpy on small arrays (K objectives, a few checkpoints, a few hundred samples). Conventions:
every objective is maximised; NaN scores (a sample a scorer could not score) are left out of the
statistic they would enter, pair by pair for paired statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


# ------------------------------------------------------------------ intervals


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (e.g. p = 0.975 for a 95% interval).

    The CDF is the regularised incomplete beta function, computed by its continued fraction
    (Numerical Recipes' betacf), and inverted by bisection: exact to ~1e-10, no scipy at run time."""
    if not 0 < p < 1:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"t_quantile: df must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2, 0.5, x)  # P(T > |t|)
    return 1 - tail if t >= 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1 - math.exp(ln_front) * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return h


@dataclass(frozen=True)
class Interval:
    """Mean of n finite values with a two-sided ``level`` confidence interval (Student t on the
    standard error, sample std with ddof 1). lo = hi = mean when n == 1; all NaN when n == 0."""

    mean: float
    lo: float
    hi: float
    std: float
    n: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def format(self, digits: int = 3) -> str:
        if self.n == 0:
            return "n/a"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_interval(values, level: float = 0.95) -> Interval:
    """Mean and ``level`` t-interval of the finite entries of ``values``."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, nan, 0, level)
    m = float(x.mean())
    if n == 1:
        return Interval(m, m, m, 0.0, 1, level)
    s = float(x.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * s / math.sqrt(n)
    return Interval(m, m - half, m + half, s, n, level)


def paired_difference_interval(after, before, level: float = 0.95) -> Interval:
    """Interval of mean(after - before) over pairs where both are finite (same prompt and seed):
    the checkpoint-vs-base change, much tighter than the difference of two unpaired intervals."""
    a = np.asarray(after, dtype=np.float64).ravel()
    b = np.asarray(before, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_difference_interval: {a.size} scores after vs {b.size} before; pairs must align")
    return mean_interval(a - b, level)


# ------------------------------------------------------------------ across objectives


def improvement_in_base_std(after, before) -> np.ndarray:
    """Per-objective improvement over the base in base-std units: (mean(after) - mean(before)) /
    std(before), over pairs finite in both; after, before [N, K] scores of the same samples.
    An objective whose base std is 0 gives +inf/-inf/0 by the sign of the change."""
    a = np.atleast_2d(np.asarray(after, dtype=np.float64))
    b = np.atleast_2d(np.asarray(before, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"improvement_in_base_std: shapes {a.shape} and {b.shape} differ; pairs must align")
    out = np.empty(a.shape[1])
    for k in range(a.shape[1]):
        ok = np.isfinite(a[:, k]) & np.isfinite(b[:, k])
        if not ok.any():
            out[k] = np.nan
            continue
        diff = a[ok, k].mean() - b[ok, k].mean()
        sd = b[ok, k].std(ddof=1) if ok.sum() > 1 else 0.0
        out[k] = diff / sd if sd > 0 else (np.sign(diff) * np.inf if diff != 0 else 0.0)
    return out


def worst_improvement(improvements) -> float:
    """min_k of the per-objective improvements (the objective left furthest behind)."""
    v = np.asarray(improvements, dtype=np.float64)
    return float(np.min(v)) if v.size else float("nan")


def hypervolume(points, reference=None) -> float:
    """Hypervolume (maximisation) dominated by ``points`` [M, d] and bounded below by
    ``reference`` [d] (default 0: the base model when points are improvements): the volume of the
    union of the boxes [reference, p]. A point at or below the reference in some coordinate adds
    nothing. Exact, by slicing along the last coordinate (O(M^d); M is a handful of checkpoints)."""
    P = np.atleast_2d(np.asarray(points, dtype=np.float64))
    if P.size == 0:
        return 0.0
    d = P.shape[1]
    ref = np.zeros(d) if reference is None else np.asarray(reference, dtype=np.float64).reshape(d)
    if not np.isfinite(P).all():
        raise ValueError("hypervolume: points must be finite (an objective with zero base std gives inf; "
                         "drop it or use raw improvements)")
    P = P[(P > ref).all(axis=1)] - ref
    return float(_hv(P)) if len(P) else 0.0


def _hv(P: np.ndarray) -> float:
    """Volume of the union of boxes [0, p] for p in P (all coordinates > 0)."""
    if P.shape[1] == 1:
        return float(P[:, 0].max())
    levels = np.unique(P[:, -1])[::-1]  # descending
    vol = 0.0
    for i, top in enumerate(levels):
        bottom = levels[i + 1] if i + 1 < len(levels) else 0.0
        active = P[P[:, -1] >= top, :-1]  # boxes reaching this slice
        vol += _hv(active) * (top - bottom)
    return vol


def pareto_front(points) -> np.ndarray:
    """Boolean mask [M] of the non-dominated rows of ``points`` [M, d] (maximisation). Row i is
    dominated when some row is >= in every coordinate and > in at least one; identical rows do not
    dominate each other, so ties stay on the front together. Rows with NaN are never on it."""
    P = np.atleast_2d(np.asarray(points, dtype=np.float64))
    M = P.shape[0]
    ok = np.isfinite(P).all(axis=1) if P.size else np.zeros(M, bool)
    mask = ok.copy()
    for i in range(M):
        if not ok[i]:
            continue
        for j in range(M):
            if j != i and ok[j] and (P[j] >= P[i]).all() and (P[j] > P[i]).any():
                mask[i] = False
                break
    return mask


# ------------------------------------------------------------------ paired win rates


@dataclass(frozen=True)
class WinRate:
    """Share of pairs where A beats B (a tie counts half), with a 95% Wilson interval on the share of
    decided pairs won; n counts pairs where both scores are finite."""

    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.n if self.n else float("nan")

    def interval(self, z: float = 1.959963984540054) -> tuple[float, float]:
        n = self.n
        if n == 0:
            return float("nan"), float("nan")
        p = self.rate
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return centre - half, centre + half


def win_rates(scores_a, scores_b, names: list[str] | None = None) -> dict[str, WinRate]:
    """Per-scorer win rates of A over B from paired per-sample scores [N, K] (row i of A and B: the
    same prompt and seed, e.g. a trained checkpoint vs the base model, as BalancedDPO reports), plus
    ``"consensus"``: the majority vote of the scorers (SPEC 6, V = sum_k sign(a_k - b_k) over scorers
    finite for both; V = 0 is a tie). A pair where no scorer is finite is left out of the consensus."""
    A = np.atleast_2d(np.asarray(scores_a, dtype=np.float64))
    B = np.atleast_2d(np.asarray(scores_b, dtype=np.float64))
    if A.shape != B.shape:
        raise ValueError(f"win_rates: shapes {A.shape} and {B.shape} differ; pairs must align")
    K = A.shape[1]
    names = list(names) if names is not None else [str(k) for k in range(K)]
    if len(names) != K:
        raise ValueError(f"win_rates: {len(names)} names for {K} scorers")
    ok = np.isfinite(A) & np.isfinite(B)
    sign = np.where(ok, np.sign(np.where(ok, A - B, 0.0)), 0.0)
    out = {}
    for k, name in enumerate(names):
        s = sign[ok[:, k], k]
        out[name] = WinRate(int((s > 0).sum()), int((s == 0).sum()), int((s < 0).sum()))
    vote = sign.sum(axis=1)[ok.any(axis=1)]
    out["consensus"] = WinRate(int((vote > 0).sum()), int((vote == 0).sum()), int((vote < 0).sum()))
    return out
