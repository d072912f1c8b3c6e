"""Speculative decoding: a cheap drafter guesses the next k tokens and the model checks them all in one forward.

References: Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling"; prompt lookup decoding (Saxena 2023,
github.com/apoorvumang/prompt-lookup-decoding; transformers' `prompt_lookup_num_tokens`, llama.cpp's lookup).

Drafters (both deterministic):
- `PromptLookup`: the tokens that followed the latest earlier occurrence of the sequence's last n-gram (n from
  `lookup_ngram` down to 1). No second model; pays off where the answer copies the prompt (extraction, editing).
- `DraftModel`: a smaller model of the same vocabulary proposes k tokens greedily, with its own KV cache.

Verification: the model runs [last token, d1..dk] in one forward at their positions, giving k+1 next-token logits.
The model's own `Sampler` then picks position by position, exactly as plain decoding would (same penalties, JSON
constraint, logprobs and random draws); a draft token is kept while it equals the pick, and the first pick that
differs (or the pick after the last draft) ends the round. Every emitted token is therefore the model's own choice
given the tokens before it: greedy output is plain decoding's, and sampling draws from the model's distribution
(with a seed, the same tokens as plain decoding). For a deterministic draft this *is* the rejection scheme of
Leviathan et al. and Chen et al.: with q one-hot on d, "accept d with probability min(1, p(d)/q(d)) = p(d), else
draw from norm(max(0, p - q))" is "draw from p; keep d if the draw is d". Nothing is lost by drawing the draft
greedily, and any sampling option works unchanged.

KV caches: the verify forward writes k+1 slots; after a rejection the row's length is set back to the tokens kept
(the stale slots beyond are never attended to and get overwritten, see `KVCache`). The draft model's cache is
rolled back the same way, to the longest prefix its tokens share with the sequence.

Speed path: quantized Llama-family models verify with the fused decode kernel, all k+1 tokens as entries of one
`llama_decode` call on the same cache row (`FusedLlamaDecoder.run_row`): the weights are read once, and each
entry's arithmetic is exactly a one-token step's. Other models (no fused step: float weights, GPT-2, LoRA applied
unfused) verify through their modules over the k+1 tokens at an offset.

Speculation runs one sequence at a time (a latency technique: batching already shares the weight reads between
rows); several prompts run one after another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tinkerlm.errors import TinkerError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that run models, so the CLI can read the defaults below without it.

DRAFT_TOKENS, LOOKUP_NGRAM = 8, 3  # defaults of --draft-tokens and --lookup-ngram
MAX_DRAFT_TOKENS, MAX_LOOKUP_NGRAM = 64, 16
FUSED_MAX = 32  # longest run of tokens given to the fused kernel; longer (a draft catching up on a prompt): modules


@dataclass
class SpeculativeStats:
    """What speculation did in the last generation call (all its rows).

    drafted: proposed tokens checked against the model's pick (those after the row's end are not); accepted: those
    kept; tokens: tokens generated; forwards: forward passes
    of the model, the prompt's included (plain decoding makes one per token, so `tokens_per_forward` is 1).
    """

    drafter: str
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    forwards: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def summary(self) -> str:
        return (
            f"speculative decoding ({self.drafter}): {self.accepted}/{self.drafted} drafted tokens accepted "
            f"({self.acceptance:.0%}), {self.tokens} tokens in {self.forwards} forwards "
            f"({self.tokens_per_forward:.2f} per forward)"
        )


def forward_tokens(model, tokens: Sequence[int], cache, last_only: bool = False) -> torch.Tensor:
    """Logits (T, V) (or (1, V) with `last_only`) for `tokens` appended to row 0 of `cache`; advances its length.

    The caller makes sure the tokens fit the cache."""
    import torch

    ids = torch.tensor(list(tokens), dtype=torch.long)
    fused = getattr(model, "fused_decode", None)
    if fused is not None and hasattr(fused, "run_row") and len(ids) <= FUSED_MAX:
        logits = fused.run_row(ids, cache)  # (T, V)
        logits = logits[-1:] if last_only else logits
    else:
        at = torch.tensor([len(ids) - 1]) if last_only else None
        logits = model(ids[None], cache=cache, logits_at=at)[0]  # (T, V) or (1, V)
    cache.advance(len(ids))
    return logits


class PromptLookup:
    """Drafts by n-gram lookup in the sequence itself (prompt and answer so far).

    An index per n (1..ngram) maps each n-gram that has a token after it to its latest start, updated as tokens
    come: constant work per token, whatever the context length.
    """

    def __init__(self, ngram: int = LOOKUP_NGRAM):
        self.ngram = ngram
        self.name = f"prompt lookup, n-grams up to {ngram}"
        self.start([])

    def start(self, prompt: Sequence[int], max_len: int = 0) -> None:
        self.seq: list[int] = []
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in range(self.ngram)]
        self._extend(prompt)

    def _extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            m = len(self.seq)  # t's position: the n-gram ending just before it now has a continuation
            self.seq.append(t)
            for n in range(1, min(self.ngram, m) + 1):
                self.index[n - 1][tuple(self.seq[m - n : m])] = m - n

    def propose(self, seq: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
        self._extend(seq[len(self.seq) :])  # the sequence only grows: every emitted token is final
        for n in range(min(self.ngram, len(seq)), 0, -1):
            start = self.index[n - 1].get(tuple(seq[-n:]))
            if start is not None:
                return list(seq[start + n : start + n + k])
        return []


class DraftModel:
    """Drafts with a smaller model of the same vocabulary: k greedy tokens, with its own KV cache."""

    def __init__(self, model, name: str = "draft"):
        self.model = model
        self.name = f"draft model {name}"

    def start(self, prompt: Sequence[int], max_len: int) -> None:
        self.cache = self.model.new_cache(1, min(max_len, self.model.max_context))
        self.held: list[int] = []  # the tokens whose keys and values the cache holds
        self.synced = 0  # held[:synced] is known to equal the sequence (it only grows)

    def propose(self, seq: Sequence[int], k: int) -> list[int]:
        # Roll back to the longest prefix the cache shares with the sequence (its rejected drafts go), keeping at
        # least one token to feed.
        n = self.synced
        limit = min(len(self.held), len(seq) - 1)
        while n < limit and self.held[n] == seq[n]:
            n += 1
        k = min(k, self.cache.max_len - len(seq) + 1)  # the cache takes seq and k - 1 drafts
        if k <= 0:
            return []
        self.cache.lengths = [n]
        self.held, self.synced = list(seq), len(seq)
        logits = forward_tokens(self.model, seq[n:], self.cache, last_only=True)
        out = [int(logits[-1].argmax())]
        for _ in range(k - 1):
            logits = forward_tokens(self.model, out[-1:], self.cache)
            self.held.append(out[-1])
            out.append(int(logits[-1].argmax()))
        return out


class _RowView:
    """What `stream_generate` asks of the sampler (`json_done(row)`), for the one row being generated."""

    def __init__(self, sampler, row: int):
        self.sampler, self.row = sampler, row

    def json_done(self, row: int) -> bool:
        return row == self.row and self.sampler.json_done(0)


class Speculative:
    """Speculative decoding with one drafter; `run` is a drop-in for generation's batch loop (see generate.py).

    Args:
        drafter: a `PromptLookup` or `DraftModel`.
        draft_tokens: tokens drafted per round (the verify forward takes one more).

    `stats` holds the last run's `SpeculativeStats`.
    """

    def __init__(self, drafter, draft_tokens: int = DRAFT_TOKENS):
        _check_int("draft_tokens", draft_tokens, MAX_DRAFT_TOKENS)
        self.drafter, self.draft_tokens = drafter, draft_tokens
        self.stats: SpeculativeStats | None = None

    def run(
        self, model, prompts: Sequence[Sequence[int]], max_tokens: int, sampler_for, stop_token_ids, finished
    ) -> Iterator[tuple[list[int | None], list | None, _RowView]]:
        """Yield per token (tokens with None for the other rows, per-row logprobs or None, sampler view), as
        generation's `_run` does, one row after another. `finished[i]` (set by the consumer: a stop string) moves
        on to the next row."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise TinkerError("prompt: empty prompt (give at least one token of text)")
        longest = max(len(p) for p in prompts)
        if longest >= model.max_context:
            raise TinkerError(
                f"prompt: {longest} tokens do not fit the model's context of {model.max_context} (shorten the prompt)"
            )
        vocab = model.lm_head.out_features
        self.stats = stats = SpeculativeStats(self.drafter.name)
        stop_set = set(stop_token_ids)
        B = len(prompts)
        for i, prompt in enumerate(prompts):
            sampler = sampler_for([prompt], vocab)
            view = _RowView(sampler, i)
            for token, info in self._row(model, list(prompt), max_tokens, sampler, stop_set, vocab, stats):
                out: list[int | None] = [None] * B
                out[i] = token
                infos = None
                if info is not None:
                    infos = [[] for _ in range(B)]
                    infos[i] = info
                yield out, infos, view
                if finished[i]:
                    break

    def _row(self, model, prompt: list[int], max_tokens: int, sampler, stop_set, vocab: int, stats):
        """Yield (token, its logprobs or None) for one prompt."""
        import torch

        # As a decorator on a generator, inference mode holds while the generator runs, not between its yields.
        return torch.inference_mode()(self._decode)(model, prompt, max_tokens, sampler, stop_set, vocab, stats)

    def _decode(self, model, prompt: list[int], max_tokens: int, sampler, stop_set, vocab: int, stats):
        import torch

        L = len(prompt)
        max_tokens = min(max_tokens, model.max_context - L)
        cache = model.new_cache(1, min(L + max_tokens + self.draft_tokens, model.max_context))
        logits = model(torch.tensor([prompt]), cache=cache, logits_at=torch.tensor([L - 1]))[:, -1]  # (1, V)
        cache.lengths = [L]
        stats.forwards += 1
        self.drafter.start(prompt, cache.max_len)
        seq, drafts, emitted = list(prompt), [], 0
        while True:
            # Pick position by position; keep a draft token while it is the pick. The cache then holds seq[:-1].
            for j in range(logits.shape[0]):
                token, infos = sampler(logits[j : j + 1], max_tokens - emitted)
                t = int(token[0])  # the one host sync per emitted token
                seq.append(t)
                emitted += 1
                stats.tokens += 1
                yield t, (infos[0] if infos is not None else None)
                if t in stop_set or sampler.json_done(0) or emitted >= max_tokens:
                    return
                if j < len(drafts):  # a draft judged (drafts past a stop are never judged, nor counted)
                    stats.drafted += 1
                    if t == drafts[j]:
                        stats.accepted += 1
                        continue
                break
            n = len(seq) - 1
            cache.lengths = [n]  # roll back: the keys of rejected drafts are stale
            # No draft beyond what the budget can emit (a round emits up to k + 1) or the cache can take.
            k = min(self.draft_tokens, max_tokens - emitted - 1, cache.max_len - n - 1)
            drafts = self.drafter.propose(seq, k) if k > 0 else []
            drafts = drafts[:k]
            for j, d in enumerate(drafts):  # a draft model's padded vocabulary may exceed the model's
                if not 0 <= d < vocab:
                    drafts = drafts[:j]
                    break
            logits = forward_tokens(model, [seq[-1], *drafts], cache)  # (1 + len(drafts), V)
            stats.forwards += 1


def check_vocabulary(target_tokenizer, draft_tokenizer, target: str, draft: str) -> None:
    """Refuse a draft model whose tokenizer maps tokens to other ids than the target's.

    Raises:
        TinkerError: naming both models and how many ids differ.
    """
    a = target_tokenizer.backend.get_vocab(with_added_tokens=True)
    b = draft_tokenizer.backend.get_vocab(with_added_tokens=True)
    if a != b:
        differ = len(set(a.items()) ^ set(b.items()))
        raise TinkerError(
            f"--draft {draft}: its tokenizer ({len(b)} tokens) is not {target}'s ({len(a)} tokens; {differ} "
            "token-id pairs differ); a draft model must share the model's vocabulary (use a smaller model of the "
            "same family)"
        )


def speculative(
    target_tokenizer=None,
    target_name: str = "model",
    *,
    draft=None,
    draft_tokenizer=None,
    draft_name: str = "draft",
    prompt_lookup: bool = False,
    draft_tokens: int = DRAFT_TOKENS,
    lookup_ngram: int = LOOKUP_NGRAM,
) -> Speculative | None:
    """The `Speculative` for these options (None when neither a draft model nor prompt lookup is asked for).

    `draft` is a loaded draft model (with its tokenizer, checked against the target's).

    Raises:
        TinkerError: both drafters asked for, a value out of range, or a draft of another vocabulary.
    """
    check_options(draft is not None, prompt_lookup, draft_tokens, lookup_ngram)
    if draft is not None:
        check_vocabulary(target_tokenizer, draft_tokenizer, target_name, draft_name)
        return Speculative(DraftModel(draft, draft_name), draft_tokens)
    if prompt_lookup:
        return Speculative(PromptLookup(lookup_ngram), draft_tokens)
    return None


def check_options(draft: bool, prompt_lookup: bool, draft_tokens: int, lookup_ngram: int) -> None:
    """Refuse both drafters at once or a value out of range (TinkerError), before any model is loaded."""
    if draft and prompt_lookup:
        raise TinkerError("--draft and --prompt-lookup: choose one drafter")
    _check_int("draft_tokens", draft_tokens, MAX_DRAFT_TOKENS)
    _check_int("lookup_ngram", lookup_ngram, MAX_LOOKUP_NGRAM)


def _check_int(name: str, value, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise TinkerError(f"{name}: must be an integer in 1..{most} (got {value!r})")
