"""Log-likelihood scoring of (context, continuation) requests: what multiple-choice benchmarks ask of a model.

For a request (c, k) with context ids c_1..c_m and continuation ids k_1..k_n the score is

    sum_j log p(k_j | c, k_<j)    and    greedy = every k_j is the argmax of its distribution,

exactly what lm-evaluation-harness's `loglikelihood` returns. Log-probabilities are `log_softmax` of fp32 logits.

Speed comes from three things, each checked against the plain computation in tests/test_eval_scoring.py:
- Shared prefixes without a cache: the choices of one question run as one row, their context first and then each
  continuation's input `k_<n` side by side (`tinkerlm.models.base.Branches`): a continuation's tokens take the
  positions that follow the context and attend to the context and to their own earlier tokens only, so the context
  is computed once and no KV cache is copied per choice.
- Batching by length: rows are sorted by length (longest first, as the harness does, so a batch that does not fit in
  memory fails at once) and packed into forward passes of about `batch_size` choices, many questions each.
- Only the hidden states that are scored go through the output head (the context's last one once for all its
  choices; the padding not at all), a chunk of states at a time.

Numbers: the layout (shared row or not, batch, padding) changes only fp32 rounding: ~5e-5 nats on a HellaSwag request
in fp32. Quantized ("native") models round every activation block to int16 before each product; that rounding turns
such fp32-level differences (another attention kernel or row layout: ~1e-7 relative) into ~1e-3 nats per request
(measured up to 4.5e-3 on HellaSwag requests, as much as between two full forwards differing only in the attention
kernel, the causal C++ one or torch's SDPA): the activations' rounding, not a difference in what is computed.

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
class _Row:
    """Requests (by index) sharing one context, run as one row: the context, then each continuation but its last
    token."""

    context: tuple[int, ...]
    items: list[tuple[int, tuple[int, ...]]]  # (request index, continuation)

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(k) - 1 for _, k in self.items)


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


def _rows(requests: Sequence[Request], max_context: int, share_prefix: bool) -> list[_Row]:
    """One row per distinct context (per request without sharing), split where its choices would not fit in
    `max_context` tokens together (each one alone does: see `_cut`); longest first."""
    by_context: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
    rows = []
    for i, (c, k) in enumerate(requests):
        c, k = _cut(c, k, max_context, i)
        if share_prefix:
            by_context.setdefault(c, []).append((i, k))
        else:
            rows.append(_Row(c, [(i, k)]))
    for c, items in by_context.items():
        row = _Row(c, [])
        for i, k in items:
            if row.items and row.length + len(k) - 1 > max_context:
                rows.append(row)
                row = _Row(c, [])
            row.items.append((i, k))
        rows.append(row)
    # Longest first; ties broken by the context so that equal lengths of one question stay together.
    rows.sort(key=lambda r: (-r.length, r.context))
    return rows


def _batches(rows: list[_Row], batch_size: int) -> list[list[_Row]]:
    """Consecutive rows, up to `batch_size` requests a batch (a larger row alone)."""
    batches, current, n = [], [], 0
    for r in rows:
        if current and n + len(r.items) > batch_size:
            batches.append(current)
            current, n = [], 0
        current.append(r)
        n += len(r.items)
    if current:
        batches.append(current)
    return batches


def _head(model):
    head = getattr(model, "lm_head", None)
    if head is None:
        raise TinkerError(f"{type(model).__name__}: the model has no lm_head and cannot score (use a causal LM)")
    return head


HEAD_CHUNK = 128  # hidden states through the output head at a time: (128, vocabulary) fp32 logits, 25 MB at 49k


def _score_batch(model, rows: list[_Row]) -> list[tuple[int, float, bool]]:
    """One forward over the rows (right-padded), then the head over the scored hidden states only."""
    from tinkerlm.models.base import Branches

    B, T = len(rows), max(r.length for r in rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    branch = torch.full((B, T), -1, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    flat_ids, flat_branch, flat_pos = [], [], []  # filled as Python lists, copied into the tensors once
    scored, targets, owners = [], [], []  # hidden state (flat index) per target token; target; request of each
    for b, r in enumerate(rows):
        m, base = len(r.context), b * T
        row_ids, row_branch, row_pos = list(r.context), [0] * m, list(range(m))
        last = base + m - 1  # the context's last state predicts every continuation's first token
        for n, (i, k) in enumerate(r.items, 1):
            at = base + len(row_ids)
            scored += [last] + list(range(at, at + len(k) - 1))
            targets += k
            owners.append((i, len(k)))
            row_ids += k[:-1]
            row_branch += [n] * (len(k) - 1)
            row_pos += range(m, m + len(k) - 1)
        flat_ids.append(row_ids)
        flat_branch.append(row_branch)
        flat_pos.append(row_pos)
    for b in range(B):
        L = len(flat_ids[b])
        ids[b, :L] = torch.tensor(flat_ids[b])
        branch[b, :L] = torch.tensor(flat_branch[b])
        positions[b, :L] = torch.tensor(flat_pos[b])

    hidden = model(ids, segments=Branches(branch, positions), head=False).reshape(B * T, -1)  # (B*T, C)
    # Each distinct scored state through the head once (the context's last state serves every choice).
    scored_t = torch.tensor(scored, dtype=torch.long)
    states, which = torch.unique(scored_t, return_inverse=True)  # sorted flat indices; target -> its state
    targets_t = torch.tensor(targets, dtype=torch.long)
    token_logp = torch.empty(len(targets), dtype=torch.float32)
    greedy = torch.empty(len(targets), dtype=torch.bool)
    head = _head(model)
    order = torch.argsort(which, stable=True)  # targets grouped by state, so each chunk's targets are one slice
    sorted_which = which[order]
    for s in range(0, len(states), HEAD_CHUNK):
        # fp32 log_softmax as the harness takes it (measured faster here than logsumexp + argmax of the logits)
        logp = torch.log_softmax(head(hidden[states[s : s + HEAD_CHUNK]]).float(), dim=-1)  # (n, V)
        argmax = logp.argmax(-1)
        lo, hi = torch.searchsorted(sorted_which, torch.tensor([s, s + HEAD_CHUNK])).tolist()
        sel = order[lo:hi]
        local = which[sel] - s
        token_logp[sel] = logp[local, targets_t[sel]]
        greedy[sel] = argmax[local] == targets_t[sel]

    out, start = [], 0
    for i, n in owners:
        out.append((i, float(token_logp[start : start + n].double().sum()), bool(greedy[start : start + n].all())))
        start += n
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
        batch_size: choices scored per forward pass (the questions of a pass run as its rows).
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
    rows = _rows(requests, model.max_context, share_prefix)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    done, t0 = 0, time.perf_counter()
    for batch in _batches(rows, batch_size):
        for i, logp, greedy in _score_batch(model, batch):
            results[i] = (logp, greedy)
        done += sum(len(r.items) for r in batch)
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
