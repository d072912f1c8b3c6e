"""Each token's raw bytes, computed once per tokenizer (for logprobs' `bytes` and for JSON-constrained decoding).

Decoding one token alone is not enough: a byte-level BPE token may hold part of a UTF-8 character (decode gives
U+FFFD) and SentencePiece decoders strip a leading space. So the bytes are read from the vocabulary itself:
- byte-level BPE (GPT-2 style): token strings spell bytes through GPT-2's printable byte alphabet
  (Radford et al. 2019, `bytes_to_unicode`);
- SentencePiece-style BPE: "▁" is a space and `<0xNN>` is the byte NN;
- anything else: the UTF-8 of the decoded token.
Special tokens (and ids past the tokenizer's vocabulary) have no bytes: None.
"""

from __future__ import annotations

import re
from functools import lru_cache

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's map from printable stand-in characters back to byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    """Raw bytes of every token id in `range(vocab_size)` (the model's vocabulary, which may be larger)."""
    backend = tokenizer.backend
    kind = type(backend.decoder).__name__ if backend.decoder is not None else ""
    if kind == "Sequence":
        kind = "ByteFallback" if "ByteFallback" in str(backend.decoder) else "Sequence"
    added = backend.get_added_tokens_decoder()
    alphabet = _byte_alphabet()
    table: list[bytes | None] = []
    for i in range(vocab_size):
        tok = backend.id_to_token(i)
        if tok is None or (i in added and added[i].special):
            table.append(None)
        elif i in added:  # user-defined added tokens are stored as plain text
            table.append(tok.encode())
        elif kind == "ByteLevel" and all(c in alphabet for c in tok):
            table.append(bytes(alphabet[c] for c in tok))
        elif kind == "ByteFallback":
            m = _BYTE_TOKEN.fullmatch(tok)
            table.append(bytes([int(m.group(1), 16)]) if m else tok.replace("\u2581", " ").encode())
        else:
            table.append(tokenizer.decode([i]).encode() or None)
    return table
