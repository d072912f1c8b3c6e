"""Paired statistics for comparing models on the same items: bootstrap intervals, McNemar's test, Holm correction.

`tinkerlm compare A B` scores the same items with each model, so the scores are *paired*: item i is easy or hard for
both. Pairing removes the between-item variance from the comparison, which is why these tests are sharper than the
unpaired ones (a two-sample test on the two accuracies) that benchmark tables usually imply.

Per-item scores a_i, b_i (0/1 accuracy or real-valued), i = 1..n, the same items in the same order:

- Difference: d = mean(b) - mean(a) = mean(b_i - a_i), reported in points (x 100) by default.
- Paired bootstrap (Efron & Tibshirani 1993, ch. 6 and 13): draw n item indices with replacement, the same indices
  for both models, and recompute the means; repeat n_boot times. The standard error is the standard deviation of the
  resampled differences; the interval is the percentile interval, their alpha/2 and 1 - alpha/2 quantiles.
  When the item pairs (a_i, b_i) take few distinct values (always so for 0/1 scores: at most 4), the resample
  counts of each distinct pair are drawn directly from Multinomial(n, observed frequencies), which is the same
  distribution as resampling indices, at O(n_boot * distinct) cost instead of O(n_boot * n).
- McNemar's test (McNemar 1947) for 0/1 outcomes uses only the discordant items: b01 = #(a wrong, b right),
  b10 = #(a right, b wrong). Under H0 (both models equally accurate) each discordant item is a fair coin, so
    exact:  p = min(1, 2 * P(X <= min(b01, b10))),  X ~ Binomial(b01 + b10, 1/2)
            (equals scipy.stats.binomtest(b01, b01 + b10).pvalue, since Binomial(n, 1/2) is symmetric);
    chi2:   X2 = (max(0, |b01 - b10| - 1))^2 / (b01 + b10) with Edwards' continuity correction, 1 degree of freedom,
            p = P(chi2_1 >= X2) = erfc(sqrt(X2 / 2)) (the max(0, .) matches R's mcnemar.test when b01 = b10).
  The exact test is used when b01 + b10 < 25 (the chi-square approximation is poor there), the chi-square
  otherwise; no discordant items gives p = 1.
- Several models B, C, ... against a baseline A on one task: one McNemar p per comparison, adjusted with Holm's
  step-down method (Holm 1979), which controls the family-wise error rate without assuming independence:
  sort the m p-values ascending p_(1) <= ... <= p_(m); adjusted p_(j) = max_{k <= j} min(1, (m - k + 1) * p_(k)).
  The family is the comparisons within one task; to widen it (every model on every task) pass all p-values to
  `holm` at once. Intervals are per comparison (not simultaneous); the verdict below needs both, so it stays
  conservative.
- Verdict (`summary_line`): "better"/"worse" only when the interval excludes 0 AND p < 1 - confidence (the Holm
  p where there is one); otherwise "no significant difference", with the numbers. Real-valued scores have no
  McNemar test; their verdict rests on the interval alone.

References: Q. McNemar, "Note on the sampling error of the difference between correlated proportions or
percentages", Psychometrika 12 (1947); A. L. Edwards, Psychometrika 13 (1948) (continuity correction);
B. Efron & R. Tibshirani, "An Introduction to the Bootstrap" (1993); S. Holm, "A simple sequentially rejective
multiple test procedure", Scand. J. Statistics 6 (1979).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from tinkerlm.errors import TinkerError
from tinkerlm.fileio import atomic_path

EXACT_BELOW = 25  # discordant pairs below which McNemar uses the exact binomial test
MAX_DISTINCT = 256  # distinct (a_i, b_i) pairs up to which the bootstrap draws multinomial counts
CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once on the index path (4M int64 = 32 MiB)


# ---------------------------------------------------------------------------------------------------------------
# Input


def _scores(x, name: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TinkerError(f"{where}: {name} is not a list of numbers ({e}); give one score per item") from None
    if arr.ndim != 1:
        raise TinkerError(f"{where}: {name} has shape {arr.shape}; give a flat list of per-item scores")
    if arr.size == 0:
        raise TinkerError(f"{where}: {name} is empty; score at least one item")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise TinkerError(f"{where}: {name}[{bad}] is {arr[bad]}; every per-item score must be finite")
    return arr


def _pair(a, b, where: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _scores(a, "a", where), _scores(b, "b", where)
    if a.shape != b.shape:
        raise TinkerError(
            f"{where}: a has {a.size} items, b has {b.size}; score both models on the same items in the same order"
        )
    return a, b


def is_binary(x) -> bool:
    """True when every score is 0 or 1 (accuracy), so McNemar's test applies."""
    arr = np.asarray(x, dtype=np.float64)
    return bool(arr.size) and bool(np.isin(arr, (0.0, 1.0)).all())


# ---------------------------------------------------------------------------------------------------------------
# Paired bootstrap


def _boot_means(
    a: np.ndarray, b: np.ndarray, n_boot: int, rng: np.random.Generator, method: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Means of a and of b over n_boot paired resamples of the items, shape (n_boot,) each.

    method "counts" draws the count of each distinct (a_i, b_i) pair from a multinomial; "indices" draws item
    indices; "auto" picks "counts" when there are at most MAX_DISTINCT distinct pairs. Both are the same
    distribution; they consume the generator differently, so they give different (equally valid) draws.
    """
    n = a.size
    pairs, counts = np.unique(np.stack([a, b], axis=1), axis=0, return_counts=True)  # (k, 2), (k,)
    if method == "auto":
        method = "counts" if len(pairs) <= MAX_DISTINCT else "indices"
    if method == "counts":
        c = rng.multinomial(n, counts / n, size=n_boot).astype(np.float64)  # (n_boot, k)
        return c @ pairs[:, 0] / n, c @ pairs[:, 1] / n
    ma, mb = np.empty(n_boot), np.empty(n_boot)
    rows = max(1, CHUNK_ELEMENTS // n)
    dtype = np.int32 if n < 2**31 else np.int64
    for s in range(0, n_boot, rows):
        idx = rng.integers(0, n, size=(min(rows, n_boot - s), n), dtype=dtype)  # (rows, n): same items for a and b
        ma[s : s + len(idx)] = a[idx].mean(axis=1)
        mb[s : s + len(idx)] = b[idx].mean(axis=1)
    return ma, mb


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    points: bool = True,
) -> dict:
    """Mean of each, the difference b - a, and its paired bootstrap percentile interval and standard error.

    Args:
        a, b: per-item scores of two models on the same items in the same order (0/1 or real-valued).
        n_boot: bootstrap resamples. seed: the generator's seed (same seed, same result).
        confidence: interval coverage, e.g. 0.95.
        points: report means, difference, intervals and standard error x 100 ("points", for accuracies);
            False keeps the scores' own units.

    Returns:
        {"n", "mean_a", "mean_b", "diff", "ci": (low, high), "se", "ci_a", "ci_b", "confidence", "n_boot", "seed",
        "units"}; ci_a and ci_b are each model's own percentile interval from the same resamples (for plots).

    Raises:
        TinkerError: different lengths, no items, non-numeric or non-finite scores, bad n_boot or confidence.
    """
    where = "paired_difference"
    a, b = _pair(a, b, where)
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 2:
        raise TinkerError(f"{where}: n_boot is {n_boot!r}; give an integer of at least 2 (10000 is usual)")
    if not 0 < confidence < 1:
        raise TinkerError(f"{where}: confidence is {confidence!r}; give a level between 0 and 1, e.g. 0.95")
    rng = np.random.default_rng(seed)
    ma, mb = _boot_means(a, b, int(n_boot), rng)
    md = mb - ma
    q = [(1 - confidence) / 2, (1 + confidence) / 2]
    k = 100.0 if points else 1.0

    def interval(x: np.ndarray) -> tuple[float, float]:
        lo, hi = np.quantile(x, q)
        return float(lo) * k, float(hi) * k

    return {
        "n": int(a.size),
        "mean_a": float(a.mean()) * k,
        "mean_b": float(b.mean()) * k,
        "diff": float((b - a).mean()) * k,
        "ci": interval(md),
        "se": float(md.std(ddof=1)) * k,
        "ci_a": interval(ma),
        "ci_b": interval(mb),
        "confidence": float(confidence),
        "n_boot": int(n_boot),
        "seed": seed,
        "units": "points" if points else "",
    }


# ---------------------------------------------------------------------------------------------------------------
# McNemar's test


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair-coin trials: min(1, 2 * P(X <= min(k, n - k))), computed exactly."""
    m = min(k, n - k)
    tail = Fraction(sum(math.comb(n, i) for i in range(m + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def mcnemar(a: Sequence[float], b: Sequence[float], *, exact_below: int = EXACT_BELOW) -> dict:
    """McNemar's test for paired 0/1 outcomes of two models on the same items.

    Returns:
        {"b01": a wrong and b right, "b10": a right and b wrong, "n": items, "method": "exact" or "chi2",
        "statistic": the continuity-corrected chi-square (None for exact), "p": two-sided p-value}.
        The exact binomial test is used when b01 + b10 < exact_below, the chi-square otherwise (module docstring).

    Raises:
        TinkerError: different lengths, no items, or a score other than 0 and 1.
    """
    where = "mcnemar"
    a, b = _pair(a, b, where)
    for name, x in (("a", a), ("b", b)):
        bad = np.flatnonzero(~np.isin(x, (0.0, 1.0)))
        if bad.size:
            raise TinkerError(
                f"{where}: {name}[{int(bad[0])}] is {x[bad[0]]}; McNemar's test needs 0/1 outcomes "
                "(use paired_difference for real-valued scores)"
            )
    b01 = int(np.count_nonzero((a == 0) & (b == 1)))
    b10 = int(np.count_nonzero((a == 1) & (b == 0)))
    nd = b01 + b10
    if nd < exact_below:
        method, stat, p = "exact", None, (binomial_two_sided(b01, nd) if nd else 1.0)
    else:
        method = "chi2"
        stat = max(0, abs(b01 - b10) - 1) ** 2 / nd
        p = math.erfc(math.sqrt(stat / 2))  # survival function of chi-square with 1 degree of freedom
    return {"b01": b01, "b10": b10, "n": int(a.size), "method": method, "statistic": stat, "p": float(p)}


# ---------------------------------------------------------------------------------------------------------------
# Comparisons


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input's order; reject where adjusted p < alpha."""
    p = [float(x) for x in pvalues]
    for x in p:
        if not 0 <= x <= 1:
            raise TinkerError(f"holm: p-value {x} is outside [0, 1]")
    m = len(p)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))  # (m - k + 1) * p_(k) with k = rank + 1
        out[i] = running
    return out


def compare(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    points: bool = True,
) -> dict:
    """paired_difference, plus McNemar's test when both are 0/1 scores ("p", "test", "mcnemar"; else None)."""
    result = paired_difference(a, b, n_boot=n_boot, seed=seed, confidence=confidence, points=points)
    if is_binary(a) and is_binary(b):
        mc = mcnemar(a, b)
        result.update(mcnemar=mc, p=mc["p"], test=f"McNemar ({mc['method']})")
    else:
        result.update(mcnemar=None, p=None, test=None)
    return result


def compare_models(
    scores: Mapping[str, Sequence[float]],
    *,
    task: str = "",
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    points: bool = True,
) -> list[dict]:
    """Each model against the first on one task, McNemar p-values Holm-adjusted over the comparisons.

    Args:
        scores: {model name: per-item scores}, the baseline first, every model on the same items in the same order.

    Returns:
        One `compare` result per model after the first, with "task", "name_a", "name_b" and "p_holm" (None for
        real-valued scores) added. Every comparison uses the same seed, so it resamples the same items.
    """
    names = list(scores)
    if len(names) < 2:
        raise TinkerError(f"compare: {len(names)} model(s) given for {task or 'the task'}; give at least two")
    base = names[0]
    out = []
    for name in names[1:]:
        try:
            r = compare(scores[base], scores[name], n_boot=n_boot, seed=seed, confidence=confidence, points=points)
        except TinkerError as e:
            raise TinkerError(f"{task or 'compare'}: {base} vs {name}: {e}") from None
        r.update(task=task, name_a=base, name_b=name, p_holm=None)
        out.append(r)
    tested = [r for r in out if r["p"] is not None]
    for r, ph in zip(tested, holm([r["p"] for r in tested])):
        r["p_holm"] = ph
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def _num(x: float, points: bool = True) -> str:
    s = f"{x:.1f}" if points else f"{x:.3g}"  # points to 0.1; other units to 3 significant digits
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def _interval(lo: float, hi: float, points: bool = True) -> str:
    # an en dash between negative numbers reads as a minus sign, so use "to" there
    a, b = _num(lo, points), _num(hi, points)
    return f"{a}–{b}" if not a.startswith("-") and not b.startswith("-") else f"{a} to {b}"


def _p(p: float) -> str:
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def significant(result: dict) -> bool:
    """The interval excludes 0 and (where there is a test) the p-value, Holm-adjusted if present, is below alpha."""
    lo, hi = result["ci"]
    p = result.get("p_holm") if result.get("p_holm") is not None else result.get("p")
    alpha = 1 - result["confidence"]
    return (lo > 0 or hi < 0) and (p is None or p < alpha)


def verdict(result: dict) -> str:
    """ "better", "worse" (B against A, by `significant`, minding `higher_is_better`) or "no significant difference"."""
    if not significant(result):
        return "no significant difference"
    higher = result["ci"][0] > 0
    return "better" if higher == result.get("higher_is_better", True) else "worse"


def summary_line(task: str, name_a: str, name_b: str, result: dict) -> str:
    """One sentence that never overclaims, e.g.

    "B is better than A on arc_easy by 3.1 points (95% CI 1.2–5.0, McNemar p = 0.003)"
    "B is worse than A on arc_easy by 3.1 points (95% CI 1.2–5.0, McNemar p = 0.003)"  (the interval of A - B)
    "no significant difference between B and A on arc_easy: B - A = 0.4 points (95% CI -1.2 to 2.0, McNemar p = 0.62)"

    `result["higher_is_better"]` False (perplexity, KL) makes a lower B the better one; `result["units"]` other than
    "points" (e.g. "ppl") is written after the numbers as it is.
    """
    diff, (lo, hi) = result["diff"], result["ci"]
    conf = f"{100 * result['confidence']:g}% CI"
    pts = result.get("units") == "points"
    units = f" {result['units']}" if result.get("units") else ""
    stats = []
    if result.get("p_holm") is not None:
        stats.append(f"Holm-adjusted McNemar {_p(result['p_holm'])}")
    elif result.get("p") is not None:
        stats.append(f"McNemar {_p(result['p'])}")
    tail = "".join(", " + s for s in stats)
    if significant(result):
        # the size and interval are of B - A where B is higher and of A - B where it is lower, so every verdict
        # reads with positive numbers; for a lower-is-better score (perplexity, KL) higher is worse
        higher = lo > 0
        size, (lo, hi) = (diff, (lo, hi)) if higher else (-diff, (-hi, -lo))
        word = "better" if higher == result.get("higher_is_better", True) else "worse"
        stats_text = f"{conf} {_interval(lo, hi, pts)}{tail}"
        return f"{name_b} is {word} than {name_a} on {task} by {_num(size, pts)}{units} ({stats_text})"
    d = _num(diff, pts)
    d = "+" + d if float(d) > 0 else d
    return (
        f"no significant difference between {name_b} and {name_a} on {task}: {name_b} - {name_a} = "
        f"{d}{units} ({conf} {_interval(lo, hi, pts)}{tail})"
    )


def plot_scores(results: Sequence[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Bar chart of each model's score per task with its bootstrap interval, written to `path` (PNG) atomically.

    Args:
        results: `compare_models` (or `compare` with "task", "name_a", "name_b" added) results, for one or more
            tasks; each gives the scores of its two models. A model better or worse than the baseline (by
            `significant`) is marked with * above its bar. Overlapping bars do not mean "no difference": the
            paired interval of the difference is the test, and it is usually much narrower.
            Tasks scored in points share one panel; a task in other units (perplexity, KL: "units", with
            "higher_is_better" False marked "lower is better") gets a panel of its own, since their scales differ.
            Any number of models: colours cycle through a qualitative palette, the legend sits below.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise TinkerError("plot_scores: no results to plot")
    tasks: list[str] = []
    models: list[str] = []
    cells: dict[tuple[str, str], tuple[float, float, float, bool]] = {}  # (task, model) -> score, low, high, signif
    units: dict[str, tuple[str, bool]] = {}  # task -> (units, higher is better)
    for r in results:
        task = r.get("task") or "task"
        tasks += [task] if task not in tasks else []
        units.setdefault(task, (r.get("units") or "score", r.get("higher_is_better", True)))
        for side in ("a", "b"):
            name = r.get(f"name_{side}") or side.upper()
            models += [name] if name not in models else []
            lo, hi = r[f"ci_{side}"]
            sig = side == "b" and significant(r)
            if side == "a" and (task, name) in cells:
                continue
            cells[(task, name)] = (r[f"mean_{side}"], lo, hi, sig)

    # panels: every task in points together, then one per task in other units
    panels = [[t for t in tasks if units[t][0] == "points"]] + [[t] for t in tasks if units[t][0] != "points"]
    panels = [p for p in panels if p]
    nm = len(models)
    cmap = plt.get_cmap("tab10" if nm <= 10 else "tab20" if nm <= 20 else "viridis")
    colours = [cmap(j if nm <= 20 else j / max(1, nm - 1)) for j in range(nm)]
    widths = [max(2.2, 0.8 + len(p) * nm * 0.35) for p in panels]
    fig_w = min(40.0, max(5.5, sum(widths)))
    chars = int(fig_w * 11)  # characters of 9-10 pt text across the figure
    ncol = max(1, min(nm, chars // (max(len(m) for m in models) + 6)))
    legend_rows = -(-nm // ncol)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(fig_w, 4.2 + 0.22 * legend_rows),
        dpi=110,
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    width = 0.8 / nm
    for ax, panel in zip(axes[0], panels):
        for j, model in enumerate(models):
            xs, ys, err, marks = [], [], [[], []], []
            for i, task in enumerate(panel):
                if (task, model) not in cells:
                    continue
                y, lo, hi, sig = cells[(task, model)]
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(y)
                err[0].append(max(0.0, y - lo))
                err[1].append(max(0.0, hi - y))
                marks.append(sig)
            ax.bar(xs, ys, width * 0.9, yerr=err, capsize=min(3, 12 / nm), color=colours[j], label=model)
            for x, y, e, sig in zip(xs, ys, err[1], marks):
                if sig:
                    ax.text(x, y + e, "*", ha="center", va="bottom")
        ax.set_xticks(
            range(len(panel)), panel, rotation=30 if len(panel) > 4 else 0, ha="right" if len(panel) > 4 else "center"
        )
        u, up = units[panel[0]]
        ax.set_ylabel(u if up else f"{u} (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    conf = results[0].get("confidence", 0.95)
    title = title or f"scores with {100 * conf:g}% bootstrap intervals (* differs from {models[0]})"
    fig.suptitle(textwrap.fill(title, chars), fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, (0.12 + 0.19 * legend_rows) / fig.get_figheight(), 1, 1))  # room for the legend

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
