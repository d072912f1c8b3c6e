"""A small reader of Arrow IPC streams: the files Hugging Face `datasets` saves (`data-00000-of-00001.arrow`).

Enough of the format for evaluation data, without pyarrow: a stream of messages, each `0xFFFFFFFF`, an int32
metadata length, a FlatBuffers `Message` (Schema or RecordBatch) and its body. Columns of types Null, Int,
FloatingPoint (32/64), Bool, Utf8/Binary (and Large*), List (and LargeList) and Struct are decoded to Python values,
nulls to None. Dictionary-encoded columns and compressed bodies are refused with a clear error.

References: Arrow columnar format, "Serialization and Interprocess Communication (IPC)"
(https://arrow.apache.org/docs/format/Columnar.html) and its schemas format/Message.fbs and format/Schema.fbs;
FlatBuffers internals (https://flatbuffers.dev/internals/).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from tinkerlm.errors import TinkerError

CONTINUATION = 0xFFFFFFFF
# Message.fbs MessageHeader union and Schema.fbs Type union: the members read here.
SCHEMA, DICTIONARY_BATCH, RECORD_BATCH = 1, 2, 3
NULL, INT, FLOAT, BINARY, UTF8, BOOL = 1, 2, 3, 4, 5, 6
LIST, STRUCT, LARGE_BINARY, LARGE_UTF8, LARGE_LIST = 12, 13, 19, 20, 21
TYPE_NAMES = {
    7: "Decimal",
    8: "Date",
    9: "Time",
    10: "Timestamp",
    11: "Interval",
    14: "Union",
    15: "FixedSizeBinary",
    16: "FixedSizeList",
    17: "Map",
    18: "Duration",
    22: "RunEndEncoded",
    23: "BinaryView",
    24: "Utf8View",
}


class _Table:
    """A FlatBuffers table: fields found through its vtable."""

    def __init__(self, buf: memoryview, pos: int):
        self.buf, self.pos = buf, pos
        vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        size = struct.unpack_from("<H", buf, vtable)[0]
        self.offsets = struct.unpack_from(f"<{(size - 4) // 2}H", buf, vtable + 4)

    def _at(self, field: int) -> int:
        return self.offsets[field] if field < len(self.offsets) else 0

    def scalar(self, field: int, fmt: str, default=0):
        off = self._at(field)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def _target(self, field: int) -> int | None:
        off = self._at(field)
        if not off:
            return None
        return self.pos + off + struct.unpack_from("<I", self.buf, self.pos + off)[0]

    def table(self, field: int) -> _Table | None:
        target = self._target(field)
        return None if target is None else _Table(self.buf, target)

    def string(self, field: int) -> str:
        target = self._target(field)
        if target is None:
            return ""
        n = struct.unpack_from("<I", self.buf, target)[0]
        return bytes(self.buf[target + 4 : target + 4 + n]).decode("utf-8")

    def tables(self, field: int) -> list[_Table]:
        target = self._target(field)
        if target is None:
            return []
        n = struct.unpack_from("<I", self.buf, target)[0]
        out = []
        for i in range(n):
            at = target + 4 + 4 * i
            out.append(_Table(self.buf, at + struct.unpack_from("<I", self.buf, at)[0]))
        return out

    def structs(self, field: int, fmt: str) -> list[tuple]:
        """A vector of fixed-size structs, each unpacked with `fmt`."""
        target = self._target(field)
        if target is None:
            return []
        n = struct.unpack_from("<I", self.buf, target)[0]
        return list(struct.iter_unpack("<" + fmt, self.buf[target + 4 : target + 4 + n * struct.calcsize(fmt)]))


@dataclass
class Field:
    name: str
    type_id: int
    type: _Table | None
    children: list[Field]


def _field(t: _Table) -> Field:
    return Field(t.string(0), t.scalar(2, "B"), t.table(3), [_field(c) for c in t.tables(5)])


class _Batch:
    """Walks one RecordBatch's field nodes and buffers in schema order (pre-order), decoding columns."""

    def __init__(self, path: Path, body: memoryview, nodes: list[tuple], buffers: list[tuple]):
        self.path, self.body, self.nodes, self.buffers = path, body, iter(nodes), iter(buffers)

    def _buffer(self) -> memoryview:
        offset, length = next(self.buffers)
        return self.body[offset : offset + length]

    def column(self, f: Field) -> list:
        length, null_count = next(self.nodes)
        validity = self._buffer() if f.type_id != NULL else None
        valid = (lambda i: True) if not null_count else (lambda i: bool(validity[i >> 3] >> (i & 7) & 1))
        if f.type_id == NULL:
            return [None] * length
        if f.type_id == INT:
            bits, signed = f.type.scalar(0, "i"), f.type.scalar(1, "?", False)
            fmt = {8: "b", 16: "h", 32: "i", 64: "q"}[bits]
            values = struct.unpack_from(f"<{length}{fmt if signed else fmt.upper()}", self._buffer())
        elif f.type_id == FLOAT:
            precision = f.type.scalar(0, "h")
            if precision not in (1, 2):
                raise TinkerError(f"{self.path}: column {f.name!r}: half-precision floats are not supported")
            values = struct.unpack_from(f"<{length}{'f' if precision == 1 else 'd'}", self._buffer())
        elif f.type_id == BOOL:
            data = self._buffer()
            values = [bool(data[i >> 3] >> (i & 7) & 1) for i in range(length)]
        elif f.type_id in (UTF8, BINARY, LARGE_UTF8, LARGE_BINARY):
            wide = f.type_id in (LARGE_UTF8, LARGE_BINARY)
            offsets = struct.unpack_from(f"<{length + 1}{'q' if wide else 'i'}", self._buffer())
            data = bytes(self._buffer())
            values = [data[offsets[i] : offsets[i + 1]] for i in range(length)]
            if f.type_id in (UTF8, LARGE_UTF8):
                values = [v.decode("utf-8") for v in values]
        elif f.type_id in (LIST, LARGE_LIST):
            offsets = struct.unpack_from(f"<{length + 1}{'q' if f.type_id == LARGE_LIST else 'i'}", self._buffer())
            child = self.column(f.children[0])
            values = [child[offsets[i] : offsets[i + 1]] for i in range(length)]
        elif f.type_id == STRUCT:
            columns = [self.column(c) for c in f.children]
            values = [{c.name: col[i] for c, col in zip(f.children, columns)} for i in range(length)]
        else:
            kind = TYPE_NAMES.get(f.type_id, f"type {f.type_id}")
            raise TinkerError(f"{self.path}: column {f.name!r} has Arrow type {kind}, which this reader does not read")
        return [v if valid(i) else None for i, v in enumerate(values)] if null_count else list(values)


def read_stream(path: str | Path) -> list[dict]:
    """The rows of an Arrow IPC stream file as dicts, column name -> Python value.

    Raises:
        TinkerError: not an Arrow stream, truncated, or holding a type or feature this reader does not read.
    """
    path = Path(path)
    buf = memoryview(path.read_bytes())
    pos, fields, rows = 0, None, []
    while pos + 4 <= len(buf):
        size = struct.unpack_from("<I", buf, pos)[0]
        pos += 4
        if size == CONTINUATION:  # since Arrow 0.15 every message starts with the marker, then its length
            if pos + 4 > len(buf):
                break
            size = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        if size == 0:  # end of stream
            break
        if pos + size > len(buf):
            raise TinkerError(f"{path}: truncated Arrow stream (a message runs past the end of the file)")
        meta = buf[pos : pos + size]
        pos += size
        try:
            message = _Table(meta, struct.unpack_from("<I", meta, 0)[0])
        except struct.error:
            raise TinkerError(f"{path}: not an Arrow IPC stream (unreadable message header)")
        kind, header, body_length = message.scalar(1, "B"), message.table(2), message.scalar(3, "q")
        body = buf[pos : pos + body_length]
        pos += body_length
        if len(body) != body_length:
            raise TinkerError(f"{path}: truncated Arrow stream (a record batch runs past the end of the file)")
        if kind == SCHEMA:
            fields = [_field(f) for f in header.tables(1)]
            if any(f.table(4) for f in header.tables(1)):
                raise TinkerError(f"{path}: dictionary-encoded columns are not supported")
        elif kind == RECORD_BATCH:
            if fields is None:
                raise TinkerError(f"{path}: a record batch comes before the schema (not an Arrow stream?)")
            if header.table(3) is not None:
                raise TinkerError(f"{path}: compressed Arrow record batches are not supported")
            batch = _Batch(path, body, header.structs(1, "qq"), header.structs(2, "qq"))
            length = header.scalar(0, "q")
            columns = [batch.column(f) for f in fields]
            rows += [{f.name: col[i] for f, col in zip(fields, columns)} for i in range(length)]
        elif kind == DICTIONARY_BATCH:
            raise TinkerError(f"{path}: dictionary batches are not supported")
        else:
            raise TinkerError(f"{path}: not an Arrow IPC stream (message type {kind})")
    if fields is None:
        raise TinkerError(f"{path}: not an Arrow IPC stream (no schema message)")
    return rows
