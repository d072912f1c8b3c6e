"""The store's records: manifests, names and paths, finding/listing/removing models, digests and lineage.

Layout under the store root (`$TINKERLM_HOME`, default `~/.cache/tinkerlm`, read at call time):

    ROOT/models/NAME/TAG/manifest.json   what the model is and where it came from (see `Manifest`)
    ROOT/models/NAME/TAG/<files>         a single `.gguf` file, or a Hugging Face directory
                                         (config.json, *.safetensors, tokenizer.json, ...)
    ROOT/tmp/<pid>-<kind>-<random>/      in-progress pulls and removals (see `staging`)

Names are `NAME[:TAG]` (lowercase letters, digits, `.`, `-`, `_`); the tag defaults to `latest`, except for
catalogue names, which default to the catalogue's tag (`smollm2` means `smollm2:135m-instruct-q4_1`).

A model's digest is one sha256 over its files (`files_digest`); remixes made here name their parents by store
name and digest (`parent_entry`), so a merge or fine-tune records exactly what it was made from.
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tinkerlm.errors import TinkerError
from tinkerlm.fileio import pid_alive, write_json
from tinkerlm.formats import describe as formats_describe
from tinkerlm.store.catalogue import CATALOGUE

log = logging.getLogger(__name__)

DEFAULT_TAG = "latest"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_CHUNK = 1 << 20


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
    # How the model compares with its source, where it was written from one (quantize): KL divergence, top-1, PPL.
    verification: dict = field(default_factory=dict)
    # Benchmark scores (`tinkerlm eval`): task -> {"metrics", "main", "higher_is_better", "n", "shots", "limit",
    # "chat", "seed", "quant", "created", "tinkerlm"}; the latest run of each task.
    evaluations: dict = field(default_factory=dict)
    # What distributing a model made here obliges, inherited from its parents' licences, one line each
    # ("apache-2.0: keep the copyright ..."; `tinkerlm.openness.licences.inherit`), and the licence conflicts its
    # maker accepted with --accept-licence-conflict (`tinkerlm.openness.licences.conflicts`).
    obligations: list[str] = field(default_factory=list)
    licence_conflicts: list[str] = field(default_factory=list)

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
            verification=dict(d.get("verification") or {}),
            evaluations=_dict_of_dicts(d.get("evaluations")),
            # Merges stored before `obligations` existed kept them in source["license_terms"].
            obligations=_strings(d.get("obligations", (d.get("source") or {}).get("license_terms"))),
            licence_conflicts=_strings(d.get("licence_conflicts")),
        )


def _strings(value) -> list[str]:
    """A manifest's list-of-strings field as stored; anything else (missing, a hand edit) reads as empty."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _dict_of_dicts(value) -> dict:
    """A manifest's dict-of-dicts field as stored, dropping entries a hand edit broke (so `list` still works)."""
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, dict)}


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


def _new_tmp_dir(kind: str) -> Path:
    """A fresh directory under ROOT/tmp/, named after this process so a later pull can tell when it is stale."""
    d = home() / "tmp" / f"{os.getpid()}-{kind}-{secrets.token_hex(4)}"
    d.mkdir(parents=True)
    return d


# ---------------------------------------------------------------------------------------------------------------
# Reading the store


def _read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TinkerError(f"{path}: unreadable manifest ({e}); remove the model with `tinkerlm rm` and pull it again")


def _recover_replacements() -> None:
    """Put back a model whose replacement (`pull --force`, `merge --force`, ...) was killed halfway.

    A replacement renames the stored directory aside into its tmp dir (`tmp/PID-.../old`), renames the new one in,
    then deletes the tmp dir. A process killed between the two renames leaves `old` there and nothing in place: the
    next look at the store (by any process) renames it back, so the old copy survives a kill at any point.
    """
    tmp = home() / "tmp"
    try:
        entries = list(tmp.iterdir())
    except OSError:
        return
    for d in entries:
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            _restore_aside(d)


def _restore_aside(d: Path) -> None:
    """Rename `d/old` (a model a replacement moved aside) back to its place in the store if that place is empty."""
    old = d / "old"
    if not (old / MANIFEST).is_file():
        return
    try:
        m = _read_manifest(old / MANIFEST)
        final = _model_dir(*parse_name(f"{m.name}:{m.tag}"))
        if not final.exists() and not final.is_symlink():
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(old, final)
            log.warning("%s: restored after an interrupted replacement", m.ref)
    except (OSError, TinkerError) as e:
        log.warning("%s: could not restore an interrupted replacement (%s)", old, e)


def find(name: str) -> Manifest | None:
    """The stored model called `name` (`NAME[:TAG]`), or pulled from `name` if it is an `hf:` source; else None."""
    if name.startswith("hf:"):
        return next((m for m in list_models() if m.source.get("uri") == name), None)
    base, tag = parse_name(name)
    path = _model_dir(base, tag) / MANIFEST
    if not path.is_file():
        _recover_replacements()
    return _read_manifest(path) if path.is_file() else None


def list_models() -> list[Manifest]:
    """Every stored model, sorted by `name:tag`. Unreadable manifests are logged and skipped."""
    _recover_replacements()
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


def training_data(m: Manifest) -> list[Path]:
    """What training `m` left in the store for it alone, which `rm` removes with it: the run directory
    (`runs/NAME/TAG`: checkpoints with optimizer moments, loss.csv) and, for a pretrained model, its token shards
    (`shards/KEY`) when no other stored model was trained on them. Shards are a cache keyed by the data and the
    tokenizer, shared by every run on them (and remade when missing); shards in a `shards_dir` of the user's own
    are theirs and stay, as nanoGPT's and LitGPT's prepared data stays when a checkpoint is deleted."""
    found = []
    run = home() / "runs" / m.name / m.tag
    if run.is_dir() and not run.is_symlink():
        found.append(run)
    key = _store_shards(m)
    if key and not any(o.ref != m.ref and _store_shards(o) == key for o in list_models()):
        d = home() / "shards" / key
        if d.is_dir() and not d.is_symlink():
            found.append(d)
    return found


def _store_shards(m: Manifest) -> str | None:
    """The key of the token shards (`STORE/shards/KEY`) a pretrained model was trained on; None for any other
    model, or shards kept in a `shards_dir` of the user's."""
    src = m.source if isinstance(m.source, dict) else {}
    recipe, shards = src.get("recipe"), src.get("shards")
    if src.get("type") != "pretrain" or not isinstance(shards, dict):
        return None
    if not isinstance(recipe, dict) or recipe.get("shards_dir"):  # (a manifest of unknown make: leave the shards)
        return None
    key = shards.get("key")
    return key if isinstance(key, str) and re.fullmatch(r"[0-9a-f]{8,64}", key) else None


def rm(name: str) -> Manifest:
    """Remove a stored model and return its manifest, with what training it left for it alone (`training_data`)
    and, for a GGUF model, its packed-weight cache (`tinkerlm.pack_cache`). The directory is renamed into tmp/
    first, then deleted.

    Symbolic links are never followed: a model directory (`models/NAME/TAG`) that is a link is unlinked, its target
    untouched; a `models/NAME` link is unlinked when the model is its only tag, and refused otherwise (deleting
    through it would delete inside the target).

    Raises:
        TinkerError: not in the store (the message lists close matches), or reached through a shared link.
    """
    m = get(name)
    leftovers = training_data(m)
    d = _model_dir(m.name, m.tag)
    if m.format == "gguf":  # its packed weights, kept apart by `tinkerlm.pack_cache`
        from tinkerlm import pack_cache

        try:
            pack_cache.remove(model_path(m))
        except TinkerError:  # a manifest without its one .gguf: no cache was made for it
            pass
    if d.parent.is_symlink():
        tags = [p.name for p in d.parent.iterdir()]
        if tags != [d.name]:
            raise TinkerError(
                f"{d.parent} is a symbolic link to {os.readlink(d.parent)} holding tags {', '.join(sorted(tags))}; "
                f"tinkerlm does not delete through links: remove the link yourself"
            )
        d.parent.unlink()
    else:
        if d.is_symlink():
            d.unlink()
        else:
            _delete(d)
        try:
            d.parent.rmdir()  # the NAME directory, once its last tag is gone
        except OSError:
            pass
    for extra in leftovers:
        _delete(extra)
        try:
            extra.parent.rmdir()  # runs/NAME, once its last tag's run is gone
        except OSError:
            pass
    return m


def _delete(d: Path) -> None:
    """Rename `d` into tmp/, then delete it (a kill midway leaves no half-deleted directory in place)."""
    trash = _new_tmp_dir("rm")
    os.rename(d, trash / "gone")
    shutil.rmtree(trash, ignore_errors=True)  # (rmtree unlinks links inside, never following them)


def describe(path: Path) -> dict:
    """What a GGUF file, Hugging Face directory or LoRA adapter directory holds, from its metadata
    (`tinkerlm.formats.describe.describe`); an adapter's base model named by store name is looked up here.

    Raises:
        TinkerError: not a GGUF file or Hugging Face directory, or its metadata is unreadable.
    """
    return formats_describe.describe(path, find_base=_base_info)


def _base_info(ref: str) -> dict | None:
    """Architecture and context length of the stored model `ref`, for describing an adapter made on it."""
    try:
        m = find(ref)
    except TinkerError:  # a hub id or other name the store does not know
        return None
    return {"architecture": m.architecture, "context_length": m.context_length} if m else None


# ---------------------------------------------------------------------------------------------------------------
# Digests and lineage: one sha256 per model, and the parent records of remixes (fine-tunes, adapters, merges)


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


# ---------------------------------------------------------------------------------------------------------------
# Updating a stored model's record (scores, verification figures): locked read-modify-write, atomic rename


@contextmanager
def _locked(name: str, tag: str):
    """An exclusive lock on one model's manifest across processes (`ROOT/locks/NAME@TAG.lock`, flock); no-op where
    flock does not exist. Two `tinkerlm eval` runs on one model then both keep their scores."""
    try:
        import fcntl
    except ImportError:  # Windows: writes stay atomic, concurrent updates may lose one
        yield
        return
    locks = home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}@{tag}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update(name: str, *, expect_sha256: str | None = None, **changes) -> Manifest:
    """Change fields of a stored model's manifest, under a lock, written atomically.

    A dict field (`evaluations`, `verification`) is merged one level deep: the keys given replace those stored, the
    others stay (`update("smollm2", evaluations={"arc_easy": {...}})` keeps the other tasks' scores). Other fields
    are replaced.

    Args:
        expect_sha256: the model's digest when the caller read it; if its files changed since (replaced with
            `pull --force`), nothing is written.
    Returns:
        The manifest as written.
    Raises:
        TinkerError: not in the store, or its digest is not `expect_sha256`.
        ValueError: a field name that `Manifest` does not have (a bug in the caller).
    """
    known = {f.name for f in fields(Manifest)} - {"name", "tag", "files"}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"manifest fields {unknown} cannot be updated (known: {sorted(known)})")
    first = get(name)
    base, tag = first.name, first.tag
    with _locked(base, tag):
        m = get(f"{base}:{tag}")
        if expect_sha256 is not None and digest(m) != expect_sha256:
            raise TinkerError(f"{m.ref}: its files changed since it was read (replaced?); run the command again")
        d = m.to_json()
        for key, value in changes.items():
            d[key] = {**d[key], **value} if isinstance(d.get(key), dict) and isinstance(value, dict) else value
        new = Manifest.from_json(d)
        write_json(_model_dir(base, tag) / MANIFEST, new.to_json())
    return new
