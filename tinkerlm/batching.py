"""Continuous batching: one forward pass per step decodes every running sequence, and sequences come and go.

`BatchGenerator` owns a model and a KV cache of `max_batch` rows ("slots"), allocated once. Submitted
sequences wait in a queue until a slot is free, are prefilled alone into their slot (through a one-row view of
the big cache, so no copy), then join the shared decode step: one forward with input (rows, 1) over slots
[0, highest busy slot], idle slots fed a dummy token and ignored. Slots are taken lowest first, so a lone request
decodes as a batch of one, exactly the computation `tinkerlm run` does.

Mixed steps (chunked prefill): while other sequences are decoding, a step carries at most `prefill_chunk` prompt
tokens (the oldest admitted prompt first, in pieces at their true positions) in the SAME forward as the decode
tokens, as llama-server and vLLM do: one (1, N) input, decode tokens then pieces, each token written into its own
row and slot and attending over its own row's keys (`MixedStep`, `MixedMask`); quantized models with a fused decode
step run a step with few prompt tokens as one call of the fused kernel, a token per entry (`mixed_forward`). So a burst of new or long prompts delays the running
answers' next token by one chunk's share of a forward, not by every prompt's prefill, and the weights are read once
for both kinds of work. Steps without prefill work keep the plain decode forward (the fused kernel of quantized
models); when nothing is decoding, admitted prompts are prefilled whole, one forward each. A mixed step that fails
runs again as separate forwards, so a failure stays with its sequence.

Each sequence samples through the sampling engine (sampling.py) with its own settings and its own generator,
consumed exactly as `generate_step` consumes it for a batch of one, so an answer equals `LLM.chat(..., seed=s)` for
the same seed. Text comes through the same `TextStream` (detokenizer, stop strings, finish reasons).

A `PrefixCache` (prefix_cache.py) lets a sequence start from the cached keys and values of the longest prefix it
shares with earlier prompts and answers (copied into its slot; the rest is prefilled at its true positions). Each
sequence's prompt is cached after its prefill, its prompt and answer when it ends, so a chat's next turn, or
another request with the same system prompt, prefills only what is new.

Two ways to drive it:
- in the caller's thread: `submit` prompts, then iterate `events()` (it runs steps until every sequence is done);
- in a background thread (the server): `start()`, `submit(..., emit=callback)`; events arrive through the callback,
  from the engine thread. A cancelled sequence (client gone) leaves its slot at the next step boundary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from tinkerlm.errors import TinkerError
from tinkerlm.models.base import CAUSAL, KVCache, attend, attention_mask, dequantize_kv, quantize_kv
from tinkerlm.prefix_cache import DEFAULT_MB, PrefixCache
from tinkerlm.sampling import Sampler, SamplingParams, TextStream, TokenLogprob, new_generator, token_bytes

log = logging.getLogger(__name__)

# Prompt tokens prefilled per step while others decode: on two cores, about a decode step's time for a 1B model.
DEFAULT_PREFILL_CHUNK = 256


class QueueFull(TinkerError):
    """`submit` would queue more sequences than `max_queue` allows (the server answers 429)."""


class ShuttingDown(TinkerError):
    """The generator is draining or stopped and takes no new work (the server answers 503)."""


@dataclass
class Event:
    """Output of sequence `index`: new text, the tokens behind it (with `logprobs`), and on its last event a finish
    reason ("stop", "length") or an error (`ShuttingDown`, or any other exception for a failed step)."""

    index: int
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None


@dataclass
class Sequence:
    """One sequence to generate: its prompt and settings, and (once admitted) its decoding state."""

    index: int
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: bool = False
    # Engine-owned state.
    slot: int = -1
    finished: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    last: int = 0  # the token to feed at the next decode step
    prefilled: int = 0  # prompt tokens whose keys and values are in the slot
    fed: list[int] = field(default_factory=list, repr=False)  # generated tokens whose keys and values are cached
    sampler: Sampler | None = field(default=None, repr=False)
    text: TextStream | None = field(default=None, repr=False)

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def generated(self) -> int:
        return self.text.generated if self.text is not None else 0

    @property
    def prefilling(self) -> bool:
        """Admitted to a slot, with part of its prompt still to prefill."""
        return self.slot >= 0 and self.prefilled < len(self.prompt)

    def cancel(self) -> None:
        """Called from any thread; the engine frees the slot at its next step."""
        self.cancelled = True


@dataclass
class Piece:
    """The next `n` prompt tokens of `seq`, from prompt position `start`, inside a mixed step."""

    seq: Sequence
    start: int
    n: int


class MixedStep(KVCache):
    """One forward over the decode tokens of running rows and prompt pieces of prefilling rows, laid out as a
    single row (1, N): decode tokens first (one per row in `decode_rows`, at positions `decode_pos`), then each
    piece's tokens. A view of the engine's cache rows [0, R) (no copy) that the model's forward uses as its cache:
    `prepare` gives every token its own position, `update` writes each token's keys and values into its own row and
    slot, and `step_mask` gives `attend` a `MixedMask` that runs each row's attention over that row's keys alone.
    """

    def __init__(
        self, cache: KVCache, decode_rows: list[int], decode_pos: list[int], pieces: list[tuple[int, int, int]]
    ):
        # pieces: (row, start position, tokens) each
        rows = [*decode_rows, *(r for r, _, n in pieces for _ in range(n))]
        pos = [*decode_pos, *(p + i for _, p, n in pieces for i in range(n))]
        R = max(rows) + 1
        view = cache.rows(0, R)
        self.k, self.v, self.max_len, self.lengths = view.k, view.v, view.max_len, view.lengths
        self.dtype, self.quantized = cache.dtype, cache.quantized
        self.row_of = torch.tensor(rows)  # (N,)
        self.pos = torch.tensor(pos)  # (N,)
        self.decode_rows, self.decode_pos, self.pieces = decode_rows, decode_pos, pieces
        self.kv_len = max(pos) + 1

    def prepare(self, n_new: int, source: str = "model") -> tuple[torch.Tensor, int]:
        assert n_new == len(self.pos), "a mixed step's input is its own token layout"
        if self.kv_len > self.max_len:
            raise TinkerError(f"{source}: {self.kv_len} tokens do not fit the context of {self.max_len}")
        self.uniform_start = None
        return self.pos[None], self.kv_len  # (1, N)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv_len: int):
        """Write token t's keys and values (1, n_kv, N, hd) at (row_of[t], pos[t]); return rows [0, R) up to kv_len."""
        kc, vc = self.k[layer], self.v[layer]
        if self.quantized:
            k, v = quantize_kv(k), quantize_kv(v)
        kc[self.row_of, :, self.pos] = k[0].transpose(0, 1)  # indexed view is (N, n_kv, hd)
        vc[self.row_of, :, self.pos] = v[0].transpose(0, 1)
        if self.quantized:
            return dequantize_kv(kc[:, :, :kv_len], self.dtype), dequantize_kv(vc[:, :, :kv_len], self.dtype)
        return kc[:, :, :kv_len], vc[:, :, :kv_len]

    def step_mask(self, window: int | None) -> MixedMask:
        return MixedMask(self, window)


class MixedMask:
    """Attention for a `MixedStep`: the decode tokens as one batch over rows [0, R) (a query per row, rows without
    one given a zero query whose output is dropped), each piece over its own row's keys, causally."""

    def __init__(self, step: MixedStep, window: int | None):
        self.step, self.window = step, window
        R, self.keys = step.k[0].shape[0], max(step.decode_pos, default=0) + 1  # the keys decode tokens read
        self.decode = None
        if step.decode_rows:
            q_pos = torch.zeros(R, 1, dtype=torch.long)  # rows without a decode token see key 0 only
            q_pos[step.decode_rows, 0] = torch.tensor(step.decode_pos)
            self.decode = attention_mask(q_pos, torch.arange(self.keys).expand(R, self.keys), window)  # (R, 1, 1, S)
        self.pieces = []
        for _, start, n in step.pieces:
            if start == 0 and (window is None or window >= n):
                self.pieces.append(CAUSAL)
            else:
                q_pos = torch.arange(start, start + n)[None]
                self.pieces.append(attention_mask(q_pos, torch.arange(start + n)[None], window))  # (1, 1, n, S)

    def attend(self, q, k, v, scale):
        """q (1, H, N, hd), k/v (R, n_kv, S, hd) -> (1, H, N, hd)."""
        step, out = self.step, torch.empty_like(q)
        D = len(step.decode_rows)
        if D:
            rows = step.decode_rows
            qd = q.new_zeros(k.shape[0], q.shape[1], 1, q.shape[3])  # (R, H, 1, hd)
            qd[rows] = q[0, :, :D].transpose(0, 1)[:, :, None]
            kd, vd = k[:, :, : self.keys], v[:, :, : self.keys]
            out[0, :, :D] = attend(qd, kd, vd, self.decode, scale)[rows, :, 0].transpose(0, 1)
        a = D
        for (row, start, n), mask in zip(step.pieces, self.pieces):
            kr, vr = k[row : row + 1, :, : start + n], v[row : row + 1, :, : start + n]
            out[:, :, a : a + n] = attend(q[:, :, a : a + n], kr, vr, mask, scale)
            a += n
        return out


FUSED_PIECES = 32  # prompt tokens in a mixed step up to which quantized models run it through the fused kernel


def mixed_forward(model, cache: KVCache, step: MixedStep, tokens: list[int], at: list[int]) -> torch.Tensor:
    """Logits (len(at), V) at token indices `at` of a mixed step's one forward over `tokens` (laid out as `step`).
    Quantized models with a fused decode step run a step with at most FUSED_PIECES prompt tokens as one call of
    the fused kernel, a token per entry (each entry's arithmetic that of a decode step: pure decode steps and mixed
    ones agree); bigger pieces, and other models, go through the modules, whose prefill kernels multiply many rows
    at once (the fused kernel treats each prompt token as a decode step, with the whole vocabulary's logits: 1.7x
    the time of separate forwards for 2 x 128 prompt tokens beside 14 answers, `bench/mixed_step.py`)."""
    fused = getattr(model, "fused_decode", None)
    if hasattr(fused, "entries") and sum(n for _, _, n in step.pieces) <= FUSED_PIECES:
        return fused.entries(torch.tensor(tokens), step.pos, step.row_of, cache)[at]
    return model(torch.tensor([tokens]), cache=step, logits_at=torch.tensor(at))[:, -1]


class BatchGenerator:
    """Continuous batching for one model: `submit` sequences from any thread, get their `Event`s.

    Args:
        model, tokenizer: what `tinkerlm.load` gives (`llm.model`, `llm.tokenizer`).
        max_batch: KV-cache slots: sequences decoded together in one forward pass.
        max_queue: sequences that may wait for a slot before `submit` raises QueueFull.
        max_context: tokens per slot (default and cap: the model's context).
        name: for thread names, logs and messages.
        prefix_cache_mb: memory for reusing the KV cache of earlier prompts and answers (MiB; 0 disables).
        prefill_chunk: prompt tokens prefilled per step while other sequences decode (0: whole prompts at once).

    Example (Python API, in the caller's thread):
        bg = BatchGenerator(llm.model, llm.tokenizer, max_batch=4)
        seqs = [bg.submit(p, llm.sampling(max_tokens=20)) for p in ["Once", "Twice"]]
        for ev in bg.events():
            print(ev.index, ev.text, ev.finish_reason)
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = None,
        name: str = "model",
        prefix_cache_mb: float = DEFAULT_MB,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ):
        if max_batch < 1 or max_queue < 0:
            raise TinkerError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        if prefill_chunk < 0:
            raise TinkerError(f"prefill_chunk must be >= 0 (got {prefill_chunk})")
        self.prefill_chunk = prefill_chunk
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(max_context or self.model.max_context, self.model.max_context)
        self.vocab = self.model.lm_head.out_features
        self.cache = self.model.new_cache(max_batch, self.context)
        self.prefix_cache = PrefixCache(prefix_cache_mb)  # the model's weights never change here: no bind()
        self.slots: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.cond = threading.Condition()
        self.draining = False
        self.stopped = False
        self._next_index = 0
        self._events: deque[Event] = deque()  # events of sequences submitted without a callback
        self.stats = dict(
            prompt_tokens=0,
            prefill_chunks=0,
            generation_tokens=0,
            decode_steps=0,
            decode_rows=0,
            cancelled=0,
            ttft_sum=0.0,
            ttft_count=0,
            finished=0,
        )
        self.thread: threading.Thread | None = None
        self.mixed_steps = True  # False: prefill pieces and decode as separate forwards (bench/mixed_step.py)

    # -- submitting (any thread) -------------------------------------------------------------------------------
    def token_bytes(self) -> list[bytes | None]:
        """Raw bytes per token id (logprobs, JSON mode); built once per tokenizer."""
        return token_bytes(self.tokenizer, self.vocab)

    def sequence(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        index: int | None = None,
        emit: Callable[[Event], None] | None = None,
    ) -> Sequence:
        """A `Sequence` ready for `submit_all`. A string prompt is tokenized (with the tokenizer's special tokens).

        Raises TinkerError if the prompt is empty or the prompt plus `max_tokens` do not fit a slot.
        """
        params = (params or SamplingParams()).check()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise TinkerError("prompt: empty prompt (give at least one token of text)")
        if len(ids) + params.max_tokens > self.context:
            raise TinkerError(
                f"prompt: {len(ids)} tokens plus max_tokens {params.max_tokens} do not fit the context "
                f"of {self.context} tokens (shorten the prompt or lower max_tokens)"
            )
        if index is None:
            index, self._next_index = self._next_index, self._next_index + 1
        return Sequence(index=index, prompt=ids, params=params, emit=emit or self._events.append)

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        emit: Callable[[Event], None] | None = None,
    ) -> Sequence:
        """Queue one prompt; returns its `Sequence` (`.index` names its events, `.cancel()` stops it)."""
        seq = self.sequence(prompt, params, emit=emit)
        self.submit_all([seq])
        return seq

    def submit_all(self, seqs: list[Sequence]) -> None:
        """Queue sequences together, or raise ShuttingDown / QueueFull (then none is queued)."""
        if any(s.params.json or s.params.logprobs is not None for s in seqs):
            self.token_bytes()  # built here, in the caller's thread, not inside the decode loop
        with self.cond:
            if self.draining:
                raise ShuttingDown("the server is shutting down; retry on another instance")
            free = sum(s is None for s in self.slots)
            if len(self.waiting) + len(seqs) > self.max_queue + free:
                raise QueueFull(
                    f"model '{self.name}' is busy: {len(self.waiting)} sequences are waiting "
                    f"(--max-queue {self.max_queue}); retry later"
                )
            self.waiting.extend(seqs)
            self.cond.notify()

    def busy_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    def pending(self) -> int:
        """Sequences accepted and not yet finished (running or queued)."""
        return self.busy_slots() + len(self.waiting)

    # -- driving it in the caller's thread ---------------------------------------------------------------------
    def events(self) -> Iterator[Event]:
        """Run steps until no sequence is left, yielding the events of sequences submitted without `emit`."""
        if self.thread is not None:
            raise TinkerError("events(): this generator runs in its own thread (start()); read events via emit")
        while True:
            while self._events:
                yield self._events.popleft()
            if not self.pending():
                return
            self.step()

    # -- driving it in a background thread ---------------------------------------------------------------------
    def start(self) -> None:
        """Run steps in a daemon thread whenever there is work, until `stop()`."""
        self.thread = threading.Thread(target=self._run, name=f"tinkerlm-engine-{self.name}", daemon=True)
        self.thread.start()

    def drain(self) -> None:
        """Refuse new sequences (ShuttingDown); everything already accepted, running or queued, goes on."""
        with self.cond:
            self.draining = True

    def cancel_all(self) -> None:
        """End every accepted sequence with a ShuttingDown error event (the shutdown grace period is over)."""
        error = ShuttingDown("the server shut down before the answer was complete")
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
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopped and not self.waiting and not any(self.slots):
                    self.cond.wait()
                if self.stopped:
                    return
            try:
                self.step()
            except Exception:  # step() ends failed sequences itself; the thread must outlive anything else
                log.exception("engine %s: step failed outside a sequence", self.name)

    # -- one step ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting sequences into free slots, drop cancelled ones, then one forward carrying a token for
        every decoding sequence and up to `prefill_chunk` prompt tokens (a mixed step); with nothing decoding,
        prefill whole prompts, then decode one token for every sequence whose prompt is in.

        Failures are isolated: an exception while serving one sequence (its prefill, its sampling, its text) ends
        that sequence with an error event and the others go on; only a failing shared forward pass (a bug, out of
        memory) ends every running sequence. The generator itself always goes on.
        """
        with self.cond:
            admit = []
            while self.waiting and len(admit) < sum(s is None for s in self.slots):
                s = self.waiting.popleft()
                if s.cancelled:
                    self.stats["cancelled"] += 1
                else:
                    admit.append(s)
        for s in admit:
            self._isolated(s, self._admit, s)
        self._free_cancelled()
        busy = [s for s in self.slots if s is not None and not s.prefilling]
        pieces = self._pieces() if busy and self.mixed_steps else []
        if pieces:
            try:
                return self._mixed(busy, pieces)
            except Exception:  # nothing was advanced: the same work goes as separate forwards, failures isolated
                log.exception("engine %s: mixed step failed; prefilling and decoding separately", self.name)
        self._prefill()
        try:
            self._decode()
        except Exception as e:
            log.exception("engine %s: decode step failed", self.name)
            for s in self.slots:
                if s is not None and not s.finished:
                    self._fail(s, e)

    def _isolated(self, s: Sequence, fn, *args) -> None:
        """Run `fn(*args)` for sequence `s`; if it raises, `s` alone ends with the error."""
        try:
            fn(*args)
        except Exception as e:
            log.exception("engine %s: sequence %d failed", self.name, s.index)
            self._fail(s, e)

    def _fail(self, s: Sequence, error: Exception) -> None:
        """End `s` with an error event and free its slot."""
        self._release(s)
        if not s.cancelled:
            try:
                s.emit(Event(s.index, error=error))
            except Exception:  # a broken callback must not take the engine down with it
                log.exception("engine %s: could not report the failure of sequence %d", self.name, s.index)

    def _rows(self, start: int, stop: int):
        """A cache over rows [start, stop) of the big cache, sharing its storage (views, no copy)."""
        return self.cache.rows(start, stop)

    def _admit(self, s: Sequence) -> None:
        """Give `s` a slot, its sampler and text stream, and the cached keys and values of its longest known prefix."""
        s.slot = self.slots.index(None)
        self.slots[s.slot] = s
        self.cache.lengths[s.slot] = 0
        p = s.params
        table = self.token_bytes() if p.json else None
        s.sampler = Sampler(p, [s.prompt], self.vocab, new_generator(p.seed, always=True), table)
        s.text = TextStream(self.tokenizer, p.stop, self.tokenizer.stop_token_ids, p.max_tokens)
        s.prefilled = self.prefix_cache.restore(self.cache, s.slot, s.prompt)  # 0 on a miss
        self.cache.lengths[s.slot] = s.prefilled

    def _pieces(self) -> list[Piece]:
        """The prompt pieces of a mixed step: up to `prefill_chunk` tokens in all (0: no limit), oldest prompt first."""
        budget = self.prefill_chunk or self.context
        pieces = []
        for s in sorted((s for s in self.slots if s is not None and s.prefilling), key=lambda s: s.submitted_at):
            if budget <= 0:
                break
            n = min(len(s.prompt) - s.prefilled, budget)
            pieces.append(Piece(s, s.prefilled, n))
            budget -= n
        return pieces

    def _mixed(self, busy: list[Sequence], pieces: list[Piece]) -> None:
        """One forward for the decode tokens of `busy` and the prompt `pieces` (see `MixedStep`); then every busy
        sequence, and every sequence whose prompt is now in, samples its next token."""
        lengths = self.cache.lengths
        step = MixedStep(
            self.cache,
            [s.slot for s in busy],
            [lengths[s.slot] for s in busy],
            [(p.seq.slot, p.start, p.n) for p in pieces],
        )
        tokens = [s.last for s in busy] + [t for p in pieces for t in p.seq.prompt[p.start : p.start + p.n]]
        at, end = list(range(len(busy))), len(busy)  # logits of each decode token and each piece's last token
        for p in pieces:
            end += p.n
            at.append(end - 1)
        logits = mixed_forward(self.model, self.cache, step, tokens, at)
        for s in busy:
            lengths[s.slot] += 1
            s.fed.append(s.last)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(busy)
        for i, p in enumerate(pieces, len(busy)):
            s = p.seq
            s.prefilled = lengths[s.slot] = p.start + p.n
            self.stats["prefill_chunks"] += 1
            if not s.prefilling:
                self._isolated(s, self._prompt_done, s, logits[i : i + 1])
        for i, s in enumerate(busy):
            self._isolated(s, self._next_token, s, logits[i : i + 1])

    def _prefill(self) -> None:
        """Prefill admitted prompts, oldest first: all of them whole when nothing decodes, else up to
        `prefill_chunk` tokens in all (at least one piece, so a prompt always advances)."""
        waiting = sorted((s for s in self.slots if s is not None and s.prefilling), key=lambda s: s.submitted_at)
        if not waiting:
            return
        decoding = any(s is not None and not s.prefilling for s in self.slots)
        budget = self.prefill_chunk if decoding and self.prefill_chunk else None
        for s in waiting:
            if budget is not None and budget <= 0:
                break
            before = s.prefilled
            self._isolated(s, self._prefill_piece, s, budget)
            if budget is not None:
                budget -= max(s.prefilled - before, 1)  # a failed piece still counts, so the loop ends

    def _prefill_piece(self, s: Sequence, budget: int | None) -> None:
        """Prefill the next `budget` tokens of `s`'s prompt (all the rest if None); at its end, sample the first token."""
        n, start = len(s.prompt), s.prefilled
        stop = n if budget is None else min(n, start + budget)
        row = self._rows(s.slot, s.slot + 1)
        row.lengths = [start]
        piece = torch.tensor([s.prompt[start:stop]])  # (1, stop - start): the next tokens the cache does not hold
        logits = self.model(piece, cache=row, logits_at=torch.tensor([stop - start - 1]))[:, -1]  # (1, V)
        s.prefilled = self.cache.lengths[s.slot] = stop
        self.stats["prefill_chunks"] += 1
        if stop == n:
            self._prompt_done(s, logits)

    def _prompt_done(self, s: Sequence, logits: torch.Tensor) -> None:
        """`s`'s prompt is in its slot: cache it, count it, sample the first token from the last one's logits (1, V)."""
        self._keep(s)  # the prompt, for requests that share it while this one decodes
        self.stats["prompt_tokens"] += len(s.prompt)
        self.stats["ttft_sum"] += time.perf_counter() - s.submitted_at
        self.stats["ttft_count"] += 1
        self._next_token(s, logits)

    def _decode(self) -> None:
        """One forward over the busy slots with each one's last token; then each samples its next token. Rows still
        prefilling are fed a dummy token like idle ones: it lands past their cached prompt, where the next piece
        overwrites it."""
        busy = [s for s in self.slots if s is not None and not s.prefilling]
        if not busy:
            return
        rows = max(s.slot for s in busy) + 1
        tokens = torch.zeros(rows, 1, dtype=torch.long)  # idle rows get token 0; their output is ignored
        for s in busy:
            tokens[s.slot, 0] = s.last
        logits = self.model(tokens, cache=self._rows(0, rows))[:, -1]  # (rows, V)
        for s in busy:
            self.cache.lengths[s.slot] += 1
            s.fed.append(s.last)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(busy)
        for s in busy:
            self._isolated(s, self._next_token, s, logits[s.slot : s.slot + 1])

    def _next_token(self, s: Sequence, logits: torch.Tensor) -> None:
        """Sample sequence `s`'s next token from logits (1, V) and emit its text (the engine's `Sampler` and
        `TextStream`, as `stream_generate` uses them)."""
        token, infos = s.sampler(logits, s.max_tokens - s.generated)
        token = int(token[0])
        self.stats["generation_tokens"] += 1
        piece = s.text.push(token, s.sampler.json_done(0))
        info = infos[0] if infos is not None and token not in s.text.stop_ids else []  # a stop token has no text
        if s.text.finish_reason:
            return self._finish(s, Event(s.index, piece, info, s.text.finish_reason))
        s.last = token
        if (piece or info) and not s.cancelled:
            s.emit(Event(s.index, piece, info))

    def _finish(self, s: Sequence, event: Event) -> None:
        self._keep(s)
        self._release(s)
        self.stats["finished"] += 1
        if not s.cancelled:
            s.emit(event)

    def _keep(self, s: Sequence) -> None:
        """Cache the prompt and fed answer tokens of `s`, still in its slot (a failed sequence's are not kept).
        A failure here is logged, never the sequence's."""
        if 0 <= s.slot < len(self.slots) and self.slots[s.slot] is s and s.prefilled:
            try:
                self.prefix_cache.insert(self.cache, s.slot, s.prompt[: s.prefilled] + s.fed)
            except Exception:
                log.exception("engine %s: could not cache the prefix of sequence %d", self.name, s.index)

    def _release(self, s: Sequence) -> None:
        s.finished = True
        if 0 <= s.slot < len(self.slots) and self.slots[s.slot] is s:
            self.slots[s.slot] = None
            self.cache.lengths[s.slot] = 0

    def _free_cancelled(self) -> None:
        for s in self.slots:
            if s is not None and s.cancelled:
                self._keep(s)
                self._release(s)
                self.stats["cancelled"] += 1
