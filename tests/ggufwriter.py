"""Write tiny GGUF files from HF-layout weights the way llama.cpp's converter does (names, q/k permutation,
quantization), independently of the reader under test. Shared by the GGUF tests."""

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

# HF name -> GGUF name, written out independently of the module under test.
LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GPT2_LAYER = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "transformer.wte.weight": "token_embd.weight",
        "transformer.wpe.weight": "position_embd.weight",
        "transformer.ln_f.weight": "output_norm.weight",
        "transformer.ln_f.bias": "output_norm.bias",
    }
    if hf in top:
        return top[hf]
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{LLAMA_LAYER[rest]}"
    _, _, i, rest = hf.split(".", 3)  # transformer.h.{i}.{module}.{weight|bias}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{GPT2_LAYER[module]}.{kind}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k permutation: per head, rows of the two rotary halves interleaved."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_vocab(n: int) -> tuple[list[str], list[str]]:
    """A small GPT-2-style vocabulary: <|endoftext|>, single byte characters, two merged tokens."""
    printable = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    tokens = ["<|endoftext|>", "Ġ", "Ċ", "he", "Ġt", *printable[: n - 5]]
    return tokens, ["h e", "Ġ t"]


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Float (rows, K) -> Q4_K super-blocks (rows, K / 256 * 144 bytes), written from ggml-common.h's layout (the
    gguf package cannot quantize K-quants). Plain min/max scales per 32-value sub-block, not llama.cpp's search."""
    rows, K = w.shape
    x = w.astype(np.float32).reshape(-1, 8, 32)  # (super-blocks, sub-blocks, values)
    lo = np.minimum(x.min(-1), 0)
    scale, minimum = (x.max(-1) - lo) / 15, -lo  # per sub-block: x ~ scale * u - minimum
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    dmin = (minimum.max(-1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d, out=np.zeros_like(scale), where=d > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(minimum, dmin, out=np.zeros_like(scale), where=dmin > 0)), 0, 63).astype(np.uint8)
    step = (d * sc)[..., None]
    u = np.clip(np.round(np.divide(x + (dmin * mn)[..., None], step, out=np.zeros_like(x), where=step > 0)), 0, 15)
    u = u.astype(np.uint8)
    out = np.zeros((len(x), 144), np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:4] = dmin.astype(np.float16).view(np.uint8)
    out[:, 4:8] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    out[:, 16:] = (u[:, 0::2] | (u[:, 1::2] << 4)).reshape(-1, 128)
    return out.reshape(rows, K // 256 * 144)


def write_gguf(
    path, arch: str, weights: dict, *, qtype=Q.F32, meta: dict | None = None, extra=None, heads=4, kv=2, permute=None
):
    """Write HF-layout `weights` as a GGUF file the way llama.cpp's converter would; returns GGUF-layout arrays."""
    permute = arch in ("llama", "mistral") if permute is None else permute
    w = gguf.GGUFWriter(str(path), arch)
    first = next(iter(weights.values()))
    hidden = first.shape[1]
    meta = {
        "block_count": 2,
        "context_length": 32,
        "embedding_length": hidden,
        "feed_forward_length": 128,
        "attention.head_count": heads,
        **({} if arch == "gpt2" else {"attention.head_count_kv": kv}),
        **(meta or {}),
    }
    for key, value in meta.items():
        full = key if "." in key and key.split(".")[0] in ("general", "tokenizer") else f"{arch}.{key}"
        if isinstance(value, bool):
            w.add_bool(full, value)
        elif isinstance(value, int):
            w.add_uint32(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_string(full, value)
    eps_key = "attention.layer_norm_epsilon" if arch == "gpt2" else "attention.layer_norm_rms_epsilon"
    if eps_key not in meta:
        w.add_float32(f"{arch}.{eps_key}", 1e-5)
    tokens, merges = byte_vocab(first.shape[0])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    stored = {}
    for hf, value in weights.items():
        name = gguf_name(hf)
        if permute and (".attn_q." in name or ".attn_k." in name):
            value = llamacpp_permute(value, heads if ".attn_q." in name else kv)
        stored[name] = value
        if value.ndim == 1 or qtype == Q.F32:  # norms and biases stay F32, as llama.cpp keeps them
            w.add_tensor(name, value.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, value.astype(np.float16))
        elif qtype == Q.Q4_K:
            w.add_tensor(name, quantize_q4_k(value), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    for name, value in (extra or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored
