"""Token generation: samplers, `generate_step` (token ids), `stream_generate` (text pieces), `generate` (strings).

One stack shared by the CLI, the Python API, and later the server and evaluation. Several prompts run as one
batch: right-padded, each row with its own positions in the preallocated KV cache, each stopping on its own.
Sampling follows the usual order (as in transformers): repetition penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from tinkerlm.errors import TinkerError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def check(self) -> "SamplingParams":
        bad = None
        if self.temperature < 0:
            bad = "temperature must be >= 0"
        elif self.top_k < 0:
            bad = "top_k must be >= 0"
        elif not 0 < self.top_p <= 1:
            bad = "top_p must be in (0, 1]"
        elif not 0 <= self.min_p <= 1:
            bad = "min_p must be in [0, 1]"
        elif self.repetition_penalty <= 0:
            bad = "repetition_penalty must be > 0"
        if bad:
            raise TinkerError(f"sampling: {bad}")
        return self


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019) on tokens already in each row: divide positive logits, multiply
    negative ones. `seen` is a (B, V) boolean mask."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token (B,) from logits (B, V) (after any penalty)."""
    if p.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / p.temperature
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


@torch.inference_mode()
def generate_step(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of every row (None for rows already finished).

    A row finishes after emitting a stop token (which is yielded) or `max_tokens` tokens. The prompt and the
    tokens to come must fit the model's context, else TinkerError.
    """
    sampling = (sampling or SamplingParams()).check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TinkerError("prompt: empty prompt (give at least one token of text)")
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    need = longest + max_tokens
    if longest >= model.max_context:
        raise TinkerError(
            f"prompt: {longest} tokens do not fit the model's context of {model.max_context} (shorten the prompt)"
        )
    max_tokens = min(max_tokens, model.max_context - longest)
    cache = model.new_cache(len(prompts), min(need, model.max_context))
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    stop_set = set(stop_token_ids)

    # Right-pad; padded slots get written but are never attended to (see KVCache).
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), model_vocab(model), dtype=torch.bool)
        for i, p in enumerate(prompts):
            seen[i, torch.as_tensor(list(p), dtype=torch.long)] = True

    logits = model(ids, cache=cache, logits_at=torch.tensor(lengths) - 1)[:, -1]  # (B, V)
    cache.lengths = list(lengths)
    done = [False] * len(prompts)
    for step in range(max_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
        token = sample(logits, sampling, generator)  # (B,)
        tokens = token.tolist()  # the one host sync per step
        out = [None if d else t for d, t in zip(done, tokens)]
        yield out
        done = [d or t in stop_set for d, t in zip(done, out)]
        if all(done) or step == max_tokens - 1:
            return
        if seen is not None:
            seen[torch.arange(len(tokens)), token] = True
        logits = model(token[:, None], cache=cache)[:, -1]
        cache.advance(1)


def model_vocab(model) -> int:
    return model.lm_head.out_features


@dataclass
class Chunk:
    """A piece of generated text for row `index`; `finish_reason` ("stop" or "length") on a row's last chunk."""

    index: int
    text: str
    token: int | None = None
    finish_reason: str | None = None


@dataclass
class Detokenizer:
    """Incremental detokenizer for one row: emits only complete characters, holds back possible stop strings."""

    tokenizer: object
    stop: Sequence[str]
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded text so far (complete characters only)
    sent: int = 0  # characters of `text` already emitted

    def push(self, token: int) -> None:
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        # A trailing U+FFFD means a multi-byte character is still incomplete: wait for its next bytes.
        if not full.endswith("\ufffd"):
            self.text = full

    def flush(self, final: bool) -> tuple[str, bool]:
        """New text to emit, and whether a stop string was hit."""
        for s in self.stop:
            at = self.text.find(s)
            if at != -1:
                piece, self.sent = self.text[self.sent : at], at
                return piece, True
        end = len(self.text)
        if not final:
            # Hold back a tail that could be the start of a stop string.
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent : end], end
        return piece, False


def stream_generate(
    model,
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] | None = None,
    add_special_tokens: bool = True,
) -> Iterator[Chunk]:
    """Yield text `Chunk`s as rows generate. Prompts are strings (tokenized here) or token id lists."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = [tokenizer.encode(p, add_special_tokens=add_special_tokens) if isinstance(p, str) else list(p) for p in prompts]
    stops = tokenizer.stop_token_ids if stop_token_ids is None else list(stop_token_ids)
    rows = [Detokenizer(tokenizer, [s for s in stop if s]) for _ in ids]
    finished = [False] * len(ids)
    count = [0] * len(ids)
    for step in generate_step(model, ids, max_tokens=max_tokens, sampling=sampling, stop_token_ids=stops):
        for i, token in enumerate(step):
            if token is None or finished[i]:
                continue
            count[i] += 1
            if token in stops:
                piece, _ = rows[i].flush(final=True)
                finished[i] = True
                yield Chunk(i, piece, token, "stop")
                continue
            rows[i].push(token)
            last = count[i] >= max_tokens
            piece, hit = rows[i].flush(final=last)
            if hit or last:
                finished[i] = True
                yield Chunk(i, piece, token, "stop" if hit else "length")
            elif piece:
                yield Chunk(i, piece, token)
        if all(finished):
            return
    for i, f in enumerate(finished):  # rows cut short by the context limit
        if not f:
            piece, _ = rows[i].flush(final=True)
            yield Chunk(i, piece, None, "length")


def generate(model, tokenizer, prompts: str | Sequence[str], **kwargs) -> str | list[str]:
    """Generated text for one prompt (a string) or several (a list of strings, batched)."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    texts = [""] * len(batch)
    for chunk in stream_generate(model, tokenizer, batch, **kwargs):
        texts[chunk.index] += chunk.text
    return texts[0] if single else texts
