"""The one sampling engine: the sampling parameters, logits processors, the sampler, per-row text state, finish reasons.

`SamplingParams` is the single declaration of every generation option. Each field carries, in its metadata, the
help text, the valid range, the CLI flag and the name of the OpenAI API field; the CLI (`tinkerlm run/chat`), the
Python API (`LLM.generate/stream/chat`) and the server's request schema are all derived from it, and a test fails
if they drift. Adding an option means adding a field here and using it in `Sampler` or `TextStream`.

The pipeline for B rows that share one `SamplingParams` (`generate_step` runs one `Sampler` for its whole batch; the
continuous-batching engine one per sequence, each with its own generator):
  logits (B, V) -> repetition penalty (CTRL, Keskar et al. 2019) -> presence/frequency penalties (OpenAI API
  reference) -> temperature, top-k, top-p (Holtzman et al. 2019), min-p (Nguyen et al. 2024) -> one draw per row,
  or the JSON (or JSON-schema) constraint's pick (see jsonmode.py, jsonschema.py) -> log-probabilities of the
  processed logits, if asked.
Text comes out through `TextStream`: an incremental detokenizer that decodes only the tokens since the last emitted
character boundary (linear in answer length), holds back incomplete UTF-8 characters and possible stop strings,
and decides the finish reason ("stop": a stop token, stop string or a closed JSON object; "length": max_tokens or
the context).

torch is imported inside the functions that need it, so the CLI can read the declaration without loading torch
(`tinkerlm --help` stays fast).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tinkerlm.errors import TinkerError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

STOP, LENGTH = "stop", "length"  # finish reasons, as in the OpenAI API


# ----------------------------------------------------------------------------------------------------------------
# The declaration


@dataclass(frozen=True)
class Param:
    """What the CLI, the API and the server need to know about one option (a `SamplingParams` field's metadata)."""

    help: str
    ge: float | None = None  # valid range; None = unbounded
    gt: float | None = None
    le: float | None = None
    flag: str | None = None  # CLI flag; derived from the name when None
    api: str | None = None  # OpenAI request field; the name when None
    off: str = ""  # what the default means, for help texts ("0 is greedy")

    def range_text(self) -> str:
        low = f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}" if self.gt is not None else ""
        high = f"<= {_num(self.le)}" if self.le is not None else ""
        return " and ".join(t for t in (low, high) if t)


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"  # integer bounds (seed: 2^63 - 1) exactly


def _param(default: Any, help: str, **meta) -> Any:
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"param": Param(help, **meta)}, **kw)


@dataclass
class SamplingParams:
    """Every generation option, with its default. Field order is kept: `SamplingParams(0.7, seed=1)` is temperature.

    The same names are keyword arguments of `LLM.generate/stream/chat`, flags of `tinkerlm run/chat`
    (`--top-k`) and fields of the server's requests (`response_format` for `json`).
    """

    temperature: float = _param(0.0, "sampling temperature; 0 is greedy", ge=0)
    top_k: int = _param(0, "sample from the k most likely tokens; 0 is off", ge=0)
    top_p: float = _param(1.0, "nucleus sampling: smallest set of tokens with this probability; 1 is off", gt=0, le=1)
    min_p: float = _param(0.0, "drop tokens below min_p x the top token's probability; 0 is off", ge=0, le=1)
    repetition_penalty: float = _param(
        1.0,
        "penalise tokens already in the prompt or answer (divide positive logits, multiply negative ones); 1 is off",
        ge=0.01,
        le=100,
    )
    # A signed 64-bit range (OpenAI's): torch seeds take [-2^63, 2^64), so choice j of n <= 16 may use seed + j.
    seed: int | None = _param(None, "random seed: the same seed gives the same output", ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = _param(
        0.0, "subtract this from the logit of every token already generated (OpenAI); 0 is off", ge=-2, le=2
    )
    frequency_penalty: float = _param(
        0.0,
        "subtract this times its count from the logit of every token already generated (OpenAI); 0 is off",
        ge=-2,
        le=2,
    )
    max_tokens: int = _param(256, "most tokens to generate", ge=1)
    stop: list[str] = _param(list, "stop when this text appears (it is not part of the answer); repeatable")
    logprobs: int | None = _param(
        None,
        "return each generated token's log-probability and the N most likely alternatives (0: only the chosen token's)",
        ge=0,
        le=20,
    )
    json: bool = _param(False, "constrain the answer to one valid JSON object", api="response_format")
    # A dict (the CLI reads it from a file: --json-schema FILE); implies `json` (check() sets it), see jsonschema.py.
    json_schema: dict | None = _param(
        None, "constrain the answer to JSON valid against this JSON schema (a file)", api="response_format"
    )

    def check(self) -> SamplingParams:
        """Validate every field against its declared range; returns self. Raises TinkerError naming the field."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for f in dataclasses.fields(self):
            bad = _out_of_range(f, getattr(self, f.name))
            if bad:
                raise TinkerError(f"sampling: {bad}")
        if self.json_schema is not None:
            from tinkerlm.jsonschema import compile_schema

            compile_schema(self.json_schema)  # refuse what cannot be enforced now, naming the keyword
            self.json = True  # the schema constraint takes JSON mode's place (token bytes, the "stop" at the end)
        return self

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def params() -> dict[str, tuple[dataclasses.Field, Param]]:
    """The declaration: {name: (dataclass field, Param)} in declaration order."""
    return {f.name: (f, f.metadata["param"]) for f in dataclasses.fields(SamplingParams)}


def default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


_KINDS = {
    "float": "a number",
    "int": "an integer",
    "int | None": "an integer",
    "bool": "true or false",
    "list[str]": "a list of strings",
    "dict | None": "a JSON schema (an object)",
}


def _out_of_range(f: dataclasses.Field, v: Any) -> str | None:
    """Why `v` is not a valid value of field `f`, or None."""
    p: Param = f.metadata["param"]
    if v is None and "None" in f.type:
        return None
    ok = {
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "list[str]": isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v),
        "dict | None": isinstance(v, dict),
    }.get(f.type, isinstance(v, int) and not isinstance(v, bool))
    if not ok:
        return f"{f.name} must be {_KINDS[f.type]} (got {v!r})"
    if isinstance(v, (bool, list, tuple, dict)):
        return None
    if (p.ge is not None and v < p.ge) or (p.gt is not None and v <= p.gt) or (p.le is not None and v > p.le):
        return f"{f.name} must be {p.range_text()} (got {v})"
    return None


def options(opts: dict[str, Any], defaults: dict[str, Any] | None = None) -> SamplingParams:
    """`SamplingParams` from keyword options (None = not given), over `defaults` (e.g. a model's generation config).

    Raises TinkerError for an unknown option or a value out of range.
    """
    known = params()
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise TinkerError(f"generation option {unknown[0]!r} is not known (known: {', '.join(known)})")
    given = {**(defaults or {}), **{k: v for k, v in opts.items() if v is not None}}
    return SamplingParams(**given).check()


# Keys of Hugging Face's generation_config.json that map onto the declaration (same names).
GENERATION_CONFIG_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def generation_config_defaults(config: dict[str, Any], source: str = "generation_config.json") -> dict[str, Any]:
    """Sampling defaults a model's generation_config.json asks for, as `SamplingParams` fields.

    As in transformers, temperature/top-k/top-p/min-p only matter with `do_sample: true`; `do_sample: false` means
    greedy. Without `do_sample` the file says nothing about temperature, so the caller's default stands (greedy for
    the CLI and the Python API, 1 for the OpenAI server). Values out of range are skipped with a warning.
    """
    out: dict[str, Any] = {}
    known = params()
    sample = config.get("do_sample")
    for key in GENERATION_CONFIG_KEYS:
        if key not in config or config[key] is None:
            continue
        if key == "temperature" and not sample:
            continue
        f, _ = known[key]
        value = config[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            log.warning("%s: %s=%r is not a number; ignored", source, key, value)
            continue
        value = int(value) if f.type == "int" else float(value)
        bad = _out_of_range(f, value)
        if bad:
            log.warning("%s: %s; ignored", source, bad)
            continue
        out[key] = value
    if sample is True and "temperature" not in out:
        out["temperature"] = 1.0  # transformers' default temperature once sampling is on
    if sample is False:
        out["temperature"] = 0.0
    return out


# ----------------------------------------------------------------------------------------------------------------
# Logits processors and the sampler


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019) on tokens already in each row: divide positive logits, multiply
    negative ones. `seen` is a (B, V) boolean mask."""
    import torch

    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: logits - frequency * count - presence * (count > 0); `counts` (B, V) of generated tokens."""
    return logits - frequency * counts - presence * (counts > 0).float()


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token (B,) from logits (B, V) (after any penalty)."""
    import torch

    if p.temperature == 0:
        return logits.argmax(-1)
    # Shifted so the largest is 0 before dividing: a tiny temperature then sends the rest to -inf, never to
    # inf - inf = NaN (softmax is unchanged by the shift).
    logits = (logits.float() - logits.float().amax(-1, keepdim=True)) / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the ones before it already reach top_p; the most likely token always stays.
        drop = probs.cumsum(-1) - probs >= p.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    # Inverse-CDF sampling: one uniform draw a row against the cumulative probabilities. Same distribution as
    # torch.multinomial at a 30th of its cost over a 50k vocabulary (which matters once per row per step).
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator) * cdf[:, -1:]
    # right=True: the first token whose cumulative probability exceeds u, so a token of probability 0 is never drawn.
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)


def new_generator(seed: int | None, *, always: bool = False) -> torch.Generator | None:
    """A generator seeded with `seed`; None without a seed (torch's global generator), unless `always` (then a
    random seed: a sequence of the batching engine must not share its draws with others)."""
    import torch

    if seed is None and not always:
        return None
    return torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(6), "little"))


@dataclass
class TokenLogprob:
    """A generated token's log-probability and the `logprobs` most likely alternatives [(id, logprob)], from the
    logits after penalties and before temperature (OpenAI's convention). `text` is filled by `token_text`."""

    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    text: str | None = None


class Sampler:
    """Picks the next token of B rows that share one `SamplingParams`, and keeps their sampling state
    (penalty masks and counts, JSON automata) and the generator.

    Args:
        params: the options (checked).
        prompts: the B prompts (the repetition penalty counts prompt tokens too).
        vocab: the model's vocabulary size (logits width).
        generator: the rows' random generator (None: torch's global one).
        table: token bytes (`token_bytes`), needed for `json`.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompts: Sequence[Sequence[int]],
        vocab: int,
        generator: torch.Generator | None = None,
        table: list[bytes | None] | None = None,
    ):
        import torch

        self.params, self.generator = params, generator
        b = len(prompts)
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(b, vocab, dtype=torch.bool)
            for i, p in enumerate(prompts):
                self.seen[i, torch.as_tensor(list(p), dtype=torch.long)] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(b, vocab)
        self.json = None
        if params.json:
            if table is None:
                raise TinkerError("json: JSON mode needs the tokenizer's token bytes (use stream_generate or the API)")
            from tinkerlm.jsonmode import JSONConstraint

            if params.json_schema is not None:
                from tinkerlm.jsonschema import SchemaConstraint, compile_schema

                schema = compile_schema(params.json_schema)
                self.json = [SchemaConstraint(table, schema) for _ in range(b)]
            else:
                self.json = [JSONConstraint(table) for _ in range(b)]

    def json_done(self, row: int) -> bool:
        return self.json is not None and self.json[row].done

    def __call__(
        self, logits: torch.Tensor, budget: int | Sequence[int] = 1 << 30, active: Sequence[bool] | None = None
    ) -> tuple[torch.Tensor, list[list[TokenLogprob]] | None]:
        """Next tokens (B,) for logits (B, V), and per row its `TokenLogprob` (None unless `logprobs`).

        `budget`: tokens each row may still generate, this one included (the JSON constraint closes the object
        within it); `active`: rows still generating (finished rows are not steered).
        """
        import torch

        p = self.params
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, p.repetition_penalty)
        if self.counts is not None:
            logits = apply_presence_frequency(logits, self.counts, p.presence_penalty, p.frequency_penalty)
        if self.json is None:
            token = sample(logits, p, self.generator)  # (B,)
        else:
            budgets = [budget] * logits.shape[0] if isinstance(budget, int) else list(budget)
            picks = []
            for i, constraint in enumerate(self.json):
                row = logits[i : i + 1]
                if (active is not None and not active[i]) or constraint.done:
                    picks.append(int(row.argmax()))
                    continue
                t = constraint.pick(row, budgets[i], p.temperature == 0, lambda lg: int(sample(lg, p, self.generator)))
                constraint.push(t)
                picks.append(t)
            token = torch.tensor(picks)
        infos = None
        if p.logprobs is not None:
            # -inf (a token the penalties or the model rule out) is reported as -9999.0, as the OpenAI API does: JSON
            # has no infinities.
            lp = torch.log_softmax(logits.float(), -1).nan_to_num_(nan=-9999.0, neginf=-9999.0).clamp_(min=-9999.0)
            chosen = lp.gather(-1, token[:, None])[:, 0].tolist()
            tops = torch.topk(lp, p.logprobs, dim=-1) if p.logprobs else None
            infos = []
            for i, t in enumerate(token.tolist()):
                top = list(zip(tops.indices[i].tolist(), tops.values[i].tolist())) if tops is not None else []
                infos.append([TokenLogprob(t, chosen[i], top)])
        if self.seen is not None:
            self.seen[torch.arange(token.shape[0]), token] = True
        if self.counts is not None:
            self.counts[torch.arange(token.shape[0]), token] += 1
        return token, infos


# ----------------------------------------------------------------------------------------------------------------
# Token bytes (logprobs' `bytes`, JSON mode)

_TABLES: weakref.WeakKeyDictionary[Any, list[bytes | None]] = weakref.WeakKeyDictionary()


def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    """Raw bytes of every token id in `range(vocab_size)` (the model's vocabulary, which may be larger); built
    once per tokenizer.

    Decoding one token alone is not enough: a byte-level BPE token may hold part of a UTF-8 character (decode gives
    U+FFFD) and SentencePiece decoders strip a leading space. So the bytes are read from the vocabulary itself:
    byte-level BPE spells bytes through GPT-2's printable byte alphabet (Radford et al. 2019); SentencePiece-style
    BPE writes a space as "▁" and byte NN as `<0xNN>`; anything else is the UTF-8 of the decoded token. Special
    tokens (and ids past the tokenizer's vocabulary) have no bytes: None.
    """
    cached = _TABLES.get(tokenizer)
    if cached is not None and len(cached) == vocab_size:
        return cached
    import re

    from tinkerlm.formats.tokenizer import _byte_alphabet

    byte_token = re.compile(r"<0x([0-9A-Fa-f]{2})>")
    backend = tokenizer.backend
    kind = type(backend.decoder).__name__ if backend.decoder is not None else ""
    if kind == "Sequence":
        kind = "ByteFallback" if "ByteFallback" in str(backend.decoder) else "Sequence"
    added = backend.get_added_tokens_decoder()
    alphabet = {c: b for b, c in _byte_alphabet().items()}
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
            m = byte_token.fullmatch(tok)
            table.append(bytes([int(m.group(1), 16)]) if m else tok.replace("\u2581", " ").encode())
        else:
            table.append(tokenizer.decode([i]).encode() or None)
    _TABLES[tokenizer] = table
    return table


def token_text(tokenizer, table: list[bytes | None], token: int) -> tuple[str, list[int]]:
    """A token's text and raw bytes (special tokens: their text and no bytes)."""
    raw = table[token] if token < len(table) else None
    if raw is None:
        return tokenizer.decode([token], skip_special_tokens=False), []
    return raw.decode("utf-8", errors="replace"), list(raw)


# ----------------------------------------------------------------------------------------------------------------
# Text: incremental detokenizer, stop strings, finish reasons


class Detokenizer:
    """Incremental detokenizer for one row: emits only complete characters, holds back possible stop strings.

    Linear in answer length: each step decodes only the tokens since the last emitted character boundary, with
    one token before them for context (SentencePiece decoders drop a leading space of the first token; byte-level
    tokens may end inside a character), as in vLLM's and transformers' TextStreamer's incremental decoding. Only
    the text not yet emitted is kept and searched for stop strings: a stop string can never start in emitted text,
    because a tail that could begin one is held back.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded last time, for context
        self.read = 0  # ids[read:] are not yet part of `pending`
        self.pending = ""  # decoded text not yet emitted (complete characters only)

    def push(self, token: int) -> None:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        now = self.tokenizer.decode(self.ids[self.prefix :])
        # A trailing U+FFFD means a multi-byte character is still incomplete: wait for its next bytes.
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.pending += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def flush(self, final: bool) -> tuple[str, bool]:
        """New text to emit, and whether a stop string was hit (the text ends before it)."""
        hits = [at for at in (self.pending.find(s) for s in self.stop) if at != -1]
        if hits:
            piece, self.pending = self.pending[: min(hits)], ""
            return piece, True
        end = len(self.pending)
        if not final:
            # Hold back a tail that could be the start of a stop string.
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                    if self.pending.endswith(s[:k]):
                        end = min(end, len(self.pending) - k)
                        break
        piece, self.pending = self.pending[:end], self.pending[end:]
        return piece, False


class TextStream:
    """One row's output side: counts tokens, turns them into text and decides when and why the row finishes.

    A stop token ends the row without adding text; a stop string ends it before the string; `max_tokens` tokens
    or a closed JSON object end it after the token.
    """

    def __init__(self, tokenizer, stop: Sequence[str], stop_token_ids, max_tokens: int):
        self.detok = Detokenizer(tokenizer, stop)
        self.stop_ids = set(stop_token_ids)
        self.max_tokens = max_tokens
        self.generated = 0
        self.finish_reason: str | None = None

    def push(self, token: int, json_done: bool = False) -> str:
        """The text `token` completes (possibly ""); sets `finish_reason` when the row is done."""
        self.generated += 1
        if token in self.stop_ids:
            self.finish_reason = STOP
            return self.detok.flush(final=True)[0]
        self.detok.push(token)
        last = self.generated >= self.max_tokens or json_done
        piece, hit = self.detok.flush(final=last)
        if hit or json_done:
            self.finish_reason = STOP
        elif last:
            self.finish_reason = LENGTH
        return piece

    def close(self) -> str:
        """The row was cut short (the context is full): the remaining text; finish reason "length"."""
        self.finish_reason = LENGTH
        return self.detok.flush(final=True)[0]
