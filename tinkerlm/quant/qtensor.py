"""Packed quantized weights: the one format the kernels read, made from GGUF blocks or from float weights.

A `QTensor` holds a (rows, K) matrix in blocks of 32 values along K: value = d * u + m, with fp16 `d` and `m` per
block and `u` unsigned (8 bits, or 4 bits with blocks paired so one byte holds the same position of two blocks).
GGUF types map onto it without loss where they can (ggml's block formats, see llama.cpp's ggml-common.h):
- Q4_0 (d, 4-bit q, value d * (q - 8))   -> 4-bit, m = -8 d
- Q4_1 (d, m, 4-bit q, value d * q + m)   -> 4-bit as is
- Q8_0 (d, int8 q, value d * q)           -> 8-bit, u = q + 128, m = -128 d
- every other type the gguf package can dequantize (K-quants, Q5, IQ...) -> dequantized, requantized to 8-bit
  per block of 32 (a repack that keeps ~8.5 bits a weight, well above the source's precision).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

QK = 32


@dataclass
class QTensor:
    q: torch.Tensor  # uint8 (rows, K) for 8 bits, (rows, K // 2) for 4 bits
    d: torch.Tensor  # float16 (rows, K // 32)
    m: torch.Tensor  # float16 (rows, K // 32)
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d.shape[0], self.d.shape[1] * QK)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m))

    def rows(self, index) -> "QTensor":
        """Rows selected or reordered by `index` (a slice keeps views; a tensor of indices copies)."""
        return QTensor(self.q[index], self.d[index], self.m[index], self.bits)

    def dequantize(self) -> torch.Tensor:
        """The float32 (rows, K) matrix, in pure PyTorch."""
        u = unpack(self.q, self.bits, self.d.shape[1])  # (rows, nb, 32)
        w = self.d.float()[..., None] * u.float() + self.m.float()[..., None]
        return w.reshape(self.shape)

    @staticmethod
    def cat(parts: list["QTensor"]) -> "QTensor":
        assert len({p.bits for p in parts}) == 1
        return QTensor(torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]),
                       torch.cat([p.m for p in parts]), parts[0].bits)


def pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, nb, 32) uint8 values -> packed bytes (rows, nb * 32) or, for 4 bits, (rows, nb * 16)."""
    rows, nb, _ = u.shape
    if bits == 8:
        return u.reshape(rows, nb * QK).contiguous()
    pairs = u.reshape(rows, nb // 2, 2, QK)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(rows, nb * QK // 2).contiguous()


def unpack(q: torch.Tensor, bits: int, nb: int) -> torch.Tensor:
    rows = q.shape[0]
    if bits == 8:
        return q.reshape(rows, nb, QK)
    pairs = q.reshape(rows, nb // 2, QK)
    return torch.stack((pairs & 0x0F, pairs >> 4), dim=2).reshape(rows, nb, QK)


def fits(shape, bits: int) -> bool:
    """Whether a (rows, K) matrix can be packed: K in whole blocks, and in whole block pairs for 4 bits."""
    return len(shape) == 2 and shape[1] % (QK * (2 if bits == 4 else 1)) == 0


def quantize(w: torch.Tensor, bits: int) -> QTensor:
    """Quantize a float (rows, K) matrix: 8 bits symmetric, 4 bits with a per-block minimum (like Q4_1)."""
    rows, K = w.shape
    blocks = w.float().reshape(rows, K // QK, QK)
    if bits == 8:
        d = (blocks.abs().amax(-1) / 127).half()
        inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
        qv = torch.round(blocks * inv[..., None]).clamp(-127, 127).to(torch.int16)
        return QTensor(pack((qv + 128).to(torch.uint8), 8), d, (-128 * d.float()).half(), 8)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d = ((hi - lo) / 15).half()
    m = lo.half()
    inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(lo))
    u = torch.round((blocks - m.float()[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return QTensor(pack(u, 4), d, m, 4)


# GGUF block layouts: (bytes a block, offset of d, offset of m or None, offset of the values)
_GGUF_BLOCKS = {"Q4_0": (18, 0, None, 2), "Q4_1": (20, 0, 2, 4), "Q8_0": (34, 0, None, 2)}


def from_gguf(raw: np.ndarray, type_name: str, shape: tuple[int, int], dequantize=None) -> QTensor:
    """Repack a GGUF tensor's raw blocks (rows, bytes a row) into a QTensor.

    `dequantize(raw) -> float32 array` is used for types without a direct mapping (they become 8-bit).
    """
    rows, K = shape
    nb = K // QK
    if type_name not in _GGUF_BLOCKS:
        w = torch.from_numpy(np.ascontiguousarray(dequantize(raw), dtype=np.float32).reshape(rows, K))
        return quantize(w, 8)
    size, d_off, m_off, q_off = _GGUF_BLOCKS[type_name]
    with warnings.catch_warnings():  # a read-only memory map: it is only read, every result below is a new tensor
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(np.ascontiguousarray(raw).reshape(rows, nb, size))
    d = blocks[..., d_off : d_off + 2].contiguous().view(torch.float16)[..., 0]
    if type_name == "Q8_0":
        u = blocks[..., q_off:] ^ 0x80  # int8 q -> q + 128 as uint8
        return QTensor(pack(u, 8), d.contiguous(), (-128 * d.float()).half(), 8)
    qs = blocks[..., q_off:]  # (rows, nb, 16): value j in the low nibble of byte j, value j + 16 in the high one
    u = torch.cat((qs & 0x0F, qs >> 4), dim=-1)
    m = blocks[..., m_off : m_off + 2].contiguous().view(torch.float16)[..., 0] if m_off is not None else (-8 * d.float()).half()
    bits = 4 if nb % 2 == 0 else 8  # an odd number of blocks cannot pair up: keep one value a byte
    return QTensor(pack(u, bits), d.contiguous(), m.contiguous(), bits)
