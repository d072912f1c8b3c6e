"""The fused decode step for Llama-family models: one C++ call per generated token for the whole batch.

Eager PyTorch spends ~10 ms a token dispatching a few thousand small operations for a 30-layer model, more than
reading a 4-bit model's weights takes. `kernels/decode.cpp: llama_decode` runs norms, projections (q/k/v and gate/up
as one parallel region each), RoPE, the cache write and attention for every layer, reading the same weight blocks the
modules hold. Prefill and everything else still go through the modules. An 8-bit KV cache (kv_cache="q8", see
`KVCache`) is written and read in place as int8 records: the step quantizes each new key and value and applies a
record's scale once per key, so no float copy of the cache is made.

Which models it runs is decided by structure, not by class: a model opts in by declaring a `fused_decode`
attribute (its forward hands one-token steps to it; declare it only where the layers compute what `llama_decode`
does), and `supports` checks the rest: pre-norm RMSNorm layers of packed q/k/v/o and gate/up/down projections, no
output or MLP biases, float32, one attention window for every layer, and RoPE tables the step can compute itself
from `inv_freq` (not YaRN's attention factor on cos and sin, nor dynamic NTK's per-length frequencies).
"""

from __future__ import annotations

import torch

from tinkerlm import kernels
from tinkerlm.models.base import KVCache, RMSNorm, rope_type
from tinkerlm.quant.linear import QEmbedding, QLinear

EMPTY = torch.empty(0)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class FusedLlamaDecoder:
    @staticmethod
    def supports(model) -> bool:
        """Whether `model` has the structure `llama_decode` computes, every projection packed, in float32."""
        if not hasattr(model, "fused_decode"):  # its forward would never call the step
            return False
        backbone, cfg = getattr(model, "model", None), getattr(model, "config", None)
        if cfg is None or not all(hasattr(backbone, n) for n in ("embed_tokens", "layers", "norm")):
            return False
        head = getattr(model, "lm_head", None)
        if not isinstance(backbone.embed_tokens, QEmbedding) or not isinstance(head, QLinear):
            return False
        if not isinstance(backbone.norm, RMSNorm) or not isinstance(getattr(model, "inv_freq", None), torch.Tensor):
            return False
        if not all(m.packed for m in model.modules() if isinstance(m, (QLinear, QEmbedding))):
            return False
        if getattr(cfg, "attention_out_bias", True) or getattr(cfg, "mlp_bias", True):
            return False
        windows = model.layer_windows() if hasattr(model, "layer_windows") else [getattr(cfg, "sliding_window", None)]
        if len(set(windows)) > 1 or windows[0] != getattr(cfg, "sliding_window", None):  # the step takes one window
            return False
        if getattr(model, "rope_scale", 1.0) != 1.0 or rope_type(getattr(cfg, "rope_scaling", None)) == "dynamic":
            return False  # the step computes cos and sin from inv_freq alone
        for layer in backbone.layers:
            a, f = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
            if not all(isinstance(n, RMSNorm) for n in norms):
                return False
            if not all(isinstance(getattr(a, n, None), QLinear) for n in ATTENTION) or not all(
                isinstance(getattr(f, n, None), QLinear) for n in MLP
            ):
                return False
            qk_norms = (getattr(a, "q_norm", None), getattr(a, "k_norm", None))
            if getattr(cfg, "qk_norm", False) and not all(isinstance(n, RMSNorm) for n in qk_norms):
                return False
        return next(model.parameters()).dtype == torch.float32

    def __init__(self, model):
        cfg = model.config
        self.model = model
        k = kernels.ops()

        def packed(m: QLinear | QEmbedding):
            q = m.quantized
            return k.PackedMatrix(q.data, q.fmt, q.rows)

        self.layers = []
        for layer in model.model.layers:
            a, f = layer.self_attn, layer.mlp
            bq, bk, bv = (m.bias if m.bias is not None else EMPTY for m in (a.q_proj, a.k_proj, a.v_proj))
            q_norm, k_norm = (a.q_norm.weight, a.k_norm.weight) if getattr(cfg, "qk_norm", False) else (EMPTY, EMPTY)
            self.layers.append(
                k.DecodeLayer(
                    input_norm=layer.input_layernorm.weight,
                    wq=packed(a.q_proj),
                    wk=packed(a.k_proj),
                    wv=packed(a.v_proj),
                    bq=bq,
                    bk=bk,
                    bv=bv,
                    q_norm=q_norm,
                    k_norm=k_norm,
                    wo=packed(a.o_proj),
                    post_norm=layer.post_attention_layernorm.weight,
                    w_gate=packed(f.gate_proj),
                    w_up=packed(f.up_proj),
                    w_down=packed(f.down_proj),
                )
            )
        self.head = k.DecodeHead(
            final_norm=model.model.norm.weight,
            lm_head=packed(model.lm_head),
            embedding=packed(model.model.embed_tokens),
        )
        self.args = (
            model.inv_freq,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            float(cfg.rms_norm_eps),
            int(cfg.sliding_window or 0),
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
        rows = torch.full((T,), row, dtype=torch.long)
        return kernels.ops().llama_decode(
            tokens.contiguous(), positions, rows, self.layers, self.head, cache.k, cache.v, *self.args
        )
