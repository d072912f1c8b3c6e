"""Generation tasks: JSONL generation lines (chat and text), their scoring rules, and `score_generation`.

The SmolLM2 test checks that score_generation answers and scores the skills eval files exactly as
examples/skills/score.py does; the rest runs on tiny random models or without a model.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tinkerlm.errors import TinkerError
from tinkerlm.evaluate import generation
from tinkerlm.evaluate.generation import judge, records, same, score_generation
from tinkerlm.evaluate.tasks import GenerationItem, load_task

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"


def write(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


# -- parsing -------------------------------------------------------------------------------------------------------
def test_chat_lines_as_the_skills_files():
    task = load_task(str(DATA / "dates" / "eval.jsonl"))
    assert task.kind == "generate" and task.main == "exact" and len(task.items) == 100
    first = task.items[0]
    assert first.id == "eval:1" and first.reference == "1986-09-20" and first.prompt is None
    assert first.messages == ({"role": "user", "content": "Normalize to YYYY-MM-DD: Sep 20th, 1986"},)
    assert first.scoring == "exact" and first.max_tokens is None and first.stop == ()
    assert task.generation_input(first) == list(first.messages)
    assert len(load_task(str(DATA / "contacts" / "eval.jsonl"), limit=3).items) == 3


def test_text_lines_defaults_and_overrides(tmp_path):
    path = write(
        tmp_path / "sums.jsonl",
        [
            {"defaults": {"scoring": "regex", "pattern": r"\d+", "max_tokens": 8, "stop": "\n"}},
            {"prompt": "Q: 2+2?\nA:", "reference": " 4 ", "id": "two", "topic": "sums"},
            {"prompt": "Q: 3+3?\nA:"},  # regex lines need no reference
            {"prompt": "Q: name?\nA:", "reference": "Ada", "scoring": "exact", "max_tokens": 3},
            {"prompt": "Q: json?\nA:", "reference": '{"a": {"b": [1, 2]}}', "scoring": "json_field", "field": "a.b.1"},
        ],
    )
    task = load_task(path)
    a, b, c, d = task.items
    assert (a.id, a.reference, a.scoring, a.pattern, a.max_tokens, a.stop) == ("two", "4", "regex", r"\d+", 8, ("\n",))
    assert a.metadata == {"topic": "sums"} and a.messages is None
    assert (b.id, b.reference, b.scoring) == ("sums:3", "", "regex")
    assert (c.scoring, c.pattern, c.max_tokens) == ("exact", None, 3)
    assert (d.scoring, d.field_path, d.pattern) == ("json_field", ("a", "b", 1), None)
    assert task.generation_input(a) == "Q: 2+2?\nA:"
    fields = load_task(write(tmp_path / "f.jsonl", [{"prompt": "p", "reference": "[[1]]", "scoring": "json_field",
                                                     "field": [0, 0]}]))  # fmt: skip
    assert fields.items[0].field_path == (0, 0)


def test_fewshot_generation(tmp_path):
    lines = [{"prompt": f"Q: {i}+1?\nA:", "reference": str(i + 1)} for i in range(5)]
    task = load_task(write(tmp_path / "t.jsonl", lines), shots=2, seed=3)
    for it in task.items:
        prefix = task.generation_input(it).removesuffix(it.prompt)
        assert prefix.count("\n\n") == 2 and f"{it.prompt} {it.reference}" not in prefix
        assert prefix.endswith("\n\n") and "\nA: " in prefix  # "prompt reference": a space after "A:"
    assert [task.generation_input(it) for it in task.items] == [
        load_task(str(tmp_path / "t.jsonl"), shots=2, seed=3).generation_input(it) for it in task.items
    ]

    chats = [chat(f"q{i}", f"a{i}") for i in range(4)]
    chats[0]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    task = load_task(write(tmp_path / "c.jsonl", chats), shots=1, seed=0)
    for it in task.items:
        given = task.generation_input(it)
        assert given[-1] == it.messages[-1] and len([m for m in given if m["role"] == "assistant"]) == 1
        assert [m["role"] for m in given][-3:] == ["user", "assistant", "user"]
        assert given[1]["content"] != it.messages[-1]["content"]  # the example is never the item itself
        assert (given[0]["role"] == "system") == (it.id == "c:1")  # only the item's own system message, first


TEXT = {"prompt": "p", "reference": "r"}
BAD = [
    (chat("q", "a"), '{"context": "c", "choices": ["a", "b"], "gold": 0}', "a multiple-choice line in a file of chat"),
    (chat("q", "a"), '{"prompt": "p", "reference": "r"}', "a text line in a file of chat lines"),
    (TEXT, '{"prompt": "p", "messages": []}', "both messages and prompt"),
    (chat("q", "a"), '{"question": "q"}', "none of context, messages, prompt"),
    (TEXT, '{"prompt": "p", "reference": "r", "scoring": "regex", "pattern": "(a"}', "bad regular expr"),
    (TEXT, '{"prompt": "p", "reference": "r", "scoring": "regex"}', 'needs a "pattern"'),
    (TEXT, '{"prompt": "p", "reference": "r", "scoring": "fuzzy"}', '"scoring" must be one of'),
    (TEXT, '{"prompt": "p", "reference": "not json", "scoring": "json"}', "needs a JSON reference"),
    (TEXT, '{"prompt": "p", "reference": "{}", "scoring": "json_field"}', 'needs a "field"'),
    (TEXT, '{"prompt": "p", "reference": "{}", "scoring": "json_field", "field": "a"}', 'no field "a"'),
    (TEXT, '{"prompt": "p", "reference": "r", "max_tokens": 0}', '"max_tokens" must be a positive'),
    (TEXT, '{"prompt": "p", "reference": "r", "stop": [""]}', '"stop" must be'),
    (TEXT, '{"prompt": "p"}', '"reference" must be a string'),
    (TEXT, '{"prompt": ""}', '"prompt" must be a non-empty string'),
    (chat("q", "a"), '{"messages": [{"role": "user", "content": "q"}]}', "at least 2"),
    (chat("q", "a"), '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}', "last"),
    (chat("q", "a"), '{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}', 'string "role"'),
    (chat("q", "a"), '{"defaults": {"scoring": "json"}}', "must be the first line"),
    ('{"defaults": {"scoring": "json", "bogus": 1}}', chat("q", "a"), "unknown default 'bogus'"),
    ('{"defaults": {"scoring": "exact"}}', '{"context": "c", "choices": ["a", "b"], "gold": 0}', "not multiple choice"),
]


@pytest.mark.parametrize("first, bad, message", BAD)
def test_bad_lines_name_file_and_line(tmp_path, first, bad, message):
    path = write(tmp_path / "bad.jsonl", [first, "", bad])
    with pytest.raises(TinkerError, match=message) as e:
        load_task(path)
    line = 1 if message.startswith("unknown default") else 3  # the bad defaults line is the first
    assert f"{path}:{line}:" in str(e.value) and "\n" not in str(e.value)


# -- scoring -------------------------------------------------------------------------------------------------------
def item(reference: str, **kw) -> GenerationItem:
    return GenerationItem("x", reference, prompt="p", **kw)


def test_exact_rule():
    """The default rule's scores (those of examples/skills/score.py, which now scores through this module)."""
    ref = '{"name": "Maria Lopez", "age": 34, "city": "Madrid", "job": "nurse"}'
    pretty = json.dumps(json.loads(ref), indent=2)
    cases = [
        (" " + ref + "\n", ref, (1, 1, 1)),
        (pretty, ref, (0, 1, 1)),  # key order and spacing ignored by json, not by exact
        (f"Here it is:\n```json\n{pretty}\n```", ref, (0, 0, 1)),
        (ref.replace("34", '"34"'), ref, (0, 0, 0)),  # "34" is not 34
        ("x {bad} " + ref, ref, (0, 0, 1)),
        ("[1, 2]", "[1, 2]", (1, 1, 1)),
        ("[2, 1]", "[1, 2]", (0, 0, 0)),
        ("2021-03-14", "2021-03-14", (1, None, 1)),
        ("The date is 2021-03-14.", "2021-03-14", (0, None, 1)),
        ("2021-3-14", "2021-03-14", (0, None, 0)),
        ("", "42", (0, None, 0)),  # a JSON scalar reference is compared as text
        ("{", "{", (1, None, 1)),
    ]
    for output, reference, (exact, json_, found) in cases:
        assert judge(output, item(reference)) == {"exact": exact, "json": json_, "found": found}, (output, reference)


def test_rules():
    assert judge(" 2021-03-14\n", item("", scoring="regex", pattern=r"\d{4}-\d\d-\d\d")) == {
        "exact": 1,
        "json": None,
        "found": 1,
    }
    wrapped = judge("It is 2021-03-14.", item("2021-03-14", scoring="regex", pattern=r"\d{4}-\d\d-\d\d"))
    assert wrapped == {"exact": 0, "json": None, "found": 1}  # fullmatch for exact, search for found
    assert judge("It is 2021-03-14.", item("", scoring="regex", pattern=r"(?s).*\d{4}.*"))["exact"] == 1

    ref = '{"b": [1, {"c": true}], "a": "x"}'
    assert judge('{"a": "x", "b": [1, {"c": true}]}', item(ref, scoring="json")) == {"exact": 1, "json": 1, "found": 1}
    assert judge('{"a": "x", "b": [1, {"c": 1}]}', item(ref, scoring="json"))["exact"] == 0  # true is not 1
    assert judge('Sure: {"a": "x", "b": [1, {"c": true}]} ok', item(ref, scoring="json")) == {
        "exact": 0,
        "json": 0,
        "found": 1,
    }
    assert judge("42.0", item("42", scoring="json")) == {"exact": 1, "json": None, "found": 1}

    field = item('{"name": "Ada", "age": 36, "tags": ["x", "y"]}', scoring="json_field", field_path=("tags", 1))
    assert judge('{"tags": ["z", "y"], "name": "Bob"}', field) == {"exact": 1, "json": 0, "found": 1}
    assert judge('{"tags": ["y"]}', field)["exact"] == 0
    assert judge('["y"]', field)["exact"] == 0
    assert judge('Here: {"tags": [0, "y"]}.', field) == {"exact": 0, "json": 0, "found": 1}
    assert judge("not json", field) == {"exact": 0, "json": 0, "found": 0}

    assert same({"a": [1, 2.0]}, {"a": [1.0, 2]}) and not same(True, 1) and not same("1", 1) and not same([1], [1, 1])


def test_records_metrics(tmp_path):
    task = load_task(write(tmp_path / "r.jsonl", [{"prompt": f"p{i}", "reference": "yes"} for i in range(4)]))
    metrics, items = records(task, ["yes", " yes\n", "no", "yes, sure"])
    assert [r["exact"] for r in items] == [1, 1, 0, 0] and [r["found"] for r in items] == [1, 1, 0, 1]
    assert items[1] == {"id": "r:2", "output": "yes", "reference": "yes", "exact": 1, "json": None, "found": 1}
    assert metrics["exact"] == 0.5 and metrics["found"] == 0.75 and "json" not in metrics
    assert metrics["exact_stderr"] == pytest.approx((1 / 3) ** 0.5 / 2)  # sample sd 0.577 / sqrt(4)
    assert json.dumps(metrics) and json.dumps(items)


# -- score_generation ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_hf_model

    import tinkerlm

    path = tmp_path_factory.mktemp("tiny") / "m"
    make_hf_model("llama", path)
    return tinkerlm.load(str(path), threads=1)


def test_score_generation_known_answers(tiny_llm, tmp_path):
    """References that are the model's own greedy answers (the first n tokens) score 1, altered ones 0, at every
    batch size; chat and text lines both; records come back in file order."""
    from tinkerlm.generate import generate

    llm = tiny_llm
    texts = ["hello", "2+2=", "a longer prompt here", "x", "why", "ok then"]
    lines = []
    for i, text in enumerate(texts):
        n = 3 + i % 3
        own = generate(llm.model, llm.tokenizer, text, max_tokens=n).strip()
        lines.append({"prompt": text, "reference": own if i % 2 == 0 else "NOT" + own, "max_tokens": n, "id": text})
    path = write(tmp_path / "own.jsonl", lines)
    seen = []
    for batch_size in (1, 4, 16):
        metrics, items, main = score_generation(
            llm, load_task(path), batch_size=batch_size, progress=lambda done, n: seen.append((done, n))
        )
        assert main == "exact" and metrics["exact"] == 0.5
        assert [r["id"] for r in items] == texts and [r["exact"] for r in items] == [1, 0] * 3
    assert seen[-1] == (6, 6)

    chats = [chat(t, "") for t in texts[:3]]
    answers = [llm.chat([{"role": "user", "content": t}], max_tokens=4, temperature=0).strip() for t in texts[:3]]
    for c, a in zip(chats, answers):
        c["messages"][-1]["content"] = a
        c["max_tokens"] = 4
    metrics, items, _ = score_generation(llm, load_task(write(tmp_path / "chat.jsonl", chats)), batch_size=2)
    assert metrics["exact"] == 1.0 and [r["output"] for r in items] == answers


def test_score_generation_errors(tiny_llm, tmp_path):
    mc = write(tmp_path / "mc.jsonl", ['{"context": "c", "choices": ["a", "b"], "gold": 0}'])
    with pytest.raises(TinkerError, match="not a generation task"):
        score_generation(tiny_llm, load_task(mc), batch_size=1, progress=False)
    long = write(tmp_path / "long.jsonl", [{"prompt": "ok", "reference": "x"}, {"prompt": "x" * 500, "reference": "y"}])
    with pytest.raises(TinkerError, match=r"item long:2: its prompt is \d+ tokens, the model's context is 128"):
        score_generation(tiny_llm, load_task(long), batch_size=1, progress=False)
    assert generation.default_budget(tiny_llm.tokenizer, load_task(long).items) == 1 + generation.MARGIN
    regex = write(tmp_path / "re.jsonl", [{"prompt": "ok", "scoring": "regex", "pattern": "."}])
    assert generation.default_budget(tiny_llm.tokenizer, load_task(regex).items) == generation.NO_REFERENCE_BUDGET


def skills_answers(llm, chats: list, max_tokens: int, batch_size: int) -> list[str]:
    """examples/skills/score.py's answering loop as it was before it scored through tinkerlm.evaluate.generation,
    kept here as an independent check: the template rendered to text and encoded without BOS, prompts sorted by token
    length, batches of `batch_size`."""
    from tinkerlm.generate import SamplingParams, stream_generate

    prompts = [llm.tokenizer.encode(llm.apply_chat_template(m), add_special_tokens=False) for m in chats]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        for chunk in stream_generate(
            llm.model, llm.tokenizer, [prompts[i] for i in rows], max_tokens=max_tokens, sampling=SamplingParams()
        ):
            answers[rows[chunk.index]] += chunk.text
    return answers


def test_smollm2_equals_skills_score(smollm2_gguf, tmp_path):
    """score_generation gives the answers and numbers of examples/skills/score.py's original algorithm on the first
    lines of both skills files (its budget: the longest reference in tokens + 24; its scores through score.judge);
    the judge is then checked on those real answers against references that some of them equal or contain."""
    import tinkerlm

    spec = importlib.util.spec_from_file_location("skills_score_s", ROOT / "examples" / "skills" / "score.py")
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    llm = tinkerlm.load(str(smollm2_gguf))
    for skill, limit in (("dates", 3), ("contacts", 1)):  # contacts' answers are long: one keeps the test quick
        path = DATA / skill / "eval.jsonl"
        lines = [json.loads(x)["messages"] for x in path.read_text(encoding="utf-8").splitlines()[:limit]]
        chats, refs = [m[:-1] for m in lines], [m[-1]["content"].strip() for m in lines]
        budget = max(len(llm.tokenizer.encode(r, add_special_tokens=False)) for r in refs) + 24
        want = skills_answers(llm, chats, budget, batch_size=2)
        metrics, items, main = score_generation(llm, load_task(str(path), limit=limit), batch_size=2)
        assert main == "exact" and [r["output"] for r in items] == [a.strip() for a in want]
        assert [r["reference"] for r in items] == refs
        rows = [score.judge(a, r) for a, r in zip(want, refs)]
        for key, (hits, n) in score.summary(rows).items():
            assert metrics[key] == hits / n, key
        assert metrics["exact"] == sum(r["exact"] for r in rows) / len(rows)

        # The same answers against references that some of them equal or contain.
        answers = [r["output"] for r in items]
        refs = [a if i % 2 == 0 else a[: len(a) // 2] for i, a in enumerate(answers)]
        task = load_task(write(tmp_path / f"{skill}.jsonl", [chat("q", r) for r in refs]))
        _, again = records(task, answers)
        assert [r["exact"] for r in again] == [int(i % 2 == 0) for i in range(len(answers))]
        assert all(r["found"] for r in again)
