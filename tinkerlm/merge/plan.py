"""The merge plan: which output tensor comes from which input tensors, with which parameter values.

Tensors are grouped as mergekit groups them: the weights before the layers (embeddings), the layers, and the
weights after (final norm, output head). Each output slice contributes its layers in order, renumbered from 0;
layer `k` of a slice reads layer `layer_range[0] + k` of each source, at t = k / (layers - 1) for gradients (1 for
a one-layer slice). Embeddings come from the first slice's sources and the head from the last's, at t = 0.

Inputs are checked here, before anything is written: one architecture, the same tensors in every input layer,
layer ranges inside each model, equal shapes for every merged tensor (the first mismatch is named), and parameter
values that fit the method (a required one missing, densities outside [0, 1], linear weights summing to zero).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.formats import specs
from tinkerlm.merge.methods import REQUIRED, Method
from tinkerlm.merge.recipe import InputRef, OutputSlice, Recipe, resolve
from tinkerlm.merge.sources import Source

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^((?:.*\.)?(?:layers|h)\.)(\d+)\.(.+)$")
# Non-layer tensors named like these come before the layers (from the first slice); the rest come after.
_PRE_MARKERS = ("embed_tokens", "wte", "wpe", "embed")
_HEAD = "lm_head.weight"
_LAYER_KEYS = ("num_hidden_layers", "n_layer")
# Promotion order for the default output dtype (mergekit merges in the inputs' promoted dtype).
_PROMOTE = {"F16": 1, "BF16": 1, "F32": 2, "F64": 3}
_DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


@dataclass
class TensorTask:
    """One output tensor: merged from `inputs` [(source, tensor name)], base at index `base` (or None)."""

    name: str
    inputs: list[tuple[Source, str]]
    base: int | None
    shared: dict
    per_input: list[dict]
    shape: tuple[int, ...]
    dtype: str  # safetensors code of the output


@dataclass
class Layout:
    """A checkpoint's tensor names split into the layer stack and the rest."""

    prefix: str  # "model.layers."
    layers: dict[int, list[str]]  # layer index -> name suffixes in checkpoint order
    other: list[str]

    @property
    def n_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else 0


def layout(source: Source) -> Layout:
    prefix, layers, other = "", {}, []
    for name in source.names:
        m = _LAYER.match(name)
        if m is None:
            other.append(name)
            continue
        if prefix and m[1] != prefix:
            raise TinkerError(
                f"{source.label}: layer tensors under two prefixes ({prefix}, {m[1]}); not a decoder "
                "checkpoint tinkerlm can merge"
            )
        prefix = m[1]
        layers.setdefault(int(m[2]), []).append(m[3])
    n = max(layers) + 1 if layers else 0
    gap = next((i for i in range(n) if i not in layers), None)
    if gap is not None:
        raise TinkerError(f"{source.label}: has no tensors for layer {gap} of {n} (incomplete checkpoint?)")
    declared = next((source.config[k] for k in _LAYER_KEYS if k in source.config), n)
    if declared != n:
        raise TinkerError(f"{source.label}: config says {declared} layers, the weights have {n}")
    return Layout(prefix, layers, other)


def tied(config: dict) -> bool:
    """Whether the output head is the embedding (the model_type's default where config.json does not say)."""
    return bool(specs.with_defaults(config).get("tie_word_embeddings", False))


def _embedding(lay: Layout) -> str | None:
    return next((n for n in lay.other if "embed_tokens" in n or n.endswith("wte.weight")), None)


def plan(recipe: Recipe, sources: dict[str, Source], method: Method) -> tuple[list[TensorTask], dict]:
    """The output tensors in write order, and the output config.json.

    Raises:
        TinkerError: mismatched architectures, tensors, layer ranges or shapes; parameters that do not fit.
    """
    where = recipe.where
    ref_name = recipe.base_model or recipe.slices[0].sources[0].model
    reference = sources[ref_name]
    arch = reference.config.get("model_type")
    for s in sources.values():
        if s.config.get("model_type") != arch:
            raise TinkerError(
                f"{where}: architectures differ: {reference.label} is {arch}, {s.label} is "
                f"{s.config.get('model_type')}; merging needs models of one architecture"
            )
    layouts = {ref: layout(s) for ref, s in sources.items()}
    ref_layout = layouts[ref_name]

    # Fill `models:` layer ranges (whole models) and check every range against its model.
    for i, s in enumerate(recipe.slices):
        if recipe.from_models:
            counts = {src.model: layouts[src.model].n_layers for src in s.sources}
            if len(set(counts.values())) > 1:
                listing = ", ".join(f"{k} {v}" for k, v in counts.items())
                raise TinkerError(
                    f"{where}: models have different numbers of layers ({listing}); merge layer ranges "
                    "of equal length with slices:"
                )
            for src in s.sources:
                src.layer_range = (0, counts[src.model])
        for src in s.sources:
            n = layouts[src.model].n_layers
            if src.layer_range[1] > n:
                raise TinkerError(
                    f"{where}: slices[{i}]: layer_range {list(src.layer_range)} of {src.model} goes "
                    f"past its {n} layers (END is exclusive: at most {n})"
                )
        _check_inputs(recipe, method, s, i)

    n_out = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in recipe.slices)
    if n_out > limits.MAX_LAYERS:
        raise TinkerError(
            f"{where}: the slices stack {n_out:,} layers; at most {limits.MAX_LAYERS} (repeat fewer layers)"
        )

    out_tied = tied(reference.config)
    template = ref_layout.layers.get(0, [])
    other = [n for n in ref_layout.other if not (out_tied and n == _HEAD)]
    pre = [n for n in other if any(m in n for m in _PRE_MARKERS)]
    post = [n for n in other if n not in pre]
    for ref, lay in layouts.items():
        extra = [n for n in lay.other if n not in ref_layout.other and n != _HEAD]
        if extra:
            raise TinkerError(
                f"{where}: {sources[ref].label} has tensor {extra[0]}, which {reference.label} lacks; "
                "the models differ in architecture"
            )

    tasks: list[TensorTask] = []
    unused: set[str] = set()

    def add(out_name: str, s: OutputSlice, srcs: list[InputRef], names: list[str], t: float) -> None:
        inputs = []
        for src, name in zip(srcs, names):
            source = sources[src.model]
            if not source.has(name):
                alias = _embedding(layouts[src.model]) if name == _HEAD and tied(source.config) else None
                if alias is None:
                    raise TinkerError(
                        f"{where}: {source.label} has no tensor {name} (which {reference.label} has); "
                        "the models differ in architecture"
                    )
                name = alias
            inputs.append((source, name))
        shapes = [src.shape(n) for src, n in inputs]
        for (src, n), shape in zip(inputs, shapes):
            if shape != shapes[0]:
                raise TinkerError(
                    f"{where}: tensor {n} is {list(shapes[0])} in {inputs[0][0].label} but {list(shape)} "
                    f"in {src.label}; only models of the same size can be merged"
                )
        base_ref = recipe.base_of(s) if method.base == "required" else None
        base = next((j for j, src in enumerate(srcs) if src.model == base_ref), None)
        shared, per_input = _parameters(recipe, method, s, srcs, names, out_name, base, t, unused)
        tasks.append(
            TensorTask(
                out_name,
                inputs,
                base,
                shared,
                per_input,
                shapes[0],
                _out_dtype(recipe, [src.dtype(n) for src, n in inputs]),
            )
        )

    first, last = recipe.slices[0], recipe.slices[-1]
    for name in pre:
        add(name, first, first.sources, [name] * len(first.sources), 0.0)
    out_layer = 0
    for s in recipe.slices:
        length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        for k in range(length):
            t = k / (length - 1) if length > 1 else 1.0
            for src in s.sources:
                have = layouts[src.model].layers[src.layer_range[0] + k]
                if have != template and sorted(have) != sorted(template):
                    diff = sorted(set(have) ^ set(template))
                    raise TinkerError(
                        f"{where}: layer {src.layer_range[0] + k} of {sources[src.model].label} and "
                        f"layer 0 of {reference.label} differ in tensor {diff[0]}; the models differ "
                        "in architecture"
                    )
            for suffix in template:
                names = [f"{layouts[src.model].prefix}{src.layer_range[0] + k}.{suffix}" for src in s.sources]
                add(f"{ref_layout.prefix}{out_layer}.{suffix}", s, s.sources, names, t)
            out_layer += 1
    for name in post:
        add(name, last, last.sources, [name] * len(last.sources), 0.0)

    if unused:
        log.warning(
            "%s: parameter(s) %s are not used by %s and are ignored (as mergekit does)",
            where,
            ", ".join(sorted(unused)),
            method.name,
        )

    config = dict(reference.config)
    key = next((k for k in _LAYER_KEYS if k in config), "num_hidden_layers")
    config[key] = out_layer
    codes = {t.dtype for t in tasks}
    out = _DTYPE_NAMES[max(codes, key=lambda c: _PROMOTE.get(c, 0))] if codes else "float32"
    config["torch_dtype"] = config["dtype"] = out
    return tasks, config


_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def output_bytes(tasks: list[TensorTask]) -> int:
    """The size of the merged weights as written: the sum over output tensors of elements x bytes per element."""
    return sum(math.prod(t.shape) * _ITEMSIZE.get(t.dtype, 4) for t in tasks)


def _check_inputs(recipe: Recipe, method: Method, s: OutputSlice, i: int) -> None:
    where = recipe.where
    refs = [src.model for src in s.sources]
    what = "models" if recipe.from_models else f"slices[{i}].sources"
    base = recipe.base_of(s)
    if method.base == "required":
        if base is None:
            raise TinkerError(
                f"{where}: merge_method {method.name} needs base_model (the model {method.base_role}); "
                "add `base_model: NAME`"
            )
        if base not in refs:
            raise TinkerError(f"{where}: base_model {base} is not among {what} ({', '.join(refs)}); add it there")
    n = len(refs)
    if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
        if method.max_inputs == method.min_inputs:
            want = f"exactly {method.min_inputs}"
        elif method.max_inputs is not None:
            want = (
                f"at most {method.max_inputs}"
                if method.min_inputs <= 1
                else f"{method.min_inputs} to {method.max_inputs}"
            )
        else:
            want = f"at least {method.min_inputs}"
        hint = ""
        if method.inputs_hint:
            hint = f" ({method.inputs_hint})"
        elif recipe.from_models and recipe.base_model and method.base != "required":
            hint = f" (base_model {recipe.base_model} counts as an input, as in mergekit)"
        raise TinkerError(f"{where}: {method.name} takes {want} input(s){hint}, {what} has {n}")


def _parameters(
    recipe: Recipe,
    method: Method,
    s: OutputSlice,
    srcs: list[InputRef],
    names: list[str],
    out_name: str,
    base: int | None,
    t: float,
    unused: set[str],
) -> tuple[dict, list[dict]]:
    where = recipe.where
    known = {p.name for p in method.params}
    for scope in [recipe.parameters, s.parameters, *(src.parameters for src in srcs)]:
        unused.update(k for k in scope if k not in known)

    def value(p, scopes, tensor, who):
        v = resolve(p.name, scopes, tensor, t, p.kind, where)
        if v is None:
            if p.default is not REQUIRED:
                return p.default
            raise TinkerError(
                f"{where}: parameter {p.name} is missing for {who} (tensor {tensor}); set it under "
                f"that model's parameters or the top-level parameters"
            )
        if p.kind is float and not math.isfinite(v):
            raise TinkerError(f"{where}: parameter {p.name} is {v} for {who} (tensor {tensor}); give a finite number")
        if p.kind is float and not p.lo <= v <= p.hi:
            why = f"; it is {p.meaning}" if p.meaning else ""
            raise TinkerError(
                f"{where}: {p.name} {v:g} for {who} (tensor {tensor}) is outside [{p.lo:g}, {p.hi:g}]{why}"
            )
        return v

    shared = {
        p.name: value(p, [s.parameters, recipe.parameters], out_name, "the merge")
        for p in method.params
        if p.scope == "shared"
    }
    per_input = []
    for j, (src, name) in enumerate(zip(srcs, names)):
        scopes = [src.parameters, s.parameters, recipe.parameters]
        per_input.append(
            {
                p.name: value(p, scopes, name, src.model)
                for p in method.params
                if p.scope == "input" or (p.scope == "non_base" and j != base)
            }
        )
    problem = method.check(shared, per_input) if method.check else None
    if problem:
        raise TinkerError(f"{where}: tensor {out_name}: {problem}")
    return shared, per_input


def _out_dtype(recipe: Recipe, stored: list[str]) -> str:
    name = recipe.out_dtype or recipe.dtype
    if name:
        return _DTYPE_CODES[name]
    floats = {c for c in stored if c in _PROMOTE}
    if not floats:
        return stored[0]
    if len(floats) == 1:
        return floats.pop()
    if floats <= {"F16", "BF16"}:  # as torch.promote_types: neither holds the other
        return "F32"
    return max(floats, key=_PROMOTE.__getitem__)
