"""Blocks shared by every architecture: config parsing, norms, rotary embeddings, attention, KV cache.

References: RMSNorm (Zhang & Sennrich 2019), RoPE (Su et al. 2021, "RoFormer"), Llama 3.1 frequency scaling
(Meta's reference code), YaRN (Peng et al. 2023) and dynamic NTK scaling (as transformers' `modeling_rope_utils`),
grouped-query attention (Ainslie et al. 2023), sliding-window attention (Mistral 7B).

Conventions: activations are (B, T, C); attention tensors are (B, heads, T, head_dim); every sequence in a batch
has its own positions, so right-padded prompts of different lengths share one forward pass and one cache.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinkerlm.errors import TinkerError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Config


def config_from_dict(
    cls, d: dict[str, Any], source: str, renames: dict[str, str] | None = None, bounds: dict[str, int] | None = None
):
    """Build the dataclass `cls` from an HF-style config dict, checking each value's type and size.

    Fields without a default are required: a missing one raises `TinkerError` naming `source` and the key. Each
    value must have its field's annotated type (an int field takes no float, string, list or bool; a float field
    takes an int), and an int field named in `bounds` must lie in 0..bounds[name] (the limits of
    `tinkerlm.limits`), so a hostile config.json cannot ask for a model of 2^31 layers before any weight is read.
    Keys the dataclass does not know are logged (at debug level), never silently relied on.
    """
    if not isinstance(d, dict):
        raise TinkerError(f"{source}: config is not a JSON object")
    d = {(renames or {}).get(k, k): v for k, v in d.items()}
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, f in names.items():
        if name in d and d[name] is not None:
            kwargs[name] = _checked(source, name, d[name], f.type, (bounds or {}).get(name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TinkerError(f"{source}: config is missing required key '{name}' (is this a complete config.json?)")
    unknown = sorted(set(d) - set(names))
    if unknown:
        log.debug("%s: config keys not used by %s: %s", source, cls.__name__, ", ".join(unknown))
    return cls(**kwargs)


def _checked(source: str, key: str, value: Any, annotation: Any, bound: int | None) -> Any:
    """`value` if it has the type a config field is annotated with ("int | None", "float", "dict[str, Any] | None",
    "list[float] | None", "bool", "str") and an int lies within `bound`; else a TinkerError naming the key."""
    kind = str(annotation).split("|")[0].split("[")[0].strip()
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": number and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "dict": isinstance(value, dict),
        "list": isinstance(value, list)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value),
    }.get(kind, True)
    if not ok:
        expected = {"list": "a list of numbers", "dict": "an object", "int": "an integer", "float": "a number"}
        raise TinkerError(
            f"{source}: config key '{key}' is {value!r:.80}, expected {expected.get(kind, 'a ' + kind)} "
            "(fix config.json)"
        )
    if kind == "int" and bound is not None and not 0 <= value <= bound:
        raise TinkerError(
            f"{source}: config key '{key}' is {value}, outside 0..{bound} (the config is corrupt or hostile)"
        )
    return value


def check_positive(source: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise TinkerError(f"{source}: config key '{key}' must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Norms


# ----------------------------------------------------------------------------------------------------------------
# Fused elementwise ops. For float32 on CPU the C++ kernels (tinkerlm/kernels/) compute RMSNorm, RoPE and
# SwiGLU in one pass each, forward and backward; otherwise (other dtypes, no compiler, TINKERLM_KERNELS=0) the
# PyTorch formulas below run. Tests hold the two to the same values and gradients.


def _kernels(*tensors: torch.Tensor):
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
        return None
    from tinkerlm.kernels import ops

    return ops()


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, r = _kernels(x).rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        gx = _kernels(x).rms_norm_bwd(grad, x, weight, r) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:  # full fine-tuning: sum over rows of g * x / rms
            gw = (grad.reshape(-1, x.shape[-1]) * x.reshape(-1, x.shape[-1]) * r[:, None]).sum(0)
        return gx, gw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _kernels(x, self.weight) is not None:
            return _RMSNormFn.apply(x, self.weight, self.eps)
        # Statistics in fp32 whatever the activation dtype, then cast back before the weight (as HF does).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _kernels(gate).swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return tuple(_kernels(gate).swiglu_bwd(grad, gate, up))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the gated MLP activation of Llama-family models."""
    if _kernels(gate, up) is not None:
        return _SwiGLUFn.apply(gate, up)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    freq_factors: list[float] | None = None,
    source: str = "config",
    seq_len: int | None = None,
) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32 for the given RoPE variant.

    `scaling` is HF's `rope_scaling` / `rope_parameters` dict: types default, linear, llama3, yarn and dynamic are
    supported (as transformers' `modeling_rope_utils` computes them). `freq_factors` is llama.cpp's per-frequency
    divisor (GGUF `rope_freqs.weight`), how GGUF stores llama3 scaling. `seq_len` is for dynamic NTK scaling only:
    the length of the sequence in hand (see `rope_dynamic_seq_len`); None gives the unscaled frequencies.
    """
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 1.0 < float(theta) < math.inf:
        raise TinkerError(f"{source}: rope_theta {theta!r:.40} must be a finite number above 1 (fix the config)")
    theta = float(theta)  # an int past 2^63 would overflow torch's pow
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    try:
        return _scaled(inv_freq, head_dim, theta, scaling, freq_factors, source, seq_len)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:  # missing, of the wrong type
        raise TinkerError(f"{source}: rope_scaling {scaling!r:.200} is malformed ({exc!r}) (fix config.json)") from None


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The RoPE variant a `rope_scaling` dict names ("default" for None)."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def _scaled(inv_freq: torch.Tensor, dim: int, theta: float, scaling, freq_factors, source: str, seq_len):
    kind = rope_type(scaling)
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
    elif kind == "yarn":
        # YaRN (Peng et al. 2023): frequencies of few rotations over the original context (below `beta_slow`) are
        # interpolated (divided by `factor`), those of many (above `beta_fast`) kept, a linear ramp between.
        factor, old_ctx = _factor(scaling), float(scaling["original_max_position_embeddings"])
        fast, slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)
        low, high = (dim * math.log(old_ctx / (n * 2 * math.pi)) / (2 * math.log(theta)) for n in (fast, slow))
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = torch.clamp(
            (torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low or 0.001), 0, 1
        )
        kept = 1 - ramp  # 1: extrapolated (original frequency), 0: interpolated
        interpolated = 1.0 / (factor * theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim))
        inv_freq = interpolated * (1 - kept) + inv_freq * kept
        rope_attention_factor(scaling)  # checked here, so that a malformed value is reported as the others are
    elif kind == "dynamic":
        # Dynamic NTK: past the original context (the config's `max_position_embeddings`, which the model copies to
        # `original_max_position_embeddings`) the base grows with the sequence.
        old_ctx = int(scaling["original_max_position_embeddings"])
        if seq_len is not None and seq_len > old_ctx:
            factor = _factor(scaling)
            # in fp32 tensors, as transformers computes it from a tensor length
            base = theta * ((factor * torch.tensor(seq_len, device="cpu") / old_ctx) - (factor - 1)) ** (
                dim / (dim - 2)
            )
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    else:
        raise TinkerError(
            f"{source}: rope scaling type '{kind}' is not supported (supported: default, linear, llama3, yarn, dynamic)"
        )
    if freq_factors is not None:
        factors = torch.tensor(freq_factors, dtype=torch.float32, device="cpu")
        if factors.numel() != inv_freq.numel():
            raise TinkerError(
                f"{source}: rope_freq_factors has {factors.numel()} values, expected {inv_freq.numel()} (head_dim / 2)"
            )
        inv_freq = inv_freq / factors
    return inv_freq


def _factor(scaling: dict[str, Any]) -> float:
    factor = float(scaling["factor"])
    if not 0 < factor < math.inf:
        raise ValueError(f"factor {factor} is not a positive number")
    return factor


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """What cos and sin are multiplied by: YaRN's attention temperature (`attention_factor`, else from `mscale` and
    `mscale_all_dim` or 0.1 ln(factor) + 1), 1.0 for the other types."""
    if rope_type(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return float(mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"]))
    return mscale(1)


def rope_dynamic_seq_len(scaling: dict[str, Any] | None, positions: torch.Tensor) -> int | None:
    """For dynamic NTK scaling, the sequence length its frequencies follow: the largest position + 1 in the batch
    (as transformers takes it from `position_ids`); None for the other types, whose frequencies are fixed."""
    return int(positions.max()) + 1 if rope_type(scaling) == "dynamic" else None


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, attention_factor: float = 1.0):
    """Half-width cos and sin tables (B, T, head_dim/2) for integer positions (B, T), computed in fp32 and
    multiplied by `attention_factor` (YaRN's; see `rope_attention_factor`)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    return (freqs.cos() * attention_factor).to(dtype), (freqs.sin() * attention_factor).to(dtype)


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _kernels(x).rope_apply(x, cos, sin, False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _kernels(grad).rope_apply(grad, cos, sin, True), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, hd) by the tables (B, T, hd/2), in HF's rotate-half layout (first half pairs with second)."""
    if cos.dtype == torch.float32 and x.dtype != torch.float32 and x.device.type == "cpu":
        x = x.float()  # bf16 q, k under autocast with fp32 tables: the formula below would promote them to fp32 too
    if _kernels(x, cos, sin) is not None:
        return _RopeFn.apply(x, cos, sin)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, :, None], sin[:, :, None]  # (B, T, 1, hd/2), broadcast over heads
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# KV cache


KV_CACHES = ("f32", "q8")  # KV cache formats: the activations' dtype, or 8-bit records (see `KVCache`)


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """Keys or values (..., hd) -> 8-bit records (..., hd + 4) int8: hd values rounded to round(x * 127 / amax),
    then the fp32 scale amax / 127 in its 4 bytes (one scale per token and head). kernels/decode.cpp rounds the
    same way (multiply by 127 / amax, round half to even), so both write the same bytes for the same inputs."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)  # (..., 1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv).to(torch.int8)
    return torch.cat([q, (amax / 127.0).view(torch.int8)], dim=-1)  # (..., hd + 4)


def dequantize_kv(r: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """8-bit records (..., hd + 4) -> values (..., hd) in `dtype`."""
    hd = r.shape[-1] - 4
    scale = r[..., hd:].contiguous().view(torch.float32)  # (..., 1)
    return (r[..., :hd].to(torch.float32) * scale).to(dtype)


def untouched_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros that take memory only where written: an anonymous map, whose pages the OS gives zeroed on first
    touch. `torch.zeros` writes every byte up front, so a cache sized for a whole context (a server's slots) would
    be resident before its first token. Small ones (under 1 MiB) come from torch's allocator."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < 1 << 20:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)  # the tensor keeps the map alive


class KVCache:
    """Preallocated keys and values for every layer, written in place; one row per sequence.

    Each row keeps its own length, so sequences of different lengths share a batch (right-padded prompts, and later
    the server's continuous batching, where rows are slots that come and go). Slots past a row's length may hold
    stale values: the attention mask never lets a query see a slot beyond its own position, and a row's next
    token overwrites the slot it needs before reading it.

    `quantized` (kv_cache="q8") stores each token's keys and values of each head as one 8-bit record: head_dim int8
    values and their fp32 scale (absmax / 127), `k[layer]` being (B, n_kv, max_len, hd + 4) int8: 68 bytes instead
    of 256 per head and token at hd 64 (3.8x smaller; 3.9x at hd 128). One scale per (token, head) rather than per
    32 values as ggml's q8_0: the attention kernels then apply it once per key (to the score, and to the softmax
    weight of the value), so dequantizing costs nothing in the inner loops; keeping it in the record lets the
    prefix cache, `rows` and `read`/`write` move records as plain tensors. Writes quantize; every reader sees the
    rounded values, so a prefix restored from the prefix cache gives a cold run's numbers. The fused decode step
    (kernels/decode.cpp) reads records in place; `update` (the PyTorch path) dequantizes the slots it returns.
    """

    # Set by `prepare` for the duration of one forward: the common start when all rows are aligned, else None.
    uniform_start: int | None = None

    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype=torch.float32,
        quantized: bool = False,
    ):
        shape = (batch, n_kv_heads, max_len, head_dim + 4 if quantized else head_dim)
        store = torch.int8 if quantized else dtype
        self.k = [untouched_zeros(shape, store) for _ in range(n_layers)]
        self.v = [untouched_zeros(shape, store) for _ in range(n_layers)]
        self.max_len = max_len
        self.dtype, self.quantized = dtype, quantized  # dtype: what `update` returns
        self.lengths = [0] * batch  # tokens stored per row (python ints: no host sync to read them)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held (every layer, row and slot)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def positions(self, n_new: int) -> torch.Tensor:
        """Positions (B, n_new) of the next `n_new` tokens of each row."""
        start = torch.tensor(self.lengths, dtype=torch.long)[:, None]
        return start + torch.arange(n_new, dtype=torch.long)[None, :]

    def advance(self, counts: list[int] | int) -> None:
        counts = [counts] * self.batch if isinstance(counts, int) else counts
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows [start, stop) sharing this one's storage (views, no copy); its `lengths` is a new list,
        so a caller that advances it copies the lengths back."""
        view = object.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.max_len = self.max_len
        view.dtype, view.quantized = self.dtype, self.quantized
        view.lengths = self.lengths[start:stop]
        return view

    def read(self, row: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of row `row`'s keys and values at positions [start, stop), layers stacked: (L, n_kv, n, hd) each
        (what the prefix cache keeps; 8-bit records (L, n_kv, n, hd + 4) in a quantized cache)."""
        return torch.stack([t[row, :, start:stop] for t in self.k]), torch.stack(
            [t[row, :, start:stop] for t in self.v]
        )

    def write(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys and values (L, n_kv, n, hd), as `read` returns them, at positions [start, start + n) of `row`."""
        n = k.shape[2]
        for layer, (kc, vc) in enumerate(zip(self.k, self.v)):
            kc[row, :, start : start + n] = k[layer]
            vc[row, :, start : start + n] = v[layer]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv_len: int):
        """Write k, v (B, n_kv, T, hd) at `positions` (B, T); return the first `kv_len` slots of the layer.

        A quantized cache writes 8-bit records and returns those slots dequantized (the PyTorch path's copy)."""
        kc, vc = self.k[layer], self.v[layer]
        if self.quantized:
            k, v = quantize_kv(k), quantize_kv(v)  # (B, n_kv, T, hd + 4)
        B, _, T, _ = k.shape
        if self.uniform_start is not None:
            s = self.uniform_start
            kc[:, :, s : s + T] = k
            vc[:, :, s : s + T] = v
        else:
            rows = torch.arange(B)[:, None]  # (B, 1), broadcast against positions (B, T)
            kc[rows, :, positions] = k.transpose(1, 2)  # indexed view is (B, T, n_kv, hd)
            vc[rows, :, positions] = v.transpose(1, 2)
        if self.quantized:
            return dequantize_kv(kc[:, :, :kv_len], self.dtype), dequantize_kv(vc[:, :, :kv_len], self.dtype)
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


class PackedDocs:
    """Where the documents of packed training rows lie, so attention runs per document.

    Rows (B, T) hold several documents side by side (`segments` numbers them per row, -1 marks padding). Gathering
    each document's tokens into a row of its own, (n_docs, L) right-padded, lets attention run causally per
    document: the block-diagonal work only, instead of the full (T, T) square under a mask. Padding sits after each
    document's tokens, so the causal mask already hides it from every real query.
    """

    def __init__(self, segments: torch.Tensor):
        B, T = segments.shape
        flat = segments.reshape(-1)
        real = flat >= 0
        start = torch.ones_like(real)
        start[1:] = flat[1:] != flat[:-1]
        start[::T] = True  # every row starts a document
        doc = torch.cumsum(start & real, 0) - 1  # document number of each real token
        self.tokens = torch.nonzero(real).squeeze(1)  # flat indices of real tokens, document-major
        doc_of = doc[self.tokens]
        lengths = torch.bincount(doc_of)
        first = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(len(self.tokens)) - first[doc_of]  # position of each real token in its document
        n_docs, L = len(lengths), int(lengths.max())
        self.gather = torch.zeros(n_docs, L, dtype=torch.long)  # padding slots read token 0: never attended to
        self.gather[doc_of, pos] = self.tokens
        self.valid = torch.zeros(n_docs, L, dtype=torch.bool)
        self.valid[doc_of, pos] = True
        self.positions = torch.zeros(B * T, dtype=torch.long)
        self.positions[self.tokens] = pos
        self.positions = self.positions.view(B, T)
        self.shape = (B, T)


class Branches:
    """Rows holding a shared context followed by several continuations ("branches") side by side, as scoring
    multiple-choice questions needs: the choices of one question run in one row, their context computed once.

    `branch` (B, T) numbers each token's part of its row (0: the context, 1, 2, ...: the continuations, -1: padding
    at the end) and `positions` (B, T) holds its position (a continuation's tokens continue from the context's
    length, whatever comes before them in the row). A token attends to the earlier tokens of the context and of its
    own branch: exactly what it would see in a row holding only the context and its own continuation. Passed to a
    model's forward as `segments` (see `CausalLM.segment_inputs`).
    """

    def __init__(self, branch: torch.Tensor, positions: torch.Tensor):
        self.branch, self.positions = branch, positions

    def mask(self, window: int | None = None) -> torch.Tensor:
        """Boolean (B, 1, T, T): query i sees key j <= i of the context or of its own branch (within `window`)."""
        T = self.branch.shape[1]
        idx = torch.arange(T)
        key, query = self.branch[:, None, :], self.branch[:, :, None]
        allowed = (idx[:, None] >= idx[None, :]) & ((key == 0) | (key == query))  # (B, T, T)
        if window is not None:
            allowed &= (self.positions[:, :, None] - self.positions[:, None, :]) < window
        return allowed[:, None]


def _attend_packed(q, k, v, docs: PackedDocs, scale: float | None) -> torch.Tensor:
    B, T = docs.shape

    def per_doc(t):  # (B, h, T, hd) -> (n_docs, h, L, hd)
        flat = t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[3])
        return flat[docs.gather].transpose(1, 2)

    y = F.scaled_dot_product_attention(
        per_doc(q), per_doc(k), per_doc(v), is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )  # (n_docs, H, L, hd)
    out = y.new_zeros(B * T, q.shape[1], q.shape[3])
    out[docs.tokens] = y.transpose(1, 2)[docs.valid]
    return out.view(B, T, q.shape[1], q.shape[3]).transpose(1, 2)  # (B, H, T, hd)


def attend(q, k, v, mask, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads: q (B, H, T, hd), k/v (B, n_kv, S, hd).

    `mask` is a boolean (B, 1, T, S) tensor, None (every key visible), CAUSAL, PackedDocs (training rows), or an
    object with its own `attend` (a batching step mixing rows, see `make_mask`)."""
    if q.dtype == torch.float32 and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # Mixed-precision training with fp32 weights: RoPE hands back q, k in fp32; attention stays there (softmax
        # in fp32, and CPU flash attention's fp32 kernels beat its bf16 ones: 20 vs 26 ms fwd + bwd at 8x6x256x32).
        with torch.autocast("cpu", enabled=False):
            return attend(q, k.float(), v.float(), mask, scale)
    if hasattr(mask, "attend"):
        return mask.attend(q, k, v, scale)
    if isinstance(mask, PackedDocs):
        return _attend_packed(q, k, v, mask, scale)
    causal = isinstance(mask, str)
    if causal and q.shape[-1] % 16 == 0 and not (torch.is_grad_enabled() and q.requires_grad):
        ops = _kernels(q, k, v)
        from tinkerlm.kernels import ATTENTION_ISAS

        most = ATTENTION_ISAS.get(ops.isa, 0) if ops is not None else 0  # fp32 inference: 1.1-2x torch's flash
        if most is None or k.shape[2] <= most:  # attention where the build's kernel beats it (kernels/__init__.py)
            return ops.attention_causal(q, k, v, scale or q.shape[-1] ** -0.5).transpose(1, 2)  # (B, H, T, hd)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if causal else mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


# ----------------------------------------------------------------------------------------------------------------
# Shared model plumbing


class CausalLM(nn.Module):
    """What every architecture implements, so generation, serving and evaluation treat them alike.

    Subclasses set `config`, `n_layers`, `n_kv_heads`, `head_dim`, `max_context`, and implement
    `forward(input_ids, cache=None, logits_at=None, segments=None, head=True)` returning logits (B, T, V), or
    (B, 1, V) at `logits_at`. Training passes `segments` (packed documents, see `segment_inputs`) and `head=False`
    to get the final normed hidden states (B, T, C) and apply `lm_head` only where the loss needs it.
    """

    config: Any
    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_context: int
    kv_cache: str = "f32"  # the format of the caches `new_cache` makes: one of KV_CACHES (set at load time)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        max_len = min(max_len or self.max_context, self.max_context)
        dtype = next(self.parameters()).dtype
        quantized = self.kv_cache == "q8"
        return KVCache(self.n_layers, batch, max_len, self.n_kv_heads, self.head_dim, dtype=dtype, quantized=quantized)

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

    # Recompute activations in the backward pass instead of keeping them (set by the trainer): False keeps them all;
    # True or "full" keeps each layer's input only and reruns the layer; "selective" keeps the layer's matmul and
    # attention outputs and reruns only the cheap ops between them (norms, RoPE, SwiGLU, LoRA's sums, gathers).
    checkpoint_layers: bool | str = False

    def run_layer(self, layer: nn.Module, *args) -> torch.Tensor:
        mode = self.checkpoint_layers
        if mode and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            if mode == "selective":
                return checkpoint(layer, *args, use_reentrant=False, context_fn=_keep_matmuls)
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    @staticmethod
    def segment_inputs(segments: torch.Tensor, window: int | None = None):
        """Positions (B, T) and the attention mask for packed training rows: `segments` (B, T) numbers the
        documents in each row (-1 is padding); positions restart at 0 in each document and a token attends only to
        earlier tokens of its own. The mask is a PackedDocs, or an explicit (B, 1, T, T) one when a sliding window
        shorter than a document is in play. `segments` may also be `Branches` (a context shared by continuations)."""
        if isinstance(segments, Branches):  # a context and its continuations (scoring), not packed documents
            return segments.positions, segments.mask(window)
        docs = PackedDocs(segments)
        if window is None or window >= docs.gather.shape[1]:
            return docs.positions, docs
        B, T = segments.shape
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)  # (B, T, T)
        mask = (attention_mask(docs.positions, docs.positions, window) & same[:, None]) | torch.eye(T, dtype=torch.bool)
        return docs.positions, mask

    @staticmethod
    def select(h: torch.Tensor, logits_at: torch.Tensor | None) -> torch.Tensor:
        """Keep only the hidden states whose logits are wanted: (B, T, C) -> (B, 1, C) at index `logits_at` (B,)."""
        if logits_at is None:
            return h
        return h[torch.arange(h.shape[0]), logits_at][:, None]


LOW_RANK = 128  # a product with an inner dimension up to this is recomputed by selective recomputation


def _keep_matmuls():
    """Selective recomputation's rule: the outputs of matrix products and attention are kept, the rest recomputed,
    low-rank products included (LoRA's `y + h @ (s B)^T`, or `h @ (s B)^T` under bf16 autocast, inner dimension the
    rank: cheap to redo, large to keep)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    kept = {
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_flash_attention.default,
    }

    def policy(ctx, op, *args, **kwargs):
        low = False
        if op in (aten.mm.default, aten.addmm.default):
            left = args[1] if op == aten.addmm.default else args[0]  # the (tokens, inner) operand
            low = left.shape[-1] <= LOW_RANK
        if op in kept and not low:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def make_mask(positions, k_pos, cache: KVCache | None, window: int | None):
    """The cheapest correct mask: None for one aligned sequence decoding one token, CAUSAL when every row starts at
    position 0 with no window in play (prefill), else an explicit boolean mask. A cache that lays out its own step
    (batching.py's mixed prefill and decode step) gives its own mask, for `attend`, through `step_mask`."""
    if hasattr(cache, "step_mask"):
        return cache.step_mask(window)
    B, T = positions.shape
    if B == 1 and T == 1 and window is None and cache is not None:
        return None
    if (
        T > 1
        and k_pos.shape[1] == T
        and (cache is None or cache.uniform_start == 0)
        and (window is None or window >= T)
    ):
        return CAUSAL
    return attention_mask(positions, k_pos, window)
