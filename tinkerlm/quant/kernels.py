"""The C++ kernels (kernels.cpp), built on first use with torch's extension tooling, and pure-PyTorch fallbacks.

`ops()` returns the compiled module, or None where it cannot be built (no compiler) or is turned off with
TINKERLM_KERNELS=0; every caller then takes the fallback, which computes the same thing: activations rounded to
int16 blocks exactly as the kernel rounds them, times the dequantized weights, in fp32. With the kernels, weights
are held `Packed` (the layout the products read); without them, as the GGUF's blocks.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch

from tinkerlm.quant.qtensor import TYPE_CODES, Packed, QTensor

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("kernels.cpp")


@lru_cache(maxsize=1)
def ops():
    """The compiled kernels, or None (then the PyTorch fallbacks run)."""
    if os.environ.get("TINKERLM_KERNELS", "1") == "0":
        return None
    try:
        return build()
    except Exception as e:  # no compiler, no ninja, a build error: fall back, say so once
        log.warning("tinkerlm: CPU kernels unavailable (%s); using the slower PyTorch path", str(e).splitlines()[0])
        return None


def build(flags: tuple[str, ...] = ()):
    """Compile kernels.cpp for this CPU (-O3 -march=native, then `flags`), or import the cached build; raises on
    failure. Builds are cached under a name hashing the source, the flags and this CPU's features, so a cache
    shared between machines never hands one a build for another's instruction set."""
    from torch.utils.cpp_extension import _get_build_directory, load

    name = "tinkerlm_kernels_" + _build_hash(flags)
    built = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    if built.exists():  # import the cached build directly: asking ninja whether it is current costs seconds
        import importlib.util

        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    print("tinkerlm: compiling CPU kernels (once, about a minute)...", file=sys.stderr, flush=True)
    return load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", *flags, "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)


def _build_hash(flags: tuple[str, ...]) -> str:
    import hashlib
    import platform

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha256(SOURCE.read_bytes() + repr(flags).encode() + cpu.encode()).hexdigest()[:12]


def pack(w: QTensor | Packed) -> QTensor | Packed:
    """The kernels' layout of `w` (a copy), or `w` itself where already packed or the kernels are unavailable."""
    k = ops()
    if isinstance(w, Packed) or k is None:
        return w
    return Packed(k.pack(w.data, w.code), w.qtype, *w.shape)


def unpack(w: QTensor | Packed) -> QTensor:
    """GGUF blocks again (bit for bit) from either form."""
    if isinstance(w, QTensor):
        return w
    return QTensor(ops().unpack(w.data, w.fmt, w.rows, TYPE_CODES[w.qtype]), w.qtype, w.K)


def round_acts(x: torch.Tensor) -> torch.Tensor:
    """x rounded per 32-value block to int16 steps of amax / 32767, as the products see it (kernels.cpp)."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 32767 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 32767)).reshape(x.shape)


# Builds without AVX-512 (kernels.cpp's AVX2 or plain C++ loops) are for decoding: products of more activation
# rows than this dequantize the weight and use BLAS instead, as does attention (torch's).
PORTABLE_MAX_ROWS = 16
FULL_ISA = "avx512-vnni"  # kernels.cpp's `isa` for the build with every vector path (prefill products, attention)


def prefer_blas(k, x: torch.Tensor) -> bool:
    """Whether these kernels should hand this product to BLAS (a portable build and a prefill-sized x)."""
    return k.isa != FULL_ISA and x.numel() // x.shape[-1] > PORTABLE_MAX_ROWS


def qmatmul(x: torch.Tensor, w: QTensor | Packed) -> torch.Tensor:
    """x (..., K) @ W.T: activations rounded to int16 blocks (`round_acts`), integer products, fp32 scales."""
    k = ops()
    if k is not None and prefer_blas(k, x):
        return x.float() @ dequantize(w).T
    if k is not None:
        if isinstance(w, QTensor):
            w = pack(w)
        return k.qmatmul(x.float().contiguous(), w.data, w.fmt, w.rows)
    return round_acts(x) @ dequantize(w).T


def qmatmul_multi(x: torch.Tensor, ws: list[Packed]) -> list[torch.Tensor]:
    """[x @ W.T for W in ws] (q/k/v): x rounded once, one parallel region."""
    k = ops()
    if k is None or prefer_blas(k, x):
        return [qmatmul(x, w) for w in ws]
    return k.qmatmul_multi(x.float().contiguous(), [w.data for w in ws], [w.fmt for w in ws], [w.rows for w in ws])


def qmatmul_swiglu(x: torch.Tensor, gate: Packed, up: Packed) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T), neither product written to memory."""
    k = ops()
    if k is None or prefer_blas(k, x):
        g = qmatmul(x, gate)
        return torch.nn.functional.silu(g) * qmatmul(x, up)
    return k.qmatmul_swiglu(x.float().contiguous(), gate.data, gate.fmt, up.data, up.fmt, gate.rows)


def dequantize(w: QTensor | Packed) -> torch.Tensor:
    k = ops()
    if isinstance(w, Packed):
        return k.dequantize_packed(w.data, w.fmt, w.rows)
    return k.dequantize(w.data, w.code) if k is not None else w.dequantize()


def embed(ids: torch.Tensor, w: QTensor | Packed) -> torch.Tensor:
    if isinstance(w, Packed):
        return ops().embed(ids, w.data, w.fmt, w.rows)
    return w.rows(ids.reshape(-1)).dequantize().reshape(*ids.shape, w.shape[1])
