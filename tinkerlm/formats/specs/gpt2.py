"""GPT-2's spec (tinkerlm/models/gpt2.py).

HF stores GPT-2's projections as `Conv1D` with (in, out) weights; tinkerlm's model and GGUF files hold them as
nn.Linear (out, in), so `conv1d` names the weights to transpose wherever an HF file is read or written.

References: llama.cpp's converter (`GPT2Model`, tensor names):
https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py
"""

from __future__ import annotations

from tinkerlm import limits
from tinkerlm.formats.specs.base import GGUFMetadata, Spec

# HF name suffixes of the Conv1D weights (stored (in, out) in HF files).
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def gguf_config(g: GGUFMetadata) -> dict:
    """The HF config of a GPT-2 GGUF.

    Raises:
        TinkerError: a missing metadata key.
    """
    return {
        "model_type": "gpt2",
        "vocab_size": g.vocab_size(),
        "n_embd": g.arch_key("embedding_length", limit=limits.MAX_WIDTH),
        "n_layer": g.arch_key("block_count", limit=limits.MAX_LAYERS),
        "n_head": g.arch_key("attention.head_count", limit=limits.MAX_HEADS),
        "n_positions": g.arch_key("context_length", limit=limits.MAX_CONTEXT),
        "n_inner": g.arch_key("feed_forward_length", limit=limits.MAX_WIDTH),
        "layer_norm_epsilon": g.arch_key("attention.layer_norm_epsilon", kind=float),
        "tie_word_embeddings": not g.has_tensor("output.weight"),
    }


def gguf_metadata(config: dict) -> dict:
    """GGUF metadata for a GPT-2 HF config, the keys llama.cpp's converter writes (the inverse of `gguf_config`)."""
    return {
        "general.architecture": "gpt2",
        "gpt2.vocab_size": config["vocab_size"],
        "gpt2.context_length": config.get("n_positions", 1024),
        "gpt2.embedding_length": config["n_embd"],
        "gpt2.block_count": config["n_layer"],
        "gpt2.feed_forward_length": config.get("n_inner") or 4 * config["n_embd"],
        "gpt2.attention.head_count": config["n_head"],
        "gpt2.attention.layer_norm_epsilon": float(config.get("layer_norm_epsilon", 1e-5)),
    }


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter shapes as the model holds them (Conv1D weights as nn.Linear (out, in)), per HF name template."""
    e, v, p = c["n_embd"], c["vocab_size"], c.get("n_positions", 1024)
    n = c.get("n_inner") or 4 * e
    h = "transformer.h.{i}."
    return {
        "transformer.wte.weight": (v, e),
        "transformer.wpe.weight": (p, e),
        "lm_head.weight": (v, e),
        "transformer.ln_f.weight": (e,),
        "transformer.ln_f.bias": (e,),
        h + "ln_1.weight": (e,),
        h + "ln_1.bias": (e,),
        h + "ln_2.weight": (e,),
        h + "ln_2.bias": (e,),
        h + "attn.c_attn.weight": (3 * e, e),
        h + "attn.c_attn.bias": (3 * e,),
        h + "attn.c_proj.weight": (e, e),
        h + "attn.c_proj.bias": (e,),
        h + "mlp.c_fc.weight": (n, e),
        h + "mlp.c_fc.bias": (n,),
        h + "mlp.c_proj.weight": (e, n),
        h + "mlp.c_proj.bias": (e,),
    }


SPEC = Spec(
    family="gpt2",
    model_types=("gpt2",),
    hf_classes={"gpt2": "GPT2LMHeadModel"},
    model=("GPT2Config", "GPT2LMHeadModel"),
    gguf_architectures={"gpt2": "gpt2"},
    tensor_names={
        "token_embd.weight": "transformer.wte.weight",
        "position_embd.weight": "transformer.wpe.weight",
        "output_norm.weight": "transformer.ln_f.weight",
        "output_norm.bias": "transformer.ln_f.bias",
        "output.weight": "lm_head.weight",
        "blk.{i}.attn_norm.weight": "transformer.h.{i}.ln_1.weight",
        "blk.{i}.attn_norm.bias": "transformer.h.{i}.ln_1.bias",
        "blk.{i}.attn_qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
        "blk.{i}.attn_qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
        "blk.{i}.attn_output.weight": "transformer.h.{i}.attn.c_proj.weight",
        "blk.{i}.attn_output.bias": "transformer.h.{i}.attn.c_proj.bias",
        "blk.{i}.ffn_norm.weight": "transformer.h.{i}.ln_2.weight",
        "blk.{i}.ffn_norm.bias": "transformer.h.{i}.ln_2.bias",
        "blk.{i}.ffn_up.weight": "transformer.h.{i}.mlp.c_fc.weight",
        "blk.{i}.ffn_up.bias": "transformer.h.{i}.mlp.c_fc.bias",
        "blk.{i}.ffn_down.weight": "transformer.h.{i}.mlp.c_proj.weight",
        "blk.{i}.ffn_down.bias": "transformer.h.{i}.mlp.c_proj.bias",
    },
    required=(
        "token_embd.weight",
        "position_embd.weight",
        "output_norm.weight",
        "blk.{i}.attn_norm.weight",
        "blk.{i}.attn_qkv.weight",
        "blk.{i}.attn_output.weight",
        "blk.{i}.ffn_norm.weight",
        "blk.{i}.ffn_up.weight",
        "blk.{i}.ffn_down.weight",
    ),
    gguf_config=gguf_config,
    gguf_metadata=gguf_metadata,
    shapes=shapes,
    layers_key="n_layer",
    defaults={"gpt2": {"tie_word_embeddings": True}},  # transformers' GPT2Config ties the head by default
    conv1d=CONV1D,
)
