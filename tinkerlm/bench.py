"""`tinkerlm bench`: load time, prefill and decode speed, time to first token, peak memory of one model.

What is measured (wall clock, `time.perf_counter`), through the same `load` and `generate_step` users call:

- load_s: `tinkerlm.load(...)` from call to a ready model (one load per process; run `bench/compare.py` for
  medians over fresh processes, which also keeps the page cache and peak RSS honest).
- prefill_tok_s[N]: N / (time from starting `generate_step` on an N-token prompt to its first token). The prompt
  is the shipped public-domain text (tinkerlm/evaluate/data), tokenized and cut to exactly N tokens.
- ttft_s: that time for the shortest prompt length (128 by default): prefill plus the first sample.
- decode_tok_s: greedy decoding with EOS ignored after a 16-token prompt; `decode_tokens` one-token steps timed
  from the first token to the last.
- weight_bytes: bytes of every tensor the model's modules hold (parameters, buffers, and plain tensor
  attributes such as packed quantized weights), shared storage counted once. Decoding one token reads each
  weight once, so effective_gb_s = weight_bytes * decode_tok_s / 1e9 (a lower bound on memory traffic).
- peak_rss_mb: the process's peak resident set (VmHWM), including torch itself.
- kernels: what runs the products: the C++ kernels' instruction set (avx512-vnni, avx2, scalar) and whether the
  fused decode step is attached, or PyTorch.

Each timed quantity is the median over `runs`, after one untimed warm-up (first-call allocations, thread
pool start-up).
"""

from __future__ import annotations

import json as jsonlib
import resource
import statistics
import sys
import time

import torch

DECODE_PROMPT_TOKENS = 16


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all tensors reachable from `model`'s modules: parameters, buffers and tensor attributes.

    Tensors sharing memory (tied embeddings) count once. Plain attributes are included so that packed
    quantized weights count however a quantized layer stores them.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for module in model.modules():
        tensors = list(module._parameters.values()) + list(module._buffers.values())
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            nbytes = t.numel() * t.element_size()
            key = (t.data_ptr(), nbytes)
            if nbytes and key not in seen:
                seen.add(key)
                total += nbytes
    return total


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (VmHWM; getrusage where /proc is missing)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly `n` token ids of the shipped text (repeated if the text is shorter), for repeatable prompts."""
    from tinkerlm.evaluate.perplexity import shipped_text

    ids = tokenizer.encode(shipped_text(), add_special_tokens=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def parse_lengths(prompt_tokens: str | int | list) -> list[int]:
    from tinkerlm.errors import TinkerError

    try:
        if isinstance(prompt_tokens, int):
            lengths = [prompt_tokens]
        elif isinstance(prompt_tokens, str):
            lengths = [int(x) for x in prompt_tokens.split(",") if x.strip()]
        else:
            lengths = [int(x) for x in prompt_tokens]
    except ValueError:
        raise TinkerError(f"prompt-tokens: '{prompt_tokens}' is not a comma-separated list of integers") from None
    if not lengths or min(lengths) < 1:
        raise TinkerError(f"prompt-tokens: need one or more lengths >= 1, got '{prompt_tokens}'")
    return sorted(set(lengths))


def first_token_time(model, ids: list[int]) -> float:
    """Seconds from starting generation on `ids` to the first (greedy) token: prefill plus one sample."""
    from tinkerlm.generate import generate_step

    t0 = time.perf_counter()
    for _ in generate_step(model, [ids], max_tokens=1, stop_token_ids=[]):
        break
    return time.perf_counter() - t0


def decode_time(model, ids: list[int], n: int) -> tuple[float, int]:
    """(seconds, steps) for `n` one-token decode steps after the first token, greedy, EOS ignored."""
    from tinkerlm.generate import generate_step

    t_first = None
    count = 0
    for _ in generate_step(model, [ids], max_tokens=n + 1, stop_token_ids=[]):
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
    return time.perf_counter() - t_first, count - 1


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench(
    model: str,
    *,
    prompt_tokens: str = "128,512",
    decode_tokens: int = 256,
    runs: int = 3,
    json: bool = False,
    dtype: str = "float32",
    quant: str = "native",
    threads: int | None = None,
    kv_cache: str = "f32",
    quiet: bool = False,
) -> dict:
    """Measure one model (see the module docstring); print a table (or JSON) and return the results.

    Args:
        model: store name, .gguf path or Hugging Face directory (as for `tinkerlm.load`).
        prompt_tokens: prefill lengths, comma-separated; the shortest also gives the time to first token.
        decode_tokens: one-token decode steps to time.
        runs: repetitions of each timing; medians are reported.
        json: print JSON instead of a table.
        kv_cache: "f32" or "q8" (8-bit keys and values, see `tinkerlm.load`).
        quiet: print nothing (the results are returned).
    Raises:
        TinkerError: bad arguments, or prompt lengths that do not fit the model's context.
    """
    import tinkerlm
    from tinkerlm.errors import TinkerError

    lengths = parse_lengths(prompt_tokens)
    if decode_tokens < 1:
        raise TinkerError(f"decode-tokens: must be >= 1, got {decode_tokens}")
    if runs < 1:
        raise TinkerError(f"runs: must be >= 1, got {runs}")
    say = (lambda m: None) if quiet else _progress

    say(f"bench: loading {model} (dtype={dtype}, quant={quant}) ...")
    t0 = time.perf_counter()
    llm = tinkerlm.load(model, dtype=dtype, quant=quant, threads=threads, kv_cache=kv_cache)
    load_s = time.perf_counter() - t0
    m = llm.model
    ctx = m.max_context
    if max(lengths) >= ctx:
        raise TinkerError(
            f"prompt-tokens: {max(lengths)} does not fit the model's context of {ctx} (give lengths below {ctx})"
        )
    decode_prompt = min(DECODE_PROMPT_TOKENS, lengths[0])
    if decode_prompt + decode_tokens + 1 > ctx:
        raise TinkerError(
            f"decode-tokens: {decode_prompt} prompt + {decode_tokens + 1} tokens do not fit the "
            f"model's context of {ctx} (give at most {ctx - decode_prompt - 1})"
        )
    prompts = {n: prompt_ids(llm.tokenizer, n) for n in lengths}
    short = prompt_ids(llm.tokenizer, decode_prompt)

    say("bench: warm-up ...")
    t0 = time.perf_counter()
    decode_time(m, short, min(4, decode_tokens))
    warmup_s = time.perf_counter() - t0

    prefill_s: dict[int, list[float]] = {n: [] for n in lengths}
    decode_tps: list[float] = []
    steps = decode_tokens
    for r in range(runs):
        for n in lengths:
            say(f"bench: run {r + 1}/{runs}: prefill {n} tokens ...")
            prefill_s[n].append(first_token_time(m, prompts[n]))
        say(f"bench: run {r + 1}/{runs}: decode {decode_tokens} tokens ...")
        seconds, steps = decode_time(m, short, decode_tokens)
        decode_tps.append(steps / seconds)

    wbytes = weight_bytes(m)
    decode_med = statistics.median(decode_tps)
    result = {
        "model": llm.name,
        "dtype": dtype,
        "quant": quant,
        "kv_cache": kv_cache,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "runs": runs,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "prompt_tokens": lengths,
        "prefill_s": {str(n): statistics.median(v) for n, v in prefill_s.items()},
        "prefill_tok_s": {str(n): n / statistics.median(v) for n, v in prefill_s.items()},
        "ttft_tokens": lengths[0],
        "ttft_s": statistics.median(prefill_s[lengths[0]]),
        "decode_prompt_tokens": decode_prompt,
        "decode_tokens": steps,
        "decode_tok_s": decode_med,
        "decode_tok_s_runs": decode_tps,
        "weight_bytes": wbytes,
        "bytes_per_token": wbytes,
        "effective_gb_s": wbytes * decode_med / 1e9,
        "peak_rss_mb": peak_rss_mb(),
        "kernels": kernels_used(m),
    }
    if not quiet:
        print(jsonlib.dumps(result, indent=2) if json else format_table(result))
    return result


def kernels_used(model) -> str:
    """Which products the model runs: the C++ kernels' instruction set (and whether the one-call decode step is
    attached), or PyTorch."""
    from tinkerlm.kernels import ops
    from tinkerlm.quant import QLinear

    if not any(isinstance(m, QLinear) for m in model.modules()):
        return "PyTorch (float weights)"
    k = ops()
    if k is None:
        return "PyTorch fallback (no C++ kernels)"
    return f"C++ {k.isa}" + (", fused decode step" if getattr(model, "fused_decode", None) is not None else "")


def format_table(r: dict) -> str:
    rows = [
        ("model", r["model"]),
        ("dtype / quant / KV cache", f"{r['dtype']} / {r['quant']} / {r['kv_cache']}"),
        ("kernels", r["kernels"]),
        ("threads", str(r["threads"])),
        ("load", f"{r['load_s']:.2f} s"),
    ]
    for n in r["prompt_tokens"]:
        rows.append(
            (f"prefill {n} tokens", f"{r['prefill_tok_s'][str(n)]:.1f} tok/s  ({r['prefill_s'][str(n)]:.3f} s)")
        )
    rows += [
        (f"time to first token ({r['ttft_tokens']} tokens)", f"{r['ttft_s'] * 1000:.0f} ms"),
        (f"decode {r['decode_tokens']} tokens", f"{r['decode_tok_s']:.1f} tok/s"),
        ("weights read per token", f"{r['weight_bytes'] / 1e6:.1f} MB"),
        ("effective bandwidth", f"{r['effective_gb_s']:.2f} GB/s"),
        ("peak RSS", f"{r['peak_rss_mb']:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    head = f"tinkerlm bench (median of {r['runs']} run{'s' if r['runs'] != 1 else ''}, torch {r['torch']})"
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])
