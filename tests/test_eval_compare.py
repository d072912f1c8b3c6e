"""`tinkerlm compare` and the playground's Results view: runs paired by item id (known answers, shuffled order,
mismatch errors, lower-is-better verdicts), the terminal table and PNG, the CLI on saved results and on the real
default model, and the stored scores served at /v1/tinkerlm/evaluations and drawn in a real headless Chromium."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tinkerlm.errors import TinkerError
from tinkerlm.evaluate import stats
from tinkerlm.evaluate.compare import compare_runs, format_comparison, plot

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
SHOT = os.environ.get("TINKERLM_TEST_SCREENSHOT")  # where to keep the Results view's screenshot (to look at it)


def mc_run(ref: str, acc, acc_norm=None, *, task: str = "arc_easy", shuffle: bool = False, **settings) -> dict:
    """A multiple-choice run in the results format, item ids q0, q1, ... (in another order with shuffle)."""
    acc_norm = acc if acc_norm is None else acc_norm
    items = [
        {"id": f"q{i}", "gold": 0, "acc": int(a), "acc_norm": int(n)} for i, (a, n) in enumerate(zip(acc, acc_norm))
    ]
    if shuffle:
        random.Random(7).shuffle(items)
    s = {"limit": None, "shots": 0, "chat": False, "batch_size": 16, "seed": 1234, **settings}
    metrics = {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}
    task_ = {"kind": "multiple_choice", "shots": s["shots"], "n": len(items), "main": "acc", "higher_is_better": True}
    return {
        "format": "tinkerlm-eval/1",
        "model": {"ref": ref, "sha256": None, "quant": "native"},
        "settings": s,
        "tasks": {task: {**task_, "metrics": metrics, "items": items}},
    }


def ppl_run(ref: str, nll, tokens) -> dict:
    items = [{"id": f"w{i}", "nll": float(x), "tokens": int(t)} for i, (x, t) in enumerate(zip(nll, tokens))]
    task = {"kind": "perplexity", "shots": 0, "n": len(items), "main": "ppl", "higher_is_better": False}
    metrics = {"ppl": float(np.exp(np.sum(nll) / np.sum(tokens)))}
    return {
        "format": "tinkerlm-eval/1",
        "model": {"ref": ref, "sha256": None, "quant": "native"},
        "settings": {"limit": None, "shots": 0, "chat": False, "batch_size": 16, "seed": 1234},
        "tasks": {"wikitext": {**task, "metrics": metrics, "items": items}},
    }


def outcomes(b01: int, b10: int, both_right: int, both_wrong: int):
    a = [0] * b01 + [1] * b10 + [1] * both_right + [0] * both_wrong
    b = [1] * b01 + [0] * b10 + [1] * both_right + [0] * both_wrong
    return a, b


# ---------------------------------------------------------------------------------------------------------------
# Known answers


def test_identical_runs_differ_by_nothing():
    rng = np.random.default_rng(0)
    acc = rng.integers(0, 2, 120)
    res = compare_runs([mc_run("m:1", acc), mc_run("m:1", acc)], n_boot=500)
    assert [(r["task"], r["metric"], r["main"]) for r in res] == [
        ("arc_easy", "acc", True),
        ("arc_easy", "acc_norm", False),
    ]
    for r in res:
        assert r["name_a"] == "m:1" and r["name_b"] == "m:1 #2"
        assert r["diff"] == 0 and r["ci"] == (0.0, 0.0) and r["p"] == 1.0 and r["p_holm"] == 1.0
        assert r["verdict"] == "no significant difference"
        assert r["summary"].startswith("no significant difference between m:1 #2 and m:1 on arc_easy")


def test_known_mcnemar_counts_and_answer():
    # 40 items only B gets right, 10 only A: B - A = 30/500 = 6 points; McNemar chi-square (|40-10|-1)^2/50 = 16.82
    a, b = outcomes(b01=40, b10=10, both_right=300, both_wrong=150)
    res = compare_runs([mc_run("a:x", a), mc_run("b:x", b, shuffle=True)], n_boot=2000)
    r = res[0]
    assert r["mcnemar"]["b01"] == 40 and r["mcnemar"]["b10"] == 10 and r["mcnemar"]["method"] == "chi2"
    assert r["mcnemar"]["statistic"] == pytest.approx(29**2 / 50)
    assert r["p"] == pytest.approx(4.108e-5, rel=1e-3)  # scipy.stats.chi2.sf(16.82, 1)
    assert r["mean_a"] == pytest.approx(62.0) and r["mean_b"] == pytest.approx(68.0) and r["diff"] == pytest.approx(6.0)
    assert 3.0 < r["ci"][0] < 6.0 < r["ci"][1] < 9.0
    assert r["verdict"] == "better"
    assert r["summary"].startswith("b:x is better than a:x on arc_easy by 6.0 points (95% CI ")
    # the same pairs given in the baseline's order give the very same numbers: pairing is by id, not position
    same = compare_runs([mc_run("a:x", a), mc_run("b:x", b)], n_boot=2000)[0]
    assert {k: same[k] for k in ("diff", "ci", "p", "se")} == {k: r[k] for k in ("diff", "ci", "p", "se")}
    # the other way round: worse, by the same amount
    back = compare_runs([mc_run("b:x", b), mc_run("a:x", a)], n_boot=2000)[0]
    assert back["verdict"] == "worse" and back["summary"].startswith("a:x is worse than b:x on arc_easy by 6.0 points")


def test_shuffled_pairing_equals_positional_pairing():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    by_id = compare_runs([mc_run("a:x", a), mc_run("b:x", b, shuffle=True)], n_boot=1000)[0]
    direct = stats.compare(a, b, n_boot=1000, seed=0)
    assert by_id["diff"] == pytest.approx(direct["diff"]) and by_id["ci"] == direct["ci"] and by_id["p"] == direct["p"]


def test_holm_over_several_models():
    a, b = outcomes(b01=12, b10=2, both_right=100, both_wrong=86)
    c = list(a)
    res = compare_runs([mc_run("a:x", a), mc_run("b:x", b), mc_run("c:x", c)], n_boot=500)
    acc = [r for r in res if r["metric"] == "acc"]
    assert stats.holm([r["p"] for r in acc]) == [r["p_holm"] for r in acc]
    assert acc[0]["p_holm"] == pytest.approx(min(1, 2 * acc[0]["p"]))


def test_lower_is_better_perplexity():
    rng = np.random.default_rng(1)
    tokens = rng.integers(200, 400, 30)
    nll_a = tokens * rng.uniform(2.9, 3.1, 30)
    nll_b = nll_a - tokens * 0.1  # B's loss is 0.1 nats per token lower everywhere: a lower (better) perplexity
    res = compare_runs([ppl_run("a:x", nll_a, tokens), ppl_run("b:x", nll_b, tokens)], n_boot=1000)
    (r,) = res
    ppl_a, ppl_b = np.exp(nll_a.sum() / tokens.sum()), np.exp(nll_b.sum() / tokens.sum())
    assert r["mean_a"] == pytest.approx(ppl_a) and r["mean_b"] == pytest.approx(ppl_b)
    assert r["diff"] < 0 and r["ci"][1] < 0 and r["p"] is None and r["higher_is_better"] is False
    assert r["verdict"] == "better" and r["units"] == "ppl"
    assert re.match(r"b:x is better than a:x on wikitext by \d+\.\d+ ppl \(95% CI \d", r["summary"])
    back = compare_runs([ppl_run("b:x", nll_b, tokens), ppl_run("a:x", nll_a, tokens)], n_boot=1000)[0]
    assert back["verdict"] == "worse" and back["summary"].startswith("a:x is worse than b:x on wikitext")
    same = compare_runs([ppl_run("a:x", nll_a, tokens), ppl_run("a:x", nll_a, tokens)], n_boot=200)[0]
    assert same["diff"] == 0 and same["verdict"] == "no significant difference"


def test_kl_is_token_weighted_and_lower_is_better():
    def kl_run(ref, kl, tokens):
        items = [{"id": f"kl:{i}", "kl": float(k), "tokens": int(t)} for i, (k, t) in enumerate(zip(kl, tokens))]
        metrics = {"kl_mean": float(np.sum(np.asarray(kl) * tokens) / np.sum(tokens))}
        task = {"kind": "kl", "shots": 0, "n": len(items), "main": "kl_mean", "higher_is_better": False}
        run = ppl_run(ref, [1.0], [1])
        run["tasks"] = {"kl": {**task, "metrics": metrics, "items": items}}
        return run

    tokens = np.array([100, 300, 50, 200] * 5)
    kl_a = np.array([0.02, 0.01, 0.05, 0.03] * 5)
    res = compare_runs([kl_run("q8:x", kl_a, tokens), kl_run("q4:x", kl_a * 3, tokens)], n_boot=500)
    (r,) = res
    assert r["mean_a"] == pytest.approx(float(np.sum(kl_a * tokens) / tokens.sum()))  # the run's own kl_mean
    assert r["mean_b"] == pytest.approx(3 * r["mean_a"]) and r["units"] == "nats"
    assert r["verdict"] == "worse" and r["summary"].startswith("q4:x is worse than q8:x on kl by 0.0")
    a, b = kl_run("q8:x", kl_a, tokens), kl_run("q4:x", kl_a, tokens)
    a["tasks"]["kl"]["reference"], b["tasks"]["kl"]["reference"] = "f16:x", "bf16:x"
    with pytest.raises(
        TinkerError, match="kl: the runs differ in reference model: q8:x has 'f16:x', q4:x has 'bf16:x'"
    ):
        compare_runs([a, b], n_boot=100)


# ---------------------------------------------------------------------------------------------------------------
# Mismatches


@pytest.mark.parametrize(
    "other,match",
    [
        (mc_run("b:x", [1, 0, 1], limit=3), r"arc_easy: the runs differ in limit: a:x has None, b:x has 3; .*--limit"),
        (mc_run("b:x", [1, 0, 1, 1], shots=5), r"arc_easy: the runs differ in shots: a:x has 0, b:x has 5; .*--shots"),
        (mc_run("b:x", [1, 0, 1, 1], chat=True), r"differ in chat: a:x has False, b:x has True"),
        (
            mc_run("b:x", [1, 0, 1]),
            r"arc_easy: a:x has 4 items, b:x has 3, and they are not the same items \(e.g. 'q3'\)",
        ),
        (mc_run("b:x", [1, 0, 1, 1], task="piqa"), r"arc_easy: not in the results of b:x \(it has piqa\)"),
        ({"format": "other"}, r"b:x: format is 'other', not 'tinkerlm-eval/1'"),
    ],
)
def test_mismatched_runs_are_refused_in_one_line(other, match):
    base = mc_run("a:x", [1, 0, 1, 1])
    with pytest.raises(TinkerError, match=match) as e:
        compare_runs([base, other], tasks=["arc_easy"], names=["a:x", "b:x"], n_boot=100)
    assert "\n" not in str(e.value)


def test_seed_matters_only_with_few_shot_prompts():
    acc = [1, 0, 1, 1]
    compare_runs([mc_run("a:x", acc), mc_run("b:x", acc, seed=1)], n_boot=100)  # zero-shot: the seed draws nothing
    with pytest.raises(TinkerError, match="differ in seed: a:x has 1234, b:x has 1"):
        compare_runs([mc_run("a:x", acc, shots=3), mc_run("b:x", acc, shots=3, seed=1)], n_boot=100)
    with pytest.raises(TinkerError, match="no task"):
        compare_runs([mc_run("a:x", acc), mc_run("b:x", acc, task="piqa")], n_boot=100)
    with pytest.raises(TinkerError, match="at least two"):
        compare_runs([mc_run("a:x", acc)])
    bad = mc_run("b:x", acc)
    del bad["tasks"]["arc_easy"]["items"][2]["acc"]
    with pytest.raises(TinkerError, match="item 'q2' of b:x has no 'acc' score"):
        compare_runs([mc_run("a:x", acc), bad], n_boot=100)


# ---------------------------------------------------------------------------------------------------------------
# Reports


def test_terminal_table_and_png(tmp_path):
    a, b = outcomes(b01=40, b10=10, both_right=300, both_wrong=150)
    rng = np.random.default_rng(2)
    tokens = rng.integers(200, 400, 20)
    nll = tokens * 3.0
    runs = [mc_run("base:x", a), mc_run("tuned:x", b), mc_run("base:x", a)]
    for run, x in zip(runs, (nll, nll - tokens * 0.2, nll)):
        run["tasks"].update(ppl_run("", x, tokens)["tasks"])
    res = compare_runs(runs, n_boot=500)
    text = format_comparison(res, width=100)
    assert "arc_easy: acc in points (higher is better), 500 items paired by id" in text
    assert "wikitext: ppl (lower is better), 20 items paired by id" in text
    lines = text.splitlines()
    row = next(ln for ln in lines if ln.startswith("  tuned:x ") and "better" in ln)
    assert re.search(r"tuned:x\s+68\.0\s+\S+\s+\+6\.0\s+\S+\s+< 0\.001\s+better$", row)
    assert re.search(r"base:x #2\s+62\.0\s+\S+\s+\+0\.0\s+0\.0–0\.0\s+1\.00\s+no significant difference$", text, re.M)
    assert any(ln.startswith("  base:x ") and "(baseline)" in ln for ln in lines)
    bars = [ln for ln in lines if "█" in ln and "[" in ln]
    assert len(bars) == 9 and all(len(ln) <= 100 for ln in lines if "█" in ln)
    assert "Summary:" in text and "  tuned:x is better than base:x on arc_easy by 6.0 points (95% CI " in text
    assert "tuned:x is better than base:x on wikitext by " in text
    out = plot(res, tmp_path / "cmp.png")
    assert out.read_bytes()[:8] == PNG
    many = compare_runs([mc_run(f"m{i}:x", a if i % 2 else b) for i in range(12)], n_boot=200)
    assert plot(many, tmp_path / "many.png").read_bytes()[:8] == PNG


# ---------------------------------------------------------------------------------------------------------------
# The CLI on saved results


def cli(capsys, *args) -> tuple[int, str, str]:
    """`tinkerlm ARGS` in this process: (exit status, stdout, stderr)."""
    from tinkerlm.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_results_files_end_to_end(tmp_path, capsys):
    a, b = outcomes(b01=40, b10=10, both_right=300, both_wrong=150)
    fa, fb, fc = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    fa.write_text(json.dumps(mc_run("base:x", a)))
    fb.write_text(json.dumps(mc_run("tuned:x", b, shuffle=True)))
    fc.write_text(json.dumps(mc_run("short:x", b[:100], limit=100)))
    png, out = tmp_path / "cmp.png", tmp_path / "cmp.json"
    rc, stdout, stderr = cli(
        capsys, "compare", "--results", str(fa), str(fb), "--plot", str(png), "--out", str(out), "--n-boot", "1000"
    )
    assert rc == 0, stderr
    assert "tuned:x is better than base:x on arc_easy by 6.0 points" in stdout
    assert png.read_bytes()[:8] == PNG
    record = json.loads(out.read_text())
    assert record["format"] == "tinkerlm-compare/1" and [m["ref"] for m in record["models"]] == ["base:x", "tuned:x"]
    assert record["comparisons"][0]["mcnemar"]["b01"] == 40 and len(record["summary"]) == 2
    for args, message in [
        (["--results", str(fa), str(fc)], "arc_easy: the runs differ in limit: base:x has None, short:x has 100"),
        (["--results", str(fa), str(tmp_path / "none.json")], "none.json: cannot read it"),
        (["--results", str(fa), str(fa), "--limit", "3"], "--limit applies when models are evaluated"),
        (["--results", str(fa), str(fa), "--threads", "1"], "--threads applies when models are evaluated"),
        (["--results", str(fa)], "at least two --results files"),
        (["--results", str(fa), str(fb), "--tasks", "piqa"], "piqa: not in the results of base:x"),
        (["smollm2"], "at least two models"),
        (["a", "b"], "--tasks is needed"),
    ]:
        rc, stdout, stderr = cli(capsys, "compare", *args)
        assert rc == 2, (args, stdout, stderr)
        assert message in stderr and stderr.count("\n") == 1, (args, stderr)
    (tmp_path / "bad.json").write_text("{not json")
    rc, _, stderr = cli(capsys, "compare", "--results", str(fa), str(tmp_path / "bad.json"))
    assert rc == 2 and "bad.json: not a JSON file" in stderr


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom tinkerlm.cli import main\ntry:\n    main(['compare', '--help'])\n"
        "except SystemExit as e:\n    assert e.code == 0\nassert 'torch' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--results" in r.stdout and "(default: 10000)" in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# The playground's Results view: stored scores at /v1/tinkerlm/evaluations, a table and side-by-side charts


def scores(acc: float, piqa: float, ppl: float, n: int = 40) -> dict:
    common = {"n": n, "shots": 0, "limit": None, "chat": False, "seed": 1234, "quant": "native"}
    common |= {"created": "2026-12-01T12:00:00Z", "tinkerlm": "0.1.0"}
    mc = {"main": "acc", "higher_is_better": True, **common}
    return {
        "arc_easy": {"metrics": {"acc": acc, "acc_stderr": 0.05, "acc_norm": acc - 0.02}, **mc},
        "piqa": {"metrics": {"acc": piqa, "acc_stderr": 0.04}, **mc},
        "perplexity": {"metrics": {"ppl": ppl, "nll": float(np.log(ppl))}, "main": "ppl", "higher_is_better": False}
        | common,
    }


def keep_scores(ref: str, evaluations: dict) -> None:
    """Write scores into a stored model's manifest as `tinkerlm eval` does (by hand: no model is evaluated)."""
    from tinkerlm import store

    m = store.get(ref)
    path = store.home() / "models" / m.name / m.tag / store.MANIFEST
    data = json.loads(path.read_text())
    data["evaluations"] = {**data.get("evaluations", {}), **evaluations}
    path.write_text(json.dumps(data))


@pytest.fixture
def served(tmp_path):
    """A tiny model served from the store with stored scores, another stored with scores, a third without."""
    from test_serve import live_server
    from tiny import make_hf_model

    import tinkerlm
    from tinkerlm import store

    make_hf_model("llama", tmp_path / "llama")
    for name in ("tiny-a", "tiny-b", "tiny-c"):
        store.pull(str(tmp_path / "llama"), name=name, progress=False)
    keep_scores("tiny-a", scores(0.50, 0.60, 25.0))
    keep_scores("tiny-b", scores(0.62, 0.58, 21.5))
    llm = tinkerlm.load("tiny-a")
    with live_server({"tiny-a": llm}, max_batch=1, api_key="k") as (base, _):
        yield base


def test_evaluations_endpoint_reads_the_store(served):
    auth = {"Authorization": "Bearer k"}
    assert httpx.get(served + "/v1/tinkerlm/evaluations").status_code == 401
    body = httpx.get(served + "/v1/tinkerlm/evaluations", headers=auth).json()
    assert body["object"] == "list"
    assert [(m["id"], m["ref"], m["served"]) for m in body["data"]] == [
        ("tiny-a", "tiny-a:latest", True),
        ("tiny-b:latest", "tiny-b:latest", False),
    ]  # tiny-c has no scores
    a = body["data"][0]
    assert a["evaluations"]["arc_easy"]["metrics"]["acc"] == 0.5 and a["sha256"] and a["architecture"] == "llama"
    assert set(a["evaluations"]) == {"arc_easy", "piqa", "perplexity"}
    # scores stored while the server runs show at the next request
    keep_scores("tiny-a", {"boolq": scores(0.7, 0, 1)["arc_easy"]})
    body = httpx.get(served + "/v1/tinkerlm/evaluations", headers=auth).json()
    assert body["data"][0]["evaluations"]["boolq"]["metrics"]["acc"] == 0.7
    assert (
        httpx.get(served + "/v1/tinkerlm/evaluations", headers=auth | {"Origin": "http://evil.test"}).status_code == 403
    )


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium")
def test_results_view_in_the_browser(served, tmp_path):
    from playwright.sync_api import sync_playwright
    from test_serve_playground import ARGS, CHROMIUM

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # the page's first /v1/models call has no key yet (401); a browser asks for /favicon.ico (404)
            page.on(
                "response",
                lambda r: (
                    errors.append(f"{r.status} {r.url}")
                    if r.status >= 400 and r.status != 401 and not r.url.endswith("/favicon.ico")
                    else None
                ),
            )
            page.goto(served + "/")
            page.fill("#apikey", "k")
            page.dispatch_event("#apikey", "change")
            page.wait_for_function("document.querySelector('#model').options.length > 0")
            assert page.is_hidden("#results")
            page.click("#tab-results")
            page.wait_for_selector("#scores tbody tr[data-task]")
            assert page.is_hidden("#chatview") and page.is_visible("#results")
            rows = page.eval_on_selector_all(
                "#scores tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))"
            )
            assert [r[:7] for r in rows] == [
                ["arc_easy", "acc", "50.0", "± 9.8", "40", "0", "all"],
                ["perplexity", "ppl (lower is better)", "25.00", "", "40", "0", "all"],
                ["piqa", "acc", "60.0", "± 7.8", "40", "0", "all"],
            ]
            assert page.text_content("#scores-title") == "Stored scores of tiny-a (tiny-a:latest)"
            # both stored models with scores are charted side by side: accuracies in one chart, perplexity apart
            page.wait_for_selector("#charts .chart svg")
            charts = page.eval_on_selector_all("#charts .chart", "cs => cs.map(c => c.dataset.tasks)")
            assert charts == ["arc_easy,piqa", "perplexity"]
            bars = page.eval_on_selector_all(
                "rect.bar", "bs => bs.map(b => [b.dataset.model, b.dataset.task, b.dataset.score])"
            )
            assert sorted(bars) == sorted(
                [
                    ["tiny-a", "arc_easy", "50.0"],
                    ["tiny-b:latest", "arc_easy", "62.0"],
                    ["tiny-a", "piqa", "60.0"],
                    ["tiny-b:latest", "piqa", "58.0"],
                    ["tiny-a", "perplexity", "25.00"],
                    ["tiny-b:latest", "perplexity", "21.50"],
                ]
            )
            heights = {tuple(b[:2]): b[2] for b in page.eval_on_selector_all(
                "rect.bar", "bs => bs.map(b => [b.dataset.model, b.dataset.task, +b.getAttribute('height')])"
            )}  # fmt: skip
            assert heights[("tiny-b:latest", "arc_easy")] > heights[("tiny-a", "arc_easy")] > 0
            assert page.text_content(".legend") == "tiny-atiny-b:latest"
            page.screenshot(path=str(SHOT or tmp_path / "results.png"))
            # unticking a model takes it out of the charts
            page.uncheck("#pick input[value='tiny-b:latest']")
            assert page.eval_on_selector_all("rect.bar", "bs => bs.length") == 3
            page.click("#tab-chat")
            assert page.is_visible("#chatview") and page.is_hidden("#results")
            assert not errors, errors
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------------------------
# The real default model, end to end


def test_compare_smollm2_with_itself(smollm2_gguf, tmp_path, capsys):
    from tinkerlm import store

    store.pull(str(smollm2_gguf), name="smollm2:135m-instruct-q4_1", progress=False)
    out = tmp_path / "cmp.json"
    args = [
        "compare",
        "smollm2",
        "smollm2",
        "--tasks",
        "arc_easy",
        "--limit",
        "8",
        "--out",
        str(out),
        "--n-boot",
        "500",
    ]
    rc, stdout, stderr = cli(capsys, *args)
    assert rc == 0, stderr
    assert "arc_easy: acc in points (higher is better), 8 items paired by id" in stdout
    assert (
        "no significant difference between smollm2:135m-instruct-q4_1 #2 and smollm2:135m-instruct-q4_1 on " in stdout
    )
    record = json.loads(out.read_text())
    for r in record["comparisons"]:
        assert r["n"] == 8 and r["diff"] == 0 and r["p"] == 1.0 and r["verdict"] == "no significant difference"
    assert record["models"][0]["sha256"] == store.digest(store.get("smollm2"))
    # the run kept its scores in the manifest, where the playground finds them
    kept = store.get("smollm2").evaluations["arc_easy"]
    assert (
        kept["limit"] == 8
        and kept["n"] == 8
        and kept["metrics"]["acc"] == pytest.approx(record["comparisons"][0]["mean_a"] / 100)
    )


def test_compare_a_model_with_its_quantized_export(tmp_path, capsys):
    """Store model against its Q4_0 child, on a user task and perplexity: the CLI end to end on tiny models."""
    from tiny import make_hf_model

    from tinkerlm import store
    from tinkerlm.export import quantize

    make_hf_model("llama", tmp_path / "llama")
    store.pull(str(tmp_path / "llama"), name="base", progress=False)
    quantize("base", type="q4_0", out="base-q4", verify=False, progress=False)
    task = tmp_path / "colours.jsonl"
    rows = [{"context": f"Colour {i}:", "choices": ["red", "green", "blue"], "gold": i % 3} for i in range(12)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "cmp.png"
    rc, stdout, stderr = cli(
        capsys, "compare", "base", "base-q4", "--tasks", f"{task},perplexity", "--limit", "2", "--plot", str(png),
        "--n-boot", "300",
    )  # fmt: skip
    assert rc == 0, stderr
    assert "colours: acc in points (higher is better), 2 items paired by id" in stdout
    assert "perplexity: ppl (lower is better), 2 items paired by id" in stdout
    assert re.search(r"base-q4:latest (is (better|worse) than|and) base:latest", stdout)
    assert png.read_bytes()[:8] == PNG
    rc, _, stderr = cli(capsys, "compare", "base", "nothere", "--tasks", str(task), "--limit", "2")
    assert rc == 2 and "nothere" in stderr and stderr.count("\n") == 1
