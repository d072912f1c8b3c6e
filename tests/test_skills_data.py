"""The fine-tuning skill datasets (examples/skills/make_datasets.py) and their scorer (examples/skills/score.py).

Data: deterministic, committed files equal to the generator's output, splits disjoint, every answer in its
documented shape and equal to what the user's text says (dates are parsed here independently of the generator).
Scorer: the judge's three scores, and batched scoring on a tiny model against answers known in advance.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ROOT / "examples" / "skills"
DATA = ROOT / "examples" / "data"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"skills_{name}", SKILLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


md = _module("make_datasets")
score = _module("score")


def read(skill: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / skill / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def user_and_answer(row: dict) -> tuple[str, str]:
    assert list(row) == ["messages"]
    user, answer = row["messages"]
    assert user["role"] == "user" and answer["role"] == "assistant"
    assert list(user) == ["role", "content"] and list(answer) == ["role", "content"]
    return user["content"], answer["content"]


@pytest.mark.parametrize("skill", ["dates", "contacts"])
def test_committed_files_equal_generator(skill):
    built = md.build(skill)
    for split in ("train", "eval"):
        assert (DATA / skill / f"{split}.jsonl").read_text(encoding="utf-8") == md.to_jsonl(built[split]), (
            f"examples/data/{skill}/{split}.jsonl is stale: run python examples/skills/make_datasets.py"
        )


@pytest.mark.parametrize("skill", ["dates", "contacts"])
def test_deterministic_and_seeded(skill):
    assert md.build(skill) == md.build(skill)
    assert md.build(skill, seed=1) != md.build(skill)


@pytest.mark.parametrize("skill", ["dates", "contacts"])
def test_sizes_and_disjoint_splits(skill):
    train, evals = (list(map(user_and_answer, read(skill, s))) for s in ("train", "eval"))
    assert (len(train), len(evals)) == (400, 100)
    for rows in (train, evals):  # no repeats inside a split either
        assert len({u for u, _ in rows}) == len(rows) and len({a for _, a in rows}) == len(rows)
    # Disjoint by content, not just by wording: no date / no person is in both splits.
    assert not {a for _, a in train} & {a for _, a in evals}
    assert not {u for u, _ in train} & {u for u, _ in evals}


# -- dates: an independent parser of the written forms ------------------------------------------------------------
MONTH_PREFIX = {
    m: i for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)
}
SMALL = (
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth "
    "fifteenth sixteenth seventeenth eighteenth nineteenth".split()
)
WORD_DAY = {w: i for i, w in enumerate(SMALL, 1)} | {"twentieth": 20, "thirtieth": 30}
WORD_DAY |= {f"{t}-{w}": base + i for t, base in (("twenty", 20), ("thirty", 30)) for i, w in enumerate(SMALL[:9], 1)}
WEEKDAY = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def parse_written_date(text: str) -> dt.date:
    """The one date a user message describes; asserts it is unambiguous (one month, one year, one day)."""
    t = text.lower().replace("iso 8601", "").replace("yyyy-mm-dd", "")
    months = re.findall(r"\b(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\b", t)
    years = re.findall(r"\b(1[89]\d\d|20\d\d)\b", t)
    assert len(months) == 1 and len(years) == 1, text
    rest = t.replace(years[0], " ")
    days = [int(d) for d in re.findall(r"\b(\d{1,2})(?:st|nd|rd|th)?\b", rest)]
    days += [n for w, n in WORD_DAY.items() if re.search(rf"(?<![a-z-]){w}(?![a-z-])", rest)]
    assert len(days) == 1, text
    date = dt.date(int(years[0]), MONTH_PREFIX[months[0]], days[0])
    named = [i for i, w in enumerate(WEEKDAY) if w in t]
    assert named in ([], [date.weekday()]), f"{text}: wrong weekday"
    return date


def test_parser_knows_the_forms():
    assert parse_written_date("Convert Sept. 9th, 2004 to ISO 8601.") == dt.date(2004, 9, 9)
    assert parse_written_date("the twenty-first of October 2010") == dt.date(2010, 10, 21)
    assert parse_written_date("2021, March 14") == dt.date(2021, 3, 14)
    assert parse_written_date("Sunday, March 14, 2021") == dt.date(2021, 3, 14)
    with pytest.raises(AssertionError):
        parse_written_date("Monday, March 14, 2021")


@pytest.mark.parametrize("split", ["train", "eval"])
def test_date_answers_are_iso_and_right(split):
    for row in read("dates", split):
        user, answer = user_and_answer(row)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer), answer
        assert dt.date.fromisoformat(answer) == parse_written_date(user), user


def test_dates_cover_every_form_and_hold_out_years():
    rows = [user_and_answer(r) for s in ("train", "eval") for r in read("dates", s)]
    assert len({u.split(":")[0] for u, _ in rows}) >= 5  # several instruction phrasings
    assert any("-" in u.split()[-1] and not u.endswith("YYYY-MM-DD.") for u, _ in rows)  # 14-Mar-2021
    assert any(re.search(r"twenty-|thirty-", u) for u, _ in rows)
    train_years = {a[:4] for _, a in map(user_and_answer, read("dates", "train"))}
    eval_years = [a[:4] for _, a in map(user_and_answer, read("dates", "eval"))]
    unseen = sum(y not in train_years for y in eval_years)
    assert 30 <= unseen <= 70  # about half of eval is in years never trained on


# -- contacts ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "eval"])
def test_contact_answers_have_the_fixed_shape(split):
    for row in read("contacts", split):
        user, answer = user_and_answer(row)
        obj = json.loads(answer)
        assert list(obj) == ["name", "age", "city", "job"], answer
        assert type(obj["age"]) is int and 18 <= obj["age"] <= 80
        assert all(isinstance(obj[k], str) and obj[k] for k in ("name", "city", "job"))
        assert answer == json.dumps(obj) and "\n" not in answer  # one line, default separators
        assert len(obj["name"].split()) == 2
        for value in (obj["name"], str(obj["age"]), obj["city"], obj["job"]):  # the answer is what the text says
            assert re.search(rf"(?<![\w-]){re.escape(value)}(?!\w)", user), (value, user)


def test_contacts_hold_out_values():
    train = [json.loads(user_and_answer(r)[1]) for r in read("contacts", "train")]
    evals = [json.loads(user_and_answer(r)[1]) for r in read("contacts", "eval")]
    seen = {k: {p[k] for p in train} for k in ("city", "job")}
    seen["first"] = {p["name"].split()[0] for p in train}
    seen["last"] = {p["name"].split()[1] for p in train}

    def unseen(p):
        first, last = p["name"].split()
        return [
            first not in seen["first"],
            last not in seen["last"],
            p["city"] not in seen["city"],
            p["job"] not in seen["job"],
        ]

    flags = [unseen(p) for p in evals]
    assert all(any(col) for col in zip(*flags))  # every field has values met only in eval
    assert sum(any(f) for f in flags) >= 80  # and most eval people have at least one


# -- scorer --------------------------------------------------------------------------------------------------------
def test_judge():
    ref = '{"name": "Maria Lopez", "age": 34, "city": "Madrid", "job": "nurse"}'
    assert score.judge(" " + ref + "\n", ref) == {"exact": True, "json": True, "found": True}
    pretty = json.dumps(json.loads(ref), indent=2)
    assert score.judge(pretty, ref) == {"exact": False, "json": True, "found": True}
    assert score.judge(f"Here it is:\n```json\n{pretty}\n```", ref) == {"exact": False, "json": False, "found": True}
    assert score.judge(ref.replace("34", '"34"'), ref) == {"exact": False, "json": False, "found": False}
    assert score.judge("2021-03-14", "2021-03-14") == {"exact": True, "json": None, "found": True}
    assert score.judge("The date is 2021-03-14.", "2021-03-14") == {"exact": False, "json": None, "found": True}
    assert score.judge("2021-3-14", "2021-03-14") == {"exact": False, "json": None, "found": False}


def test_exact_match_on_tiny_model(tmp_path):
    """Half the references are the model's own greedy answers: accuracy is exactly 0.5 at any batch size, and rows
    come back in file order."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_hf_model

    import tinkerlm

    make_hf_model("llama", tmp_path / "m")
    llm = tinkerlm.load(str(tmp_path / "m"), threads=1)
    questions = ["hi", "2+2?", "a longer question here", "x", "date?", "json please", "ok", "why"]
    chats = [[{"role": "user", "content": q}] for q in questions]
    answers = [llm.chat(c, max_tokens=6).strip() for c in chats]
    refs = [a if i % 2 == 0 else "NOT " + a for i, a in enumerate(answers)]
    path = tmp_path / "eval.jsonl"
    path.write_text(md.to_jsonl([{"messages": c + [{"role": "assistant", "content": r}]} for c, r in zip(chats, refs)]))
    for batch_size in (1, 3, 16):
        acc, rows = score.exact_match(llm, path, batch_size=batch_size, max_tokens=6)
        assert acc == 0.5
        assert [r["messages"][0]["content"] for r in rows] == questions
        assert [r["exact"] for r in rows] == [i % 2 == 0 for i in range(len(questions))]
    acc, rows = score.exact_match(llm, path, limit=3, max_tokens=6)
    assert len(rows) == 3 and acc == pytest.approx(2 / 3)
