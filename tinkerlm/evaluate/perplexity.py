"""Perplexity of a causal language model on a text, with sliding windows.

The text is tokenized once into ids x_0 .. x_{N-1}. Every token but the first is scored exactly once, so

    PPL = exp( -1/(N-1) * sum_{t=1}^{N-1} log p(x_t | x_{max(0, s_t)} .. x_{t-1}) )

where the conditioning context of x_t is the window it is scored in. Windows hold `context` tokens and start
every `stride` tokens (default `context // 2`, as in the Hugging Face perplexity guide); a window scores only the
tokens that no earlier window scored, so each scored token (after the first window) sees at least
`context - stride` tokens of context. The stride must be below `context` (the first token a window scores needs
the token before it in the same window); `stride = context - 1` gives almost disjoint windows: fastest, least
context.
Log-probabilities are `log_softmax` of the logits in fp32, whatever the model's dtype.

Reference: Hugging Face Transformers docs, "Perplexity of fixed-length models".
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from tinkerlm.errors import TinkerError

DATA = Path(__file__).parent / "data"
DEFAULT_TEXT = DATA / "alice_ch1-2.txt"  # public domain, see data/README.md


def shipped_text() -> str:
    """The fixed public-domain evaluation text shipped with tinkerlm (chapters I-II of Alice in Wonderland)."""
    return DEFAULT_TEXT.read_text(encoding="utf-8")


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_scored) per window over ids[begin:end]; targets first_scored..end-1 are scored there.

    Every position 1..n_tokens-1 is a target in exactly one window.
    """
    scored_to = 1  # position 0 has no context and is never a target
    begin = 0
    while scored_to < n_tokens:
        end = min(begin + context, n_tokens)
        if end > scored_to:
            yield begin, end, scored_to
            scored_to = end
        begin += stride


@torch.inference_mode()
def token_nll(model, ids: Sequence[int], *, context: int = 512, stride: int | None = None) -> torch.Tensor:
    """Negative log-likelihood (fp32, nats) of each of ids[1:], shape (N-1,), scored with sliding windows."""
    if len(ids) < 2:
        raise TinkerError("perplexity: the text has fewer than 2 tokens (give a longer text)")
    max_context = getattr(model, "max_context", None)
    if max_context is not None:
        context = min(context, max_context)
    stride = stride or max(1, context // 2)
    if context < 2 or not 1 <= stride < context:
        raise TinkerError(
            f"perplexity: need context >= 2 and 1 <= stride < context (got context {context}, stride {stride})"
        )
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    nll = torch.empty(len(ids) - 1, dtype=torch.float32)
    for begin, end, first in windows(len(ids), context, stride):
        logits = model(ids_t[None, begin:end])[0]  # (T, V); logits[i] predicts ids[begin + i + 1]
        pred = logits[first - 1 - begin : end - 1 - begin].float()  # (n_targets, V)
        logp = torch.log_softmax(pred, dim=-1)
        targets = ids_t[first:end]  # (n_targets,)
        nll[first - 1 : end - 1] = -logp.gather(-1, targets[:, None])[:, 0]
    return nll


def perplexity(
    model, tokenizer, text: str, *, context: int = 512, stride: int | None = None, add_special_tokens: bool = True
) -> float:
    """exp(mean NLL) of `text` under `model` (see the module docstring for the windows).

    Args:
        model: a tinkerlm CausalLM (or any callable mapping ids (1, T) to logits (1, T, V)).
        tokenizer: the model's tokenizer; the text is encoded once, with the tokenizer's BOS if it adds one.
        context: tokens per window (capped at the model's context).
        stride: tokens between window starts, below `context`; default context // 2.
    Raises:
        TinkerError: the text has fewer than 2 tokens, or context/stride are out of range.
    """
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    nll = token_nll(model, ids, context=context, stride=stride)
    return math.exp(nll.double().mean().item())


def divergence(reference, model, x: torch.Tensor, rows: slice, targets: torch.Tensor, *, what: str = "kl") -> tuple:
    """Per scored position of one window `x` (1, T): KL(P || Q) of the next-token distributions (P the reference's),
    whether the argmaxes agree, and both models' NLL of `targets` (n, 1). `rows` picks the scored logits.

    A model whose vocabulary is padded larger than the reference's (GGUF writers may pad) is cut to it: the mass it
    puts on the padding is lost from its side; a smaller one is a TinkerError (`what` names the caller).
    Returns float64 (kl, nll_reference, nll_model) tensors of shape (n,) and a bool (n,) agreement tensor.
    """
    logp = torch.log_softmax(reference(x)[0, rows].float(), dim=-1)  # (n, V)
    logq = torch.log_softmax(model(x)[0, rows].float(), dim=-1)
    v_ref, v_model = logp.shape[-1], logq.shape[-1]
    if v_model < v_ref:
        raise TinkerError(
            f"{what}: the model has {v_model} vocabulary entries, its reference {v_ref} (not the same tokenizer?)"
        )
    logq = logq[..., :v_ref]
    # exp(logp) is exactly 0 where logp is -inf, and 0 * (-inf - x) would be nan: those terms are 0.
    terms = torch.where(logp.isneginf(), 0.0, logp.exp() * (logp - logq))
    kl = terms.sum(-1).double().clamp_min(0.0)  # rounding can leave -1e-9 where P == Q
    agree = logp.argmax(-1) == logq.argmax(-1)
    return kl, -logp.gather(-1, targets)[:, 0].double(), -logq.gather(-1, targets)[:, 0].double(), agree
