"""Held-out exact-match accuracy of a model on a chat JSONL eval file (as written by make_datasets.py).

For each example the conversation up to its last assistant turn is rendered with the model's own chat template,
answered greedily (prompts batched), and the answer, stripped of surrounding whitespace, is compared with the
reference. Three scores per example:
- exact: the answer equals the reference string (the headline number).
- json:  the answer parses as JSON equal to the reference (key order and spacing ignored); None when the reference
         is not JSON.
- found: the reference occurs inside the answer (for JSON: some {...} inside it parses equal), i.e. the model knew
         the answer but wrapped it in other text.

    python examples/skills/score.py smollm2 examples/data/dates/eval.jsonl [--limit N] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def load_examples(path: str | Path, limit: int | None = None) -> list[dict]:
    """The chats of a JSONL file; each must end with an assistant turn (the reference)."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        messages = json.loads(line)["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError(f"{path}:{n}: the last message must be the assistant's reference answer")
        rows.append({"messages": messages[:-1], "reference": messages[-1]["content"].strip()})
    return rows[:limit] if limit is not None else rows


def parse_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return ValueError  # a sentinel no parsed value equals


def embedded_json_equal(text: str, want) -> bool:
    """Whether some balanced {...} span of `text` parses to `want`."""
    starts = [i for i, c in enumerate(text) if c == "{"]
    for i in starts:
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                if parse_json(text[i : j + 1]) == want:
                    return True
                break
    return False


def judge(answer: str, reference: str) -> dict:
    answer = answer.strip()
    ref_json = parse_json(reference)
    is_json = isinstance(ref_json, (dict, list))
    return {
        "exact": answer == reference,
        "json": (parse_json(answer) == ref_json) if is_json else None,
        "found": embedded_json_equal(answer, ref_json) if is_json else reference in answer,
    }


def answer_all(llm, chats: list[list[dict]], max_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers to each chat, batched; prompts of similar length share a batch (less padding)."""
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
    examples = load_examples(eval_path, limit)
    if not examples:
        raise ValueError(f"{eval_path}: no examples")
    if max_tokens is None:
        max_tokens = max(len(llm.tokenizer.encode(e["reference"], add_special_tokens=False)) for e in examples) + 24
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
