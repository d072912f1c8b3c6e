"""Speculative decoding: the same output as plain decoding for both drafters, caches rolled back to a cold run's,
acceptance counted right, a draft of another vocabulary refused, the CLI flags end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import make_hf_model, write_tokenizer

import tinkerlm
from tinkerlm.errors import TinkerError
from tinkerlm.speculative import PromptLookup, forward_tokens

# 20 prompts, several of which repeat themselves (so prompt lookup finds drafts, right and wrong).
PROMPTS = [
    f"{w} {w} {w} the cat sat on the mat, the cat sat on the {w} {i}"
    for i, w in enumerate(["abc", "hello", "xyz", "q", "mat", "ab ab", "12", "the", "on", "zz"])
] + [f"item {i}: {i * 37 % 100}; item {i + 1}: {(i + 1) * 37 % 100}; item {i + 2}:" for i in range(10)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, and a draft that agrees with it often but not always: its weights plus noise (same tokenizer)."""
    root = tmp_path_factory.mktemp("spec")
    hf = make_hf_model("llama", root / "target")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.06)
    hf.save_pretrained(root / "draft")
    write_tokenizer(root / "draft")
    return root


@pytest.mark.parametrize("quant", ["native", "int8"])  # int8: the fused decode step verifies (run_row)
def test_greedy_output_is_plain_decoding(tiny, quant):
    target = str(tiny / "target")
    plain = tinkerlm.load(target, quant=quant)
    assert (plain.model.fused_decode is not None) == (quant == "int8")
    lookup = tinkerlm.load(target, quant=quant, prompt_lookup=True, draft_tokens=5)
    drafted = tinkerlm.load(target, quant=quant, draft=str(tiny / "draft"), draft_tokens=4)
    totals = {"lookup": [0, 0], "draft": [0, 0]}
    for prompt in PROMPTS:
        want = plain.generate(prompt, max_tokens=40)
        for key, llm in (("lookup", lookup), ("draft", drafted)):
            got = llm.generate(prompt, max_tokens=40)
            assert got == want and got.finish_reason == want.finish_reason, (key, prompt)
            s = llm.last_speculation
            assert s.tokens == 40 or want.finish_reason == "stop"
            assert s.forwards <= s.tokens
            totals[key][0] += s.accepted
            totals[key][1] += s.drafted
    for key, (accepted, drafted) in totals.items():
        assert drafted > 0 and 0 < accepted < drafted, (key, accepted, drafted)  # both kept and rejected drafts


def test_batch_stops_and_logprobs_match(tiny):
    target = str(tiny / "target")
    plain = tinkerlm.load(target)
    lookup = tinkerlm.load(target, prompt_lookup=True)
    opts = dict(max_tokens=30, stop=["at"], logprobs=2, repetition_penalty=1.3)
    want = plain.generate(PROMPTS[:4], **opts)
    got = lookup.generate(PROMPTS[:4], **opts)
    assert got == want
    for g, w in zip(got, want):
        assert g.finish_reason == w.finish_reason
        assert [t.id for t in g.logprobs] == [t.id for t in w.logprobs]
        assert [t.logprob for t in g.logprobs] == pytest.approx([t.logprob for t in w.logprobs], abs=1e-4)


def test_seeded_sampling_is_plain_sampling(tiny):
    """Each emitted token is the model's own draw, in the same order: with a seed, the same text."""
    target = str(tiny / "target")
    plain = tinkerlm.load(target)
    drafted = tinkerlm.load(target, draft=str(tiny / "draft"))
    for seed in range(3):
        opts = dict(max_tokens=30, temperature=0.8, top_p=0.9, seed=seed)
        assert drafted.generate(PROMPTS[seed], **opts) == plain.generate(PROMPTS[seed], **opts)


def test_self_draft_accepts_everything(tiny):
    target = str(tiny / "target")
    llm = tinkerlm.load(target, quant="int8")
    llm2 = tinkerlm.load(target, quant="int8", draft=llm)
    llm2.generate(PROMPTS[0], max_tokens=30)
    s = llm2.last_speculation
    assert s.drafted > 0 and s.accepted == s.drafted
    assert s.forwards < s.tokens


def test_prompt_lookup_known_answers():
    pl = PromptLookup(3)
    pl.start([1, 2, 3, 4, 1, 2])
    assert pl.propose([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]  # the 2-gram (1, 2) seen at 0
    assert pl.propose([1, 2, 3, 4, 1, 2, 9, 4], 2) == [1, 2]  # no (2, 9, 4) nor (9, 4): the 1-gram (4,)
    assert pl.propose([1, 2, 3, 4, 1, 2, 9, 4, 7], 2) == []  # 7 never seen before
    pl.start([5, 6, 7, 5, 6, 8, 5, 6])
    assert pl.propose([5, 6, 7, 5, 6, 8, 5, 6], 2) == [8, 5]  # the latest occurrence wins


@pytest.mark.parametrize("quant", ["native", "int8"])
def test_rollback_leaves_the_cache_of_a_cold_run(tiny, quant):
    """Write wrong drafts, roll back, write the right tokens: keys, values and logits equal those of plain
    decoding (a prefill, then one token per forward)."""
    model = tinkerlm.load(str(tiny / "target"), quant=quant).model
    seq = [104, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]
    n, L = 6, len(seq)
    with torch.inference_mode():
        cache = model.new_cache(1, 64)
        model(torch.tensor([seq[:n]]), cache=cache)
        cache.lengths = [n]
        forward_tokens(model, [seq[n], 1, 2, 3, 4], cache)  # the first is right, the drafts wrong
        cache.lengths = [n + 1]  # roll back to the accepted prefix
        got = forward_tokens(model, seq[n + 1 :], cache)
        cold = model.new_cache(1, 64)
        model(torch.tensor([seq[:n]]), cache=cold)
        cold.lengths = [n]
        want = []
        for t in seq[n:]:
            want.append(model(torch.tensor([[t]]), cache=cold)[0, -1])
            cold.advance(1)
    assert cache.lengths == cold.lengths == [L]
    for layer in range(model.n_layers):
        torch.testing.assert_close(cache.k[layer][:, :, :L], cold.k[layer][:, :, :L], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[layer][:, :, :L], cold.v[layer][:, :, :L], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, torch.stack(want[1:]), atol=1e-4, rtol=1e-4)


def test_draft_cache_after_rejections_is_a_cold_runs(tiny):
    target = str(tiny / "target")
    llm = tinkerlm.load(target, draft=str(tiny / "draft"), draft_tokens=4)
    llm.generate(PROMPTS[3], max_tokens=40)
    assert llm.last_speculation.accepted < llm.last_speculation.drafted  # there were rollbacks
    drafter = llm.speculative.drafter
    held, cache = drafter.held, drafter.cache
    n = cache.lengths[0]
    assert 0 < n <= len(held)
    cold = drafter.model.new_cache(1, 128)
    with torch.inference_mode():
        drafter.model(torch.tensor([held[:n]]), cache=cold)
    for layer in range(drafter.model.n_layers):
        torch.testing.assert_close(cache.k[layer][:, :, :n], cold.k[layer][:, :, :n], atol=1e-5, rtol=1e-5)


def test_other_vocabulary_refused(tiny, tmp_path):
    other = tmp_path / "other"
    make_hf_model("llama", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = next(k for k, v in vocab.items() if v == 97), next(k for k, v in vocab.items() if v == 98)
    vocab[a], vocab[b] = 98, 97  # "a" and "b" swap ids: same size, other vocabulary
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TinkerError, match="tokenizer") as e:
        tinkerlm.load(str(tiny / "target"), draft=str(other))
    assert str(other) in str(e.value) and str(tiny / "target") in str(e.value)


def test_bad_options_refused(tiny):
    target = str(tiny / "target")
    with pytest.raises(TinkerError, match="choose one"):
        tinkerlm.load(target, draft=target, prompt_lookup=True)
    with pytest.raises(TinkerError, match="draft_tokens"):
        tinkerlm.load(target, prompt_lookup=True, draft_tokens=0)
    with pytest.raises(TinkerError, match="lookup_ngram"):
        tinkerlm.load(target, prompt_lookup=True, lookup_ngram=99)


def test_cli_prompt_lookup_and_draft(tiny):
    target = str(tiny / "target")
    want = tinkerlm.load(target).generate(PROMPTS[0], max_tokens=20)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "tinkerlm", "run", target, PROMPTS[0], "--raw", "--max-tokens", "20", *args],
            capture_output=True,
            text=True,
            env=os.environ,
            timeout=300,
        )

    for flags in (["--prompt-lookup", "--lookup-ngram", "2"], ["--draft", str(tiny / "draft"), "--draft-tokens", "3"]):
        proc = cli(*flags)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == want + "\n"
        assert "drafted tokens accepted" in proc.stderr and "per forward" in proc.stderr
    proc = cli("--prompt-lookup", "--draft", target)
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
    proc = cli("--prompt-lookup", "--draft-tokens", "0")
    assert proc.returncode == 2 and proc.stderr.startswith("tinkerlm: error: draft_tokens")


def test_smollm2_prompt_lookup_and_self_draft(smollm2_gguf):
    """The real model: prompt lookup on an extraction prompt, and SmolLM2 as its own draft (all accepted)."""
    plain = tinkerlm.load(str(smollm2_gguf))
    lookup = tinkerlm.load(str(smollm2_gguf), prompt_lookup=True)
    selfdraft = tinkerlm.load(str(smollm2_gguf), draft=plain, draft_tokens=6)
    messages = [
        "Lena Larsen is a 54-year-old tailor from Mexico City.\nAs JSON with name, age, city, job.",
        "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog.",
    ]
    for m in messages:
        want = plain.chat(m, max_tokens=40)
        assert lookup.chat(m, max_tokens=40) == want
        assert lookup.last_speculation.accepted > 0
        assert selfdraft.chat(m, max_tokens=40) == want
        s = selfdraft.last_speculation
        assert s.drafted > 0 and s.accepted == s.drafted
