"""JSON mode (`json=True`, the server's `response_format: {"type": "json_object"}`): decoding constrained to one
valid JSON object. Part of the sampling engine (sampling.py's `Sampler` drives it).

A byte-level pushdown automaton follows the JSON grammar (RFC 8259): a state is a small hashable tuple
(mode, open brackets, detail, whitespace run), so token transitions can be memoised. Bytes >= 0x80 appear only
inside strings, where JSON allows any character, so working on bytes needs no UTF-8 decoding.

At each step a token is allowed when its bytes keep the text a prefix of valid JSON *and* the shortest way to
close everything still fits the remaining token budget; when the budget only just suffices, the closing bytes are
forced one token each. So the output always ends as a complete object (unless max_tokens < 2). Whitespace runs
outside strings are capped, which stops models from looping on newlines. Generation ends as soon as the object
closes.

Selecting a token: greedy takes the top token if it is allowed, else the best of the tokens allowed in this state;
sampling draws, and on a disallowed draw masks that token and draws again (rejection sampling gives exactly the
masked distribution), falling back to the mask of allowed tokens after a few misses. The allowed tokens of a state
(`allowed_ids`) are computed once per state and vocabulary, trying only tokens whose first byte can follow, and
kept: structural states (after `{`, a key, `:`) recur all the time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

START, KEY_OR_CLOSE, KEY, COLON, VALUE, VALUE_OR_CLOSE, AFTER, STRING, NUMBER, LITERAL, END = range(11)
MAX_DEPTH = 32
MAX_WS = 24
_WS = frozenset(b" \t\n\r")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESC = frozenset(b'"\\/bfnrt')
# Number sub-states: after '-', a leading '0', integer digits, '.', fraction digits, 'e', exponent sign, digits.
_NUM = {
    "-": {"0": "0", "d": "I"},
    "0": {".": ".", "e": "e"},
    "I": {"0": "I", "d": "I", ".": ".", "e": "e"},
    ".": {"0": "F", "d": "F"},
    "F": {"0": "F", "d": "F", "e": "e"},
    "e": {"+": "s", "0": "X", "d": "X"},
    "s": {"0": "X", "d": "X"},
    "X": {"0": "X", "d": "X"},
}
_NUM_DONE = frozenset("0IFX")
INITIAL = (START, "", None, 0)


def _num_class(c: int) -> str:
    if c == 0x30:
        return "0"
    if 0x31 <= c <= 0x39:
        return "d"
    return {0x2E: ".", 0x65: "e", 0x45: "e", 0x2B: "+", 0x2D: "+"}.get(c, "")


def _after_value(stack: str):
    return (AFTER, stack, None, 0) if stack else (END, "", None, 0)


def _start_value(stack: str, c: int):
    if c == 0x22:
        return (STRING, stack, (False, 0), 0)
    if c in (0x7B, 0x5B):
        if len(stack) >= MAX_DEPTH:
            return None
        return (KEY_OR_CLOSE, stack + "{", None, 0) if c == 0x7B else (VALUE_OR_CLOSE, stack + "[", None, 0)
    if c == 0x2D:
        return (NUMBER, stack, "-", 0)
    if 0x30 <= c <= 0x39:
        return (NUMBER, stack, "0" if c == 0x30 else "I", 0)
    literal = {0x74: b"rue", 0x66: b"alse", 0x6E: b"ull"}.get(c)
    return (LITERAL, stack, literal, 0) if literal else None


def step(st, c: int):
    """The state after byte `c`, or None if `c` cannot continue valid JSON."""
    mode, stack, aux, ws = st
    if mode == STRING:
        is_key, esc = aux
        if esc == 0:
            if c == 0x22:
                return (COLON, stack, None, 0) if is_key else _after_value(stack)
            if c == 0x5C:
                return (STRING, stack, (is_key, 1), 0)
            return None if c < 0x20 else st
        if esc == 1:
            if c == 0x75:  # \uXXXX: four hex digits follow
                return (STRING, stack, (is_key, 2), 0)
            return (STRING, stack, (is_key, 0), 0) if c in _ESC else None
        if c not in _HEX:
            return None
        return (STRING, stack, (is_key, 0 if esc == 5 else esc + 1), 0)
    if mode == NUMBER:
        nxt = _NUM[aux].get(_num_class(c))
        if nxt is not None:
            return (NUMBER, stack, nxt, 0)
        return step(_after_value(stack), c) if aux in _NUM_DONE else None
    if mode == LITERAL:
        if c != aux[0]:
            return None
        return (LITERAL, stack, aux[1:], 0) if len(aux) > 1 else _after_value(stack)
    if c in _WS:
        if mode == START or ws >= MAX_WS:
            return None
        return (mode, stack, aux, ws + 1)
    if mode == START:
        return (KEY_OR_CLOSE, "{", None, 0) if c == 0x7B else None
    if mode in (KEY_OR_CLOSE, KEY):
        if c == 0x22:
            return (STRING, stack, (True, 0), 0)
        return _after_value(stack[:-1]) if c == 0x7D and mode == KEY_OR_CLOSE else None
    if mode == COLON:
        return (VALUE, stack, None, 0) if c == 0x3A else None
    if mode in (VALUE, VALUE_OR_CLOSE):
        if c == 0x5D and mode == VALUE_OR_CLOSE:
            return _after_value(stack[:-1])
        return _start_value(stack, c)
    if mode == AFTER:
        if c == 0x2C:
            return (KEY if stack[-1] == "{" else VALUE, stack, None, 0)
        if c == (0x7D if stack[-1] == "{" else 0x5D):
            return _after_value(stack[:-1])
        return None
    return None  # END: nothing may follow


def advance(st, data: bytes):
    for c in data:
        st = step(st, c)
        if st is None:
            return None
    return st


def _closing_byte(st) -> int:
    """One byte on the shortest path from `st` to a complete document."""
    mode, stack, aux, _ = st
    if mode == STRING:
        return (0x6E if aux[1] == 1 else 0x30) if aux[1] else 0x22  # finish an escape (\n, \u0000), then close
    if mode == NUMBER:
        return (0x7D if stack[-1] == "{" else 0x5D) if aux in _NUM_DONE else 0x30
    if mode == LITERAL:
        return aux[0]
    return {
        START: 0x7B,
        KEY_OR_CLOSE: 0x7D,
        KEY: 0x22,
        COLON: 0x3A,
        VALUE: 0x30,
        VALUE_OR_CLOSE: 0x5D,
        AFTER: 0x7D if stack and stack[-1] == "{" else 0x5D,
    }[mode]


@lru_cache(maxsize=1 << 16)
def closing(st) -> bytes:
    """The shortest bytes that complete the document from state `st`."""
    out = bytearray()
    while st[0] != END:
        c = _closing_byte(st)
        out.append(c)
        st = step(st, c)
    return bytes(out)


class JSONConstraint:
    """Per-sequence JSON state; `pick` chooses the next token among those that keep the output valid."""

    def __init__(self, table: list[bytes | None]):
        self.table = table
        self.state = INITIAL
        # One single-byte token per byte value, for forced closing (built once per vocabulary).
        self.byte_token = _table_cache(_BYTE_TOKEN, table)
        if not self.byte_token:
            for i, b in enumerate(table):
                if b is not None and len(b) == 1:
                    self.byte_token.setdefault(b[0], i)

    @property
    def done(self) -> bool:
        return self.state[0] == END

    def _next(self, token: int):
        return self._advance(self.state, self.table[token])

    def _closing(self, state) -> bytes:
        return closing(state)

    def _dead(self):
        return (END, "", None, 0)

    def _advance(self, state, data: bytes):
        return _transition(state, data)

    def _mask_cache(self) -> dict:
        return _table_cache(_MASKS, self.table)

    def allowed_ids(self, state) -> torch.Tensor:
        """Ids of the tokens that can follow `state` (the budget aside), computed once per state and vocabulary
        (structured-generation libraries' precomputed masks): only tokens whose first byte can follow are tried."""
        cache = self._mask_cache()
        ids = cache.get(state)
        if ids is None:
            by_first = _table_cache(_FIRST, self.table)
            if not by_first:
                for i, b in enumerate(self.table):
                    if b:
                        by_first.setdefault(b[0], []).append(i)
            ids = [
                t
                for c, tokens in by_first.items()
                if self._advance(state, bytes((c,))) is not None
                for t in tokens
                if self._advance(state, self.table[t]) is not None
            ]
            ids = torch.tensor(sorted(ids), dtype=torch.long)
            if len(cache) >= 1 << 12:
                cache.clear()
            cache[state] = ids
        return ids

    def _cost(self, state) -> int:
        """Tokens the shortest closing from `state` takes (here one per byte)."""
        return len(self._closing(state))

    def _force(self) -> int | None:
        """The first token of the shortest closing from the current state, or None."""
        need = self._closing(self.state)
        return self.byte_token.get(need[0]) if need else None

    def allowed(self, token: int, budget_after: int) -> bool:
        if token >= len(self.table) or not self.table[token]:
            return False
        new = self._next(token)
        return new is not None and self._cost(new) <= budget_after

    def push(self, token: int) -> None:
        # Only the last-resort pick below can be disallowed; then the document cannot be finished: end it.
        new = self._next(token) if token < len(self.table) and self.table[token] else None
        self.state = self._dead() if new is None else new

    def pick(self, logits: torch.Tensor, budget: int, greedy: bool, draw: Callable[[torch.Tensor], int]) -> int:
        """Choose a token from logits (1, V), `budget` = tokens still allowed including this one."""
        forced = self._force() if self._cost(self.state) >= budget else None
        if forced is not None:
            return forced
        if greedy:
            best = int(logits[0].argmax())
            if self.allowed(best, budget - 1):
                return best
            ids = self.allowed_ids(self.state)
            for i in torch.argsort(logits[0, ids], descending=True).tolist():
                if self.allowed(int(ids[i]), budget - 1):
                    return int(ids[i])
        else:
            logits = logits.clone()
            for _ in range(16):
                t = draw(logits)
                if self.allowed(t, budget - 1):
                    return t
                logits[0, t] = float("-inf")
            ids = self.allowed_ids(self.state)
            ids = ids[[self.allowed(int(t), budget - 1) for t in ids.tolist()]]
            if ids.numel():
                mask = torch.ones(logits.shape[-1], dtype=torch.bool)
                mask[ids] = False
                return draw(logits.masked_fill(mask[None], float("-inf")))
        # No token fits (a vocabulary without single-byte tokens): close as best we can.
        forced = self._force()
        return int(logits.argmax()) if forced is None else forced


_MASKS: dict[int, tuple[list, dict]] = {}  # per vocabulary: {state: allowed token ids}
_FIRST: dict[int, tuple[list, dict]] = {}  # per vocabulary: {first byte: token ids}
_BYTE_TOKEN: dict[int, tuple[list, dict]] = {}  # per vocabulary: {byte: a single-byte token}


def _table_cache(caches: dict, table: list) -> dict:
    """The dict `caches` keeps for this token table (by identity; a few tables at most)."""
    hit = caches.get(id(table))
    if hit is None or hit[0] is not table:
        if len(caches) >= 8:
            caches.clear()
        hit = caches[id(table)] = (table, {})
    return hit[1]


@lru_cache(maxsize=1 << 18)
def _transition(state, data: bytes):
    return advance(state, data)
