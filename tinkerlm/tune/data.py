"""Fine-tuning data: JSONL files -> token ids with loss masks -> packed training rows.

Three line formats, recognised by their keys (one file may mix them):
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`, rendered with the base
  model's own chat template; only the assistant turns (their text and the end-of-turn marker the template writes)
  carry loss.
- prompt/completion: `{"prompt": "...", "completion": "..."}`, joined as plain text plus EOS; loss on the completion.
- text: `{"text": "..."}`, plain text plus EOS; loss on every token.

Examples longer than the sequence length are cut (and counted). Packing puts whole examples side by side in rows
of `seq_len` tokens; each keeps its own positions and attends only within itself (`segments`), so packing changes
the speed, not the maths.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinkerlm import limits
from tinkerlm.errors import TinkerError

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    ids: list[int]
    target: list[bool]  # target[i]: token i is predicted (from the tokens before it) and carries loss


@dataclass
class DataStats:
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0  # examples cut to seq_len
    cut_tokens: int = 0  # tokens removed by cutting
    dropped: int = 0  # examples left with no target token after cutting
    formats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.formats.items()))
        text = f"{self.examples} examples ({kinds}), {self.tokens:,} tokens, {self.target_tokens:,} with loss"
        if self.truncated:
            text += f"; {self.truncated} cut to fit ({self.cut_tokens:,} tokens dropped)"
        if self.dropped:
            text += f"; {self.dropped} dropped (no loss tokens left after cutting)"
        return text


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line.

    Lines are read as bytes, at most `limits.MAX_JSONL_LINE_BYTES` each, so a file without newlines cannot fill
    memory; each is checked for UTF-8, JSON, nesting depth (`limits.MAX_JSON_DEPTH`) and lone surrogates (which
    JSON's `\\ud800` escapes can produce but no tokenizer can encode).

    Raises:
        TinkerError: missing file, or a line that is not a JSON object (naming file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise TinkerError(f"{path}: data file not found")
    rows = []
    limit = limits.MAX_JSONL_LINE_BYTES
    with open(path, "rb") as f:
        n = 0
        while raw := f.readline(limit + 1):
            n += 1
            where = f"{path}:{n}"
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise TinkerError(f"{where}: line longer than {limit:,} bytes; split the example or check the file")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TinkerError(f"{where}: not UTF-8 text (bad byte at column {e.start + 1})") from None
            if not line.strip():
                continue
            obj = parse_line(line, where)
            rows.append((n, obj))
    if not rows:
        raise TinkerError(f"{path}: no examples (the file is empty)")
    return rows


_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_line(line: str, where: str) -> dict:
    """One JSONL line as a JSON object, within the depth limit and free of lone surrogates.

    Raises:
        TinkerError: naming `where` (file:line).
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TinkerError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise TinkerError(f"{where}: JSON nested deeper than {limits.MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise TinkerError(f"{where}: a value cannot be read ({str(e).split(':')[0]})") from None
    if not isinstance(obj, dict):
        raise TinkerError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    stack = [(obj, 1)]
    while stack:  # iterative: depth is what is being checked
        value, depth = stack.pop()
        if depth > limits.MAX_JSON_DEPTH:
            raise TinkerError(f"{where}: JSON nested deeper than {limits.MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            for k, v in value.items():
                if _SURROGATE.search(k):
                    raise TinkerError(f"{where}: key {k!r} holds a lone surrogate (an unpaired \\uD800-\\uDFFF escape)")
                stack.append((v, depth + 1))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str) and _SURROGATE.search(value):
            raise TinkerError(
                f"{where}: a string holds a lone surrogate (an unpaired \\uD800-\\uDFFF escape); fix the file"
            )
    return obj


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise TinkerError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TinkerError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise TinkerError(f"{where}: messages[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise TinkerError(f"{where}: messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise TinkerError(f"{where}: no assistant message, so nothing to learn (add the answer as an assistant turn)")
    return messages


def _mask_by_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> Example:
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    target = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
    return Example(list(enc.ids), target)


def chat_example(tokenizer, messages: list[dict], where: str, last_only: bool = False) -> Example:
    """Render with the chat template; the assistant turns (as the template writes them) carry loss, or only the last
    one with `last_only` (preference tuning: the answer being compared, not earlier turns of the conversation).

    Each assistant turn's text is where the conversation rendered up to and including it extends the render up to
    the turn before with the generation prompt. Templates that do not render conversations as growing prefixes
    cannot be masked this way and raise an error.
    """
    from tinkerlm.chat import render

    full = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (last_only and i != len(messages) - 1):
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TinkerError(
                f"{where}: the chat template does not render this conversation as a growing prefix, "
                "so assistant tokens cannot be located for the loss mask"
            )
        spans.append((len(before), len(upto)))
    return _mask_by_spans(tokenizer, full, spans)


def plain_example(tokenizer, prompt: str, completion: str | None) -> Example:
    """Plain text (+ EOS): loss on `completion`, or on all of `prompt` when there is no completion."""
    text = prompt + (completion or "")
    enc = tokenizer.backend.encode(text, add_special_tokens=True)
    if completion is None:
        target = [True] * len(enc.ids)
    else:
        target = [start >= len(prompt) and end > start for start, end in enc.offsets]
    ids, target = list(enc.ids), target
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        target.append(True)
    return Example(ids, target)


def load_examples(path: str | Path, tokenizer, seq_len: int) -> tuple[list[Example], DataStats]:
    """Tokenize a JSONL file of chat, prompt/completion or text examples, cut to `seq_len` tokens.

    Raises:
        TinkerError: unreadable lines, unknown shapes, chat data for a model without a chat template.
    """
    path = Path(path)
    stats = DataStats()
    out = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        if "messages" in obj:
            if not tokenizer.chat_template:
                raise TinkerError(
                    f"{where}: chat example, but the base model has no chat template (use "
                    "prompt/completion or text lines, or a base with a template)"
                )
            ex, kind = chat_example(tokenizer, _check_messages(obj["messages"], where), where), "chat"
        elif "prompt" in obj and "completion" in obj:
            if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
                raise TinkerError(f"{where}: 'prompt' and 'completion' must be strings")
            ex, kind = plain_example(tokenizer, obj["prompt"], obj["completion"]), "prompt/completion"
        elif "text" in obj:
            if not isinstance(obj["text"], str):
                raise TinkerError(f"{where}: 'text' must be a string")
            ex, kind = plain_example(tokenizer, obj["text"], None), "text"
        else:
            keys = ", ".join(sorted(obj)) or "none"
            raise TinkerError(
                f"{where}: unknown example shape (keys: {keys}); expected 'messages', "
                "'prompt' + 'completion', or 'text'"
            )
        stats.formats[kind] = stats.formats.get(kind, 0) + 1
        if len(ex.ids) > seq_len:
            stats.truncated += 1
            stats.cut_tokens += len(ex.ids) - seq_len
            ex = Example(ex.ids[:seq_len], ex.target[:seq_len])
        if not any(ex.target[1:]):
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.tokens += len(ex.ids)
        stats.target_tokens += sum(ex.target[1:])
        out.append(ex)
    if not out:
        raise TinkerError(f"{path}: no usable examples (all were dropped; raise --seq-len)")
    return out, stats


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded (train, validation) split holding out `fraction` of the examples (at least one)."""
    if len(examples) < 2:
        raise TinkerError("need at least 2 examples to hold out a validation split (or pass --eval-data)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


@dataclass
class Rows:
    """Packed training rows: ids, segments (document number per token, -1 for padding) and the loss mask."""

    ids: torch.Tensor  # (N, T) long
    segments: torch.Tensor  # (N, T) long
    target: torch.Tensor  # (N, T) bool: token t carries loss (predicted from position t - 1 of its own document)
    example: torch.Tensor | None = None  # (N, T) long: index of the token's example in the packed list, -1 for padding

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(ids, segments, target) of rows `idx`, as `trainer.loss_sum` takes them, cut after the last column any of
        them uses: padding every row shares costs matrix work and saved activations and changes nothing."""
        return trim(self.ids[idx], self.segments[idx], self.target[idx])

    def count_targets(self, idx: torch.Tensor) -> int:
        """Tokens of rows `idx` that carry loss."""
        return int(self.target[idx][:, 1:].sum())


def trim(ids: torch.Tensor, segments: torch.Tensor, target: torch.Tensor):
    """Rows (B, T) cut after the last column holding a token of any row (segment >= 0)."""
    used = (segments >= 0).any(0).nonzero()
    end = int(used[-1]) + 1 if len(used) else segments.shape[1]
    return ids[:, :end], segments[:, :end], target[:, :end]


def pack(examples: list[Example], seq_len: int, pad_id: int) -> Rows:
    """First-fit packing, in order, of whole examples into rows of `seq_len` tokens."""
    rows: list[list[int]] = []  # example indices per row
    room: list[int] = []
    for i, ex in enumerate(examples):
        n = len(ex.ids)
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    segments = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    target = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    example = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row):
            ex = examples[i]
            n = len(ex.ids)
            ids[r, at : at + n] = torch.tensor(ex.ids)
            segments[r, at : at + n] = s
            example[r, at : at + n] = i
            t = torch.tensor(ex.target)
            t[0] = False  # a document's first token has nothing before it to be predicted from
            target[r, at : at + n] = t
            at += n
    return Rows(ids, segments, target, example)
