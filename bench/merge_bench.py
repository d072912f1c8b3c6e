"""Merge time and peak memory: `tinkerlm merge` against `mergekit-yaml` on the same inputs and recipes.

    .venv/bin/pip install -e '.[mergekit]'
    .venv/bin/python bench/merge_bench.py                          # slerp, ties, linear; 3 runs each: ~3 minutes
    .venv/bin/python bench/merge_bench.py --methods slerp --runs 5 --dtype float32

Inputs: SmolLM2-135M-Instruct (the store's `smollm2`, pulled if missing) exported once to a Hugging Face
directory with tinkerlm (mergekit does not read GGUF), and a second model made from it by adding small noise to
every weight (a stand-in for a fine-tune, so that SLERP and TIES do real work). Both engines get the same torch
thread count (`--threads`, through OMP_NUM_THREADS). Both are safetensors in `--dtype`
(bfloat16, as Hub checkpoints ship). They live in a scratch store under `--work`; the user's store is not touched
beyond pulling smollm2.

Each merge runs in a fresh process, engines taking turns run by run; the table shows the median wall time
(process start to exit: imports, reading, merging, writing; for tinkerlm also hashing the files into the store)
and the median peak RSS (the child's ru_maxrss from wait4). The last column checks that both engines wrote the same
weights: the largest absolute difference over all tensors (bf16 outputs differ by rounding: mergekit computes
TIES in the inputs' dtype, tinkerlm in fp32).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RECIPES = {
    "slerp": {
        "merge_method": "slerp",
        "base_model": "A",
        "slices": [{"sources": [{"model": "A", "layer_range": [0, 30]}, {"model": "B", "layer_range": [0, 30]}]}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "A",
        "parameters": {"normalize": True},
        "models": [{"model": "A"}, {"model": "B", "parameters": {"weight": 0.7, "density": 0.5}}],
    },
    "linear": {
        "merge_method": "linear",
        "models": [{"model": "A", "parameters": {"weight": 0.6}}, {"model": "B", "parameters": {"weight": 0.4}}],
    },
}


def _names(recipe, mapping):
    if isinstance(recipe, dict):
        return {k: (mapping[v] if k in ("model", "base_model") else _names(v, mapping)) for k, v in recipe.items()}
    if isinstance(recipe, list):
        return [_names(x, mapping) for x in recipe]
    return recipe


def prepare(work: Path, dtype: str) -> dict[str, str]:
    """The two input models in the scratch store; returns {"A": name, "B": name, "A_path":..., "B_path":...}."""
    import torch

    from tinkerlm import store
    from tinkerlm.formats.hf import SafetensorsWriter
    from tinkerlm.merge import merge
    from tinkerlm.merge.sources import HFSource

    src = store.model_path(store.pull("smollm2", progress=False))  # the user's store
    os.environ["TINKERLM_HOME"] = str(work / "store")
    if store.find("smol-a") is None:
        store.pull(str(src), name="smollm2", progress=False)
        merge(
            {"merge_method": "passthrough", "models": [{"model": "smollm2"}], "dtype": dtype}, "smol-a", progress=False
        )
    if store.find("smol-b") is None:
        a = store.get("smol-a")
        d = work / "smol-b"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        s = HFSource("smol-a", a, store.model_path(a))
        g = torch.Generator().manual_seed(0)
        header = [(n, s.dtype(n), s.shape(n)) for n in s.names]
        with SafetensorsWriter(d / "model.safetensors", header) as w:
            for n in s.names:
                t = s.tensor(n)
                w.write(n, t + 0.02 * t.std() * torch.randn(t.shape, generator=g))  # a fine-tune-sized change
        s.close()
        for f in store.model_path(a).iterdir():
            if f.name not in ("model.safetensors", "manifest.json"):
                shutil.copyfile(f, d / f.name)
        store.pull(str(d), name="smol-b", progress=False)
        shutil.rmtree(d)
    return {
        "A": "smol-a",
        "B": "smol-b",
        "A_path": str(store.model_path(store.get("smol-a"))),
        "B_path": str(store.model_path(store.get("smol-b"))),
    }


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def max_diff(a_dir: Path, b_dir: Path) -> float:
    from safetensors.torch import load_file

    ours, theirs = {}, {}
    for f in a_dir.glob("*.safetensors"):
        ours |= load_file(f)
    for f in b_dir.glob("*.safetensors"):
        theirs |= load_file(f)
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="slerp,ties,linear", help="comma-separated: " + ", ".join(RECIPES))
    p.add_argument("--runs", type=int, default=3, help="runs per engine and method; the median is reported")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="inputs' and output dtype")
    p.add_argument("--work", default="/tmp/tinkerlm-merge-bench", help="scratch directory (inputs, outputs)")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads for both engines (OMP_NUM_THREADS; tinkerlm also gets --threads)",
    )
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # prepare WORK DTYPE | diff DIR DIR
    a = p.parse_args()
    if a.worker:
        import json

        if a.worker[0] == "prepare":
            print(json.dumps(prepare(Path(a.worker[1]), a.worker[2])))
        else:
            print(json.dumps(max_diff(Path(a.worker[1]), Path(a.worker[2]))))
        return

    # The parent stays small (no torch): a child forked from it would start with the parent's RSS counted as its
    # own, so inputs are prepared and outputs compared in worker processes.
    import json

    import yaml

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    mergekit = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) or shutil.which("mergekit-yaml")
    if mergekit is None:
        raise SystemExit("mergekit-yaml not found: pip install -e '.[mergekit]'")

    def worker(*args: str):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", *args], check=True, capture_output=True, text=True
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    models = worker("prepare", str(work), a.dtype)
    env = {**os.environ, "TINKERLM_HOME": str(work / "store"), "OMP_NUM_THREADS": str(a.threads)}
    tinkerlm = str(Path(sys.executable).parent / "tinkerlm")
    load_before = os.getloadavg()[0]
    rows = []
    for method in a.methods.split(","):
        recipe = {**RECIPES[method], "dtype": a.dtype}
        ours = work / f"{method}-tinkerlm.yaml"
        theirs = work / f"{method}-mergekit.yaml"
        ours.write_text(yaml.safe_dump(_names(recipe, {"A": models["A"], "B": models["B"]})))
        theirs.write_text(yaml.safe_dump(_names(recipe, {"A": models["A_path"], "B": models["B_path"]})))
        out_dir = work / "mergekit-out"
        times = {"tinkerlm": [], "mergekit": []}
        for i in range(a.runs):
            engines = ["tinkerlm", "mergekit"] if i % 2 == 0 else ["mergekit", "tinkerlm"]
            for engine in engines:
                if engine == "tinkerlm":
                    cmd = [
                        tinkerlm,
                        "merge",
                        str(ours),
                        "--out",
                        f"bench-{method}",
                        "--force",
                        "--threads",
                        str(a.threads),
                    ]
                else:
                    shutil.rmtree(out_dir, ignore_errors=True)
                    cmd = [mergekit, str(theirs), str(out_dir), "--quiet"]
                times[engine].append(run(cmd, env))
                print(
                    f"{method} {engine} run {i + 1}: {times[engine][-1][0]:.1f} s, {times[engine][-1][1]:.0f} MiB",
                    file=sys.stderr,
                )
        diff = worker("diff", str(work / "store" / "models" / f"bench-{method}" / "latest"), str(out_dir))
        med = {e: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for e, v in times.items()}
        rows.append((method, med, diff))
        subprocess.run([tinkerlm, "rm", f"bench-{method}"], env=env, check=True, capture_output=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    load_after = os.getloadavg()[0]

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    )
    print(
        f"`{Path(sys.executable).name} bench/merge_bench.py --methods {a.methods} --runs {a.runs} "
        f"--dtype {a.dtype} --threads {a.threads}` on {cpu}, {os.cpu_count()} CPUs, torch {_version('torch')}, "
        f"mergekit {_version('mergekit')}; load average {load_before:.2f} before, {load_after:.2f} after.\n"
    )
    print(
        "Inputs: SmolLM2-135M-Instruct as HF safetensors and a noised copy, both "
        f"{a.dtype}; output {a.dtype}. Medians of {a.runs} fresh-process runs per engine, engines alternating.\n"
    )
    print(
        "| method | tinkerlm s | mergekit s | time ratio | tinkerlm peak RSS MiB | mergekit peak RSS MiB | "
        "RSS ratio | max abs diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, med, diff in rows:
        (tw, tm), (mw, mm) = med["tinkerlm"], med["mergekit"]
        print(
            f"| {method} | {tw:.1f} | {mw:.1f} | {tw / mw:.2f}x | {tm:.0f} | {mm:.0f} | {tm / mm:.2f}x | {diff:.2g} |"
        )
    print("\nRatios are tinkerlm / mergekit: below 1 is better for both.")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
