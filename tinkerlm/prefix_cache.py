"""Prefix caching: keep the KV cache of recent prompts and reuse it for requests that begin alike.

System prompts, multi-turn chats (each turn's prompt is the previous prompt, its answer and a new user turn) and
few-shot evaluation send prompts that share a beginning. `PrefixCache` keeps the keys and values of such prefixes in
blocks of `block` tokens arranged as a tree: a node holds one block, its children the blocks that followed it in
some prompt, so a lookup walks a prompt block by block to the longest cached block-aligned prefix. Tokens are
compared, not hashed, so two prompts never share an entry unless they share those tokens exactly. This is vLLM's
automatic prefix caching (hashed blocks, Kwon et al. 2023) and SGLang's RadixAttention (Zheng et al. 2024) without
paging: on a hit the blocks are copied into the sequence's own cache row and only the rest of the prompt is
prefilled, at its true positions (the KV cache's row length says where it starts).

Memory is bounded by a byte budget; the least recently used block goes first. A lookup touches a path leaf first
and its ancestors after, so a parent is never older than its children and the oldest block is always a leaf.

Reuse is exact for any model whose keys and values at position i depend only on tokens 0..i and whose `KVCache`
keeps every position: RoPE and learned absolute positions alike (the rest is prefilled at positions n.., as a cold
run would), and sliding windows too (the window is a mask over the full cache, not a rolling buffer). A cache is
bound to one model's weights: `bind(model)` forgets everything when the parameters change (a module swap such as
LoRA or quantization, a `load_state_dict`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from itertools import chain

import torch

from tinkerlm.errors import TinkerError

DEFAULT_MB = 256
BLOCK = 16  # tokens per block: at most BLOCK - 1 tokens of a cached prefix are prefilled again


class _Block:
    """One block of `tokens` following `parent`'s, with its keys and values (L, n_kv, block, hd) each."""

    __slots__ = ("tokens", "parent", "k", "v", "children")

    def __init__(self, tokens: tuple[int, ...], parent: _Block | None, k: torch.Tensor, v: torch.Tensor):
        self.tokens, self.parent, self.k, self.v = tokens, parent, k, v
        self.children: dict[tuple[int, ...], _Block] = {}

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class PrefixCache:
    """Keys and values of recent token prefixes, in blocks, under a byte budget (least recently used evicted).

    Args:
        budget_mb: memory for cached keys and values, in MiB; 0 disables the cache.
        block: tokens per block (prefixes are reused in whole blocks).

    Use: `n = restore(cache, row, prompt)` before prefilling `prompt[n:]` into `row` (its length set to n), then
    `insert(cache, row, tokens)` for tokens whose keys and values lie in the row (the prompt after prefill; prompt
    and fed answer tokens when a sequence ends). `stats` counts hits, misses, tokens_reused and evictions.
    """

    def __init__(self, budget_mb: float = DEFAULT_MB, block: int = BLOCK):
        if budget_mb < 0 or block < 1:
            raise TinkerError(f"prefix_cache_mb must be >= 0 and block >= 1 (got {budget_mb}, {block})")
        self.budget = int(budget_mb * 2**20)
        self.block = block
        self.root: dict[tuple[int, ...], _Block] = {}
        self.lru: OrderedDict[_Block, None] = OrderedDict()  # oldest first
        self.bytes = 0
        self.stats = dict(hits=0, misses=0, tokens_reused=0, evictions=0)
        self.lock = threading.Lock()  # an LLM may be called from several threads
        self._weights: int | None = None

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return len(self.lru)

    def clear(self) -> None:
        with self.lock:
            self.root, self.lru, self.bytes = {}, OrderedDict(), 0

    def bind(self, model) -> None:
        """Forget every entry if `model`'s weights are not those the entries were computed with."""
        key = _weights_key(model)
        if key != self._weights:
            self.clear()
            self._weights = key

    # -- lookups ---------------------------------------------------------------------------------------------------
    def _path(self, tokens: list[int], limit: int) -> list[_Block]:
        """The cached blocks covering the longest block-aligned prefix of `tokens[:limit]`."""
        path, children, b = [], self.root, self.block
        for start in range(0, limit - b + 1, b):
            node = children.get(tuple(tokens[start : start + b]))
            if node is None:
                break
            path.append(node)
            children = node.children
        return path

    def _touch(self, path: list[_Block]) -> None:
        for node in reversed(path):  # leaf first: ancestors end up more recent than their descendants
            self.lru.move_to_end(node)

    def match(self, tokens: list[int]) -> int:
        """Tokens of `tokens` a `restore` would reuse: the longest cached block-aligned prefix that leaves at
        least one token to prefill (the logits of the last prompt token come from the prefill)."""
        if not self.enabled:
            return 0
        with self.lock:
            return len(self._path(tokens, len(tokens) - 1)) * self.block

    @torch.inference_mode()
    def restore(self, cache, row: int, tokens: list[int], limit: int | None = None) -> int:
        """Copy the keys and values of the longest cached prefix of `tokens` (at most `limit` tokens, and at most
        len(tokens) - 1) into positions [0, n) of `cache` row `row`; return n (0 on a miss). Counts a hit or miss.

        The caller sets the row's length to n and prefills `tokens[n:]`."""
        if not self.enabled:
            return 0
        limit = len(tokens) - 1 if limit is None else min(limit, len(tokens) - 1)
        with self.lock:
            path = self._path(tokens, limit)
            if not path:
                self.stats["misses"] += 1
                return 0
            self._touch(path)
            k = torch.cat([node.k for node in path], dim=2)  # (L, n_kv, n, hd)
            v = torch.cat([node.v for node in path], dim=2)
            self.stats["hits"] += 1
            self.stats["tokens_reused"] += k.shape[2]
        cache.write(row, 0, k, v)
        return k.shape[2]

    # -- inserting -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def insert(self, cache, row: int, tokens: list[int]) -> None:
        """Keep the keys and values of `tokens`' whole blocks, read from positions [0, len(tokens)) of `cache` row
        `row` (they must be those tokens' keys and values); blocks already cached are only touched."""
        if not self.enabled:
            return
        b = self.block
        with self.lock:
            path, children = [], self.root
            for start in range(0, len(tokens) - b + 1, b):
                key = tuple(tokens[start : start + b])
                node = children.get(key)
                if node is None:
                    k, v = cache.read(row, start, start + b)
                    node = _Block(key, path[-1] if path else None, k, v)
                    if node.nbytes > self.budget:
                        break
                    children[key] = node
                    self.lru[node] = None
                    self.bytes += node.nbytes
                path.append(node)
                children = node.children
            self._touch(path)
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used blocks (always leaves) until the budget holds. A new prefix larger than the
        budget loses its own last blocks: they are its oldest."""
        while self.bytes > self.budget:
            node = next(iter(self.lru))
            assert not node.children, "the least recently used block is a leaf"
            siblings = node.parent.children if node.parent is not None else self.root
            del siblings[node.tokens]
            del self.lru[node]
            self.bytes -= node.nbytes
            self.stats["evictions"] += 1


def _weights_key(model) -> int:
    """A fingerprint of `model`'s weights: which tensors it holds and, where torch tracks it, how often each was
    modified in place."""
    parts = [id(model)]
    for t in chain(model.parameters(), model.buffers()):
        try:
            version = t._version
        except RuntimeError:  # inference tensors track no version
            version = -1
        parts.append((id(t), version))
    return hash(tuple(parts))
