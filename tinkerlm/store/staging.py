"""Putting a model into the store atomically: tmp directories, hashing copies, the space check, and `add`.

Every way into the store ends in `_stage`: it fills `ROOT/tmp/<pid>-pull-<random>/model/` (files hashed while
they are written, then `manifest.json`) and renames that directory to `ROOT/models/NAME/TAG` in one `os.rename`;
`tmp/` sits on the same filesystem so the rename is atomic. Any failure, Ctrl-C included, deletes the tmp
directory, so the store is either as before or holds the complete model. Tmp directories left by killed
processes are removed at the next pull. Pulls (`pulls`, `hub`) and models made here (`add`: fine-tunes,
adapters, merges) both go through it.

Also here: which files of a Hugging Face model a pull stores (`_hf_plan`, shared by local and Hub pulls).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from tinkerlm.errors import TinkerError
from tinkerlm.fileio import pid_alive
from tinkerlm.store.display import _source_text, format_size
from tinkerlm.store.manifest import (
    _CHUNK,
    MANIFEST,
    Manifest,
    _model_dir,
    _new_tmp_dir,
    _restore_aside,
    describe,
    find,
    home,
    parse_name,
    sha256_file,
)

_PROGRESS_MIN_BYTES = 4 << 20  # smaller files copy without a progress bar
_STALE_TMP_S = 24 * 3600  # tmp dirs this old are removed even if their pid looks alive (pid reuse)

# Files of a Hugging Face model directory that a pull copies besides config.json, weights and tokenizer.json.
HF_OPTIONAL_FILES = (
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _clean_stale_tmp() -> None:
    """Remove tmp dirs of pulls whose process is gone (killed with SIGKILL, power loss) or that are very old,
    after putting back any model a killed replacement had moved aside."""
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
            stale = not pid_alive(int(pid)) or age > _STALE_TMP_S
        else:
            stale = age > 3600
        if stale:
            _restore_aside(d)
            shutil.rmtree(d, ignore_errors=True)


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


def check_space(need: int, what: str = "this") -> None:
    """Refuse, before writing, a model of `need` bytes that the store's disk cannot hold.

    Raises:
        TinkerError: naming `what`, the size needed and the space free.
    """
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need > free:
        raise TinkerError(
            f"not enough disk space in {root} for {what}: need {format_size(need)}, {format_size(free)} free; "
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
    verification: dict | None = None,
    obligations: list[str] | None = None,
    licence_conflicts: list[str] | None = None,
    info: dict | None = None,
) -> Manifest:
    """Run `fill(model_dir)` in a fresh tmp dir, write the manifest, and move the result into the store.

    `fill` writes the model files and returns (files, extra source fields). `license` is used when the model's
    own metadata has none; `parents` default to the lineage a GGUF file carries (`tinkerlm.lineage`, written by
    `tinkerlm export`). `verification` is read after `fill` (which may fill it in). `info` replaces what
    `describe` reads from the files (for entries that are not models: a tokenizer). On any exception, Ctrl-C
    included, the tmp dir is removed.
    """
    _clean_stale_tmp()
    staging = _new_tmp_dir("pull")
    try:
        model_dir = staging / "model"
        model_dir.mkdir()
        files, extra = fill(model_dir)
        source = {**source, **extra}
        is_gguf = len(files) == 1 and files[0]["path"].endswith(".gguf")
        info = dict(info) if info is not None else describe(model_dir / files[0]["path"] if is_gguf else model_dir)
        info["license"] = info["license"] or license
        recorded = info.pop("parents")  # the lineage the file itself records (a GGUF written by `tinkerlm export`)
        parents = parents or recorded
        m = Manifest(
            name=name,
            tag=tag,
            **info,
            files=files,
            source=source,
            parents=list(parents or []),
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            verification=dict(verification or {}),
            obligations=list(obligations or []),
            licence_conflicts=list(licence_conflicts or []),
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
    """Move the staged model to `final`: the old copy (if any, replaced with force) is renamed aside into the
    staging dir, the new one renamed in, and the old deleted with the staging dir. Any exception between the
    renames (Ctrl-C included) puts the old copy back here; a kill there leaves it for `_recover_replacements`,
    which the next look at the store runs."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = staging / "old"
    if final.exists() or final.is_symlink():
        # A directory without a manifest is debris (e.g. emptied by hand), not a model: replace it.
        if not force and (final / MANIFEST).exists():
            raise FileExistsError(final)
        os.rename(final, old)
    try:
        os.rename(model_dir, final)
    except BaseException as e:
        if (old.exists() or old.is_symlink()) and not final.exists():
            os.rename(old, final)  # put the previous model back
        if isinstance(e, OSError) and final.exists():
            raise FileExistsError(final) from e
        raise


# ---------------------------------------------------------------------------------------------------------------
# Models made here (fine-tunes, adapters, merges) enter the store with their lineage


def add(
    name: str,
    fill: Callable[[Path], None],
    *,
    source: dict,
    parents: list[dict],
    license: str | None,
    force: bool = False,
    verification: dict | None = None,
    obligations: list[str] | None = None,
    licence_conflicts: list[str] | None = None,
    info: dict | None = None,
) -> Manifest:
    """Store a model made here (a fine-tune, an adapter, a merge) with its lineage, atomically.

    Args:
        name: store name `NAME[:TAG]` (tag defaults to `latest`).
        fill: writes the model files (an HF directory or a PEFT adapter) into the directory it is given, a tmp
            directory inside the store. Whatever it raises propagates and leaves nothing in the store.
        source: how it was made, e.g. {"type": "finetune", "recipe": {...}, "data": [...]}.
        parents: lineage records from `parent_entry`.
        license: the licence terms the model carries (inherited from its parents).
        force: replace a model already stored under `name`.
        obligations: what distributing it obliges, inherited from the parents' licences (`tinkerlm.openness`).
        licence_conflicts: the parents' licence conflicts accepted with --accept-licence-conflict.
        info: {"format", "architecture", "parameters", "quantization", "context_length", "license", "parents"} for
            an entry that is not a model (a tokenizer: format "tokenizer"), instead of describing its files.

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
            files.append(
                {"path": f.relative_to(model_dir).as_posix(), "size": f.stat().st_size, "sha256": sha256_file(f)}
            )
        if not files:
            raise TinkerError(f"{name}:{tag}: nothing was written; the model was not stored")
        return files, {}

    try:
        return _stage(
            name,
            tag,
            source,
            force,
            fill_and_hash,
            license=license,
            parents=parents,
            verification=verification,
            obligations=obligations,
            licence_conflicts=licence_conflicts,
            info=info,
        )
    except FileExistsError:
        raise TinkerError(f"{name}:{tag} was stored by another process meanwhile; pick another name or use --force")


# ---------------------------------------------------------------------------------------------------------------
# What a pull stores


def _target(name: str | None, default: str) -> tuple[str, str]:
    return parse_name(name if name is not None else default)


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
