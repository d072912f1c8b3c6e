"""Mixture-of-experts Llama-family decoders: Mixtral and Qwen3-MoE.

The attention, norms, RoPE and cache are Llama's (tinkerlm/models/llama.py); the feed-forward block of a sparse
layer is a router and `num_experts` gated MLPs, of which each token uses `num_experts_per_tok`:
- router: logits = gate(x) (E,), probabilities softmax(logits) in fp32, the top k kept;
- `norm_topk_prob`: the k kept probabilities renormalised to sum to 1 (Mixtral always: the softmax of the top-k
  logits; Qwen3-MoE as its config says), as transformers computes it;
- output: sum over the k chosen experts of weight * expert(x).
Qwen3-MoE may keep some layers dense (`mlp_only_layers`, `decoder_sparse_step`): those have Llama's MLP. Mixtral's
`router_jitter_noise` is training-time noise transformers adds only in training mode; it is not applied here.

Products are batched per expert: the tokens routed to an expert are gathered, that expert runs once on them, and
its weighted output is added back with `index_add_`. Each expert is a `llama.MLP` (parameters
`mlp.experts.{e}.{gate,up,down}_proj.weight`), so quantized loading (one `QLinear` per expert, the GGUF's blocks kept:
tinkerlm/formats/gguf.py slices each expert's rows out of the stacked tensor), int8/int4 quantization and the fused
gate/up product apply to experts unchanged. HF checkpoints store experts as transformers 5's fused 3-D tensors
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) or per expert (Mixtral's `block_sparse_moe.experts.{e}.w1`,
Qwen3-MoE's `mlp.experts.{e}.gate_proj`); `from_hf_state_dict` maps both to the layout here (views, no copies).

References: Jiang et al. 2024, "Mixtral of Experts"; Qwen3 technical report (2025); transformers' modeling_mixtral.py
and modeling_qwen3_moe.py (the routing arithmetic matched here).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.models.base import check_positive
from tinkerlm.models.llama import MLP, LlamaConfig, LlamaForCausalLM

MAX_EXPERTS = 1 << 12  # experts per layer a config may declare (real models: 8 to 512)


@dataclass
class MoEConfig(LlamaConfig):
    num_experts: int = 0  # Mixtral's num_local_experts
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # each expert's width; defaults to intermediate_size (Mixtral)
    norm_topk_prob: bool = False  # renormalise the top-k probabilities (Mixtral: always, set by the spec)
    decoder_sparse_step: int = 1  # Qwen3-MoE: every n-th layer is sparse...
    mlp_only_layers: list[int] = field(default_factory=list)  # ...except these, which are dense
    model_type: str = "mixtral"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> MoEConfig:
        d = dict(d)
        if "num_local_experts" in d:  # Mixtral's name for it
            d.setdefault("num_experts", d.pop("num_local_experts"))
        cfg = super().from_dict(d, source)
        if cfg.moe_intermediate_size is None:
            cfg.moe_intermediate_size = cfg.intermediate_size
        limits.check(cfg.num_experts, MAX_EXPERTS, f"{source}: config key 'num_experts'")
        limits.check(cfg.moe_intermediate_size, limits.MAX_WIDTH, f"{source}: config key 'moe_intermediate_size'")
        check_positive(
            source,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            decoder_sparse_step=cfg.decoder_sparse_step,
        )
        if cfg.num_experts_per_tok > cfg.num_experts:
            raise TinkerError(
                f"{source}: num_experts_per_tok ({cfg.num_experts_per_tok}) exceeds num_experts ({cfg.num_experts})"
            )
        return cfg

    def sparse(self, layer: int) -> bool:
        """Whether layer `layer` has experts (transformers' rule for Qwen3-MoE; every layer for Mixtral)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


class SparseMoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        expert = dataclasses.replace(cfg, intermediate_size=cfg.moe_intermediate_size, mlp_bias=False)
        self.experts = nn.ModuleList(MLP(expert) for _ in range(cfg.num_experts))

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts), each (N, k), for tokens h (N, C): softmax in fp32, top k, optionally renormalised."""
        probs = torch.softmax(self.gate(h).float(), dim=-1)  # (N, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(h.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = x.reshape(B * T, C)  # (N, C)
        weights, chosen = self.route(h)
        # Group the N * k (token, expert) pairs by expert: one product per expert over all of its tokens.
        flat = chosen.reshape(-1)  # (N * k,)
        order = torch.argsort(flat, stable=True)
        tokens = order // self.top_k  # the token of each pair, grouped by expert
        pair_weights = weights.reshape(-1)[order, None]  # (N * k, 1)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # one host read per layer
        out = torch.zeros_like(h)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                idx = tokens[start : start + n]
                out.index_add_(0, idx, expert(h[idx]) * pair_weights[start : start + n])
                start += n
        return out.view(B, T, C)


class MoEForCausalLM(LlamaForCausalLM):
    """Llama's decoder with the MLP of each sparse layer replaced by a `SparseMoE` block.

    The fused one-token decode step (tinkerlm/quant/decode.py) computes dense MLPs only: its `supports` finds no
    gate/up/down projections on these blocks and leaves decoding to the modules (tests/test_moe.py pins it).
    """

    def __init__(self, cfg: MoEConfig, source: str = "model"):
        super().__init__(cfg, source)
        for i, layer in enumerate(self.model.layers):
            if cfg.sparse(i):
                layer.mlp = SparseMoE(cfg)


_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")
_MIXTRAL = re.compile(r"(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.(gate|experts\.\d+\.w[123])\.weight")
_MIXTRAL_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def from_hf_state_dict(sd: dict) -> dict:
    """HF expert layouts -> one `{gate,up,down}_proj.weight` per expert (views of the stored tensors).

    transformers 5 fuses experts: `experts.gate_up_proj` (E, 2 * I, C) holds each expert's gate rows then its up rows,
    `experts.down_proj` (E, C, I). Mixtral's per-expert files name the block `block_sparse_moe` (or `mlp`) and the
    projections w1 (gate), w3 (up) and w2 (down); Qwen3-MoE's per-expert files already use the names here.
    """
    out = {}
    for name, t in sd.items():
        fused, mixtral = _FUSED.fullmatch(name), _MIXTRAL.fullmatch(name)
        if fused and fused[2] == "gate_up_proj" and t.dim() == 3:
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{fused[1]}.{e}.gate_proj.weight"] = t[e, :half]  # (I, C)
                out[f"{fused[1]}.{e}.up_proj.weight"] = t[e, half:]
        elif fused and t.dim() == 3:
            for e in range(t.shape[0]):
                out[f"{fused[1]}.{e}.down_proj.weight"] = t[e]  # (C, I)
        elif mixtral:
            part = mixtral[2]
            if part != "gate":
                prefix, w = part.rsplit(".", 1)
                part = f"{prefix}.{_MIXTRAL_NAMES[w]}"
            out[f"{mixtral[1]}.mlp.{part}.weight"] = t
        else:
            out[name] = t
    return out
