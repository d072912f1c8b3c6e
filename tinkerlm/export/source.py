"""What an export or quantization reads: any stored model (or a GGUF file / HF directory) as named fp32 tensors,
with its config, tokenizer, licence and lineage.

- a GGUF file: tensors dequantized one at a time from the memory map, and each tensor's own blocks (`raw`), so a
  tensor written again in its own type is copied, not requantized;
- a Hugging Face directory: the safetensors memory-mapped, one tensor cast to fp32 at a time;
- a LoRA adapter: its base loaded in fp32 with the adapter folded in (`lora.fuse_lora`), so an adapter exports as
  the full model it stands for.

Tensor names and layouts are the model's (HF names, linear weights (out, in)); the GGUF names, row orders and
Conv1D layouts are the writers' business (tinkerlm/export/gguf.py, hf.py), asked of the architecture's spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from tinkerlm.errors import TinkerError
from tinkerlm.formats import specs


@dataclass
class Source:
    ref: str  # the store name (NAME:TAG) or the path, as messages name it
    path: Path  # the weights: GGUF file, HF directory, or (adapters) the base's
    config: dict  # HF config.json keys
    tokenizer: object  # tinkerlm.formats.tokenizer.Tokenizer
    generation_config: dict
    names: list[str]  # parameters in file order (a tied head left out)
    tensor: Callable[[str], torch.Tensor]  # name -> fp32 tensor, the model's layout
    shape: Callable[[str], tuple[int, ...]]  # name -> its shape (the model's layout), without reading it
    model_factory: Callable[[], torch.nn.Module] = field(repr=False)
    raw: Callable[[str], object | None] = lambda name: None  # name -> a GGUF's RawTensor (its own blocks)
    release: Callable[[str], None] = lambda name: None  # done with a tensor: a GGUF drops its pages from memory
    dtypes: dict[str, str] = field(default_factory=dict)  # name -> safetensors dtype (HF sources)
    manifest: object | None = None  # the store's Manifest, where the source is a stored model
    license: str | None = None

    @property
    def spec(self) -> specs.Spec:
        return specs.for_model_type(self.config.get("model_type"), self.ref)

    @cached_property
    def _model(self) -> torch.nn.Module:
        return self.model_factory()

    def model(self) -> torch.nn.Module:
        """The source as an fp32 model (what verification and importance matrices run), built once."""
        return self._model

    @cached_property
    def digest(self) -> str:
        """One sha256 of the source: the store's digest of a stored model, else of its file or directory's files."""
        from tinkerlm import store

        if self.manifest is not None:
            return store.digest(self.manifest)
        if self.path.is_file():
            return store.sha256_file(self.path)
        files = sorted(p for p in self.path.rglob("*") if p.is_file())
        return store.files_digest(
            [{"path": f.relative_to(self.path).as_posix(), "sha256": store.sha256_file(f)} for f in files]
        )

    def dtype(self, name: str) -> str:
        """The stored type of a tensor: GGML type name for GGUF sources, safetensors dtype for HF ones."""
        raw = self.raw(name)
        return raw.type if raw is not None else self.dtypes.get(name, "F32")


def open_source(name_or_path: str) -> Source:
    """The model `name_or_path` names (store name, GGUF file or HF directory), ready to export.

    Raises:
        TinkerError: not in the store and not a path, an unreadable checkpoint, or an adapter whose base is gone.
    """
    from tinkerlm.api import resolve, resolve_adapter
    from tinkerlm.loading import checkpoint_config, load_adapted, load_checkpoint

    path, manifest = resolve(name_or_path, pull=False)
    ref = manifest.ref if manifest is not None else str(path)
    license = manifest.license if manifest is not None else None
    if manifest is not None and manifest.format == "lora":
        from tinkerlm import lora

        adapter, base_path, _ = resolve_adapter(manifest)
        model, tokenizer, gen = load_adapted(adapter, base_path, torch.float32, "fp32", ref)
        lora.fuse_lora(model)
        config = checkpoint_config(base_path)
        state = _state(model, config)
        return Source(
            ref, base_path, config, tokenizer, gen, _ordered(state), state.__getitem__, lambda n: tuple(state[n].shape),
            lambda: model, manifest=manifest, license=license,
        )  # fmt: skip
    if path.is_dir():
        from tinkerlm import models
        from tinkerlm.formats import hf
        from tinkerlm.formats.tokenizer import Tokenizer

        config = hf.load_config(path)
        if manifest is None:  # a path: the licence its model card names
            from tinkerlm.formats.describe import describe

            license = describe(path).get("license")
        stored = hf.load_state_dict(path)
        dtypes = {k: hf.safetensors_dtype(v.dtype) for k, v in stored.items()}
        state = models.hf_layout(config, stored, ref)
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        return Source(
            ref, path, config, Tokenizer.from_hf_dir(path), hf.load_generation_config(path), _ordered(state),
            lambda n: state[n].float(), lambda n: tuple(state[n].shape),
            lambda: load_checkpoint(path, torch.float32, "fp32")[0], dtypes=dtypes, manifest=manifest, license=license,
        )  # fmt: skip
    from tinkerlm.formats.gguf import read_gguf

    ckpt = read_gguf(path)
    if license is None and isinstance(ckpt.metadata.get("general.license"), str):
        license = ckpt.metadata["general.license"]
    return Source(
        ref, path, ckpt.config(), ckpt.tokenizer(), {}, _ordered(dict.fromkeys(ckpt.hf_names())), ckpt.hf_tensor,
        ckpt.hf_shape, lambda: load_checkpoint(path, torch.float32, "fp32")[0], raw=ckpt.raw_tensor,
        release=ckpt.release, manifest=manifest, license=license,
    )  # fmt: skip


def _state(model: torch.nn.Module, config: dict) -> dict[str, torch.Tensor]:
    """A model's parameters by name, fp32, a tied head left out (it is the embedding)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("inv_freq") or (config.get("tie_word_embeddings") and name == "lm_head.weight"):
            continue
        out[name] = t.detach().float()
    return out


def _layer(name: str) -> tuple[int, int]:
    """Sort key of llama.cpp's file order: the embeddings, then layer by layer, then the final norm and head."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit() and i > 0 and parts[i - 1] in ("layers", "h", "blocks"):
            return (1, int(p))
    if "embed" in name or name.startswith(("transformer.wte", "transformer.wpe")):
        return (0, 0)
    return (2, 0)


def _ordered(state: dict) -> list[str]:
    return sorted(state, key=_layer)  # stable: within a layer, the checkpoint's own order


def check_writable(out: Path, force: bool) -> None:
    """An output path that may be written: its directory exists and is writable, and it is new (or `force`).

    Raises:
        TinkerError: the output exists (without force), or its directory is missing or not writable.
    """
    import os

    if out.exists() and not force:
        raise TinkerError(f"--out: {out} already exists; pick another path or pass --force to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise TinkerError(f"--out: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise TinkerError(f"--out: directory {parent} is not writable; pick another path")
