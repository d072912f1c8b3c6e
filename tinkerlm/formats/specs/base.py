"""The `Spec` dataclass: what one architecture family's checkpoints look like (see tinkerlm/formats/specs/__init__.py
for the registry and docs/adding-a-model.md for how to add one).

Imports no torch and neither the GGUF reader nor the models: `gguf_config` reads the metadata through the
`GGUFMetadata` protocol, which `tinkerlm.formats.gguf.GGUFCheckpoint` implements. Writers go the other way:
`gguf_metadata` (config -> `{arch}.*` keys) and `gguf_extra_tensors` (config -> tensors llama.cpp keeps the config
in, e.g. `rope_freqs.weight`), the inverse of `gguf_config`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# The one layer index in a tensor name: "blk.3.attn_q.weight", "model.layers.3.mlp.up_proj.weight".
_LAYER = re.compile(r"^(.*?\.)(\d+)(\..+)$")


class GGUFMetadata(Protocol):
    """What a spec's `gguf_config` reads from a GGUF file (implemented by `formats.gguf.GGUFCheckpoint`)."""

    path: Path
    architecture: str  # general.architecture

    def arch_key(self, name: str, default: Any = ..., kind: type = int, limit: int | None = None) -> Any:
        """`{architecture}.{name}` from the metadata; raises TinkerError when missing without a default, of another
        type than `kind`, or (given a `limit`) outside 1..limit."""

    def vocab_size(self) -> int: ...

    def has_tensor(self, name: str) -> bool: ...

    def tensor(self, name: str) -> Any:
        """A tensor by its GGUF name, fp32 (a torch tensor)."""


@dataclass(frozen=True)
class Spec:
    """One architecture family. Name templates use "{i}" for the layer index."""

    family: str  # the module under tinkerlm.models that defines it ("llama", "gpt2")
    model_types: tuple[str, ...]  # HF config.json `model_type`s it covers
    hf_classes: dict[str, str]  # model_type -> transformers class (config.json `architectures`)
    model: tuple[str, str]  # (config class, model class) in tinkerlm.models.<family>
    gguf_architectures: dict[str, str]  # GGUF general.architecture -> model_type
    tensor_names: dict[str, str]  # GGUF name template -> HF name template; a name not here is an unused tensor
    required: tuple[str, ...]  # GGUF name templates every file must hold; the rest are optional
    gguf_config: Callable[[GGUFMetadata], dict]  # an HF-style config (model_type, HF keys) from GGUF metadata
    # The inverse, for writers: an HF config -> general.architecture and the `{arch}.*` keys llama.cpp reads.
    gguf_metadata: Callable[[dict], dict[str, Any]]
    shapes: Callable[[dict], dict[str, tuple[int, ...]]]  # config -> HF name template -> shape, as the model holds it
    layers_key: str  # the config key holding the number of layers
    defaults: dict[str, dict] = field(default_factory=dict)  # model_type -> config keys set when a config lacks them
    # GGUF -> HF row order of a tensor (hf_name, config, rows) -> index or None: HF row r is stored row index[r].
    row_fix: Callable[[str, dict, int], np.ndarray | None] | None = None
    conv1d: tuple[str, ...] = ()  # HF name suffixes of weights HF files store (in, out): transposed at the boundary
    consumed: tuple[str, ...] = ()  # GGUF tensors read into the config (rope_freqs.weight), not parameters
    # For writers: config -> the `consumed` tensors that hold part of it (GGUF name -> float32 array).
    gguf_extra_tensors: Callable[[dict], dict[str, np.ndarray]] = lambda config: {}
    # For writers: model_type -> the general.architecture llama.cpp loads it as, where that is not the name it is
    # read under (llama.cpp has no "mistral" architecture: its converter writes Mistral as "llama").
    write_architectures: dict[str, str] = field(default_factory=dict)
    # HF name suffixes of weights GGUF files store as `1 + w` (Gemma's norms, which scale by `1 + w`; HF keeps `w`).
    unit_offset: tuple[str, ...] = ()
    # Mixture-of-experts: config -> experts per sparse layer. GGUF stacks the experts' matrices in one tensor
    # (n_experts, rows, cols); its HF name template holds `{e}`, one parameter per expert (`Spec.hf_name` keeps it).
    experts: Callable[[dict], int] = lambda config: 0
    # Files another family's architecture name covers that this spec reads instead: (general.architecture,
    # metadata) -> the model_type of a file it claims, else None (Mixtral is written as "llama" with
    # `llama.expert_count`).
    claims: Callable[[str, dict], str | None] | None = None
    # For HF writers: (parameter name, model_type) -> the name that model_type's HF checkpoints store it under, where
    # the model's names differ (Mixtral's experts: w1/w3/w2 under `block_sparse_moe`); the inverse of the model
    # module's `from_hf_state_dict`. Applied by `formats.hf.write_model`.
    hf_save_name: Callable[[str, str], str] | None = None

    def gguf_architecture(self, model_type: str) -> str:
        """The GGUF general.architecture a writer gives an HF model_type (the inverse of `gguf_architectures`).

        Raises:
            KeyError: this spec does not cover the model_type.
        """
        if model_type in self.write_architectures:
            return self.write_architectures[model_type]
        return {t: arch for arch, t in self.gguf_architectures.items()}[model_type]

    def num_layers(self, config: dict) -> int:
        return config[self.layers_key]

    def with_defaults(self, config: dict) -> dict:
        """`config` (a copy) with this model_type's defaults filled in where the key is absent."""
        out = dict(config)
        for key, value in self.defaults.get(config.get("model_type"), {}).items():
            out.setdefault(key, value)
        return out

    def hf_name(self, gguf_name: str) -> tuple[str, str, int | None] | None:
        """(HF name, GGUF template, layer) of a GGUF tensor name, or None where the family has no such tensor; the
        HF name of a stack of experts keeps its `{e}`."""
        m = _LAYER.fullmatch(gguf_name)
        template, layer = (f"{m[1]}{{i}}{m[3]}", int(m[2])) if m else (gguf_name, None)
        if template not in self.tensor_names:
            return None
        return self.tensor_names[template].format(i=layer, e="{e}"), template, layer

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of an HF tensor name (for writers), or None where GGUF has no such tensor."""
        m = _LAYER.fullmatch(hf_name)
        template, layer = (f"{m[1]}{{i}}{m[3]}", int(m[2])) if m else (hf_name, None)
        gguf = {hf: g for g, hf in self.tensor_names.items()}.get(template)
        return None if gguf is None else gguf.format(i=layer)

    def row_order(self, hf_name: str, config: dict, rows: int, to_gguf: bool = False) -> np.ndarray | None:
        """The row permutation between a GGUF file and HF's layout, or None where rows are stored as HF has them.

        Reading (default): HF row r is stored row `order[r]` (`hf = stored[order]`). Writing (`to_gguf`): the
        inverse, stored row j is HF row `order[j]` (`stored = hf[order]`).
        """
        order = self.row_fix(hf_name, config, rows) if self.row_fix else None
        if order is None or not to_gguf:
            return order
        return np.argsort(order)

    def value_shift(self, hf_name: str) -> float:
        """What a GGUF file adds to this HF tensor's values: 1.0 for a `unit_offset` weight, else 0.0."""
        return 1.0 if self.unit_offset and hf_name.endswith(self.unit_offset) else 0.0

    def is_conv1d(self, hf_name: str) -> bool:
        """Whether HF checkpoints store this weight as Conv1D (in, out) rather than nn.Linear's (out, in)."""
        return bool(self.conv1d) and hf_name.endswith(self.conv1d)
