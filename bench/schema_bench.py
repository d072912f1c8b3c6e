"""Per-token cost of JSON-schema constrained decoding (tinkerlm.jsonschema) against unconstrained, on SmolLM2.

    .venv/bin/python bench/schema_bench.py                 # smollm2, 10 prompts, 2 runs: ~1-2 minutes
    .venv/bin/python bench/schema_bench.py --prompts 3 --runs 1                 # a quick check

Each prompt is answered greedily under a schema (an object with strings, an enum, an integer, an array of
strings and an optional nested object); then the same prompt unconstrained (`stream_generate`, the path `LLM.chat` takes), with max_tokens set to the
number of tokens the constrained answer took and no stop tokens, so both decode the same count. Reported: decode ms/token
both ways (wall time of the call over the tokens it produced, prefill included in both), and the time the
constraint itself takes per token (its `pick` and `push`, measured inside the run): cold (first run: memo
tables empty, each new state and token transition computed) and warm (later runs, the same schema).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import tinkerlm
from tinkerlm import jsonschema

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["person", "place", "thing", "idea"]},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 4},
        "where": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["country"],
        },
    },
    "required": ["name", "kind", "year", "tags"],
}
SUBJECTS = [
    "Marie Curie",
    "the Eiffel Tower",
    "a bicycle",
    "democracy",
    "Mount Fuji",
    "Ada Lovelace",
    "the printing press",
    "Kyoto",
    "jazz",
    "the internet",
]


class Timed:
    """Adds up the time spent in SchemaConstraint.pick/push."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        cls = jsonschema.SchemaConstraint
        self.pick, self.push = cls.pick, cls.push
        timer = self

        def pick(c, *a, **k):
            t = time.perf_counter()
            try:
                return timer.pick(c, *a, **k)
            finally:
                timer.seconds += time.perf_counter() - t
                timer.calls += 1

        def push(c, *a, **k):
            t = time.perf_counter()
            try:
                return timer.push(c, *a, **k)
            finally:
                timer.seconds += time.perf_counter() - t

        cls.pick, cls.push = pick, push

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=160)
    a = ap.parse_args()
    llm = tinkerlm.load(a.model, prefix_cache_mb=0)  # both ways prefill in full
    timer = Timed()
    prompts = [f"Describe {s} as JSON." for s in SUBJECTS[: a.prompts]]
    llm.chat("warm up", max_tokens=4)
    rows = []
    for run in range(a.runs):
        if run == 0:
            jsonschema._COMPILED.clear()  # the first run starts cold
        con_s = free_s = pick_s = 0.0
        tokens = picks = 0
        for p in prompts:
            t = time.perf_counter()
            r = llm.chat(p, json_schema=SCHEMA, max_tokens=a.max_tokens)
            con_s += time.perf_counter() - t
            s, n = timer.take()
            pick_s, picks = pick_s + s, picks + n
            assert r.finish_reason == "stop", str(r)
            ids = llm.chat_ids(p)
            t = time.perf_counter()
            _free(llm, ids, n)
            free_s += time.perf_counter() - t
            tokens += n
        rows.append((run, tokens, 1000 * con_s / tokens, 1000 * free_s / tokens, 1e6 * pick_s / max(picks, 1)))
    print(f"# {a.model}, {len(prompts)} prompts, greedy; {platform.processor() or platform.machine()}")
    print("run  tokens  constrained ms/tok  unconstrained ms/tok  overhead  constraint us/tok")
    for run, tokens, con, free, pick in rows:
        print(f"{run:3d}  {tokens:6d}  {con:18.2f}  {free:20.2f}  {100 * (con / free - 1):7.1f}%  {pick:17.0f}")
    warm = rows[1:] or rows
    print(
        f"warm: constraint {statistics.median(r[4] for r in warm):.0f} us/token; "
        f"decode {statistics.median(r[2] for r in warm):.2f} vs {statistics.median(r[3] for r in warm):.2f} ms/token"
    )


def _free(llm, ids: list[int], n: int) -> None:
    """`n` unconstrained greedy tokens after `ids` (no stop token, so exactly n), through the same text path."""
    from tinkerlm.generate import stream_generate

    for _ in stream_generate(llm.model, llm.tokenizer, [ids], max_tokens=n, stop_token_ids=[]):
        pass


if __name__ == "__main__":
    main()
