"""JSON-schema outputs (`json_schema=` / `response_format: {"type": "json_schema", ...}`): decoding constrained to
one JSON value that validates against a schema. Part of the sampling engine, driven by sampling.py's `Sampler`
exactly like JSON mode (jsonmode.py), whose `JSONConstraint` it extends.

`compile_schema` turns the schema into a table of nodes (object, array, string, number, literal set, any value,
anyOf) and refuses, naming the keyword and where it is, anything it cannot enforce (`pattern`, `format`, `minimum`,
...); annotations (`title`, `description`, ...) are ignored. Decoding is a byte-level pushdown automaton over the
nodes: a state is a tuple of frames (hashable), so token transitions are memoised as in jsonmode, and the bytes
that close everything in the fewest tokens are known per state (budget-aware closing, as in JSON mode).

What the output looks like (OpenAI's strict structured outputs): an object's properties come in declared order,
required ones always, optional ones may be skipped, and no others; strings count characters (code points; a
`\\u` escape is one, surrogate escapes are not produced) for minLength/maxLength; `enum`/`const` values are
emitted in their canonical JSON spelling. `$ref` to `#/$defs/...` (or `#/definitions/...`, or `#`) may recurse.
A top-level number ends at the first point where it could (its digits cannot be told apart from more digits).
"""

from __future__ import annotations

import json
from functools import lru_cache

from tinkerlm import jsonmode
from tinkerlm.errors import TinkerError

MAX_FRAMES = 64  # nesting (frames) an output may reach; deeper recursion is not offered to the model
MAX_WS = 8  # whitespace run outside strings
_WS = frozenset(b" \t\n\r")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESC = frozenset(b'"\\/bfnrt')
# UTF-8 lead byte -> (continuation bytes, range of the first one)
_UTF8 = {
    **{c: (1, 0x80, 0xBF) for c in range(0xC2, 0xE0)},
    0xE0: (2, 0xA0, 0xBF),
    **{c: (2, 0x80, 0xBF) for c in (*range(0xE1, 0xED), 0xEE, 0xEF)},
    0xED: (2, 0x80, 0x9F),
    0xF0: (3, 0x90, 0xBF),
    **{c: (3, 0x80, 0xBF) for c in range(0xF1, 0xF4)},
    0xF4: (3, 0x80, 0x8F),
}

ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly"}
)
SUPPORTED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "minLength",
        "maxLength",
        "$ref",
        "$defs",
        "definitions",
        "anyOf",
    }
)
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

# Node kinds (tuples in a per-schema table, referenced by index so states stay small and recursion is possible).
OBJ, ARR, STR, NUM, LITS, ANY, ALT = "obj", "arr", "str", "num", "lits", "any", "alt"


def _fail(msg: str) -> TinkerError:
    return TinkerError(f"json_schema: {msg}")


class Compiler:
    def __init__(self, root: dict):
        if not isinstance(root, dict):
            raise _fail("the schema must be a JSON object")
        self.root = root
        self.nodes: list = []
        self.refs: dict[str, int] = {}

    def new(self) -> int:
        self.nodes.append(None)
        return len(self.nodes) - 1

    def ref(self, target: str, where: str) -> int:
        if target in self.refs:
            return self.refs[target]
        if target == "#":
            schema, at = self.root, ""
        else:
            parts = target.split("/")
            if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
                raise _fail(f"$ref '{target}' at {where or '/'} is not supported (use '#/$defs/NAME')")
            defs = self.root.get(parts[1])
            name = parts[2].replace("~1", "/").replace("~0", "~")
            if not isinstance(defs, dict) or not isinstance(defs.get(name), dict):
                raise _fail(f"$ref '{target}' at {where or '/'} names no definition")
            schema, at = defs[name], f"/{parts[1]}/{parts[2]}"
        node = self.new()
        self.refs[target] = node
        self.nodes[node] = self.nodes[self.compile(schema, at)]
        return node

    def compile(self, s, where: str) -> int:
        at = where or "/"
        if s is True or s == {}:
            return self.add((ANY,))
        if not isinstance(s, dict):
            raise _fail(f"the schema at {at} must be an object")
        for key in s:
            if key not in SUPPORTED and key not in ANNOTATIONS:
                raise _fail(f"keyword '{key}' at {at} is not supported")
        keys = {k for k in s if k not in ANNOTATIONS and k not in ("$defs", "definitions")}
        if where == "" and "$ref" in s and s["$ref"] == "#":
            raise _fail("$ref '#' at / refers to itself")
        if "$ref" in s:
            if keys - {"$ref"}:
                raise _fail(f"keyword '{sorted(keys - {'$ref'})[0]}' beside $ref at {at} is not supported")
            if not isinstance(s["$ref"], str):
                raise _fail(f"$ref at {at} must be a string")
            return self.ref(s["$ref"], where)
        if "anyOf" in s:
            if keys - {"anyOf"}:
                raise _fail(f"keyword '{sorted(keys - {'anyOf'})[0]}' beside anyOf at {at} is not supported")
            alts = s["anyOf"]
            if not isinstance(alts, list) or not alts:
                raise _fail(f"anyOf at {at} must be a non-empty list")
            return self.add((ALT, tuple(self.compile(a, f"{where}/anyOf/{i}") for i, a in enumerate(alts))))
        types = s.get("type", list(TYPES))
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list) or not types or any(t not in TYPES for t in types):
            raise _fail(f"type at {at} must be one of {', '.join(TYPES)} or a list of them")
        if "enum" in s or "const" in s:
            return self.literals(s, keys, types, at)
        nodes = [self.typed(s, t, where) for t in dict.fromkeys(types)]
        if set(types) >= set(TYPES) and len(keys) == 0:
            return self.add((ANY,))
        return nodes[0] if len(nodes) == 1 else self.add((ALT, tuple(nodes)))

    def literals(self, s: dict, keys: set, types: list, at: str) -> int:
        extra = keys - {"enum", "const", "type"}
        if extra:
            raise _fail(f"keyword '{sorted(extra)[0]}' beside enum/const at {at} is not supported")
        if "enum" in s and "const" in s:
            raise _fail(f"give enum or const at {at}, not both")
        values = s["enum"] if "enum" in s else [s["const"]]
        if not isinstance(values, list) or not values:
            raise _fail(f"enum at {at} must be a non-empty list")
        texts = []
        for v in values:
            kind = _json_type(v)
            if kind in types or (kind == "integer" and "number" in types):
                texts.append(json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode())
        if not texts:
            raise _fail(f"no enum value at {at} has the type {types}")
        return self.add((LITS, tuple(dict.fromkeys(texts))))

    def typed(self, s: dict, t: str, where: str) -> int:
        at = where or "/"
        if t in ("boolean", "null"):
            return self.add((LITS, (b"true", b"false") if t == "boolean" else (b"null",)))
        if t in ("number", "integer"):
            return self.add((NUM, t == "integer"))
        if t == "string":
            lo, hi = _count(s, "minLength", at, 0), _count(s, "maxLength", at, None)
            if hi is not None and hi < lo:
                raise _fail(f"maxLength at {at} is below minLength")
            return self.add((STR, lo, hi))
        if t == "array":
            lo, hi = _count(s, "minItems", at, 0), _count(s, "maxItems", at, None)
            if hi is not None and hi < lo:
                raise _fail(f"maxItems at {at} is below minItems")
            items = s.get("items", True)
            if isinstance(items, list):
                raise _fail(f"keyword 'items' as a list at {at} is not supported (give one schema)")
            return self.add((ARR, self.compile(items, f"{where}/items"), lo, hi))
        props = s.get("properties")
        extra = s.get("additionalProperties", True)
        if props is None:
            if extra not in (True, False, {}) or s.get("required"):
                raise _fail(f"keyword 'additionalProperties' at {at} is not supported without 'properties'")
            return self.add((OBJ, ())) if extra is False else self.add((ANY, "{"))
        if not isinstance(props, dict):
            raise _fail(f"properties at {at} must be an object")
        required = s.get("required", [])
        if not isinstance(required, list) or any(r not in props for r in required):
            missing = [r for r in required if r not in props] if isinstance(required, list) else []
            raise _fail(f"required at {at}: {missing[0] if missing else required!r} is not in properties")
        node = self.new()
        fields = []
        for name, sub in props.items():
            key = json.dumps(name, ensure_ascii=False)[1:].encode()  # escaped name and the closing quote
            fields.append((key, self.compile(sub, f"{where}/properties/{name}"), name in required))
        self.nodes[node] = (OBJ, tuple(fields))
        return node

    def add(self, node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(v)]


def _count(s: dict, key: str, at: str, default):
    v = s.get(key, default)
    if v is not default and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise _fail(f"{key} at {at} must be a non-negative integer")
    return v


# ----------------------------------------------------------------------------------------------------------------
# The automaton. Frames (tuples, first item the kind):
#   ("obj", node, next, phase, typed, ws)   phase: "{" before it, "k" key or "}", "K" key only, "q" inside a key
#                                          (typed: its bytes so far), ":" colon, "v" value start, "," after a value
#   ("arr", node, count, phase, ws)        phase: "[" before it, "f" first item or "]", "v" item start, "," after one
#   ("str", node, count, esc)              esc: 0 none, 1 after "\", 2-5 hex digits to go, 6 after "\u" + [dD],
#                                          (k, lo, hi) k UTF-8 continuation bytes to go, the next in [lo, hi]
#   ("num", node, sub)                     sub: jsonmode's number states, "" before the first byte
#   ("lits", node, typed)
#   ("any", jsonmode state)
#   ("alt", frozenset of branch states)


class Schema:
    """A compiled schema: the automaton's steps, memoised per instance."""

    def __init__(self, schema: dict):
        c = Compiler(schema)
        self.root = c.compile(schema, "")
        self.nodes = c.nodes
        self.initial = (self.start(self.root),)
        self.min_text = self._min_texts()
        self.transition = lru_cache(maxsize=1 << 18)(self._advance)
        self.closing = lru_cache(maxsize=1 << 16)(self._closing)
        self.closing_tokens: dict[int, tuple] = {}  # per vocabulary: {state: closing token ids}
        self.masks: dict[int, tuple] = {}  # per vocabulary: {state: allowed token ids} (JSONConstraint.allowed_ids)

    def start(self, node: int):
        n = self.nodes[node]
        kind = n[0]
        if kind == OBJ:
            return (OBJ, node, 0, "{", b"", 0)
        if kind == ARR:
            return (ARR, node, 0, "[", 0)
        if kind == STR:
            return (STR, node, -1, 0)
        if kind == NUM:
            return (NUM, node, "")
        if kind == LITS:
            return (LITS, node, b"")
        if kind == ANY:
            return (ANY, jsonmode.INITIAL if len(n) > 1 else (jsonmode.VALUE, "", None, jsonmode.MAX_WS))
        return (ALT, frozenset((self.start(a),) for a in n[1]))

    # -- minimal texts (for closing), a fixed point since $ref may recurse ---------------------------------------
    def _min_texts(self) -> list[bytes | None]:
        best: list[bytes | None] = [None] * len(self.nodes)
        for _ in range(len(self.nodes) + 1):
            changed = False
            for i, n in enumerate(self.nodes):
                t = self._min_of(n, best)
                if t is not None and (best[i] is None or len(t) < len(best[i])):
                    best[i], changed = t, True
            if not changed:
                break
        if any(t is None for t in best):
            raise _fail("the schema has no finite instance (a required property or item recurses forever)")
        return best

    def _min_of(self, n, best) -> bytes | None:
        kind = n[0]
        if kind == OBJ:
            parts = []
            for key, sub, req in n[1]:
                if req:
                    if best[sub] is None:
                        return None
                    parts.append(b'"' + key + b":" + best[sub])
            return b"{" + b",".join(parts) + b"}"
        if kind == ARR:
            if n[2] and best[n[1]] is None:
                return None
            return b"[" + b",".join([best[n[1]] or b""] * n[2]) + b"]"
        if kind == STR:
            return b'"' + b"a" * n[1] + b'"'
        if kind == NUM:
            return b"0"
        if kind == LITS:
            return min(n[1], key=len)
        if kind == ANY:
            return b"{}" if len(n) > 1 else b"0"
        found = [best[a] for a in n[1] if best[a] is not None]
        return min(found, key=len) if found else None

    # -- stepping ------------------------------------------------------------------------------------------------
    def _advance(self, st, data: bytes):
        for c in data:
            st = self.step(st, c)
            if st is None:
                return None
        return st

    def step(self, st: tuple, c: int):
        """The state after byte `c`, or None. `()` is a finished document (nothing may follow)."""
        while st:
            top = st[-1]
            r = self.frame(top, c)
            if r is not None:
                new = st[:-1] + r
                return new if len(new) <= MAX_FRAMES else None
            if not self.finishable(top):
                return None
            st = st[:-1]  # a number (or literal) that could end here ends; the byte goes to the frame below
        return None

    def finishable(self, f) -> bool:
        kind = f[0]
        if kind == NUM:
            return f[2] in jsonmode._NUM_DONE
        if kind == LITS:
            return f[2] in self.nodes[f[1]][1]
        if kind == ANY:
            s = f[1]
            return s[0] == jsonmode.NUMBER and not s[1] and s[2] in jsonmode._NUM_DONE
        if kind == ALT:
            return any(all(self.finishable(g) for g in b) for b in f[1])
        return False

    def done(self, st) -> bool:
        return all(self.finishable(f) for f in st)

    def frame(self, f, c: int):
        """Frames replacing `f` after byte `c` (a tuple: () when it ends, more than one when it opens a value)."""
        kind = f[0]
        if kind == STR:
            return self._str(f, c)
        if kind == OBJ:
            return self._obj(f, c)
        if kind == ARR:
            return self._arr(f, c)
        if kind == NUM:
            _, node, sub = f
            integer = self.nodes[node][1]
            cls = jsonmode._num_class(c)
            if sub == "":
                nxt = "-" if c == 0x2D else {"0": "0", "d": "I"}.get(cls)
            else:
                nxt = jsonmode._NUM[sub].get(cls)
                if integer and cls in (".", "e"):
                    nxt = None
            return ((NUM, node, nxt),) if nxt is not None else None
        if kind == LITS:
            typed = f[2] + bytes((c,))
            options = self.nodes[f[1]][1]
            if not any(t.startswith(typed) for t in options):
                return None
            if typed in options and not any(len(t) > len(typed) and t.startswith(typed) for t in options):
                return ()
            return ((LITS, f[1], typed),)
        if kind == ANY:
            s = jsonmode.step(f[1], c)
            if s is None:
                return None
            return () if s[0] == jsonmode.END else ((ANY, s),)
        branches = set()
        for b in f[1]:
            nb = self.step(b, c)
            if nb is not None:
                branches.add(nb)
        if not branches:
            return None
        if branches == {()}:
            return ()
        return ((ALT, frozenset(branches)),)

    def _str(self, f, c: int):
        _, node, count, esc = f
        _, lo, hi = self.nodes[node]
        if count < 0:
            return ((STR, node, 0, 0),) if c == 0x22 else None
        if isinstance(esc, tuple):  # inside a UTF-8 character: (bytes to go, range of the next one)
            k, a, b = esc
            if not a <= c <= b:
                return None
            return ((STR, node, count, (k - 1, 0x80, 0xBF) if k > 1 else 0),)
        if esc == 0:
            if c == 0x22:
                return () if count >= lo else None
            if c < 0x20 or (hi is not None and count >= hi):
                return None
            if c < 0x80:
                return ((STR, node, count + 1, 1 if c == 0x5C else 0),)
            lead = _UTF8.get(c)  # well-formed UTF-8 only (Unicode Table 3-7), so characters count right
            return None if lead is None else ((STR, node, count + 1, lead),)
        if esc == 1:
            if c == 0x75:
                return ((STR, node, count, 2),)
            return ((STR, node, count, 0),) if c in _ESC else None
        if c not in _HEX:
            return None
        if esc == 2 and c in b"dD":
            return ((STR, node, count, 6),)  # \uD...: no surrogates (a pair would count as two characters)
        if esc == 6:
            return ((STR, node, count, 4),) if c in b"01234567" else None
        return ((STR, node, count, 0 if esc == 5 else esc + 1),)

    def _candidates(self, fields, nxt: int) -> range:
        """Indexes of the properties that may come next: up to and including the first required one."""
        end = nxt
        while end < len(fields):
            if fields[end][2]:
                return range(nxt, end + 1)
            end += 1
        return range(nxt, end)

    def _obj(self, f, c: int):
        _, node, nxt, phase, typed, ws = f
        fields = self.nodes[node][1]
        if phase == "{":
            return ((OBJ, node, nxt, "k", b"", 0),) if c == 0x7B else None
        if phase == "q":
            typed += bytes((c,))
            for j in self._candidates(fields, nxt):
                key = fields[j][0]
                if key == typed:
                    return ((OBJ, node, j, ":", b"", 0),)
                if key.startswith(typed):
                    return ((OBJ, node, nxt, "q", typed, 0),)
            return None
        if c in _WS:
            return ((OBJ, node, nxt, phase, typed, ws + 1),) if ws < MAX_WS else None
        cands = self._candidates(fields, nxt)
        can_close = not cands or not fields[cands[-1]][2]
        if phase in ("k", "K"):
            if c == 0x22 and cands:
                return ((OBJ, node, nxt, "q", b"", 0),)
            return () if c == 0x7D and phase == "k" and can_close else None
        if phase == ":":
            return ((OBJ, node, nxt, "v", b"", 0),) if c == 0x3A else None
        if phase == "v":
            child = self.start(fields[nxt][1])
            r = self.frame(child, c)
            return None if r is None else ((OBJ, node, nxt + 1, ",", b"", 0),) + r
        if c == 0x2C and cands:
            return ((OBJ, node, nxt, "K", b"", 0),)
        return () if c == 0x7D and can_close else None

    def _arr(self, f, c: int):
        _, node, count, phase, ws = f
        _, item, lo, hi = self.nodes[node]
        if phase == "[":
            return ((ARR, node, 0, "f", 0),) if c == 0x5B else None
        if c in _WS:
            return ((ARR, node, count, phase, ws + 1),) if ws < MAX_WS else None
        if c == 0x5D and phase in ("f", ",") and count >= lo:
            return ()
        if phase == "," and c == 0x2C and (hi is None or count < hi):
            return ((ARR, node, count, "v", 0),)
        if phase in ("f", "v") and (hi is None or count < hi):
            r = self.frame(self.start(item), c)
            return None if r is None else ((ARR, node, count + 1, ",", 0),) + r
        return None

    # -- closing ---------------------------------------------------------------------------------------------------
    def _closing(self, st) -> bytes:
        """The shortest bytes that finish the document from state `st`."""
        out = bytearray()
        while not self.done(st):
            c = self._closing_byte(st)
            out.append(c)
            st = self.step(st, c)
        return bytes(out)

    def _closing_byte(self, st) -> int:
        while self.finishable(st[-1]):
            st = st[:-1]
        f = st[-1]
        kind = f[0]
        if kind == STR:
            _, node, count, esc = f
            if count < 0:
                return 0x22
            if isinstance(esc, tuple):
                return esc[1]
            if esc:
                return 0x6E if esc == 1 else 0x30
            return 0x61 if count < self.nodes[node][1] else 0x22
        if kind == NUM:
            return 0x30
        if kind == LITS:
            return min((t for t in self.nodes[f[1]][1] if t.startswith(f[2])), key=len)[len(f[2])]
        if kind == ANY:
            return jsonmode._closing_byte(f[1]) if f[1][1] or f[1][0] != jsonmode.VALUE else 0x30
        if kind == ALT:
            return min((self.closing(b) for b in f[1] if not self.done(b)), key=lambda t: (len(t), t))[0]
        if kind == OBJ:
            _, node, nxt, phase, typed, _ = f
            fields = self.nodes[node][1]
            cands = self._candidates(fields, nxt)
            need = cands and fields[cands[-1]][2]
            if phase == "{":
                return 0x7B
            if phase == "q":
                if need and fields[cands[-1]][0].startswith(typed):
                    return fields[cands[-1]][0][len(typed)]  # the required key: an optional one adds its value
                keys = [fields[j][0] for j in cands if fields[j][0].startswith(typed)]
                return min(keys, key=len)[len(typed)]
            if phase == ":":
                return 0x3A
            if phase == "v":
                return self.min_text[fields[nxt][1]][0]
            if phase == ",":
                return 0x2C if need else 0x7D
            return 0x22 if need or phase == "K" else 0x7D
        _, node, count, phase, _ = f
        _, item, lo, _ = self.nodes[node]
        if phase == "[":
            return 0x5B
        if phase in ("f", ",") and count >= lo:
            return 0x5D
        return 0x2C if phase == "," else self.min_text[item][0]


class SchemaConstraint(jsonmode.JSONConstraint):
    """Per-sequence schema state; the same interface (and token choice) as JSON mode's constraint."""

    def __init__(self, table: list[bytes | None], schema: Schema):
        super().__init__(table)
        self.schema = schema
        self.state = schema.initial

    @property
    def done(self) -> bool:
        return self.schema.done(self.state)

    def _advance(self, state, data: bytes):
        return self.schema.transition(state, data)

    def _mask_cache(self) -> dict:
        return jsonmode._table_cache(self.schema.masks, self.table)

    def _closing(self, state) -> bytes:
        return self.schema.closing(state)

    def _dead(self):
        return ()

    # Closing text is long here (required keys, enum values), so it is counted and forced in whole tokens: the
    # longest token that starts it, again and again (memoised per schema and vocabulary).
    def _cost(self, state) -> int:
        return len(self._closing_tokens(state))

    def _force(self) -> int | None:
        tokens = self._closing_tokens(self.state)
        return tokens[0] if tokens and tokens[0] >= 0 else None

    def _closing_tokens(self, state) -> list[int]:
        memo = jsonmode._table_cache(self.schema.closing_tokens, self.table)
        if state not in memo:
            by_bytes, longest = _token_index(self.table)
            need, out, i = self._closing(state), [], 0
            while i < len(need):
                for n in range(min(longest, len(need) - i), 0, -1):
                    t = by_bytes.get(need[i : i + n])
                    if t is not None:
                        out.append(t)
                        i += n
                        break
                else:
                    out.extend([-1] * (len(need) - i))  # no token for this byte: cannot be forced
                    break
            if len(memo) > 1 << 16:
                memo.clear()
            memo[state] = out
        return memo[state]


_INDEX: dict[int, tuple[list, dict[bytes, int], int]] = {}


def _token_index(table: list[bytes | None]) -> tuple[dict[bytes, int], int]:
    """{token bytes: lowest id} and the longest token (at most 48 bytes) of a vocabulary, built once per table."""
    hit = _INDEX.get(id(table))
    if hit is None or hit[0] is not table:
        by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(table):
            if b and len(b) <= 48:
                by_bytes.setdefault(b, i)
        hit = (table, by_bytes, max(map(len, by_bytes), default=1))
        if len(_INDEX) > 8:
            _INDEX.clear()
        _INDEX[id(table)] = hit
    return hit[1], hit[2]


_COMPILED: dict[str, Schema] = {}


def compile_schema(schema: dict) -> Schema:
    """The automaton of `schema` (cached by its JSON text, so a server's repeated schema compiles once).
    Raises TinkerError naming an unsupported keyword and where it is."""
    key = json.dumps(schema, sort_keys=True)
    if key not in _COMPILED:
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        _COMPILED[key] = Schema(schema)
    return _COMPILED[key]
