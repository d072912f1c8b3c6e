"""LoRA training speed and memory: tinkerlm against transformers + peft on the same model, data and LoRA config.

    .venv/bin/python bench/finetune_bench.py                     # SmolLM2-135M, dates data, 12 steps each
    .venv/bin/python bench/finetune_bench.py --steps 20 --seq-len 512 --batch-size 4
    .venv/bin/python bench/finetune_bench.py --base /work/gguf/llama1b-q4_0.gguf --batch-size 2 --steps 3  # QLoRA 1B
    .venv/bin/python bench/finetune_bench.py --allocators --steps 4 --runs 3   # glibc vs the caching allocator
    .venv/bin/python bench/finetune_bench.py --bf16-rows --steps 5 --runs 1   # bf16 LoRA against fp32, all kept

Both sides get the same fp32 weights (the default SmolLM2 GGUF dequantized and written as a Hugging Face
directory, which transformers loads), the same packed rows (the chat data rendered with SmolLM2's template and
packed by tinkerlm; labels only on assistant tokens), the same LoRA (rank 8, alpha 16, no dropout, q/k/v/o and
gate/up/down), AdamW at the same learning rate, the same batch and thread count. Each run is a fresh process, so
peak RSS (VmHWM) is clean; tokens/s counts every token of the rows (padding included, the same for both) over
the steps after the first, which warms up allocators.

The peer's batch is given as plain causal rows (no per-document mask): that is what a transformers user
packing data gets by default, and it is cheaper than tinkerlm's exact per-document attention. An extra row shows
tinkerlm's LoRA over the GGUF's own Q4_1 weights (QLoRA-style), its default. tinkerlm's runs use the caching CPU
allocator as `finetune` does (tinkerlm/tune/memory.py); `--allocators` instead compares it with glibc malloc on the
fp32 rows (everything kept, selective, whole layers recomputed), the two alternating, `--runs` times each.
`--bf16-rows` runs tinkerlm alone: fp32 with everything kept (the reference) against bf16 autocast with the frozen
weights cast once (`lora.bf16_bases`, as `finetune --bf16` does) in each recomputation mode, and bf16 autocast over
the fp32 weights; the losses are compared with the reference's step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _rows(spec):
    """The packed rows both sides train on (built by tinkerlm from the chat data)."""
    import torch

    from tinkerlm.formats.tokenizer import Tokenizer
    from tinkerlm.tune import data

    tok = Tokenizer.from_hf_dir(spec["hf_dir"])
    examples, _ = data.load_examples(spec["data"], tok, spec["seq_len"])
    rows = data.pack(examples, spec["seq_len"], tok.pad_token_id or 0)
    need = spec["batch_size"] * spec["steps"]
    reps = -(-need // len(rows))
    cat = lambda t: torch.cat([t] * reps)[:need]  # noqa: E731
    return cat(rows.ids), cat(rows.segments), cat(rows.target)


def worker_tinkerlm(spec: dict) -> dict:
    import torch

    from tinkerlm import lora
    from tinkerlm.loading import load_checkpoint
    from tinkerlm.tune import trainer

    torch.set_num_threads(spec["threads"])
    from tinkerlm.tune import memory

    if spec.get("lean_malloc"):
        memory.lean_malloc()
    if spec.get("allocator", True):
        memory.caching_allocator(True)
    ids, seg, target = _rows(spec)
    path = Path(spec["gguf"] if spec["quant"] == "native" else spec["hf_dir"])
    model, _, _ = load_checkpoint(path, quant=spec["quant"])
    lora.apply_lora(model, lora.LoRAConfig(rank=8, alpha=16, targets=TARGETS), seed=0)
    if spec["bf16"] and spec.get("cast_once", True):
        lora.bf16_bases(model)  # as finetune does under bf16 autocast
    ckpt = spec.get("checkpoint", False)
    if ckpt == "default":  # what `finetune` picks for this batch
        ckpt = memory.recompute(model.config, spec["batch_size"] * spec["seq_len"], None, spec["bf16"])
    model.checkpoint_layers = ckpt
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    model.train()
    B = spec["batch_size"]
    times, cpu, losses = [], [], []
    for s in range(spec["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        sl = slice(s * B, (s + 1) * B)
        n = int(target[sl, 1:].sum())
        loss = trainer.loss_sum(model, ids[sl], seg[sl], target[sl], spec["bf16"]) / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(float(loss))
    return {
        "times": times,
        "cpu": cpu,
        "losses": losses,
        "tokens_per_step": B * ids.shape[1],
        "peak_rss_mb": _peak_rss_mb(),
        "checkpoint": ckpt,
    }


def worker_peft(spec: dict) -> dict:
    import peft
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    ids, _, target = _rows(spec)
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa"
    )
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    model.train()
    B = spec["batch_size"]
    times, losses = [], []
    for s in range(spec["steps"]):
        t0 = time.perf_counter()
        sl = slice(s * B, (s + 1) * B)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["bf16"]):
            loss = model(input_ids=ids[sl], labels=labels[sl]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"times": times, "losses": losses, "tokens_per_step": B * ids.shape[1], "peak_rss_mb": _peak_rss_mb()}


WORKERS = {"tinkerlm": worker_tinkerlm, "peft": worker_peft}


def run(engine: str, spec: dict) -> dict:
    env = {**os.environ, **spec.get("env", {})}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", engine, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=3600,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    t = r["times"][1:]
    r["tok_s"] = r["tokens_per_step"] * len(t) / sum(t)
    if "cpu" in r:  # tokens per CPU-second of the process (all threads): steadier than tok/s on a shared machine
        r["tok_cpu_s"] = r["tokens_per_step"] * len(t) / sum(r["cpu"][1:])
    return r


def compare_allocators(spec: dict, runs: int) -> int:
    """tinkerlm fp32 LoRA, each recomputation mode with glibc malloc and with the caching allocator, alternating."""
    import statistics

    modes = [("everything kept", False), ("selective", "selective"), ("whole layers", True)]
    got = {}
    for i in range(runs):
        for mode, ckpt in modes:
            for alloc in (False, True) if i % 2 == 0 else (True, False):
                r = run("tinkerlm", {**spec, "quant": "fp32", "checkpoint": ckpt, "allocator": alloc})
                got.setdefault((mode, alloc), []).append(r)
                print(
                    f"  run {i + 1}: {mode}, {'caching' if alloc else 'glibc'}: {r['tok_s']:.0f} tok/s, peak RSS "
                    f"{r['peak_rss_mb']:.0f} MiB, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    print("\n| recomputation | allocator | train tok/s (median, min-max) | vs glibc | peak RSS MiB | final loss |")
    print("|---|---|---:|---:|---:|---:|")
    for mode, _ in modes:
        base = statistics.median(r["tok_s"] for r in got[(mode, False)])
        for alloc in (False, True):
            rs = got[(mode, alloc)]
            tok = [r["tok_s"] for r in rs]
            print(
                f"| {mode} | {'caching' if alloc else 'glibc'} | {statistics.median(tok):.0f} ({min(tok):.0f}-"
                f"{max(tok):.0f}) | {statistics.median(tok) / base:.2f}x | "
                f"{statistics.median(r['peak_rss_mb'] for r in rs):.0f} | {rs[0]['losses'][-1]:.4f} |"
            )
    return 0


BF16_ROWS = [
    ("fp32, everything kept", {"checkpoint": False}),
    ("bf16, everything kept", {"bf16": True, "checkpoint": False}),
    ("bf16, selective", {"bf16": True, "checkpoint": "selective"}),
    ("bf16, whole layers", {"bf16": True, "checkpoint": True}),
    ("bf16, finetune's default", {"bf16": True, "checkpoint": "default"}),
    ("bf16 autocast over fp32 weights, selective", {"bf16": True, "checkpoint": "selective", "cast_once": False}),
]


def compare_bf16(spec: dict, runs: int, only: list[str] | None) -> int:
    """tinkerlm LoRA in bf16 (frozen weights cast once) in each recomputation mode against fp32 with everything kept,
    the rows' order reversed every other run."""
    import statistics

    rows = [r for i, r in enumerate(BF16_ROWS) if not only or str(i) in only or i == 0]
    got = {}
    for i in range(runs):
        for label, extra in rows if i % 2 == 0 else rows[::-1]:
            r = run("tinkerlm", {**spec, "quant": "fp32", **extra})
            got.setdefault(label, []).append(r)
            print(
                f"  run {i + 1}: {label} ({r['checkpoint']}): {r['tok_s']:.0f} tok/s, {r['tok_cpu_s']:.0f} tok/CPU-s, "
                f"peak RSS "
                f"{r['peak_rss_mb']:.0f} MiB, losses {' '.join(f'{x:.4f}' for x in r['losses'])}, load "
                f"{os.getloadavg()[0]:.1f}",
                flush=True,
            )
    ref = got[rows[0][0]]
    base = statistics.median(r["tok_s"] for r in ref)
    cpu_base = statistics.median(r["tok_cpu_s"] for r in ref)
    print(
        "\n| run | recomputation | train tok/s (median, min-max) | vs fp32 kept | tok/CPU-s | vs fp32 kept | "
        "peak RSS MiB | largest loss change |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, _ in rows:
        rs = got[label]
        tok, cpu = [r["tok_s"] for r in rs], [r["tok_cpu_s"] for r in rs]
        diff = max(abs(a - b) for a, b in zip(rs[0]["losses"], ref[0]["losses"]))
        print(
            f"| {label} | {rs[0]['checkpoint']} | {statistics.median(tok):.0f} ({min(tok):.0f}-{max(tok):.0f}) | "
            f"{statistics.median(tok) / base:.2f}x | {statistics.median(cpu):.0f} | {statistics.median(cpu) / cpu_base:.2f}x | "
            f"{statistics.median(r['peak_rss_mb'] for r in rs):.0f} | "
            f"{diff:.4f} |"
        )
    return 0


def prepare(args) -> dict:
    """Export the default model's GGUF to an fp32 Hugging Face directory (once) and return the worker spec."""
    from tinkerlm import store
    from tinkerlm.loading import load_checkpoint
    from tinkerlm.tune import save_full

    m = store.find("smollm2") or store.pull("smollm2")
    gguf = store.model_path(m)
    hf_dir = Path(args.cache) / "smollm2-135m-fp32-hf"
    if not (hf_dir / "model.safetensors").is_file():
        model, tok, gen = load_checkpoint(gguf, quant="fp32")
        tmp = hf_dir.with_name(hf_dir.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_full(model, tok, gen, gguf, tmp)
        os.replace(tmp, hf_dir)
    return {
        "gguf": str(gguf),
        "hf_dir": str(hf_dir),
        "data": str(args.data),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "threads": args.threads,
        "bf16": False,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--data", default=str(ROOT / "examples/data/dates/train.jsonl"), help="chat JSONL to train on")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--bf16", action="store_true", help="also compare with bfloat16 autocast on both sides")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "tinkerlm-bench"), help="where the HF export goes")
    p.add_argument("--write", action="store_true", help="replace the Fine-tuning section of BENCHMARKS.md")
    p.add_argument("--base", default=None, help="GGUF for the quantized-base (QLoRA) runs only, e.g. a random 1B")
    p.add_argument("--lean-malloc", action="store_true", help="tinkerlm runs lower glibc's mmap threshold")
    p.add_argument("--allocators", action="store_true", help="only tinkerlm fp32: glibc vs the caching allocator")
    p.add_argument("--bf16-rows", action="store_true", help="only tinkerlm: bf16 LoRA's rows against fp32 kept")
    p.add_argument(
        "--rows", default=None, help="with --bf16-rows: the rows to run, by index in BF16_ROWS, e.g. 2,4 (0 always)"
    )
    p.add_argument("--runs", type=int, default=1, help="with --allocators or --bf16-rows: runs of each row (medians)")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.spec))))
        return 0

    spec = prepare(args)
    spec["lean_malloc"] = args.lean_malloc
    if args.allocators:
        return compare_allocators(spec, args.runs)
    if args.bf16_rows:
        return compare_bf16(spec, args.runs, args.rows.split(",") if args.rows else None)
    if args.base:  # a bigger quantized model: its QLoRA memory, without the peer or fp32 rows
        spec["gguf"] = str(Path(args.base).resolve())
        configs = [
            (f"tinkerlm, {Path(args.base).name} (QLoRA)", "tinkerlm", {"quant": "native"}),
            (
                f"tinkerlm, {Path(args.base).name} (QLoRA), matmuls kept",
                "tinkerlm",
                {"quant": "native", "checkpoint": "selective"},
            ),
            (
                f"tinkerlm, {Path(args.base).name} (QLoRA), layers recomputed",
                "tinkerlm",
                {"quant": "native", "checkpoint": True},
            ),
        ]
        for label, engine, extra in configs:
            r = run(engine, {**spec, **extra})
            print(f"{label:60s} {r['tok_s']:8.0f} tok/s  peak RSS {r['peak_rss_mb']:6.0f} MiB", flush=True)
        return 0
    configs = [
        ("transformers + peft, fp32", "peft", {}),
        ("tinkerlm, fp32", "tinkerlm", {"quant": "fp32"}),
        ("tinkerlm, Q4_1 base (QLoRA)", "tinkerlm", {"quant": "native"}),
        ("tinkerlm, fp32, matmuls kept, rest recomputed", "tinkerlm", {"quant": "fp32", "checkpoint": "selective"}),
        ("tinkerlm, fp32, layers recomputed", "tinkerlm", {"quant": "fp32", "checkpoint": True}),
        (
            "tinkerlm, Q4_1 base, matmuls kept, rest recomputed",
            "tinkerlm",
            {"quant": "native", "checkpoint": "selective"},
        ),
        ("tinkerlm, Q4_1 base, layers recomputed", "tinkerlm", {"quant": "native", "checkpoint": True}),
    ]
    if args.bf16:
        configs += [
            ("transformers + peft, bf16 autocast", "peft", {"bf16": True}),
            ("tinkerlm, fp32 weights, bf16 autocast", "tinkerlm", {"quant": "fp32", "bf16": True, "cast_once": False}),
        ]
    results = []
    for label, engine, extra in configs:
        r = run(engine, {**spec, "quant": "fp32", **extra})
        results.append((label, r))
        print(
            f"{label:40s} {r['tok_s']:8.0f} tok/s  peak RSS {r['peak_rss_mb']:6.0f} MiB  "
            f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
            flush=True,
        )
    peer = {False: results[0][1]}
    if args.bf16:
        peer[True] = results[7][1]
    lines = [
        "## Fine-tuning (LoRA training throughput)",
        "",
        f"`.venv/bin/python bench/finetune_bench.py --steps {args.steps} --batch-size {args.batch_size} "
        f"--seq-len {args.seq_len} --threads {args.threads}{' --bf16' if args.bf16 else ''}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{__import__('torch').__version__}; {time.strftime('%Y-%m-%d')}.",
        "",
        f"SmolLM2-135M, rank-8 LoRA on all seven projections, {args.batch_size} x {args.seq_len}-token packed rows of "
        "the dates chat data per step, AdamW; tokens/s over steps 2..N; peak RSS of the whole process.",
        "",
        "| run | train tok/s | vs peft | peak RSS MiB | vs peft |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in results:
        ref = peer[bool("bf16" in label)]
        lines.append(
            f"| {label} | {r['tok_s']:.0f} | {r['tok_s'] / ref['tok_s']:.2f}x | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        body = path.read_text()
        start = body.find(lines[0])
        if start >= 0:
            end = body.find("\n## ", start + 1)
            body = body[:start] + text + (body[end + 1 :] if end >= 0 else "")
        else:
            body = body.rstrip("\n") + "\n\n" + text
        path.write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
