"""Paired statistics for `tinkerlm compare`: known answers, scipy agreement, bootstrap coverage, bad input, the plot."""

import math
import time

import numpy as np
import pytest

from tinkerlm.errors import TinkerError
from tinkerlm.evaluate.stats import (
    _boot_means,
    binomial_two_sided,
    compare,
    compare_models,
    holm,
    mcnemar,
    paired_difference,
    plot_scores,
    significant,
    summary_line,
)


def outcomes(b01: int, b10: int, both_right: int = 0, both_wrong: int = 0) -> tuple[list[int], list[int]]:
    """Per-item 0/1 outcomes of A and B with the given cells of the 2x2 table, items in a shuffled order."""
    a = [0] * b01 + [1] * b10 + [1] * both_right + [0] * both_wrong
    b = [1] * b01 + [0] * b10 + [1] * both_right + [0] * both_wrong
    order = np.random.default_rng(123).permutation(len(a))
    return [a[i] for i in order], [b[i] for i in order]


# ---------------------------------------------------------------------------------------------------------------
# Known answers


@pytest.mark.parametrize("scores", [[1, 0, 1, 1, 0] * 40, list(np.linspace(-2.0, 3.0, 101))])
def test_identical_models_differ_by_nothing(scores):
    r = compare(scores, scores, n_boot=2000)
    assert r["diff"] == 0 and r["ci"] == (0.0, 0.0) and r["se"] == 0
    assert r["mean_a"] == r["mean_b"] == pytest.approx(100 * np.mean(scores))
    if r["mcnemar"] is not None:
        assert (r["mcnemar"]["b01"], r["mcnemar"]["b10"], r["p"]) == (0, 0, 1.0)
    assert not significant(r)
    assert summary_line("arc_easy", "A", "B", r).startswith("no significant difference between B and A on arc_easy")


def test_mcnemar_all_discordant_one_way():
    a, b = outcomes(b01=0, b10=10, both_right=30, both_wrong=5)
    m = mcnemar(a, b)
    assert (m["b01"], m["b10"], m["n"], m["method"], m["statistic"]) == (0, 10, 45, "exact", None)
    assert m["p"] == 2 * 0.5**10
    assert mcnemar(b, a)["p"] == 2 * 0.5**10 and (mcnemar(b, a)["b01"], mcnemar(b, a)["b10"]) == (10, 0)


@pytest.mark.parametrize("b01,b10,hand", [(3, 12, 1152 / 32768), (12, 3, 1152 / 32768), (12, 12, 1.0), (5, 6, 1.0)])
def test_exact_p_by_hand(b01, b10, hand):
    # 3 of 15: 2 * (C(15,0) + C(15,1) + C(15,2) + C(15,3)) / 2^15 = 2 * 576 / 32768; balanced counts give 1
    a, b = outcomes(b01, b10, both_right=7)
    assert mcnemar(a, b)["p"] == pytest.approx(hand, rel=1e-12)


def test_exact_p_equals_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    for n in range(1, 41):
        for k in range(n + 1):
            assert binomial_two_sided(k, n) == pytest.approx(stats.binomtest(k, n, 0.5).pvalue, rel=1e-9, abs=1e-15)


def test_chi_square_branch_by_hand():
    # b01 = 40, b10 = 20: X2 = (|40 - 20| - 1)^2 / 60 = 361 / 60; p = P(chi2_1 >= 6.01667) = 0.0141714 (tables)
    a, b = outcomes(b01=40, b10=20, both_right=100, both_wrong=40)
    m = mcnemar(a, b)
    assert m["method"] == "chi2" and m["statistic"] == pytest.approx(361 / 60, rel=1e-12)
    assert m["p"] == pytest.approx(0.014171388254, rel=1e-9)
    assert mcnemar(a, b, exact_below=61)["method"] == "exact"  # 60 discordant pairs: under the threshold
    a, b = outcomes(b01=30, b10=30)
    assert mcnemar(a, b)["p"] == 1.0 and mcnemar(a, b)["statistic"] == 0  # no correction past zero (as R)


def test_chi_square_equals_scipy():
    stats = pytest.importorskip("scipy.stats")
    for b01, b10 in [(25, 0), (13, 12), (100, 130), (400, 310)]:
        m = mcnemar(*outcomes(b01, b10, both_right=50))
        assert m["method"] == "chi2"
        assert m["p"] == pytest.approx(stats.chi2.sf((max(0, abs(b01 - b10) - 1)) ** 2 / (b01 + b10), 1), rel=1e-9)


def test_threshold_switches_at_25_discordant():
    assert mcnemar(*outcomes(24, 0))["method"] == "exact"
    assert mcnemar(*outcomes(25, 0))["method"] == "chi2"


def test_difference_and_standard_error():
    a, b = outcomes(b01=60, b10=20, both_right=300, both_wrong=120)  # n = 500, B gains 40 items: +8 points
    r = paired_difference(a, b, n_boot=20000, seed=1)
    assert r["n"] == 500 and r["diff"] == pytest.approx(8.0) and r["units"] == "points"
    assert r["mean_a"] == pytest.approx(64.0) and r["mean_b"] == pytest.approx(72.0)
    d = np.array(b, float) - np.array(a, float)
    se = 100 * d.std() / math.sqrt(len(d))  # the bootstrap SE estimates the plug-in SE of the mean
    assert r["se"] == pytest.approx(se, rel=0.03)
    lo, hi = r["ci"]
    assert lo < 8 < hi and lo == pytest.approx(8 - 1.96 * se, abs=0.5) and hi == pytest.approx(8 + 1.96 * se, abs=0.5)
    assert r["ci_a"][0] < 64 < r["ci_a"][1] and r["ci_b"][0] < 72 < r["ci_b"][1]
    raw = paired_difference(a, b, n_boot=20000, seed=1, points=False)
    assert raw["diff"] == pytest.approx(0.08) and raw["ci"] == pytest.approx(tuple(x / 100 for x in r["ci"]))


def test_index_and_count_resampling_agree():
    # the multinomial shortcut for few distinct pairs is the same distribution as resampling item indices
    a, b = outcomes(b01=30, b10=15, both_right=100, both_wrong=55)
    a, b = np.array(a, float), np.array(b, float)
    ca, cb = _boot_means(a, b, 20000, np.random.default_rng(0), "counts")
    ia, ib = _boot_means(a, b, 20000, np.random.default_rng(0), "indices")
    for x, y in [(ca, ia), (cb, ib), (cb - ca, ib - ia)]:
        assert x.mean() == pytest.approx(y.mean(), abs=0.002) and x.std() == pytest.approx(y.std(), rel=0.03)


# ---------------------------------------------------------------------------------------------------------------
# Coverage, determinism, speed


def test_interval_covers_the_true_difference_about_95_percent():
    # A and B correlated through a shared latent per item; population accuracies 0.60 and 0.67: true diff 7 points
    hits = 0
    for s in range(200):
        rng = np.random.default_rng(1000 + s)
        u = rng.random(300)
        v = np.where(rng.random(300) < 0.6, u, rng.random(300))
        r = paired_difference(u < 0.60, v < 0.67, n_boot=1000, seed=s)
        hits += r["ci"][0] <= 7.0 <= r["ci"][1]
    assert 0.89 <= hits / 200 <= 0.99, hits


def test_interval_coverage_real_valued():
    hits = 0
    for s in range(100):
        rng = np.random.default_rng(5000 + s)
        a = rng.normal(size=200)
        b = 0.8 * a + 0.6 * rng.normal(size=200) + 0.25  # true mean difference 0.25
        r = paired_difference(a, b, n_boot=1000, seed=s, points=False)
        hits += r["ci"][0] <= 0.25 <= r["ci"][1]
    assert 0.88 <= hits / 100 <= 1.0, hits


def test_same_seed_same_result():
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    x, y = rng.normal(size=300), rng.normal(size=300)
    assert compare(a, b, seed=3) == compare(a, b, seed=3)
    assert paired_difference(x, y, seed=3, points=False) == paired_difference(x, y, seed=3, points=False)
    assert compare(a, b, seed=3)["ci"] != compare(a, b, seed=4)["ci"]


def test_ten_thousand_resamples_of_ten_thousand_items_is_quick():
    rng = np.random.default_rng(0)
    x = rng.normal(size=10000)
    t = time.perf_counter()
    paired_difference(x, x + rng.normal(size=10000), points=False)  # real-valued: the index path, chunked
    assert time.perf_counter() - t < 10  # about 1 s here; generous for a shared CI machine
    a = rng.integers(0, 2, 10000)
    t = time.perf_counter()
    compare(a, rng.integers(0, 2, 10000))
    assert time.perf_counter() - t < 1


# ---------------------------------------------------------------------------------------------------------------
# Several models, wording


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 with m = 3: 3 * 0.01 = 0.03, max(0.03, 2 * 0.02) = 0.04, max(0.04, 1 * 0.04) = 0.04
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([0.03]) == [0.03] and holm([]) == []
    with pytest.raises(TinkerError, match="outside"):
        holm([1.5])


def test_compare_models_each_against_the_first_with_holm():
    base, _ = outcomes(b01=0, b10=0, both_right=150, both_wrong=150)
    base = np.array(base)
    b = base.copy()
    b[np.flatnonzero(base == 0)[:30]] = 1  # B fixes 30 items A got wrong
    c = base.copy()
    c[np.flatnonzero(base == 0)[:3]] = 1  # C fixes 3
    out = compare_models({"A": base, "B": b, "C": c}, task="piqa", n_boot=2000)
    assert [(r["task"], r["name_a"], r["name_b"]) for r in out] == [("piqa", "A", "B"), ("piqa", "A", "C")]
    ps = [r["p"] for r in out]
    assert [r["p_holm"] for r in out] == pytest.approx(holm(ps))
    assert out[0]["p_holm"] == pytest.approx(2 * ps[0]) and out[0]["p_holm"] < 0.001
    assert significant(out[0]) and not significant(out[1])
    line = summary_line("piqa", "A", "B", out[0])
    assert line.startswith("B is better than A on piqa by 10.0 points (95% CI ") and "Holm-adjusted" in line
    with pytest.raises(TinkerError, match="at least two"):
        compare_models({"A": base}, task="piqa")
    with pytest.raises(TinkerError, match="piqa: A vs C: .*same items"):
        compare_models({"A": base, "C": c[:-1]}, task="piqa")


def test_summary_wording_is_symmetric_and_never_overclaims():
    a, b = outcomes(b01=40, b10=10, both_right=300, both_wrong=150)
    better = compare(a, b)
    worse = compare(b, a)
    lo, hi = better["ci"]
    assert summary_line("arc_easy", "A", "B", better) == (
        f"B is better than A on arc_easy by 6.0 points (95% CI {lo:.1f}–{hi:.1f}, McNemar p < 0.001)"
    )
    assert summary_line("arc_easy", "B", "A", worse).startswith("A is worse than B on arc_easy by 6.0 points (95% CI ")
    # the interval excludes 0 but p does not pass (as after a Holm correction): no claim
    assert summary_line("t", "A", "B", dict(better, p_holm=0.2)).startswith("no significant difference")
    # p passes but the interval touches 0: no claim
    assert summary_line("t", "A", "B", dict(better, ci=(0.0, 9.0), p=0.01)).startswith("no significant difference")
    small = dict(better, diff=0.4, ci=(-1.2, 2.0), p=0.62)
    assert summary_line("arc_easy", "A", "B", small) == (
        "no significant difference between B and A on arc_easy: B - A = +0.4 points "
        "(95% CI -1.2 to 2.0, McNemar p = 0.62)"
    )
    assert "p = 0.003" in summary_line("t", "A", "B", dict(better, p=0.0031))
    x = np.linspace(0, 1, 50)
    real = compare(x, x + 0.5, n_boot=500, points=False)
    assert real["p"] is None
    assert summary_line("ppl", "A", "B", real) == "B is better than A on ppl by 0.5 (95% CI 0.5–0.5)"


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "a,b,match",
    [
        ([1, 0, 1], [1, 0], "a has 3 items, b has 2"),
        ([], [], "empty"),
        ([[1, 0]], [[1, 0]], "flat list"),
        ([1, "x"], [1, 0], "not a list of numbers"),
        ([1, float("nan")], [1, 0], r"a\[1\] is nan"),
    ],
)
def test_bad_input(a, b, match):
    for f in (paired_difference, mcnemar, compare):
        with pytest.raises(TinkerError, match=match):
            f(a, b)


def test_bad_arguments():
    with pytest.raises(TinkerError, match=r"b\[1\] is 0.5; McNemar"):
        mcnemar([1, 0], [1, 0.5])
    with pytest.raises(TinkerError, match="n_boot"):
        paired_difference([1, 0], [1, 0], n_boot=1)
    with pytest.raises(TinkerError, match="confidence"):
        paired_difference([1, 0], [1, 0], confidence=95)


# ---------------------------------------------------------------------------------------------------------------
# Plot


def test_plot_scores_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    results = []
    for task in ("arc_easy", "piqa"):
        s = {m: rng.integers(0, 2, 200) for m in ("base", "tuned", "merged")}
        results += compare_models(s, task=task, n_boot=500)
    out = plot_scores(results, tmp_path / "scores.png")
    assert out == tmp_path / "scores.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.png"]  # no temporary file left behind
    with pytest.raises(TinkerError, match="no results"):
        plot_scores([], tmp_path / "empty.png")
