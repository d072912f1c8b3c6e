"""Time to first token per turn of a 10-turn chat, with and without the prefix cache (tinkerlm.prefix_cache).

    .venv/bin/python bench/prefix_bench.py                         # smollm2, 10 turns, 3 runs: ~2 minutes
    .venv/bin/python bench/prefix_bench.py --turns 4 --runs 1 --chart /tmp/prefix.png    # a quick check

A chat grows each turn by the model's answer and a new user message. Without the cache every turn prefills the whole
conversation again, so its time to first token grows with the conversation; with it, a turn prefills only what
is new since the last turn's cached blocks (the last answer and the new message) and stays flat.

Each turn runs through `generate_step` (the path `LLM.chat` takes) on the chat template's prompt ids: time to
first token is the wall time from the call to the first sampled token (prefill + one sampling step), answers are
greedy and capped at `--answer-tokens`. The conversation is the same in both modes: it is built once, then both
modes replay it, turn by turn, alternating within each run. The table shows the medians over `--runs`; the chart
plots them per turn. The model comes from the default store (`--model`, pulled if missing).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import tinkerlm
from tinkerlm.generate import generate_step
from tinkerlm.prefix_cache import PrefixCache
from tinkerlm.sampling import SamplingParams

SYSTEM = (
    "You are a patient tutor. Explain ideas step by step, with one small example each time, and end every answer "
    "with a question that checks the student's understanding."
)
QUESTIONS = [
    "What is a prime number?",
    "Is 1 a prime number?",
    "How do I check whether 91 is prime?",
    "What is the sieve of Eratosthenes?",
    "Why do we only test divisors up to the square root?",
    "Are there infinitely many primes?",
    "What is a twin prime?",
    "What does the prime number theorem say?",
    "How are primes used in cryptography?",
    "Can you summarise everything we discussed?",
]


def conversation(llm, turns: int, answer_tokens: int) -> list[list[int]]:
    """The prompt ids of each turn: the chat so far (greedy answers) and the next question."""
    greedy = SamplingParams(temperature=0.0)
    messages, prompts = [{"role": "system", "content": SYSTEM}], []
    for q in (QUESTIONS * (turns // len(QUESTIONS) + 1))[:turns]:
        messages.append({"role": "user", "content": q})
        ids = llm.chat_ids(messages)
        prompts.append(ids)
        out = [t for (t,) in generate_step(llm.model, [ids], max_tokens=answer_tokens, sampling=greedy)]
        out = [t for t in out if t not in llm.tokenizer.stop_token_ids]
        messages.append({"role": "assistant", "content": llm.tokenizer.decode(out)})
    return prompts


def turn(llm, ids: list[int], answer_tokens: int, cache: PrefixCache | None) -> float:
    """Seconds to the first token of one turn; the answer is then generated in full (so the cache keeps it)."""
    steps = generate_step(
        llm.model,
        [ids],
        max_tokens=answer_tokens,
        sampling=SamplingParams(temperature=0.0),
        stop_token_ids=llm.tokenizer.stop_token_ids,
        prefix_cache=cache,
    )
    start = time.perf_counter()
    next(steps)
    ttft = time.perf_counter() - start
    for _ in steps:
        pass
    return ttft


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="store name, .gguf path or Hugging Face directory")
    ap.add_argument("--turns", type=int, default=10, help="chat turns")
    ap.add_argument("--answer-tokens", type=int, default=64, help="greedy answer length cap per turn")
    ap.add_argument("--runs", type=int, default=3, help="replays of the chat per mode; medians are reported")
    ap.add_argument("--prefix-cache-mb", type=float, default=256, help="the cache's budget in the 'cache' mode")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    ap.add_argument("--chart", default="bench/prefix_ttft.png", help="PNG of time to first token per turn")
    a = ap.parse_args(argv)

    llm = tinkerlm.load(a.model, threads=a.threads, prefix_cache_mb=0)
    prompts = conversation(llm, a.turns, a.answer_tokens)
    times = {"no cache": [[] for _ in prompts], "cache": [[] for _ in prompts]}
    reused = [0] * len(prompts)
    for _ in range(a.runs):
        for mode in times:  # each run replays the chat from an empty cache
            cache = PrefixCache(a.prefix_cache_mb) if mode == "cache" else None
            for i, ids in enumerate(prompts):
                before = cache.stats["tokens_reused"] if cache else 0
                times[mode][i].append(turn(llm, ids, a.answer_tokens, cache))
                if cache:
                    reused[i] = cache.stats["tokens_reused"] - before

    med = {mode: [statistics.median(t) * 1000 for t in ts] for mode, ts in times.items()}
    print(f"# {a.model}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(
        f"# .venv/bin/python bench/prefix_bench.py --turns {a.turns} --runs {a.runs} --answer-tokens {a.answer_tokens}"
    )
    print("| turn | prompt tokens | reused | TTFT no cache (ms) | TTFT cache (ms) | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, ids in enumerate(prompts):
        off, on = med["no cache"][i], med["cache"][i]
        print(f"| {i + 1} | {len(ids)} | {reused[i]} | {off:.1f} | {on:.1f} | {off / on:.2f}x |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(1, len(prompts) + 1)
    for mode, style in (("no cache", "o-"), ("cache", "s-")):
        ax.plot(x, med[mode], style, label=mode)
    ax.set_xlabel("chat turn")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"{a.model}: {a.turns}-turn chat, prefix cache on/off")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.chart, dpi=120)
    print(f"# chart: {a.chart}")


if __name__ == "__main__":
    main()
