"""Chunked prefill in the continuous-batching engine: while answers decode, a new prompt is prefilled a chunk per
step between their tokens, and the chunked answer equals the one prefilled whole (tokens and log-probabilities)."""

from __future__ import annotations

import pytest

import tinkerlm
from tests.tiny import make_hf_model
from tinkerlm.batching import BatchGenerator
from tinkerlm.errors import TinkerError

LONG = list(range(3, 73))  # a 70-token prompt: 5 chunks of 16


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("batching") / "llama"
    make_hf_model("llama", path)
    return tinkerlm.load(str(path), prefix_cache_mb=0)


def run(llm, chunk: int, cancel_after: int | None = None, prefix_cache_mb: float = 0):
    """A short prompt decoding, then LONG arriving: before the first and after each step, how much of LONG was prefilled and how many
    tokens the short one had generated; the texts, tokens and log-probabilities of both."""
    bg = BatchGenerator(llm.model, llm.tokenizer, max_batch=2, prefill_chunk=chunk, prefix_cache_mb=prefix_cache_mb)
    out: dict[int, list] = {}
    emit = lambda ev: out.setdefault(ev.index, []).append(ev)  # noqa: E731
    a = bg.submit([5, 6, 7], llm.sampling(max_tokens=24, logprobs=0), emit=emit)
    bg.step()  # a is prefilled and decoding
    b = bg.submit(LONG, llm.sampling(max_tokens=8, logprobs=0), emit=emit)
    steps = [(0, a.generated)]
    while bg.pending():
        bg.step()
        steps.append((b.prefilled, a.generated))
        if cancel_after is not None and bg.stats["prefill_chunks"] >= cancel_after and b.prefilling:
            b.cancel()
    seqs = []
    for s in (a, b):
        events = out.get(s.index, [])
        tokens = [t for e in events for t in e.tokens]
        seqs.append(("".join(e.text for e in events), [t.id for t in tokens], [t.logprob for t in tokens]))
    return bg, steps, *seqs


def test_chunked_prefill_equals_whole_prefill(llm):
    whole, _, a0, b0 = run(llm, 0)
    chunked, steps, a1, b1 = run(llm, 16)
    assert whole.stats["prefill_chunks"] == 2  # a, then all of LONG in one forward
    assert chunked.stats["prefill_chunks"] == 1 + 5  # LONG in ceil(70 / 16) pieces
    for x, y in ((a0, a1), (b0, b1)):
        assert x[0] == y[0] and x[1] == y[1] and x[1]
        assert max(abs(p - q) for p, q in zip(x[2], y[2])) < 1e-4
    # a got a token in each of the 5 steps that prefilled a piece of LONG
    pieces = [i for i in range(1, len(steps)) if steps[i][0] != steps[i - 1][0]]
    assert [steps[i][0] for i in pieces] == [16, 32, 48, 64, 70]
    assert all(steps[i][1] == steps[i - 1][1] + 1 for i in pieces)


def test_prompts_are_prefilled_whole_when_nothing_decodes(llm):
    bg = BatchGenerator(llm.model, llm.tokenizer, max_batch=2, prefill_chunk=16, prefix_cache_mb=0)
    seqs = [bg.submit(p, llm.sampling(max_tokens=3)) for p in (LONG, LONG[::-1])]
    bg.step()
    assert not any(s.prefilling for s in seqs) and bg.stats["prefill_chunks"] == 2
    assert [s.generated for s in seqs] == [2, 2]  # the first token from the prefill, one decoded


def test_cancel_while_prefilling_frees_the_slot_and_caches_only_what_was_prefilled(llm):
    bg, _, a, b = run(llm, 16, cancel_after=3, prefix_cache_mb=8)  # LONG cancelled after 2 of its 5 pieces
    assert b[1] == [] and a[1] and bg.pending() == 0 and bg.slots == [None, None]
    # the 32 prefilled tokens of LONG are cached (2 blocks); a new request for LONG reuses them and answers as cold
    seq = bg.submit(LONG, llm.sampling(max_tokens=8))
    text = "".join(ev.text for ev in bg.events())
    assert bg.prefix_cache.stats["tokens_reused"] >= 32
    cold = BatchGenerator(llm.model, llm.tokenizer, max_batch=1, prefix_cache_mb=0)
    cold.submit(LONG, llm.sampling(max_tokens=8))
    assert text == "".join(ev.text for ev in cold.events()) and seq.finished


def test_negative_chunk_is_refused(llm):
    with pytest.raises(TinkerError, match="prefill_chunk"):
        BatchGenerator(llm.model, llm.tokenizer, prefill_chunk=-1)
