"""KVCache memory: a cache sized for a long context takes memory only for the positions written (its keys and
values are zero pages the OS maps on first touch), reads as zeros elsewhere, and is freed with the cache."""

import gc

import pytest
import torch

from tinkerlm.models.base import KVCache


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


@pytest.mark.parametrize("quantized", [False, True])
def test_a_long_cache_is_resident_only_where_written(quantized):
    before = rss_mib()
    cache = KVCache(n_layers=8, batch=4, max_len=8192, n_kv_heads=4, head_dim=64, quantized=quantized)
    size = cache.nbytes / 2**20  # 256 MiB f32, 68 MiB q8
    assert size > 64
    assert rss_mib() - before < 0.1 * size  # allocated, not touched
    k, v = cache.k[3], cache.v[7]
    assert k.dtype == (torch.int8 if quantized else torch.float32) and k.is_contiguous()
    k[1, :, :16] = 5  # the first 16 positions of one row of one layer
    assert rss_mib() - before < 0.1 * size
    assert int(k[1, :, :16].sum()) == 5 * k[1, :, :16].numel()
    assert not k[0].any() and not k[1, :, 16:].any() and not v.any()  # zeros everywhere else
    rows = cache.rows(1, 2)
    assert rows.k[3].data_ptr() == k[1].data_ptr()  # views, as before
    del cache, k, v, rows
    gc.collect()
    assert rss_mib() - before < 0.1 * size
