"""Prefix caching: a hit gives the logits of a cold run (tiny llama, gpt2, sliding-window mistral, fp32), greedy
generations are identical with and without the cache, eviction keeps the budget and goes least recently used first,
a multi-turn chat through the API hits the cache, and two clients of a live server with different prefixes,
interleaved, get exactly what they get alone."""

from __future__ import annotations

import threading

import openai
import pytest
import torch
from test_serve import KEY, live_server, metric
from tiny import make_hf_model

import tinkerlm
from tinkerlm.generate import generate_step
from tinkerlm.models.base import KVCache
from tinkerlm.prefix_cache import PrefixCache
from tinkerlm.sampling import SamplingParams

KINDS = ("llama", "gpt2", "mistral-window", "qwen3", "qwen2-window")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-models")
    llms = {}
    for kind in KINDS:
        make_hf_model(kind, root / kind)
        llms[kind] = tinkerlm.load(str(root / kind))
    return llms


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def prefill(model, ids: list[int], pc: PrefixCache | None) -> torch.Tensor:
    """Last-position logits of `ids`, starting from `pc`'s longest cached prefix (then caching `ids`)."""
    cache = model.new_cache(1, 128)
    start = pc.restore(cache, 0, ids) if pc is not None else 0
    cache.lengths = [start]
    logits = model(torch.tensor([ids[start:]]), cache=cache)[0, -1]
    cache.lengths = [len(ids)]
    if pc is not None:
        pc.insert(cache, 0, ids)
    return logits


@pytest.mark.parametrize("kind", KINDS)
def test_hit_gives_cold_logits(tiny, kind):
    model = tiny[kind].model
    pc = PrefixCache(block=16)
    first = tokens(50, 0)
    prefill(model, first, pc)  # caches blocks [0, 48)
    for n_shared, want_reused in [(40, 32), (48, 48), (10, 0)]:
        second = first[:n_shared] + tokens(20, n_shared)
        before = pc.stats["tokens_reused"]
        got = prefill(model, second, pc)
        with torch.inference_mode():
            cold = model(torch.tensor([second]))[0, -1]  # the full forward, no cache at all
        assert pc.stats["tokens_reused"] - before == want_reused
        torch.testing.assert_close(got, cold, atol=1e-5, rtol=0)
    # The whole prompt cached: one token is left to prefill, so the logits still come from the model.
    got = prefill(model, first[:48], pc)
    with torch.inference_mode():
        torch.testing.assert_close(got, model(torch.tensor([first[:48]]))[0, -1], atol=1e-5, rtol=0)
    assert pc.stats["tokens_reused"] == 32 + 48 + 32


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_identical_with_and_without_cache(tiny, kind):
    model = tiny[kind].model
    system = tokens(40, 1)
    prompts = [system + tokens(n, 10 + n) for n in (5, 17, 30)]
    greedy = SamplingParams(temperature=0.0)

    def run(batch, pc):
        return list(generate_step(model, batch, max_tokens=24, sampling=greedy, prefix_cache=pc))

    pc = PrefixCache()
    for p in prompts:
        assert run([p], pc) == run([p], None)
    # A second turn: the prompt continues the first prompt and its answer (the answer's keys and values are cached).
    answer = [t for (t,) in run([prompts[0]], None)]
    turn2 = prompts[0] + answer + tokens(6, 99)
    before = pc.stats["tokens_reused"]
    assert run([turn2], pc) == run([turn2], None)
    assert pc.stats["tokens_reused"] - before >= (len(prompts[0]) + len(answer) - 1) // 16 * 16
    # A batch whose rows have cached prefixes of different lengths starts every row at the shortest.
    assert pc.stats["hits"] == 3
    before = pc.stats["tokens_reused"]
    assert run([prompts[1], turn2], pc) == run([prompts[1], turn2], None)
    assert pc.stats["hits"] == 5 and pc.stats["tokens_reused"] - before == 2 * 32 + 2 * 16  # all of prompts[1]
    misses = pc.stats["misses"]
    assert run([turn2, tokens(20, 5)], pc) == run([turn2, tokens(20, 5)], None)  # one row shares nothing
    assert pc.stats["misses"] == misses + 2


def fake_cache(n_tokens: int) -> KVCache:
    cache = KVCache(n_layers=2, batch=1, max_len=64, n_kv_heads=2, head_dim=8)
    for t in cache.k + cache.v:
        t.normal_()
    cache.lengths = [n_tokens]
    return cache


def test_eviction_keeps_budget_and_drops_least_recently_used():
    block_bytes = 2 * 2 * 2 * 4 * 8 * 4  # k and v x layers x heads x 4 tokens x head_dim x fp32
    pc = PrefixCache(budget_mb=3 * block_bytes / 2**20, block=4)
    a, b, c = tokens(9, 1), tokens(9, 2), tokens(5, 3)
    ca, cb, cc = fake_cache(9), fake_cache(9), fake_cache(5)
    pc.insert(ca, 0, a)  # 2 blocks
    pc.insert(cb, 0, b)  # 2 more: over budget, a's last block (the oldest leaf) goes
    assert pc.bytes == 3 * block_bytes <= pc.budget and pc.stats["evictions"] == 1
    assert pc.match(a) == 4 and pc.match(b) == 8
    target = fake_cache(0)
    assert pc.restore(target, 0, a) == 4  # a is now the most recently used
    torch.testing.assert_close(target.k[1][0, :, :4], ca.k[1][0, :, :4], atol=0, rtol=0)
    torch.testing.assert_close(target.v[0][0, :, :4], ca.v[0][0, :, :4], atol=0, rtol=0)
    pc.insert(cc, 0, c)  # b's last block is now the least recently used
    assert pc.bytes <= pc.budget and pc.match(b) == 4 and pc.match(a) == 4 and pc.match(c + [0]) == 4
    pc.insert(cc, 0, c)  # already cached: nothing added, nothing evicted
    assert pc.stats["evictions"] == 2
    # A prefix larger than the whole budget keeps its first blocks.
    big = PrefixCache(budget_mb=2 * block_bytes / 2**20, block=4)
    big.insert(fake_cache(17), 0, tokens(17, 4))
    assert len(big) == 2 and big.bytes <= big.budget and big.match(tokens(17, 4)) == 8


def test_disabled_and_weights_change(tiny):
    off = PrefixCache(budget_mb=0)
    cache = fake_cache(9)
    off.insert(cache, 0, tokens(9, 1))
    assert len(off) == 0 and off.restore(cache, 0, tokens(9, 1)) == 0 and off.stats["misses"] == 0
    pc = PrefixCache(block=4)
    model = tiny["llama"].model
    pc.bind(model)
    pc.insert(fake_cache(9), 0, tokens(9, 1))
    pc.bind(model)
    assert len(pc) == 2  # the same weights: kept
    with torch.no_grad():
        next(model.parameters()).add_(0.0)  # an in-place change (here a harmless one)
    pc.bind(model)
    assert len(pc) == 0 and pc.bytes == 0


def test_multi_turn_chat_hits_the_cache(tiny):
    llm = tiny["llama"]
    cold = tinkerlm.api.LLM(llm.model, llm.tokenizer, "cold", prefix_cache_mb=0)
    messages = [{"role": "system", "content": "Be brief."}]  # the tiny context holds 128 bytes of chat
    hits = []
    for turn in ("Hello", "More", "Why?"):
        messages.append({"role": "user", "content": turn})
        answer = llm.chat(messages, max_tokens=8, temperature=0)
        assert answer == cold.chat(messages, max_tokens=8, temperature=0)
        messages.append({"role": "assistant", "content": str(answer)})
        hits.append(llm.prefix_cache.stats["hits"])
    assert hits[1:] == [hits[0] + 1, hits[0] + 2]
    assert cold.prefix_cache.stats == dict(hits=0, misses=0, tokens_reused=0, evictions=0)


def test_server_clients_with_different_prefixes_do_not_leak(tiny):
    llm = tiny["llama"]
    cold = tinkerlm.api.LLM(llm.model, llm.tokenizer, "cold", prefix_cache_mb=0)
    systems = {
        "a": "Assistant named Ada.",  # the first 24 tokens alike: the two share a cached block, then part
        "b": "Assistant named Bob!",
    }
    users = ["Hi", "Go", "Ok"]
    got: dict[str, list[str]] = {name: [] for name in systems}
    with live_server({"llama": llm}, api_key=KEY, max_batch=4, max_queue=16) as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)

        def chat(name: str, turn: int) -> None:
            messages = [{"role": "system", "content": systems[name]}]
            for i in range(turn + 1):
                messages.append({"role": "user", "content": users[i]})
                if i < turn:
                    messages.append({"role": "assistant", "content": got[name][i]})
            r = client.chat.completions.create(
                model="llama", messages=messages, max_tokens=6, temperature=0.9, seed=len(got[name])
            )
            got[name].append(r.choices[0].message.content)

        for turn in range(len(users)):  # both clients' turns run together, interleaved in the batch
            threads = [threading.Thread(target=chat, args=(name, turn)) for name in systems]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert metric(base, "tinkerlm_prefix_cache_hits_total") >= 2 * (len(users) - 1)
        assert metric(base, "tinkerlm_prefix_cache_reused_tokens_total") > 0
        assert 0 < metric(base, "tinkerlm_prefix_cache_bytes") <= metric(base, "tinkerlm_prefix_cache_budget_bytes")
    for name, answers in got.items():  # each alone, no cache: the same answers
        messages = [{"role": "system", "content": systems[name]}]
        for i, answer in enumerate(answers):
            messages.append({"role": "user", "content": users[i]})
            assert answer == cold.chat(messages, max_tokens=6, temperature=0.9, seed=i)
            messages.append({"role": "assistant", "content": answer})


def test_smollm2_multi_turn_chat_equals_cold(smollm2_gguf):
    """The real default model (quantized: prefill through the packed kernels, decode through the fused step): a
    three-turn chat reuses the cache and answers exactly as without it."""
    llm = tinkerlm.load(str(smollm2_gguf))
    cold = tinkerlm.api.LLM(llm.model, llm.tokenizer, "cold", prefix_cache_mb=0)
    assert llm.model.fused_decode is not None
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}]
    for turn in ("What is the capital of France?", "And of Italy?", "Which of the two is larger?"):
        messages.append({"role": "user", "content": turn})
        answer = llm.chat(messages, max_tokens=24, temperature=0)
        assert answer == cold.chat(messages, max_tokens=24, temperature=0)
        messages.append({"role": "assistant", "content": str(answer)})
    assert llm.prefix_cache.stats["hits"] == 2 and llm.prefix_cache.stats["tokens_reused"] > 50
