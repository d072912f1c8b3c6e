"""Chat templates and the interactive chat REPL (`tinkerlm chat`).

Templates come from downloaded files, so they are rendered in Jinja2's immutable sandbox, with the same
environment transformers uses for `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, `tojson`,
`raise_exception`, `strftime_now`), so the prompt text is identical.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from tinkerlm.errors import TinkerError

ROLES = ("system", "user", "assistant", "tool")


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise TinkerError(f"chat template: cannot parse it ({e}); fix tokenizer_config.json or pass --raw") from None


def check_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise TinkerError("messages: the conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TinkerError(f"messages[{i}]: each message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise TinkerError(f"messages[{i}].role: '{m['role']}' is not one of {', '.join(ROLES)}")
    return list(messages)


def render(tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **extra) -> str:
    """The model's own chat template applied to `messages`, as text (special tokens written out)."""
    from jinja2 import TemplateError

    if not tokenizer.chat_template:
        raise TinkerError("chat template: this model has none (use --raw, or a model with a chat template)")
    template = _compile(tokenizer.chat_template)
    try:
        return template.render(
            messages=check_messages(messages),
            add_generation_prompt=add_generation_prompt,
            **tokenizer.special_tokens_map(),
            **extra,
        )
    except TemplateError as e:
        raise TinkerError(f"chat template: {e}") from None


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
