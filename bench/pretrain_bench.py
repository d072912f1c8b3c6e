"""Pretraining speed and memory: tinkerlm against transformers' Trainer and LitGPT on the same Llama and token rows.

    .venv/bin/python bench/pretrain_bench.py                       # the stdlib-code example's model, 30 steps x 3 runs
    .venv/bin/python bench/pretrain_bench.py --steps 12 --runs 1 --engines tinkerlm,transformers
    .venv/bin/python bench/pretrain_bench.py --precision bf16          # bf16 mixed precision in every engine

The same model: the shape of examples/pretrain/stdlib-code.yaml (hidden 192, 4 layers, 6 heads, 2 KV heads, MLP
512, tied embeddings, RMSNorm eps 1e-5, RoPE theta 1e4), vocabulary 8,192 (a byte-level BPE tokenizer trained here
by `tinkerlm tokenizer train` on the Python standard library's top-level modules), fp32 everywhere, or with
`--precision bf16` each engine's bf16 mixed precision: fp32 weights, gradients and optimizer, products under bf16
autocast (tinkerlm's `bf16: true`, the Trainer's `bf16=True`, LitGPT's `precision="bf16-mixed"`).
The same data: tinkerlm's token shards of those modules, cut into rows of `--seq-len` tokens; the rows of each step
are the ones tinkerlm's loop draws (`trainer.step_rows`), written once to a .npy file and fed in that order to the
peers (a sequential sampler for the Trainer, a plain DataLoader for LitGPT).
The same optimisation: `--batch-size` rows per micro-batch, `--grad-accum` micro-batches per step, AdamW (betas 0.9,
0.95, weight decay 0.1), lr 2e-3 with a linear warmup then cosine decay to 10%, clipping at 1.0, `--threads` torch
threads. The initialisations differ (each engine's own: normal(0, 0.02) for tinkerlm and transformers, GPT-NeoX's
for LitGPT), so the losses are compared as curves against tokens, not step by step.

Engines, each in a fresh process (peak RSS = the child's ru_maxrss from wait4, so imports count):
- tinkerlm: `tinkerlm.tune.pretrain.pretrain(...)`, the `tinkerlm pretrain` path end to end (shards reused, the
  model stored at the end), one process.
- tinkerlm-compiled: the same with `compile: true` (torch.compile, inductor; the C++ kernels as custom ops,
  `tinkerlm.tune.compile_ops`); its compilation falls in the `--warmup` steps.
- transformers: `Trainer` with `LlamaForCausalLM` (sdpa attention), `lr_scheduler_type="cosine_with_min_lr"`.
- litgpt: `litgpt.pretrain.setup(...)` (what `litgpt pretrain` runs) with a `litgpt.Config` of the same shape,
  `precision="32-true"`, a DataModule over the same rows. LitGPT's pretraining always `torch.compile`s the model;
  `litgpt-eager` is the same run with compilation off. LitGPT sees rows[:, :-1] as input and rows[:, 1:] as
  targets (T-1 positions where the others run T); its weight decay also covers the norms. Its own venv:
      python3 -m venv /work/litgpt-venv && /work/litgpt-venv/bin/pip install torch==2.13.0 && \\
          /work/litgpt-venv/bin/pip install litgpt requests
  (resolved here: litgpt 0.5.13, lightning 2.6.6, jsonargparse 4.41.0, torch 2.13.0+cpu; `requests` is not a
  declared dependency but its final checkpoint save needs it); `--litgpt-python` names that venv's Python.
  `setup()` re-parses sys.argv as its CLI's when it saves, so the worker sets argv to `litgpt pretrain NAME`.

Tokens/s: rows x seq_len per optimizer step, over the intervals between optimizer steps (a global
`register_optimizer_step_post_hook`, the same clock in every engine) after the first `--warmup` steps (which take
LitGPT's compilation); median and min-max over those steps. Engines alternate run by run. On a shared machine the
speeds depend on the load (`uptime` is recorded with every run); peak RSS does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's tinkerlm, not an installed one
DEFAULT_CACHE = Path.home() / ".cache" / "tinkerlm-bench" / "pretrain"
LITGPT_PYTHON = "/work/litgpt-venv/bin/python"

# The model: examples/pretrain/stdlib-code.yaml's shape (Hugging Face names).
MODEL = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
PRECISION = {"fp32": "fp32", "bf16": "bf16 mixed precision (fp32 weights, bf16 autocast)"}
OPT = dict(lr=2e-3, min_lr_ratio=0.1, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Measurement shared by the workers (no tinkerlm import: the LitGPT worker runs in another venv)


def _stamp_steps() -> list[list[float]]:
    """[wall, CPU] seconds (perf_counter, this process's user + system time) after every optimizer step of any
    optimizer in this process, appended to the list returned."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[list[float]] = []

    def stamp(*_):
        t = os.times()
        stamps.append([time.perf_counter(), t.user + t.system])

    register_optimizer_step_post_hook(stamp)
    return stamps


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _result(stamps: list[float], losses: list[float], spec: dict, **extra) -> dict:
    import torch

    return {
        "stamps": stamps,
        "losses": losses,
        "tokens_per_step": spec["batch_size"] * spec["grad_accum"] * spec["seq_len"],
        "threads": torch.get_num_threads(),
        **extra,
    }


def _rows(spec: dict):
    """The rows in step order, (steps * batch_size * grad_accum, seq_len) int64."""
    import numpy as np
    import torch

    a = np.load(spec["rows"])
    return torch.from_numpy(a.reshape(-1, a.shape[-1]).astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Workers


def worker_tinkerlm(spec: dict) -> dict:
    os.environ["TINKERLM_HOME"] = spec["home"]
    stamps = _stamp_steps()
    from tinkerlm import store
    from tinkerlm.tune.pretrain import pretrain

    m = pretrain(
        **spec["model"],
        **OPT,
        data=spec["data"],
        tokenizer=spec["tokenizer"],
        vocab_size=spec["vocab_size"],
        shards_dir=spec["shards_dir"],
        eval_fraction=0.0,
        out="pretrain-bench",
        seq_len=spec["seq_len"],
        batch_size=spec["batch_size"],
        grad_accum=spec["grad_accum"],
        max_steps=spec["steps"],
        warmup_steps=spec["lr_warmup"],
        threads=spec["threads"],
        force=True,
        progress=False,
        distributed=spec.get("distributed", "ddp"),
        compile=spec.get("compile", False),
        bf16=spec.get("precision") == "bf16",
    )
    if m is None:  # a rank other than 0 under torchrun: rank 0 stores and reports
        return {}
    rows = (store.model_path(m) / "loss.csv").read_text().splitlines()
    col = rows[0].split(",").index("loss")
    return _result(stamps, [float(r.split(",")[col]) for r in rows[1:]], spec)


def worker_transformers(spec: dict) -> dict:
    stamps = _stamp_steps()
    import torch
    import transformers
    from torch.utils.data import Dataset, SequentialSampler

    _threads(spec["threads"])
    ids = _rows(spec)

    class Rows(Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    class InOrder(transformers.Trainer):  # the rows tinkerlm draws, in its order
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset)

    torch.manual_seed(OPT["seed"])
    shape = spec["model"]
    cfg = transformers.LlamaConfig(
        **shape,
        vocab_size=spec["vocab_size"],
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=spec["grad_accum"],
            max_steps=spec["steps"],
            learning_rate=OPT["lr"],
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": OPT["min_lr_ratio"]},
            warmup_steps=spec["lr_warmup"],
            weight_decay=OPT["weight_decay"],
            adam_beta1=0.9,
            adam_beta2=OPT["adam_beta2"],
            adam_epsilon=1e-8,
            max_grad_norm=OPT["max_grad_norm"],
            optim="adamw_torch",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=OPT["seed"],
            bf16=spec.get("precision") == "bf16",  # autocast on the CPU, fp32 master weights
        )
        trainer = InOrder(model=model, args=args, train_dataset=Rows())
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return _result(stamps, losses, spec)


def worker_litgpt(spec: dict) -> dict:
    stamps = _stamp_steps()
    import torch

    _threads(spec["threads"])
    if not spec.get("compile", True):
        torch.compile = lambda model, *a, **k: model  # litgpt.pretrain calls torch.compile(model) unconditionally
    import litgpt.pretrain as lp
    from litgpt import Config
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.data import DataModule
    from torch.utils.data import DataLoader

    ids = _rows(spec)
    B, T = spec["batch_size"], spec["seq_len"]

    class Rows(DataModule):  # the same rows, in order; LitGPT cuts input rows[:, :-1] and targets rows[:, 1:]
        def connect(self, tokenizer=None, batch_size=1, max_seq_length=-1):
            pass

        def train_dataloader(self):
            return DataLoader(ids, batch_size=B, shuffle=False)

        def val_dataloader(self):
            return DataLoader(ids[: 2 * B], batch_size=B, shuffle=False)

    losses: list[float] = []  # per micro-batch, averaged per step below
    ce = lp.chunked_cross_entropy

    def recorded(logits, targets, *a, **k):
        loss = ce(logits, targets, *a, **k)
        if torch.is_grad_enabled() and loss.device.type != "meta":  # not the FLOP count on the meta device
            losses.append(float(loss.detach()))
        return loss

    lp.chunked_cross_entropy = recorded
    shape = spec["model"]
    config = Config(
        name="pretrain-bench",
        block_size=T,
        vocab_size=spec["vocab_size"],
        padded_vocab_size=spec["vocab_size"],
        n_layer=shape["num_hidden_layers"],
        n_head=shape["num_attention_heads"],
        n_embd=shape["hidden_size"],
        n_query_groups=shape["num_key_value_heads"],
        head_size=shape["hidden_size"] // shape["num_attention_heads"],
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=shape["rms_norm_eps"],
        mlp_class_name="LLaMAMLP",
        intermediate_size=shape["intermediate_size"],
        rope_base=int(shape["rope_theta"]),
    )
    micro = spec["steps"] * spec["grad_accum"]
    sys.argv = ["litgpt", "pretrain", "pretrain-bench"]  # its final save re-parses the command line as its CLI's
    with tempfile.TemporaryDirectory() as out:
        lp.setup(
            model_name="pretrain-bench",
            model_config=config,
            out_dir=Path(out),
            precision="bf16-mixed" if spec.get("precision") == "bf16" else "32-true",
            data=Rows(),
            train=TrainArgs(
                save_interval=None,
                log_interval=1,
                global_batch_size=B * spec["grad_accum"],
                micro_batch_size=B,
                max_tokens=micro * B * (T - 1),
                max_seq_length=T - 1,
                max_norm=OPT["max_grad_norm"],
                min_lr=OPT["lr"] * OPT["min_lr_ratio"],
                lr_warmup_steps=spec["lr_warmup"],
                tie_embeddings=shape["tie_word_embeddings"],
            ),
            eval=EvalArgs(interval=10**9, max_iters=1, initial_validation=False, final_validation=False),
            optimizer={
                "class_path": "torch.optim.AdamW",
                "init_args": {"lr": OPT["lr"], "weight_decay": OPT["weight_decay"], "betas": [0.9, OPT["adam_beta2"]]},
            },
            devices=1,
            logger_name="csv",
            seed=OPT["seed"],
        )
    a = spec["grad_accum"]
    per_step = [sum(losses[i : i + a]) / a for i in range(0, len(losses) - a + 1, a)]
    return _result(stamps, per_step, spec)


WORKERS = {
    "tinkerlm": worker_tinkerlm,
    "transformers": worker_transformers,
    "litgpt": worker_litgpt,
    "litgpt-eager": lambda spec: worker_litgpt({**spec, "compile": False}),
    "tinkerlm-compiled": lambda spec: worker_tinkerlm({**spec, "compile": True}),  # `compile: true` (inductor)
    # two processes under torchrun, the cores split between them (--threads each / 2); rank 0 reports
    "tinkerlm-ddp2": lambda spec: worker_tinkerlm({**spec, "distributed": "ddp"}),
    "tinkerlm-fsdp2": lambda spec: worker_tinkerlm({**spec, "distributed": "fsdp"}),
}
NPROC = {"tinkerlm-ddp2": 2, "tinkerlm-fsdp2": 2}


# ---------------------------------------------------------------------------------------------------------------
# The parent: data, runs, report


def prepare(args, model: dict = MODEL) -> dict:
    """Train the tokenizer and tokenize the data once (cached), write the rows of every step; return the spec."""
    import numpy as np

    cache = Path(args.cache).expanduser()
    home = cache / "home"
    os.environ["TINKERLM_HOME"] = str(home)
    from tinkerlm import store
    from tinkerlm.tokenizer_train import train_tokenizer
    from tinkerlm.tune import shards, trainer
    from tinkerlm.tune.pretrain import load_tokenizer

    sources = shards.expand(args.data)
    if args.tokenizer:
        tok_name = args.tokenizer
    else:
        tok_name = f"pretrain-bench-tok:v{args.vocab}"
        if store.find(tok_name) is None:
            train_tokenizer([str(s.path) for s in sources], args.vocab, tok_name, compare="none", progress=False)
    tok, _ = load_tokenizer(tok_name)
    vocab = -(-tok.vocab_size // 64) * 64
    data = shards.prepare(sources, tok, cache / "shards", progress=False)
    rows = shards.TokenRows(data, args.seq_len)
    cfg = trainer.TrainConfig(
        total_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=0.0,
        min_lr_ratio=0.0,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        seed=OPT["seed"],
    )
    steps = np.stack([rows.batch(trainer.step_rows(s, len(rows), cfg))[0].numpy() for s in range(args.steps)])
    path = cache / f"rows-{data.dir.name[:16]}-{args.seq_len}x{args.batch_size}x{args.grad_accum}x{args.steps}.npy"
    np.save(path, steps.astype(np.int32))
    return {
        "model": model,
        "home": str(home),
        "data": list(args.data),
        "tokenizer": tok_name,
        "vocab_size": vocab,
        "shards_dir": str(cache / "shards"),
        "rows": str(path),
        "tokens": data.tokens,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "steps": args.steps,
        "lr_warmup": args.lr_warmup,
        "threads": args.threads,
        "precision": args.precision,
    }


def uptime() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run(engine: str, spec: dict, python: str | None = None, warmup: int = 3) -> dict:
    """One engine in a fresh process; its step intervals, losses and peak RSS (ru_maxrss of the child)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # no compile worker pool: the child's RSS is the whole story
    env.pop("TINKERLM_HOME", None)
    before = uptime()
    cmd = [python or sys.executable, __file__, "--worker", engine]
    if engine in NPROC:  # ru_maxrss of torchrun's wait is then the largest of its processes: peak RSS per process
        n = NPROC[engine]
        spec = {**spec, "threads": max(1, spec["threads"] // n)}
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        port = str(29500 + os.getpid() % 1000)
        cmd[1:1] = ["-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1"]
        cmd[5:5] = [f"--master-port={port}"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [*cmd, json.dumps(spec)],
            stdout=out,
            stderr=err,
            env=env,
            cwd=ROOT,
        )
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(f"{engine} failed ({p.returncode}):\n{stderr[-4000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    if len(r["stamps"]) != spec["steps"] or len(r["losses"]) != spec["steps"]:
        raise RuntimeError(
            f"{engine}: {len(r['stamps'])} optimizer steps, {len(r['losses'])} losses, not {spec['steps']}"
        )
    pairs = list(zip(r["stamps"][warmup:], r["stamps"][warmup + 1 :]))
    speeds = [r["tokens_per_step"] / (b[0] - a[0]) for a, b in pairs]
    cpu = [r["tokens_per_step"] / max(b[1] - a[1], 1e-9) for a, b in pairs]  # less sensitive to the load
    r.update(
        engine=engine,
        step_tok_s=speeds,
        step_tok_cpu_s=cpu,
        tok_s=statistics.median(speeds),
        peak_rss_mb=usage.ru_maxrss / 1024,
        wall_s=wall,
        load_before=before,
        load_after=uptime(),
    )
    return r


def plot(results: list[dict], spec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, tx) = plt.subplots(2, 1, figsize=(8, 7), dpi=110, height_ratios=(2, 1))
    colors = {"tinkerlm": "tab:blue", "transformers": "tab:orange", "litgpt": "tab:green", "litgpt-eager": "tab:red"}
    per_step = spec["batch_size"] * spec["grad_accum"] * spec["seq_len"]
    seen = set()
    for r in results:
        label = None if r["engine"] in seen else r["engine"]
        seen.add(r["engine"])
        tokens = [per_step * (i + 1) for i in range(len(r["losses"]))]
        ax.plot(tokens, r["losses"], color=colors.get(r["engine"]), lw=1.0, alpha=0.8, label=label)
        tx.plot(
            range(2 + len(r["stamps"]) - len(r["step_tok_s"]) - 1, len(r["stamps"]) + 1),
            r["step_tok_s"],
            color=colors.get(r["engine"]),
            lw=1.0,
            alpha=0.8,
        )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("train loss (cross-entropy per token)")
    ax.set_title(
        f"Same Llama ({MODEL['hidden_size']}x{MODEL['num_hidden_layers']}, vocab {spec['vocab_size']}), "
        f"same rows, {spec['precision']}, {spec['threads']} threads"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    tx.set_xlabel("optimizer step (after warmup)")
    tx.set_ylabel("tokens/s")
    tx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(results: list[dict], spec: dict, args) -> str:
    import torch

    engines = list(dict.fromkeys(r["engine"] for r in results))
    by = {e: [r for r in results if r["engine"] == e] for e in engines}
    med = {e: statistics.median(s for r in by[e] for s in r["step_tok_s"]) for e in engines}
    rss = {e: statistics.median(r["peak_rss_mb"] for r in by[e]) for e in engines}
    per_cpu = {e: statistics.median(s for r in by[e] for s in r["step_tok_cpu_s"]) for e in engines}
    tail = max(1, spec["steps"] // 5)
    per_step = spec["batch_size"] * spec["grad_accum"] * spec["seq_len"]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "## Pretraining (training throughput from scratch)",
        "",
        f"`.venv/bin/python bench/pretrain_bench.py --steps {spec['steps']} --runs {args.runs} --threads "
        f"{spec['threads']} --precision {spec['precision']} --engines {','.join(engines)}` on {cpu}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"examples/pretrain/stdlib-code.yaml's Llama ({MODEL['hidden_size']} wide, {MODEL['num_hidden_layers']} layers, "
        f"{MODEL['num_attention_heads']} heads / {MODEL['num_key_value_heads']} KV, MLP {MODEL['intermediate_size']}, "
        f"tied embeddings, vocabulary {spec['vocab_size']}), {PRECISION[spec['precision']]}, the same rows in the "
        "same order: "
        f"{spec['batch_size']} x {spec['grad_accum']} rows of {spec['seq_len']} tokens per step ({per_step:,} tokens), "
        f"AdamW, warmup {spec['lr_warmup']} steps then cosine, {spec['threads']} threads. Tokens/s over steps "
        f"{args.warmup + 2}..{spec['steps']} of each run (median, min-max over all those steps of all runs); peak "
        f"RSS is the child process's ru_maxrss (median over runs); tok per CPU-s divides by the process's user + "
        f"system time instead of wall time (less sensitive to other jobs on the cores); loss is the mean train loss "
        f"of the last {tail} "
        f"steps (tokens {per_step * (spec['steps'] - tail + 1):,}-{per_step * spec['steps']:,}), median over runs.",
        "",
        "| engine | runs | train tok/s (median) | min-max | tinkerlm is | tok per CPU-s | tinkerlm is | peak RSS MiB | "
        "tinkerlm uses | loss at the end | load average during runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in engines:
        speeds = [s for r in by[e] for s in r["step_tok_s"]]
        loss = statistics.median(sum(r["losses"][-tail:]) / tail for r in by[e])
        loads = " / ".join(r["load_before"].split("average ")[1].split(",")[0] for r in by[e])
        vs = "" if e == "tinkerlm" or "tinkerlm" not in med else f"{med['tinkerlm'] / med[e]:.2f}x"
        mem = "" if e == "tinkerlm" or "tinkerlm" not in rss else f"{rss['tinkerlm'] / rss[e]:.2f}x"
        vc = "" if e == "tinkerlm" or "tinkerlm" not in per_cpu else f"{per_cpu['tinkerlm'] / per_cpu[e]:.2f}x"
        lines.append(
            f"| {e} | {len(by[e])} | {med[e]:,.0f} | {min(speeds):,.0f}-{max(speeds):,.0f} | {vs} | "
            f"{per_cpu[e]:,.0f} | {vc} | {rss[e]:,.0f} | "
            f"{mem} | {loss:.3f} | {loads} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--engines", default="tinkerlm,transformers,litgpt", help="comma-separated: " + ", ".join(WORKERS))
    p.add_argument("--runs", type=int, default=3, help="runs per engine (engines alternate)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s (LitGPT compiles in them)")
    p.add_argument("--lr-warmup", type=int, default=10, help="learning-rate warmup steps")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every engine")
    p.add_argument("--precision", choices=list(PRECISION), default="fp32", help="fp32, or bf16 mixed precision")
    p.add_argument("--data", nargs="+", default=["stdlib/*.py"], help="pretraining sources (as `tinkerlm pretrain`)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary of the tokenizer trained on --data")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer instead of training one")
    p.add_argument("--litgpt-python", default=LITGPT_PYTHON, help="a Python with litgpt installed")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="tokenizer, shards and rows")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--chart", default=None, help="write loss and tokens/s curves as a PNG here")
    args = p.parse_args(argv)
    if args.worker:
        r = WORKERS[args.worker](json.loads(args.spec))
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
            print(json.dumps(r))
        return 0

    spec = prepare(args)
    engines = args.engines.split(",")
    for e in engines:
        if e not in WORKERS:
            p.error(f"--engines: unknown engine {e!r} (known: {', '.join(WORKERS)})")
    print(f"{spec['tokens']:,} tokens of data, vocabulary {spec['vocab_size']}; {uptime()}", file=sys.stderr)
    results = []
    for i in range(args.runs):
        order = engines[i % len(engines) :] + engines[: i % len(engines)]  # who goes first rotates
        for e in order:
            python = args.litgpt_python if e.startswith("litgpt") else None
            r = run(e, spec, python, args.warmup)
            results.append(r)
            print(
                f"run {i + 1} {e:13s} {r['tok_s']:7.0f} tok/s (steps {min(r['step_tok_s']):.0f}-"
                f"{max(r['step_tok_s']):.0f})  peak RSS {r['peak_rss_mb']:5.0f} MiB  loss {r['losses'][0]:.3f} -> "
                f"{r['losses'][-1]:.3f}  wall {r['wall_s']:.0f} s  {r['load_before']}",
                file=sys.stderr,
                flush=True,
            )
            if args.out:  # after every run, so a long comparison stopped early keeps what it measured
                Path(args.out).write_text(json.dumps({"spec": spec, "results": results}, indent=1))
    text = report(results, spec, args)
    print(text)
    if args.chart:
        plot(results, spec, Path(args.chart))
    return 0


if __name__ == "__main__":
    sys.exit(main())
