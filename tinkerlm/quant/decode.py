"""The fused decode step for Llama-family and Gemma 3 models: one C++ call per generated token for the whole batch.

Eager PyTorch spends ~10 ms a token dispatching a few thousand small operations for a 30-layer model, more than
reading a 4-bit model's weights takes. `kernels/decode.cpp: llama_decode` runs norms, projections (q/k/v and gate/up
as one parallel region each), RoPE, the cache write and attention for every layer, reading the same weight blocks the
modules hold. Prefill and everything else still go through the modules. An 8-bit KV cache (kv_cache="q8", see
`KVCache`) is written and read in place as int8 records: the step quantizes each new key and value and applies a
record's scale once per key, so no float copy of the cache is made.

Which models it runs is decided by structure, not by class: a model opts in by declaring a `fused_decode`
attribute (its forward hands one-token steps to it; declare it only where the layers compute what `llama_decode`
does), and `supports` checks the rest: pre-norm RMSNorm layers of packed q/k/v/o and gate/up/down projections, no
output or MLP biases, float32. `FusedLlamaDecoder` takes plain RMSNorm layers (norm, attention, residual; norm, SwiGLU
MLP, residual) with one attention window for every layer and RoPE tables the step computes from `inv_freq` (not
YaRN's attention factor on cos and sin, nor dynamic NTK's per-length frequencies); `FusedGemmaDecoder` Gemma 3's:
`(1 + w)` norms (the 1 added here, once), a norm after attention and after the MLP, q/k norms, GELU-tanh, the
embedding and query scales, and a window and RoPE table per layer.
"""

from __future__ import annotations

import math

import torch

from tinkerlm import kernels
from tinkerlm.models.base import KVCache, RMSNorm, rope_type
from tinkerlm.quant.linear import QEmbedding, QLinear

EMPTY = torch.empty(0)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def packed(m: QLinear | QEmbedding):
    q = m.quantized
    return kernels.ops().PackedMatrix(q.data, q.fmt, q.rows)


def plain_rmsnorm(m) -> bool:
    """An RMSNorm scaling by its weight (Gemma's scale by 1 + weight and say so with `unit_offset`)."""
    return isinstance(m, RMSNorm) and not getattr(m, "unit_offset", False)


def packed_model(model) -> bool:
    """What both decoders need: a `fused_decode` attribute, packed embedding and head, packed layers, float32."""
    if not hasattr(model, "fused_decode"):  # its forward would never call the step
        return False
    backbone, cfg = getattr(model, "model", None), getattr(model, "config", None)
    if cfg is None or not all(hasattr(backbone, n) for n in ("embed_tokens", "layers", "norm")):
        return False
    if not isinstance(backbone.embed_tokens, QEmbedding) or not isinstance(getattr(model, "lm_head", None), QLinear):
        return False
    if not isinstance(backbone.norm, RMSNorm) or not isinstance(getattr(model, "inv_freq", None), torch.Tensor):
        return False
    if not all(m.packed for m in model.modules() if isinstance(m, (QLinear, QEmbedding))):
        return False
    for layer in backbone.layers:
        a, f = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(isinstance(getattr(a, n, None), QLinear) for n in ATTENTION) or not all(
            isinstance(getattr(f, n, None), QLinear) for n in MLP
        ):
            return False
    return next(model.parameters()).dtype == torch.float32


class FusedLlamaDecoder:
    @staticmethod
    def supports(model) -> bool:
        """Whether `model` has the structure `llama_decode` computes for Llama, every projection packed, in float32."""
        if not packed_model(model):
            return False
        cfg, backbone = model.config, model.model
        if getattr(cfg, "attention_out_bias", True) or getattr(cfg, "mlp_bias", True):
            return False
        if not plain_rmsnorm(backbone.norm):
            return False
        windows = model.layer_windows() if hasattr(model, "layer_windows") else [getattr(cfg, "sliding_window", None)]
        if len(set(windows)) > 1 or windows[0] != getattr(cfg, "sliding_window", None):  # one window for all layers
            return False
        if getattr(model, "rope_scale", 1.0) != 1.0 or rope_type(getattr(cfg, "rope_scaling", None)) == "dynamic":
            return False  # the step computes cos and sin from inv_freq alone
        for layer in backbone.layers:
            a = layer.self_attn
            norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
            if not all(plain_rmsnorm(n) for n in norms) or hasattr(layer, "post_feedforward_layernorm"):
                return False  # Gemma's (1 + w) and sandwich norms are FusedGemmaDecoder's
            qk_norms = (getattr(a, "q_norm", None), getattr(a, "k_norm", None))
            if getattr(cfg, "qk_norm", False) and not all(plain_rmsnorm(n) for n in qk_norms):
                return False
        return True

    def __init__(self, model):
        self.model = model
        self.layers = [self.layer(model, i) for i in range(len(model.model.layers))]
        self.head = kernels.ops().DecodeHead(
            final_norm=self.norm(model.model.norm),
            lm_head=packed(model.lm_head),
            embedding=packed(model.model.embed_tokens),
        )
        self.args = self.options(model.config)

    @staticmethod
    def norm(m: RMSNorm) -> torch.Tensor:
        """The weight the kernel's RMSNorm multiplies by (the module's own tensor: read in place)."""
        return m.weight

    @staticmethod
    def options(cfg) -> tuple:
        """llama_decode's trailing arguments: heads, kv heads, head_dim, eps, attention scale, embedding scale,
        GELU (else SiLU), logit softcap (0: none)."""
        hd = cfg.head_dim
        return (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
            float(cfg.rms_norm_eps),
            hd**-0.5,
            1.0,
            False,
            0.0,
        )

    def layer(self, model, i: int):
        """Layer i's weights as the kernel reads them."""
        cfg, layer = model.config, model.model.layers[i]
        a, f = layer.self_attn, layer.mlp
        bq, bk, bv = (m.bias if m.bias is not None else EMPTY for m in (a.q_proj, a.k_proj, a.v_proj))
        q_norm, k_norm = (
            (self.norm(a.q_norm), self.norm(a.k_norm)) if getattr(cfg, "qk_norm", False) else (EMPTY, EMPTY)
        )
        return kernels.ops().DecodeLayer(
            input_norm=self.norm(layer.input_layernorm),
            wq=packed(a.q_proj),
            wk=packed(a.k_proj),
            wv=packed(a.v_proj),
            bq=bq,
            bk=bk,
            bv=bv,
            q_norm=q_norm,
            k_norm=k_norm,
            wo=packed(a.o_proj),
            attn_out_norm=EMPTY,
            post_norm=self.norm(layer.post_attention_layernorm),
            w_gate=packed(f.gate_proj),
            w_up=packed(f.up_proj),
            w_down=packed(f.down_proj),
            mlp_out_norm=EMPTY,
            inv_freq=model.inv_freq,
            window=int(cfg.sliding_window or 0),
        )

    def __call__(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, V) for one new token per row (B, 1), written into `cache` at each row's position."""
        positions, _ = cache.prepare(1, self.model.source)
        rows = torch.arange(input_ids.shape[0])
        logits = kernels.ops().llama_decode(
            input_ids[:, 0].contiguous(),
            positions[:, 0].contiguous(),
            rows,
            self.layers,
            self.head,
            cache.k,
            cache.v,
            *self.args,
        )
        return logits[:, None]

    def run_row(self, tokens: torch.Tensor, cache: KVCache, row: int = 0) -> torch.Tensor:
        """Logits (T, V) for T consecutive new tokens (T,) of one row, written at positions lengths[row] onwards.

        The kernel takes one token per entry; here every entry is the same cache row at successive positions. Each
        layer writes all entries' keys and values before any entry attends, and an entry attends over the slots up
        to its own position: causal attention over the T tokens, reading each weight block once for all of them
        (speculative decoding's verification step). Each entry's arithmetic is a one-token step's. The caller
        checks the slots fit and advances `cache.lengths`.
        """
        start = cache.lengths[row]
        T = tokens.shape[0]
        positions = torch.arange(start, start + T, dtype=torch.long)
        return self.entries(tokens, positions, torch.full((T,), row, dtype=torch.long), cache)

    def entries(
        self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """Logits (N, V) for N new tokens (N,), token i written at `positions[i]` of cache row `rows[i]`: any mix of
        one-token steps and runs of successive positions (as `run_row`), e.g. a batching step's decode tokens and
        prompt pieces in one call. The caller checks the slots fit and advances `cache.lengths`."""
        return kernels.ops().llama_decode(
            tokens.contiguous(),
            positions.contiguous(),
            rows.contiguous(),
            self.layers,
            self.head,
            cache.k,
            cache.v,
            *self.args,
        )


class FusedGemmaDecoder(FusedLlamaDecoder):
    """Gemma 3 (tinkerlm/models/gemma.py) through the same kernel: its options and its layers' extra fields."""

    NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

    @staticmethod
    def supports(model) -> bool:
        """Whether `model` has Gemma 3's structure (norms scaling by 1 + w, four per layer, q/k norms, one RoPE
        table and window per layer type), every projection packed, in float32."""
        if not packed_model(model):
            return False
        cfg, backbone = model.config, model.model
        if not isinstance(getattr(model, "inv_freq_local", None), torch.Tensor):
            return False
        if not all(hasattr(cfg, n) for n in ("layer_types", "query_pre_attn_scalar", "final_logit_softcapping")):
            return False
        gemma_norm = lambda m: isinstance(m, RMSNorm) and getattr(m, "unit_offset", False)  # noqa: E731
        if not gemma_norm(backbone.norm) or not isinstance(getattr(model, "embed_scale", None), float):
            return False
        for layer in backbone.layers:
            a, f = layer.self_attn, layer.mlp
            if not all(gemma_norm(getattr(layer, n, None)) for n in FusedGemmaDecoder.NORMS):
                return False
            if not (gemma_norm(getattr(a, "q_norm", None)) and gemma_norm(getattr(a, "k_norm", None))):
                return False
            if any(getattr(a, n).bias is not None for n in ATTENTION) or any(
                getattr(f, n).bias is not None for n in MLP
            ):
                return False
        return True

    @staticmethod
    def norm(m: RMSNorm) -> torch.Tensor:
        """Gemma's norms scale by 1 + weight: the 1 added once here (a copy: re-attach after changing weights)."""
        return (1.0 + m.weight.detach().float()).contiguous()

    @staticmethod
    def options(cfg) -> tuple:
        heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        scale, softcap = cfg.query_pre_attn_scalar**-0.5, cfg.final_logit_softcapping or 0.0
        return (heads, kv, hd, float(cfg.rms_norm_eps), scale, math.sqrt(cfg.hidden_size), True, float(softcap))

    def layer(self, model, i: int):
        cfg, layer = model.config, model.model.layers[i]
        a, f = layer.self_attn, layer.mlp
        sliding = cfg.layer_types[i] == "sliding_attention"
        return kernels.ops().DecodeLayer(
            input_norm=self.norm(layer.input_layernorm),
            wq=packed(a.q_proj),
            wk=packed(a.k_proj),
            wv=packed(a.v_proj),
            bq=EMPTY,
            bk=EMPTY,
            bv=EMPTY,
            q_norm=self.norm(a.q_norm),
            k_norm=self.norm(a.k_norm),
            wo=packed(a.o_proj),
            attn_out_norm=self.norm(layer.post_attention_layernorm),
            post_norm=self.norm(layer.pre_feedforward_layernorm),
            w_gate=packed(f.gate_proj),
            w_up=packed(f.up_proj),
            w_down=packed(f.down_proj),
            mlp_out_norm=self.norm(layer.post_feedforward_layernorm),
            inv_freq=model.inv_freq_local if sliding else model.inv_freq,
            window=cfg.sliding_window if sliding else 0,
        )
