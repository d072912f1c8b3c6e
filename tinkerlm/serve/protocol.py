"""Request validation and error shapes of the OpenAI-compatible API.

Requests are pydantic models with `extra="forbid"`, so a field this server does not implement is refused with a
400 naming it rather than silently ignored. The generation fields are derived from the one declaration,
`tinkerlm.sampling.SamplingParams` (names, types, ranges, defaults); `OPENAI`, `CHAT` and `COMPLETION` below list
where the OpenAI API reference (https://platform.openai.com/docs/api-reference/chat/create and /completions/create)
spells or bounds an option differently. `top_k`, `min_p` and `repetition_penalty` are tinkerlm extensions that
mirror the `tinkerlm run` flags; `response_format` on /v1/completions is one too.

Bodies come from untrusted clients, so `decode_json` refuses what Python's json module would accept but the rest
of the server cannot take (RFC 8259 requires UTF-8; NaN and Infinity are not JSON; lone UTF-16 surrogates cannot
be encoded; nesting deeper than limits.MAX_JSON_DEPTH would recurse in the parser and validator), each with a 400.
"""

from __future__ import annotations

import json
import math
import re
import typing
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from tinkerlm import limits, sampling

_TYPE_TAGS = {"str", "int", "float", "bool"}  # pydantic names union members in error locations; not fields


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: "1" is not a number, 1.5 not an int


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    """OpenAI's `response_format.json_schema`: {"name", "schema", "strict", "description"}. The schema is enforced
    whatever `strict` says (jsonschema.py); one we cannot enforce is refused (see `parse`)."""

    name: str = Field("response", max_length=64)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    """A chat message. Tool turns (tinkerlm.toolcalls checks them): an assistant message may carry `tool_calls`
    (content null), a `tool` message answers one with `tool_call_id`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    name: str | None = None  # the participant's name; passed to the template (most ignore it)
    refusal: str | None = None  # an earlier assistant refusal, as OpenAI returns it; not rendered

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def to_dict(self) -> dict[str, Any]:
        # "developer" is the newer name of the system role; templates know "system".
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


# Where OpenAI differs from the declaration: {declared name: (type, Field overrides)}. The field keeps the declared
# name unless the declaration gives an API name (json -> response_format).
OPENAI: dict[str, tuple[Any, dict]] = {
    "temperature": (float, dict(default=1.0, le=2)),  # OpenAI samples by default; its range is [0, 2]
    "max_tokens": (int | None, dict(default=None)),  # None: the rest of the context
    "stop": (str | list[str] | None, dict(default=None)),  # one string or a list (at most 4, see stops())
    "json": (ResponseFormat | None, dict(default=None)),  # {"type": "json_object"}
    "json_schema": (ResponseFormat | None, dict(default=None)),  # {"type": "json_schema", "json_schema": {...}}
}
# Chat: `logprobs: true` plus `top_logprobs: k` (see `params`); completions: `logprobs: k` with k <= 5.
CHAT = {**OPENAI, "logprobs": (bool, dict(default=False, ge=None, le=None))}
COMPLETION = {**OPENAI, "logprobs": (int | None, dict(default=None, le=5))}


def _fields(overrides: dict[str, tuple[Any, dict]]) -> dict[str, tuple[Any, Any]]:
    """pydantic field definitions for every declared option, with `overrides` applied."""
    hints = typing.get_type_hints(sampling.SamplingParams)
    out = {}
    for name, (f, p) in sampling.params().items():
        typ, over = overrides.get(name, (hints[name], {}))
        kw = {"default": sampling.default(f), "ge": p.ge, "gt": p.gt, "le": p.le, "description": p.help}
        kw.update(over)
        out[p.api or name] = (typ, Field(**{k: v for k, v in kw.items() if v is not None or k == "default"}))
    return out


class _Sampling(_Strict):
    """Fields shared by both endpoints besides the declared options."""

    model: str
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own records; it never changes the output

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", "stop")
        # The detokenizer holds back any tail that could begin a stop string, at a cost quadratic in its length.
        if any(len(s) > limits.MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop: a stop sequence is longer than {limits.MAX_STOP_CHARS} characters", "stop")
        return [s for s in stops if s]


_MAX_TOKENS, _LOGPROBS = sampling.params()["max_tokens"][1], sampling.params()["logprobs"][1]


class _Chat(_Sampling):
    messages: list[Message] = Field(min_length=1)
    # Checked by tinkerlm.toolcalls (one checker for the server and the Python API), see `parse`.
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(None, ge=_MAX_TOKENS.ge)  # OpenAI's newer name of max_tokens
    top_logprobs: int | None = Field(None, ge=_LOGPROBS.ge, le=_LOGPROBS.le)  # chat's spelling of logprobs: k


class _Completion(_Sampling):
    prompt: str | list[str] | list[int]


ChatRequest = create_model("ChatRequest", __base__=_Chat, **_fields(CHAT))
CompletionRequest = create_model("CompletionRequest", __base__=_Completion, **_fields(COMPLETION))


def params(req, defaults: dict[str, Any]) -> dict[str, Any]:
    """`SamplingParams` keyword arguments for a request (max_tokens aside: the server budgets it per prompt).

    A field the request sets wins; else the model's generation_config.json default (`defaults`); else the
    request model's (OpenAI's) default.
    """
    out = {}
    for name, (_, p) in sampling.params().items():
        if name == "max_tokens":
            continue
        api = p.api or name
        value = getattr(req, api)
        if api not in req.model_fields_set and name in defaults:
            value = defaults[name]
        elif name == "stop":
            value = req.stops()
        elif name == "json":
            value = value is not None and value.type == "json_object"
        elif name == "json_schema":
            value = value.json_schema.schema_ if value is not None and value.type == "json_schema" else None
        elif name == "logprobs" and isinstance(req, ChatRequest):
            value = (req.top_logprobs or 0) if req.logprobs else None
        out[name] = value
    return out


def parse(cls: type[_Strict], body: Any) -> _Strict:
    """Validate a decoded JSON body; any problem becomes an APIError(400) naming the offending field.

    A top-level key set to null counts as not given (clients send `"logit_bias": null`), so only keys with a
    value are refused as unsupported.
    """
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param([p for p in err["loc"] if p not in _TYPE_TAGS and "[" not in str(p)])
        if err["type"] == "extra_forbidden":
            raise APIError(
                400, f"Unsupported parameter: '{param}' is not supported by this server", param, "unsupported_parameter"
            ) from None
        if err["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'", param, "missing_required_parameter") from None
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}", param, "invalid_value") from None
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
    if isinstance(req, CompletionRequest) and not req.prompt:
        raise APIError(400, "prompt: empty list", "prompt")
    _check_response_format(req.response_format)
    if isinstance(req, ChatRequest):
        _check_tools(req)
    req.stops()
    return req


def _param(loc: list) -> str | None:
    """A field's location as OpenAI spells it: `messages[0].content`."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if out else str(p)
    return out or None


def _check_tools(req) -> None:
    """`tools`, `tool_choice` and the tool turns of `messages` (tinkerlm.toolcalls), 400 naming the field."""
    from tinkerlm import toolcalls
    from tinkerlm.errors import TinkerError

    try:
        functions = toolcalls.check_tools(req.tools)
        choice = toolcalls.check_choice(req.tool_choice, functions)
        toolcalls.check_messages([m.to_dict() for m in req.messages])
    except TinkerError as e:
        raise APIError(400, str(e), getattr(e, "param", None), "invalid_value") from None
    if choice not in ("none", "auto") and req.response_format is not None and req.response_format.type != "text":
        raise APIError(
            400, "response_format: a required tool call is JSON already; leave out response_format", "response_format"
        )


def _check_response_format(fmt: ResponseFormat | None) -> None:
    """`json_schema` goes with type "json_schema" only, and its schema must be one we can enforce (400 naming the
    keyword and where it is otherwise, never a schema silently ignored)."""
    if fmt is None:
        return
    if fmt.type != "json_schema":
        if fmt.json_schema is not None:
            raise APIError(400, "response_format.json_schema needs type 'json_schema'", "response_format.json_schema")
        return
    if fmt.json_schema is None:
        raise APIError(400, "Missing required parameter: 'response_format.json_schema'", "response_format.json_schema")
    from tinkerlm.errors import TinkerError
    from tinkerlm.jsonschema import compile_schema

    try:
        compile_schema(fmt.json_schema.schema_)
    except TinkerError as e:
        raise APIError(400, str(e), "response_format.json_schema.schema", "invalid_value") from None


# ----------------------------------------------------------------------------------------------------------------
# Decoding bodies

# A JSON string literal, escapes included; an unterminated one runs to the end (else each later quote would rescan
# the rest of the body: quadratic).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # the only way a surrogate gets into decoded UTF-8 JSON


def _depth(body: bytes) -> int:
    """Deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count)."""
    brackets = np.frombuffer(_STRING.sub(b"", body).translate(None, _NOT_BRACKET), np.uint8)
    if not brackets.size:
        return 0
    opens = (brackets == ord("[")) | (brackets == ord("{"))
    return int(np.cumsum(np.where(opens, 1, -1)).max())


def _constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def decode_json(body: bytes) -> Any:
    """A request body as a Python value, or an APIError(400) saying what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start}); send JSON encoded as UTF-8") from None
    if _depth(body) > limits.MAX_JSON_DEPTH:
        raise APIError(400, f"request body: JSON nested deeper than {limits.MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_finite)
    except RecursionError:
        raise APIError(400, f"request body: JSON nested deeper than {limits.MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers beyond Python's digit limit
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(
                400, "request body: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode"
            ) from None
    return value
