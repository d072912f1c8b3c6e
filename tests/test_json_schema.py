"""JSON-schema outputs (tinkerlm/jsonschema.py): the automaton on edge-case schemas (what it accepts, refuses and
closes with), unsupported keywords refused by name (Python API, server 400, CLI exit 2), tiny random models
sampling under every edge-case schema (a hostile stand-in for a model), and the real SmolLM2 greedy over 50 prompts
through the openai client: every output parses and validates (checked with the `jsonschema` package)."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema as validator
import openai
import pytest
from test_cli import assert_user_error, cli
from test_serve import live_server
from tiny import make_hf_model

import tinkerlm
from tinkerlm.errors import TinkerError
from tinkerlm.jsonschema import compile_schema

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}
EDGE = {
    "enum only": {"enum": ["yes", "no", "maybe", 3, None]},
    "const": {"type": "object", "properties": {"v": {"const": {"a": [1, "x"]}}}, "required": ["v"]},
    "nested $defs": {
        "type": "object",
        "properties": {"home": {"$ref": "#/$defs/address"}, "work": {"$ref": "#/$defs/address"}},
        "required": ["home"],
        "$defs": {
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string", "maxLength": 8}, "zip": {"type": "integer"}},
                "required": ["street", "zip"],
            }
        },
    },
    "array bounds": {
        "type": "object",
        "properties": {"xs": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 3}},
        "required": ["xs"],
    },
    "string length": {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 4}, "maxItems": 4},
    "optional properties": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"type": "integer"}},
        "required": ["c"],
    },
    "integer vs number": {
        "type": "object",
        "properties": {"i": {"type": "integer"}, "n": {"type": "number"}},
        "required": ["i", "n"],
    },
    "anyOf and type lists": {
        "type": "object",
        "properties": {
            "v": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}, {"type": "array"}]},
            "w": {"type": ["boolean", "null"]},
        },
        "required": ["v", "w"],
    },
    "recursive tree": {
        "$ref": "#/$defs/node",
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 4},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["label"],
            }
        },
    },
    "free-form parts": {
        "type": "object",
        "properties": {"meta": {"type": "object"}, "anything": {}},
        "required": ["meta", "anything"],
    },
    "person": PERSON,
}


def accepts(schema: dict, text: str) -> bool:
    s = compile_schema(schema)
    st = s.transition(s.initial, text.encode())
    return st is not None and s.done(st)


# ----------------------------------------------------------------------------------------------------------------
# The automaton


@pytest.mark.parametrize("name", EDGE)
def test_shortest_closing_is_valid_from_the_start(name):
    schema = EDGE[name]
    s = compile_schema(schema)
    text = s.closing(s.initial).decode()
    validator.validate(json.loads(text), schema)
    assert accepts(schema, text)


@pytest.mark.parametrize(
    ("name", "text", "ok"),
    [
        ("enum only", '"maybe"', True),
        ("enum only", "null", True),
        ("enum only", '"perhaps"', False),
        ("enum only", "4", False),
        ("const", '{"v":{"a":[1,"x"]}}', True),
        ("const", '{"v":{"a":[1, "x"]}}', False),  # enum/const values come in their canonical spelling
        ("nested $defs", '{"home": {"street": "Main", "zip": 12345}}', True),
        ("nested $defs", '{"home":{"street":"Main","zip":1},"work":{"street":"Hi","zip":2}}', True),
        ("nested $defs", '{"home":{"zip":1}}', False),  # a required property missing
        ("nested $defs", '{"work":{"street":"a","zip":1},"home":{"street":"b","zip":2}}', False),  # declared order
        ("nested $defs", '{"home":{"street":"Main Street","zip":1}}', False),  # maxLength 8
        ("array bounds", '{"xs":[1,2.5]}', True),
        ("array bounds", '{"xs":[1,2,-3e2]}', True),
        ("array bounds", '{"xs":[1]}', False),
        ("array bounds", '{"xs":[1,2,3,4]}', False),
        ("string length", '["ab","abcd","\\u00e9\\n"]', True),
        ("string length", '["a"]', False),
        ("string length", '["abcde"]', False),
        ("string length", '["éèàù"]', True),  # characters, not bytes
        ("string length", '["\\ud83d\\ude00x"]', False),  # no surrogate escapes (counting would differ)
        ("optional properties", '{"c":1}', True),
        ("optional properties", '{"a":true,"b":null,"c":-0}', True),
        ("optional properties", '{"b":null,"c":1}', True),
        ("optional properties", '{"c":1,"d":2}', False),  # no other properties
        ("optional properties", '{"a":true}', False),
        ("integer vs number", '{"i":12,"n":1.5e-3}', True),
        ("integer vs number", '{"i":1.0,"n":1}', False),
        ("integer vs number", '{"i":1e3,"n":1}', False),
        ("integer vs number", '{"i":01,"n":1}', False),
        ("anyOf and type lists", '{"v":12,"w":null}', True),
        ("anyOf and type lists", '{"v":"abc","w":true}', True),
        ("anyOf and type lists", '{"v":[1,{"x":[]}],"w":false}', True),
        ("anyOf and type lists", '{"v":"abcd","w":true}', False),
        ("anyOf and type lists", '{"v":1.5,"w":true}', False),
        ("recursive tree", '{"label":"a","kids":[{"label":"b","kids":[{"label":"c"}]},{"label":"d"}]}', True),
        ("recursive tree", '{"label":"a","kids":[{"label":"b"},{"label":"c"},{"label":"d"}]}', False),
        ("free-form parts", '{"meta":{"k":[1,{"z":null}]},"anything":"s"}', True),
        ("free-form parts", '{"meta":[],"anything":1}', False),
    ],
)
def test_automaton_accepts_exactly_the_schema(name, text, ok):
    schema = EDGE[name]
    assert accepts(schema, text) is ok
    if ok:  # the test's own expectation, checked against the reference validator
        validator.validate(json.loads(text), schema)


def test_closing_from_any_prefix_is_valid():
    """Cut a valid document anywhere: the shortest closing from there completes a valid one."""
    schema = EDGE["nested $defs"]
    text = '{"home": {"street": "Ma\\u00e9", "zip": -12}, "work": {"street": "x", "zip": 3'
    s = compile_schema(schema)
    for k in range(len(text) + 1):
        st = s.transition(s.initial, text[:k].encode())
        assert st is not None, text[:k]
        done = text[:k] + s.closing(st).decode()
        validator.validate(json.loads(done), schema)


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        (
            {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]+$"}}},
            "'pattern' at /properties/zip",
        ),
        ({"type": "string", "format": "date-time"}, "'format' at /"),
        ({"type": "integer", "minimum": 0}, "'minimum' at /"),
        ({"type": "array", "uniqueItems": True}, "'uniqueItems' at /"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "'patternProperties' at /"),
        ({"allOf": [{"type": "string"}]}, "'allOf' at /"),
        ({"oneOf": [{"type": "string"}]}, "'oneOf' at /"),
        ({"not": {"type": "string"}}, "'not' at /"),
        ({"if": {}, "then": {}}, "'if' at /"),
        ({"type": "array", "items": {"type": "number", "multipleOf": 2}}, "'multipleOf' at /items"),
        ({"$ref": "#/$defs/a", "$defs": {"a": {"type": "string", "maxLength": 3, "contentEncoding": "x"}}}, "/$defs/a"),
        ({"$ref": "https://example.com/s.json"}, "$ref 'https://example.com/s.json'"),
        ({"$ref": "#/$defs/missing"}, "names no definition"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required at /: 'b'"),
        ({"type": "object", "additionalProperties": {"type": "string"}}, "'additionalProperties' at /"),
        ({"type": "date"}, "type at /"),
        ({"type": "string", "maxLength": -1}, "maxLength at /"),
        ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "no finite instance"),
    ],
)
def test_unsupported_schemas_are_refused_by_name(schema, needle):
    with pytest.raises(TinkerError, match="json_schema: ") as e:
        compile_schema(schema)
    assert needle in str(e.value)


def test_annotations_are_ignored():
    schema = {"title": "T", "description": "d", "$schema": "https://json-schema.org/draft/2020-12/schema", **PERSON}
    assert accepts(schema, '{"name":"A","age":1,"colour":"red"}')


# ----------------------------------------------------------------------------------------------------------------
# Tiny random models: sampling from noise, every output valid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema") / "llama"
    make_hf_model("llama", path)
    return tinkerlm.load(str(path)), path


@pytest.mark.parametrize("name", EDGE)
def test_random_model_sampling_always_validates(tiny, name):
    llm, _ = tiny
    schema = EDGE[name]
    for seed in range(3):
        r = llm.generate("x", json_schema=schema, max_tokens=96, temperature=1.5, seed=seed)
        assert r.finish_reason == "stop", (name, seed, str(r))
        validator.validate(json.loads(str(r)), schema)


@pytest.mark.parametrize("max_tokens", [1, 4, 8, 16, 40])
def test_small_budget_gives_valid_json_or_length(tiny, max_tokens):
    """Closing is forced in whole tokens when the budget just suffices; a schema whose smallest instance does not
    fit ends with finish_reason "length" (never a "stop" on invalid JSON)."""
    llm, _ = tiny
    for name in ("person", "optional properties", "enum only", "array bounds"):
        r = llm.generate("x", json_schema=EDGE[name], max_tokens=max_tokens, temperature=1.0, seed=7)
        if r.finish_reason == "stop":
            validator.validate(json.loads(str(r)), EDGE[name])
        else:
            assert r.finish_reason == "length" and len(llm.tokenizer.encode(str(r))) >= 1
    r = llm.generate("x", json_schema=EDGE["optional properties"], max_tokens=16, temperature=1.0, seed=7)
    assert r.finish_reason == "stop"  # '{"c":0}' fits 16 tokens whatever the model wants


def test_python_api_refuses_an_unsupported_keyword(tiny):
    llm, _ = tiny
    with pytest.raises(TinkerError, match="json_schema: keyword 'pattern' at /properties/zip is not supported"):
        llm.generate("x", json_schema={"type": "object", "properties": {"zip": {"type": "string", "pattern": "x"}}})
    with pytest.raises(TinkerError, match="json_schema must be a JSON schema"):
        llm.generate("x", json_schema="not a dict")


def test_server_schema_per_row_and_bad_schema_400(tiny):
    """Batched rows with different formats (schema, json_object, none) decode together; a bad schema is a 400
    naming the keyword and the field."""
    llm, _ = tiny

    async def run(c):
        jobs = []
        for i, name in enumerate(["person", "nested $defs", None, "array bounds"]):
            fmt = (
                {"type": "json_schema", "json_schema": {"name": "t", "schema": EDGE[name], "strict": True}}
                if name
                else {"type": "json_object"}
                if i == 2
                else None
            )
            jobs.append(
                c.chat.completions.create(
                    model="llama",
                    messages=[{"role": "user", "content": f"item {i}"}],
                    max_tokens=80,
                    temperature=1.0,
                    seed=i,
                    response_format=fmt,
                )
            )
        return await asyncio.gather(*jobs)

    with live_server({"llama": llm}, max_batch=4) as (base, _):
        c = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        out = asyncio.run(run(c))
        for r, name in zip(out, ["person", "nested $defs", None, "array bounds"]):
            value = json.loads(r.choices[0].message.content)
            if name:
                validator.validate(value, EDGE[name])
            assert r.choices[0].finish_reason == "stop"
        # /v1/completions takes response_format too (a tinkerlm extension), streamed.
        s = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0).completions.create(
            model="llama",
            prompt="{",
            max_tokens=60,
            stream=True,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
        )
        validator.validate(json.loads("".join(ch.choices[0].text for ch in s)), PERSON)
        bad = {"type": "object", "properties": {"zip": {"type": "string", "format": "postal"}}}
        for body, param, needle in [
            (
                {"type": "json_schema", "json_schema": {"name": "t", "schema": bad}},
                "response_format.json_schema.schema",
                "'format' at /properties/zip",
            ),
            ({"type": "json_schema"}, "response_format.json_schema", "json_schema"),
            ({"type": "json_object", "json_schema": {"schema": {}}}, "response_format.json_schema", "json_schema"),
            (
                {"type": "json_schema", "json_schema": {"schema": {}, "bogus": 1}},
                "response_format.json_schema.bogus",
                "bogus",
            ),
        ]:
            r = httpx.post(
                base + "/v1/chat/completions",
                json={"model": "llama", "messages": [{"role": "user", "content": "hi"}], "response_format": body},
            )
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == param and needle in err["message"], err
        assert httpx.get(base + "/health").status_code == 200


def test_cli_json_schema_file(tiny, tmp_path):
    _, path = tiny
    f = tmp_path / "schema.json"
    f.write_text(json.dumps({"name": "person", "schema": PERSON, "strict": True}))  # OpenAI's wrapper works too
    proc = cli("run", str(path), "hello", "--json-schema", str(f), "--max-tokens", "80", "--temperature", "1", check=0)
    validator.validate(json.loads(proc.stdout), PERSON)
    assert_user_error(cli("run", str(path), "hello", "--json-schema", str(tmp_path / "nope.json")), "nope.json")
    f.write_text("{not json")
    assert_user_error(cli("run", str(path), "hello", "--json-schema", str(f)), "not valid JSON")
    f.write_text(json.dumps({"type": "string", "pattern": "x"}))
    assert_user_error(cli("run", str(path), "hello", "--json-schema", str(f)), "'pattern' at /")


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2: 50 varied prompts, greedy, through the openai client

SCHEMAS = {
    "person": PERSON,
    "recipe": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "servings": {"type": "integer"},
            "ingredients": {
                "type": "array",
                "items": {"type": "string", "maxLength": 30},
                "minItems": 1,
                "maxItems": 4,
            },
            "vegetarian": {"type": "boolean"},
        },
        "required": ["title", "servings", "ingredients", "vegetarian"],
    },
    "answer": {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 60},
            "confidence": {"type": "number"},
            "sources": {"type": "array", "items": {"$ref": "#/$defs/source"}, "maxItems": 2},
        },
        "required": ["answer", "confidence"],
        "$defs": {
            "source": {
                "type": "object",
                "properties": {
                    "title": {"type": "string", "maxLength": 30},
                    "year": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                },
                "required": ["title", "year"],
            }
        },
    },
    "sentiment": {
        "type": "object",
        "properties": {"label": {"enum": ["positive", "negative", "neutral"]}, "score": {"type": "number"}},
        "required": ["label", "score"],
    },
    "city": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "country": {"type": "string", "maxLength": 30},
            "population": {"type": ["integer", "null"]},
        },
        "required": ["city", "country", "population"],
    },
}
SUBJECTS = [
    "Alice, a 30 year old painter from Lyon",
    "pancakes",
    "Why is the sky blue?",
    "I loved this film, it was wonderful!",
    "Tokyo",
    "Bob, who is 45 and likes the colour green",
    "a tomato soup",
    "Who wrote Hamlet?",
    "The service was slow and the food was cold.",
    "Paris",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return tinkerlm.load(str(smollm2_gguf))


def test_smollm2_fifty_prompts_all_valid(smollm2):
    cases = [(name, f"Answer as JSON about: {subject}") for subject in SUBJECTS for name in SCHEMAS]
    assert len(cases) == 50

    async def run(c):
        return await asyncio.gather(
            *[
                c.chat.completions.create(
                    model="smollm2",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=120,
                    temperature=0,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
                    },
                )
                for name, prompt in cases
            ]
        )

    with live_server({"smollm2": smollm2}, max_batch=8, max_context=1024) as (base, _):
        out = asyncio.run(run(openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)))
    for (name, prompt), r in zip(cases, out):
        content = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", (prompt, content)
        validator.validate(json.loads(content), SCHEMAS[name])
    # The server's rows equal the Python API's (greedy), for a few.
    for (name, prompt), r in list(zip(cases, out))[:3]:
        assert smollm2.chat(prompt, json_schema=SCHEMAS[name], max_tokens=120) == r.choices[0].message.content
