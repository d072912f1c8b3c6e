"""Gemma 3's fused decode step (tinkerlm.quant.decode.FusedGemmaDecoder over kernels/decode.cpp: llama_decode):
logits equal to its modules' (the simple path) on tiny random models in each packed format, over a greedy decode
that crosses the sliding window in a batch of two rows of different lengths, with the f32 and the 8-bit KV cache;
the same greedy answers as the modules on the real Gemma 3 270M; Llama's decoder still refuses Gemma's layers.
"""

from __future__ import annotations

import pytest
import torch
from test_gemma import PROMPTS, greedy
from tiny import VOCAB, write_tokenizer

import tinkerlm
from tinkerlm import kernels
from tinkerlm.export import export
from tinkerlm.quant.decode import FusedGemmaDecoder, FusedLlamaDecoder

# Widths in whole 256-value super-blocks (K-quants), one KV head as Gemma 3 270M; six layers: five sliding over 4
# positions and one global, each with its own RoPE base.
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    sliding_window=4,
    query_pre_attn_scalar=64,
    max_position_embeddings=128,
    bos_token_id=256,
    eos_token_id=258,
)
# What a GGUF cannot hold (llama.cpp fixes the query scale) but the step must honour: a query scale other than
# 1/sqrt(head_dim) and logit softcapping. Run through tinkerlm's own quantization (int8: Q8_0, int4: Q4_1).
UNUSUAL = dict(CONFIG, query_pre_attn_scalar=40, final_logit_softcapping=30.0)


def make_gemma(path, config: dict):
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Gemma3TextConfig(**config), attn_implementation="eager"
    )
    with torch.no_grad():  # larger than default init, so that a wrong step would show in the logits
        for p in model.parameters():
            p.normal_(0, 0.2)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_tokenizer(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each packed format the step reads: Q8_0 and Q4_1 quantized at load, Q4_0 and Q4_K/Q6_K from GGUF files."""
    root = tmp_path_factory.mktemp("gemma-fused")
    make_gemma(root / "unusual", UNUSUAL)
    make_gemma(root / "hf", CONFIG)
    files = {"int8": (root / "unusual", "int8"), "int4": (root / "unusual", "int4")}
    for kind in ("q4_0", "q4_k_m", "q8_0"):
        out = root / f"{kind}.gguf"
        export(str(root / "hf"), to="gguf", type=kind, out=str(out), progress=False, verify=False)
        files[kind] = (out, "native")
    return files


def decode(model, ids: torch.Tensor, fused: bool) -> torch.Tensor:
    """Logits (2, 14, V) of 14 one-token steps after a 5-token prefill, the second row restarted 3 positions back."""
    saved = model.fused_decode
    model.fused_decode = saved if fused else None
    try:
        cache = model.new_cache(2, 32)
        with torch.no_grad():
            model(ids[:, :5], cache=cache)
            cache.advance(5)
            cache.lengths = [5, 2]  # ragged rows: each decodes from its own position
            steps = []
            for t in range(5, 19):
                steps.append(model(ids[:, t : t + 1], cache=cache))
                cache.advance(1)
    finally:
        model.fused_decode = saved
    return torch.cat(steps, 1)


@pytest.mark.parametrize("kind", ["int8", "int4", "q4_0", "q4_k_m", "q8_0"])
@pytest.mark.parametrize("kv_cache", ["f32", "q8"])
def test_fused_step_equals_modules(checkpoints, kind, kv_cache):
    path, quant = checkpoints[kind]
    model = tinkerlm.load(str(path), quant=quant, kv_cache=kv_cache, prefix_cache_mb=0).model
    assert isinstance(model.fused_decode, FusedGemmaDecoder)
    assert not FusedLlamaDecoder.supports(model)  # Llama's layers would compute something else
    held = {m.qtype for m in model.modules() if hasattr(m, "qtype")}
    assert held, kind
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    fused, modules = decode(model, ids, True), decode(model, ids, False)
    # Both round activations to int16 blocks before each product, so a last-bit difference upstream can move a
    # value across a rounding step: agreement to that precision. The q8 cache's steps are 258x coarser (int8
    # records): the records the two paths write differ by isolated one-unit flips, which these random weights
    # amplify over 14 steps to at most 1.4e-3 measured (a record read without its scale would be off by ~100%).
    tol = 1e-4 if kv_cache == "f32" else 3e-3
    err = (fused - modules).abs().max() / modules.abs().max()
    assert err <= tol, (err, held)
    assert torch.equal(fused.argmax(-1), modules.argmax(-1))


def test_avx2_build_runs_the_step_as_the_vector_build(checkpoints, monkeypatch):
    """The AVX2 build's GELU is isa_plain.h's tanh formula, the AVX-512 one a sigmoid form: the same step."""
    path, quant = checkpoints["q4_k_m"]
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(2))
    want = decode(tinkerlm.load(str(path), quant=quant).model, ids, True)
    avx2 = kernels.build(("-mno-avx512f",))
    assert avx2.isa == "avx2"
    monkeypatch.setattr(kernels, "ops", lambda: avx2)
    model = tinkerlm.load(str(path), quant=quant).model
    assert isinstance(model.fused_decode, FusedGemmaDecoder)
    got = decode(model, ids, True)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_real_gemma_greedy_answers_equal_the_modules(gemma_gguf):
    """Gemma 3 270M Q4_K_M: the fused step (attached by default) gives the modules' greedy tokens."""
    llm = tinkerlm.load(str(gemma_gguf), prefix_cache_mb=0)
    model = llm.model
    assert isinstance(model.fused_decode, FusedGemmaDecoder) and not FusedLlamaDecoder.supports(model)
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        fused = greedy(llm, ids, 24)
        step, model.fused_decode = model.fused_decode, None
        try:
            modules = greedy(llm, ids, 24)
        finally:
            model.fused_decode = step
        assert fused == modules, prompt
