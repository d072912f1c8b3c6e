"""The kernels' vector math against the plain C++ loops and torch: SwiGLU forward and backward (pretraining and
fine-tuning) and the causal prefill attention, for this CPU's build and the scalar build (isa_plain.h's loops, what
AVX2 builds ran before they had their own vector math), in one run. Prints a Markdown table.

    .venv/bin/python bench/vector_math_bench.py [--threads 2] [--reps 30]

Milliseconds, median of --reps calls after a warm-up, wall time; the scalar build compiles once (about a minute).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tinkerlm import kernels

SCALAR = ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")  # as tests/test_kquants.py's portable build


def ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--reps", type=int, default=30, help="timed calls per case (default: 30)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    builds = {"this CPU": kernels.ops(), "scalar": kernels.build(SCALAR)}
    g = torch.Generator().manual_seed(0)
    gate, up, grad = torch.randn(3, 2048, 512, generator=g)  # the pretraining example's MLP: 8 x 256 tokens, 512
    cases = [
        ("SwiGLU forward, 2048 x 512", lambda k: k.swiglu_fwd(gate, up), None),
        ("SwiGLU backward, 2048 x 512", lambda k: k.swiglu_bwd(grad, gate, up), None),
    ]
    for B, H, T, hd in [(8, 6, 256, 32), (1, 32, 256, 64), (1, 9, 1024, 64)]:
        q, k, v = torch.randn(3, B, H, T, hd, generator=g)
        cases.append(
            (
                f"causal attention {B} x {H} heads x {T} x {hd}",
                lambda m, q=q, k=k, v=v, hd=hd: m.attention_causal(q, k, v, hd**-0.5),
                lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
            )
        )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"isa {builds['this CPU'].isa}; {a.threads} threads; median of {a.reps}; load average {load}\n")
    print(
        f"| op | {builds['this CPU'].isa} ms | scalar loops ms | speed-up | torch ms | {builds['this CPU'].isa} vs torch |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, fn, ref in cases:
        fast, slow = (ms(lambda b=b, fn=fn: fn(b), a.reps) for b in builds.values())
        torch_ms = ms(ref, a.reps) if ref is not None else None
        vs = f"{torch_ms / fast:.2f}x" if torch_ms else ""
        tcol = f"{torch_ms:.2f}" if torch_ms else ""
        print(f"| {name} | {fast:.3f} | {slow:.3f} | {slow / fast:.1f}x | {tcol} | {vs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
