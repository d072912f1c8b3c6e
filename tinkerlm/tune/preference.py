"""Preference tuning for `tinkerlm finetune --method dpo|orpo|kto`: the data, the losses, the reference log-probs.

Data, one JSON object per line, rendered with the base's chat template (the answer as the assistant turn after the
prompt) and masked like SFT, so only the answer's tokens (and the end-of-turn marker the template writes) count:
- DPO, ORPO: `{"prompt": "..." | "messages": [...], "chosen": "...", "rejected": "..."}`;
- KTO: `{"prompt": "..." | "messages": [...], "completion": "...", "label": true | false}`.
A base without a chat template takes `prompt` as plain text followed by the answer and EOS.

Each sequence is scored by the sum of its answer tokens' log-probabilities, log pi(y|x), as TRL does. With the
reference's log-probs log pi_ref(y|x), r(y) = beta * (log pi(y|x) - log pi_ref(y|x)) is the implicit reward, and:
- DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290): -log sigmoid(r(y_w) - r(y_l)); with
  `label_smoothing` e, conservative DPO (cDPO, Mitchell 2023): -(1-e) log sigmoid(d) - e log sigmoid(-d);
- robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409), `dpo_loss: robust`:
  (-(1-e) log sigmoid(d) + e log sigmoid(-d)) / (1 - 2e);
- IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036): ((h_w - h_l) - 1/(2 beta))^2 on log-ratios averaged
  per answer token, as TRL normalises them;
- ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691), no reference: the chosen answers' NLL per token minus
  beta * mean log sigmoid(log odds(y_w) - log odds(y_l)), the odds taken of the per-token mean log-probability;
- KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306): 1 - sigmoid(beta (log-ratio - z)) for desirable
  answers, 1 - sigmoid(beta (z - log-ratio)) for undesirable ones, z = max(0, mean log-ratio of mismatched pairs
  in the batch), detached; `desirable_weight` and `undesirable_weight` scale the two kinds. Each prompt's mismatched answer is the previous line's (the first takes the last's), as
  TRL rotates completions; TRL does that within each batch-sized chunk of the file and then reads the file in order,
  here it is done once over the file, which is then shuffled, so a batch's mismatched answers are not exactly its
  own answers. On one batch the two are the same (the parity test).
The formulas match TRL 1.16's `DPOTrainer._compute_loss`, `KTOTrainer._compute_loss` and
`trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics`, which `tests/test_preference.py` runs side by side,
except where noted: TRL's ORPO takes its NLL over prompt and answer; here it is over the answer, as in SFT.

The reference of a LoRA run is the base itself with the adapters switched off (`lora.adapters_off`): no second
copy of the weights. For full fine-tuning, or another model named by `--ref`, the reference's log-probs are computed
once before training and cached under `$TINKERLM_HOME/reference/`, keyed by the sha256 of the data file, of the
reference model and of the rendering settings, so a change to either is a new key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinkerlm.errors import TinkerError
from tinkerlm.fileio import atomic_path
from tinkerlm.tune import data as data_mod
from tinkerlm.tune.data import DataStats, Example

PAIRED = ("dpo", "orpo")


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Prefs:
    """Sequences two per item: DPO/ORPO (chosen, rejected); KTO (the answer, another line's answer for the KL
    estimate)."""

    seqs: list[Example]
    labels: torch.Tensor | None  # KTO: (n,) bool, desirable or not
    lines: list[int]  # the file line of each item

    def __len__(self) -> int:
        return len(self.lines)


def _answer(obj: dict, key: str, where: str) -> str:
    """A string answer, or TRL's conversational form: a list holding one assistant message."""
    if key not in obj:
        raise TinkerError(f"{where}: missing field '{key}'")
    value = obj[key]
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], dict)
        and value[0].get("role") == "assistant"
    ):
        value = value[0].get("content")
    if not isinstance(value, str):
        raise TinkerError(f"{where}: '{key}' must be a string (the answer)")
    if not value.strip():
        raise TinkerError(f"{where}: '{key}' is empty")
    return value


def _prompt(obj: dict, where: str) -> str | list[dict]:
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise TinkerError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in data_mod.ROLES:
                raise TinkerError(f"{where}: messages[{i}] needs a role (system, user, assistant) and string content")
        if msgs[-1]["role"] == "assistant":
            raise TinkerError(f"{where}: 'messages' is the prompt and must not end with an assistant turn")
        return msgs
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise TinkerError(f"{where}: 'prompt' must be a string (or give 'messages')")
        return obj["prompt"]
    raise TinkerError(f"{where}: missing field 'prompt' (or 'messages')")


def render(tokenizer, prompt: str | list[dict], answer: str, where: str) -> Example:
    """The prompt and the answer as one sequence; loss on the answer (as the template writes the assistant turn)."""
    if tokenizer.chat_template:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return data_mod.chat_example(tokenizer, msgs + [{"role": "assistant", "content": answer}], where, True)
    if not isinstance(prompt, str):
        raise TinkerError(f"{where}: 'messages' needs a chat template, and the base has none; give 'prompt' text")
    return data_mod.plain_example(tokenizer, prompt, answer)


def load(path: str | Path, tokenizer, seq_len: int, method: str) -> tuple[Prefs, DataStats]:
    """Read and render a preference JSONL file, cutting sequences to `seq_len` tokens.

    Raises:
        TinkerError: `file:line: ...` for a missing field, an empty answer, identical chosen and rejected answers,
            a KTO line without a true/false label.
    """
    path = Path(path)
    stats = DataStats()
    rows = []  # (line, prompt, answers, label)
    for n, obj in data_mod.read_jsonl(path):
        where = f"{path}:{n}"
        prompt = _prompt(obj, where)
        if method in PAIRED:
            chosen, rejected = _answer(obj, "chosen", where), _answer(obj, "rejected", where)
            if chosen == rejected:
                raise TinkerError(f"{where}: 'chosen' and 'rejected' are the same answer; nothing to prefer")
            rows.append((n, prompt, (chosen, rejected), None))
        else:
            completion = _answer(obj, "completion", where)
            if not isinstance(obj.get("label"), bool):
                raise TinkerError(f"{where}: 'label' must be true (a desirable answer) or false (undesirable)")
            rows.append((n, prompt, (completion,), obj["label"]))

    def cut(ex: Example) -> Example:
        if len(ex.ids) <= seq_len:
            return ex
        stats.truncated += 1
        stats.cut_tokens += len(ex.ids) - seq_len
        return Example(ex.ids[:seq_len], ex.target[:seq_len])

    kept = []
    for n, prompt, answers, label in rows:
        seqs = [cut(render(tokenizer, prompt, a, f"{path}:{n}")) for a in answers]
        if not all(any(s.target[1:]) for s in seqs):
            stats.dropped += 1
            continue
        kept.append((n, prompt, answers, label, seqs))
    if len(kept) < 2:
        raise TinkerError(f"{path}: fewer than 2 usable examples ({stats.dropped} lost all answer tokens to --seq-len)")
    seqs: list[Example] = []
    for i, (n, prompt, _, _, own) in enumerate(kept):
        if method in PAIRED:
            seqs += own
        else:  # the previous line's answer to this prompt: a mismatched pair for the KL estimate
            other = kept[i - 1][2][0]
            seqs += [own[0], cut(render(tokenizer, prompt, other, f"{path}:{n}"))]
    for s in seqs[:: 1 if method in PAIRED else 2]:
        stats.tokens += len(s.ids)
        stats.target_tokens += sum(s.target[1:])
    stats.examples = len(kept)
    stats.formats = {"pairs" if method in PAIRED else "labelled answers": len(kept)}
    labels = None if method in PAIRED else torch.tensor([k[3] for k in kept], dtype=torch.bool)
    return Prefs(seqs, labels, [k[0] for k in kept]), stats


# ---------------------------------------------------------------------------------------------------------------
# Losses: per item, on summed log-probs (TRL's formulas; see the module docstring)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the (detached) chosen and rejected rewards beta * log-ratio.

    `chosen_tokens`/`rejected_tokens` (answer lengths) are needed by IPO, which averages the log-ratios per token.
    """
    chosen_lr, rejected_lr = chosen - ref_chosen, rejected - ref_rejected
    d = beta * (chosen_lr - rejected_lr)
    e = label_smoothing
    if kind == "sigmoid":
        losses = -F.logsigmoid(d) if e == 0 else -(1 - e) * F.logsigmoid(d) - e * F.logsigmoid(-d)
    elif kind == "robust":
        losses = (-(1 - e) * F.logsigmoid(d) + e * F.logsigmoid(-d)) / (1 - 2 * e)
    elif kind == "ipo":
        h = chosen_lr / chosen_tokens.clamp(min=1) - rejected_lr / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind}")
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -log 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_ratio(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """log sigmoid of the log odds ratio, per pair, from per-token mean log-probs."""
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    return F.logsigmoid(log_odds)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-answer (weighted) losses and (detached) rewards; `kl` is the batch's detached, clamped KL estimate."""
    lr = logps - ref_logps
    losses = torch.where(
        labels,
        desirable_weight * (1 - torch.sigmoid(beta * (lr - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - lr))),
    )
    return losses, beta * lr.detach()


# ---------------------------------------------------------------------------------------------------------------
# Log-probs of whole sequences


def pack_seqs(seqs: list[Example], seq_len: int, pad: int) -> tuple[data_mod.Rows, torch.Tensor]:
    """`seqs` packed, longest first, into rows as wide as the longest of them (per-document attention keeps them
    apart), and the index in `seqs` of each packed example: never more positions than padding each sequence to the
    longest, as TRL does, and fewer where short ones share a row. (Packing into `seq_len`-wide rows made one row
    holding two sequences set the width of every row.)"""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
    width = min(seq_len, max(len(s.ids) for s in seqs))
    return data_mod.pack([seqs[i] for i in order], width, pad), torch.tensor(order)


def seq_logps(
    model: nn.Module, seqs: list[Example], seq_len: int, pad: int, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer-token log-probs (fp32) and answer lengths of `seqs` (each at most `seq_len` tokens)."""
    from tinkerlm.tune import trainer

    rows, order = pack_seqs(seqs, seq_len, pad)
    lp = trainer.token_logps(model, *rows.batch(torch.arange(len(rows))), bf16)  # (N,), padding columns cut
    owner = order[rows.example[:, 1:][rows.target[:, 1:]]]  # (N,) sequence of each target token
    sums = torch.zeros(len(seqs), dtype=torch.float32).index_add(0, owner, lp)
    return sums, torch.bincount(owner, minlength=len(seqs))


@torch.no_grad()
def reference_logps(model: nn.Module, prefs: Prefs, seq_len: int, pad: int, batch_size: int, bf16: bool = False):
    """Summed log-probs of every sequence of `prefs` under `model`: (2n,)."""
    out = []
    for a in range(0, len(prefs.seqs), 2 * batch_size):
        out.append(seq_logps(model, prefs.seqs[a : a + 2 * batch_size], seq_len, pad, bf16)[0])
    return torch.cat(out)


def cache_key(data_sha256: str, ref_sha256: str, method: str, seq_len: int, template: str | None) -> str:
    """What the cached reference log-probs depend on: the data, the reference model and how the data is rendered."""
    template_sha = hashlib.sha256(template.encode()).hexdigest() if template else None
    key = [data_sha256, ref_sha256, method, seq_len, template_sha]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def cached_reference(key: str, n: int, compute) -> tuple[torch.Tensor, bool]:
    """The reference log-probs stored under `key`, or `compute()`'s, stored; returns them and whether cached."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from tinkerlm import store

    path = store.home() / "reference" / f"{key}.safetensors"
    if path.is_file():
        try:
            logps = load_file(str(path)).get("logps")
        except (OSError, SafetensorError):
            logps = None
        if logps is not None and tuple(logps.shape) == (n,) and logps.dtype == torch.float32:
            return logps, True
    logps = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"logps": logps.contiguous()}, str(tmp))
    return logps, False


# ---------------------------------------------------------------------------------------------------------------
# The objective the training loop runs (`tinkerlm.tune.trainer.TokenCE` is SFT's)


class Preference:
    """DPO, ORPO or KTO over some items of `prefs`; the loss is per item (pair or labelled answer)."""

    def __init__(
        self,
        prefs: Prefs,
        items: list[int],
        method: str,
        *,
        beta: float,
        seq_len: int,
        pad: int,
        dpo_loss: str = "sigmoid",
        label_smoothing: float = 0.0,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        ref: torch.Tensor | None = None,
    ):
        """`ref`: cached reference log-probs of all of `prefs`' sequences; None with DPO or KTO means the model
        with its LoRA adapters switched off."""
        self.prefs, self.items, self.method = prefs, list(items), method
        self.beta, self.seq_len, self.pad = beta, seq_len, pad
        self.dpo_loss, self.label_smoothing, self.ref = dpo_loss, label_smoothing, ref
        self.weights = (desirable_weight, undesirable_weight)
        self.metrics = ("chosen_reward", "rejected_reward", "accuracy") + (("kl",) if method == "kto" else ())

    def __len__(self) -> int:
        return len(self.items)

    def step_size(self, idx: torch.Tensor) -> int:
        return len(idx)

    def tokens(self, idx: torch.Tensor) -> int:
        return sum(len(self.prefs.seqs[2 * self.items[j] + k].ids) for j in idx.tolist() for k in (0, 1))

    def _reference(self, model: nn.Module, seqs: list[Example], where: list[int], bf16: bool) -> torch.Tensor:
        if self.ref is not None:
            return self.ref[where]
        from tinkerlm import lora

        with torch.no_grad(), lora.adapters_off(model):
            return seq_logps(model, seqs, self.seq_len, self.pad, bf16)[0]

    def batch(self, model: nn.Module, idx: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, dict]:
        """Summed loss of the items `idx` and their metrics as (sum, count)."""
        items = [self.items[j] for j in idx.tolist()]
        n, seqs = len(items), self.prefs.seqs
        if self.method in PAIRED:
            where = [2 * i for i in items] + [2 * i + 1 for i in items]  # chosen..., rejected...
            batch = [seqs[w] for w in where]
            logps, counts = seq_logps(model, batch, self.seq_len, self.pad, bf16)
            chosen, rejected = logps[:n], logps[n:]
            if self.method == "dpo":
                ref = self._reference(model, batch, where, bf16)
                losses, r_chosen, r_rejected = dpo_loss(
                    chosen, rejected, ref[:n], ref[n:], self.beta, self.dpo_loss, self.label_smoothing, *counts.split(n)
                )
                loss = losses.sum()
            else:
                nll = -chosen.sum() / counts[:n].sum()  # per answer token of the chosen answers, as SFT's
                mean_c, mean_r = chosen / counts[:n], rejected / counts[n:]
                loss = n * nll - self.beta * orpo_ratio(mean_c, mean_r).sum()
                r_chosen, r_rejected = self.beta * mean_c.detach(), self.beta * mean_r.detach()
            return loss, {
                "chosen_reward": (float(r_chosen.sum()), n),
                "rejected_reward": (float(r_rejected.sum()), n),
                "accuracy": (float((r_chosen > r_rejected).sum()), n),
            }
        where, kl_where = [2 * i for i in items], [2 * i + 1 for i in items]
        batch, kl_batch = [seqs[w] for w in where], [seqs[w] for w in kl_where]
        logps, _ = seq_logps(model, batch, self.seq_len, self.pad, bf16)
        with torch.no_grad():
            kl_logps, _ = seq_logps(model, kl_batch, self.seq_len, self.pad, bf16)
        ref = self._reference(model, batch, where, bf16)
        kl_ref = self._reference(model, kl_batch, kl_where, bf16)
        kl = (kl_logps - kl_ref).mean().detach().clamp(min=0)
        labels = self.prefs.labels[items]
        losses, rewards = kto_loss(logps, ref, labels, kl, self.beta, *self.weights)
        return losses.sum(), {
            "chosen_reward": (float(rewards[labels].sum()), int(labels.sum())),
            "rejected_reward": (float(rewards[~labels].sum()), int((~labels).sum())),
            "accuracy": (float(((rewards > 0) == labels).sum()), n),  # the reward's sign agrees with the label
            "kl": (float(kl), 1),
        }

    def summarise(self, sums: dict[str, list[float]]) -> dict[str, float | None]:
        """Means of the metrics; margin = mean chosen reward - mean rejected reward (TRL's rewards/margins)."""
        out = {k: (s / c if c else None) for k, (s, c) in sums.items()}
        if out.get("chosen_reward") is not None and out.get("rejected_reward") is not None:
            out["margin"] = out["chosen_reward"] - out["rejected_reward"]
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int, bf16: bool) -> dict[str, float | None]:
        """eval_loss (per item) and the eval_ metrics over all items; accuracy is the preference accuracy."""
        was = model.training
        model.eval()
        total, sums = 0.0, {k: [0.0, 0] for k in self.metrics}
        for a in range(0, len(self.items), batch_size):
            loss, metrics = self.batch(model, torch.arange(a, min(a + batch_size, len(self.items))), bf16)
            total += float(loss)
            for k, (v, c) in metrics.items():
                sums[k][0] += v
                sums[k][1] += c
        model.train(was)
        out = {"eval_loss": total / max(len(self.items), 1)}
        out.update({f"eval_{k}": v for k, v in self.summarise(sums).items()})
        return out


def prepare(recipe, model: nn.Module, tokenizer, *, adapter_ref: bool, ref_sha256: str, load_ref=None):
    """The training and evaluation objectives of a preference recipe, with their reference log-probs.

    Args:
        adapter_ref: the reference is `model` with its LoRA adapters off (nothing is precomputed).
        ref_sha256: identifies the reference model in the cache key.
        load_ref: returns the reference model when it is not `model` itself (`--ref`); called only on a cache miss.
    Returns:
        (train objective, eval objective, training data stats).
    """
    import sys

    from tinkerlm import store

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    files = [recipe.data] + ([recipe.eval_data] if recipe.eval_data else [])
    loaded = []
    for f in files:
        prefs, stats = load(f, tokenizer, recipe.seq_len, recipe.method)
        print(f"{'eval ' if loaded else ''}data: {stats.summary()}", file=sys.stderr)
        loaded.append((f, prefs, stats))
    refs = [None] * len(loaded)
    if recipe.method != "orpo" and not adapter_ref:
        ref_model = None
        for i, (f, prefs, _) in enumerate(loaded):
            key = cache_key(
                store.sha256_file(Path(f)), ref_sha256, recipe.method, recipe.seq_len, tokenizer.chat_template
            )

            def compute(prefs=prefs):
                nonlocal ref_model
                ref_model = ref_model or (load_ref() if load_ref else model)
                return reference_logps(ref_model, prefs, recipe.seq_len, pad, recipe.batch_size, recipe.bf16)

            refs[i], hit = cached_reference(key, len(prefs.seqs), compute)
            print(f"reference log-probs of {f}: {'cached' if hit else 'computed'} ({key[:12]})", file=sys.stderr)
    opts = dict(
        beta=recipe.beta,
        seq_len=recipe.seq_len,
        pad=pad,
        dpo_loss=recipe.dpo_loss,
        label_smoothing=recipe.label_smoothing,
        desirable_weight=recipe.desirable_weight,
        undesirable_weight=recipe.undesirable_weight,
    )
    prefs, stats = loaded[0][1], loaded[0][2]
    if recipe.eval_data:
        train_items, val = (
            list(range(len(prefs))),
            Preference(loaded[1][1], range(len(loaded[1][1])), recipe.method, ref=refs[1], **opts),
        )
    else:
        train_items, val_items = data_mod.split(list(range(len(prefs))), recipe.val_fraction, recipe.seed)
        val = Preference(prefs, val_items, recipe.method, ref=refs[0], **opts)
    train = Preference(prefs, train_items, recipe.method, ref=refs[0], **opts)
    what = "pairs" if recipe.method in PAIRED else "answers"
    ref = "none" if recipe.method == "orpo" else "the base, adapters off" if adapter_ref else recipe.ref or "the base"
    print(f"{recipe.method}: {len(train)} training {what}, {len(val)} held out; reference: {ref}", file=sys.stderr)
    return train, val, stats


# ---------------------------------------------------------------------------------------------------------------
# The plot beside loss.png


def plot_rewards(history: list[dict], path: Path, title: str) -> None:
    """Chosen and rejected rewards and their margin (left), preference accuracy (right), train and eval, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in history if r.get(key) not in (None, "")]
        return list(zip(*pts)) if pts else None

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for key, label in (("chosen_reward", "chosen"), ("rejected_reward", "rejected"), ("margin", "margin")):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            pts = series(prefix + key)
            if pts:
                left.plot(*pts, style, label=f"{prefix.rstrip('_') or 'train'} {label}", lw=1.2)
    for prefix, style in (("", "-"), ("eval_", "o--")):
        pts = series(prefix + "accuracy")
        if pts:
            right.plot(*pts, style, label=f"{prefix.rstrip('_') or 'train'} accuracy", lw=1.2)
    left.set_ylabel("reward (beta x log-ratio)")
    right.set_ylabel("preference accuracy")
    right.set_ylim(-0.05, 1.05)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
