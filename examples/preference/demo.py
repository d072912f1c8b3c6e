"""DPO on SmolLM2's own answers, ranked by a rule a program checks: a word limit. Before and after, on held-out prompts.

    .venv/bin/python examples/preference/demo.py                  # samples, tunes, evaluates, compares; ~30-40 min
    .venv/bin/python examples/preference/demo.py --skip-sample    # reuse data/train and data/heldout
    .venv/bin/python examples/preference/demo.py --skip-sample --skip-train --compare-limit 0

Steps (each a plain script of this folder or a tinkerlm API call, the same as the CLI verbs):
1. make_prompts.py: 160 train and 80 held-out prompts "Answer in at most N words: <question>", N in 5/10/15/20,
   disjoint by topic;
2. sample.py: 4 answers per prompt from SmolLM2-135M-Instruct at temperature 0.8 (40 tokens at most), each scored
   by the word limit; pairs (passing, failing) of one prompt's answers. Train prompts give the training pairs;
   held-out prompts give held-out pairs (the trainer's evaluation split) and the base's sampled pass rate;
3. `tinkerlm finetune -c recipe.yaml` (DPO, LoRA over the Q4_1 weights, beta 0.5);
4. evaluate.py on the base and on the DPO adapter: the rule's pass rate on held-out prompts (greedy; and 4 samples
   per prompt with the seed of step 2), preference accuracy on the held-out pairs;
5. `tinkerlm compare smollm2 smollm2-dpo-words --tasks arc_easy,hellaswag --limit N`: what it cost elsewhere.

Writes examples/preference/results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import evaluate  # noqa: E402  (examples/preference/evaluate.py)
import make_prompts  # noqa: E402
import sample  # noqa: E402

DATA = HERE / "data"
BASE = "smollm2"
OUT = "smollm2-dpo-words"
RECIPE = HERE / "recipe.yaml"
K, TEMPERATURE, MAX_TOKENS = 4, 0.8, 40
TRAIN_SEED, HELDOUT_SEED = 0, 1000
TASKS = "arc_easy,hellaswag"


def trainer_evals(manifest) -> list[dict]:
    """The evaluation rows of the run's loss.csv (step, eval_loss, eval_accuracy, eval_margin, ...)."""
    import csv

    from tinkerlm import store

    path = store.model_path(manifest)
    path = (path if path.is_dir() else path.parent) / "loss.csv"
    rows = list(csv.DictReader(path.read_text().splitlines()))
    keep = ("step", "eval_loss", "eval_accuracy", "eval_margin", "eval_chosen_reward", "eval_rejected_reward")
    return [{k: float(r[k]) for k in keep if r.get(k)} for r in rows if r.get("eval_loss")]


def compare(limit: int) -> dict:
    """`tinkerlm compare` of the base and the DPO adapter; its JSON, the command and the time it took."""
    cmd = [sys.executable, "-m", "tinkerlm", "compare", BASE, OUT, "--tasks", TASKS, "--limit", str(limit)]
    out = DATA / "compare.json"
    t = time.perf_counter()
    proc = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    print(proc.stdout, proc.stderr[-2000:] if proc.returncode else "", sep="\n", flush=True)
    if proc.returncode:
        return {"command": " ".join(cmd[2:]), "error": proc.stderr.strip().splitlines()[-1:]}
    return {
        "command": "tinkerlm " + " ".join(cmd[3:]),
        "seconds": round(seconds),
        "table": proc.stdout.strip(),
        "result": json.loads(out.read_text()),
    }


def fmt(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['rate']:.0%} ({r['passed']}/{r['n']}; 95% CI {lo:.0%}-{hi:.0%})"


def markdown(res: dict) -> str:
    b, a = res["base"], res["dpo"]
    lines = [
        "# DPO demonstration: results",
        "",
        f"SmolLM2-135M-Instruct, rule: answer within the word limit the prompt states (5/10/15/20 words). "
        f"{res['train']['pairs']} training pairs from {res['train']['prompts_with_pairs']} of "
        f"{res['train']['prompts']} train prompts (base pass rate while sampling: {fmt(res['train']['pass'])}); "
        f"held-out: {b['prompts']} prompts on topics never trained on, {res['heldout']['pairs']} pairs.",
        "",
        "| held-out measure | base | DPO (LoRA) |",
        "|---|---:|---:|",
        f"| pass rate, greedy | {fmt(b['greedy'])} | {fmt(a['greedy'])} |",
        f"| pass rate, {K} samples at T={TEMPERATURE} | {fmt(res['heldout']['pass'])} | {fmt(a['sampled'])} |",
        f"| mean words, greedy | {b['greedy_mean_words']} | {a['greedy_mean_words']} |",
        f"| pairs preferred by log-prob (sum) | {b['preference']['logp_sum']:.0%} | {a['preference']['logp_sum']:.0%} |",
        f"| pairs preferred by log-prob per token | {b['preference']['logp_mean']:.0%} | "
        f"{a['preference']['logp_mean']:.0%} |",
        f"| preference accuracy of the DPO reward | 0% (every reward 0) | {a['preference']['reward']:.0%} |",
        "",
        "Greedy pass rate by word limit: "
        + ", ".join(
            f"{n} words {b['greedy_by_limit'][n]['rate']:.0%} -> {a['greedy_by_limit'][n]['rate']:.0%}"
            for n in b["greedy_by_limit"]
        )
        + ".",
    ]
    ev = res.get("trainer_eval") or []
    if ev:
        last = ev[-1]
        lines += [
            "",
            f"Trainer's held-out evaluation (loss.csv) at step {last['step']:.0f}: accuracy "
            f"{last.get('eval_accuracy', float('nan')):.0%}, margin {last.get('eval_margin', float('nan')):.2f}.",
        ]
    c = res.get("compare")
    if c and "table" in c:
        lines += ["", f"General tasks: `{c['command']}` ({c['seconds']} s):", "", "```", c["table"], "```"]
    elif c:
        lines += ["", f"`{c['command']}` failed: {c.get('error')}"]
    lines += ["", "Examples (held-out, greedy, DPO):", ""]
    lines += [f"- {e['prompt']} -> {e['answer']!r} ({'pass' if e['pass'] else 'fail'})" for e in a["examples"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-sample", action="store_true", help="reuse data/train and data/heldout (pairs, summaries)")
    p.add_argument("--skip-train", action="store_true", help=f"reuse the stored {OUT}")
    p.add_argument("--compare-limit", type=int, default=200, help="items per general task; 0 skips (default: 200)")
    args = p.parse_args(argv)

    import tinkerlm
    from tinkerlm import store
    from tinkerlm.tune import finetune

    timings = {}
    make_prompts.main([])
    t = time.perf_counter()
    if not args.skip_sample:
        llm = tinkerlm.load(BASE)
        for split, seed in (("train", TRAIN_SEED), ("heldout", HELDOUT_SEED)):
            summary = sample.run(llm, DATA / f"{split}_prompts.jsonl", DATA / split, K, TEMPERATURE, MAX_TOKENS, seed)
            (DATA / f"{split}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        del llm
    timings["sample"] = time.perf_counter() - t
    res = {s: json.loads((DATA / f"{s}_summary.json").read_text()) for s in ("train", "heldout")}
    print(f"train: {res['train']['pairs']} pairs, pass {fmt(res['train']['pass'])}", flush=True)

    t = time.perf_counter()
    manifest = store.get(OUT) if args.skip_train else finetune(config=str(RECIPE), force=True)
    timings["finetune"] = time.perf_counter() - t
    res["trainer_eval"] = trainer_evals(manifest)

    t = time.perf_counter()
    llm = tinkerlm.load(BASE)
    res["base"], base_lp = evaluate.evaluate(llm, k=0, max_tokens=MAX_TOKENS, seed=HELDOUT_SEED)
    del llm
    llm = tinkerlm.load(OUT)
    res["dpo"], _ = evaluate.evaluate(
        llm, k=K, temperature=TEMPERATURE, max_tokens=MAX_TOKENS, seed=HELDOUT_SEED, base_logps=base_lp
    )
    del llm
    timings["evaluate"] = time.perf_counter() - t
    if args.compare_limit:
        res["compare"] = compare(args.compare_limit)
    res["seconds"] = {k: round(v) for k, v in timings.items()}
    (HERE / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
