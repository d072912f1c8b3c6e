"""Load time and peak memory of GGUF files: `tinkerlm.load` in a fresh process, first load (repacking and writing the
packed-weight cache), second load (mapping the cache) and the cache turned off, in seconds, s/GB and peak RSS.

    .venv/bin/python bench/load_bench.py /work/gguf/llama1b-q4_k_m.gguf
    .venv/bin/python bench/load_bench.py smollm2 a.gguf b.gguf --runs 5

Arguments are GGUF paths or store names. Each run is a new Python process that imports tinkerlm and the (already
built) kernels first, then times `tinkerlm.load` alone, wall-clock and CPU (all threads; the machine's neighbours
change the first, much less the second). Imports are excluded, as in compare.py's load column, and shown apart;
so is the first `tokenizer.encode` after the load (a cached load builds the tokenizer then, on first use).
Variants, alternated within each run:
- `first`: no cache: read the header, build the tokenizer, repack every quantized tensor (in C++), build the model,
  then write the cache (`tinkerlm.pack_cache`);
- `second`: the cache of the previous `first`: map it, check its checksums, build the model over the map;
- `off`: TINKERLM_PACK_CACHE=0, the load without a cache (what `first` costs less the writing).
The GGUF's pages are warmed by one untimed read first, so the figures are the conversion's, not the disk's (the cache
is in the page cache after being written). Caches go to a temporary TINKERLM_HOME, deleted at the end. Peak RSS is
the child's `ru_maxrss` at the end of the load, the part before it (Python, torch, the kernels) shown apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VARIANTS = ("first", "second", "off")

CHILD = """
import json, resource, sys, time
t = time.perf_counter()
import tinkerlm, tinkerlm.api
from tinkerlm import kernels, quant
kernels.ops()
imports = time.perf_counter() - t
packs, real = [], quant.packed_state_dict
quant.packed_state_dict = lambda ckpt: packs.append(1) or real(ckpt)  # counts the repacks
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t, c = time.perf_counter(), time.process_time()
llm = tinkerlm.load(sys.argv[1])
wall, cpu = time.perf_counter() - t, time.process_time() - c
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
llm.tokenizer.encode("Hello")
encode = time.perf_counter() - t
out = {"where": tinkerlm.__file__, "wall": wall, "cpu": cpu, "peak_kib": peak, "base_kib": base, "packs": len(packs)}
out.update(imports=imports, encode=encode)
print(json.dumps(out))
"""


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def resolve(arg: str) -> Path:
    path = Path(arg).expanduser()
    if path.exists():
        return path.resolve()
    from tinkerlm import store

    return store.model_path(store.get(arg))


def run(path: Path, variant: str) -> dict:
    """One load in a fresh process; caches go to the TINKERLM_HOME this process has set."""
    from tinkerlm import pack_cache

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env["TINKERLM_PACK_CACHE"] = "0" if variant == "off" else "1"  # "1": GGUFs given by path are cached too
    if variant == "first":
        pack_cache.cache_path(path).unlink(missing_ok=True)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["where"].startswith(str(ROOT)), result["where"]  # this checkout's tinkerlm
    if variant != "off":
        assert pack_cache.cache_path(path).is_file(), f"{variant}: no cache written"
    assert result["packs"] == (variant != "second"), f"{variant}: repacked {result['packs']} times (edited mid-run?)"
    return result


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="GGUF paths or store names")
    ap.add_argument("--runs", type=int, default=3, help="runs of each variant (alternated)")
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    for path in [resolve(arg) for arg in args.models]:  # store names in the real store
        warm(path)
        size = path.stat().st_size
        gb = size / 1e9
        with tempfile.TemporaryDirectory(prefix="load-bench-") as home:
            os.environ["TINKERLM_HOME"] = home  # the caches' home, for the children too
            results = {v: [] for v in VARIANTS}
            for _ in range(args.runs):
                for variant in VARIANTS:  # `second` follows the `first` that wrote its cache
                    results[variant].append(run(path, variant))
            from tinkerlm import pack_cache

            cache_mb = pack_cache.cache_path(path).stat().st_size / 2**20
        print(
            f"{path.name}: {gb:.3f} GB ({size / 2**20:.0f} MiB), cache {cache_mb:.0f} MiB, {args.runs} runs, "
            "median [min-max]"
        )
        for variant in VARIANTS:
            rs = results[variant]
            wall, cpu = [r["wall"] for r in rs], [r["cpu"] for r in rs]
            peak = statistics.median(r["peak_kib"] for r in rs) / 1024
            base = statistics.median(r["base_kib"] for r in rs) / 1024
            imports = statistics.median(r["imports"] for r in rs)
            encode = statistics.median(r["encode"] for r in rs) * 1e3
            print(
                f"  {variant:6s} wall {spread(wall)} s = {statistics.median(wall) / gb:.3f} s/GB, "
                f"cpu {spread(cpu)} s = {statistics.median(cpu) / gb:.3f} s/GB; "
                f"peak RSS {peak:.0f} MiB ({peak / (size / 2**20):.2f}x the file; {base:.0f} MiB before loading); "
                f"imports {imports:.2f} s, first encode {encode:.0f} ms"
            )
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
