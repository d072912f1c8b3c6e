"""Questions per second of tinkerlm's multiple-choice scoring against lm-evaluation-harness's `hf` backend (HFLM).

    .venv/bin/python bench/eval_speed.py                                   # hellaswag + arc_easy, 100 items each
    .venv/bin/python bench/eval_speed.py --tasks hellaswag --limit 200 --rounds 2 --threads 2

Same machine, same run, same items (`--limit` items spread evenly over each task, or with `--first` its first ones:
HellaSwag's first items are its short ActivityNet ones, half the tokens of the average question; zero-shot, lm-eval's prompts as loaded by
`tinkerlm.evaluate.tasks`), same batch size and threads:
- tinkerlm: the items' (context, continuation) strings tokenized as lm-eval does (context + continuation encoded
  whole, the continuation is what follows the context's ids), then `scoring.loglikelihoods` (shared-prefix KV,
  batching by length), on the GGUF with its native quantized kernels (`native`) and dequantized (`fp32`);
- hf: lm-eval's `HFLM(pretrained=<dir>, dtype=float32)`'s `loglikelihood` on the same strings, where <dir> is the
  same GGUF dequantized and written as an HF directory by `tinkerlm export --to hf --dtype float32` (so hf and
  tinkerlm fp32 run the very same weights: their accuracies must be identical; native may differ by quantization
  noise).
Engines run in turn per task (order rotated each round); each is warmed up on two items first. Timing covers
tokenization and scoring, not model loading. Needs lm-eval (`pip install 'lm-eval==0.4.13'`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tinkerlm
from tinkerlm.evaluate.run import encode_pair  # lm-eval's request split
from tinkerlm.evaluate.scoring import loglikelihoods
from tinkerlm.evaluate.tasks import load_task


def accuracy(task, lls: list[float]) -> tuple[float, float]:
    """(acc, acc_norm) as lm-eval computes them (acc_norm: log-likelihood per character of the choice)."""
    acc = norm = pos = 0
    for item in task.items:
        x = lls[pos : pos + len(item.choices)]
        pos += len(item.choices)
        acc += max(range(len(x)), key=x.__getitem__) == item.gold
        norm += max(range(len(x)), key=lambda i: x[i] / len(item.choices[i].lstrip(" "))) == item.gold
    return acc / len(task.items), norm / len(task.items)


class Tinker:
    def __init__(self, model: str, quant: str, threads: int | None, batch_size: int):
        self.name, self.batch_size = f"tinkerlm {quant}", batch_size
        self.llm = tinkerlm.load(model, quant=quant, threads=threads)

    def __call__(self, requests: list[tuple[str, str]]) -> list[float]:
        pairs = [encode_pair(self.llm.tokenizer, c, k) for c, k in requests]
        return [ll for ll, _ in loglikelihoods(self.llm.model, pairs, batch_size=self.batch_size)]


class HF:
    def __init__(self, directory: Path, batch_size: int):
        from lm_eval.models.huggingface import HFLM

        self.name = "lm-eval hf fp32"
        self.lm = HFLM(pretrained=str(directory), dtype="float32", batch_size=batch_size, device="cpu")

    def __call__(self, requests: list[tuple[str, str]]) -> list[float]:
        from lm_eval.api.instance import Instance

        reqs = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]
        return [ll for ll, _ in self.lm.loglikelihood(reqs, disable_tqdm=True)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="store name or GGUF path (default smollm2)")
    ap.add_argument("--tasks", default="hellaswag,arc_easy", help="comma-separated (default hellaswag,arc_easy)")
    ap.add_argument("--limit", type=int, default=100, help="N items of each task, spread over it (default 100)")
    ap.add_argument("--first", action="store_true", help="the first N items instead of N spread over the task")
    ap.add_argument("--batch-size", type=int, default=16, help="requests per forward pass, both engines (default 16)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads, both engines (default: physical cores)")
    ap.add_argument("--quants", default="native,fp32", help="tinkerlm weight formats (default native,fp32)")
    ap.add_argument("--rounds", type=int, default=1, help="timed passes per engine and task (default 1)")
    ap.add_argument("--hf-dir", default=None, help="the HF export to give HFLM (default: exported to a temp dir)")
    args = ap.parse_args(argv)

    engines = [Tinker(args.model, q, args.threads, args.batch_size) for q in args.quants.split(",")]
    torch_threads = torch.get_num_threads()  # tinkerlm.load set it (threads or physical cores); HFLM shares it
    hf_dir = Path(args.hf_dir) if args.hf_dir else None
    tmp = None
    if hf_dir is None:
        from tinkerlm.export import export

        tmp = tempfile.TemporaryDirectory(prefix="eval-speed-")
        hf_dir = Path(tmp.name) / "hf"
        export(args.model, to="hf", out=str(hf_dir), dtype="float32", verify=False, progress=False)
    engines.insert(1, HF(hf_dir, args.batch_size))
    torch.set_num_threads(torch_threads)

    load = os.getloadavg()
    print(f"{args.model}, batch {args.batch_size}, {torch_threads} threads, load average {load[0]:.2f} at start")
    print(
        f"{'task':<12} {'engine':<18} {'items':>5} {'seconds':>8} {'q/s':>7} {'x hf':>6} {'cpu s':>7} {'x hf':>6} "
        f"{'acc':>6} {'acc_norm':>8}"
    )
    for name in args.tasks.split(","):
        task = load_task(name, limit=args.limit if args.first else None)
        if not args.first:
            task.items = task.items[:: max(1, len(task.items) // args.limit)][: args.limit]
        requests = [r for item in task.items for r in task.requests(item)]
        warm = [r for item in task.items[:2] for r in task.requests(item)]
        times: dict[str, list[float]] = {e.name: [] for e in engines}
        cpu: dict[str, list[float]] = {e.name: [] for e in engines}  # process CPU seconds: fairer on a busy host
        scores: dict[str, list[float]] = {}
        for e in engines:
            e(warm)
        for r in range(args.rounds):
            for e in engines[r % len(engines) :] + engines[: r % len(engines)]:
                t0, c0 = time.perf_counter(), time.process_time()
                scores[e.name] = e(requests)
                times[e.name].append(time.perf_counter() - t0)
                cpu[e.name].append(time.process_time() - c0)
        hf_rate = len(task.items) / statistics.median(times["lm-eval hf fp32"])
        hf_cpu = statistics.median(cpu["lm-eval hf fp32"])
        for e in engines:
            seconds, cpu_s = statistics.median(times[e.name]), statistics.median(cpu[e.name])
            rate = len(task.items) / seconds
            acc, norm = accuracy(task, scores[e.name])
            print(
                f"{name:<12} {e.name:<18} {len(task.items):>5} {seconds:>8.1f} {rate:>7.2f} {rate / hf_rate:>6.2f} "
                f"{cpu_s:>7.1f} {hf_cpu / cpu_s:>6.2f} {acc:>6.3f} {norm:>8.3f}"
            )
        ref = scores["lm-eval hf fp32"]
        for e in engines:
            if e.name != "lm-eval hf fp32":
                diff = max(abs(a - b) for a, b in zip(scores[e.name], ref))
                print(f"{'':<12} max |loglikelihood - hf| per request, {e.name}: {diff:.2e}")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} at end")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
