"""One activation row times one packed weight matrix (a decode step's product), per packed format, on Llama 3.2 1B's
shapes: milliseconds and GB/s of packed bytes read, in cache (the same matrix again and again) and out of it
(a rotation through copies totalling at least --rotate-mb, so each call reads its weights from memory).

    .venv/bin/python bench/matvec_bench.py                       # Q4_0 Q4_K Q6_K Q8_0, 2 threads
    .venv/bin/python bench/matvec_bench.py --types Q6_K --threads 1 --calls 50
    .venv/bin/python bench/matvec_bench.py --rows 256 --threads 1  # prefill: GMAC/s against fp32 BLAS

With --rows N > 1 each product is N activation rows (a prefill's), timed in cache only and reported as billions of
multiply-adds a second beside torch's fp32 matmul on the dequantized weight, the same rows and threads.

The weights are random blocks with a fixed fp16 scale (the products' speed does not depend on the values), packed
by the kernels as a GGUF's would be (Q4_0 as X4S, Q4_K as X4K, Q6_K as X6K, Q8_0 as X8: kernels/common.h). Each
figure is the median of --reps repetitions of --calls calls; the spread (min-max over repetitions) is printed beside
it. On a shared machine, compare formats
within one run and note `uptime`'s load average (printed first); --threads 1 --cpu-time there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from tinkerlm import kernels
from tinkerlm.quant import qops
from tinkerlm.quant.qtensor import BLOCK_BYTES, K_TYPES, QTensor

SHAPES = {"qkv/o 2048x2048": (2048, 2048), "gate/up 8192x2048": (8192, 2048), "down 2048x8192": (2048, 8192),
          "head 128256x2048": (128256, 2048)}  # fmt: skip
SCALE_AT = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "Q3_K": [108],
    "Q2_K": [80, 82],
}  # fmt: skip  byte offsets of a block's fp16 scales, set to a fixed value


def random_weight(qtype: str, rows: int, K: int, seed: int) -> QTensor:
    """Random blocks of `qtype` (rows, K), every fp16 scale 0.01 (no NaNs or infinities)."""
    block, per = (K_TYPES[qtype][1], 256) if qtype in K_TYPES else (BLOCK_BYTES[qtype], 32)
    raw = np.random.default_rng(seed).integers(0, 256, size=(rows, K // per, block), dtype=np.uint8)
    for at in SCALE_AT[qtype]:
        raw[..., at : at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return QTensor(torch.from_numpy(raw.reshape(rows, -1)), qtype, K)


def time_calls(k, x, mats, calls: int, reps: int, clock) -> list[float]:
    """Milliseconds per call by `clock`, one figure per repetition, cycling through `mats`."""
    out = []
    for _ in range(reps):
        start = clock()
        for i in range(calls):
            w = mats[i % len(mats)]
            k.qmatmul(x, w.data, w.fmt, w.rows)
        out.append((clock() - start) / calls * 1e3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", default="Q4_0,Q4_K,Q6_K,Q8_0", help="GGUF block types, comma-separated")
    p.add_argument("--shapes", default=",".join(SHAPES), help="shape names, comma-separated")
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads")
    p.add_argument("--calls", type=int, default=40, help="calls per repetition")
    p.add_argument("--reps", type=int, default=7, help="repetitions (median reported)")
    p.add_argument(
        "--cpu-time", action="store_true", help="time by the process's CPU time (a loaded machine, 1 thread)"
    )
    p.add_argument("--rotate-mb", type=int, default=256, help="out of cache: total MB of copies rotated through")
    p.add_argument("--rows", type=int, default=1, help="activation rows per product (above 1: prefill, GMAC/s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    k = kernels.ops()
    clock = "CPU time" if args.cpu_time else "wall time"
    print(
        f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; isa {k.isa}; threads {args.threads}; {clock}"
    )
    if args.rows > 1:
        return prefill_table(k, args)
    print("| type | fmt | shape | MB | in cache ms | GB/s | out of cache ms | GB/s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in args.shapes.split(","):
        rows, K = SHAPES[name]
        x = torch.randn(1, K)
        for qtype in args.types.split(","):
            w = qops.pack(random_weight(qtype, rows, K, 0))
            mb = w.nbytes / 1e6
            copies = max(2, -(-args.rotate_mb // int(mb)))
            rotation = [w] + [qops.pack(random_weight(qtype, rows, K, s)) for s in range(1, copies)]
            k.qmatmul(x, w.data, w.fmt, w.rows)  # warm
            calls = max(4, min(args.calls, int(args.calls * 50 / mb)))  # big matrices: fewer calls
            clock = time.process_time if args.cpu_time else time.perf_counter
            hot = time_calls(k, x, [w], calls, args.reps, clock)
            cold = time_calls(k, x, rotation, max(calls, copies), args.reps, clock)
            row = [qtype, str(w.fmt), name, f"{mb:.1f}"]
            for ms in (hot, cold):
                med = statistics.median(ms)
                row += [f"{med:.3f} ({min(ms):.3f}-{max(ms):.3f})", f"{w.nbytes / med / 1e6:.0f}"]
            print("| " + " | ".join(row) + " |", flush=True)
            del rotation, w


def prefill_table(k, args) -> None:
    """--rows N: N activation rows times each matrix, against fp32 BLAS on the dequantized weight."""
    print(f"{args.rows} activation rows per product")
    print("| type | fmt | shape | ms | GMAC/s | fp32 BLAS ms | GMAC/s | packed / BLAS |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    clock = time.process_time if args.cpu_time else time.perf_counter
    for name in args.shapes.split(","):
        rows, K = SHAPES[name]
        if rows * K > 64 * 2**20:
            continue  # the output head: no prefill computes it for every row
        x = torch.randn(args.rows, K)
        for qtype in args.types.split(","):
            w = qops.pack(random_weight(qtype, rows, K, 0))
            dense = qops.dequantize(w)
            calls = max(2, args.calls // 10)
            k.qmatmul(x, w.data, w.fmt, w.rows)
            packed = statistics.median(time_calls(k, x, [w], calls, args.reps, clock))
            times = []
            for _ in range(args.reps):
                start = clock()
                for _ in range(calls):
                    x @ dense.T
                times.append((clock() - start) / calls * 1e3)
            blas = statistics.median(times)
            mac = args.rows * rows * K / 1e6
            row = [qtype, str(w.fmt), name, f"{packed:.1f}", f"{mac / packed:.1f}", f"{blas:.1f}", f"{mac / blas:.1f}"]
            print("| " + " | ".join(row) + f" | {blas / packed:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
