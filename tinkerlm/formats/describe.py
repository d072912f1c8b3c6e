"""What a checkpoint says about itself: format, architecture, parameters, quantization, context, licence.

Read from metadata only, never tensor data, so the store can describe a model as it pulls it:
- a GGUF file: its metadata and tensor infos (`formats.gguf.read_gguf`);
- a Hugging Face directory: config.json, the safetensors headers (`safetensors_header`) and the licence in
  README.md's YAML front matter (the model card);
- a PEFT LoRA adapter directory: adapter_config.json and its safetensors headers.
The quantization reported is the dominant one: the GGUF tensor type or safetensors dtype holding the most
weights of matrices (norms and biases stay F32 in quantized files and would otherwise hide it).

References: GGUF spec https://github.com/ggml-org/ggml/blob/master/docs/gguf.md;
safetensors header format https://github.com/huggingface/safetensors#format;
model card metadata https://huggingface.co/docs/hub/model-cards#model-card-metadata.

Imports no torch and nothing from the store (`describe` takes the store's lookup of a LoRA base as an argument).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tinkerlm.errors import TinkerError
from tinkerlm.formats import hf, specs


def describe(path: Path, find_base: Callable[[str], dict | None] | None = None) -> dict:
    """Format, architecture, parameter count, quantization, context length and licence of a model, read cheaply.

    A GGUF file is read through its metadata and tensor infos; a Hugging Face directory through config.json,
    the safetensors headers and README.md's YAML front matter; a PEFT LoRA adapter directory through
    adapter_config.json and its safetensors headers. No tensor data is read.

    Args:
        path: a `.gguf` file, a Hugging Face model directory or a LoRA adapter directory.
        find_base: for an adapter whose `base_model_name_or_path` is a name rather than a path, returns the base
            model's {"architecture", "context_length"} or None (the store passes its own lookup).

    Returns:
        {"format", "architecture" (HF model_type), "parameters", "quantization", "context_length", "license"}.

    Raises:
        TinkerError: not a GGUF file or Hugging Face directory, or its metadata is unreadable.
    """
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _describe_lora(path, find_base)
    if path.is_dir():
        return _describe_hf(path)
    if path.is_file():
        return _describe_gguf(path)
    raise TinkerError(f"{path}: no such file or directory")


def _dominant(weights: dict[str, int]) -> str:
    return max(weights.items(), key=lambda kv: kv[1])[0] if weights else "unknown"


def _describe_gguf(path: Path) -> dict:
    from tinkerlm.formats.gguf import read_gguf  # header and tensor infos only: no torch, no tensor data read

    ckpt = read_gguf(path)
    meta = ckpt.metadata
    arch = meta.get("general.architecture") or "unknown"
    params = 0
    by_type: dict[str, int] = {}
    for _, shape, type_name in ckpt.tensor_infos():
        n = int(np.prod(shape))
        params += n
        if len(shape) >= 2:  # norms and biases stay F32 in every quantized file
            by_type[type_name] = by_type.get(type_name, 0) + n
    return {
        "format": "gguf",
        "architecture": specs.gguf_model_type(arch),
        "parameters": params,
        "quantization": _dominant(by_type),
        "context_length": int(meta.get(f"{arch}.context_length") or 0),
        "license": meta.get("general.license"),
    }


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {tensor name: {"dtype", "shape", "data_offsets"}, "__metadata__"}."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError(f"header length {n} is implausible")
            return json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise TinkerError(f"{path}: unreadable safetensors header ({e}); the file may be truncated or not safetensors")


def _readme_license(readme: Path) -> str | None:
    """`license:` from the YAML front matter of a model card."""
    try:
        text = readme.read_text(errors="replace")
    except OSError:
        return None
    m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    if not m:
        return None
    lic = re.search(r"^license:\s*['\"]?([^'\"\n#]+?)['\"]?\s*$", m.group(1), re.M)
    return lic.group(1) if lic else None


def _describe_hf(d: Path) -> dict:
    cfg_path = d / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise TinkerError(f"{d}: no config.json; a Hugging Face model directory needs config.json + *.safetensors")
    except (OSError, ValueError) as e:
        raise TinkerError(f"{cfg_path}: unreadable ({e})")
    text_cfg = cfg.get("text_config") or {}
    weights = [p.name for p in hf.weight_files(d)]
    params = 0
    shapes: dict[str, list] = {}
    by_dtype: dict[str, int] = {}
    for fname in weights:
        for tname, info in safetensors_header(d / fname).items():
            if tname == "__metadata__":
                continue
            n = 1
            for s in info["shape"]:
                n *= s
            params += n
            shapes[tname] = info["shape"]
            if len(info["shape"]) >= 2:
                by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    # A checkpoint may store a tied lm_head as well as the embedding; it is one parameter.
    tied = cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", True))
    if tied and "lm_head.weight" in shapes and any(k.endswith("embed_tokens.weight") for k in shapes):
        n = 1
        for s in shapes["lm_head.weight"]:
            n *= s
        params -= n
    ctx = 0
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        ctx = cfg.get(key) or text_cfg.get(key) or 0
        if ctx:
            break
    quant = cfg.get("quantization_config", {}).get("quant_method")
    return {
        "format": "hf",
        "architecture": cfg.get("model_type") or text_cfg.get("model_type") or "unknown",
        "parameters": params,
        "quantization": quant.upper() if quant else _dominant(by_dtype),
        "context_length": int(ctx),
        "license": _readme_license(d / "README.md") or cfg.get("license"),
    }


def _describe_lora(d: Path, find_base: Callable[[str], dict | None] | None) -> dict:
    """A PEFT LoRA adapter directory: its own parameters; architecture and context come from the base's manifest."""
    cfg = hf.read_json(d / "adapter_config.json")
    params = 0
    by_dtype: dict[str, int] = {}
    for f in sorted(d.glob("*.safetensors")):
        for tname, info in safetensors_header(f).items():
            if tname != "__metadata__":
                n = int(np.prod(info["shape"]))
                params += n
                by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    ref = cfg.get("base_model_name_or_path")
    base: dict = {}
    if ref and Path(ref).is_absolute() and Path(ref).exists():
        base = describe(Path(ref), find_base)
    elif ref and find_base is not None:
        base = find_base(ref) or {}
    return {
        "format": "lora",
        "architecture": base.get("architecture", "unknown"),
        "parameters": params,
        "quantization": _dominant(by_dtype),
        "context_length": base.get("context_length", 0),
        "license": None,
    }
