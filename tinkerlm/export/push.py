"""`tinkerlm push NAME hf:ORG/REPO`: publish a stored model on the Hugging Face Hub, with its model card.

    tinkerlm push my-finetune hf:me/my-finetune [--private] [--gguf q4_k_m --gguf q8_0] [--message MSG]

One commit (`HfApi.create_commit`) uploads the model's stored files (its GGUF file, its Hugging Face directory, or
its LoRA adapter with recipe and loss curve), README.md (the card of `tinkerlm card`, listing the files sent; a
README.md the model was pulled with is replaced by it) and, for each `--gguf TYPE`, a GGUF export made on the fly
into a temporary directory (`tinkerlm.export.export`, verified against the model like any export). The repo is
created first if it does not exist (`create_repo(exist_ok=True)`; `--private` applies to a new repo only).

The token is huggingface_hub's: `HF_TOKEN`, else the one `hf auth login` saved. The Hub is `HF_ENDPOINT` (read at
call time), so a mirror or the stand-in of tests/hubserver.py can take huggingface.co's place. After a push the
manifest records the repo (`source.pushed`), so the cards of models later made from this one name it as their
`base_model`.

References: Hub upload API https://huggingface.co/docs/huggingface_hub/guides/upload; model cards
https://huggingface.co/docs/hub/model-cards.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

from tinkerlm.errors import TinkerError

_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def parse_target(target: str) -> str:
    """'hf:ORG/REPO' -> 'ORG/REPO'.

    Raises:
        TinkerError: any other spelling (no `hf:`, a file or revision part, characters the Hub refuses).
    """
    repo = target.removeprefix("hf:") if target.startswith("hf:") else None
    if repo is None or not _REPO_RE.fullmatch(repo) or ".." in repo or repo.endswith((".git", ".")):
        raise TinkerError(
            f"push target {target!r}: write hf:ORG/REPO (letters, digits, '.', '-', '_'; no file or @revision)"
        )
    return repo


def _files(m) -> list[tuple[str, Path]]:
    """(path in the repo, local file) for each stored file of the model; its README.md gives way to the card."""
    from tinkerlm import store

    path = store.model_path(m)
    root = path.parent if path.is_file() else path
    return [(f["path"], root / f["path"]) for f in m.files if f["path"] != "README.md"]


def _hub_error(e: Exception, repo: str, endpoint: str | None) -> TinkerError:
    """One line for a failed Hub call: refused for want of a token, another HTTP error, or no connection."""
    where = endpoint or "huggingface.co"
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        return TinkerError(
            f"hf:{repo}: the Hub at {where} refused the upload (HTTP {status}): no token, or one without write "
            f"access to {repo.split('/')[0]}; set HF_TOKEN or run `hf auth login` with a write token"
        )
    if status is not None:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return TinkerError(f"hf:{repo}: the Hub at {where} answered HTTP {status} ({first}); nothing was published")
    return TinkerError(
        f"hf:{repo}: cannot reach the Hub at {where} ({type(e).__name__}: {e}); check your network, proxy or "
        "HF_ENDPOINT"
    )


def push(
    name: str,
    target: str,
    *,
    private: bool = False,
    gguf: list[str] | None = None,
    message: str | None = None,
    declaration: str | None = None,
    progress: bool = True,
) -> str:
    """Upload the stored model `name` with its card (and GGUF exports) to the Hub repo `target` in one commit.

    Args:
        target: "hf:ORG/REPO".
        private: create the repo private (when it does not exist yet).
        gguf: GGUF file types to export and upload beside the model's own files ("q4_k_m", "q8_0", ...).
        message: the commit message.
        declaration: a MOT-format YAML for the card's openness assessment.
        progress: show export and upload progress on stderr.

    Returns:
        The commit's URL.

    Raises:
        TinkerError: a bad target or type, a model not in the store, an export that fails verification, or the
            Hub refusing (no token: HTTP 401) or unreachable. Nothing is committed then.
    """
    from tinkerlm import store
    from tinkerlm.export import card as card_mod
    from tinkerlm.export import types as types_mod

    repo = parse_target(target)
    m = store.get(name)
    types = list(dict.fromkeys(t.lower() for t in gguf or []))
    for t in types:
        types_mod.file_type(t)  # an unknown type fails before anything is exported or sent
    digest = store.digest(m)
    files = _files(m)
    with tempfile.TemporaryDirectory(prefix="tinkerlm-push-") as tmp:
        for t in types:
            out = Path(tmp) / f"{m.name}-{t}.gguf"
            if any(rel == out.name for rel, _ in files):
                raise TinkerError(f"--gguf {t}: the model already has a file {out.name}; push it without --gguf {t}")
            from tinkerlm.export import export

            export(m.ref, to="gguf", type=t, out=str(out), progress=progress)
            files.append((out.name, out))
        text = card_mod.store_card(m.ref, declaration=declaration, files=[rel for rel, _ in files])
        url = _commit(repo, files, text, private, message or f"Upload {m.ref} with tinkerlm")
    pushed = [r for r in m.source.get("pushed") or [] if r != repo] + [repo]
    try:
        store.update(m.ref, expect_sha256=digest, source={"pushed": pushed})
    except TinkerError as e:  # the model changed meanwhile: the push stands, the record is skipped
        print(f"tinkerlm: {e}", file=sys.stderr)
    return url


def _commit(repo: str, files: list[tuple[str, Path]], card: str, private: bool, message: str) -> str:
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it once, at import
    api = HfApi(endpoint=endpoint)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo, ops, commit_message=message, repo_type="model")
    except (HfHubHTTPError, OfflineModeIsEnabled, httpx2.TransportError, OSError) as e:
        raise _hub_error(e, repo, endpoint) from None
    except ValueError as e:  # the Hub's README.md metadata check, or a malformed answer
        first = str(e).strip().replace("\n", " ")[:300]
        raise TinkerError(f"hf:{repo}: the Hub did not take the upload ({first}); nothing was published") from None
    return str(info.commit_url)


def main(a) -> None:
    url = push(
        a.name, a.target, private=a.private, gguf=a.gguf, message=a.message, declaration=a.declaration
    )  # fmt: skip
    print(url)
