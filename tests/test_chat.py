"""Chat templates: identical text to transformers' apply_chat_template, and rendered in a sandbox."""

import pytest
from tiny import make_hf_model

import tinkerlm
from tinkerlm.errors import TinkerError

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Ünïcödé and 👋?"},
    ],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "qwen2"
    make_hf_model("qwen2", path)
    return path


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(tiny, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tiny)
    llm = tinkerlm.load(str(tiny))
    want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert llm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want


def test_template_is_sandboxed(tiny):
    llm = tinkerlm.load(str(tiny))
    llm.tokenizer.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TinkerError, match="chat template"):
        llm.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_raise_exception_is_clear(tiny):
    llm = tinkerlm.load(str(tiny))
    llm.tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(TinkerError, match="roles must alternate"):
        llm.apply_chat_template([{"role": "user", "content": "x"}])


def test_bad_messages(tiny):
    llm = tinkerlm.load(str(tiny))
    with pytest.raises(TinkerError, match=r"messages\[0\]"):
        llm.apply_chat_template([{"content": "no role"}])
    with pytest.raises(TinkerError, match="'wizard' is not one of"):
        llm.apply_chat_template([{"role": "wizard", "content": "x"}])
