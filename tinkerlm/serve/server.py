"""The OpenAI-compatible HTTP server (`tinkerlm serve`): FastAPI app, SSE streaming, metrics, playground, shutdown.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET /metrics
(Prometheus text format), GET / (the web playground), GET /v1/tinkerlm/evaluations (the benchmark scores kept in
the store's manifests by `tinkerlm eval`, for the playground's Results view), GET /v1/tinkerlm/models/{name}/openness
(`tinkerlm openness NAME --json`) and GET /v1/tinkerlm/models/{name}/card (the model card, text/markdown), for the
playground's Openness view. Responses and errors follow the
OpenAI API reference (https://platform.openai.com/docs/api-reference); streaming uses server-sent events ending
in `data: [DONE]`. Generation runs in one `tinkerlm.batching.BatchGenerator` thread per model; handlers only
validate, tokenize and relay events. Work that grows with the request (decoding and validating the body, rendering the chat template,
tokenizing) runs in worker threads, so one big or slow request never stalls the event loop (/health, other models).

Trust boundaries (docs/security.md): a request body is limited while it streams in (limits.MAX_BODY_BYTES, chunked
bodies too). Without an API key, any web page the user visits could otherwise drive a loopback server, so every
request's `Host` must be a loopback name, an IP address or an allowed host (against DNS rebinding), its `Origin`,
when a browser sends one, must be this server or an allowed origin (against cross-site requests), and POST bodies
must be `application/json` (a cross-site form or `text/plain` fetch cannot send that without a CORS preflight).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from tinkerlm import limits, toolcalls
from tinkerlm.batching import DEFAULT_PREFILL_CHUNK, BatchGenerator, Event, QueueFull, Sequence, ShuttingDown
from tinkerlm.errors import TinkerError
from tinkerlm.loading import check_kv_cache
from tinkerlm.prefix_cache import DEFAULT_MB
from tinkerlm.sampling import SamplingParams, token_text
from tinkerlm.serve.protocol import APIError, ChatRequest, CompletionRequest, decode_json, params, parse

log = logging.getLogger("tinkerlm.serve")

# The KV cache is preallocated for max_batch x context positions, so a 128k-context model would need tens of GB;
# contexts are capped at this unless max_context says otherwise.
DEFAULT_MAX_CONTEXT = 8192
STATIC = Path(__file__).parent / "static"
EVALUATIONS = "/v1/tinkerlm/evaluations"
OPENNESS = "/v1/tinkerlm/models/{name}/openness"
CARD = "/v1/tinkerlm/models/{name}/card"
PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics", "/", EVALUATIONS)


class ClientGone(Exception):
    """The client disconnected before its answer was complete (its sequences are cancelled)."""


class _State:
    def __init__(self, engines: dict[str, BatchGenerator], llms: dict[str, Any], api_key: str | None):
        self.engines = engines
        self.llms = llms
        self.aliases = dict(engines)
        for name, e in engines.items():  # a store ref like "smollm2:latest" also finds the model served as "smollm2"
            self.aliases.setdefault(llms[name].name, e)
        self.api_key = api_key
        self.requests: Counter = Counter()  # (path, status) -> count
        self.started = int(time.time())
        self.draining = False

    def engine(self, name: str) -> BatchGenerator:
        e = self.aliases.get(name)
        if e is None:
            raise APIError(
                404,
                f"The model '{name}' does not exist; served models: {', '.join(self.engines)}",
                "model",
                "model_not_found",
            )
        return e

    def defaults(self, engine: BatchGenerator) -> dict[str, Any]:
        """The sampling defaults of the model behind `engine` (its generation_config.json)."""
        return self.llms[engine.name].sampling_defaults

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key"
            )


class _CountRequests:
    """ASGI middleware counting responses by path and status (a plain wrapper: it leaves streaming alone)."""

    def __init__(self, app, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = _path_label(scope["path"])

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.state.requests[(path, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def _path_label(path: str) -> str:
    """The metrics label of a request path: a known path, a per-model path's template, or "other" (so a client
    cannot grow the metrics without bound by inventing paths)."""
    if path in PATHS:
        return path
    head, sep, leaf = path.rpartition("/")
    if sep and head.startswith("/v1/tinkerlm/models/") and head.count("/") == 4 and leaf in ("openness", "card"):
        return OPENNESS if leaf == "openness" else CARD
    return "other"


def _host_name(host: str) -> str:
    """The name in a Host header or an origin's netloc: lowercased, without port, brackets or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _TrustBoundary:
    """ASGI middleware refusing (403) requests whose Host or Origin this server does not trust.

    Host: loopback names (localhost, *.localhost) and IP addresses pass (DNS rebinding needs a name the attacker
    controls), as do `allowed_hosts` ("name", ".domain" for its subdomains, "*" for any). Origin, when present (a
    browser's cross-site or POST request): it passes if it is this server (its host:port equals the Host header) or
    is in `allowed_origins` ("http://host:port", "*" for any); "null" (sandboxed frames, files) never does.
    """

    def __init__(self, app, allowed_hosts, allowed_origins):
        self.app = app
        self.hosts = {h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()}
        self.origins = {o.strip().lower().rstrip("/") for o in allowed_origins if o.strip()}

    def host_ok(self, host: str) -> bool:
        name = _host_name(host)
        if "*" in self.hosts or name in self.hosts or _is_ip(name):
            return True
        if name == "localhost" or name.endswith(".localhost"):
            return True
        return any(h.startswith(".") and (name.endswith(h) or name == h[1:]) for h in self.hosts)

    def origin_ok(self, origin: str, host: str | None) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if "*" in self.origins or origin in self.origins:
            return True
        netloc = origin.partition("://")[2]
        return origin.startswith(("http://", "https://")) and host is not None and netloc == host.strip().lower()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host"), headers.get("origin")
        error = None
        if host is not None and not self.host_ok(host):
            error = APIError(
                403,
                f"Host '{host}' is not allowed (DNS rebinding protection); serve with --allowed-hosts "
                f"{_host_name(host)} if this is your server's name",
                None,
                "host_not_allowed",
            )
        elif origin is not None and not self.origin_ok(origin, host):
            error = APIError(
                403,
                f"Origin '{origin}' is not allowed (cross-site request protection); serve with --allowed-origins "
                f"{origin} to let pages from there use this server",
                None,
                "origin_not_allowed",
            )
        if error is not None:
            return await JSONResponse(error.body(), status_code=403)(scope, receive, send)
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------------------------------------------
# Running a request: sequences in, events out


class _Run:
    """The sequences of one request and the queue their events arrive on."""

    def __init__(self, engine: BatchGenerator, seqs: list[Sequence], queue: asyncio.Queue):
        self.engine, self.seqs, self.queue = engine, seqs, queue
        self.pending = {s.index for s in seqs}

    async def next(self, request: Request | None = None) -> Event:
        """The next event; with `request`, also watch for the client going away (then cancel and raise)."""
        if request is None:
            ev = await self.queue.get()
        else:
            get = asyncio.ensure_future(self.queue.get())
            gone = asyncio.ensure_future(request.receive())  # the body is read: the next message is a disconnect
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if get not in done:
                get.cancel()
                self.cancel()
                raise ClientGone()
            ev = get.result()
        if ev.error is not None:
            self.cancel()
            raise _api_error(ev.error)
        if ev.finish_reason is not None:
            self.pending.discard(ev.index)
        return ev

    def cancel(self) -> None:
        for s in self.seqs:
            if not s.finished:
                s.cancel()

    @property
    def done(self) -> bool:
        return not self.pending

    def usage(self, prompt_tokens: int) -> dict[str, int]:
        completion = sum(s.generated for s in self.seqs)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }


def _budget(engine: BatchGenerator, n_prompt: int, requested: int | None, param: str) -> int:
    """max_tokens for a prompt of `n_prompt` tokens: the request's, or what is left of the context."""
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty (give at least one token of text)", param)
    ctx = engine.context
    if requested is None:
        if n_prompt >= ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens, but the prompt has "
                f"{n_prompt} tokens. Shorten the prompt.",
                param,
                "context_length_exceeded",
            )
        return ctx - n_prompt
    if n_prompt + requested > ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n_prompt + requested} tokens ({n_prompt} in the prompt, {requested} for the completion). "
            "Reduce the prompt or max_tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    return requested


def _api_error(e: Exception) -> APIError:
    """The OpenAI-shaped error for an engine error event."""
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), None, "shutting_down")
    if isinstance(e, TinkerError):  # a value only the engine could check: the request's fault
        return APIError(400, str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


async def _token_table(engine: BatchGenerator, req, constrained: bool = False) -> None:
    """Build the model's token-bytes table (logprobs, JSON mode) in a worker thread the first time it is needed."""
    if req.response_format is not None or constrained or (req.logprobs is not None and req.logprobs is not False):
        await asyncio.to_thread(engine.token_bytes)


def _start(
    engine: BatchGenerator,
    prompts: list[list[int]],
    req,
    max_tokens: list[int],
    defaults: dict,
    overrides: dict | None = None,
) -> _Run:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(ev: Event) -> None:  # called from the engine thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # the event loop is closed (server gone): nobody is listening
            pass

    options = params(req, defaults) | (overrides or {})
    seqs = []
    for p, (ids, budget) in enumerate(zip(prompts, max_tokens)):
        for j in range(req.n):
            # Choice j uses seed + j, so choice 0 equals `tinkerlm run --seed SEED`.
            seed = None if options["seed"] is None else options["seed"] + j
            sampling = SamplingParams(**{**options, "seed": seed, "max_tokens": budget})
            seqs.append(engine.sequence(ids, sampling, index=p * req.n + j, emit=emit))
    try:
        engine.submit_all(seqs)
    except ShuttingDown as e:
        raise APIError(503, str(e), None, "shutting_down") from None
    except QueueFull as e:
        raise APIError(429, str(e), None, "queue_full") from None
    return _Run(engine, seqs, queue)


def _check_content_type(request: Request) -> None:
    """POST bodies are JSON. A body without a Content-Type is read as JSON (curl, scripts); a browser sends an
    Origin header with every POST, so a cross-site one is refused before it gets here."""
    given = request.headers.get("content-type")
    if given is None:
        return
    media = given.split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(
            415,
            f"Content-Type '{given}' is not supported: send the body as JSON with 'Content-Type: application/json'",
            None,
            "unsupported_media_type",
        )


async def _read_body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it passes limits.MAX_BODY_BYTES (declared or streamed)."""
    limit = limits.MAX_BODY_BYTES
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise APIError(413, f"request body of {size} bytes is over the limit of {limit} bytes")
    chunks, n = [], 0
    async for chunk in request.stream():  # chunked bodies declare no length: count as they arrive
        n += len(chunk)
        if n > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _token_text(engine: BatchGenerator, token: int) -> tuple[str, list[int]]:
    return token_text(engine.tokenizer, engine.token_bytes(), token)


def _chat_logprobs(engine: BatchGenerator, tokens) -> dict:
    content = []
    for t in tokens:
        text, raw = _token_text(engine, t.id)
        top = []
        for tid, lp in t.top:
            ttext, traw = _token_text(engine, tid)
            top.append({"token": ttext, "logprob": lp, "bytes": traw})
        content.append({"token": text, "logprob": t.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def _completion_logprobs(engine: BatchGenerator, tokens, offset: int = 0) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text, _ = _token_text(engine, t.id)
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        top: dict[str, float] = {}
        for tid, lp in t.top:  # keyed by text: tokens with the same text keep the best logprob
            top.setdefault(_token_text(engine, tid)[0], lp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(
    models: dict[str, Any],
    *,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_context: int = DEFAULT_MAX_CONTEXT,
    prefix_cache_mb: float = DEFAULT_MB,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    shutdown_grace: float = 10.0,
    allowed_hosts: list[str] | tuple[str, ...] = (),
    allowed_origins: list[str] | tuple[str, ...] = (),
) -> FastAPI:
    """The FastAPI app serving `models` ({id: tinkerlm.LLM}); engines start and stop with the app's lifespan.

    Args:
        max_batch: KV-cache slots per model: sequences decoded together in one forward pass.
        max_queue: sequences that may wait for a slot before requests get 429.
        max_context: cap on each model's context (the KV cache holds max_batch x max_context positions per model).
        prefix_cache_mb: memory per model for the keys and values of recent prompts and answers, reused by requests
            that share a prefix (system prompts, multi-turn chats); 0 disables.
        prefill_chunk: prompt tokens prefilled per engine step while other answers decode, which bounds how long a
            burst of new prompts stalls them (0: whole prompts at once).
        shutdown_grace: seconds running requests may take to finish when the server stops.
        allowed_hosts: Host names accepted besides loopback names and IP addresses ("name", ".domain", "*").
        allowed_origins: browser origins besides this server's own that may call it ("http://host:port", "*");
            they also get CORS headers, so their pages can read the answers.
    """
    if max_batch < 1 or max_queue < 0:
        raise TinkerError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
    engines = {
        name: BatchGenerator(
            llm.model,
            llm.tokenizer,
            name=name,
            max_batch=max_batch,
            max_queue=max_queue,
            max_context=max_context,
            prefix_cache_mb=prefix_cache_mb,
            prefill_chunk=prefill_chunk,
        )
        for name, llm in models.items()
    }
    state = _State(engines, models, api_key)

    @asynccontextmanager
    async def lifespan(app):
        for e in engines.values():
            e.start()
        yield
        await begin_shutdown(0)
        await asyncio.gather(*(asyncio.to_thread(e.stop) for e in engines.values()))

    async def begin_shutdown(grace: float) -> None:
        """Refuse new work (503), let accepted sequences finish for `grace` seconds, then cancel them."""
        state.draining = True
        for e in engines.values():
            e.drain()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(e.pending() for e in engines.values()):
            await asyncio.sleep(0.05)
        for e in engines.values():
            e.cancel_all()

    app = FastAPI(title="tinkerlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tinkerlm = state
    app.state.begin_shutdown = begin_shutdown
    app.state.shutdown_grace = shutdown_grace
    if allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=["*"] if "*" in allowed_origins else [o.rstrip("/") for o in allowed_origins],
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    app.add_middleware(_TrustBoundary, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)
    app.add_middleware(_CountRequests, state=state)  # outermost: refused requests are counted too

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, metrics count it

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        status = e.status_code
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(status, message).body(), status_code=status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok", "models": list(engines)}

    @app.get("/v1/models")
    async def list_models(request: Request):
        state.check_key(request)
        return {"object": "list", "data": [_model_card(name, e, state) for name, e in engines.items()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        state.check_key(request)
        return _model_card(name, state.engine(name), state)

    @app.get(EVALUATIONS)
    async def evaluations(request: Request):
        state.check_key(request)
        return await asyncio.to_thread(_evaluations, state)  # reads manifests from disk: off the event loop

    @app.get(OPENNESS)
    async def openness(name: str, request: Request):
        state.check_key(request)
        return await asyncio.to_thread(_openness, state, name)  # reads the store and its parents: off the loop

    @app.get(CARD)
    async def card(name: str, request: Request):
        state.check_key(request)
        text = await asyncio.to_thread(_card, state, name)
        return Response(text, media_type="text/markdown; charset=utf-8")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request):
        state.check_key(request)
        return PlainTextResponse(_metrics(state), media_type="text/plain; version=0.0.4")

    async def admit(request: Request, kind):
        """The parsed request and its model's engine, once the key, body and model check out and we take work."""
        state.check_key(request)
        _check_content_type(request)
        body = await _read_body(request)
        req = await asyncio.to_thread(lambda: parse(kind, decode_json(body)))  # 8 MB of JSON takes a while
        engine = state.engine(req.model)
        if state.draining:
            raise APIError(503, "the server is shutting down", None, "shutting_down")
        return req, engine

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req, engine = await admit(request, ChatRequest)
        llm = state.llms[engine.name]
        messages = [m.to_dict() for m in req.messages]

        def prompt():  # the prompt `LLM.chat` would build, rendered and tokenized off the event loop
            p = toolcalls.plan(llm.tokenizer, messages, req.tools, req.tool_choice, req.parallel_tool_calls)
            return p, llm.chat_ids(p.messages, tools=p.tools)

        try:
            plan, ids = await asyncio.to_thread(prompt)
        except TinkerError as e:
            if getattr(e, "param", None):  # a tool field (parse checked them already)
                raise APIError(400, str(e), e.param, "invalid_value") from None
            raise APIError(400, f"{e} (for plain text use /v1/completions)", "messages") from None
        budget = _budget(engine, len(ids), req.max_completion_tokens or req.max_tokens, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        await _token_table(engine, req, plan.schema is not None)
        overrides = {"json_schema": plan.schema} if plan.schema is not None else None
        run = _start(engine, [ids], req, [budget], state.defaults(engine), overrides)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # Calls are parsed unless a JSON answer was asked for (response_format) instead of a call.
        answer_format = req.response_format is not None and req.response_format.type != "text"
        parse_calls = plan.names is not None and (plan.schema is not None or not answer_format)
        if req.stream:
            parsers = {i: plan.parser() for i in range(req.n)} if parse_calls else None
            return await _stream(
                request,
                run,
                lambda ev: _chat_chunks(engine, req, rid, created, ev, parsers),
                _chat_head(req, rid, created),
                len(ids),
                req,
                rid,
                created,
                "chat.completion.chunk",
            )
        texts, tokens, reasons = await _collect(request, run)
        choices = []
        for i in range(len(texts)):
            message = {"role": "assistant", "content": texts[i]}
            if parse_calls:
                content, calls = toolcalls.parse_calls(texts[i], plan.names, plan.parallel)
                if calls:
                    message = {
                        "role": "assistant",
                        "content": content,
                        "tool_calls": list(map(toolcalls.openai_call, calls)),
                    }
                    reasons[i] = "tool_calls" if reasons[i] == "stop" else reasons[i]
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": _chat_logprobs(engine, tokens[i]) if logprobs is not None else None,
                    "finish_reason": reasons[i],
                }
            )
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": choices,
            "usage": run.usage(len(ids)),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        req, engine = await admit(request, CompletionRequest)
        if isinstance(req.prompt, str) or isinstance(req.prompt[0], str):
            # In a worker thread, through encode_batch: the tokenizers library releases the GIL there (not in
            # encode), so a megabyte prompt does not stall the other requests.
            texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
            prompts = await asyncio.to_thread(engine.tokenizer.encode_batch, texts)
        else:
            bad = [t for t in req.prompt if not 0 <= t < engine.vocab]
            if bad:
                raise APIError(
                    400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {engine.vocab})", "prompt"
                )
            prompts = [list(req.prompt)]
        budgets = [_budget(engine, len(p), req.max_tokens, "prompt") for p in prompts]
        n_prompt = sum(len(p) for p in prompts)
        await _token_table(engine, req)
        run = _start(engine, prompts, req, budgets, state.defaults(engine))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return await _stream(
                request,
                run,
                lambda ev: _completion_chunks(engine, req, rid, created, ev),
                [],
                n_prompt,
                req,
                rid,
                created,
                "text_completion",
            )
        texts, tokens, reasons = await _collect(request, run)
        choices = [
            {
                "index": i,
                "text": texts[i],
                "logprobs": _completion_logprobs(engine, tokens[i]) if req.logprobs is not None else None,
                "finish_reason": reasons[i],
            }
            for i in range(len(texts))
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": choices,
            "usage": run.usage(n_prompt),
        }

    return app


def _model_card(name: str, engine: BatchGenerator, state: _State) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": state.started,
        "owned_by": "tinkerlm",
        "context_length": engine.context,
    }


def _evaluations(state: _State) -> dict:
    """The stored scores of the served models, then of the other stored models that have any.

    Read from the manifests at each request, so scores `tinkerlm eval` stores while the server runs appear. A served
    model whose stored copy was replaced since it was loaded (another digest) keeps the scores it was loaded with.
    Each entry: {"id" (the served id, or the store ref), "ref" (None for a model served from a path), "served",
    "sha256", "architecture", "quantization", "evaluations": {task: {"metrics", "main", "higher_is_better", "n",
    "shots", "limit", "chat", "seed", "quant", "created", "tinkerlm"}}}.
    """
    from tinkerlm import store

    def entry(id_: str, m, served: bool) -> dict:
        return {
            "id": id_,
            "ref": m.ref if m else None,
            "served": served,
            "sha256": store.digest(m) if m else None,
            "architecture": m.architecture if m else None,
            "quantization": m.quantization if m else None,
            "evaluations": dict(m.evaluations) if m else {},
        }

    out, seen = [], set()
    for name in state.engines:
        loaded = state.llms[name].manifest
        m = loaded
        if loaded is not None:
            try:
                now = store.find(loaded.ref)
            except TinkerError:
                now = None
            if now is not None and store.digest(now) == store.digest(loaded):
                m = now
            seen.add(loaded.ref)
        out.append(entry(name, m, True))
    try:
        stored = store.list_models()
    except (OSError, TinkerError) as e:
        log.warning("evaluations: cannot list the store (%s)", e)
        stored = []
    out += [entry(m.ref, m, False) for m in stored if m.evaluations and m.ref not in seen]
    return {"object": "list", "data": out}


def _stored_ref(state: _State, name: str) -> str:
    """The store ref of `name`: a served model (its id or store ref), else any stored model (the parents in a
    lineage graph are viewable too). Raises APIError 404 for a model served from a path or not in the store."""
    from tinkerlm import store

    engine = state.aliases.get(name)
    if engine is not None:
        m = state.llms[engine.name].manifest
        if m is None:
            raise APIError(
                404,
                f"The model '{name}' is served from a path, not from the store: it has no stored licence or lineage "
                "(pull it into the store with `tinkerlm pull PATH` and serve it by name)",
                "model",
                "model_not_stored",
            )
        return m.ref
    try:
        m = store.find(name)
    except TinkerError:  # not a valid store name
        m = None
    if m is None:
        raise APIError(
            404,
            f"The model '{name}' is not in the store; served models: {', '.join(state.engines)}",
            "model",
            "model_not_found",
        )
    return m.ref


def _openness(state: _State, name: str) -> dict:
    """`tinkerlm.openness.assess(ref).to_json()` for the served or stored model `name`."""
    from tinkerlm.openness import assess

    ref = _stored_ref(state, name)
    try:
        return assess(ref).to_json()
    except TinkerError as e:  # a manifest unreadable or changed under us: say which, as the CLI would
        raise APIError(500, f"openness of {ref}: {e}", None, "openness_failed") from None


def _card(state: _State, name: str) -> str:
    """The model card (README.md text) of the served or stored model `name`, as `tinkerlm card` writes it."""
    from tinkerlm.export.card import store_card

    ref = _stored_ref(state, name)
    d = _openness(state, ref)
    try:
        return store_card(ref, openness=d)
    except TinkerError as e:
        raise APIError(500, f"model card of {ref}: {e}", None, "card_failed") from None


async def _collect(request: Request, run: _Run):
    """Wait for all choices; returns texts, token infos and finish reasons by choice index."""
    n = len(run.seqs)
    texts, tokens, reasons = [""] * n, [[] for _ in range(n)], [None] * n
    while not run.done:
        ev = await run.next(request)
        texts[ev.index] += ev.text
        tokens[ev.index] += ev.tokens
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    return texts, tokens, reasons


async def _stream(
    request: Request, run: _Run, chunks, head: list, n_prompt: int, req, rid: str, created: int, obj: str
):
    """An SSE response. The first event is awaited before answering, so errors up to then get their status."""
    first = await run.next(request)
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    async def body():
        try:
            for c in head:
                yield _sse(c | ({"usage": None} if include_usage else {}))
            ev = first
            while True:
                for c in chunks(ev):
                    yield _sse(c | ({"usage": None} if include_usage else {}))
                if run.done:
                    break
                try:
                    ev = await run.next()
                except APIError as e:
                    yield _sse(e.body())
                    return
            if include_usage:
                yield _sse(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": req.model,
                        "choices": [],
                        "usage": run.usage(n_prompt),
                    }
                )
            yield "data: [DONE]\n\n"
        finally:
            run.cancel()  # the client went away (or we are done): free the slots now

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _chat_head(req, rid, created) -> list[dict]:
    return [
        {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
        for i in range(req.n)
    ]


def _chat_chunks(engine, req, rid, created, ev: Event, parsers: dict | None = None) -> list[dict]:
    """The chunks of one event. With `parsers` ({choice: toolcalls.CallParser}), text that may be a tool call is
    held back, and each call goes out whole, once parsed, as one `delta.tool_calls` entry."""
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    out = []
    text, calls, reason = ev.text, [], ev.finish_reason
    parser = parsers.get(ev.index) if parsers else None
    if parser is not None:
        text, calls = parser.feed(ev.text)
        if ev.finish_reason:
            more, rest = parser.finish()
            text, calls = text + more, calls + rest
            if parser.calls and reason == "stop":
                reason = "tool_calls"
    if text or ev.tokens:
        lp = _chat_logprobs(engine, ev.tokens) if req.logprobs else None
        out.append(
            base | {"choices": [{"index": ev.index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}]}
        )
    for j, c in enumerate(calls):  # the calls just parsed are the parser's last ones
        k = len(parser.calls) - len(calls) + j
        delta = {"tool_calls": [{"index": k, **toolcalls.openai_call(c)}]}
        out.append(base | {"choices": [{"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": None}]})
    if reason:
        out.append(base | {"choices": [{"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": reason}]})
    return out


def _completion_chunks(engine, req, rid, created, ev: Event) -> list[dict]:
    if not (ev.text or ev.tokens or ev.finish_reason):
        return []
    lp = _completion_logprobs(engine, ev.tokens) if req.logprobs is not None else None
    return [
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [{"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}],
        }
    ]


def _metrics(state: _State) -> str:
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric(
        "tinkerlm_http_requests_total",
        "counter",
        "HTTP responses by path and status",
        [(f'{{path="{p}",status="{s}"}}', n) for (p, s), n in sorted(state.requests.items())],
    )
    per_model = [
        (
            "tinkerlm_prompt_tokens_total",
            "counter",
            "prompt tokens (prefilled, or reused from the prefix cache)",
            lambda e: e.stats["prompt_tokens"],
        ),
        ("tinkerlm_generation_tokens_total", "counter", "tokens generated", lambda e: e.stats["generation_tokens"]),
        ("tinkerlm_decode_steps_total", "counter", "batched decode forward passes", lambda e: e.stats["decode_steps"]),
        (
            "tinkerlm_decode_rows_total",
            "counter",
            "sequences summed over decode steps (rows/steps = mean batch)",
            lambda e: e.stats["decode_rows"],
        ),
        ("tinkerlm_sequences_finished_total", "counter", "sequences that finished", lambda e: e.stats["finished"]),
        (
            "tinkerlm_sequences_cancelled_total",
            "counter",
            "sequences cancelled (client gone, shutdown)",
            lambda e: e.stats["cancelled"],
        ),
        (
            "tinkerlm_time_to_first_token_seconds_sum",
            "counter",
            "total queue+prefill time to first token",
            lambda e: round(e.stats["ttft_sum"], 6),
        ),
        (
            "tinkerlm_time_to_first_token_seconds_count",
            "counter",
            "sequences with a first token",
            lambda e: e.stats["ttft_count"],
        ),
        ("tinkerlm_slots_busy", "gauge", "KV-cache slots in use", lambda e: e.busy_slots()),
        ("tinkerlm_slots_total", "gauge", "KV-cache slots", lambda e: e.max_batch),
        ("tinkerlm_queue_waiting", "gauge", "sequences waiting for a slot", lambda e: len(e.waiting)),
        (
            "tinkerlm_prefix_cache_hits_total",
            "counter",
            "prefills that started from a cached prefix",
            lambda e: e.prefix_cache.stats["hits"],
        ),
        (
            "tinkerlm_prefix_cache_misses_total",
            "counter",
            "prefills with no cached prefix",
            lambda e: e.prefix_cache.stats["misses"],
        ),
        (
            "tinkerlm_prefix_cache_reused_tokens_total",
            "counter",
            "prompt tokens whose keys and values came from the prefix cache instead of a prefill",
            lambda e: e.prefix_cache.stats["tokens_reused"],
        ),
        (
            "tinkerlm_prefix_cache_evictions_total",
            "counter",
            "prefix-cache blocks evicted (least recently used first)",
            lambda e: e.prefix_cache.stats["evictions"],
        ),
        ("tinkerlm_prefix_cache_bytes", "gauge", "memory held by the prefix cache", lambda e: e.prefix_cache.bytes),
        ("tinkerlm_prefix_cache_budget_bytes", "gauge", "the prefix cache's budget", lambda e: e.prefix_cache.budget),
    ]
    for name, kind, help_, get in per_model:
        metric(name, kind, help_, [(f'{{model="{m}"}}', get(e)) for m, e in state.engines.items()])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# `tinkerlm serve`


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def read_api_key(path: str) -> str:
    """The API key in file `path` (its only word; surrounding whitespace and the final newline are dropped)."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise TinkerError(f"api_key_file: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not key or any(c.isspace() for c in key):
        raise TinkerError(f"api_key_file: {path} must hold the key alone, on one line")
    return key


def _names(value: list[str] | str | None) -> list[str]:
    """A list of host names or origins from a list or a comma-separated string."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [v.strip() for v in items if v.strip()]


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """A uvicorn server whose shutdown first drains the engines (503 for new work, grace for running work)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await app.state.begin_shutdown(app.state.shutdown_grace)
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            # As uvicorn's, but without re-raising the signal afterwards: a drained shutdown exits with status 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, access_log=False
    )
    return Server(config)


def serve(
    models: list[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    api_key_file: str | None = None,
    allowed_hosts: list[str] | str | None = None,
    allowed_origins: list[str] | str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    dtype: str = "float32",
    quant: str = "native",
    threads: int | None = None,
    max_context: int = DEFAULT_MAX_CONTEXT,
    prefix_cache_mb: float = DEFAULT_MB,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    kv_cache: str = "f32",
) -> None:
    """Load `models` and serve them until Ctrl-C / SIGTERM (then running requests get a grace period).

    The API key comes from `api_key`, else the first line of `api_key_file`, else $TINKERLM_API_KEY (a file or
    the environment keep it out of `ps`). `allowed_hosts` / `allowed_origins` (lists or comma-separated) widen
    the Host and Origin checks, see `create_app`.
    """
    import tinkerlm

    if api_key and api_key_file:
        raise TinkerError("serve: give --api-key or --api-key-file, not both")
    if api_key_file:
        api_key = read_api_key(api_key_file)
    api_key = api_key or os.environ.get("TINKERLM_API_KEY") or None
    allowed_hosts, allowed_origins = _names(allowed_hosts), _names(allowed_origins)
    bad = [o for o in allowed_origins if o != "*" and not o.startswith(("http://", "https://"))]
    if bad:
        raise TinkerError(f"allowed_origins: {bad[0]!r} is not an origin (write it as http://host:port, or *)")
    if host not in ("0.0.0.0", "::", ""):  # the name the server was told to bind is one its clients use
        allowed_hosts.append(host)
    if not models:
        raise TinkerError("serve: give at least one model")
    check_kv_cache(kv_cache)  # before loading anything
    if prefill_chunk < 0:
        raise TinkerError(f"prefill_chunk: {prefill_chunk} must be >= 0 (0 prefills whole prompts)")
    if len(set(models)) != len(models):
        raise TinkerError("serve: a model is named twice")
    if not 0 < port < 65536:
        raise TinkerError(f"port: {port} is not in 1..65535")
    if not _is_loopback(host) and not api_key:
        bar = "!" * 100
        print(
            f"{bar}\nWARNING: serving on {host} WITHOUT an API key: anyone who can reach this machine can use "
            f"the models.\nSet TINKERLM_API_KEY or pass --api-key-file PATH, or bind 127.0.0.1.\n{bar}",
            file=sys.stderr,
            flush=True,
        )
    llms = {}
    for name in models:
        print(f"tinkerlm: loading {name} ...", file=sys.stderr, flush=True)
        # The engines keep their own prefix cache; the LLM's would stay empty.
        llms[name] = tinkerlm.load(
            name, dtype=dtype, quant=quant, threads=threads, prefix_cache_mb=0, kv_cache=kv_cache
        )
        # A cached model's tokenizer is built on first use: now, not in the first request.
        llms[name].tokenizer.encode("warm up")
    app = create_app(
        llms,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        max_context=max_context,
        prefix_cache_mb=prefix_cache_mb,
        prefill_chunk=prefill_chunk,
        allowed_hosts=allowed_hosts,
        allowed_origins=allowed_origins,
    )
    for name, e in app.state.tinkerlm.engines.items():
        mib = e.cache.nbytes / 2**20
        print(
            f"tinkerlm: {name}: {max_batch} slots x {e.context} tokens of KV cache ({mib:.0f} MiB)",
            file=sys.stderr,
            flush=True,
        )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"tinkerlm: serving {', '.join(models)} at http://{shown}:{port}/ (OpenAI API under /v1)",
        file=sys.stderr,
        flush=True,
    )
    make_server(app, host, port).run()
