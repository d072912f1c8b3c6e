"""Write a random-weight GGUF of a real model's shape, to measure speed without the weights (never quality).

    .venv/bin/python bench/random_gguf.py --shape llama3.2-1b --type q4_k_m --out /tmp/llama1b-q4_k_m.gguf

Shapes are the published configs (hidden size, layers, heads, vocabulary, tied embeddings, RoPE) of Llama 3.2 1B and
3B, Qwen2.5 1.5B and Llama 3.1 8B, and `tiny-llama3` (Llama 3's layout at a size tests can afford). Weights are normal(0, 0.02) (norms 1), generated tensor by tensor and written
through tinkerlm's own GGUF writer and quantizers, so memory stays at one tensor; the tokenizer is SmolLM2's (from the
store's `smollm2`), padded with unused tokens to the shape's vocabulary, so the file loads and runs anywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    "llama3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "llama3.2-3b": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        rms_norm_eps=1e-6, max_position_embeddings=32768, attention_bias=True,
    ),
    # Not a published model: Llama 3's layout (GQA, llama3 RoPE scaling, tied output) at a size tests can afford.
    "tiny-llama3": dict(
        model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=49280, tie_word_embeddings=True, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "llama3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
}  # fmt: skip


def tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every parameter, in llama.cpp's file order."""
    from tinkerlm.formats import specs

    spec = specs.for_model_type(config["model_type"])
    shapes = spec.shapes(config)
    bias = config.get("attention_bias", False)
    per_layer = [t for t in shapes if "{i}" in t and (bias or not t.endswith("bias"))]
    per_layer = [t for t in per_layer if "q_norm" not in t and "k_norm" not in t and "o_proj.bias" not in t]
    out = [("model.embed_tokens.weight", shapes["model.embed_tokens.weight"])]
    for i in range(config["num_hidden_layers"]):
        out += [(t.format(i=i), shapes[t]) for t in per_layer]
    out.append(("model.norm.weight", shapes["model.norm.weight"]))
    if not config["tie_word_embeddings"]:
        out.append(("lm_head.weight", shapes["lm_head.weight"]))
    return out


def write(shape: str, file_type: str, out: Path, seed: int = 0, tokenizer_gguf: Path | None = None) -> Path:
    """Write the random GGUF; the tokenizer comes from `tokenizer_gguf` (default: the store's smollm2, pulled if
    missing). Returns `out`."""
    from tinkerlm import store
    from tinkerlm.export import types as types_mod
    from tinkerlm.formats import specs
    from tinkerlm.formats.gguf import read_gguf
    from tinkerlm.formats.gguf_write import TensorPlan, write_gguf
    from tinkerlm.quant.encode import encode

    config = dict(SHAPES[shape])
    spec = specs.for_model_type(config["model_type"])
    ftype = types_mod.file_type(file_type)
    if tokenizer_gguf is None:
        tokenizer_gguf = store.model_path(store.find("smollm2") or store.pull("smollm2"))
    tokenizer = read_gguf(tokenizer_gguf).tokenizer()
    metadata = {**spec.gguf_metadata(config), **tokenizer.gguf_metadata(vocab_size=config["vocab_size"])}
    metadata["general.name"] = f"random {shape}"
    metadata["general.file_type"] = ftype.code
    metadata["general.quantization_version"] = 2
    rows = [(spec.gguf_name(n), s) for n, s in tensors(config)]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    chosen = types_mod.choose(rows, ftype, config["num_hidden_layers"], heads // kv)
    rng = np.random.default_rng(seed)

    def produce(name: str, shape_: tuple[int, ...], qtype: str):
        def make():
            if len(shape_) == 1:
                w = np.ones(shape_, np.float32) if name.endswith("norm.weight") else np.zeros(shape_, np.float32)
                return w
            w = torch.from_numpy(rng.standard_normal(shape_, dtype=np.float32) * 0.02)
            return encode(w, qtype)

        return make

    plans = [TensorPlan(g, chosen[g], s, produce(g, s, chosen[g])) for g, s in rows]
    for name, value in spec.gguf_extra_tensors(config).items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        plans.append(TensorPlan(name, "F32", tuple(value.shape), lambda v=value: v))
    write_gguf(out, metadata, plans, progress=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES), help="the model shape")
    ap.add_argument("--type", default="q4_k_m", help="GGUF file type (as `tinkerlm export --type`)")
    ap.add_argument("--out", required=True, help="the .gguf file to write")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    a = ap.parse_args()
    print(write(a.shape, a.type, Path(a.out), a.seed))


if __name__ == "__main__":
    main()
