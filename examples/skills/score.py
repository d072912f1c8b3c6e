"""Held-out exact-match accuracy of a model on a chat JSONL eval file (as written by make_datasets.py).

For each example the conversation up to its last assistant turn is rendered with the model's own chat template,
answered greedily (prompts batched), and the answer, stripped of surrounding whitespace, is compared with the
reference. Three scores per example:
- exact: the answer equals the reference string (the headline number).
- json:  the answer parses as JSON equal to the reference (key order and spacing ignored); None when the reference
         is not JSON.
- found: the reference occurs inside the answer (for JSON: some {...} inside it parses equal), i.e. the model knew
         the answer but wrapped it in other text.

The work is tinkerlm.evaluate.generation's (what `tinkerlm eval MODEL --tasks examples/data/dates/eval.jsonl` runs):
this script reads the file as a generation task, answers with `generation.answer` and scores with `generation.judge`
(the default "exact" rule), so both give the same numbers; it adds a failure listing and a per-row JSONL dump.

    python examples/skills/score.py smollm2 examples/data/dates/eval.jsonl [--limit N] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tinkerlm.evaluate import generation
from tinkerlm.evaluate.tasks import GenerationItem, load_task


def chat_task(path: str | Path, limit: int | None = None):
    """The file as a tinkerlm generation task; every line must be a chat ending with the reference answer."""
    task = load_task(str(path), limit=limit)
    if task.kind != "generate" or any(it.messages is None for it in task.items):
        raise ValueError(f"{path}: not a chat file (each line {{'messages': [..., assistant reference]}})")
    return task


def load_examples(path: str | Path, limit: int | None = None) -> list[dict]:
    """The chats of a JSONL file, each {"messages": the chat up to its answer, "reference": the answer, stripped}."""
    return [{"messages": list(it.messages), "reference": it.reference} for it in chat_task(path, limit).items]


def judge(answer: str, reference: str) -> dict:
    """{"exact", "json", "found"} of one answer (booleans; json None when the reference is not JSON)."""
    scores = generation.judge(answer, GenerationItem("", reference.strip()))
    return {k: None if v is None else bool(v) for k, v in scores.items()}


def answer_all(llm, chats: list[list[dict]], max_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers to each chat, batched; prompts of similar length share a batch (less padding)."""
    prompts = [llm.chat_ids(m) for m in chats]
    return generation.answer(llm, prompts, [max_tokens] * len(prompts), batch_size=batch_size)


def exact_match(
    llm, eval_path: str | Path, limit: int | None = None, batch_size: int = 16, max_tokens: int | None = None
) -> tuple[float, list[dict]]:
    """(exact-match accuracy, per-example rows) of `llm` (a tinkerlm.api.LLM) on a chat JSONL eval file.

    Args:
        limit: score only the first `limit` examples.
        max_tokens: answer budget; default the longest reference's token count + 24, enough for an exact answer
            and for a wrapped one to show the reference (the `found` score).
    Returns:
        accuracy in [0, 1], and one dict per example: messages, reference, answer, exact, json, found.
    """
    task = chat_task(eval_path, limit)
    examples = [{"messages": list(it.messages), "reference": it.reference} for it in task.items]
    if max_tokens is None:
        max_tokens = generation.default_budget(llm.tokenizer, task.items)
    answers = answer_all(llm, [e["messages"] for e in examples], max_tokens, batch_size)
    rows = [{**e, "answer": a.strip(), **judge(a, e["reference"])} for e, a in zip(examples, answers)]
    return sum(r["exact"] for r in rows) / len(rows), rows


def summary(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """{score: (hits, examples)} over the rows where each score applies."""
    out = {}
    for key in ("exact", "json", "found"):
        vals = [r[key] for r in rows if r[key] is not None]
        if vals:
            out[key] = (sum(vals), len(vals))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Held-out exact-match accuracy of a model on a chat JSONL file.")
    ap.add_argument("model", help="anything tinkerlm.load accepts: a store name, a .gguf file, an HF directory")
    ap.add_argument("eval_path", help="chat JSONL, each chat ending with the reference assistant answer")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N examples (default: all)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts answered together (default: 16)")
    ap.add_argument(
        "--max-tokens", type=int, default=None, help="answer budget (default: longest reference in tokens + 24)"
    )
    ap.add_argument("--quant", default="native", help="weight format, as tinkerlm.load (default: native)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    ap.add_argument("--show", type=int, default=5, help="failures to print (default: 5)")
    ap.add_argument("--out", type=Path, default=None, help="write every row as JSONL here (default: none)")
    args = ap.parse_args(argv)

    import tinkerlm

    t0 = time.perf_counter()
    llm = tinkerlm.load(args.model, quant=args.quant, threads=args.threads)
    t1 = time.perf_counter()
    acc, rows = exact_match(llm, args.eval_path, args.limit, args.batch_size, args.max_tokens)
    t2 = time.perf_counter()
    scores = summary(rows)
    print(
        f"{llm.name} ({args.quant}) on {args.eval_path}: {len(rows)} examples, "
        f"load {t1 - t0:.1f} s, answer {t2 - t1:.1f} s"
    )
    print("  " + "   ".join(f"{k} {hits / n:.1%} ({hits}/{n})" for k, (hits, n) in scores.items()))
    for r in [r for r in rows if not r["exact"]][: args.show]:
        print(f"- user:   {r['messages'][-1]['content']!r}\n  want:   {r['reference']!r}\n  got:    {r['answer']!r}")
    if args.out:
        args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
