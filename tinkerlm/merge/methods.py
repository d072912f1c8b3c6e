"""Merge methods: small functions registered by name, each merging one weight tensor across the inputs.

Every method receives the inputs' tensors for one weight (fresh fp32 copies of one shape, which it may overwrite,
so the merge holds little beyond them), the index of the base among them (or None), the shared parameters, each
input's own, and a random generator seeded for that tensor; it returns the merged tensor. Semantics follow
mergekit 0.1.5, so a recipe gives the same weights under both:

- linear: sum_i w_i x_i, divided by sum_i w_i when `normalize` (default true). Wortsman et al. 2022, "Model
  soups", https://arxiv.org/abs/2203.05482
- slerp: spherical interpolation from the base (t=0) to the other input (t=1), treating each whole tensor as one
  vector; nearly colinear pairs (|cos| > 0.9995) are interpolated linearly. Shoemake 1985.
- task_arithmetic: base + lambda * sum_i w_i (x_i - base). Ilharco et al. 2023, https://arxiv.org/abs/2212.04089
- ties: task vectors trimmed to the `density` fraction of largest magnitudes, a sign elected per element (the
  sign of the weighted sum), only agreeing entries summed, divided by the weights that contributed (`normalize`,
  default true). Yadav et al. 2023, https://arxiv.org/abs/2306.01708
- dare_linear / dare_ties: task vectors with entries dropped at random (kept with probability `density`) and,
  with `rescale` (default true), scaled back to their original L1 norm, as mergekit does (the paper's 1/density
  in expectation); then summed, or elected as in TIES. Yu et al. 2024, https://arxiv.org/abs/2311.03099
- passthrough: one input copied (optionally times `scale`), used with slices to stack layers (frankenmerges).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tinkerlm import limits

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A method parameter. scope: "shared" (one value per tensor), "input" (one per input) or "non_base" (one per
    input other than the base)."""

    name: str
    kind: type  # float or bool
    scope: str
    default: Any = REQUIRED
    # The range a float value must lie in (checked by the planner for every tensor, before anything is written):
    # by default a factor whose magnitude is bounded, since fp32 weights times 1e308 are only inf and nan.
    lo: float = -limits.MAX_MERGE_FACTOR
    hi: float = limits.MAX_MERGE_FACTOR
    meaning: str = ""  # what the value is, said when it is out of range


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    base: str = "ignored"  # "required": needs base_model among its inputs; "ignored": the base is an input like any
    min_inputs: int = 1
    max_inputs: int | None = None
    random: bool = False  # draws random numbers (DARE): seeded per tensor
    reference: str = ""
    base_role: str = "the task vectors are taken from"  # what base_model is to it, for a recipe that lacks one
    inputs_hint: str = ""  # said when a recipe gives the wrong number of inputs
    # check(shared, inputs) -> None, or why these parameter values cannot merge (checked before writing)
    check: Callable[[dict, list[dict]], str | None] | None = None


METHODS: dict[str, Method] = {}


def register(name: str, params: tuple[Param, ...], **kwargs) -> Callable:
    """Decorator: add `fn(tensors, base, shared, inputs, generator)` to METHODS under `name`."""

    def wrap(fn: Callable) -> Callable:
        assert name not in METHODS, name
        METHODS[name] = Method(name, fn, params, **kwargs)
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------------------------


def _weights_sum_to_zero(shared: dict, inputs: list[dict]) -> str | None:
    if shared["normalize"] and abs(sum(p["weight"] for p in inputs)) < 1e-12:
        return "the weights sum to 0, so normalize cannot divide by them; change the weights or set normalize: false"
    return None


@register(
    "linear",
    (Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
    check=_weights_sum_to_zero,
    reference="https://arxiv.org/abs/2203.05482",
)
def linear(
    tensors: list[torch.Tensor],
    base: int | None,
    shared: dict,
    inputs: list[dict],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    out = tensors[0].mul_(inputs[0]["weight"])
    for x, p in zip(tensors[1:], inputs[1:]):
        out.add_(x, alpha=p["weight"])
    if shared["normalize"]:
        out.div_(sum(p["weight"] for p in inputs))
    return out


@register(
    "slerp",
    (Param("t", float, "shared", lo=0.0, hi=1.0, meaning="the position from the base (0) to the other model (1)"),),
    base="required",
    min_inputs=2,
    max_inputs=2,
    base_role="interpolated from",
    inputs_hint="the base_model and one other",
    reference="https://en.wikipedia.org/wiki/Slerp",
)
def slerp_method(
    tensors: list[torch.Tensor],
    base: int | None,
    shared: dict,
    inputs: list[dict],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return slerp(shared["t"], tensors[base], tensors[1 - base], inplace=True)


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    inplace: bool = False,
) -> torch.Tensor:
    """Spherical interpolation between two tensors seen as flat vectors: `v0` at t=0, `v1` at t=1.

    The angle comes from the normalised vectors; the coefficients sin((1-t)θ)/sin θ and sin(tθ)/sin θ apply to the
    raw ones, so two tensors of equal norm give a result of that norm. Nearly colinear or opposite pairs (where
    sin θ vanishes) fall back to linear interpolation, and zero tensors count as unit norm. `inplace` writes the
    result over `v0`.
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    # The dot of the unit vectors, without materialising a / na and b / nb (weights stay far from fp32 overflow).
    dot = (torch.dot(a, b) / na / nb).clamp(-1, 1) if a.numel() else torch.zeros(())
    if dot.abs() > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        ca, cb = (torch.sin((1 - t) * theta) / sin_theta).item(), (torch.sin(t * theta) / sin_theta).item()
    out = v0.mul_(ca) if inplace else v0 * ca
    return out.add_(v1, alpha=cb)


# ---------------------------------------------------------------------------------------------------------------
# Task-vector methods: one function, configured per name as in mergekit's generalized task arithmetic. They work in
# place on the inputs (each merge gets fresh fp32 copies), so memory holds the inputs plus about two tensors.


_CHUNK = 1 << 20  # elements per step where a step's temporaries would otherwise be as large as the tensor


def keep_largest_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density * n)) entries of largest magnitude, zero the rest (in place). Equal
    magnitudes at the cut are kept lowest index first, so exactly k survive."""
    n = delta.numel()
    if density >= 1:
        return delta
    if density <= 0 or n == 0:
        return delta.zero_()
    k = max(1, int(density * n))
    if k >= n:
        return delta
    magnitude = delta.abs().reshape(-1)
    # The k-th largest magnitude, selected in place (numpy's introselect): no sorted copy of a large tensor.
    magnitude.numpy().partition(n - k)
    cut = magnitude[n - k].item()
    del magnitude
    keep = (delta > cut) | (delta < -cut)  # |delta| > cut without a float temporary
    short = k - int(torch.count_nonzero(keep))  # (keep.sum() would widen the mask to int64 first)
    flat, kept = delta.reshape(-1), keep.view(-1)
    for start in range(0, n, _CHUNK):  # bf16 inputs give many equal magnitudes: index them a chunk at a time
        if short <= 0:
            break
        part = flat[start : start + _CHUNK]
        ties = torch.nonzero((part == cut) | (part == -cut)).reshape(-1)[:short]
        kept[start + ties] = True
        short -= len(ties)
    return delta.masked_fill_(~keep, 0)  # (mul_ by a bool mask would make a float copy of it)


def drop_random_(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability `density`, zero the rest (in place). DARE's drop rate is 1 - density."""
    if density >= 1:
        return delta
    keep = torch.empty(delta.shape, dtype=torch.bool).bernoulli_(max(density, 0.0), generator=generator)
    return delta.masked_fill_(~keep, 0)


def _task_vector_method(consensus: bool, sparsify: str | None) -> Callable:
    def merge(
        tensors: list[torch.Tensor],
        base: int | None,
        shared: dict,
        inputs: list[dict],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        b = tensors[base]
        others = [(x, p) for i, (x, p) in enumerate(zip(tensors, inputs)) if i != base]
        if not others:
            return b
        deltas, weights = [], []
        for x, p in others:
            delta = x.sub_(b)  # the input becomes its task vector
            density = p["density"]
            pruned = sparsify is not None and (density < 1 if sparsify == "random" else 0 < density < 1)
            before = torch.linalg.vector_norm(delta, ord=1) if pruned and shared["rescale"] else None
            if sparsify == "magnitude":
                keep_largest_(delta, density)
            elif sparsify == "random":
                drop_random_(delta, density, generator)
            if before is not None:  # back to the task vector's L1 norm (mergekit's DARE rescaling)
                after = torch.linalg.vector_norm(delta, ord=1)
                if before >= 1e-7 and after >= 1e-7:
                    delta.mul_(before / after)
            deltas.append(delta.mul_(p["weight"]))
            weights.append(p["weight"])
        if consensus:
            return _elect_and_add(b, deltas, weights, shared["normalize"], shared["lambda"])
        mixed = deltas[0]
        for delta in deltas[1:]:
            mixed.add_(delta)
        if shared["normalize"]:
            total = sum(weights)
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
        if shared["lambda"] != 1:
            mixed.mul_(shared["lambda"])
        return mixed.add_(b)

    return merge


def _elect_and_add(
    b: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], normalize: bool, lam: float
) -> torch.Tensor:
    """TIES's merge of weighted task vectors, added into `b` in place: per entry, elect the sign of their sum,
    sum the entries that agree with it (zeros agree with neither), and divide by the weights of those entries."""
    b = b.contiguous()
    out = b.view(-1)  # a view: the sums land in b
    flat = [d.reshape(-1) for d in deltas]
    for start in range(0, out.numel(), _CHUNK):
        part = [d[start : start + _CHUNK] for d in flat]
        total = part[0].clone()
        for d in part[1:]:
            total.add_(d)
        positive = total >= 0
        mixed = torch.zeros_like(total)
        divisor = torch.zeros_like(total)
        for d, w in zip(part, weights):
            agree = torch.where(positive, d > 0, d < 0)
            mixed.add_(d * agree)
            divisor.add_(agree.to(divisor.dtype), alpha=w)
        if normalize:
            divisor[divisor == 0] = 1
            mixed.div_(divisor)
        if lam != 1:
            mixed.mul_(lam)
        out[start : start + _CHUNK].add_(mixed)
    return b


_TASK_PARAMS = (
    Param("weight", float, "non_base"),
    Param("density", float, "non_base", 1.0, lo=0.0, hi=1.0, meaning="the fraction of each task vector kept"),
    Param("lambda", float, "shared", 1.0),
    Param("int8_mask", bool, "shared", False),
)

for _name, _consensus, _sparsify, _normalize, _rescale, _ref in (
    ("task_arithmetic", False, None, False, False, "https://arxiv.org/abs/2212.04089"),
    ("ties", True, "magnitude", True, False, "https://arxiv.org/abs/2306.01708"),
    ("dare_linear", False, "random", False, True, "https://arxiv.org/abs/2311.03099"),
    ("dare_ties", True, "random", False, True, "https://arxiv.org/abs/2311.03099"),
):
    # int8_mask only saves memory in mergekit (the sign mask's dtype); it is accepted and changes nothing here.
    register(
        _name,
        _TASK_PARAMS + (Param("normalize", bool, "shared", _normalize), Param("rescale", bool, "shared", _rescale)),
        base="required",
        random=_sparsify == "random",
        reference=_ref,
    )(_task_vector_method(_consensus, _sparsify))


@register(
    "passthrough",
    (Param("scale", float, "input", None),),
    max_inputs=1,
    inputs_hint="one source per slice; stack models with several slices",
)
def passthrough(
    tensors: list[torch.Tensor],
    base: int | None,
    shared: dict,
    inputs: list[dict],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    scale = inputs[0]["scale"]
    return tensors[0] if scale is None else tensors[0].mul_(scale)


# Methods mergekit has that tinkerlm does not (yet): named in the error for an unknown method.
MERGEKIT_ONLY = (
    "model_stock",
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "sce",
    "nuslerp",
    "multislerp",
    "karcher",
    "nearswap",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
)
