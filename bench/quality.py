"""Quality of the fast paths against the fp32 path on the same GGUF: perplexity on the shipped text and agreement of
greedy answers. Prints a Markdown table (pasted into BENCHMARKS.md).

    .venv/bin/python bench/quality.py                 # smollm2: native, int8 vs fp32
    .venv/bin/python bench/quality.py --model ./m.gguf --quants native,int8,int4

Quantized formats run every product through the packed integer kernels (activations rounded to int16 blocks), in
prefill and decode alike, which is what perplexity measures here and what generation runs.
"""

from __future__ import annotations

import argparse
import time

import torch

import tinkerlm
from tinkerlm.evaluate.perplexity import perplexity, shipped_text

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits.",
    "Who wrote Hamlet?",
    "What is 12 times 12?",
    "Give me a tip for learning Python.",
    "Translate 'good morning' into Spanish.",
    "Name a planet with rings.",
    "What do bees make?",
    "Describe a cat in one sentence.",
    "Why do we need sleep?",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="store name or GGUF path")
    p.add_argument("--quants", default="native,int8", help="weight formats to compare with fp32")
    p.add_argument("--context", type=int, default=512, help="perplexity window")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy answer length")
    a = p.parse_args()

    text = shipped_text()
    ref = tinkerlm.load(a.model, quant="fp32")
    ppl_ref = perplexity(ref.model, ref.tokenizer, text, context=a.context, stride=a.context - 1)
    answers = [ref.chat(q, max_tokens=a.max_tokens) for q in PROMPTS]
    rows = [("fp32 (reference)", ppl_ref, len(PROMPTS))]
    for quant in a.quants.split(","):
        llm = tinkerlm.load(a.model, quant=quant)
        t = time.perf_counter()
        ppl = perplexity(llm.model, llm.tokenizer, text, context=a.context, stride=a.context - 1)
        same = sum(llm.chat(q, max_tokens=a.max_tokens) == want for q, want in zip(PROMPTS, answers))
        rows.append((f"{quant} (packed kernels)", ppl, same))
        print(f"{quant}: {time.perf_counter() - t:.0f} s", flush=True)
    print(
        f"\n| weights | perplexity (context {a.context}) | vs fp32 | greedy {a.max_tokens}-token answers equal "
        f"to fp32 |\n|---|---:|---:|---:|"
    )
    for name, ppl, same in rows:
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / ppl_ref - 1):+.2f}% | {same}/{len(PROMPTS)} |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
