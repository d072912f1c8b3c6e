"""DPO on SmolLM2's own answers, ranked by a rule a program checks: a word limit. Before and after, on held-out prompts.

    .venv/bin/python examples/preference/demo.py --threads 1      # samples, tunes, evaluates, compares (~30 min)
    .venv/bin/python examples/preference/demo.py --skip-sample    # reuse data/train and data/heldout
    .venv/bin/python examples/preference/demo.py --skip-sample --skip-train --skip-eval   # compare, write results

Steps (each a plain script of this folder or a tinkerlm API call, the same as the CLI verbs):
1. make_prompts.py: 64 train and 40 held-out prompts "Answer in at most N words: <question>", N in 5/10/15/20,
   disjoint by topic;
2. sample.py: 4 answers per prompt (of the first 32 train and 16 held-out prompts: SAMPLED) from
   SmolLM2-135M-Instruct at temperature 0.8 (32 tokens at most; a cut answer fails), each scored by the word limit;
   every (passing, failing) pair of one prompt's answers. Train prompts give the training pairs;
   held-out prompts give held-out pairs (the trainer's evaluation split) and the base's sampled pass rate;
3. `tinkerlm finetune -c recipe.yaml` (DPO, LoRA over the Q4_1 weights, beta 0.5);
4. evaluate.py on the base and on the DPO adapter: the rule's pass rate on held-out prompts (greedy on all 40; and,
   for the adapter, 4 samples for each of the 16 prompts of step 2 with its seed: the base's sampled rate is step
   2's), preference accuracy on the held-out pairs;
5. `tinkerlm compare smollm2 smollm2-dpo-words --tasks arc_easy,hellaswag --limit 100`: the cost
   elsewhere.

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
K, TEMPERATURE, MAX_TOKENS = 4, 0.8, 32
TRAIN_SEED, HELDOUT_SEED = 0, 1000
# Prompts sampled per split: the recorded run fitted a shared 2-core CPU (~60 CPU-seconds per 64 answers). The
# held-out greedy pass rates use all 40 held-out prompts. Raise these (up to 64 and 40) for more pairs.
SAMPLED = {"train": 32, "heldout": 16}
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


def compare(limit: int, tasks: str = TASKS) -> None:
    """Run `tinkerlm compare` of the base and the DPO adapter; its table goes to data/compare.txt, JSON to
    data/compare.json."""
    cmd = [
        "tinkerlm",
        "compare",
        BASE,
        OUT,
        "--tasks",
        tasks,
        "--limit",
        str(limit),
        "--out",
        str(DATA / "compare.json"),
    ]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout, proc.stderr[-2000:] if proc.returncode else "", sep="\n", flush=True)
    if proc.returncode == 0:
        head = f"$ {' '.join(cmd[:-2])}   # {time.perf_counter() - t:.0f} s\n"
        (DATA / "compare.txt").write_text(head + proc.stdout)


def compare_summary() -> dict | None:
    """The saved comparison: its table and, per task, the scores (data/compare.json, compare.txt)."""
    if not (DATA / "compare.json").exists():
        return None
    return {
        "table": (DATA / "compare.txt").read_text().rstrip(),
        "result": json.loads((DATA / "compare.json").read_text()),
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
        f"| pass rate, sampled at T={TEMPERATURE} | {fmt(res['heldout']['pass'])} | {fmt(a['sampled'])} |",
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
    if c:
        lines += ["", "General tasks (`tinkerlm compare`):", "", "```", c["table"], "```"]
    lines += ["", "Examples (held-out, greedy, DPO):", ""]
    lines += [f"- {e['prompt']} -> {e['answer']!r} ({'pass' if e['pass'] else 'fail'})" for e in a["examples"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-sample", action="store_true", help="reuse data/train and data/heldout (pairs, summaries)")
    p.add_argument("--skip-train", action="store_true", help=f"reuse the stored {OUT}")
    p.add_argument(
        "--skip-eval", action="store_true", help="reuse data/eval_base.json and data/eval_dpo.json (evaluate.py)"
    )
    p.add_argument(
        "--compare-limit",
        type=int,
        default=100,
        help="items per general task; 0 reuses data/compare.json (default: 100)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: physical cores; 1 is faster on a busy machine)"
    )
    p.add_argument("--compare-tasks", default=TASKS, help=f"general tasks for tinkerlm compare (default: {TASKS})")
    args = p.parse_args(argv)

    import tinkerlm
    from tinkerlm import store
    from tinkerlm.tune import finetune

    timings = {}
    make_prompts.main([])
    t = time.perf_counter()
    if not args.skip_sample:
        llm = tinkerlm.load(BASE, threads=args.threads)
        for split, seed in (("train", TRAIN_SEED), ("heldout", HELDOUT_SEED)):
            summary = sample.run(
                llm, DATA / f"{split}_prompts.jsonl", DATA / split, K, TEMPERATURE, MAX_TOKENS, seed, SAMPLED[split]
            )
            (DATA / f"{split}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        del llm
    timings["sample"] = time.perf_counter() - t
    res = {s: json.loads((DATA / f"{s}_summary.json").read_text()) for s in ("train", "heldout")}
    print(f"train: {res['train']['pairs']} pairs, pass {fmt(res['train']['pass'])}", flush=True)

    t = time.perf_counter()
    manifest = (
        store.get(OUT)
        if args.skip_train
        else finetune(
            config=str(RECIPE),
            data=str(DATA / "train/pairs.jsonl"),
            eval_data=str(DATA / "heldout/pairs.jsonl"),
            threads=args.threads,
            force=True,
        )
    )
    timings["finetune"] = time.perf_counter() - t
    res["trainer_eval"] = trainer_evals(manifest)

    t = time.perf_counter()
    if not args.skip_eval:
        from safetensors.torch import save_file

        llm = tinkerlm.load(BASE, threads=args.threads)
        base, base_lp = evaluate.evaluate(llm, k=0, max_tokens=MAX_TOKENS)
        (DATA / "eval_base.json").write_text(json.dumps(base, indent=2) + "\n")
        save_file(base_lp, str(DATA / "base_logps.safetensors"))
        del llm
        llm = tinkerlm.load(OUT, threads=args.threads)
        dpo, _ = evaluate.evaluate(
            llm,
            k=K,
            sample_limit=SAMPLED["heldout"],
            temperature=TEMPERATURE,
            max_tokens=MAX_TOKENS,
            seed=HELDOUT_SEED,
            base_logps=base_lp,
        )
        (DATA / "eval_dpo.json").write_text(json.dumps(dpo, indent=2) + "\n")
        del llm
    res["base"] = json.loads((DATA / "eval_base.json").read_text())
    res["dpo"] = json.loads((DATA / "eval_dpo.json").read_text())
    timings["evaluate"] = time.perf_counter() - t
    if args.compare_limit:
        compare(args.compare_limit, args.compare_tasks)
    res["compare"] = compare_summary()
    res["seconds"] = {k: round(v) for k, v in timings.items()}
    (HERE / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
