"""The DPO demonstration's pieces that need no model (examples/preference): the rules' scorer on hand-made answers,
the prompt sets (deterministic, committed files equal to the generator's output, train and held-out disjoint by
topic), the pairing of sampled answers, the Wilson interval and the preference accuracies."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "examples" / "preference"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


mp = _module("make_prompts")
sample = _module("sample")
evaluate = _module("evaluate")

WORDS3 = {"prompt": "Answer in at most 3 words: What is a kite?", "rule": "words", "limit": 3}
JSON_KEYS = {"prompt": "...", "rule": "json", "keys": ["name", "color"]}


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("A flying toy.", True),  # exactly the limit
        ("  A flying toy.\n", True),  # surrounding whitespace ignored
        ("Toy", True),
        ("A flying paper toy.", False),  # one over
        ("A\nflying\ttoy", True),  # any whitespace separates words
        ("A flying\n\ntoy, really", False),
        ("", False),  # an empty answer is no answer
        ("   \n", False),
        ("A-flying-paper-toy", True),  # hyphenated: one word
        ("A flying toy .", False),  # a lone mark counts as a word
    ],
)
def test_word_rule(answer, ok):
    assert mp.passes(WORDS3, answer) is ok


@pytest.mark.parametrize(
    "answer, ok",
    [
        ('{"name": "Frog", "color": "green"}', True),
        ('{"color": "green", "name": "Frog"}', True),  # key order free
        ('\n{\n  "name": "Frog",\n  "color": {"r": 0}\n}\n', True),  # any values
        ('```json\n{"name": "Frog", "color": "green"}\n```', True),  # one fence allowed
        ('```\n{"name": "Frog", "color": "green"}\n```', True),
        ('{"name": "Frog"}', False),  # a key missing
        ('{"name": "Frog", "color": "green", "size": 3}', False),  # an extra key
        ('{"name": "Frog", "color": "green"}\n```', False),  # a stray fence
        ('{"name": "Frog", "color": "green"}\nThis object describes a frog.', False),  # text after it
        ('Here it is: {"name": "Frog", "color": "green"}', False),
        ('[{"name": "Frog", "color": "green"}]', False),  # not an object
        ('{"name": "Frog", "color": "green",}', False),  # not JSON
        ("", False),
    ],
)
def test_json_rule(answer, ok):
    assert mp.passes(JSON_KEYS, answer) is ok


@pytest.mark.parametrize("rule", ["words", "json"])
def test_prompts_deterministic_unique_and_disjoint(rule):
    train, heldout = mp.make(rule, 160, 80)
    assert (train, heldout) == mp.make(rule, 160, 80)
    assert mp.make(rule, 160, 80, seed=mp.SEED + 1) != (train, heldout)
    assert len({x["prompt"] for x in train}) == 160 and len({x["prompt"] for x in heldout}) == 80
    train_topics, heldout_topics = mp.split_topics()
    assert not set(train_topics) & set(heldout_topics)
    assert {x["topic"] for x in train} <= set(train_topics)
    assert {x["topic"] for x in heldout} <= set(heldout_topics)
    # No held-out topic appears in the text of any train prompt (by word, so "a fox" is not found in "a foxglove").
    for t in heldout_topics:
        assert not any(f" {t}?" in x["prompt"] or f" {t}." in x["prompt"] for x in train), t
    for x in train + heldout:
        assert x["topic"] in x["prompt"]
        if rule == "words":
            assert x["limit"] in mp.WORD_LIMITS and f"at most {x['limit']} words" in x["prompt"]
        else:
            assert all(f'"{k}"' in x["prompt"] for k in x["keys"])


def test_committed_prompts_equal_generator():
    train, heldout = mp.make("words", mp.N_TRAIN, mp.N_HELDOUT)
    for name, lines in (("train_prompts.jsonl", train), ("heldout_prompts.jsonl", heldout)):
        got = [json.loads(x) for x in (HERE / "data" / name).read_text(encoding="utf-8").splitlines()]
        assert got == lines, name


def test_too_many_prompts_is_an_error():
    with pytest.raises(ValueError, match="distinct"):
        mp.make("json", 10, 1000)  # 30 held-out topics x 6 key sets


def test_pairs_every_passing_with_every_failing():
    rows = [
        {"i": 0, "prompt": "p0", "answer": "ok a", "pass": True},
        {"i": 0, "prompt": "p0", "answer": "bad a", "pass": False},
        {"i": 0, "prompt": "p0", "answer": "ok a", "pass": True},  # duplicate: dropped
        {"i": 0, "prompt": "p0", "answer": "ok b", "pass": True},
        {"i": 1, "prompt": "p1", "answer": "ok", "pass": True},  # all pass: no pair
        {"i": 2, "prompt": "p2", "answer": "bad x", "pass": False},
        {"i": 2, "prompt": "p2", "answer": "ok y", "pass": True},
        {"i": 2, "prompt": "p2", "answer": "ok z", "pass": True},
        {"i": 2, "prompt": "p2", "answer": "bad w", "pass": False},
    ]
    assert sample.pairs(rows) == [
        {"prompt": "p0", "chosen": "ok a", "rejected": "bad a"},
        {"prompt": "p0", "chosen": "ok b", "rejected": "bad a"},
        {"prompt": "p2", "chosen": "ok y", "rejected": "bad x"},
        {"prompt": "p2", "chosen": "ok y", "rejected": "bad w"},
        {"prompt": "p2", "chosen": "ok z", "rejected": "bad x"},
        {"prompt": "p2", "chosen": "ok z", "rejected": "bad w"},
    ]


def test_wilson_interval():
    assert sample.wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert sample.wilson(50, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)
    r = sample.pass_rate([{"pass": True}, {"pass": False}, {"pass": False}, {"pass": True}])
    assert (r["passed"], r["n"], r["rate"]) == (2, 4, 0.5)


def test_preference_accuracies():
    import torch

    lp = {
        "chosen": torch.tensor([-5.0, -20.0, -9.0]),
        "rejected": torch.tensor([-10.0, -10.0, -9.0]),  # a tie counts as wrong
        "chosen_len": torch.tensor([5, 10, 3]),
        "rejected_len": torch.tensor([20, 2, 9]),
    }
    base = {"chosen": torch.tensor([-6.0, -21.0, -9.0]), "rejected": torch.tensor([-9.0, -9.0, -10.0])}
    acc = evaluate.accuracies(lp, base)
    assert acc["n"] == 3
    assert acc["logp_sum"] == pytest.approx(1 / 3)
    assert acc["logp_mean"] == pytest.approx(1 / 3)  # per token: -1 < -0.5, -2 > -5, -3 < -1
    # log-ratio margins: (1 - -1) = 2, (1 - -1) = 2, (0 - 1) = -1
    assert acc["reward"] == pytest.approx(2 / 3)
    assert acc["mean_logratio_margin"] == pytest.approx(1.0)
