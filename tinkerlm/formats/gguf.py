"""Read a GGUF checkpoint: its metadata, an HF-style config, HF-named fp32 tensors and its tokenizer.

GGUF is llama.cpp's single-file format: a header (magic `GGUF`, version, counts), typed key/value metadata, tensor
infos (name, GGML shape `ne` listed fastest dimension first, type, offset) and aligned tensor data. The `gguf`
package dequantizes every block type it knows; this module maps llama.cpp's tensor and key names back to Hugging
Face's by asking the architecture's spec (tinkerlm/formats/specs/), so a GGUF loads through the same model code as
a safetensors checkpoint. Packing quantized blocks for the kernels is `tinkerlm.quant.packed_state_dict`, which
reads them through `raw_tensor`.

References:
- GGUF spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
- llama.cpp's converter (tensor names, the q/k row permutation undone by the llama spec):
  https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py
- llama.cpp's metadata key names: https://github.com/ggml-org/llama.cpp/blob/master/gguf-py/gguf/constants.py
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tinkerlm.errors import TinkerError
from tinkerlm.formats import specs

if TYPE_CHECKING:  # torch is imported where tensors are made, so reading metadata (the store) stays light
    import torch

    from tinkerlm.formats.specs import Spec
    from tinkerlm.formats.tokenizer import Tokenizer

SUPPORTED_VERSIONS = (2, 3)


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a GGUF file, memory-mapped; tensors are read and dequantized only when asked for.

    Raises:
        TinkerError: the file is missing, is not GGUF, has an unsupported version, or is truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise TinkerError(f"{path}: no such file (check the path, or pull the model first)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 4 or head[:4] != b"GGUF":
        raise TinkerError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF'; pass a .gguf file)")
    if len(head) < 8:
        raise TinkerError(f"{path}: file ends inside the GGUF header (file truncated? download it again)")
    (version,) = struct.unpack("<I", head[4:8])
    if version & 0xFFFF == 0:  # a big-endian file read little-endian
        raise TinkerError(f"{path}: big-endian GGUF files are not supported (convert it on a little-endian machine)")
    if version not in SUPPORTED_VERSIONS:
        raise TinkerError(
            f"{path}: GGUF version {version} is not supported (only versions 2 and 3; re-convert the model "
            "with a current llama.cpp)"
        )

    try:
        reader = _Header(path)
    except Exception as exc:  # struct.error, IndexError, UnicodeDecodeError... on cut or corrupt files
        reason = " ".join(str(exc).split())[:200]
        raise TinkerError(
            f"{path}: cannot parse the GGUF header ({type(exc).__name__}: {reason}) (file truncated or corrupt? "
            "download it again)"
        ) from exc
    for t in reader.tensors:
        end = t.data_offset + int(t.n_bytes)
        if end > size:
            raise TinkerError(
                f"{path}: tensor {t.name} ends at byte {end}, but the file has {size} bytes "
                "(file truncated? download it again)"
            )
    return GGUFCheckpoint(path, reader)


@dataclass
class RawTensor:
    """One tensor as the file stores it, for readers that keep quantized blocks (packing, merging).

    `data` is a view of the memory map: the values for float types, else one row of bytes per row of values.
    Reordering its rows by `row_order` (where not None) gives the HF tensor's rows: HF row r is stored row
    `row_order[r]` (the spec's fix, e.g. llama.cpp's q/k permutation).
    """

    name: str  # the GGUF name
    type: str  # GGML type name: "F32", "Q4_1", "Q6_K"...
    shape: tuple[int, ...]  # torch order: the HF parameter's shape as the model holds it
    data: np.ndarray
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    row_order: np.ndarray | None

    def dequantize(self, blocks: np.ndarray | None = None) -> np.ndarray:
        """`blocks` (default: all of `data`) dequantized by the gguf package, as a flat float32 array."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(self.data if blocks is None else blocks, GGMLQuantizationType[self.type])


class GGUFCheckpoint:
    """A parsed GGUF file. `metadata` holds plain Python values; tensors stay memory-mapped until asked for.

    Tensors are named as Hugging Face names them (`hf_names`, `hf_shape`, `hf_tensor`), with linear weights as
    (out_features, in_features), the layout tinkerlm's models hold (HF's GPT-2 files store Conv1D weights the
    other way: `Spec.conv1d`).
    """

    def __init__(self, path: Path, reader: _Header):
        self.path = path
        self._reader = reader
        self._tensors = {t.name: t for t in reader.tensors}
        self.metadata: dict[str, Any] = reader.metadata

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if arch is None:
            raise TinkerError(f"{self.path}: metadata key general.architecture is missing (not a model file?)")
        specs.for_gguf(arch, str(self.path))  # raises for an unsupported architecture
        return arch

    @cached_property
    def spec(self) -> Spec:
        """The architecture spec this file is read by."""
        return specs.for_gguf(self.architecture, str(self.path))

    def tensor_infos(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape in torch order, GGML type name) of every tensor, from the header alone."""
        return [(t.name, _shape(t), t.tensor_type.name) for t in self._tensors.values()]

    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each GGML type the file holds, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}."""
        return dict(Counter(t.tensor_type.name for t in self._tensors.values()))

    def has_tensor(self, name: str) -> bool:
        """Whether the file holds a tensor of this GGUF name."""
        return name in self._tensors

    def config(self) -> dict:
        """An HF `config.json`-style dict (HF key names, `model_type`) from the metadata and tensor names.

        Raises:
            TinkerError: unknown architecture, a missing metadata key, or an unsupported RoPE scaling.
        """
        return dict(self._config)

    @cached_property
    def _config(self) -> dict:
        spec = self.spec
        config = spec.gguf_config(self)
        config["bos_token_id"] = self.metadata.get("tokenizer.ggml.bos_token_id")
        config["eos_token_id"] = self.metadata.get("tokenizer.ggml.eos_token_id")
        if config["model_type"] in spec.hf_classes:
            config["architectures"] = [spec.hf_classes[config["model_type"]]]
        return config

    def arch_key(self, name: str, default: Any = ..., kind: type = int) -> Any:
        """`{general.architecture}.{name}` from the metadata, required unless a default is given.

        Raises:
            TinkerError: missing without a default, or not one value of `kind`.
        """
        key = f"{self.metadata['general.architecture']}.{name}"
        value = self.metadata.get(key, default)
        if value is ...:
            raise TinkerError(f"{self.path}: metadata key {key} is missing (re-convert the model with llama.cpp)")
        if value is not None and not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise TinkerError(
                f"{self.path}: metadata key {key} is {value!r}, expected one {kind.__name__} "
                "(per-layer values are not supported)"
            )
        return value

    def vocab_size(self) -> int:
        """`{arch}.vocab_size`, else the length of the tokenizer's token list."""
        size = self.arch_key("vocab_size", None)
        if size is None:
            tokens = self.metadata.get("tokenizer.ggml.tokens")
            if tokens is None:
                arch = self.metadata["general.architecture"]
                raise TinkerError(
                    f"{self.path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is in the metadata "
                    "(re-convert the model with llama.cpp)"
                )
            size = len(tokens)
        return size

    @cached_property
    def _plan(self) -> dict[str, str]:
        """HF name -> GGUF name, in file order, after checking names, layer indices and shapes."""
        config = self._config
        spec = self.spec
        n_layers = spec.num_layers(config)
        shapes = spec.shapes(config)
        plan, unused = {}, []
        for name, tensor in self._tensors.items():
            if name in spec.consumed:
                continue
            mapped = spec.hf_name(name)
            if mapped is None or (mapped[2] is not None and mapped[2] >= n_layers):
                unused.append(name)
                continue
            hf_name, template, _ = mapped
            shape = _shape(tensor)
            expected = shapes.get(spec.tensor_names[template])
            if expected is not None and shape != expected:
                raise TinkerError(
                    f"{self.path}: tensor {name} has shape {shape}, but the metadata implies {expected} "
                    "(file inconsistent; re-convert it)"
                )
            plan[hf_name] = name
        if unused:
            raise TinkerError(
                f"{self.path}: {len(unused)} tensor(s) not used by the {self.architecture} architecture: "
                f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''} (file from a different architecture?)"
            )
        found = set(plan.values())
        required = [t.format(i=i) for t in spec.required for i in (range(n_layers) if "{i}" in t else [0])]
        missing = [name for name in required if name not in found]
        if missing:
            raise TinkerError(
                f"{self.path}: {len(missing)} tensor(s) missing: {', '.join(missing[:8])}"
                f"{' ...' if len(missing) > 8 else ''} (file incomplete; re-convert it)"
            )
        return plan

    def hf_names(self) -> list[str]:
        """Every parameter's HF name, in file order (tensors consumed into the config, e.g. rope_freqs, left out).

        Raises:
            TinkerError: unused or missing tensors, or a shape contradicting the metadata.
        """
        return list(self._plan)

    def _gguf_name(self, hf_name: str) -> str:
        name = self._plan.get(hf_name)
        if name is None:
            raise TinkerError(f"{self.path}: no tensor {hf_name} in this {self.architecture} file")
        return name

    def hf_shape(self, hf_name: str) -> tuple[int, ...]:
        """The shape of an HF-named parameter, as the model holds it (linear weights (out, in))."""
        return _shape(self._tensors[self._gguf_name(hf_name)])

    def raw_tensor(self, hf_name: str) -> RawTensor:
        """An HF-named parameter as stored: GGML type, shape, the memory-mapped data and the row order to apply."""
        t = self._tensors[self._gguf_name(hf_name)]
        shape = _shape(t)
        order = self.spec.row_order(hf_name, self._config, shape[0]) if shape else None
        return RawTensor(t.name, t.tensor_type.name, shape, t.data, t.data_offset, int(t.n_bytes), order)

    def hf_tensor(self, hf_name: str) -> torch.Tensor:
        """An HF-named parameter dequantized to fp32, the spec's fixes applied (q/k rows in HF's order).

        Raises:
            TinkerError: no such parameter, or a tensor type the gguf package cannot dequantize.
        """
        import torch

        raw = self.raw_tensor(hf_name)
        tensor = self._dequantize(self._tensors[raw.name])
        if raw.row_order is not None:
            tensor = tensor[torch.from_numpy(raw.row_order)]
        return tensor

    def release(self, hf_name: str) -> None:
        """Drop the file pages under a parameter from this process's resident memory (after copying it, e.g. packed
        for the kernels); touched again, they are read back from the file. Releasing each tensor as it is done keeps
        the peak of a load at the copy plus one tensor, not the copy plus the whole file."""
        self._reader.release(self._tensors[self._gguf_name(hf_name)].data)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter under its HF name, dequantized to fp32, linear weights as (out_features, in_features).

        Quantized weights kept as blocks for the kernels: `tinkerlm.quant.packed_state_dict(ckpt)`.

        Raises:
            TinkerError: unused or missing tensors, a shape contradicting the metadata, or an unknown tensor type.
        """
        return {name: self.hf_tensor(name) for name in self.hf_names()}

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor by its GGUF name, dequantized to fp32, in torch shape order (no renaming or permutation)."""
        if name not in self._tensors:
            raise TinkerError(f"{self.path}: no tensor named {name}")
        return self._dequantize(self._tensors[name])

    def _dequantize(self, tensor: _TensorInfo) -> torch.Tensor:
        import torch
        from gguf import GGMLQuantizationType as T
        from gguf.quants import dequantize

        shape = _shape(tensor)
        if tensor.tensor_type in (T.F64, T.I8, T.I16, T.I32, T.I64):
            array = np.asarray(tensor.data)
        else:
            try:
                array = dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError as exc:
                raise TinkerError(
                    f"{self.path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the installed "
                    "gguf package cannot dequantize (upgrade gguf, or use another quantization)"
                ) from exc
        if array.dtype != np.float32 or not array.flags.writeable:  # F32 comes back as a read-only view of the map
            array = array.astype(np.float32)
        return torch.from_numpy(array.reshape(shape))

    def tokenizer(self) -> Tokenizer:
        """The tokenizer described by the `tokenizer.ggml.*` metadata."""
        from tinkerlm.formats.tokenizer import Tokenizer

        return Tokenizer.from_gguf_metadata(self.metadata, self.path)


def _shape(tensor: _TensorInfo) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ne lists the fastest dimension first


# ---------------------------------------------------------------------------------------------------------------
# Header parsing. gguf.GGUFReader builds a numpy view per array element (minutes-scale work for a 49k-token
# vocabulary on a busy machine); this reads the same header with struct in one pass and maps the tensor data.

_U64 = struct.Struct("<Q")
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}


_PLAIN = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}


class _TensorInfo:
    __slots__ = ("name", "shape", "tensor_type", "data_offset", "n_bytes", "data")


class _Header:
    """Metadata (plain Python values) and tensor infos of a GGUF v2/v3 file, tensor data memory-mapped."""

    def __init__(self, path: Path):
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        # The header (vocabulary included) is parsed from a bytes copy of the file's start: slicing bytes is far
        # cheaper than slicing the map. A header longer than the first read is parsed again from the whole map.
        with open(path, "rb") as f:
            head = f.read(1 << 25)
        try:
            self._parse(head)
        except (struct.error, IndexError, ValueError):
            if len(head) == len(self._mm):
                raise
            self._parse(bytes(self._mm))

    def release(self, view: np.ndarray) -> None:
        """Drop the pages under `view` (a slice of the map) from this process's resident memory; touched again,
        they are read back from the file. Packing tensor by tensor and releasing each keeps the peak of a load at
        the packed copy plus one tensor, not the packed copy plus the whole file."""
        mm = getattr(self._mm, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = view.ctypes.data - self._mm.ctypes.data
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the view only
        hi = (start + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def _parse(self, buf: bytes) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self._buf, self._pos = buf, 8
        n_tensors, n_kv = self._unpack("<QQ")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            t = _TensorInfo()
            t.name = self._string()
            (n_dims,) = self._unpack("<I")
            t.shape = np.array(self._unpack(f"<{n_dims}Q"), dtype=np.int64)
            ttype, offset = self._unpack("<IQ")
            t.tensor_type = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            count = int(np.prod(t.shape))
            t.n_bytes = count // block * type_size
            infos.append((t, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = (self._pos + align - 1) // align * align
        size = len(self._mm)
        self.tensors = []
        for t, offset in infos:
            t.data_offset = start + offset
            if t.data_offset + t.n_bytes <= size:  # else read_gguf reports the truncation
                raw = self._mm[t.data_offset : t.data_offset + t.n_bytes]
                rows = tuple(int(d) for d in reversed(t.shape.tolist()))
                if t.tensor_type.name in _PLAIN:
                    t.data = raw.view(_PLAIN[t.tensor_type.name]).reshape(rows)
                else:  # blocks: one row of bytes per row of values
                    t.data = raw.reshape(*rows[:-1], -1) if len(rows) > 1 else raw
            self.tensors.append(t)

    def _unpack(self, fmt: str):
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        if self._pos + n > len(self._buf):
            raise ValueError("string runs past the end of the file")
        text = self._buf[self._pos : self._pos + n].decode("utf-8")
        self._pos += n
        return text

    def _strings(self, count: int) -> list[str]:
        """An array of strings (a vocabulary, merges): the hot loop of header parsing, kept tight."""
        buf, pos, unpack, out = self._buf, self._pos, _U64.unpack_from, [None] * count
        for i in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > len(buf):
                raise ValueError("string runs past the end of the file")
            out[i] = buf[pos : pos + n].decode("utf-8")
            pos += n
        self._pos = pos
        return out

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])[0]
        if vtype == 8:
            return self._string()
        if vtype != 9:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = self._unpack("<IQ")
        if etype in _NUMPY:
            dt = np.dtype(_NUMPY[etype])
            end = self._pos + count * dt.itemsize
            if end > len(self._buf):
                raise ValueError("array runs past the end of the file")
            arr = np.frombuffer(self._buf[self._pos : end], dtype=dt)
            self._pos = end
            return arr.tolist()
        if etype == 8:
            return self._strings(count)
        return [self._value(etype) for _ in range(count)]
