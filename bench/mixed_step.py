"""What a prompt arriving costs the running answers: the time of the engine step that prefills new prompts while
`--decoding` sequences decode, with mixed steps (the prompt pieces and the decode tokens in one forward, the
default) and without (each piece its own forward, then the decode step), alternating, same process and cache.

    .venv/bin/python bench/mixed_step.py                     # SmolLM2 from the store: 14 decoding, 2 x 128 new
    .venv/bin/python bench/mixed_step.py --decoding 15 --new 1 --prompt-tokens 256 --repeats 9

Each measured step prefills `--new` prompts of `--prompt-tokens` tokens (within `--prefill-chunk`) and gives every
decoding sequence its next token: that step's time is the gap between two tokens of every running answer (the
server's inter-token latency p99 under a stream of new requests). A plain decode step is timed for reference.
Medians of `--repeats` each, wall and process CPU time (the latter less sensitive to other load on the machine).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="store name or path")
    p.add_argument("--decoding", type=int, default=14, help="sequences decoding when the new prompts arrive")
    p.add_argument("--new", type=int, default=2, help="prompts arriving together")
    p.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt")
    p.add_argument("--prefill-chunk", type=int, default=256, help="BatchGenerator prefill_chunk")
    p.add_argument("--repeats", type=int, default=5, help="measured steps per variant")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    a = p.parse_args()

    import torch

    import tinkerlm
    from tinkerlm.batching import BatchGenerator

    torch.set_num_threads(a.threads)
    llm = tinkerlm.load(a.model, prefix_cache_mb=0)
    vocab = llm.model.lm_head.out_features
    rng = random.Random(0)
    prompt = lambda: [rng.randrange(100, vocab) for _ in range(a.prompt_tokens)]  # noqa: E731
    bg = BatchGenerator(
        llm.model, llm.tokenizer, max_batch=a.decoding + a.new, prefill_chunk=a.prefill_chunk, prefix_cache_mb=0
    )
    keep = llm.sampling(max_tokens=10 * (a.repeats + 2) * 2 + 8)
    running = [bg.submit(prompt(), keep) for _ in range(a.decoding)]
    bg.step()  # all prefilled whole, each decoding

    kernel = llm.model.fused_decode

    def timed(mixed: bool | str | None) -> tuple[float, float]:
        """One step: prefilling `--new` prompts (mixed or not; "modules": mixed without the fused kernel) or, with
        None, a plain decode step."""
        bg.mixed_steps = bool(mixed)
        new = [bg.submit(prompt(), keep) for _ in range(a.new)] if mixed is not None else []
        if mixed == "modules":
            llm.model.fused_decode = None
        wall, cpu = time.perf_counter(), time.process_time()
        bg.step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        llm.model.fused_decode = kernel
        assert not any(s.prefilling for s in new), "raise --prefill-chunk: the new prompts did not fit one step"
        for s in new:
            s.cancel()
        bg.step()  # frees their slots (and decodes once more)
        return wall * 1000, cpu * 1000

    variants = [("mixed", True), ("separate", False), ("decode only", None)]
    if kernel is not None:  # a quantized model: its mixed steps run the fused kernel; the modules for comparison
        variants.insert(1, ("mixed, modules", "modules"))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    for i in range(a.repeats + 1):  # the first round warms up
        for name, mixed in variants[:: 1 if i % 2 else -1]:
            t = timed(mixed)
            if i:
                times[name].append(t)
    assert all(not s.finished for s in running), "raise max_tokens: a running answer ended"
    load = os.getloadavg()[0]
    print(
        f"{a.model}: {a.decoding} decoding, {a.new} new x {a.prompt_tokens} tokens, chunk {a.prefill_chunk}, "
        f"{a.threads} threads, load average {load:.2f} (1 min)"
    )
    print("| step | wall ms (median) | wall min-max | CPU ms (median) |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        w, c = [t[0] for t in ts], [t[1] for t in ts]
        print(f"| {name} | {statistics.median(w):.0f} | {min(w):.0f}-{max(w):.0f} | {statistics.median(c):.0f} |")
    m, s = (statistics.median(t[0] for t in times[k]) for k in ("mixed", "separate"))
    print(f"mixed / separate (wall medians): {m / s:.2f}x")


if __name__ == "__main__":
    main()
