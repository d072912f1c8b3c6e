"""Architecture specs: what each model family's checkpoints look like, declared once and asked by every reader.

One `Spec` (base.py) per family (llama.py: Llama, Mistral, Qwen2, Qwen3; gemma.py: Gemma 3; phi3.py: Phi-3,
Phi-4-mini; gpt2.py: GPT-2; moe.py: Mixtral, Qwen3-MoE) declares its Hugging Face
`model_type`s and GGUF `general.architecture` names, the transformers class of each model_type, the tinkerlm
model to build, the GGUF <-> HF tensor name table, the tensors a GGUF file must hold, the config read from GGUF
metadata and its inverse for writers, the parameter shapes a config implies, per-tensor fixes (llama.cpp's q/k row permutation, Gemma's norms stored as 1 + w), which HF
tensors are Conv1D (stored (in, out), as GPT-2's) and per-model_type config defaults. The GGUF reader, model
building, merging, fine-tuning and the store ask the registry here (`for_model_type`, `for_gguf`) instead of
testing a model's name. Adding an architecture: docs/adding-a-model.md.

Imports no torch (the store reads metadata through it) and nothing from `tinkerlm.models` (a lower layer): the
model to build is named by strings.
"""

from __future__ import annotations

from tinkerlm.errors import TinkerError
from tinkerlm.formats.specs import gemma, gpt2, llama, moe, phi3
from tinkerlm.formats.specs.base import GGUFMetadata, Spec

__all__ = [
    "Spec",
    "GGUFMetadata",
    "SPECS",
    "model_types",
    "gguf_architectures",
    "find",
    "for_model_type",
    "for_gguf",
    "gguf_model_type",
    "gguf_architecture",
    "with_defaults",
]

# The registry: one spec per family, in the order error messages list them.
SPECS: tuple[Spec, ...] = (llama.SPEC, gemma.SPEC, phi3.SPEC, gpt2.SPEC, moe.SPEC)


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


def for_gguf(architecture: str, source: str = "model", metadata: dict | None = None) -> Spec:
    """The spec covering a GGUF general.architecture; given the file's `metadata`, a spec that claims the file
    (`Spec.claims`: Mixtral, written as "llama" with experts) comes first.

    Raises:
        TinkerError: no spec covers it (the message lists the supported ones).
    """
    if metadata is not None:
        spec = next((s for s in SPECS if s.claims and s.claims(architecture, metadata)), None)
        if spec is not None:
            return spec
    spec = next((s for s in SPECS if architecture in s.gguf_architectures), None)
    if spec is None:
        raise TinkerError(
            f"{source}: architecture {architecture!r} is not supported (supported: {', '.join(gguf_architectures())})"
        )
    return spec


def gguf_model_type(architecture: str, metadata: dict | None = None) -> str:
    """The HF model_type of a GGUF general.architecture (given the file's `metadata`, a spec's claim first: Mixtral
    for "llama" with experts); an unsupported name comes back unchanged."""
    for spec in SPECS:
        claimed = spec.claims(architecture, metadata) if spec.claims and metadata is not None else None
        if claimed:
            return claimed
    return gguf_architectures().get(architecture, architecture)


def gguf_architecture(model_type: str | None, source: str = "model") -> str:
    """The GGUF general.architecture to write for an HF model_type (Mistral is written as "llama", as llama.cpp's
    converter does; the others under their own names).

    Raises:
        TinkerError: no spec covers the model_type.
    """
    return for_model_type(model_type, source).gguf_architecture(model_type)


def with_defaults(config: dict) -> dict:
    """`config` with its model_type's defaults filled in; unchanged (a copy) for a model_type no spec covers."""
    spec = find(config.get("model_type"))
    return spec.with_defaults(config) if spec else dict(config)
