"""Fine-tuning's memory plan: when to recompute activations, and which allocator holds them.

Two things decide a LoRA run's peak memory besides the weights: the activations autograd keeps for the backward
pass, and what the C heap keeps after freeing them. `recompute(...)` picks whether to recompute from the size of a
micro-batch's activations. `caching_allocator(True)`, called by `trainer.train` for every training run (fine-tuning,
preference methods, pretraining) unless TINKERLM_CACHING_ALLOCATOR=0, makes tinkerlm/kernels/alloc.cpp's allocator
PyTorch's CPU allocator: blocks of 256 KiB and more reused by size class, where glibc malloc fragments and keeps
freed activations (measured: bench/finetune_bench.py). `lean_malloc()` lowers glibc's mmap threshold instead, which
returns freed blocks but pays a page fault per page of every new one (~30% of the speed); it is kept for the
benchmark.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ALLOCATOR_CAP = 1 << 30  # cached-but-free bytes the caching allocator keeps at most


def caching_allocator(on: bool) -> bool:
    """Install (on) or uninstall and empty the caching allocator for a training run; returns whether it changed
    anything: False where TINKERLM_CACHING_ALLOCATOR=0 or the C++ kernels are unavailable (glibc malloc then)."""
    if os.environ.get("TINKERLM_CACHING_ALLOCATOR", "1") == "0":
        return False
    from tinkerlm import kernels

    if not kernels.caching_allocator(on, ALLOCATOR_CAP):
        return False
    if not on:
        kernels.allocator_release()
    return True


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8


def lean_malloc(mmap_threshold: int = 8 << 20, trim_threshold: int | None = None, arena_max: int | None = None) -> bool:
    """Set glibc malloc for training; returns False where the C library is not glibc (nothing is changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))
    if trim_threshold is not None:
        ok &= bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if arena_max is not None:
        ok &= bool(mallopt(M_ARENA_MAX, arena_max))
    return ok


ACTIVATION_BUDGET = 512 << 20  # kept activations above which a run recomputes norms, RoPE, SwiGLU (~10% slower;
# whole layers in bf16, see `recompute`)
WHOLE_LAYER_BUDGET = 2 << 30  # ... and above which it recomputes whole layers, keeping only their inputs (~35%)


def activation_bytes(config, tokens: int, bf16: bool = False) -> int:
    """About what one micro-batch of `tokens` keeps for the backward pass without recomputation (fp32, or bf16
    autocast's half-size products: counted at 2 bytes each, though the residual stream stays fp32): per token
    and layer, the residual stream and norms' outputs (4 x hidden), the attention's q, k, v and output (2 x hidden
    + 2 x kv width), and the MLP's gate, up and product (3 x intermediate). Measured on SmolLM2-135M at 4 x 512
    tokens (bench/activation_memory.py): 2.1 GiB kept, this says 1.9."""
    hidden = config.hidden_size
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    per = 6 * hidden + 2 * kv * head_dim + 3 * config.intermediate_size
    return (2 if bf16 else 4) * tokens * config.num_hidden_layers * per


def recompute(config, tokens: int, asked: bool | None, bf16: bool = False) -> bool | str:
    """The model's `checkpoint_layers` for a run: `asked` (the recipe's grad_checkpointing) when given, else by the
    size of a micro-batch's activations: all kept up to ACTIVATION_BUDGET, then "selective" (matmul and attention
    outputs kept, the cheap ops rerun: measured quiet on SmolLM2 at 4 x 512 with the caching allocator, 3.2 -> 2.6 GB
    peak for 10% of the speed), then whole layers above WHOLE_LAYER_BUDGET (1.26 GB for 29%). The budgets were kept
    when the caching allocator came: it lowers every mode's peak, so the trade between them is unchanged
    (bench/finetune_bench.py --allocators, BENCHMARKS.md).

    Under bf16 autocast (`bf16`, frozen weights in bf16: `lora.bf16_bases`) the activations are counted at 2 bytes
    and the selective step is skipped: above ACTIVATION_BUDGET whole layers are rerun. The products being ~4x
    cheaper in bf16 (AVX512-BF16), rerunning them costs little, and selective recomputation keeps too much: on
    SmolLM2 at 4 x 512 (bench/finetune_bench.py --bf16-rows, quiet 2-core machine) selective peaked at 1.92 GB
    for 2.40x the speed of fp32 with everything kept, whole layers at 1.19 GB for 2.12x."""
    if asked is not None:
        return asked
    kept = activation_bytes(config, tokens, bf16)
    if kept > WHOLE_LAYER_BUDGET or (bf16 and kept > ACTIVATION_BUDGET):
        return True
    return "selective" if kept > ACTIVATION_BUDGET else False
