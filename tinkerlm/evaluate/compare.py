"""`tinkerlm compare`: several models' evaluation runs paired item by item, with intervals, tests and verdicts.

Input: results of `tinkerlm.evaluate.run.evaluate` (format "tinkerlm-eval/1", one per model; per-item records keyed
by "id"). Per task, the items are paired by id (the order of the baseline, the first run) and each metric compared:
the task's headline metric ("main") and, for multiple choice, acc_norm too. Each model is compared with the
baseline through `tinkerlm.evaluate.stats`: the paired bootstrap interval of the difference, McNemar's test for 0/1
scores with Holm's correction over the models of one task and metric, and the verdict of `stats.summary_line`.

Scores that are not means of per-item scores are bootstrapped as what they are, ratios over the resampled items:
perplexity is exp(sum of the items' nll / sum of their tokens), a token-weighted KL is sum(kl x tokens) /
sum(tokens). Their verdicts rest on the interval alone (no McNemar), and a lower score is the better one.

Runs compare only when they scored the same items the same way: the same item ids, --limit, --shots, --chat,
(with few-shot prompts, which the seed draws) --seed and (for kl) --reference. Anything else is a one-line error
naming the task and what differs. The quantization and batch size may differ (the first is often the question; the
second changes nothing).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tinkerlm.errors import TinkerError
from tinkerlm.evaluate import stats
from tinkerlm.fileio import write_json

FORMAT = "tinkerlm-eval/1"
COMPARE_FORMAT = "tinkerlm-compare/1"
POINTS = {"acc", "acc_norm", "exact"}  # fractions of items, shown in points (x 100)
SECONDARY = {"multiple_choice": ("acc_norm",)}  # compared besides the task's main metric
# ratio metrics: metric -> (per-item numerator key, per-item weight key, whether the numerator is weighted, f)
RATIO = {"ppl": ("nll", "tokens", False, np.exp), "kl_mean": ("kl", "tokens", True, None)}
UNITS = {"ppl": "ppl", "kl_mean": "nats"}
CHUNK_ELEMENTS = 1 << 22  # resampled item weights held at once by the ratio bootstrap


# ---------------------------------------------------------------------------------------------------------------
# Reading runs


def load_results(path: str | Path) -> dict:
    """A results file written by `tinkerlm eval --out` (format "tinkerlm-eval/1").

    Raises:
        TinkerError: unreadable, not JSON, or not an evaluation results file (naming the file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TinkerError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise TinkerError(f"{path}: not a JSON file ({e}); give results written by `tinkerlm eval --out`") from None
    try:
        _check_run(data, str(path))
    except TinkerError as e:
        raise TinkerError(f"{path}: {e}") from None
    return data


def _check_run(run, where: str) -> None:
    if not isinstance(run, dict) or run.get("format") != FORMAT:
        got = run.get("format") if isinstance(run, dict) else type(run).__name__
        raise TinkerError(
            f"format is {got!r}, not {FORMAT!r}; give evaluation results as `tinkerlm eval --out` writes them"
        )
    tasks = run.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise TinkerError(f"{where}: no 'tasks' in the results")
    for name, t in tasks.items():
        if not isinstance(t, dict) or not isinstance(t.get("items"), list) or not t.get("main"):
            raise TinkerError(
                f"task {name!r} has no per-item records ('items') or no 'main' metric; evaluate it again with "
                "`tinkerlm eval`"
            )


def _labels(runs: Sequence[dict], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(runs) or len(set(names)) != len(names):
            raise TinkerError(f"compare: give {len(runs)} distinct names, one per run (got {list(names)})")
        return list(names)
    refs = [str((r.get("model") or {}).get("ref") or f"model {i + 1}") for i, r in enumerate(runs)]
    out = []
    for i, ref in enumerate(refs):  # the same model twice (a reproducibility check) gets "#2", "#3"
        k = refs[:i].count(ref)
        out.append(ref if k == 0 else f"{ref} #{k + 1}")
    return out


def _setting(run: dict, task: dict, key: str):
    value = task.get(key)
    return (run.get("settings") or {}).get(key) if value is None else value


def _check_same(task: str, runs: list[dict], labels: list[str]) -> None:
    """Raise when the runs of `task` were not scored the same way (naming what differs and where)."""
    t = [r["tasks"][task] for r in runs]
    shots = _setting(runs[0], t[0], "shots")
    checks = [("kind", "kind", "task"), ("limit", "limit", "--limit"), ("shots", "shots", "--shots")]
    checks += [("chat", "chat", "--chat/--no-chat")]
    if shots:  # the seed draws the few-shot examples
        checks.append(("seed", "seed", "--seed"))
    if t[0].get("kind") == "kl":  # KL is to a reference: the same one for every run
        checks.append(("reference", "reference model", "--reference"))
    for key, what, flag in checks:
        base = _setting(runs[0], t[0], key)
        for run, tk, label in zip(runs[1:], t[1:], labels[1:]):
            other = _setting(run, tk, key)
            if other != base:
                raise TinkerError(
                    f"{task}: the runs differ in {what}: {labels[0]} has {base!r}, {label} has {other!r}; "
                    f"compare runs made with the same {flag}"
                )


def _ids(task: str, items: list, label: str) -> list[str]:
    ids = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise TinkerError(f"{task}: item {i} of {label} has no 'id'; evaluate it again with `tinkerlm eval`")
        ids.append(str(item["id"]))
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise TinkerError(f"{task}: item id {dup!r} appears twice in the results of {label}")
    return ids


def _aligned(task: str, runs: list[dict], labels: list[str]) -> list[list[dict]]:
    """Each run's items of `task` in the order of the baseline's, paired by id."""
    base_items = runs[0]["tasks"][task]["items"]
    base_ids = _ids(task, base_items, labels[0])
    out = [base_items]
    for run, label in zip(runs[1:], labels[1:]):
        items = run["tasks"][task]["items"]
        by_id = dict(zip(_ids(task, items, label), items))
        missing = [i for i in base_ids if i not in by_id]
        extra = len(by_id) - (len(base_ids) - len(missing))
        if missing or extra:
            example = missing[0] if missing else next(i for i in by_id if i not in set(base_ids))
            raise TinkerError(
                f"{task}: {labels[0]} has {len(base_ids)} items, {label} has {len(by_id)}, and they are not the "
                f"same items (e.g. {example!r}); compare runs over the same items (same --limit and task data)"
            )
        out.append([by_id[i] for i in base_ids])
    return out


def _column(task: str, items: list[dict], key: str, label: str) -> np.ndarray:
    try:
        return np.array([float(it[key]) for it in items], dtype=np.float64)
    except KeyError:
        bad = next(it.get("id") for it in items if key not in it)
        raise TinkerError(f"{task}: item {bad!r} of {label} has no {key!r} score") from None
    except (TypeError, ValueError):
        raise TinkerError(f"{task}: a {key!r} score of {label} is not a number") from None


# ---------------------------------------------------------------------------------------------------------------
# Ratio scores (perplexity, token-weighted KL): paired bootstrap of the ratio itself


def _ratio_value(num: np.ndarray, den: np.ndarray, f) -> np.ndarray:
    r = num / den
    return f(r) if f is not None else r


def _ratio_compare(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], f, *, n_boot: int, seed: int, confidence: float
) -> dict:
    """Like `stats.paired_difference` for the score f(sum(num) / sum(den)): the same items resampled for both."""
    n = a[0].size
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 2:
        raise TinkerError(f"n_boot is {n_boot!r}; give an integer of at least 2 (10000 is usual)")
    if not 0 < confidence < 1:
        raise TinkerError(f"confidence is {confidence!r}; give a level between 0 and 1, e.g. 0.95")
    if n == 0:
        raise TinkerError("no items to compare")
    if (a[1] <= 0).any() or (b[1] <= 0).any():
        raise TinkerError("an item has no tokens; its score is undefined")
    rng = np.random.default_rng(seed)
    sa, sb = np.empty(n_boot), np.empty(n_boot)
    rows = max(1, CHUNK_ELEMENTS // n)
    stack = np.stack([a[0], a[1], b[0], b[1]], axis=1)  # (n, 4)
    for s in range(0, n_boot, rows):
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(rows, n_boot - s)).astype(np.float64)  # (rows, n)
        sums = w @ stack  # (rows, 4)
        sa[s : s + len(w)] = _ratio_value(sums[:, 0], sums[:, 1], f)
        sb[s : s + len(w)] = _ratio_value(sums[:, 2], sums[:, 3], f)
    ma = float(_ratio_value(a[0].sum(), a[1].sum(), f))
    mb = float(_ratio_value(b[0].sum(), b[1].sum(), f))
    q = [(1 - confidence) / 2, (1 + confidence) / 2]

    def interval(x):
        lo, hi = np.quantile(x, q)
        return float(lo), float(hi)

    return {
        "n": int(n),
        "mean_a": ma,
        "mean_b": mb,
        "diff": mb - ma,
        "ci": interval(sb - sa),
        "se": float((sb - sa).std(ddof=1)),
        "ci_a": interval(sa),
        "ci_b": interval(sb),
        "confidence": float(confidence),
        "n_boot": int(n_boot),
        "seed": seed,
        "mcnemar": None,
        "p": None,
        "test": None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Comparing


def _metrics(task: str, t: dict) -> list[str]:
    main = t["main"]
    extra = [m for m in SECONDARY.get(t.get("kind", ""), ()) if m != main and all(m in it for it in t["items"])]
    return [main, *extra]


def compare_runs(
    runs: Sequence[dict],
    *,
    tasks: Sequence[str] | None = None,
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    names: Sequence[str] | None = None,
) -> list[dict]:
    """Every run against the first (the baseline), per task and metric, on the items they share by id.

    Args:
        runs: evaluation results ("tinkerlm-eval/1"), the baseline first; at least two.
        tasks: the tasks to compare (default: those every run has, in the baseline's order).
        n_boot, seed, confidence: of the paired bootstrap (the same resamples for every comparison of a task).
        names: a label per run (default: the model refs, "#2" added to a repeated one).

    Returns:
        One dict per (task, metric, model after the first), in that order: the fields of `stats.compare` (n,
        mean_a, mean_b, diff, ci, se, ci_a, ci_b, p, test, mcnemar, ...; in points for acc, acc_norm and exact)
        plus task, metric, main (the task's headline metric?), kind, higher_is_better, units, name_a, name_b,
        p_holm (McNemar p Holm-adjusted over the models of the task and metric), verdict ("better", "worse" or
        "no significant difference") and summary (the sentence of `stats.summary_line`).

    Raises:
        TinkerError: fewer than two runs, a task missing from a run, runs made with different settings or over
            different items (one line naming the task and what differs), missing per-item scores.
    """
    runs = list(runs)
    if len(runs) < 2:
        raise TinkerError(f"compare: {len(runs)} run(s) given; give at least two")
    labels = _labels(runs, names)
    for run, label in zip(runs, labels):
        try:
            _check_run(run, label)
        except TinkerError as e:
            raise TinkerError(f"{label}: {e}") from None
    have = [list(r["tasks"]) for r in runs]
    if tasks is None or len(tasks) == 0:
        tasks = [t for t in have[0] if all(t in h for h in have[1:])]
        if not tasks:
            listing = "; ".join(f"{lab} has {', '.join(h)}" for lab, h in zip(labels, have))
            raise TinkerError(f"compare: the runs share no task ({listing})")
    for task in tasks:
        for label, h in zip(labels, have):
            if task not in h:
                raise TinkerError(
                    f"{task}: not in the results of {label} (it has {', '.join(h)}); evaluate it there too"
                )

    out = []
    for task in tasks:
        _check_same(task, runs, labels)
        items = _aligned(task, runs, labels)
        t0 = runs[0]["tasks"][task]
        hib = bool(t0.get("higher_is_better", True))
        for metric in _metrics(task, t0):
            if metric in RATIO:
                results = _compare_ratio(task, metric, items, labels, n_boot=n_boot, seed=seed, confidence=confidence)
            else:
                scores = {label: _column(task, it, metric, label) for label, it in zip(labels, items)}
                points = metric in POINTS
                try:
                    results = stats.compare_models(
                        scores, task=task, n_boot=n_boot, seed=seed, confidence=confidence, points=points
                    )
                except TinkerError as e:
                    raise TinkerError(f"{task} ({metric}): {e}") from None
                for r in results:
                    r["units"] = "points" if points else UNITS.get(metric, "")
            main = metric == t0["main"]
            for r in results:
                r.update(
                    task=task,
                    metric=metric,
                    main=main,
                    kind=t0.get("kind"),
                    higher_is_better=hib if main else True,
                    label=task if main else f"{task} ({metric})",
                )
                r["verdict"] = stats.verdict(r)
                r["summary"] = stats.summary_line(r["label"], r["name_a"], r["name_b"], r)
            out += results
    return out


def _compare_ratio(task, metric, items, labels, *, n_boot, seed, confidence) -> list[dict]:
    num_key, den_key, weighted, f = RATIO[metric]
    cols = []
    for it, label in zip(items, labels):
        den = _column(task, it, den_key, label)
        num = _column(task, it, num_key, label)
        cols.append((num * den if weighted else num, den))
    out = []
    for label, col in zip(labels[1:], cols[1:]):
        try:
            r = _ratio_compare(cols[0], col, f, n_boot=n_boot, seed=seed, confidence=confidence)
        except TinkerError as e:
            raise TinkerError(f"{task} ({metric}): {labels[0]} vs {label}: {e}") from None
        r.update(name_a=labels[0], name_b=label, p_holm=None, units=UNITS.get(metric, ""))
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def _num(x: float, points: bool) -> str:
    s = f"{x:.1f}" if points else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def _signed(x: float, points: bool) -> str:
    s = _num(x, points)
    return s if s.startswith("-") else "+" + s


def _interval(lo: float, hi: float, points: bool) -> str:
    return f"{_num(lo, points)} to {_num(hi, points)}" if lo < 0 or hi < 0 else f"{_num(lo, points)}–{_num(hi, points)}"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _bar(score: float, lo: float, hi: float, top: float, width: int) -> str:
    """█ up to the interval's low end, ▓ on to the score, ░ on to its high end; `top` fills the width."""
    cells = []
    for c in range(width):
        v = (c + 0.5) / width * top
        cells.append("█" if v <= lo else "▓" if v <= score else "░" if v <= hi else " ")
    return "".join(cells).rstrip()


def _groups(results: Sequence[dict]) -> list[list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["metric"]), []).append(r)
    return list(groups.values())


def format_comparison(results: Sequence[dict], *, width: int | None = None) -> str:
    """The terminal report of `compare_runs`: per task and metric a table (model, score with its interval, the
    difference from the baseline with its paired interval, McNemar p Holm-adjusted, verdict) and a bar chart of the
    scores with their intervals; then the summary sentences."""
    if width is None:
        width = min(120, shutil.get_terminal_size((100, 24)).columns)
    width = max(60, width)
    lines: list[str] = []
    for group in _groups(results):
        r0 = group[0]
        pts = r0.get("units") == "points"
        conf = f"{100 * r0['confidence']:g}%"
        order = "higher is better" if r0.get("higher_is_better", True) else "lower is better"
        unit = " in points" if pts else ""
        lines.append(f"{r0['task']}: {r0['metric']}{unit} ({order}), {r0['n']} items paired by id")
        rows = [(r0["name_a"], r0["mean_a"], r0["ci_a"], None)] + [
            (r["name_b"], r["mean_b"], r["ci_b"], r) for r in group
        ]
        name_w = min(32, max(len("model"), *(len(n) for n, *_ in rows)))
        head = [
            "model".ljust(name_w),
            "score".rjust(7),
            f"{conf} CI".ljust(13),
            "diff".rjust(7),
            f"{conf} CI of diff".ljust(17),
            "McNemar p (Holm)".ljust(16),
            "verdict",
        ]
        lines.append("  " + "  ".join(head))
        for name, score, ci, r in rows:
            cells = [_fit(name, name_w).ljust(name_w), _num(score, pts).rjust(7), _interval(*ci, pts).ljust(13)]
            if r is None:
                cells += ["".rjust(7), "(baseline)".ljust(17), "".ljust(16), ""]
            else:
                p = r.get("p_holm") if r.get("p_holm") is not None else r.get("p")
                ptext = "-" if p is None else "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"
                cells += [
                    _signed(r["diff"], pts).rjust(7),
                    _interval(*r["ci"], pts).ljust(17),
                    ptext.ljust(16),
                    r["verdict"],
                ]
            lines.append(("  " + "  ".join(cells)).rstrip())
        # the bar chart: the scale runs from 0 to the highest interval end
        top = max(max(ci[1], score) for _, score, ci, _ in rows) or 1.0
        bar_w = max(10, min(50, width - name_w - 30))
        for name, score, ci, _ in rows:
            bar = _bar(score, ci[0], ci[1], top, bar_w).ljust(bar_w)
            lines.append(f"  {_fit(name, name_w).ljust(name_w)}  {bar}  {_num(score, pts)} [{_interval(*ci, pts)}]")
        lines.append(f"  {''.ljust(name_w)}  █▓ score, ░ to the high end of its {conf} interval; 0 at the left")
        lines.append("")
    lines.append("Summary:")
    lines += [f"  {r['summary']}" for r in results]
    return "\n".join(lines)


def report(results: Sequence[dict], runs: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """The JSON record of a comparison ("tinkerlm-compare/1"): the models, their settings and every result."""
    from tinkerlm import __version__

    labels = _labels(runs, names)
    return {
        "format": COMPARE_FORMAT,
        "tinkerlm": __version__,
        "models": [
            {"label": lab, **{k: v for k, v in (r.get("model") or {}).items()}, "settings": r.get("settings")}
            for lab, r in zip(labels, runs)
        ],
        "comparisons": [dict(r) for r in results],
        "summary": [r["summary"] for r in results],
    }


def plot(results: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """The PNG of `stats.plot_scores` for the tasks' main metrics (acc_norm and the like are in the table)."""
    main = [dict(r, task=r["label"]) for r in results if r.get("main", True)]
    return stats.plot_scores(main or list(results), path, title=title)


# ---------------------------------------------------------------------------------------------------------------
# `tinkerlm compare`

EVAL_FLAGS = ("limit", "shots", "chat", "batch_size", "seed", "quant", "reference", "threads")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_out(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise TinkerError(f"{flag}: {Path(path).parent} is not a directory")


def main(a) -> None:
    """`tinkerlm compare` (see cli.py for the flags): evaluate the models (or read --results files), compare, print."""
    import sys

    models, files = list(a.models or []), list(a.results or [])
    if models and files:
        raise TinkerError("compare: give models or --results files, not both")
    tasks = [t.strip() for t in (a.tasks or "").split(",") if t.strip()] or None
    _check_out(a.out, "--out")
    _check_out(a.plot, "--plot")
    if files:
        given = [_flag(k) for k in EVAL_FLAGS if getattr(a, k, None) is not None]
        given += ["--no-store"] if hasattr(a, "store") else []
        if given:
            raise TinkerError(
                f"compare: {given[0]} applies when models are evaluated; saved --results files keep their settings"
            )
        if len(files) < 2:
            raise TinkerError("compare: give at least two --results files (the baseline first)")
        runs = [load_results(f) for f in files]
    else:
        if len(models) < 2:
            raise TinkerError("compare: give at least two models (the baseline first), or --results FILE FILE ...")
        if not tasks:
            raise TinkerError("compare: --tasks is needed with models (e.g. --tasks arc_easy,piqa)")
        from tinkerlm.api import resolve
        from tinkerlm.evaluate.run import evaluate

        for m in models + ([a.reference] if getattr(a, "reference", None) else []):
            resolve(m)  # every model found (or pulled) before the first is evaluated: a typo fails at once
        opts = {k: getattr(a, k) for k in EVAL_FLAGS if getattr(a, k, None) is not None}
        keep = getattr(a, "store", True)
        runs = []
        for m in models:
            print(f"tinkerlm: evaluating {m} on {', '.join(tasks)} ...", file=sys.stderr, flush=True)
            runs.append(evaluate(m, tasks, progress=True, store=keep, reuse=keep, **opts))
        tasks = None  # every task evaluated, under the names the results give them
    results = compare_runs(runs, tasks=tasks, n_boot=a.n_boot, seed=a.boot_seed)
    record = report(results, runs)
    if a.out:
        write_json(a.out, record, ensure_ascii=False)
    if a.plot:
        plot(results, a.plot)
    if a.json:
        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        print(format_comparison(results))
    for what, path in (("comparison", a.out), ("plot", a.plot)):
        if path:
            print(f"wrote the {what} to {path}", file=sys.stderr)
