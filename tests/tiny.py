"""Tiny random-weight checkpoints of every supported architecture, written with transformers' `save_pretrained`.

Shared by the parity, generation and CLI tests. The tokenizer is byte-level BPE with no merges (every byte is a
token) plus ChatML special tokens, so any text round-trips and chat templates render.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 320  # 256 bytes + specials, padded: the model's vocab may exceed the tokenizer's

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    bos_token_id=256,
    eos_token_id=258,
)

CONFIGS = {
    "llama": ("LlamaConfig", dict(COMMON, num_key_value_heads=2)),
    "llama3-tied": (
        "LlamaConfig",
        dict(
            COMMON,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama-headdim": ("LlamaConfig", dict(COMMON, num_key_value_heads=1, head_dim=32)),
    # YaRN over a 512-token original context (its ramp then spans frequencies 1..8 of 16), 4x longer.
    "llama-yarn": (
        "LlamaConfig",
        dict(
            COMMON,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=2048,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
        ),
    ),
    "mistral-window": ("MistralConfig", dict(COMMON, num_key_value_heads=2, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(COMMON, num_key_value_heads=2, head_dim=32)),
    # Qwen's per-layer windows: layer 0 attends to everything, layer 1 (from max_window_layers on) to 8 positions.
    "qwen2-window": (
        "Qwen2Config",
        dict(COMMON, num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    ),
    # Six layers: five sliding (window 4) and one global, as Gemma 3 alternates them; query scale != head_dim ** -0.5.
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            COMMON, num_hidden_layers=6, num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=16
        ),
    ),
    # Four experts, two per token; every layer sparse, as llama.cpp runs them (tests/test_moe.py: dense layers).
    "mixtral": ("MixtralConfig", dict(COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(
            COMMON,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            norm_topk_prob=True,
        ),
    ),
    # LongRoPE over an original context of 4 (of 128): the shared tests run on the long factors, with the attention
    # factor; tests/test_phi3.py covers the short ones and the switch. Phi-4-mini: rotary on 3/4 of each head, tied.
    "phi3": (
        "Phi3Config",
        dict(
            COMMON,
            num_key_value_heads=2,
            pad_token_id=256,
            original_max_position_embeddings=4,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 4.0],
                "long_factor": [1.0, 1.5, 2.3, 3.4, 5.1, 7.6, 11.4, 17.1],
            },
        ),
    ),
    "phi4-mini": (
        "Phi3Config",
        dict(
            COMMON,
            num_key_value_heads=2,
            pad_token_id=256,
            tie_word_embeddings=True,
            partial_rotary_factor=0.75,
            original_max_position_embeddings=4,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.2, 1.5, 1.9, 2.4, 3.0],
                "long_factor": [1.0, 2.0, 3.9, 7.7, 15.2, 30.1],
            },
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=256, eos_token_id=258),
    ),
}


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: byte for byte, ch in bytes_to_unicode().items()}  # token id = byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML,
                "add_bos_token": False,
                "model_max_length": 128,
            }
        )
    )


def make_hf_model(kind: str, path: Path, seed: int = 0):
    """Save a tiny random `kind` model (a key of CONFIGS) with its tokenizer to `path`; return the HF model."""
    import torch
    import transformers

    cfg_name, kwargs = CONFIGS[kind]
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # larger than default init so that differences would show in the logits
        for p in model.parameters():
            p.normal_(0, 0.2)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


def penalised_greedy(llm, ids: list[int], n: int, frequency: float, presence: float) -> list[int]:
    """Reference for OpenAI's penalties: greedy decoding of up to `n` tokens over the full forward pass, each step's
    logits lowered by `frequency * count + presence * (count > 0)` of the tokens generated so far."""
    import torch

    counts = torch.zeros(llm.model.lm_head.out_features)
    seq, out = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            logits = llm.model(torch.tensor([seq]))[0, -1].float()
        token = int((logits - frequency * counts - presence * (counts > 0).float()).argmax())
        if token in llm.tokenizer.stop_token_ids:
            break
        counts[token] += 1
        seq.append(token)
        out.append(token)
    return out
