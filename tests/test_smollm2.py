"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file."""

import pytest
import torch
from peers import transformers_from_gguf

import tinkerlm
from tinkerlm.generate import generate_step

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    """The fp32 path: the same dequantized weights transformers uses (tests/test_quant.py checks native)."""
    return tinkerlm.load(str(smollm2_gguf), quant="fp32")


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return transformers_from_gguf(smollm2_gguf, "tokenizer"), transformers_from_gguf(smollm2_gguf)


def test_chat_prompt_matches_transformers(ours, reference):
    tok, _ = reference
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == want
    convo = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert ours.apply_chat_template(convo) == tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)


def test_logits_match_transformers(ours, reference):
    tok, model = reference
    ids = tok("The quick brown fox jumps over the lazy dog. Une phrase en français; 日本語も。", return_tensors="pt")
    with torch.no_grad():
        want = model(ids.input_ids).logits
        got = ours.model(ids.input_ids)
    assert (got - want).abs().max().item() <= 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_answers_match_transformers(ours, reference, prompt):
    tok, model = reference
    messages = [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = list(ids)
    assert ours.tokenizer.encode(ours.apply_chat_template(messages), add_special_tokens=False) == ids
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=64,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
    want = out[0, len(ids) :].tolist()
    got = [
        step[0]
        for step in generate_step(ours.model, [ids], max_tokens=64, stop_token_ids=ours.tokenizer.stop_token_ids)
    ]
    assert got == want
    assert len(got) > 5


def test_chat_answers_sensibly(ours):
    assert "paris" in ours.chat("What is the capital of France?", max_tokens=32).lower()
