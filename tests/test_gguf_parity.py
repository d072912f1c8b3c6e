"""GGUF files written from tiny HF checkpoints give the same logits as those checkpoints in transformers.

For quantized types the reference is the HF model carrying the quantize-dequantize round trip of its own weights
(computed here with the `gguf` package), so the comparison isolates tinkerlm's reading: names, q/k permutation,
config from metadata, tied heads and llama3 RoPE stored as `rope_freqs`. Also: every tensor type the `gguf`
package can dequantize reads back exactly as the package dequantizes it.
"""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from ggufwriter import write_gguf
from tiny import make_hf_model

import tinkerlm
from tinkerlm.formats.gguf import read_gguf

QTYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
KINDS = ["llama", "llama3-tied", "llama-headdim", "llama-yarn", "qwen2", "qwen3", "gpt2"]
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def roundtrip(w: np.ndarray, qtype) -> np.ndarray:
    if w.ndim == 1 or qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def linear_layout(kind, sd):
    """HF state dict -> {name: fp32 numpy in nn.Linear (out, in) layout}, without the tied head."""
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and kind in ("llama3-tied", "qwen2", "gpt2"):
            continue
        a = t.detach().float().numpy()
        out[name] = a.T.copy() if kind == "gpt2" and name.endswith(CONV1D) else a
    return out


def metadata(kind, ref):
    c = ref.config
    if kind == "gpt2":
        return dict(
            context_length=c.n_positions,
            embedding_length=c.n_embd,
            feed_forward_length=4 * c.n_embd,
            block_count=c.n_layer,
            vocab_size=c.vocab_size,
            **{"attention.head_count": c.n_head, "attention.layer_norm_epsilon": c.layer_norm_epsilon},
        )
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope, yarn = c.rope_parameters, {}
    if rope.get("rope_type") == "yarn":
        yarn = {
            "rope.scaling.type": "yarn",
            "rope.scaling.factor": rope["factor"],
            "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
        }
    return {
        **yarn,
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "feed_forward_length": c.intermediate_size,
        "block_count": c.num_hidden_layers,
        "vocab_size": c.vocab_size,
        "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "attention.layer_norm_rms_epsilon": c.rms_norm_eps,
        "rope.freq_base": c.rope_parameters["rope_theta"],
    }


def rope_freqs(ref):
    """llama.cpp stores llama3 RoPE scaling as per-frequency divisors: plain inv_freq / scaled inv_freq."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](ref.config, "cpu")
    hd = ref.config.head_dim
    plain = 1.0 / (ref.config.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    return (plain / scaled).numpy().astype(np.float32)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf_model(kind, root / kind) for kind in KINDS}


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_logits_match_hf(kind, qtype, refs, tmp_path):
    ref = refs[kind]
    weights = linear_layout(kind, ref.state_dict())
    arch = {"llama3-tied": "llama", "llama-headdim": "llama", "llama-yarn": "llama"}.get(kind, kind)
    extra = {"rope_freqs.weight": rope_freqs(ref)} if kind == "llama3-tied" else None
    path = tmp_path / f"{kind}.gguf"
    heads = ref.config.n_head if kind == "gpt2" else ref.config.num_attention_heads
    kv = heads if kind == "gpt2" else ref.config.num_key_value_heads
    write_gguf(path, arch, weights, qtype=qtype, meta=metadata(kind, ref), extra=extra, heads=heads, kv=kv)

    # The reference: the same HF model carrying the round-tripped weights.
    state = {}
    for name, t in ref.state_dict().items():
        w = t.detach().float().numpy()
        transpose = kind == "gpt2" and name.endswith(CONV1D)
        q = roundtrip(w.T if transpose else w, qtype)
        state[name] = torch.from_numpy(np.ascontiguousarray(q.T if transpose else q))
    ref_q = type(ref)(ref.config).eval()
    ref_q.load_state_dict(state)

    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    llm = tinkerlm.load(str(path), quant="fp32")  # the reference path; tests/test_quant.py covers native
    with torch.no_grad():
        want = ref_q(ids).logits
        got = llm.model(ids)
    assert (got - want).abs().max().item() <= 1e-4


def dequantizable_types():
    """Every tensor type the installed gguf package can dequantize (found by trying it)."""
    out = []
    for qtype in Q:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except (NotImplementedError, KeyError, ValueError, TypeError):
            continue
        out.append(qtype)
    return out


@pytest.mark.parametrize("qtype", dequantizable_types(), ids=lambda q: q.name)
def test_every_dequantizable_type_reads_like_gguf(qtype, tmp_path):
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 4, 256 * max(1, block // 256) if block > 1 else 256
    rng = np.random.default_rng(int(qtype))
    # Random block bytes with bit 6 of every byte cleared: no f16/bf16/f32 scale can then be Inf or NaN.
    raw = (rng.integers(0, 256, size=(rows, cols // block * type_size), dtype=np.uint8) & 0xBF).astype(np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("blob", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ckpt = read_gguf(tmp_path / "t.gguf")
    got = ckpt.tensor("blob")
    want = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32))
    assert got.shape == (rows, cols)
    assert torch.isfinite(want).all()
    assert torch.equal(got, want.reshape(rows, cols))
