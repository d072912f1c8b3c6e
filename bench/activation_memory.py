"""What one LoRA training step keeps for the backward pass, by autograd op: the saved-tensor bytes behind the
activation part of fine-tuning's peak memory.

    .venv/bin/python bench/activation_memory.py                       # SmolLM2-135M fp32, 4 x 512 tokens
    .venv/bin/python bench/activation_memory.py --quant native --batch-size 2
    .venv/bin/python bench/activation_memory.py --bf16 --dtypes     # bf16 autocast, frozen weights cast once

Runs one forward of `trainer.loss_sum` (layers not recomputed), then walks the autograd graph from the loss and
sums the bytes of each distinct storage a node saved, attributed to the first node type that saved it (the model's
own weights, which matmuls save too, are not counted). `--bf16` trains as `finetune --bf16` does: the frozen
linear weights cast to bf16 once (`lora.bf16_bases`), the forward under bf16 autocast; `--dtypes` splits the bytes
by dtype.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


SHOW_SHAPES = False
shapes: collections.Counter = collections.Counter()
by_dtype: collections.Counter = collections.Counter()


def saved_by_node(loss, weights: set[int]) -> tuple[collections.Counter, collections.Counter]:
    """Bytes and tensor counts saved per autograd node type; storages in `weights` (the model's own) not counted."""
    import torch

    seen, bytes_by, count_by = set(), collections.Counter(), collections.Counter()
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        name = type(node).__name__
        tensors = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    v = getattr(node, attr)
                except Exception:  # noqa: BLE001 - freed or not a tensor
                    continue
                tensors += (
                    [v]
                    if isinstance(v, torch.Tensor)
                    else [t for t in v if isinstance(t, torch.Tensor)]
                    if isinstance(v, (list, tuple))
                    else []
                )
        if hasattr(node, "saved_tensors"):
            try:
                tensors += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
            except Exception:  # noqa: BLE001
                pass
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key in seen or key in weights:  # counted already, or a weight (kept anyway): not an activation
                continue
            seen.add(key)
            bytes_by[name] += t.untyped_storage().nbytes()
            by_dtype[(name, t.dtype)] += t.untyped_storage().nbytes()
            if SHOW_SHAPES:
                shapes[(name, tuple(t.shape), t.untyped_storage().nbytes())] += 1
            count_by[name] += 1
        stack += [f for f, _ in node.next_functions]
    return bytes_by, count_by


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quant", default="fp32", help="fp32 or native (the GGUF's own quantized weights)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=str(ROOT / "examples/data/dates/train.jsonl"))
    p.add_argument("--shapes", action="store_true", help="also list the saved tensors by op, shape and bytes")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, the frozen weights cast once (finetune --bf16)")
    p.add_argument("--dtypes", action="store_true", help="also split each op's bytes by dtype")
    args = p.parse_args(argv)
    global SHOW_SHAPES
    SHOW_SHAPES = args.shapes

    import torch

    from tinkerlm import lora, store
    from tinkerlm.formats.tokenizer import Tokenizer
    from tinkerlm.loading import load_checkpoint
    from tinkerlm.tune import data, trainer

    torch.set_num_threads(args.threads)
    m = store.find("smollm2") or store.pull("smollm2")
    model, _, _ = load_checkpoint(store.model_path(m), quant=args.quant)
    tok = Tokenizer.from_hf_dir(Path.home() / ".cache/tinkerlm-bench/smollm2-135m-fp32-hf")
    examples, _ = data.load_examples(args.data, tok, args.seq_len)
    rows = data.pack(examples, args.seq_len, tok.pad_token_id or 0)
    B = args.batch_size
    lora.apply_lora(model, lora.LoRAConfig(rank=8, alpha=16, targets=list(lora.DEFAULT_TARGETS)), seed=0)
    if args.bf16:
        lora.bf16_bases(model)
    model.train()
    loss = trainer.loss_sum(model, rows.ids[:B], rows.segments[:B], rows.target[:B], args.bf16)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    bytes_by, count_by = saved_by_node(loss, weights)
    total = sum(bytes_by.values())
    weight_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(
        f"{B} x {args.seq_len} tokens, quant {args.quant}{', bf16' if args.bf16 else ''}: {total / 2**20:.0f} MiB "
        f"saved for backward; parameters {weight_mib:.0f} MiB"
    )
    for name, b in bytes_by.most_common():
        print(f"  {name:40s} {b / 2**20:8.1f} MiB  ({count_by[name]} tensors)")
        if args.dtypes:
            for (n, dt), db in sorted(by_dtype.items(), key=lambda kv: -kv[1]):
                if n == name:
                    print(f"    {str(dt):36s} {db / 2**20:8.1f} MiB")
    for k, v in sorted(shapes.items(), key=lambda kv: -kv[0][2] * kv[1]):
        print("   ", k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
