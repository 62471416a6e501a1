"""Evaluation metrics against hand-computed values (docs/SPEC.md section 7)."""
import itertools
import math

import numpy as np
import pytest

from apex_fast.eval.metrics import (
    hypervolume, improvement_in_base_std, mean_interval, paired_difference_interval, pareto_front, t_quantile,
    win_rates, worst_improvement,
)
from apex_fast.eval.units import paper_unit


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 7.5, 50, 1000):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)


def test_mean_interval_by_hand():
    # mean 3, s = sqrt(2.5), se = s / sqrt(5) = sqrt(0.5), t(0.975, 4) = 2.776445
    iv = mean_interval([1, 2, 3, 4, 5, float("nan")])
    half = 2.776445 * math.sqrt(0.5)
    assert iv.n == 5 and iv.mean == pytest.approx(3) and iv.std == pytest.approx(math.sqrt(2.5))
    assert (iv.lo, iv.hi) == (pytest.approx(3 - half, abs=1e-5), pytest.approx(3 + half, abs=1e-5))
    one = mean_interval([7.0])
    assert (one.mean, one.lo, one.hi, one.n) == (7.0, 7.0, 7.0, 1)
    assert mean_interval([float("nan")]).n == 0 and math.isnan(mean_interval([]).mean)


def test_paired_interval_uses_differences():
    # diffs 1, 2, 3: mean 2, s 1, half = t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    iv = paired_difference_interval([2, 4, 6], [1, 2, 3])
    assert iv.mean == pytest.approx(2) and iv.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)
    # an unscorable sample drops its pair only
    iv = paired_difference_interval([2, float("nan"), 6], [1, 2, 3])
    assert iv.n == 2 and iv.mean == pytest.approx(2)
    with pytest.raises(ValueError, match="align"):
        paired_difference_interval([1, 2], [1, 2, 3])


def test_improvement_in_base_std_by_hand():
    before = np.array([[0, 10], [2, 10], [4, 16]], float)  # means 2, 12; stds (ddof 1) 2, sqrt(12)
    after = np.array([[1, 13], [3, 13], [5, 19]], float)  # means 3, 15
    imp = improvement_in_base_std(after, before)
    assert imp == pytest.approx([0.5, 3 / math.sqrt(12)])
    assert worst_improvement(imp) == pytest.approx(0.5)
    flat = improvement_in_base_std([[2.0], [2.0]], [[1.0], [1.0]])  # zero base std: the sign, infinitely
    assert flat[0] == math.inf


def test_hypervolume_2d_by_hand():
    stairs = [[1, 3], [2, 2], [3, 1]]
    assert hypervolume(stairs) == pytest.approx(6)  # 1*3 + 1*2 + 1*1
    assert hypervolume(stairs + [[1, 1], [-1, 5]]) == pytest.approx(6)  # dominated / below the reference: nothing
    assert hypervolume(stairs, reference=[0.5, 0.5]) == pytest.approx(0.5 * 2.5 + 1 * 1.5 + 1 * 0.5)
    assert hypervolume([[2, 3]]) == pytest.approx(6) and hypervolume([[2, -0.1]]) == 0
    assert hypervolume(np.zeros((0, 2))) == 0


def test_hypervolume_3d_by_hand():
    assert hypervolume([[1, 1, 1], [2, 2, 2]]) == pytest.approx(8)
    # three boxes of volume 2, pairwise overlaps 1, triple overlap 1: 6 - 3 + 1
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]]) == pytest.approx(4)
    assert hypervolume([[3, 1, 1], [1, 3, 1]]) == pytest.approx(5)  # 3 + 3 - 1
    assert hypervolume([[0.5, 2, 3]]) == pytest.approx(3)


def _hv_inclusion_exclusion(P):
    total = 0.0
    for r in range(1, len(P) + 1):
        for S in itertools.combinations(P, r):
            total += (-1) ** (r + 1) * np.prod(np.min(np.array(S), axis=0))
    return total


@pytest.mark.parametrize("d", [2, 3, 4])
def test_hypervolume_matches_inclusion_exclusion(d):
    rng = np.random.default_rng(d)
    for _ in range(20):
        P = rng.uniform(0.1, 3, size=(int(rng.integers(1, 6)), d)).round(1)  # .round: ties in coordinates
        assert hypervolume(P) == pytest.approx(_hv_inclusion_exclusion(P), rel=1e-9)


def test_pareto_front_with_ties():
    P = [[1, 2], [1, 2], [2, 1], [0, 0], [1, 1], [2, 1], [float("nan"), 9]]
    assert pareto_front(P).tolist() == [True, True, True, False, False, True, False]
    assert pareto_front([[1, 2], [1, 3]]).tolist() == [False, True]  # equal in one, worse in the other
    assert pareto_front([[1, 2, 3], [3, 2, 1], [2, 2, 2], [1, 1, 1]]).tolist() == [True, True, True, False]


def test_win_rates_by_hand():
    a = np.array([[1, 5], [2, 1], [3, 3], [np.nan, 0]])
    b = np.array([[0, 6], [2, 0], [1, 1], [1, 1]])
    w = win_rates(a, b, ["s0", "s1"])
    assert (w["s0"].wins, w["s0"].ties, w["s0"].losses) == (2, 1, 0) and w["s0"].rate == pytest.approx(2.5 / 3)
    assert (w["s1"].wins, w["s1"].losses) == (2, 2) and w["s1"].rate == 0.5
    # consensus: tie (+1 - 1), win, win, loss (only s1 counts where s0 is NaN)
    c = w["consensus"]
    assert (c.wins, c.ties, c.losses) == (2, 1, 1) and c.rate == pytest.approx(0.625)


def test_win_rate_wilson_interval():
    w = win_rates(np.r_[np.ones(50), np.zeros(50)][:, None], np.full((100, 1), 0.5), ["s"])["s"]
    lo, hi = w.interval()
    assert w.rate == 0.5 and (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))


def test_paper_units():
    assert paper_unit("pickscore").factor == 26 and paper_unit("pickscore", {"raw": True}).factor == 1
    assert paper_unit("deqa").factor == 5 and paper_unit("remote", {"name": "deqa"}).factor == 5
    assert paper_unit("aesthetic").factor == 1 and paper_unit("ocr").label.startswith("OCR accuracy")
