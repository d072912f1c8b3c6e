"""Gemma 3's spec (tinkerlm/models/gemma.py): HF `gemma3_text`, GGUF `gemma3`.

What the GGUF metadata leaves out, llama.cpp fixes for the architecture, and so does this reader: every 6th layer
is global and the others slide over `attention.sliding_window` positions, the sliding layers' RoPE base is 10000
(`rope.freq_base` is the global layers'), and queries are scaled by 1/sqrt(head_dim) except in the 27B model (62
layers), which uses 1/sqrt(hidden_size / heads). Writers refuse configs that break these rules, which llama.cpp
could not read back. llama.cpp's converter stores each norm weight as `1 + w` (Gemma's norms scale by `1 + w`, HF
stores `w`): `unit_offset` says so, and readers and writers add or remove the 1 at the boundary. The q/k rows are
not permuted.

References:
- llama.cpp's converter (`Gemma3Model`): https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py
- llama.cpp's loader (`LLM_ARCH_GEMMA3` in src/llama-model.cpp): the swa pattern, local RoPE base, query scale.
"""

from __future__ import annotations

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.formats.specs.base import GGUFMetadata, Spec

SLIDING_PATTERN = 6  # llama.cpp: layer i is global when (i + 1) % 6 == 0
LOCAL_ROPE_BASE = 10000.0
LAYERS_27B = 62  # the one Gemma 3 whose query scale is not 1/sqrt(head_dim)


def layer_types(n_layers: int, pattern: int = SLIDING_PATTERN) -> list[str]:
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]


def _query_scalar(hidden: int, heads: int, head_dim: int, n_layers: int) -> int:
    return hidden // heads if n_layers == LAYERS_27B else head_dim


def gguf_config(g: GGUFMetadata) -> dict:
    """The HF config of a Gemma 3 GGUF.

    Raises:
        TinkerError: a missing key, value and key lengths that differ, or a RoPE scaling other than linear.
    """
    hidden = g.arch_key("embedding_length", limit=limits.MAX_WIDTH)
    heads = g.arch_key("attention.head_count", limit=limits.MAX_HEADS)
    n_layers = g.arch_key("block_count", limit=limits.MAX_LAYERS)
    head_dim = g.arch_key("attention.key_length", 256, limit=limits.MAX_HEAD_DIM)
    if g.arch_key("attention.value_length", head_dim, limit=limits.MAX_HEAD_DIM) != head_dim:
        raise TinkerError(f"{g.path}: gemma3.attention.value_length differs from key_length (not supported)")
    config = {
        "model_type": "gemma3_text",
        "vocab_size": g.vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": g.arch_key("feed_forward_length", limit=limits.MAX_WIDTH),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": g.arch_key("attention.head_count_kv", heads, limit=limits.MAX_HEADS),
        "head_dim": head_dim,
        "rms_norm_eps": g.arch_key("attention.layer_norm_rms_epsilon", 1e-6, kind=float),
        "rope_theta": float(g.arch_key("rope.freq_base", 1_000_000.0, kind=float)),
        "rope_local_base_freq": LOCAL_ROPE_BASE,
        "max_position_embeddings": g.arch_key("context_length", limit=limits.MAX_CONTEXT),
        "sliding_window": g.arch_key("attention.sliding_window", limit=limits.MAX_CONTEXT),
        "layer_types": layer_types(n_layers),
        "query_pre_attn_scalar": _query_scalar(hidden, heads, head_dim, n_layers),
        "final_logit_softcapping": g.arch_key("final_logit_softcapping", None, kind=float),
        "tie_word_embeddings": not g.has_tensor("output.weight"),
    }
    kind = g.arch_key("rope.scaling.type", None, kind=str)
    if kind not in (None, "none"):
        if kind != "linear":
            raise TinkerError(f"{g.path}: gemma3.rope.scaling.type {kind!r} is not supported (supported: linear)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": g.arch_key("rope.scaling.factor", kind=float)}
    return config


def _rope(config: dict) -> tuple[float, float, dict | None]:
    """(global theta, local theta, global scaling or None) from transformers 4's keys or 5's `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    theta = config.get("rope_theta") or full.get("rope_theta", 1_000_000.0)
    local_theta = config.get("rope_local_base_freq") or local.get("rope_theta", LOCAL_ROPE_BASE)
    scaling = config.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), float(local_theta), scaling


def gguf_metadata(config: dict) -> dict:
    """GGUF metadata for a Gemma 3 HF config: the keys llama.cpp's converter writes (the inverse of `gguf_config`).

    Raises:
        TinkerError: a config llama.cpp would read differently (another layer pattern, local RoPE base or query
            scale, a RoPE scaling other than linear, attention softcapping).
    """
    heads, n_layers = config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim", 256)
    theta, local_theta, scaling = _rope(config)
    types = config.get("layer_types") or layer_types(n_layers, config.get("sliding_window_pattern", SLIDING_PATTERN))
    scalar = config.get("query_pre_attn_scalar", 256)
    problems = {
        "layer_types": types != layer_types(n_layers),
        "rope_local_base_freq": local_theta != LOCAL_ROPE_BASE,
        "query_pre_attn_scalar": scalar != _query_scalar(config["hidden_size"], heads, head_dim, n_layers),
        "attn_logit_softcapping": config.get("attn_logit_softcapping") is not None,
        "rope_scaling": scaling is not None and scaling.get("rope_type", scaling.get("type")) != "linear",
    }
    bad = [key for key, wrong in problems.items() if wrong]
    if bad:
        raise TinkerError(
            f"config: {', '.join(bad)} cannot be written to a gemma3 GGUF (llama.cpp fixes them for the architecture)"
        )
    meta = {
        "general.architecture": "gemma3",
        "gemma3.vocab_size": config["vocab_size"],
        "gemma3.context_length": config.get("max_position_embeddings", 131072),
        "gemma3.embedding_length": config["hidden_size"],
        "gemma3.block_count": n_layers,
        "gemma3.feed_forward_length": config["intermediate_size"],
        "gemma3.attention.head_count": heads,
        "gemma3.attention.head_count_kv": config.get("num_key_value_heads") or heads,
        "gemma3.attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "gemma3.attention.key_length": head_dim,
        "gemma3.attention.value_length": head_dim,
        "gemma3.attention.sliding_window": config["sliding_window"],
        "gemma3.rope.freq_base": theta,
    }
    if config.get("final_logit_softcapping") is not None:
        meta["gemma3.final_logit_softcapping"] = float(config["final_logit_softcapping"])
    if scaling is not None:
        meta["gemma3.rope.scaling.type"] = "linear"
        meta["gemma3.rope.scaling.factor"] = float(scaling["factor"])
    return meta


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter shapes (linear weights (out, in)) a config implies, per HF name template."""
    h, i_, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim", 256)
    q, kv = heads * hd, (c.get("num_key_value_heads") or heads) * hd
    layer, a, m = "model.layers.{i}.", "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    return {
        "model.embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "model.norm.weight": (h,),
        **{f"{layer}{n}.weight": (h,) for n in norms},
        a + "q_proj.weight": (q, h),
        a + "k_proj.weight": (kv, h),
        a + "v_proj.weight": (kv, h),
        a + "o_proj.weight": (h, q),
        a + "q_norm.weight": (hd,),
        a + "k_norm.weight": (hd,),
        m + "gate_proj.weight": (i_, h),
        m + "up_proj.weight": (i_, h),
        m + "down_proj.weight": (h, i_),
    }


TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

SPEC = Spec(
    family="gemma",
    model_types=("gemma3_text",),
    hf_classes={"gemma3_text": "Gemma3ForCausalLM"},
    model=("GemmaConfig", "GemmaForCausalLM"),
    gguf_architectures={"gemma3": "gemma3_text"},
    tensor_names=TENSOR_NAMES,
    required=tuple(name for name in TENSOR_NAMES if name != "output.weight"),
    gguf_config=gguf_config,
    gguf_metadata=gguf_metadata,
    shapes=shapes,
    layers_key="num_hidden_layers",
    unit_offset=("norm.weight",),  # every norm: input_layernorm ... q_norm, k_norm, model.norm
)
