"""LoRA adapters in PEFT's on-disk layout: `adapter_config.json` + `adapter_model.safetensors`.

The tensors are `base_model.model.<module>.lora_A.weight` (rank, in) and `.lora_B.weight` (out, rank), so peft
loads ours and we load peft's. `read_adapter` gives each module's A and B and the per-weight deltas without a model
(merging uses them); putting an adapter onto a model is `tinkerlm.lora.load_adapter`.

This module imports no torch at import time: the fine-tuning recipe (and so `tinkerlm finetune --help`) reads its
defaults from here.

Reference: PEFT's adapter format (https://huggingface.co/docs/peft).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tinkerlm.errors import TinkerError

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# `--lora-targets all-linear`: every linear layer of the decoder blocks (not the output head), as peft does.
ALL_LINEAR = "all-linear"
# LoRA on every projection of attention and MLP (the QLoRA paper's finding: all linear layers, not just q/v).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_config(
    *,
    rank: int,
    alpha: float,
    dropout: float,
    rslora: bool,
    modules: list[str],
    base_model: str | None,
    fan_in_fan_out: bool = False,
) -> dict:
    """The `adapter_config.json` peft writes for a LoRA over `modules` (target_modules as their leaf names)."""
    leaves = sorted({n.rpartition(".")[2] for n in modules})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": leaves,
        "use_rslora": rslora,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }


def adapter_state_dict(modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each module's (A, B) under peft's tensor names."""
    out = {}
    for name, (a, b) in modules.items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().contiguous()
    return out


def save_adapter(
    directory: str | os.PathLike,
    config: dict,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype | None = None,
) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` (peft's layout) into `directory`.

    Args:
        config: the adapter config (`adapter_config`).
        modules: module name -> (A, B), cast to `dtype` (default float32).
    """
    import torch
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype or torch.float32) for k, v in adapter_state_dict(modules).items()}
    save_file(tensors, str(d / WEIGHTS_FILE), metadata={"format": "pt"})
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


class Adapter:
    """A LoRA adapter read from disk (ours or peft's): its config and per-module A, B and scaling."""

    def __init__(self, path: Path, config: dict, tensors: dict[str, torch.Tensor]):
        self.path = path
        self.config = config
        self.base_model: str | None = config.get("base_model_name_or_path")
        r = config.get("r")
        alpha = config.get("lora_alpha", r)
        if not isinstance(r, int) or r < 1:
            raise TinkerError(f"{path / CONFIG_FILE}: 'r' must be a positive integer, got {r!r}")
        self.rank = r
        self.scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        self.modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, t in tensors.items():
            stem = key.removeprefix(PEFT_PREFIX)
            for part in (".lora_A.weight", ".lora_A.default.weight"):
                if stem.endswith(part):
                    module = stem.removesuffix(part)
                    b = tensors.get(key.replace("lora_A", "lora_B"))
                    if b is None:
                        raise TinkerError(f"{path / WEIGHTS_FILE}: {key} has no matching lora_B tensor")
                    self.modules[module] = (t.float(), b.float())
        unknown = [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k]
        if unknown:
            raise TinkerError(
                f"{path / WEIGHTS_FILE}: tensor {unknown[0]} is not a LoRA A/B matrix "
                "(adapters with modules_to_save, DoRA or biases are not supported)"
            )
        if not self.modules:
            raise TinkerError(f"{path / WEIGHTS_FILE}: no lora_A/lora_B tensors found")

    def delta(self, weight_name: str) -> torch.Tensor | None:
        """fp32 change s * B @ A to the base weight `weight_name` (an HF name such as
        `model.layers.0.self_attn.q_proj.weight`), in the checkpoint's (out, in) layout, or in (in, out) for
        fan_in_fan_out adapters (GPT-2's Conv1D); None if the adapter does not touch it."""
        pair = self.modules.get(weight_name.removesuffix(".weight"))
        if pair is None:
            return None
        a, b = pair
        d = (b @ a) * self.scaling
        return d.t() if self.fan_in_fan_out else d


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read a peft LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`).

    Raises:
        TinkerError: missing files, not a LoRA adapter, pickled weights only, or malformed tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from tinkerlm.formats.hf import read_json

    d = Path(path)
    config = read_json(d / CONFIG_FILE)
    if config.get("peft_type", "LORA") != "LORA":
        raise TinkerError(
            f"{d / CONFIG_FILE}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported"
        )
    if config.get("use_dora"):
        raise TinkerError(f"{d / CONFIG_FILE}: DoRA adapters (use_dora) are not supported")
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        hint = (
            " (adapter_model.bin is a pickle and is never loaded; re-save with safe_serialization=True)"
            if (d / "adapter_model.bin").is_file()
            else ""
        )
        raise TinkerError(f"{weights}: not found{hint}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise TinkerError(f"{weights}: cannot read safetensors ({e})") from None
    return Adapter(d, config, tensors)
