"""Which GGML type each tensor of a GGUF gets, for each file type (`q4_k_m`, `q8_0`, ...), as llama.cpp chooses.

A file type names a mixture: `q4_k_m` is mostly Q4_K, with more bits where quantization hurts most (the output
and attention value projections, and the feed-forward down projections of some layers). The rules below follow
llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the dense architectures tinkerlm writes:

- only 2-D weights are quantized; norms, biases and position embeddings stay as they are (F32);
- the output projection (and the token embedding of a model whose output is tied to it) gets Q6_K, or Q8_0 where
  its rows are not whole 256-value blocks (the file type's own type where that is Q8_0);
- attn_v and ffn_down get more bits in the `_m`/`_s` mixtures, on the layers `use_more_bits` picks;
- a tensor whose rows are not a multiple of the chosen type's block (K-quants: 256) falls back: Q2_K and Q3_K to
  Q4_0, Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0; rows not a multiple of 32 stay F16.

SmolLM2-135M's rows are 576 values (not a multiple of 256): its `q4_k_m` file holds Q5_0 attention and gate/up
weights, Q8_0 for the tied output, and Q4_K/Q6_K only where a row is 1536 values (ffn_down). The report
(`tinkerlm export --report`) lists what each tensor got.

Reference: https://github.com/ggml-org/llama.cpp/blob/master/src/llama-quant.cpp
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tinkerlm.errors import TinkerError


@dataclass(frozen=True)
class FileType:
    name: str  # as users type it: "q4_k_m"
    default: str  # the GGML type of most weights: "Q4_K"
    code: int  # llama.cpp's `llama_ftype`, written as general.file_type


FILE_TYPES = {
    ft.name: ft
    for ft in (
        FileType("f32", "F32", 0),
        FileType("f16", "F16", 1),
        FileType("bf16", "BF16", 32),
        FileType("q8_0", "Q8_0", 7),
        FileType("q6_k", "Q6_K", 18),
        FileType("q5_k_m", "Q5_K", 17),
        FileType("q5_k_s", "Q5_K", 16),
        FileType("q5_1", "Q5_1", 9),
        FileType("q5_0", "Q5_0", 8),
        FileType("q4_k_m", "Q4_K", 15),
        FileType("q4_k_s", "Q4_K", 14),
        FileType("q4_1", "Q4_1", 3),
        FileType("q4_0", "Q4_0", 2),
        FileType("q3_k_m", "Q3_K", 12),
        FileType("q2_k", "Q2_K", 10),
    )
}
FLOAT = ("F32", "F16", "BF16")
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def file_type(name: str) -> FileType:
    """The file type called `name` (case-insensitive).

    Raises:
        TinkerError: an unknown name (the message lists the known ones).
    """
    ft = FILE_TYPES.get(name.lower())
    if ft is None:
        raise TinkerError(f"--type: unknown type {name!r} (choose from {', '.join(FILE_TYPES)})")
    return ft


def block_size(qtype: str) -> int:
    return BLOCK.get(qtype, 256)  # every K-quant holds 256-value super-blocks


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp would quantize this tensor: 2-D weights, but not norms or position embeddings."""
    return (
        len(shape) == 2
        and name.endswith(".weight")
        and "_norm.weight" not in name
        and name not in ("position_embd.weight", "token_types.weight")
    )


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def choose(
    tensors: list[tuple[str, tuple[int, ...]]], ftype: FileType, n_layers: int, n_gqa: int, has_imatrix: bool = False
) -> dict[str, str]:
    """The GGML type of every tensor (GGUF name -> type), given (GGUF name, shape in torch order) in file order.

    Args:
        n_layers: the model's number of layers (ffn_down's mixture depends on the layer's position).
        n_gqa: query heads per key/value head (Q2_K gives attn_v Q4_K from 4 up).
        has_imatrix: an importance matrix is used (Q4_0/Q5_0 then give the first eighth's ffn_down Q4_1/Q5_1).
    """
    names = [n for n, _ in tensors]
    tied = "output.weight" not in names
    n_attn_v = sum(1 for n in names if n.endswith(("attn_v.weight", "attn_qkv.weight")))
    out, i_attn_v = {}, 0
    for name, shape in tensors:
        if not quantizable(name, shape):
            out[name] = "F32"
            continue
        if ftype.default in FLOAT:
            out[name] = ftype.default
            continue
        new = ftype.default
        cols = shape[-1]  # ggml's ne[0]: the row length
        m = _LAYER.match(name)
        layer = int(m[1]) if m else 0
        f = ftype.name
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if cols % block_size(new) != 0:
                new = "Q8_0"
            elif new != "Q8_0":
                new = "Q6_K"
        elif name == "token_embd.weight":
            pass
        elif name.endswith(("attn_v.weight", "attn_qkv.weight")):
            if name.endswith("attn_qkv.weight") and f in ("q3_k_m", "q4_k_m", "q5_k_m"):
                new = {"q3_k_m": "Q4_K", "q4_k_m": "Q5_K", "q5_k_m": "Q6_K"}[f]
            elif f == "q2_k":
                new = "Q4_K" if n_gqa >= 4 else "Q3_K"
            elif f == "q3_k_m":
                new = "Q5_K" if i_attn_v < 2 else "Q4_K"
            elif f in ("q4_k_m", "q5_k_m") and _use_more_bits(i_attn_v, n_attn_v):
                new = "Q6_K"
            elif f == "q4_k_s" and i_attn_v < 4:
                new = "Q5_K"
            i_attn_v += 1
        elif ".ffn_down" in name:
            if f == "q2_k":
                new = "Q3_K"
            elif f == "q3_k_m":
                new = "Q5_K" if layer < n_layers // 16 else "Q4_K"  # (Falcon alone keeps some Q3_K)
            elif f in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layers):
                new = "Q6_K"
            elif f == "q4_k_s" and layer < n_layers // 8:
                new = "Q5_K"
            elif f in ("q4_0", "q5_0") and has_imatrix and layer < n_layers // 8:
                new = "Q4_1" if f == "q4_0" else "Q5_1"  # llama.cpp's guard for the first layers' ffn_down
        elif name.endswith("attn_output.weight"):
            if f == "q2_k":
                new = "Q3_K"
            elif f == "q3_k_m":
                new = "Q4_K"
        if cols % block_size(new) != 0:  # rows not in whole blocks of this type
            new = FALLBACK.get(new, new)
            if cols % block_size(new) != 0:
                new = "F16"
        out[name] = new
    return out
