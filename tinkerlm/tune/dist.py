"""Training across processes: the process group under `torchrun`, data parallel (DDP) and fully sharded (FSDP2).

    torchrun --nproc-per-node 2 -m tinkerlm pretrain -c recipe.yaml --out NAME            # DDP (default)
    torchrun --nproc-per-node 2 -m tinkerlm finetune -c recipe.yaml --distributed fsdp   # FSDP2

`session()` initialises the process group when torchrun launched the process (WORLD_SIZE, RANK and LOCAL_RANK in
the environment) and none is initialised yet, and destroys it at exit; ranks other than 0 print nothing but errors.

Each step's rows are split between ranks (`tinkerlm.tune.trainer`: rows[rank::world]), so the ranks together see
the single-process run's rows. The strategies differ in where the weights live:
- `ddp`: every rank holds the whole model and optimizer; after the step's backward passes the gradients are summed
  across ranks in a few flat buckets (`all_reduce_grads`), what DistributedDataParallel with `no_sync` over the
  accumulation does, in one visible function.
- `fsdp`: `fully_shard` (FSDP2, Zhao et al. 2023, "PyTorch FSDP") each decoder layer, then the root (embeddings,
  final norm, head): parameters, gradients and AdamW's moments are DTensors sharded on dim 0, each rank holding
  1/world of them; a layer's weights are all-gathered for its forward and backward and its gradients
  reduce-scattered. Checkpoints gather full tensors (`full_state`), so they are the single-process format.

References: torch.distributed.fsdp.fully_shard; torchtitan (per-layer sharding, DTensor-aware gradient clipping).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch
from torch import nn

from tinkerlm.errors import TinkerError

BUCKET_ELEMENTS = 1 << 24  # gradient elements per all-reduce (64 MB of fp32): few calls, bounded extra memory


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> tuple[int, int]:
    if active():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def backend(device: str = "cpu") -> str:
    """gloo for CPU tensors, nccl for CUDA ones (the training loop runs on the CPU today)."""
    return "nccl" if device.startswith("cuda") else "gloo"


@contextlib.contextmanager
def session(device: str = "cpu"):
    """The process group of a torchrun launch for the duration of a run (a no-op otherwise, or when the caller
    initialised one already). On ranks other than 0, stdout and stderr are silenced; an error still reaches
    stderr, as the CLI prints it after this context exits."""
    if not launched() or active():
        yield
        return
    if not torch.distributed.is_available():
        raise TinkerError("torchrun: this PyTorch build has no torch.distributed; run a single process")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(backend(device))
    quiet = torch.distributed.get_rank() != 0
    out, err = sys.stdout, sys.stderr
    try:
        if quiet:
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (closed below)
        yield
    finally:
        if quiet:
            sys.stdout.close()
            sys.stdout, sys.stderr = out, err
        torch.distributed.destroy_process_group()


def threads_per_process(cores: int) -> int:
    """The default CPU threads of a process: the cores shared among the processes torchrun started on this node."""
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def rank0_first(fn):
    """`fn()` on rank 0 first (preparing files), then on the others once it succeeded (reading them); a failure
    on rank 0 raises on every rank instead of leaving the others waiting at a barrier."""
    r, world = rank_world()
    if world == 1:
        return fn()
    result, error = None, None
    if r == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, once the others know
            error = e
    ok = torch.tensor([0 if error is not None else 1])
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if error is not None:
        raise error
    if not ok.item():
        raise TinkerError("rank 0 failed (its error is above); every rank stops")
    return fn() if r else result


# ---------------------------------------------------------------------------------------------------------------
# DDP: gradients summed in flat buckets


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum every rank's gradients in place, a flat bucket of up to BUCKET_ELEMENTS at a time. A parameter with no
    gradient on this rank (no rows this step) contributes zeros, so every rank sends the same sizes."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[nn.Parameter] = []
    size = 0
    for p in params:
        bucket.append(p)
        size += p.numel()
        if size >= BUCKET_ELEMENTS:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(bucket: list[nn.Parameter]) -> None:
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in bucket:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        torch.distributed.all_reduce(flat)
        a = 0
        for p in group:
            p.grad.copy_(flat[a : a + p.numel()].view_as(p.grad))
            a += p.numel()


# ---------------------------------------------------------------------------------------------------------------
# FSDP2


def shard(model: nn.Module) -> None:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, head, and anything left): in place.

    FSDP averages gradients over the ranks (a sum is PREMUL_SUM, which gloo lacks), so the loop scales its losses
    by the number of ranks to get the sum it wants: the step's loss is already divided by the whole
    step's target tokens.
    Frozen parameters (a LoRA base) are sharded too: they are most of the memory, and FSDP2 gathers a layer's
    frozen and trainable weights together.

    Raises:
        TinkerError: a model with packed (quantized) weights, which FSDP cannot shard.
    """
    from torch.distributed.fsdp import fully_shard

    packed = next((n for n, b in model.named_buffers() if b.dtype in (torch.uint8, torch.int8)), None)
    packed = packed or next((n for n, p in model.named_parameters() if not p.is_floating_point()), None)
    if packed is not None:
        raise TinkerError(
            f"distributed: fsdp cannot shard the packed quantized base ({packed}); use distributed: ddp or an "
            "unquantized base (quant: fp32)"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TinkerError(f"distributed: fsdp needs a model with model.layers; {type(model).__name__} has none")
    for unit in [*layers, model]:
        fully_shard(unit)
    # The loop takes its outputs out of place (slices, a separate head), which is what this warning asks for.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it), or `t` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def like(full_tensor: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`full_tensor` laid out as `p`: this rank's shard of it when `p` is a DTensor (every rank calls it)."""
    if not is_dtensor(p):
        return full_tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full_tensor.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` that also holds for sharded gradients: the norm of DTensor gradients is reduced over the
    ranks (each holds a shard) before the coefficient is applied, as torchtitan does."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    sharded = [p for p in with_grad if is_dtensor(p.grad)]
    plain = [p for p in with_grad if not is_dtensor(p.grad)]
    norms = []
    if sharded:  # a DTensor norm is a partial sum over the shards: full_tensor() reduces it
        norms.append(full(torch.nn.utils.get_total_norm([p.grad for p in sharded], foreach=True)))
    if plain:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in plain], foreach=True))
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """`model.state_dict()` with every sharded tensor gathered whole, on rank 0 (a collective: every rank calls it,
    tensor by tensor, and only rank 0 keeps them); None on the other ranks and when nothing is sharded. A tensor
    under two names (a tied head) stays one tensor."""
    sd = model.state_dict()
    if not any(is_dtensor(t) for t in sd.values()):
        return None
    keep = rank_world()[0] == 0
    # state_dict() makes a DTensor per name; the parameters themselves show which names are one tensor.
    ident = {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}
    done: dict[int, torch.Tensor] = {}
    for k, t in sd.items():
        key = ident.get(k, id(t))
        if key not in done:
            whole = full(t.detach())
            done[key] = whole if keep else None
    return {k: done[ident.get(k, id(t))] for k, t in sd.items()} if keep else None


def gather_model(model: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """Put the whole tensors of `state` (`full_state_dict`) in place of `model`'s sharded parameters, for code that
    reads them as attributes (`lora.save_adapter`). For the end of a run: the model is then not trainable."""
    if state is None:
        return
    for prefix, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is not None and is_dtensor(p):
                key = f"{prefix}.{name}" if prefix else name
                module._parameters[name] = nn.Parameter(state[key], requires_grad=p.requires_grad)
