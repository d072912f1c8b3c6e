"""Compare tinkerlm with transformers and llama.cpp on one GGUF model; write BENCHMARKS.md and a chart.

    .venv/bin/python bench/compare.py                      # smollm2, all engines, 3 runs each
    .venv/bin/python bench/compare.py --engines tinkerlm,llama.cpp --quant int8 --runs 5

Every engine gets the same GGUF file, the same prompt token ids (the shipped public-domain text, tokenized by
tinkerlm, cut to exactly N tokens) and the same thread count. Each measurement runs in its own fresh process
(so load time and peak RSS are clean), engines take turns run by run, and the table shows medians.

Per process: load_s (the engine's load call to a ready model; imports excluded and reported apart), prefill
tok/s (prompt_tokens / time to the first token of a prompt_tokens-token prompt), decode tok/s (greedy, EOS
ignored, decode_tokens one-token steps after a 16-token prompt, timed from the first token to the last) and
peak RSS (VmHWM at exit, including the engine's libraries).

Engines: tinkerlm (`tinkerlm.load(path, quant=...)`, `generate_step`), transformers (fp32,
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which dequantizes the GGUF; `generate` with a
streamer for timestamps) and llama.cpp (`llama_cpp.Llama`, the GGUF's own quantized kernels; skipped with a note
when llama-cpp-python is not installed: `pip install llama-cpp-python`, about 10 minutes to build).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("tinkerlm", "transformers", "llama.cpp")
METRICS = (  # key, label, unit, higher is better
    ("load_s", "load", "s", False),
    ("decode_tok_s", "decode", "tok/s", True),
    ("prefill_tok_s", "prefill", "tok/s", True),
    ("peak_rss_mb", "peak RSS", "MiB", False),
)
DECODE_PROMPT_TOKENS = 16


# -- workers: one measurement of one engine, run in a fresh process -------------------------------------------------


def _peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker_tinkerlm(spec: dict) -> dict:
    t0 = time.perf_counter()
    import tinkerlm
    from tinkerlm.bench import decode_time, first_token_time

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = tinkerlm.load(spec["model"], dtype=spec["dtype"], quant=spec["quant"], threads=spec["threads"])
    load_s = time.perf_counter() - t0
    decode_time(llm.model, spec["decode_ids"], 4)  # warm-up, as for the other engines
    prefill_s = first_token_time(llm.model, spec["prefill_ids"])
    seconds, steps = decode_time(llm.model, spec["decode_ids"], spec["decode_tokens"])
    return {"import_s": import_s, "load_s": load_s, "prefill_s": prefill_s, "decode_s": seconds, "steps": steps}


def worker_transformers(spec: dict) -> dict:
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    import_s = time.perf_counter() - t0
    torch.set_num_threads(spec["threads"])
    path = Path(spec["model"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0

    class Stamps(BaseStreamer):
        """Wall-clock time of each `put`: the prompt first, then one call per generated token."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(ids, new_tokens):
        stamps = Stamps()
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=stamps,
                pad_token_id=0,
            )
        return t0, stamps.times[1:]  # drop the prompt's put

    run(spec["decode_ids"], 5)  # warm-up
    t0, times = run(spec["prefill_ids"], 1)
    prefill_s = times[0] - t0
    _, times = run(spec["decode_ids"], spec["decode_tokens"] + 1)
    return {
        "import_s": import_s,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "decode_s": times[-1] - times[0],
        "steps": len(times) - 1,
    }


def worker_llamacpp(spec: dict) -> dict:
    t0 = time.perf_counter()
    import llama_cpp

    import_s = time.perf_counter() - t0
    n_ctx = max(len(spec["prefill_ids"]), len(spec["decode_ids"]) + spec["decode_tokens"]) + 8
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=n_ctx,
        n_batch=max(512, len(spec["prefill_ids"])),
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        verbose=False,
    )
    load_s = time.perf_counter() - t0

    def run(ids, new_tokens):
        """(start, per-token times): greedy (temp 0), no repetition penalty; llama.cpp's generate never stops on EOS."""
        times = []
        llm.reset()  # else generate() reuses a cached prefix and skips part of the prefill
        t0 = time.perf_counter()
        for _ in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == new_tokens:
                break
        return t0, times

    run(spec["decode_ids"], 5)  # warm-up
    t0, times = run(spec["prefill_ids"], 1)
    prefill_s = times[0] - t0
    _, times = run(spec["decode_ids"], spec["decode_tokens"] + 1)
    return {
        "import_s": import_s,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "decode_s": times[-1] - times[0],
        "steps": len(times) - 1,
        "llama_cpp": llama_cpp.__version__,
    }


def worker_bandwidth(spec: dict) -> dict:
    """Memory read bandwidth now, with the engines' thread count: the best of 5 sums over 1 GiB (bigger than any
    cache). Measured between the engines' runs, since on a shared host it moves with the neighbours' load."""
    import torch

    torch.set_num_threads(spec["threads"])
    a = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return {"read_gb_s": a.numel() * 4 / best / 1e9}


WORKERS = {"tinkerlm": worker_tinkerlm, "transformers": worker_transformers, "llama.cpp": worker_llamacpp}


def worker_main(engine: str, spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    if engine == "bandwidth":
        print("RESULT " + json.dumps(worker_bandwidth(spec)), flush=True)
        return
    r = WORKERS[engine](spec)
    r["prefill_tok_s"] = len(spec["prefill_ids"]) / r["prefill_s"]
    r["decode_tok_s"] = r["steps"] / r["decode_s"]
    r["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(r), flush=True)


# -- driver ---------------------------------------------------------------------------------------------------------


def available(engine: str) -> str | None:
    """None when `engine` can run here, else why not."""
    module = {"tinkerlm": "tinkerlm", "transformers": "transformers", "llama.cpp": "llama_cpp"}[engine]
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"`import {module}` failed ({last}); install it (`pip install llama-cpp-python` for llama.cpp)"
    return None


def run_worker(engine: str, spec_file: Path, threads: int, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--spec", str(spec_file)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"{engine} worker failed (exit {p.returncode}):\n{tail}")


def machine_info() -> dict:
    import torch

    info = {
        "cpu": platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "flags": [],
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["cpu"] = value.strip()
            elif key.strip() == "flags":
                have = set(value.split())
                info["flags"] = [
                    f
                    for f in (
                        "avx2",
                        "fma",
                        "f16c",
                        "avx512f",
                        "avx512bw",
                        "avx512_vnni",
                        "avx512_bf16",
                        "avx_vnni",
                        "amx_tile",
                        "amx_int8",
                        "amx_bf16",
                    )
                    if f in have
                ]
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = int(line.split()[1]) / 1024**2
        # the last-level cache: a model that fits decodes at cache speed when the neighbours let it
        info["llc"] = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        pass
    from tinkerlm.loading import physical_cores

    info["physical_cores"] = physical_cores()
    return info


def decode_bytes(model_path: Path) -> int:
    """Bytes of weights one decode step reads, as the GGUF stores them: every tensor except the token embedding,
    which a step only gathers one row of, unless the output projection is tied to it (then it is read whole)."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(model_path).tensors}
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    return sum(sizes.values())


def summarize(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    return {
        e: {
            k: statistics.median(r[k] for r in rs)
            for k in ("load_s", "import_s", "decode_tok_s", "prefill_tok_s", "peak_rss_mb")
        }
        for e, rs in results.items()
        if rs
    }


def write_chart(medians: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(medians)
    colours = {"tinkerlm": "#d95f02", "transformers": "#7570b3", "llama.cpp": "#1b9e77"}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.2))
    for ax, (key, label, unit, higher) in zip(axes, METRICS):
        values = [medians[e][key] for e in engines]
        bars = ax.bar(engines, values, color=[colours.get(e, "grey") for e in engines])
        ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in values], padding=2, fontsize=9)
        ax.set_title(f"{label} ({unit}, {'higher' if higher else 'lower'} is better)", fontsize=10)
        ax.set_ylim(0, max(values) * 1.18)
        ax.tick_params(axis="x", labelsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_markdown(path: Path, *, medians, results, skipped, machine, args, command, model_path, chart) -> None:
    engines = list(medians)
    peers = [e for e in ("transformers", "llama.cpp") if e in medians and "tinkerlm" in medians]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `bench/compare.py` on {datetime.date.today().isoformat()}; rerun it to refresh this file.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Model: `{model_path.name}` (store name `{args.model}`). tinkerlm: dtype {args.dtype}, quant {args.quant}. "
        f"transformers: fp32 (it dequantizes the GGUF). llama.cpp: the GGUF's own quantized weights.",
        f"Same prompt token ids and {args.threads} threads for every engine; each value is the median of "
        f"{args.runs} runs, each run a fresh process; engines take turns run by run.",
        "",
        "| " + " | ".join(["metric"] + engines + [f"tinkerlm / {p}" for p in peers]) + " |",
        "|---|" + "---:|" * (len(engines) + len(peers)),
    ]
    rows = [
        ("load_s", "load (s, lower is better)", "{:.2f}"),
        (
            "decode_tok_s",
            f"decode tok/s ({args.decode_tokens} tokens after a {DECODE_PROMPT_TOKENS}-token prompt)",
            "{:.1f}",
        ),
        ("prefill_tok_s", f"prefill tok/s ({args.prompt_tokens}-token prompt)", "{:.1f}"),
        ("peak_rss_mb", "peak RSS (MiB, lower is better)", "{:.0f}"),
        ("import_s", "imports before load (s, not in load)", "{:.2f}"),
    ]
    for key, label, fmt in rows:
        cells = [fmt.format(medians[e][key]) for e in engines]
        ratios = [f"{medians['tinkerlm'][key] / medians[p][key]:.2f}x" for p in peers]
        lines.append(f"| {label} | " + " | ".join(cells + ratios) + " |")
    # Decode streams every weight once a token: as a rate of bytes it can be set against the machine's bandwidth.
    gb = machine["decode_bytes"] / 1e9
    bw = statistics.median(machine["bandwidth"])
    rates = [medians[e]["decode_tok_s"] * gb for e in engines]
    lines.append("| decode, weights read (GB/s) | " + " | ".join(f"{r:.1f}" for r in rates) + " |" + " |" * len(peers))
    lines.append(
        f"| decode as a fraction of the measured bandwidth ({bw:.1f} GB/s) | "
        + " | ".join(f"{r / bw:.0%}" for r in rates)
        + " |"
        + " |" * len(peers)
    )
    lines += [
        "",
        "Ratios are tinkerlm's value divided by the peer's: above 1 is better for tok/s, below 1 is better for load "
        "time and memory.",
        f"Weights read per decode step: {machine['decode_bytes'] / 1e6:.0f} MB (the GGUF's tensors, less the token "
        "embedding when the output projection is not tied to it). Memory read bandwidth: a 1 GiB sum with the same "
        "threads, once a round between the engines' runs: "
        + ", ".join(f"{b:.1f}" for b in machine["bandwidth"])
        + " GB/s (median above).",
    ]
    for engine, why in skipped.items():
        lines.append(f"\n**{engine} skipped:** {why}")
    lines += ["", f"![chart]({os.path.relpath(chart, path.parent)})", "", "## Machine", ""]
    ram = f"{machine['ram_gib']:.1f} GiB" if "ram_gib" in machine else "unknown"
    lines += [
        f"- CPU: {machine['cpu']}, {machine['physical_cores']} physical cores, {machine['logical_cpus']} logical CPUs",
        f"- CPU flags: {', '.join(machine['flags']) or 'none of avx2/avx512/amx'}",
        f"- RAM: {ram}; last-level cache: {machine.get('llc', 'unknown')} (shared with whatever else runs on the host)",
        f"- 1-minute load average before / after the runs: {machine['load_before']:.2f} / {machine['load_after']:.2f} "
        f"(near or above the core count means other work shared the cores: rerun on a quiet machine)",
        f"- Python {machine['python']}, torch {machine['torch']}"
        + (f", llama-cpp-python {results['llama.cpp'][0].get('llama_cpp')}" if results.get("llama.cpp") else ""),
        "",
        "## Every run",
        "",
        "| engine | run | load s | decode tok/s | prefill tok/s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for engine, rs in results.items():
        for i, r in enumerate(rs, 1):
            lines.append(
                f"| {engine} | {i} | {r['load_s']:.2f} | {r['decode_tok_s']:.1f} | "
                f"{r['prefill_tok_s']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
    # Sections written by hand or by other scripts (quality, profile, server) follow a marker and are kept.
    kept = ""
    if path.exists() and KEEP_MARKER in path.read_text():
        kept = path.read_text().split(KEEP_MARKER, 1)[1]
    path.write_text("\n".join(lines) + "\n\n" + KEEP_MARKER + kept)


KEEP_MARKER = "<!-- compare.py regenerates everything above this line and keeps everything below -->"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2", help="store name or path of a .gguf file")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    p.add_argument("--runs", type=int, default=3, help="fresh processes per engine; medians are reported")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: physical cores)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for the prefill measurement")
    p.add_argument("--decode-tokens", type=int, default=256, help="decode steps to time")
    p.add_argument("--quant", default="native", help="tinkerlm's --quant (native, int8, int4, bf16, fp32)")
    p.add_argument("--dtype", default="float32", help="tinkerlm's --dtype")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown report to write")
    p.add_argument("--chart", default=str(ROOT / "bench" / "results.png"), help="PNG chart to write")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per worker process")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.spec)
        return 0

    from tinkerlm.api import resolve
    from tinkerlm.bench import prompt_ids
    from tinkerlm.formats.gguf import read_gguf
    from tinkerlm.loading import physical_cores

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        p.error(f"--engines: unknown {bad}; choose from {', '.join(ENGINES)}")
    args.threads = args.threads or physical_cores()
    model_path, _ = resolve(args.model)
    model_path = model_path.resolve()
    if model_path.suffix != ".gguf":
        p.error(f"--model: {model_path} is not a GGUF file (transformers and llama.cpp are given the same GGUF)")
    tokenizer = read_gguf(model_path).tokenizer()
    spec = {
        "model": str(model_path),
        "threads": args.threads,
        "quant": args.quant,
        "dtype": args.dtype,
        "decode_tokens": args.decode_tokens,
        "prefill_ids": prompt_ids(tokenizer, args.prompt_tokens),
        "decode_ids": prompt_ids(tokenizer, DECODE_PROMPT_TOKENS),
    }
    out = Path(args.out).resolve()
    # Outside the repository, so a run never leaves a stray file to commit.
    fd, name = tempfile.mkstemp(prefix="tinkerlm-compare-", suffix=".json")
    spec_file = Path(name)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)

    skipped = {}
    for e in list(engines):
        why = available(e)
        if why:
            print(f"compare: skipping {e}: {why}", file=sys.stderr)
            skipped[e] = why
            engines.remove(e)
    results: dict[str, list[dict]] = {e: [] for e in engines}
    bandwidth: list[float] = []  # GB/s, measured once a round
    load_before = os.getloadavg()[0]  # other work on the machine skews every number: recorded in the report
    try:
        for r in range(args.runs):
            order = engines[r % len(engines) :] + engines[: r % len(engines)]  # rotate: no engine always goes first
            for e in order:
                print(f"compare: run {r + 1}/{args.runs}: {e} ...", file=sys.stderr, flush=True)
                res = run_worker(e, spec_file, args.threads, args.timeout)
                results[e].append(res)
                print(
                    f"compare:   load {res['load_s']:.2f} s, decode {res['decode_tok_s']:.1f} tok/s, prefill "
                    f"{res['prefill_tok_s']:.1f} tok/s, peak RSS {res['peak_rss_mb']:.0f} MiB",
                    file=sys.stderr,
                )
            bandwidth.append(run_worker("bandwidth", spec_file, args.threads, args.timeout)["read_gb_s"])
            print(f"compare:   memory read bandwidth {bandwidth[-1]:.1f} GB/s", file=sys.stderr)
    finally:
        spec_file.unlink(missing_ok=True)

    machine = dict(machine_info(), load_before=load_before, load_after=os.getloadavg()[0])
    machine["bandwidth"] = bandwidth
    machine["decode_bytes"] = decode_bytes(model_path)
    medians = summarize(results)
    command = " ".join(["python", "bench/compare.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    chart = Path(args.chart).resolve()
    write_chart(
        medians,
        chart,
        f"{model_path.name}, {args.threads} threads, median of {args.runs} runs (tinkerlm quant={args.quant})",
    )
    write_markdown(
        out,
        medians=medians,
        results=results,
        skipped=skipped,
        machine=machine,
        args=args,
        command=command,
        model_path=model_path,
        chart=chart,
    )
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
