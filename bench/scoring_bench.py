"""Requests per second of `tinkerlm.evaluate.scoring.loglikelihoods` on multiple-choice questions.

    .venv/bin/python bench/scoring_bench.py                       # smollm2 native, 4 choices, 100 + 20 tokens
    .venv/bin/python bench/scoring_bench.py --quant fp32 --questions 64 --batch-sizes 1,16
    .venv/bin/python bench/scoring_bench.py --task hellaswag --limit 60 --batch-sizes 16 --shared-only

With `--task`, the questions are `--limit` items of a standard task (tinkerlm.evaluate.tasks) spread evenly over it
(`--first`: its first ones; HellaSwag's first items are ActivityNet's, about half as long as its WikiHow ones), each
choice's context encoded as the tokenizer does (its BOS if it adds one) and its continuation without special tokens.
Otherwise they are synthetic: a ~`context`-token context cut from the shipped public-domain text and `choices`
continuations of ~`continuation` tokens each (lengths vary by +-20% so that batching by length has work to do).
Each configuration (shared prefix or not, batch size) scores the same requests after one warm-up batch.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import tinkerlm
from tinkerlm.evaluate import shipped_text
from tinkerlm.evaluate.scoring import loglikelihoods


def make_requests(tokenizer, questions: int, choices: int, context: int, continuation: int, seed: int = 0):
    ids = tokenizer.encode(shipped_text())
    rng = random.Random(seed)

    def span(n):
        n = max(1, round(n * rng.uniform(0.8, 1.2)))
        start = rng.randrange(0, len(ids) - n)
        return ids[start : start + n]

    return [(c, span(continuation)) for c in (span(context) for _ in range(questions)) for _ in range(choices)]


def task_requests(tokenizer, name: str, limit: int | None, first: bool = False):
    """(context ids, continuation ids) of every choice of `limit` items of task `name` (all: None), spread evenly over
    the task (HellaSwag's first items come from ActivityNet and are half as long as its WikiHow ones), or its first
    `limit` items; and the number of items."""
    from tinkerlm.evaluate.tasks import load_task

    task = load_task(name, limit=limit if first else None)
    items = task.items
    if limit is not None and not first and limit < len(items):
        items = [items[i * len(items) // limit] for i in range(limit)]
    reqs = []
    for item in items:
        for c, k in task.requests(item):
            reqs.append((tokenizer.encode(c), tokenizer.encode(k, add_special_tokens=False)))
    return reqs, len(items)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="store name or path (default smollm2)")
    ap.add_argument("--quant", default="native", help="native, fp32, int8, ... (default native)")
    ap.add_argument("--questions", type=int, default=32, help="questions scored per configuration (default 32)")
    ap.add_argument("--choices", type=int, default=4, help="continuations per question (default 4)")
    ap.add_argument("--context", type=int, default=100, help="context tokens, about (default 100)")
    ap.add_argument("--continuation", type=int, default=20, help="continuation tokens, about (default 20)")
    ap.add_argument("--batch-sizes", default="1,8,16", help="comma-separated (default 1,8,16)")
    ap.add_argument("--task", default=None, help="score a standard task's items instead (e.g. hellaswag)")
    ap.add_argument(
        "--limit", type=int, default=100, help="with --task: items scored, spread over the task (default 100)"
    )
    ap.add_argument("--first", action="store_true", help="with --task: the first --limit items instead")
    ap.add_argument("--shared-only", action="store_true", help="skip the runs without prefix sharing")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the median is printed")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    args = ap.parse_args(argv)

    llm = tinkerlm.load(args.model, quant=args.quant, threads=args.threads)
    if args.task:
        reqs, questions = task_requests(llm.tokenizer, args.task, args.limit, args.first)
        tokens = sum(len(c) for c, _ in reqs[:: max(1, len(reqs) // questions)]) + sum(len(k) for _, k in reqs)
        what = f"{args.task}: {questions} questions, {len(reqs)} requests, {tokens} tokens (contexts once)"
    else:
        reqs = make_requests(llm.tokenizer, args.questions, args.choices, args.context, args.continuation)
        questions = args.questions
        what = f"{questions} questions x {args.choices} choices, ~{args.context} + ~{args.continuation} tokens"
    loglikelihoods(llm.model, reqs[:16], batch_size=16)  # warm-up: kernels, allocator
    print(f"{args.model} ({args.quant}), {what}")
    print(f"{'prefix':>8} {'batch':>5} {'req/s':>8} {'questions/s':>11}")
    ref = None
    for share in (True,) if args.shared_only else (False, True):
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                out = loglikelihoods(llm.model, reqs, batch_size=bs, share_prefix=share)
                times.append(time.perf_counter() - t0)
            dt = statistics.median(times)
            ref = ref or out
            drift = max(abs(a[0] - b[0]) for a, b in zip(out, ref))
            print(
                f"{'shared' if share else 'none':>8} {bs:>5} {len(reqs) / dt:>8.1f} {questions / dt:>11.2f}"
                f"   (max |diff| to first run {drift:.1e})"
            )


if __name__ == "__main__":
    main()
