"""The Llama family: Llama 2/3/3.1+, Mistral, SmolLM/SmolLM2, Qwen2/2.5 and Qwen3.

One decoder covers them all; each difference is a named config field:
- `attention_bias`: bias on q/k/v projections (Qwen2).
- `qk_norm`: RMSNorm over each head of q and k before RoPE (Qwen3).
- `rope_scaling`: linear, llama3 (Llama 3.1+), yarn (Qwen2.5 long context) or dynamic (NTK) frequency scaling;
  `rope_freq_factors`: llama3's, as GGUF stores it.
- `sliding_window`: attention limited to the last N positions (Mistral v0.1); `layer_types`: on some layers only
  (Qwen2/3 with `use_sliding_window`).
- `head_dim`: explicit when not hidden_size / num_attention_heads (Qwen3, some Mistrals).

References: Touvron et al. 2023 (Llama 2), Meta Llama 3 model card and reference code, Jiang et al. 2023 (Mistral),
Qwen2 and Qwen3 technical reports. Parameter names are Hugging Face's, so HF checkpoints load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.models.base import (
    CausalLM,
    KVCache,
    RMSNorm,
    apply_rope,
    attend,
    check_positive,
    config_from_dict,
    make_mask,
    rope_attention_factor,
    rope_cos_sin,
    rope_dynamic_seq_len,
    rope_inv_freq,
    rope_type,
    swiglu,
)

# Largest value of each size a config may declare (tinkerlm/limits.py), checked before anything is allocated.
BOUNDS = {
    "vocab_size": limits.MAX_VOCAB,
    "hidden_size": limits.MAX_WIDTH,
    "intermediate_size": limits.MAX_WIDTH,
    "num_hidden_layers": limits.MAX_LAYERS,
    "num_attention_heads": limits.MAX_HEADS,
    "num_key_value_heads": limits.MAX_HEADS,
    "head_dim": limits.MAX_HEAD_DIM,
    "max_position_embeddings": limits.MAX_CONTEXT,
    "sliding_window": limits.MAX_CONTEXT,
}
SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' `layer_types`
QWEN_MAX_WINDOW_LAYERS = 28  # transformers' default for Qwen2/3 configs that omit `max_window_layers`


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # defaults to num_attention_heads (no GQA)
    head_dim: int | None = None  # defaults to hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_freq_factors: list[float] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # on q/k/v
    attention_out_bias: bool | None = None  # on o_proj; defaults to attention_bias
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per model_type defaults (Qwen2: attention_bias on q/k/v only; Qwen3: qk_norm) are the spec's
    # (tinkerlm/formats/specs/llama.py), filled in by `tinkerlm.models.build` before this dataclass.
    sliding_window: int | None = None
    # The layers `sliding_window` applies to (SLIDING or FULL each) when not all of them; None: every layer.
    layer_types: list[str] | None = None
    hidden_act: str = "silu"
    model_type: str = "llama"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> LlamaConfig:
        d = dict(d)
        # transformers 5 writes `rope_parameters` (with rope_theta inside) where 4.x wrote rope_theta + rope_scaling.
        params = d.pop("rope_parameters", None)
        if isinstance(params, dict):
            d.setdefault("rope_theta", params.get("rope_theta"))
            if params.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", params)
        scaling = d.get("rope_scaling")
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
            d["rope_scaling"] = None
        # Qwen configs carry a sliding_window that is off unless use_sliding_window is set, and then on the layers
        # `layer_types` names (transformers derives them when absent: the layers from `max_window_layers` on).
        layer_types = d.pop("layer_types", None)
        if "use_sliding_window" in d and not d["use_sliding_window"]:
            d["sliding_window"] = None
        cfg = config_from_dict(cls, d, source, bounds=BOUNDS)
        if cfg.sliding_window is not None and (layer_types is not None or "use_sliding_window" in d):
            cfg.layer_types = _layer_types(d, layer_types, cfg.num_hidden_layers, source)
            if cfg.layer_types.count(SLIDING) in (0, len(cfg.layer_types)):  # the same on every layer
                cfg.sliding_window = cfg.sliding_window if cfg.layer_types[0] == SLIDING else None
                cfg.layer_types = None
        _fill_rope_scaling(cfg, d)
        check_positive(source, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads)
        if cfg.num_key_value_heads is None:
            cfg.num_key_value_heads = cfg.num_attention_heads
        if cfg.attention_out_bias is None:
            cfg.attention_out_bias = cfg.attention_bias
        if cfg.head_dim is None:
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        if cfg.num_attention_heads * cfg.head_dim > limits.MAX_WIDTH:
            raise TinkerError(
                f"{source}: num_attention_heads x head_dim ({cfg.num_attention_heads} x {cfg.head_dim}) exceeds "
                f"{limits.MAX_WIDTH} (the config is corrupt or hostile)"
            )
        check_positive(
            source,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
        )
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise TinkerError(
                f"{source}: num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({cfg.num_key_value_heads})"
            )
        if cfg.hidden_act != "silu":
            raise TinkerError(f"{source}: hidden_act '{cfg.hidden_act}' is not supported (supported: silu)")
        return cfg


def _layer_types(d: dict[str, Any], layer_types, n_layers: int, source: str) -> list[str]:
    if layer_types is None:  # as transformers' Qwen2Config derives them
        first = d.get("max_window_layers", QWEN_MAX_WINDOW_LAYERS)
        if isinstance(first, bool) or not isinstance(first, int):
            raise TinkerError(f"{source}: config key 'max_window_layers' is {first!r:.40}, expected an integer")
        layer_types = [SLIDING if i >= first else FULL for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layers or not set(layer_types) <= {SLIDING, FULL}:
        raise TinkerError(
            f"{source}: config key 'layer_types' must list '{SLIDING}' or '{FULL}' for each of the {n_layers} layers "
            "(fix config.json)"
        )
    return layer_types


def _fill_rope_scaling(cfg: LlamaConfig, d: dict[str, Any]) -> None:
    """The context lengths RoPE scaling is measured against, where the config leaves them implicit, as transformers'
    `standardize_rope_params` and `_compute_*_parameters` take them."""
    scaling, kind = cfg.rope_scaling, rope_type(cfg.rope_scaling)
    if kind == "dynamic":  # measured against max_position_embeddings, whatever else the dict says
        cfg.rope_scaling = dict(scaling, original_max_position_embeddings=cfg.max_position_embeddings)
    elif kind in ("yarn", "llama3"):
        old_ctx = d.get("original_max_position_embeddings")  # a top-level key wins (Phi-3 style configs)
        old_ctx = old_ctx or scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings
        cfg.rope_scaling = dict(scaling, original_max_position_embeddings=old_ctx)
        if kind == "yarn" and scaling.get("factor") is None and isinstance(old_ctx, int) and old_ctx > 0:
            cfg.rope_scaling["factor"] = cfg.max_position_embeddings / old_ctx  # DeepSeek-V3 style: the ratio


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    # x -> (q, k, v) in one call, set by a speed transform after loading (tinkerlm.quant.fuse); None: three calls.
    fused_qkv = None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, positions, kv_len: int):
        B, T, _ = x.shape
        q, k, v = self.fused_qkv(x) if self.fused_qkv else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_heads, self.hd)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv, self.hd)  # (B, T, n_kv, hd)
        v = v.view(B, T, self.n_kv, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v, positions, kv_len)  # (B, n_kv, S, hd)
        y = attend(q, k, v, mask)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    # x -> silu(gate_proj(x)) * up_proj(x) in one call, set after loading (tinkerlm.quant.fuse); None: two calls.
    fused_gate_up = None

    def forward(self, x):
        h = self.fused_gate_up(x) if self.fused_gate_up else swiglu(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x)); another family may bring its own attention and MLP
    modules of the same call signature (Phi-3's fused projections)."""

    def __init__(self, cfg: LlamaConfig, attention: type[nn.Module] = Attention, mlp: type[nn.Module] = MLP):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, positions, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, positions, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: LlamaConfig, attention: type[nn.Module] = Attention, mlp: type[nn.Module] = MLP):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, attention, mlp) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: LlamaConfig, source: str = "model"):
        super().__init__()
        self.config = cfg
        self.source = source
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.n_layers, self.n_kv_heads, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.max_context = cfg.max_position_embeddings
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_freq_factors, source)
        self.rope_scale = rope_attention_factor(cfg.rope_scaling)  # YaRN's: multiplies cos and sin
        if rope_type(cfg.rope_scaling) in ("yarn", "dynamic"):  # made to run `factor` times the original context
            scaling = cfg.rope_scaling  # its values were checked by rope_inv_freq
            longest = int(float(scaling["factor"]) * float(scaling["original_max_position_embeddings"]))
            self.max_context = min(max(self.max_context, longest), limits.MAX_CONTEXT)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def layer_windows(self) -> list[int | None]:
        """Each layer's attention window (None: every earlier position), from the config as it is now."""
        cfg = self.config
        return [cfg.sliding_window if t == SLIDING else None for t in cfg.layer_types or [SLIDING] * self.n_layers]

    # A fused one-token decode step (tinkerlm.quant.decode) attached to quantized models; None runs the modules.
    fused_decode = None

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        head: bool = True,
    ):
        """Logits (B, T, V) for `input_ids` (B, T), or (B, 1, V) at per-row index `logits_at` (B,); see CausalLM."""
        B, T = input_ids.shape
        if self.fused_decode is not None and T == 1 and cache is not None:
            return self.fused_decode(input_ids, cache)
        cfg, windows = self.config, self.layer_windows()
        positions, k_pos, kv_len = self.step_inputs(input_ids, cache, self.max_context, self.source)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        masks = {}  # one mask per distinct window
        for window in set(windows):
            if segments is not None:
                positions, masks[window] = self.segment_inputs(segments, window)
            else:
                masks[window] = make_mask(positions, k_pos, cache, window)
        inv_freq, seq_len = self.inv_freq, rope_dynamic_seq_len(cfg.rope_scaling, positions)
        if seq_len is not None:  # dynamic NTK: frequencies for this forward's longest sequence, as transformers
            inv_freq = rope_inv_freq(
                cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_freq_factors, seq_len=seq_len
            )
        cos, sin = rope_cos_sin(inv_freq, positions, x.dtype, self.rope_scale)
        for i, (layer, window) in enumerate(zip(self.model.layers, windows)):
            x = self.run_layer(layer, x, cos, sin, masks[window], cache, i, positions, kv_len)
        x = self.model.norm(self.select(x, logits_at))
        return self.lm_head(x) if head else x
