"""`tinkerlm tokenizer train`: a byte-level BPE tokenizer trained on plain text, stored with its data's sha256.

    tinkerlm tokenizer train --data corpus/ notes.txt --vocab-size 8192 --out mytok

The tokenizer is GPT-2's byte-level BPE (every byte is a token, so any text round-trips) with the Llama-3
pre-tokenizer pattern (`formats.tokenizer.PRE_TOKENIZER_SPLITS["llama-bpe"]`: digits in groups of up to three,
newlines kept together, which llama.cpp knows as `llama-bpe`, so an exported GGUF tokenizes the same). Training is
the `tokenizers` library's `BpeTrainer`; the special tokens come first (ids 0, 1, ...), then the 256 bytes, then the
merges.

Data: UTF-8 text files; a directory stands for its `*.txt`, `*.md`, `*.rst` and `*.py` files, recursively, in path
order (hidden files and folders skipped). Files are streamed in 1 MiB chunks (sha256 and progress bar as they are
read), so corpora larger than memory train too. Unless `--heldout FILE` is given, the last 5% of the data (at most
8 MiB, starting at a line start) is held out of training, and compression (UTF-8 bytes per token) is measured on it
for the new tokenizer and a reference (SmolLM2's by default).

In the store it is an entry of format "tokenizer": `tokenizer.json`, `tokenizer_config.json` (eos and the special
tokens), `chat_template.jinja` (when one is chosen) and `generation_config.json` (the stop ids, when more than EOS),
so transformers' `AutoTokenizer.from_pretrained(dir)` and `tinkerlm.formats.tokenizer.Tokenizer.from_hf_dir(dir)`
read it. Its manifest's `source` records every data file (path, size, sha256), the held-out text, the settings, the
compression figures and the tinkerlm and tokenizers versions.

References: Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units" (BPE),
https://arxiv.org/abs/1508.07909; GPT-2's byte-level alphabet (Radford et al. 2019); the `tokenizers` training
API: https://huggingface.co/docs/tokenizers/api/trainers
"""

from __future__ import annotations

import codecs
import hashlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tinkerlm import limits
from tinkerlm.errors import TinkerError

if TYPE_CHECKING:
    from tinkerlm.store import Manifest

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DATA_SUFFIXES = (".txt", ".md", ".rst", ".py")
HELDOUT_FRACTION = 0.05
HELDOUT_MAX_BYTES = 8 << 20
PRE_TOKENIZER = "llama-bpe"
BYTES = 256  # the byte alphabet every byte-level BPE vocabulary starts from
_CHUNK = 1 << 20
_PROGRESS_MIN_BYTES = 4 << 20  # less data reads and trains in a few seconds, without progress bars
_PIECE_MAX_CHARS = 4 << 20  # a text without newlines is still handed to the trainer in pieces of this size

# ChatML (as SmolLM2 and Qwen write it), without a default system prompt.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclass
class DataFile:
    path: Path
    size: int
    sha256: str = ""

    def record(self, role: str) -> dict:
        return {"role": role, "path": str(self.path), "size": self.size, "sha256": self.sha256}


@dataclass
class Result:
    """What `train_tokenizer` made: the stored manifest and the compression figures it printed."""

    manifest: Manifest
    compression: dict  # {"heldout_bytes", "tokenizers": {name: {"tokens", "bytes_per_token"}}, "note"}
    lines: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Checking the input (before anything is read or written)


def expand_data(paths: Sequence[str | Path], flag: str = "--data") -> list[DataFile]:
    """The data files `paths` name: files as given, directories as their text files (DATA_SUFFIXES), recursively,
    hidden ones skipped. `flag` names the option in error messages.

    Raises:
        TinkerError: no paths, a path that does not exist, a directory with no text files, or an empty file.
    """
    if not paths:
        raise TinkerError(f"{flag}: give at least one text file or directory")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.suffix in DATA_SUFFIXES
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise TinkerError(f"{flag} {p}: the directory holds no {', '.join(DATA_SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise TinkerError(f"{flag} {p}: no such file or directory")
    out = []
    for f in dict.fromkeys(f.resolve() for f in files):  # a file named twice is read once
        size = f.stat().st_size
        if size == 0:
            raise TinkerError(f"{flag} {f}: the file is empty; remove it from {flag}")
        out.append(DataFile(f, size))
    return out


def check_special_tokens(special_tokens: Sequence[str], vocab_size: int, chat_template: str) -> list[str]:
    """The special tokens, checked against the vocabulary size and the chat template.

    Raises:
        TinkerError: an empty or repeated token, a vocabulary too small for them plus the byte alphabet, or a ChatML
            template without its tokens.
    """
    tokens = list(special_tokens)
    for t in tokens:
        if not t or not t.strip():
            raise TinkerError(f"--special-tokens: {t!r} is blank; special tokens need visible text such as <|eot|>")
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise TinkerError(f"--special-tokens: {', '.join(repeated)} given more than once")
    need = BYTES + len(tokens)
    if not need <= vocab_size <= limits.MAX_VOCAB:
        raise TinkerError(
            f"--vocab-size {vocab_size}: must be at least {need} (the {BYTES} byte tokens plus {len(tokens)} special "
            f"tokens) and at most {limits.MAX_VOCAB}; try {max(need * 2, 1024)} or more"
        )
    if chat_template == "chatml":
        missing = [t for t in CHATML_TOKENS if t not in tokens]
        if missing:
            raise TinkerError(
                f"--chat-template chatml: needs {', '.join(missing)} in --special-tokens (or --chat-template none)"
            )
    return tokens


def read_chat_template(chat_template: str) -> tuple[str | None, dict]:
    """(template text or None, its record for the manifest) for `chatml`, `none` or a Jinja FILE.

    Raises:
        TinkerError: the file cannot be read or is not UTF-8.
    """
    if chat_template == "none":
        return None, {"name": "none"}
    if chat_template == "chatml":
        return CHATML, {"name": "chatml", "sha256": hashlib.sha256(CHATML.encode()).hexdigest()}
    path = Path(chat_template)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TinkerError(f"--chat-template {path}: no such file (give chatml, none, or a Jinja template file)")
    except (OSError, UnicodeDecodeError) as e:
        raise TinkerError(f"--chat-template {path}: cannot read it as UTF-8 text ({e})")
    if not text.strip():
        raise TinkerError(f"--chat-template {path}: the file is empty")
    return text, {"name": "file", "path": str(path.resolve()), "sha256": hashlib.sha256(text.encode()).hexdigest()}


# ---------------------------------------------------------------------------------------------------------------
# Reading the data: one pass that hashes, decodes, feeds the trainer and keeps the held-out tail


class Corpus:
    """The data files, read once in chunks: `training_text()` yields the text to train on (whole lines, each file
    its own document) while hashing every file; the text after `cut` (a byte offset into the files laid end to end,
    moved on to the next line start) is kept in `heldout` instead."""

    def __init__(self, files: list[DataFile], cut: int, bar=None):
        self.files, self.cut, self.bar = files, cut, bar
        self.heldout_parts: list[str] = []
        self.heldout_start: dict | None = None  # {"path", "offset"} where the held-out text begins
        self.training_bytes = 0

    @property
    def heldout(self) -> str:
        return "".join(self.heldout_parts)

    def training_text(self) -> Iterator[str]:
        base = 0  # offset of the current file in the files laid end to end
        for f in self.files:
            if self.heldout_start is None and 0 < self.cut <= base:
                self.heldout_start = {"path": str(f.path), "offset": 0}
            yield from self._read(f, base)
            base += f.size

    def _read(self, f: DataFile, base: int) -> Iterator[str]:
        h = hashlib.sha256()
        decoder = codecs.getincrementaldecoder("utf-8")()
        carry, offset = "", 0
        try:
            fh = open(f.path, "rb")
        except OSError as e:
            raise TinkerError(f"--data {f.path}: cannot read it ({e.strerror or e})") from None
        with fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
                if self.bar is not None:
                    self.bar.update(len(chunk))
                train, held = chunk, b""
                if self.heldout_start is not None:
                    train, held = b"", chunk
                elif base + offset + len(chunk) > self.cut:  # the cut, or the line start after it, may be here
                    i = chunk.find(b"\n", max(self.cut - base - offset, 0))
                    if i >= 0:
                        train, held = chunk[: i + 1], chunk[i + 1 :]
                        self.heldout_start = {"path": str(f.path), "offset": offset + i + 1}
                text = carry + _decode(decoder, train, f, offset)
                self.training_bytes += len(train)
                if held:
                    self.heldout_parts.append(_decode(decoder, held, f, offset + len(train)))
                # Whole lines to the trainer, so no word is split between two pieces.
                end = text.rfind("\n") + 1
                if end == 0 and len(text) > _PIECE_MAX_CHARS:
                    end = len(text)
                if end:
                    yield text[:end]
                carry = text[end:]
                offset += len(chunk)
        tail = _decode(decoder, b"", f, offset, final=True)  # a character cut off at the end of the file
        if self.heldout_start is not None and not carry:
            self.heldout_parts.append(tail)
        elif carry + tail:
            yield carry + tail
        f.sha256 = h.hexdigest()
        if offset != f.size:
            raise TinkerError(f"--data {f.path}: the file changed while it was read ({f.size} -> {offset} bytes)")


def _decode(decoder, data: bytes, f: DataFile, offset: int, final: bool = False) -> str:
    try:
        return decoder.decode(data, final=final)
    except UnicodeDecodeError as e:
        raise TinkerError(
            f"{f.path}: not UTF-8 text near byte {offset + e.start} ({e.reason}); convert it to UTF-8 "
            f"(e.g. with iconv) or leave it out"
        ) from None


def heldout_cut(total: int) -> int:
    """Where the held-out tail of `total` bytes of data starts: the last HELDOUT_FRACTION, at most
    HELDOUT_MAX_BYTES."""
    return total - min(round(total * HELDOUT_FRACTION), HELDOUT_MAX_BYTES)


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer and its compression


def new_backend():
    """An untrained byte-level BPE `tokenizers.Tokenizer` with the Llama-3 split pattern (see the module doc)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from tinkerlm.formats.tokenizer import PRE_TOKENIZER_SPLITS

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[PRE_TOKENIZER]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no BOS/EOS, as SmolLM2's
    return backend


def compression(tokenizer, text: str) -> dict:
    """{"tokens", "bytes_per_token"} of `text` (UTF-8 bytes) under `tokenizer` (a tinkerlm `Tokenizer`), no
    BOS/EOS. The text is encoded in pieces of whole lines (~1 MiB each) so long texts use all cores."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + _CHUNK)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(pieces, add_special_tokens=False))
    n = len(text.encode("utf-8"))
    return {"tokens": tokens, "bytes_per_token": round(n / tokens, 4) if tokens else None}


def reference_tokenizer(compare: str):
    """(name, tokenizer) of the model or tokenizer to compare with: a store name (named by its ref), a .gguf file or
    a Hugging Face directory (named by its file name); (name, None) when it is a store name not in the store
    (nothing is pulled)."""
    from tinkerlm import store
    from tinkerlm.formats.tokenizer import Tokenizer

    path = Path(compare)
    if path.exists():
        m, where = None, path
    else:
        m = store.find(compare)
        if m is None:
            return compare, None
        if m.format == "lora":
            raise TinkerError(f"--compare {compare}: a LoRA adapter has its base's tokenizer; compare with the base")
        where = store.model_path(m)
    name = m.ref if m else path.resolve().name  # the file or directory name: a short column in the report
    if where.is_file():
        from tinkerlm.formats.gguf import read_gguf

        return name, read_gguf(where).tokenizer()
    return name, Tokenizer.from_hf_dir(where)


# ---------------------------------------------------------------------------------------------------------------
# The verb


def train_tokenizer(
    data: Sequence[str | Path],
    vocab_size: int,
    out: str,
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    chat_template: str = "chatml",
    heldout: str | Path | None = None,
    min_frequency: int = 2,
    compare: str = "smollm2",
    license: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Train a byte-level BPE tokenizer on `data` and store it as `out` (a store entry of format "tokenizer").

    Args:
        data: text files and directories (see `expand_data`).
        vocab_size: the vocabulary size wanted, special tokens and the 256 bytes included; a small corpus may give
            fewer (it is then stored with what it gave, and a warning says so).
        out: store name `NAME[:TAG]`.
        special_tokens: added first (ids 0, 1, ...), never split; the first is EOS, the end-of-document token.
        chat_template: "chatml" (needs <|im_start|> and <|im_end|>; <|im_end|> then also stops generation), "none",
            or a Jinja template file.
        heldout: a text file (or directory, as in `data`) to measure compression on; None holds out the data's
            last 5% (at most 8 MiB).
        min_frequency: a pair must occur this often to be merged.
        compare: the tokenizer to compare compression with (a store name, .gguf file or HF directory; "none"
            skips it). A store name not in the store is skipped with a note; nothing is pulled.
        license: the licence the tokenizer is given (that of its data, say); recorded in the manifest.
        force: replace an entry already stored as `out`.
        progress: progress bars on stderr while reading and training (for 4 MiB of data or more).

    Returns:
        The manifest as stored, the compression figures and the report's lines.

    Raises:
        TinkerError: bad input (missing, empty or non-UTF-8 data, a vocabulary too small for the special tokens
            plus the byte alphabet, a bad name, a name taken without `force`); nothing is written to the store.
    """
    from tinkerlm import store
    from tinkerlm.chat import render
    from tinkerlm.formats.tokenizer import Tokenizer

    # Everything that can be checked before reading the data is checked first, so a typo costs no training time.
    name, tag = store.parse_name(out)
    if not force and store.find(f"{name}:{tag}") is not None:
        raise TinkerError(f"--out {name}:{tag}: already in the store; pick another name, or replace it with --force")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise TinkerError(f"--min-frequency {min_frequency}: must be 1 or more")
    tokens = check_special_tokens(special_tokens, vocab_size, chat_template)
    template, template_record = read_chat_template(chat_template)
    files = expand_data(data)
    heldout_files = expand_data([heldout], "--heldout") if heldout is not None else []
    overlap = [str(f.path) for f in heldout_files if f.path in {d.path for d in files}]
    total = sum(f.size for f in files)
    ref_name, reference = (compare, None) if compare == "none" else reference_tokenizer(compare)

    from tokenizers import __version__ as tokenizers_version
    from tokenizers import pre_tokenizers, trainers
    from tqdm.auto import tqdm

    show = progress and total >= _PROGRESS_MIN_BYTES
    backend = new_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # Its own bars would fight tqdm's for the line, and write newlines to stdout even when hidden.
        show_progress=False,
    )
    cut = total if heldout_files else heldout_cut(total)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not show)
    corpus = Corpus(files, cut, bar)

    def pieces() -> Iterator[str]:
        # Reading is most of the time; what follows it gets one line.
        yield from corpus.training_text()
        bar.close()
        if show:
            print(f"counting pairs and learning up to {vocab_size - len(tokens) - BYTES} merges ...", file=sys.stderr)

    try:
        backend.train_from_iterator(pieces(), trainer)
    finally:
        bar.close()
    if corpus.training_bytes == 0:
        raise TinkerError("--data: no text left to train on after holding out the tail; give more data or --heldout")
    trained = backend.get_vocab_size(with_added_tokens=True)
    warnings = []
    if overlap:
        warnings.append(f"--heldout {', '.join(overlap)} is also in --data: compression is measured on trained text")
    if trained < vocab_size:
        warnings.append(
            f"the data gave {trained} tokens, fewer than --vocab-size {vocab_size} (too little text, or "
            f"--min-frequency {min_frequency} too high); stored with {trained}"
        )

    eos = tokens[0] if tokens else None
    stops = [backend.token_to_id("<|im_end|>")] if chat_template == "chatml" and eos != "<|im_end|>" else []
    tok = Tokenizer(backend, eos_token=eos, extra_stop_ids=stops, chat_template=template)
    if template is not None:  # a template that cannot render is refused here, not at the first chat
        tok.chat_template_source = f"--chat-template {chat_template}"
        render(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])

    # Compression on the held-out text, ours and the reference's.
    if heldout_files:
        text = "".join(map(_read_heldout, heldout_files))
        heldout_record = {"from": "file", "files": [f.record("heldout") for f in heldout_files]}
    else:
        text = corpus.heldout
        heldout_record = {"from": "data", "fraction": HELDOUT_FRACTION, "max_bytes": HELDOUT_MAX_BYTES}
        heldout_record.update(start=corpus.heldout_start, bytes=len(text.encode("utf-8")))
    figures: dict = {"heldout_bytes": len(text.encode("utf-8")), "compare": compare, "tokenizers": {}}
    if text:
        figures["tokenizers"][f"{name}:{tag}"] = compression(tok, text)
        if reference is not None:
            figures["tokenizers"][ref_name] = compression(reference, text)
        elif compare != "none":
            figures["note"] = f"{compare} is not in the store; `tinkerlm pull {compare}` to compare with it"
    else:
        figures["note"] = "no held-out text (the data's tail is one line); pass --heldout FILE to measure compression"

    from tinkerlm import __version__

    source = {
        "type": "tokenizer",
        "uri": f"tokenizer-train:{name}:{tag}",
        "method": "byte-level-bpe",
        "pre_tokenizer": PRE_TOKENIZER,
        "vocab_size": vocab_size,
        "vocab_size_trained": trained,
        "min_frequency": min_frequency,
        "special_tokens": tokens,
        "eos_token": eos,
        "chat_template": template_record,
        "data": [f.record("train") for f in files],
        "data_bytes": total,
        "training_bytes": corpus.training_bytes,
        "heldout": heldout_record,
        "compression": figures,
        "tinkerlm": __version__,
        "tokenizers": tokenizers_version,
    }
    info = {
        "format": "tokenizer",
        "architecture": "bpe",
        "parameters": 0,
        "quantization": "-",
        "context_length": 0,
        "license": license,
        "parents": [],
    }
    m = store.add(
        f"{name}:{tag}",
        tok.save_hf,
        source=source,
        parents=[],
        license=license,
        force=force,
        info=info,
    )
    lines = [*(f"warning: {w}" for w in warnings), *report(m, source)]
    return Result(m, figures, lines)


def _read_heldout(f: DataFile) -> str:
    data = f.path.read_bytes()
    f.sha256 = hashlib.sha256(data).hexdigest()
    return _decode(codecs.getincrementaldecoder("utf-8")(), data, f, 0, final=True)


def report(m: Manifest, source: dict) -> list[str]:
    """The lines `tinkerlm tokenizer train` prints: what was stored, what it was trained on, its compression."""
    from tinkerlm.store import format_size

    n = len(source["data"])
    lines = [
        f"stored {m.ref}: byte-level BPE, {source['vocab_size_trained']} tokens "
        f"({len(source['special_tokens'])} special), chat template {source['chat_template']['name']}",
        f"trained on {format_size(source['training_bytes'])} of {n} file{'s' * (n != 1)} "
        f"({format_size(source['data_bytes'])})",
    ]
    figures = source["compression"]
    held = source["heldout"]
    where = ", ".join(f["path"] for f in held["files"]) if held["from"] == "file" else "the data's last 5%"
    lines.append(f"compression on {format_size(figures['heldout_bytes'])} of held-out text ({where}):")
    width = max(map(len, figures["tokenizers"]), default=0)
    for ref, c in figures["tokenizers"].items():
        lines.append(f"  {ref:<{width}}  {c['bytes_per_token']:.3f} bytes/token  ({c['tokens']:,} tokens)")
    if figures.get("note"):
        lines.append(f"  ({figures['note']})")
    return lines


def main(a) -> None:
    """`tinkerlm tokenizer train`: flags as `train_tokenizer`'s keyword arguments."""
    result = train_tokenizer(
        a.data,
        a.vocab_size,
        a.out,
        special_tokens=a.special_tokens,
        chat_template=a.chat_template,
        heldout=a.heldout,
        min_frequency=a.min_frequency,
        compare=a.compare,
        license=a.license,
        force=a.force,
        progress=sys.stderr.isatty(),  # a log gets the report, not a bar drawn line by line
    )
    for line in result.lines:
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
