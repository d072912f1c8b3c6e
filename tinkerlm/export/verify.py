"""Does a written model still behave like its source? Compare the two on a fixed text, token by token.

Both models score the same token ids with the sliding windows of `tinkerlm.evaluate.perplexity` (every token after
the first is scored once, in the window that first reaches it). For each scored token t, with P the reference's
next-token distribution and Q the candidate's (both `log_softmax` of the logits in fp32):

    KL(P || Q) = sum_v P(v) * (log P(v) - log Q(v))     (nats; 0 exactly when the distributions agree)

plus whether argmax P == argmax Q (top-1 agreement) and both models' NLL of the true token, from which both
perplexities follow. KL over the whole distribution is the measure llama.cpp's `llama-perplexity --kl-divergence`
reports for quantized models: it catches changes a perplexity difference hides (errors that cancel on average).
The windows are scored one at a time, so memory holds one window's logits of each model, never the whole text's.

Reference: llama.cpp tools/perplexity (KL divergence statistics for quantization).
"""

from __future__ import annotations

import math

import torch

from tinkerlm.errors import TinkerError
from tinkerlm.evaluate.perplexity import divergence, shipped_text, windows
from tinkerlm.store.display import format_verification  # noqa: F401  (one line, shared with `tinkerlm show`)


@torch.inference_mode()
def compare(reference, candidate, ids: list[int], *, context: int = 512, progress: bool = False) -> dict:
    """Score `ids` with both models and compare their next-token distributions.

    Args:
        reference, candidate: tinkerlm CausalLMs (callables mapping ids (1, T) to logits (1, T, V)) with one
            vocabulary; the candidate's may be padded larger than the reference's, never smaller.
        ids: the token ids (at least 2).
        context: tokens per window (capped at the smaller model context); windows start every context // 2.
        progress: show a progress bar over the windows.
    Returns:
        {"tokens", "kl_mean", "kl_p99", "kl_max", "top1", "ppl_reference", "ppl_candidate"}: plain numbers;
        "top1" is the fraction (0..1) of tokens whose argmax agrees.
    Raises:
        TinkerError: fewer than 2 ids, a context below 2, or vocabularies that differ.
    """
    if len(ids) < 2:
        raise TinkerError("verify: the text has fewer than 2 tokens (give a longer text)")
    for model in (reference, candidate):
        limit = getattr(model, "max_context", None)
        if limit is not None:
            context = min(context, limit)
    if context < 2:
        raise TinkerError(f"verify: context must be at least 2 tokens (got {context})")
    stride = max(1, context // 2)
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    n = len(ids) - 1
    kl = torch.empty(n, dtype=torch.float64)
    agree = torch.empty(n, dtype=torch.bool)
    nll_ref = torch.empty(n, dtype=torch.float64)
    nll_cand = torch.empty(n, dtype=torch.float64)

    spans = list(windows(len(ids), context, stride))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(spans), desc="verify", unit="window")
    for begin, end, first in spans:
        x = ids_t[None, begin:end]
        rows = slice(first - 1 - begin, end - 1 - begin)  # logits[i] predicts ids[begin + i + 1]
        out = slice(first - 1, end - 1)
        kl[out], nll_ref[out], nll_cand[out], agree[out] = divergence(
            reference, candidate, x, rows, ids_t[first:end, None], what="verify"
        )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "tokens": n,
        "kl_mean": kl.mean().item(),
        "kl_p99": torch.quantile(kl, 0.99).item(),
        "kl_max": kl.max().item(),
        "top1": agree.double().mean().item(),
        "ppl_reference": math.exp(nll_ref.mean().item()),
        "ppl_candidate": math.exp(nll_cand.mean().item()),
    }


def text_ids(tokenizer, text: str | None = None, max_tokens: int = 1024) -> list[int]:
    """The first `max_tokens` token ids of `text` (default: the evaluation text shipped with tinkerlm,
    `tinkerlm.evaluate.perplexity.shipped_text`), with the tokenizer's BOS if it adds one."""
    if max_tokens < 2:
        raise TinkerError(f"verify: max_tokens must be at least 2 (got {max_tokens})")
    ids = tokenizer.encode(shipped_text() if text is None else text)
    return list(ids[:max_tokens])


def tensor_error(reference: torch.Tensor, written: torch.Tensor) -> float:
    """Relative RMS error of a written tensor: ||written - reference|| / ||reference|| (0 for an exact copy; an
    all-zero reference gives the absolute RMS of `written`).

    Raises:
        TinkerError: the shapes differ.
    """
    if tuple(reference.shape) != tuple(written.shape):
        raise TinkerError(f"verify: tensor shapes differ ({tuple(reference.shape)} written as {tuple(written.shape)})")
    ref = reference.detach().double()
    diff = written.detach().double() - ref
    scale = ref.square().mean().sqrt().item()
    rms = diff.square().mean().sqrt().item() if diff.numel() else 0.0
    return rms / scale if scale > 0 else rms
