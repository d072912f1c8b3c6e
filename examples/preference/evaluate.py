"""Score a model on held-out prompts by their rule, and on held-out preference pairs by its log-probabilities.

Two measurements, both on data no training step saw (make_prompts.py splits by topic):
- the rule's pass rate on held-out prompts: greedy answers (one per prompt) and, with `--k`, k sampled answers per
  prompt at `--temperature` (the same seed for every model, so the draws differ only by the weights);
- preference accuracy on held-out pairs (sample.py's pairs of the base's own answers to held-out prompts): the
  fraction of pairs whose chosen answer the model scores above the rejected one, by summed log-probability
  (`logp_sum`; it favours shorter answers, and the chosen ones here are shorter) and by log-probability per answer
  token (`logp_mean`). With `--base-logps` (a file an earlier run of the base wrote with `--save-logps`) also the
  accuracy of DPO's implicit reward beta (log pi - log pi_ref), `reward`: the quantity the trainer's `accuracy`
  column reports (beta > 0 does not change the sign).

    python examples/preference/evaluate.py smollm2 --save-logps base_logps.safetensors
    python examples/preference/evaluate.py smollm2-dpo-words --base-logps base_logps.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_prompts  # noqa: E402
import sample  # noqa: E402

DATA = HERE / "data"


def pass_rates(
    llm, lines: list[dict], k: int, temperature: float, max_tokens: int, seed: int, sample_limit: int | None = None
) -> dict:
    """{"greedy": pass rate, "sampled": pass rate (k > 0, over the first `sample_limit` prompts), "greedy_words":
    mean words, "examples": a few}."""
    ids = [llm.chat_ids(x["prompt"]) for x in lines]
    outs = []
    for a in range(0, len(ids), 128):
        outs += llm.generate(ids[a : a + 128], max_tokens=max_tokens, temperature=0)
    rows = [
        {"i": i, "answer": str(o).strip(), "pass": make_prompts.passes(x, str(o))}
        for i, (x, o) in enumerate(zip(lines, outs))
    ]
    result = {
        "greedy": sample.pass_rate(rows),
        "greedy_by_limit": by_limit(lines, rows),
        "greedy_mean_words": round(sum(len(r["answer"].split()) for r in rows) / len(rows), 2),
        "examples": [{"prompt": lines[r["i"]]["prompt"], "answer": r["answer"], "pass": r["pass"]} for r in rows[::16]],
    }
    if k:
        srows = sample.sample(llm, lines[:sample_limit], k, temperature=temperature, max_tokens=max_tokens, seed=seed)
        result["sampled"] = {
            **sample.pass_rate(srows),
            "k": k,
            "temperature": temperature,
            "prompts": len(lines[:sample_limit]),
        }
    return result


def by_limit(lines: list[dict], rows: list[dict]) -> dict:
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(lines[r["i"]]["limit"], []).append(r)
    return {str(n): sample.pass_rate(v) for n, v in sorted(groups.items())}


def pair_logps(llm, pairs_path: str | Path, seq_len: int = 256) -> dict:
    """{"chosen", "rejected"}: (n,) summed answer log-probs, and {"chosen_len", "rejected_len"}: answer tokens."""
    import torch

    from tinkerlm.tune import preference

    tok = llm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    prefs, _ = preference.load(pairs_path, tok, seq_len, "dpo")
    llm.model.eval()
    with torch.no_grad():
        sums, lens = [], []
        for a in range(0, len(prefs.seqs), 16):
            s, n = preference.seq_logps(llm.model, prefs.seqs[a : a + 16], seq_len, pad)
            sums.append(s)
            lens.append(n)
    s, n = torch.cat(sums), torch.cat(lens)
    out = {"chosen": s[0::2], "rejected": s[1::2], "chosen_len": n[0::2], "rejected_len": n[1::2]}
    return {k: v.contiguous() for k, v in out.items()}  # safetensors stores whole tensors, not strided views


def accuracies(lp: dict, base: dict | None = None) -> dict:
    """Preference accuracies (ties count as wrong) and n."""
    mean_c = lp["chosen"] / lp["chosen_len"].clamp(min=1)
    mean_r = lp["rejected"] / lp["rejected_len"].clamp(min=1)
    out = {
        "n": len(lp["chosen"]),
        "logp_sum": float((lp["chosen"] > lp["rejected"]).float().mean()),
        "logp_mean": float((mean_c > mean_r).float().mean()),
    }
    if base is not None:
        margin = (lp["chosen"] - base["chosen"]) - (lp["rejected"] - base["rejected"])
        out["reward"] = float((margin > 0).float().mean())
        out["mean_logratio_margin"] = round(float(margin.mean()), 4)
    return out


def evaluate(
    llm,
    prompts_path=DATA / "heldout_prompts.jsonl",
    pairs_path=DATA / "heldout" / "pairs.jsonl",
    *,
    k: int = 0,
    temperature: float = 0.8,
    max_tokens: int = 32,
    seed: int = 1000,
    sample_limit: int | None = None,
    base_logps: dict | None = None,
) -> tuple[dict, dict]:
    """(results, this model's pair log-probs) of a loaded model; see the module docstring."""
    t0 = time.perf_counter()
    lines = sample.read_jsonl(prompts_path)
    result = {
        "model": llm.name,
        "prompts": len(lines),
        **pass_rates(llm, lines, k, temperature, max_tokens, seed, sample_limit),
    }
    lp = pair_logps(llm, pairs_path)
    result["preference"] = accuracies(lp, base_logps)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result, lp


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="anything tinkerlm.load accepts (store name, .gguf, adapter)")
    ap.add_argument("--prompts", default=str(DATA / "heldout_prompts.jsonl"), help="held-out prompts JSONL")
    ap.add_argument("--pairs", default=str(DATA / "heldout" / "pairs.jsonl"), help="held-out pairs JSONL")
    ap.add_argument("--k", type=int, default=0, help="sampled answers per prompt, besides the greedy one (default: 0)")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    ap.add_argument(
        "--max-tokens", type=int, default=32, help="answer budget in tokens; a cut answer fails (default: 32)"
    )
    ap.add_argument("--seed", type=int, default=1000, help="sampling seed (default: 1000)")
    ap.add_argument("--sample-limit", type=int, default=None, help="sample only the first N prompts (default: all)")
    ap.add_argument("--save-logps", type=Path, default=None, help="save this model's pair log-probs here (safetensors)")
    ap.add_argument("--base-logps", type=Path, default=None, help="the base's saved log-probs: adds reward accuracy")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    args = ap.parse_args(argv)

    from safetensors.torch import load_file, save_file

    import tinkerlm

    base = load_file(str(args.base_logps)) if args.base_logps else None  # safetensors: no pickle
    llm = tinkerlm.load(args.model, threads=args.threads)
    result, lp = evaluate(
        llm,
        args.prompts,
        args.pairs,
        k=args.k,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        sample_limit=args.sample_limit,
        base_logps=base,
    )
    if args.save_logps:
        save_file(lp, str(args.save_logps))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
