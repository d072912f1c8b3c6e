"""Sample k answers per prompt from a model, score each by the prompt's rule, and pair passing with failing answers.

For every prompt of a prompts file (make_prompts.py), `k` answers are sampled at `temperature` (one batched call
per chunk of rows through `LLM.generate`, with a fixed seed), each scored by `make_prompts.passes`. Answers of one
prompt are paired (passing, failing) in order, each answer used at most once and duplicates dropped, so a prompt
with 3 passing and 1 failing answers gives 1 pair; a prompt whose answers all pass or all fail gives none.

Writes OUT/samples.jsonl (every answer: prompt, answer, finish reason, pass) and OUT/pairs.jsonl (DPO lines
{"prompt", "chosen", "rejected"}), and prints the pass rate.

    python examples/preference/sample.py smollm2 examples/preference/data/train_prompts.jsonl --out examples/preference/data/train
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_prompts  # noqa: E402  (examples/preference/make_prompts.py)


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def sample(llm, lines: list[dict], k: int, *, temperature: float, max_tokens: int, seed: int, chunk: int = 128):
    """One row per (prompt, sample): {"i", "prompt", "answer", "finish", "pass"}, ordered by prompt then sample."""
    jobs = [(i, j) for i in range(len(lines)) for j in range(k)]
    ids = [llm.chat_ids(x["prompt"]) for x in lines]
    rows, t0 = [], time.perf_counter()
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        outs = llm.generate(
            [ids[i] for i, _ in part], max_tokens=max_tokens, temperature=temperature, seed=seed + start
        )
        for (i, _), text in zip(part, outs):
            answer = str(text).strip()
            ok = make_prompts.passes(lines[i], answer)
            rows.append(
                {"i": i, "prompt": lines[i]["prompt"], "answer": answer, "finish": text.finish_reason, "pass": ok}
            )
        done = start + len(part)
        print(f"  sampled {done}/{len(jobs)}  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def pairs(rows: list[dict]) -> list[dict]:
    """DPO lines from sampled rows: per prompt, its distinct passing answers zipped with its distinct failing ones."""
    by_prompt: dict[int, dict[bool, list[str]]] = {}
    for r in rows:
        kinds = by_prompt.setdefault(r["i"], {True: [], False: []})
        if r["answer"] not in kinds[r["pass"]]:
            kinds[r["pass"]].append(r["answer"])
    prompts = {r["i"]: r["prompt"] for r in rows}
    return [
        {"prompt": prompts[i], "chosen": good, "rejected": bad}
        for i, kinds in sorted(by_prompt.items())
        for good, bad in zip(kinds[True], kinds[False])
    ]


def pass_rate(rows: list[dict]) -> dict:
    """{"passed", "n", "rate", "ci95"}: Wilson 95% interval of the pass rate."""
    n, x = len(rows), sum(r["pass"] for r in rows)
    return {"passed": x, "n": n, "rate": x / n if n else 0.0, "ci95": wilson(x, n)}


def wilson(x: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = x / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return [round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)]


def write_jsonl(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")


def run(llm, prompts_path, out: Path, k: int = 4, temperature: float = 0.8, max_tokens: int = 40, seed: int = 0):
    """Sample, score and pair; writes OUT/samples.jsonl and OUT/pairs.jsonl; returns a summary dict."""
    lines = read_jsonl(prompts_path)
    rows = sample(llm, lines, k, temperature=temperature, max_tokens=max_tokens, seed=seed)
    prs = pairs(rows)
    write_jsonl(out / "samples.jsonl", rows)
    write_jsonl(out / "pairs.jsonl", prs)
    by_limit = {}
    for r in rows:
        by_limit.setdefault(str(lines[r["i"]].get("limit", lines[r["i"]].get("rule"))), []).append(r)
    return {
        "prompts": len(lines),
        "k": k,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "pass": pass_rate(rows),
        "pass_by_limit": {
            key: pass_rate(v)
            for key, v in sorted(by_limit.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0)
        },
        "pairs": len(prs),
        "prompts_with_pairs": len({p["prompt"] for p in prs}),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="anything tinkerlm.load accepts (store name, .gguf, adapter)")
    ap.add_argument("prompts", help="a prompts JSONL from make_prompts.py")
    ap.add_argument("--out", type=Path, required=True, help="folder for samples.jsonl and pairs.jsonl")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt (default: 4)")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    ap.add_argument("--max-tokens", type=int, default=40, help="answer budget in tokens (default: 40)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    args = ap.parse_args(argv)

    import tinkerlm

    llm = tinkerlm.load(args.model)
    summary = run(llm, args.prompts, args.out, args.k, args.temperature, args.max_tokens, args.seed)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
