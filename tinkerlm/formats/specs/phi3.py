"""Phi-3's spec (tinkerlm/models/phi3.py): HF `phi3` (Phi-3, Phi-3.5-mini, Phi-4-mini), GGUF `phi3`.

llama.cpp's converter keeps HF's fused projections: `attn_qkv` is `qkv_proj` (rows q | k | v) and `ffn_up` is
`gate_up_proj` (rows gate | up), so the name table is one-to-one. Rows are not permuted (llama.cpp turns phi3 heads
the rotate-half way, as HF does). LongRoPE lives in two tensors, `rope_factors_long.weight` and
`rope_factors_short.weight` (read into the config's `rope_scaling`), beside `phi3.rope.scaling.original_context_length`
and `phi3.rope.scaling.attn_factor`; partial rotary (Phi-4-mini) is `phi3.rope.dimension_count` below the head size.

llama.cpp picks the long or short factors once per context (long when its context size exceeds the original length);
tinkerlm reads the same file with transformers' rule, per call by sequence length (see models/phi3.py). llama.cpp also
ignores `phi3.attention.sliding_window` (its Phi SWA is disabled), which transformers applies and so does tinkerlm.

References:
- llama.cpp's converter (`Phi3MiniModel`, conversion/phi.py) and loader (src/models/phi3.cpp).
- gguf-py's constants (MODEL_ARCH.PHI3 tensors, `Keys.Rope.SCALING_*`).
"""

from __future__ import annotations

import math

import numpy as np

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.formats.specs.base import GGUFMetadata, Spec

LONG, SHORT = "rope_factors_long.weight", "rope_factors_short.weight"


def _attention_factor(original: int, factor: float) -> float:
    """LongRoPE's default attention factor, as transformers computes it (`factor`: rope_scaling's, else
    max_position_embeddings / original, which is what llama.cpp's converter always takes)."""
    return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0


def gguf_config(g: GGUFMetadata) -> dict:
    """The HF config of a phi3 GGUF.

    Raises:
        TinkerError: a missing key, value and key lengths that differ, only one of the two factor tensors, or
            factor tensors of the wrong length.
    """
    hidden = g.arch_key("embedding_length", limit=limits.MAX_WIDTH)
    heads = g.arch_key("attention.head_count", limit=limits.MAX_HEADS)
    head_dim = g.arch_key("attention.key_length", None, limit=limits.MAX_HEAD_DIM) or hidden // heads
    if not 1 <= head_dim <= limits.MAX_HEAD_DIM or heads * head_dim > limits.MAX_WIDTH:
        raise TinkerError(f"{g.path}: phi3.attention.head_count {heads} x head size {head_dim} is out of bounds")
    if g.arch_key("attention.value_length", head_dim, limit=limits.MAX_HEAD_DIM) != head_dim:
        raise TinkerError(f"{g.path}: phi3.attention.value_length differs from key_length (not supported)")
    rot = g.arch_key("rope.dimension_count", head_dim, limit=limits.MAX_HEAD_DIM)
    if rot > head_dim or rot % 2:
        raise TinkerError(
            f"{g.path}: phi3.rope.dimension_count {rot} must be even and at most the head size {head_dim}"
        )
    max_pos = g.arch_key("context_length", limit=limits.MAX_CONTEXT)
    window = g.arch_key("attention.sliding_window", 0, limit=None)
    config = {
        "model_type": "phi3",
        "vocab_size": g.vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": g.arch_key("feed_forward_length", limit=limits.MAX_WIDTH),
        "num_hidden_layers": g.arch_key("block_count", limit=limits.MAX_LAYERS),
        "num_attention_heads": heads,
        "num_key_value_heads": g.arch_key("attention.head_count_kv", heads, limit=limits.MAX_HEADS),
        "head_dim": head_dim,
        "rms_norm_eps": g.arch_key("attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": float(g.arch_key("rope.freq_base", 10000.0, kind=float)),
        "partial_rotary_factor": rot / head_dim,
        "max_position_embeddings": max_pos,
        "original_max_position_embeddings": g.arch_key(
            "rope.scaling.original_context_length", max_pos, limit=limits.MAX_CONTEXT
        ),
        "sliding_window": window or None,  # the converter writes 0 for none
        "tie_word_embeddings": not g.has_tensor("output.weight"),
        "rope_scaling": None,
    }
    present = [name for name in (LONG, SHORT) if g.has_tensor(name)]
    if len(present) == 1:
        raise TinkerError(f"{g.path}: tensor {present[0]} without its pair (LongRoPE needs both; re-convert it)")
    if present:
        factors = {}
        for name, key in ((LONG, "long_factor"), (SHORT, "short_factor")):
            t = g.tensor(name)
            if tuple(t.shape) != (rot // 2,):
                raise TinkerError(
                    f"{g.path}: tensor {name} has shape {tuple(t.shape)}, expected ({rot // 2},) (rotary dims / 2)"
                )
            factors[key] = t.tolist()
        scaling = {"rope_type": "longrope", **factors}
        stored = g.arch_key("rope.scaling.attn_factor", None, kind=float)
        original = config["original_max_position_embeddings"]
        computed = _attention_factor(original, max_pos / original)
        if stored is not None and not math.isclose(stored, computed, rel_tol=1e-6):
            scaling["attention_factor"] = float(stored)  # set by hand; the default is computed from the lengths
        config["rope_scaling"] = scaling
    return config


def _rope(config: dict) -> tuple[float, dict | None, float, int | None]:
    """(rope_theta, longrope params or None, partial_rotary_factor, original context) from transformers 4's keys or
    transformers 5's `rope_parameters`."""
    params = config.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    theta = config.get("rope_theta") or params.get("rope_theta", 10000.0)
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    partial = params.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0
    original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    return float(theta), scaling, float(partial), int(original or 4096)  # transformers' Phi3Config default


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def gguf_metadata(config: dict) -> dict:
    """GGUF metadata for a Phi-3 HF config: the keys llama.cpp's converter writes (the inverse of `gguf_config`);
    the LongRoPE factors go into tensors (`gguf_extra_tensors`).

    Raises:
        TinkerError: a RoPE scaling other than longrope.
    """
    theta, scaling, partial, original = _rope(config)
    max_pos = config.get("max_position_embeddings", 4096)
    hd = _head_dim(config)
    meta = {
        "general.architecture": "phi3",
        "phi3.vocab_size": config["vocab_size"],
        "phi3.context_length": max_pos,
        "phi3.rope.scaling.original_context_length": original,
        "phi3.embedding_length": config["hidden_size"],
        "phi3.feed_forward_length": config["intermediate_size"],
        "phi3.block_count": config["num_hidden_layers"],
        "phi3.attention.head_count": config["num_attention_heads"],
        "phi3.attention.head_count_kv": config.get("num_key_value_heads") or config["num_attention_heads"],
        "phi3.attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-5)),
        "phi3.rope.dimension_count": int(hd * partial),
        "phi3.rope.freq_base": theta,
        "phi3.attention.sliding_window": config.get("sliding_window") or 0,
    }
    if hd != config["hidden_size"] // config["num_attention_heads"]:
        meta["phi3.attention.key_length"] = meta["phi3.attention.value_length"] = hd
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("longrope", "su", "yarn"):  # transformers' Phi3Config reads all three as longrope
            raise TinkerError(f"config: rope scaling type {kind!r} cannot be written to a phi3 GGUF (longrope only)")
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = _attention_factor(original, scaling.get("factor") or max_pos / original)
        meta["phi3.rope.scaling.attn_factor"] = float(attention)
    return meta


def gguf_extra_tensors(config: dict) -> dict[str, np.ndarray]:
    """The LongRoPE factors as llama.cpp's converter writes them (nothing without LongRoPE)."""
    _, scaling, _, _ = _rope(config)
    if scaling is None:
        return {}
    return {
        LONG: np.asarray(scaling["long_factor"], dtype=np.float32),
        SHORT: np.asarray(scaling["short_factor"], dtype=np.float32),
    }


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter shapes (linear weights (out, in)) a config implies, per HF name template."""
    h, i_, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    hd = _head_dim(c)
    q, kv = heads * hd, (c.get("num_key_value_heads") or heads) * hd
    return {
        "model.embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "model.norm.weight": (h,),
        "model.layers.{i}.input_layernorm.weight": (h,),
        "model.layers.{i}.post_attention_layernorm.weight": (h,),
        "model.layers.{i}.self_attn.qkv_proj.weight": (q + 2 * kv, h),
        "model.layers.{i}.self_attn.o_proj.weight": (h, q),
        "model.layers.{i}.mlp.gate_up_proj.weight": (2 * i_, h),
        "model.layers.{i}.mlp.down_proj.weight": (h, i_),
    }


TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

SPEC = Spec(
    family="phi3",
    model_types=("phi3",),
    hf_classes={"phi3": "Phi3ForCausalLM"},
    model=("Phi3Config", "Phi3ForCausalLM"),
    gguf_architectures={"phi3": "phi3"},
    tensor_names=TENSOR_NAMES,
    required=tuple(name for name in TENSOR_NAMES if name != "output.weight"),
    gguf_config=gguf_config,
    gguf_metadata=gguf_metadata,
    shapes=shapes,
    layers_key="num_hidden_layers",
    consumed=(LONG, SHORT),
    gguf_extra_tensors=gguf_extra_tensors,
)
