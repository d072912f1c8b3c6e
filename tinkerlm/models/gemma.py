"""Gemma 3 text models (HF `gemma3_text`): Gemma 3 270M, 1B and the text stack of the larger ones.

A Llama-like decoder whose data flow differs enough for a file of its own (it reuses base.py's blocks):
- every norm is RMSNorm scaled by `(1 + weight)`, as Gemma stores it (its weights are offsets from 1);
- four norms per layer: before and after attention, before and after the MLP (sandwich norms);
- RMSNorm over each head of q and k before RoPE (`q_norm`, `k_norm`);
- the embedding output multiplied by sqrt(hidden_size); attention scaled by `query_pre_attn_scalar ** -0.5`;
- a GELU-tanh gated MLP (`gelu(gate) * up`);
- per-layer attention (`layer_types`): sliding-window layers (RoPE base `rope_local_base_freq`, 10000) and global
  ones (`rope_theta`, and `rope_scaling` where the larger models have it), five local to one global by default;
- optional `final_logit_softcapping` (`tanh(logits / c) * c`).

References: Gemma Team 2025, "Gemma 3 Technical Report"; transformers' `modeling_gemma3.py` (parameter names and
the order of operations, checked against it by tests/test_models.py and tests/test_gemma.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.models.base import (
    CausalLM,
    KVCache,
    RMSNorm,
    _kernels,
    _RMSNormFn,
    apply_rope,
    attend,
    check_positive,
    config_from_dict,
    make_mask,
    rope_cos_sin,
    rope_inv_freq,
    rope_type,
)

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
    "sliding_window_pattern": limits.MAX_LAYERS,
}
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding-window layers
    rope_scaling: dict[str, Any] | None = None  # global layers only (linear, in the 4B+ models)
    max_position_embeddings: int = 131_072
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    sliding_window_pattern: int = 6  # every 6th layer is global, when `layer_types` is absent
    layer_types: list[str] = field(default_factory=list)  # SLIDING or FULL per layer
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    use_bidirectional_attention: bool = False
    model_type: str = "gemma3_text"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> GemmaConfig:
        d = dict(d)
        # transformers 5 writes `rope_parameters` per layer type where 4.x wrote rope_theta / rope_local_base_freq.
        params = d.pop("rope_parameters", None)
        if isinstance(params, dict):
            full, local = params.get(FULL) or {}, params.get(SLIDING) or {}
            d.setdefault("rope_theta", full.get("rope_theta"))
            d.setdefault("rope_local_base_freq", local.get("rope_theta"))
            if full.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", full)
            if local.get("rope_type", "default") != "default":
                raise TinkerError(f"{source}: RoPE scaling on sliding-window layers is not supported")
        scaling = d.get("rope_scaling")
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
            d["rope_scaling"] = None
        layer_types = d.pop("layer_types", None)
        cfg = config_from_dict(cls, d, source, bounds=BOUNDS)
        check_positive(
            source,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            head_dim=cfg.head_dim,
            sliding_window=cfg.sliding_window,
            sliding_window_pattern=cfg.sliding_window_pattern,
        )
        if cfg.num_key_value_heads is None:
            cfg.num_key_value_heads = cfg.num_attention_heads
        check_positive(source, num_key_value_heads=cfg.num_key_value_heads)
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise TinkerError(
                f"{source}: num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({cfg.num_key_value_heads})"
            )
        if cfg.num_attention_heads * cfg.head_dim > limits.MAX_WIDTH:
            raise TinkerError(f"{source}: num_attention_heads x head_dim exceeds {limits.MAX_WIDTH} (corrupt config?)")
        if layer_types is None:  # as transformers derives them: every `sliding_window_pattern`-th layer is global
            n = cfg.sliding_window_pattern
            layer_types = [SLIDING if (i + 1) % n else FULL for i in range(cfg.num_hidden_layers)]
        if (
            not isinstance(layer_types, list)
            or len(layer_types) != cfg.num_hidden_layers
            or not set(layer_types) <= {SLIDING, FULL}
        ):
            raise TinkerError(
                f"{source}: config key 'layer_types' must list '{SLIDING}' or '{FULL}' for each of the "
                f"{cfg.num_hidden_layers} layers (fix config.json)"
            )
        cfg.layer_types = layer_types
        if not cfg.query_pre_attn_scalar > 0:
            raise TinkerError(f"{source}: config key 'query_pre_attn_scalar' must be positive")
        if cfg.final_logit_softcapping is not None and not cfg.final_logit_softcapping > 0:
            raise TinkerError(f"{source}: config key 'final_logit_softcapping' must be positive or null")
        # Gemma 2's attention softcapping cannot run through scaled_dot_product_attention; Gemma 3 has none.
        if rope_type(cfg.rope_scaling) in ("yarn", "dynamic"):  # the forward applies neither's extra step
            raise TinkerError(
                f"{source}: rope scaling type '{rope_type(cfg.rope_scaling)}' is not supported for Gemma 3 "
                "(supported: linear, llama3)"
            )
        if cfg.attn_logit_softcapping is not None:
            raise TinkerError(f"{source}: attn_logit_softcapping is not supported (Gemma 3 has none; Gemma 2 does)")
        if cfg.use_bidirectional_attention:
            raise TinkerError(f"{source}: use_bidirectional_attention (an embedding model) is not supported")
        if cfg.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise TinkerError(
                f"{source}: hidden_activation '{cfg.hidden_activation}' is not supported (supported: gelu_pytorch_tanh)"
            )
        return cfg


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaled by `(1 + weight)`: Gemma's weights are offsets from 1 (initialised to 0), in HF files as
    here. (GGUF files store `1 + weight`; the spec's `shift` converts at the boundary.)"""

    unit_offset = True  # read by tinkerlm.quant.decode, whose kernel multiplies by the weight: it adds the 1

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.weight.float()
        if _kernels(x, scale) is not None:
            return _RMSNormFn.apply(x, scale, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * scale).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = GemmaRMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.hd, cfg.rms_norm_eps)
        self.scale = cfg.query_pre_attn_scalar**-0.5

    # x -> (q, k, v) in one call, set by a speed transform after loading (tinkerlm.quant.fuse); None: three calls.
    fused_qkv = None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, positions, kv_len: int):
        B, T, _ = x.shape
        q, k, v = self.fused_qkv(x) if self.fused_qkv else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = self.q_norm(q.view(B, T, self.n_heads, self.hd))  # (B, T, H, hd)
        k = self.k_norm(k.view(B, T, self.n_kv, self.hd))  # (B, T, n_kv, hd)
        v = v.view(B, T, self.n_kv, self.hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v, positions, kv_len)  # (B, n_kv, S, hd)
        y = attend(q, k, v, mask, self.scale)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, positions, kv_len):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, positions, kv_len)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Backbone(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GemmaForCausalLM(CausalLM):
    def __init__(self, cfg: GemmaConfig, source: str = "model"):
        super().__init__()
        self.config = cfg
        self.source = source
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.n_layers, self.n_kv_heads, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.max_context = cfg.max_position_embeddings
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, source=source)
        self.inv_freq_local = rope_inv_freq(cfg.head_dim, cfg.rope_local_base_freq, source=source)
        self.embed_scale = math.sqrt(cfg.hidden_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # A fused one-token decode step (tinkerlm.quant.decode.FusedGemmaDecoder) attached to quantized models; None runs
    # the modules.
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
        cfg = self.config
        if self.fused_decode is not None and input_ids.shape[1] == 1 and cache is not None and head:
            return self.fused_decode(input_ids, cache)
        positions, k_pos, kv_len = self.step_inputs(input_ids, cache, self.max_context, self.source)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)  # rounded to the activation dtype, as HF does
        masks = {}
        for kind, window in ((FULL, None), (SLIDING, cfg.sliding_window)):
            if segments is not None:
                positions, masks[kind] = self.segment_inputs(segments, window)
            else:
                masks[kind] = make_mask(positions, k_pos, cache, window)
        rope = {FULL: rope_cos_sin(self.inv_freq, positions, x.dtype)}
        rope[SLIDING] = rope_cos_sin(self.inv_freq_local, positions, x.dtype)
        for i, (layer, kind) in enumerate(zip(self.model.layers, cfg.layer_types)):
            x = self.run_layer(layer, x, *rope[kind], masks[kind], cache, i, positions, kv_len)
        x = self.model.norm(self.select(x, logits_at))
        if not head:
            return x
        logits = self.lm_head(x)
        if cfg.final_logit_softcapping is not None:
            c = cfg.final_logit_softcapping
            logits = torch.tanh(logits / c) * c
        return logits
