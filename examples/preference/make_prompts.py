"""Deterministic prompt sets for the DPO demonstration, each prompt with a rule a program can check.

Two families (`--rule`), each a plain instruction over a question about a topic:
- words: "Answer in at most N words: What is a volcano?" (N in WORD_LIMITS); passes when the answer is non-empty
         and has at most N whitespace-separated words.
- json:  "Reply with only a JSON object with the keys "name" and "color", about a volcano." passes when the whole
         answer (surrounding whitespace and one ```json fence allowed) parses as a JSON object with exactly
         those keys.

Train and held-out prompts are disjoint by topic: no held-out topic occurs in any train prompt, so held-out pass
rates measure the rule learnt, not the questions remembered. The output is a pure function of SEED.

    python examples/preference/make_prompts.py --rule words   # writes examples/preference/data/{train,heldout}_prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SEED = 19
N_TRAIN, N_HELDOUT = 64, 40  # small: sampling on a shared 2-core CPU is the slow part of the demo
HERE = Path(__file__).resolve().parent
OUT = HERE / "data"

TOPICS = [
    "a volcano",
    "a bicycle",
    "photosynthesis",
    "the moon",
    "a rainbow",
    "a library",
    "gravity",
    "a honeybee",
    "the ocean",
    "a thunderstorm",
    "a piano",
    "a glacier",
    "electricity",
    "a desert",
    "a lighthouse",
    "a compass",
    "bread",
    "a spider web",
    "the heart",
    "a telescope",
    "a river",
    "snow",
    "a battery",
    "a windmill",
    "coffee",
    "a castle",
    "an earthquake",
    "a penguin",
    "a map",
    "chess",
    "a bridge",
    "the sun",
    "a vaccine",
    "a forest",
    "a clock",
    "a submarine",
    "a tornado",
    "cheese",
    "a camera",
    "a kite",
    "the internet",
    "a coral reef",
    "a candle",
    "an owl",
    "a magnet",
    "a cactus",
    "a train",
    "a dictionary",
    "a hurricane",
    "an elephant",
    "a microwave oven",
    "a guitar",
    "a mushroom",
    "a satellite",
    "a whale",
    "soap",
    "a passport",
    "a dam",
    "a rocket",
    "a violin",
    "a tooth",
    "a thermometer",
    "a parachute",
    "tea",
    "a beehive",
    "a shark",
    "a lake",
    "a comet",
    "an umbrella",
    "a fossil",
    "a snail",
    "a printer",
    "rice",
    "a museum",
    "a cloud",
    "a lemon",
    "an airport",
    "a pyramid",
    "a frog",
    "a helmet",
    "a bakery",
    "a wolf",
    "a marathon",
    "an island",
    "a mirror",
    "a recipe",
    "a hospital",
    "a bee sting",
    "a calendar",
    "a tiger",
    "a keyboard",
    "a pencil",
    "a ladder",
    "the wind",
    "a garden",
    "a dolphin",
    "a tent",
    "a shoe",
    "salt",
    "a robot",
    "a flute",
    "a waterfall",
    "a newspaper",
    "a pharmacy",
    "a fox",
    "a bus",
    "an apple",
    "a diamond",
    "a cave",
    "a sailboat",
    "a farm",
    "a bank",
    "a crab",
    "a mountain",
    "a moth",
    "a lamp",
    "a password",
    "an orchestra",
    "a zebra",
    "a fire",
    "a spoon",
    "a parrot",
    "an ant",
    "the alphabet",
    "a school",
    "a potato",
    "a key",
    "a ferry",
    "a nest",
]
N_HELDOUT_TOPICS = 30
QUESTIONS = [
    "What is {t}?",
    "Why is {t} useful?",
    "Describe {t}.",
    "How would you explain {t} to a child?",
    "What is interesting about {t}?",
    "Where would you find {t}?",
]
WORD_LIMITS = [5, 10, 15, 20]  # SmolLM2-135M's answers run 5-30 words: mid-range pass rates
KEY_SETS = [
    ("name", "color"),
    ("name", "size"),
    ("name", "color", "size"),
    ("name", "use"),
    ("title", "description"),
    ("name", "category", "fact"),
]


def quote_keys(keys) -> str:
    ks = [f'"{k}"' for k in keys]
    return ks[0] if len(ks) == 1 else ", ".join(ks[:-1]) + " and " + ks[-1]


def prompt(rule: str, topic: str, rng: random.Random) -> dict:
    """One prompt line: {"prompt", "rule", "limit" (words) or "keys" (json), "topic"}."""
    if rule == "words":
        n = rng.choice(WORD_LIMITS)
        q = rng.choice(QUESTIONS).format(t=topic)
        return {"prompt": f"Answer in at most {n} words: {q}", "rule": "words", "limit": n, "topic": topic}
    keys = rng.choice(KEY_SETS)
    text = f"Reply with only a JSON object with the keys {quote_keys(keys)}, about {topic}."
    return {"prompt": text, "rule": "json", "keys": list(keys), "topic": topic}


def split_topics(seed: int = SEED) -> tuple[list[str], list[str]]:
    """(train topics, held-out topics), disjoint."""
    topics = sorted(set(TOPICS))
    random.Random(seed).shuffle(topics)
    return topics[N_HELDOUT_TOPICS:], topics[:N_HELDOUT_TOPICS]


def make(rule: str, n_train: int, n_heldout: int, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt lines, unique prompts, disjoint by topic; a pure function of the arguments."""
    if rule not in ("words", "json"):
        raise ValueError(f"rule must be 'words' or 'json' (got {rule!r})")
    train_topics, heldout_topics = split_topics(seed)
    out = []
    for topics, n, salt in ((train_topics, n_train, 1), (heldout_topics, n_heldout, 2)):
        rng = random.Random(f"{seed}-{rule}-{salt}")
        lines, seen = [], set()
        for _ in range(50 * n):
            if len(lines) == n:
                break
            line = prompt(rule, rng.choice(topics), rng)
            if line["prompt"] not in seen:
                seen.add(line["prompt"])
                lines.append(line)
        if len(lines) < n:
            raise ValueError(f"only {len(lines)} distinct {rule} prompts for {n} asked; use fewer")
        out.append(lines)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------
# the rules


_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?\s*```$", re.S)


def passes(line: dict, answer: str) -> bool:
    """Whether `answer` follows the rule of prompt `line` (see the module docstring)."""
    text = answer.strip()
    if line["rule"] == "words":
        return 0 < len(text.split()) <= line["limit"]
    m = _FENCE.match(text)
    if m:
        text = m.group(1).strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and sorted(obj) == sorted(line["keys"])


def write(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rule", default="words", choices=["words", "json"], help="prompt family (default: words)")
    ap.add_argument("--train", type=int, default=N_TRAIN, help=f"train prompts (default: {N_TRAIN})")
    ap.add_argument("--heldout", type=int, default=N_HELDOUT, help=f"held-out prompts (default: {N_HELDOUT})")
    ap.add_argument("--out", type=Path, default=OUT, help=f"folder to write (default: {OUT})")
    args = ap.parse_args(argv)
    train, heldout = make(args.rule, args.train, args.heldout)
    write(args.out / "train_prompts.jsonl", train)
    write(args.out / "heldout_prompts.jsonl", heldout)
    print(f"{len(train)} train and {len(heldout)} held-out {args.rule} prompts in {args.out}")


if __name__ == "__main__":
    main()
