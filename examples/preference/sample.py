"""Sample k answers per prompt from a model, score each by the prompt's rule, and pair passing with failing answers.

For every prompt of a prompts file (make_prompts.py), `k` answers are sampled at `temperature` (one batched call
per chunk of rows through `LLM.generate`, with a fixed seed), each scored by `make_prompts.passes`. Every passing
answer of a prompt is paired with every failing one (duplicates dropped), so a prompt with 1 passing and 3 failing
answers gives 3 pairs; a prompt whose answers all pass or all fail gives none.

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


def sample(
    llm,
    lines: list[dict],
    k: int,
    *,
    temperature: float,
    max_tokens: int,
    seed: int,
    chunk: int = 64,
    log: Path | None = None,
) -> list[dict]:
    """One row per (prompt, sample): {"i", "j", "prompt", "answer", "finish", "pass"}, ordered by prompt then sample.

    An answer cut at `max_tokens` fails (its whole would be longer). Chunks of `chunk` rows are generated together,
    chunk c with seed `seed + c * chunk`; with `log`, each chunk's rows are appended there as it finishes and chunks
    already in the file are not redone (a killed run continues).
    """
    jobs = [(i, j) for i in range(len(lines)) for j in range(k)]
    ids = [llm.chat_ids(x["prompt"]) for x in lines]
    done = {(r["i"], r["j"]): r for r in (read_jsonl(log) if log is not None and log.exists() else [])}
    t0 = time.perf_counter()
    for start in range(0, len(jobs), chunk):
        part = [job for job in jobs[start : start + chunk] if job not in done]
        if not part:
            continue
        part = jobs[start : start + chunk]  # a chunk is redone whole, so its seed gives the same draws
        outs = llm.generate(
            [ids[i] for i, _ in part], max_tokens=max_tokens, temperature=temperature, seed=seed + start
        )
        new = []
        for (i, j), text in zip(part, outs):
            answer = str(text).strip()
            ok = text.finish_reason != "length" and make_prompts.passes(lines[i], answer)
            new.append(
                {
                    "i": i,
                    "j": j,
                    "prompt": lines[i]["prompt"],
                    "answer": answer,
                    "finish": text.finish_reason,
                    "pass": ok,
                }
            )
        done.update({(r["i"], r["j"]): r for r in new})
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in new)
        print(
            f"  sampled {start + len(part)}/{len(jobs)}  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True
        )
    return [done[job] for job in jobs]


def pairs(rows: list[dict]) -> list[dict]:
    """DPO lines from sampled rows: per prompt, every (passing, failing) pair of its distinct answers."""
    by_prompt: dict[int, dict[bool, list[str]]] = {}
    for r in rows:
        kinds = by_prompt.setdefault(r["i"], {True: [], False: []})
        if r["answer"] not in kinds[r["pass"]]:
            kinds[r["pass"]].append(r["answer"])
    prompts = {r["i"]: r["prompt"] for r in rows}
    return [
        {"prompt": prompts[i], "chosen": good, "rejected": bad}
        for i, kinds in sorted(by_prompt.items())
        for good in kinds[True]
        for bad in kinds[False]
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


def run(
    llm,
    prompts_path,
    out: Path,
    k: int = 4,
    temperature: float = 0.8,
    max_tokens: int = 32,
    seed: int = 0,
    limit: int | None = None,
):
    """Sample, score and pair (the first `limit` prompts); writes OUT/samples.jsonl and OUT/pairs.jsonl; returns a
    summary dict."""
    lines = read_jsonl(prompts_path)[:limit]
    rows = sample(
        llm, lines, k, temperature=temperature, max_tokens=max_tokens, seed=seed, log=out / "samples.partial.jsonl"
    )
    prs = pairs(rows)
    write_jsonl(out / "samples.jsonl", rows)
    (out / "samples.partial.jsonl").unlink()
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
    ap.add_argument(
        "--max-tokens", type=int, default=32, help="answer budget in tokens; a cut answer fails (default: 32)"
    )
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    args = ap.parse_args(argv)

    import tinkerlm

    llm = tinkerlm.load(args.model, threads=args.threads)
    summary = run(llm, args.prompts, args.out, args.k, args.temperature, args.max_tokens, args.seed, args.limit)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
