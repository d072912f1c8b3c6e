"""Blocks shared by every architecture: config parsing, norms, rotary embeddings, attention, KV cache.

References: RMSNorm (Zhang & Sennrich 2019), RoPE (Su et al. 2021, "RoFormer"), Llama 3.1 frequency scaling
(Meta's reference code), grouped-query attention (Ainslie et al. 2023), sliding-window attention (Mistral 7B).

Conventions: activations are (B, T, C); attention tensors are (B, heads, T, head_dim); every sequence in a batch
has its own positions, so right-padded prompts of different lengths share one forward pass and one cache.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinkerlm.errors import TinkerError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Config


def config_from_dict(cls, d: dict[str, Any], source: str, renames: dict[str, str] | None = None):
    """Build the dataclass `cls` from an HF-style config dict.

    Fields without a default are required: a missing one raises `TinkerError` naming `source` and the key.
    Keys the dataclass does not know are logged (at debug level), never silently relied on.
    """
    d = {(renames or {}).get(k, k): v for k, v in d.items()}
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, f in names.items():
        if name in d and d[name] is not None:
            kwargs[name] = d[name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TinkerError(f"{source}: config is missing required key '{name}' (is this a complete config.json?)")
    unknown = sorted(set(d) - set(names))
    if unknown:
        log.debug("%s: config keys not used by %s: %s", source, cls.__name__, ", ".join(unknown))
    return cls(**kwargs)


def check_positive(source: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise TinkerError(f"{source}: config key '{key}' must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the activation dtype, then cast back before the weight (as HF does).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    freq_factors: list[float] | None = None,
    source: str = "config",
) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32 for the given RoPE variant.

    `scaling` is HF's `rope_scaling` / `rope_parameters` dict: types default, linear and llama3 are supported.
    `freq_factors` is llama.cpp's per-frequency divisor (GGUF `rope_freqs.weight`), how GGUF stores llama3 scaling.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    else:
        raise TinkerError(
            f"{source}: rope scaling type '{kind}' is not supported (supported: default, linear, llama3)"
        )
    if freq_factors is not None:
        factors = torch.tensor(freq_factors, dtype=torch.float32, device="cpu")
        if factors.numel() != inv_freq.numel():
            raise TinkerError(
                f"{source}: rope_freq_factors has {factors.numel()} values, expected {inv_freq.numel()} (head_dim / 2)"
            )
        inv_freq = inv_freq / factors
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin tables (B, 1, T, head_dim) for integer positions (B, T), computed in fp32."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by the tables, in HF's rotate-half layout (first half pairs with second half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values for every layer, written in place; one row per sequence.

    Each row keeps its own length, so sequences of different lengths share a batch (right-padded prompts, and later
    the server's continuous batching, where rows are slots that come and go). Slots past a row's length may hold
    stale values: the attention mask never lets a query see a slot beyond its own position, and a row's next
    token overwrites the slot it needs before reading it.
    """

    # Set by `prepare` for the duration of one forward: the common start when all rows are aligned, else None.
    uniform_start: int | None = None

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype=torch.float32):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.lengths = [0] * batch  # tokens stored per row (python ints: no host sync to read them)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def positions(self, n_new: int) -> torch.Tensor:
        """Positions (B, n_new) of the next `n_new` tokens of each row."""
        start = torch.tensor(self.lengths, dtype=torch.long)[:, None]
        return start + torch.arange(n_new, dtype=torch.long)[None, :]

    def advance(self, counts: list[int] | int) -> None:
        counts = [counts] * self.batch if isinstance(counts, int) else counts
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows [start, stop) sharing this one's storage (views, no copy); its `lengths` is a new list,
        so a caller that advances it copies the lengths back."""
        view = object.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.max_len = self.max_len
        view.lengths = self.lengths[start:stop]
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv_len: int):
        """Write k, v (B, n_kv, T, hd) at `positions` (B, T); return the first `kv_len` slots of the layer."""
        kc, vc = self.k[layer], self.v[layer]
        B, _, T, _ = k.shape
        if self.uniform_start is not None:
            s = self.uniform_start
            kc[:, :, s : s + T] = k
            vc[:, :, s : s + T] = v
        else:
            rows = torch.arange(B)[:, None]  # (B, 1), broadcast against positions (B, T)
            kc[rows, :, positions] = k.transpose(1, 2)  # indexed view is (B, T, n_kv, hd)
            vc[rows, :, positions] = v.transpose(1, 2)
        return kc[:, :, :kv_len], vc[:, :, :kv_len]

    def prepare(self, n_new: int, source: str = "model") -> tuple[torch.Tensor, int]:
        """Positions for `n_new` tokens per row and the key length to attend over; checks the context fits."""
        longest = max(self.lengths) + n_new
        if longest > self.max_len:
            raise TinkerError(
                f"{source}: {longest} tokens do not fit the context of {self.max_len} "
                "(shorten the prompt or lower max_tokens)"
            )
        self.uniform_start = self.lengths[0] if len(set(self.lengths)) == 1 else None
        return self.positions(n_new), longest


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): query at position p sees keys at positions <= p (and > p - window)."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]  # (B, T, S)
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed[:, None]


CAUSAL = "causal"  # a mask argument meaning plain causal attention from position 0 (SDPA's fast is_causal path)


def attend(q, k, v, mask, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads: q (B, H, T, hd), k/v (B, n_kv, S, hd).

    `mask` is a boolean (B, 1, T, S) tensor, None (every key visible) or CAUSAL."""
    causal = isinstance(mask, str)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# Shared model plumbing


class CausalLM(nn.Module):
    """What every architecture implements, so generation, serving and evaluation treat them alike.

    Subclasses set `config`, `n_layers`, `n_kv_heads`, `head_dim`, `max_context`, and implement
    `forward(input_ids, cache=None, logits_at=None)` returning logits (B, T, V), or (B, 1, V) at `logits_at`.
    """

    config: Any
    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_context: int

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        max_len = min(max_len or self.max_context, self.max_context)
        dtype = next(self.parameters()).dtype
        return KVCache(self.n_layers, batch, max_len, self.n_kv_heads, self.head_dim, dtype=dtype)

    @staticmethod
    def step_inputs(input_ids: torch.Tensor, cache: KVCache | None, max_context: int, source: str):
        """Positions (B, T), key positions (B, S) and key length for a forward over `input_ids` (B, T)."""
        B, T = input_ids.shape
        if cache is None:
            if T > max_context:
                raise TinkerError(f"{source}: {T} tokens do not fit the context of {max_context} (shorten the input)")
            pos = torch.arange(T, dtype=torch.long).expand(B, T)
            return pos, pos, T
        pos, kv_len = cache.prepare(T, source)
        k_pos = torch.arange(kv_len, dtype=torch.long).expand(B, kv_len)
        return pos, k_pos, kv_len

    @staticmethod
    def select(h: torch.Tensor, logits_at: torch.Tensor | None) -> torch.Tensor:
        """Keep only the hidden states whose logits are wanted: (B, T, C) -> (B, 1, C) at index `logits_at` (B,)."""
        if logits_at is None:
            return h
        return h[torch.arange(h.shape[0]), logits_at][:, None]


def make_mask(positions, k_pos, cache: KVCache | None, window: int | None):
    """The cheapest correct mask: None for one aligned sequence decoding one token, CAUSAL when every row starts at
    position 0 with no window in play (prefill), else an explicit boolean mask."""
    B, T = positions.shape
    if B == 1 and T == 1 and window is None and cache is not None:
        return None
    if T > 1 and k_pos.shape[1] == T and (cache is None or cache.uniform_start == 0) and (window is None or window >= T):
        return CAUSAL
    return attention_mask(positions, k_pos, window)
