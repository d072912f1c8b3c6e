"""DPO training speed and memory: tinkerlm against TRL's `DPOTrainer` + peft on the same base, pairs and LoRA.

    .venv/bin/python bench/preference_bench.py                    # SmolLM2-135M, 48 pairs, 12 steps, 3 runs each
    .venv/bin/python bench/preference_bench.py --runs 1 --steps 6 --rows trl,tinkerlm

Both sides get the same fp32 weights (the default SmolLM2 GGUF dequantized and written as a Hugging Face directory,
as `finetune_bench.py` does), the same preference pairs in the same order (pairs s*B .. s*B+B-1 at step s, no
shuffling), the same LoRA (rank 8, alpha 16, no dropout, q/k/v/o and gate/up/down), sigmoid DPO with beta 0.1 and
the reference = the base with the adapter switched off (TRL's default under peft), AdamW (lr 5e-5, no weight
decay, constant), gradient clipping at 1.0, the same max length and thread count. TRL runs in fp32
(`bf16=False`; its default is bf16 autocast) with its gradient checkpointing off, and on, which is its default, in
a row of its own; tinkerlm's `--grad-checkpointing` (layers recomputed in the backward pass) has a row too.

The pairs are synthetic chats of realistic length, drawn with a fixed seed from the shipped public-domain text: a
prompt asking to continue a ~70-word passage (~100 tokens), the true continuation as the chosen answer and a passage
from elsewhere as the rejected one (75-150 words each, ~100-200 tokens), rendered by both sides with SmolLM2's chat
template. tokens/s counts real tokens, padding excluded, the same way for both: per pair, the tokens of
prompt + chosen plus those of prompt + rejected (the two sequences each side runs). The bench checks that TRL's
tokenization gives the same count as tinkerlm's and reports both, with TRL's padded tokens beside them.

Each run is a fresh process (`--worker ENGINE`), so peak RSS (VmHWM, the child's ru_maxrss) is clean; the speed is
the median over runs of (tokens of steps 2..N) / (their wall time), engines alternating run by run. `--profile`
instead profiles one tinkerlm step (`torch.profiler`): the ops that take the time and the memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = ROOT / "tinkerlm/evaluate/data/alice_ch1-2.txt"
LR, BETA, MAX_GRAD_NORM = 5e-5, 0.1, 1.0


def _peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


INSTRUCTION = "Continue this passage from Alice's Adventures in Wonderland in the same style:"


def make_pairs(
    path: Path, n: int, seed: int = 0, prompt_words: int = 70, answer_words=(75, 150), instruction: str = INSTRUCTION
) -> Path:
    """`n` preference pairs as JSONL: continue a passage (chosen: the text that follows; rejected: text from
    elsewhere), drawn with `seed` from the shipped public-domain text."""
    words = TEXT.read_text(encoding="utf-8").split()
    r = random.Random(seed)

    def span(start: int, k: int) -> str:
        return " ".join(words[(start + i) % len(words)] for i in range(k))

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # other runs may be reading the file
    with open(tmp, "w") as f:
        for _ in range(n):
            a = r.randrange(len(words))
            passage = span(a, prompt_words)
            chosen = span(a + prompt_words, r.randint(*answer_words))
            rejected = span(r.randrange(len(words)), r.randint(*answer_words))
            prompt = f"{instruction}\n\n{passage}"
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    os.replace(tmp, path)
    return path


def worker_tinkerlm(spec: dict) -> dict:
    """tinkerlm's DPO objective (`tinkerlm.tune.preference.Preference`, adapter-off reference) stepped as
    `tinkerlm.tune.trainer.train` steps it, over the pairs in file order."""
    import torch

    from tinkerlm import lora
    from tinkerlm.loading import load_checkpoint
    from tinkerlm.tune import preference

    torch.set_num_threads(spec["threads"])
    model, tok, _ = load_checkpoint(Path(spec["model"]), quant=spec.get("quant", "fp32"))
    lora.apply_lora(model, lora.LoRAConfig(rank=8, alpha=16, targets=TARGETS), seed=0)
    model.checkpoint_layers = spec.get("checkpoint", False)
    prefs, _ = preference.load(spec["data"], tok, spec["seq_len"], "dpo")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    obj = preference.Preference(prefs, range(len(prefs)), "dpo", beta=BETA, seq_len=spec["seq_len"], pad=pad)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=True)
    model.train()
    B = spec["batch_size"]
    times, losses, tokens, padded = [], [], [], []
    for s in range(spec["steps"]):
        t0 = time.perf_counter()
        idx = torch.arange(s * B, (s + 1) * B) % len(obj)
        loss, _ = obj.batch(model, idx, False)
        (loss / len(idx)).backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()) / len(idx))
        tokens.append(obj.tokens(idx))
        seqs = [prefs.seqs[2 * i + k] for k in (0, 1) for i in idx.tolist()]
        rows, _ = preference.pack_seqs(seqs, spec["seq_len"], pad)  # as `seq_logps` packs them
        padded.append(rows.batch(torch.arange(len(rows)))[0].numel())  # positions run (trailing padding cut)
    return {"times": times, "losses": losses, "tokens": tokens, "padded": padded, "peak_rss_mb": _peak_rss_mb()}


def worker_trl(spec: dict) -> dict:
    """TRL's DPOTrainer with a peft LoRA (its reference: the adapter disabled), pairs in file order."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    torch.set_num_threads(spec["threads"])
    rows = [json.loads(line) for line in open(spec["data"])]
    ds = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
    B = spec["batch_size"]
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    args = trl.DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=B,
        max_steps=spec["steps"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=spec["seq_len"],
        bf16=False,
        gradient_checkpointing=spec.get("checkpoint", False),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10**9,  # no logging inside the timed steps
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    lora_cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    marks, batches = [], []

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    class InOrder(trl.DPOTrainer):  # the same pairs per step as tinkerlm's
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(
        model=model, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=lora_cfg, callbacks=[Clock()]
    )
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        batches.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch

    trainer.data_collator = counting
    torch.set_num_threads(spec["threads"])
    result = trainer.train()
    times = [b - a for a, b in zip(marks, marks[1:])]
    batches = batches[: len(times)]  # the loader may collate one batch ahead
    return {
        "times": times,
        "losses": [result.training_loss],
        "tokens": [b[0] for b in batches],
        "padded": [b[1] for b in batches],
        "peak_rss_mb": _peak_rss_mb(),
    }


WORKERS = {"tinkerlm": worker_tinkerlm, "trl": worker_trl}
ROWS = {  # key: (label, engine, spec overrides); the first row present is the peer the ratios are taken against
    "trl": ("TRL DPOTrainer + peft, fp32", "trl", {}),
    "trl-gc": ("TRL DPOTrainer + peft, fp32, gradient checkpointing (TRL's default)", "trl", {"checkpoint": True}),
    "tinkerlm": ("tinkerlm DPO, fp32", "tinkerlm", {}),
    "tinkerlm-sel": ("tinkerlm DPO, fp32, matmuls kept, rest recomputed", "tinkerlm", {"checkpoint": "selective"}),
    "tinkerlm-gc": ("tinkerlm DPO, fp32, --grad-checkpointing", "tinkerlm", {"checkpoint": True}),
    # the rows above run with the caching CPU allocator, as training does (tinkerlm/tune/memory.py); these without
    "tinkerlm-glibc": ("tinkerlm DPO, fp32, glibc malloc", "tinkerlm", {"env": {"TINKERLM_CACHING_ALLOCATOR": "0"}}),
    "tinkerlm-sel-glibc": (
        "tinkerlm DPO, fp32, matmuls kept, rest recomputed, glibc malloc",
        "tinkerlm",
        {"checkpoint": "selective", "env": {"TINKERLM_CACHING_ALLOCATOR": "0"}},
    ),
}


def run(engine: str, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false", **spec.get("env", {}))
    load = os.getloadavg()
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
    t, n = r["times"][1:], r["tokens"][1:]
    r["tok_s"] = sum(n) / sum(t)
    r["load"] = (load[0], os.getloadavg()[0])  # 1-minute load average before and after the run
    return r


def prepare(args) -> dict:
    """The HF export of the default model (shared with finetune_bench.py), the pairs file, the worker spec."""
    from bench.finetune_bench import prepare as hf_export

    hf = hf_export(argparse.Namespace(cache=args.cache, data="", seq_len=0, batch_size=0, steps=0, threads=0))
    data = Path(args.cache) / f"prefs-{args.pairs}-seed{args.seed}.jsonl"
    make_pairs(data, args.pairs, args.seed)
    return {
        "model": hf["hf_dir"],
        "data": str(data),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "threads": args.threads,
    }


def profile(spec: dict) -> None:
    """One tinkerlm DPO step (after a warm-up step) under torch.profiler: top ops by CPU time and by memory."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    spec = {**spec, "steps": 1}
    worker_tinkerlm(spec)  # warm-up: allocator, kernels
    with prof(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as p:
        worker_tinkerlm(spec)
    table = p.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=25))
    print(table.table(sort_by="self_cpu_memory_usage", row_limit=15))
    print(f"threads {torch.get_num_threads()}, peak RSS {_peak_rss_mb():.0f} MiB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=int, default=48, help="preference pairs generated (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated pairs")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--seq-len", type=int, default=512, help="max tokens per sequence (prompt + answer)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--runs", type=int, default=3, help="runs per configuration, engines alternating")
    p.add_argument(
        "--rows", default=",".join(k for k in ROWS if "glibc" not in k), help=f"rows to run: {', '.join(ROWS)}"
    )
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "tinkerlm-bench"), help="where the HF export goes")
    p.add_argument("--profile", action="store_true", help="profile one tinkerlm step instead of benchmarking")
    p.add_argument("--json", default=None, help="also write every run's figures to this file")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.spec))))
        return 0

    spec = prepare(args)
    if args.profile:
        profile(spec)
        return 0
    rows = args.rows.split(",")
    if unknown := set(rows) - set(ROWS):
        p.error(f"--rows: unknown {sorted(unknown)}; choose from {', '.join(ROWS)}")
    configs = [ROWS[k] for k in ROWS if k in rows]
    results = {label: [] for label, _, _ in configs}
    for i in range(args.runs):
        order = configs[i % len(configs) :] + configs[: i % len(configs)]  # rotate which goes first
        for label, engine, extra in order:
            r = run(engine, {**spec, **extra})
            results[label].append(r)
            print(
                f"run {i + 1} {label:70s} {r['tok_s']:7.0f} tok/s  peak RSS {r['peak_rss_mb']:6.0f} MiB  "
                f"load {r['load'][0]:.1f}-{r['load'][1]:.1f}  tokens {sum(r['tokens'])} (padded {sum(r['padded'])})",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    peer = results.get(configs[0][0]) if configs[0][1] == "trl" else None
    peer_speed = statistics.median(r["tok_s"] for r in peer) if peer else None
    peer_rss = max(r["peak_rss_mb"] for r in peer) if peer else None
    loads = [x for rs in results.values() for r in rs for x in r["load"]]
    lines = [
        "| run | train tok/s (median, min-max) | vs TRL | peak RSS MiB | vs TRL | real tokens / positions run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, rs in results.items():
        speeds = [r["tok_s"] for r in rs]
        med, rss = statistics.median(speeds), max(r["peak_rss_mb"] for r in rs)
        real, padded = sum(rs[0]["tokens"][1:]), sum(rs[0]["padded"][1:])
        lines.append(
            f"| {label} | {med:.0f} ({min(speeds):.0f}-{max(speeds):.0f}) | "
            f"{f'{med / peer_speed:.2f}x' if peer else '-'} | {rss:.0f} | "
            f"{f'{rss / peer_rss:.2f}x' if peer else '-'} | {real} / {padded} |"
        )
    print(
        f"\n`.venv/bin/python bench/preference_bench.py --steps {args.steps} --batch-size {args.batch_size} "
        f"--seq-len {args.seq_len} --threads {args.threads} --runs {args.runs}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{__import__('torch').__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
        f"{min(loads):.1f}-{max(loads):.1f} during the runs.\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
