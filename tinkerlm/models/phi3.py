"""Phi-3 and Phi-4-mini (HF `phi3`): Phi-3-mini/small/medium 4k and 128k, Phi-3.5-mini, Phi-4-mini.

A Llama-shaped decoder (pre-norm RMSNorm, grouped-query attention, SwiGLU) whose differences change its data flow
enough for a file of its own (it reuses base.py's blocks and llama.py's config checks, layers and backbone):
- q, k and v come from one fused projection `qkv_proj` (rows q | k | v), gate and up from one `gate_up_proj`
  (rows gate | up), as HF stores them and GGUF's `attn_qkv` / `ffn_up` do, so loading stays a pass-through;
- `partial_rotary_factor` (Phi-4-mini: 0.75): RoPE turns only the first `head_dim * factor` dims of each head;
- LongRoPE (`rope_scaling` type `longrope`, `su` in early configs): per-frequency divisors, `short_factor` for
  sequences up to `original_max_position_embeddings` and `long_factor` beyond, and cos/sin scaled by the attention
  factor sqrt(1 + ln(max_position_embeddings / original) / ln(original)).

Which factors a forward pass uses follows transformers' `dynamic_rope_update` for longrope: the long ones when the
highest position of the call plus one exceeds `original_max_position_embeddings`, else the short ones. transformers
decides once for the whole batch; here each row decides by its own length (its last wanted position, `logits_at`,
in a right-padded prefill), so a row gives what it gives alone. In cached decoding that is transformers'
forward with a cache: once a sequence grows past the original length, new tokens use the long factors while the keys
already cached keep the short ones. (transformers' `generate` goes further at that step: Phi3ForCausalLM's
`prepare_inputs_for_generation` drops the cache once and recomputes the whole sequence with the long factors;
tinkerlm's generation does not, so a generation crossing the original length differs from transformers' there.)

References: Abdin et al. 2024, "Phi-3 Technical Report"; Ding et al. 2024, "LongRoPE"; transformers'
`modeling_phi3.py` and `modeling_rope_utils.py` (`_compute_longrope_parameters`, `dynamic_rope_update`), checked
against them by tests/test_phi3.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.models import llama
from tinkerlm.models.base import (
    CausalLM,
    KVCache,
    apply_rope,
    attend,
    make_mask,
    rope_inv_freq,
    swiglu,
)
from tinkerlm.models.llama import LlamaConfig

# transformers' Phi3Config reads "su" (the first Phi-3 128k configs) and "yarn" (Phi-3.5-MoE) as longrope.
LONGROPE = ("longrope", "su", "yarn")


@dataclass
class Phi3Config(LlamaConfig):
    """LlamaConfig's keys and checks, plus Phi-3's partial rotary factor and pretrained context length. The
    Llama-only fields (biases, q/k norms, rope_freq_factors) must stay unset: Phi-3 has none of them."""

    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int = 4096  # the pretrained context LongRoPE extends (transformers' default)
    model_type: str = "phi3"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> Phi3Config:
        d = dict(d)
        params = d.get("rope_parameters")
        if isinstance(params, dict) and "partial_rotary_factor" in params:  # transformers 5 keeps it there
            d["partial_rotary_factor"] = params["partial_rotary_factor"]
        if isinstance(params, dict) and "original_max_position_embeddings" not in d:
            d["original_max_position_embeddings"] = params.get("original_max_position_embeddings")
        cfg = super().from_dict(d, source)
        for key in ("attention_bias", "mlp_bias", "qk_norm", "rope_freq_factors"):
            if getattr(cfg, key):
                raise TinkerError(f"{source}: config key '{key}' is not supported for phi3 (Phi-3 has none)")
        if not 0.0 < cfg.partial_rotary_factor <= 1.0 or cfg.rotary_dim % 2 or cfg.rotary_dim == 0:
            raise TinkerError(
                f"{source}: partial_rotary_factor {cfg.partial_rotary_factor} gives {cfg.rotary_dim} rotary dims of "
                f"head_dim {cfg.head_dim}; expected an even number above 0 (fix config.json)"
            )
        if not 0 < cfg.original_max_position_embeddings <= limits.MAX_CONTEXT:
            raise TinkerError(f"{source}: original_max_position_embeddings must lie in 1..{limits.MAX_CONTEXT}")
        kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type", "default"))
        if kind not in ("default", *LONGROPE):
            raise TinkerError(f"{source}: rope scaling type '{kind}' is not supported for phi3 (supported: longrope)")
        if kind in LONGROPE:
            cfg.rope_scaling = _checked_longrope(cfg, source)
        return cfg

    @property
    def rotary_dim(self) -> int:
        """Dims of each head RoPE turns: the first `head_dim * partial_rotary_factor` (as transformers rounds)."""
        return int(self.head_dim * self.partial_rotary_factor)


def _checked_longrope(cfg: Phi3Config, source: str) -> dict:
    scaling = dict(cfg.rope_scaling, rope_type="longrope")
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if (
            not isinstance(factors, list)
            or len(factors) != cfg.rotary_dim // 2
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors)
        ):
            raise TinkerError(
                f"{source}: rope_scaling.{key} must list {cfg.rotary_dim // 2} positive numbers (rotary dims / 2), "
                f"got {factors!r:.80} (fix config.json)"
            )
    for key in ("factor", "attention_factor"):
        value = scaling.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise TinkerError(f"{source}: rope_scaling.{key} is {value!r:.40}, expected a positive number")
    return scaling


def longrope(cfg: Phi3Config) -> tuple[int, float]:
    """(original context, attention factor) of a LongRoPE config, as transformers' `_compute_longrope_parameters`.

    The original context is the config's `original_max_position_embeddings` (Phi3Config puts it into the RoPE
    parameters, over theirs). The attention factor is `rope_scaling.attention_factor` where given, else
    sqrt(1 + ln(factor) / ln(original)) (1 for a factor of at most 1), the factor being `rope_scaling.factor` where
    given, else max_position_embeddings / original.
    """
    scaling, original = cfg.rope_scaling, cfg.original_max_position_embeddings
    factor = scaling.get("factor") or cfg.max_position_embeddings / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return original, float(attention)


def longrope_inv_freq(dim: int, theta: float, factors: list[float]) -> torch.Tensor:
    """Inverse frequencies (dim / 2,) divided by LongRoPE's per-frequency factors, in fp32 as transformers computes
    them: 1 / (factor * theta ** (2i / dim))."""
    rope_inv_freq(dim, theta)  # checks theta
    ext = torch.tensor(factors, dtype=torch.float32, device="cpu")
    return 1.0 / (ext * float(theta) ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int) -> torch.Tensor:
    """RoPE on the first `rot` dims of each head of x (B, T, H, hd); the rest pass through (partial rotary)."""
    if rot == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.n_heads, self.n_kv, self.hd, self.rot = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.rotary_dim,
        )
        self.sizes = [self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd]
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.sizes), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, positions, kv_len: int):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.view(B, T, self.n_heads, self.hd)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv, self.hd)  # (B, T, n_kv, hd)
        v = v.view(B, T, self.n_kv, self.hd)
        q, k = rotate(q, cos, sin, self.rot), rotate(k, cos, sin, self.rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v, positions, kv_len)  # (B, n_kv, S, hd)
        y = attend(q, k, v, mask)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(swiglu(gate.contiguous(), up.contiguous()))


class Phi3ForCausalLM(CausalLM):
    def __init__(self, cfg: Phi3Config, source: str = "model"):
        super().__init__()
        self.config = cfg
        self.source = source
        self.model = llama.Backbone(cfg, Attention, MLP)  # Llama's layers with Phi-3's fused projections
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.n_layers, self.n_kv_heads, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.max_context = cfg.max_position_embeddings
        rot = cfg.rotary_dim
        self.inv_freq_long, self.original, self.attention_factor = None, None, 1.0
        if cfg.rope_scaling is None:
            self.inv_freq = rope_inv_freq(rot, cfg.rope_theta, source=source)
        else:  # longrope (the config refuses other types)
            self.original, self.attention_factor = longrope(cfg)
            self.inv_freq = longrope_inv_freq(rot, cfg.rope_theta, cfg.rope_scaling["short_factor"])
            self.inv_freq_long = longrope_inv_freq(rot, cfg.rope_theta, cfg.rope_scaling["long_factor"])
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # No `fused_decode` attribute on purpose: tinkerlm.quant.decode's step reads separate q/k/v and gate/up weights
    # and turns whole heads with one RoPE table, so declaring one would attach it here wrongly. Quantized Phi-3
    # decodes through its modules (QLinear on the packed qkv_proj and gate_up_proj: one product each already).

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype, logits_at: torch.Tensor | None = None):
        """cos and sin (B, T, rotary_dim / 2) for positions (B, T), times the attention factor (in fp32, then cast).

        With LongRoPE each row takes the long factors when its length in this call (its last position + 1; the
        position at `logits_at` where given, the last real token of a right-padded row) exceeds the original context.
        """
        inv_freq = self.inv_freq
        if self.inv_freq_long is not None:
            last = positions.amax(1) if logits_at is None else positions.gather(1, logits_at[:, None].long())[:, 0]
            long = (last + 1 > self.original)[:, None, None]  # (B, 1, 1)
            inv_freq = torch.where(long, self.inv_freq_long, self.inv_freq)  # (B, 1, rot/2)
        freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, rot/2)
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        head: bool = True,
    ):
        """Logits (B, T, V) for `input_ids` (B, T), or (B, 1, V) at per-row index `logits_at` (B,); see CausalLM."""
        window = self.config.sliding_window
        positions, k_pos, kv_len = self.step_inputs(input_ids, cache, self.max_context, self.source)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if segments is not None:
            positions, mask = self.segment_inputs(segments, window)
        else:
            mask = make_mask(positions, k_pos, cache, window)
        cos, sin = self.rope_tables(positions, x.dtype, logits_at)
        for i, layer in enumerate(self.model.layers):
            x = self.run_layer(layer, x, cos, sin, mask, cache, i, positions, kv_len)
        x = self.model.norm(self.select(x, logits_at))
        return self.lm_head(x) if head else x
