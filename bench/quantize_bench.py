"""Quantize one full-precision model with tinkerlm and with llama.cpp's quantizer; compare size, time, memory and
quality against the source (BENCHMARKS.md, "Export and quantization").

    .venv/bin/python bench/quantize_bench.py --llama-bin /path/to/llama.cpp/build/bin [--runs 3]

The source: SmolLM2-135M-Instruct after a short full fine-tune (so its weights are off the Q4_1 grid it ships on),
written as an f32 GGUF by `tinkerlm export` (and pulled into the store: tinkerlm exports the stored copy). For each type, with and without an importance matrix, both quantizers
write a GGUF from that same f32 file in their own process (time = wall clock of the process, and for tinkerlm
also the writing alone, as the export reports it; peak RSS = the process's VmHWM). The importance matrix is
llama.cpp's own (`llama-imatrix` on the calibration text), fed to both quantizers, so tinkerlm also shows it reads
llama.cpp's files; without `llama-imatrix`, tinkerlm's (`--calibration`) is saved and used by both.

Quality: every written file and the source are loaded by the same evaluator (tinkerlm's loader, fp32 dequantized)
and compared on held-out text (the second half of the shipped public-domain text; the calibration text is the
first half): mean KL divergence to the source, top-1 agreement, perplexity. llama.cpp's llama-quantize must be
built from the llama.cpp that llama-cpp-python vendors, with explicit CPU flags (see docs/export.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k")
LLAMA_TYPE = {t: t.upper() for t in TYPES}


def run(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stderr) of a command in its own process."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "sys.stderr.write(p.stderr[-4000:])\n"
        "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, p.returncode)\n"
    )
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    dt, rss, rc = p.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return float(dt), int(rss), p.stderr


def make_source(work: Path) -> Path:
    """SmolLM2 after a short full fine-tune, as an f32 GGUF (cached in `work`)."""
    f32 = work / "source-f32.gguf"
    if f32.exists():
        return f32
    sys.path.insert(0, str(ROOT / "tests"))
    from test_tune import write_chat_data

    from tinkerlm import store
    from tinkerlm.export import export
    from tinkerlm.tune import finetune

    if store.find("bench-ft") is None:
        store.pull("smollm2", progress=False)
        data = write_chat_data(work / "chat.jsonl", 256)
        finetune(base="smollm2", data=str(data), out="bench-ft", full=True, seq_len=128, batch_size=4,
                 max_steps=40, lr=2e-4, warmup_steps=4, progress=True)  # fmt: skip
    export("bench-ft", to="gguf", type="f32", out=str(f32), verify=False)
    return f32


def texts(work: Path) -> tuple[Path, Path]:
    from tinkerlm.evaluate.perplexity import shipped_text

    text = shipped_text()
    half = len(text) // 2
    calib, held = work / "calibration.txt", work / "heldout.txt"
    calib.write_text(text[:half], encoding="utf-8")
    held.write_text(text[half:], encoding="utf-8")
    return calib, held


def quality(source: Path, written: Path, held: Path, tokens: int) -> dict:
    import torch

    from tinkerlm.export import verify
    from tinkerlm.loading import load_checkpoint

    ref, tok, _ = load_checkpoint(source, torch.float32, "fp32")
    cand = load_checkpoint(written, torch.float32, "fp32")[0]
    ids = verify.text_ids(tok, held.read_text(encoding="utf-8"), tokens)
    return verify.compare(ref, cand, ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", required=True, help="directory holding llama-quantize (and llama-imatrix)")
    ap.add_argument("--work", default="/tmp/tinkerlm-quantize-bench", help="scratch directory (kept between runs)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per quantizer and type (medians reported)")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens for the quality figures")
    ap.add_argument("--threads", type=int, default=2, help="threads for both quantizers")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated file types")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file whose section is replaced")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TINKERLM_HOME", str(work / "store"))
    bin_dir = Path(a.llama_bin)
    source = make_source(work)
    from tinkerlm import store

    # tinkerlm quantizes the store's copy (as its users do: the parent's sha256 is then the manifest's, not re-hashed)
    if store.find("bench-f32") is None:
        store.pull(str(source), name="bench-f32", progress=False)
    calib, held = texts(work)
    imatrix = work / "imatrix.gguf"
    made_by = work / "imatrix.source"  # who computed the cached importance matrix
    if not imatrix.exists() or not made_by.exists():
        if (bin_dir / "llama-imatrix").exists():
            run([str(bin_dir / "llama-imatrix"), "-m", str(source), "-f", str(calib), "-o", str(imatrix), "-c", "512",
                 "-t", str(a.threads), "--no-ppl"])  # fmt: skip
            imatrix_from = "llama.cpp's llama-imatrix"
        else:
            from tinkerlm.export import imatrix as im
            from tinkerlm.export.source import open_source

            src = open_source(str(source))
            im.compute(src.model(), src.tokenizer.encode(calib.read_text()), progress=True).save(imatrix)
            imatrix_from = "tinkerlm"
        made_by.write_text(imatrix_from)
    else:
        imatrix_from = made_by.read_text()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    rows = []
    for qtype in a.types.split(","):
        for use_im in (False, True):
            res = {}
            for engine in ("tinkerlm", "llama.cpp"):
                out = work / f"{engine}-{qtype}{'-imatrix' if use_im else ''}.gguf"
                times, rsss = [], []
                for _ in range(a.runs):
                    out.unlink(missing_ok=True)
                    if engine == "tinkerlm":
                        cmd = [sys.executable, "-m", "tinkerlm", "export", "bench-f32", "--type", qtype, "--out",
                               str(out), "--no-verify"]  # fmt: skip
                        cmd += ["--imatrix", str(imatrix)] if use_im else []
                    else:
                        cmd = [str(bin_dir / "llama-quantize")] + (["--imatrix", str(imatrix)] if use_im else [])
                        cmd += [str(source), str(out), LLAMA_TYPE[qtype], str(a.threads)]
                    dt, rss, _ = run(cmd, env)
                    times.append(dt)
                    rsss.append(rss)
                q = quality(source, out, held, a.tokens)
                res[engine] = {
                    "time_s": statistics.median(times),
                    "time_spread": (min(times), max(times)),
                    "rss": max(rsss),
                    "size": out.stat().st_size,
                    **q,
                }
                print(qtype, use_im, engine, json.dumps(res[engine]), flush=True)
            rows.append((qtype, use_im, res))
    write(Path(a.out), rows, source, imatrix_from, a)


def write(path: Path, rows, source: Path, imatrix_from: str, a) -> None:
    from tinkerlm.formats.gguf import read_gguf

    n_weights = sum(math.prod(s) for _, s, _ in read_gguf(source).tensor_infos())
    src_size = source.stat().st_size
    lines = [
        "## Export and quantization (`bench/quantize_bench.py`, issue 13)",
        "",
        f"Run {datetime.date.today()} on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"{a.threads} threads each, median of {a.runs} runs per cell:",
        "",
        "```bash",
        f".venv/bin/python bench/quantize_bench.py --llama-bin {a.llama_bin} --runs {a.runs}",
        "```",
        "",
        f"Source: SmolLM2-135M-Instruct after a 40-step full fine-tune, as an f32 GGUF ({src_size / 1e6:.0f} MB). "
        f"Importance matrix: {imatrix_from}, from the first half of the shipped text; quality on "
        f"{a.tokens} tokens of the second half (KL = mean KL divergence to the source's next-token distribution).",
        "",
        "| type | imatrix | engine | size (MB) | bpw | time (s) | peak RSS (MB) | KL | top-1 | PPL |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for qtype, use_im, res in rows:
        for engine, r in res.items():
            lines.append(
                f"| {qtype} | {'yes' if use_im else 'no'} | {engine} | {r['size'] / 1e6:.1f} | "
                f"{8 * r['size'] / n_weights:.2f} | {r['time_s']:.2f} ({r['time_spread'][0]:.2f}-"
                f"{r['time_spread'][1]:.2f}) | {r['rss'] / 1e6:.0f} | {r['kl_mean']:.5f} | {100 * r['top1']:.1f}% | "
                f"{r['ppl_candidate']:.3f} |"
            )
    lines += ["", "Ratios (tinkerlm / llama.cpp): KL and time; below 1 is better for tinkerlm.", ""]
    lines += ["| type | imatrix | KL ratio | time ratio | peak RSS / source file |", "|---|---|---:|---:|---:|"]
    for qtype, use_im, res in rows:
        t, l_ = res["tinkerlm"], res["llama.cpp"]
        lines.append(
            f"| {qtype} | {'yes' if use_im else 'no'} | {t['kl_mean'] / max(l_['kl_mean'], 1e-12):.3f} | "
            f"{t['time_s'] / l_['time_s']:.2f} | {t['rss'] / src_size:.2f} |"
        )
    section = "\n".join(lines) + "\n"
    text = path.read_text() if path.exists() else ""
    start = text.find(lines[0])
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
