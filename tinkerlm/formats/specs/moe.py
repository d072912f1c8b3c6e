"""The mixture-of-experts spec: Mixtral and Qwen3-MoE (tinkerlm/models/moe.py).

llama.cpp writes Mixtral as architecture "llama" with `llama.expert_count` (and permutes its q/k rows as for Llama);
`claims` takes such files from the Llama spec. Qwen3-MoE is "qwen3moe", its experts' width in
`expert_feed_forward_length`. Each layer's experts are three stacked tensors `blk.N.ffn_{gate,up,down}_exps.weight`
(n_experts, rows, cols), one matrix per expert, read as one parameter per expert (`{e}` in the HF name; the GGUF
reader slices each expert's rows, quantized blocks kept); the router is `blk.N.ffn_gate_inp.weight`.

References:
- llama.cpp's converter (MixtralModel via LlamaModel, Qwen3MoeModel): convert_hf_to_gguf.py
- llama.cpp's key and tensor names (LLM_KV_EXPERT_*, MODEL_TENSOR.FFN_*_EXP): gguf-py/gguf/constants.py
"""

from __future__ import annotations

import re

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.formats.specs import llama
from tinkerlm.formats.specs.base import GGUFMetadata, Spec

MAX_EXPERTS = 1 << 12  # as tinkerlm/models/moe.py bounds num_experts

GGUF_ARCHITECTURES = {"qwen3moe": "qwen3_moe"}
WRITE_ARCHITECTURES = {"mixtral": "llama"}  # llama.cpp has no "mixtral" architecture


def claims(architecture: str, metadata: dict) -> str | None:
    """A "llama" file with experts is Mixtral's."""
    count = metadata.get(f"{architecture}.expert_count")
    ok = architecture == "llama" and isinstance(count, int) and not isinstance(count, bool) and count > 0
    return "mixtral" if ok else None


class _Shared:
    """A MoE file seen by the Llama spec's `gguf_config` (its keys are the Llama family's): under "llama" for a
    Mixtral file, as it is, or as "qwen3" for Qwen3-MoE. `arch_key` still reads the file's own `{arch}.` keys."""

    def __init__(self, g: GGUFMetadata, architecture: str):
        self._g, self.architecture = g, architecture

    def __getattr__(self, name: str):
        return getattr(self._g, name)


def gguf_config(g: GGUFMetadata) -> dict:
    """The HF config of a Mixtral ("llama" with experts) or Qwen3-MoE ("qwen3moe") GGUF: Llama's keys plus the
    experts'.

    Raises:
        TinkerError: a missing or out-of-range key (see the Llama spec's `gguf_config`).
    """
    qwen = g.architecture == "qwen3moe"
    config = llama.gguf_config(_Shared(g, "qwen3" if qwen else "llama"))
    experts = g.arch_key("expert_count", limit=MAX_EXPERTS)
    config.update(
        model_type="qwen3_moe" if qwen else "mixtral",
        num_experts_per_tok=g.arch_key("expert_used_count", limit=experts),
    )
    if qwen:
        config["num_experts"] = experts
        config["moe_intermediate_size"] = g.arch_key("expert_feed_forward_length", limit=limits.MAX_WIDTH)
        config["norm_topk_prob"] = True  # llama.cpp renormalises Qwen3-MoE's top-k weights always (as its releases)
    else:
        config["num_local_experts"] = experts
    return config


def gguf_metadata(config: dict) -> dict:
    """GGUF metadata for a Mixtral or Qwen3-MoE HF config (the inverse of `gguf_config`), as llama.cpp's
    converter writes it."""
    model_type = config.get("model_type")
    qwen = model_type == "qwen3_moe"
    if qwen and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1):
        raise TinkerError(
            "config: a Qwen3-MoE model with dense layers (mlp_only_layers, decoder_sparse_step) cannot be written "
            "to GGUF (llama.cpp's qwen3moe has experts in every layer)"
        )
    if qwen and not config.get("norm_topk_prob"):
        raise TinkerError(
            "config: a Qwen3-MoE model without norm_topk_prob cannot be written to GGUF (llama.cpp's qwen3moe "
            "always renormalises the top-k weights)"
        )
    meta = llama.gguf_metadata({**config, "model_type": "qwen3" if qwen else "llama"})
    arch = "qwen3moe" if qwen else "llama"
    if qwen:
        meta = {k.replace("qwen3.", "qwen3moe.", 1): v for k, v in meta.items()}
        meta["general.architecture"] = arch
        meta[f"{arch}.expert_feed_forward_length"] = config.get("moe_intermediate_size") or config["intermediate_size"]
    meta[f"{arch}.expert_count"] = experts(config)
    meta[f"{arch}.expert_used_count"] = config["num_experts_per_tok"]
    return meta


def experts(config: dict) -> int:
    """Experts per sparse layer (`num_local_experts`: Mixtral's name, which transformers 5 also saves for Qwen3-MoE)."""
    return config.get("num_experts") or config.get("num_local_experts") or 0


def rope_rows(hf_name: str, config: dict, rows: int):
    """llama.cpp permutes Mixtral's q/k rows as Llama's (converted by its Llama code); Qwen3-MoE's are kept."""
    if config.get("model_type") != "mixtral":
        return None
    return llama.rope_rows(hf_name, {**config, "model_type": "llama"}, rows)


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter shapes: the Llama family's (dense layers of Qwen3-MoE) plus the router and one expert's."""
    h = c["hidden_size"]
    i_ = c.get("moe_intermediate_size") or c["intermediate_size"]
    m = "model.layers.{i}.mlp."
    return {
        **llama.shapes(c),
        m + "gate.weight": (experts(c), h),
        m + "experts.{e}.gate_proj.weight": (i_, h),
        m + "experts.{e}.up_proj.weight": (i_, h),
        m + "experts.{e}.down_proj.weight": (h, i_),
    }


_EXPERT = re.compile(r"(model\.layers\.\d+)\.mlp\.(gate|experts\.\d+\.(gate|up|down)_proj)\.weight")
_W = {"gate": "w1", "down": "w2", "up": "w3"}


def hf_save_name(name: str, model_type: str) -> str:
    """Mixtral checkpoints (transformers 5 saves them so too) name the block `block_sparse_moe` and each expert's
    projections w1 (gate), w3 (up), w2 (down); Qwen3-MoE's per-expert names are the model's."""
    m = _EXPERT.fullmatch(name)
    if model_type != "mixtral" or m is None:
        return name
    part = "gate" if m[2] == "gate" else f"{m[2].rsplit('.', 1)[0]}.{_W[m[3]]}"
    return f"{m[1]}.block_sparse_moe.{part}.weight"


SPEC = Spec(
    family="moe",
    model_types=("mixtral", "qwen3_moe"),
    hf_classes={"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"},
    model=("MoEConfig", "MoEForCausalLM"),
    gguf_architectures=GGUF_ARCHITECTURES,
    tensor_names={
        **llama.SPEC.tensor_names,
        "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
        "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
        "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
        "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    },
    # Dense or sparse feed-forward varies by layer (Qwen3-MoE's mlp_only_layers): the model's strict accounting
    # finds a layer's missing ones.
    required=tuple(
        t for t in llama.SPEC.required if not t.startswith("blk.{i}.ffn_") or t == "blk.{i}.ffn_norm.weight"
    ),
    gguf_config=gguf_config,
    gguf_metadata=gguf_metadata,
    shapes=shapes,
    layers_key="num_hidden_layers",
    defaults={"mixtral": {"norm_topk_prob": True}, "qwen3_moe": {"qk_norm": True}},
    row_fix=rope_rows,
    consumed=llama.SPEC.consumed,
    gguf_extra_tensors=llama.gguf_extra_tensors,
    write_architectures=WRITE_ARCHITECTURES,
    experts=experts,
    claims=claims,
    hf_save_name=hf_save_name,
)
