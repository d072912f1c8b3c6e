"""The 8-bit KV cache (`--kv-cache q8`) against the f32 one on the same model: perplexity of the shipped text at a
long context, agreement of greedy answers (short chats and a long-context continuation), cache memory, and decode
speed after a long prompt. Prints a Markdown table (pasted into BENCHMARKS.md).

    .venv/bin/python bench/kv_quality.py                          # smollm2, context 2048
    .venv/bin/python bench/kv_quality.py --model ./m.gguf --context 4096 --prompt-tokens 4000
    .venv/bin/python bench/kv_quality.py --speed-only --runs 5     # memory and decode speed only

Perplexity runs each window through a fresh cache of the format under test (prefill from position 0, so every
attention reads keys and values as the cache stores them). Greedy agreement is measured per answer as the tokens
before the first difference, over the answer's length (a later token can only differ once an earlier one has).
Decode tok/s: `--decode-tokens` greedy steps after a `--prompt-tokens` prompt, the median of `--runs`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from quality import PROMPTS  # bench/quality.py: the same chat prompts the weight formats are judged on

import tinkerlm
from tinkerlm.evaluate.perplexity import shipped_text
from tinkerlm.generate import generate_step
from tinkerlm.loading import set_kv_cache
from tinkerlm.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@torch.inference_mode()
def cached_perplexity(model, ids: list[int], context: int) -> float:
    """exp(mean NLL) over non-overlapping windows of `context` tokens, each prefilled into a fresh cache."""
    total, count = 0.0, 0
    for begin in range(0, len(ids) - 1, context):
        window = torch.tensor([ids[begin : begin + context]])
        if window.shape[1] < 2:
            break
        cache = model.new_cache(1, window.shape[1])
        logp = torch.log_softmax(model(window, cache=cache)[0, :-1].float(), -1)  # (T-1, V)
        total -= logp.gather(-1, window[0, 1:, None]).sum().item()
        count += window.shape[1] - 1
    return float(torch.tensor(total / count).exp())


def greedy(model, prompt: list[int], max_tokens: int, stop: list[int]) -> list[int]:
    return [t for (t,) in generate_step(model, [prompt], max_tokens=max_tokens, sampling=GREEDY, stop_token_ids=stop)]


def agreement(a: list[int], b: list[int]) -> float:
    """Tokens before the first difference, over the longer answer's length."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1)


@torch.inference_mode()
def decode_speed(model, prompt: list[int], steps: int, runs: int) -> float:
    """Decode tok/s after prefilling `prompt` (the prefill is not timed)."""
    speeds = []
    for _ in range(runs):
        cache = model.new_cache(1, len(prompt) + steps + 1)
        logits = model(torch.tensor([prompt]), cache=cache)[:, -1]
        cache.advance(len(prompt))
        t = time.perf_counter()
        for _ in range(steps):
            token = logits.argmax(-1)  # (1,)
            logits = model(token[:, None], cache=cache)[:, -1]
            cache.advance(1)
        speeds.append(steps / (time.perf_counter() - t))
    return statistics.median(speeds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="store name or GGUF path")
    p.add_argument("--quant", default="native", help="weight format (the same for both caches)")
    p.add_argument("--context", type=int, default=2048, help="perplexity window and long-context prompt length")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy answer length")
    p.add_argument("--prompt-tokens", type=int, default=2000, help="prompt length before timed decode")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed")
    p.add_argument("--runs", type=int, default=3, help="decode timings; the median is reported")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="chat prompts answered (the first N)")
    p.add_argument("--speed-only", action="store_true", help="only memory and decode speed (no quality runs)")
    a = p.parse_args()

    llm = tinkerlm.load(a.model, quant=a.quant, prefix_cache_mb=0)
    model, tok = llm.model, llm.tokenizer
    stop = list(tok.stop_token_ids)
    text_ids = tok.encode(shipped_text())
    context = min(a.context, model.max_context)
    long_prompt = text_ids[: context - a.max_tokens]
    speed_prompt = (text_ids * (a.prompt_tokens // len(text_ids) + 1))[: a.prompt_tokens]
    prompts = PROMPTS[: a.prompts]
    chats = [llm.chat_ids(q) for q in prompts]
    print(f"{a.model} ({a.quant}), fused decode: {model.fused_decode is not None}", flush=True)

    results = {}
    for kv in ("f32", "q8"):
        set_kv_cache(model, kv)
        t = time.perf_counter()
        r = results[kv] = {}
        if not a.speed_only:
            r["ppl"] = cached_perplexity(model, text_ids, context)
            r["answers"] = [greedy(model, c, a.max_tokens, stop) for c in chats]
            r["long"] = greedy(model, long_prompt, a.max_tokens, [])
        r["mib_per_1k"] = model.new_cache(1, 1024).nbytes / 2**20
        r["tok_s"] = decode_speed(model, speed_prompt, a.decode_tokens, a.runs)
        print(f"{kv}: {time.perf_counter() - t:.0f} s", flush=True)
    f32, q8 = results["f32"], results["q8"]
    if a.speed_only:
        print(f"\n| KV cache | KV MiB per 1k tokens | decode tok/s after {a.prompt_tokens} tokens |\n|---|---:|---:|")
        for kv, r in results.items():
            print(f"| {kv} | {r['mib_per_1k']:.1f} | {r['tok_s']:.1f} |")
        return
    chat_agree = [agreement(x, y) for x, y in zip(f32["answers"], q8["answers"])]
    same = sum(x == y for x, y in zip(f32["answers"], q8["answers"]))
    print(
        f"\n| KV cache | perplexity (context {context}) | KV MiB per 1k tokens | decode tok/s after "
        f"{a.prompt_tokens} tokens | greedy {a.max_tokens}-token chat answers equal to f32 | tokens before the first "
        f"difference | {a.max_tokens}-token continuation of a {len(long_prompt)}-token text |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    print(
        f"| f32 | {f32['ppl']:.4f} | {f32['mib_per_1k']:.1f} | {f32['tok_s']:.1f} | {len(prompts)}/{len(prompts)} "
        "| 100% | 100% |"
    )
    print(
        f"| q8 | {q8['ppl']:.4f} ({(q8['ppl'] / f32['ppl'] - 1) * 100:+.2f}%) | {q8['mib_per_1k']:.1f} "
        f"({f32['mib_per_1k'] / q8['mib_per_1k']:.2f}x less) | {q8['tok_s']:.1f} | {same}/{len(prompts)} "
        f"| {100 * sum(chat_agree) / len(chat_agree):.1f}% | {100 * agreement(f32['long'], q8['long']):.1f}% |"
    )


if __name__ == "__main__":
    main()
