"""Token generation: `generate_step` (token ids), `stream_generate` (text pieces), `generate` (strings).

One stack shared by the CLI, the Python API and evaluation (the server's continuous batching, batching.py, drives
the same sampling engine). Several prompts run as one batch: right-padded, each row with its own positions in the
preallocated KV cache, each stopping on its own. Next-token choice, stop handling and detokenization are
sampling.py's (`Sampler`, `TextStream`); this module runs the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tinkerlm.errors import TinkerError
from tinkerlm.prefix_cache import PrefixCache
from tinkerlm.sampling import LENGTH, Sampler, SamplingParams, TextStream, TokenLogprob, new_generator, token_bytes

if TYPE_CHECKING:
    from tinkerlm.speculative import Speculative


@torch.inference_mode()
def _run(
    model,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    sampler_for,
    stop_token_ids: Sequence[int],
    prefix_cache: PrefixCache | None = None,
):
    """Run the batch; yield per step (tokens with None for finished rows, per-row logprobs or None, sampler).

    `sampler_for(prompts, vocab)` builds the step's `Sampler` (kept here so the prompt checks come first). With a
    `prefix_cache`, every row starts from the longest cached prefix all rows share in length (rows stay aligned),
    and each row's prompt, then its prompt and fed answer tokens, are cached for later calls.
    """
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
    sampler = sampler_for(prompts, model_vocab(model))
    stop_set = set(stop_token_ids)

    reuse = 0
    if prefix_cache is not None and prefix_cache.enabled:
        prefix_cache.bind(model)
        reuse = min(prefix_cache.match(list(p)) for p in prompts)
        for i, p in enumerate(prompts):
            prefix_cache.restore(cache, i, list(p), limit=reuse)
    cache.lengths = [reuse] * len(prompts)

    # Right-pad the rest of each prompt; padded slots get written but are never attended to (see KVCache).
    ids = torch.zeros(len(prompts), longest - reuse, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p) - reuse] = torch.as_tensor(list(p)[reuse:], dtype=torch.long)

    logits = model(ids, cache=cache, logits_at=torch.tensor(lengths) - reuse - 1)[:, -1]  # (B, V)
    cache.lengths = list(lengths)
    fed = [list(p) for p in prompts]  # per row, the tokens whose keys and values the cache holds
    done = [False] * len(prompts)
    try:
        for step in range(max_tokens):
            token, infos = sampler(logits, max_tokens - step, [not d for d in done])  # (B,)
            tokens = token.tolist()  # the one host sync per step
            out = [None if d else t for d, t in zip(done, tokens)]
            yield out, infos, sampler
            done = [d or t in stop_set or sampler.json_done(i) for i, (d, t) in enumerate(zip(done, out))]
            if all(done) or step == max_tokens - 1:
                return
            logits = model(token[:, None], cache=cache)[:, -1]
            cache.advance(1)
            for row, t in zip(fed, out):
                if t is not None:  # a finished row's later tokens are filler, not worth keeping
                    row.append(t)
    finally:  # also when the caller stops early: what was fed is valid
        if prefix_cache is not None:
            for i, row in enumerate(fed):
                prefix_cache.insert(cache, i, row)


def generate_step(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int | None = None,
    sampling: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
    prefix_cache: PrefixCache | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of every row (None for rows already finished).

    A row finishes after emitting a stop token (which is yielded) or `max_tokens` tokens (default
    `sampling.max_tokens`). All rows share `sampling` and one generator. The prompt and the tokens to come must fit
    the model's context, else TinkerError. JSON mode needs the tokenizer: use `stream_generate`. A `prefix_cache`
    (tinkerlm.prefix_cache) reuses the keys and values of prompt prefixes seen before and keeps these prompts'.
    """
    sampling = (sampling or SamplingParams()).check()
    max_tokens = sampling.max_tokens if max_tokens is None else max_tokens
    generator = new_generator(sampling.seed)
    steps = _run(
        model, prompts, max_tokens, lambda p, v: Sampler(sampling, p, v, generator), stop_token_ids, prefix_cache
    )
    for out, _, _ in steps:
        yield out


def model_vocab(model) -> int:
    return model.lm_head.out_features


@dataclass
class Chunk:
    """A piece of generated text for row `index`; `finish_reason` ("stop" or "length") on a row's last chunk.

    `logprobs`: the tokens behind this piece with their log-probabilities (only when `sampling.logprobs` is set;
    then a chunk comes for every token, even one whose text is held back).
    """

    index: int
    text: str
    token: int | None = None
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


def stream_generate(
    model,
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_tokens: int | None = None,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    add_special_tokens: bool = True,
    prefix_cache: PrefixCache | None = None,
    speculative: Speculative | None = None,
) -> Iterator[Chunk]:
    """Yield text `Chunk`s as rows generate. Prompts are strings (tokenized here) or token id lists.

    `max_tokens` and `stop` default to `sampling`'s; `prefix_cache` as for `generate_step`. `speculative`
    (tinkerlm.speculative) drafts tokens and verifies them, one row after another, with the same output; it
    prefills from scratch (the prefix cache is not used on that path).
    """
    sampling = (sampling or SamplingParams()).check()
    max_tokens = sampling.max_tokens if max_tokens is None else max_tokens
    stop = sampling.stop if stop is None else stop
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = [
        tokenizer.encode(p, add_special_tokens=add_special_tokens) if isinstance(p, str) else list(p) for p in prompts
    ]
    stops = tokenizer.stop_token_ids if stop_token_ids is None else list(stop_token_ids)
    rows = [TextStream(tokenizer, stop, stops, max_tokens) for _ in ids]
    generator = new_generator(sampling.seed)

    def sampler_for(prompts, vocab):
        table = token_bytes(tokenizer, vocab) if sampling.json else None
        return Sampler(sampling, prompts, vocab, generator, table)

    finished = [False] * len(ids)
    if speculative is None:
        steps = _run(model, ids, max_tokens, sampler_for, stops, prefix_cache)
    else:  # reads `finished` to leave a row a stop string ended
        steps = speculative.run(model, ids, max_tokens, sampler_for, stops, finished)
    for step, infos, sampler in steps:
        for i, token in enumerate(step):
            if token is None or finished[i]:
                continue
            row = rows[i]
            piece = row.push(token, sampler.json_done(i))
            lps = infos[i] if infos is not None and token not in row.stop_ids else []
            if row.finish_reason:
                finished[i] = True
                yield Chunk(i, piece, token, row.finish_reason, lps)
            elif piece or lps:
                yield Chunk(i, piece, token, None, lps)
        if all(finished):
            return
    for i, f in enumerate(finished):  # rows cut short by the context limit
        if not f:
            yield Chunk(i, rows[i].close(), None, LENGTH)


def generate(model, tokenizer, prompts: str | Sequence[str], **kwargs) -> str | list[str]:
    """Generated text for one prompt (a string) or several (a list of strings, batched)."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    texts = [""] * len(batch)
    for chunk in stream_generate(model, tokenizer, batch, **kwargs):
        texts[chunk.index] += chunk.text
    return texts[0] if single else texts
