"""The Llama family's spec: Llama 2/3/3.1+, Mistral, SmolLM/SmolLM2, Qwen2/2.5 and Qwen3 (tinkerlm/models/llama.py).

GGUF files name these architectures "llama" (Llama 2/3, SmolLM, most Mistrals), "mistral", "qwen2" and "qwen3";
HF uses the same names as `model_type`. Writers give Mistral "llama", as llama.cpp's converter does: llama.cpp has
no "mistral" architecture (and no sliding window for "llama", so Mistral v0.1's `sliding_window` is not written;
Qwen's per-layer windows, which would change the results, are refused). llama.cpp's converter interleaves the two
rotary halves of each head's
q/k rows for llama and mistral (it undoes HF's own permutation of Meta's checkpoints); `rope_rows` is that
permutation, read back here and inverted for writers.

References:
- llama.cpp's converter (tensor names, `LlamaModel.permute`):
  https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py
- llama.cpp's metadata key names: https://github.com/ggml-org/llama.cpp/blob/master/gguf-py/gguf/constants.py
"""

from __future__ import annotations

import re

import numpy as np

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.formats.specs.base import GGUFMetadata, Spec

GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
# model_type -> the architecture llama.cpp loads it as, for writers (where not the same name).
WRITE_ARCHITECTURES = {"mistral": "llama"}

# Consumed into the config (`rope_freq_factors`), not a parameter.
ROPE_FREQS = "rope_freqs.weight"

# Model types whose GGUF q/k rows llama.cpp's converter permutes; the config key holding each one's head count.
ROPE_PERMUTED = ("llama", "mistral")
_QK = re.compile(r"model\.layers\.\d+\.self_attn\.([qk])_proj\.(weight|bias)")
_HEADS = {"q": "num_attention_heads", "k": "num_key_value_heads"}
# YaRN's optional GGUF keys (`{arch}.rope.scaling.*`, as llama.cpp's converter writes them) -> HF rope_scaling keys.
YARN_KEYS = {"yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow", "yarn_attn_factor": "attention_factor"}


def rope_rows(hf_name: str, config: dict, rows: int) -> np.ndarray | None:
    """HF row r of a q/k projection is GGUF row `order[r]`; None for other tensors and unpermuted model types.

    llama.cpp stores each head's rows as pairs (0, hd/2), (1, hd/2 + 1), ...; HF keeps the two halves apart.
    """
    m = _QK.fullmatch(hf_name)
    if m is None or config.get("model_type") not in ROPE_PERMUTED:
        return None
    heads = config.get(_HEADS[m[1]]) or config["num_attention_heads"]  # no num_key_value_heads: no GQA
    head_dim = rows // heads
    return np.arange(rows).reshape(heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(rows)  # (n, 2, hd/2)


def _rope_scaling(g: GGUFMetadata) -> dict | None:
    arch = g.architecture
    kind = g.arch_key("rope.scaling.type", None, kind=str)
    factor = g.arch_key("rope.scaling.factor", None, kind=float)
    legacy = g.arch_key("rope.scale_linear", None, kind=float)  # GGUF v2-era key
    if kind is None and legacy is not None and legacy != 1.0:
        kind, factor = "linear", legacy
    if kind is None or kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise TinkerError(f"{g.path}: {arch}.rope.scaling.type {kind!r} is not supported (supported: linear, yarn)")
    if factor is None:
        raise TinkerError(f"{g.path}: {arch}.rope.scaling.type is {kind} but rope.scaling.factor is missing")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    # llama.cpp: the original context defaults to the training context; the ext factor (1 for YaRN) is not HF's.
    if g.arch_key("rope.scaling.yarn_ext_factor", 1.0, kind=float) != 1.0:
        raise TinkerError(f"{g.path}: {arch}.rope.scaling.yarn_ext_factor other than 1 is not supported")
    old_ctx = g.arch_key("rope.scaling.original_context_length", None, limit=limits.MAX_CONTEXT)
    scaling = {
        "rope_type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": old_ctx or g.arch_key("context_length", limit=limits.MAX_CONTEXT),
    }
    for key, hf_key in YARN_KEYS.items():
        if (value := g.arch_key(f"rope.scaling.{key}", None, kind=float)) is not None:
            scaling[hf_key] = float(value)
    if log_mul := g.arch_key("rope.scaling.yarn_log_multiplier", None, kind=float):  # llama.cpp assumes mscale 1
        scaling.update(mscale=1.0, mscale_all_dim=float(log_mul))
    return scaling


def gguf_config(g: GGUFMetadata) -> dict:
    """The HF config of a Llama-family GGUF.

    Raises:
        TinkerError: a missing key, value and key lengths that differ, partial rotary, or an unknown RoPE scaling.
    """
    arch = g.architecture
    hidden = g.arch_key("embedding_length", limit=limits.MAX_WIDTH)
    heads = g.arch_key("attention.head_count", limit=limits.MAX_HEADS)
    head_dim = g.arch_key("attention.key_length", None, limit=limits.MAX_HEAD_DIM) or hidden // heads
    if not 1 <= head_dim <= limits.MAX_HEAD_DIM or heads * head_dim > limits.MAX_WIDTH:
        raise TinkerError(
            f"{g.path}: {arch}.attention.head_count {heads} x head size {head_dim} is outside the supported sizes "
            f"(head size 1..{limits.MAX_HEAD_DIM}, product up to {limits.MAX_WIDTH}; the file is corrupt or hostile)"
        )
    value_dim = g.arch_key("attention.value_length", None, limit=limits.MAX_HEAD_DIM)
    if value_dim is not None and value_dim != head_dim:
        raise TinkerError(
            f"{g.path}: {arch}.attention.value_length {value_dim} differs from key_length {head_dim} (not supported)"
        )
    rope_dims = g.arch_key("rope.dimension_count", None, limit=limits.MAX_HEAD_DIM)
    if rope_dims is not None and rope_dims != head_dim:
        raise TinkerError(
            f"{g.path}: {arch}.rope.dimension_count {rope_dims} differs from the head size {head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    config = {
        "model_type": GGUF_ARCHITECTURES[arch],
        "vocab_size": g.vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": g.arch_key("feed_forward_length", limit=limits.MAX_WIDTH),
        "num_hidden_layers": g.arch_key("block_count", limit=limits.MAX_LAYERS),
        "num_attention_heads": heads,
        "num_key_value_heads": g.arch_key("attention.head_count_kv", heads, limit=limits.MAX_HEADS),
        "head_dim": head_dim,
        "rms_norm_eps": g.arch_key("attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": float(g.arch_key("rope.freq_base", 10000.0, kind=float)),
        "max_position_embeddings": g.arch_key("context_length", limit=limits.MAX_CONTEXT),
        "tie_word_embeddings": not g.has_tensor("output.weight"),
        "attention_bias": g.has_tensor("blk.0.attn_q.bias"),
        "rope_scaling": _rope_scaling(g),
    }
    if g.has_tensor(ROPE_FREQS):
        # Llama 3.1 files store the llama3 rope scaling as per-frequency divisors of inv_freq.
        factors = g.tensor(ROPE_FREQS)
        if tuple(factors.shape) != (head_dim // 2,):
            raise TinkerError(
                f"{g.path}: tensor {ROPE_FREQS} has shape {tuple(factors.shape)}, expected ({head_dim // 2},) "
                "from the head size (file inconsistent; re-convert it)"
            )
        config["rope_freq_factors"] = factors.tolist()
    return config


def _rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from transformers 4's keys or transformers 5's `rope_parameters`."""
    params = config.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    theta = config.get("rope_theta")
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def _sliding_layers(config: dict) -> bool:
    """Whether a Qwen2/3 config has sliding-window layers (as transformers' Qwen2Config derives `layer_types`)."""
    if not config.get("use_sliding_window") or not config.get("sliding_window"):
        return False
    types = config.get("layer_types")
    if types is None:
        return config["num_hidden_layers"] > config.get("max_window_layers", 28)
    return "sliding_attention" in types


def _yarn_metadata(arch: str, config: dict, scaling: dict) -> dict:
    """The `{arch}.rope.scaling.*` keys of YaRN, as llama.cpp's converter writes them (plus `yarn_log_multiplier`
    for `mscale_all_dim`, which llama.cpp reads with mscale 1)."""
    if not scaling.get("truncate", True):
        raise TinkerError("config: YaRN with truncate false cannot be written to GGUF (llama.cpp always truncates)")
    old_ctx = scaling.get("original_max_position_embeddings") or config.get("max_position_embeddings", 2048)
    meta = {
        f"{arch}.rope.scaling.type": "yarn",
        f"{arch}.rope.scaling.factor": float(scaling.get("factor") or config["max_position_embeddings"] / old_ctx),
        f"{arch}.rope.scaling.original_context_length": old_ctx,
    }
    for key, hf_key in YARN_KEYS.items():
        if scaling.get(hf_key) is not None:
            meta[f"{arch}.rope.scaling.{key}"] = float(scaling[hf_key])
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        if scaling["mscale"] != 1:
            raise TinkerError("config: YaRN mscale other than 1 cannot be written to GGUF (llama.cpp assumes 1)")
        meta[f"{arch}.rope.scaling.yarn_log_multiplier"] = float(scaling["mscale_all_dim"])
    return meta


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def gguf_metadata(config: dict) -> dict:
    """GGUF metadata (general.architecture and `{arch}.*`) for a Llama-family HF config: the keys llama.cpp's
    converter writes, so that `gguf_config` reads the same config back. Tied embeddings and biases are told by which
    tensors the file holds; llama3 RoPE scaling goes into the `rope_freqs.weight` tensor (`gguf_extra_tensors`).

    Raises:
        TinkerError: a RoPE scaling other than linear, llama3 or yarn (dynamic NTK has no GGUF form in llama.cpp),
            or Qwen's per-layer sliding windows (llama.cpp's qwen2/qwen3 have none).
    """
    model_type = config.get("model_type")
    arch = WRITE_ARCHITECTURES.get(model_type, model_type)
    if arch not in GGUF_ARCHITECTURES:
        raise TinkerError(f"config: model_type {model_type!r} is not a Llama-family model")
    if _sliding_layers(config):
        raise TinkerError(
            "config: sliding-window layers (use_sliding_window) cannot be written to GGUF: llama.cpp's qwen2 and qwen3 "
            "attend over every position (export a config without them)"
        )
    heads = config["num_attention_heads"]
    theta, scaling = _rope(config)
    meta = {
        "general.architecture": arch,
        f"{arch}.vocab_size": config["vocab_size"],
        f"{arch}.context_length": config.get("max_position_embeddings", 2048),
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": config.get("num_key_value_heads") or heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        f"{arch}.rope.freq_base": theta,
        f"{arch}.rope.dimension_count": _head_dim(config),
    }
    if config.get("head_dim") is not None:  # as the converter does; needed where it is not hidden / heads
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = config["head_dim"]
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
    elif kind == "yarn":
        meta.update(_yarn_metadata(arch, config, scaling))
    elif kind not in (None, "llama3"):
        raise TinkerError(
            f"config: rope scaling type {kind!r} cannot be written to GGUF (supported: linear, llama3, yarn; llama.cpp "
            "has no dynamic NTK scaling); export a model without it"
        )
    return meta


def gguf_extra_tensors(config: dict) -> dict[str, np.ndarray]:
    """`rope_freqs.weight` for llama3 RoPE scaling (or a config read from GGUF with `rope_freq_factors`): the
    per-frequency divisors of the inverse frequencies, as llama.cpp's converter computes them."""
    if config.get("rope_freq_factors") is not None:
        return {ROPE_FREQS: np.asarray(config["rope_freq_factors"], dtype=np.float32)}
    theta, scaling = _rope(config)
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return {}
    dim = _head_dim(config)
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * np.pi / inv_freq.astype(np.float64)
    # Short wavelengths keep their frequency, long ones are divided by `factor`, the band between interpolates.
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth))
    )
    return {ROPE_FREQS: factors.astype(np.float32)}


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter shapes (linear weights (out, in)) a config implies, per HF name template."""
    h, i_, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or h // heads
    q, kv = heads * hd, (c.get("num_key_value_heads") or heads) * hd
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    return {
        "model.embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "model.norm.weight": (h,),
        "model.layers.{i}.input_layernorm.weight": (h,),
        "model.layers.{i}.post_attention_layernorm.weight": (h,),
        a + "q_proj.weight": (q, h),
        a + "k_proj.weight": (kv, h),
        a + "v_proj.weight": (kv, h),
        a + "q_proj.bias": (q,),
        a + "k_proj.bias": (kv,),
        a + "v_proj.bias": (kv,),
        a + "o_proj.weight": (h, q),
        a + "o_proj.bias": (h,),
        a + "q_norm.weight": (hd,),
        a + "k_norm.weight": (hd,),
        m + "gate_proj.weight": (i_, h),
        m + "up_proj.weight": (i_, h),
        m + "down_proj.weight": (h, i_),
    }


SPEC = Spec(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    hf_classes={
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    },
    model=("LlamaConfig", "LlamaForCausalLM"),
    gguf_architectures=GGUF_ARCHITECTURES,
    tensor_names={
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
        "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
        "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
        "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
        "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
        "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
        "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
        "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
        "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
        "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
        "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    },
    required=(
        "token_embd.weight",
        "output_norm.weight",
        "blk.{i}.attn_norm.weight",
        "blk.{i}.attn_q.weight",
        "blk.{i}.attn_k.weight",
        "blk.{i}.attn_v.weight",
        "blk.{i}.attn_output.weight",
        "blk.{i}.ffn_norm.weight",
        "blk.{i}.ffn_gate.weight",
        "blk.{i}.ffn_up.weight",
        "blk.{i}.ffn_down.weight",
    ),
    gguf_config=gguf_config,
    gguf_metadata=gguf_metadata,
    shapes=shapes,
    layers_key="num_hidden_layers",
    defaults={
        "qwen2": {"attention_bias": True, "attention_out_bias": False},  # bias on q/k/v only
        "qwen3": {"qk_norm": True},
    },
    row_fix=rope_rows,
    consumed=(ROPE_FREQS,),
    gguf_extra_tensors=gguf_extra_tensors,
    write_architectures=WRITE_ARCHITECTURES,
)
