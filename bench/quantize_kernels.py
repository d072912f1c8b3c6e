"""Time tinkerlm's quantizers (tinkerlm.quant.encode) against llama.cpp's ggml_quantize_chunk on a real model.

    .venv/bin/python bench/quantize_kernels.py                        # smollm2, Q4_K Q6_K Q2_K, with and without imatrix
    .venv/bin/python bench/quantize_kernels.py --types Q4_0,Q8_0 --gguf model.gguf

Every 2-D weight of the GGUF is dequantized to float32 once, then cut into rows of 1536 values where its row
length allows and of 256 otherwise (SmolLM2's 576-wide rows do not split into 256-value super-blocks; the cost of
quantizing is per super-block, so the reshaping changes neither side's work). Both sides get the same rows and the
same threads: tinkerlm its OpenMP pool (torch.get_num_threads()), llama.cpp as llama-quantize runs it, one
ggml_quantize_chunk call per thread on its share of the rows (ctypes releases the GIL). The imatrix runs use one
random imatrix per tensor. Each figure is the best of --runs; the blocks are checked byte-identical too.
On a machine shared with other work, OpenMP's spin-waiting threads add ~5-8 ms to each of the 211 calls (the
small tensors suffer most); OMP_WAIT_POLICY=passive removes that, and the results note which policy ran.
Needs llama-cpp-python (its libggml-base).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from tinkerlm.quant.encode import GGML_TYPES, encode


def load_rows(path: Path) -> list[np.ndarray]:
    reader = gguf.GGUFReader(path)
    out = []
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        K = 1536 if w.size % 1536 == 0 and w.shape[-1] % 1536 == 0 else 256
        out.append(w.reshape(-1, K))
    return out


def ggml_quantizer(threads: int):
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    pool = ThreadPoolExecutor(threads)

    def quantize(x: np.ndarray, qtype: str, im: np.ndarray | None) -> np.ndarray:
        type_id = GGML_TYPES[qtype][0]
        rows, K = x.shape
        out = np.empty((rows, lib.ggml_row_size(type_id, K)), np.uint8)
        imp = None if im is None else im.ctypes.data
        bounds = np.linspace(0, rows, threads + 1).astype(int)

        def part(i):  # rows [r0, r1): llama-quantize's chunks, one per thread
            r0, r1 = int(bounds[i]), int(bounds[i + 1])
            if r1 > r0:
                lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, r0 * K, r1 - r0, K, imp)

        list(pool.map(part, range(threads)))
        return out

    return quantize


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="GGUF to take the weights from (default: the catalogue's smollm2)")
    ap.add_argument("--types", default="Q4_K,Q6_K,Q2_K", help="comma-separated ggml types")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per case; the best is reported")
    args = ap.parse_args(argv)
    if args.gguf is None:
        from tinkerlm import store

        path = store.model_path(store.pull("smollm2", progress=False))
    else:
        path = Path(args.gguf)
    threads = torch.get_num_threads()
    tensors = load_rows(path)
    n = sum(t.size for t in tensors)
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"{path.name}: {len(tensors)} tensors, {n / 1e6:.1f}M weights, {threads} threads, OMP_WAIT_POLICY {policy}")
    ggml = ggml_quantizer(threads)
    rng = np.random.default_rng(0)
    imats = [(rng.random(t.shape[1], dtype=np.float32) ** 4 * 10) for t in tensors]
    print("| type | imatrix | tinkerlm s | llama.cpp s | ratio (llama.cpp / tinkerlm) | identical |")
    print("|---|---|---|---|---|---|")
    for qtype in args.types.split(","):
        for use_im in (False, True):
            best = {"tinkerlm": float("inf"), "llama.cpp": float("inf")}
            same = True
            for _ in range(args.runs):
                t0 = time.perf_counter()
                ours = [
                    encode(torch.from_numpy(t), qtype, torch.from_numpy(m) if use_im else None)
                    for t, m in zip(tensors, imats)
                ]
                best["tinkerlm"] = min(best["tinkerlm"], time.perf_counter() - t0)
                t0 = time.perf_counter()
                theirs = [ggml(t, qtype, m if use_im else None) for t, m in zip(tensors, imats)]
                best["llama.cpp"] = min(best["llama.cpp"], time.perf_counter() - t0)
                same = same and all(np.array_equal(a, b) for a, b in zip(ours, theirs))
            ratio = best["llama.cpp"] / best["tinkerlm"]
            print(
                f"| {qtype} | {'yes' if use_im else 'no'} | {best['tinkerlm']:.2f} | {best['llama.cpp']:.2f} | {ratio:.2f} | {same} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
