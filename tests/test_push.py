"""`tinkerlm push`: what the stand-in hub (tests/hubserver.py) receives through huggingface_hub's upload path
(create_repo, preupload, LFS batch and PUT, NDJSON commit), the card it gets, the round trip through
`tinkerlm pull`, and the one-line errors (bad target, no token, no network)."""

import hashlib
import socket

import pytest
import test_card
from test_card import parse
from test_cli import assert_user_error, cli

from tinkerlm import store
from tinkerlm.errors import TinkerError
from tinkerlm.export.push import parse_target, push

# The stand-in hub with org/base and org/other, and org/base pulled as `base` (fixtures of test_card).
tiny_dirs, hub, base = test_card.tiny_dirs, test_card.hub, test_card.base


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_files(m) -> dict[str, str]:
    """path -> sha256 of a stored model's files, as its manifest records them."""
    return {f["path"]: f["sha256"] for f in m.files}


def test_push_a_quantized_gguf_and_pull_it_back(hub, base):
    from tinkerlm.export import quantize

    q = quantize("base", type="q8_0", out="base-q8", progress=False)
    url = push("base-q8", "hf:me/base-q8", progress=False)
    assert url.startswith(hub.url + "/me/base-q8/commit/")
    [commit] = hub.commits
    assert commit["repo"] == "me/base-q8" and commit["header"]["summary"] == "Upload base-q8:latest with tinkerlm"
    got = {path: sha(data) for path, data in commit["files"].items()}
    assert got == {**stored_files(q), "README.md": got["README.md"]}
    assert [op["path"] for op in commit["lfs"]] == list(stored_files(q))  # the GGUF went through LFS
    meta, body = parse(commit["files"]["README.md"].decode())
    assert meta["base_model"] == ["org/base"] and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"
    assert not hub.repos["me/base-q8"].private
    # the round trip: the same bytes, and the lineage the GGUF carries
    back = store.pull("hf:me/base-q8", name="back", progress=False)
    assert stored_files(back) == stored_files(q)
    assert back.parents[0]["name"] == "base:latest" and back.parents[0]["relation"] == "quantized"
    # the push is recorded: a model made from base-q8 now names me/base-q8 as its Hub base
    assert store.get("base-q8").source["pushed"] == ["me/base-q8"]


def test_push_hf_model_with_gguf_exports_private(hub, base):
    push("base", "hf:me/base", private=True, gguf=["q8_0", "Q8_0", "f16"], message="first", progress=False)
    [commit] = hub.commits
    names = set(commit["files"])
    stored = stored_files(store.get("base"))
    assert names == (set(stored) - {"README.md"}) | {"README.md", "base-q8_0.gguf", "base-f16.gguf"}
    for path, digest in stored.items():
        if path != "README.md":  # the pulled card gives way to ours
            assert sha(commit["files"][path]) == digest, path
    assert commit["header"]["summary"] == "first" and hub.repos["me/base"].private
    meta, body = parse(commit["files"]["README.md"].decode())
    assert "- `base-q8_0.gguf`" in body and "- `base-f16.gguf`" in body
    assert {op["path"] for op in commit["lfs"]} >= {"model.safetensors", "base-q8_0.gguf", "base-f16.gguf"}
    back = store.pull("hf:me/base", name="back", progress=False)
    assert back.format == "hf"
    assert {p: d for p, d in stored_files(back).items() if p != "README.md"} == {
        p: d for p, d in stored.items() if p != "README.md"
    }
    # a second push to the same repo: exist_ok, and the LFS objects the hub holds are not sent again
    puts = sum(1 for method, _ in hub.writes if method == "PUT")
    push("base", "hf:me/base", gguf=["q8_0"], progress=False)
    assert len(hub.commits) == 2 and sum(1 for method, _ in hub.writes if method == "PUT") == puts


def test_push_a_lora_adapter(hub, base, tmp_path):
    m = test_card._finetune("ad", tmp_path)
    push("ad", "hf:me/ad", progress=False)
    files = hub.commits[-1]["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "README.md"} <= set(files)
    assert {p: sha(d) for p, d in files.items() if p != "README.md"} == stored_files(m)
    meta, _ = parse(files["README.md"].decode())
    assert meta["base_model"] == ["org/base"] and meta["base_model_relation"] == "adapter"


@pytest.mark.parametrize("target", ["me/repo", "hf:me", "hf:me/repo/file.gguf", "hf:me/repo@main", "hf:../x", "hf:"])
def test_bad_target_spelling(target):
    with pytest.raises(TinkerError, match="write hf:ORG/REPO"):
        parse_target(target)


def test_cli_errors_are_one_line(hub, base, tmp_path, monkeypatch):
    assert_user_error(cli("push", "base", "me/repo"), "hf:ORG/REPO")
    assert_user_error(cli("push", "base", "hf:me/repo", "--gguf", "q9_9"), "q9_9")
    assert_user_error(cli("push", "nosuch", "hf:me/repo"), "nosuch")
    # no token: the hub answers 401 and the message says how to give one
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))  # no saved login either
    assert_user_error(cli("push", "base", "hf:me/repo"), "HTTP 401", "HF_TOKEN", "hf auth login")
    assert "me/repo" not in hub.repos and not hub.commits
    # no network: nothing listens on the endpoint
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert_user_error(cli("push", "base", "hf:me/repo"), "cannot reach the Hub", f"127.0.0.1:{port}")
    # and the real push through the CLI prints the commit URL
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    proc = cli("push", "base", "hf:me/repo", check=0)
    assert proc.stdout.strip().startswith(f"{hub.url}/me/repo/commit/")
