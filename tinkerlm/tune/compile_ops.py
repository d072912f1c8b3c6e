"""`torch.compile` through the C++ kernels: RMSNorm, RoPE and SwiGLU as `torch.library` custom ops.

The models call the compiled kernels (`tinkerlm.kernels.ops()`, a pybind module) inside autograd Functions
(`tinkerlm.models.base`). Dynamo cannot look inside a pybind function, so without this each call breaks the graph:
five breaks per layer, and the compiled model is a string of small graphs with the kernels run eagerly between them.

`register()` wraps each kernel as a custom op with a fake (shape-only) implementation, and tells dynamo to trace
the custom op wherever the pybind function is called (`torch.compiler.substitute_in_graph`). Eager code is
untouched: outside compilation the pybind functions run as before. The graph then holds the whole layer, the
kernels as opaque nodes in it, and inductor fuses what lies between them.
"""

from __future__ import annotations

import torch
from torch import Tensor

_registered = False


def register() -> bool:
    """Make the kernels traceable by dynamo (once per process); False where they are not built (then the models
    run their PyTorch formulas, which dynamo traces as they are)."""
    global _registered
    from tinkerlm.kernels import ops

    k = ops()
    if k is None:
        return False
    if _registered:
        return True

    @torch.library.custom_op("tinkerlm::rms_norm_fwd", mutates_args=())
    def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        y, r = k.rms_norm_fwd(x, weight, eps)
        return y, r

    @rms_norm_fwd.register_fake
    def _(x, weight, eps):
        return x.new_empty(x.shape), x.new_empty(x.numel() // x.shape[-1])  # y, 1/rms per row

    @torch.library.custom_op("tinkerlm::rms_norm_bwd", mutates_args=())
    def rms_norm_bwd(grad: Tensor, x: Tensor, weight: Tensor, r: Tensor) -> Tensor:
        return k.rms_norm_bwd(grad, x, weight, r)

    @rms_norm_bwd.register_fake
    def _(grad, x, weight, r):
        return x.new_empty(x.shape)

    @torch.library.custom_op("tinkerlm::rope_apply", mutates_args=())
    def rope_apply(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
        return k.rope_apply(x, cos, sin, inverse)

    @rope_apply.register_fake
    def _(x, cos, sin, inverse):
        return x.new_empty(x.shape)

    @torch.library.custom_op("tinkerlm::swiglu_fwd", mutates_args=())
    def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
        return k.swiglu_fwd(gate, up)

    @swiglu_fwd.register_fake
    def _(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.custom_op("tinkerlm::swiglu_bwd", mutates_args=())
    def swiglu_bwd(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        d_gate, d_up = k.swiglu_bwd(grad, gate, up)
        return d_gate, d_up

    @swiglu_bwd.register_fake
    def _(grad, gate, up):
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    # `ops()` is a cached build lookup; dynamo would trace the lookup itself (it reads /proc/cpuinfo): a constant.
    torch.compiler.substitute_in_graph(ops.__wrapped__)(lambda: k)
    # Where dynamo meets the pybind function it traces the custom op instead (the signatures are the same).
    for name, op in [
        ("rms_norm_fwd", torch.ops.tinkerlm.rms_norm_fwd),
        ("rms_norm_bwd", torch.ops.tinkerlm.rms_norm_bwd),
        ("rope_apply", torch.ops.tinkerlm.rope_apply),
        ("swiglu_fwd", torch.ops.tinkerlm.swiglu_fwd),
        ("swiglu_bwd", torch.ops.tinkerlm.swiglu_bwd),
    ]:
        torch.compiler.substitute_in_graph(getattr(k, name), skip_signature_check=True)(_traced(op))
    _registered = True
    return True


def _traced(op):
    def call(*args):
        return op(*args)

    return call
