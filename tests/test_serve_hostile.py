"""The server against hostile clients, on tiny models over loopback: one request's failure ends that request only
(the engine survives, a stream beside hostile requests is unchanged), bodies are limited while they stream in,
big prompts and slow templates do not stall the event loop, and the Host / Origin / Content-Type checks and the
API key from a file or the environment work."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import httpx
import openai
import pytest
from test_serve import SlowModel, cli_server, live_server
from tiny import make_hf_model

import tinkerlm
from tinkerlm import limits
from tinkerlm.batching import BatchGenerator
from tinkerlm.errors import TinkerError
from tinkerlm.sampling import SamplingParams
from tinkerlm.serve import server as server_mod


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-models")
    make_hf_model("llama", root / "llama")
    return tinkerlm.load(str(root / "llama"))


@pytest.fixture(scope="module")
def open_server(llm):
    """No API key (the case the trust checks protect), a slow model to keep a stream in flight, and allow-lists."""
    slow = tinkerlm.api.LLM(SlowModel(llm.model), llm.tokenizer, "slow")
    models = {"llama": llm, "slow": slow}
    allowed = dict(allowed_hosts=["my.lan", ".corp.example"], allowed_origins=["http://app.example:3000"])
    with live_server(models, max_batch=4, max_queue=16, **allowed) as (base, _):
        yield base


def post(base: str, path: str, body, **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        base + path, content=content, headers={"Content-Type": "application/json", **headers}, timeout=120
    )


# ----------------------------------------------------------------------------------------------------------------
# Isolation


def test_engine_failure_ends_that_sequence_only(llm):
    """A sequence that fails at prefill (a seed torch refuses) or while decoding (its callback raises) ends alone;
    the sequence beside it gives exactly the text it gives alone, and the engine takes more work afterwards."""
    alone = llm.generate("Once upon", max_tokens=12, temperature=1.0, seed=3)
    bg = BatchGenerator(llm.model, llm.tokenizer, max_batch=4)
    good = bg.sequence("Once upon", SamplingParams(temperature=1.0, seed=3, max_tokens=12))
    bad_seed = bg.sequence("Hello", SamplingParams(max_tokens=12))
    bad_seed.params = SamplingParams(seed=2**64, max_tokens=12)  # past validation, as a bug would let it

    calls = []

    def explode(ev):  # fails on its second event: in the middle of decoding
        calls.append(ev)
        if len(calls) >= 2:
            raise RuntimeError("callback failed")

    bad_emit = bg.sequence("Hi there", SamplingParams(temperature=1.0, seed=5, max_tokens=40), emit=explode)
    bg.submit_all([good, bad_seed, bad_emit])
    events = list(bg.events())
    errors = [ev for ev in events if ev.error is not None]
    assert [ev.index for ev in errors] == [bad_seed.index] and "Overflow" in str(errors[0].error)
    assert "".join(ev.text for ev in events if ev.index == good.index) == alone
    assert bad_emit.finished and 0 < bad_emit.generated < 40 and good.finished and bg.pending() == 0
    again = bg.submit("Once upon", SamplingParams(temperature=1.0, seed=3, max_tokens=12))
    assert "".join(ev.text for ev in bg.events() if ev.index == again.index) == alone


def test_seed_range_is_validated():
    with pytest.raises(TinkerError, match="seed"):
        SamplingParams(seed=2**64).check()
    with pytest.raises(TinkerError, match="seed"):
        SamplingParams(seed=-(2**63) - 1).check()
    SamplingParams(seed=2**63 - 1).check()
    SamplingParams(seed=-(2**63)).check()


CHAT = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "slow", "prompt": "hi", "max_tokens": 4}
DEEP = b'{"model": "slow", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HOSTILE = [
    ("/v1/chat/completions", {**CHAT, "seed": 18446744073709551616}),
    ("/v1/chat/completions", {**CHAT, "seed": -(2**63) - 1}),
    ("/v1/completions", {**COMPLETION, "seed": 2**64, "n": 2}),
    ("/v1/chat/completions", {**CHAT, "stop": ["x"] * 100_000}),
    ("/v1/chat/completions", {**CHAT, "stop": ["x" * 100_000]}),
    ("/v1/completions", {**COMPLETION, "logprobs": 99}),
    ("/v1/completions", {**COMPLETION, "logprobs": -1}),
    ("/v1/chat/completions", {**CHAT, "logprobs": "yes"}),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 10**6}),
    ("/v1/chat/completions", b'{"model": "slow", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/completions", b'{"model": "slow", "prompt": "a\\udfffb"}'),
    ("/v1/chat/completions", DEEP),
    ("/v1/chat/completions", b'{"model": "slow", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("/v1/chat/completions", b'{"model": "slow", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("/v1/chat/completions", b'{"model": "slow", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}'),
    ("/v1/completions", b'{"model": "slow", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}),
    ("/v1/chat/completions", {**CHAT, "n": 10**30}),
    ("/v1/completions", {**COMPLETION, "prompt": [2**70]}),
    ("/v1/completions", {**COMPLETION, "prompt": [[1, 2]]}),
    ("/v1/chat/completions", [CHAT]),
    ("/v1/chat/completions", b"{" * 10),
]


def test_hostile_requests_beside_a_stream(open_server):
    """Hostile requests sent while a seeded stream runs each get a 4xx; the stream's pieces equal those of the
    same request run alone, and the engine serves the next request."""
    client = openai.OpenAI(base_url=open_server + "/v1", api_key="unused", max_retries=0)
    normal = dict(model="slow", prompt="Once upon a time", max_tokens=100, temperature=1.0, seed=11, stream=True)

    def run() -> list[str]:
        return [c.choices[0].text for c in client.completions.create(**normal)]

    alone = run()
    assert len(alone) > 20  # long enough (20 ms a token) to still run while the hostile requests are answered
    beside: list[str] = []
    started = threading.Event()

    def stream():
        for c in client.completions.create(**normal):
            beside.append(c.choices[0].text)
            started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(30)
    statuses, still_running = [], False
    for i, (path, body) in enumerate(HOSTILE):
        if i == 8:
            still_running = t.is_alive()
        r = post(open_server, path, body)
        statuses.append((path, r.status_code, r.text[:200]))
        assert 400 <= r.status_code < 500, statuses[-1]
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    t.join(60)
    assert beside == alone
    assert still_running, "the stream ended before the hostile requests were sent; make it longer"
    assert "".join(run()) == "".join(alone)
    assert httpx.get(open_server + "/health").status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# Buffering


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def test_chunked_body_refused_while_it_streams(open_server):
    """A chunked body with no declared length gets 413 once it passes the limit, not after 300 MB are read."""
    sock = socket.create_connection(("127.0.0.1", _port(open_server)))
    sock.settimeout(30)
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    sock.sendall(head.encode())
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    sent, answer = 0, b""
    try:
        while sent < 300 << 20:
            sock.setblocking(False)
            try:
                answer = sock.recv(65536)
            except BlockingIOError:
                answer = b""
            sock.setblocking(True)
            if answer:
                break
            sock.sendall(chunk)
            sent += 1 << 20
    except OSError:  # the server closed the connection while we were still sending
        pass
    sock.settimeout(10)
    try:
        answer += sock.recv(65536)
    except OSError:
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 4 * limits.MAX_BODY_BYTES, f"{sent >> 20} MB were read before the refusal"


def test_declared_length_over_limit_refused_at_once(open_server):
    r = httpx.post(
        open_server + "/v1/completions",
        content=b" " * (limits.MAX_BODY_BYTES + 1),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def _health_latencies(base: str, busy: threading.Thread) -> list[float]:
    """Time /health requests while `busy` runs."""
    latencies = []
    with httpx.Client() as c:
        while busy.is_alive():
            t = time.perf_counter()
            assert c.get(base + "/health", timeout=30).status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.02)
    return latencies


def test_big_prompt_does_not_stall_the_event_loop(open_server):
    """A 3 MB prompt is tokenized in a worker thread (seconds on a busy CPU): /health keeps answering meanwhile,
    and the prompt gets its 400 (longer than the context)."""
    result = {}
    prompt = "hello world, this is text. " * 110_000

    def big():
        t = time.perf_counter()
        result["r"] = post(open_server, "/v1/completions", {"model": "llama", "prompt": prompt, "max_tokens": 1})
        result["s"] = time.perf_counter() - t

    t = threading.Thread(target=big)
    t.start()
    latencies = _health_latencies(open_server, t)
    t.join()
    assert result["r"].status_code == 400 and "context length" in result["r"].text
    assert len(latencies) >= 3, f"the big prompt took only {result['s']:.2f}s; make it bigger"
    assert max(latencies) < 1.0, f"/health took {max(latencies):.2f}s while a big prompt was tokenized"


def test_slow_chat_template_does_not_stall_the_event_loop(llm):
    """A chat template that loops a million times renders in a worker thread: /health keeps answering."""
    slow_tok = type(llm.tokenizer).__new__(type(llm.tokenizer))
    slow_tok.__dict__.update(llm.tokenizer.__dict__)
    slow_tok.chat_template = (
        "{% for i in range(100000) %}{% for j in range(10) %}{% endfor %}{% endfor %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    slow = tinkerlm.api.LLM(llm.model, slow_tok, "slow-template")
    with live_server({"t": slow}) as (base, _):
        result = {}

        def chat():
            t = time.perf_counter()
            result["r"] = post(base, "/v1/chat/completions", {**CHAT, "model": "t"})
            result["s"] = time.perf_counter() - t

        t = threading.Thread(target=chat)
        t.start()
        latencies = _health_latencies(base, t)
        t.join()
    assert result["r"].status_code in (200, 400), result["r"].text  # 400 if rendering is cut off by a time limit
    assert latencies and max(latencies) < 1.0, f"/health took {max(latencies):.2f}s while a template rendered"


# ----------------------------------------------------------------------------------------------------------------
# Trust boundaries


@pytest.mark.parametrize(
    "host, status",
    [
        ("evil.example", 403),
        ("evil.example:8000", 403),
        ("127.0.0.1.nip.io", 403),
        ("localhost", 200),
        ("LOCALHOST:1234", 200),
        ("app.localhost", 200),
        ("127.0.0.1", 200),
        ("[::1]:8000", 200),
        ("192.168.1.20:8000", 200),
        ("my.lan", 200),
        ("x.corp.example", 200),
        ("corp.example.evil", 403),
    ],
)
def test_host_checked(open_server, host, status):
    """Foreign Host names are refused (DNS rebinding); loopback names, IP addresses and allowed hosts pass."""
    r = httpx.get(open_server + "/v1/models", headers={"Host": host})
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["code"] == "host_not_allowed"
        r = post(open_server, "/v1/completions", COMPLETION, Host=host)
        assert r.status_code == 403


def test_origin_checked(open_server):
    """A browser's Origin must be this server or an allowed origin; allowed ones get CORS headers."""
    same = open_server  # http://127.0.0.1:PORT, as the playground sends it
    assert post(open_server, "/v1/completions", COMPLETION, Origin=same).status_code == 200
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1", "file://"):
        r = post(open_server, "/v1/completions", COMPLETION, Origin=origin)
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", origin
    # The classic CSRF: a cross-site text/plain POST needs no preflight, so it is refused on its Origin.
    r = httpx.post(
        open_server + "/v1/completions",
        content=json.dumps(COMPLETION),
        headers={"Content-Type": "text/plain", "Origin": "http://evil.example"},
    )
    assert r.status_code == 403
    allowed = "http://app.example:3000"
    r = post(open_server, "/v1/completions", COMPLETION, Origin=allowed)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed
    preflight = {
        "Origin": allowed,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    r = httpx.options(open_server + "/v1/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed
    r = httpx.options(open_server + "/v1/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert r.status_code == 403


@pytest.mark.parametrize(
    "content_type, status",
    [
        ("text/plain", 415),
        ("text/plain;charset=UTF-8", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        (None, 200),  # curl and scripts; browsers always send an Origin with a POST, checked above
    ],
)
def test_content_type_checked(open_server, content_type, status):
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = httpx.post(open_server + "/v1/completions", content=json.dumps(COMPLETION), headers=headers)
    assert r.status_code == status, r.text
    if status == 415:
        assert r.json()["error"]["code"] == "unsupported_media_type"


def test_api_key_from_file_end_to_end(tmp_path):
    """`tinkerlm serve --api-key-file F`: the key is required, and it is not on the command line."""
    make_hf_model("gpt2", tmp_path / "gpt2")
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-from-file\n")
    env = {k: v for k, v in os.environ.items() if k != "TINKERLM_API_KEY"}
    with cli_server(tmp_path / "gpt2", "--max-batch", "1", "--api-key-file", str(key_file), env=env) as (proc, base):
        assert httpx.get(base + "/v1/models").status_code == 401
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret-from-file", max_retries=0)
        assert good.models.list().data
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert b"s3cret" not in f.read()


def test_api_key_sources(monkeypatch, tmp_path, llm):
    """--api-key, --api-key-file, TINKERLM_API_KEY: which one wins, and clear errors for bad key files."""
    apps = []
    monkeypatch.setattr(tinkerlm, "load", lambda name, **kw: llm)
    monkeypatch.setattr(
        server_mod, "make_server", lambda app, host, port: type("S", (), {"run": lambda s: apps.append(app)})()
    )

    def key(**kw):
        server_mod.serve(["m"], max_batch=1, max_context=64, **kw)
        return apps[-1].state.tinkerlm.api_key

    monkeypatch.setenv("TINKERLM_API_KEY", "from-env")
    assert key() == "from-env"
    (tmp_path / "k").write_text("  from-file \n")
    assert key(api_key_file=str(tmp_path / "k")) == "from-file"
    assert key(api_key="from-flag") == "from-flag"
    with pytest.raises(TinkerError, match="not both"):
        key(api_key="a", api_key_file=str(tmp_path / "k"))
    with pytest.raises(TinkerError, match="cannot read"):
        key(api_key_file=str(tmp_path / "missing"))
    (tmp_path / "two").write_text("one\ntwo\n")
    with pytest.raises(TinkerError, match="alone"):
        key(api_key_file=str(tmp_path / "two"))
    with pytest.raises(TinkerError, match="allowed_origins"):
        key(allowed_origins="evil.example")
    monkeypatch.delenv("TINKERLM_API_KEY")
    assert key() is None
    assert key(host="myhost.local") is None
    trust = [m for m in apps[-1].user_middleware if m.cls is server_mod._TrustBoundary]
    assert trust and "myhost.local" in trust[0].kwargs["allowed_hosts"]  # the name it binds is a name clients use


def test_api_key_from_env_on_live_server(monkeypatch, llm):
    """The key from the environment protects a live server (through `serve`'s own key resolution)."""
    monkeypatch.setenv("TINKERLM_API_KEY", "env-key")
    captured = {}

    def fake_make_server(app, host, port):
        captured["app"] = app
        return type("S", (), {"run": lambda s: None})()

    monkeypatch.setattr(tinkerlm, "load", lambda name, **kw: llm)
    monkeypatch.setattr(server_mod, "make_server", fake_make_server)
    server_mod.serve(["m"], max_batch=1, max_context=64)
    api_key = captured["app"].state.tinkerlm.api_key
    with live_server({"m": llm}, api_key=api_key) as (base, _):
        assert httpx.get(base + "/v1/models").status_code == 401
        r = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer env-key"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "m"
