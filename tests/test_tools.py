"""Tool calling (tinkerlm/toolcalls.py): the parsers on the common formats (Hermes / Qwen `<tool_call>`, Llama 3.1
JSON, plain JSON), streamed in pieces as whole; rendering through a template that takes `tools` (text equal to
transformers') and the Hermes fallback for one that does not (SmolLM2's); bad input refused naming the field; and the
real SmolLM2 through the openai client: a whole conversation (call, tool result, answer), 50 varied prompts whose
calls all validate against their schemas (checked with the `jsonschema` package), streaming equal to non-streaming,
and the Python API equal to the server."""

from __future__ import annotations

import asyncio
import copy
import json
from types import SimpleNamespace

import httpx
import jsonschema as validator
import openai
import pytest
from test_serve import live_server
from tiny import make_hf_model

import tinkerlm
from tinkerlm import toolcalls
from tinkerlm.errors import TinkerError
from tinkerlm.jsonschema import compile_schema
from tinkerlm.toolcalls import CallParser, parse_calls


def tool(name: str, parameters: dict, description: str = "") -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


WEATHER = tool(
    "get_weather",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
    "The current weather in a city.",
)
ADD = tool(
    "add",
    {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]},
    "Add two numbers.",
)
SEARCH = tool(
    "search",
    {
        "type": "object",
        "properties": {"query": {"type": "string", "maxLength": 50}, "limit": {"type": "integer"}},
        "required": ["query"],
    },
    "Search the web.",
)
BOOK = tool(
    "book_flight",
    {
        "type": "object",
        "properties": {
            "passenger": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
                "required": ["name", "age"],
            },
            "legs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "from": {"type": "string", "minLength": 3, "maxLength": 3},
                        "to": {"type": "string", "minLength": 3, "maxLength": 3},
                    },
                    "required": ["from", "to"],
                },
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["passenger", "legs"],
    },
    "Book a flight; airports as IATA codes.",
)
NOTE = tool(
    "save_note",
    {
        "type": "object",
        "properties": {
            "text": {"type": "string", "maxLength": 60},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
            "urgent": {"type": "boolean"},
        },
        "required": ["text", "tags", "urgent"],
    },
    "Save a note.",
)
TOOLS = {t["function"]["name"]: t for t in (WEATHER, ADD, SEARCH, BOOK, NOTE)}


def validate_call(call, tools: list[dict]) -> None:
    """`call` (the openai client's or a dict) names one of `tools` and its arguments validate against its schema."""
    fn = call.function if hasattr(call, "function") else SimpleNamespace(**call["function"])
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert fn.name in schemas, fn.name
    validator.validate(json.loads(fn.arguments), schemas[fn.name])


# ----------------------------------------------------------------------------------------------------------------
# Parsers

CITY = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
SUM = {"name": "add", "arguments": {"a": 1, "b": 2.5}}
PARSE_CASES = {
    "hermes": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        None,
        [CITY],
    ),
    "hermes with text and two calls": (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>{"name":"add","arguments":{"a":1,"b":2.5}}</tool_call>',
        "Let me check.",
        [CITY, SUM],
    ),
    "hermes unclosed at the end": ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2.5}}', None, [SUM]),
    "hermes arguments as text": (
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2.5}"}</tool_call>',
        None,
        [SUM],
    ),
    "llama 3.1": (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None,
        [CITY],
    ),
    "llama 3.1 without tag, two calls": (
        '{"name": "add", "parameters": {"a": 1, "b": 2.5}}; {"type": "function", "name": "add", "parameters": {"a": 1, "b": 2.5}}',
        None,
        [SUM, SUM],
    ),
    "plain json": ('{"name": "add", "arguments": {"a": 1, "b": 2.5}}', None, [SUM]),
    "plain json list, fenced": ('```json\n[{"name": "add", "arguments": {"a": 1, "b": 2.5}}]\n```', None, [SUM]),
    "text only": ("The weather in Paris is mild.", "The weather in Paris is mild.", []),
    "json that is no call": ('{"name": "Alice", "age": 30}', '{"name": "Alice", "age": 30}', []),
    "unknown function": ('{"name": "rm_rf", "arguments": {}}', '{"name": "rm_rf", "arguments": {}}', []),
    "malformed tag": ("Hi <tool_call>{oops</tool_call> there", "Hi <tool_call>{oops</tool_call> there", []),
    "malformed unclosed tag": ('<tool_call>{"name": "add", "argu', '<tool_call>{"name": "add", "argu', []),
    "truncated json": ('{"name": "add", "arguments": {"a": 1', '{"name": "add", "arguments": {"a": 1', []),
    "text mentioning a tag": ("Use <tool to", "Use <tool to", []),
}


@pytest.mark.parametrize("name", PARSE_CASES)
def test_parse_formats(name):
    text, content, calls = PARSE_CASES[name]
    assert parse_calls(text, ("get_weather", "add")) == (content, calls)


@pytest.mark.parametrize("name", PARSE_CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_streamed_in_pieces_equals_whole(name, size):
    """Fed a few characters at a time, the parser emits the same content and calls, and no `<tool_call>` text
    reaches the content when there is a call."""
    text, content, calls = PARSE_CASES[name]
    p = CallParser(("get_weather", "add"))
    pieces, got = [], []
    for i in range(0, len(text), size):
        c, k = p.feed(text[i : i + size])
        pieces.append(c)
        got += k
    c, k = p.finish()
    pieces.append(c)
    got += k
    assert got == calls
    assert "".join(pieces) == (content or "")
    if calls:
        assert not any("<tool" in piece for piece in pieces)


def test_parallel_false_keeps_the_first_call():
    text = PARSE_CASES["hermes with text and two calls"][0]
    assert parse_calls(text, None, parallel=False) == ("Let me check.", [CITY])


def test_openai_call_shape():
    c = toolcalls.openai_call(SUM)
    assert c["type"] == "function" and c["id"].startswith("call_") and len(c["id"]) > 10
    assert c["function"]["name"] == "add" and json.loads(c["function"]["arguments"]) == SUM["arguments"]
    assert toolcalls.openai_call(SUM)["id"] != c["id"]


def test_stream_chunks_number_the_calls():
    """The server's chunks for an answer with two (equal) calls: content first, then one `delta.tool_calls` entry
    per call, indexed 0 and 1, with fresh ids, and finish_reason tool_calls."""
    from tinkerlm.batching import Event
    from tinkerlm.serve.server import _chat_chunks

    text = PARSE_CASES["hermes with text and two calls"][0].replace(
        '"city": "Paris", "unit": "celsius"', '"a": 1, "b": 2.5'
    )
    text = text.replace("get_weather", "add")
    req = SimpleNamespace(model="m", logprobs=False)
    parsers = {0: CallParser(("add",))}
    chunks = _chat_chunks(None, req, "id", 0, Event(0, text[:20]), parsers)
    chunks += _chat_chunks(None, req, "id", 0, Event(0, text[20:], finish_reason="stop"), parsers)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "Let me check."
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [c["index"] for c in calls] == [0, 1] and calls[0]["id"] != calls[1]["id"]
    assert all(json.loads(c["function"]["arguments"]) == SUM["arguments"] for c in calls)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"


# ----------------------------------------------------------------------------------------------------------------
# The constrained call


def accepts(schema: dict, text: str) -> bool:
    s = compile_schema(schema)
    state = s.transition(s.initial, text.encode())
    return state is not None and s.done(state)


def test_call_schema_one_and_several_tools():
    one = toolcalls.call_schema(toolcalls.check_tools([WEATHER]))
    assert accepts(one, '{"name":"get_weather","arguments":{"city":"Oslo","unit":"celsius"}}')
    assert not accepts(one, '{"name":"get_weather","arguments":{"city":"Oslo","unit":"kelvin"}}')
    assert not accepts(one, '{"name":"add","arguments":{"a":1,"b":2}}')
    several = toolcalls.call_schema(toolcalls.check_tools([WEATHER, ADD, BOOK]))
    assert accepts(several, '{"name":"add","arguments":{"a":1,"b":2}}')
    assert accepts(
        several,
        '{"name":"book_flight","arguments":{"passenger":{"name":"Al","age":3},"legs":[{"from":"CDG","to":"JFK"}]}}',
    )
    assert not accepts(several, '{"name":"add","arguments":{"city":"Oslo","unit":"celsius"}}')
    assert not accepts(several, '{"name":"search","arguments":{"query":"x"}}')
    # The text a required call decodes to parses back as that call.
    assert parse_calls('{"name":"add","arguments":{"a":1,"b":2}}', ("add",))[1] == [
        {"name": "add", "arguments": {"a": 1, "b": 2}}
    ]


def test_call_schema_keeps_each_tools_defs():
    """`$ref`s resolve against the call schema's root: two tools with a definition of the same name, and one that
    recurses through `#`, keep their own meaning."""
    tree = tool(
        "tree",
        {
            "type": "object",
            "properties": {
                "label": {"$ref": "#/$defs/item"},
                "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2},
            },
            "required": ["label", "kids"],
            "$defs": {"item": {"type": "string", "maxLength": 3}},
        },
    )
    count = tool(
        "count",
        {
            "type": "object",
            "properties": {"n": {"$ref": "#/definitions/item"}},
            "required": ["n"],
            "definitions": {"item": {"type": "integer"}},
        },
    )
    schema = toolcalls.call_schema(toolcalls.check_tools([tree, count]))
    assert accepts(schema, '{"name":"tree","arguments":{"label":"a","kids":[{"label":"b","kids":[]}]}}')
    assert not accepts(schema, '{"name":"tree","arguments":{"label":"abcd","kids":[]}}')
    assert not accepts(schema, '{"name":"tree","arguments":{"label":"a","kids":[{"n":1}]}}')
    assert accepts(schema, '{"name":"count","arguments":{"n":3}}')
    assert not accepts(schema, '{"name":"count","arguments":{"n":"abc"}}')
    validator.validate({"name": "tree", "arguments": {"label": "a", "kids": [{"label": "b", "kids": []}]}}, schema)


# ----------------------------------------------------------------------------------------------------------------
# Rendering

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "9 C, rain"},
]

# Qwen2.5's tool-calling chat template (the parts that matter here): reads `tools`, `tool_calls`, role "tool".
QWEN_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""


@pytest.fixture(scope="module")
def qwen_tools(tmp_path_factory):
    """A tiny qwen2 checkpoint whose chat template takes tools."""
    path = tmp_path_factory.mktemp("tools") / "qwen2"
    make_hf_model("qwen2", path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN_TOOLS}))
    return path


def test_template_with_tools_renders_as_transformers(qwen_tools):
    """A template that reads `tools` gets them and the tool turns as they are (arguments as objects): the prompt
    equals transformers' apply_chat_template."""
    from transformers import AutoTokenizer

    llm = tinkerlm.load(str(qwen_tools))
    plan = toolcalls.plan(llm.tokenizer, copy.deepcopy(CONVERSATION), [WEATHER, ADD], "auto")
    assert plan.tools == [WEATHER, ADD] and plan.schema is None and plan.names == ("get_weather", "add")
    ids = llm.chat_ids(plan.messages, tools=plan.tools)
    ref = AutoTokenizer.from_pretrained(qwen_tools)
    native = copy.deepcopy(CONVERSATION)
    for c in native[2]["tool_calls"]:
        c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    want = ref.apply_chat_template(native, tools=[WEATHER, ADD], tokenize=False, add_generation_prompt=True)
    assert '"arguments": {"city": "Paris"' in want and '"name": "add"' in want
    assert ids == ref.encode(want, add_special_tokens=False)
    # tool_choice none: no tools shown, the past tool turns still render.
    plan = toolcalls.plan(llm.tokenizer, copy.deepcopy(CONVERSATION), [WEATHER, ADD], "none")
    assert plan.tools is None and plan.names is None
    ids = llm.chat_ids(plan.messages, tools=plan.tools)
    assert ids == ref.encode(
        ref.apply_chat_template(native, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )


def test_hermes_fallback_for_a_template_without_tools():
    """A template that does not read `tools` (the ChatML one SmolLM2 has): tools described in the system message,
    calls written as <tool_call> text, results as <tool_response> in one user turn."""
    tok = SimpleNamespace(chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    plan = toolcalls.plan(tok, copy.deepcopy(CONVERSATION), [WEATHER], "required")
    assert plan.tools is None and plan.schema == toolcalls.call_schema(toolcalls.check_tools([WEATHER]))
    roles = [m["role"] for m in plan.messages]
    assert roles == ["system", "user", "assistant", "user"]
    system = plan.messages[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools") and json.dumps(WEATHER) in system and "<tool_call>" in system
    assert plan.messages[2]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    )
    assert plan.messages[3]["content"] == (
        "<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n9 C, rain\n</tool_response>"
    )
    # Without a system message one is added; with tool_choice none nothing is.
    plan = toolcalls.plan(tok, [{"role": "user", "content": "hi"}], [WEATHER], "auto")
    assert [m["role"] for m in plan.messages] == ["system", "user"] and plan.schema is None
    plan = toolcalls.plan(tok, [{"role": "user", "content": "hi"}], [WEATHER], "none")
    assert plan.messages == [{"role": "user", "content": "hi"}] and plan.names is None


# ----------------------------------------------------------------------------------------------------------------
# Bad input

USER = [{"role": "user", "content": "hi"}]
BAD = [
    (
        {"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]},
        "tools[0].function.name",
        "missing",
    ),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", "'has space'"),
    (
        {"tools": [WEATHER, {"type": "function", "function": {"name": "get_weather"}}]},
        "tools[1].function.name",
        "two tools",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools[0].function.parameters",
        "type",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
        "tools[0].function.parameters",
        "object",
    ),
    (
        {"tools": [tool("f", {"type": "object", "properties": {"zip": {"type": "string", "pattern": "[0-9]+"}}})]},
        "tools[0].function.parameters",
        "keyword 'pattern' at /properties/zip is not supported",
    ),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "missing"),
    ({"tools": []}, "tools", "non-empty"),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}},
        "tool_choice.function.name",
        "'add'",
    ),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name", "missing"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    (
        {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
        "required",
    ),
    ({"messages": [*USER, {"role": "tool", "content": "18 C"}]}, "messages[1].tool_call_id", "missing"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "missing"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    (
        {
            "messages": [
                *USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{no"}}],
                },
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
        "JSON object",
    ),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls", "assistant"),
]


@pytest.mark.parametrize("extra, param, needle", BAD)
def test_bad_tool_requests_400(base, extra, param, needle):
    r = httpx.post(
        base.removesuffix("/v1") + "/v1/chat/completions", json={"model": "smollm2", "messages": USER, **extra}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_python_api_refuses_by_field(smollm2):
    with pytest.raises(TinkerError, match=r"tools\[0\].function.parameters: keyword 'pattern'"):
        smollm2.chat(
            "hi", tools=[tool("f", {"type": "object", "properties": {"z": {"type": "string", "pattern": "x"}}})]
        )
    with pytest.raises(TinkerError, match=r"tool_choice.function.name: 'nope'"):
        smollm2.chat("hi", tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2 through the openai client


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return tinkerlm.load(str(smollm2_gguf))


@pytest.fixture(scope="module")
def base(smollm2):
    with live_server({"smollm2": smollm2}, max_batch=8, max_context=2048) as (url, _):
        yield url + "/v1"


def client(base):
    return openai.OpenAI(base_url=base, api_key="none", max_retries=0)


def test_conversation_end_to_end(base):
    """Call (tool_choice required), tool result (role tool), final answer (tool_choice none, then auto)."""
    c = client(base)
    # `name` (the participant) and `refusal` are OpenAI message fields clients send back; accepted, not rendered
    messages = [{"role": "user", "name": "ana", "content": "What is the weather like in Paris right now?"}]
    r = c.chat.completions.create(
        model="smollm2",
        messages=messages,
        tools=[WEATHER, SEARCH],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    validate_call(call, [WEATHER, SEARCH])
    messages += [
        choice.message,  # as the OpenAI cookbook appends it
        {"role": "assistant", "content": "One moment.", "refusal": None},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})},
    ]
    final = c.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER, SEARCH], tool_choice="none", max_tokens=40, temperature=0
    )
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content and final.choices[0].finish_reason in ("stop", "length")
    auto = c.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER, SEARCH], max_tokens=40, temperature=0
    )
    m = auto.choices[0].message
    assert m.content or m.tool_calls
    for call in m.tool_calls or []:  # auto parses freely: any call it finds names a tool and holds JSON
        assert call.function.name in ("get_weather", "search") and isinstance(json.loads(call.function.arguments), dict)


REQUESTS = [
    "What's the weather in Tokyo?",
    "Add 17 and 25.",
    "Find recent news about solar power.",
    "Book a flight for Ana, 34, from Lisbon (LIS) to Paris (CDG).",
    "Remember to buy milk tomorrow, it is urgent.",
    "Is it raining in London? Answer in fahrenheit.",
    "What is 3.5 plus 1e3?",
    "Search for the best pizza recipe.",
    "Fly Bob (52) from JFK to LAX and back.",
    "Note: call mum on Sunday, tags family and phone.",
]
TOOLSETS = [
    ([WEATHER, ADD, SEARCH, BOOK, NOTE], "required"),
    ([WEATHER, ADD, SEARCH], "required"),
    ([BOOK, NOTE], "required"),
    ([WEATHER, ADD, SEARCH, BOOK, NOTE], "named"),
    ([SEARCH], "required"),
]
NAMED = ["get_weather", "add", "search", "book_flight", "save_note"] * 2


def test_fifty_prompts_every_call_validates(base):
    """50 requests (10 prompts x 5 tool sets, required or a named function), decoded concurrently: each returns
    one call that names an allowed tool and validates against its parameters."""
    cases = []
    for i, prompt in enumerate(REQUESTS):
        for tools, mode in TOOLSETS:
            choice = {"type": "function", "function": {"name": NAMED[i]}} if mode == "named" else mode
            cases.append((prompt, tools, choice))
    assert len(cases) == 50

    async def run():
        c = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
        return await asyncio.gather(
            *[
                c.chat.completions.create(
                    model="smollm2",
                    messages=[{"role": "user", "content": prompt}],
                    tools=tools,
                    tool_choice=choice,
                    max_tokens=80,
                    temperature=0,
                )
                for prompt, tools, choice in cases
            ]
        )

    names = set()
    for (prompt, tools, choice), r in zip(cases, asyncio.run(run())):
        choice_ = r.choices[0]
        assert choice_.finish_reason == "tool_calls", (prompt, choice_)
        (call,) = choice_.message.tool_calls
        allowed = [TOOLS[choice["function"]["name"]]] if isinstance(choice, dict) else tools
        validate_call(call, allowed)
        names.add(call.function.name)
    assert len(names) >= 3  # the model picks among the tools, not always the first


def test_streaming_equals_non_streaming(base):
    """The openai client's stream helper accumulates the `delta.tool_calls` chunks into the same call."""
    c = client(base)
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in (WEATHER, ADD, BOOK)]
    for prompt, choice in [
        ("Book a flight for Ana, 34, from LIS to CDG.", "required"),
        ("Add 2 and 40.", {"type": "function", "function": {"name": "add"}}),
    ]:
        kw = dict(
            model="smollm2",
            messages=[{"role": "user", "content": prompt}],
            tools=strict,
            tool_choice=choice,
            max_tokens=80,
            temperature=0,
        )
        whole = c.chat.completions.create(**kw).choices[0]
        with c.chat.completions.stream(**kw) as s:
            chunks = list(s)
            streamed = s.get_final_completion().choices[0]
        assert streamed.finish_reason == whole.finish_reason == "tool_calls"
        (a,), (b,) = whole.message.tool_calls, streamed.message.tool_calls
        assert (a.function.name, a.function.arguments) == (b.function.name, b.function.arguments)
        assert b.function.parsed_arguments == json.loads(a.function.arguments)  # the helper parses strict calls
        assert not any(getattr(ch, "type", "") == "content.delta" and "<tool" in ch.delta for ch in chunks)


def test_streaming_auto_without_a_call_is_plain_content(base):
    """With tool_choice auto and an answer that is no call, the stream's content equals the non-streamed one."""
    c = client(base)
    kw = dict(
        model="smollm2",
        messages=[{"role": "user", "content": "Say hello to Ana."}],
        tools=[WEATHER],
        tool_choice="auto",
        max_tokens=20,
        temperature=0,
    )
    whole = c.chat.completions.create(**kw).choices[0]
    text = "".join(
        ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True) if ch.choices
    )
    if whole.message.tool_calls is None:
        assert text == whole.message.content


def test_python_api_equals_server(base, smollm2):
    messages = [{"role": "user", "content": "Add 17 and 25."}]
    answer = smollm2.chat(messages, tools=[ADD, WEATHER], tool_choice="required", max_tokens=60)
    assert answer.finish_reason == "tool_calls" and answer == ""
    (call,) = answer.tool_calls
    validate_call(call, [ADD, WEATHER])
    r = client(base).chat.completions.create(
        model="smollm2", messages=messages, tools=[ADD, WEATHER], tool_choice="required", max_tokens=60, temperature=0
    )
    (server_call,) = r.choices[0].message.tool_calls
    assert (server_call.function.name, server_call.function.arguments) == (
        call["function"]["name"],
        call["function"]["arguments"],
    )
    # Without tools the answer is the plain chat answer.
    assert smollm2.chat(messages, max_tokens=8).tool_calls == []
    # The tool turns render (Hermes fallback) without tools too, and the final answer is text.
    messages += [
        {"role": "assistant", "content": None, "tool_calls": answer.tool_calls},
        {"role": "tool", "tool_call_id": call["id"], "content": "42"},
    ]
    final = smollm2.chat(messages, max_tokens=20)
    assert final and final.tool_calls == []
    r = client(base).chat.completions.create(model="smollm2", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == final
