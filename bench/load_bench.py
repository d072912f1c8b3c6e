"""Load time of GGUF files: `tinkerlm.load(path)` in a fresh process, seconds and seconds per GB of file.

    .venv/bin/python bench/load_bench.py /work/gguf/llama1b-q4_k_m.gguf
    .venv/bin/python bench/load_bench.py a.gguf b.gguf --runs 3

Each run is a new Python process that imports tinkerlm and the (already built) kernels first, then times
`tinkerlm.load` alone: reading the header, mapping the file, converting and packing every quantized tensor
(K-quant super-blocks straight into the kernels' layout, in C++), building the model. The file's pages are warmed
by one untimed read first, so the figure is the conversion's, not the disk's. The best of the runs is reported
(the machine's noise only ever adds time).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys, time
import tinkerlm
from tinkerlm import kernels
kernels.ops()
t = time.perf_counter()
llm = tinkerlm.load(sys.argv[1])
print(tinkerlm.__file__, time.perf_counter() - t)
"""


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for path in args.paths:
        warm(path)
        times = []
        for _ in range(args.runs):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(Path(path).resolve())],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if out.returncode:
                sys.exit(out.stderr)
            where, seconds = out.stdout.split()[-2:]
            assert where.startswith(str(ROOT)), where  # this checkout's tinkerlm
            times.append(float(seconds))
        gb = os.path.getsize(path) / 1e9
        best = min(times)
        print(f"{Path(path).name}: {gb:.2f} GB, load {best:.2f} s (best of {args.runs}), {best / gb:.3f} s/GB")


if __name__ == "__main__":
    main()
