"""Hugging Face model directories: `config.json`, `generation_config.json` and safetensors weights.

Weights are single `model.safetensors` or shards listed in `model.safetensors.index.json`. Files are memory-mapped
through `safetensors`; pickled `*.bin` checkpoints are never opened. Format: https://github.com/huggingface/safetensors
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinkerlm.errors import TinkerError

INDEX = "model.safetensors.index.json"


def read_json(path: Path, required: bool = True) -> dict[str, Any] | None:
    """Parse a JSON object file; a missing (when required) or malformed file is a TinkerError naming it."""
    if not path.is_file():
        if required:
            raise TinkerError(f"{path}: file not found (a Hugging Face model directory needs it)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinkerError(f"{path}: not valid JSON ({e}); re-download or fix the file") from None
    if not isinstance(data, dict):
        raise TinkerError(f"{path}: expected a JSON object at the top level")
    return data


def load_config(model_dir: Path) -> dict[str, Any]:
    config = read_json(model_dir / "config.json")
    if "model_type" not in config:
        raise TinkerError(f"{model_dir / 'config.json'}: missing key 'model_type' (which architecture is this?)")
    return config


def load_generation_config(model_dir: Path) -> dict[str, Any]:
    return read_json(model_dir / "generation_config.json", required=False) or {}


def index_shards(index: Path) -> list[str]:
    """The shard file names a `model.safetensors.index.json` lists, in order of first appearance."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise TinkerError(f"{index}: missing 'weight_map' (re-download the index)")
    return list(dict.fromkeys(weight_map.values()))


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files that hold the weights: the shards the index names, else every top-level one."""
    index = model_dir / INDEX
    if index.is_file():
        files = [model_dir / name for name in index_shards(index)]
        for f in files:
            if not f.is_file():
                raise TinkerError(f"{index}: lists shard {f.name}, which is not in {model_dir} (download all shards)")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt*")]
        hint = " (pickled checkpoints are not loaded: convert them to safetensors)" if pickles else ""
        raise TinkerError(f"{model_dir}: no *.safetensors weights found{hint}")
    return files


def load_state_dict(model_dir: Path) -> dict:
    """All tensors of the directory's safetensors files by name (memory-mapped, in their stored dtype)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict = {}
    for f in weight_files(model_dir):
        try:
            part = load_file(f)
        except (SafetensorError, OSError, ValueError) as e:
            raise TinkerError(f"{f}: cannot read safetensors ({e}); the file is truncated or corrupt, re-download it") from None
        dup = set(part) & set(tensors)
        if dup:
            raise TinkerError(f"{f}: tensor {sorted(dup)[0]} also appears in another shard")
        tensors.update(part)
    return tensors
