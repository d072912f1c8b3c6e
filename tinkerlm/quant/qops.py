"""The quantized ops (pack, unpack, products, dequantize, embed) on the C++ kernels, with PyTorch fallbacks.

Each op runs `tinkerlm.kernels.ops()` where it is built, else a fallback computing the same thing: activations
rounded to int16 blocks exactly as the kernels round them, times the dequantized weights, in fp32. With the kernels,
weights are held `Packed` (the layout the products read: tinkerlm/kernels/common.h); without them, as the GGUF's
blocks. The kernels are looked up at each call, so replacing `tinkerlm.kernels.ops` reaches these ops too.
"""

from __future__ import annotations

import torch

from tinkerlm import kernels
from tinkerlm.quant.qtensor import K_TYPES, TYPE_CODES, Packed, QTensor

# The K-quants pack in their own bits (X4K, X5K, X6K, X3K, X2K) and unpack to their super-blocks; without the kernels
# Q4_K and Q5_K become Q4_1 and Q5_1 blocks (QTensor.as_blocks: each sub-block d * sc * u - dmin * mn, the scale and
# offset rounded to fp16).


def pack(w: QTensor | Packed) -> QTensor | Packed:
    """The kernels' layout of `w` (a copy), or `w` itself where already packed or the kernels are unavailable.
    K-quant super-blocks are converted in C++ in one pass; without the kernels
    Q4_K and Q5_K become Q4_1 and Q5_1 blocks in numpy, the other K-quants stay super-blocks."""
    k = kernels.ops()
    if isinstance(w, Packed):
        return w
    if k is None:
        return w.as_blocks() if w.qtype in ("Q4_K", "Q5_K") else w
    return Packed(k.pack(w.data, w.code), w.qtype, *w.shape)


def unpack(w: QTensor | Packed) -> QTensor:
    """GGUF blocks again (bit for bit) from either form (the K-quants: their super-blocks)."""
    if isinstance(w, QTensor):
        return w
    return QTensor(kernels.ops().unpack(w.data, w.fmt, w.rows, TYPE_CODES[w.qtype]), w.qtype, w.K)


def round_acts(x: torch.Tensor) -> torch.Tensor:
    """x rounded per 32-value block to int16 steps of amax / 32767, as the products see it (kernels/quantized.cpp)."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 32767 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 32767)).reshape(x.shape)


# The plain C++ build (no AVX2) is for decoding: products of more activation rows than this dequantize the weight and
# use BLAS instead. The vector builds keep every product in their integer kernels: on AVX2 the int16 products of a
# 5-row tile, on weights unpacked once per half group, run 1.05-1.2x as fast as fp32 BLAS on the dequantized weight,
# and skip dequantizing it on every call (which halved BLAS's speed there; BENCHMARKS.md "AVX2").
PORTABLE_MAX_ROWS = 16


def prefer_blas(k, x: torch.Tensor) -> bool:
    """Whether these kernels should hand this product to BLAS (the plain build and a prefill-sized x)."""
    return k.isa == "scalar" and x.numel() // x.shape[-1] > PORTABLE_MAX_ROWS


def qmatmul(x: torch.Tensor, w: QTensor | Packed) -> torch.Tensor:
    """x (..., K) @ W.T: activations rounded to int16 blocks (`round_acts`), integer products, fp32 scales."""
    k = kernels.ops()
    if k is not None and prefer_blas(k, x):
        return x.float() @ dequantize(w).T
    if k is not None:
        if isinstance(w, QTensor):
            w = pack(w)
        return k.qmatmul(x.float().contiguous(), w.data, w.fmt, w.rows)
    return round_acts(x) @ dequantize(w).T


def qmatmul_multi(x: torch.Tensor, ws: list[Packed]) -> list[torch.Tensor]:
    """[x @ W.T for W in ws] (q/k/v): x rounded once, one parallel region."""
    k = kernels.ops()
    if k is None or prefer_blas(k, x):
        return [qmatmul(x, w) for w in ws]
    return k.qmatmul_multi(x.float().contiguous(), [w.data for w in ws], [w.fmt for w in ws], [w.rows for w in ws])


def qmatmul_swiglu(x: torch.Tensor, gate: Packed, up: Packed) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T), neither product written to memory."""
    k = kernels.ops()
    if k is None or prefer_blas(k, x):
        g = qmatmul(x, gate)
        return torch.nn.functional.silu(g) * qmatmul(x, up)
    return k.qmatmul_swiglu(x.float().contiguous(), gate.data, gate.fmt, up.data, up.fmt, gate.rows)


def dequantize(w: QTensor | Packed) -> torch.Tensor:
    k = kernels.ops()
    if isinstance(w, Packed):
        return k.dequantize_packed(w.data, w.fmt, w.rows)
    if k is not None and w.qtype in K_TYPES:  # super-blocks: through the packed layout
        return dequantize(pack(w))
    return k.dequantize(w.data, w.code) if k is not None else w.dequantize()


def embed(ids: torch.Tensor, w: QTensor | Packed) -> torch.Tensor:
    if isinstance(w, Packed):
        return kernels.ops().embed(ids, w.data, w.fmt, w.rows)
    return w.rows(ids.reshape(-1)).dequantize().reshape(*ids.shape, w.shape[1])
