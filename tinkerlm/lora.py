"""LoRA as a module swap: `apply_lora`, `fuse_lora`, `unwrap_lora`, and `load_adapter` onto a model.

`apply_lora(model, rank, alpha, ...)` wraps the chosen linear layers in `LoRALinear`: the frozen base layer (float
`nn.Linear` or quantized `QLinear`, QLoRA-style) plus a trainable low-rank update, y = base(x) + s * B(A(drop(x))),
with s = alpha / rank (alpha / sqrt(rank) with rsLoRA). A starts like nn.Linear's default init and B at zero, so
a fresh adapter leaves the model unchanged. `fuse_lora` folds s * B @ A into float weights and swaps the plain
layers back; `unwrap_lora` drops the adapters; `adapters_off` switches them off for a while (the reference model of preference
tuning is the base itself, without a second copy of its weights). `bf16_bases` holds the frozen linear weights in
bfloat16 for a run under bf16 autocast: the copy autocast would make at every product, made once in place of the
fp32 weights (the same numbers; the adapters stay fp32).

On disk an adapter is what `peft` writes (`tinkerlm.formats.peft`: the file format, `read_adapter`);
`save_adapter` and `load_adapter` here move a model's adapters to and from it.

References: Hu et al. 2021, "LoRA" (https://arxiv.org/abs/2106.09685); Dettmers et al. 2023, "QLoRA"
(https://arxiv.org/abs/2305.14314); Kalajdzievski 2023, "rsLoRA" (https://arxiv.org/abs/2312.03732).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tinkerlm.errors import TinkerError
from tinkerlm.formats import peft
from tinkerlm.formats.peft import ALL_LINEAR, DEFAULT_TARGETS, Adapter


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and peft's) default for A
        self.dropout = dropout
        self.enabled = True  # False inside `adapters_off`: the base layer alone (no dropout draw either)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        if torch.is_autocast_enabled("cpu") and (type(self.base) is nn.Linear or _is_qlinear(self.base)):
            return self._forward_bf16(x)
        y = self.base(x)
        h = self._down(x)  # (..., rank)
        if y.dtype != h.dtype:
            return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)
        # y + h @ (s B)^T in one GEMM call: scaling the small B instead of the (tokens, out) product saves a pass
        # over the output, and addmm adds into it, saving another.
        out = torch.addmm(
            y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), (self.lora_B * self.scaling).t()
        )
        return out.view(y.shape)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """A(drop(x)): (..., in) -> (..., rank)."""
        x = x.to(self.lora_A.dtype)
        if self.dropout > 0 and self.training and not torch.is_autocast_enabled("cpu"):
            return _DropoutLinear.apply(x, self.lora_A, self.dropout)
        if self.dropout > 0 and self.training:
            return F.linear(F.dropout(x, self.dropout, True), self.lora_A)
        return F.linear(x, self.lora_A)

    def _forward_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """Under bf16 autocast: the low-rank update first, then added inside the base's GEMM (fp32 accumulation),
        so the sum is rounded to bf16 once. Added to the base's bf16 output instead, an update smaller than half
        its rounding step (a young adapter's) would be rounded away: LoRA would barely train."""
        xb = x.to(torch.get_autocast_dtype("cpu"))  # autocast's cast of x, made once for both products
        h = self._down(x) if self.dropout > 0 and self.training else F.linear(xb, self.lora_A)  # (..., rank)
        d = F.linear(h, self.lora_B * self.scaling)  # (..., out), bf16: a low-rank product, recomputed when saved
        if _is_qlinear(self.base):  # QLoRA: the packed weight dequantized in the product, the update added there
            return self.base(x, add=d)
        out = torch.addmm(d.reshape(-1, self.out_features), xb.reshape(-1, self.in_features), self.base.weight.t())
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.base.bias is None else out + self.base.bias

    def delta(self) -> torch.Tensor:
        """s * B @ A, the (out, in) change to the base weight, in fp32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


class _DropoutLinear(torch.autograd.Function):
    """dropout(x) @ A^T keeping only x (which the base layer keeps anyway) and the 1-byte mask for the backward
    pass, not the dropped copy of x: it is rebuilt there, bit for bit (x * mask * 1/(1-p), as nn.Dropout)."""

    @staticmethod
    def forward(ctx, x, A, p):
        dropped, mask = torch.native_dropout(x, p, True)
        ctx.save_for_backward(x, A, mask)
        ctx.scale = 1.0 / (1.0 - p)
        return F.linear(dropped, A)

    @staticmethod
    def backward(ctx, grad):
        x, A, mask = ctx.saved_tensors
        gx = gA = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.native_dropout_backward(grad @ A, mask, ctx.scale)
        if ctx.needs_input_grad[1]:
            dropped = torch.ops.aten.native_dropout_backward(x, mask, ctx.scale)
            gA = grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])
        return gx, gA, None


def _is_qlinear(module: nn.Module) -> bool:
    from tinkerlm.quant.linear import QLinear

    return isinstance(module, QLinear)


def _is_linear(module: nn.Module) -> bool:
    from tinkerlm.quant.linear import QLinear

    return isinstance(module, (nn.Linear, QLinear))


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def target_names(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the linear modules LoRA wraps: those whose last name part (or full dotted suffix) is in
    `targets`, or every linear layer but the output head for "all-linear".

    Raises:
        TinkerError: a target that matches no linear layer (the message lists the names there are).
    """
    if isinstance(targets, str):
        targets = [targets]
    linear = [n for n, m in model.named_modules() if _is_linear(m) and not isinstance(m, LoRALinear)]
    linear = [n for n in linear if not n.endswith(".base")]
    if list(targets) == [ALL_LINEAR]:
        return [n for n in linear if n != "lm_head"]
    chosen = []
    for t in targets:
        hits = [n for n in linear if n == t or n.endswith("." + t)]
        if not hits:
            leaves = sorted({n.rpartition(".")[2] for n in linear})
            raise TinkerError(
                f"lora_targets: {t!r} matches no linear layer of this model (it has: "
                f"{', '.join(leaves)}; or use {ALL_LINEAR})"
            )
        chosen += hits
    return sorted(set(chosen), key=linear.index)


def apply_lora(model: nn.Module, config: LoRAConfig, seed: int | None = None) -> list[str]:
    """Freeze the model and wrap the target linear layers in `LoRALinear`; returns the wrapped module names."""
    from tinkerlm.quant import unfuse

    unfuse(model)  # fused q/k/v, gate/up and decode calls read the base weights directly: they would skip LoRA
    for p in model.parameters():
        p.requires_grad_(False)
    names = target_names(model, config.targets)
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for name in names:
            _swap(
                model,
                name,
                LoRALinear(model.get_submodule(name), config.rank, config.alpha, config.dropout, config.rslora),
            )
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    return names


def bf16_bases(model: nn.Module) -> int:
    """Hold the frozen float linear layers' weights and biases in bfloat16, for training under bf16 autocast; returns
    how many bytes that frees.

    Autocast runs every linear layer in bf16, casting its fp32 weight at each call (and, the weight being frozen, not
    caching the cast: a new copy per product, kept for the backward pass). Cast once here instead, autocast casts
    nothing, so the losses and gradients are the same bit for bit, with half the weight bytes and no copies. The
    output head (the trainer's fused head takes an fp32 one and casts it chunk by chunk), weights shared with
    another module (an embedding, which autocast does not cast) and trainable ones stay as they are; so do the
    adapters (fp32 masters). Outside autocast the cast layers want bf16 inputs.
    The frozen weights left in fp32 are copied off the checkpoint's memory map, if any: the cast read every page
    of it, and the map (all of a safetensors file) lives as long as one tensor in it does.
    """
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    freed = 0
    head = getattr(model, "lm_head", None)  # left to the trainer's output head, which casts it chunk by chunk
    for m in model.modules():
        if type(m) is not nn.Linear or m is head:
            continue
        params = [p for p in (m.weight, m.bias) if p is not None]
        if any(p.requires_grad or p.dtype != torch.float32 or uses[id(p)] > 1 for p in params):
            continue
        for name, p in (("weight", m.weight), ("bias", m.bias)):
            if p is not None:
                setattr(m, name, nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))
                freed += p.numel() * 2
    if freed:
        for p in model.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.detach().clone()  # the same Parameter (ties kept), in memory of its own
    return freed


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def fuse_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W += s * B @ A) and swap the plain layer back; returns how many.

    Quantized bases are dequantized first (a fused quantized weight would need requantizing: use `tinkerlm fuse`,
    which writes a float model).
    """
    from tinkerlm.quant.linear import QLinear
    from tinkerlm.quant.qops import dequantize

    fused = 0
    for name, m in lora_modules(model).items():
        base = m.base
        if isinstance(base, QLinear):
            plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
            plain.weight = nn.Parameter(dequantize(base.quantized).float(), requires_grad=False)
            if base.bias is not None:
                plain.bias = nn.Parameter(base.bias.detach().float(), requires_grad=False)
            base = plain
        with torch.no_grad():
            base.weight += m.delta().to(base.weight.dtype)
        _swap(model, name, base)
        fused += 1
    return fused


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within the block, every LoRALinear of `model` is its base layer alone: the model is the base model."""
    mods = list(lora_modules(model).values())
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def unwrap_lora(model: nn.Module) -> None:
    """Remove the adapters, putting the untouched base layers back."""
    for name, m in lora_modules(model).items():
        _swap(model, name, m.base)


# ---------------------------------------------------------------------------------------------------------------
# Adapters on disk: the model's side of `tinkerlm.formats.peft`


def peft_config(config: LoRAConfig, modules: list[str], base_model: str | None, fan_in_fan_out: bool = False) -> dict:
    """The `adapter_config.json` peft writes for this LoRA (target_modules as the leaf names wrapped)."""
    return peft.adapter_config(
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        rslora=config.rslora,
        modules=modules,
        base_model=base_model,
        fan_in_fan_out=fan_in_fan_out,
    )


def adapter_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each wrapped module's (A, B)."""
    return {name: (m.lora_A, m.lora_B) for name, m in lora_modules(model).items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike, config: dict, dtype: torch.dtype = torch.float32):
    """Write the model's adapters in peft's layout (`tinkerlm.formats.peft.save_adapter`) into `directory`."""
    peft.save_adapter(directory, config, adapter_weights(model), dtype)


def load_adapter(model: nn.Module, adapter: Adapter, source: str = "adapter") -> list[str]:
    """Wrap `model`'s layers with the adapter's weights (for running it unfused); returns the module names.

    Raises:
        TinkerError: the adapter names a module the model lacks, or shapes disagree (adapter for another base?).
    """
    from tinkerlm.quant import unfuse

    unfuse(model)  # as in apply_lora: the fused calls know only the base weights
    names = []
    for module, (a, b) in adapter.modules.items():
        try:
            base = model.get_submodule(module)
        except AttributeError:
            raise TinkerError(
                f"{source}: the adapter targets {module}, which this base model does not have "
                "(is it an adapter for another model?)"
            ) from None
        if not _is_linear(base):
            raise TinkerError(f"{source}: the adapter targets {module}, a {type(base).__name__}, not a linear layer")
        if a.shape != (adapter.rank, base.in_features) or b.shape != (base.out_features, adapter.rank):
            raise TinkerError(
                f"{source}: {module} has A {list(a.shape)} and B {list(b.shape)}, the base layer is "
                f"{base.out_features}x{base.in_features} at rank {adapter.rank} (adapter for another "
                "model?)"
            )
        wrapped = LoRALinear(base, adapter.rank, 1.0)
        wrapped.scaling = adapter.scaling
        with torch.no_grad():
            wrapped.lora_A.copy_(a)
            wrapped.lora_B.copy_(b)
        wrapped.requires_grad_(False)
        _swap(model, module, wrapped)
        names.append(module)
    return names
