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
import math
import re
import struct
from collections.abc import Callable
from pathlib import Path

from tinkerlm import limits
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
        {"format", "architecture" (HF model_type), "parameters", "quantization", "context_length", "license",
        "parents"}: "parents" is the lineage a GGUF file records (`gguf_lineage`), [] for other checkpoints.

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

    ckpt = read_gguf(path)  # every count and shape bounded by tinkerlm.limits and the file's size
    meta = ckpt.metadata
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) and arch else "unknown"
    params = 0
    by_type: dict[str, int] = {}
    for _, shape, type_name in ckpt.tensor_infos():
        n = math.prod(shape)
        params += n
        if len(shape) >= 2:  # norms and biases stay F32 in every quantized file
            by_type[type_name] = by_type.get(type_name, 0) + n
    return {
        "format": "gguf",
        "architecture": specs.gguf_model_type(arch, meta),
        "parameters": params,
        "quantization": _dominant(by_type),
        "context_length": _count(meta.get(f"{arch}.context_length")),
        "license": _text(meta.get("general.license")),
        "parents": gguf_lineage(meta),
    }


def _count(value: object) -> int:
    """A context length as a store entry shows it: a non-negative int, else 0 (unknown); metadata may be wrong-typed."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limits.MAX_CONTEXT else 0


def _text(value: object) -> str | None:
    """A short string from metadata or None: a licence named by a list or a number is not shown."""
    return value[:200] if isinstance(value, str) else None


# safetensors dtype code -> bytes per element (https://github.com/huggingface/safetensors#format)
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F6_E2M3": 1, "F6_E3M2": 1,
    "F4": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_SUB_BYTE = {"F4": 2, "F6_E2M3": 4 / 3, "F6_E3M2": 4 / 3}  # elements a byte holds where less than a byte each


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {tensor name: {"dtype", "shape", "data_offsets"}, "__metadata__"}.

    The file is untrusted: the header's length is bounded (`limits.MAX_JSON_BYTES`) and must fit in the file, and
    each tensor's dtype, shape and offsets are type-checked, its elements bounded (`limits.MAX_ELEMENTS`), its
    elements times item size equal to its byte range and the range inside the file, so nothing read from it
    later (a merge, a load) allocates more than the file holds.

    Raises:
        TinkerError: an unreadable or inconsistent header, naming the file and the tensor.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("the file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > limits.MAX_JSON_BYTES or 8 + n > size:
                raise ValueError(f"header length {n} is implausible for a file of {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error, RecursionError) as e:
        raise TinkerError(
            f"{path}: unreadable safetensors header ({e}); the file may be truncated or not safetensors"
        ) from None
    if not isinstance(header, dict):
        raise TinkerError(f"{path}: the safetensors header is not a JSON object (file corrupt)")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise TinkerError(f"{path}: __metadata__ in the safetensors header is not an object (file corrupt)")
            continue
        _check_tensor(path, name, info, data_size)
    return header


def _check_tensor(path: Path, name: str, info: object, data_size: int) -> None:
    def bad(problem: str) -> TinkerError:
        return TinkerError(f"{path}: tensor {name!r:.100} {problem} (file truncated, corrupt or hostile)")

    if not isinstance(info, dict):
        raise bad("has no {dtype, shape, data_offsets} entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
        raise bad(f"has unknown dtype {dtype!r:.40}")
    ints = (list, tuple)
    if not isinstance(shape, ints) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise bad(f"has shape {shape!r:.80}, expected a list of integers")
    if len(shape) > limits.MAX_SAFETENSORS_DIMS or any(s < 0 for s in shape):
        raise bad(f"has shape {list(shape)!r:.80} (at most {limits.MAX_SAFETENSORS_DIMS} non-negative dimensions)")
    if (
        not isinstance(offsets, ints)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(f"has data_offsets {offsets!r:.80}, expected [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"has data_offsets [{begin}, {end}] outside the {data_size} bytes of data in the file")
    elements = 1
    for s in shape:
        elements *= s
        if elements > limits.MAX_ELEMENTS:
            raise bad(f"declares {elements} elements or more, over the limit of {limits.MAX_ELEMENTS}")
    per_byte = _SUB_BYTE.get(dtype)
    expected = math.ceil(elements / per_byte) if per_byte else elements * SAFETENSORS_ITEMSIZE[dtype]
    if end - begin != expected:
        raise bad(f"of dtype {dtype} and shape {list(shape)} needs {expected} bytes, but its range holds {end - begin}")


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
    if not cfg_path.is_file():
        raise TinkerError(f"{d}: no config.json; a Hugging Face model directory needs config.json + *.safetensors")
    cfg = hf.read_json(cfg_path)  # size-bounded; must be a JSON object
    text_cfg = cfg.get("text_config")
    text_cfg = text_cfg if isinstance(text_cfg, dict) else {}
    weights = [p.name for p in hf.weight_files(d)]
    params = 0
    shapes: dict[str, list] = {}
    by_dtype: dict[str, int] = {}
    for fname in weights:
        for tname, info in safetensors_header(d / fname).items():
            if tname == "__metadata__":
                continue
            n = math.prod(info["shape"])  # checked by safetensors_header
            params += n
            shapes[tname] = info["shape"]
            if len(info["shape"]) >= 2:
                by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    # A checkpoint may store a tied lm_head as well as the embedding; it is one parameter.
    tied = cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", True))
    if tied and "lm_head.weight" in shapes and any(k.endswith("embed_tokens.weight") for k in shapes):
        params -= math.prod(shapes["lm_head.weight"])
    ctx = 0
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        ctx = _count(cfg.get(key)) or _count(text_cfg.get(key))
        if ctx:
            break
    quant = cfg.get("quantization_config")
    quant = _text(quant.get("quant_method")) if isinstance(quant, dict) else None
    return {
        "format": "hf",
        "architecture": _text(cfg.get("model_type")) or _text(text_cfg.get("model_type")) or "unknown",
        "parameters": params,
        "quantization": quant.upper() if quant else _dominant(by_dtype),
        "context_length": ctx,
        "license": _readme_license(d / "README.md") or _text(cfg.get("license")),
        "parents": [],
    }


def _describe_lora(d: Path, find_base: Callable[[str], dict | None] | None) -> dict:
    """A PEFT LoRA adapter directory: its own parameters; architecture and context come from the base's manifest."""
    cfg = hf.read_json(d / "adapter_config.json")
    params = 0
    by_dtype: dict[str, int] = {}
    for f in sorted(d.glob("*.safetensors")):
        for tname, info in safetensors_header(f).items():
            if tname != "__metadata__":
                n = math.prod(info["shape"])
                params += n
                by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    ref = _text(cfg.get("base_model_name_or_path"))
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
        "parents": [],
    }


def gguf_lineage(meta: dict) -> list[dict]:
    """The parents a GGUF's metadata records: those `tinkerlm export` wrote (`tinkerlm.lineage`), else those the
    standard `general.base_model.{i}.*` keys name (name, and sha256 where given), relation "base"; [] for neither.

    Untrusted: the JSON is bounded by the GGUF string limits, and entries that are not objects with a string
    name are dropped, never raised on (a pull of a file with odd lineage still works).
    """
    raw = meta.get("tinkerlm.lineage")
    if isinstance(raw, str):
        try:
            parents = json.loads(raw).get("parents", [])
        except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, nested too deep
            parents = []
        if isinstance(parents, list):
            return [p for p in parents if isinstance(p, dict) and isinstance(p.get("name"), str)]
    count = meta.get("general.base_model.count")
    out = []
    if isinstance(count, int) and not isinstance(count, bool):
        for i in range(min(count, 64)):
            name = meta.get(f"general.base_model.{i}.name")
            if not isinstance(name, str):
                continue
            entry = {"name": name, "relation": "base"}
            for key in ("sha256", "repo_url", "organization"):
                value = meta.get(f"general.base_model.{i}.{key}")
                if isinstance(value, str):
                    entry[key] = value
            out.append(entry)
    return out
