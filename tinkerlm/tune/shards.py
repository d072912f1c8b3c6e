"""Pretraining data: text sources -> token shards on disk, tokenized once, memory-mapped for training.

    sources = expand(["stdlib/json/*.py", "notes/", {"path": "book.txt", "license": "CC0-1.0"}])
    shards = prepare(sources, tokenizer, store.home() / "shards")   # reused when nothing changed
    rows = TokenRows(shards, seq_len=256)                           # the trainer's data

A source entry is a file, a directory (every UTF-8 file under it, hidden and cache directories skipped), a glob
(`**` recursive), or `stdlib[/GLOB]`: the Python standard library's own source (`sysconfig`'s stdlib directory,
*.py outside site-packages, and for plain `stdlib` outside the test suites; PSF-2.0), real text that ships with
every Python. Entries may be mappings with
`path`, `license` (SPDX) and `provenance`, recorded with every file's sha256.

Each document is its tokens plus the tokenizer's end-of-text token; documents are concatenated into one stream
and cut into shards of consecutive sources (`SHARD_BYTES` of text each): `shard-NNNNN.bin`, raw uint16 (vocabularies
up to 65,536) or uint32 little-endian, as nanoGPT and Megatron store them, with `shard-NNNNN.json` beside it.
A shard is written to a temporary name and renamed, then its JSON; a run that stops keeps the shards it finished
and the next run skips them. `index.json` (written last) lists every source with its sha256, tokens, licence and
provenance. The directory is named by a key over the sources' sha256s, the tokenizer's sha256 and the format, so
the same data and tokenizer reuse it and any change makes a new one.

Training rows are `seq_len` consecutive tokens of the stream (documents run into each other, separated by the
end-of-text token, as GPT-2 and nanoGPT train).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinkerlm.errors import TinkerError
from tinkerlm.fileio import atomic_path, write_json

FORMAT = "tinkerlm-shards/1"
SHARD_BYTES = 8 << 20  # source bytes per shard
INDEX = "index.json"
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules", ".git"}
STDLIB_LICENSE = "PSF-2.0"
STDLIB_TESTS = {"test", "tests", "idle_test"}


@dataclass
class Source:
    path: Path
    sha256: str
    bytes: int
    license: str | None = None
    provenance: str | None = None

    def record(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "bytes": self.bytes,
            "license": self.license,
            "provenance": self.provenance,
        }


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _walk(d: Path, pattern: str = "**/*") -> list[Path]:
    found = []
    for p in d.glob(pattern):
        rel = p.relative_to(d).parts
        if p.is_file() and not any(part in SKIP_DIRS or part.startswith(".") for part in rel):
            found.append(p)
    return sorted(found)


def expand(entries: list, license: str | None = None, provenance: str | None = None) -> list[Source]:
    """The files `entries` name, in order (each entry's files sorted), each read once for its sha256.

    Args:
        license, provenance: recorded for files whose entry gives none.
    Raises:
        TinkerError: an entry that names nothing, a named file that is not UTF-8 text, a malformed entry.
    """
    out: dict[Path, Source] = {}
    for entry in entries:
        lic, prov = license, provenance
        if isinstance(entry, dict):
            unknown = sorted(set(entry) - {"path", "license", "provenance"})
            if unknown or not isinstance(entry.get("path"), str):
                raise TinkerError(f"data: {entry!r:.80}: expected a path, or a mapping of path, license, provenance")
            lic, prov = entry.get("license", lic), entry.get("provenance", prov)
            entry = entry["path"]
        if not isinstance(entry, str) or not entry or "\0" in entry:
            raise TinkerError(f"data: {entry!r:.80}: expected a file, directory or glob")
        explicit = False
        if entry == "stdlib" or entry.startswith("stdlib/"):
            root = stdlib_dir()
            files = [f for f in _walk(root, entry[len("stdlib/") :] or "**/*.py") if f.suffix == ".py"]
            if entry == "stdlib":  # the library itself, not its test suites (most of the bytes, much of it data)
                files = [f for f in files if not STDLIB_TESTS & set(f.relative_to(root).parts)]
            lic = lic or STDLIB_LICENSE
            prov = prov or (
                f"Python {sys.version.split()[0]} standard library source ({root}), "
                "https://docs.python.org/3/license.html"
            )
        elif _is_glob(entry):
            files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(entry), recursive=True))
            files = [f for f in files if f.is_file()]
        else:
            p = Path(entry).expanduser()
            if p.is_dir():
                files = _walk(p)
            elif p.is_file():
                files, explicit = [p], True
            else:
                raise TinkerError(f"data: {entry}: no such file or directory")
        if not files:
            raise TinkerError(f"data: {entry}: matches no files")
        for f in files:
            key = f.resolve()
            if key in out:
                continue
            raw = f.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                if explicit:
                    raise TinkerError(f"data: {f}: is not UTF-8 text") from None
                continue  # a binary file inside a directory or glob: not text, not data
            out[key] = Source(key, hashlib.sha256(raw).hexdigest(), len(raw), lic, prov)
    return list(out.values())


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of what decides the ids: the tokenizer's serialised pipeline and the end-of-text id."""
    text = tokenizer.backend.to_str() + f"\n{doc_end(tokenizer)}"
    return hashlib.sha256(text.encode()).hexdigest()


def doc_end(tokenizer) -> int:
    """The token closing every document: EOS, else BOS (it then opens the next)."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if end is None:
        raise TinkerError("tokenizer: has neither an EOS nor a BOS token to separate documents")
    return end


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def groups(sources: list[Source]) -> list[list[int]]:
    """Consecutive sources cut into shards of about SHARD_BYTES of text (a larger file is a shard of its own)."""
    out: list[list[int]] = [[]]
    size = 0
    for i, s in enumerate(sources):
        if out[-1] and size + s.bytes > SHARD_BYTES:
            out.append([])
            size = 0
        out[-1].append(i)
        size += s.bytes
    return out


def key(sources: list[Source], tokenizer) -> str:
    payload = [FORMAT, SHARD_BYTES, tokenizer_sha256(tokenizer), [s.sha256 for s in sources]]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:24]


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@dataclass
class Shards:
    dir: Path
    index: dict
    reused: bool

    @property
    def tokens(self) -> int:
        return self.index["tokens"]


def prepare(sources: list[Source], tokenizer, root: Path, progress: bool = True) -> Shards:
    """Tokenize `sources` into shards under `root/KEY/`, or reuse the ones already there.

    Raises:
        TinkerError: no text in the sources, or too little free disk for the shards (checked before writing).
    """
    if not sources or sum(s.bytes for s in sources) == 0:
        raise TinkerError(f"data: {len(sources)} files and no text in them; give files with text to train on")
    d = Path(root) / key(sources, tokenizer)
    if (d / INDEX).is_file():
        return Shards(d, json.loads((d / INDEX).read_text()), reused=True)
    dtype = dtype_for(tokenizer.vocab_size)
    # A byte-level tokenizer makes at most one token per byte, plus each document's end token.
    need = (sum(s.bytes for s in sources) + len(sources)) * dtype.itemsize
    free = shutil.disk_usage(_existing(Path(root))).free
    if need > free:
        raise TinkerError(
            f"{root}: the token shards need up to {need / 1e6:,.1f} MB and {free / 1e6:,.1f} MB are free; free some "
            "space or set shards_dir to a larger disk"
        )
    from tqdm.auto import tqdm

    d.mkdir(parents=True, exist_ok=True)
    end = doc_end(tokenizer)
    parts = groups(sources)
    records = [s.record() for s in sources]
    shard_list = []
    bar = tqdm(total=sum(s.bytes for s in sources), unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    try:
        for n, members in enumerate(parts):
            name = f"shard-{n:05d}"
            meta_file = d / f"{name}.json"
            if meta_file.is_file():  # finished by an earlier run
                meta = json.loads(meta_file.read_text())
                if (d / f"{name}.bin").stat().st_size == meta["tokens"] * dtype.itemsize:
                    for i, t in zip(members, meta["source_tokens"]):
                        records[i].update(shard=n, tokens=t)
                    shard_list.append({"file": f"{name}.bin", "tokens": meta["tokens"]})
                    bar.update(sum(sources[i].bytes for i in members))
                    continue
            counts = []
            with atomic_path(d / f"{name}.bin") as tmp, open(tmp, "wb") as f:
                for a in range(0, len(members), 64):  # a batch of files at a time: the tokenizer runs them in parallel
                    batch = members[a : a + 64]
                    texts = [sources[i].path.read_bytes().decode("utf-8") for i in batch]
                    for i, ids in zip(batch, tokenizer.encode_batch(texts, add_special_tokens=False)):
                        arr = np.asarray([*ids, end], dtype=dtype)
                        f.write(arr.tobytes())
                        counts.append(len(arr))
                        records[i].update(shard=n, tokens=len(arr))
                        bar.update(sources[i].bytes)
                f.flush()
                os.fsync(f.fileno())
            meta = {"tokens": sum(counts), "source_tokens": counts}
            write_json(meta_file, meta, indent=1)
            shard_list.append({"file": f"{name}.bin", "tokens": meta["tokens"]})
    finally:
        bar.close()
    index = {
        "format": FORMAT,
        "key": d.name,
        "dtype": dtype.name,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "doc_end": end,
        "tokens": sum(s["tokens"] for s in shard_list),
        "shards": shard_list,
        "sources": records,
    }
    write_json(d / INDEX, index, indent=1)
    return Shards(d, index, reused=False)


class TokenRows:
    """Rows of `seq_len` consecutive tokens of the shards' stream, the trainer's data (`tinkerlm.tune.trainer`).

    `rows` picks which rows of the stream these are (the training or the held-out ones); row i of this object is
    stream row `rows[i]`. Read from memory-mapped shards on demand, so the data never has to fit in memory.
    """

    def __init__(self, shards: Shards, seq_len: int, rows: np.ndarray | None = None):
        dtype = np.dtype(shards.index["dtype"])
        self.maps = [
            np.memmap(shards.dir / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
            for s in shards.index["shards"]
        ]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])  # stream offset of each shard
        self.seq_len = seq_len
        self.n_stream_rows = int(self.starts[-1]) // seq_len
        self.rows = np.arange(self.n_stream_rows) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, rows: np.ndarray) -> TokenRows:
        """The same shards, other stream rows."""
        out = object.__new__(TokenRows)
        out.__dict__.update(self.__dict__)
        out.rows = np.asarray(rows, dtype=np.int64)
        return out

    def _tokens(self, start: int, n: int) -> np.ndarray:
        pieces = []
        while n:
            s = int(np.searchsorted(self.starts, start, side="right")) - 1
            off = start - int(self.starts[s])
            piece = self.maps[s][off : off + n]
            pieces.append(piece)
            start, n = start + len(piece), n - len(piece)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        """(ids (B, T), None, None): plain causal rows, every token after the first carrying loss."""
        rows = [self._tokens(int(self.rows[int(i)]) * self.seq_len, self.seq_len) for i in idx]
        return torch.from_numpy(np.stack(rows).astype(np.int64)), None, None

    def count_targets(self, idx: torch.Tensor) -> int:
        return len(idx) * (self.seq_len - 1)
