"""Tokenizer parity with transformers: the default model's GGUF, a tiny sentencepiece GGUF built here, and HF dirs.

Every comparison is against transformers loading the very same files, ids compared exactly.
"""

import json
import shutil

import gguf
import numpy as np
import pytest
from peers import transformers_from_gguf

from tinkerlm.errors import TinkerError
from tinkerlm.formats.gguf import read_gguf
from tinkerlm.formats.tokenizer import Tokenizer

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces,   runs of   spaces\n\n\nand newlines\r\n\ttabs\t\tend  ",
    "Grüße aus Köln, façade naïve; ¿Qué tal? Привет, мир! Γειά σου",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "مرحبا بالعالم — שלום עולם",
    "def add(a, b):\n\tif a:\n\t\treturn a + b\n    # four spaces\n    x = [1, 2, 3]  # done\n",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇩🇪 ❤️",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-05-17",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "<|endoftext|><repo_name>x<file_sep> not<|im_start special",
    "I'm sure you'll say they've done it, can't we?",
    "   ",
    "",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return transformers_from_gguf(smollm2_gguf, "tokenizer")


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return read_gguf(smollm2_gguf).tokenizer()


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_smollm2_ids_match_transformers(ours, reference, add_special_tokens):
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == reference.encode(text, add_special_tokens=add_special_tokens), (
            text
        )
    batch = ours.encode_batch(TEXTS, add_special_tokens)
    assert batch == [reference.encode(t, add_special_tokens=add_special_tokens) for t in TEXTS]


def test_smollm2_decode_matches_transformers(ours, reference):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text


def test_smollm2_special_tokens(ours, reference):
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )
    assert ours.stop_token_ids == [reference.eos_token_id]
    assert ours.chat_template == reference.chat_template and "<|im_start|>" in ours.chat_template
    assert ours.vocab_size == len(reference) == 49152
    assert ours.special_tokens_map() == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    }
    assert ours.id_to_token(ours.eos_token_id) == "<|im_end|>"
    # the GGUF says add_bos_token = False
    assert ours.encode("hi", add_special_tokens=True) == ours.encode("hi", add_special_tokens=False)


# --- a sentencepiece ("llama") vocabulary, scores only, merges recovered from them ---

SPM_PIECES = [
    "▁",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "a",
    "b",
    "c",
    "é",
    "你",
    "he",
    "ll",
    "▁h",
    "▁he",
    "▁hel",
    "llo",
    "▁hello",
    "▁w",
    "▁wo",
    "or",
    "▁wor",
    "ld",
    "▁world",
    "▁▁",
    "▁▁▁",
    "lo",
    "el",
    "▁a",
    "ab",
    "▁ab",
    "abc",
]
SPM_TEXTS = [
    "hello world",
    " hello",
    "  hello  world ",
    "héllo 你好 wörld",
    "abc<think>ab",
    "<s>hello</s>",
    "<|im_start|>hello",
    "\n\thello\n",
    "",
    " ",
    "hello<unk>",
    "ab abc abcab",
]


def write_spm_gguf(path, *, add_bos=None, add_space_prefix=None):
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *SPM_PIECES, "<think>", "<|im_start|>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(SPM_PIECES), 4, 3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0, 0.0]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("add_bos,add_space_prefix", [(None, None), (True, True), (False, None)])
def test_sentencepiece_gguf_matches_transformers(tmp_path, add_bos, add_space_prefix):
    from transformers import AutoTokenizer

    path = write_spm_gguf(tmp_path / "spm.gguf", add_bos=add_bos, add_space_prefix=add_space_prefix)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = read_gguf(path).tokenizer()
    for text in SPM_TEXTS:
        for special in (True, False):
            assert ours.encode(text, special) == reference.encode(text, add_special_tokens=special), (text, special)
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip), (text, skip)
    assert (ours.bos_token_id, ours.eos_token_id, ours.stop_token_ids) == (1, 2, [2])
    assert ours.encode("hi")[0] == 1 if add_bos is not False else ours.encode("hi")[0] != 1


def test_sentencepiece_merges_and_byte_fallback(tmp_path):
    ours = read_gguf(write_spm_gguf(tmp_path / "spm.gguf")).tokenizer()
    pieces = [ours.id_to_token(i) for i in ours.encode("hello 好", add_special_tokens=False)]
    # "好" is not in the vocabulary: its three UTF-8 bytes instead
    assert pieces == ["▁hello", "▁", "<0xE5>", "<0xA5>", "<0xBD>"]
    assert ours.decode(ours.encode("hello 好")) == "hello 好"
    assert [ours.id_to_token(i) for i in ours.encode("<think>ab", add_special_tokens=False)] == ["<think>", "ab"]


def test_sentencepiece_without_space_prefix(tmp_path):
    """add_space_prefix = False is honoured, as llama.cpp does (transformers 5.24 ignores it)."""
    ours = read_gguf(write_spm_gguf(tmp_path / "spm.gguf", add_space_prefix=False)).tokenizer()
    ids = ours.encode("hello world", add_special_tokens=False)
    assert [ours.id_to_token(i) for i in ids] == ["he", "llo", "▁world"]
    assert ours.decode(ids) == "hello world"


def test_gguf_tokenizer_errors(tmp_path):
    with pytest.raises(TinkerError, match="x.gguf: tokenizer.ggml.model 'bert'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")
    with pytest.raises(TinkerError, match="x.gguf: .*tokens is missing"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"}, "x.gguf")
    with pytest.raises(TinkerError, match="x.gguf: tokenizer.ggml.eos_token_id is 9"):
        Tokenizer.from_gguf_metadata(
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.eos_token_id": 9},
            "x.gguf",
        )


# --- Hugging Face directories ---


@pytest.fixture(scope="module")
def saved_dir(reference, tmp_path_factory):
    """The default model's tokenizer saved by transformers, with BOS added by its post-processor."""
    import copy

    tok = copy.deepcopy(reference)
    tok.add_bos_token = True
    path = tmp_path_factory.mktemp("hf")
    tok.save_pretrained(path)
    return path


def edited_copy(src, dst, config_edit=None, files=None):
    shutil.copytree(src, dst)
    if config_edit is not None:
        config = json.loads((dst / "tokenizer_config.json").read_text())
        config_edit(config)
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (dst / name).write_text(text)
    return dst


VARIANTS = {
    "as_saved": None,
    # transformers 5 ignores these flags when there is a tokenizer.json: its post-processor decides
    "bos_false": lambda c: c.update(add_bos_token=False),
    "eos_only": lambda c: c.update(add_eos_token=True),
    "bos_and_eos": lambda c: c.update(add_bos_token=True, add_eos_token=True),
    # a named token that is an ordinary vocabulary entry becomes a special, whole-matched token
    "plain_token_as_eos": lambda c: c.update(eos_token="Hello"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_dir_matches_transformers(saved_dir, tmp_path, variant):
    from transformers import AutoTokenizer

    path = edited_copy(saved_dir, tmp_path / "tok", VARIANTS[variant])
    reference = AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_hf_dir(path)
    for text in [*TEXTS[:3], TEXTS[8], "Hello world, Hello"]:
        for special in (True, False):
            assert ours.encode(text, special) == reference.encode(text, add_special_tokens=special), (text, special)
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip), (text, skip)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )
    assert ours.chat_template == reference.chat_template
    assert ours.vocab_size == len(reference)


def test_hf_dir_bos_from_post_processor(saved_dir, tmp_path):
    path = edited_copy(saved_dir, tmp_path / "tok", lambda c: c.update(add_bos_token=False, add_eos_token=True))
    ours = Tokenizer.from_hf_dir(path)
    assert ours.encode("hi")[0] == ours.bos_token_id == 1
    assert ours.encode("hi")[-1] != ours.eos_token_id
    assert ours.encode("hi", add_special_tokens=False)[0] != 1


def test_hf_dir_chat_template_and_stop_ids(saved_dir, tmp_path):
    path = edited_copy(
        saved_dir,
        tmp_path / "tok",
        lambda c: c.update(chat_template="from config"),
        files={"generation_config.json": json.dumps({"eos_token_id": [2, 0]})},
    )
    ours = Tokenizer.from_hf_dir(path)
    assert ours.chat_template == (saved_dir / "chat_template.jinja").read_text()  # the .jinja file wins
    assert ours.stop_token_ids == [2, 0]
    (path / "chat_template.jinja").unlink()
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    ours = Tokenizer.from_hf_dir(path)
    assert ours.chat_template == "from config"
    assert ours.stop_token_ids == [2, 0]


def test_hf_dir_missing_tokenizer_json(saved_dir, tmp_path):
    path = edited_copy(saved_dir, tmp_path / "tok")
    (path / "tokenizer.json").unlink()
    with pytest.raises(TinkerError, match="tokenizer.json: not found"):
        Tokenizer.from_hf_dir(path)
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TinkerError, match="tokenizer.json: cannot be read"):
        Tokenizer.from_hf_dir(path)


def test_hf_dir_wordpiece_clean_up_spaces(tmp_path):
    """clean_up_tokenization_spaces applies to non-BPE models, as in transformers."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import AutoTokenizer

    words = ["[UNK]", "hello", "world", ".", "it", "'", "s", "n't", "can", ",", "?"]
    backend = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "TokenizersBackend", "clean_up_tokenization_spaces": True, "unk_token": "[UNK]"})
    )
    reference = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    for text in ["hello , world . it's", "can't ?", "hello [UNK] world"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip), (text, skip)
    assert ours.decode(ours.encode("hello , world .")) == "hello, world."
