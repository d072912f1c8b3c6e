"""Log-likelihood scoring of (context, continuation) requests: what multiple-choice benchmarks ask of a model.

For a request (c, k) with context ids c_1..c_m and continuation ids k_1..k_n the score is

    sum_j log p(k_j | c, k_<j)    and    greedy = every k_j is the argmax of its distribution,

exactly what lm-evaluation-harness's `loglikelihood` returns. Log-probabilities are `log_softmax` of fp32 logits.

Speed comes from three things, each checked against the plain computation in tests/test_eval_scoring.py:
- Shared prefixes: the choices of one question share their context. Each distinct context is prefilled once (all
  but its last token), its KV-cache row is copied once per choice, and the choices then run as rows of a batch,
  each input `[c_m] + k_<n` scored at every position (also at batch_size 1: one prefill, then one choice a pass).
- Batching by length: requests are grouped by context, groups sorted by length (longest first, as the harness
  does, so a batch that does not fit in memory fails at once) and packed into batches of `batch_size` choices
  (their contexts prefilled together); inputs are right-padded and every row keeps its own positions in the cache.
- Only the hidden states that are scored go through the output head (the padding does not).

Long inputs are cut from the left as the harness does: the model sees the last `max_context` tokens of
context + continuation[:-1]. A request whose continuation alone does not fit raises TinkerError.

Reference: lm-evaluation-harness, `HFLM._loglikelihood_tokens` (EleutherAI, lm_eval/models/huggingface.py).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinkerlm.errors import TinkerError
from tinkerlm.evaluate.perplexity import token_nll

Request = tuple[Sequence[int], Sequence[int]]


@dataclass
class _Group:
    """Requests (by index) sharing one context."""

    context: tuple[int, ...]
    items: list[tuple[int, tuple[int, ...]]]  # (request index, continuation)

    @property
    def rows(self) -> int:
        return len(self.items)

    @property
    def length(self) -> int:  # tokens one row of this group runs through the model
        return len(self.context) - 1 + max(len(k) for _, k in self.items)


def _cut(context: Sequence[int], continuation: Sequence[int], max_context: int, index: int) -> tuple[tuple, tuple]:
    """The context the harness lets the model see: input = (c + k)[-(max_context + 1):][:-1], so the context loses
    tokens from the left until context + continuation is max_context + 1 tokens long."""
    context, continuation = tuple(int(t) for t in context), tuple(int(t) for t in continuation)
    if not context:
        raise TinkerError(
            f"request {index}: empty context (start it with the tokenizer's BOS or EOS token, as lm-eval does)"
        )
    if not continuation:
        raise TinkerError(f"request {index}: empty continuation (give at least one token to score)")
    if len(continuation) > max_context:
        raise TinkerError(
            f"request {index}: continuation of {len(continuation)} tokens does not fit the model's context of "
            f"{max_context} (shorten the continuation)"
        )
    keep = max_context + 1 - len(continuation)
    return context[-keep:], continuation


def _groups(requests: Sequence[Request], max_context: int, share_prefix: bool) -> list[_Group]:
    by_context: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
    groups = []
    for i, (c, k) in enumerate(requests):
        c, k = _cut(c, k, max_context, i)
        if share_prefix:
            by_context.setdefault(c, []).append((i, k))
        else:
            groups.append(_Group(c, [(i, k)]))
    groups += [_Group(c, items) for c, items in by_context.items()]
    # Longest first; ties broken by the context so that equal lengths of one question stay together.
    groups.sort(key=lambda g: (-g.length, g.context))
    return groups


def _batches(groups: list[_Group], batch_size: int, max_context: int) -> list[list[_Group]]:
    """Consecutive groups, up to `batch_size` rows a batch (a larger group alone), such that every row padded to the
    batch's widest continuation still fits the context (the longest prefix plus the widest continuation)."""
    batches, current, rows, prefix, width = [], [], 0, 0, 0
    for g in groups:
        p, w = len(g.context) - 1, max(len(k) for _, k in g.items)
        if current and (rows + g.rows > batch_size or max(prefix, p) + max(width, w) > max_context):
            batches.append(current)
            current, rows, prefix, width = [], 0, 0, 0
        current.append(g)
        rows, prefix, width = rows + g.rows, max(prefix, p), max(width, w)
    if current:
        batches.append(current)
    return batches


def _head(model):
    head = getattr(model, "lm_head", None)
    if head is None:
        raise TinkerError(f"{type(model).__name__}: the model has no lm_head and cannot score (use a causal LM)")
    return head


def _score_batch(model, groups: list[_Group], batch_size: int) -> list[tuple[int, float, bool]]:
    """Prefill each group's context but its last token once, then score the choices `batch_size` rows at a time,
    each row starting from a copy of its group's cache row."""
    prefixes = [len(g.context) - 1 for g in groups]
    longest = max(prefixes)
    if longest > 0:  # right-padded prefill; padding slots are overwritten or never attended to (see KVCache)
        prefill = model.new_cache(len(groups), longest)
        ids = torch.zeros(len(groups), longest, dtype=torch.long)
        for gi, g in enumerate(groups):
            ids[gi, : prefixes[gi]] = torch.tensor(g.context[:-1], dtype=torch.long)
        model(ids, cache=prefill, logits_at=torch.zeros(len(groups), dtype=torch.long), head=False)

    # (group, request index, input ids, targets); widest first so that each chunk pads little.
    rows = [(gi, i, g.context[-1:] + k[:-1], k) for gi, g in enumerate(groups) for i, k in g.items]
    rows.sort(key=lambda r: -len(r[3]))
    out = []
    for s in range(0, len(rows), batch_size):
        out += _score_rows(model, rows[s : s + batch_size], prefixes, prefill if longest > 0 else None)
    return out


def _score_rows(model, rows, prefixes: list[int], prefill) -> list[tuple[int, float, bool]]:
    width = max(len(r[2]) for r in rows)
    owner = torch.tensor([r[0] for r in rows])
    longest = max(prefixes[r[0]] for r in rows)
    cache = model.new_cache(len(rows), longest + width)
    if prefill is not None and longest > 0:  # the shared prefix, computed once, copied to each choice's row
        for layer in range(len(cache.k)):
            cache.k[layer][:, :, :longest] = prefill.k[layer][owner, :, :longest]
            cache.v[layer][:, :, :longest] = prefill.v[layer][owner, :, :longest]
    cache.lengths = [prefixes[r[0]] for r in rows]

    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for j, (_, _, inp, _) in enumerate(rows):
        ids[j, : len(inp)] = torch.tensor(inp, dtype=torch.long)
    if width == 1:  # one token per row: a decode step (quantized models' fused step returns logits directly)
        logits = model(ids, cache=cache)[:, 0].float()  # (R, V)
    else:
        hidden = model(ids, cache=cache, head=False)  # (R, width, C)
        counts = torch.tensor([len(r[3]) for r in rows])
        scored = torch.arange(width)[None, :] < counts[:, None]  # (R, width): positions whose next token is scored
        logits = _head(model)(hidden[scored]).float()  # (n_scored, V), row-major: row 0's positions first
    logp = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor([t for r in rows for t in r[3]], dtype=torch.long)
    token_logp = logp.gather(-1, targets[:, None])[:, 0]  # (n_scored,)
    greedy = logp.argmax(-1) == targets

    out, start = [], 0
    for _, i, _, k in rows:
        end = start + len(k)
        out.append((i, float(token_logp[start:end].double().sum()), bool(greedy[start:end].all())))
        start = end
    return out


@torch.inference_mode()
def loglikelihoods(
    model,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    share_prefix: bool = True,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context_ids, continuation_ids) request, in the order given.

    Args:
        model: a tinkerlm CausalLM (`tinkerlm.load(...).model`), any dtype or quantization.
        requests: (context ids, continuation ids) pairs; both non-empty (lm-eval puts EOS before an empty context).
        batch_size: choices scored per forward pass.
        share_prefix: prefill each distinct context once for all its continuations (False: once per request;
            the same numbers, slower; kept for tests and benchmarks).
        progress: print requests done, rate and ETA to stderr.
    Returns:
        One (sum of log p of the continuation tokens in nats, whether every one of them is the greedy token) per
        request, as lm-evaluation-harness's `loglikelihood` returns.
    Raises:
        TinkerError: an empty context or continuation, a continuation longer than the model's context, a bad
            batch size.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TinkerError(f"batch_size must be a positive integer (got {batch_size!r})")
    groups = _groups(requests, model.max_context, share_prefix)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    done, t0 = 0, time.perf_counter()
    for batch in _batches(groups, batch_size, model.max_context):
        for i, logp, greedy in _score_batch(model, batch, batch_size):
            results[i] = (logp, greedy)
        done += sum(g.rows for g in batch)
        if progress:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            eta = (len(requests) - done) / rate
            print(f"\rscoring {done}/{len(requests)}  {rate:.1f} req/s  ETA {eta:.0f}s", end="", file=sys.stderr)
    if progress and requests:
        print(file=sys.stderr)
    return results  # type: ignore[return-value]


def rolling_loglikelihood(
    model, ids: Sequence[int], *, context: int | None = None, stride: int | None = None, prefix_token: int | None = None
) -> float:
    """Log-likelihood of a whole token sequence (lm-eval's `loglikelihood_rolling`), scored in sliding windows.

    `prefix_token` (lm-eval passes the EOS/BOS token) is put before `ids` so that the first token is scored too;
    without it the first token is context only. Windows are perplexity.py's: `context` tokens (default and cap: the
    model's context) starting every `stride` tokens (default `context - 1`, almost disjoint windows as in lm-eval;
    the harness aligns its last window to the end, so a long text's total can differ slightly from the harness's).
    """
    seq = ([prefix_token] if prefix_token is not None else []) + [int(t) for t in ids]
    context = min(context or model.max_context, model.max_context)
    nll = token_nll(model, seq, context=context, stride=stride or max(1, context - 1))
    total = -float(nll.double().sum())
    if not math.isfinite(total):
        raise TinkerError("rolling log-likelihood is not finite (the model produced NaN or inf logits)")
    return total
