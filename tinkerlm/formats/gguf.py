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

import functools
import mmap
import os
import struct
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tinkerlm import limits
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
    except TinkerError:
        raise
    except Exception as exc:  # struct.error, IndexError, UnicodeDecodeError... on cut or corrupt files
        reason = " ".join(str(exc).split())[:200]
        raise TinkerError(
            f"{path}: cannot parse the GGUF header ({type(exc).__name__}: {reason}) (file truncated or corrupt? "
            "download it again)"
        ) from exc
    return GGUFCheckpoint(path, reader)  # _Header checked every tensor's byte range against the file


@dataclass
class RawTensor:
    """One tensor as the file stores it, for readers that keep quantized blocks (packing, merging).

    `data` is a view of the memory map: the values for float types, else one row of bytes per row of values.
    Reordering its rows by `row_order` (where not None) gives the HF tensor's rows: HF row r is stored row
    `row_order[r]` (the spec's fix, e.g. llama.cpp's q/k permutation); subtracting `value_shift` from its values gives the
    HF values (1.0 for Gemma's norms, stored as `1 + w`).
    """

    name: str  # the GGUF name
    type: str  # GGML type name: "F32", "Q4_1", "Q6_K"...
    shape: tuple[int, ...]  # torch order: the HF parameter's shape as the model holds it
    data: np.ndarray
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    row_order: np.ndarray | None
    value_shift: float = 0.0

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
        if not isinstance(arch, str):
            raise TinkerError(f"{self.path}: metadata key general.architecture is {arch!r}, expected a string")
        specs.for_gguf(arch, str(self.path))  # raises for an unsupported architecture
        return arch

    @cached_property
    def spec(self) -> Spec:
        """The architecture spec this file is read by."""
        return specs.for_gguf(self.architecture, str(self.path), self.metadata)

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
        for key in ("bos_token_id", "eos_token_id"):
            value = self.metadata.get(f"tokenizer.ggml.{key}")
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TinkerError(f"{self.path}: metadata key tokenizer.ggml.{key} is {value!r:.80}, expected an int")
            config[key] = value
        if config["model_type"] in spec.hf_classes:
            config["architectures"] = [spec.hf_classes[config["model_type"]]]
        return config

    def arch_key(self, name: str, default: Any = ..., kind: type = int, limit: int | None = None) -> Any:
        """`{general.architecture}.{name}` from the metadata, required unless a default is given.

        Args:
            kind: the type the value must have (int: not a bool or float; float: an int is accepted).
            limit: for an int, the largest value allowed (from `tinkerlm.limits`); the value must then be >= 1.

        Raises:
            TinkerError: missing without a default, not one value of `kind`, or outside 1..limit.
        """
        key = f"{self.architecture}.{name}"
        value = self.metadata.get(key, default)
        if value is ...:
            raise TinkerError(f"{self.path}: metadata key {key} is missing (re-convert the model with llama.cpp)")
        if value is None or value is default:
            return value
        ok = isinstance(value, kind) and not isinstance(value, bool) or kind is bool and isinstance(value, bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise TinkerError(
                f"{self.path}: metadata key {key} is {value!r:.80}, expected one {kind.__name__} "
                "(per-layer values are not supported)"
            )
        if limit is not None and not 1 <= value <= limit:
            raise TinkerError(
                f"{self.path}: metadata key {key} is {value}, outside 1..{limit} (the file is corrupt or hostile)"
            )
        return value

    def vocab_size(self) -> int:
        """`{arch}.vocab_size`, else the length of the tokenizer's token list."""
        size = self.arch_key("vocab_size", None, limit=limits.MAX_VOCAB)
        if size is None:
            tokens = self.metadata.get("tokenizer.ggml.tokens")
            if tokens is None:
                arch = self.metadata["general.architecture"]
                raise TinkerError(
                    f"{self.path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is in the metadata "
                    "(re-convert the model with llama.cpp)"
                )
            if not isinstance(tokens, list):
                raise TinkerError(f"{self.path}: metadata key tokenizer.ggml.tokens is not an array of strings")
            size = limits.check(len(tokens), limits.MAX_VOCAB, f"{self.path}: tokenizer.ggml.tokens: the vocabulary")
        return size

    @cached_property
    def _plan(self) -> dict[str, tuple[str, int | None]]:
        """HF name -> (GGUF name, expert index or None), in file order, after checking names, layer indices and
        shapes. A stack of experts (n_experts, rows, cols) is one parameter per expert (`Spec.experts`)."""
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
            stacked = "{e}" in hf_name
            if stacked and expected is not None:
                expected = (spec.experts(config), *expected)
            if expected is not None and shape != expected:
                raise TinkerError(
                    f"{self.path}: tensor {name} has shape {shape}, but the metadata implies {expected} "
                    "(file inconsistent; re-convert it)"
                )
            if stacked:
                plan.update({hf_name.format(e=e): (name, e) for e in range(shape[0])})
            else:
                plan[hf_name] = (name, None)
        if unused:
            raise TinkerError(
                f"{self.path}: {len(unused)} tensor(s) not used by the {self.architecture} architecture: "
                f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''} (file from a different architecture?)"
            )
        found = {name for name, _ in plan.values()}
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

    def _planned(self, hf_name: str) -> tuple[str, int | None]:
        planned = self._plan.get(hf_name)
        if planned is None:
            raise TinkerError(f"{self.path}: no tensor {hf_name} in this {self.architecture} file")
        return planned

    def hf_shape(self, hf_name: str) -> tuple[int, ...]:
        """The shape of an HF-named parameter, as the model holds it (linear weights (out, in))."""
        return self.raw_tensor(hf_name).shape

    def raw_tensor(self, hf_name: str) -> RawTensor:
        """An HF-named parameter as stored: GGML type, shape, the memory-mapped data and the row order to apply
        (one expert of a stack: its rows, a view of the stack's)."""
        name, expert = self._planned(hf_name)
        t = self._tensors[name]
        shape, data, offset, nbytes = _shape(t), t.data, t.data_offset, int(t.n_bytes)
        if expert is not None:  # each expert's rows are contiguous: (n_experts, rows, bytes a row)
            nbytes //= shape[0]
            shape, data, offset = shape[1:], data[expert], offset + expert * nbytes
        order = self.spec.row_order(hf_name, self._config, shape[0]) if shape else None
        shift = self.spec.value_shift(hf_name)
        return RawTensor(t.name, t.tensor_type.name, shape, data, offset, nbytes, order, shift)

    def hf_tensor(self, hf_name: str) -> torch.Tensor:
        """An HF-named parameter dequantized to fp32, the spec's fixes applied (q/k rows in HF's order, Gemma's
        norms less their stored offset of 1).

        Raises:
            TinkerError: no such parameter, or a tensor type the gguf package cannot dequantize.
        """
        import torch

        raw = self.raw_tensor(hf_name)
        tensor = self._dequantize(self._tensors[raw.name], raw.data, raw.shape)
        if raw.row_order is not None:
            tensor = tensor[torch.from_numpy(raw.row_order)]
        if raw.value_shift:
            tensor -= raw.value_shift
        return tensor

    def release(self, hf_name: str) -> None:
        """Drop the file pages under a parameter from this process's resident memory (after copying it, e.g. packed
        for the kernels); touched again, they are read back from the file. Releasing each tensor as it is done keeps
        the peak of a load at the copy plus one tensor, not the copy plus the whole file."""
        self._reader.release(self.raw_tensor(hf_name).data)

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

    def _dequantize(self, tensor: _TensorInfo, data: np.ndarray | None = None, shape=None) -> torch.Tensor:
        """`tensor` (or the part of its `data` of this `shape`: one expert) as fp32."""
        import torch
        from gguf import GGMLQuantizationType as T
        from gguf.quants import dequantize

        data, shape = (tensor.data, _shape(tensor)) if data is None else (data, shape)
        if tensor.tensor_type in (T.F64, T.I8, T.I16, T.I32, T.I64):
            array = np.asarray(data)
        elif (fast := _kernel_dequantize(data, tensor.tensor_type.name, shape)) is not None:
            return fast
        else:
            try:
                array = dequantize(data, tensor.tensor_type)
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


# Block types the C++ kernels may dequantize instead of the gguf package, by their codes in the kernels (`dequantize`
# for 32-value blocks; `pack` then `dequantize_packed` for the K-quants' super-blocks, packed formats X4K, X5K, X6K,
# X3K and X2K), with their block values and bytes. gguf's numpy dequantizer costs about 2 s per pass over a
# 135M-parameter Q4_1 file; an export reads a model four times (write, read back, exact tensors, comparison). The
# kernels compute each value as gguf does: d * q + m (Q4_1, Q4_K, Q5_K, Q2_K; d an fp16, times a sub-block scale of
# at most 6 bits for the K-quants, and q of at most 5 bits, so d * q is exact in fp32 and a fused multiply-add rounds
# as gguf's multiply-then-add), d * q (Q8_0), d * (q - 8) (Q4_0), (d * sc) * (q - 32) (Q6_K) and
# (d * (sc - 32)) * (q - 4) (Q3_K; d * sc exact), with no offset added where there is none, so a zero keeps d's sign
# as in gguf. `_kernel_exact` checks gguf's bits once per process all the same, and gguf's dequantizer runs if they
# differ.
KERNEL_DEQUANT = {
    "Q8_0": (0, None, 32, 34),
    "Q4_0": (1, None, 32, 18),
    "Q4_1": (2, None, 32, 20),
    "Q4_K": (4, 7, 256, 144),
    "Q5_K": (5, 9, 256, 176),
    "Q6_K": (6, 8, 256, 210),
    "Q3_K": (7, 10, 256, 110),
    "Q2_K": (8, 11, 256, 84),
}
_SCALES_AT = {
    "Q8_0": (0,),
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "Q3_K": (108,),
    "Q2_K": (80, 82),
}  # where the fp16 scales d (and dmin or m) are


def _kernel_dequantize(data: np.ndarray, type_name: str, shape, check: bool = True) -> torch.Tensor | None:
    """The blocks `data` of `type_name` as an fp32 tensor of `shape` by the kernels, or None (not one of
    KERNEL_DEQUANT's types, no kernels, not gguf's bits on this build, or not whole rows of blocks): then gguf's
    dequantizer runs."""
    import torch

    from tinkerlm import kernels

    if type_name not in KERNEL_DEQUANT or not shape or (k := kernels.ops()) is None:
        return None
    if check and not _kernel_exact(type_name):
        return None
    code, packed, per, nbytes = KERNEL_DEQUANT[type_name]
    array = np.asarray(data)
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if array.dtype != np.uint8 or shape[-1] % per or array.size != rows * (shape[-1] // per) * nbytes:
        return None
    with warnings.catch_warnings():  # a read-only map: the kernels only read it
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(np.ascontiguousarray(array).reshape(rows, -1))
    if packed is None:
        out = k.dequantize(blocks, code)
    else:
        out = k.dequantize_packed(k.pack(blocks, code), packed, rows)
    return out.reshape(shape)


@functools.cache
def _kernel_exact(type_name: str) -> bool:
    """Whether this build's kernels dequantize `type_name` to gguf's bits: checked once per process on 37 rows of
    random blocks (random finite scales of both signs, a few milliseconds)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    _, _, per, nbytes = KERNEL_DEQUANT[type_name]
    rng = np.random.default_rng(0)
    rows, K = 37, 4 * max(per, 64)
    raw = rng.integers(0, 256, (rows, K // per, nbytes), dtype=np.uint8)
    for at in _SCALES_AT[type_name]:
        scale = rng.normal(0, 1, raw.shape[:2]) * 10.0 ** rng.integers(-4, 2, raw.shape[:2])
        raw[:, :, at : at + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    raw = raw.reshape(rows, -1)
    ours = _kernel_dequantize(raw, type_name, (rows, K), check=False)
    want = dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, K).astype(np.float32)
    return ours is not None and np.array_equal(ours.numpy().view(np.uint32), want.view(np.uint32))


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


HEAD_BYTES = 1 << 25  # the first read of a file, enough for the header (vocabulary included) of most models


class _Reparse(Exception):
    """The header runs past the first read of the file: parse it again from the whole (memory-mapped) file."""


class _Header:
    """Metadata (plain Python values) and tensor infos of a GGUF v2/v3 file, tensor data memory-mapped.

    The file is untrusted: every count and length it declares is checked against `tinkerlm.limits` and against the
    bytes left in the file before anything of that size is allocated, so a 600 KB file cannot ask for gigabytes.
    Errors are TinkerErrors naming the file and the key or tensor.
    """

    def __init__(self, path: Path):
        self.path = path
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        self._size = len(self._mm)
        # The header (vocabulary included) is parsed from a bytes copy of the file's start: slicing bytes is far
        # cheaper than slicing the map. A header longer than the first read is parsed again from an mmap of the
        # whole file (slices of an mmap are bytes too; the file is not copied into memory).
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
        try:
            self._parse(head)
        except _Reparse:
            with open(path, "rb") as f:
                whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                self._parse(whole)
            finally:
                self._buf = b""
                whole.close()

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

    # -- bounds ------------------------------------------------------------------------------------------------

    def _fail(self, what: str, problem: str) -> TinkerError:
        return TinkerError(f"{self.path}: {what} {problem} (file truncated, corrupt or hostile; download it again)")

    def _need(self, n: int, what: str) -> None:
        """`n` more bytes must follow the read position, in the buffer (else parse again from the whole file)."""
        if self._pos + n > len(self._buf):
            if len(self._buf) < self._size:
                raise _Reparse
            raise self._fail(what, f"runs past the end of the file (needs {n} bytes at byte {self._pos})")

    def _count(self, value: int, limit: int, what: str, min_bytes: int) -> int:
        """A declared count: within `limit`, and its items (at least `min_bytes` each) fit in the rest of the file."""
        limits.check(value, limit, f"{self.path}: {what}")
        if value * min_bytes > self._size - self._pos:
            raise self._fail(
                what, f"declares {value} items, but only {self._size - self._pos} bytes of the file are left"
            )
        return value

    # -- parsing -----------------------------------------------------------------------------------------------

    def _parse(self, buf) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self._buf, self._pos = buf, 8
        self._need(16, "the tensor and key counts")
        n_tensors, n_kv = self._unpack("<QQ")
        # Each key is at least its length (8), its type (4) and one byte of value; each tensor info at least its
        # name length (8), n_dims (4), type (4) and offset (8).
        self._count(n_kv, limits.MAX_METADATA_KEYS, "the metadata key count", 13)
        self._count(n_tensors, limits.MAX_TENSORS, "the tensor count", 24)
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = self._string(f"metadata key #{i}")
            self._need(4, f"metadata key {key}")
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._value(vtype, f"metadata key {key}", 0)
        infos = []
        names = set()
        for i in range(n_tensors):
            t = _TensorInfo()
            t.name = self._string(f"tensor info #{i}")
            what = f"tensor {t.name}"
            if t.name in names:
                raise self._fail(what, "appears twice")
            names.add(t.name)
            self._need(4, what)
            (n_dims,) = self._unpack("<I")
            limits.check(n_dims, limits.MAX_DIMS, f"{self.path}: {what}: the number of dimensions")
            self._need(8 * n_dims + 12, what)
            dims = self._unpack(f"<{n_dims}Q")
            count = 1
            for d in dims:  # Python ints: a product of uint64s cannot overflow here
                if d < 1:
                    raise self._fail(what, f"has a dimension of {d} (shape {list(dims)})")
                count *= d
                limits.check(count, limits.MAX_ELEMENTS, f"{self.path}: {what}: the element count")
            ttype, offset = self._unpack("<IQ")
            try:
                t.tensor_type = GGMLQuantizationType(ttype)
                block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            except (ValueError, KeyError):
                raise self._fail(what, f"has unknown tensor type {ttype} (a newer llama.cpp format?)") from None
            # ggml stores whole blocks along the first (fastest) dimension: a row not a multiple of the block size
            # would make the byte range disagree with the elements (K-quants: rows of 256).
            if dims and dims[0] % block:
                raise self._fail(
                    what,
                    f"has rows of {dims[0]} values, not a multiple of the {block}-value blocks of type "
                    f"{t.tensor_type.name}",
                )
            t.shape = np.array(dims, dtype=np.int64)
            t.n_bytes = count // block * type_size
            infos.append((t, offset))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or not 1 <= align <= 1 << 16 or align & (align - 1):
            raise self._fail("metadata key general.alignment", f"is {align!r}, expected a power of two up to 65536")
        start = (self._pos + align - 1) // align * align
        self.tensors = []
        for t, offset in infos:
            t.data_offset = start + offset
            end = t.data_offset + t.n_bytes
            if end > self._size:
                raise TinkerError(
                    f"{self.path}: tensor {t.name} ends at byte {end}, but the file has {self._size} bytes "
                    "(file truncated? download it again)"
                )
            raw = self._mm[t.data_offset : end]
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

    def _string(self, what: str) -> str:
        self._need(8, what)
        (n,) = self._unpack("<Q")
        limits.check(n, limits.MAX_STRING_BYTES, f"{self.path}: {what}: the string length")
        self._need(n, what)
        try:
            text = self._buf[self._pos : self._pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(what, "is not valid UTF-8") from None
        self._pos += n
        return text

    def _strings(self, count: int, what: str) -> list[str]:
        """An array of strings (a vocabulary, merges): the hot loop of header parsing, kept tight."""
        buf, pos, unpack, out = self._buf, self._pos, _U64.unpack_from, [None] * count
        end, max_len = len(buf), limits.MAX_STRING_BYTES
        try:
            for i in range(count):
                if pos + 8 > end:
                    self._pos = pos
                    self._need(8, f"{what}, item {i}")
                (n,) = unpack(buf, pos)
                pos += 8
                if n > max_len or pos + n > end:
                    self._pos = pos
                    limits.check(n, max_len, f"{self.path}: {what}, item {i}: the string length")
                    self._need(n, f"{what}, item {i}")
                out[i] = buf[pos : pos + n].decode("utf-8")
                pos += n
        except UnicodeDecodeError:
            raise self._fail(f"{what}, item {i}", "is not valid UTF-8") from None
        self._pos = pos
        return out

    def _value(self, vtype: int, what: str, depth: int):
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            self._need(struct.calcsize(fmt), what)
            return self._unpack(fmt)[0]
        if vtype == 8:
            return self._string(what)
        if vtype != 9:
            raise self._fail(what, f"has unknown value type {vtype}")
        limits.check(depth, limits.MAX_ARRAY_DEPTH - 1, f"{self.path}: {what}: the nesting of arrays")
        self._need(12, what)
        etype, count = self._unpack("<IQ")
        # Each item takes at least a byte (numbers: their size; strings: an 8-byte length; arrays: 12 bytes).
        item = np.dtype(_NUMPY[etype]).itemsize if etype in _NUMPY else {8: 8, 9: 12}.get(etype, 1)
        self._count(count, limits.MAX_ARRAY_ITEMS, f"{what}: the array length", item)
        if etype in _NUMPY:
            dt = np.dtype(_NUMPY[etype])
            self._need(count * dt.itemsize, what)
            end = self._pos + count * dt.itemsize
            arr = np.frombuffer(self._buf[self._pos : end], dtype=dt)
            self._pos = end
            return arr.tolist()
        if etype == 8:
            return self._strings(count, what)
        if etype != 9:
            raise self._fail(what, f"is an array of unknown value type {etype}")
        return [self._value(etype, what, depth + 1) for _ in range(count)]
