"""The tokenizer: a `tokenizers.Tokenizer` plus the special tokens, stop ids and chat template a model needs.

Two sources:
- A Hugging Face directory: `tokenizer.json` is the backend, its post-processor deciding BOS/EOS;
  `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json` and `chat_template.jinja` add the
  special tokens, stop ids and chat template.
- A GGUF file: the vocabulary, merges or scores and special ids live in `tokenizer.ggml.*` metadata; we rebuild the
  tokenizer they describe: byte-level BPE ("gpt2") or sentencepiece-style BPE with byte fallback ("llama").

And one destination besides `save_hf`: `gguf_metadata()` gives the `tokenizer.ggml.*` keys llama.cpp reads. A
tokenizer read from GGUF gives back its file's keys; one read from tokenizer.json is described as llama.cpp's
converter (convert_hf_to_gguf.py) describes it, `tokenizer.ggml.pre` named from the pre-tokenizer's pattern.

References:
- tokenizers pipeline (normalizer, pre-tokenizer, model, post-processor, decoder):
  https://huggingface.co/docs/tokenizers/pipeline
- GGUF tokenizer keys: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md#tokenizer
- llama.cpp's pre-tokenizer names and their patterns: src/llama-vocab.cpp (`llama_vocab::impl::load`,
  `llm_tokenizer_bpe`); its converter's vocabulary export: convert_hf_to_gguf.py (`get_vocab_base`)
- GPT-2 byte-level BPE: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners";
  SentencePiece: Kudo & Richardson 2018, https://arxiv.org/abs/1808.06226
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from tinkerlm import limits
from tinkerlm.errors import TinkerError

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns, chosen by `tokenizer.ggml.pre`. Unlisted names use GPT-2's own pattern.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
    **dict.fromkeys(["gpt-4o", "llama4"], _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}

# llama.cpp's pre-tokenizers that isolate every digit, then split as GPT-2 does (SmolLM, StarCoder...).
DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2")

# For writers: the `tokenizer.ggml.pre` named for each split pattern (llama.cpp's converter names it by hashing a
# test string's ids, which matches only the exact vocabularies it lists; the pattern matches their fine-tunes too).
PRE_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2", _GPT4O_SPLIT: "gpt-4o", _TEKKEN_SPLIT: "tekken"}
FALLBACK_PRE = "gpt-2"  # GPT-2's pattern, which both llama.cpp and tinkerlm apply for this name

_NAMED = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """Text <-> ids, with the special tokens and chat template that go with them.

    `encode(text, add_special_tokens=True)` gives the ids transformers gives for the same files and flag.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        extra_stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
        clean_up_spaces: bool = False,
    ):
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.bos_token_id = _token_id(backend, bos_token)
        self.eos_token_id = _token_id(backend, eos_token)
        self.unk_token_id = _token_id(backend, unk_token)
        self.pad_token_id = _token_id(backend, pad_token)
        stops = [self.eos_token_id, *extra_stop_ids]
        self.stop_token_ids: list[int] = list(dict.fromkeys(int(i) for i in stops if i is not None))
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._clean_up_spaces = clean_up_spaces
        self._gguf_source: dict[str, Any] | None = None  # the tokenizer.* keys of the GGUF file it was read from

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; `add_special_tokens` adds BOS/EOS where the tokenizer's template says so."""
        # encode_batch releases the GIL while it works (encode does not): a server tokenizing a huge prompt in a
        # worker thread keeps answering other requests. The ids are the same.
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_spans(self, text: str, plain: Iterable[tuple[int, int]]) -> list[int]:
        """Ids of `text` (no BOS/EOS added) with special tokens parsed except inside the `plain` character spans,
        whose special-token text stays text (message contents in a rendered chat template).

        Special tokens cut text into pieces that are tokenized independently. A text whose special tokens all lie
        outside `plain` gets exactly `encode(text, False)`; otherwise the special tokens outside `plain` are kept
        and the text between them is tokenized by a copy of the backend that matches no special tokens.
        """
        enc = self.backend.encode_batch([text], add_special_tokens=False)[0]  # GIL released, as in `encode`
        spans = sorted((a, b) for a, b in plain if b > a)
        special = _special_ids(self)
        cuts, forged, j = [], False, 0
        for i, (a, b) in zip(enc.ids, enc.offsets):
            if i not in special:
                continue
            while j < len(spans) and spans[j][1] <= a:
                j += 1
            if j < len(spans) and spans[j][0] < b:  # overlaps a content span: it came from a message
                forged = True
            else:
                cuts.append((a, b, i))
        return _encode_between(self, text, cuts) if forged else list(enc.ids)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up_spaces else text

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, as strings: the variables chat templates read."""
        return {name: getattr(self, name) for name in _NAMED if getattr(self, name) is not None}

    def save_hf(self, model_dir: str | os.PathLike) -> list[str]:
        """Write this tokenizer as a Hugging Face tokenizer (whatever it was loaded from); returns the file names.

        `tokenizer.json` carries the vocabulary and the BOS/EOS post-processor, `tokenizer_config.json` the named
        special tokens and `chat_template.jinja` the template, so `from_hf_dir` and transformers read it back the
        same. Stop ids beyond EOS go to `generation_config.json` (merged into one that is already there).
        """
        d = Path(model_dir)
        d.mkdir(parents=True, exist_ok=True)
        written = ["tokenizer.json", "tokenizer_config.json"]
        self.backend.save(str(d / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": self._clean_up_spaces,
        }
        config.update(self.special_tokens_map())
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if self.chat_template is not None:
            (d / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            written.append("chat_template.jinja")
        if len(self.stop_token_ids) > 1 or (self.stop_token_ids and self.eos_token_id is None):
            gen = _read_json(d / "generation_config.json")
            gen["eos_token_id"] = list(self.stop_token_ids)
            (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            written.append("generation_config.json")
        return written

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (`tokenizer.json` required).

        Raises:
            TinkerError: no or unreadable `tokenizer.json`, or unreadable JSON config files.
        """
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TinkerError(
                f"{file}: not found (only fast tokenizers are supported; save one with transformers' "
                "tokenizer.save_pretrained)"
            )
        size = file.stat().st_size
        if size > limits.MAX_JSON_BYTES:  # checked before `tokenizers` parses (and holds) it all
            raise TinkerError(f"{file}: {size} bytes, over the limit of {limits.MAX_JSON_BYTES} for a JSON file")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:
            raise TinkerError(f"{file}: cannot be read ({exc}) (file corrupt? download it again)") from exc
        limits.check(backend.get_vocab_size(), limits.MAX_VOCAB, f"{file}: the vocabulary size")
        config = _read_json(path / "tokenizer_config.json")
        token_map = _read_json(path / "special_tokens_map.json")
        generation = _read_json(path / "generation_config.json")
        named = {name: _token_text(config.get(name, token_map.get(name))) for name in _NAMED}

        # Named and extra special tokens not yet in the added vocabulary become special, whole-matched tokens.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        extra = [
            *_as_list(config.get("additional_special_tokens", token_map.get("additional_special_tokens"))),
            *_as_list(config.get("extra_special_tokens")),
        ]
        missing = [t for t in [*named.values(), *map(_token_text, extra)] if t is not None and t not in added]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])

        # BOS/EOS come from tokenizer.json's post-processor alone: transformers 5 drops tokenizer_config.json's
        # add_bos_token/add_eos_token whenever a tokenizer.json exists, and adds nothing when it has no post-processor.
        eos_ids = generation.get("eos_token_id")
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        return cls(
            backend,
            **named,
            extra_stop_ids=eos_ids,
            chat_template=_hf_chat_template(path, config),
            # transformers skips this clean-up for BPE models, where it would eat real spaces.
            clean_up_spaces=bool(config.get("clean_up_tokenization_spaces"))
            and not isinstance(backend.model, models.BPE),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], path: str | os.PathLike) -> Tokenizer:
        """Build the tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes.

        Raises:
            TinkerError: no vocabulary, an unsupported `tokenizer.ggml.model`, or special ids out of range.
        """
        model = metadata.get("tokenizer.ggml.model")
        tokens, types = _gguf_vocabulary(metadata, path)
        if model not in ("gpt2", "llama"):
            raise TinkerError(f"{path}: tokenizer.ggml.model {model!r} is not supported (supported: gpt2, llama)")
        try:
            if model == "gpt2":
                backend, tokens = _byte_level_bpe(tokens, types, metadata)
            else:
                backend = _sentencepiece_bpe(tokens, metadata, path)
        except TinkerError:
            raise
        except Exception as exc:  # tokenizers rejects e.g. a merge naming a token not in the vocabulary
            raise TinkerError(
                f"{path}: the tokenizer metadata is inconsistent ({exc}) (re-convert the model with llama.cpp)"
            ) from exc

        # Control tokens are special; user-defined ones are plain added tokens. Both are matched whole in text.
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
        )

        def token(key: str) -> str | None:
            i = metadata.get(f"tokenizer.ggml.{key}")
            if i is None:
                return None
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(tokens):
                raise TinkerError(
                    f"{path}: tokenizer.ggml.{key} is {i}, outside the vocabulary of {len(tokens)} tokens "
                    "(file inconsistent; re-convert it)"
                )
            return tokens[i]

        named = {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
        }
        # transformers adds the named tokens as special tokens; the same ids, now also matched whole in text.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named.values() if t])
        # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", model == "llama")
        add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
        _set_template(backend, named["bos_token"] if add_bos else None, named["eos_token"] if add_eos else None)
        # End-of-turn and end-of-message tokens also end generation, as in llama.cpp.
        extra = [metadata.get(f"tokenizer.ggml.{key}") for key in ("eot_token_id", "eom_token_id")]
        tok = cls(
            backend,
            **named,
            extra_stop_ids=[
                i for i in extra if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens)
            ],
            chat_template=_gguf_string(metadata, "tokenizer.chat_template", path),
        )
        # Kept to be written back as they were (`gguf_metadata`): the file's own description is exact for llama.cpp.
        tok._gguf_source = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
        return tok

    def gguf_metadata(self, vocab_size: int | None = None, pre: str | None = None) -> dict[str, Any]:
        """The `tokenizer.ggml.*` keys llama.cpp reads, and `tokenizer.chat_template`, describing this tokenizer.

        Read from GGUF: that file's tokenizer keys, unchanged but for the chat template (this tokenizer's). Read from
        tokenizer.json: byte-level BPE becomes model "gpt2" (tokens, types, merges, `pre` named from the
        pre-tokenizer: `PRE_NAMES`, "gpt-2", "smollm"), sentencepiece-style BPE (byte fallback, "▁" for spaces)
        model "llama" (tokens, scores ranked as the merges, types; the merges too, which tinkerlm reads first).

        Args:
            vocab_size: the model's vocabulary (embedding rows); the token list is padded to it with unused
                "[PAD{i}]" tokens, as llama.cpp's converter does, since llama.cpp sizes the model by the token list.
            pre: `tokenizer.ggml.pre` to write instead of the one found (a llama.cpp pre-tokenizer name).

        Raises:
            TinkerError: a tokenizer GGUF cannot describe (WordPiece, Unigram, merges of pieces holding spaces), or
                more tokens than `vocab_size`.
        """
        source = self._gguf_source
        if source is not None:
            meta = dict(source)
            if pre is not None:
                meta["tokenizer.ggml.pre"] = pre
        else:
            meta = self._gguf_from_backend(pre)
        meta.pop("tokenizer.chat_template", None)
        if self.chat_template is not None:
            meta["tokenizer.chat_template"] = self.chat_template
        n = len(meta["tokenizer.ggml.tokens"])
        if vocab_size is not None and vocab_size != n:
            if vocab_size < n:
                raise TinkerError(
                    f"tokenizer: {n} tokens, more than the model's vocabulary of {vocab_size} (embedding rows); "
                    "resize the model's embeddings to the tokenizer"
                )
            pad = range(n, vocab_size)
            meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], *(f"[PAD{i}]" for i in pad)]
            types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * n
            meta["tokenizer.ggml.token_type"] = [*types, *(UNUSED for _ in pad)]
            if meta.get("tokenizer.ggml.scores") is not None:
                meta["tokenizer.ggml.scores"] = [*meta["tokenizer.ggml.scores"], *(-10000.0 for _ in pad)]
        return meta

    def _gguf_from_backend(self, pre: str | None) -> dict[str, Any]:
        """`gguf_metadata` of a tokenizer read from tokenizer.json."""
        spec = json.loads(self.backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise TinkerError(
                f"tokenizer: a {model.get('type')} tokenizer cannot be written to GGUF (supported: byte-level BPE, "
                "sentencepiece-style BPE)"
            )
        byte_level = _has_step(spec.get("pre_tokenizer"), "ByteLevel") or _has_step(spec.get("decoder"), "ByteLevel")
        if not byte_level and not (model.get("byte_fallback") or _has_step(spec.get("pre_tokenizer"), "Metaspace")):
            raise TinkerError(
                "tokenizer: a BPE tokenizer neither byte-level nor sentencepiece-style (no byte fallback or "
                "Metaspace) cannot be written to GGUF"
            )
        vocab = self.backend.get_vocab(with_added_tokens=False)
        added = self.backend.get_added_tokens_decoder()
        n = max([*vocab.values(), *added, -1]) + 1
        tokens = [f"[PAD{i}]" for i in range(n)]
        types = [UNUSED] * n
        for token, i in vocab.items():
            tokens[i] = token
            types[i] = BYTE if not byte_level and _BYTE_TOKEN.fullmatch(token) else NORMAL
        for i, t in added.items():
            tokens[i] = t.content
            types[i] = CONTROL if t.special else USER_DEFINED
        # Sentencepiece marks its unknown piece; byte-level vocabularies (which need none) keep the converter's types.
        if self.unk_token_id is not None and not byte_level:
            types[self.unk_token_id] = UNKNOWN
        merges = []
        for m in model.get("merges") or []:
            left, right = m.split(" ", 1) if isinstance(m, str) else m
            if " " in left or " " in right:
                raise TinkerError(f"tokenizer: merge {[left, right]!r} holds a space, which GGUF merges cannot")
            merges.append(f"{left} {right}")

        meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2" if byte_level else "llama"}
        if byte_level:
            meta["tokenizer.ggml.pre"] = pre or _pre_name(spec.get("pre_tokenizer"))
        else:
            meta["tokenizer.ggml.pre"] = pre or "default"  # as the converter writes for sentencepiece
        meta["tokenizer.ggml.tokens"] = tokens
        if not byte_level:
            meta["tokenizer.ggml.scores"] = _scores_from_merges(tokens, types, merges)
        meta["tokenizer.ggml.token_type"] = types
        meta["tokenizer.ggml.merges"] = merges  # llama.cpp's "llama" model reads only the scores; tinkerlm these
        if not byte_level:
            meta["tokenizer.ggml.add_space_prefix"] = _prepends_space(spec)
        first, last = _template_ends(spec.get("post_processor"))
        ids = {name: getattr(self, f"{name}_id") for name in _GGUF_IDS}
        # GGUF adds BOS/EOS by id: a template adding another token than the named one names it (with a warning).
        for name, end in (("bos_token", first), ("eos_token", last)):
            if end is not None and ids[name] != end:
                if ids[name] is not None:
                    log.warning("tokenizer: the post-processor adds token %d, not %s %d", end, name, ids[name])
                ids[name] = end
        for name, key in _GGUF_IDS.items():
            if ids[name] is not None:
                meta[f"tokenizer.ggml.{key}"] = ids[name]
        extra = [i for i in self.stop_token_ids if i != self.eos_token_id]
        if extra:  # llama.cpp ends generation at the end-of-turn token too (it finds others by their text)
            meta["tokenizer.ggml.eot_token_id"] = extra[0]
        meta["tokenizer.ggml.add_bos_token"] = first is not None
        meta["tokenizer.ggml.add_eos_token"] = last is not None
        return meta


# Stands for "a special token was here" when a piece is re-tokenized alone: a noncharacter no text holds.
_SENTINEL = "\U0010fffe<tinkerlm-cut>\U0010fffe"


def _special_ids(tok: Tokenizer) -> set[int]:
    """The ids of the backend's special added tokens (cached on the tokenizer)."""
    ids = tok.__dict__.get("_special_id_set")
    if ids is None:
        ids = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
        tok.__dict__["_special_id_set"] = ids
    return ids


def _encode_between(tok: Tokenizer, text: str, cuts: list[tuple[int, int, int]]) -> list[int]:
    """Ids of `text` with the special tokens at `cuts` ((start, end, id), in order) kept and the text between them
    tokenized with no special tokens matched.

    Each piece is tokenized as the normal path tokenizes it, as a piece that follows a special token (where a
    sentencepiece "first" prefix is not added): a sentinel added token stands for that special token.
    """
    plain = tok.__dict__.get("_plain_backend")
    if plain is None:
        plain = tokenizers.Tokenizer.from_str(tok.backend.to_str())
        plain.encode_special_tokens = True  # special tokens are not matched; non-special added tokens still are
        plain.add_tokens([AddedToken(_SENTINEL, special=False, normalized=False)])
        tok.__dict__["_plain_backend"] = plain
    sentinel = plain.token_to_id(_SENTINEL)
    ids: list[int] = []
    pos = 0
    for a, b, i in [*cuts, (len(text), len(text), None)]:
        piece = text[pos:a]
        if _SENTINEL in piece:
            raise TinkerError("text: holds tinkerlm's internal cut marker (U+10FFFE); remove it")
        if piece and pos == 0:
            ids += plain.encode(piece, add_special_tokens=False).ids
        elif piece:
            got = plain.encode(_SENTINEL + piece, add_special_tokens=False).ids
            assert got[0] == sentinel, "the sentinel is an added token, matched first"
            ids += got[1:]
        if i is not None:
            ids.append(i)
        pos = b
    return ids


# ---------------------------------------------------------------------------------------------------------------
# GGUF tokenizer metadata comes from untrusted files: its arrays are checked for type, length and token size
# (tinkerlm/limits.py) before a tokenizer is built from them.


def _gguf_vocabulary(metadata: dict[str, Any], path: Any) -> tuple[list[str], list[int]]:
    """The checked `tokenizer.ggml.tokens` and `tokenizer.ggml.token_type` (default: all normal) of a GGUF file;
    the scores and merges are checked too.

    Raises:
        TinkerError: no vocabulary, one over `limits.MAX_VOCAB` tokens or with a token over `limits.MAX_TOKEN_BYTES`,
            or arrays of the wrong type or length, naming the key.
    """
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TinkerError(f"{path}: metadata key tokenizer.ggml.tokens is missing (the file has no tokenizer)")
    _gguf_array(tokens, str, "tokenizer.ggml.tokens", path)
    limits.check(len(tokens), limits.MAX_VOCAB, f"{path}: tokenizer.ggml.tokens: the vocabulary size")
    for i, t in enumerate(tokens):
        # Characters first (cheap); UTF-8 takes at most 4 bytes a character.
        if len(t) * 4 > limits.MAX_TOKEN_BYTES and len(t.encode("utf-8")) > limits.MAX_TOKEN_BYTES:
            raise TinkerError(
                f"{path}: tokenizer.ggml.tokens item {i} is {len(t.encode('utf-8'))} bytes long, over the limit of "
                f"{limits.MAX_TOKEN_BYTES} (the file is corrupt or hostile)"
            )
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    _gguf_array(types, int, "tokenizer.ggml.token_type", path)
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is not None:
        _gguf_array(scores, float, "tokenizer.ggml.scores", path)
    for key, values in (("tokenizer.ggml.token_type", types), ("tokenizer.ggml.scores", scores)):
        if values is not None and len(values) != len(tokens):
            raise TinkerError(
                f"{path}: {key} has {len(values)} entries for {len(tokens)} tokens (file inconsistent; re-convert it)"
            )
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is not None:
        _gguf_array(merges, str, "tokenizer.ggml.merges", path)
    return tokens, types


def _gguf_array(values: Any, kind: type, key: str, path: Any) -> None:
    """A GGUF metadata array must be a list of `kind` (float: any number; never a bool for a number)."""
    kinds = (int, float) if kind is float else (kind,)
    if not isinstance(values, list) or not all(
        isinstance(v, kinds) and (kind is str or not isinstance(v, bool)) for v in values
    ):
        expected = {str: "strings", int: "integers", float: "numbers"}[kind]
        raise TinkerError(f"{path}: metadata key {key} is not an array of {expected} (file corrupt; re-convert it)")


def _gguf_string(metadata: dict[str, Any], key: str, path: Any) -> str | None:
    value = metadata.get(key)
    if value is not None and not isinstance(value, str):
        raise TinkerError(f"{path}: metadata key {key} is {value!r:.80}, expected a string (file corrupt)")
    return value


def _token_id(backend: tokenizers.Tokenizer, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _token_text(value: Any) -> str | None:
    """A token as tokenizer_config.json spells it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    if file.stat().st_size > limits.MAX_JSON_BYTES:
        raise TinkerError(f"{file}: over the limit of {limits.MAX_JSON_BYTES} bytes for a JSON file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TinkerError(f"{file}: not valid JSON ({exc}) (fix or delete the file)") from exc
    return data if isinstance(data, dict) else {}


def _hf_chat_template(path: Path, config: dict) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers; chat_template.json comes last."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _set_template(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
    """Post-processor adding `bos` before and `eos` after each sequence (either may be None), as transformers does."""
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(t for t in (bos, eos) if t)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _steps(node: Any) -> list[dict]:
    """The steps of a tokenizer.json pipeline component (a Sequence's items, or the one step)."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        items = node.get("pretokenizers") or node.get("decoders") or node.get("processors") or []
        return [step for item in items for step in _steps(item)]
    return [node]


def _has_step(node: Any, kind: str) -> bool:
    return any(step.get("type") == kind for step in _steps(node))


def _pre_name(pre_tokenizer: Any) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level tokenizer.json pre-tokenizer (see `PRE_NAMES`)."""
    steps = _steps(pre_tokenizer)
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space")
    ):
        return "smollm"
    if (
        kinds == ["Split", "ByteLevel"]
        and not steps[1].get("use_regex", True)
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and (steps[0].get("pattern") or {}).get("Regex") in PRE_NAMES
    ):
        return PRE_NAMES[steps[0]["pattern"]["Regex"]]
    log.warning(
        "tokenizer: no llama.cpp pre-tokenizer is known for %s; writing tokenizer.ggml.pre %r (GPT-2's pattern), "
        "so text may split differently from the original tokenizer",
        json.dumps(pre_tokenizer)[:300],
        FALLBACK_PRE,
    )
    return FALLBACK_PRE


def _prepends_space(spec: dict) -> bool:
    """Whether a sentencepiece-style tokenizer adds "▁" before the text (Metaspace, or a Prepend normalizer)."""
    for step in _steps(spec.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            return scheme != "never"
    normalizers = spec.get("normalizer") or {}
    items = normalizers.get("normalizers", [normalizers]) if isinstance(normalizers, dict) else []
    return any(isinstance(n, dict) and n.get("type") == "Prepend" for n in items)


def _template_ends(post_processor: Any) -> tuple[int | None, int | None]:
    """The ids of the special tokens a post-processor puts first and last around a single sequence."""
    for step in _steps(post_processor):
        if step.get("type") != "TemplateProcessing":
            continue
        single = step.get("single") or []
        ids = {k: (v.get("ids") or [None])[0] for k, v in (step.get("special_tokens") or {}).items()}
        ends = []
        for item in (single[:1], single[-1:]):
            special = item[0].get("SpecialToken") if item else None
            ends.append(ids.get(special["id"]) if special else None)
        return ends[0], ends[1]
    return None, None


def _scores_from_merges(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """Sentencepiece scores that rank tokens as the BPE merges do: the token the r-th merge makes scores -r
    (llama.cpp's sentencepiece tokenizer merges the best-scoring pair first); tokens no merge makes score below all
    (by id), and byte, control and added tokens score 0, as in sentencepiece's own files."""
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1), r)
    last = len(merges)
    return [
        0.0 if k in (BYTE, CONTROL, USER_DEFINED, UNKNOWN) else -float(rank.get(t, last + i))
        for i, (t, k) in enumerate(zip(tokens, types))
    ]


def _clean_up_spaces(text: str) -> str:
    """Drop the spaces WordPiece-style decoding leaves before punctuation and English contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the rest move to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


def _byte_level_bpe(tokens: list[str], types: list[int], metadata: dict) -> tuple[tokenizers.Tokenizer, list[str]]:
    """GPT-2 style BPE over bytes. Returns the backend and the token spellings as the backend knows them."""
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # A normal token outside the byte alphabet could never come out of the byte-level pre-tokenizer; spell it in
    # the alphabet, as transformers does. Control and user-defined tokens are matched as text and keep their form.
    spelled = [
        t if k in (CONTROL, USER_DEFINED) or set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8"))
        for t, k in zip(tokens, types)
    ]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    pre = metadata.get("tokenizer.ggml.pre")
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if pre in DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif split is None:  # GPT-2's own pattern, built into ByteLevel
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _sentencepiece_bpe(tokens: list[str], metadata: dict, path: Any) -> tokenizers.Tokenizer:
    """SentencePiece-style BPE: "▁" marks spaces, merges ranked by score, unknown bytes as <0xNN> tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = metadata.get("tokenizer.ggml.merges")
    if merges:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise TinkerError(
                f"{path}: a sentencepiece vocabulary needs tokenizer.ggml.scores (one per token) or "
                "tokenizer.ggml.merges (re-convert the model with llama.cpp)"
            )
        merges = _merges_from_scores(tokens, scores, vocab)
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True)
    )
    # A leading "▁" on the first piece only, as sentencepiece adds one "dummy prefix" per text.
    # llama.cpp honours add_space_prefix=False; transformers (5.24) always prepends.
    prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Recover BPE merges from a vocabulary and its scores: every way to cut a token into two vocabulary tokens.

    A merge ranks by the score of the token it makes (higher first), then by longer left, then longer right
    piece; ties keep vocabulary order. This is the order transformers derives, so ids match it.
    """
    found = []  # (left, right, score of left + right)
    for merged, score in dict(zip(tokens, scores)).items():
        # Only the cuts found in the vocabulary are kept: listing every cut's two strings first would take memory
        # quadratic in the token's length (a hostile 45,000-character token: gigabytes).
        cuts = []
        for k in range(1, len(merged)):
            left = merged[:k]
            if left in vocab:
                right = merged[k:]
                if right in vocab:
                    cuts.append((left, right))
        cuts.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found.extend((left, right, score) for left, right in cuts)
    # Python's sort is stable, also with reverse=True, so equal keys keep the order built above.
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]
