"""Architectures, chosen by the checkpoint's own `model_type`; `build` and `load_weights` are the entry points.

Which module and classes serve a `model_type`, and its config defaults, come from the architecture specs
(tinkerlm/formats/specs/). Each architecture module exports a config dataclass with `from_dict`, a `CausalLM`
subclass and, where its HF checkpoints need a layout change beyond the spec's Conv1D transposition,
`from_hf_state_dict`. Adding one: docs/adding-a-model.md.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from tinkerlm.errors import TinkerError
from tinkerlm.formats import specs


def _arch(config: dict, source: str):
    spec = specs.for_model_type(config.get("model_type"), source)
    module = importlib.import_module(f"tinkerlm.models.{spec.family}")
    cfg_name, model_name = spec.model
    return spec, module, getattr(module, cfg_name), getattr(module, model_name)


@contextlib.contextmanager
def _no_init():
    """Skip random initialisation: the weights are loaded next (and on the meta device the init functions pull in
    torch's compiler stack, a second of imports)."""
    classes = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)
    saved = [c.reset_parameters for c in classes]
    for c in classes:
        c.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for c, f in zip(classes, saved):
            c.reset_parameters = f


def build(config: dict, source: str = "model", device: str | torch.device = "meta"):
    """An uninitialised model for an HF-style config dict (parameters on `device`, meta by default); the spec's
    defaults for the config's model_type fill keys the config lacks."""
    spec, _, cfg_cls, model_cls = _arch(config, source)
    cfg = cfg_cls.from_dict(spec.with_defaults(config), source)
    with torch.device(device), _no_init():
        return model_cls(cfg, source)


def hf_layout(config: dict, state_dict: dict, source: str) -> dict:
    """An HF checkpoint's tensors in the model's layout: the module's own change (if it has one), then Conv1D weights
    (the spec's `conv1d`) transposed to nn.Linear's (out, in)."""
    spec, module, _, _ = _arch(config, source)
    convert = getattr(module, "from_hf_state_dict", None)
    state_dict = convert(state_dict) if convert else state_dict
    if spec.conv1d:
        state_dict = {k: (v.t() if spec.is_conv1d(k) else v) for k, v in state_dict.items()}
    return state_dict


def load_weights(
    model: torch.nn.Module,
    state_dict: dict,
    source: str,
    dtype: torch.dtype = torch.float32,
    provided: set[str] = frozenset(),
) -> None:
    """Assign `state_dict` to `model` with strict accounting; `provided` names are loaded elsewhere (quantized).

    Raises TinkerError listing tensors the checkpoint has that the model does not use, parameters the checkpoint
    leaves unset, or a tensor whose shape contradicts the config.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    expected = {n for n in params if not (tied and n == "lm_head.weight")}
    if tied:  # some tied checkpoints still store the head; it repeats the embedding and is not used
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    unused = sorted(set(state_dict) - expected)
    missing = sorted(expected - set(state_dict) - set(provided))
    if unused:
        raise TinkerError(f"{source}: checkpoint tensors not used by the model: {_few(unused)} (wrong architecture?)")
    if missing:
        raise TinkerError(f"{source}: checkpoint is missing tensors: {_few(missing)} (incomplete or wrong config?)")
    for name in expected & set(state_dict):
        want, got = tuple(params[name].shape), tuple(state_dict[name].shape)
        if want != got:
            raise TinkerError(
                f"{source}: tensor {name} has shape {list(got)}, config implies {list(want)} (config and weights disagree)"
            )
    model.load_state_dict({n: state_dict[n].to(dtype) for n in expected & set(state_dict)}, strict=False, assign=True)
    model.tie_weights()
    model.eval()
    model.requires_grad_(False)


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
