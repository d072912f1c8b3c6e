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
    config.pop("rope_freq_factors", None)  # a GGUF-only key (Llama 3.1): its rope_scaling is what HF reads
    widest = max(chosen.values(), key=lambda t: torch.finfo(t).bits, default=torch.float32)
    config["torch_dtype"] = str(widest).removeprefix("torch.")

    def hf_tensor(name: str) -> torch.Tensor:
        t = source.tensor(name)
        return t.t() if spec.is_conv1d(name) else t  # HF's Conv1D layout: (in, out)

    layout = []
    for name in source.names:
        shape = tuple(source.tensor(name).shape) if source.raw(name) is None else tuple(source.raw(name).shape)
        layout.append((name, chosen[name], shape[::-1] if spec.is_conv1d(name) and len(shape) == 2 else shape))
    hf.write_model(
        out,
        config,
        layout,
        ((n, hf_tensor(n)) for n in source.names),
        generation_config=source.generation_config,
        tokenizer=source.tokenizer.save_hf,
        chat_template=getattr(source.tokenizer, "chat_template", None),
        max_shard_bytes=max_shard_bytes,
    )
    if card is not None:
        (out / "README.md").write_text(card, encoding="utf-8")
    return chosen
