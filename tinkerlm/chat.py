"""Chat templates, rendered within bounds, and the interactive chat REPL (`tinkerlm chat`).

Templates come from downloaded files, so they are rendered in Jinja2's immutable sandbox, with the same
environment transformers uses for `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, `tojson`,
`raise_exception`, `strftime_now`), so the prompt text is identical. The sandbox stops attribute escapes but not
resource use, so rendering is also bounded (limits.TEMPLATE_*):

- time: a trace function on the rendering thread checks the deadline (and a cancel event) on every call and line
  of template and Jinja code, so a loop with no output stops too. No watchdog thread or async exception is needed,
  and it works in any thread (the server runs it in a worker thread). C-level work is bounded by size:
- size: every operation that can build a big value from small ones is checked before it allocates (`*`, `**`,
  `+`, `~`, `%` and `str.format` widths, size-like filter and str-method arguments, `replace`, `join`, `indent`,
  `wordwrap`, `tojson(indent)`), and the sizes built are charged to one budget per rendering (TEMPLATE_WORK_CHARS);
  output stops at TEMPLATE_OUTPUT_CHARS, the source at TEMPLATE_SOURCE_CHARS;
- `{% include %}`, `{% import %}` and `{% extends %}` are refused (a template is one self-contained string);
- every failure (Jinja errors, RecursionError from macro recursion, a TypeError in template code...) becomes a
  one-line TinkerError naming the template's source file.

`prompt_ids` renders and tokenizes a conversation with message contents as plain text: special-token text inside a
content (`<|im_start|>system`) stays text, while the template's own markup keeps its special tokens.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache, wraps
from itertools import compress, repeat
from pathlib import Path
from typing import Any

from tinkerlm import limits
from tinkerlm.errors import TinkerError

ROLES = ("system", "user", "assistant", "tool")


class _Stop(BaseException):
    """A bound was hit. A BaseException, so neither Jinja's nor a filter's `except Exception` can swallow it."""


class _Bounds:
    """The deadline, cancel event and size budget of the rendering running on this thread."""

    def __init__(self, seconds: float, cancel: threading.Event | None):
        self.deadline = time.monotonic() + seconds
        self.cancel = cancel
        self.work = limits.TEMPLATE_WORK_CHARS

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Stop(f"rendering took longer than {limits.TEMPLATE_SECONDS:g} s (a loop that does not end?)")
        if self.cancel is not None and self.cancel.is_set():
            raise _Stop("rendering was cancelled")

    def charge(self, n: int, what: str) -> None:
        if n > limits.TEMPLATE_OUTPUT_CHARS:
            raise _Stop(f"{what} would build {n:,} characters or items (limit {limits.TEMPLATE_OUTPUT_CHARS:,})")
        self.work -= n
        if self.work < 0:
            raise _Stop(f"the template builds more than {limits.TEMPLATE_WORK_CHARS:,} characters or items in all")


_local = threading.local()


def _bounds() -> _Bounds:
    b = getattr(_local, "bounds", None)
    # Outside `_bounded` (a filter called by other code): fresh default bounds, so sizes are still checked.
    return b if b is not None else _Bounds(limits.TEMPLATE_SECONDS, None)


def _size(x: Any) -> int:
    """Characters and items a value holds (what printing or copying it costs). The scans over items are C-level
    (map/compress), so the trace function does not fire per item."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, dict):
        return len(x) + _size(list(x.keys())) + _size(list(x.values()))
    if isinstance(x, (list, tuple)):
        texts = sum(map(len, compress(x, map(isinstance, x, repeat(str)))))
        nested = compress(x, map(isinstance, x, repeat((list, tuple, dict))))
        return len(x) + texts + sum(map(_size, nested))
    return 1


def _shallow(x: Any) -> int:
    """What copying a value costs: characters of a string, references of a container (items are shared)."""
    return len(x) if isinstance(x, (str, list, tuple, dict)) else 1


def _text(x: Any, b: _Bounds, what: str) -> str:
    """`str(x)`, with a container's printed size charged before it is printed."""
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple, dict)):
        b.charge(_size(x), what)
    return str(x)


def _int_arg(value: Any, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limits.TEMPLATE_OUTPUT_CHARS:
        raise _Stop(f"{what} has an argument of {value:,}, above {limits.TEMPLATE_OUTPUT_CHARS:,}")


_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d*)(?:\.(\*|\d*))?")


def _check_widths(fmt: str, what: str) -> None:
    """Refuse `%`- and `{}`-format widths and precisions that would allocate past the output limit."""
    for m in _PERCENT.finditer(fmt):
        for g in m.groups():
            if g == "*":
                raise _Stop(f"{what}: '*' widths are not allowed in templates")
            if g and int(g) > limits.TEMPLATE_OUTPUT_CHARS:
                raise _Stop(f"{what}: width {g} is above {limits.TEMPLATE_OUTPUT_CHARS:,}")
    if "{" in fmt:
        try:
            fields = list(string.Formatter().parse(fmt))
        except ValueError:
            return  # str.format raises the same error itself
        for _, _, spec, _ in fields:
            if spec and "{" in spec:
                raise _Stop(f"{what}: nested format fields are not allowed in templates")
            for g in re.findall(r"\d+", spec or ""):
                if int(g) > limits.TEMPLATE_OUTPUT_CHARS:
                    raise _Stop(f"{what}: width {g} is above {limits.TEMPLATE_OUTPUT_CHARS:,}")


def _depth(x: Any) -> int:
    if isinstance(x, dict):
        return 1 + max((_depth(v) for v in x.values()), default=0)
    if isinstance(x, (list, tuple)):
        return 1 + max((_depth(v) for v in x), default=0)
    return 0


def _estimate(name: str, args: tuple, kwargs: dict) -> int | None:
    """An upper bound on the size of what filter or str method `name` returns, known before calling it."""

    def arg(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    s = args[0] if args else None
    if name == "replace" and isinstance(s, str):
        old, new, count = str(arg(1, "old", "")), str(arg(2, "new", "")), arg(3, "count", None)
        n = len(s) + 1 if old == "" else s.count(old)
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        return len(s) + n * max(0, len(new) - len(old))
    if name == "indent" and isinstance(s, str):
        width = arg(1, "width", 4)
        width = len(width) if isinstance(width, str) else max(0, int(width))
        return len(s) + (s.count("\n") + 1) * width
    if name == "wordwrap" and isinstance(s, str):
        width, wrap = arg(1, "width", 79), arg(3, "wrapstring", None) or "\n"
        return len(s) + (len(s) // max(1, int(width)) + 1) * len(str(wrap))
    if name in ("center", "ljust", "rjust", "zfill"):
        width = arg(1, "width", 0)
        return (len(s) if isinstance(s, str) else 0) + (width if isinstance(width, int) else 0)
    if name == "expandtabs" and isinstance(s, str):
        tab = arg(1, "tabsize", 8)
        return len(s) + s.count("\t") * max(0, tab if isinstance(tab, int) else 8)
    return None


def _guard(f, name: str, skip: int = 0):
    """`f` (a filter or global), checked against the bounds before and after it runs. A filter's value (its first
    argument, after the context Jinja may pass) is not a size argument: `skip=1` leaves it out of the checks."""
    skip += getattr(f, "jinja_pass_arg", None) is not None

    @wraps(f)
    def guarded(*args, **kwargs):
        b = _bounds()
        b.tick()
        for v in [*args[skip:], *kwargs.values()]:
            _int_arg(v, f"filter or function '{name}'")
        value_args = args[skip - 1 :] if skip else args
        if (
            name == "join" and skip and value_args and len(value_args) <= 2 and not kwargs.get("attribute")
        ):  # the separator repeats once per item: size it before joining
            items = [_text(v, b, "join") for v in value_args[0]]
            sep = value_args[1] if len(value_args) > 1 else kwargs.get("d", "")
            b.charge(sum(map(len, items)) + len(str(sep)) * max(0, len(items) - 1), "join")
            args = (*args[: skip - 1], items, *value_args[1:])
        elif name == "format" and skip and value_args and isinstance(value_args[0], str):
            _check_widths(value_args[0], "format")
        elif skip:
            est = _estimate(name, value_args, kwargs)
            if est is not None:
                b.charge(est, name)
        out = f(*args, **kwargs)
        if isinstance(out, (str, list, tuple, dict)):
            b.charge(_shallow(out), name)
        return out

    return guarded


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson (json.dumps, unescaped); an indent repeats once per nesting level on every line, so the
    # indented size is bounded from the compact one before it is built.
    b = _bounds()
    compact = json.dumps(x, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    b.charge(len(compact), "tojson")
    if indent is None:
        return compact
    width = len(indent) if isinstance(indent, str) else max(0, int(indent))
    lines = compact.count(",") + compact.count("[") + compact.count("{") + 2
    b.charge(len(compact) + lines * (1 + width * _depth(x)), "tojson(indent)")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    from jinja2 import TemplateError

    raise TemplateError(message)


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator, optimizeconst
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generator(CodeGenerator):
        @optimizeconst
        def visit_Concat(self, node, frame):
            # `a ~ b` compiles to a plain str join; route it through the environment so its size is checked first.
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Environment(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        # Intercepted operators are also kept out of compile-time constant folding.
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def bounded_concat(self, parts):
            b = _bounds()
            b.tick()
            texts = [_text(p, b, "'~'") for p in parts]
            b.charge(sum(map(len, texts)), "'~'")
            return "".join(texts)

        def call_binop(self, context, operator, left, right):
            b = _bounds()
            b.tick()
            sized = (str, list, tuple)
            ints = isinstance(left, int) and isinstance(right, int)
            if operator == "*":
                if isinstance(left, sized) and isinstance(right, int):
                    b.charge(len(left) * max(0, right), "'*'")
                elif isinstance(right, sized) and isinstance(left, int):
                    b.charge(len(right) * max(0, left), "'*'")
                elif ints and left.bit_length() + right.bit_length() > limits.TEMPLATE_INT_BITS:
                    raise _Stop(f"'*' would build an integer of over {limits.TEMPLATE_INT_BITS} bits")
            elif operator == "**" and ints and right > 0 and left.bit_length() * right > limits.TEMPLATE_INT_BITS:
                raise _Stop(f"'**' would build an integer of over {limits.TEMPLATE_INT_BITS} bits")
            elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
                b.charge(len(left) + len(right), "'+'")
            elif operator == "%" and isinstance(left, str):
                _check_widths(left, "'%'")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's own signature)
            b = _bounds()
            b.tick()
            name = getattr(__obj, "__name__", "")
            for v in [*args, *kwargs.values()]:
                _int_arg(v, f"'{name}'")
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                if name == "join" and args:
                    items = [_text(v, b, "join") for v in args[0]]
                    b.charge(sum(map(len, items)) + len(owner) * max(0, len(items) - 1), "join")
                    args = (items, *args[1:])
                else:
                    est = _estimate(name, (owner, *args), kwargs)
                    if est is not None:
                        b.charge(est, name)
            out = super().call(__context, __obj, *args, **kwargs)
            if isinstance(out, (str, list, tuple, dict)):
                b.charge(_shallow(out), f"'{name}'")
            return out

        def wrap_str_format(self, value):
            fmt = super().wrap_str_format(value)
            if fmt is not None:
                _check_widths(value.__self__, "str.format")
            return fmt

    def finalize(value):
        # Every `{{ ... }}` value passes here before Jinja prints it: a container's printed size is checked first.
        if isinstance(value, (list, tuple, dict)):
            _bounds().charge(_size(value), "printing a value")
        return value

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], finalize=finalize)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    del env.globals["lipsum"]  # builds text by count; no chat template uses it
    env.filters = {name: _guard(f, name, skip=1) for name, f in env.filters.items()}
    env.globals = {name: _guard(f, name) if callable(f) else f for name, f in env.globals.items()}
    env.refused_nodes = (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)
    return env


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, _Stop) and type(e).__name__ not in ("TemplateError", "TemplateSyntaxError"):
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= 300 else text[:300] + "..."


class _bounded:
    """Run a block under the template bounds on this thread: a deadline checked by a trace function, a budget."""

    def __init__(self, source: str, cancel: threading.Event | None = None):
        self.source, self.cancel = source, cancel

    def __enter__(self):
        self.bounds = _local.bounds = _Bounds(limits.TEMPLATE_SECONDS, self.cancel)
        tick, self.active = self.bounds.tick, [True]
        active = self.active

        # Called on every Python call (and generator resume) this thread makes meanwhile, and on every line of
        # template code (templates compile to Python), so even a loop with no output and no calls stops. Lines of
        # other code are not traced: Jinja's and our helpers' loops are bounded by the size checks, and tracing
        # them would make rendering several times slower. Inactive after the block: a frame left suspended (a
        # generator closed later) keeps this function.
        def trace(frame, event, arg):
            if not active[0]:
                return None
            tick()
            return trace if frame.f_code.co_filename == "<template>" else None

        self.previous = sys.gettrace()
        sys.settrace(trace)
        return self.bounds

    def __exit__(self, kind, exc, tb):
        self.active[0] = False
        sys.settrace(self.previous)
        _local.bounds = None
        if exc is None or isinstance(exc, (TinkerError, KeyboardInterrupt, SystemExit)):
            return False
        if isinstance(exc, (Exception, _Stop)):
            raise TinkerError(
                f"{self.source}: chat template: {_one_line(exc)} (fix the template or pass --raw)"
            ) from None
        return False


@lru_cache(maxsize=16)
def _compile(template: str, source: str):
    if len(template) > limits.TEMPLATE_SOURCE_CHARS:
        raise TinkerError(
            f"{source}: chat template: {len(template):,} characters, above {limits.TEMPLATE_SOURCE_CHARS:,}"
        )
    env = _environment()
    with _bounded(source):
        ast = env.parse(template)
        for node in ast.find_all(env.refused_nodes):
            tag = type(node).__name__.lower().replace("fromimport", "from ... import")
            raise TinkerError(
                f"{source}: chat template uses {{% {tag} %}}, which is not allowed (a chat template must be "
                "self-contained; inline the other template)"
            )
        return env.from_string(ast)


@lru_cache(maxsize=16)
def _variables(template: str, source: str) -> frozenset[str]:
    from jinja2 import meta

    _compile(template, source)  # the same checks (size, refused tags) as rendering
    with _bounded(source):
        return frozenset(meta.find_undeclared_variables(_environment().parse(template)))


def template_variables(tokenizer) -> frozenset[str]:
    """The names a model's chat template reads from its context (`messages`, `tools`, `add_generation_prompt`...)."""
    _, source = _template(tokenizer)
    return _variables(tokenizer.chat_template, source)


def template_source(path: str | Path) -> str:
    """Where a model's chat template comes from, for error messages: a file, or a GGUF file and its key."""
    path = Path(path)
    if path.is_file():
        return f"{path} (tokenizer.chat_template)"
    for name in ("chat_template.jinja", "tokenizer_config.json", "chat_template.json"):
        if (path / name).is_file():
            return str(path / name)
    return str(path)


def check_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise TinkerError("messages: the conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TinkerError(f"messages[{i}]: each message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise TinkerError(f"messages[{i}].role: '{m['role']}' is not one of {', '.join(ROLES)}")
    return list(messages)


def _render(tokenizer, template, source, messages, add_generation_prompt, extra) -> str:
    """One rendering, under the bounds already entered; output counted as it is produced."""
    b = _bounds()
    out, n = [], 0
    variables = {
        **tokenizer.special_tokens_map(),
        **extra,
        "messages": messages,
        "add_generation_prompt": add_generation_prompt,
    }
    pieces = template.generate(**variables)
    try:
        for piece in pieces:
            n += len(piece)
            if n > limits.TEMPLATE_OUTPUT_CHARS:
                raise _Stop(f"the output passed {limits.TEMPLATE_OUTPUT_CHARS:,} characters")
            b.tick()
            out.append(piece)
    finally:
        pieces.close()
    return "".join(out)


def _template(tokenizer) -> tuple[Any, str]:
    source = getattr(tokenizer, "chat_template_source", None) or "chat template"
    if not tokenizer.chat_template:
        raise TinkerError(f"{source}: this model has no chat template (use --raw, or a model with a chat template)")
    if not isinstance(tokenizer.chat_template, str):
        raise TinkerError(f"{source}: the chat template is not a string")
    return _compile(tokenizer.chat_template, source), source


def render(
    tokenizer,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    *,
    cancel: threading.Event | None = None,
    **extra,
) -> str:
    """The model's own chat template applied to `messages`, as text (special tokens written out).

    Runs in the calling thread and returns (or raises) within about limits.TEMPLATE_SECONDS; setting `cancel`
    stops it early. Safe to call from worker threads.

    Raises:
        TinkerError: no template, bad messages, or the template fails or passes a bound (one line, naming its file).
    """
    messages = check_messages(messages)
    template, source = _template(tokenizer)
    with _bounded(source, cancel):
        return _render(tokenizer, template, source, messages, add_generation_prompt, extra)


def _render_marked(
    tokenizer, messages, add_generation_prompt, cancel, extra: dict
) -> tuple[str, list[tuple[int, int]], str]:
    """`render`'s text, the (start, end) spans message contents fill in it, and the text with placeholders.

    The template is rendered a second time with a unique placeholder for each string content; where that render,
    with the contents put back, equals the real one, the placeholders give the spans exactly. Templates that
    transform contents (trim, split) do not; then each content is looked up in the text in message order.
    """
    messages = check_messages(messages)
    template, source = _template(tokenizer)
    with _bounded(source, cancel):
        text = _render(tokenizer, template, source, messages, add_generation_prompt, extra)
        nonce = secrets.token_hex(8)
        holders, marked = {}, []
        for i, m in enumerate(messages):
            if isinstance(m["content"], str) and m["content"]:
                holder = f"TinkerContent{nonce}N{i}E"
                holders[holder] = m["content"]
                m = {**m, "content": holder}
            marked.append(m)
        if not holders:
            return text, [], text
        rendered = _render(tokenizer, template, source, marked, add_generation_prompt, extra)
    spans, parts, pos = [], [], 0
    for piece in re.split(f"(TinkerContent{nonce}N\\d+E)", rendered):
        content = holders.get(piece)
        parts.append(piece if content is None else content)
        if content is not None:
            spans.append((pos, pos + len(content)))
        pos += len(parts[-1])
    if "".join(parts) == text:
        return text, spans, rendered
    spans, pos = [], 0
    for content in holders.values():
        for form in (content, content.strip()):  # `| trim` is the common rewrite
            at = text.find(form, pos) if form else -1
            if at >= 0:
                spans.append((at, at + len(form)))
                pos = at + len(form)
                break
    return text, spans, rendered


def prompt_ids(
    tokenizer,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    *,
    parse_special: bool = False,
    cancel: threading.Event | None = None,
    tools: list[dict] | None = None,
) -> list[int]:
    """The token ids of a conversation rendered with the chat template, ready to generate from.

    The template writes its special tokens itself, so no BOS/EOS is added (as transformers does). With
    `parse_special=False` (the default) special-token text inside message contents is tokenized as plain text, so a
    message cannot forge turns; ordinary conversations get the same ids either way. Blocking and bounded (about
    limits.TEMPLATE_SECONDS for the template, plus tokenization): servers call it from a worker thread, e.g.
    `await asyncio.to_thread(prompt_ids, tokenizer, messages, cancel=event)`. `tools` is passed to the template as
    its `tools` variable (OpenAI's list; tinkerlm.toolcalls decides when).

    Raises:
        TinkerError: as `render`; or a template rewrote a content holding special-token text so that it cannot be
            located in the prompt (it could not be kept as text).
    """
    extra = {} if tools is None else {"tools": tools}
    if parse_special:
        return tokenizer.encode(render(tokenizer, messages, add_generation_prompt, cancel=cancel, **extra), False)
    text, spans, marked = _render_marked(tokenizer, messages, add_generation_prompt, cancel, extra)
    ids = tokenizer.encode_spans(text, spans)
    # Whatever the spans, the prompt must hold the control tokens of the template's own markup and no more: those
    # of the render with placeholders (which hold no special-token text).
    special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    own = [i for i in tokenizer.encode(marked, False) if i in special]
    if [i for i in ids if i in special] != own:
        source = getattr(tokenizer, "chat_template_source", None) or "chat template"
        raise TinkerError(
            f"messages: a content holds special-token text that the chat template ({source}) rewrites, so it cannot "
            "be kept as plain text (remove it, or pass parse_special=True)"
        )
    return ids


HELP = "Commands: /reset clears the history, /system TEXT sets the system prompt, /exit quits. Ctrl-C stops an answer."


def _on_sigint(handler):
    """Install a SIGINT handler and return the previous one (a no-op off the main thread, where Python forbids it)."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler) or signal.default_int_handler


def repl(llm, *, system: str | None = None, max_tokens: int = 512, **options) -> None:
    """Interactive chat with history and streaming. Ctrl-C interrupts the current answer, not the session."""
    history: list[dict[str, str]] = []
    tty = sys.stdin.isatty()
    if tty:
        print(f"Chatting with {llm.name}. {HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if tty else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip() or None
            history.clear()
            print(f"(system prompt {'set' if system else 'cleared'}; history cleared)", file=sys.stderr)
            continue
        if text in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        answer = ""
        # Ctrl-C during an answer sets a flag checked between tokens (rather than raising KeyboardInterrupt at
        # whatever line is running), so the answer stops cleanly and the session goes on.
        stop: list[int] = []
        previous = _on_sigint(lambda *_, stop=stop: stop.append(1))
        try:
            for piece in llm.chat_stream(messages, max_tokens=max_tokens, **options):
                answer += piece
                print(piece, end="", flush=True)
                if stop:
                    break
        except KeyboardInterrupt:
            stop.append(1)
        finally:
            _on_sigint(previous)
        if stop:
            print("\n(interrupted)", file=sys.stderr, end="")
        print(flush=True)
        history.append({"role": "assistant", "content": answer})
