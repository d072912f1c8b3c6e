"""Importance matrices as llama.cpp's `llama-imatrix` makes them, for quantizing with less error where it matters.

For a weight W (out x K) applied as y = x @ W.T, the error that rounding column k of W adds to y grows with the
size of the inputs x_k that column meets. The importance matrix (really a vector per weight) is, over a calibration
text, the sum of x_k^2 for each input column k and the number of input rows (tokens) seen; the quantizer weighs
its rounding error per column by sum / count (the mean squared activation) and spends precision where inputs are
large. `compute` collects this with forward pre-hooks on every module that multiplies by a weight matrix
(nn.Linear, tinkerlm's QLinear), names each entry by its GGUF tensor name (the architecture's spec) and records a
tied output head under the embedding's name, the tensor llama.cpp multiplies by there.

Files, both read by `load`, the first written by `Imatrix.save`:
- GGUF (llama.cpp's current format): metadata `general.type` = "imatrix", `imatrix.datasets` (array of strings),
  `imatrix.chunk_count` and `imatrix.chunk_size` (u32; llama-quantize refuses a GGUF imatrix without all three),
  and per weight two F32 tensors: `<name>.in_sum2` (the K raw sums; ne = [K, n_mat] for n_mat experts) and
  `<name>.counts` (ne = [1, n_mat], the rows seen, stored as floats).
- Legacy binary `.dat`, little-endian: int32 n_entries; per entry int32 name length, the name bytes, int32 ncall,
  int32 nval, nval float32 values = (sum / count) * ncall; then optionally int32 chunk count, int32 length and the
  dataset name. The quantizer divides the values by ncall, so ncall plays the part of the count.

Files are untrusted: counts and lengths are checked against the file's size and `tinkerlm.limits` before anything
is allocated, and the values must be finite and non-negative. No pickle is involved anywhere.

Reference: llama.cpp tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp, tools/quantize/quantize.cpp.
"""

from __future__ import annotations

import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.formats import specs
from tinkerlm.quant.linear import QEmbedding, QLinear

GGML_MAX_NAME = 64  # ggml's tensor name buffer, NUL included: llama.cpp cannot read a longer name
MAX_COUNT = 1 << 53  # a count stored as float32/int32 is exact far below this; anything above is corrupt


@dataclass
class Imatrix:
    """Per weight (GGUF name): the sum of squared inputs per input column (float32, (K,)) and the rows counted."""

    entries: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    chunk_count: int = 0  # chunks of `chunk_size` tokens the sums were collected over
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)  # what the calibration text was (names, not contents)

    def weights(self, name: str) -> np.ndarray | None:
        """The per-column importance the quantizer takes for tensor `name` (sums / count), or None without an
        entry. An entry that saw no rows gives ones (no preference), as llama-quantize does."""
        if name not in self.entries:
            return None
        sums, count = self.entries[name]
        if count <= 0:
            return np.ones_like(sums, dtype=np.float32)
        return (sums / np.float32(count)).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        """Write llama.cpp's GGUF imatrix format (see the module docstring); entries in name order.

        Raises:
            TinkerError: a name too long for llama.cpp, or no entries.
        """
        path = Path(path)
        if not self.entries:
            raise TinkerError(f"{path}: the importance matrix has no entries (nothing was computed)")
        from tinkerlm.formats.gguf_write import TensorPlan, Typed, write_gguf

        tensors = []
        for name in sorted(self.entries):
            sums, count = self.entries[name]
            if len(name) + len(".in_sum2") >= GGML_MAX_NAME:
                raise TinkerError(f"{path}: tensor name {name!r} is too long for llama.cpp's imatrix format")
            sums = np.ascontiguousarray(sums, dtype=np.float32).reshape(-1)
            counts = np.array([count], dtype=np.float32)
            tensors.append(TensorPlan(f"{name}.in_sum2", "F32", sums.shape, lambda v=sums: v))
            tensors.append(TensorPlan(f"{name}.counts", "F32", counts.shape, lambda v=counts: v))
        metadata = {
            "general.type": "imatrix",
            "imatrix.datasets": list(self.datasets),
            "imatrix.chunk_count": Typed(self.chunk_count, "UINT32"),
            "imatrix.chunk_size": Typed(self.chunk_size, "UINT32"),
        }
        return write_gguf(path, metadata, tensors)  # atomic: a temp file renamed into place


# ----------------------------------------------------------------------------------------------------------------
# Computing


@torch.inference_mode()
def compute(model: nn.Module, text_ids: list[int], *, context: int = 512, progress: bool = True) -> Imatrix:
    """Collect an importance matrix by running `model` over `text_ids` in chunks of `context` tokens.

    Args:
        model: a tinkerlm CausalLM (float or quantized); its `config.model_type` names the spec for GGUF names.
        text_ids: the calibration text's token ids; the last chunk may be shorter.
        context: tokens per chunk (capped at the model's context).
        progress: show a progress bar over the chunks.
    Raises:
        TinkerError: no ids, a context below 1, an unsupported architecture, or no weight mapped to a GGUF name.
    """
    if not text_ids:
        raise TinkerError("imatrix: the calibration text has no tokens")
    limit = getattr(model, "max_context", None)
    context = min(context, limit) if limit else context
    if context < 1:
        raise TinkerError(f"imatrix: context must be at least 1 token (got {context})")
    spec = specs.for_model_type(getattr(model.config, "model_type", None))
    names = _gguf_names(model, spec)
    if not names:
        raise TinkerError("imatrix: no weight of the model has a GGUF name (is this a tinkerlm CausalLM?)")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names.values(), 0)

    def hook(name: str):
        def accumulate(module, args) -> None:
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).float()  # (rows, K)
            # float64 sums: float32 loses the small terms once a sum of a million squares is large.
            acc = flat.square().sum(0, dtype=torch.float64)
            sums[name] = acc if name not in sums else sums[name] + acc
            counts[name] += flat.shape[0]

        return accumulate

    ids = torch.as_tensor(list(text_ids), dtype=torch.long)
    starts = range(0, len(ids), context)
    handles = [module.register_forward_pre_hook(hook(names[m])) for m, module in model.named_modules() if m in names]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="imatrix", unit="chunk")
    try:
        with _unfused(model):
            for start in starts:
                model(ids[None, start : start + context])
                if bar is not None:
                    bar.update(1)
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    entries = {n: (sums[n].float().numpy(), counts[n]) for n in sorted(sums)}
    return Imatrix(entries, chunk_count=len(starts), chunk_size=context)


def _gguf_names(model: nn.Module, spec) -> dict[str, str]:
    """Module name -> GGUF weight name of every weight-multiplying module the spec maps. A head tied to the
    embedding is named as the embedding: a GGUF file of a tied model holds token_embd.weight only."""
    embeddings = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, QEmbedding)):
            embeddings[_storage(module)] = name
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, QLinear)):
            continue
        base = name.removesuffix(".base")  # a LoRA-wrapped layer: its frozen base is the GGUF weight
        owner = embeddings.get(_storage(module), base)
        gguf = spec.gguf_name(f"{owner}.weight")
        if gguf is not None:
            out[name] = gguf
    return out


def _storage(module: nn.Module) -> tuple[int, tuple[int, ...]]:
    """Where a module's weight starts, and its shape: equal for tied layers. (Not the storage: weights loaded
    from one memory-mapped file may be views of one storage at different offsets.)"""
    tensor = module.blocks if isinstance(module, (QLinear, QEmbedding)) else module.weight
    return tensor.data_ptr(), tuple(tensor.shape)


@contextmanager
def _unfused(model: nn.Module):
    """Run the separate q/k/v and gate/up modules (whose hooks collect), not the fused calls `quant.fuse` set."""
    saved = []
    for module in model.modules():
        for attr in ("fused_qkv", "fused_gate_up"):
            if module.__dict__.get(attr) is not None:
                saved.append((module, attr, module.__dict__[attr]))
                setattr(module, attr, None)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


# ----------------------------------------------------------------------------------------------------------------
# Reading


def load(path: str | Path) -> Imatrix:
    """Read an importance matrix in llama.cpp's GGUF format or its legacy `.dat` format.

    Raises:
        TinkerError: a missing, truncated, malformed or hostile file (the message names it), per-expert (MoE)
            entries, or non-finite or negative values.
    """
    path = Path(path)
    if not path.is_file():
        raise TinkerError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)


def _load_gguf(path: Path) -> Imatrix:
    from tinkerlm.formats.gguf import read_gguf

    ckpt = read_gguf(path)  # bounds every count, string and tensor byte range against the file
    meta = ckpt.metadata
    kind = meta.get("general.type", "imatrix")
    if kind != "imatrix":
        raise TinkerError(f"{path}: a GGUF file of type {kind!r}, not an importance matrix (give an imatrix file)")
    pairs: dict[str, dict[str, tuple]] = {}
    for name, shape, ttype in ckpt.tensor_infos():
        for suffix in (".in_sum2", ".counts"):
            if name.endswith(suffix):
                pairs.setdefault(name.removesuffix(suffix), {})[suffix] = (name, shape, ttype)
    if not pairs:
        raise TinkerError(f"{path}: no importance matrix entries (no <tensor>.in_sum2 tensors; not an imatrix?)")
    entries = {}
    for weight in sorted(pairs):
        got = pairs[weight]
        if set(got) != {".in_sum2", ".counts"}:
            missing = ({".in_sum2", ".counts"} - set(got)).pop()
            raise TinkerError(f"{path}: entry {weight} has no {weight}{missing} tensor (file corrupt?)")
        for name, _, ttype in got.values():
            if ttype != "F32":
                raise TinkerError(f"{path}: tensor {name} has type {ttype}, expected F32 (file corrupt?)")
        counts = ckpt.tensor(got[".counts"][0]).reshape(-1).double().numpy()
        if counts.size != 1:
            raise TinkerError(
                f"{path}: entry {weight} has {counts.size} per-expert counts; mixture-of-experts importance "
                "matrices are not supported"
            )
        sums = ckpt.tensor(got[".in_sum2"][0]).reshape(-1).numpy().astype(np.float32)
        entries[weight] = (_checked_sums(path, weight, sums), _checked_count(path, weight, float(counts[0])))
    datasets = meta.get("imatrix.datasets", [])
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise TinkerError(f"{path}: metadata key imatrix.datasets is not an array of strings (file corrupt?)")
    return Imatrix(
        entries,
        chunk_count=_meta_int(path, meta, "imatrix.chunk_count"),
        chunk_size=_meta_int(path, meta, "imatrix.chunk_size"),
        datasets=datasets,
    )


def _meta_int(path: Path, meta: dict, key: str) -> int:
    value = meta.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TinkerError(f"{path}: metadata key {key} is {value!r:.40}, expected a non-negative integer")
    return value


def _checked_sums(path: Path, weight: str, sums: np.ndarray) -> np.ndarray:
    if not sums.size:
        raise TinkerError(f"{path}: entry {weight} has no values (file corrupt?)")
    if not np.isfinite(sums).all() or (sums < 0).any():
        raise TinkerError(f"{path}: entry {weight} has non-finite or negative sums of squares (file corrupt?)")
    return sums


def _checked_count(path: Path, weight: str, count: float) -> int:
    if not math.isfinite(count) or count < 0 or count > MAX_COUNT:
        raise TinkerError(f"{path}: entry {weight} has count {count!r}, outside 0..{MAX_COUNT} (file corrupt?)")
    return round(count)


class _Reader:
    """Bounded little-endian reads from the bytes of a legacy file; every failure names the file and the field."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise TinkerError(
                f"{self.path}: {what} runs past the end of the file (needs {n} bytes at byte {self.pos}; "
                "truncated or not an imatrix file?)"
            )
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _load_legacy(path: Path) -> Imatrix:
    r = _Reader(path, path.read_bytes())  # no bigger than the file: reading it allocates nothing it declares
    n = r.i32("the entry count")
    # Each entry takes at least 16 bytes (three int32s and one value) and a non-empty name.
    if not 1 <= n <= min(limits.MAX_TENSORS, r.left() // 17):
        raise TinkerError(
            f"{path}: declares {n} entries in {len(r.data)} bytes (not a GGUF or legacy .dat imatrix file?)"
        )
    entries = {}
    for i in range(n):
        length = r.i32(f"entry #{i}: the name length")
        if not 1 <= length <= min(r.left(), 1 << 12):
            raise TinkerError(f"{path}: entry #{i} has a name of {length} bytes (file corrupt?)")
        try:
            name = r.take(length, f"entry #{i}: the name").decode("utf-8")
        except UnicodeDecodeError:
            raise TinkerError(f"{path}: entry #{i}: the name is not valid UTF-8 (file corrupt?)") from None
        ncall = r.i32(f"entry {name}: the call count")
        nval = r.i32(f"entry {name}: the value count")
        if not 1 <= nval <= r.left() // 4:
            raise TinkerError(f"{path}: entry {name} declares {nval} values, {r.left()} bytes are left (corrupt?)")
        if name in entries:
            raise TinkerError(f"{path}: entry {name} appears twice (file corrupt?)")
        values = np.frombuffer(r.take(4 * nval, f"entry {name}: the values"), dtype="<f4").astype(np.float32)
        # The values are (sum / count) * ncall and the quantizer divides by ncall: ncall is the count. With
        # ncall <= 0 it takes the values as they are, which a count of 1 reproduces.
        entries[name] = (_checked_sums(path, name, values), max(ncall, 1))
    chunk_count, datasets = 0, []
    if r.left():  # the trailer: int32 chunk count, then optionally int32 length + dataset name
        chunk_count = max(r.i32("the chunk count"), 0)
        if r.left():
            length = r.i32("the dataset name length")
            if not 0 <= length <= r.left():
                raise TinkerError(f"{path}: the dataset name declares {length} bytes, {r.left()} are left (corrupt?)")
            datasets = [r.take(length, "the dataset name").decode("utf-8", errors="replace")] if length else []
        if r.left():
            raise TinkerError(f"{path}: {r.left()} unexpected bytes after the dataset name (file corrupt?)")
    return Imatrix(entries, chunk_count=chunk_count, chunk_size=0, datasets=datasets)
