"""`tinkerlm tokenizer train`: byte-level BPE trained on the Python standard library's own source (PSF licence),
stored with its data's sha256; round trips, parity with transformers, the chat template, compression against
SmolLM2's tokenizer, and bad input (one line, exit 2, the store untouched)."""

import hashlib
import json
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tinkerlm import __version__, store
from tinkerlm import tokenizer_train as tt
from tinkerlm.chat import prompt_ids, render
from tinkerlm.cli import main
from tinkerlm.errors import TinkerError
from tinkerlm.formats.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = ["textwrap.py", "string.py", "bisect.py", "heapq.py", "shlex.py", "fnmatch.py", "colorsys.py"]
VOCAB = 700

TEXTS = [
    "def f(x):\n    return x + 1\n",
    "Hello, world! 12345 3.14159 ünïcödé naïve café",
    "  leading spaces\tand\ttabs\r\nCRLF line\rCR\n\n\nblank lines",
    "emoji 🙂👍🏽 👨‍👩‍👧 and CJK 漢字かなカナ 한국어, Arabic مرحبا, Hindi नमस्ते",
    "special text inline: <|im_start|>user hi<|im_end|> <|endoftext|>",
    "\x00NUL\x01\x7f\u200b zero-width, \ufeffBOM, \U0010ffff max",
    "",
    " ",
    "x" * 500,
]


@pytest.fixture(scope="module")
def sources() -> list[Path]:
    return [STDLIB / name for name in SOURCES]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sources, smollm2_gguf):
    """One tokenizer trained through the verb's function into its own store, compared with SmolLM2's."""
    home = tmp_path_factory.mktemp("toktrain") / "store"
    old = os.environ.get("TINKERLM_HOME")
    os.environ["TINKERLM_HOME"] = str(home)
    try:
        result = tt.train_tokenizer(
            sources, VOCAB, "pytok", compare=str(smollm2_gguf), license="PSF-2.0", progress=False
        )
        return result, store.model_path(result.manifest)
    finally:
        if old is None:
            os.environ.pop("TINKERLM_HOME", None)
        else:
            os.environ["TINKERLM_HOME"] = old


def arbitrary_texts(n: int = 40) -> list[str]:
    """Random bytes read as UTF-8 (invalid bytes replaced or dropped) and as Latin-1, and random code points from
    all planes (surrogates excluded: they cannot be UTF-8), with emoji, NUL and CRLF mixed in."""
    rng = random.Random(18)
    out = []
    for i in range(n):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        out.append(raw.decode("utf-8", errors="replace" if i % 2 else "ignore"))
        out.append(raw.decode("latin-1"))
        points = [rng.choice([rng.randrange(0x80), rng.randrange(0xD800), rng.randrange(0xE000, 0x110000)])]
        points += [rng.randrange(0xE000, 0x110000) if rng.random() < 0.3 else rng.randrange(0x3000) for _ in range(60)]
        out.append("".join(map(chr, points)) + "\r\n\x00🙂🏳️‍🌈\r" + chr(rng.randrange(0x1F300, 0x1FAFF)))
    return out


def test_round_trip_of_arbitrary_text(trained):
    from transformers import AutoTokenizer

    _, path = trained
    ours = Tokenizer.from_hf_dir(path)
    theirs = AutoTokenizer.from_pretrained(path)
    for text in arbitrary_texts() + TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert theirs.decode(theirs.encode(text), skip_special_tokens=False) == text
        assert all(0 <= i < VOCAB for i in ids)
    # Every byte value is a token of its own: a text of all 256 bytes (as Latin-1) needs no unknown token.
    every = bytes(range(256)).decode("latin-1")
    assert ours.decode(ours.encode(every)) == every


def test_loads_in_transformers_with_the_same_ids(trained):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, path = trained
    ours = Tokenizer.from_hf_dir(path)
    auto = AutoTokenizer.from_pretrained(path)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    texts = TEXTS + arbitrary_texts(10) + [(STDLIB / "this.py").read_text()]
    for text in texts:
        ids = ours.encode(text)
        assert auto.encode(text) == ids, text
        assert fast.encode(text) == ids, text
        assert auto.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)
    assert auto.eos_token == ours.eos_token == "<|endoftext|>"
    assert ours.vocab_size == len(auto) == VOCAB
    # The special tokens are ids 0, 1, 2 and are matched whole.
    assert [ours.backend.token_to_id(t) for t in tt.DEFAULT_SPECIAL_TOKENS] == [0, 1, 2]
    assert ours.encode("<|im_start|><|im_end|>") == auto.encode("<|im_start|><|im_end|>") == [1, 2]
    # Trained on code: a common Python keyword is one token.
    assert len(ours.encode(" return")) == 1


def test_llamacpp_tokenizes_it_the_same(trained, tmp_path):
    """Written as GGUF tokenizer metadata (as `tinkerlm export` writes it, pre-tokenizer `llama-bpe`), llama.cpp and
    tinkerlm's GGUF reader give the same ids as the stored tokenizer."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tinkerlm.formats.gguf import read_gguf
    from tinkerlm.formats.gguf_write import write_gguf

    tok = Tokenizer.from_hf_dir(trained[1])
    hparams = {"context_length": 64, "embedding_length": 8, "block_count": 1, "feed_forward_length": 8}
    hparams |= {"attention.head_count": 1, "attention.head_count_kv": 1, "attention.layer_norm_rms_epsilon": 1e-5}
    meta = {"general.architecture": "llama", **{f"llama.{k}": v for k, v in hparams.items()}, **tok.gguf_metadata()}
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    path = write_gguf(tmp_path / "vocab.gguf", meta, [])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    again = read_gguf(path).tokenizer()
    for text in TEXTS + [(STDLIB / "this.py").read_text()]:
        ids = tok.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert again.encode(text) == tok.encode(text), text


def test_chat_template_renders_with_the_special_tokens(trained):
    from transformers import AutoTokenizer

    _, path = trained
    tok = Tokenizer.from_hf_dir(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|>"}]
    text = render(tok, messages)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|><|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    assert text == AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = prompt_ids(tok, messages)
    assert ids.count(1) == 3 and ids.count(2) == 2  # the template's markup; the content's <|im_end|> stays text
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.stop_token_ids == [0, 2]  # <|endoftext|> and the end of a turn both stop generation


def test_manifest_records_the_data(trained, sources):
    result, path = trained
    m = result.manifest
    assert (m.format, m.license, m.parents) == ("tokenizer", "PSF-2.0", [])
    src = m.source
    assert src["type"] == "tokenizer" and src["tinkerlm"] == __version__
    assert [d["path"] for d in src["data"]] == [str(p.resolve()) for p in sources]
    for d, p in zip(src["data"], sources):
        assert d["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert d["size"] == p.stat().st_size
    assert (src["vocab_size"], src["vocab_size_trained"]) == (VOCAB, VOCAB)
    assert src["special_tokens"] == list(tt.DEFAULT_SPECIAL_TOKENS)
    assert src["chat_template"]["sha256"] == hashlib.sha256(tt.CHATML.encode()).hexdigest()
    stored = {f["path"]: f["sha256"] for f in m.files}
    assert set(stored) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"}
    assert all(hashlib.sha256((path / f).read_bytes()).hexdigest() == h for f, h in stored.items())
    assert json.loads((path / store.MANIFEST).read_text())["source"] == src
    assert "tokenizer trained here on 7 files" in store.format_manifest(m)


def test_compression_is_reported_against_smollm2(trained, smollm2_gguf):
    result, _ = trained
    src = result.manifest.source
    figures = result.compression
    held = src["heldout"]
    # The held-out tail is the data's last ~5% and was not trained on.
    assert src["training_bytes"] + held["bytes"] == src["data_bytes"]
    assert 0.04 < held["bytes"] / src["data_bytes"] < 0.06
    assert held["start"]["path"] == str((STDLIB / SOURCES[-1]).resolve())
    ours = figures["tokenizers"]["pytok:latest"]
    ref = figures["tokenizers"][smollm2_gguf.name]
    assert 1.0 < ours["bytes_per_token"] < 8.0
    assert 1.0 < ref["bytes_per_token"] < 8.0
    # A 49k vocabulary compresses better than a 700-token one.
    assert ref["bytes_per_token"] > ours["bytes_per_token"]
    assert ours["tokens"] * ours["bytes_per_token"] == pytest.approx(held["bytes"], rel=1e-3)
    report = "\n".join(result.lines)
    assert "bytes/token" in report and smollm2_gguf.name in report and figures["compare"] == str(smollm2_gguf)


@pytest.mark.parametrize("chunk", [3, 7, 64, 1 << 20])
def test_held_out_tail_splits_the_text_exactly(tmp_path, monkeypatch, chunk):
    """Training text + held-out text == the files laid end to end, cut at a line start, whatever the chunk size
    (multi-byte characters across chunks included)."""
    monkeypatch.setattr(tt, "_CHUNK", chunk)
    texts = ["héllo\nwörld 🙂\r\nline three\n", "ß" * 30 + "\n" + "second file 🙂\nend", "third\nfile\n"]
    files = []
    for i, t in enumerate(texts):
        p = tmp_path / f"{i}.txt"
        p.write_text(t, encoding="utf-8", newline="")
        files.append(p)
    whole = "".join(texts)
    total = len(whole.encode())
    for cut in (5, 30, 40, total - 20, total - 3, total):
        corpus = tt.Corpus(tt.expand_data(files), cut)
        pieces = list(corpus.training_text())
        assert "".join(pieces) + corpus.heldout == whole
        assert not corpus.heldout or corpus.heldout_start["offset"] == 0 or "".join(pieces).endswith("\n")
        assert corpus.training_bytes == len("".join(pieces).encode())
        assert [f.sha256 for f in corpus.files] == [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        assert all(p for p in pieces)


def test_directory_stands_for_its_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    for name in ("a.txt", "sub/b.py", "sub/c.md", ".git/d.txt", ".e.txt", "f.bin", "g.json"):
        (tmp_path / name).write_text("text\n")
    found = [f.path.relative_to(tmp_path).as_posix() for f in tt.expand_data([tmp_path, tmp_path / "a.txt"])]
    assert found == ["a.txt", "sub/b.py", "sub/c.md"]


def test_cli_trains_and_stores(tmp_path, store_home, sources):
    """The verb end to end in a subprocess: SmolLM2 is not in this store, so the comparison is skipped with a note."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}")
    proc = subprocess.run(
        [sys.executable, "-m", "tinkerlm", "tokenizer", "train", "--data", *map(str, sources[:3])]
        + ["--vocab-size", "400", "--out", "small:v1", "--special-tokens", "<|end|>", "<|user|>"]
        + ["--chat-template", str(template), "--min-frequency", "3"],
        capture_output=True,
        text=True,
        env={**os.environ, "TINKERLM_HOME": str(store_home)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "stored small:v1: byte-level BPE, 400 tokens (2 special), chat template file" in proc.stdout
    assert "smollm2 is not in the store" in proc.stdout
    assert "Traceback" not in proc.stderr
    m = store.get("small:v1")
    tok = Tokenizer.from_hf_dir(store.model_path(m))
    assert tok.eos_token == "<|end|>" and tok.stop_token_ids == [0]
    assert render(tok, [{"role": "user", "content": "hi"}]) == "<|user|>hi<|end|>"
    assert m.source["min_frequency"] == 3 and m.source["chat_template"]["path"] == str(template.resolve())
    assert m.source["compression"]["tokenizers"]["small:v1"]["bytes_per_token"] > 1


def test_small_data_warns_of_a_smaller_vocabulary_and_heldout_file(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat\n" * 20 + "a dog\n")
    result = tt.train_tokenizer(
        [data], 5000, "tiny", heldout=data, compare="none", chat_template="none", progress=False
    )
    src = result.manifest.source
    trained = src["vocab_size_trained"]
    assert 259 < trained < 5000
    assert result.lines[0] == f"warning: --heldout {data} is also in --data: compression is measured on trained text"
    assert result.lines[1].startswith(f"warning: the data gave {trained} tokens")
    assert src["training_bytes"] == src["data_bytes"] == data.stat().st_size  # nothing held out of the data
    assert src["heldout"]["files"][0]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert src["compression"]["tokenizers"]["tiny:latest"]["bytes_per_token"] > 1
    assert not (store.model_path(result.manifest) / "chat_template.jinja").exists()
    from tinkerlm.api import resolve

    with pytest.raises(TinkerError, match="tiny:latest is a tokenizer, not a model"):
        resolve("tiny")  # what `tinkerlm run/export/eval` look models up with


def test_same_data_same_tokenizer(sources):
    """What the manifest records is enough to make the tokenizer again, byte for byte."""
    digests, figures = [], []
    for tag, compare in (("a", "none"), ("b", "again:a")):  # b is compared with a, by store name
        m = tt.train_tokenizer(sources[:4], 500, f"again:{tag}", compare=compare, progress=False).manifest
        digests.append(next(f["sha256"] for f in m.files if f["path"] == "tokenizer.json"))
        figures.append(m.source["compression"]["tokenizers"])
    assert digests[0] == digests[1]
    assert figures[1]["again:b"] == figures[1]["again:a"] == figures[0]["again:a"]


def snapshot(root: Path) -> dict:
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, store_home, sources, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes(b"plain text\n" * 10 + "caf\xe9\n".encode("latin-1"))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    stdlib = str(sources[0])
    assert main(["tokenizer", "train", "--data", stdlib, "--vocab-size", "400", "--out", "taken"]) == 0
    capsys.readouterr()
    cases = [
        (["--data", str(empty), "--vocab-size", "400"], "the file is empty"),
        (["--data", str(tmp_path / "missing.txt"), "--vocab-size", "400"], "no such file or directory"),
        (["--data", stdlib, "--vocab-size", "258"], "must be at least 259"),
        (
            ["--data", stdlib, "--vocab-size", "300", "--special-tokens", *[f"<s{i}>" for i in range(50)]],
            "at least 306",
        ),
        (["--data", str(binary), "--vocab-size", "400"], "not UTF-8 text near byte 113"),
        (["--data", stdlib, "--vocab-size", "400", "--special-tokens", "<|endoftext|>"], "needs <|im_start|>"),
        (["--data", stdlib, "--vocab-size", "400", "--chat-template", str(broken)], str(broken)),
        (["--data", stdlib, "--vocab-size", "400", "--heldout", str(empty)], "--heldout"),
        (["--data", stdlib, "--vocab-size", "400", "--min-frequency", "0"], "--min-frequency"),
        (["--data", stdlib, "--vocab-size", "400", "--compare", "Bad Name"], "bad model name"),
    ]
    before = snapshot(store_home)
    for args, needle in cases:
        assert main(["tokenizer", "train", *args, "--out", "new"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tinkerlm: error: ") and needle in err[0], (args, err)
        assert snapshot(store_home) == before, args
    assert main(["tokenizer", "train", "--data", stdlib, "--vocab-size", "400", "--out", "taken"]) == 2
    assert "already in the store" in capsys.readouterr().err
    assert snapshot(store_home) == before


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom tinkerlm.cli import main\n"
        "for argv in (['tokenizer', '--help'], ['tokenizer', 'train', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--vocab-size" in proc.stdout and "--chat-template" in proc.stdout
