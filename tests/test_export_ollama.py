"""export/ollama.py: each chat-template family gives a Modelfile whose TEMPLATE, rendered by a Go-template subset
interpreter, equals the Jinja chat template's rendering; unknown templates are refused."""

import re
import sys
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

sys.path.insert(0, str(Path(__file__).parent))
from gotemplate import render as go_render  # noqa: E402
from tiny import CHATML  # noqa: E402

from tinkerlm.errors import TinkerError  # noqa: E402
from tinkerlm.export.ollama import family, modelfile  # noqa: E402

# Jinja templates of each family, in the shape the model repositories ship (BOS left out: llama.cpp adds it).
LLAMA3 = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (  # Gemma 3: a system message opens the first user turn
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


def template_of(text: str) -> str:
    m = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert m, text
    return m.group(1)


@pytest.mark.parametrize("fam", TEMPLATES)
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_template_renders_as_the_jinja_template(fam, messages):
    jinja = ImmutableSandboxedEnvironment().from_string(TEMPLATES[fam])
    expected = jinja.render(messages=messages, add_generation_prompt=True)
    # Ollama's values: .System is the system messages joined; .Messages holds every message
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    assert go_render(template_of(modelfile("m.gguf", TEMPLATES[fam])), data) == expected


def test_an_open_assistant_turn_is_continued():
    data = {"System": "", "Messages": [{"Role": "user", "Content": "Hi"}, {"Role": "assistant", "Content": "Hel"}]}
    assert go_render(template_of(modelfile("m.gguf", CHATML)), data).endswith("<|im_start|>assistant\nHel")


class Tok:
    stop_token_ids = [0, 1, 2]

    def id_to_token(self, i):
        return ["<|endoftext|>", "Ġword", '<bad"quote>'][i]


@pytest.mark.parametrize(
    "fam,stops",
    [
        ("chatml", ["<|im_start|>", "<|im_end|>"]),
        ("llama3", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
        ("gemma", ["<start_of_turn>", "<end_of_turn>"]),
    ],
)
def test_structure_and_stops(fam, stops):
    text = modelfile("smollm2-q4.gguf", TEMPLATES[fam], Tok())
    assert family(TEMPLATES[fam]) == fam
    assert text.startswith('FROM ./smollm2-q4.gguf\n\nTEMPLATE """')
    found = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert found == stops + ["<|endoftext|>"]  # the tokenizer's special stop token; not vocabulary pieces
    assert text.count('"""') == 2 and "{{ .Content }}" in text


def test_unknown_template_and_bad_names():
    with pytest.raises(TinkerError, match="no Ollama template for this chat template; write the Modelfile's TEMPLATE"):
        modelfile("m.gguf", "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    with pytest.raises(TinkerError, match="no Ollama template"):
        modelfile("m.gguf", None)
    with pytest.raises(TinkerError, match="FROM line"):
        modelfile('m.gguf"\nSYSTEM evil', CHATML)
