"""tinkerlm LoRA step time, fp32 with everything kept against bf16 (frozen weights cast once) in each recomputation
mode, the models side by side in one process and their steps interleaved, so a shared machine's load falls on all
alike: a same-run speed ratio where separate processes' tokens/s are too noisy (bench/finetune_bench.py
--bf16-rows gives the peaks and the quiet speeds).

    .venv/bin/python bench/bf16_ratio.py --rounds 6          # SmolLM2-135M, 4 x 512 tokens, 2 threads
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODES = {"fp32 kept": (False, False), "bf16 kept": (True, False), "bf16 selective": (True, "selective")}
MODES["bf16 whole layers"] = (True, True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="steps of each model (the first not timed)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    args = p.parse_args(argv)

    import torch
    from finetune_bench import TARGETS, _rows, prepare

    from tinkerlm import lora
    from tinkerlm.loading import load_checkpoint
    from tinkerlm.tune import memory, trainer

    torch.set_num_threads(args.threads)
    args.data, args.steps, args.cache = str(ROOT / "examples/data/dates/train.jsonl"), 1, None
    args.cache = str(Path.home() / ".cache" / "tinkerlm-bench")
    spec = prepare(args)
    spec["steps"] = args.rounds
    ids, seg, target = _rows(spec)
    memory.caching_allocator(True)
    runs = {}
    for name in args.modes.split(","):
        bf16, ckpt = MODES[name]
        model, _, _ = load_checkpoint(Path(spec["hf_dir"]), quant="fp32")
        lora.apply_lora(model, lora.LoRAConfig(rank=8, alpha=16, targets=TARGETS), seed=0)
        if bf16:
            lora.bf16_bases(model)
        model.checkpoint_layers = ckpt
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = (model.train(), bf16, torch.optim.AdamW(params, lr=1e-4, foreach=True), [], [])
    B = args.batch_size
    for s in range(args.rounds):
        sl = slice(s * B, (s + 1) * B)
        n = int(target[sl, 1:].sum())
        for model, bf16, opt, times, losses in runs.values():
            t0 = time.perf_counter()
            loss = trainer.loss_sum(model, ids[sl], seg[sl], target[sl], bf16) / n
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        print(f"round {s + 1}: " + ", ".join(f"{k} {v[3][-1]:.1f} s" for k, v in runs.items()), flush=True)
    ref = runs[next(iter(runs))][3]
    print("\n| run | step s (median) | speed vs the first (median of per-round ratios) | losses |")
    print("|---|---:|---:|---|")
    for name, (_, _, _, times, losses) in runs.items():
        ratio = statistics.median(r / t for r, t in zip(ref[1:], times[1:]))
        print(
            f"| {name} | {statistics.median(times[1:]):.1f} | {ratio:.2f}x | {' '.join(f'{x:.4f}' for x in losses)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
