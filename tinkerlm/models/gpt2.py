"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused qkv projection, GELU MLP.

Reference: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", and OpenAI's gpt-2 code.
Parameter names are Hugging Face's. HF stores GPT-2's projections as `Conv1D` with (in, out) weights; the spec
(tinkerlm/formats/specs/gpt2.py, `conv1d`) names them and loading transposes them once, so every projection here
is a swappable `nn.Linear`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.models.base import CausalLM, KVCache, attend, check_positive, config_from_dict, make_mask

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


# Largest value of each size a config may declare (tinkerlm/limits.py), checked before anything is allocated.
BOUNDS = {
    "vocab_size": limits.MAX_VOCAB,
    "n_embd": limits.MAX_WIDTH,
    "n_layer": limits.MAX_LAYERS,
    "n_head": limits.MAX_HEADS,
    "n_positions": limits.MAX_CONTEXT,
    "n_inner": limits.MAX_WIDTH,
}


@dataclass
class GPT2Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int | None = None  # defaults to 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    model_type: str = "gpt2"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> GPT2Config:
        cfg = config_from_dict(cls, d, source, bounds=BOUNDS)
        if cfg.n_inner is None:
            cfg.n_inner = 4 * cfg.n_embd
        check_positive(source, vocab_size=cfg.vocab_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head)
        if cfg.n_embd % cfg.n_head:
            raise TinkerError(f"{source}: n_embd ({cfg.n_embd}) must be a multiple of n_head ({cfg.n_head})")
        if cfg.activation_function not in ACTIVATIONS:
            raise TinkerError(
                f"{source}: activation_function '{cfg.activation_function}' is not supported "
                f"(supported: {', '.join(ACTIVATIONS)})"
            )
        if cfg.scale_attn_by_inverse_layer_idx:
            raise TinkerError(f"{source}: scale_attn_by_inverse_layer_idx is not supported")
        return cfg


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_heads, self.hd = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.scale = None if cfg.scale_attn_weights else 1.0

    def forward(self, x, mask, cache: KVCache | None, layer: int, positions, kv_len: int):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_heads, self.hd).unbind(2)  # each (B, T, H, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v, positions, kv_len)  # (B, H, S, hd)
        y = attend(q, k, v, mask, self.scale)  # (B, H, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, cache, layer, positions, kv_len):
        x = x + self.attn(self.ln_1(x), mask, cache, layer, positions, kv_len)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, cfg: GPT2Config, source: str = "model"):
        super().__init__()
        self.config = cfg
        self.source = source
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.n_layers, self.n_kv_heads, self.head_dim = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        self.max_context = cfg.n_positions
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

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
        positions, k_pos, kv_len = self.step_inputs(input_ids, cache, self.max_context, self.source)
        if segments is not None:
            positions, mask = self.segment_inputs(segments)
        else:
            mask = make_mask(positions, k_pos, cache, None)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = self.run_layer(block, x, mask, cache, i, positions, kv_len)
        x = self.transformer.ln_f(self.select(x, logits_at))
        return self.lm_head(x) if head else x


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 checkpoint -> this module's names: add the `transformer.` prefix where a bare GPT2Model saved
    without it, and drop the causal-mask buffers old checkpoints carry. (The Conv1D weights are transposed after
    this, by `tinkerlm.models.hf_layout`, from the spec.)"""
    out = {}
    for name, t in sd.items():
        if name.endswith(".attn.masked_bias") or (name.endswith(".attn.bias") and t.dim() > 1):
            continue  # a saved causal-mask buffer, not a parameter
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        out[name] = t
    return out
