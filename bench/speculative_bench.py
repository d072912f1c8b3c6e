"""Speculative decoding on the skills demo tasks: tok/s, acceptance and tokens per forward, plain against prompt
lookup (and a draft model with --draft), on the fine-tuned models' own held-out prompts.

    .venv/bin/python bench/speculative_bench.py                             # the LoRA fine-tunes, 20 prompts each
    .venv/bin/python bench/speculative_bench.py --models dates=smollm2-dates,contacts=smollm2-contacts --quant int8
    .venv/bin/python bench/speculative_bench.py --draft smollm2 --limit 5 --json

For each skill: the first --limit chat prompts of examples/data/<skill>/eval.jsonl, greedy, answered by the model
plainly and with each drafter in turn (each engine warmed up on one prompt first). Timing covers generation, not
loading; tok/s is generated tokens over wall time. The answers must be identical across engines: a mismatch is
reported (and is a bug). The models come from the store (TINKERLM_HOME, default ~/.cache/tinkerlm), made by
examples/skills/demo.py. Prompt lookup shines where the answer copies the prompt (contacts: names and cities);
dates answers are ~7 tokens, mostly not in the prompt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import tinkerlm

ROOT = Path(__file__).resolve().parent.parent
MODELS = "dates=smollm2-dates-lora,contacts=smollm2-contacts-lora"


def prompts(skill: str, limit: int) -> list[list[dict]]:
    lines = (ROOT / "examples" / "data" / skill / "eval.jsonl").read_text().splitlines()[:limit]
    return [[m for m in json.loads(line)["messages"] if m["role"] != "assistant"] for line in lines]


def run(llm, items, max_tokens: int) -> dict:
    llm.chat(items[0], max_tokens=max_tokens)  # warm-up
    tokens = drafted = accepted = forwards = 0
    answers = []
    start = time.perf_counter()
    for messages in items:
        answers.append(str(llm.chat(messages, max_tokens=max_tokens)))
        s = llm.last_speculation
        if s is not None:
            tokens, drafted, accepted, forwards = (
                tokens + s.tokens,
                drafted + s.drafted,
                accepted + s.accepted,
                forwards + s.forwards,
            )
    seconds = time.perf_counter() - start
    return {
        "answers": answers,
        "seconds": seconds,
        "tokens": tokens,
        "acceptance": accepted / drafted if drafted else None,
        "tokens_per_forward": tokens / forwards if forwards else 1.0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=MODELS, help=f"SKILL=MODEL pairs, comma-separated (default: {MODELS})")
    p.add_argument("--limit", type=int, default=20, help="prompts per skill (default: 20)")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer (default: 64)")
    p.add_argument("--draft", default=None, help="also run with this draft model (default: none)")
    p.add_argument("--draft-tokens", type=int, default=8, help="tokens drafted per step (default: 8)")
    p.add_argument("--lookup-ngram", type=int, default=3, help="longest n-gram prompt lookup matches (default: 3)")
    p.add_argument("--quant", default="native", help="weight format the models are loaded with (default: native)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the physical cores)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    a = p.parse_args(argv)

    load = dict(quant=a.quant, threads=a.threads)
    results = {}
    for pair in a.models.split(","):
        skill, name = pair.split("=")
        items = prompts(skill, a.limit)
        plain = tinkerlm.load(name, **load)
        engines = {
            "plain": plain,
            "prompt lookup": tinkerlm.load(
                name, **load, prompt_lookup=True, draft_tokens=a.draft_tokens, lookup_ngram=a.lookup_ngram
            ),
        }
        if a.draft:
            engines[f"draft {a.draft}"] = tinkerlm.load(name, **load, draft=a.draft, draft_tokens=a.draft_tokens)
        rows = {engine: run(llm, items, a.max_tokens) for engine, llm in engines.items()}
        # Plain decoding keeps no count; the answers being the same, so are the tokens.
        rows["plain"]["tokens"] = rows["prompt lookup"]["tokens"]
        want = rows["plain"]["answers"]
        for r in rows.values():
            r["tok_s"] = r["tokens"] / r["seconds"]
            r["speedup"] = r["tok_s"] / (rows["plain"]["tokens"] / rows["plain"]["seconds"])
            r["mismatches"] = sum(x != y for x, y in zip(r["answers"], want))
        for r in rows.values():
            del r["answers"]
        results[f"{skill} ({name})"] = rows

    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    print("| task (model) | engine | tok/s | speed-up | acceptance | tokens/forward | answers differing |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for task, rows in results.items():
        for engine, r in rows.items():
            acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
            print(
                f"| {task} | {engine} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {acc} | "
                f"{r['tokens_per_forward']:.2f} | {r['mismatches']} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
