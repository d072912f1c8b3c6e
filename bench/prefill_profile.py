"""Where a prefill's time goes: one N-token prompt through the model, with every C++ kernel call timed (the
products, attention, RoPE, RMSNorm) and the rest (PyTorch ops, Python) as one remainder. Prints a Markdown table
(pasted into BENCHMARKS.md).

    .venv/bin/python bench/prefill_profile.py [MODEL] [--tokens 512] [--runs 5]
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import tinkerlm
from tinkerlm import kernels
from tinkerlm.bench import prompt_ids

LABELS = {
    "qmatmul_swiglu": "gate/up products + SwiGLU",
    "qmatmul": "o, down and output-head products",
    "qmatmul_multi": "q/k/v products",
    "attention_causal": "causal attention",
    "rope_apply": "RoPE",
    "rms_norm_fwd": "RMSNorm",
    "embed": "embedding lookup",
}


class Timed:
    """The kernels module with every call's wall time added to `spent[name]`."""

    def __init__(self, module, spent: collections.Counter):
        self._module, self._spent = module, spent

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            start = time.perf_counter()
            out = attr(*args, **kwargs)
            self._spent[name] += time.perf_counter() - start
            return out

        return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2", help="store name or path")
    p.add_argument("--tokens", type=int, default=512, help="prompt length")
    p.add_argument("--runs", type=int, default=5, help="timed prefills (after one warm-up)")
    a = p.parse_args()

    llm = tinkerlm.load(a.model)
    model = llm.model
    ids = torch.tensor([prompt_ids(llm.tokenizer, a.tokens)])
    spent: collections.Counter = collections.Counter()
    timed = Timed(kernels.ops(), spent)
    kernels.ops = lambda: timed  # every caller looks the kernels up through this function

    def prefill():
        cache = model.new_cache(1, a.tokens + 1)
        with torch.inference_mode():
            model(ids, cache=cache, logits_at=torch.tensor([a.tokens - 1]))

    prefill()
    spent.clear()
    start = time.perf_counter()
    for _ in range(a.runs):
        prefill()
    total = (time.perf_counter() - start) / a.runs
    print(
        f"prefill of {a.tokens} tokens: {total * 1e3:.0f} ms ({a.tokens / total:.0f} tok/s), "
        f"{torch.get_num_threads()} threads, mean of {a.runs}\n"
    )
    print("| part | ms | share |\n|---|---:|---:|")
    for name, seconds in spent.most_common():
        ms = seconds / a.runs * 1e3
        print(f"| {LABELS.get(name, name)} | {ms:.1f} | {ms / (total * 1e3):.0%} |")
    rest = total - sum(spent.values()) / a.runs
    print(
        f"| the rest (residual adds, cache writes, PyTorch dispatch, Python) | {rest * 1e3:.1f} | {rest / total:.0%} |"
    )


if __name__ == "__main__":
    main()
