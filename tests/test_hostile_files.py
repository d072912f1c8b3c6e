"""Hostile model files: every size a GGUF, config.json, tokenizer metadata or safetensors header declares is checked
against tinkerlm/limits.py and the file's own size before anything is allocated, and wrong-typed values are a
TinkerError naming the file and the key or tensor, never a traceback (issue 12).

GGUF headers are written byte by byte here (`raw_gguf`), so they can say what no writer would.
"""

import json
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from ggufwriter import write_gguf
from test_gguf import llama_weights as gguf_llama_weights

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.formats import hf
from tinkerlm.formats.describe import describe, safetensors_header
from tinkerlm.formats.gguf import read_gguf
from tinkerlm.formats.tokenizer import Tokenizer

# -- a raw GGUF writer: any counts, types and shapes --------------------------------------------------------------


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _u32(key: str, value: int) -> bytes:
    return _kv(key, 4, struct.pack("<I", value))


def _tensor(name: str, dims, ttype: int = 0, offset: int = 0) -> bytes:
    return _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


def raw_gguf(path: Path, kvs=(), tensors=(), n_kv=None, n_tensors=None, tail=b"") -> Path:
    body = struct.pack(
        "<4sIQQ", b"GGUF", 3, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body += b"".join(kvs) + b"".join(tensors)
    body += b"\0" * (-len(body) % 32) + tail
    path.write_bytes(body)
    return path


ARCH = _kv("general.architecture", 8, _str("llama"))


# -- 1. the GGUF header parser -------------------------------------------------------------------------------------


def test_huge_token_count_fails_fast_with_little_memory(tmp_path):
    """A 634 KB file whose token array says 2^28 strings: rejected before a 2 GB list is allocated."""
    path = raw_gguf(
        tmp_path / "tokens.gguf",
        [ARCH, _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 28) + _str("a") * 20000)],
        tail=b"\0" * (634_000 - 20000 * 9),
    )
    code = textwrap.dedent(f"""
        import resource, time
        from tinkerlm.formats.gguf import read_gguf
        from tinkerlm.errors import TinkerError
        import gguf  # imported before the baseline: read_gguf uses it
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        try:
            read_gguf({str(path)!r})
            print("NO ERROR")
        except TinkerError as e:
            print("ERROR", e)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("GROWTH_KB", after - before, "SECONDS", time.perf_counter() - t)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "ERROR" in out and "NO ERROR" not in out, out
    assert "tokenizer.ggml.tokens" in out and str(path) in out, out
    growth_kb = int(out.split("GROWTH_KB")[1].split()[0])
    assert growth_kb < 64 * 1024, out  # far below the 2 GB the declared count would take
    assert float(out.split("SECONDS")[1].split()[0]) < 5, out


@pytest.mark.parametrize(
    ("kvs", "tensors", "counts", "match"),
    [
        ([], [], {"n_kv": 1 << 40}, "metadata key count"),
        ([], [], {"n_kv": 10_000}, "metadata key count"),  # under the limit, but the file cannot hold them
        ([], [], {"n_tensors": 1 << 20}, "tensor count"),
        ([_kv("general.name", 8, struct.pack("<Q", 1 << 40))], [], {}, "metadata key general.name"),
        ([struct.pack("<Q", 1 << 40)], [], {"n_kv": 1}, "metadata key #0"),
        ([_kv("x", 9, struct.pack("<IQ", 5, 1 << 30))], [], {}, "metadata key x: the array length"),
        ([_kv("x", 9, struct.pack("<IQ", 9, 1) * 10 + struct.pack("<IQ", 5, 0))], [], {}, "nesting of arrays"),
        ([_kv("x", 42, b"")], [], {}, "unknown value type 42"),
        ([_kv("x", 8, _str(b"\xff\xfe"))], [], {}, "metadata key x is not valid UTF-8"),
        ([_kv("general.alignment", 8, _str("abc"))], [], {}, "general.alignment"),
        ([_u32("general.alignment", 0)], [], {}, "general.alignment"),
        ([], [_tensor("w", [2, 2, 2, 2, 2])], {}, "tensor w: the number of dimensions"),
        ([], [_tensor("w", [1 << 32, 1 << 32])], {}, "tensor w: the element count"),
        ([], [_tensor("w", [4, 0])], {}, "tensor w has a dimension of 0"),
        ([], [_tensor("w", [4], ttype=99)], {}, "tensor w has unknown tensor type 99"),
        ([], [_tensor("w", [4]), _tensor("w", [4])], {}, "tensor w appears twice"),
        ([], [_tensor("w", [1 << 20])], {}, "tensor w ends at byte"),
        ([], [_tensor("w", [48, 2], ttype=int(Q.Q8_0))], {}, "tensor w has rows of 48 values"),
    ],
)
def test_bad_header_names_file_and_field(tmp_path, kvs, tensors, counts, match):
    path = raw_gguf(tmp_path / "bad.gguf", kvs, tensors, **counts, tail=b"\0" * 4096)
    with pytest.raises(TinkerError, match=match) as e:
        read_gguf(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_q4_k_rows_not_multiple_of_256_refused(tmp_path):
    """288 values a row: whole super-blocks only across rows, so a reader slicing by row got wrong weights."""
    path = raw_gguf(
        tmp_path / "q4k.gguf",
        [ARCH],
        [_tensor("blk.0.ffn_up.weight", [288, 8], ttype=int(Q.Q4_K))],
        tail=b"\0" * (9 * 144),
    )
    with pytest.raises(TinkerError, match=r"blk\.0\.ffn_up\.weight has rows of 288 values, not a multiple of the 256"):
        read_gguf(path)


def test_k_quant_row_rule_in_from_gguf():
    from tinkerlm.quant.qtensor import from_gguf

    raw = np.zeros((8, 162), np.uint8)  # 8 rows x 288 values: 9 super-blocks of 144 bytes, cut across rows
    for qtype in ("Q4_K", "Q5_K", "Q6_K"):
        with pytest.raises(TinkerError, match="multiple of its 256-value blocks"):
            from_gguf(raw, qtype, (8, 288), dequantize=lambda r: np.zeros(8 * 288, np.float32))
    with pytest.raises(TinkerError, match="holds 1296 bytes, expected 1440"):
        from_gguf(raw, "Q4_1", (8, 288))


# -- 2. metadata -> config; config.json -> config -------------------------------------------------------------------


def llama_weights(vocab=40):
    """A tiny Llama's HF-layout weights (test_gguf's builder, fixed seed)."""
    return gguf_llama_weights(np.random.default_rng(0), vocab=vocab)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_gguf(path, "llama", llama_weights())
    return path


@pytest.mark.parametrize(
    "key",
    [
        "block_count",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "context_length",
        "vocab_size",
    ],
)
@pytest.mark.parametrize("value", ["2", 2.0, [2], -1, 0, True, 1 << 31, 1 << 40])
def test_metadata_sizes_checked_for_type_and_range(tiny_gguf, key, value):
    ckpt = read_gguf(tiny_gguf)
    ckpt.metadata[f"llama.{key}"] = value
    with pytest.raises(TinkerError, match=rf"llama\.{key}") as e:
        ckpt.config()
    assert str(tiny_gguf) in str(e.value)


def test_huge_block_count_fails_at_load_quickly(tmp_path):
    from tinkerlm.loading import load_checkpoint

    path = tmp_path / "layers.gguf"
    write_gguf(path, "llama", llama_weights(), meta={"block_count": 1 << 31})
    t = time.perf_counter()
    with pytest.raises(TinkerError, match="block_count"):
        load_checkpoint(path)
    assert time.perf_counter() - t < 10


def test_wrong_typed_architecture_and_token_ids(tiny_gguf):
    ckpt = read_gguf(tiny_gguf)
    ckpt.metadata["general.architecture"] = ["llama"]
    with pytest.raises(TinkerError, match="general.architecture"):
        ckpt.config()
    ckpt = read_gguf(tiny_gguf)
    ckpt.metadata["tokenizer.ggml.bos_token_id"] = "1"
    with pytest.raises(TinkerError, match="tokenizer.ggml.bos_token_id"):
        ckpt.config()


LLAMA = dict(
    model_type="llama",
    vocab_size=40,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_hidden_layers", 1 << 31),
        ("head_dim", 1 << 40),
        ("vocab_size", 1 << 40),
        ("max_position_embeddings", 1 << 40),
        ("hidden_size", "64"),
        ("intermediate_size", 128.5),
        ("num_attention_heads", True),
        ("num_attention_heads", 0),
        ("num_key_value_heads", [2]),
        ("rope_theta", "10000"),
        ("tie_word_embeddings", "yes"),
        ("rope_scaling", "linear"),
        ("rope_freq_factors", ["a"]),
        ("hidden_act", 3),
        ("num_attention_heads", 4096),  # x head_dim 4096: each under its limit, but not the heads' width
    ],
)
def test_llama_config_values_checked(key, value):
    from tinkerlm import models

    config = dict(LLAMA, **{key: value})
    if key == "num_attention_heads" and value == 4096:
        config.update(num_key_value_heads=4096, head_dim=1 << 12)
    with pytest.raises(TinkerError, match=key) as e:
        models.build(config, "config.json")
    assert str(e.value).startswith("config.json: ")


def test_wrong_typed_layer_types_ignored_without_traceback():
    from tinkerlm import models

    models.build(dict(LLAMA, use_sliding_window=False, layer_types=5), "config.json")


def test_malformed_rope_scaling_values():
    from tinkerlm import models

    scaling = {"rope_type": "llama3", "factor": "x", "low_freq_factor": 1, "high_freq_factor": 4}
    with pytest.raises(TinkerError, match="rope_scaling"):
        models.build(dict(LLAMA, rope_scaling=scaling), "config.json")


@pytest.mark.parametrize(("key", "value"), [("n_layer", 1 << 31), ("n_embd", "64"), ("n_positions", 1 << 40)])
def test_gpt2_config_values_checked(key, value):
    from tinkerlm import models

    config = dict(dict(model_type="gpt2", vocab_size=40, n_embd=64, n_layer=2, n_head=4), **{key: value})
    with pytest.raises(TinkerError, match=key):
        models.build(config, "config.json")


# -- 3. the tokenizer from GGUF metadata -----------------------------------------------------------------------------


def spm_metadata(tokens, **extra):
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [float(-i) for i in range(len(tokens))],
        "tokenizer.ggml.token_type": [1] * len(tokens),
        **extra,
    }


SPM = ["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁a"]


def test_long_sentencepiece_token_refused():
    """A 45,000-character token made the merges cost gigabytes (every cut listed); now it is over the limit."""
    with pytest.raises(TinkerError, match=r"tokenizer\.ggml\.tokens item 8 is 45000 bytes long"):
        Tokenizer.from_gguf_metadata(spm_metadata([*SPM, "a" * 45000]), "m.gguf")


def test_merges_from_scores_linear_memory_for_long_tokens():
    import tracemalloc

    from tinkerlm.formats.tokenizer import _merges_from_scores

    tokens = [*SPM, "a" * 4000]
    vocab = {t: i for i, t in enumerate(tokens)}
    tracemalloc.start()
    _merges_from_scores(tokens, [0.0] * len(tokens), vocab)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20  # listing all 4,000 cuts' strings first took ~16 MB


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"tokenizer.ggml.token_type": ["1"] * len(SPM)}, "tokenizer.ggml.token_type is not an array of integers"),
        ({"tokenizer.ggml.token_type": [1] * 3}, "tokenizer.ggml.token_type has 3 entries for 8 tokens"),
        ({"tokenizer.ggml.scores": ["0"] * len(SPM)}, "tokenizer.ggml.scores is not an array of numbers"),
        ({"tokenizer.ggml.scores": 5}, "tokenizer.ggml.scores is not an array"),
        ({"tokenizer.ggml.merges": [1, 2]}, "tokenizer.ggml.merges is not an array of strings"),
        ({"tokenizer.ggml.bos_token_id": "1"}, "tokenizer.ggml.bos_token_id"),
        ({"tokenizer.ggml.eos_token_id": 2.0}, "tokenizer.ggml.eos_token_id"),
        ({"tokenizer.chat_template": 7}, "tokenizer.chat_template"),
    ],
)
def test_tokenizer_metadata_checked(extra, match):
    with pytest.raises(TinkerError, match=match):
        Tokenizer.from_gguf_metadata(spm_metadata(SPM, **extra), "m.gguf")


def test_tokenizer_tokens_checked(monkeypatch):
    with pytest.raises(TinkerError, match="tokenizer.ggml.tokens is not an array of strings"):
        Tokenizer.from_gguf_metadata(spm_metadata([*SPM, 5]), "m.gguf")
    monkeypatch.setattr(limits, "MAX_VOCAB", 4)
    with pytest.raises(TinkerError, match="tokenizer.ggml.tokens: the vocabulary size is 8, outside 0..4"):
        Tokenizer.from_gguf_metadata(spm_metadata(SPM), "m.gguf")


def test_tokenizer_larger_than_embedding_refused_at_load(tmp_path):
    from tinkerlm.loading import load_checkpoint

    w = llama_weights(vocab=40)
    path = tmp_path / "small-embedding.gguf"
    # ggufwriter's vocabulary has as many tokens as the first tensor has rows: 128 (capped at 99) > 40.
    first = "model.layers.0.mlp.gate_proj.weight"
    write_gguf(path, "llama", {first: w.pop(first), **w}, meta={"vocab_size": 40})
    with pytest.raises(TinkerError, match=r"tokenizer has 99 tokens but the model's embedding \(vocab_size\) has 40"):
        load_checkpoint(path)


# -- 4. the store's metadata reader ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kv",
    [
        _kv("llama.context_length", 8, _str("abc")),
        _kv("llama.context_length", 9, struct.pack("<IQ", 4, 2) + b"\0" * 8),
        _kv("general.license", 9, struct.pack("<IQ", 4, 1) + b"\0" * 4),
    ],
)
def test_describe_gguf_wrong_typed_metadata(tmp_path, kv):
    info = describe(raw_gguf(tmp_path / "m.gguf", [ARCH, kv], [_tensor("w", [4, 4])], tail=b"\0" * 64))
    assert info["context_length"] == 0 and info["license"] is None and info["parameters"] == 16


def test_describe_gguf_wrong_typed_architecture(tmp_path):
    arch = _kv("general.architecture", 9, struct.pack("<IQ", 4, 1) + b"\0" * 4)
    info = describe(raw_gguf(tmp_path / "m.gguf", [arch], tail=b"\0" * 64))
    assert info["architecture"] == "unknown"


def write_safetensors(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "F32", "shape": [1 << 17, 1 << 16], "data_offsets": [0, 8]}, "needs 34359738368 bytes"),
        ({"dtype": "F32", "shape": [1 << 17, 1 << 16], "data_offsets": [0, 1 << 35]}, "outside the 8 bytes"),
        ({"dtype": "F32", "shape": [1 << 30] * 3, "data_offsets": [0, 8]}, "elements or more"),
        ({"dtype": 4, "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "expected a list of integers"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "non-negative"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "outside the 8 bytes"),
        ({"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}, r"expected \[begin, end\]"),
        ({"dtype": "F32", "shape": [2]}, r"expected \[begin, end\]"),
        ("F32", "has no"),
    ],
)
def test_safetensors_header_checked(tmp_path, entry, match):
    path = write_safetensors(tmp_path / "model.safetensors", {"w": entry}, b"\0" * 8)
    with pytest.raises(TinkerError, match=match) as e:
        safetensors_header(path)
    assert str(path) in str(e.value) and "'w'" in str(e.value)


def test_safetensors_header_length_bounded(tmp_path, monkeypatch):
    path = write_safetensors(tmp_path / "a.safetensors", {}, length=1 << 20)  # longer than the file
    with pytest.raises(TinkerError, match="header length 1048576 is implausible"):
        safetensors_header(path)
    monkeypatch.setattr(limits, "MAX_JSON_BYTES", 4)
    with pytest.raises(TinkerError, match="implausible"):
        safetensors_header(write_safetensors(tmp_path / "b.safetensors", {"__metadata__": {"a": "b"}}))
    path.write_bytes(struct.pack("<Q", 4) + b"[1]  ")
    monkeypatch.undo()
    with pytest.raises(TinkerError, match="not a JSON object"):
        safetensors_header(path)


def test_describe_hf_pulls_no_2_to_33_element_tensor(tmp_path):
    """A header declaring 2^33 elements was accepted by `pull`, and `merge` then allocated 32 GiB."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    header = {"w": {"dtype": "F32", "shape": [1 << 17, 1 << 16], "data_offsets": [0, 8]}}
    write_safetensors(tmp_path / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(TinkerError, match="model.safetensors: tensor 'w'"):
        describe(tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "llama", "text_config": [1]},
        {"model_type": ["llama"], "max_position_embeddings": "4096"},
        {"model_type": "llama", "quantization_config": "gptq", "license": ["mit"]},
        {"model_type": "llama", "max_position_embeddings": 1e300, "n_ctx": [1]},
    ],
)
def test_describe_hf_wrong_typed_config(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_safetensors(
        tmp_path / "model.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8
    )
    info = describe(tmp_path)
    assert info["parameters"] == 2 and info["context_length"] == 0
    assert isinstance(info["architecture"], str) and info["license"] is None


def test_describe_lora_wrong_typed_base(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": ["x"]}))
    assert describe(tmp_path)["architecture"] == "unknown"


# -- 5. HF directories -----------------------------------------------------------------------------------------------


def hf_dir(d: Path, shards: list[str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(LLAMA))
    (d / hf.INDEX).write_text(json.dumps({"weight_map": {f"t{i}": s for i, s in enumerate(shards)}}))
    return d


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", "C:x", ""])
def test_index_shard_names_stay_in_the_folder(tmp_path, shard):
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    d = hf_dir(tmp_path / "model", [shard])
    with pytest.raises(TinkerError, match="is not a file name inside the model folder"):
        hf.weight_files(d)


def test_index_shard_symlink_escaping_refused(tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    d = hf_dir(tmp_path / "model", ["model-00001.safetensors"])
    (d / "model-00001.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(TinkerError, match="outside the model folder"):
        hf.weight_files(d)
    (d / hf.INDEX).unlink()  # the same without an index: top-level files are checked too
    with pytest.raises(TinkerError, match="outside the model folder"):
        hf.weight_files(d)


def test_linked_model_folder_and_shard_inside_accepted(tmp_path):
    d = hf_dir(tmp_path / "model", ["model-00001.safetensors"])
    (d / "real.safetensors").write_bytes(b"x")
    (d / "model-00001.safetensors").symlink_to(d / "real.safetensors")
    (tmp_path / "link").symlink_to(d)
    assert [p.name for p in hf.weight_files(tmp_path / "link")] == ["model-00001.safetensors"]


def test_hugging_face_cache_snapshot_loads(tmp_path):
    """A Hub cache snapshot's files link to `../../blobs/SHA`: followed for loading (and pulling), nothing else."""
    from tiny import make_hf_model

    import tinkerlm

    src = tmp_path / "src"
    make_hf_model("llama", src)
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(p for p in src.iterdir() if p.is_file())):
        (blobs / f"sha{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f"sha{i}")
    assert [p.name for p in hf.weight_files(snap)] == [p.name for p in hf.weight_files(src)]
    want = tinkerlm.load(str(src)).generate("hi", max_tokens=3)
    assert tinkerlm.load(str(snap)).generate("hi", max_tokens=3) == want
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    weights = next(snap.glob("*.safetensors"))
    weights.unlink()
    weights.symlink_to(tmp_path / "secret.safetensors")  # out of the repository folder: refused
    with pytest.raises(TinkerError, match="outside the model folder"):
        hf.weight_files(snap)


def test_json_files_bounded(tmp_path, monkeypatch):
    d = hf_dir(tmp_path / "model", ["a.safetensors"])
    monkeypatch.setattr(limits, "MAX_JSON_BYTES", 16)
    with pytest.raises(TinkerError, match=r"config.json: \d+ bytes, over the limit of 16"):
        hf.load_config(d)
    with pytest.raises(TinkerError, match=r"model.safetensors.index.json: \d+ bytes, over the limit"):
        hf.weight_files(d)
    monkeypatch.undo()
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TinkerError, match="config.json"):
        hf.load_config(d)


def test_header_longer_than_first_read_parsed_from_the_map(tmp_path, monkeypatch):
    """A header past the first read is parsed again from an mmap of the file: same result, same bounds."""
    from tinkerlm.formats import gguf

    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", llama_weights())
    whole = read_gguf(path)
    monkeypatch.setattr(gguf, "HEAD_BYTES", 100)
    again = read_gguf(path)
    assert again.metadata == whole.metadata and again.tensor_infos() == whole.tensor_infos()
    assert (again.tensor("blk.0.ffn_up.weight") == whole.tensor("blk.0.ffn_up.weight")).all()
    bad = raw_gguf(
        tmp_path / "bad.gguf", [_kv("x", 9, struct.pack("<IQ", 8, 3) + _str("a") * 2 + struct.pack("<Q", 100))]
    )
    with pytest.raises(TinkerError, match=r"metadata key x, item 2 runs past the end of the file"):
        read_gguf(bad)


def test_tokenizer_json_bounded(tmp_path, monkeypatch):
    """tokenizer.json is size-checked before the tokenizers library parses it."""
    from tiny import make_hf_model

    make_hf_model("llama", tmp_path)
    Tokenizer.from_hf_dir(tmp_path)  # within the limits
    monkeypatch.setattr(limits, "MAX_JSON_BYTES", 1024)
    with pytest.raises(TinkerError, match=r"tokenizer.json: \d+ bytes, over the limit of 1024"):
        Tokenizer.from_hf_dir(tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(limits, "MAX_VOCAB", 10)
    with pytest.raises(TinkerError, match="tokenizer.json: the vocabulary size is"):
        Tokenizer.from_hf_dir(tmp_path)
