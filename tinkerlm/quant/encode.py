"""Float weights -> GGUF tensor data in any of ggml's common types, as llama.cpp's `llama-quantize` writes them.

`encode(w, "Q4_K", imatrix)` returns the rows of ggml blocks for a (rows, K) weight: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_NL, byte-identical to ggml_quantize_chunk (llama.cpp's
ggml/src/ggml-quants.c; tests/test_encode.py compares them), with the importance matrix (one weight per column, the
mean squared activation that column meets, from llama.cpp's imatrix tool) steering the fit where given. F32 and
F16 come back as float arrays, BF16 as uint16 bits rounded to nearest even as ggml rounds them.

The work is tinkerlm/kernels/quantize.cpp, parallel over rows. Without the kernels (TINKERLM_KERNELS=0, no C++
compiler) the `gguf` package's numpy quantizers cover Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 without an imatrix; every
other case says it needs the kernels. Large tensors go through in row chunks, so the peak memory is the output and
one chunk of float32 rows.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from tinkerlm import kernels
from tinkerlm.errors import TinkerError

# name -> (ggml type id, values per block, bytes per block), as ggml.c's type_traits
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "IQ4_NL": (20, 32, 18),
    "BF16": (30, 1, 2),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
NUMPY_QUANTIZERS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # what the gguf package can do without the kernels
CHUNK_VALUES = 1 << 22  # float32 values converted and quantized at a time (16 MiB)


def _type(qtype: str) -> tuple[int, int, int]:
    spec = GGML_TYPES.get(str(qtype).upper())
    if spec is None:
        raise TinkerError(f"unknown quantization type {qtype!r}: choose one of {', '.join(GGML_TYPES)}")
    return spec


def bits_per_weight(qtype: str) -> float:
    """Bits a weight takes in `qtype`, block scales included (Q4_K: 4.5, Q8_0: 8.5, F16: 16)."""
    _, block, nbytes = _type(qtype)
    return nbytes * 8 / block


def fits(qtype: str, K: int) -> bool:
    """Whether rows of K values can be stored in `qtype`: K a whole number of its blocks."""
    return K > 0 and K % _type(qtype)[1] == 0


def row_bytes(qtype: str, K: int) -> int:
    """Bytes one row of K values takes in `qtype`."""
    _, block, nbytes = _type(qtype)
    return K // block * nbytes


def encode(w: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None, name: str = "tensor") -> np.ndarray:
    """A float (rows, K) weight as GGUF tensor data of type `qtype`.

    Args:
        w: the weight, any float dtype; rows are quantized independently along K (GGUF's innermost dimension).
        qtype: a key of GGML_TYPES (case-insensitive).
        imatrix: optional (K,) non-negative importance of each column (llama.cpp's imatrix values); ignored by
            Q8_0 and the float types, as llama.cpp ignores it.
        name: the tensor's name, for error messages.

    Returns:
        uint8 (rows, row_bytes) blocks for the quantized types; float32 or float16 (rows, K) for F32 and F16;
        uint16 (rows, K) bfloat16 bits for BF16.

    Raises:
        TinkerError: an unknown type, K not a multiple of the type's block, a malformed imatrix, non-finite
            weights for a quantized type, or a type that needs the C++ kernels where they are unavailable.
    """
    qtype = str(qtype).upper()
    type_id, block, _ = _type(qtype)
    if w.dim() != 2:
        raise TinkerError(f"{name}: expected a 2-D (rows, K) weight to encode as {qtype}, got shape {tuple(w.shape)}")
    rows, K = w.shape
    if not fits(qtype, K):
        raise TinkerError(
            f"{name}: rows of {K} values do not split into {qtype}'s blocks of {block}; "
            f"choose a type with 32-value blocks (Q8_0, Q4_0, ...) or keep it F16"
        )
    im = _check_imatrix(imatrix, K, name) if qtype not in FLOAT_TYPES else None
    ops = kernels.ops()
    if qtype not in FLOAT_TYPES and ops is None and (qtype not in NUMPY_QUANTIZERS or im is not None):
        what = "with an imatrix " if qtype in NUMPY_QUANTIZERS else ""
        raise TinkerError(
            f"{name}: quantizing to {qtype} {what}needs tinkerlm's C++ kernels, which are unavailable here "
            "(TINKERLM_KERNELS=0 or no C++ compiler); install a compiler (g++) or pick Q8_0, Q4_0, Q4_1, Q5_0 or "
            "Q5_1 without an imatrix"
        )
    dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}.get(qtype, np.uint8)
    out = np.empty((rows, K if qtype in FLOAT_TYPES else row_bytes(qtype, K)), dtype)
    step = max(1, CHUNK_VALUES // max(K, 1))
    for r0 in range(0, rows, step):
        chunk = w[r0 : r0 + step].detach().to(device="cpu", dtype=torch.float32).contiguous()
        try:
            out[r0 : r0 + step] = _encode_chunk(chunk, qtype, type_id, im, ops)
        except NonFinite as e:  # block scales would be garbage
            raise TinkerError(f"{name}: row {r0 + e.row} holds NaN or infinite values; refusing to encode it") from None
    return out


def _check_imatrix(imatrix, K: int, name: str) -> torch.Tensor | None:
    if imatrix is None:
        return None
    im = torch.as_tensor(imatrix).detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
    if im.numel() == 0:
        return None
    if im.numel() != K:
        raise TinkerError(f"{name}: the imatrix has {im.numel()} values, expected one per column ({K})")
    if not bool(torch.isfinite(im).all()) or bool((im < 0).any()):
        raise TinkerError(f"{name}: the imatrix holds negative or non-finite values; recompute it")
    return im


def _encode_chunk(x: torch.Tensor, qtype: str, type_id: int, im, ops) -> np.ndarray:
    if qtype == "F32":
        return x.numpy()
    if qtype == "F16":
        return x.numpy().astype(np.float16)
    if qtype == "BF16":
        return _bf16_bits(x.numpy())
    if ops is not None:
        try:
            return ops.quantize_rows(x, type_id, im).numpy()
        except RuntimeError as e:  # the kernel checks each row as it goes
            found = re.search(r"non-finite value in row (\d+)", str(e))
            if found is None:
                raise
            raise NonFinite(int(found.group(1))) from None
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    finite = np.isfinite(x.numpy()).all(axis=1)
    if not finite.all():
        raise NonFinite(int(np.argmin(finite)))
    return quantize(x.numpy(), GGMLQuantizationType[qtype])


class NonFinite(Exception):
    def __init__(self, row: int):
        self.row = row


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even; NaNs stay (quiet) NaNs, as ggml's conversion."""
    u = x.view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    return np.where(nan, (u >> 16) | 64, rounded).astype(np.uint16)
