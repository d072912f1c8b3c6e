"""Module swaps for quantized weights: `QLinear` for nn.Linear, `QEmbedding` for nn.Embedding.

Small batches (decode) go through the bfloat16 block kernel, reading the packed weight once; large ones (prefill)
dequantize the weight into a scratch matrix and use BLAS, where compute, not memory, is the bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinkerlm.quant import kernels
from tinkerlm.quant.qtensor import QTensor

# Rows of activations up to which the quantized kernel beats dequantize + BLAS (measured with `tinkerlm bench`).
KERNEL_MAX_ROWS = 8


class QLinear(nn.Module):
    def __init__(self, weight: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qtype = weight.qtype
        self.register_buffer("blocks", weight.data)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @property
    def qweight(self) -> QTensor:
        return QTensor(self.blocks, self.qtype, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # training through a frozen quantized layer (QLoRA)
            return _FrozenQLinear.apply(x, self)
        if x.numel() // self.in_features <= KERNEL_MAX_ROWS:
            y = kernels.qmatmul(x, self.qweight)
            return y if self.bias is None else y + self.bias
        return F.linear(x.float(), kernels.dequantize(self.qweight), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"


class _FrozenQLinear(torch.autograd.Function):
    """x @ W.T with a frozen packed W, differentiable in x only. The dequantized W is not kept for the backward
    pass (it is dequantized again there), so training memory holds the packed weights alone, as in QLoRA."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x.float(), kernels.dequantize(layer.qweight), layer.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ kernels.dequantize(ctx.layer.qweight), None


class QEmbedding(nn.Module):
    def __init__(self, weight: QTensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.qtype = weight.qtype
        self.register_buffer("blocks", weight.data)

    @property
    def qweight(self) -> QTensor:
        return QTensor(self.blocks, self.qtype, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.embed(ids, self.qweight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"
