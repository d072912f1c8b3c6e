"""`tinkerlm <verb>`: a thin dispatcher. Parsing imports nothing heavy, so `--help` answers without torch.

Each verb maps to an importable function; flag names equal its keyword arguments. A `TinkerError` becomes one line
on stderr and exit status 2 (the traceback only with --debug).
"""

from __future__ import annotations

import argparse
import sys

SAMPLING_FLAGS = [
    ("--max-tokens", int, 256, "most tokens to generate"),
    ("--temperature", float, 0.0, "sampling temperature; 0 is greedy"),
    ("--top-k", int, 0, "sample from the k most likely tokens; 0 is off"),
    ("--top-p", float, 1.0, "nucleus sampling: smallest set of tokens with this probability; 1 is off"),
    ("--min-p", float, 0.0, "drop tokens below min_p x the top token's probability; 0 is off"),
    ("--repetition-penalty", float, 1.0, "penalise tokens already in the text; 1 is off"),
    ("--seed", int, None, "random seed: the same seed gives the same output"),
]


def _sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    for flag, typ, default, help_ in SAMPLING_FLAGS:
        g.add_argument(flag, type=typ, default=default, help=f"{help_} (default: {default})")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears; repeatable (default: none)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight and activation dtype (default: float32)")


def parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="tinkerlm", description="Run, inspect and share open-weight language models.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    s = sub.add_parser("pull", help="fetch a model into the store", formatter_class=fmt,
                       description="Fetch a model into the store: a catalogue name (smollm2), a local .gguf file or "
                       "Hugging Face directory, or hf:ORG/REPO[/FILE.gguf][@REVISION].")
    s.add_argument("source", help="catalogue name, path, or hf:ORG/REPO[/FILE.gguf][@REVISION]")
    s.add_argument("--name", default=None, help="store name NAME[:TAG] (default: derived from the source)")
    s.add_argument("--force", action="store_true", help="fetch again even if the model is present")

    s = sub.add_parser("list", help="list models in the store", formatter_class=fmt)
    s.add_argument("--json", action="store_true", help="print manifests as JSON")

    s = sub.add_parser("show", help="show a stored model's manifest", formatter_class=fmt)
    s.add_argument("name", help="model name NAME[:TAG]")
    s.add_argument("--json", action="store_true", help="print the manifest as JSON")

    s = sub.add_parser("rm", help="remove a model from the store", formatter_class=fmt)
    s.add_argument("name", help="model name NAME[:TAG]")

    s = sub.add_parser("run", help="answer one prompt", formatter_class=fmt,
                       description="Answer one prompt; pulls the model first if it is a catalogue or hub name.")
    s.add_argument("model", help="store name, .gguf path or Hugging Face directory")
    s.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' reads it from stdin")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the model's chat template (default when it has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="continue the prompt as plain text")
    s.add_argument("--system", default=None, help="system prompt (chat mode)")
    _sampling(s)

    s = sub.add_parser("chat", help="chat interactively", formatter_class=fmt,
                       description="Interactive chat with history and streaming. /reset clears the history, "
                       "/system TEXT sets the system prompt, /exit quits; Ctrl-C stops the current answer.")
    s.add_argument("model", help="store name, .gguf path or Hugging Face directory")
    s.add_argument("--system", default=None, help="system prompt")
    _sampling(s)
    return p


def _gen_options(a) -> dict:
    keys = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop")
    return {k: getattr(a, k) for k in keys}


def cmd_pull(a) -> None:
    from tinkerlm import store

    m = store.pull(a.source, name=a.name, force=a.force)
    print(f"{m.ref}  {m.format}  {m.architecture}  {m.quantization}")


def cmd_list(a) -> None:
    import json

    from tinkerlm import store

    models = store.list_models()
    if a.json:
        print(json.dumps([m.to_json() for m in models], indent=2))
    elif models:
        print(store.format_table(models))
    else:
        print("No models yet. Try: tinkerlm pull smollm2", file=sys.stderr)


def cmd_show(a) -> None:
    import json

    from tinkerlm import store

    m = store.get(a.name)
    print(json.dumps(m.to_json(), indent=2) if a.json else store.format_manifest(m))


def cmd_rm(a) -> None:
    from tinkerlm import store

    m = store.rm(a.name)
    print(f"removed {m.ref}")


def cmd_run(a) -> None:
    import tinkerlm
    from tinkerlm.errors import TinkerError

    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    if not prompt.strip():
        raise TinkerError("prompt: empty (give a prompt, or pipe one in with '-')")
    llm = tinkerlm.load(a.model, dtype=a.dtype)
    use_chat = a.chat if a.chat is not None else bool(llm.tokenizer.chat_template)
    if use_chat:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": prompt}
        ]
        pieces = llm.chat_stream(messages, **_gen_options(a))
    else:
        pieces = llm.stream(prompt, **_gen_options(a))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(a) -> None:
    import tinkerlm
    from tinkerlm.chat import repl

    llm = tinkerlm.load(a.model, dtype=a.dtype)
    repl(llm, system=a.system, **_gen_options(a))


COMMANDS = {"pull": cmd_pull, "list": cmd_list, "show": cmd_show, "rm": cmd_rm, "run": cmd_run, "chat": cmd_chat}


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.version:
        from tinkerlm import __version__

        print(f"tinkerlm {__version__}")
        return 0
    if not a.verb:
        p.print_help()
        return 2
    import logging

    logging.basicConfig(level=logging.DEBUG if a.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tinkerlm.errors import TinkerError

    try:
        COMMANDS[a.verb](a)
    except TinkerError as e:
        if a.debug:
            raise
        print(f"tinkerlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
