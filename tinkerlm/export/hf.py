"""Write a model as a Hugging Face directory: config.json, safetensors (sharded past a size), tokenizer files,
generation config, chat template and a model card (README.md) naming its base model and relation.

The weights are the source's own values: an HF source keeps each tensor's stored dtype, a GGUF source is written in
float32 (its quantized values exactly), unless `dtype` says otherwise. GPT-2's Conv1D weights go back to HF's
(in, out) layout (the spec's `conv1d`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tinkerlm.errors import TinkerError
from tinkerlm.export.source import Source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FROM_CODE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
SHARD_BYTES = 5 * 1024**3  # as transformers' save_pretrained: shards of at most 5 GB


def dtypes(source: Source, dtype: str) -> dict[str, torch.dtype]:
    """The dtype each tensor is written in: `dtype`, or ("auto") its stored dtype where torch has it, else float32.

    Raises:
        TinkerError: an unknown dtype name.
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise TinkerError(f"--dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return {
        n: DTYPES[dtype] if dtype != "auto" else _FROM_CODE.get(source.dtype(n), torch.float32) for n in source.names
    }


def lossless(source: Source, chosen: dict[str, torch.dtype]) -> bool:
    """Whether every tensor is written exactly (float32, or the dtype it is stored in)."""
    return all(t == torch.float32 or _FROM_CODE.get(source.dtype(n)) == t for n, t in chosen.items())


def write(
    source: Source, out: Path, dtype: str = "auto", *, card: str | None = None, max_shard_bytes: int = SHARD_BYTES
):
    """Write `source` as the HF directory `out` (which the caller created empty); returns the dtypes written."""
    from tinkerlm.formats import hf

    spec = source.spec
    chosen = dtypes(source, dtype)
    config = dict(source.config)
    factors = config.pop("rope_freq_factors", None)  # a GGUF's form of Llama 3.1's rope scaling: HF reads rope_scaling
    if factors is not None:
        config["rope_scaling"] = llama3_scaling(factors, config, source.ref)
    widest = max(chosen.values(), key=lambda t: torch.finfo(t).bits, default=torch.float32)
    config["torch_dtype"] = str(widest).removeprefix("torch.")

    def hf_tensor(name: str) -> torch.Tensor:
        t = source.tensor(name)
        return t.t() if spec.is_conv1d(name) else t  # HF's Conv1D layout: (in, out)

    layout = []
    for name in source.names:
        shape = tuple(source.shape(name))
        layout.append((name, chosen[name], shape[::-1] if spec.is_conv1d(name) and len(shape) == 2 else shape))
    hf.write_model(
        out,
        config,
        layout,
        ((n, hf_tensor(n)) for n in source.names),
        generation_config=source.generation_config or _generation_config(config),
        tokenizer=source.tokenizer.save_hf,
        chat_template=getattr(source.tokenizer, "chat_template", None),
        max_shard_bytes=max_shard_bytes,
    )
    if card is not None:
        (out / "README.md").write_text(card, encoding="utf-8")
    return chosen


def _generation_config(config: dict) -> dict:
    """generation_config.json for a source that has none (a GGUF): its special token ids, as transformers writes."""
    out = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    return {**out, "_from_model_config": True} if out else {}


def llama3_scaling(factors: list[float], config: dict, source: str) -> dict:
    """The `rope_scaling` (rope_type llama3) whose per-frequency divisors are `factors`, as a GGUF stores them.

    GGUF keeps only the divisors; HF's config keeps the four numbers they come from (Meta's formula: wavelengths
    shorter than original_max / high_freq_factor are kept, longer than original_max / low_freq_factor divided by
    `factor`, those between interpolated). The numbers are found by trying the values Llama 3.x releases use.

    Raises:
        TinkerError: no such numbers reproduce the divisors (then config.json cannot express this model).
    """
    import math

    theta = config.get("rope_theta", 10000.0)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    inv = [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    factor = max(factors)
    candidates = [2**k for k in range(4, 21)] + [config.get("max_position_embeddings", 0)]
    for orig in candidates:
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 2.0, 8.0, 1.0):
                got = []
                for f in inv:
                    wavelen = 2 * math.pi / f
                    if wavelen < orig / high:
                        got.append(1.0)
                    elif wavelen > orig / low:
                        got.append(factor)
                    else:
                        smooth = (orig / wavelen - low) / (high - low)
                        got.append(1.0 / ((1 - smooth) / factor + smooth))
                if all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(got, factors)):
                    return {
                        "rope_type": "llama3",
                        "factor": float(factor),
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": int(orig),
                    }
    raise TinkerError(
        f"{source}: its rope_freqs (Llama 3 rope scaling) match no llama3 rope_scaling that config.json can hold; "
        "export it --to gguf instead"
    )
