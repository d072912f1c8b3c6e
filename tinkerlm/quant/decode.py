"""The fused decode step for Llama-family models: one C++ call per generated token for the whole batch.

Eager PyTorch spends ~10 ms a token dispatching a few thousand small operations for a 30-layer model, more than
reading a 4-bit model's weights takes. Here q/k/v and gate/up are concatenated once (the modules keep views of the
fused storage, so nothing is duplicated) and `kernels.cpp: llama_decode` runs norms, projections, RoPE, the cache
write and attention for every layer. Prefill and everything else still go through the modules.
"""

from __future__ import annotations

import torch

from tinkerlm.models.base import KVCache
from tinkerlm.quant.linear import QEmbedding, QLinear
from tinkerlm.quant.qtensor import QTensor

EMPTY = torch.empty(0)


def _share(modules: list[QLinear], fused: QTensor) -> None:
    """Point each module's buffers at its rows of the fused tensor (views, no copies)."""
    start = 0
    for mod in modules:
        part = fused.rows(slice(start, start + mod.out_features))
        mod.q, mod.d, mod.m = part.q, part.d, part.m
        start += mod.out_features


class FusedLlamaDecoder:
    @staticmethod
    def supports(model) -> bool:
        from tinkerlm.models.llama import LlamaForCausalLM

        if not isinstance(model, LlamaForCausalLM) or not isinstance(model.model.embed_tokens, QEmbedding):
            return False
        cfg = model.config
        if cfg.attention_out_bias or cfg.mlp_bias or not isinstance(model.lm_head, QLinear):
            return False
        for layer in model.model.layers:
            a, f = layer.self_attn, layer.mlp
            linears = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj, f.up_proj, f.down_proj]
            if not all(isinstance(x, QLinear) for x in linears):
                return False
            if len({a.q_proj.bits, a.k_proj.bits, a.v_proj.bits}) > 1 or f.gate_proj.bits != f.up_proj.bits:
                return False
        return next(model.parameters()).dtype == torch.float32

    def __init__(self, model):
        cfg = model.config
        self.model = model
        self.layers: list[torch.Tensor] = []
        for layer in model.model.layers:
            a, f = layer.self_attn, layer.mlp
            qkv_mods, gu_mods = [a.q_proj, a.k_proj, a.v_proj], [f.gate_proj, f.up_proj]
            qkv = QTensor.cat([m.qweight for m in qkv_mods])
            gate_up = QTensor.cat([m.qweight for m in gu_mods])
            _share(qkv_mods, qkv)
            _share(gu_mods, gate_up)
            bias = torch.cat([m.bias for m in qkv_mods]) if cfg.attention_bias else EMPTY
            qn = a.q_norm.weight if cfg.qk_norm else EMPTY
            kn = a.k_norm.weight if cfg.qk_norm else EMPTY
            o, down = a.o_proj.qweight, f.down_proj.qweight
            self.layers += [layer.input_layernorm.weight, qkv.q, qkv.d, qkv.m, bias, qn, kn, o.q, o.d, o.m,
                            layer.post_attention_layernorm.weight, gate_up.q, gate_up.d, gate_up.m,
                            down.q, down.d, down.m]
        lm, emb = model.lm_head.qweight, model.model.embed_tokens.qweight
        self.head = [model.model.norm.weight, lm.q, lm.d, lm.m, emb.q, emb.d, emb.m]
        self.args = (model.inv_freq, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                     float(cfg.rms_norm_eps), int(cfg.sliding_window or 0))

    def __call__(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, V) for one new token per row (B, 1), written into `cache` at each row's position."""
        from tinkerlm.quant.kernels import ops

        positions, _ = cache.prepare(1, self.model.source)
        rows = torch.arange(input_ids.shape[0])
        logits = ops().llama_decode(input_ids[:, 0].contiguous(), positions[:, 0].contiguous(), rows, self.layers,
                                    self.head, cache.k, cache.v, *self.args)
        return logits[:, None]
