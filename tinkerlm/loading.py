"""Checkpoint -> model: a GGUF file or Hugging Face directory (plus, optionally, a LoRA adapter) into a model,
its tokenizer and generation config.

    model, tokenizer, gen_config = load_checkpoint(Path("model.gguf"), quant="native")

Weights are read by `tinkerlm.formats`, the architecture is built by `tinkerlm.models`, quantized layers are
module swaps from `tinkerlm.quant` and adapters from `tinkerlm.lora`. Paths only: finding a model by store name is
`tinkerlm.api`'s (the layer above), which resolves names and passes the paths down.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tinkerlm.errors import TinkerError
from tinkerlm.models.base import KV_CACHES

QUANTS = ("native", "int8", "int4", "bf16", "fp32")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def physical_cores() -> int:
    """Physical CPU cores this process may run on (hyperthreads share a core's vector units, so they slow matrix work
    down). Counts only the CPUs in the process's affinity mask, so `taskset -c 0` or a container's cpuset means one
    thread, not one per core of the host."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        cores = set()
        cpu = phys = None
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                phys = value.strip()
            elif key == "core id" and (allowed is None or cpu in allowed):
                cores.add((phys, value.strip()))
        if cores:
            return len(cores)
    except (OSError, ValueError):
        pass
    return len(allowed) if allowed else os.cpu_count() or 1


def prepare(
    dtype: str = "float32", quant: str = "native", threads: int | None = None, kv_cache: str = "f32"
) -> torch.dtype:
    """Check the load options, set torch's thread count, and return the activation dtype.

    Args:
        dtype: activation dtype and dtype of unquantized weights.
        quant: weight format: "native" keeps a GGUF's quantization, "int8"/"int4" quantize, "bf16"/"fp32" dequantize.
        threads: CPU threads for torch and the kernels; default the number of physical cores.
        kv_cache: KV cache format: "f32" (the activations' dtype) or "q8" (8 bits, see `set_kv_cache`).
    Raises:
        TinkerError: an unknown quant, dtype or kv_cache, threads < 1, or int8/int4 with non-float32 activations.
    """
    if quant not in QUANTS:
        raise TinkerError(f"quant: '{quant}' is not one of {', '.join(QUANTS)}")
    check_kv_cache(kv_cache)
    if threads is not None and threads < 1:
        raise TinkerError(f"threads: must be >= 1, got {threads}")
    torch.set_num_threads(threads or physical_cores())
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise TinkerError(f"dtype: '{dtype}' is not one of float32, bfloat16, float16")
    if quant in ("int8", "int4") and torch_dtype != torch.float32:
        raise TinkerError(f"quant: {quant} weights run with float32 activations (drop --dtype {dtype})")
    return torch_dtype


def checkpoint_config(path: Path) -> dict:
    """The HF config.json keys of a checkpoint: an HF directory's own, or a GGUF's metadata as HF keys."""
    if path.is_dir():
        from tinkerlm.formats import hf

        return hf.load_config(path)
    from tinkerlm.formats.gguf import read_gguf

    return read_gguf(path).config()


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32, quant: str = "native", pack_cache: bool = True):
    """(model, tokenizer, generation_config) from a GGUF file or a Hugging Face model directory.

    `quant` picks the weight format (see `prepare`); quantized layers are module swaps from `tinkerlm.quant`.
    A GGUF loaded packed for the kernels (quant "native", float32) goes through `tinkerlm.pack_cache` unless
    `pack_cache` is False (see `pack_cache.enabled`: store models by default, TINKERLM_PACK_CACHE=1 any file, =0
    none): the first load saves the packed weights, config and tokenizer, later ones map them from that file
    instead of reading and repacking the GGUF.
    """
    from tinkerlm import kernels, models
    from tinkerlm import pack_cache as pc
    from tinkerlm import quant as q
    from tinkerlm.formats.tokenizer import Tokenizer

    source = str(path)
    if quant in ("bf16", "fp32"):
        dtype = torch.bfloat16 if quant == "bf16" else torch.float32
    packed = quant == "native" and dtype == torch.float32  # GGUF blocks packed for the kernels
    cache = pack_cache and packed and not path.is_dir() and kernels.ops() is not None
    cached = pc.load(path) if cache else None
    if path.is_dir():
        from tinkerlm.formats import hf

        config = hf.load_config(path)
        model = models.build(config, source)
        state_dict = models.hf_layout(config, hf.load_state_dict(path), source)
        tokenizer = Tokenizer.from_hf_dir(path)
        gen_config = hf.load_generation_config(path)
    else:
        from tinkerlm.formats.gguf import read_gguf

        if cached is not None:
            config, state_dict, tokenizer = cached
            model = models.build(config, source)
        else:
            ckpt = read_gguf(path)
            config = ckpt.config()
            model = models.build(config, source)
            state_dict = q.packed_state_dict(ckpt) if packed else ckpt.state_dict()
            tokenizer = ckpt.tokenizer()
        gen_config = {}
    # A token id past the embedding would fail only at generation (an index error mid-stream): refuse it here.
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TinkerError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding (vocab_size) has "
            f"{model.config.vocab_size} rows (tokenizer and weights from different models?)"
        )
    blocks = {k: v for k, v in state_dict.items() if isinstance(v, (q.QTensor, q.Packed))}
    plain = {k: v for k, v in state_dict.items() if k not in blocks}
    models.load_weights(model, plain, source, dtype, provided=set(blocks))
    q.attach(model, blocks, source)
    if quant in ("int8", "int4"):
        q.quantize(model, 8 if quant == "int8" else 4)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers())), "weights left unset"
    q.fuse(model)
    if cache and cached is None:
        pc.save(path, config, state_dict, tokenizer)  # once the weights have loaded without complaint
    return model, tokenizer, gen_config


def set_kv_cache(model, kv_cache: str) -> None:
    """Make `model.new_cache` build caches of this format: "f32" keeps keys and values in the activations' dtype,
    "q8" as 8-bit records with one fp32 scale per token and head (~3.8x less memory; `tinkerlm.models.base.KVCache`),
    read in place by the fused decode step."""
    check_kv_cache(kv_cache)
    model.kv_cache = kv_cache


def check_kv_cache(kv_cache: str) -> None:
    if kv_cache not in KV_CACHES:
        raise TinkerError(f"kv_cache: '{kv_cache}' is not one of {', '.join(KV_CACHES)}")


def load_adapted(
    adapter, base_path: Path, dtype: torch.dtype | None = None, quant: str = "native", source: str = "adapter"
):
    """A LoRA adapter applied (unfused) to its base: (model, tokenizer, generation_config).

    Args:
        adapter: a `tinkerlm.formats.peft.Adapter` (`read_adapter`); the chat template the adapter was trained
            with, saved beside it (`chat_template.jinja`), replaces the base's.
        base_path: the base model's GGUF file or HF directory.
        source: the adapter's name in error messages.
    """
    from tinkerlm import lora

    model, tokenizer, gen_config = load_checkpoint(base_path, dtype or torch.float32, quant)
    lora.load_adapter(model, adapter, source)
    template = Path(adapter.path) / "chat_template.jinja"
    if template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    return model, tokenizer, gen_config
