"""tinkerlm.pack_cache: the second load of a GGUF maps the packed weights saved by the first instead of repacking,
with the same logits; a changed GGUF, a cut or corrupt cache, a killed writer or a full disk never give a wrong
model; TINKERLM_PACK_CACHE=0 turns it off; `tinkerlm rm` deletes it."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import random_gguf  # noqa: E402

import tinkerlm  # noqa: E402
from tinkerlm import kernels, pack_cache, store  # noqa: E402
from tinkerlm import quant as q  # noqa: E402
from tinkerlm.loading import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.ops() is None, reason="the cache holds the kernels' packed layout")
IDS = torch.tensor([[1, 17, 400, 4000, 30000, 12, 9]])


@pytest.fixture(autouse=True)
def cache_any_path(monkeypatch):
    """These tests load GGUFs by path, which are cached only when asked (by default only store models are)."""
    monkeypatch.setenv("TINKERLM_PACK_CACHE", "1")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, smollm2_gguf) -> Path:
    """A random Llama 3 layout in Q4_K_M (Q4_K, Q6_K and F32 tensors), SmolLM2's tokenizer."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return random_gguf.write("tiny-llama3", "q4_k_m", path, seed=3, tokenizer_gguf=smollm2_gguf)


@pytest.fixture
def gguf(tiny_gguf, tmp_path) -> Path:
    """A copy of the tiny GGUF this test may change."""
    path = tmp_path / "model.gguf"
    path.write_bytes(tiny_gguf.read_bytes())
    return path


@pytest.fixture
def packs(monkeypatch) -> list:
    """Counts the repacks: one entry per call of `quant.packed_state_dict` (the GGUF read and repacked)."""
    calls = []
    real = q.packed_state_dict

    def counted(ckpt):
        calls.append(ckpt.path)
        return real(ckpt)

    monkeypatch.setattr(q, "packed_state_dict", counted)
    return calls


def logits(path: Path, **kw) -> torch.Tensor:
    model, _, _ = load_checkpoint(path, **kw)
    with torch.no_grad():
        return model(IDS)


def mapped_files(t: torch.Tensor) -> set[str]:
    """The files whose mapping in this process holds `t`'s first byte (from /proc/self/maps)."""
    ptr, out = t.data_ptr(), set()
    for line in open("/proc/self/maps"):
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi and len(fields) > 5:
            out.add(fields[5])
    return out


def test_second_load_maps_the_cache_with_the_same_logits(gguf, packs):
    fresh = logits(gguf, pack_cache=False)
    assert len(packs) == 1 and not pack_cache.cache_path(gguf).exists()

    model1, tok1, _ = load_checkpoint(gguf)  # the first load writes the cache
    path = pack_cache.cache_path(gguf)
    assert len(packs) == 2 and path.is_file()
    model2, tok2, _ = load_checkpoint(gguf)  # the second maps it: no repacking
    assert len(packs) == 2
    with torch.no_grad():
        assert torch.equal(model1(IDS), fresh)
        assert torch.equal(model2(IDS), fresh)

    # the weights are views of the cache file, not copies
    blocks = model2.model.layers[0].mlp.down_proj.blocks
    assert mapped_files(blocks) == {str(path)}
    assert str(path) in mapped_files(model2.model.norm.weight)
    # the same tokenizer, rebuilt from its saved JSON on first use (its special ids and size come from the record)
    assert isinstance(tok2.backend, pack_cache.LazyBackend) and tok2.backend._built is None
    assert tok2.eos_token_id == tok1.eos_token_id and tok2.backend._built is None
    text = "<|im_start|>user\nHello, wörld! 12345<|im_end|>"
    assert tok2.encode(text) == tok1.encode(text)
    assert tok2.decode(tok2.encode(text), skip_special_tokens=False) == tok1.decode(tok1.encode(text), False)
    for attr in ("vocab_size", "bos_token_id", "eos_token_id", "stop_token_ids", "chat_template", "pad_token"):
        assert getattr(tok2, attr) == getattr(tok1, attr), attr
    assert tok2.backend._built is not None and tok2.backend.get_vocab() == tok1.backend.get_vocab()
    assert tok2.backend.get_vocab_size(False) == tok1.backend.get_vocab_size(False)
    assert tok2.backend.token_to_id("Hello") == tok1.backend.token_to_id("Hello")
    # a valid safetensors file: the library reads the same packed bytes
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.mlp.down_proj.weight"), blocks)


def test_a_changed_gguf_is_repacked(gguf, packs):
    load_checkpoint(gguf)
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
    load_checkpoint(gguf)
    assert len(packs) == 2
    load_checkpoint(gguf)  # the rewritten cache serves the touched file
    assert len(packs) == 2

    # same size, mtime and inode, one weight changed in place: its ctime (and the sha256 of its ends) differ
    st = gguf.stat()
    with open(gguf, "r+b") as f:
        f.seek(st.st_size - 100)
        byte = f.read(1)
        f.seek(st.st_size - 100)
        f.write(bytes([byte[0] ^ 0x55]))
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = logits(gguf)
    assert len(packs) == 3
    assert torch.equal(changed, logits(gguf, pack_cache=False))


def _cut(data: bytearray) -> bytearray:
    return data[:-1]


def _flip_middle(data: bytearray) -> bytearray:
    data[len(data) // 2] ^= 0x01
    return data


def _flip_header(data: bytearray) -> bytearray:
    data[20] ^= 0x7F
    return data


def _bad_packed_size(data: bytearray) -> bytearray:
    """A forged header saying a packed tensor has more rows than its bytes hold (checksums still right)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    packed = json.loads(header["__metadata__"]["packed"])
    name = next(iter(packed))
    packed[name][1] += 64
    header["__metadata__"]["packed"] = json.dumps(packed)
    text = json.dumps(header).encode()
    assert len(text) <= n
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


@pytest.mark.parametrize("damage", [_cut, _flip_middle, _flip_header, _bad_packed_size, lambda d: bytearray()])
def test_a_cut_or_corrupt_cache_is_detected_and_rebuilt(gguf, packs, damage, caplog):
    fresh = logits(gguf, pack_cache=False)
    load_checkpoint(gguf)
    path = pack_cache.cache_path(gguf)
    path.write_bytes(damage(bytearray(path.read_bytes())))
    with caplog.at_level(logging.WARNING, logger="tinkerlm.pack_cache"):
        assert torch.equal(logits(gguf), fresh)
    assert len(packs) == 3  # repacked...
    assert "unusable" in caplog.text and str(path) in caplog.text
    assert torch.equal(logits(gguf), fresh)  # ...and rewritten: the next load maps it
    assert len(packs) == 3


def _checksums_of(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(json.loads(f.read(n))["__metadata__"]["checksums"])


@pytest.mark.parametrize("name", list(pack_cache.HASHES))
def test_each_checksum_catches_a_flipped_bit(gguf, packs, name, monkeypatch, caplog):
    """xxh3_64 where xxhash is installed, crc32 without it: the cache names its checksum and either catches one
    flipped bit in a packed weight (which nothing else checks)."""
    monkeypatch.setattr(pack_cache, "HASHES", {name: pack_cache.HASHES[name]})
    fresh = logits(gguf, pack_cache=False)
    load_checkpoint(gguf)
    path = pack_cache.cache_path(gguf)
    assert _checksums_of(path)["hash"] == name
    assert torch.equal(logits(gguf), fresh) and len(packs) == 2  # mapped and checked
    data = bytearray(path.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 1000] ^= 0x10  # the first tensors are the packed ones
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="tinkerlm.pack_cache"):
        assert torch.equal(logits(gguf), fresh)
    assert len(packs) == 3 and "checksum mismatch" in caplog.text


def test_a_cache_whose_checksum_cannot_be_computed_here_is_rebuilt(gguf, packs, monkeypatch, caplog):
    load_checkpoint(gguf)
    written = _checksums_of(pack_cache.cache_path(gguf))["hash"]
    # as if xxhash were uninstalled: a checksum named otherwise
    monkeypatch.setattr(pack_cache, "HASHES", {"other": pack_cache.HASHES["crc32"]})
    with caplog.at_level(logging.WARNING, logger="tinkerlm.pack_cache"):
        load_checkpoint(gguf)
    assert len(packs) == 2 and f"written with {written} checksums" in caplog.text
    load_checkpoint(gguf)  # rewritten with the checksum this install has
    assert len(packs) == 2 and _checksums_of(pack_cache.cache_path(gguf))["hash"] == "other"


def test_by_default_only_store_models_are_cached(gguf, packs, monkeypatch, tmp_path):
    monkeypatch.delenv("TINKERLM_PACK_CACHE")
    load_checkpoint(gguf)  # a GGUF given by path: not copied into the cache unasked
    assert not pack_cache.cache_path(gguf).exists()
    monkeypatch.setenv("TINKERLM_HOME", str(tmp_path / "home"))
    stored = tmp_path / "home" / "models" / "tiny" / "latest" / "model.gguf"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(gguf.read_bytes())
    load_checkpoint(stored)
    assert pack_cache.cache_path(stored).is_file() and len(packs) == 2
    load_checkpoint(stored)
    assert len(packs) == 2  # mapped, not repacked


def test_caches_of_gguf_files_that_are_gone_are_pruned(gguf, packs, tmp_path, monkeypatch):
    """A cache is named by its GGUF's path, so the cache of a deleted or moved file would be kept forever: the next
    write removes it, and only it."""
    monkeypatch.setenv("TINKERLM_HOME", str(tmp_path / "home"))
    other = tmp_path / "other.gguf"
    other.write_bytes(gguf.read_bytes())
    load_checkpoint(gguf)
    load_checkpoint(other)
    old, kept = pack_cache.cache_path(gguf), pack_cache.cache_path(other)
    assert old.is_file() and kept.is_file()
    moved = gguf.rename(tmp_path / "moved.gguf")
    (old.parent / "unreadable.safetensors").write_bytes(b"\x01")  # not a cache this code can read: left alone
    load_checkpoint(moved)  # writes the moved file's cache, pruning the one of the path that is gone
    assert not old.exists() and kept.is_file() and pack_cache.cache_path(moved).is_file()
    assert (old.parent / "unreadable.safetensors").exists()
    assert pack_cache.prune() == []
    other.unlink()
    assert pack_cache.prune() == [kept]


def test_opt_out(gguf, packs, monkeypatch):
    load_checkpoint(gguf, pack_cache=False)
    assert not pack_cache.cache_path(gguf).exists()
    monkeypatch.setenv("TINKERLM_PACK_CACHE", "0")
    load_checkpoint(gguf)
    load_checkpoint(gguf)
    assert not pack_cache.cache_path(gguf).exists() and len(packs) == 3
    monkeypatch.setenv("TINKERLM_PACK_CACHE", "1")
    load_checkpoint(gguf)
    load_checkpoint(gguf, pack_cache=False)  # an existing cache is not read either
    assert pack_cache.cache_path(gguf).exists() and len(packs) == 5
    load_checkpoint(gguf, quant="int8")  # only the packed GGUF path is cached
    assert len(packs) == 5


def test_rm_removes_the_cache(gguf):
    store.pull(str(gguf), "tinycache", progress=False)
    tinkerlm.load("tinycache")
    path = pack_cache.cache_path(store.model_path(store.get("tinycache")))
    assert path.is_file()
    store.rm("tinycache")
    assert not path.exists()


def test_no_disk_space_skips_the_cache(gguf, packs, monkeypatch, caplog):
    real = pack_cache.shutil.disk_usage
    monkeypatch.setattr(pack_cache.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with caplog.at_level(logging.WARNING, logger="tinkerlm.pack_cache"):
        load_checkpoint(gguf)
    assert "not caching packed weights of model.gguf" in caplog.text
    assert list(pack_cache.cache_path(gguf).parent.iterdir()) == []  # nothing, not even a partial file


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from tinkerlm import pack_cache
from tinkerlm.loading import load_checkpoint

real_bytes, real_checksums, written = pack_cache._bytes, pack_cache._checksums, []

def dies_at_the_tenth_tensor(t):
    written.append(t)
    if len(written) == 10:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_bytes(t)

def checksums_then_arm(tensors):  # the checksums read every tensor first; the writing comes after
    sums = real_checksums(tensors)
    pack_cache._bytes = dies_at_the_tenth_tensor
    return sums

pack_cache._checksums = checksums_then_arm
load_checkpoint(Path(sys.argv[1]))
"""


def test_a_writer_killed_mid_write_leaves_no_cache(gguf, packs):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(gguf)], env=env, capture_output=True, text=True)
    assert out.returncode == -9, out.stderr
    path = pack_cache.cache_path(gguf)
    partial = list(path.parent.glob(f".{path.name}.*.tmp"))
    assert not path.exists() and len(partial) == 1 and partial[0].stat().st_size > 0
    fresh = logits(gguf, pack_cache=False)
    assert torch.equal(logits(gguf), fresh) and len(packs) == 2  # repacked and written whole
    assert path.is_file() and not partial[0].exists()  # the dead writer's file is cleared
    assert torch.equal(logits(gguf), fresh) and len(packs) == 2


def test_smollm2_second_load_same_answer(smollm2_gguf, packs):
    """The real default model end to end: the cached load generates what the repacking one does."""
    first = tinkerlm.load(str(smollm2_gguf))
    second = tinkerlm.load(str(smollm2_gguf))
    assert len(packs) == 1 and pack_cache.cache_path(smollm2_gguf).is_file()
    prompt = "Name three primary colours."
    assert second.chat(prompt, max_tokens=12) == first.chat(prompt, max_tokens=12)
