"""Architecture specs: what each model family's checkpoints look like, declared once and asked by every reader.

One `Spec` per family (llama.py: Llama, Mistral, Qwen2, Qwen3; gpt2.py: GPT-2) declares its Hugging Face
`model_type`s and GGUF `general.architecture` names, the transformers class of each model_type, the tinkerlm
model to build, the GGUF <-> HF tensor name table, the tensors a GGUF file must hold, the config read from GGUF
metadata, the parameter shapes a config implies, per-tensor fixes (llama.cpp's q/k row permutation), which HF
tensors are Conv1D (stored (in, out), as GPT-2's) and per-model_type config defaults. The GGUF reader, model
building, merging, fine-tuning and the store ask the registry here (`for_model_type`, `for_gguf`) instead of
testing a model's name. Adding an architecture: docs/adding-a-model.md.

Imports no torch (the store reads metadata through it) and nothing from `tinkerlm.models` (a lower layer): the
model to build is named by strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from tinkerlm.errors import TinkerError

if TYPE_CHECKING:
    from tinkerlm.formats.gguf import GGUFCheckpoint

# The one layer index in a tensor name: "blk.3.attn_q.weight", "model.layers.3.mlp.up_proj.weight".
_LAYER = re.compile(r"^(.*?\.)(\d+)(\..+)$")


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
    gguf_config: Callable[["GGUFCheckpoint"], dict]  # an HF-style config (model_type, HF keys) from GGUF metadata
    shapes: Callable[[dict], dict[str, tuple[int, ...]]]  # config -> HF name template -> shape, as the model holds it
    layers_key: str  # the config key holding the number of layers
    defaults: dict[str, dict] = field(default_factory=dict)  # model_type -> config keys set when a config lacks them
    # GGUF -> HF row order of a tensor (hf_name, config, rows) -> index or None: HF row r is stored row index[r].
    row_fix: Callable[[str, dict, int], np.ndarray | None] | None = None
    conv1d: tuple[str, ...] = ()  # HF name suffixes of weights HF files store (in, out): transposed at the boundary
    consumed: tuple[str, ...] = ()  # GGUF tensors read into the config (rope_freqs.weight), not parameters

    def num_layers(self, config: dict) -> int:
        return config[self.layers_key]

    def with_defaults(self, config: dict) -> dict:
        """`config` (a copy) with this model_type's defaults filled in where the key is absent."""
        out = dict(config)
        for key, value in self.defaults.get(config.get("model_type"), {}).items():
            out.setdefault(key, value)
        return out

    def hf_name(self, gguf_name: str) -> tuple[str, str, int | None] | None:
        """(HF name, GGUF template, layer) of a GGUF tensor name, or None where the family has no such tensor."""
        m = _LAYER.fullmatch(gguf_name)
        template, layer = (f"{m[1]}{{i}}{m[3]}", int(m[2])) if m else (gguf_name, None)
        if template not in self.tensor_names:
            return None
        return self.tensor_names[template].format(i=layer), template, layer

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of an HF tensor name (for writers), or None where GGUF has no such tensor."""
        m = _LAYER.fullmatch(hf_name)
        template, layer = (f"{m[1]}{{i}}{m[3]}", int(m[2])) if m else (hf_name, None)
        gguf = {hf: g for g, hf in self.tensor_names.items()}.get(template)
        return None if gguf is None else gguf.format(i=layer)

    def hf_template(self, hf_name: str) -> str:
        m = _LAYER.fullmatch(hf_name)
        return f"{m[1]}{{i}}{m[3]}" if m else hf_name

    def row_order(self, hf_name: str, config: dict, rows: int, to_gguf: bool = False) -> np.ndarray | None:
        """The row permutation between a GGUF file and HF's layout, or None where rows are stored as HF has them.

        Reading (default): HF row r is stored row `order[r]` (`hf = stored[order]`). Writing (`to_gguf`): the
        inverse, stored row j is HF row `order[j]` (`stored = hf[order]`).
        """
        order = self.row_fix(hf_name, config, rows) if self.row_fix else None
        if order is None or not to_gguf:
            return order
        return np.argsort(order)

    def is_conv1d(self, hf_name: str) -> bool:
        """Whether HF checkpoints store this weight as Conv1D (in, out) rather than nn.Linear's (out, in)."""
        return bool(self.conv1d) and hf_name.endswith(self.conv1d)


def _registry() -> tuple[Spec, ...]:
    from tinkerlm.formats.specs import gpt2, llama

    return (llama.SPEC, gpt2.SPEC)


SPECS: tuple[Spec, ...] = ()  # filled below, after the family modules (which import Spec from here) load


def model_types() -> list[str]:
    """Every supported HF model_type, in registry order."""
    return [t for s in SPECS for t in s.model_types]


def gguf_architectures() -> dict[str, str]:
    """Every supported GGUF general.architecture -> its HF model_type, in registry order."""
    return {arch: t for s in SPECS for arch, t in s.gguf_architectures.items()}


def find(model_type: str | None) -> Spec | None:
    """The spec covering an HF model_type, or None."""
    return next((s for s in SPECS if model_type in s.model_types), None)


def for_model_type(model_type: str | None, source: str = "model") -> Spec:
    """The spec covering an HF model_type.

    Raises:
        TinkerError: no spec covers it (the message lists the supported ones).
    """
    spec = find(model_type)
    if spec is None:
        raise TinkerError(
            f"{source}: architecture '{model_type}' is not supported (supported: {', '.join(sorted(model_types()))})"
        )
    return spec


def for_gguf(architecture: str, source: str = "model") -> Spec:
    """The spec covering a GGUF general.architecture.

    Raises:
        TinkerError: no spec covers it (the message lists the supported ones).
    """
    spec = next((s for s in SPECS if architecture in s.gguf_architectures), None)
    if spec is None:
        raise TinkerError(
            f"{source}: architecture {architecture!r} is not supported (supported: {', '.join(gguf_architectures())})"
        )
    return spec


def gguf_model_type(architecture: str) -> str:
    """The HF model_type of a GGUF general.architecture; an unsupported name comes back unchanged."""
    return gguf_architectures().get(architecture, architecture)


def with_defaults(config: dict) -> dict:
    """`config` with its model_type's defaults filled in; unchanged (a copy) for a model_type no spec covers."""
    spec = find(config.get("model_type"))
    return spec.with_defaults(config) if spec else dict(config)


SPECS = _registry()
