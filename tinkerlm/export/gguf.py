"""Write a model as a GGUF file of any file type (`f32` ... `q2_k`), with everything a loader needs and we know.

The file holds, besides the tensors:
- the architecture's metadata (`{arch}.*`, from the config through the spec's `gguf_metadata`),
- the tokenizer (`tokenizer.ggml.*`: model, pre-tokenizer, tokens, types, merges or scores, special ids, add-bos/eos)
  and the chat template,
- `general.name`, `general.license`, `general.file_type`, `general.quantization_version`,
- lineage: `general.base_model.count` and `general.base_model.{i}.name / .sha256 / .repo_url` naming the model it
  was written from, and `tinkerlm.lineage` (JSON: that parent with its own ancestry and relations), which
  `tinkerlm pull file.gguf` reads back into the new manifest's parents.

Tensors are written in llama.cpp's order, each in the type `tinkerlm.export.types.choose` gives it, one at a time
(peak memory: one fp32 tensor and its blocks). A tensor already stored in its target type (a GGUF source) is copied
block for block, never requantized; the others are encoded by `tinkerlm.quant.encode` (our C++ quantizers), weighted
by the importance matrix where one is given.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinkerlm.errors import TinkerError
from tinkerlm.export import types as types_mod
from tinkerlm.export.source import Source

QUANTIZATION_VERSION = 2  # ggml's block layouts since 2023 (general.quantization_version)


@dataclass
class TensorReport:
    name: str  # GGUF name
    shape: tuple[int, ...]
    source_type: str
    type: str
    bits_per_weight: float
    copied: bool  # blocks copied from the source file as they were
    error: float | None = None  # relative RMS error against the source (with --report)

    @property
    def lossless(self) -> bool:
        return self.copied or self.type == "F32" or self.error == 0.0


def lineage_metadata(source: Source, relation: str) -> dict:
    """`general.*` licence and lineage keys, and `tinkerlm.lineage`, naming `source` as the file's one parent."""

    meta: dict = {"general.name": source.ref}
    if source.license:
        meta["general.license"] = source.license
    parent: dict = {"name": source.ref, "relation": relation, "license": source.license, "sha256": source.digest}
    m = source.manifest
    if m is not None:
        parent["parents"] = m.parents
        if m.source.get("type") == "hf" and m.source.get("repo"):
            meta["general.base_model.0.repo_url"] = f"https://huggingface.co/{m.source['repo']}"
    meta["general.base_model.count"] = 1
    meta["general.base_model.0.name"] = source.ref
    meta["general.base_model.0.sha256"] = parent["sha256"]
    meta["tinkerlm.lineage"] = json.dumps({"parents": [parent]}, sort_keys=True)
    return meta


def plan(source: Source, ftype: types_mod.FileType, has_imatrix: bool = False) -> list[tuple[str, str, str, tuple]]:
    """(HF name, GGUF name, GGML type, shape) of every tensor to write, in file order.

    Raises:
        TinkerError: a tensor the GGUF format has no name for (an architecture the writer does not know).
    """
    spec, config = source.spec, source.config
    rows = []
    for hf_name in source.names:
        gguf_name = spec.gguf_name(hf_name)
        if gguf_name is None:
            raise TinkerError(
                f"{source.ref}: tensor {hf_name} has no GGUF name in the {spec.family} spec (the GGUF writer does "
                "not know this architecture's layout)"
            )
        rows.append((hf_name, gguf_name, tuple(source.shape(hf_name))))
    heads = config["num_attention_heads"] if "num_attention_heads" in config else config.get("n_head", 1)
    kv = config.get("num_key_value_heads") or heads
    chosen = types_mod.choose(
        [(g, s) for _, g, s in rows], ftype, spec.num_layers(config), max(1, heads // kv), has_imatrix
    )
    _check_mixture(source.ref, ftype, [(g, s, chosen[g]) for _, g, s in rows])
    return [(h, g, chosen[g], s) for h, g, s in rows]


def _check_mixture(ref: str, ftype: types_mod.FileType, rows: list[tuple[str, tuple, str]]) -> None:
    """Refuse a quantized type no tensor can take (rows not in whole blocks of 32); say when the file is mostly
    another type than its name (K-quants on rows that are not whole 256-value blocks), as llama.cpp only logs."""
    if ftype.default in types_mod.FLOAT:
        return
    weights = [(math.prod(s), t, s[-1]) for g, s, t in rows if types_mod.quantizable(g, s)]
    if weights and all(t == "F16" for _, t, _ in weights):
        cols = sorted({c for _, _, c in weights})
        raise TinkerError(
            f"--type {ftype.name}: {ref} cannot take it: its rows of {', '.join(map(str, cols))} values are not whole "
            "blocks of 32 (use --type f16 or f32)"
        )
    total = sum(n for n, _, _ in weights)
    share = sum(n for n, t, _ in weights if t == ftype.default) / max(total, 1)
    if share < 0.5:
        by_type: dict[str, int] = {}
        for n, t, _ in weights:
            by_type[t] = by_type.get(t, 0) + n
        mix = ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in sorted(by_type.items(), key=lambda kv: -kv[1]))
        print(
            f"note: {ftype.name} of {ref} is {100 * share:.0f}% {ftype.default} ({mix}): rows that are not whole "
            f"{types_mod.block_size(ftype.default)}-value blocks fall back to other types, as llama.cpp does "
            "(--report lists every tensor)",
            file=sys.stderr,
        )


def write(
    source: Source,
    out: Path,
    ftype: types_mod.FileType,
    *,
    imatrix=None,
    relation: str = "converted",
    report: bool = False,
    progress: bool = True,
) -> list[TensorReport]:
    """Write `source` as the GGUF file `out` (atomically) in file type `ftype`; returns what each tensor got.

    Args:
        imatrix: a `tinkerlm.export.imatrix.Imatrix` weighting the rounding of each quantized tensor.
        relation: the file's relation to the source in its lineage ("quantized", "converted").
        report: measure each tensor's relative error against the source (reads the written blocks back).

    Raises:
        TinkerError: an architecture or tensor the writer does not know, or kernels missing for a K-quant.
    """
    from tinkerlm.formats.gguf_write import TensorPlan, write_gguf
    from tinkerlm.quant.encode import bits_per_weight

    spec, config = source.spec, source.config
    metadata = {**spec.gguf_metadata(config)}
    metadata.update(source.tokenizer.gguf_metadata(vocab_size=config.get("vocab_size")))
    template = getattr(source.tokenizer, "chat_template", None)
    if template:
        metadata["tokenizer.chat_template"] = template
    metadata["general.file_type"] = ftype.code
    metadata["general.quantization_version"] = QUANTIZATION_VERSION
    metadata.update(lineage_metadata(source, relation))

    reports: list[TensorReport] = []
    tensors: list[TensorPlan] = []
    for hf_name, gguf_name, qtype, shape in plan(source, ftype, imatrix is not None):
        raw = source.raw(hf_name)
        copied = raw is not None and raw.type == qtype
        rep = TensorReport(gguf_name, shape, source.dtype(hf_name), qtype, bits_per_weight(qtype), copied)
        reports.append(rep)
        tensors.append(
            TensorPlan(gguf_name, qtype, shape, _producer(source, hf_name, gguf_name, qtype, rep, imatrix, report))
        )
    requantized = sorted({r.source_type for r in reports if _requantized(r)})
    if requantized:
        print(
            f"note: {source.ref} holds {'/'.join(requantized)} weights; quantizing them again adds a second rounding "
            "error (llama.cpp refuses without --allow-requantize): quantize from a full-precision source when you "
            "have one",
            file=sys.stderr,
        )
    for name, value in spec.gguf_extra_tensors(config).items():  # e.g. Llama 3.1's rope_freqs
        value = np.ascontiguousarray(value, dtype=np.float32)
        tensors.append(TensorPlan(name, "F32", tuple(value.shape), lambda v=value: v))
    write_gguf(out, metadata, tensors, progress=progress)
    return reports


def _requantized(r: TensorReport) -> bool:
    """A tensor stored in quantized blocks (Q*, IQ*, TQ*), written as other lossy blocks."""
    return not r.copied and r.type != "F32" and r.source_type.startswith(("Q", "IQ", "TQ"))


def _producer(source: Source, hf_name: str, gguf_name: str, qtype: str, rep: TensorReport, imatrix, report: bool):
    from tinkerlm.export.verify import tensor_error
    from tinkerlm.quant.encode import encode

    def produce() -> np.ndarray:
        if rep.copied:  # the file's own blocks, already in GGUF row order
            if report:
                rep.error = 0.0
            return np.asarray(source.raw(hf_name).data)
        w = source.tensor(hf_name)
        order = source.spec.row_order(hf_name, source.config, w.shape[0], to_gguf=True) if w.dim() else None
        if order is not None:
            w = w[torch.from_numpy(order)]
        w = (w.float() + source.spec.value_shift(hf_name)).contiguous()  # Gemma's norms are stored as 1 + w
        weights = imatrix.weights(gguf_name) if imatrix is not None and w.dim() == 2 else None
        if weights is not None and len(weights) != w.shape[-1]:
            raise TinkerError(
                f"imatrix: {gguf_name} has {len(weights)} columns, the tensor has {w.shape[-1]} (an importance "
                "matrix of another model?)"
            )
        data = encode(w.reshape(-1, w.shape[-1]), qtype, None if weights is None else torch.as_tensor(weights))
        source.release(hf_name)
        data = data.reshape(w.shape) if w.dim() == 1 else data  # norms and biases: F32, always (types.choose)
        if report:
            rep.error = tensor_error(w, _values(data, qtype).reshape(w.shape))
        return data

    return produce


def _values(data: np.ndarray, qtype: str) -> torch.Tensor:
    """The float32 values written `data` holds (the `gguf` package dequantizes blocks)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if qtype in ("F32", "F16"):
        return torch.from_numpy(np.asarray(data, dtype=np.float32))
    return torch.from_numpy(dequantize(np.asarray(data), GGMLQuantizationType[qtype]))


def format_report(reports: list[TensorReport]) -> str:
    """The per-tensor table of `--report`, and the file's overall bits per weight."""
    rows = [("tensor", "shape", "from", "type", "bpw", "rel. error")]
    for r in reports:
        err = "copied" if r.copied else ("-" if r.error is None else f"{r.error:.2e}")
        rows.append((r.name, "x".join(map(str, r.shape)), r.source_type, r.type, f"{r.bits_per_weight:.2f}", err))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    n = sum(math.prod(r.shape) for r in reports)
    bits = sum(math.prod(r.shape) * r.bits_per_weight for r in reports)
    lines.append(f"{len(reports)} tensors, {n:,} weights, {bits / max(n, 1):.3f} bits per weight")
    return "\n".join(lines)
