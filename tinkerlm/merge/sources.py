"""Merge inputs: store models read one tensor at a time, under Hugging Face names, as fp32.

- `HFSource`: a Hugging Face directory. Tensors are read with `os.pread` at the byte ranges the safetensors
  headers give, so only the tensor asked for is in memory (a memory map would keep every page it touched
  resident for the whole merge).
- `GGUFSource`: a GGUF file, dequantized tensor by tensor, under HF names with the spec's fixes (llama.cpp's q/k
  row permutation undone), and the spec's Conv1D weights (GPT-2's) put back in HF's (in, out) layout, so a GGUF
  and an HF checkpoint of one model give the same tensors.
- `LoraSource`: a base model with a LoRA adapter fused on the fly: W + s * B @ A for the weights it touches
  (mergekit's `BASE+LORA` model syntax).

References: safetensors format https://github.com/huggingface/safetensors#format; GGUF
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md; PEFT LoRA https://huggingface.co/docs/peft.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from tinkerlm import store
from tinkerlm.errors import TinkerError
from tinkerlm.formats import hf
from tinkerlm.formats.describe import safetensors_header

log = logging.getLogger(__name__)

_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Files of an HF directory that make up its tokenizer and chat template (copied to a merge made from it).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


_GGUF_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _pread_into(path: Path, fds: dict[Path, int], offset: int, view: memoryview, what: str) -> None:
    """Fill `view` with the bytes of `path` from `offset` (a file descriptor is kept open in `fds`)."""
    fd = fds.get(path)
    if fd is None:
        fd = fds[path] = os.open(path, os.O_RDONLY)
    done, size = 0, len(view)
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise TinkerError(f"{path}: ends inside tensor {what} (file truncated? pull the model again)")
        done += n


def _pread(path: Path, fds: dict[Path, int], offset: int, size: int, what: str) -> bytearray:
    buf = bytearray(size)
    _pread_into(path, fds, offset, memoryview(buf), what)
    return buf


_STEP = 8 << 20  # bytes read at a time when converting to fp32: the only buffer beside the result


def _close(fds: dict[Path, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


class Source:
    """One merge input. `names` lists its tensors in checkpoint order; `tensor(name)` reads one as fp32."""

    ref: str  # as the recipe wrote it
    manifest: store.Manifest
    config: dict
    names: list[str]

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> str:
        """The stored dtype as a safetensors code ("BF16"); dequantized GGUF tensors are "F32"."""
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        return name in self._index

    def vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        return self.tokenizer().backend.get_vocab(with_added_tokens=True)

    def vocab_key(self) -> str:
        """Equal keys mean equal vocabularies without reading them: the sha256 of the tokenizer's file."""
        return store.digest(self.manifest)

    def tokenizer(self):
        raise NotImplementedError

    def save_tokenizer(self, model_dir: Path) -> None:
        """Write this model's tokenizer and chat template into an HF directory."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    @property
    def label(self) -> str:
        return f"{self.ref} ({self.manifest.ref})" if self.ref != self.manifest.ref else self.ref

    _index: dict


class HFSource(Source):
    def __init__(self, ref: str, manifest: store.Manifest, path: Path):
        self.ref, self.manifest, self.path = ref, manifest, path
        self.config = hf.load_config(path)
        self._index: dict[str, tuple[Path, int, str, tuple[int, ...], int]] = {}  # name -> (file, offset, dtype...)
        for f in hf.weight_files(path):
            header = safetensors_header(f)
            with open(f, "rb") as fh:
                start = 8 + int.from_bytes(fh.read(8), "little")
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self._index[name] = (f, start + begin, info["dtype"], tuple(info["shape"]), end - begin)
        self.names = list(self._index)
        self._files: dict[Path, int] = {}  # open file descriptors for pread

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name][3]

    def dtype(self, name: str) -> str:
        return self._index[name][2]

    def tensor(self, name: str) -> torch.Tensor:
        file, offset, dtype, shape, size = self._index[name]
        if dtype not in _TORCH_DTYPES:
            raise TinkerError(f"{file}: tensor {name} has dtype {dtype}, which merging does not read")
        stored = _TORCH_DTYPES[dtype]
        if not stored.is_floating_point:
            return (
                torch.frombuffer(_pread(file, self._files, offset, size, name), dtype=stored).reshape(shape)
                if size
                else torch.zeros(shape, dtype=stored)
            )
        out = torch.empty(shape, dtype=torch.float32)
        flat = out.view(-1)
        if size == 0:
            return out
        if stored == torch.float32:  # straight into the result
            _pread_into(file, self._files, offset, memoryview(flat.numpy()).cast("B"), name)
            return out
        item = stored.itemsize
        step = _STEP // item * item
        buf = bytearray(min(step, size))
        for start in range(0, size, step):
            nbytes = min(step, size - start)
            _pread_into(file, self._files, offset + start, memoryview(buf)[:nbytes], name)
            part = torch.frombuffer(buf, dtype=stored, count=nbytes // item)
            flat[start // item : start // item + part.numel()].copy_(part)
        return out

    def tokenizer(self):
        from tinkerlm.formats.tokenizer import Tokenizer

        return Tokenizer.from_hf_dir(self.path)

    def vocab_key(self) -> str:
        files = {f["path"]: f["sha256"] for f in self.manifest.files}
        return "+".join(
            files.get(n, "-") for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        )

    def save_tokenizer(self, model_dir: Path) -> None:
        import shutil

        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, model_dir / name)

    def close(self) -> None:
        _close(self._files)


class GGUFSource(Source):
    def __init__(self, ref: str, manifest: store.Manifest, path: Path):
        from tinkerlm.formats.gguf import read_gguf

        self.ref, self.manifest, self.path = ref, manifest, path
        self._ckpt = read_gguf(path)
        self.config = self._ckpt.config()  # with `architectures`, as config.json needs
        self._spec = self._ckpt.spec
        # HF name -> shape in HF's file layout (Conv1D weights (in, out)); names checked by the checkpoint reader.
        self._index: dict[str, tuple[int, ...]] = {}
        for name in self._ckpt.hf_names():
            shape = self._ckpt.hf_shape(name)
            self._index[name] = shape[::-1] if self._spec.is_conv1d(name) else shape
        self.names = list(self._index)
        self._fds: dict[Path, int] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name]

    def dtype(self, name: str) -> str:
        return "F32"

    def tensor(self, name: str) -> torch.Tensor:
        t = self._read(name)
        if self._spec.is_conv1d(name):
            t = t.t()
        return t.contiguous()

    def _read(self, name: str) -> torch.Tensor:
        """One tensor as fp32, in HF's row order. Float and Q8_0/Q4_0/Q4_1/Q5_1 tensors are read with pread (not
        through the memory map, whose touched pages would stay resident) and dequantized by the kernels
        (bit-identical to the gguf package, ten times faster); other types go through the checkpoint reader."""
        from tinkerlm.quant import qops
        from tinkerlm.quant.qtensor import BLOCK_BYTES, QTensor, fits

        raw = self._ckpt.raw_tensor(name)
        kind, shape = raw.type, raw.shape
        if kind not in _GGUF_FLOATS and not (kind in BLOCK_BYTES and fits(shape)):
            return self._ckpt.hf_tensor(name)
        data = _pread(self.path, self._fds, raw.offset, raw.nbytes, raw.name)
        if kind in _GGUF_FLOATS:
            t = torch.frombuffer(data, dtype=_GGUF_FLOATS[kind]).reshape(shape).float()
        else:
            blocks = torch.frombuffer(data, dtype=torch.uint8).reshape(shape[0], -1)
            t = qops.dequantize(QTensor(blocks, kind, shape[1]))
        t = t if raw.row_order is None else t[torch.from_numpy(raw.row_order)]
        return t - raw.value_shift if raw.value_shift else t  # Gemma's norms: stored as 1 + w

    def tokenizer(self):
        return self._ckpt.tokenizer()

    def save_tokenizer(self, model_dir: Path) -> None:
        self.tokenizer().save_hf(model_dir)

    def close(self) -> None:
        _close(self._fds)


class LoraSource(Source):
    """A base model with a LoRA adapter added to the weights it targets."""

    def __init__(self, ref: str, base: Source, adapter_manifest: store.Manifest):
        from tinkerlm.formats.peft import read_adapter

        self.ref, self.base, self.manifest = ref, base, base.manifest
        self.adapter_manifest = adapter_manifest
        self.adapter = read_adapter(store.model_path(adapter_manifest))
        self.config, self.names, self._index = base.config, base.names, base._index
        named = self.adapter.base_model
        m = base.manifest
        if named and named not in (m.name, m.ref, m.source.get("repo"), m.source.get("uri"), base_ref_of(ref)):
            log.warning(
                "%s: adapter %s was trained on %s, not %s; fusing it anyway", ref, adapter_manifest.ref, named, m.ref
            )
        for module in self.adapter.modules:
            weight = f"{module}.weight"
            if not base.has(weight):
                raise TinkerError(
                    f"{ref}: adapter {adapter_manifest.ref} targets {module}, which {base.label} "
                    "does not have (an adapter for another model?)"
                )
            delta = self.adapter.delta(weight)
            if tuple(delta.shape) != base.shape(weight):
                raise TinkerError(
                    f"{ref}: adapter {adapter_manifest.ref} changes {weight} by a {list(delta.shape)} "
                    f"matrix, but the weight in {base.label} is {list(base.shape(weight))} "
                    "(an adapter for another model?)"
                )

    @property
    def label(self) -> str:
        return self.ref

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> str:
        return self.base.dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        t = self.base.tensor(name)
        delta = self.adapter.delta(name)
        return t if delta is None else t + delta

    def tokenizer(self):
        return self.base.tokenizer()

    def vocab_key(self) -> str:
        return self.base.vocab_key()

    def save_tokenizer(self, model_dir: Path) -> None:
        self.base.save_tokenizer(model_dir)

    def close(self) -> None:
        self.base.close()


def base_ref_of(ref: str) -> str:
    """'base+lora' -> 'base'."""
    return ref.partition("+")[0]


def find_model(ref: str, where: str, progress: bool = True) -> store.Manifest:
    """The stored model a recipe names. As in mergekit, a recipe may name a local path or a Hub id; such a model is
    imported into the store first (hashed, its source recorded, as `tinkerlm pull` does), so the merge's lineage
    names stored parents.

    `ref` is, in this order: a path (starting with `.`, `/` or `~`, or with a `/` and existing); a Hub id
    `ORG/REPO` or `hf:ORG/REPO[/FILE.gguf][@REVISION]` (an earlier pull of that repo is reused, else it is pulled,
    honouring HF_ENDPOINT); a store name `NAME[:TAG]`; a directory or file in the working directory.

    Raises:
        TinkerError: not in the store and not a path or Hub id, or the import failed.
    """
    hub = ref.startswith("hf:")
    if not hub and (ref.startswith((".", "/", "~")) or ("/" in ref and Path(ref).expanduser().exists())):
        return _import(ref, ref, where, progress)
    if hub or "/" in ref:
        if hub:
            m = _in_store(ref, where)
        else:
            repo = ref.partition("@")[0]
            m = next((m for m in store.list_models() if m.source.get("repo") == repo), None)
        return m or _import(ref, ref if hub else f"hf:{ref}", where, progress)
    m = _in_store(ref, where)
    if m is None and Path(ref).expanduser().exists():
        return _import(ref, ref, where, progress)
    if m is None:
        try:
            store.get(ref)
        except TinkerError as e:
            raise TinkerError(f"{where}: {e}") from None
    return m


def _in_store(ref: str, where: str) -> store.Manifest | None:
    try:
        return store.find(ref)
    except TinkerError as e:
        raise TinkerError(f"{where}: {e}") from None


def _import(ref: str, source: str, where: str, progress: bool) -> store.Manifest:
    """Pull a recipe's path or Hub id into the store, saying so on stderr."""
    try:
        m, imported = store.import_model(source, progress=progress)
    except TinkerError as e:
        raise TinkerError(f"{where}: {e}") from None
    if imported:
        print(f"merge: imported {ref} into the store as {m.ref}", file=sys.stderr)
    return m


def open_source(ref: str, where: str, progress: bool = True) -> tuple[Source, list[tuple[store.Manifest, str]]]:
    """Open the model a recipe names, and the stored models it is made from: [(manifest, kind)], kind "model"
    or "adapter". `BASE+LORA` fuses a LoRA adapter from the store into BASE. Paths and Hub ids are imported into
    the store first (`find_model`), with progress bars on stderr if `progress`."""
    base_ref, plus, lora_ref = ref.partition("+")
    manifest = find_model(base_ref, where, progress)
    if manifest.format == "lora":
        config = hf.read_json(store.model_path(manifest) / "adapter_config.json", required=False) or {}
        base = config.get("base_model_name_or_path") or "BASE"
        raise TinkerError(
            f"{where}: {base_ref} is a LoRA adapter, not a model; fuse it into its base model by "
            f"writing {base}+{base_ref}"
        )
    path = store.model_path(manifest)
    source: Source = GGUFSource(ref, manifest, path) if manifest.format == "gguf" else HFSource(ref, manifest, path)
    made_of = [(manifest, "model")]
    if plus:
        adapter = find_model(lora_ref, where, progress)
        if adapter.format != "lora":
            source.close()
            raise TinkerError(f"{where}: {lora_ref} (after '+') is a {adapter.format} model, not a LoRA adapter")
        try:
            source = LoraSource(ref, source, adapter)
        except BaseException:
            source.close()
            raise
        made_of.append((adapter, "adapter"))
    return source, made_of
