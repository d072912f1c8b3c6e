"""Hugging Face model directories: `config.json`, `generation_config.json` and safetensors weights.

Weights are single `model.safetensors` or shards listed in `model.safetensors.index.json`. Files are memory-mapped
through `safetensors`; pickled `*.bin` checkpoints are never opened. `write_model` is the one writer of model
directories made here (fine-tunes, fused adapters, merges). Format: https://github.com/huggingface/safetensors
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.fileio import write_json
from tinkerlm.formats import specs

INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


def read_json(path: Path, required: bool = True) -> dict[str, Any] | None:
    """Parse a JSON object file; a missing (when required) or malformed file is a TinkerError naming it."""
    if not path.is_file():
        if required:
            raise TinkerError(f"{path}: file not found (a Hugging Face model directory needs it)")
        return None
    size = path.stat().st_size
    if size > limits.MAX_JSON_BYTES:
        raise TinkerError(f"{path}: {size} bytes, over the limit of {limits.MAX_JSON_BYTES} for a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise TinkerError(f"{path}: not valid JSON ({e!s:.200}); re-download or fix the file") from None
    if not isinstance(data, dict):
        raise TinkerError(f"{path}: expected a JSON object at the top level")
    return data


def load_config(model_dir: Path) -> dict[str, Any]:
    config = read_json(model_dir / "config.json")
    if "model_type" not in config:
        raise TinkerError(f"{model_dir / 'config.json'}: missing key 'model_type' (which architecture is this?)")
    return config


def load_generation_config(model_dir: Path) -> dict[str, Any]:
    return read_json(model_dir / "generation_config.json", required=False) or {}


def index_shards(index: Path) -> list[str]:
    """The shard file names a `model.safetensors.index.json` lists, in order of first appearance.

    Raises:
        TinkerError: no weight_map, or a shard name that is not a relative path inside the folder (`..`, an
            absolute path, a drive): an index from a stranger must not make tinkerlm open files elsewhere.
    """
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise TinkerError(f"{index}: missing 'weight_map' (re-download the index)")
    shards = list(dict.fromkeys(v if isinstance(v, str) else repr(v) for v in weight_map.values()))
    for name in shards:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if not parts or name.startswith(("/", "\\")) or ":" in name or ".." in parts or "\0" in name:
            raise TinkerError(
                f"{index}: shard name {name!r:.200} is not a file name inside the model folder (index corrupt or "
                "hostile; re-download it)"
            )
    return shards


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files that hold the weights: the shards the index names, else every top-level one.

    Raises:
        TinkerError: a missing shard, or a weights file that is a symlink leading out of the folder.
    """
    index = model_dir / INDEX
    if index.is_file():
        files = [model_dir / name for name in index_shards(index)]
        for f in files:
            _inside(model_dir, f, index)
            if not f.is_file():
                raise TinkerError(f"{index}: lists shard {f.name}, which is not in {model_dir} (download all shards)")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt*")]
        hint = " (pickled checkpoints are not loaded: convert them to safetensors)" if pickles else ""
        raise TinkerError(f"{model_dir}: no *.safetensors weights found{hint}")
    for f in files:
        _inside(model_dir, f, f)
    return files


def model_roots(model_dir: Path) -> list[Path]:
    """The folders a model folder's files (symlinks resolved) may lie in: the folder itself and, for a Hugging Face
    cache snapshot (`models--ORG--NAME/snapshots/REV/`, whose files link to `../../blobs/SHA`), its repository
    folder. A link anywhere else could make a stranger's folder read `~/.ssh/id_rsa` as a weights file."""
    d = Path(model_dir)
    roots = [d.resolve()]
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        roots.append(d.parent.parent.resolve())
    return roots


def _inside(model_dir: Path, file: Path, source: Path) -> None:
    """`file`, symlinks resolved, must lie inside `model_roots(model_dir)` (a linked model folder itself is fine)."""
    target = file.resolve()
    if not any(target.is_relative_to(r) for r in model_roots(model_dir)):
        raise TinkerError(
            f"{source}: weights file {file.name} leads to {target}, outside the model folder {model_dir.resolve()} "
            "(a symlink? copy the real files into the folder)"
        )


def load_state_dict(model_dir: Path) -> dict:
    """All tensors of the directory's safetensors files by name (memory-mapped, in their stored dtype)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict = {}
    for f in weight_files(model_dir):
        try:
            part = load_file(f)
        except (SafetensorError, OSError, ValueError) as e:
            raise TinkerError(
                f"{f}: cannot read safetensors ({e}); the file is truncated or corrupt, re-download it"
            ) from None
        dup = set(part) & set(tensors)
        if dup:
            raise TinkerError(f"{f}: tensor {sorted(dup)[0]} also appears in another shard")
        tensors.update(part)
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# Writing: a streaming safetensors writer and config.json, for models made here without holding them whole

# torch dtype name -> safetensors dtype code (https://github.com/huggingface/safetensors#format)
SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def safetensors_dtype(dtype) -> str:
    """The safetensors code of a torch dtype (`torch.bfloat16` -> "BF16"); codes pass through."""
    name = str(dtype).removeprefix("torch.")
    if name in _ITEMSIZE:
        return name
    if name not in SAFETENSORS_DTYPES:
        raise TinkerError(f"dtype {name}: cannot be stored in safetensors (use float32, bfloat16 or float16)")
    return SAFETENSORS_DTYPES[name]


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, in an order fixed up front, straight to disk.

    The header needs every tensor's byte range, so the full list of (name, dtype, shape) is given first; tensors
    then arrive in that order and are written as they come, so a merge never holds a whole model. The file is
    written as `<path>.tmp` and renamed on `close()`; `abort()` (or leaving a `with` block by an exception) removes
    it. Layout: 8-byte little-endian header length, the JSON header padded with spaces to a multiple of 8, then
    the tensors' bytes back to back (row-major, little-endian), each at the `data_offsets` the header gives.

        with SafetensorsWriter(path, [("w", torch.float32, (2, 3))]) as w:
            w.write("w", torch.zeros(2, 3))
    """

    def __init__(
        self, path: str | Path, tensors: list[tuple[str, Any, tuple[int, ...]]], metadata: dict[str, str] | None = None
    ):
        import struct

        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._plan: list[tuple[str, str, tuple[int, ...], int]] = []  # (name, dtype code, shape, bytes)
        header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in (metadata or {"format": "pt"}).items()}}
        offset = 0
        for name, dtype, shape in tensors:
            if name in header:
                raise ValueError(f"{self.path}: tensor {name} listed twice")
            code = safetensors_dtype(dtype)
            shape = tuple(int(s) for s in shape)
            n = _ITEMSIZE[code]
            for s in shape:
                n *= s
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._plan.append((name, code, shape, n))
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self._next = 0
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor) -> None:
        """Write the next tensor; it must be the one listed next, with that shape (it is cast to that dtype).

        Raises:
            ValueError: a name out of order, a wrong shape, or more tensors than listed (internal errors).
        """
        import torch

        if self._next >= len(self._plan):
            raise ValueError(f"{self.path}: {name} is one tensor more than the {len(self._plan)} listed")
        want, code, shape, n = self._plan[self._next]
        if name != want:
            raise ValueError(f"{self.path}: got tensor {name}, expected {want} (tensors must come in listed order)")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name} has shape {list(tensor.shape)}, listed as {list(shape)}")
        if safetensors_dtype(tensor.dtype) != code:
            torch_dtype = next(getattr(torch, k) for k, v in SAFETENSORS_DTYPES.items() if v == code)
            tensor = tensor.to(torch_dtype)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == n, (name, data.nbytes, n)
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        """Finish the file (every listed tensor must have been written) and rename it into place."""
        import os

        if self._file.closed:
            return
        if self._next != len(self._plan):
            missing = self._plan[self._next][0]
            self.abort()
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._plan)} tensors ({missing} next)")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Stop and remove the partial file."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_config(model_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write `config.json` (sorted keys, indented) atomically: to a tmp name, then renamed."""
    return write_json(Path(model_dir) / "config.json", config, sort_keys=True)


def write_model(
    model_dir: str | Path,
    config: dict[str, Any],
    layout: list[tuple[str, Any, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Any]],
    *,
    metadata: dict[str, str] | None = None,
    generation_config: dict[str, Any] | None = None,
    tokenizer: Callable[[Path], Any] | None = None,
    chat_template: str | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write a Hugging Face model directory: `model.safetensors`, `config.json`, and optionally
    `generation_config.json`, the tokenizer files and `chat_template.jinja`.

    The weights stream through `SafetensorsWriter`: `layout` lists every tensor's (name, dtype, shape) in file
    order, and `tensors` yields (name, tensor) in that order, each cast to its listed dtype and written as it comes,
    so a caller computing tensors one by one (a merge) never holds a whole model.

    Args:
        metadata: the safetensors header's `__metadata__` (default {"format": "pt"}).
        generation_config: written when non-empty, before the tokenizer (which may add stop ids to it).
        tokenizer: called with the directory to write the tokenizer files (`Tokenizer.save_hf`, or a copy).
        chat_template: written last, replacing any template the tokenizer wrote.
        max_shard_bytes: past this many bytes of weights, shards `model-0000i-of-0000n.safetensors` (each at most
            this size unless one tensor is larger) listed in `model.safetensors.index.json`, as transformers writes.
    """
    model_dir = Path(model_dir)
    spec = specs.find(config.get("model_type"))
    if spec is not None and spec.hf_save_name is not None:  # the model's names -> the checkpoint's (Mixtral)
        rename = lambda name: spec.hf_save_name(name, config["model_type"])  # noqa: E731
        layout = [(rename(name), dtype, shape) for name, dtype, shape in layout]
        tensors = ((rename(name), tensor) for name, tensor in tensors)
    shards = _shards(layout, max_shard_bytes)
    files = [WEIGHTS_FILE] if len(shards) == 1 else [_shard_name(i, len(shards)) for i in range(len(shards))]
    tensors = iter(tensors)
    for file, shard in zip(files, shards):
        with SafetensorsWriter(model_dir / file, shard, metadata) as writer:
            for _ in shard:
                name, tensor = next(tensors)
                writer.write(name, tensor)
                del tensor  # gone before the next is made: a merge holds one weight per input, never two
    if len(shards) > 1:
        total = sum(_nbytes(dtype, shape) for _, dtype, shape in layout)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {name: file for file, shard in zip(files, shards) for name, _, _ in shard},
        }
        (model_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    save_config(model_dir, config)
    if generation_config:
        (model_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer(model_dir)
    if chat_template is not None:
        (model_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def _nbytes(dtype, shape: tuple[int, ...]) -> int:
    n = _ITEMSIZE[safetensors_dtype(dtype)]
    for d in shape:
        n *= int(d)
    return n


def _shards(layout: list, max_bytes: int | None) -> list[list]:
    """`layout` cut, in order, into shards of at most `max_bytes` (a bigger tensor gets a shard of its own)."""
    if not max_bytes:
        return [layout]
    shards, size = [[]], 0
    for entry in layout:
        n = _nbytes(entry[1], entry[2])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"
