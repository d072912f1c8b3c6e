"""The packed-weight cache: a GGUF's weights as the kernels hold them, saved on its first load, mapped on later ones.

Loading a quantized GGUF parses its header (vocabulary included), builds the tokenizer and repacks every quantized
tensor into the kernels' layout (`tinkerlm.quant.packed_state_dict`): about a second a GB. The first load writes
what that produced (the packed buffers, the float tensors, the HF config and the tokenizer) to one safetensors file
under `$TINKERLM_HOME/packed/`; later loads memory-map it and build tensors over the map without copying, so they
cost page-cache reads, and resident memory is the pages touched.

    cached = pack_cache.load(path)          # (config, state_dict, tokenizer), or None: load the GGUF instead
    pack_cache.save(path, config, state_dict, tokenizer)

A cache is used only if it matches, else it is rebuilt:
- the GGUF's identity: resolved path, size, mtime, ctime, inode and a sha256 of its first and last MiB (hashing all
  of it would cost what the cache saves; the store's sha256 of a pulled file is checked at the pull, not each load);
- the code that made it: a sha256 of tinkerlm's formats/, models/, quant/ and kernels/ sources and of this file, of
  the CPU's feature flags (the kernels are compiled for them), the kernels' instruction set and `tokenizers`'
  version. A change to the packed layouts, the GGUF reader or the name mapping therefore invalidates every cache,
  with no version to bump by hand (`FORMAT` versions only this file's container);
- its own bytes: the data must end exactly where the header says (a cut file fails) and every 32 MiB chunk must
  have the checksum recorded at writing (a corrupt one fails); packed tensors must have the byte size their shape
  implies. The checksum is the 64-bit XXH3 (`xxhash`, ~10 GB/s a core here) where that package is installed, else
  zlib's crc32 (~3 GB/s, a third of a 1B model's cached load); the cache names the one it was written with, and
  one whose checksum cannot be computed here is rebuilt. The chunks are checked in threads (both release the GIL)
  while the tensors are built, and all of them before `load` returns: no tensor of a corrupt cache is used.
  Writes go to a temporary file renamed into place, so a killed writer leaves no partial cache.
The tokenizer comes back unbuilt (`LazyBackend`): its JSON, checksummed with the rest, is parsed on first use, since
building a 128k-token BPE costs 0.2-0.35 s with the GIL held (half of a 1B model's cached load otherwise).
Store models are cached by default; `TINKERLM_PACK_CACHE=1` caches any GGUF, `=0` none. `tinkerlm rm` deletes a
stored model's cache (`remove`); every write first deletes the caches of GGUFs that are gone (`prune`). Not enough
disk space: the cache is skipped with a one-line warning. The file holds no pickle: tensors are raw bytes, the rest
JSON.

Format: safetensors (https://huggingface.co/docs/safetensors): 8-byte header length, a JSON header (tensor dtypes,
shapes, offsets and `__metadata__`), then the bytes; written here rather than by `safetensors.torch.save_file`,
which would first copy every tensor into a Python bytes object (a second copy of the model at the peak).

This module imports no torch at import time (the store's `rm` uses it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

from tinkerlm.fileio import atomic_path

log = logging.getLogger(__name__)

FORMAT = "2"  # this file's container; the packed layouts are covered by the source hash (`code_key`)
ENV = "TINKERLM_PACK_CACHE"  # "0" turns the cache off
SAMPLE = 1 << 20  # bytes hashed at each end of the GGUF for its identity
CHUNK = 32 << 20  # bytes per checksum of the data
ALIGN = 64  # data starts at a multiple of this (the first tensors are the packed ones)
MAX_HEADER = 100 << 20  # as safetensors' own reader allows
SPARE = 64 << 20  # free disk space left after writing
# JSON blobs stored as uint8 tensors, so the checksums cover them
TOKENIZER, BACKEND, CONFIG = "__tokenizer__", "__tokenizer_backend__", "__config__"
DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U8": "uint8", "I32": "int32", "I64": "int64"}
ROOT = Path(__file__).resolve().parent


class _Crc32:
    """zlib.crc32 with xxhash's incremental interface (`update`, `intdigest`)."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def intdigest(self) -> int:
        return self.value


def _hashes() -> dict:
    """Checksum name -> (function(bytes) -> int, incremental hasher class), the fastest first."""
    out = {}
    try:
        import xxhash

        out["xxh3_64"] = (xxhash.xxh3_64_intdigest, xxhash.xxh3_64)
    except ImportError:  # not a hard dependency: the slower crc32 does the same job
        pass
    out["crc32"] = (zlib.crc32, _Crc32)
    return out


HASHES = _hashes()


def enabled(gguf: Path) -> bool:
    """Whether `gguf` is cached: TINKERLM_PACK_CACHE=0 never, =1 always; unset, only a store model's file. A GGUF
    given by path is not copied into the cache unasked (it would double its disk use where nothing cleans it up,
    which a llama.cpp user does not expect); `tinkerlm rm` removes a store model's cache with it."""
    value = os.environ.get(ENV, "")
    if value in ("0", "1"):
        return value == "1"
    models = _home() / "models"
    given = Path(gguf).absolute()
    return given.is_relative_to(models) or given.resolve().is_relative_to(models.resolve())


def _home() -> Path:
    home = os.environ.get("TINKERLM_HOME")  # as `tinkerlm.store.home` (a layer above this one)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "tinkerlm"


def cache_path(gguf: Path) -> Path:
    """Where the cache of this GGUF lives: `$TINKERLM_HOME/packed/<file stem>-<sha256 of its resolved path>`."""
    resolved = Path(gguf).resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return _home() / "packed" / f"{resolved.stem[:80]}-{digest}.safetensors"


def remove(gguf: Path) -> None:
    """Delete the cache of this GGUF, if any (`tinkerlm rm`)."""
    cache_path(gguf).unlink(missing_ok=True)


def prune() -> list[Path]:
    """Delete the caches whose GGUF is gone (deleted, moved or renamed: a cache is named by its file's path, so
    nothing else would ever read or replace them); returns the paths deleted. `save` runs it before writing, so the
    cache directory holds at most one cache per GGUF that still exists. A cache that cannot be read is left alone
    (a load rebuilds it if it is its GGUF's)."""
    gone = []
    for path in sorted((_home() / "packed").glob("*.safetensors")):
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER:
                    continue
                meta = json.loads(f.read(n)).get("__metadata__", {})
            source = Path(json.loads(meta["identity"])["path"])
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            continue
        if not source.is_file() or cache_path(source) != path:
            path.unlink(missing_ok=True)
            gone.append(path)
            log.info("tinkerlm: removed %s, the packed cache of %s (no longer there)", path, source)
    return gone


@lru_cache(maxsize=1)
def code_key() -> str:
    """sha256 of the Python sources that decide what a load produces, and of the kernels' build key (their C++
    sources and this CPU's feature flags, as `tinkerlm.kernels` names its builds)."""
    from tinkerlm import kernels

    digest = hashlib.sha256(FORMAT.encode() + kernels._build_hash(()).encode())
    files = [ROOT / "loading.py", Path(__file__).resolve()]
    for package in ("formats", "models", "quant", "kernels"):
        files += sorted((ROOT / package).rglob("*.py"))
    for f in files:
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def identity(gguf: Path) -> dict:
    """What must match for a cache to be this GGUF's: path, size, times, inode, its ends' sha256, the code key."""
    import tokenizers

    from tinkerlm import kernels

    resolved = Path(gguf).resolve()
    st = resolved.stat()
    with open(resolved, "rb") as f:
        ends = f.read(SAMPLE)
        f.seek(max(0, st.st_size - SAMPLE))
        ends += f.read(SAMPLE)
    return {
        "format": FORMAT,
        "path": str(resolved),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,  # changes with any write, and cannot be set back (unlike mtime: `touch -d`)
        "inode": st.st_ino,
        "ends_sha256": hashlib.sha256(ends).hexdigest(),
        "code": code_key(),
        "isa": getattr(kernels.ops(), "isa", None),  # the layout is the same for every build; a guard all the same
        "tokenizers": tokenizers.__version__,  # the saved tokenizer is its JSON
    }


# -- reading ----------------------------------------------------------------------------------------------------


class Invalid(Exception):
    """The cache file is cut, corrupt or not this cache's format (it is then rebuilt)."""


def load(gguf: Path):
    """(config, state_dict, tokenizer) from the cache of `gguf`, tensors over a memory map of it; None when there
    is no valid cache for this file as it is now (missing, stale, cut or corrupt: the reason is logged)."""
    path = cache_path(gguf)
    if not enabled(gguf) or not path.is_file():
        return None
    try:
        meta, tensors, verify = _read(path, identity(gguf))
        if meta is None:
            return None
        restored = _restore(meta, tensors)  # while the checksums run
        verify()
        return restored
    except Exception as e:  # whatever makes a cache unreadable (cut, corrupt, an old format), it is rebuilt
        log.warning("tinkerlm: %s is unusable (%s); repacking and rewriting it", path, str(e).splitlines()[0][:200])
        return None


def _read(path: Path, want: dict):
    """(metadata, name -> tensor over the map, verify) of a safetensors file whose identity is `want`; `verify()`
    waits for the checksums of its bytes (computed meanwhile in threads) and raises `Invalid` on a mismatch.
    (None, {}, None) if the identity differs (a stale cache)."""
    import torch

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise Invalid(f"{size} bytes, shorter than a header")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise Invalid(f"header of {n} bytes in a file of {size}")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", {})
        if json.loads(meta.get("identity", "null")) != want:
            log.info("tinkerlm: %s is stale (the GGUF or tinkerlm changed); repacking", path)
            return None, {}, None
        # a private (copy-on-write) map: tensors over it are writable without writing the file
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start, end = 8 + n, 8 + n
    spans = []
    for name, info in header.items():
        begin, stop = (8 + n + int(o) for o in info["data_offsets"])
        dtype = getattr(torch, DTYPES[info["dtype"]])
        shape = [int(d) for d in info["shape"]]
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if not (8 + n <= begin <= stop <= size) or stop - begin != nbytes:
            raise Invalid(f"tensor {name}: offsets {info['data_offsets']} do not fit its shape or the file")
        spans.append((begin, stop, name, dtype, shape))
        end = max(end, stop)
    if end != size:  # a cut file (or bytes appended): the header says where the data ends
        raise Invalid(f"the data ends at byte {end} but the file has {size}")
    sums = json.loads(meta.get("checksums", "{}"))
    chunks = range(start, size, CHUNK)
    if sums.get("chunk") != CHUNK or len(sums.get("values", ())) != len(chunks):
        raise Invalid(
            f"checksums {sums.get('hash')} for chunks of {sums.get('chunk')} bytes, not {len(chunks)} of {CHUNK}"
        )
    if sums["hash"] not in HASHES:
        raise Invalid(f"written with {sums['hash']} checksums, which need a package not installed here")
    digest = HASHES[sums["hash"]][0]
    view = memoryview(mm)
    pool = ThreadPoolExecutor(max(1, torch.get_num_threads()))  # both hashes release the GIL: chunks in parallel
    pending = [pool.submit(digest, view[at : at + CHUNK]) for at in chunks]
    pool.shutdown(wait=False)

    def verify() -> None:
        got = [f.result() for f in pending]
        view.release()
        if got != sums["values"]:
            bad = next(i for i, (a, b) in enumerate(zip(got, sums["values"])) if a != b)
            raise Invalid(f"checksum mismatch in bytes {start + bad * CHUNK}.. (file corrupt)")

    tensors = {}
    for begin, stop, name, dtype, shape in spans:
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=stop - begin, offset=begin) if stop > begin else None
        tensors[name] = (flat.view(dtype) if flat is not None else torch.empty(0, dtype=dtype)).reshape(shape)
    return meta, tensors, verify


def _restore(meta: dict, tensors: dict):
    from tinkerlm.formats.tokenizer import Tokenizer
    from tinkerlm.quant import Packed

    config = json.loads(bytes(tensors.pop(CONFIG).numpy()))
    tok = json.loads(bytes(tensors.pop(TOKENIZER).numpy()))
    tokenizer = Tokenizer(
        LazyBackend(tensors.pop(BACKEND), tok["ids"], tok["vocab_size"]),
        bos_token=tok["bos_token"],
        eos_token=tok["eos_token"],
        unk_token=tok["unk_token"],
        pad_token=tok["pad_token"],
        extra_stop_ids=tok["stop_token_ids"],
        chat_template=tok["chat_template"],
        clean_up_spaces=tok["clean_up_spaces"],
    )
    packed = json.loads(meta["packed"])
    widths = _group_bytes()
    state_dict = {}
    for name, t in tensors.items():
        if name not in packed:
            state_dict[name] = t
            continue
        qtype, rows, K = packed[name]
        p = Packed(t, qtype, int(rows), int(K))
        # the kernels trust a packed tensor's size: it must be what its rows and K imply
        if t.dim() != 2 or t.shape[0] != -(-p.rows // 16) or t.shape[1] != p.K // 32 * widths[p.fmt]:
            raise Invalid(f"tensor {name}: {list(t.shape)} bytes do not fit {qtype} ({p.rows}, {p.K})")
        state_dict[name] = p
    return config, state_dict, tokenizer


class LazyBackend:
    """A `tokenizers.Tokenizer` built from its JSON (bytes of the mapped cache) on first use.

    Building a 128k-token BPE costs 0.2-0.35 s with the GIL held, a third of a 1B model's cached load, though a
    model is often loaded long before its first prompt (a server, a chat waiting for input) or never tokenizes
    (benchmarks fed ids). What `Tokenizer.__init__` asks (its special tokens' ids, the vocabulary size) is answered
    from the cache's record; anything else builds the backend once (thread-safe) and forwards to it. The bytes
    were checksummed with the rest before `load` returned.
    """

    def __init__(self, text, ids: dict[str, int | None], vocab_size: int):
        self._text, self._ids, self._vocab_size = text, ids, vocab_size
        self._built = None
        self._lock = threading.Lock()

    def built(self):
        """The real `tokenizers.Tokenizer` (built now if not yet)."""
        with self._lock:
            if self._built is None:
                import tokenizers

                self._built = tokenizers.Tokenizer.from_str(bytes(self._text.numpy()).decode())
                self._text = None
        return self._built

    def token_to_id(self, token: str) -> int | None:
        return self._ids[token] if token in self._ids else self.built().token_to_id(token)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._vocab_size if with_added_tokens else self.built().get_vocab_size(False)

    def __getattr__(self, name: str):  # everything else: the real one's
        if name.startswith("_"):  # own fields not set yet (copy, pickle): not the backend's
            raise AttributeError(name)
        value = getattr(self.built(), name)
        if callable(value):  # a bound method: kept, so later calls skip this lookup (a vocabulary-long loop)
            object.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:  # `backend.decoder = ...` sets the real one's
            setattr(self.built(), name, value)


@lru_cache(maxsize=1)
def _group_bytes() -> dict[int, int]:
    """Bytes per 32 columns of a 16-row group, per packed format, asked of the kernels (one tiny pack each)."""
    import torch

    from tinkerlm.quant import QTensor, qops
    from tinkerlm.quant.qtensor import BLOCK_BYTES, K_TYPES, PACKED_FORMATS

    out = {}
    for qtype, fmt in PACKED_FORMATS.items():
        K = 256 if qtype in K_TYPES else 32
        per_row = K_TYPES[qtype][1] if qtype in K_TYPES else BLOCK_BYTES[qtype]
        p = qops.pack(QTensor(torch.zeros(16, per_row, dtype=torch.uint8), qtype, K))
        out[fmt] = p.data.shape[1] // (K // 32)
    return out


# -- writing ----------------------------------------------------------------------------------------------------


def save(gguf: Path, config: dict, state_dict: dict, tokenizer) -> Path | None:
    """Write the cache of `gguf` (atomically: a temporary file renamed into place); returns its path, or None
    where it was skipped (turned off, a value it cannot hold, no disk space, an unwritable directory: logged)."""
    import torch

    from tinkerlm.quant import Packed

    if not enabled(gguf):
        return None
    path = cache_path(gguf)
    if json.loads(json.dumps(config)) != config:
        log.info("tinkerlm: config of %s does not survive JSON; not caching its packed weights", gguf)
        return None
    if tokenizer._gguf_source is None:  # only tokenizers read from the GGUF (the `tokenizer.*` keys) are cached
        return None
    tensors, packed = {}, {}
    for name, v in state_dict.items():
        if isinstance(v, Packed):
            tensors[name], packed[name] = v.data, (v.qtype, v.rows, v.K)
        elif isinstance(v, torch.Tensor) and str(v.dtype).removeprefix("torch.") in DTYPES.values():
            tensors[name] = v
        else:  # QTensor blocks (no kernels): those are views of the GGUF already, nothing to save
            return None
    order = sorted(tensors, key=lambda k: (k not in packed, k))  # packed first: aligned to ALIGN
    tensors = {k: tensors[k].contiguous() for k in order}
    tensors[CONFIG] = _blob(json.dumps(config))
    tensors[TOKENIZER] = _blob(json.dumps(_tokenizer_record(tokenizer)))
    tensors[BACKEND] = _blob(tokenizer.backend.to_str())
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        dtype = next(k for k, v in DTYPES.items() if getattr(torch, v) == t.dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {
        "identity": json.dumps(identity(gguf)),
        "packed": json.dumps(packed),
        "checksums": json.dumps(_checksums(tensors)),
    }
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prune()
        free = shutil.disk_usage(path.parent).free
        need = 8 + len(text) + offset
        if need + SPARE > free:
            log.warning(
                "tinkerlm: not caching packed weights of %s: needs %d MB, %d MB free in %s",
                Path(gguf).name,
                need >> 20,
                free >> 20,
                path.parent,
            )
            return None
        _write(path, text, tensors.values())
    except OSError as e:
        log.warning("tinkerlm: cannot write %s (%s); loads will repack", path, e)
        return None
    return path


def _blob(text: str):
    import torch

    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


def _tokenizer_record(tok) -> dict:
    special = [tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token]
    return {
        "ids": {t: tok.backend.token_to_id(t) for t in special if t is not None},
        "vocab_size": tok.vocab_size,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "unk_token": tok.unk_token,
        "pad_token": tok.pad_token,
        "stop_token_ids": tok.stop_token_ids,
        "chat_template": tok.chat_template,
        "clean_up_spaces": tok._clean_up_spaces,
    }


def _bytes(t) -> memoryview:
    """The bytes of a contiguous tensor, without a copy."""
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _checksums(tensors: dict) -> dict:
    """{"hash", "chunk", "values"}: the checksum of each CHUNK of the data as it will lie in the file (chunks may
    straddle tensors), with the fastest hash installed."""
    name, (_, hasher) = next(iter(HASHES.items()))
    values, h, filled = [], hasher(), 0
    for t in tensors.values():
        view = _bytes(t)
        at = 0
        while at < len(view):
            take = min(CHUNK - filled, len(view) - at)
            h.update(view[at : at + take])
            at, filled = at + take, filled + take
            if filled == CHUNK:
                values.append(h.intdigest())
                h, filled = hasher(), 0
    if filled:
        values.append(h.intdigest())
    return {"hash": name, "chunk": CHUNK, "values": values}


def _write(path: Path, header: bytes, tensors) -> None:
    """header + tensors to a temporary file beside `path`, then renamed to `path` (a killed writer's temporary file
    is removed by the next write)."""
    # no fsync: a cache the OS lost part of (a power cut) fails its checks at the next load and is rebuilt
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for t in tensors:
            f.write(_bytes(t))
