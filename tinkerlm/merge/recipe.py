"""Merge recipes: mergekit's YAML, read and checked, and the per-tensor values of its parameters.

A recipe names a `merge_method`, its inputs (either `models:`, each with optional `parameters`, or `slices:` of
`sources` with a `layer_range` each), an optional `base_model`, top-level `parameters`, and `dtype` / `out_dtype`.
It is mergekit's format (https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md), so a mergekit
user's recipe runs unchanged; tinkerlm adds `random_seed` (mergekit's `--random-seed` flag) for DARE.

A parameter value is a scalar, a gradient (a list of numbers interpolated over the layers of a slice: the value
at fraction t of the way through is read off the list as if its entries were evenly spaced over [0, 1]), or a
list of `{filter, value}` conditions of which the first whose `filter` is a substring of the tensor name (or has
no filter, or "*") applies. Values are looked up from the most specific place to the least: the input's own
`parameters`, the slice's, then the top level; shared values (such as SLERP's `t`) skip the inputs' own.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinkerlm import limits
from tinkerlm.errors import TinkerError

log = logging.getLogger(__name__)

# Every top-level key mergekit's MergeConfiguration knows, plus tinkerlm's `random_seed`.
KEYS = (
    "merge_method",
    "models",
    "slices",
    "modules",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "random_seed",
)
DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


@dataclass
class InputRef:
    """One input of an output slice: a model reference as written ("name", "ORG/REPO" or "base+lora")."""

    model: str
    layer_range: tuple[int, int] | None  # None: all layers (the `models:` syntax), filled in by the planner
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputSlice:
    """A run of output layers, each merged from the same layer offset of every source."""

    sources: list[InputRef]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    method: str
    slices: list[OutputSlice]
    base_model: str | None
    parameters: dict[str, Any]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    chat_template: str | None
    random_seed: int | None
    raw: dict  # the recipe as read
    where: str  # the file (or "recipe") that errors name
    from_models: bool = False  # written with `models:` rather than `slices:`

    def models(self) -> list[str]:
        """Every model reference the recipe names, in order of first mention."""
        refs = [self.base_model] if self.base_model else []
        for s in self.slices:
            refs += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        return list(dict.fromkeys(refs))

    def base_of(self, s: OutputSlice) -> str | None:
        return s.base_model or self.base_model


def load(recipe: str | Path | dict) -> Recipe:
    """Read a recipe from a YAML file (or an already-parsed dict) and check its structure.

    Method-specific checks (parameters, input counts, base model) are `check`'s; model-specific ones (layer counts,
    shapes) the planner's.

    Raises:
        TinkerError: unreadable YAML, an unknown or misspelt key, a missing `merge_method`, both or neither of
            `models` and `slices`, malformed inputs, layer ranges or dtypes.
    """
    if isinstance(recipe, dict):
        raw, where = recipe, "recipe"
    else:
        from tinkerlm.formats import safe_yaml

        where = str(recipe)
        raw = safe_yaml.load(recipe)
    if not isinstance(raw, dict):
        raise TinkerError(
            f"{where}: a recipe is a YAML mapping with merge_method and models or slices, got {type(raw).__name__}"
        )
    for key in raw:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TinkerError(f"{where}: unknown key {key!r}; {hint}known keys: {', '.join(KEYS)}")

    method = raw.get("merge_method")
    if not isinstance(method, str) or not method:
        raise TinkerError(f"{where}: merge_method is missing; set it to one of the methods (e.g. merge_method: slerp)")
    if raw.get("modules"):
        raise TinkerError(f"{where}: modules: is not supported (it is for multi-module models); use models: or slices:")
    if bool(raw.get("models")) == bool(raw.get("slices")):
        raise TinkerError(f"{where}: give exactly one of models: (whole models) or slices: (layer ranges)")
    for key in ("tokenizer",):
        if raw.get(key) is not None:
            raise TinkerError(
                f"{where}: {key}: is not supported; the merged model keeps the base model's tokenizer "
                "(tokenizer_source: base), so every input must share it"
            )
    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source is not None and (not isinstance(tokenizer_source, str) or tokenizer_source == "union"):
        raise TinkerError(
            f"{where}: tokenizer_source: {tokenizer_source!r} is not supported; use base (the default) "
            "or one input model's name: inputs must share one vocabulary"
        )
    chat_template = raw.get("chat_template")
    if chat_template is not None and (not isinstance(chat_template, str) or "{" not in chat_template):
        raise TinkerError(
            f"{where}: chat_template: give the Jinja template itself (mergekit's named templates and "
            "'auto' are not supported); leave it out to keep the base model's"
        )
    seed = raw.get("random_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise TinkerError(f"{where}: random_seed must be an integer from 0 to 2**63 - 1, got {_short(seed)}")

    base = _model_ref(raw.get("base_model"), f"{where}: base_model", optional=True)
    parameters = _parameters(raw.get("parameters"), f"{where}: parameters")
    if raw.get("models"):
        models = raw["models"]
        if not isinstance(models, list):
            raise TinkerError(f"{where}: models must be a list of {{model: NAME, parameters: {{...}}}} entries")
        if len(models) > limits.MAX_MERGE_INPUTS:
            raise TinkerError(f"{where}: models lists {len(models)} models; at most {limits.MAX_MERGE_INPUTS} merge")
        sources = [_input(m, f"{where}: models[{i}]", layers=False) for i, m in enumerate(models)]
        if base and base not in [s.model for s in sources]:
            # As mergekit does: the base joins the inputs (task vectors are taken from it).
            sources.append(InputRef(base, None, {}))
        slices = [OutputSlice(sources)]
    else:
        items = raw["slices"]
        if not isinstance(items, list):
            raise TinkerError(f"{where}: slices must be a list of {{sources: [{{model, layer_range}}, ...]}} entries")
        if len(items) > limits.MAX_MERGE_SLICES:
            raise TinkerError(f"{where}: {len(items)} slices; at most {limits.MAX_MERGE_SLICES} (join adjacent ones)")
        slices = [_slice(s, f"{where}: slices[{i}]") for i, s in enumerate(items)]
    for i, s in enumerate(slices):
        refs = [src.model for src in s.sources]
        dup = next((r for r in refs if refs.count(r) > 1), None)
        if dup:
            what = "models" if raw.get("models") else f"slices[{i}].sources"
            raise TinkerError(f"{where}: {what} lists {dup!r} twice; each input appears once per slice")
    return Recipe(
        method=method,
        slices=slices,
        base_model=base,
        parameters=parameters,
        dtype=_dtype(raw.get("dtype"), f"{where}: dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), f"{where}: out_dtype"),
        tokenizer_source=tokenizer_source,
        chat_template=chat_template,
        random_seed=seed,
        raw=raw,
        where=where,
        from_models=bool(raw.get("models")),
    )


def _model_ref(value: Any, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, dict) and "model" in value:  # mergekit's long form {model: {path: ...}, lora: ...}
        raise TinkerError(f"{where}: write the model as a string: NAME, or BASE+LORA for an adapter")
    if not isinstance(value, str) or not value.strip() or len(value) > 1024:
        raise TinkerError(
            f"{where}: expected a model name (a store name such as smollm2, or BASE+LORA), got {_short(value)}"
        )
    return value.strip()


def _input(item: Any, where: str, layers: bool) -> InputRef:
    if isinstance(item, str) and not layers:
        return InputRef(_model_ref(item, where), None, {})
    if not isinstance(item, dict):
        raise TinkerError(f"{where}: expected a mapping with model:{' and layer_range:' if layers else ''}")
    allowed = ("model", "parameters", "layer_range") if layers else ("model", "parameters")
    for key in item:
        if key not in allowed:
            raise TinkerError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})")
    model = _model_ref(item.get("model"), f"{where}.model")
    layer_range = None
    if layers:
        lr = item.get("layer_range")
        if (
            not isinstance(lr, (list, tuple))
            or len(lr) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
        ):
            raise TinkerError(f"{where}.layer_range: expected [START, END] (integers, END exclusive), got {_short(lr)}")
        if not 0 <= lr[0] < lr[1]:
            raise TinkerError(f"{where}.layer_range: [{lr[0]}, {lr[1]}] is empty or negative; need 0 <= START < END")
        layer_range = (lr[0], lr[1])
    return InputRef(model, layer_range, _parameters(item.get("parameters"), f"{where}.parameters"))


def _slice(item: Any, where: str) -> OutputSlice:
    if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
        raise TinkerError(f"{where}: expected {{sources: [{{model: NAME, layer_range: [START, END]}}, ...]}}")
    for key in item:
        if key not in ("sources", "base_model", "parameters", "residual_weight"):
            raise TinkerError(f"{where}: unknown key {key!r} (allowed: sources, base_model, parameters)")
    if len(item["sources"]) > limits.MAX_MERGE_INPUTS:
        raise TinkerError(f"{where}: {len(item['sources'])} sources; at most {limits.MAX_MERGE_INPUTS} merge")
    residual = item.get("residual_weight")  # mergekit's key, accepted for compatibility and unused (as there)
    if residual is not None and (
        not isinstance(residual, (int, float)) or isinstance(residual, bool) or not math.isfinite(residual)
    ):
        raise TinkerError(f"{where}.residual_weight: expected a finite number, got {_short(residual)}")
    sources = [_input(s, f"{where}.sources[{j}]", layers=True) for j, s in enumerate(item["sources"])]
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) > 1:
        ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in sources)
        raise TinkerError(
            f"{where}: sources cover different numbers of layers ({ranges}); a slice merges layer by "
            "layer, so every layer_range must have the same length"
        )
    return OutputSlice(
        sources,
        _model_ref(item.get("base_model"), f"{where}.base_model", optional=True),
        _parameters(item.get("parameters"), f"{where}.parameters"),
    )


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TinkerError(f"{where}: {_short(value)} is not one of {', '.join(DTYPES)}")
    name = value.removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise TinkerError(f"{where}: {_short(value)} is not one of {', '.join(DTYPES)}")
    return name


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TinkerError(f"{where}: expected a mapping of parameter names to values, got {_short(value)}")
    for name, setting in value.items():
        _check_setting(setting, f"{where}.{name}")
    return dict(value)


def _short(value: Any) -> str:
    """repr(value) on one short line (a hostile recipe may hold megabytes, or a 4,000-digit integer, in a value)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def _check_setting(setting: Any, where: str) -> None:
    """A value is a scalar, a non-empty gradient of scalars, a {filter, value} condition, or a list of them."""
    if _is_scalar(setting):
        if isinstance(setting, str) and len(setting) > 256:
            raise TinkerError(f"{where}: expected a number or true/false, got a string of {len(setting):,} characters")
        return
    if isinstance(setting, list) and len(setting) > limits.MAX_LAYERS:
        # each entry is looked at for every tensor: a long list costs time, and no model has more layers
        raise TinkerError(
            f"{where}: a list of {len(setting):,} entries; a gradient or condition list has at most {limits.MAX_LAYERS}"
        )
    if isinstance(setting, dict):
        for key in setting:
            if key not in ("filter", "value"):
                raise TinkerError(f"{where}: a condition has keys filter and value, not {key!r}")
        if "value" not in setting:
            raise TinkerError(f"{where}: a condition needs a value: {{filter: self_attn, value: 0.5}}")
        if setting.get("filter") is not None and (
            not isinstance(setting["filter"], str) or len(setting["filter"]) > 1024
        ):
            raise TinkerError(
                f"{where}: filter must be a string (a part of tensor names), got {_short(setting['filter'])}"
            )
        inner = setting["value"]
        if isinstance(inner, list) and len(inner) > limits.MAX_LAYERS:
            raise TinkerError(f"{where}: a gradient of {len(inner):,} entries; at most {limits.MAX_LAYERS}")
        if not (_is_scalar(inner) or (isinstance(inner, list) and inner and all(_is_scalar(x) for x in inner))):
            raise TinkerError(f"{where}: a condition's value is a number or a list of numbers, got {_short(inner)}")
        return
    if isinstance(setting, list) and setting:
        if all(_is_scalar(x) for x in setting):
            return
        if all(isinstance(x, dict) for x in setting):
            for i, cond in enumerate(setting):
                _check_setting(cond, f"{where}[{i}]")
            return
    raise TinkerError(
        f"{where}: expected a number, a list of numbers (a gradient over layers) or a list of "
        f"{{filter, value}} conditions, got {_short(setting)}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Per-tensor values


def to_float(value: Any, where: str) -> float:
    """A number; numeric strings count (YAML 1.1 reads `1e-3` as a string)."""
    if isinstance(value, bool):
        raise TinkerError(f"{where}: expected a number, got {_short(value)}")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TinkerError(f"{where}: expected a number, got {_short(value)}") from None


def to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return value.lower() in ("true", "yes", "on")
    raise TinkerError(f"{where}: expected true or false, got {_short(value)}")


def evaluate(setting: Any, tensor_name: str, t: float, kind: type, where: str) -> Any:
    """The value of one setting for one tensor at position t (0..1) through its slice; None if no filter matches.

    `kind` is float or bool: numeric gradients interpolate linearly, others step.
    """
    convert = to_float if kind is float else to_bool
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return convert(setting, where)
    if all(_is_scalar(x) for x in setting):
        if kind is not float:
            return convert(setting[int(t * (len(setting) - 1))], where)
        values = [convert(x, where) for x in setting]
        pos = t * (len(values) - 1)
        lo = int(pos)
        hi = min(len(values) - 1, lo + 1)
        frac = pos - lo
        return (1 - frac) * values[lo] + frac * values[hi]
    for cond in setting:
        pattern = cond.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate(cond["value"], tensor_name, t, kind, where)
    return None


def resolve(name: str, scopes: list[dict[str, Any]], tensor_name: str, t: float, kind: type, where: str) -> Any:
    """The first value of parameter `name` that applies to `tensor_name`, from the most specific scope; None if
    no scope sets it (or none of its filters match)."""
    for scope in scopes:
        if name in scope:
            value = evaluate(scope[name], tensor_name, t, kind, f"{where}: parameter {name}")
            if value is not None:
                return value
    return None
