"""Read a GGUF checkpoint: its metadata, an HF-style config, HF-named fp32 tensors and its tokenizer.

GGUF is llama.cpp's single-file format: a header (magic `GGUF`, version, counts), typed key/value metadata, tensor
infos (name, GGML shape `ne` listed fastest dimension first, type, offset) and aligned tensor data. The `gguf`
package parses it over a memory map and dequantizes every block type it knows; this module maps llama.cpp's
tensor and key names back to Hugging Face's, so a GGUF loads through the same model code as a safetensors
checkpoint.

References:
- GGUF spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
- llama.cpp's converter (tensor names, the q/k row permutation undone here):
  https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py
- llama.cpp's metadata key names: https://github.com/ggml-org/llama.cpp/blob/master/gguf-py/gguf/constants.py
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tinkerlm.errors import TinkerError

if TYPE_CHECKING:  # torch is imported where tensors are made, so reading metadata (the store) stays light
    import torch
    from gguf import ReaderTensor

    from tinkerlm.quant.qtensor import QTensor

    from tinkerlm.formats.tokenizer import Tokenizer

SUPPORTED_VERSIONS = (2, 3)

# general.architecture -> parameter naming family. llama.cpp stores Llama 2/3, Mistral and SmolLM as "llama".
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gpt2": "gpt2"}

# The transformers class of each model_type, for the `architectures` key of config.json (which transformers and
# mergekit read).
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}

# Types read as plain floats even when packing.
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}

# llama.cpp's converter interleaves the rotary halves of attn_q/attn_k rows for these architectures only.
ROPE_PERMUTED = {"llama", "mistral"}

# The one GGUF -> HF name table. "{i}" is the layer index; a name missing here is an unused tensor.
TENSOR_NAMES = {
    "llama": {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
        "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
        "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
        "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
        "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
        "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
        "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
        "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
        "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
        "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
        "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    },
    "gpt2": {
        "token_embd.weight": "transformer.wte.weight",
        "position_embd.weight": "transformer.wpe.weight",
        "output_norm.weight": "transformer.ln_f.weight",
        "output_norm.bias": "transformer.ln_f.bias",
        "output.weight": "lm_head.weight",
        "blk.{i}.attn_norm.weight": "transformer.h.{i}.ln_1.weight",
        "blk.{i}.attn_norm.bias": "transformer.h.{i}.ln_1.bias",
        "blk.{i}.attn_qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
        "blk.{i}.attn_qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
        "blk.{i}.attn_output.weight": "transformer.h.{i}.attn.c_proj.weight",
        "blk.{i}.attn_output.bias": "transformer.h.{i}.attn.c_proj.bias",
        "blk.{i}.ffn_norm.weight": "transformer.h.{i}.ln_2.weight",
        "blk.{i}.ffn_norm.bias": "transformer.h.{i}.ln_2.bias",
        "blk.{i}.ffn_up.weight": "transformer.h.{i}.mlp.c_fc.weight",
        "blk.{i}.ffn_up.bias": "transformer.h.{i}.mlp.c_fc.bias",
        "blk.{i}.ffn_down.weight": "transformer.h.{i}.mlp.c_proj.weight",
        "blk.{i}.ffn_down.bias": "transformer.h.{i}.mlp.c_proj.bias",
    },
}

# Tensors every file of a family must have (GGUF names); the rest are optional (biases, qk-norm, untied output).
REQUIRED = {
    "llama": (
        "token_embd.weight", "output_norm.weight", "blk.{i}.attn_norm.weight", "blk.{i}.attn_q.weight",
        "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight", "blk.{i}.attn_output.weight", "blk.{i}.ffn_norm.weight",
        "blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight", "blk.{i}.ffn_down.weight",
    ),
    "gpt2": (
        "token_embd.weight", "position_embd.weight", "output_norm.weight", "blk.{i}.attn_norm.weight",
        "blk.{i}.attn_qkv.weight", "blk.{i}.attn_output.weight", "blk.{i}.ffn_norm.weight",
        "blk.{i}.ffn_up.weight", "blk.{i}.ffn_down.weight",
    ),
}

# Consumed into the config (`rope_freq_factors`), not a parameter.
ROPE_FREQS = "rope_freqs.weight"

_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a GGUF file, memory-mapped; tensors are read and dequantized only by `state_dict()`.

    Raises:
        TinkerError: the file is missing, is not GGUF, has an unsupported version, or is truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise TinkerError(f"{path}: no such file (check the path, or pull the model first)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 4 or head[:4] != b"GGUF":
        raise TinkerError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF'; pass a .gguf file)")
    if len(head) < 8:
        raise TinkerError(f"{path}: file ends inside the GGUF header (file truncated? download it again)")
    (version,) = struct.unpack("<I", head[4:8])
    if version & 0xFFFF == 0:  # a big-endian file read little-endian
        raise TinkerError(f"{path}: big-endian GGUF files are not supported (convert it on a little-endian machine)")
    if version not in SUPPORTED_VERSIONS:
        raise TinkerError(
            f"{path}: GGUF version {version} is not supported (only versions 2 and 3; re-convert the model "
            "with a current llama.cpp)"
        )

    try:
        reader = _Header(path)
    except Exception as exc:  # struct.error, IndexError, UnicodeDecodeError... on cut or corrupt files
        reason = " ".join(str(exc).split())[:200]
        raise TinkerError(
            f"{path}: cannot parse the GGUF header ({type(exc).__name__}: {reason}) (file truncated or corrupt? "
            "download it again)"
        ) from exc
    for t in reader.tensors:
        end = t.data_offset + int(t.n_bytes)
        if end > size:
            raise TinkerError(
                f"{path}: tensor {t.name} ends at byte {end}, but the file has {size} bytes "
                "(file truncated? download it again)"
            )
    return GGUFCheckpoint(path, reader)


class GGUFCheckpoint:
    """A parsed GGUF file. `metadata` holds plain Python values; tensors stay memory-mapped until asked for."""

    def __init__(self, path: Path, reader: "_Header"):
        self.path = path
        self._reader = reader
        self._tensors: dict[str, ReaderTensor] = {t.name: t for t in reader.tensors}
        self.metadata: dict[str, Any] = reader.metadata

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if arch is None:
            raise TinkerError(f"{self.path}: metadata key general.architecture is missing (not a model file?)")
        if arch not in ARCHITECTURES:
            raise TinkerError(
                f"{self.path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
            )
        return arch

    def tensor_infos(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape in torch order, GGML type name) of every tensor, from the header alone."""
        return [(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
                for t in self._tensors.values()]

    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each GGML type the file holds, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}."""
        return dict(Counter(t.tensor_type.name for t in self._tensors.values()))

    def config(self) -> dict:
        """An HF `config.json`-style dict (HF key names, `model_type`) from the metadata and tensor names.

        Raises:
            TinkerError: unknown architecture, a missing metadata key, or an unsupported RoPE scaling.
        """
        return dict(self._config)

    @cached_property
    def _config(self) -> dict:
        arch = self.architecture
        family = ARCHITECTURES[arch]
        config = self._gpt2_config() if family == "gpt2" else self._llama_config()
        config["bos_token_id"] = self.metadata.get("tokenizer.ggml.bos_token_id")
        config["eos_token_id"] = self.metadata.get("tokenizer.ggml.eos_token_id")
        if config["model_type"] in HF_CLASSES:
            config["architectures"] = [HF_CLASSES[config["model_type"]]]
        return config

    def _key(self, name: str, default: Any = ..., kind: type = int) -> Any:
        """`{arch}.{name}` from the metadata, required unless a default is given."""
        key = f"{self.metadata['general.architecture']}.{name}"
        value = self.metadata.get(key, default)
        if value is ...:
            raise TinkerError(f"{self.path}: metadata key {key} is missing (re-convert the model with llama.cpp)")
        if value is not None and not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise TinkerError(
                f"{self.path}: metadata key {key} is {value!r}, expected one {kind.__name__} "
                "(per-layer values are not supported)"
            )
        return value

    def _vocab_size(self) -> int:
        size = self._key("vocab_size", None)
        if size is None:
            tokens = self.metadata.get("tokenizer.ggml.tokens")
            if tokens is None:
                arch = self.metadata["general.architecture"]
                raise TinkerError(
                    f"{self.path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is in the metadata "
                    "(re-convert the model with llama.cpp)"
                )
            size = len(tokens)
        return size

    def _llama_config(self) -> dict:
        arch = self.metadata["general.architecture"]
        hidden = self._key("embedding_length")
        heads = self._key("attention.head_count")
        head_dim = self._key("attention.key_length", None) or hidden // heads
        value_dim = self._key("attention.value_length", None)
        if value_dim is not None and value_dim != head_dim:
            raise TinkerError(
                f"{self.path}: {arch}.attention.value_length {value_dim} differs from key_length {head_dim} "
                "(not supported)"
            )
        rope_dims = self._key("rope.dimension_count", None)
        if rope_dims is not None and rope_dims != head_dim:
            raise TinkerError(
                f"{self.path}: {arch}.rope.dimension_count {rope_dims} differs from the head size {head_dim} "
                "(partial rotary embeddings are not supported)"
            )
        config = {
            "model_type": arch,  # llama, mistral, qwen2 or qwen3: HF uses the same names
            "vocab_size": self._vocab_size(),
            "hidden_size": hidden,
            "intermediate_size": self._key("feed_forward_length"),
            "num_hidden_layers": self._key("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._key("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "rms_norm_eps": self._key("attention.layer_norm_rms_epsilon", kind=float),
            "rope_theta": float(self._key("rope.freq_base", 10000.0, kind=float)),
            "max_position_embeddings": self._key("context_length"),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "rope_scaling": self._rope_scaling(),
        }
        if ROPE_FREQS in self._tensors:
            # Llama 3.1 files store the llama3 rope scaling as per-frequency divisors of inv_freq.
            factors = self._dequantize(self._tensors[ROPE_FREQS])
            if tuple(factors.shape) != (head_dim // 2,):
                raise TinkerError(
                    f"{self.path}: tensor {ROPE_FREQS} has shape {tuple(factors.shape)}, expected ({head_dim // 2},) "
                    "from the head size (file inconsistent; re-convert it)"
                )
            config["rope_freq_factors"] = factors.tolist()
        return config

    def _rope_scaling(self) -> dict | None:
        arch = self.metadata["general.architecture"]
        kind = self._key("rope.scaling.type", None, kind=str)
        factor = self._key("rope.scaling.factor", None, kind=float)
        legacy = self._key("rope.scale_linear", None, kind=float)  # GGUF v2-era key
        if kind is None and legacy is not None and legacy != 1.0:
            kind, factor = "linear", legacy
        if kind is None or kind == "none":
            return None
        if kind == "linear":
            if factor is None:
                raise TinkerError(f"{self.path}: {arch}.rope.scaling.type is linear but rope.scaling.factor is missing")
            return {"rope_type": "linear", "factor": float(factor)}
        raise TinkerError(f"{self.path}: {arch}.rope.scaling.type {kind!r} is not supported (supported: linear)")

    def _gpt2_config(self) -> dict:
        return {
            "model_type": "gpt2",
            "vocab_size": self._vocab_size(),
            "n_embd": self._key("embedding_length"),
            "n_layer": self._key("block_count"),
            "n_head": self._key("attention.head_count"),
            "n_positions": self._key("context_length"),
            "n_inner": self._key("feed_forward_length"),
            "layer_norm_epsilon": self._key("attention.layer_norm_epsilon", kind=float),
            "tie_word_embeddings": "output.weight" not in self._tensors,
        }

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF parameter shapes (torch order) the config implies, per GGUF name template."""
        c = self._config
        if c["model_type"] == "gpt2":
            e, n, v, p = c["n_embd"], c["n_inner"], c["vocab_size"], c["n_positions"]
            return {
                "token_embd.weight": (v, e), "position_embd.weight": (p, e), "output.weight": (v, e),
                "output_norm.weight": (e,), "output_norm.bias": (e,),
                "blk.{i}.attn_norm.weight": (e,), "blk.{i}.attn_norm.bias": (e,),
                "blk.{i}.attn_qkv.weight": (3 * e, e), "blk.{i}.attn_qkv.bias": (3 * e,),
                "blk.{i}.attn_output.weight": (e, e), "blk.{i}.attn_output.bias": (e,),
                "blk.{i}.ffn_norm.weight": (e,), "blk.{i}.ffn_norm.bias": (e,),
                "blk.{i}.ffn_up.weight": (n, e), "blk.{i}.ffn_up.bias": (n,),
                "blk.{i}.ffn_down.weight": (e, n), "blk.{i}.ffn_down.bias": (e,),
            }
        h, i_, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
        q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
        return {
            "token_embd.weight": (v, h), "output.weight": (v, h), "output_norm.weight": (h,),
            "blk.{i}.attn_norm.weight": (h,), "blk.{i}.ffn_norm.weight": (h,),
            "blk.{i}.attn_q.weight": (q, h), "blk.{i}.attn_k.weight": (kv, h), "blk.{i}.attn_v.weight": (kv, h),
            "blk.{i}.attn_q.bias": (q,), "blk.{i}.attn_k.bias": (kv,), "blk.{i}.attn_v.bias": (kv,),
            "blk.{i}.attn_output.weight": (h, q), "blk.{i}.attn_output.bias": (h,),
            "blk.{i}.attn_q_norm.weight": (hd,), "blk.{i}.attn_k_norm.weight": (hd,),
            "blk.{i}.ffn_gate.weight": (i_, h), "blk.{i}.ffn_up.weight": (i_, h), "blk.{i}.ffn_down.weight": (h, i_),
        }

    @cached_property
    def _plan(self) -> dict[str, tuple[str, str]]:
        """GGUF name -> (HF name, GGUF name template), after checking names, layer indices and shapes."""
        config = self._config
        family = ARCHITECTURES[self.architecture]
        table = TENSOR_NAMES[family]
        n_layers = config["n_layer" if family == "gpt2" else "num_hidden_layers"]
        shapes = self._expected_shapes()
        plan, unused = {}, []
        for name, tensor in self._tensors.items():
            if name == ROPE_FREQS and family == "llama":
                continue
            match = _BLOCK.fullmatch(name)
            template, layer = (f"blk.{{i}}.{match[2]}", int(match[1])) if match else (name, None)
            if template not in table or (layer is not None and layer >= n_layers):
                unused.append(name)
                continue
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ne lists the fastest dim first
            expected = shapes.get(template)
            if expected is not None and shape != expected:
                raise TinkerError(
                    f"{self.path}: tensor {name} has shape {shape}, but the metadata implies {expected} "
                    "(file inconsistent; re-convert it)"
                )
            plan[name] = (table[template].format(i=layer), template)
        if unused:
            raise TinkerError(
                f"{self.path}: {len(unused)} tensor(s) not used by the {self.architecture} architecture: "
                f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''} (file from a different architecture?)"
            )
        required = [t.format(i=i) for t in REQUIRED[family] for i in (range(n_layers) if "{i}" in t else [0])]
        missing = [name for name in required if name not in plan]
        if missing:
            raise TinkerError(
                f"{self.path}: {len(missing)} tensor(s) missing: {', '.join(missing[:8])}"
                f"{' ...' if len(missing) > 8 else ''} (file incomplete; re-convert it)"
            )
        return plan

    def state_dict(self, packed: bool = False) -> dict[str, "torch.Tensor | QTensor"]:
        """Every parameter under its HF name, linear weights as (out_features, in_features).

        Args:
            packed: keep quantized 2-D weights quantized: `tinkerlm.quant.Packed` (repacked for the kernels, the
                file's pages released as each is done), or `QTensor` blocks where the kernels are unavailable;
                float tensors and 1-D ones are still returned as fp32 tensors. Default: everything dequantized.
        Raises:
            TinkerError: unused or missing tensors, a shape contradicting the metadata, or an unknown tensor type.
        """
        import torch

        from tinkerlm.quant import qops
        from tinkerlm.quant.qtensor import Packed

        config = self._config
        permuted = self.architecture in ROPE_PERMUTED
        out = {}
        for name, (hf_name, template) in self._plan.items():
            reader_tensor = self._tensors[name]
            if packed and reader_tensor.tensor_type.name not in FLOAT_TYPES and len(reader_tensor.shape) == 2:
                tensor = self._packed(reader_tensor)
            else:
                tensor = self._dequantize(reader_tensor)
            if permuted and template.startswith(("blk.{i}.attn_q.", "blk.{i}.attn_k.")):
                heads = config["num_attention_heads" if ".attn_q." in template else "num_key_value_heads"]
                if isinstance(tensor, torch.Tensor):
                    tensor = unpermute_rope(tensor, heads)
                else:  # a row permutation: packed rows move whole
                    tensor = tensor.rows(unpermute_rope(torch.arange(tensor.shape[0]), heads))
            if not isinstance(tensor, torch.Tensor):
                tensor = qops.pack(tensor)
                if isinstance(tensor, Packed):
                    self._reader.release(reader_tensor.data)
            out[hf_name] = tensor
        return out

    def _packed(self, tensor: ReaderTensor):
        from gguf.quants import dequantize

        from tinkerlm.quant.qtensor import fits, from_gguf

        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if not fits(shape):  # rows not in whole blocks of 32: keep it float
            return self._dequantize(tensor)
        raw = np.asarray(tensor.data).reshape(shape[0], -1)
        return from_gguf(raw, tensor.tensor_type.name, shape, lambda r: dequantize(r, tensor.tensor_type))

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor by its GGUF name, dequantized to fp32, in torch shape order (no renaming or permutation)."""
        if name not in self._tensors:
            raise TinkerError(f"{self.path}: no tensor named {name}")
        return self._dequantize(self._tensors[name])

    def _dequantize(self, tensor: ReaderTensor) -> torch.Tensor:
        import torch
        from gguf import GGMLQuantizationType as T
        from gguf.quants import dequantize

        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # torch order
        if tensor.tensor_type in (T.F64, T.I8, T.I16, T.I32, T.I64):
            array = np.asarray(tensor.data)
        else:
            try:
                array = dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError as exc:
                raise TinkerError(
                    f"{self.path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the installed "
                    "gguf package cannot dequantize (upgrade gguf, or use another quantization)"
                ) from exc
        if array.dtype != np.float32 or not array.flags.writeable:  # F32 comes back as a read-only view of the map
            array = array.astype(np.float32)
        return torch.from_numpy(array.reshape(shape))

    def tokenizer(self) -> Tokenizer:
        """The tokenizer described by the `tokenizer.ggml.*` metadata."""
        from tinkerlm.formats.tokenizer import Tokenizer

        return Tokenizer.from_gguf_metadata(self.metadata, self.path)


def unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: back from interleaved rotary pairs to HF's rotate-half layout.

    llama.cpp stores each head's rows as pairs (0, hd/2), (1, hd/2 + 1), ...; HF keeps the two halves apart.
    Works on weights (rows, in_features) and biases (rows,).
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)  # (n, 2, hd/2, ...)


# ---------------------------------------------------------------------------------------------------------------
# Header parsing. gguf.GGUFReader builds a numpy view per array element (minutes-scale work for a 49k-token
# vocabulary on a busy machine); this reads the same header with struct in one pass and maps the tensor data.

_U64 = struct.Struct("<Q")
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
          "I64": np.int64}


class _TensorInfo:
    __slots__ = ("name", "shape", "tensor_type", "data_offset", "n_bytes", "data")


class _Header:
    """Metadata (plain Python values) and tensor infos of a GGUF v2/v3 file, tensor data memory-mapped."""

    def __init__(self, path: Path):
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        # The header (vocabulary included) is parsed from a bytes copy of the file's start: slicing bytes is far
        # cheaper than slicing the map. A header longer than the first read is parsed again from the whole map.
        with open(path, "rb") as f:
            head = f.read(1 << 25)
        try:
            self._parse(head)
        except (struct.error, IndexError, ValueError):
            if len(head) == len(self._mm):
                raise
            self._parse(bytes(self._mm))

    def release(self, view: np.ndarray) -> None:
        """Drop the pages under `view` (a slice of the map) from this process's resident memory; touched again,
        they are read back from the file. Packing tensor by tensor and releasing each keeps the peak of a load at
        the packed copy plus one tensor, not the packed copy plus the whole file."""
        mm = getattr(self._mm, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = view.ctypes.data - self._mm.ctypes.data
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the view only
        hi = (start + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def _parse(self, buf: bytes) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self._buf, self._pos = buf, 8
        n_tensors, n_kv = self._unpack("<QQ")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            t = _TensorInfo()
            t.name = self._string()
            (n_dims,) = self._unpack("<I")
            t.shape = np.array(self._unpack(f"<{n_dims}Q"), dtype=np.int64)
            ttype, offset = self._unpack("<IQ")
            t.tensor_type = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            count = int(np.prod(t.shape))
            t.n_bytes = count // block * type_size
            infos.append((t, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = (self._pos + align - 1) // align * align
        size = len(self._mm)
        self.tensors = []
        for t, offset in infos:
            t.data_offset = start + offset
            if t.data_offset + t.n_bytes <= size:  # else read_gguf reports the truncation
                raw = self._mm[t.data_offset : t.data_offset + t.n_bytes]
                rows = tuple(int(d) for d in reversed(t.shape.tolist()))
                if t.tensor_type.name in _PLAIN:
                    t.data = raw.view(_PLAIN[t.tensor_type.name]).reshape(rows)
                else:  # blocks: one row of bytes per row of values
                    t.data = raw.reshape(*rows[:-1], -1) if len(rows) > 1 else raw
            self.tensors.append(t)

    def _unpack(self, fmt: str):
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        if self._pos + n > len(self._buf):
            raise ValueError("string runs past the end of the file")
        text = self._buf[self._pos : self._pos + n].decode("utf-8")
        self._pos += n
        return text

    def _strings(self, count: int) -> list[str]:
        """An array of strings (a vocabulary, merges): the hot loop of header parsing, kept tight."""
        buf, pos, unpack, out = self._buf, self._pos, _U64.unpack_from, [None] * count
        for i in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > len(buf):
                raise ValueError("string runs past the end of the file")
            out[i] = buf[pos : pos + n].decode("utf-8")
            pos += n
        self._pos = pos
        return out

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])[0]
        if vtype == 8:
            return self._string()
        if vtype != 9:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = self._unpack("<IQ")
        if etype in _NUMPY:
            dt = np.dtype(_NUMPY[etype])
            end = self._pos + count * dt.itemsize
            if end > len(self._buf):
                raise ValueError("array runs past the end of the file")
            arr = np.frombuffer(self._buf[self._pos : end], dtype=dt)
            self._pos = end
            return arr.tolist()
        if etype == 8:
            return self._strings(count)
        return [self._value(etype) for _ in range(count)]
