"""The C++ kernels (kernels.cpp), built on first use with torch's extension tooling, and pure-PyTorch fallbacks.

`ops()` returns the compiled module, or None where it cannot be built (no compiler) or is turned off with
TINKERLM_KERNELS=0; every caller then takes the fallback, which computes the same thing: weights and activations
rounded to bfloat16 exactly as the kernel rounds them, products summed in fp32.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch

from tinkerlm.quant.qtensor import QTensor

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("kernels.cpp")


@lru_cache(maxsize=1)
def ops():
    """The compiled kernels, or None (then the PyTorch fallbacks run)."""
    if os.environ.get("TINKERLM_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        name = "tinkerlm_kernels_" + _source_hash()
        built = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
        if built.exists():  # import the cached build directly: asking ninja whether it is current costs seconds
            import importlib.util

            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        print("tinkerlm: compiling CPU kernels (once, about a minute)...", file=sys.stderr, flush=True)
        return load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a build error: fall back, say so once
        log.warning("tinkerlm: CPU kernels unavailable (%s); using the slower PyTorch path", str(e).splitlines()[0])
        return None


def _source_hash() -> str:
    import hashlib

    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]


def qmatmul(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x (..., K) @ W.T with W in blocks: weights and activations rounded to bfloat16, products summed in fp32."""
    k = ops()
    if k is not None:
        return k.qmatmul(x.float().contiguous(), w.data, w.code)
    return x.bfloat16().float() @ w.dequantize().bfloat16().float().T


def dequantize(w: QTensor) -> torch.Tensor:
    k = ops()
    return k.dequantize(w.data, w.code) if k is not None else w.dequantize()


def embed(ids: torch.Tensor, w: QTensor) -> torch.Tensor:
    k = ops()
    if k is not None:
        return k.embed(ids, w.data, w.code)
    return w.rows(ids.reshape(-1)).dequantize().reshape(*ids.shape, w.shape[1])
