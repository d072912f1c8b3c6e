"""The caching CPU allocator (tinkerlm/kernels/alloc.cpp): blocks reused by size class only, its accounting, the cap,
threads, release, tensors freed through the allocator that made them, and training maths unchanged bit for bit."""

from __future__ import annotations

import threading

import pytest
import torch
from test_tune import randomise_lora, write_chat_data
from tiny import make_hf_model

from tinkerlm import kernels, lora
from tinkerlm.loading import load_checkpoint
from tinkerlm.tune import data as data_mod
from tinkerlm.tune import trainer

KiB = 1024
pytestmark = pytest.mark.skipif(kernels.ops() is None, reason="the C++ kernels are unavailable")


@pytest.fixture
def cache():
    """The caching allocator installed with an empty cache and a 64 MiB cap; the default one back afterwards."""
    kernels.allocator_release()
    kernels.caching_allocator(True, cap_bytes=64 << 20)
    yield
    kernels.caching_allocator(False, cap_bytes=1 << 30)
    kernels.allocator_release()


def block(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in ("live_bytes", "cached_bytes", "hits", "misses", "unmaps")}


def test_a_freed_block_serves_only_its_own_size_class(cache):
    s0 = kernels.allocator_stats()
    a = block(300 * KiB)  # class 320 KiB (256 KiB in steps of 64)
    ptr = a.data_ptr()
    assert ptr % 64 == 0
    del a
    assert kernels.ops().alloc_cached_classes() == {320 * KiB: 1}
    b = block(330 * KiB)  # class 384 KiB: must not get the 320 KiB block
    c = block(257 * KiB)  # class 320 KiB: gets it back
    assert c.data_ptr() == ptr and b.data_ptr() != ptr
    d = delta(s0, kernels.allocator_stats())
    assert d["misses"] == 2 and d["hits"] == 1
    assert d["live_bytes"] == (384 + 320) * KiB and d["cached_bytes"] == 0
    big = b.data_ptr()
    del b
    e = block(260 * KiB)  # class 320 KiB, none cached: a new block, not the cached 384 KiB one
    assert e.data_ptr() != big and delta(s0, kernels.allocator_stats())["misses"] == 3
    del c, e
    assert kernels.ops().alloc_cached_classes() == {320 * KiB: 2, 384 * KiB: 1}
    small = block(100 * KiB)  # below 256 KiB: PyTorch's own allocator, not counted here
    assert delta(s0, kernels.allocator_stats())["live_bytes"] == 0
    del small


def test_live_and_cached_bytes_add_up_and_release_unmaps_the_cache(cache):
    s0 = kernels.allocator_stats()
    sizes = [256 * KiB, 1 << 20, (1 << 20) + 1, 3 << 20]  # classes 256 KiB, 1 MiB, 1.25 MiB, 3 MiB
    classes = [256 * KiB, 1 << 20, 5 << 18, 3 << 20]
    held = [block(n) for n in sizes]
    assert delta(s0, kernels.allocator_stats())["live_bytes"] == sum(classes)
    assert kernels.allocator_stats()["peak_live_bytes"] >= sum(classes)
    del held
    d = delta(s0, kernels.allocator_stats())
    assert d["live_bytes"] == 0 and d["cached_bytes"] == sum(classes)
    assert kernels.allocator_release() == sum(classes) + s0["cached_bytes"]
    s1 = kernels.allocator_stats()
    assert s1["cached_bytes"] == 0 and kernels.ops().alloc_cached_classes() == {}


def test_cached_bytes_never_pass_the_cap(cache):
    kernels.caching_allocator(True, cap_bytes=2 << 20)
    s0 = kernels.allocator_stats()
    held = [block(1 << 20) for _ in range(5)]
    del held  # two fit under the cap, three are unmapped
    s1 = kernels.allocator_stats()
    assert s1["cached_bytes"] == 2 << 20 and delta(s0, s1)["unmaps"] == 3
    kernels.caching_allocator(True, cap_bytes=1 << 20)  # lowering the cap below what is cached empties the cache
    assert kernels.allocator_stats()["cached_bytes"] == 0


def test_tensors_free_through_the_allocator_that_made_them(cache):
    kernels.caching_allocator(False)
    before = block(1 << 20)  # PyTorch's allocator made it
    kernels.caching_allocator(True)
    s0 = kernels.allocator_stats()
    del before  # freed by PyTorch's allocator: nothing here changes
    assert delta(s0, kernels.allocator_stats()) == dict.fromkeys(
        ("live_bytes", "cached_bytes", "hits", "misses", "unmaps"), 0
    )
    after = block(1 << 20)
    kernels.caching_allocator(False)
    assert not kernels.allocator_stats()["installed"]
    del after  # made here, comes back here although PyTorch's allocator is installed again: unmapped, not cached
    d = delta(s0, kernels.allocator_stats())
    assert d["live_bytes"] == 0 and d["cached_bytes"] == 0 and d["unmaps"] == 1
    other = block(1 << 20)  # the default allocator again: this one's counts do not move
    assert delta(s0, kernels.allocator_stats())["misses"] == 1
    del other


def test_threads_allocating_and_freeing_never_share_a_block(cache):
    errors = []

    def work(tid):
        g = torch.Generator().manual_seed(tid)
        held = []
        for i in range(300):
            n = int(torch.randint(256 * KiB, 2 << 20, (1,), generator=g))
            t = block(n).fill_(tid)
            held.append(t)
            if len(held) > 4:
                t = held.pop(int(torch.randint(0, len(held), (1,), generator=g)))
                if not bool((t == tid).all()):  # another thread was handed this block while it was live
                    errors.append((tid, i))
        for t in held:
            if not bool((t == tid).all()):
                errors.append((tid, "end"))

    s0 = kernels.allocator_stats()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s1 = kernels.allocator_stats()
    assert errors == []
    assert s1["live_bytes"] == s0["live_bytes"] and s1["live_blocks"] == s0["live_blocks"]
    assert s1["hits"] - s0["hits"] > 0  # blocks were reused
    assert s1["cached_bytes"] <= s1["cap_bytes"]
    cached = kernels.ops().alloc_cached_classes()
    assert sum(size * n for size, n in cached.items()) == s1["cached_bytes"]


def test_a_lora_step_is_bit_exact_with_the_caching_allocator(tmp_path):
    """Training reads no memory it did not write: the same losses and gradients whichever allocator made them."""
    make_hf_model("llama", tmp_path / "m")
    model, tok, _ = load_checkpoint(tmp_path / "m", quant="fp32")
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=["all-linear"]), seed=0)
    randomise_lora(model)
    model.train()
    examples, _ = data_mod.load_examples(write_chat_data(tmp_path / "d.jsonl", 120), tok, 128)
    rows = data_mod.pack(examples, 128, tok.pad_token_id)
    out = []
    kernels.allocator_release()
    try:
        for on in (False, True, False):
            kernels.caching_allocator(on)
            s0 = kernels.allocator_stats()
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            loss = trainer.loss_sum(model, rows.ids, rows.segments, rows.target)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            out.append((loss.detach().clone(), grads, delta(s0, kernels.allocator_stats())))
            del loss
    finally:
        kernels.caching_allocator(False)
        kernels.allocator_release()
    (loss0, grads0, d0), (loss1, grads1, d1), (loss2, _, d2) = out
    assert d1["hits"] > 0 and d1["misses"] > 0  # the step went through the cache ...
    assert d0["misses"] == d0["hits"] == d2["misses"] == 0  # ... and only with it installed
    assert torch.equal(loss0, loss1) and torch.equal(loss0, loss2) and len(grads0) > 0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


def test_training_installs_it_unless_turned_off(monkeypatch):
    from tinkerlm.tune import memory

    try:
        assert memory.caching_allocator(True) and kernels.allocator_stats()["installed"]
        held = block(1 << 20)
        assert memory.caching_allocator(False) and not kernels.allocator_stats()["installed"]
        del held  # freed after training: unmapped, nothing stays cached
        assert kernels.allocator_stats()["cached_bytes"] == 0
        monkeypatch.setenv("TINKERLM_CACHING_ALLOCATOR", "0")
        assert not memory.caching_allocator(True) and not kernels.allocator_stats()["installed"]
    finally:
        kernels.caching_allocator(False)
