"""Train a small Python code model from scratch on this machine, and show what it writes before and after.

    python examples/pretrain/demo.py --threads 2     # tokenizer, pretraining, samples: 40 min measured on 2 shared cores

The stages, each timed:
1. an 8,192-token byte-level BPE tokenizer trained on the Python standard library's top-level modules
   (`tinkerlm tokenizer train`, stored as `stdlib-py`);
2. a 3.1M-parameter Llama-family model pretrained on the whole standard library with `demo.yaml`
   (`tinkerlm pretrain`, stored as `stdlib-code-demo`);
3. a few fixed prompts sampled with fixed seeds from the model as it was initialised (step 0: the same weights the
   trainer started from, remade by `init_weights` with the recipe's seed) and from the trained model, written to
   `samples.md`; the run's curve (loss, eval loss and tokens/s against step) is copied to `docs/pretrain-curve.png`.

Any recipe field can be overridden (`--set max_tokens=2000000 --set hidden_size=128`); the test runs the whole
script on one small package of the standard library with a tiny model in a few seconds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROMPTS = ["def parse_args(", "class Stack:", "import os\n\ndef "]
SEEDS = [0, 1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(HERE / "demo.yaml"), help="the pretraining recipe (default: demo.yaml)")
    p.add_argument("--out", default="stdlib-code-demo", help="store name of the model (replaced if present)")
    p.add_argument("--tokenizer", default="stdlib-py", help="store name of the tokenizer (replaced if present)")
    p.add_argument(
        "--tokenizer-data", default="*.py", help="glob, in the stdlib directory, of the tokenizer's training files"
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="the tokenizer's vocabulary")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the physical cores)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens sampled per prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--samples", default=str(HERE / "samples.md"), help="where to write the samples")
    p.add_argument("--curve", default=str(ROOT / "docs" / "pretrain-curve.png"), help="where to copy the curve")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def overrides(pairs: list[str]) -> dict:
    """{field: value} of `--set KEY=VALUE` (values read as YAML: 128, 2e-3, true, [stdlib/json/*.py])."""
    from tinkerlm.errors import TinkerError

    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise TinkerError(f"--set: expected KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def sample(llm, args) -> list[list[str]]:
    """One continuation per prompt and seed: [[prompt 0 seed 0, prompt 0 seed 1], ...]."""
    return [
        [str(llm.generate(p, max_tokens=args.max_new_tokens, temperature=args.temperature, seed=s)) for s in SEEDS]
        for p in PROMPTS
    ]


def fence(text: str) -> str:
    return "```python\n" + text.replace("```", "` ` `").rstrip() + "\n```"


def main(argv=None) -> dict:
    args = parse_args(argv)
    from tinkerlm import store
    from tinkerlm.api import LLM, load
    from tinkerlm.tokenizer_train import train_tokenizer
    from tinkerlm.tune.pretrain import init_weights, pretrain, resolve

    flags = overrides(args.set)
    if args.threads:
        flags["threads"] = args.threads
    flags["tokenizer"] = args.tokenizer
    recipe = resolve(args.config, out=args.out, **flags)  # checked before anything runs
    times: dict[str, float] = {}

    # 1. the tokenizer
    t0 = time.perf_counter()
    std = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(std.glob(args.tokenizer_data))
    tok = train_tokenizer(
        files, args.vocab_size, args.tokenizer, license="PSF-2.0", compare="none", force=True, progress=not args.quiet
    )
    times["tokenizer"] = time.perf_counter() - t0
    print(f"[demo] tokenizer {tok.manifest.ref}: {len(files)} files, {times['tokenizer']:.1f} s", file=sys.stderr)

    # 2. pretraining (tokenizing the data into shards included)
    t0 = time.perf_counter()
    m = pretrain(config=args.config, out=args.out, force=True, progress=not args.quiet, **flags)
    times["pretrain"] = time.perf_counter() - t0
    print(f"[demo] pretrain {m.ref}: {times['pretrain']:.1f} s", file=sys.stderr)

    # 3. samples after, then before: the same model with its weights put back to step 0
    t0 = time.perf_counter()
    llm = load(m.ref, threads=args.threads, prefix_cache_mb=0)
    after = sample(llm, args)
    init_weights(llm.model, recipe.init_std, recipe.seed)  # the weights the trainer started from
    before = sample(LLM(llm.model, llm.tokenizer, f"{m.ref} (step 0)", prefix_cache_mb=0), args)
    times["samples"] = time.perf_counter() - t0
    print(f"[demo] samples: {times['samples']:.1f} s", file=sys.stderr)

    src = m.source
    history = (store.model_path(m) / "loss.csv").read_text().splitlines()
    header = history[0].split(",")
    speeds = [float(v) for row in history[1:] if (v := row.split(",")[header.index("tokens_per_s")])]
    stats = {
        "times": times,
        "steps": src["steps"],
        "tokens": src["tokens"],
        "parameters": src["parameters"],
        "final_loss": src["final_loss"],
        "eval_loss": src["eval_loss"],
        "tokens_per_s": statistics.median(speeds) if speeds else None,
    }
    lines = [
        f"# Samples from `{m.ref}`, before and after pretraining",
        "",
        "Written by `examples/pretrain/demo.py`. Each prompt is sampled with seeds "
        f"{', '.join(map(str, SEEDS))} at temperature {args.temperature}, {args.max_new_tokens} new tokens, from "
        "the model as initialised (step 0) and after training.",
        "",
        f"- model: {stats['parameters']:,} parameters, {stats['steps']:,} steps, {stats['tokens']:,} tokens",
        f"- final train loss {stats['final_loss']:.3f}, eval loss {stats['eval_loss']:.3f}; median "
        f"{stats['tokens_per_s'] or 0:,.0f} training tokens/s",
        "- wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()),
        "",
    ]
    for i, prompt in enumerate(PROMPTS):
        lines += [f"## Prompt {i + 1}: `{prompt.encode('unicode_escape').decode()}`", ""]
        for s in range(len(SEEDS)):
            lines += [f"Before (step 0), seed {SEEDS[s]}:", "", fence(prompt + before[i][s]), ""]
            lines += [f"After ({stats['steps']:,} steps), seed {SEEDS[s]}:", "", fence(prompt + after[i][s]), ""]
    Path(args.samples).write_text("\n".join(lines), encoding="utf-8")
    shutil.copyfile(store.model_path(m) / "loss.png", args.curve)
    print(f"[demo] wrote {args.samples} and {args.curve}", file=sys.stderr)
    for k, v in times.items():
        print(f"[demo] {k:9s} {v:8.1f} s", file=sys.stderr)
    print(f"[demo] total     {sum(times.values()):8.1f} s", file=sys.stderr)
    return stats


if __name__ == "__main__":
    from tinkerlm.errors import TinkerError

    try:
        main()
    except TinkerError as e:
        sys.exit(f"error: {e}")
