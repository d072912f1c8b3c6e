"""Quantized weights in ggml's own block formats, so a GGUF's tensors are used where they lie (memory-mapped).

A `QTensor` is a (rows, K) matrix stored as rows of 32-value blocks (layouts as in llama.cpp's ggml-common.h):
- Q8_0: fp16 d, 32 x int8 q                       value = d * q                 (34 bytes a block)
- Q4_0: fp16 d, 16 bytes of 4-bit q               value = d * (q - 8)           (18 bytes)
- Q4_1: fp16 d, fp16 m, 16 bytes of 4-bit q       value = d * q + m             (20 bytes)
- Q5_1: fp16 d, fp16 m, 4 bytes of fifth bits, 16 bytes of low nibbles   value = d * q + m   (24 bytes)
(4-bit: byte j holds value j in its low nibble and value j + 16 in its high one.)
The K-quants (Q4_K, Q5_K, Q6_K, Q3_K, Q2_K: 256-value super-blocks) are held as the file's super-blocks, zero-copy,
and `qops.pack` converts them in C++, in one pass, straight into the kernels' layout (kernels/common.h):
- Q4_K -> X4K, the file's own bits (144 bytes per 256 weights): per super-block d, dmin and the 6-bit scales and
  mins as they are, the products folding each sub-block's min into its activation sum (d * sc * u - dmin * mn).
- Q5_K -> X5K, the file's own bits (176 bytes per 256 weights): X4K with each block's fifth bits beside it.
- Q6_K -> X6K (6.625 bits a weight; the file: 6.5625): the 6-bit integers u kept (the products take the 32 off),
  the file's fp16 d and int8 scale per 16-value sub-block.
- Q3_K -> X3K (3.625 bits a weight; the file: 3.4375): the 3-bit integers u (the products take the 4 off) as
  3-bit fields, with X6K's head: the file's fp16 d and each 16-value sub-block's 6-bit scale, as an int8 sc - 32.
- Q2_K -> X2K, the file's own bits (84 bytes per 256 weights): X6K's head holding the file's d, dmin and each
  16-value sub-block's byte of 4-bit scale and min, then 2-bit fields.
Integers and scales are the file's: every K-quant dequantizes exactly as gguf does, and unpacks to its super-blocks. Other GGUF types (IQ...) are dequantized and requantized to Q8_0 at load.
`quantize` makes Q8_0 (int8) or Q4_1 (int4) blocks from float weights.

A `Packed` tensor is a QTensor rearranged into the layout the C++ products read (groups of 16 rows; kernels/common.h,
"Packed weights"; Q4_0 as X4S, its blocks' scales and nibbles without an offset, 18 bytes per 32 weights as in the
file), losslessly for every type it holds; `qops.pack` and `qops.unpack` convert between the two.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from tinkerlm.errors import TinkerError

QK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_1": 24}
# K-quant super-blocks: (type code, bytes of 256 values) as kernels/quantized.cpp (KType) numbers them.
K_TYPES = {"Q4_K": (4, 144), "Q5_K": (5, 176), "Q6_K": (6, 210), "Q3_K": (7, 110), "Q2_K": (8, 84)}
TYPE_CODES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q5_1": 3, **{t: c for t, (c, _) in K_TYPES.items()}}


@dataclass
class QTensor:
    data: torch.Tensor  # uint8 (rows, K // 32 * block bytes): the blocks, possibly a view of a memory-mapped file
    qtype: str  # Q8_0, Q4_0, Q4_1, Q5_1, or a K-quant's super-blocks (K_TYPES)
    K: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.K)

    @property
    def code(self) -> int:
        return TYPE_CODES[self.qtype]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, index) -> QTensor:
        """Rows selected or reordered by `index` (a slice keeps a view; a tensor of indices copies)."""
        if isinstance(index, torch.Tensor):  # numpy's row gather: torch's byte-wise index_select is ~40x slower
            return QTensor(torch.from_numpy(self.data.numpy()[index.numpy()]), self.qtype, self.K)
        return QTensor(self.data[index], self.qtype, self.K)

    def fields(self):
        """(d, m or None, values) with values as int16 (rows, nb, 32), the integers the kernels multiply (32-value
        block types only)."""
        assert self.qtype in BLOCK_BYTES, self.qtype
        rows, nb = self.data.shape[0], self.K // QK
        blocks = self.data.reshape(rows, nb, BLOCK_BYTES[self.qtype])
        d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
        if self.qtype == "Q8_0":
            return d, None, blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16)
        qs = blocks[..., {"Q4_0": 2, "Q4_1": 4, "Q5_1": 8}[self.qtype] :]
        u = torch.cat((qs & 0x0F, qs >> 4), dim=-1).to(torch.int16)
        if self.qtype == "Q5_1":  # fifth bits: bit k of a little-endian uint32 belongs to value k
            qh = blocks[..., 4:8].to(torch.int32)
            qh = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
            u = u | (((qh[..., None] >> torch.arange(32, dtype=torch.int32)) & 1) << 4).to(torch.int16)
        if self.qtype == "Q4_0":
            return d, None, u - 8
        return d, blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float(), u

    def dequantize(self) -> torch.Tensor:
        """The float32 (rows, K) matrix, in pure PyTorch (K-quants: numpy), with the packed layout's fp16 scales."""
        if self.qtype in K_TYPES:
            return torch.from_numpy(k_dequantize(self.data.numpy(), self.qtype, *self.shape))
        d, m, v = self.fields()
        w = d[..., None] * v.float()
        if m is not None:
            w = w + m[..., None]
        return w.reshape(self.shape)

    def as_blocks(self) -> QTensor:
        """Q4_K and Q5_K super-blocks as Q4_1 and Q5_1 blocks (numpy; a copy): how they are held without the kernels."""
        convert = {"Q4_K": (q4_k_to_q4_1, "Q4_1"), "Q5_K": (q5_k_to_q5_1, "Q5_1")}[self.qtype]
        return QTensor(torch.from_numpy(convert[0](self.data.numpy(), *self.shape)), convert[1], self.K)

    @staticmethod
    def cat(parts: list[QTensor]) -> QTensor:
        assert len({(p.qtype, p.K) for p in parts}) == 1
        return QTensor(torch.cat([p.data for p in parts]), parts[0].qtype, parts[0].K)


# The packed format of each block type, as kernels/common.h numbers them: X4, X8, X5, X6, X3, X2, X4S (Q4_0: no
# offsets, 18 bytes per 32 weights), X4K (Q4_K in its own bits, 144 bytes per 256), X6K (Q6_K's 6-bit integers,
# fp16 d and int8 scales: 212 bytes per 256; X6 is no longer packed), X5K (Q5_K in its own bits, 176 per 256), X3K
# (Q3_K's 3-bit integers and its own scales, 116 bytes per 256; X3 is no longer packed), X2K (Q2_K in its own bits,
# 84 bytes per 256; nor is X2).
PACKED_FORMATS = {"Q4_0": 6, "Q4_1": 0, "Q8_0": 1, "Q5_1": 2, "Q4_K": 7, "Q5_K": 9, "Q6_K": 8, "Q3_K": 10, "Q2_K": 11}


@dataclass
class Packed:
    data: torch.Tensor  # uint8 (ceil(rows / 16), K // 32 * group block bytes)
    qtype: str  # the block type it was packed from; unpacking gives those blocks back bit for bit (Q4_K its
    # the K-quants their super-blocks)
    rows: int
    K: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.K)

    @property
    def fmt(self) -> int:
        return PACKED_FORMATS[self.qtype]

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def fits(shape) -> bool:
    """Whether a (rows, K) matrix can be stored in blocks: K a multiple of 32."""
    return len(shape) == 2 and shape[1] % QK == 0


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.half().contiguous().view(torch.uint8).reshape(*x.shape, 2)


def quantize(w: torch.Tensor, bits: int) -> QTensor:
    """Float (rows, K) -> Q8_0 blocks (bits=8, symmetric) or Q4_1 blocks (bits=4, with a per-block minimum)."""
    rows, K = w.shape
    blocks = w.float().reshape(rows, K // QK, QK)
    if bits == 8:
        d = (blocks.abs().amax(-1) / 127).half().float()
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = torch.round(blocks * inv[..., None]).clamp(-127, 127).to(torch.int8).view(torch.uint8)
        data = torch.cat((_f16_bytes(d), q), dim=-1)
        return QTensor(data.reshape(rows, -1).contiguous(), "Q8_0", K)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d, m = ((hi - lo) / 15).half().float(), lo.half().float()
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    u = torch.round((blocks - m[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    qs = u[..., :16] | (u[..., 16:] << 4)
    data = torch.cat((_f16_bytes(d), _f16_bytes(m), qs), dim=-1)
    return QTensor(data.reshape(rows, -1).contiguous(), "Q4_1", K)


def q4_k_to_q4_1(raw: np.ndarray, rows: int, K: int) -> np.ndarray:
    """Q4_K super-blocks (rows, K / 256 * 144 bytes) -> Q4_1 blocks (rows, K / 32 * 20 bytes).

    A Q4_K super-block (ggml-common.h block_q4_K): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for its
    eight 32-value sub-blocks, 128 bytes of 4-bit values (32-byte chunk c: sub-block 2c in the low nibbles,
    2c + 1 in the high ones). Sub-block s is d * sc[s] * u - dmin * mn[s].
    """
    sb = raw.reshape(-1, 144)
    scales = _k_scales(sb)
    qs = sb[:, 16:].reshape(-1, 4, 32)
    u = np.stack((qs & 0x0F, qs >> 4), axis=2).reshape(-1, 8, 32)  # (n, sub-block, value)
    out = np.empty((len(sb), 8, 20), np.uint8)
    out[..., 0:4] = scales
    out[..., 4:] = u[..., :16] | (u[..., 16:] << 4)
    return out.reshape(rows, K // QK * 20)


def q5_0_to_q5_1(raw: np.ndarray, rows: int, K: int) -> np.ndarray:
    """Q5_0 blocks (fp16 d, 4 bytes of fifth bits, 16 bytes of low nibbles; value d * (q - 16)) -> Q5_1 blocks
    with m = -16 d (exact in fp16): the same values, bit for bit."""
    b = raw.reshape(-1, 22)
    out = np.empty((len(b), 24), np.uint8)
    out[:, 0:2] = b[:, 0:2]
    out[:, 2:4] = (b[:, 0:2].copy().view(np.float16) * np.float16(-16)).view(np.uint8)
    out[:, 4:] = b[:, 2:]
    return out.reshape(rows, K // QK * 24)


def q5_k_to_q5_1(raw: np.ndarray, rows: int, K: int) -> np.ndarray:
    """Q5_K super-blocks (rows, K / 256 * 176 bytes) -> Q5_1 blocks (rows, K / 32 * 24 bytes).

    A Q5_K super-block (ggml-common.h block_q5_K): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins (as
    Q4_K), 32 bytes of fifth bits (bit s of byte l: sub-block s, value l), 128 bytes of low nibbles (as Q4_K).
    """
    sb = raw.reshape(-1, 176)
    scales = _k_scales(sb)
    qh = sb[:, 16:48]  # (n, 32)
    qs = sb[:, 48:].reshape(-1, 4, 32)
    u = np.stack((qs & 0x0F, qs >> 4), axis=2).reshape(-1, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (n, sub-block, value)
    out = np.empty((len(sb), 8, 24), np.uint8)
    out[..., 0:4] = scales
    bits = (high.astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(-1).astype("<u4")  # value l -> bit l
    out[..., 4:8] = bits[..., None].view(np.uint8)
    out[..., 8:] = u[..., :16] | (u[..., 16:] << 4)
    return out.reshape(rows, K // QK * 24)


def _k_scale_min(sb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K super-blocks -> each sub-block's scale d * sc and offset -dmin * mn in float32 (n, 8), exact (an
    fp16 times a 6-bit integer)."""
    d = sb[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n, 1)
    dmin = sb[:, 2:4].copy().view(np.float16).astype(np.float32)
    s = sb[:, 4:16].astype(np.uint8)
    sc = np.empty((len(sb), 8), np.float32)
    mn = np.empty((len(sb), 8), np.float32)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return d * sc, -dmin * mn


def _k_scales(sb: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K super-blocks -> each sub-block's fp16 scale d * sc and offset -dmin * mn, as bytes (n, 8, 4)."""
    scale, offset = _k_scale_min(sb)
    out = np.empty((len(sb), 8, 4), np.uint8)
    out[..., 0:2] = scale.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:4] = offset.astype(np.float16)[..., None].view(np.uint8)
    return out


def k_dequantize(raw: np.ndarray, qtype: str, rows: int, K: int) -> np.ndarray:
    """K-quant super-blocks (rows, K / 256 * bytes) as float32 (rows, K), exactly as gguf computes them (the
    packed formats X4K, X5K, X6K, X3K and X2K keep the file's scales); the reference for the kernels'
    dequantization."""
    if qtype in ("Q4_K", "Q5_K"):
        sb = np.ascontiguousarray(raw).reshape(-1, K_TYPES[qtype][1])
        scale, offset = _k_scale_min(sb)
        qs = sb[:, -128:].reshape(-1, 4, 32)
        u = np.stack((qs & 0x0F, qs >> 4), axis=2).reshape(-1, 8, 32)  # (n, sub-block, value)
        if qtype == "Q5_K":  # bit s of byte l of the 32 after the scales: sub-block s, value l's fifth bit
            u = u | (((sb[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4)
        return (scale[..., None] * u.astype(np.float32) + offset[..., None]).reshape(rows, K)
    sb = np.ascontiguousarray(raw).reshape(-1, K_TYPES[qtype][1])
    n = len(sb)
    # values v (n, 2, 4, 32): 128-value half, 32-value run j (shift 2j, ...), element; scales (n, 2, 4, 2)
    offset = np.zeros((n, 2, 4, 2), np.float32)
    if qtype == "Q6_K":
        ql, qh = sb[:, :128].reshape(n, 2, 2, 32), sb[:, 128:192].reshape(n, 2, 1, 32)
        d = sb[:, 208:210].copy().view(np.float16).astype(np.float32).reshape(n, 1, 1, 1)
        low = np.stack((ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4), axis=2)
        high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
        v = (low | (high << 4)).astype(np.int32) - 32
        scale = d * sb[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 2, 4, 2)  # X6K: exact
    elif qtype == "Q3_K":
        hm, qs = sb[:, :32], sb[:, 32:96].reshape(n, 2, 1, 32)
        d = sb[:, 108:110].copy().view(np.float16).astype(np.float32).reshape(n, 1, 1, 1)
        a = sb[:, 96:108].astype(np.int32)
        sc = np.empty((n, 16), np.int32)
        sc[:, 0:4] = (a[:, 0:4] & 15) | (((a[:, 8:12] >> 0) & 3) << 4)
        sc[:, 4:8] = (a[:, 4:8] & 15) | (((a[:, 8:12] >> 2) & 3) << 4)
        sc[:, 8:12] = (a[:, 0:4] >> 4) | (((a[:, 8:12] >> 4) & 3) << 4)
        sc[:, 12:16] = (a[:, 4:8] >> 4) | (((a[:, 8:12] >> 6) & 3) << 4)
        j = np.arange(4, dtype=np.uint8)[None, None, :, None]
        low = (qs >> (2 * j)) & 3
        high = (hm[:, None, None, :] >> (4 * np.arange(2, dtype=np.uint8)[None, :, None, None] + j)) & 1
        v = (low | (high << 2)).astype(np.int32) - 4
        scale = d * (sc - 32).astype(np.float32).reshape(n, 2, 4, 2)  # X3K: exact
    elif qtype == "Q2_K":
        sc, qs = sb[:, :16].reshape(n, 2, 4, 2), sb[:, 16:80].reshape(n, 2, 1, 32)
        d = sb[:, 80:82].copy().view(np.float16).astype(np.float32).reshape(n, 1, 1, 1)
        dmin = sb[:, 82:84].copy().view(np.float16).astype(np.float32).reshape(n, 1, 1, 1)
        v = ((qs >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3).astype(np.int32)
        scale, offset = d * (sc & 15).astype(np.float32), -dmin * (sc >> 4).astype(np.float32)  # X2K: exact
    else:
        raise ValueError(qtype)
    half = np.arange(32) // 16  # each element's sub-block within its 32-value run
    w = v * scale[..., half] + offset[..., half]
    return w.astype(np.float32).reshape(rows, K)


K_QUANT_BLOCK = 256  # values in a K-quant super-block
# Bytes per block of the types read here block by block (ggml-common.h).
_STORED_BYTES = {**BLOCK_BYTES, "Q5_0": 22, **{t: b for t, (_, b) in K_TYPES.items()}}


def from_gguf(
    raw: np.ndarray, type_name: str, shape: tuple[int, int], dequantize=None, source: str = "model"
) -> QTensor:
    """A GGUF tensor's raw blocks (rows, bytes a row) as a QTensor: zero-copy for Q8_0/Q4_0/Q4_1/Q5_1 and the
    K-quants (K_TYPES; `qops.pack` converts them), Q5_0 as Q5_1.

    `dequantize(raw) -> float32 array` serves the other types, which are requantized to Q8_0.

    Raises:
        TinkerError: rows not a multiple of the type's block (256 values for K-quants, else 32), or a byte count
            that disagrees with the shape; `source` names the file and tensor.
    """
    rows, K = shape
    # A block never spans two rows: a row length that is not a multiple of the block would shift every later
    # row's blocks and load silently wrong weights (K-quants: 256-value super-blocks).
    block = K_QUANT_BLOCK if type_name.endswith("_K") else QK
    if type_name not in ("F32", "F16", "BF16", "F64") and K % block:
        raise TinkerError(
            f"{source}: tensor of type {type_name} has rows of {K} values, not a multiple of its {block}-value "
            "blocks (file corrupt or hostile; re-convert it)"
        )
    expected = rows * K // block * _STORED_BYTES.get(type_name, 0)
    if type_name in _STORED_BYTES and np.asarray(raw).nbytes != expected:
        raise TinkerError(
            f"{source}: tensor of type {type_name} and shape {[rows, K]} holds {np.asarray(raw).nbytes} bytes, "
            f"expected {expected} (file corrupt or hostile)"
        )
    if type_name == "Q5_0":
        return QTensor(torch.from_numpy(q5_0_to_q5_1(np.asarray(raw), rows, K)), "Q5_1", K)
    if type_name not in BLOCK_BYTES and type_name not in K_TYPES:
        w = torch.from_numpy(np.ascontiguousarray(dequantize(raw), dtype=np.float32).reshape(rows, K))
        return quantize(w, 8)
    with warnings.catch_warnings():  # a read-only memory map: kernels only read it
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(np.asarray(raw).reshape(rows, -1))
    return QTensor(data, type_name, K)
