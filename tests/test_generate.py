"""Samplers (known answers), seeded reproducibility, stop strings, streaming that never splits a character."""

import pytest
import torch
from tiny import make_hf_model

import tinkerlm
from tinkerlm.errors import TinkerError
from tinkerlm.sampling import Detokenizer, SamplingParams, apply_repetition_penalty, sample

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0], [0.1, 0.2, 0.3, 0.4, 0.0]])


def draws(params: SamplingParams, n: int = 400) -> set[int]:
    g = torch.Generator().manual_seed(0)
    return {t for _ in range(n) for t in sample(LOGITS[:1], params, g).tolist()}


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(), None).tolist() == [4, 3]


def test_top_k_keeps_only_k_best():
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 4}
    assert draws(SamplingParams(temperature=1.0, top_k=1)) == {4}


def test_top_p_keeps_smallest_nucleus():
    p = LOGITS[0].softmax(-1)  # sorted: 4 (0.61), 0 (0.22), 1 (0.08), ...
    assert p[4] < 0.7 < p[4] + p[0]
    assert draws(SamplingParams(temperature=1.0, top_p=0.7)) == {4, 0}
    assert draws(SamplingParams(temperature=1.0, top_p=0.5)) == {4}


def test_min_p_drops_unlikely_tokens():
    p = LOGITS[0].softmax(-1)
    ratio = (p / p.max()).tolist()  # token 0: 0.37, token 1: 0.14, token 2: 0.08
    assert ratio[1] < 0.2 < ratio[0]
    assert draws(SamplingParams(temperature=1.0, min_p=0.2)) == {4, 0}


def test_full_sampling_reaches_every_token():
    assert draws(SamplingParams(temperature=2.0), n=2000) == {0, 1, 2, 3, 4}


def test_repetition_penalty_math():
    seen = torch.tensor([[True, False, False, True, False]])
    out = apply_repetition_penalty(LOGITS[:1], seen, 2.0)
    assert out.tolist() == [[1.0, 1.0, 0.5, -2.0, 3.0]]


@pytest.mark.parametrize(
    "bad",
    [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(repetition_penalty=0), dict(top_k=-3)],
)
def test_bad_sampling_params(bad):
    with pytest.raises(TinkerError, match="sampling:"):
        SamplingParams(**bad).check()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "llama"
    make_hf_model("llama", path)
    return tinkerlm.load(str(path))


def test_same_seed_same_output(llm):
    a = llm.generate("hello", max_tokens=20, temperature=1.0, seed=7)
    b = llm.generate("hello", max_tokens=20, temperature=1.0, seed=7)
    c = llm.generate("hello", max_tokens=20, temperature=1.0, seed=8)
    assert a == b
    assert a != c


def test_max_tokens_counts_tokens(llm):
    ids = llm.tokenizer.encode("hello", add_special_tokens=False)
    from tinkerlm.generate import generate_step

    steps = list(generate_step(llm.model, [ids], max_tokens=9))
    assert len(steps) == 9


def test_stream_equals_generate(llm):
    text = llm.generate("abc", max_tokens=30, temperature=0.8, seed=3)
    assert "".join(llm.stream("abc", max_tokens=30, temperature=0.8, seed=3)) == text


def test_stop_string_truncates(llm):
    # A seed whose sample runs long enough (the random model may sample its end token early).
    seed = next(s for s in range(100) if len(llm.generate("abc", max_tokens=30, temperature=0.9, seed=s)) >= 14)
    full = llm.generate("abc", max_tokens=30, temperature=0.9, seed=seed)
    needle = full[10:13]
    cut = llm.generate("abc", max_tokens=30, temperature=0.9, seed=seed, stop=[needle])
    assert cut == full[: full.index(needle)]
    assert len(cut) < len(full)
    # Streaming never leaks part of the stop string.
    assert "".join(llm.stream("abc", max_tokens=30, temperature=0.9, seed=seed, stop=[needle])) == cut


def test_stop_token_ends_generation(llm):
    """A row that samples a stop token finishes there: its text is the stream up to that token."""
    from tinkerlm.generate import generate_step

    ids = llm.tokenizer.encode("xyz", add_special_tokens=False)
    tokens = [s[0] for s in generate_step(llm.model, [ids], max_tokens=20, sampling=SamplingParams(1.0, seed=1))]
    stop_at = tokens[5]
    got = [
        s[0]
        for s in generate_step(
            llm.model, [ids], max_tokens=20, sampling=SamplingParams(1.0, seed=1), stop_token_ids=[stop_at]
        )
    ]
    assert got == tokens[: tokens.index(stop_at) + 1]


def test_streaming_never_splits_characters(llm):
    """Feed the bytes of multi-byte characters one token at a time: no piece carries a broken character."""
    text = "héllo → 世界 👋🏽 done"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))  # the tiny tokenizer has one token per byte
    row = Detokenizer(llm.tokenizer, [])
    pieces = []
    for t in ids:
        row.push(t)
        pieces.append(row.flush(final=False)[0])
    pieces.append(row.flush(final=True)[0])
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[ids.index(0xC3)] == ""  # first byte of é held back


def test_empty_prompt_rejected(llm):
    with pytest.raises(TinkerError, match="empty prompt"):
        list(llm.stream("", max_tokens=3))


def test_sampling_follows_the_distribution():
    """20k draws at temperature 1: each token's frequency within 1.5 points of its softmax probability, and a
    token of probability 0 (masked by top-k) never drawn."""
    g = torch.Generator().manual_seed(1)
    logits = LOGITS[:1].expand(20000, -1)
    counts = torch.bincount(sample(logits, SamplingParams(temperature=1.0), g), minlength=5).float() / 20000
    assert (counts - LOGITS[0].softmax(-1)).abs().max() < 0.015
    top2 = torch.bincount(sample(logits, SamplingParams(temperature=1.0, top_k=2), g), minlength=5)
    assert top2[[1, 2, 3]].sum() == 0
