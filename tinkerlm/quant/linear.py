"""Module swaps for quantized weights: `QLinear` for nn.Linear, `QEmbedding` for nn.Embedding.

Both hold the weight `Packed` for the C++ kernels (or as GGUF blocks where those are unavailable). Every forward
pass, decode and prefill alike, runs the packed integer products (tinkerlm/kernels/): at decode they read the 4-bit
weights once instead of an fp32 copy, and at prefill they outrun dequantize-then-BLAS (VNNI int16 products do
twice the multiply-adds of fp32 FMA). Training through a frozen quantized layer (QLoRA) dequantizes instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinkerlm.quant import qops
from tinkerlm.quant.qtensor import Packed, QTensor


class _Quantized(nn.Module):
    """The weight as a buffer `blocks` (packed or GGUF blocks) and the properties both layers share."""

    def _hold(self, weight: QTensor | Packed) -> None:
        self.qtype = weight.qtype
        self.packed = isinstance(weight, Packed)
        self.register_buffer("blocks", weight.data)

    @property
    def quantized(self) -> QTensor | Packed:
        """The weight as the kernels take it."""
        rows, K = self._shape
        return Packed(self.blocks, self.qtype, rows, K) if self.packed else QTensor(self.blocks, self.qtype, K)

    @property
    def qweight(self) -> QTensor:
        """The weight as GGUF blocks (unpacked if need be, bit for bit)."""
        return qops.unpack(self.quantized)


class QLinear(_Quantized):
    def __init__(self, weight: QTensor | Packed, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = self._shape = weight.shape
        self._hold(weight)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias); `add` (training only: LoRA's update) is added inside the product (_FrozenQLinear)."""
        if add is not None or (x.requires_grad and torch.is_grad_enabled()):  # training through a frozen layer (QLoRA)
            return _FrozenQLinear.apply(x, self, add)
        y = qops.qmatmul(x, self.quantized)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"


class _FrozenQLinear(torch.autograd.Function):
    """x @ W.T with a frozen packed W, differentiable in x only. The dequantized W is not kept for the backward
    pass (it is dequantized again there), so training memory holds the packed weights alone, as in QLoRA. A weight
    whose fp32 copy would exceed BLOCK_BYTES (a 1B model's 128k-token output head: 1 GB) is dequantized and used
    a block of rows at a time, so no fp32 copy of it ever exists whole."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QLinear, add: torch.Tensor | None = None) -> torch.Tensor:
        """`add` (..., out), e.g. LoRA's update, is added inside the product, so under bf16 autocast the sum is
        rounded once (added to the rounded product instead, an update under half its rounding step is lost)."""
        ctx.layer = layer
        x = x.float()
        if _block_rows(layer) is None:
            return _product(x, qops.dequantize(layer.quantized), layer.bias, add)
        y = None
        for a, b, w in _row_blocks(layer):
            part = _product(
                x, w, None if layer.bias is None else layer.bias[a:b], None if add is None else add[..., a:b]
            )
            y = x.new_empty(*x.shape[:-1], layer.out_features, dtype=part.dtype) if y is None else y
            y[..., a:b] = part
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer = ctx.layer
        gadd = grad if ctx.needs_input_grad[2] else None
        if _block_rows(layer) is None:
            return grad @ qops.dequantize(layer.quantized).to(grad.dtype), None, gadd
        gx = None
        for a, b, w in _row_blocks(layer):
            part = grad[..., a:b] @ w.to(grad.dtype)
            gx = part if gx is None else gx.add_(part)
        return gx, None, gadd


def _product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, add: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T (+ bias) (+ add), the add inside the GEMM (autocast's dtype where autocast is on)."""
    if add is None:
        return F.linear(x, w, bias)
    if bias is not None:
        add = add + bias.to(add.dtype)
    return torch.addmm(add.reshape(-1, w.shape[0]), x.reshape(-1, x.shape[-1]), w.t()).view(*x.shape[:-1], w.shape[0])


BLOCK_BYTES = 64 << 20  # largest fp32 weight QLoRA dequantizes whole


def _block_rows(layer: QLinear) -> int | None:
    """Rows per dequantized block for `layer`'s weight (a multiple of 16, the packed row group), None: all at once."""
    full = layer.out_features * layer.in_features * 4
    if full <= BLOCK_BYTES:
        return None
    return max(16, BLOCK_BYTES // (layer.in_features * 4) // 16 * 16)


def _row_blocks(layer: QLinear):
    """(first row, end row, dequantized fp32 rows) of the layer's weight, block by block."""
    w, step = layer.quantized, _block_rows(layer)
    for a in range(0, layer.out_features, step):
        b = min(a + step, layer.out_features)
        part = (
            Packed(w.data[a // 16 : -(-b // 16)], w.qtype, b - a, w.K) if isinstance(w, Packed) else w.rows(slice(a, b))
        )
        yield a, b, qops.dequantize(part)


class QEmbedding(_Quantized):
    def __init__(self, weight: QTensor | Packed):
        super().__init__()
        self.num_embeddings, self.embedding_dim = self._shape = weight.shape
        self._hold(weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return qops.embed(ids, self.quantized)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


class FusedQKV:
    """x -> (q, k, v) in one kernel call: the input rounded once, the three products in one parallel region.
    Set as `Attention.fused_qkv` by `tinkerlm.quant.fuse` (a plain object, not a module: no duplicate weights)."""

    def __init__(self, q: QLinear, k: QLinear, v: QLinear):
        self.layers = (q, k, v)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ys = qops.qmatmul_multi(x, [m.quantized for m in self.layers])
        return tuple(y if m.bias is None else y + m.bias for y, m in zip(ys, self.layers))


class FusedGateUp:
    """x -> silu(gate(x)) * up(x) in one kernel call (set as `MLP.fused_gate_up` by `tinkerlm.quant.fuse`)."""

    def __init__(self, gate: QLinear, up: QLinear):
        self.gate, self.up = gate, up

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return qops.qmatmul_swiglu(x, self.gate.quantized, self.up.quantized)
