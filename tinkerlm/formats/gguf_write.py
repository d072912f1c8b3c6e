"""Write a GGUF file: typed metadata, tensor infos, then each tensor's data, streamed one tensor at a time.

The layout is the one `tinkerlm/formats/gguf.py` reads (GGUF v3, little-endian): magic `GGUF`, version, tensor
and key counts; key/value metadata; tensor infos (name, dimensions listed fastest first, GGML type, offset from the
data start); padding to the alignment; the tensors' data, each starting on an aligned offset. Every byte size is
known from a tensor's type and shape, so the whole header is written before any tensor is made: a tensor is
produced (quantized, converted) only when its turn comes and dropped after, so the peak memory is one tensor.

The file appears whole or not at all: it is written to a temporary file beside the target, fsynced and renamed
into place; any error, Ctrl-C included, removes the temporary file.

Metadata value types follow what llama.cpp's loader requires (`llama_model_loader::get_key` rejects any other
type): ints are UINT32 (ids, sizes, general.file_type), floats FLOAT32, token types an INT32 array, scores a
FLOAT32 array. A key that needs another type is given as `Typed(value, "UINT64")`.

References:
- GGUF spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
- llama.cpp's loader (the type each key must have): src/llama-model-loader.cpp, src/llama-vocab.cpp
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinkerlm.errors import TinkerError

VERSION = 3
ALIGNMENT = 32  # llama.cpp's default when general.alignment is absent

# GGUF metadata value types (gguf.md: gguf_metadata_value_type).
VALUE_TYPES = {
    "UINT8": 0,
    "INT8": 1,
    "UINT16": 2,
    "INT16": 3,
    "UINT32": 4,
    "INT32": 5,
    "FLOAT32": 6,
    "BOOL": 7,
    "STRING": 8,
    "ARRAY": 9,
    "UINT64": 10,
    "INT64": 11,
    "FLOAT64": 12,
}
_NUMERIC = {
    "UINT8": "<u1",
    "INT8": "<i1",
    "UINT16": "<u2",
    "INT16": "<i2",
    "UINT32": "<u4",
    "INT32": "<i4",
    "FLOAT32": "<f4",
    "BOOL": "?",
    "UINT64": "<u8",
    "INT64": "<i8",
    "FLOAT64": "<f8",
}

# The numpy dtype `produce()` must return for the plain tensor types; every block type comes as uint8 rows.
TENSOR_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # the bits, as numpy has no bfloat16
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}


@dataclass(frozen=True)
class Typed:
    """A metadata value with an explicit GGUF type: the scalar's type, or an array's element type
    (`Typed(10_000, "UINT64")`, `Typed([1, 2], "UINT32")`)."""

    value: Any
    type: str


@dataclass
class TensorPlan:
    """One tensor to write: its GGUF name, GGML type name ("Q4_K", "F32"), shape in torch order ((out, in)) and
    the function that makes its data when its turn comes (uint8 blocks (rows, row_bytes) for block types,
    float32/float16 arrays, uint16 bits for BF16)."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        """The data's size in bytes, from the type and shape.

        Raises:
            TinkerError: an unknown type, or rows that are not whole blocks of it.
        """
        block, type_size = _type_sizes(self.qtype, self.name)
        shape = tuple(int(d) for d in self.shape)
        if not shape or any(d < 1 for d in shape):
            raise TinkerError(f"tensor {self.name}: shape {shape} is empty")
        if shape[-1] % block:
            raise TinkerError(
                f"tensor {self.name}: rows of {shape[-1]} values are not whole {block}-value blocks of type "
                f"{self.qtype} (choose another type for this tensor)"
            )
        return int(np.prod(shape, dtype=object)) // block * type_size


def write_gguf(
    path: str | os.PathLike, metadata: dict[str, Any], tensors: list[TensorPlan], progress: bool = False
) -> Path:
    """Write a GGUF v3 file atomically: the header first, then each tensor produced and written in turn.

    Args:
        metadata: key -> value (bool, int, float, str, a list of one of them, or `Typed`). general.alignment,
            when given, sets the alignment (default 32).
        tensors: the tensors, in file order.
        progress: show a progress bar over the tensors.

    Returns:
        The path written.

    Raises:
        TinkerError: a value of no GGUF type, a duplicate tensor name, or a shape its type cannot hold.
        OSError: the file cannot be written (nothing is left behind).
        RuntimeError: a `produce()` returned data of another size or dtype than its plan (a bug in the caller).
    """
    path = Path(path)
    alignment = metadata.get("general.alignment", ALIGNMENT)
    if isinstance(alignment, Typed):
        alignment = alignment.value
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 8 or alignment & (alignment - 1):
        raise TinkerError(f"{path}: general.alignment {alignment!r} is not a power of two of at least 8")
    header, offsets = _header(path, metadata, tensors, alignment)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make the file private; a model file is as open() makes it
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(b"\0" * _pad(len(header), alignment))
            _write_tensors(f, tensors, offsets, alignment, progress, path)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: no half-written file is left behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _write_tensors(f, tensors: list[TensorPlan], offsets: list[int], alignment: int, progress: bool, path: Path):
    from tqdm.auto import tqdm

    start = f.tell()
    bar = tqdm(tensors, desc=path.name, unit="tensor", disable=not progress)
    for plan, offset in zip(bar, offsets):
        assert f.tell() - start == offset, "tensor offsets are laid out in file order"
        data = np.ascontiguousarray(plan.produce())
        expected_dtype = TENSOR_DTYPES.get(plan.qtype, np.uint8)
        if data.dtype != expected_dtype or data.nbytes != plan.nbytes:
            raise RuntimeError(
                f"internal error: tensor {plan.name} ({plan.qtype}, shape {tuple(plan.shape)}) was produced as "
                f"{data.dtype} with {data.nbytes} bytes, expected {np.dtype(expected_dtype)} with {plan.nbytes} bytes"
            )
        f.write(data.data.cast("B"))
        f.write(b"\0" * _pad(data.nbytes, alignment))
        del data


def _header(path: Path, metadata: dict[str, Any], tensors: list[TensorPlan], alignment: int) -> tuple[bytes, list]:
    """The header's bytes (up to the tensor infos) and each tensor's data offset."""
    out = [b"GGUF", struct.pack("<IQQ", VERSION, len(tensors), len(metadata))]
    # general.architecture first, as llama.cpp's writer orders it (readers do not depend on it).
    keys = sorted(metadata, key=lambda k: k != "general.architecture")
    for key in keys:
        out.append(_string(key))
        out.append(_value(metadata[key], f"{path}: metadata key {key}"))
    offsets, offset, names = [], 0, set()
    for plan in tensors:
        if plan.name in names:
            raise TinkerError(f"{path}: tensor {plan.name} is planned twice")
        names.add(plan.name)
        nbytes = plan.nbytes
        dims = [int(d) for d in reversed(tuple(plan.shape))]  # GGML lists the fastest dimension first
        out.append(_string(plan.name))
        out.append(struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, _ggml_type(plan.qtype), offset))
        offsets.append(offset)
        offset += nbytes + _pad(nbytes, alignment)
    return b"".join(out), offsets


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(value: Any, what: str) -> bytes:
    """A metadata value: its type (uint32) then its payload."""
    kind, value = _kind(value, what)
    if isinstance(kind, tuple):  # an array
        element = kind[1]
        head = struct.pack("<IIQ", VALUE_TYPES["ARRAY"], VALUE_TYPES[element], len(value))
        if element == "STRING":
            if not all(isinstance(v, str) for v in value):
                raise TinkerError(f"{what}: an array of strings holds a non-string")
            return head + b"".join(_string(v) for v in value)
        return head + _numbers(value, element, what)
    if kind == "STRING":
        return struct.pack("<I", VALUE_TYPES["STRING"]) + _string(value)
    return struct.pack("<I", VALUE_TYPES[kind]) + _numbers([value], kind, what)


def _numbers(values: list, kind: str, what: str) -> bytes:
    dtype = np.dtype(_NUMERIC[kind])
    if kind != "BOOL" and any(isinstance(v, bool) for v in values):
        raise TinkerError(f"{what}: a bool where {kind} numbers were expected")
    if dtype.kind in "iu":
        if not all(isinstance(v, (int, np.integer)) for v in values):
            raise TinkerError(f"{what}: a non-integer where {kind} was expected")
        values = [int(v) for v in values]
        info = np.iinfo(dtype)
        if values and not (info.min <= min(values) and max(values) <= info.max):
            raise TinkerError(f"{what}: a value outside the range of {kind}")
    return np.asarray(values, dtype=dtype).tobytes()


def _kind(value: Any, what: str) -> tuple[str | tuple[str, str], Any]:
    """The GGUF type of a value: a type name, or ("ARRAY", element type name)."""
    if isinstance(value, Typed):
        if value.type not in VALUE_TYPES or value.type == "ARRAY":
            raise TinkerError(f"{what}: unknown GGUF value type {value.type!r}")
        if isinstance(value.value, (list, tuple)):
            return ("ARRAY", value.type), list(value.value)
        return value.type, value.value
    if isinstance(value, (bool, np.bool_)):
        return "BOOL", bool(value)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if value < 0:
            return "INT32" if value >= -(2**31) else "INT64", value
        return "UINT32" if value < 2**32 else "UINT64", value
    if isinstance(value, (float, np.floating)):
        return "FLOAT32", float(value)
    if isinstance(value, str):
        return "STRING", value
    if isinstance(value, (list, tuple)):
        value = list(value)
        # An empty list is an array of strings: the one empty array llama.cpp reads (tokenizer.ggml.merges).
        if all(isinstance(v, str) for v in value):
            return ("ARRAY", "STRING"), value
        if all(isinstance(v, (bool, np.bool_)) for v in value):
            return ("ARRAY", "BOOL"), [bool(v) for v in value]
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            return ("ARRAY", "INT32"), [int(v) for v in value]
        if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value):
            return ("ARRAY", "FLOAT32"), [float(v) for v in value]
    raise TinkerError(f"{what}: {type(value).__name__} value {value!r:.60} has no GGUF type (pass it as Typed)")


def _ggml_type(qtype: str) -> int:
    from gguf import GGMLQuantizationType

    try:
        return int(GGMLQuantizationType[qtype])
    except KeyError:
        raise TinkerError(f"unknown GGML tensor type {qtype!r}") from None


def _type_sizes(qtype: str, name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    except KeyError:
        raise TinkerError(f"tensor {name}: unknown GGML tensor type {qtype!r}") from None


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
