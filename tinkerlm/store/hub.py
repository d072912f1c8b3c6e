"""Pulls from the Hugging Face Hub: `hf:ORG/REPO[/FILE.gguf][@REVISION]`, with resumable, hashed downloads.

A pull reads the repo's file list at one revision (`HfApi.model_info`), picks what to store (a single GGUF, or
a Hugging Face model's config, tokenizer and safetensors weights: `staging._hf_plan`), and streams each file at
the resolved commit, hashing it as it is written and checking it against the Hub's LFS sha256. A dropped
connection is resumed with an HTTP Range request. `HF_ENDPOINT` is read at call time, so a mirror (or the test
server in tests/hubserver.py) can stand in for huggingface.co.

References: Hub HTTP API https://huggingface.co/docs/hub/api; HTTP range requests RFC 9110 section 14.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from tinkerlm.errors import TinkerError
from tinkerlm.formats import hf
from tinkerlm.store.manifest import Manifest, _sanitise
from tinkerlm.store.staging import _PROGRESS_MIN_BYTES, _existing, _hf_plan, _stage, _target, check_space

log = logging.getLogger(__name__)

_HUB_RETRIES = 3  # resumed attempts after a dropped connection


def _parse_hf(source: str) -> tuple[str, str | None, str | None]:
    """'hf:ORG/REPO[/FILE.gguf][@REVISION]' -> (repo, file, revision)."""
    spec, _, rev = source[len("hf:") :].partition("@")
    parts = [p for p in spec.split("/") if p]
    if len(parts) < 2 or (len(parts) > 2 and not parts[-1].endswith(".gguf")):
        raise TinkerError(
            f"bad Hub source {source!r}; write hf:ORG/REPO, hf:ORG/REPO/FILE.gguf or hf:ORG/REPO@REVISION"
        )
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, rev or None


def _default_name(repo: str, file: str | None) -> str:
    """The store name of a Hub pull without --name: the GGUF file's stem, else the repo's name, sanitised."""
    return _sanitise(Path(file).stem if file else repo.split("/")[1])


def _pull_hub(source: str, name: str | None, force: bool, progress: bool) -> Manifest:
    repo, file, rev = _parse_hf(source)
    src = {"type": "hf", "uri": source, "repo": repo}
    name, tag = _target(name, _default_name(repo, file))
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
        raise TinkerError(
            f"{source}: cannot read the repo from the Hub ({first}); check the name and revision, "
            f"and run `hf auth login` for gated or private repos"
        )
    except (httpx2.TransportError, OSError) as e:
        raise TinkerError(
            f"{source}: cannot reach the Hub at {endpoint or 'huggingface.co'} "
            f"({type(e).__name__}: {e}); check your network, proxy or HF_ENDPOINT"
        )
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
    check_space(sum(_listed_size(siblings[f], source) for f in plan), source)

    def fetch(rel: str, model_dir: Path) -> dict:
        s = siblings.get(rel)
        if s is None:
            raise TinkerError(f"{source}: {repo} has no {rel!r}, though its safetensors index names it")
        dst = model_dir / Path(rel).name  # a GGUF from a subfolder is stored flat
        size = _listed_size(s, source)
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


def _listed_size(sibling, source: str) -> int:
    """The size the Hub lists for a file: downloads stop there, so a listing without one is refused."""
    size = sibling.lfs.size if sibling.lfs else sibling.size
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise TinkerError(
            f"{source}: the Hub lists no valid size for {sibling.rfilename} ({size!r}); tinkerlm downloads only "
            "what a listing bounds (check HF_ENDPOINT)"
        )
    return size


class _ShortRead(Exception):
    pass


def _download(
    repo: str,
    filename: str,
    commit: str,
    endpoint: str | None,
    dst: Path,
    size: int | None,
    expected_sha: str | None,
    progress: bool,
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
                        raise TinkerError(
                            f"hf:{repo}/{filename}: the Hub answered HTTP {r.status_code} for {url}; "
                            f"check access (`hf auth login`) and retry"
                        )
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
                    length = r.headers.get("Content-Length", "")
                    end = done + int(length) if length.isdigit() and len(length) < 20 else None
                    for chunk in r.iter_raw():  # no chunk_size: a buffered partial chunk would be lost on a drop
                        if size is not None and done + len(chunk) > size:
                            # A server that sends more than its own listing is broken or hostile: stop at once
                            # (leaving the block closes the connection), never write past the listed size.
                            raise TinkerError(
                                f"hf:{repo}/{filename}: the server sent more than the {size:,} bytes the Hub "
                                f"lists for it; stopped, nothing was stored (check HF_ENDPOINT)"
                            )
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
