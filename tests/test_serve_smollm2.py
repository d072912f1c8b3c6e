"""`tinkerlm serve` with the real default model (SmolLM2-135M-Instruct GGUF): the openai client's answers equal
`LLM.chat` for the same settings, alone and with 8 requests decoded together, and JSON mode holds."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from test_serve import live_server

import tinkerlm

PROMPTS = [
    "Name three primary colours.",
    "What is 2+2?",
    "Write a haiku about the sea.",
    "Who wrote Hamlet?",
    "Say hello in French.",
    "What is the capital of Japan?",
    "List two fruits.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return tinkerlm.load(str(smollm2_gguf))


@pytest.fixture(scope="module")
def base(smollm2):
    with live_server({"smollm2": smollm2}, max_batch=8, max_context=1024) as (url, _):
        yield url + "/v1"


def test_sync_and_streaming_equal_llm_chat(base, smollm2):
    c = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPTS[0]}]
    r = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == smollm2.chat(messages, max_tokens=24)
    s = c.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=24, temperature=0.8, top_p=0.95, seed=42, stream=True
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in s)
    assert text == smollm2.chat(messages, max_tokens=24, temperature=0.8, top_p=0.95, seed=42)


def test_eight_concurrent_equal_sequential(base, smollm2):
    """Continuous batching: 8 simultaneous greedy requests of different lengths decode together (one forward per
    step over 8 slots) and give exactly the answers of 8 sequential `LLM.chat` calls."""

    async def run():
        c = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
        return await asyncio.gather(
            *[
                c.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": p}], max_tokens=10 + 2 * i, temperature=0
                )
                for i, p in enumerate(PROMPTS)
            ]
        )

    got = [r.choices[0].message.content for r in asyncio.run(run())]
    assert got == [smollm2.chat(p, max_tokens=10 + 2 * i) for i, p in enumerate(PROMPTS)]


def test_json_mode(base):
    c = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    r = c.chat.completions.create(
        model="smollm2",
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give the name and age of a person as JSON."}],
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
