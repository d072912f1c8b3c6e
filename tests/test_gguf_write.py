"""Writing GGUF: the streaming atomic writer, architecture metadata from HF configs, the tokenizer as metadata.

Files are read back by tinkerlm's reader and by the `gguf` package's GGUFReader (an independent parser); where
llama-cpp-python is installed, llama.cpp itself loads a written model and tokenizes with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from ggufwriter import quantize_q4_k
from peers import llama_cpp_model
from tiny import CONFIGS, VOCAB, write_tokenizer

from tinkerlm.errors import TinkerError
from tinkerlm.formats import specs
from tinkerlm.formats.gguf import read_gguf
from tinkerlm.formats.gguf_write import TensorPlan, Typed, write_gguf
from tinkerlm.formats.tokenizer import Tokenizer

TEXTS = [
    "Grüße, 世界! def f(x): return x**2 🙂🚀 … naïve café",
    "for i in range(10):\n\tprint(i)  # 2024-12-01 3.14159 1314151 \n\n\n   trailing  ",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL ------======= нещо на Български",
    '🦙🦙 😶\u200d🌫️ ✅ कान्तिः ?我想在apple工作1314151天～ <b>html</b> {"json": [1, 2]}',
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] hi [/INST]</s> ÿ\x00\x7f",
]


def plan(name: str, qtype: str, array: np.ndarray, shape=None) -> TensorPlan:
    return TensorPlan(name, qtype, tuple(shape or array.shape), lambda: array)


# ---------------------------------------------------------------------------------------------------------------
# The writer


def test_write_reads_back_with_both_readers(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    q8 = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    tensors = [
        plan("a.f32", "F32", rng.standard_normal((3, 5)).astype(np.float32)),  # 60 bytes: the next one is padded
        plan("b.f16", "F16", rng.standard_normal((7,)).astype(np.float16)),
        plan("c.bf16", "BF16", rng.integers(0, 2**16, (2, 8), dtype=np.uint16)),
        plan("d.q8_0", "Q8_0", q8, shape=(4, 256)),
        plan("e.q4_k", "Q4_K", quantize_q4_k(w), shape=(4, 256)),
    ]
    metadata = {
        "general.architecture": "llama",
        "x.bool": True,
        "x.uint32": 7,
        "x.int32": -7,
        "x.uint64": 2**40,
        "x.float": 0.1,
        "x.str": "héllo",
        "x.strs": ["a", "", "世界"],
        "x.ints": [1, -2, 3],
        "x.floats": [0.5, -1.25],
        "x.empty": [],
        "x.typed": Typed(5, "UINT64"),
        "x.typed_array": Typed([1, 2], "UINT32"),
    }
    path = write_gguf(tmp_path / "m.gguf", metadata, tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]

    ckpt = read_gguf(path)
    expected = {**metadata, "x.float": float(np.float32(0.1)), "x.typed": 5, "x.typed_array": [1, 2]}
    assert ckpt.metadata == expected
    reader = gguf.GGUFReader(path)
    types = {f.name: [gguf.GGUFValueType(t).name for t in f.types] for f in reader.fields.values()}
    assert types["general.architecture"] == ["STRING"]
    assert types["x.bool"] == ["BOOL"]
    assert types["x.uint32"] == ["UINT32"]
    assert types["x.int32"] == ["INT32"]
    assert types["x.uint64"] == ["UINT64"]
    assert types["x.float"] == ["FLOAT32"]
    assert types["x.strs"] == ["ARRAY", "STRING"]
    assert types["x.ints"] == ["ARRAY", "INT32"]
    assert types["x.floats"] == ["ARRAY", "FLOAT32"]
    assert types["x.typed"] == ["UINT64"]
    assert types["x.typed_array"] == ["ARRAY", "UINT32"]
    assert list(reader.fields)[3] == "general.architecture"  # first after the header fields

    assert [t.name for t in reader.tensors] == [t.name for t in tensors]
    for t, info in zip(tensors, reader.tensors):
        assert info.tensor_type.name == t.qtype
        assert tuple(int(d) for d in reversed(info.shape.tolist())) == t.shape
        assert info.data_offset % 32 == 0
        assert np.asarray(info.data).tobytes() == t.produce().tobytes()
        raw = ckpt._tensors[t.name]
        assert np.asarray(raw.data).tobytes() == t.produce().tobytes()
    np.testing.assert_array_equal(ckpt.tensor("a.f32").numpy(), tensors[0].produce())


def test_error_mid_write_leaves_no_file(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"the old file")

    def boom():
        raise ValueError("quantizer failed")

    ok = plan("a", "F32", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="quantizer failed"):
        write_gguf(target, {"general.architecture": "llama"}, [ok, TensorPlan("b", "F32", (4,), boom)])
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert target.read_bytes() == b"the old file"  # the old file stays until a whole new one replaces it

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_gguf(tmp_path / "n.gguf", {}, [ok, TensorPlan("b", "F32", (4,), interrupted)])
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_produced_size_or_dtype_differing_from_the_plan_is_an_internal_error(tmp_path):
    with pytest.raises(RuntimeError, match="internal error: tensor a .* 12 bytes, expected float32 with 16"):
        write_gguf(tmp_path / "m.gguf", {}, [TensorPlan("a", "F32", (4,), lambda: np.zeros(3, np.float32))])
    with pytest.raises(RuntimeError, match="internal error: tensor a"):
        write_gguf(tmp_path / "m.gguf", {}, [TensorPlan("a", "F32", (2,), lambda: np.zeros(1, np.float64))])
    assert list(tmp_path.iterdir()) == []


def test_tensors_are_produced_one_at_a_time(tmp_path):
    """Peak memory is one tensor (plus the header), not the file: each tensor is made when written, then dropped."""
    import tracemalloc

    size = 1 << 20  # 4 MiB of float32 a tensor, 32 MiB in all
    alive = []

    def make(i):
        def produce():
            alive.append(i)
            return np.full(size, i, np.float32)

        return produce

    plans = [TensorPlan(f"t{i}", "F32", (size,), make(i)) for i in range(8)]
    tracemalloc.start()
    try:
        path = write_gguf(tmp_path / "m.gguf", {}, plans)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert alive == list(range(8))
    assert size * 4 <= peak < 2.5 * size * 4, peak  # one tensor is seen, never three
    assert read_gguf(path).tensor("t7")[0] == 7


def test_bad_plans_and_values_are_refused_before_writing(tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(TinkerError, match="rows of 100 values are not whole 256-value blocks of type Q4_K"):
        write_gguf(out, {}, [TensorPlan("w", "Q4_K", (2, 100), lambda: None)])
    with pytest.raises(TinkerError, match="unknown GGML tensor type 'Q9_Z'"):
        write_gguf(out, {}, [TensorPlan("w", "Q9_Z", (2, 32), lambda: None)])
    with pytest.raises(TinkerError, match="tensor w is planned twice"):
        write_gguf(out, {}, [plan("w", "F32", np.zeros(2, np.float32))] * 2)
    with pytest.raises(TinkerError, match="metadata key x.d: dict value"):
        write_gguf(out, {"x.d": {"a": 1}}, [])
    with pytest.raises(TinkerError, match="outside the range of UINT32"):
        write_gguf(out, {"x.n": Typed(-1, "UINT32")}, [])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Architecture metadata: gguf_config(read(write(gguf_metadata(c)))) gives c back


def hf_config(kind: str) -> dict:
    import transformers

    cls, kwargs = CONFIGS[kind]
    return json.loads(getattr(transformers, cls)(**kwargs).to_json_string())


def config_plans(spec, config: dict) -> list[TensorPlan]:
    """Zero F32 tensors under every GGUF name the config's model has (from the transformers model's parameters),
    shaped as the spec says, plus the spec's extra tensors."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    names = [n for n in model.state_dict() if not (n == "lm_head.weight" and config.get("tie_word_embeddings"))]
    shapes = spec.shapes(spec.with_defaults(config))
    plans = []
    for hf in names:
        name = spec.gguf_name(hf)
        assert name is not None, hf
        _, template, _ = spec.hf_name(name)
        shape = shapes[spec.tensor_names[template]]
        plans.append(TensorPlan(name, "F32", shape, lambda shape=shape: np.zeros(shape, np.float32)))
    for name, array in spec.gguf_extra_tensors(config).items():
        plans.append(plan(name, "F32", array))
    return plans


LINEAR = dict(CONFIGS["llama"][1], rope_scaling={"rope_type": "linear", "factor": 4.0})
# Rows GGUF cannot hold: their writers refuse them (tests/test_rope_scaling.py: llama.cpp's qwen2 has no sliding
# window). Mixture-of-experts rows: GGUF stacks each layer's experts in one tensor, which the writer does not build
# yet (tinkerlm/formats/specs/moe.py); tests/test_moe.py covers their metadata round trip and llama.cpp's logits.
NOT_GGUF = {"qwen2-window"}
WRITABLE = [k for k in CONFIGS if k not in NOT_GGUF and CONFIGS[k][0] not in ("MixtralConfig", "Qwen3MoeConfig")]


@pytest.mark.parametrize("kind", [*WRITABLE, "llama-linear"])
def test_config_round_trip(tmp_path, kind):
    from tinkerlm.models.base import rope_inv_freq

    if kind == "llama-linear":
        import transformers

        config = json.loads(transformers.LlamaConfig(**LINEAR).to_json_string())
    else:
        config = hf_config(kind)
    spec = specs.for_model_type(config["model_type"])
    metadata = spec.gguf_metadata(config)
    arch = specs.gguf_architecture(config["model_type"])
    assert metadata["general.architecture"] == arch
    path = write_gguf(tmp_path / "m.gguf", metadata, config_plans(spec, config))
    ckpt = read_gguf(path)
    got = ckpt.config()
    ckpt.hf_names()  # every tensor's shape agrees with the config read back

    want = spec.with_defaults(config)
    want["model_type"] = specs.gguf_model_type(arch)  # Mistral comes back as llama, as llama.cpp's converter writes
    if config["model_type"] == "gpt2":
        want["n_inner"] = want.get("n_inner") or 4 * want["n_embd"]
    elif config["model_type"] == "gemma3_text":  # RoPE per layer type; the rest llama.cpp fixes for gemma3
        want["rope_theta"] = config["rope_parameters"]["full_attention"]["rope_theta"]
        want["rope_local_base_freq"] = config["rope_parameters"]["sliding_attention"]["rope_theta"]
    else:
        params = config.get("rope_parameters") or {}
        want["rope_theta"] = params.get("rope_theta", 10000.0)
        want["rope_scaling"] = None if params.get("rope_type") in ("default", "llama3") else params
        want["head_dim"] = want.get("head_dim") or want["hidden_size"] // want["num_attention_heads"]
        want["num_key_value_heads"] = want.get("num_key_value_heads") or want["num_attention_heads"]
        want["attention_bias"] = bool(want.get("attention_bias"))
        if config["model_type"] == "phi3":  # partial rotary; LongRoPE's factors come back from their F32 tensors
            want["partial_rotary_factor"] = params.get("partial_rotary_factor", 1.0)
            factors = {k: np.float32(params[k]).tolist() for k in ("short_factor", "long_factor")}
            want["rope_scaling"] = {"rope_type": "longrope", **factors}
    for key, value in got.items():
        if key in ("bos_token_id", "eos_token_id", "architectures", "rope_freq_factors"):
            continue
        if key == "rope_scaling" and value is not None:  # the keys GGUF holds (linear: the factor alone)
            assert value == {k: want[key][k] for k in value}, value
        elif isinstance(value, float):
            assert value == np.float32(want[key]), key  # stored as FLOAT32
        else:
            assert value == want[key], key
    if (config.get("rope_parameters") or {}).get("rope_type") == "llama3":
        # llama3 scaling is stored as llama.cpp's per-frequency divisors: the same frequencies either way.
        hd = got["head_dim"]
        expected = rope_inv_freq(hd, got["rope_theta"], config["rope_parameters"])
        stored = rope_inv_freq(hd, got["rope_theta"], None, got["rope_freq_factors"])
        np.testing.assert_allclose(stored.numpy(), expected.numpy(), rtol=1e-6)
        assert not np.allclose(stored.numpy(), rope_inv_freq(hd, got["rope_theta"]).numpy())
    else:
        assert "rope_freq_factors" not in got


def test_config_read_from_gguf_writes_back_the_same_metadata(tmp_path):
    """A config read from a GGUF (rope_freq_factors, no rope_parameters) is written as that file was."""
    config = hf_config("llama3-tied")
    spec = specs.for_model_type("llama")
    first = write_gguf(tmp_path / "a.gguf", spec.gguf_metadata(config), config_plans(spec, config))
    again = read_gguf(first).config()
    assert "rope_parameters" not in again and "rope_freq_factors" in again
    plans = [p for p in config_plans(spec, config) if p.name != "rope_freqs.weight"]
    plans += [plan(name, "F32", array) for name, array in spec.gguf_extra_tensors(again).items()]
    second = write_gguf(tmp_path / "b.gguf", spec.gguf_metadata(again), plans)
    assert read_gguf(second).metadata == read_gguf(first).metadata
    assert first.read_bytes() == second.read_bytes()


def test_gguf_architecture_inverts_gguf_architectures():
    for model_type in specs.model_types():
        arch = specs.gguf_architecture(model_type)
        metadata = {f"{arch}.expert_count": 8} if model_type == "mixtral" else {}  # "llama" with experts
        assert specs.for_gguf(arch, metadata=metadata) is specs.for_model_type(model_type)
        assert specs.gguf_model_type(arch) == ("llama" if model_type in ("mistral", "mixtral") else model_type)
    with pytest.raises(TinkerError, match="'bert' is not supported"):
        specs.gguf_architecture("bert")


def test_unsupported_rope_scaling_is_refused():
    config = dict(hf_config("llama"), rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    with pytest.raises(TinkerError, match="rope scaling type 'dynamic' cannot be written to GGUF"):
        specs.for_model_type("llama").gguf_metadata(config)


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer as GGUF metadata


def assert_same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    for text in TEXTS:
        for special in (True, False):
            assert b.encode(text, add_special_tokens=special) == a.encode(text, add_special_tokens=special), text
        assert b.decode(a.encode(text)) == a.decode(a.encode(text))
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "stop_token_ids", "chat_template"):
        assert getattr(b, name) == getattr(a, name), name
    special = {i: t.content for i, t in a.backend.get_added_tokens_decoder().items() if t.special}
    assert {i: t.content for i, t in b.backend.get_added_tokens_decoder().items() if t.special} == special


def through_file(tmp_path: Path, metadata: dict) -> Tokenizer:
    """The tokenizer read back from a GGUF file holding `metadata` (types through the writer)."""
    path = write_gguf(tmp_path / "tok.gguf", {"general.architecture": "llama", **metadata}, [])
    return read_gguf(path).tokenizer()


def test_smollm2_tokenizer_from_gguf_is_given_back_unchanged(tmp_path, smollm2_gguf):
    ckpt = read_gguf(smollm2_gguf)
    tok = ckpt.tokenizer()
    meta = tok.gguf_metadata()
    assert meta == {k: v for k, v in ckpt.metadata.items() if k.startswith("tokenizer.")}
    assert_same_tokenizer(tok, Tokenizer.from_gguf_metadata(meta, "m.gguf"))
    assert_same_tokenizer(tok, through_file(tmp_path, meta))

    tok.chat_template = "{{ messages[0]['content'] }}"  # a replaced template is the one written
    assert tok.gguf_metadata()["tokenizer.chat_template"] == tok.chat_template


def test_smollm2_tokenizer_from_tokenizer_json(tmp_path, smollm2_gguf):
    """SmolLM2's tokenizer written as tokenizer.json and described again: the same keys llama.cpp's converter
    wrote (pre "smollm": digits isolated, then GPT-2's pattern), the same ids."""
    ckpt = read_gguf(smollm2_gguf)
    tok = ckpt.tokenizer()
    tok.save_hf(tmp_path / "hf")
    hf = Tokenizer.from_hf_dir(tmp_path / "hf")
    assert hf.encode("x 2024") == [104, 216, 34, 32, 34, 36]  # one digit a token
    meta = hf.gguf_metadata()
    source = ckpt.metadata
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "add_bos_token"):
        assert meta[f"tokenizer.ggml.{key}"] == source[f"tokenizer.ggml.{key}"], key
    assert meta["tokenizer.chat_template"] == source["tokenizer.chat_template"]
    assert_same_tokenizer(hf, Tokenizer.from_gguf_metadata(meta, "m.gguf"))
    assert_same_tokenizer(hf, through_file(tmp_path, meta))


def test_tiny_byte_level_tokenizer_padded_to_the_model_vocabulary(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, 256]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    meta = tok.gguf_metadata(vocab_size=VOCAB)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) == VOCAB
    assert meta["tokenizer.ggml.tokens"][-1] == f"[PAD{VOCAB - 1}]"
    assert meta["tokenizer.ggml.token_type"][256:260] == [3, 3, 3, 5]  # control for the specials, then unused
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.merges"] == []
    assert meta["tokenizer.ggml.eot_token_id"] == 256  # a stop id beyond EOS
    back = through_file(tmp_path, meta)
    assert back.vocab_size == VOCAB
    assert_same_tokenizer(tok, back)
    with pytest.raises(TinkerError, match="259 tokens, more than the model's vocabulary of 100"):
        tok.gguf_metadata(vocab_size=100)


def sentencepiece_dir(path: Path) -> Path:
    """A Llama 2 style tokenizer.json: a sentencepiece BPE model with byte fallback, trained here, converted with
    transformers' own extractor (vocabulary, and merges ordered as transformers orders them)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    corpus = [t for t in TEXTS if "<" not in t] + ["the quick brown fox jumps over the lazy dog"] * 5
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 10),
        model_prefix=str(path / "sp"),
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    found = SentencePieceExtractor(str(path / "sp.model")).extract(models.BPE)
    backend = Backend(models.BPE(found["vocab"], found["merges"], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    out = path / "hf"
    out.mkdir()
    backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return out


def test_sentencepiece_style_tokenizer(tmp_path):
    tok = Tokenizer.from_hf_dir(sentencepiece_dir(tmp_path))
    meta = tok.gguf_metadata()
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    types = meta["tokenizer.ggml.token_type"]
    tokens = meta["tokenizer.ggml.tokens"]
    assert types[:3] == [2, 3, 3]  # <unk> unknown, <s> and </s> control
    assert {t for t, k in zip(tokens, types) if k == 6} == {f"<0x{b:02X}>" for b in range(256)}
    assert_same_tokenizer(tok, Tokenizer.from_gguf_metadata(meta, "m.gguf"))
    assert_same_tokenizer(tok, through_file(tmp_path, meta))
    # llama.cpp reads a "llama" vocabulary's scores, not its merges: the scores alone rank the merges the same.
    del meta["tokenizer.ggml.merges"]
    assert_same_tokenizer(tok, Tokenizer.from_gguf_metadata(meta, "m.gguf"))
    assert tok.encode("x" * 3 + " 世界 🙂")[:1] == [1]


# The split patterns of Llama 3's and Qwen2's tokenizer.json, as those files spell them.
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.mark.parametrize(
    "pattern, pre", [(LLAMA3, "llama-bpe"), (QWEN2, "qwen2"), (r"\s+|\S+", "gpt-2")], ids=["llama3", "qwen2", "other"]
)
def test_pre_is_named_from_the_split_pattern(tmp_path, caplog, pattern, pre):
    from tokenizers import Regex, pre_tokenizers

    write_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["model"]["vocab"].update({"ĠĠ": 259 + 3, "12": 259 + 4})  # merges so that the pattern decides the ids
    data["model"]["merges"] = [["Ġ", "Ġ"], ["1", "2"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    tok = Tokenizer.from_hf_dir(tmp_path)
    tok.backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    with caplog.at_level("WARNING", logger="tinkerlm.formats.tokenizer"):
        meta = tok.gguf_metadata()
    assert meta["tokenizer.ggml.pre"] == pre
    assert ("no llama.cpp pre-tokenizer is known" in caplog.text) == (pre == "gpt-2")
    if pre != "gpt-2":
        assert_same_tokenizer(tok, Tokenizer.from_gguf_metadata(meta, "m.gguf"))


@pytest.mark.parametrize("kind", WRITABLE)
def test_llama_cpp_runs_a_written_model_as_transformers_does(tmp_path, kind):
    """llama.cpp accepts every key's type, tokenizes as tinkerlm does and reads the config as transformers means it
    (RoPE base and scaling, head sizes, epsilons): its logits equal transformers' on the same weights."""
    import torch
    from tiny import make_hf_model

    pytest.importorskip("llama_cpp")
    model = make_hf_model(kind, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    spec = specs.for_model_type(config["model_type"])
    tok = Tokenizer.from_hf_dir(tmp_path / "hf")
    metadata = {**spec.gguf_metadata(config), **tok.gguf_metadata(vocab_size=config["vocab_size"])}
    metadata["general.file_type"] = 0  # all F32
    plans = []
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        array = tensor.float().numpy() + spec.value_shift(hf)  # Gemma's norms are stored as 1 + w
        if spec.is_conv1d(hf):
            array = array.T
        order = spec.row_order(hf, config, array.shape[0], to_gguf=True)
        plans.append(plan(spec.gguf_name(hf), "F32", np.ascontiguousarray(array if order is None else array[order])))
    plans += [plan(name, "F32", array) for name, array in spec.gguf_extra_tensors(config).items()]
    path = write_gguf(tmp_path / "m.gguf", metadata, plans)

    llm = llama_cpp_model(path, n_ctx=32, logits_all=True, verbose=False)
    text = "hé 🙂"  # 8 byte tokens: within Mistral's window of 8, which llama.cpp does not apply
    ids = tok.encode(text, add_special_tokens=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert (llm.token_bos(), llm.token_eos(), llm.n_vocab()) == (tok.bos_token_id, tok.eos_token_id, VOCAB)
    llm.eval(ids)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    # ggml's GELU (Gemma's MLP) reads an fp16 table: a few logits differ by up to ~0.006 there.
    atol = 1e-2 if config["model_type"] == "gemma3_text" else 2e-3
    np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), want, atol=atol, rtol=1e-3)
