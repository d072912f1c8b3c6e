"""Continuous batching: one engine thread per model decodes every running sequence in one forward pass per step.

The engine owns the model and a KV cache of `max_batch` rows ("slots"), allocated once. A request's choices
become `Sequence`s; each waits in a queue until a slot is free, is prefilled alone into its slot (through a
one-row view of the big cache, so no copy), then joins the shared decode step: one forward with input (rows, 1)
over slots [0, highest busy slot], idle slots fed a dummy token and ignored. Slots are taken lowest first, so a
lone request decodes as a batch of one, exactly the computation `tinkerlm run` does.

Each sequence samples with its own settings and its own `torch.Generator`, consumed exactly as `generate_step`
consumes it for a batch of one, so an answer equals `LLM.chat(..., seed=s)` for the same seed. Text is streamed
through generate.py's incremental detokenizer, which also holds back stop strings. Results are handed to the HTTP
side through a callback (the server wraps an asyncio queue). A cancelled sequence (client gone) leaves its slot
at the next step boundary.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from tinkerlm.generate import SamplingParams, Detokenizer, apply_repetition_penalty, sample
from tinkerlm.serve.jsonmode import JSONConstraint
from tinkerlm.serve.protocol import APIError
from tinkerlm.serve.vocab import token_bytes

log = logging.getLogger(__name__)


@dataclass
class TokenInfo:
    """A generated token with its log-probability and the `top` most likely alternatives (id, logprob)."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """Output of sequence `index`: new text, the tokens behind it, and on the last event a finish reason or error."""

    index: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    error: APIError | None = None


@dataclass
class Sequence:
    """One choice to generate: its prompt and settings, and (once admitted) its decoding state."""

    index: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k: the chosen token's logprob plus the k most likely
    json_mode: bool = False
    cancelled: bool = False
    # Engine-owned state.
    slot: int = -1
    generated: int = 0
    finished: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    last: int = 0  # the token to feed at the next decode step
    generator: torch.Generator | None = field(default=None, repr=False)
    detok: Detokenizer | None = field(default=None, repr=False)
    stop_ids: set[int] = field(default_factory=set, repr=False)
    seen: torch.Tensor | None = field(default=None, repr=False)  # (1, V) bool, for repetition_penalty
    counts: torch.Tensor | None = field(default=None, repr=False)  # (V,) for presence/frequency penalties
    json: JSONConstraint | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Called from any thread; the engine frees the slot at its next step."""
        self.cancelled = True


class Engine:
    """The batching loop for one model. `submit` from any thread; results arrive through each sequence's emit."""

    def __init__(self, llm, *, name: str, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None):
        self.llm, self.model, self.tokenizer, self.name = llm, llm.model, llm.tokenizer, name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(max_context or self.model.max_context, self.model.max_context)
        self.vocab = self.model.lm_head.out_features
        self.cache = self.model.new_cache(max_batch, self.context)
        self.slots: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.cond = threading.Condition()
        self.draining = False
        self.stopped = False
        self._bytes: list[bytes | None] | None = None
        self.stats = dict(prompt_tokens=0, generation_tokens=0, decode_steps=0, decode_rows=0, cancelled=0,
                          ttft_sum=0.0, ttft_count=0, finished=0)
        self.thread = threading.Thread(target=self._run, name=f"tinkerlm-engine-{name}", daemon=True)

    # -- called from the HTTP side ---------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def token_bytes(self) -> list[bytes | None]:
        """Raw bytes per token id, built on first use (logprobs, JSON mode)."""
        if self._bytes is None:
            self._bytes = token_bytes(self.tokenizer, self.vocab)
        return self._bytes

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences together, or raise APIError 503 (shutting down) / 429 (queue full)."""
        if any(s.json_mode for s in seqs) or any(s.logprobs is not None for s in seqs):
            self.token_bytes()  # built here, in the request's thread, not inside the decode loop
        with self.cond:
            if self.draining:
                raise APIError(503, "the server is shutting down; retry on another instance", None, "shutting_down")
            free = sum(s is None for s in self.slots)
            if len(self.waiting) + len(seqs) > self.max_queue + free:
                raise APIError(429, f"model '{self.name}' is busy: {len(self.waiting)} sequences are waiting "
                               f"(--max-queue {self.max_queue}); retry later", None, "queue_full")
            self.waiting.extend(seqs)
            self.cond.notify()

    def busy_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    def drain(self) -> None:
        """Refuse new requests (503); everything already accepted, running or queued, goes on."""
        with self.cond:
            self.draining = True

    def pending(self) -> int:
        """Sequences accepted and not yet finished (running or queued)."""
        return self.busy_slots() + len(self.waiting)

    def cancel_all(self) -> None:
        """End every accepted sequence with a 503 error event (the shutdown grace period is over)."""
        error = APIError(503, "the server shut down before the answer was complete", None, "shutting_down")
        with self.cond:
            queued, self.waiting = list(self.waiting), deque()
            for s in [*queued, *self.slots]:
                if s is not None and not s.cancelled:
                    s.cancel()
                    s.emit(Event(s.index, error=error))
            self.cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        self.drain()
        self.cancel_all()
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # -- the engine thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.stopped and not self.waiting and not any(self.slots):
                        self.cond.wait()
                    if self.stopped:
                        return
                    admit = []
                    while self.waiting and len(admit) < sum(s is None for s in self.slots):
                        s = self.waiting.popleft()
                        if s.cancelled:
                            self.stats["cancelled"] += 1
                        else:
                            admit.append(s)
                try:
                    for s in admit:
                        self._prefill(s)
                    self._free_cancelled()
                    self._decode()
                except Exception as e:  # a bug or out of memory: fail the running requests, keep serving
                    log.exception("engine %s: step failed", self.name)
                    for s in [*admit, *self.slots]:
                        if s is not None and not s.finished:
                            s.emit(Event(s.index, error=APIError(500, f"internal error: {type(e).__name__}: {e}")))
                            self._release(s)

    def _rows(self, start: int, stop: int):
        """A cache over rows [start, stop) of the big cache, sharing its storage (views, no copy)."""
        return self.cache.rows(start, stop)

    def _prefill(self, s: Sequence) -> None:
        s.slot = self.slots.index(None)
        self.slots[s.slot] = s
        self.cache.lengths[s.slot] = 0
        p = s.sampling
        s.generator = torch.Generator().manual_seed(p.seed if p.seed is not None else int.from_bytes(os.urandom(6), "little"))
        s.detok = Detokenizer(self.tokenizer, s.stop)
        s.stop_ids = set(self.tokenizer.stop_token_ids)
        s.counts = torch.zeros(self.vocab) if (s.presence_penalty or s.frequency_penalty) else None
        s.seen = None
        if p.repetition_penalty != 1.0:
            s.seen = torch.zeros(1, self.vocab, dtype=torch.bool)
            s.seen[0, torch.tensor(s.prompt)] = True
        s.json = JSONConstraint(self.token_bytes()) if s.json_mode else None
        n = len(s.prompt)
        logits = self.model(torch.tensor([s.prompt]), cache=self._rows(s.slot, s.slot + 1),
                            logits_at=torch.tensor([n - 1]))[:, -1]  # (1, V)
        self.cache.lengths[s.slot] = n
        self.stats["prompt_tokens"] += n
        self.stats["ttft_sum"] += time.perf_counter() - s.submitted_at
        self.stats["ttft_count"] += 1
        self._next_token(s, logits)

    def _decode(self) -> None:
        """One forward over the busy slots with each one's last token; then each samples its next token."""
        busy = [s for s in self.slots if s is not None]
        if not busy:
            return
        rows = max(s.slot for s in busy) + 1
        tokens = torch.zeros(rows, 1, dtype=torch.long)  # idle rows get token 0; their output is ignored
        for s in busy:
            tokens[s.slot, 0] = s.last
        logits = self.model(tokens, cache=self._rows(0, rows))[:, -1]  # (rows, V)
        for s in busy:
            self.cache.lengths[s.slot] += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(busy)
        for s in busy:
            self._next_token(s, logits[s.slot : s.slot + 1])

    def _next_token(self, s: Sequence, logits: torch.Tensor) -> None:
        """Sample sequence `s`'s next token from logits (1, V) and emit its text; the order of operations
        (penalty, then `sample` on a batch of one with the sequence's generator) is `generate_step`'s."""
        p = s.sampling
        if s.seen is not None:
            logits = apply_repetition_penalty(logits, s.seen, p.repetition_penalty)
        if s.counts is not None:
            logits = logits - s.frequency_penalty * s.counts - s.presence_penalty * (s.counts > 0).float()
        if s.json is not None:
            draw = lambda lg: int(sample(lg, p, s.generator))  # noqa: E731
            token = s.json.pick(logits, s.max_tokens - s.generated, p.temperature == 0, draw)
            s.json.push(token)
        else:
            token = int(sample(logits, p, s.generator))
        info = [TokenInfo(token)] if s.logprobs is not None else []
        if info:
            lp = torch.log_softmax(logits[0].float(), -1)
            info[0].logprob = float(lp[token])
            if s.logprobs:
                top = torch.topk(lp, s.logprobs)
                info[0].top = list(zip(top.indices.tolist(), top.values.tolist()))
        s.generated += 1
        self.stats["generation_tokens"] += 1
        if s.seen is not None:
            s.seen[0, token] = True
        if s.counts is not None:
            s.counts[token] += 1
        # As stream_generate: a stop token ends the row without text; else text up to any stop string.
        if token in s.stop_ids:
            piece, _ = s.detok.flush(final=True)
            return self._finish(s, Event(s.index, piece, [], "stop"))
        s.detok.push(token)
        last = s.generated >= s.max_tokens
        done_json = s.json is not None and s.json.done
        piece, hit = s.detok.flush(final=last or done_json)
        if hit or last or done_json:
            return self._finish(s, Event(s.index, piece, info, "stop" if hit or done_json else "length"))
        s.last = token
        if (piece or info) and not s.cancelled:
            s.emit(Event(s.index, piece, info))

    def _finish(self, s: Sequence, event: Event) -> None:
        self._release(s)
        self.stats["finished"] += 1
        if not s.cancelled:
            s.emit(event)

    def _release(self, s: Sequence) -> None:
        s.finished = True
        if 0 <= s.slot < len(self.slots) and self.slots[s.slot] is s:
            self.slots[s.slot] = None
            self.cache.lengths[s.slot] = 0

    def _free_cancelled(self) -> None:
        for s in self.slots:
            if s is not None and s.cancelled:
                self._release(s)
                self.stats["cancelled"] += 1
