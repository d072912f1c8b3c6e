"""The training loop: AdamW, warmup + cosine, gradient accumulation and clipping, checkpoints, exact resume.

Written out by hand so every step is visible:

    for step in range(start, total):
        for micro-batch in accumulation batch:      # rows of this step, sharded by rank under torchrun
            loss = sum CE over target tokens / target tokens of the whole step
            loss.backward()
        sum grads across ranks (torchrun only), clip, lr = schedule(step), AdamW step

What a step sums is its objective's: SFT's token cross-entropy (`TokenCE` below) or a preference loss over pairs
(`tinkerlm.tune.preference.Preference`); both have the small interface `TokenCE`'s docstring describes.

The data order is a function of (seed, epoch), the schedule of the step, and dropout draws from torch's global
generator whose state is checkpointed, so a resumed run reproduces an uninterrupted one loss for loss.

Checkpoints (`RUN/checkpoints/step-NNNNNN/`) hold the trainable tensors, AdamW's moments and the RNG state as
safetensors (never pickle) and the counters as JSON; under FSDP the shards are gathered into full tensors first,
so a checkpoint is the same whatever the number of processes that wrote it or resume it. Each is written into a temporary directory and renamed into
place, so a kill during a save leaves the previous checkpoint whole; the newest two are kept.

The loss is computed only where it counts: the decoder returns hidden states and the output head runs on the
target positions alone, in chunks that are recomputed in the backward pass rather than kept.

The data is anything with `len()`, `seq_len`, `batch(idx)` -> (ids, segments, target) and `count_targets(idx)`:
fine-tuning's packed `Rows` (documents masked apart, loss on the target tokens), or pretraining's rows cut from
memory-mapped token shards (`tinkerlm.tune.shards.TokenRows`: plain causal rows, loss on every token).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinkerlm.errors import TinkerError
from tinkerlm.fileio import atomic_path, write_atomic
from tinkerlm.tune import dist, memory
from tinkerlm.tune.data import Rows

CKPT_PREFIX = "step-"
KEEP_CHECKPOINTS = 2
HEAD_CHUNK = 2048  # target rows per output-head chunk at most...
HEAD_LOGITS = 1 << 24  # ...and fewer for large vocabularies: (rows, vocab) fp32 logits of 64 MiB at most at once
SOFTMAX_TINY = torch.finfo(torch.float32).tiny  # the fused head's probabilities below this are recomputed
HISTORY_FIELDS = ("step", "epoch", "lr", "loss", "eval_loss", "tokens", "seconds", "tokens_per_s")


@dataclass
class TrainConfig:
    total_steps: int
    batch_size: int
    grad_accum: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    seed: int
    bf16: bool = False
    eval_every: int = 0
    save_every: int = 0
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's; pretraining usually takes (0.9, 0.95)


@dataclass
class State:
    step: int = 0
    tokens: int = 0  # tokens (incl. padding) processed
    seconds: float = 0.0  # training time, summed across resumes
    history: list[dict] = field(default_factory=list)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def steps_per_epoch(n_rows: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(n_rows / (batch_size * grad_accum))


def step_rows(step: int, n_rows: int, cfg: TrainConfig) -> torch.Tensor:
    """Row indices of global step `step`: a seeded permutation per epoch, cut into consecutive batches."""
    per_epoch = steps_per_epoch(n_rows, cfg.batch_size, cfg.grad_accum)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n_rows, generator=g)
    size = cfg.batch_size * cfg.grad_accum
    return order[i * size : (i + 1) * size]


def rank_rows(rows: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of a step's rows: every world-th row from `rank`, so the ranks together see each once."""
    return rows[rank::world]


def micro_batches(n_rows: int, batch_size: int, world: int) -> int:
    """Micro-batches every rank runs in a step of `n_rows`: the same count on all ranks (FSDP's collectives run
    in each forward and backward), enough for the rank with the most rows."""
    return math.ceil(math.ceil(n_rows / world) / batch_size)


def rank() -> int:
    return dist.rank_world()[0]


# ---------------------------------------------------------------------------------------------------------------
# Loss


def head_chunk(vocab: int) -> int:
    """Rows of hidden states taken through the output head at once: HEAD_CHUNK, or fewer so that the chunk's
    logits stay within HEAD_LOGITS (2,048 rows at a vocabulary of 8,192, 341 at 49,152). Large chunks run the
    head's products fastest; the bound keeps the logits of a 100k+ vocabulary from taking gigabytes."""
    return max(1, min(HEAD_CHUNK, HEAD_LOGITS // vocab)) if vocab > 0 else HEAD_CHUNK


def _head_ce(head: nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), labels, reduction="sum")


def _head_logps(head: nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(h).float(), labels, reduction="none")


def _over_targets(fn, model: nn.Module, ids, segments, target, bf16: bool) -> list[torch.Tensor]:
    """`fn(head, hidden, labels)` over the target positions of packed rows, chunk by chunk; the chunks are recomputed
    in the backward pass rather than kept. `segments` None: each row is one causal sequence; `target` None: every
    token after the first carries loss (pretraining)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = model(ids, segments=segments, head=False)  # (B, T, C)
        if target is None:
            hs = h[:, :-1].reshape(-1, h.shape[-1])  # (B * (T - 1), C)
            labels = ids[:, 1:].reshape(-1)
        else:
            want = target[:, 1:]  # token t + 1 is predicted at position t
            hs = h[:, :-1][want]  # (N, C)
            labels = ids[:, 1:][want]  # (N,)
        out = []
        n = head_chunk(getattr(model.lm_head, "out_features", 0))  # (a Linear, quantized or LoRA-wrapped)
        for a in range(0, hs.shape[0], n):
            chunk, lab = hs[a : a + n], labels[a : a + n]
            if torch.is_grad_enabled() and hs.requires_grad:
                from torch.utils.checkpoint import checkpoint

                out.append(checkpoint(fn, model.lm_head, chunk, lab, use_reentrant=False))
            else:
                out.append(fn(model.lm_head, chunk, lab))
    return out


def loss_sum(
    model: nn.Module,
    ids: torch.Tensor,
    segments: torch.Tensor | None,
    target: torch.Tensor | None,
    bf16: bool = False,
) -> torch.Tensor:
    """Summed cross-entropy over the target tokens of packed rows (B, T) (see `_over_targets` for None)."""
    if _fused_head_ok(model, bf16):
        return _fused_loss_sum(model, ids, segments, target, bf16)
    total = torch.zeros((), dtype=torch.float32)
    for part in _over_targets(_head_ce, model, ids, segments, target, bf16):
        total = total + part
    return total


def _fused_head_ok(model: nn.Module, bf16: bool) -> bool:
    """The fused head applies to a plain fp32 Linear head (its products in bf16 under `bf16`), in training, in one
    process (FSDP shards the weight)."""
    head = model.lm_head
    return (
        type(head) is nn.Linear
        and head.bias is None
        and head.weight.dtype == torch.float32
        and torch.is_grad_enabled()
        and not (torch.distributed.is_available() and torch.distributed.is_initialized())
    )


def _fused_loss_sum(model: nn.Module, ids, segments, target, bf16: bool = False) -> torch.Tensor:
    """`loss_sum` through `_FusedHeadCE`: the same value, no logits kept and no head recomputed."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = model(ids, segments=segments, head=False)  # (B, T, C)
    if target is None:
        hs, labels = h[:, :-1].reshape(-1, h.shape[-1]), ids[:, 1:].reshape(-1)  # (B * (T - 1), C)
    else:
        want = target[:, 1:]  # token t + 1 is predicted at position t
        hs, labels = h[:, :-1][want], ids[:, 1:][want]  # (N, C), (N,)
    return _FusedHeadCE.apply(hs, model.lm_head.weight, labels, torch.bfloat16 if bf16 else None)


class _FusedHeadCE(torch.autograd.Function):
    """Summed cross-entropy of `h @ weight.T` (fp32) against `labels`, its gradients computed chunk by chunk in the
    forward pass (the fused linear cross-entropy of Liger-Kernel, Hsu et al. 2024): at most `head_chunk` rows of
    logits exist at once, and the head costs three products per chunk instead of four (forward, its recomputation
    and two in the backward). The softmax is one fused pass of torch's kernel, row by row in cache (in place in
    fp32 logits), and each row's loss is -log of its target's probability; a row whose probability underflows
    (below fp32's smallest normal) takes log-sum-exp - target logit from its logits recomputed. The backward scales
    the stored gradients by the loss's.

    `dtype` bf16 (mixed precision) runs the three products as autocast runs a Linear: inputs and weight rounded to
    bf16, the logits and the softmax's gradient rounded to bf16 at the products; the softmax, the sums and the
    accumulation of the weight's gradient over chunks stay in fp32."""

    @staticmethod
    def forward(ctx, h, weight, labels, dtype=None):
        grad_h = torch.empty_like(h)
        grad_w = None
        total = torch.zeros((), dtype=torch.float32)
        n = head_chunk(weight.shape[0])
        w = weight if dtype is None else weight.to(dtype)
        for a in range(0, h.shape[0], n):
            x, y = h[a : a + n], labels[a : a + n]
            x = x if dtype is None else x.to(dtype)
            logits = x @ w.T  # (n, V), bf16 under `dtype` as autocast rounds them
            if dtype is None:
                g = torch.ops.aten._softmax.out(logits, -1, False, out=logits)  # in place (rows read, then written)
            else:
                g = torch.softmax(logits, -1, dtype=torch.float32)  # (n, V) fp32
                del logits  # its memory serves g's bf16 copy below
            p = g.gather(1, y[:, None])  # (n, 1)
            ce = -p.log()
            low = p[:, 0] < SOFTMAX_TINY
            if low.any():  # so small a probability has lost digits or become 0: log-sum-exp - target logit
                rows = low.nonzero()[:, 0]
                again = (x[rows] @ w.T).float()  # (r, V)
                ce[rows] = torch.logsumexp(again, -1, keepdim=True) - again.gather(1, y[rows, None])
            total += ce.sum()
            g[torch.arange(len(y)), y] -= 1.0  # d(sum CE)/d(logits) = softmax - one-hot
            g = g if dtype is None else g.to(dtype)
            grad_h[a : a + n] = g @ w
            if ctx.needs_input_grad[1]:
                if dtype is not None:
                    part = (g.T @ x).float()  # (V, C)
                    grad_w = part if grad_w is None else grad_w.add_(part)
                else:
                    grad_w = g.T @ x if grad_w is None else grad_w.addmm_(g.T, x)  # (V, C)
        if grad_w is None and ctx.needs_input_grad[1]:  # no rows
            grad_w = torch.zeros_like(weight)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, None if grad_w is None else grad_w * grad, None, None


def token_logps(
    model: nn.Module, ids: torch.Tensor, segments: torch.Tensor, target: torch.Tensor, bf16: bool = False
) -> torch.Tensor:
    """Log-probability (fp32) of each target token of packed rows (B, T), in row-major order: (N,)."""
    parts = _over_targets(_head_logps, model, ids, segments, target, bf16)
    return torch.cat(parts) if parts else torch.zeros(0)


class TokenCE:
    """SFT's and pretraining's objective: summed cross-entropy, per target token of the step, over rows that give
    `batch(items)` -> (ids, segments, target) and `count_targets(items)` (fine-tuning's packed `Rows`, pretraining's
    memory-mapped token rows).

    An objective is what the loop needs of the data: `len()` items to draw steps from, each step's normaliser
    (`step_size`), the summed loss of some items with its `metrics` as (sum, count) pairs (`batch`), and `evaluate`.
    """

    metrics: tuple[str, ...] = ()  # what `batch` reports besides the loss

    def __init__(self, rows: Rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def step_size(self, items: torch.Tensor) -> int:
        return self.rows.count_targets(items)

    def tokens(self, items: torch.Tensor) -> int:
        return len(items) * self.rows.seq_len

    def batch(self, model: nn.Module, items: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, dict]:
        return loss_sum(model, *self.rows.batch(items), bf16), {}

    def summarise(self, sums: dict[str, list[float]]) -> dict[str, float | None]:
        return {k: (s / c if c else None) for k, (s, c) in sums.items()}

    def evaluate(self, model: nn.Module, batch_size: int, bf16: bool) -> dict[str, float]:
        return {"eval_loss": evaluate(model, self.rows, batch_size, bf16)}


@torch.no_grad()
def evaluate(model: nn.Module, rows: Rows, batch_size: int, bf16: bool = False) -> float:
    """Mean cross-entropy per target token over all `rows` (see the module docstring for what rows may be)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for a in range(0, len(rows), batch_size):
        idx = torch.arange(a, min(a + batch_size, len(rows)))
        total += float(loss_sum(model, *rows.batch(idx), bf16))
        count += rows.count_targets(idx)
    model.train(was)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (directories are only complete once renamed to step-NNNNNN)."""
    d = run_dir / "checkpoints"
    done = sorted(p for p in d.glob(f"{CKPT_PREFIX}*") if p.is_dir() and p.name[len(CKPT_PREFIX) :].isdigit())
    return done[-1] if done else None


def save_checkpoint(
    run_dir: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, state: State, meta: dict
) -> Path | None:
    """Write a checkpoint (rank 0; the others only help gather sharded tensors and return None)."""
    from safetensors.torch import save_file

    keep = rank() == 0  # every rank takes part in gathering each sharded tensor; rank 0 keeps and writes them
    weights, moments = {}, {}
    for name, p in params.items():
        t = dist.full(p.detach())
        if keep:
            weights[name] = t.contiguous()
        s = opt.state.get(p)
        if s:
            for key in ("exp_avg", "exp_avg_sq"):
                t = dist.full(s[key])
                if keep:
                    moments[f"{name}.{key}"] = t.contiguous()
            moments[f"{name}.step"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
    if not keep:
        return None
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"{CKPT_PREFIX}{state.step:06d}"
    tmp = ckpts / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    moments["rng.torch"] = torch.get_rng_state()
    save_file(moments, str(tmp / "optimizer.safetensors"))
    # The data position is the step: the rows of step s are a function of (seed, s) alone (`step_rows`).
    info = {"step": state.step, "tokens": state.tokens, "seconds": state.seconds, "history": state.history, **meta}
    (tmp / "state.json").write_text(json.dumps(info, indent=1) + "\n")
    with open(tmp / "state.json", "rb") as f:
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(p for p in ckpts.glob(f"{CKPT_PREFIX}*") if p.is_dir())[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpts.glob(f".{CKPT_PREFIX}*.tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> tuple[State, dict]:
    """Restore parameters, AdamW moments and the RNG from a checkpoint; returns its State and metadata. Under
    torchrun every rank reads the (full) tensors and keeps its shard of each sharded parameter.

    Everything is checked before anything is restored (safetensors only, never pickle), so a truncated or foreign
    checkpoint is an error that names it, and the run's tensors are untouched.

    Raises:
        TinkerError: unreadable, truncated or mismatched checkpoint files.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def bad(what: str) -> TinkerError:
        return TinkerError(
            f"{path}: {what}; the checkpoint is damaged (a disk full or a kill while saving?): delete that "
            "directory to resume from the one before, or start afresh without --resume"
        )

    for name in ("state.json", "trainable.safetensors", "optimizer.safetensors"):
        if not (path / name).is_file():
            raise bad(f"{name} is missing")
    try:
        info = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(path / "trainable.safetensors"))
        moments = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError, RecursionError) as e:  # ValueError covers JSON and UTF-8 errors
        raise bad(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    counters = {"step": int, "tokens": int, "seconds": (int, float), "history": list}
    if (
        not isinstance(info, dict)
        or any(not isinstance(info.get(k), t) or isinstance(info.get(k), bool) for k, t in counters.items())
        or info["step"] < 0
        or not all(isinstance(r, dict) for r in info["history"])
    ):
        raise bad("state.json lacks step, tokens, seconds or history")
    missing = sorted(set(params) - set(weights))
    if missing:
        raise TinkerError(
            f"{path}: checkpoint lacks {missing[0]} (written by another recipe? start afresh without --resume)"
        )
    for name, p in params.items():
        if tuple(weights[name].shape) != tuple(p.shape):
            raise bad(f"{name} is {list(weights[name].shape)} in the checkpoint, the model's is {list(p.shape)}")
        if f"{name}.exp_avg" in moments:
            for key in (f"{name}.exp_avg", f"{name}.exp_avg_sq"):
                if tuple(moments[key].shape) != tuple(p.shape):
                    raise bad(f"{key} has shape {list(moments[key].shape)}, expected {list(p.shape)}")
            if moments.get(f"{name}.step") is None or moments[f"{name}.step"].numel() != 1:
                raise bad(f"{name}.step is missing")
    rng = moments.get("rng.torch")
    if rng is None or rng.dtype != torch.uint8 or tuple(rng.shape) != tuple(torch.get_rng_state().shape):
        raise bad("rng.torch is missing or not a random generator state")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(dist.like(weights[name], p))
    for name, p in params.items():
        if f"{name}.exp_avg" in moments:
            opt.state[p] = {
                "step": moments[f"{name}.step"].reshape(-1)[0].clone(),
                "exp_avg": dist.like(moments[f"{name}.exp_avg"].to(p.dtype), p),
                "exp_avg_sq": dist.like(moments[f"{name}.exp_avg_sq"].to(p.dtype), p),
            }
    try:
        torch.set_rng_state(rng)
    except RuntimeError as e:
        raise bad(f"rng.torch is not a valid generator state ({e})") from None
    state = State(step=info["step"], tokens=info["tokens"], seconds=info["seconds"], history=info["history"])
    return state, info


# ---------------------------------------------------------------------------------------------------------------
# History: CSV and plot


def history_csv(history: list[dict]) -> str:
    """HISTORY_FIELDS, then any other columns the objective logged (rewards, accuracy ...) in order of appearance."""
    fields = list(HISTORY_FIELDS)
    for row in history:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: row.get(k, "") for k in fields})
    return buf.getvalue()


def plot_history(history: list[dict], path: Path, title: str, throughput: bool = False) -> None:
    """Train and eval loss against step, as a PNG; `throughput` adds a panel of training tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if throughput:
        fig, (ax, tx) = plt.subplots(2, 1, figsize=(7, 6), dpi=110, sharex=True, height_ratios=(2, 1))
        speed = [(r["step"], r["tokens_per_s"]) for r in history if r.get("tokens_per_s") not in (None, "")]
        if speed:
            tx.plot(*zip(*speed), lw=1.0, color="tab:green")
        tx.set_xlabel("step")
        tx.set_ylabel("tokens/s")
        tx.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train = [(r["step"], r["loss"]) for r in history if r.get("loss") not in (None, "")]
    evals = [(r["step"], r["eval_loss"]) for r in history if r.get("eval_loss") not in (None, "")]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
    if not throughput:
        ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per target token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    train_data,
    val_data,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    meta: dict | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    desc: str = "fine-tune",
    distributed: str = "ddp",
) -> State:
    """Train `params` (the trainable tensors of `model`, by name) and return the final State.

    Args:
        train_data, val_data: packed `Rows` (SFT) or an objective (`TokenCE`, `tinkerlm.tune.preference`); no
            `val_data` (None) skips evaluation.
        run_dir: where checkpoints and `loss.csv` go.
        resume: continue from the newest checkpoint in `run_dir` (its `meta` must equal this run's).
        meta: what identifies the run (recipe, data hashes); stored in checkpoints and compared on resume.
        stop_after: end after this global step as if interrupted (for tests), without a final save.
        desc: the progress bar's label.
        distributed: under torchrun, `ddp` (gradients summed across ranks) or `fsdp` (the model sharded in place
            with `tinkerlm.tune.dist.shard`; `params` is updated in place to its DTensor parameters); see
            tinkerlm.tune.dist.
    """
    from tqdm.auto import tqdm

    meta = meta or {}
    train_obj = train_data if hasattr(train_data, "step_size") else TokenCE(train_data)  # rows, or an objective
    val_obj = val_data if val_data is None or hasattr(val_data, "step_size") else TokenCE(val_data)
    rank, world = dist.rank_world()
    fsdp = world > 1 and distributed == "fsdp"
    if fsdp:
        dist.shard(model)  # replaces the parameters with sharded ones, under the same names
        sharded = {n: p for n, p in model.named_parameters() if n in params}
        params.clear()  # in place: the caller's dict holds no full tensor any more, so their memory is freed
        params.update(sharded)
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused AdamW kernel (one pass per tensor, ~10x less CPU than foreach's) where the parameters are plain
    # tensors; FSDP's DTensor shards take the foreach path.
    fused = not any(dist.is_dtensor(p) for p in params.values())
    opt = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=1e-8, foreach=not fused, fused=fused
    )
    state = State()
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise TinkerError(f"{run_dir}: no checkpoint to resume from (run without --resume to start)")
        state, info = load_checkpoint(ckpt, params, opt)
        if info.get("identity") != meta.get("identity"):
            raise TinkerError(
                f"{ckpt}: was written by a different recipe or data; start afresh without --resume "
                "(or restore the original recipe)"
            )
    else:
        if rank == 0 and (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir / "checkpoints")
        torch.manual_seed(cfg.seed + 1)  # dropout's draws; a resumed run restores the generator instead

    per_epoch = steps_per_epoch(len(train_obj), cfg.batch_size, cfg.grad_accum)
    eval_every = cfg.eval_every or per_epoch
    model.train()
    bar = tqdm(
        total=cfg.total_steps,
        initial=state.step,
        desc=desc,
        unit="step",
        disable=not progress or rank,
        dynamic_ncols=True,
    )
    last_save = state.step
    memory.caching_allocator(True)  # until the end of training: see tinkerlm/tune/memory.py
    try:
        while state.step < cfg.total_steps:
            t0 = time.perf_counter()
            step = state.step
            rows = step_rows(step, len(train_obj), cfg)
            n_target = train_obj.step_size(rows)  # over the whole step, every rank
            total = 0.0
            sums = {k: [0.0, 0] for k in train_obj.metrics}  # the same keys on every rank, even one with no rows
            mine = rank_rows(rows, rank, world)
            n_micro = micro_batches(len(rows), cfg.batch_size, world) if fsdp else -(-len(mine) // cfg.batch_size)
            for i in range(n_micro):
                r = mine[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                if not len(r):  # FSDP: a rank short of rows runs one with no weight, to join the collectives
                    loss, _ = train_obj.batch(model, rows[:1], cfg.bf16)
                    (loss * 0.0).backward()
                    continue
                loss, metrics = train_obj.batch(model, r, cfg.bf16)
                (loss * (world if fsdp else 1) / max(n_target, 1)).backward()  # FSDP averages over ranks
                total += float(loss.detach())
                for k, (v, c) in metrics.items():
                    sums[k][0] += v
                    sums[k][1] += c
            if world > 1:  # every rank's share of the step's gradient (FSDP: reduce-scattered already), loss, metrics
                if not fsdp:
                    dist.all_reduce_grads(list(params.values()))
                summed = torch.tensor([total, *(x for v in sums.values() for x in v)], dtype=torch.float64)
                torch.distributed.all_reduce(summed)
                total = float(summed[0])
                sums = {k: [float(summed[1 + 2 * i]), float(summed[2 + 2 * i])] for i, k in enumerate(sums)}
            if cfg.max_grad_norm > 0:
                dist.clip_grad_norm(list(params.values()), cfg.max_grad_norm)
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)

            state.step += 1
            step_tokens = train_obj.tokens(rows)
            state.tokens += step_tokens
            dt = time.perf_counter() - t0
            state.seconds += dt
            row = {
                "step": state.step,
                "epoch": round(state.step / per_epoch, 4),
                "lr": lr,
                "loss": total / max(n_target, 1),
                "eval_loss": None,
                "tokens": state.tokens,
                "seconds": round(state.seconds, 3),
                "tokens_per_s": round(step_tokens / dt, 1),  # training only: evaluation is not timed
                **train_obj.summarise(sums),
            }
            if val_obj is not None and (state.step % eval_every == 0 or state.step == cfg.total_steps):
                row.update(val_obj.evaluate(model, cfg.batch_size, cfg.bf16))
            state.history.append(row)
            bar.update(1)
            bar.set_postfix(
                loss=f"{row['loss']:.3f}",
                tok_s=f"{step_tokens / dt:,.0f}",
                **({"eval": f"{row['eval_loss']:.3f}"} if row["eval_loss"] is not None else {}),
            )
            if stop_after is not None and state.step >= stop_after:
                return state
            if cfg.save_every and state.step % cfg.save_every == 0:
                save_checkpoint(run_dir, params, opt, state, meta)  # every rank: FSDP gathers the shards
                if rank == 0:
                    write_atomic(run_dir / "loss.csv", history_csv(state.history))
                last_save = state.step
    finally:
        bar.close()
        memory.caching_allocator(False)
    if last_save != state.step:
        save_checkpoint(run_dir, params, opt, state, meta)
    if rank == 0:
        write_atomic(run_dir / "loss.csv", history_csv(state.history))
    return state
