"""Quantized weights as module swaps: `attach` packed weights from a GGUF, `quantize` float ones, `fuse` for decode.

`packed_state_dict` reads a GGUF checkpoint keeping its quantized weights as blocks (repacked for the kernels).

Models never subclass or copy for quantization: nn.Linear becomes `QLinear` and nn.Embedding `QEmbedding` in
place, tied weights stay tied (one packed tensor, two modules), and the fused decode step is attached to a model
whose layers are all quantized. See qtensor.py for the format, qops.py for the ops and tinkerlm/kernels/ for the C++.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tinkerlm.errors import TinkerError
from tinkerlm.quant.linear import QEmbedding, QLinear
from tinkerlm.quant.qops import pack
from tinkerlm.quant.qtensor import Packed, QTensor, fits, from_gguf
from tinkerlm.quant.qtensor import quantize as quantize_tensor

__all__ = [
    "QTensor",
    "Packed",
    "QLinear",
    "QEmbedding",
    "attach",
    "quantize",
    "fuse",
    "unfuse",
    "weight_bytes",
    "packed_state_dict",
]

# GGUF types read as plain floats even when packing.
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


def packed_state_dict(ckpt) -> dict[str, torch.Tensor | QTensor | Packed]:
    """Every parameter of a GGUF checkpoint (`tinkerlm.formats.gguf.GGUFCheckpoint`) under its HF name, quantized
    2-D weights kept quantized: `Packed` (repacked for the kernels, the file's pages released as each is done), or
    `QTensor` blocks where the kernels are unavailable. Float tensors, 1-D ones and rows not in whole blocks of 32
    come back as fp32 tensors, as `ckpt.state_dict()` gives them.

    Raises:
        TinkerError: unused or missing tensors, a shape contradicting the metadata, or an unknown tensor type.
    """
    out = {}
    for name in ckpt.hf_names():
        raw = ckpt.raw_tensor(name)
        if raw.type in FLOAT_TYPES or len(raw.shape) != 2 or not fits(raw.shape):
            out[name] = ckpt.hf_tensor(name)
            continue
        qt = from_gguf(np.asarray(raw.data).reshape(raw.shape[0], -1), raw.type, raw.shape, raw.dequantize)
        if raw.row_order is not None:  # a row permutation: blocks move with their rows
            qt = qt.rows(torch.from_numpy(raw.row_order))
        qt = pack(qt)
        if isinstance(qt, Packed):
            ckpt.release(name)
        out[name] = qt
    return out


def _swap(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, attr = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _quantized(module: nn.Module, weight: QTensor | Packed) -> nn.Module:
    if isinstance(module, nn.Embedding):
        return QEmbedding(weight)
    bias = module.bias if module.bias is not None and not module.bias.is_meta else None
    return QLinear(weight, bias)


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """id(weight parameter) -> names of the Linear/Embedding modules holding it (tied weights have several)."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            out.setdefault(id(module.weight), []).append(name)
    return out


def attach(model: nn.Module, packed: dict[str, QTensor | Packed], source: str) -> None:
    """Swap in quantized modules for the weights in `packed` (HF parameter name -> QTensor or Packed)."""
    holders = _holders(model)
    for name, qt in packed.items():
        module_name = name.removesuffix(".weight")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise TinkerError(f"{source}: checkpoint tensor {name} is not used by the model") from None
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise TinkerError(f"{source}: tensor {name} is quantized but its module is a {type(module).__name__}")
        if tuple(module.weight.shape) != qt.shape:
            raise TinkerError(
                f"{source}: tensor {name} has shape {list(qt.shape)}, config implies "
                f"{list(module.weight.shape)} (config and weights disagree)"
            )
        weight = pack(qt)  # once: tied modules share it
        for holder in holders[id(module.weight)]:  # the tied head too
            _swap(model, holder, _quantized(model.get_submodule(holder), weight))


def quantize(model: nn.Module, bits: int) -> None:
    """Quantize every float nn.Linear and nn.Embedding: bits=8 to Q8_0 blocks, bits=4 to Q4_1 blocks."""
    for ids in _holders(model).values():
        module = model.get_submodule(ids[0])
        w = module.weight.detach()
        if not fits(w.shape):
            continue  # rows not in whole blocks of 32: stays float
        qt = pack(quantize_tensor(w, bits))
        for holder in ids:
            _swap(model, holder, _quantized(model.get_submodule(holder), qt))


def fuse(model: nn.Module) -> bool:
    """Speed transforms for inference over packed weights: q/k/v and gate/up as one kernel call each (prefill),
    and the fused C++ decode step where the model allows it (returned: whether it was attached)."""
    from tinkerlm.kernels import ops
    from tinkerlm.quant.decode import FusedGemmaDecoder, FusedLlamaDecoder
    from tinkerlm.quant.linear import FusedGateUp, FusedQKV

    if ops() is None:
        return False
    packed = lambda *ms: all(isinstance(m, QLinear) and m.packed for m in ms)  # noqa: E731
    for module in model.modules():
        if hasattr(module, "fused_qkv") and packed(module.q_proj, module.k_proj, module.v_proj):
            module.fused_qkv = FusedQKV(module.q_proj, module.k_proj, module.v_proj)
        if (
            hasattr(module, "fused_gate_up")
            and packed(module.gate_proj, module.up_proj)
            and module.gate_proj.bias is None
            and module.up_proj.bias is None
        ):
            module.fused_gate_up = FusedGateUp(module.gate_proj, module.up_proj)
    for decoder in (FusedLlamaDecoder, FusedGemmaDecoder):
        if decoder.supports(model):
            model.fused_decode = decoder(model)
            return True
    return False


def unfuse(model: nn.Module) -> None:
    """Undo `fuse` (before swapping layers, e.g. for LoRA: the fused calls know only the weights they were given)."""
    for module in model.modules():
        for attr in ("fused_qkv", "fused_gate_up", "fused_decode"):
            if getattr(module, attr, None) is not None:
                setattr(module, attr, None)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, counting shared storage once (what a forward pass reads)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
