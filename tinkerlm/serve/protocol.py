"""Request validation and error shapes of the OpenAI-compatible API.

Requests are pydantic models with `extra="forbid"`, so a field this server does not implement is refused with a
400 naming it rather than silently ignored. Field names, ranges and defaults follow the OpenAI API reference
(https://platform.openai.com/docs/api-reference/chat/create and /completions/create); `top_k`, `min_p` and
`repetition_penalty` are tinkerlm extensions that mirror the `tinkerlm run` flags.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_TYPE_TAGS = {"str", "int", "float", "bool"}  # pydantic names union members in error locations; not fields


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: "1" is not a number, 1.5 not an int


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object"]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own records; it never changes the output

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", "stop")
        return [s for s in stops if s]


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    response_format: ResponseFormat | None = None  # tinkerlm extension: JSON mode for plain completions too


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
        param = ".".join(str(p) for p in err["loc"] if p not in _TYPE_TAGS and "[" not in str(p)) or None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unsupported parameter: '{param}' is not supported by this server",
                           param, "unsupported_parameter") from None
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
    req.stops()
    return req
