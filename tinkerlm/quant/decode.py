"""The fused decode step for Llama-family models: one C++ call per generated token for the whole batch.

Eager PyTorch spends ~10 ms a token dispatching a few thousand small operations for a 30-layer model, more than
reading a 4-bit model's weights takes. `kernels.cpp: llama_decode` runs norms, projections (q/k/v and gate/up as
one parallel region each), RoPE, the cache write and attention for every layer, reading the same weight blocks the
modules hold. Prefill and everything else still go through the modules.
"""

from __future__ import annotations

import torch

from tinkerlm.models.base import KVCache
from tinkerlm.quant.linear import QEmbedding, QLinear

EMPTY = torch.empty(0)


class FusedLlamaDecoder:
    @staticmethod
    def supports(model) -> bool:
        from tinkerlm.models.llama import LlamaForCausalLM

        if not isinstance(model, LlamaForCausalLM) or not isinstance(model.model.embed_tokens, QEmbedding):
            return False
        if not all(m.packed for m in model.modules() if isinstance(m, (QLinear, QEmbedding))):
            return False
        cfg = model.config
        if cfg.attention_out_bias or cfg.mlp_bias or not isinstance(model.lm_head, QLinear):
            return False
        for layer in model.model.layers:
            a, f = layer.self_attn, layer.mlp
            if not all(isinstance(x, QLinear) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj,
                                                         f.up_proj, f.down_proj)):
                return False
        return next(model.parameters()).dtype == torch.float32

    def __init__(self, model):
        cfg = model.config
        self.model = model
        self.layers: list[torch.Tensor] = []
        types = []
        for layer in model.model.layers:
            a, f = layer.self_attn, layer.mlp
            linears = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj, f.up_proj, f.down_proj]
            biases = [m.bias if m.bias is not None else EMPTY for m in (a.q_proj, a.k_proj, a.v_proj)]
            norms = [a.q_norm.weight, a.k_norm.weight] if cfg.qk_norm else [EMPTY, EMPTY]
            self.layers += [layer.input_layernorm.weight, a.q_proj.blocks, a.k_proj.blocks, a.v_proj.blocks,
                            *biases, *norms, a.o_proj.blocks, layer.post_attention_layernorm.weight,
                            f.gate_proj.blocks, f.up_proj.blocks, f.down_proj.blocks]
            types.append([n for m in linears for n in (m.quantized.fmt, m.out_features)])
        self.types = torch.tensor(types, dtype=torch.long)
        lm, emb = model.lm_head, model.model.embed_tokens
        self.head = [model.model.norm.weight, lm.blocks, emb.blocks]
        self.head_types = torch.tensor([lm.quantized.fmt, lm.out_features, emb.quantized.fmt, emb.num_embeddings],
                                       dtype=torch.long)
        self.args = (model.inv_freq, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                     float(cfg.rms_norm_eps), int(cfg.sliding_window or 0))

    def __call__(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, V) for one new token per row (B, 1), written into `cache` at each row's position."""
        from tinkerlm.quant.kernels import ops

        positions, _ = cache.prepare(1, self.model.source)
        rows = torch.arange(input_ids.shape[0])
        logits = ops().llama_decode(input_ids[:, 0].contiguous(), positions[:, 0].contiguous(), rows, self.layers,
                                    self.types, self.head, self.head_types, cache.k, cache.v, *self.args)
        return logits[:, None]
