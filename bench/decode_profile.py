"""Where a decode step's time goes: the fused C++ step against the same weights through the PyTorch modules,
with 2 threads and 1, and the fp32 modules; then the fused step's phases (kernels/decode.cpp times them when asked).
Prints Markdown tables (pasted into BENCHMARKS.md).

    .venv/bin/python bench/decode_profile.py [MODEL]      # default: smollm2
"""

from __future__ import annotations

import sys
import time

import torch

import tinkerlm
from tinkerlm.sampling import SamplingParams, sample


def step_ms(model, n: int = 60) -> float:
    """Milliseconds of one single-sequence decode step at position ~10, averaged over `n` steps."""
    cache = model.new_cache(1, 512)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3, 4]]), cache=cache)
        cache.advance(4)
        token = torch.tensor([[5]])
        for _ in range(5):
            model(token, cache=cache)
            cache.advance(1)
        start = time.perf_counter()
        for _ in range(n):
            model(token, cache=cache)
            cache.advance(1)
    return (time.perf_counter() - start) / n * 1e3


def phases_ms(model, n: int = 60) -> list[tuple[str, float]]:
    """Milliseconds a step spends in each phase of the fused step (kernels/decode.cpp: decode_profile)."""
    from tinkerlm.kernels import ops

    ops().decode_profile(True)
    step_ms(model, n)
    prof = ops().decode_profile(False)
    return [(phase, seconds / (n + 5) * 1e3) for phase, seconds in prof]  # step_ms runs n + 5 one-token steps


def read_gb_s(threads: int = 2) -> float:
    """Memory read bandwidth right now (sum over 1 GiB, best of 3): decode is bound by it, and on a shared machine
    it moves with the neighbours' load, so the profile is only comparable with it."""
    torch.set_num_threads(threads)
    a = torch.ones(1 << 28)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    bandwidth = read_gb_s()
    rows, phases = {}, {}
    for threads in (2, 1):
        model = tinkerlm.load(name, threads=threads).model
        fused = step_ms(model)
        phases[threads] = phases_ms(model)
        saved, model.fused_decode = model.fused_decode, None
        rows[threads] = (fused, step_ms(model))
        model.fused_decode = saved
    fp32 = step_ms(tinkerlm.load(name, quant="fp32", threads=2).model)
    logits = torch.randn(1, model.lm_head.out_features)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(200):
        sample(logits, SamplingParams(temperature=1.0), g)
    sample_ms = (time.perf_counter() - start) / 200 * 1e3
    print("| decode step, one token, 1 sequence | 2 threads | 1 thread |\n|---|---:|---:|")
    print(f"| fused C++ step | {rows[2][0]:.1f} ms | {rows[1][0]:.1f} ms |")
    print(f"| same quantized weights through the PyTorch modules | {rows[2][1]:.1f} ms | {rows[1][1]:.1f} ms |")
    print(f"| fp32 dequantized weights through the PyTorch modules | {fp32:.1f} ms | |")
    print(f"| sampling one row at temperature 1 | {sample_ms:.2f} ms | |")
    print("\n| phase of the fused step | 2 threads | 1 thread |\n|---|---:|---:|")
    for (phase, two), (_, one) in zip(phases[2], phases[1]):
        print(f"| {phase} | {two:.2f} ms | {one:.2f} ms |")
    print(f"| total | {sum(v for _, v in phases[2]):.2f} ms | {sum(v for _, v in phases[1]):.2f} ms |")
    print(f"\nmemory read bandwidth at the start (2 threads): {bandwidth:.1f} GB/s")


if __name__ == "__main__":
    main()
