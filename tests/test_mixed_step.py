"""The mixed batching step with the real default model (SmolLM2-135M-Instruct GGUF): while answers decode, a prompt
piece and every running row's next token go through ONE forward pass, and what comes out equals prefilling and
decoding separately: the logits of a step, and the greedy answers of requests arriving at different steps."""

from __future__ import annotations

import pytest
import torch

import tinkerlm
from tinkerlm import batching
from tinkerlm.batching import BatchGenerator, MixedStep, mixed_forward

PROMPTS = [
    "Name three primary colours.",
    "Write a haiku about the sea, then explain every line of it to a child in simple words.",
    "What is 2+2?",
    "List the planets of the solar system in order from the sun, with one fact about each of them.",
]


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return tinkerlm.load(str(smollm2_gguf), prefix_cache_mb=0)


def ids(llm, prompt: str) -> list[int]:
    return llm.chat_ids(prompt)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "modules"])
@torch.inference_mode()
def test_mixed_logits_equal_separate_prefill_and_decode(llm, fused, monkeypatch):
    """A step decoding rows 0 and 3 (of different lengths) and prefilling a piece of row 2's prompt, row 1 idle,
    against the forwards the engine ran before (the piece alone, then the batched decode over rows [0, 4)), through
    the fused kernel or the modules."""
    model, kernel = llm.model, llm.model.fused_decode
    a, b, c = ids(llm, PROMPTS[0]), ids(llm, PROMPTS[1]), ids(llm, PROMPTS[2])[:20]
    cache = model.new_cache(4, 256)
    model(torch.tensor([a]), cache=cache.rows(0, 1))  # row 0: a's prompt in, decoding
    cache.k[0][1] = 1.5  # row 1: idle, stale values that must stay as they are
    model(torch.tensor([b[:7]]), cache=cache.rows(2, 3))  # row 2: b's first 7 tokens in, prefilling
    model(torch.tensor([c]), cache=cache.rows(3, 4))  # row 3: 20 tokens in, decoding
    cache.lengths = [len(a), 0, 7, len(c)]
    mixed = model.new_cache(4, 256)
    for dst, src in zip(mixed.k + mixed.v, cache.k + cache.v):
        dst.copy_(src)
    mixed.lengths = list(cache.lengths)

    def prefill():  # b's tokens 7..44 into row 2 (past both decoding rows' ends): logits (38, V)
        if fused:
            return kernel.run_row(torch.tensor(b[7:45]), cache, row=2)
        return model(torch.tensor([b[7:45]]), cache=cache.rows(2, 3))[0]

    if not fused:
        model.fused_decode = None
    monkeypatch.setattr(batching, "FUSED_PIECES", 64 if fused else 0)  # the 38-token piece through that path
    try:
        piece = prefill()
        dec = model(torch.tensor([[a[-1]], [0], [0], [c[-1]]]), cache=cache.rows(0, 4))[:, -1]  # (4, V)
        prefill()  # row 2's piece written again over its dummy token
        step = MixedStep(mixed, [0, 3], [len(a), len(c)], [(2, 7, 38)])
        # the decode tokens, a middle token of the piece, the piece's last
        out = mixed_forward(model, mixed, step, [a[-1], c[-1], *b[7:45]], [0, 1, 6, 39])  # (4, V)
    finally:
        model.fused_decode = kernel
    assert (out[0] - dec[0]).abs().max() < 1e-4 and (out[1] - dec[3]).abs().max() < 1e-4
    assert (out[2] - piece[4]).abs().max() < 1e-4 and (out[3] - piece[37]).abs().max() < 1e-4
    # every row's keys and values written where the separate forwards wrote them; the idle row untouched
    for layer in range(model.n_layers):
        for row, slots in ((0, slice(len(a), len(a) + 1)), (3, slice(len(c), len(c) + 1)), (2, slice(7, 45))):
            for x, y in ((mixed.k, cache.k), (mixed.v, cache.v)):
                assert (x[layer][row, :, slots].float() - y[layer][row, :, slots].float()).abs().max() < 1e-4
    assert (mixed.k[0][1] == 1.5).all()


def alone(llm, prompt: list[int], max_tokens: int) -> list[int]:
    bg = BatchGenerator(llm.model, llm.tokenizer, max_batch=1, prefix_cache_mb=0)
    bg.submit(prompt, llm.sampling(max_tokens=max_tokens, logprobs=0))
    return [t.id for ev in bg.events() for t in ev.tokens]


def test_requests_arriving_at_different_steps_equal_each_alone_one_forward_per_step(llm):
    """Four prompts of different lengths join at steps 0, 1, 3 and 4, prefilled 16 tokens a step while the
    others decode; the third is cancelled in the middle of its prefill. Every step with both kinds of work runs one
    forward; each answer equals the same request decoded alone."""
    prompts = [ids(llm, p) for p in PROMPTS]
    bg = BatchGenerator(llm.model, llm.tokenizer, max_batch=4, prefill_chunk=16, prefix_cache_mb=0)
    forwards, kernel = [], llm.model.fused_decode  # forward passes: calls of the model and of the fused kernel
    hook = llm.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    kernel.entries = lambda *args: forwards.append(1) or type(kernel).entries(kernel, *args)
    out: dict[int, list[int]] = {}
    emit = lambda ev: out.setdefault(ev.index, []).extend(t.id for t in ev.tokens)  # noqa: E731
    seqs, arrivals, mixed_steps, step = [], {0: 0, 1: 1, 3: 2, 4: 3}, 0, 0
    try:
        while step in arrivals or bg.pending():
            if step in arrivals:
                seqs.append(bg.submit(prompts[arrivals[step]], llm.sampling(max_tokens=12, logprobs=0), emit=emit))
            if len(seqs) > 2 and seqs[2].prefilled >= 16 and seqs[2].prefilling:
                seqs[2].cancel()
            live = [s for s in seqs if not s.cancelled and not s.finished]
            both = any(s.prefilling for s in live) and any(s.slot >= 0 and not s.prefilling for s in live)
            before = len(forwards)
            bg.step()
            if both:
                mixed_steps += 1
                assert len(forwards) - before == 1
            step += 1
    finally:
        hook.remove()
        del kernel.entries
    assert mixed_steps >= 5 and bg.slots == [None] * 4 and bg.stats["cancelled"] == 1
    assert seqs[2].index not in out  # cancelled before its first token
    for i in (0, 1, 3):
        assert out[seqs[i].index] == alone(llm, prompts[i], 12), PROMPTS[i]
