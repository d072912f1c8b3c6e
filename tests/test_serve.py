"""`tinkerlm serve` on tiny random models: the official openai client (sync, async, streaming) against a live
server on 127.0.0.1, answers equal to `LLM.chat` / `LLM.generate`, continuous batching, logprobs, penalties,
JSON mode, bad input, disconnects, shutdown, and the CLI verb end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from tiny import make_hf_model, penalised_greedy

import tinkerlm
from tinkerlm.generate import SamplingParams, generate_step
from tinkerlm.serve.server import create_app, make_server

KEY = "test-key"


@contextlib.contextmanager
def live_server(models: dict, **kwargs):
    """Serve `models` ({id: LLM}) from a thread on a free 127.0.0.1 port; yields (base_url, uvicorn server)."""
    app = create_app(models, **kwargs)
    server = make_server(app, "127.0.0.1", 0, log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "server did not stop"


def metric(base: str, name: str, key: str | None = KEY) -> float:
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    llms = {}
    for kind in ("llama", "qwen2"):
        make_hf_model(kind, root / kind)
        llms[kind] = tinkerlm.load(str(root / kind))
    return llms


@pytest.fixture(scope="module")
def server(tiny):
    with live_server(tiny, api_key=KEY, max_batch=4, max_queue=16) as (base, _):
        yield base


class SlowModel(torch.nn.Module):
    """A model whose every forward takes at least 20 ms, so queueing, disconnects and shutdown can be timed."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.lm_head, self.max_context = model, model.lm_head, model.max_context

    def new_cache(self, batch, max_len=None):
        return self.inner.new_cache(batch, max_len)

    def forward(self, *args, **kwargs):
        time.sleep(0.02)
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def slow_llm(tiny):
    return tinkerlm.api.LLM(SlowModel(tiny["llama"].model), tiny["llama"].tokenizer, "slow")


@pytest.fixture(scope="module")
def slow_server(slow_llm):
    with live_server({"slow": slow_llm}, api_key=KEY, max_batch=4, max_queue=16) as (base, _):
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def chat_ids(llm, messages) -> list[int]:
    return llm.tokenizer.encode(llm.apply_chat_template(messages), add_special_tokens=False)


def count_tokens(llm, ids, max_tokens, **sampling) -> int:
    """Tokens `generate_step` produces for one prompt: what `usage.completion_tokens` must say."""
    steps = generate_step(
        llm.model,
        [ids],
        max_tokens=max_tokens,
        sampling=SamplingParams(**sampling),
        stop_token_ids=llm.tokenizer.stop_token_ids,
    )
    return sum(1 for _ in steps)


# ----------------------------------------------------------------------------------------------------------------
# Answers equal the Python API


def test_models_list_and_health(client, server):
    assert sorted(m.id for m in client.models.list().data) == ["llama", "qwen2"]
    assert client.models.retrieve("qwen2").id == "qwen2"
    assert httpx.get(server + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=7)])
def test_chat_equals_llm_chat(client, tiny, kind, settings):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model=kind, messages=messages, max_tokens=20, **settings)
    want = tiny[kind].chat(messages, max_tokens=20, **settings)
    assert r.choices[0].message.content == want
    ids = chat_ids(tiny[kind], messages)
    sampling = {k: v for k, v in settings.items()}
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == count_tokens(tiny[kind], ids, 20, **sampling)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_llm_chat_with_exact_usage(client, tiny):
    messages = [{"role": "user", "content": "Stream please"}]
    stream = client.chat.completions.create(
        model="llama",
        messages=messages,
        max_tokens=24,
        temperature=0.8,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tiny["llama"].chat(messages, max_tokens=24, temperature=0.8, seed=3)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count_tokens(
        tiny["llama"], chat_ids(tiny["llama"], messages), 24, temperature=0.8, seed=3
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_equals_llm_chat(client, tiny):
    messages = [{"role": "user", "content": "abc"}]
    full = tiny["llama"].chat(messages, max_tokens=30, temperature=0)
    stop = full[6:8]
    want = tiny["llama"].chat(messages, max_tokens=30, temperature=0, stop=[stop])
    r = client.chat.completions.create(model="llama", messages=messages, max_tokens=30, temperature=0, stop=stop)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(
        model="llama", messages=messages, max_tokens=30, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in s) == want


def test_completions_prompt_list_and_n(client, tiny):
    """Each prompt x n choices; choice j of a prompt uses seed + j, so choice 0 equals `tinkerlm run --seed`."""
    r = client.completions.create(
        model="qwen2", prompt=["Once upon", "The cat"], n=2, max_tokens=12, temperature=1.0, seed=5
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(["Once upon", "The cat"]):
        for j in range(2):
            want = tiny["qwen2"].generate(prompt, max_tokens=12, temperature=1.0, seed=5 + j)
            assert r.choices[i * 2 + j].text == want
    ids = tiny["qwen2"].tokenizer.encode("Once upon") + tiny["qwen2"].tokenizer.encode("The cat")
    assert r.usage.prompt_tokens == len(ids)
    # Token-id prompts are taken as they are.
    ids = tiny["qwen2"].tokenizer.encode("The cat")
    r2 = client.completions.create(model="qwen2", prompt=ids, max_tokens=12, temperature=1.0, seed=5)
    assert r2.choices[0].text == r.choices[2].text


def test_completions_streaming(client, tiny):
    s = client.completions.create(model="llama", prompt="Hello", max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s) == tiny["llama"].generate("Hello", max_tokens=16)


def test_async_client_concurrent_equals_sequential(server, tiny):
    """8 simultaneous requests (4 slots, so some queue; two models) give the sequential answers, greedy and seeded."""
    jobs = [
        (
            "llama" if i % 3 else "qwen2",
            f"prompt number {i} " + "x" * i,
            6 + 3 * i,
            dict(temperature=0.0) if i % 2 else dict(temperature=0.7, seed=i),
        )
        for i in range(8)
    ]

    async def run():
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(
            *[
                c.chat.completions.create(model=m, messages=[{"role": "user", "content": p}], max_tokens=n, **s)
                for m, p, n, s in jobs
            ]
        )

    got = [r.choices[0].message.content for r in asyncio.run(run())]
    want = [tiny[m].chat(p, max_tokens=n, **s) for m, p, n, s in jobs]
    assert got == want
    assert metric(server, "tinkerlm_slots_busy") == 0


def test_async_streaming_concurrent(server, tiny):
    async def run():
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)

        async def one(i):
            text = ""
            async for chunk in await c.completions.create(
                model="llama", prompt=f"s{i}", max_tokens=10 + i, temperature=0, stream=True
            ):
                text += chunk.choices[0].text
            return text

        return await asyncio.gather(*[one(i) for i in range(6)])

    assert asyncio.run(run()) == [tiny["llama"].generate(f"s{i}", max_tokens=10 + i) for i in range(6)]


# ----------------------------------------------------------------------------------------------------------------
# logprobs, penalties, JSON mode


def test_completion_logprobs_match_the_model(client, tiny):
    llm = tiny["llama"]
    ids = llm.tokenizer.encode("logprobs")
    r = client.completions.create(model="llama", prompt=ids, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    # top_logprobs is keyed by token text (OpenAI's shape), so partial-UTF-8 tokens ("\ufffd") may share a key.
    assert len(lp.token_logprobs) == 4 and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    seq = list(ids)
    for step in range(4):
        with torch.no_grad():
            ref = torch.log_softmax(llm.model(torch.tensor([seq]))[0, -1].float(), -1)
        token = int(ref.argmax())
        assert abs(lp.token_logprobs[step] - ref[token].item()) < 1e-4
        assert max(lp.top_logprobs[step].values()) == pytest.approx(lp.token_logprobs[step], abs=1e-6)
        seq.append(token)


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(
        model="qwen2",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for t in content:
        assert len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-6)
        assert isinstance(t.bytes, list)


def test_presence_and_frequency_penalties_match_reference(client, tiny):
    """Greedy with OpenAI's penalties equals a plain loop: logits - freq * count - presence * (count > 0)."""
    llm = tiny["llama"]
    ids = llm.tokenizer.encode("penalty test")
    out = penalised_greedy(llm, ids, 12, frequency=1.5, presence=0.5)
    r = client.completions.create(
        model="llama", prompt=ids, max_tokens=12, temperature=0, frequency_penalty=1.5, presence_penalty=0.5
    )
    # Streamed text holds back an incomplete UTF-8 character at the end, as `tinkerlm run` does.
    want = max(
        (
            llm.tokenizer.decode(out[:k])
            for k in range(len(out) + 1)
            if not llm.tokenizer.decode(out[:k]).endswith("\ufffd")
        ),
        key=len,
    )
    assert r.choices[0].text == want


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=1.0, seed=1)])
@pytest.mark.parametrize("max_tokens", [3, 12, 60])
def test_json_mode_gives_a_json_object(client, settings, max_tokens):
    r = client.chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=max_tokens,
        response_format={"type": "json_object"},
        **settings,
    )
    content = r.choices[0].message.content
    assert isinstance(json.loads(content), dict), content
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= max_tokens


def test_json_mode_streaming_completion(client):
    s = client.completions.create(
        model="qwen2",
        prompt="{",
        max_tokens=20,
        temperature=0.5,
        seed=2,
        stream=True,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads("".join(c.choices[0].text for c in s)), dict)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: right status, OpenAI error shape, server stays up

CHAT = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"\xff\xfe", 400, None),
        (json.dumps({**CHAT, "temperature": "hot"}), 400, "temperature"),
        (json.dumps({**CHAT, "max_tokens": 1.5}), 400, "max_tokens"),
        (json.dumps({**CHAT, "n": True}), 400, "n"),
        (json.dumps({**CHAT, "messages": "hi"}), 400, "messages"),
        (json.dumps({**CHAT, "messages": []}), 400, "messages"),
        (json.dumps({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role"),
        (json.dumps({**CHAT, "messages": [{"role": "user", "content": 5}]}), 400, "messages[0].content"),
        (json.dumps({"messages": CHAT["messages"]}), 400, "model"),
        (json.dumps({**CHAT, "tools": [{"type": "function"}]}), 400, "tools[0].function"),
        (json.dumps({**CHAT, "logit_bias": {"5": 10}}), 400, "logit_bias"),
        (json.dumps({**CHAT, "frobnicate": 1}), 400, "frobnicate"),
        (json.dumps({**CHAT, "response_format": {"type": "xml"}}), 400, "response_format.type"),
        (json.dumps({**CHAT, "response_format": {"type": "json_schema"}}), 400, "response_format.json_schema"),
        (json.dumps({**CHAT, "top_logprobs": 3}), 400, "top_logprobs"),
        (json.dumps({**CHAT, "stream_options": {"include_usage": True}}), 400, "stream_options"),
        (json.dumps({**CHAT, "temperature": 3}), 400, "temperature"),
        (json.dumps({**CHAT, "stop": ["a", "b", "c", "d", "e"]}), 400, "stop"),
        (json.dumps({**CHAT, "max_tokens": 10**9}), 400, "max_tokens"),
        (json.dumps({**CHAT, "max_tokens": 0}), 400, "max_tokens"),
        (json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 500}]}), 400, "messages"),
        (json.dumps({**CHAT, "model": "nope"}), 404, "model"),
    ],
)
def test_bad_requests(server, body, status, param):
    r = httpx.post(server + "/v1/chat/completions", content=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert httpx.get(server + "/health").status_code == 200


@pytest.mark.parametrize(
    "body, status",
    [
        ({"model": "llama", "prompt": [1, 99999]}, 400),
        ({"model": "llama", "prompt": []}, 400),
        ({"model": "llama", "prompt": ""}, 400),
        ({"model": "llama", "prompt": "hi", "logprobs": 9}, 400),
        ({"model": "llama", "prompt": "hi", "echo": True}, 400),
        ({"model": "llama", "prompt": "hi", "max_tokens": 200}, 400),
    ],
)
def test_bad_completion_requests(server, body, status):
    r = httpx.post(server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_auth_required_except_health_and_playground(server):
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/metrics").status_code == 401
    r = httpx.post(server + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/health").status_code == 200
    assert "tinkerlm" in httpx.get(server + "/").text


def test_unknown_route_and_method_and_huge_body(server):
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server + "/v1/chat/completions").status_code == 405
    r = httpx.post(
        server + "/v1/chat/completions", content=b"x" * (9 << 20), headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 413


# ----------------------------------------------------------------------------------------------------------------
# Queue, disconnects, shutdown


def test_queue_full_429_and_disconnect_frees_slots(slow_server):
    """16 choices fill the 4 slots and 12 of the 16 queue places; 16 more are refused. Closing the stream
    cancels all 16 at once."""
    server = slow_server
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {"model": "slow", "prompt": "hi", "n": 16, "max_tokens": 120, "temperature": 1.0}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server + "/v1/completions", json={**long, "stream": True}, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection (a disconnect)
            next(lines)
            busy = httpx.post(server + "/v1/completions", json=long, headers=headers)
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
            assert metric(server, "tinkerlm_slots_busy") > 0
    assert wait_for(
        lambda: metric(server, "tinkerlm_slots_busy") == 0 and metric(server, "tinkerlm_queue_waiting") == 0, timeout=5
    )
    assert metric(server, "tinkerlm_sequences_cancelled_total") > 0


def test_non_streaming_client_timeout_frees_slots(slow_server):
    server = slow_server
    headers = {"Authorization": f"Bearer {KEY}"}
    before = metric(server, "tinkerlm_sequences_cancelled_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            server + "/v1/completions",
            json={"model": "slow", "prompt": "hi", "n": 16, "max_tokens": 120},
            headers=headers,
            timeout=0.3,
        )
    assert wait_for(
        lambda: metric(server, "tinkerlm_slots_busy") == 0 and metric(server, "tinkerlm_queue_waiting") == 0, timeout=5
    )
    assert metric(server, "tinkerlm_sequences_cancelled_total") > before


def _stream_in_thread(base: str, body: dict, out: list) -> threading.Thread:
    def run():
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            out.append(r.status_code)
            out.extend(r.iter_lines())

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("grace", [30.0, 0.0])
def test_graceful_shutdown(slow_llm, grace):
    """On shutdown new requests get 503; accepted ones finish within the grace period, else end with an error."""
    body = {"model": "llama", "prompt": "hi", "n": 8, "max_tokens": 25, "temperature": 1.0, "stream": True}
    lines: list = []
    with live_server({"llama": slow_llm}, max_batch=2, shutdown_grace=grace) as (base, server):
        t = _stream_in_thread(base, body, lines)
        assert wait_for(lambda: len(lines) > 2)
        server.should_exit = True
        if grace:
            assert wait_for(lambda: httpx.get(base + "/health").status_code == 503, timeout=5)
            r = httpx.post(base + "/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        t.join(60)
    data = [line for line in lines[1:] if line.startswith("data: ")]
    if grace:
        assert data[-1] == "data: [DONE]"
        finished = [json.loads(d[6:])["choices"][0] for d in data[:-1]]
        assert sum(c["finish_reason"] is not None for c in finished) == 8
    else:
        assert json.loads(data[-1][6:])["error"]["code"] == "shutting_down"


@contextlib.contextmanager
def cli_server(model: Path, *flags: str, env: dict | None = None):
    """`tinkerlm serve MODEL --port P FLAGS` in a subprocess on a free loopback port, once /health answers:
    yields (process, base URL); the process is killed on the way out if it is still running."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tinkerlm", "serve", str(model), "--port", str(port), *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1") if env is None else env
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(base + "/health").status_code == 200
        except httpx.TransportError:
            return proc.poll() is not None

    try:
        assert wait_for(up, timeout=60) and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_end_to_end(tmp_path):
    """`tinkerlm serve MODEL --port P` answers on 127.0.0.1 and exits cleanly on SIGINT."""
    make_hf_model("gpt2", tmp_path / "gpt2")
    with cli_server(tmp_path / "gpt2", "--max-batch", "2") as (proc, base):
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        model = c.models.list().data[0].id
        r = c.completions.create(model=model, prompt="hello", max_tokens=5, temperature=0)
        assert r.choices[0].text == tinkerlm.load(str(tmp_path / "gpt2")).generate("hello", max_tokens=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "serving" in proc.stderr.read()


def test_public_host_without_key_warns(monkeypatch, capsys, tiny):
    """Binding beyond loopback without an API key prints a loud warning (nothing is bound in this test)."""
    from tinkerlm.serve import server as server_mod

    ran = []
    monkeypatch.setattr(tinkerlm, "load", lambda name, **kw: tiny["llama"])
    monkeypatch.setattr(
        server_mod, "make_server", lambda app, host, port: type("S", (), {"run": lambda s: ran.append(host)})()
    )
    monkeypatch.delenv("TINKERLM_API_KEY", raising=False)
    server_mod.serve(["m"], host="0.0.0.0", max_batch=1, max_context=64)
    assert "WARNING" in capsys.readouterr().err and ran == ["0.0.0.0"]
    server_mod.serve(["m"], host="0.0.0.0", api_key="k", max_batch=1, max_context=64)
    assert "WARNING" not in capsys.readouterr().err
    server_mod.serve(["m"], max_batch=1, max_context=64)
    assert "WARNING" not in capsys.readouterr().err and ran[-1] == "127.0.0.1"
