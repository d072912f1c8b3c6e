"""A tiny interpreter for the subset of Go's text/template that Ollama chat templates use, so tests can render a
Modelfile's TEMPLATE without Ollama: text, `{{- -}}` trimming, `if` / `else if` / `else` / `end`,
`range $i, $_ := PIPE`, `$x := PIPE`, `$x = PIPE`, output of a pipeline; fields (`.Role`, `$.Messages`),
variables, string and integer literals, parentheses and the functions eq, ne, and, or, not, len, slice.
Anything else raises, so a template using more than this subset fails the test rather than rendering wrongly.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|\d+|\$\.\w+|\$\w*|\.\w+|\w+)')


def render(template: str, data: dict) -> str:
    items, pos = [], 0
    for m in _ACTION.finditer(template):
        items.append(["text", template[pos : m.start()]])
        if m.group(1) and items[-1][0] == "text":
            items[-1][1] = items[-1][1].rstrip()
        items.append(["action", m.group(2), bool(m.group(3))])
        pos = m.end()
    items.append(["text", template[pos:]])
    for i, item in enumerate(items):  # right trim: strip the whitespace starting the next text
        if item[0] == "action" and item[2] and i + 1 < len(items):
            items[i + 1][1] = items[i + 1][1].lstrip()
    nodes, rest = _parse([(it[0], it[1]) for it in items], ())
    assert not rest, "unbalanced {{ end }}"
    out: list[str] = []
    _run(nodes, data, {"$": data}, data, out)
    return "".join(out)


def _parse(items, stop):
    """Nodes until an action whose keyword is in `stop`; returns (nodes, remaining items starting at the stop)."""
    nodes = []
    while items:
        kind, body = items[0]
        if kind == "text":
            nodes.append(("text", body))
            items = items[1:]
            continue
        word = body.split(" ", 1)[0]
        if word in stop:
            return nodes, items
        items = items[1:]
        if word == "if":
            branches = []
            cond = body[3:]
            while True:
                inner, items = _parse(items, ("else", "end"))
                branches.append((cond, inner))
                _, tail = items[0]
                items = items[1:]
                if tail == "end":
                    break
                cond = tail[len("else if ") :] if tail.startswith("else if ") else "true"
            nodes.append(("if", branches))
        elif word == "range":
            m = re.fullmatch(r"range \$(\w+), \$(\w+) := (.*)", body)
            assert m, body
            inner, items = _parse(items, ("end",))
            items = items[1:]
            nodes.append(("range", m.group(1), m.group(2), m.group(3), inner))
        elif m := re.fullmatch(r"\$(\w+) :?= (.*)", body):
            nodes.append(("set", m.group(1), m.group(2)))
        else:
            nodes.append(("out", body))
    assert not stop, f"missing {stop}"
    return nodes, items


def _run(nodes, dot, env, root, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_eval(node[1], dot, env)))
        elif node[0] == "set":
            env[node[1]] = _eval(node[2], dot, env)
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond == "true" or _truth(_eval(cond, dot, env)):
                    _run(body, dot, env, root, out)
                    break
        elif node[0] == "range":
            _, ivar, evar, expr, body = node
            for i, item in enumerate(_eval(expr, dot, env)):
                env[ivar], env[evar] = i, item
                _run(body, item, env, root, out)


def _truth(v) -> bool:
    return bool(v)  # Go: false, 0, "", nil and empty collections are false, as in Python


FUNCS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "and": lambda a, b: b if _truth(a) else a,
    "or": lambda a, b: a if _truth(a) else b,
    "not": lambda a: not _truth(a),
    "len": len,
    "slice": lambda x, i: x[i:],
}


def _eval(expr: str, dot, env):
    tokens, pos = [], 0
    while expr[pos:].strip():
        m = _TOKEN.match(expr, pos)
        assert m, f"unsupported template syntax in {expr!r} at {pos}"
        tokens.append(m.group(1))
        pos = m.end()
    value, rest = _pipeline(tokens, dot, env)
    assert not rest, f"cannot evaluate {expr!r}"
    return value


def _pipeline(tokens, dot, env):
    """A command: a function and its arguments, or a single operand; stops at ')'."""
    if tokens[0] in FUNCS:
        fn, tokens, args = FUNCS[tokens[0]], tokens[1:], []
        while tokens and tokens[0] != ")":
            arg, tokens = _operand(tokens, dot, env)
            args.append(arg)
        return fn(*args), tokens
    return _operand(tokens, dot, env)


def _operand(tokens, dot, env):
    t, rest = tokens[0], tokens[1:]
    if t == "(":
        value, rest = _pipeline(rest, dot, env)
        assert rest and rest[0] == ")", tokens
        return value, rest[1:]
    if t.startswith('"'):
        return t[1:-1].encode().decode("unicode_escape"), rest
    if t.isdigit():
        return int(t), rest
    if t.startswith("$."):
        return env["$"][t[2:]], rest
    if t.startswith("$"):
        return env[t[1:] or "$"], rest
    if t.startswith("."):
        return dot[t[1:]], rest
    raise AssertionError(f"unsupported template token {t!r}")
