"""Tool calling, OpenAI style (`tools`, `tool_choice` in /v1/chat/completions, `LLM.chat(tools=...)`).

Three parts, shared by the server and the Python API:

- Checking: tool definitions, `tool_choice` and the tool turns of a conversation (assistant `tool_calls`, `role:
  tool` results), each problem a TinkerError whose `param` names the field (`tools[0].function.name`); a parameter
  schema the decoder could not enforce is refused with its keyword named (`jsonschema.compile_schema`).
- Rendering (`plan`): a chat template that reads `tools` gets them (OpenAI's list of {"type": "function", "function":
  {...}}) and the tool turns as they are, with each call's `arguments` decoded to an object (as transformers'
  templates expect). A template that does not (SmolLM2's) gets the Hermes convention (NousResearch Hermes 2 Pro,
  Qwen2.5's template text): the tools described in the system message, calls written as `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>` in the assistant's text, results as `<tool_response>...</tool_response>` in a user
  turn (every template takes the user role; consecutive results share one turn, so user/assistant alternation holds).
- Parsing (`CallParser`): calls in the output, in the formats the common templates teach: Hermes `<tool_call>` JSON
  (Qwen2.5/3 too), Llama 3.1 JSON (`{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`, several
  separated by `;`) and a plain JSON object (or list) of {"name", "arguments"}. JSON without tags counts only when it
  is the whole answer and names a declared tool; anything else stays content. The parser is incremental, so a stream
  never shows `<tool_call>` text as content: text that may start a call is held back until it is known.

`tool_choice`: "none" renders no tools and parses nothing (past tool turns still render); "auto" (the default with
tools) renders them, samples freely and parses; "required" and {"type": "function", "function": {"name"}} constrain
decoding to one call, a JSON object {"name": ..., "arguments": ...} valid for the function's parameter schema
(`call_schema`, enforced by jsonschema.py), which is returned as the call.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from tinkerlm import chat as chat_mod
from tinkerlm.errors import TinkerError

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit
CHOICES = ("none", "auto", "required")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
# Answers starting like this may be a JSON call (Llama 3.1 or plain): a stream holds them back until the end.
JSON_STARTS = ("{", "[", PYTHON_TAG, "```")
SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def _fail(param: str, msg: str) -> TinkerError:
    e = TinkerError(f"{param}: {msg}")
    e.param = param  # the server answers 400 naming this field
    return e


# ----------------------------------------------------------------------------------------------------------------
# Checking


def check_tools(tools: Any) -> list[dict]:
    """The functions of OpenAI's `tools` list ({"name", "description", "parameters"}; parameters defaulting to an
    object without properties). Raises TinkerError (with `param`) for anything malformed or not enforceable."""
    from tinkerlm.jsonschema import compile_schema

    if tools is None:
        return []
    if not isinstance(tools, list) or not tools:
        raise _fail("tools", "give a non-empty list of {'type': 'function', 'function': {...}} (or leave tools out)")
    if len(tools) > MAX_TOOLS:
        raise _fail("tools", f"{len(tools)} tools, above the limit of {MAX_TOOLS}")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _fail(at, "each tool must be an object {'type': 'function', 'function': {...}}")
        for key in tool:
            if key not in ("type", "function"):
                raise _fail(f"{at}.{key}", "is not supported (a tool has 'type' and 'function')")
        if tool.get("type") != "function":
            raise _fail(f"{at}.type", "must be 'function' (the only tool type)")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _fail(f"{at}.function", "missing: give {'name': ..., 'parameters': {...}}")
        for key in fn:
            if key not in ("name", "description", "parameters", "strict"):
                raise _fail(f"{at}.function.{key}", "is not supported (name, description, parameters, strict)")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            what = "missing" if name is None else f"{name!r} is not"
            raise _fail(f"{at}.function.name", f"{what} a function name (1-64 of a-z, A-Z, 0-9, _ and -)")
        if name in seen:
            raise _fail(f"{at}.function.name", f"'{name}' names two tools")
        seen.add(name)
        if not isinstance(fn.get("description") or "", str):
            raise _fail(f"{at}.function.description", "must be a string")
        if fn.get("strict") not in (None, True, False):
            raise _fail(f"{at}.function.strict", "must be true or false")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict) or params.get("type") != "object":
            raise _fail(f"{at}.function.parameters", 'must be a JSON schema with "type": "object"')
        try:
            compile_schema(params)
        except TinkerError as e:
            raise _fail(f"{at}.function.parameters", str(e).removeprefix("json_schema: ")) from None
        described = {"description": fn["description"]} if fn.get("description") is not None else {}
        out.append({"name": name, **described, "parameters": params})
    return out


def check_choice(tool_choice: Any, functions: list[dict]) -> str | dict:
    """ "none", "auto", "required" or the function dict it names. Default: "auto" with tools, else "none"."""
    if tool_choice is None:
        return "auto" if functions else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise _fail("tool_choice", f"'{tool_choice}' is not one of {', '.join(CHOICES)} or a function")
        if tool_choice != "none" and not functions:
            raise _fail("tool_choice", f"'{tool_choice}' needs tools")
        return tool_choice
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function":
        raise _fail("tool_choice", "give 'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}")
    for key in tool_choice:
        if key not in ("type", "function"):
            raise _fail(f"tool_choice.{key}", "is not supported")
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise _fail("tool_choice.function.name", "missing: name the function to call")
    for f in functions:
        if f["name"] == name:
            return f
    have = ", ".join(f["name"] for f in functions) or "none"
    raise _fail("tool_choice.function.name", f"'{name}' is not a tool of this request (tools: {have})")


def check_messages(messages: list[dict]) -> None:
    """The tool turns of a conversation: `tool_calls` only on assistant messages (each {"id", "type": "function",
    "function": {"name", "arguments": a JSON object as text}}), `role: tool` with a `tool_call_id`."""
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        calls = m.get("tool_calls")
        if m.get("role") == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise _fail(f"{at}.tool_call_id", "missing: a tool result names the call it answers")
        if m.get("role") != "tool" and m.get("tool_call_id") is not None:
            raise _fail(f"{at}.tool_call_id", "only a message with role 'tool' has one")
        if calls is None:
            if m.get("content") is None:
                raise _fail(f"{at}.content", "missing (only an assistant message with tool_calls may leave it out)")
            continue
        if m.get("role") != "assistant":
            raise _fail(f"{at}.tool_calls", "only an assistant message has tool calls")
        if not isinstance(calls, list):
            raise _fail(f"{at}.tool_calls", "must be a list")
        for j, c in enumerate(calls):
            where = f"{at}.tool_calls[{j}]"
            if not isinstance(c, dict) or not isinstance(c.get("id"), str) or c.get("type", "function") != "function":
                raise _fail(where, "give {'id': ..., 'type': 'function', 'function': {'name', 'arguments'}}")
            fn = c.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _fail(f"{where}.function.name", "missing")
            _arguments(fn.get("arguments"), f"{where}.function.arguments")


def _arguments(value: Any, where: str) -> dict:
    """A call's arguments as an object: OpenAI sends a JSON string; a dict is taken as it is."""
    if isinstance(value, dict):
        return value
    try:
        args = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise _fail(where, "must be a JSON object, as text")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Rendering and decoding


@dataclass
class Plan:
    """How one request renders and decodes.

    messages: the conversation for the chat template. tools: the template's `tools` variable (None: not passed).
    schema: the JSON schema decoding is constrained to (required or named function), else None.
    names: the function names a call may have (None: the output is not parsed for calls).
    parallel: more than one call may be returned.
    """

    messages: list[dict]
    tools: list[dict] | None
    schema: dict | None
    names: tuple[str, ...] | None
    parallel: bool = True

    def parser(self) -> CallParser | None:
        return None if self.names is None else CallParser(self.names, self.parallel)


def plan(tokenizer, messages: list[dict], tools=None, tool_choice=None, parallel_tool_calls: bool = True) -> Plan:
    """Check `tools`, `tool_choice` and the tool turns of `messages`, and decide how to render and decode them.

    Raises:
        TinkerError: with `param`, the field at fault.
    """
    functions = check_tools(tools)
    choice = check_choice(tool_choice, functions)
    check_messages(messages)
    shown = functions if choice != "none" else []
    if "tools" in chat_mod.template_variables(tokenizer):
        rendered = [_native(m) for m in messages]
        variable = [{"type": "function", "function": f} for f in shown] or None
    else:
        rendered, variable = _hermes(messages, shown), None
    return Plan(
        rendered,
        variable,
        call_schema(functions if choice == "required" else [choice]) if choice not in ("none", "auto") else None,
        tuple(f["name"] for f in functions) if choice != "none" else None,
        parallel_tool_calls and choice == "auto",
    )


def call_schema(functions: list[dict]) -> dict:
    """The JSON schema of one call to any of `functions`: {"name": const, "arguments": its parameters}.

    A `$ref` resolves against the root, so each function's `$defs` move to the root under "NAME-" prefixes, and
    its refs (`#` included: its parameters) are rewritten to match."""
    defs: dict[str, Any] = {}
    alts = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": _hoist(f["parameters"], f["name"], defs)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = alts[0] if len(alts) == 1 else {"anyOf": alts}
    return {**schema, "$defs": defs} if defs else schema


def _hoist(params: dict, prefix: str, defs: dict) -> dict:
    """`params` without its root `$defs`, which go into `defs` as `prefix-NAME` (itself as `prefix`), refs rewritten."""

    def ref(target: str) -> str:
        if target == "#":
            return f"#/$defs/{prefix}"
        parts = target.split("/")
        if len(parts) == 3 and parts[0] == "#" and parts[1] in ("$defs", "definitions"):
            return f"#/$defs/{prefix}-{parts[2]}"
        return target  # not one we resolve: compile_schema refused it already

    def walk(x):
        if isinstance(x, dict):
            return {k: ref(v) if k == "$ref" and isinstance(v, str) else walk(v) for k, v in x.items()}
        return [walk(v) for v in x] if isinstance(x, list) else x

    if "$ref" not in json.dumps(params):
        return params
    body = walk({k: v for k, v in params.items() if k not in ("$defs", "definitions")})
    for key in ("$defs", "definitions"):
        for name, sub in (params.get(key) or {}).items():
            defs[f"{prefix}-{name}"] = walk(sub)
    defs[prefix] = body
    return body


def _native(m: dict) -> dict:
    """A message for a template that knows tools: arguments as objects (transformers' templates `tojson` them)."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        fn = c["function"]
        calls.append({**c, "type": "function", "function": {**fn, "arguments": _arguments(fn["arguments"], "")}})
    return {**m, "tool_calls": calls}


def call_text(name: str, arguments: dict) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def _hermes(messages: list[dict], functions: list[dict]) -> list[dict]:
    """The conversation in the Hermes convention, for a template that does not read `tools`."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_response"):  # results of one turn's calls share a user turn
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text, "tool_response": True})
        elif m.get("tool_calls"):
            calls = [
                call_text(c["function"]["name"], _arguments(c["function"]["arguments"], "")) for c in m["tool_calls"]
            ]
            text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if functions:
        lines = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
        described = SYSTEM.format(tools=lines)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def new_id() -> str:
    return "call_" + secrets.token_hex(12)


def openai_call(call: dict) -> dict:
    """{"name", "arguments": dict} as OpenAI's tool call: an id, type "function", arguments as JSON text."""
    return {
        "id": new_id(),
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
    }


def _as_call(obj: Any, names: tuple[str, ...] | None) -> dict | None:
    """{"name", "arguments"} from a parsed object in any of the formats, or None if it is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if set(obj) - {"name", "arguments", "parameters", "type"} or obj.get("type", "function") != "function":
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):  # some models write the arguments as JSON text, as OpenAI's API does
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict) or (names is not None and obj["name"] not in names):
        return None
    return {"name": obj["name"], "arguments": args}


def json_calls(text: str, names: tuple[str, ...] | None = None) -> list[dict] | None:
    """The calls of an answer that is nothing but JSON calls (Llama 3.1 or plain), else None."""
    text = text.strip()
    text = text.removeprefix(PYTHON_TAG).strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    if fence:
        text = fence.group(1)
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        for item in obj if isinstance(obj, list) else [obj]:
            call = _as_call(item, names)
            if call is None:
                return None
            calls.append(call)
        while pos < len(text) and text[pos] in " \t\r\n;,":
            pos += 1
    return calls or None


def _tail_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (text that may become the tag)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class CallParser:
    """Incremental parsing of one answer: `feed` text pieces, then `finish`; each returns (content, calls) to emit
    now, calls as {"name", "arguments": dict}. Content is the answer's text outside calls, exactly, except that
    whitespace before a call (and at the end of an answer with calls) is dropped."""

    def __init__(self, names: tuple[str, ...] | None = None, parallel: bool = True):
        self.names, self.parallel = names, parallel
        self.mode = "start"  # "start" (only whitespace yet), "json" (held to the end), "text", "call" (in a tag)
        self.buf = self.gap = ""
        self.calls: list[dict] = []

    def _add(self, call: dict) -> list[dict]:
        if self.calls and not self.parallel:
            return []  # parallel_tool_calls false: the first call only
        self.calls.append(call)
        return [call]

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        out, calls = "", []
        while True:
            if self.mode == "start":
                head = self.buf.lstrip()
                if any(head.startswith(t) for t in JSON_STARTS):
                    self.mode = "json"
                if not head or self.mode == "json" or any(t.startswith(head) for t in JSON_STARTS):
                    return out, calls  # undecided yet, or held to the end
                self.mode = "text"  # a tag (or part of one) is found there too
            if self.mode == "json":
                return out, calls
            if self.mode == "text":
                at = self.buf.find(OPEN)
                if at < 0:
                    keep = _tail_prefix(self.buf, OPEN)
                    body = self.buf[: len(self.buf) - keep]
                    keep += len(body) - len(body.rstrip())  # whitespace may precede a call: held back too
                    out += self.buf[: len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep :]
                    return out, calls
                before = self.buf[:at]
                out += before.rstrip()
                self.gap = before[len(before.rstrip()) :]  # given back if the tag holds no call
                self.buf, self.mode = self.buf[at + len(OPEN) :], "call"
            if self.mode == "call":
                end = self.buf.find(CLOSE)
                if end < 0:
                    return out, calls
                inner, self.buf, self.mode = self.buf[:end], self.buf[end + len(CLOSE) :], "text"
                call = self._tagged(inner)
                if call is None:
                    out += self.gap + OPEN + inner + CLOSE
                else:
                    calls += self._add(call)

    def _tagged(self, inner: str) -> dict | None:
        try:
            return _as_call(json.loads(inner), self.names)
        except ValueError:
            return None

    def finish(self) -> tuple[str, list[dict]]:
        """The rest, at the end of the answer: an unclosed `<tool_call>` still counts if its JSON is complete."""
        out, calls = "", []
        if self.mode == "json":
            found = json_calls(self.buf, self.names)
            if found:
                for c in found:
                    calls += self._add(c)
            else:
                out = self.buf
        elif self.mode == "call":
            call = self._tagged(self.buf)
            if call is None:
                out = self.gap + OPEN + self.buf
            else:
                calls += self._add(call)
        else:
            out = self.buf
        if self.calls and not out.strip():
            out = ""
        self.buf = ""
        return out, calls


def parse_calls(
    text: str, names: tuple[str, ...] | None = None, parallel: bool = True
) -> tuple[str | None, list[dict]]:
    """(content or None, calls) of a whole answer; see `CallParser`."""
    p = CallParser(names, parallel)
    content, calls = p.feed(text)
    more, rest = p.finish()
    content += more
    calls += rest
    return (None if calls and not content.strip() else content), calls
