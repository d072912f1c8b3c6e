"""GGUF reading: tiny files written here with `gguf.GGUFWriter`, read back through `read_gguf`.

Checks every tensor against the `gguf` package's own dequantization of the raw bytes, the q/k un-permutation
against llama.cpp's permutation, the HF config and names, and that bad files fail with one line naming the file.
"""

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from ggufwriter import gguf_name, llamacpp_permute, write_gguf

from tinkerlm.errors import TinkerError
from tinkerlm.formats.gguf import read_gguf

QTYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


def llama_weights(
    rng, *, vocab=96, hidden=64, layers=2, heads=4, kv=2, ffn=128, head_dim=16, bias=False, qk_norm=False, tied=False
):
    """HF-layout fp32 weights for a tiny Llama-family model."""

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": r(hidden)}
    if not tied:
        w["lm_head.weight"] = r(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": r(hidden),
            p + "post_attention_layernorm.weight": r(hidden),
            p + "self_attn.q_proj.weight": r(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": r(kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": r(kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": r(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": r(ffn, hidden),
            p + "mlp.up_proj.weight": r(ffn, hidden),
            p + "mlp.down_proj.weight": r(hidden, ffn),
        }
        if bias:
            w |= {
                p + "self_attn.q_proj.bias": r(heads * head_dim),
                p + "self_attn.k_proj.bias": r(kv * head_dim),
                p + "self_attn.v_proj.bias": r(kv * head_dim),
                p + "self_attn.o_proj.bias": r(hidden),
            }
        if qk_norm:
            w |= {p + "self_attn.q_norm.weight": r(head_dim), p + "self_attn.k_norm.weight": r(head_dim)}
    return w


def gpt2_weights(rng, *, vocab=96, embd=64, layers=2, positions=32, inner=128):
    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w = {
        "transformer.wte.weight": r(vocab, embd),
        "transformer.wpe.weight": r(positions, embd),
        "transformer.ln_f.weight": r(embd),
        "transformer.ln_f.bias": r(embd),
        "lm_head.weight": r(vocab, embd),
    }
    for i in range(layers):
        p = f"transformer.h.{i}."
        for name, shape in [
            ("ln_1", (embd,)),
            ("ln_2", (embd,)),
            ("attn.c_attn", (3 * embd, embd)),
            ("attn.c_proj", (embd, embd)),
            ("mlp.c_fc", (inner, embd)),
            ("mlp.c_proj", (embd, inner)),
        ]:
            w[p + name + ".weight"] = r(*shape)
            w[p + name + ".bias"] = r(shape[0])
    return w


def raw_dequantized(path) -> dict[str, torch.Tensor]:
    """Each tensor as the gguf package dequantizes it, in torch shape order."""
    reader = gguf.GGUFReader(path)
    return {
        t.name: torch.from_numpy(
            np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
                tuple(reversed(t.shape.tolist()))
            )
        )
        for t in reader.tensors
    }


def unpermute_np(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `llamacpp_permute`, found by applying the permutation to row indices."""
    order = llamacpp_permute(np.arange(w.shape[0]), n_head)  # stored row j holds original row order[j]
    out = torch.empty_like(w)
    out[torch.from_numpy(order)] = w
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_llama_every_tensor_matches_gguf_dequantize(tmp_path, rng, qtype):
    weights = llama_weights(rng, bias=True)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", weights, qtype=qtype)
    ckpt = read_gguf(path)
    sd = ckpt.state_dict()
    raw = raw_dequantized(path)
    assert set(sd) == set(weights)
    for hf, tensor in sd.items():
        name = gguf_name(hf)
        expected = raw[name]
        if ".attn_q." in name or ".attn_k." in name:
            expected = unpermute_np(expected, 4 if ".attn_q." in name else 2)
        assert tensor.dtype == torch.float32 and tensor.shape == tuple(weights[hf].shape), hf
        assert torch.equal(tensor, expected), hf
        # quantization error stays small, so the un-permuted rows line up with the originals
        assert torch.allclose(tensor, torch.from_numpy(weights[hf]), atol=0.5 if qtype in (Q.Q4_0, Q.Q4_1) else 0.02)
    n_2d = sum(v.ndim == 2 for v in weights.values())
    assert ckpt.tensor_types() == (
        {"F32": len(weights)} if qtype == Q.F32 else {"F32": len(weights) - n_2d, qtype.name: n_2d}
    )


def test_llama_unpermute_gives_original_hf_layout(tmp_path, rng):
    weights = llama_weights(rng, bias=True)
    path = tmp_path / "tiny.gguf"
    stored = write_gguf(path, "llama", weights)
    # the file really holds permuted rows, so a missing un-permute would fail below
    assert not np.array_equal(stored["blk.0.attn_q.weight"], weights["model.layers.0.self_attn.q_proj.weight"])
    assert not np.array_equal(stored["blk.1.attn_k.bias"], weights["model.layers.1.self_attn.k_proj.bias"])
    sd = read_gguf(path).state_dict()
    for hf, value in weights.items():
        assert torch.equal(sd[hf], torch.from_numpy(value)), hf


def test_llama_config(tmp_path, rng):
    path = tmp_path / "tiny.gguf"
    freqs = np.linspace(1, 8, 8).astype(np.float32)
    write_gguf(
        path,
        "llama",
        llama_weights(rng, tied=True),
        meta={"rope.freq_base": 500000.0, "rope.scaling.type": "linear", "rope.scaling.factor": 2.0},
        extra={"rope_freqs.weight": freqs},
    )
    ckpt = read_gguf(path)
    config = ckpt.config()
    assert config == {
        "model_type": "llama",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": pytest.approx(1e-5),
        "rope_theta": 500000.0,
        "max_position_embeddings": 32,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "rope_freq_factors": freqs.tolist(),
        "bos_token_id": 0,
        "eos_token_id": 0,
        "architectures": ["LlamaForCausalLM"],
    }
    sd = ckpt.state_dict()
    assert "lm_head.weight" not in sd and not any("rope" in k for k in sd)
    assert ckpt.metadata["llama.context_length"] == 32
    assert ckpt.metadata["tokenizer.ggml.tokens"][:2] == ["<|endoftext|>", "Ġ"]
    tok = ckpt.tokenizer()
    assert tok.encode("he the") == [tok.backend.token_to_id(t) for t in ["he", "Ġt", "he"]]


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_qwen3_not_permuted_with_qk_norm_and_head_dim(tmp_path, rng, qtype):
    # head_dim 32 with hidden 64 and 4 heads: q has 128 rows, so head_dim must come from key_length
    weights = llama_weights(rng, head_dim=32, qk_norm=True)
    path = tmp_path / "qwen3.gguf"
    write_gguf(path, "qwen3", weights, qtype=qtype, meta={"attention.key_length": 32, "attention.value_length": 32})
    ckpt = read_gguf(path)
    config = ckpt.config()
    assert (config["model_type"], config["head_dim"], config["attention_bias"]) == ("qwen3", 32, False)
    sd = ckpt.state_dict()
    raw = raw_dequantized(path)
    assert set(sd) == set(weights)
    for hf, tensor in sd.items():
        assert torch.equal(tensor, raw[gguf_name(hf)]), hf
    if qtype == Q.F32:
        assert torch.equal(
            sd["model.layers.0.self_attn.q_proj.weight"],
            torch.from_numpy(weights["model.layers.0.self_attn.q_proj.weight"]),
        )


def test_qwen2_biases_not_permuted(tmp_path, rng):
    weights = llama_weights(rng, bias=True)
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, "qwen2", weights)
    ckpt = read_gguf(path)
    assert ckpt.config()["model_type"] == "qwen2" and ckpt.config()["attention_bias"] is True
    sd = ckpt.state_dict()
    for hf, value in weights.items():
        assert torch.equal(sd[hf], torch.from_numpy(value)), hf


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q4_0], ids=lambda q: q.name)
def test_gpt2(tmp_path, rng, qtype):
    weights = gpt2_weights(rng)
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "gpt2", weights, qtype=qtype, meta={"attention.layer_norm_epsilon": 1e-5})
    ckpt = read_gguf(path)
    assert ckpt.config() == {
        "model_type": "gpt2",
        "vocab_size": 96,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 32,
        "n_inner": 128,
        "layer_norm_epsilon": pytest.approx(1e-5),
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "architectures": ["GPT2LMHeadModel"],
    }
    sd = ckpt.state_dict()
    raw = raw_dequantized(path)
    assert set(sd) == set(weights)
    for hf, tensor in sd.items():
        assert tensor.shape == weights[hf].shape, hf  # nn.Linear layout (out, in)
        assert torch.equal(tensor, raw[gguf_name(hf)]), hf


def test_real_file_dequantizes_like_gguf(smollm2_gguf):
    """The default model's Q4_1/Q8_0 tensors (dequantized by the kernels), spot-checked against the gguf package."""
    ckpt = read_gguf(smollm2_gguf)
    assert ckpt.config()["model_type"] == "llama"
    assert ckpt.tensor_types() == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    sd = ckpt.state_dict()
    reader = gguf.GGUFReader(smollm2_gguf)
    tensors = {t.name: t for t in reader.tensors}
    for hf, name in [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.layers.3.mlp.down_proj.weight", "blk.3.ffn_down.weight"),
    ]:
        t = tensors[name]
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        assert torch.equal(sd[hf], torch.from_numpy(np.array(expected, dtype=np.float32))), hf


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"])
def test_kernel_dequantization_is_ggufs_bit_for_bit(type_name):
    """GGUF tensors of these types are dequantized by the C++ kernels (5x faster than gguf's numpy on a real file),
    which must give gguf's own fp32 bits: exports check the tensors they keep exact against the source with
    torch.equal, and parity tests compare against gguf. The products d * q are exact in fp32, so every build (fused
    multiply-adds or not) rounds as gguf; a self-check per process would fall back to gguf otherwise, and this test
    fails then too. Random blocks, every byte random but the scales (random finite fp16 of both signs, down to
    subnormals), for rows that are and are not whole groups of 16. Q4_0's, Q6_K's and Q3_K's zero integers (u = 8,
    32, 4) under negative scales are -0.0 in gguf, so the comparison of bits checks the signs of zeros too."""
    from tinkerlm import kernels
    from tinkerlm.formats import gguf as ours

    if kernels.ops() is None:
        pytest.skip("no kernels: gguf's dequantizer runs")
    per, nbytes, scales = {"Q8_0": (32, 34, [0]), "Q4_0": (32, 18, [0]), "Q4_1": (32, 20, [0, 2]),
                           "Q4_K": (256, 144, [0, 2]), "Q5_K": (256, 176, [0, 2]),
                           "Q6_K": (256, 210, [208]), "Q3_K": (256, 110, [108]),
                           "Q2_K": (256, 84, [80, 82])}[type_name]  # fmt: skip
    rng = np.random.default_rng(5)
    for rows, K in [(48, 512), (37, 768), (1, 256)]:
        raw = rng.integers(0, 256, (rows, K // per, nbytes), dtype=np.uint8)
        for at in scales:
            values = rng.normal(0, 1, raw.shape[:2]) * 10.0 ** rng.integers(-7, 3, raw.shape[:2])
            raw[:, :, at : at + 2] = values.astype(np.float16)[..., None].view(np.uint8)
        raw = raw.reshape(rows, -1)
        got = ours._kernel_dequantize(raw, type_name, (rows, K))
        want = gguf.quants.dequantize(raw, Q[type_name]).reshape(rows, K).astype(np.float32)
        assert got is not None, f"{kernels.ops().isa} build: the kernels do not dequantize {type_name} as gguf"
        assert got.dtype == torch.float32
        assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32)), (type_name, rows, K)
        if type_name in ("Q4_0", "Q6_K", "Q3_K"):
            assert (np.signbit(want) & (want == 0)).any()  # negative zeros were there to get right
    assert ours._kernel_dequantize(np.zeros((16, 136), np.uint8), "IQ4_NL", (16, 256)) is None  # no kernels' type


# --- bad input: one TinkerError naming the file ---


@pytest.fixture
def valid(tmp_path, rng):
    path = tmp_path / "valid.gguf"
    write_gguf(path, "llama", llama_weights(rng, layers=2))
    return path


def fails(path, what="state_dict"):
    with pytest.raises(TinkerError) as info:
        ckpt = read_gguf(path)
        getattr(ckpt, what)()
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert "no such file" in fails(tmp_path / "nope.gguf")


def test_wrong_magic(tmp_path, valid):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + valid.read_bytes()[4:])
    assert "not a GGUF file" in fails(bad)


@pytest.mark.parametrize("version", [1, 4])
def test_unsupported_version(tmp_path, valid, version):
    data = bytearray(valid.read_bytes())
    data[4:8] = struct.pack("<I", version)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    assert f"version {version}" in fails(bad)


@pytest.mark.parametrize("keep", [-7, -5000, 200, 6])
def test_truncated(tmp_path, valid, keep):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(valid.read_bytes()[:keep])
    assert "truncated" in fails(bad)


def test_unknown_architecture(tmp_path, rng):
    path = tmp_path / "bert.gguf"
    write_gguf(path, "bert", llama_weights(rng), permute=False)
    message = fails(path, "config")
    assert "'bert'" in message and all(a in message for a in ("llama", "mistral", "qwen2", "qwen3", "gpt2"))
    fails(path, "state_dict")


def test_metadata_contradicts_tensor_shape(tmp_path, rng):
    path = tmp_path / "bad.gguf"
    write_gguf(path, "llama", llama_weights(rng), meta={"vocab_size": 100})
    message = fails(path)
    assert "token_embd.weight" in message and "(96, 64)" in message and "(100, 64)" in message


def test_ffn_length_contradicts_tensor_shape(tmp_path, rng):
    path = tmp_path / "bad.gguf"
    write_gguf(path, "llama", llama_weights(rng), meta={"feed_forward_length": 96})
    message = fails(path)
    assert "blk.0.ffn_gate.weight" in message and "(128, 64)" in message and "(96, 64)" in message


def test_unused_tensor(tmp_path, rng):
    path = tmp_path / "extra.gguf"
    write_gguf(
        path,
        "llama",
        llama_weights(rng),
        extra={"blk.0.mystery.weight": np.zeros(64, np.float32), "blk.7.attn_norm.weight": np.zeros(64, np.float32)},
    )
    message = fails(path)
    assert "blk.0.mystery.weight" in message and "blk.7.attn_norm.weight" in message


def test_missing_tensor(tmp_path, rng):
    weights = llama_weights(rng)
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = tmp_path / "missing.gguf"
    write_gguf(path, "llama", weights)
    assert "blk.1.ffn_up.weight" in fails(path)


def test_unsupported_rope_scaling(tmp_path, rng):
    path = tmp_path / "longrope.gguf"
    write_gguf(path, "llama", llama_weights(rng), meta={"rope.scaling.type": "longrope", "rope.scaling.factor": 4.0})
    assert "longrope" in fails(path, "config")


# ----------------------------------------------------------------------------------------------------------------
# Q4_K, the usual 4-bit K-quant: kept 4-bit (packed in its own bits, X4K; without the kernels as Q4_1 blocks), not
# requantized to 8 bits


def test_q4_k_tensor_becomes_q4_1_blocks(rng):
    from ggufwriter import quantize_q4_k

    from tinkerlm.quant.qtensor import from_gguf

    w = rng.standard_normal((16, 512)).astype(np.float32)
    raw = quantize_q4_k(w)
    ref = gguf.quants.dequantize(raw, Q.Q4_K).reshape(16, 512)  # the gguf package's reading of our bytes
    assert np.abs(ref - w).max() <= 0.55 * (w.max() - w.min()) / 15  # the writer is a real quantizer
    qt = from_gguf(raw, "Q4_K", (16, 512)).as_blocks()
    assert qt.qtype == "Q4_1" and qt.nbytes == 16 * 512 // 32 * 20
    err = np.abs(qt.dequantize().numpy() - ref).reshape(16, 16, 32).max(-1)
    # only each 32-value sub-block's scale d and offset m are rounded (to fp16, <= 2^-11 relative each): the
    # error is at most 2^-11 * (15 |d| + |m|), plus fp32 rounding
    d, m, _ = qt.fields()
    bound = 2.0**-11 * (15 * d.abs() + m.abs()).numpy() * 1.01 + 1e-6
    assert (err <= bound).all() and err.max() > 0


@pytest.mark.parametrize("qtype,held", [(Q.Q4_K, "Q4_K"), (Q.Q5_0, "Q5_1")], ids=["Q4_K", "Q5_0"])
def test_k_and_5_bit_models_run_native_close_to_fp32(tmp_path, rng, qtype, held):
    import tinkerlm
    from tinkerlm.quant import QLinear

    path = tmp_path / "m.gguf"
    weights = llama_weights(rng, vocab=96, hidden=256, ffn=512, head_dim=64)
    write_gguf(
        path,
        "llama",
        {k: v * 0.05 if v.ndim == 2 else v for k, v in weights.items()},
        qtype=qtype,
        meta={"feed_forward_length": 512},
    )
    assert read_gguf(path).tensor_types()[qtype.name] == 2 + 2 * 7  # embeddings, head, every layer projection
    native, ref = tinkerlm.load(str(path)), tinkerlm.load(str(path), quant="fp32")
    gate = native.model.model.layers[0].mlp.gate_proj
    assert isinstance(gate, QLinear) and gate.qtype == held and native.model.fused_decode is not None
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = native.model(ids), ref.model(ids)
        cache = native.model.new_cache(1, 16)
        native.model(ids[:, :11], cache=cache)
        cache.advance(11)
        step = native.model(ids[:, 11:], cache=cache)  # the fused decode step over the same weights
    err = (got - want).abs().max()
    assert err <= 5e-3 * want.abs().max()
    assert (step[:, 0] - want[:, -1]).abs().max() <= 5e-3 * want.abs().max()
    top2 = want.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * err  # random weights have near-ties; elsewhere the argmax holds
    assert clear.sum() >= 6 and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_q5_0_becomes_q5_1_blocks_bit_for_bit(rng):
    from tinkerlm.quant.qtensor import from_gguf

    w = rng.standard_normal((8, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, Q.Q5_0)
    qt = from_gguf(raw, "Q5_0", (8, 128))
    assert qt.qtype == "Q5_1"
    assert np.array_equal(qt.dequantize().numpy(), gguf.quants.dequantize(raw, Q.Q5_0).reshape(8, 128))


def test_q5_k_tensor_becomes_q5_1_blocks(rng):
    """Random Q5_K bytes (scales kept sane): read by gguf and by tinkerlm, equal up to fp16 scale rounding."""
    from tinkerlm.quant.qtensor import from_gguf

    raw = rng.integers(0, 256, size=(6, 176), dtype=np.uint8)
    raw[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # d
    raw[:, 2:4] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)  # dmin
    ref = gguf.quants.dequantize(raw, Q.Q5_K).reshape(6, 256)
    qt = from_gguf(raw, "Q5_K", (6, 256)).as_blocks()
    assert qt.qtype == "Q5_1"
    d, m, _ = qt.fields()
    err = np.abs(qt.dequantize().numpy() - ref).reshape(6, 8, 32).max(-1)
    assert (err <= 2.0**-11 * (31 * d.abs() + m.abs()).numpy() * 1.01 + 1e-6).all()
