"""The fine-tuning recipe: one dataclass whose fields are the `tinkerlm finetune` flags.

A YAML recipe (`-c recipe.yaml`) uses the same names (`lora_rank: 16`, or `lora-rank: 16`); flags given on the
command line override it. The resolved recipe is saved beside the output as `recipe.yaml`.
This module imports no torch, so `tinkerlm finetune --help` stays fast.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tinkerlm import limits
from tinkerlm.errors import TinkerError
from tinkerlm.formats.peft import DEFAULT_TARGETS


@dataclass
class Recipe:
    base: str = ""  # store name, .gguf file or HF directory
    data: str = ""  # training JSONL
    out: str = ""  # store name for the result
    eval_data: str | None = None  # held-out JSONL; default: val_fraction of data
    data_license: str | None = None  # SPDX id of the training data's licence ("CC-BY-4.0"), for openness
    val_fraction: float = 0.05
    # method
    full: bool = False  # full fine-tuning instead of LoRA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False
    quant: str = "native"  # base weights for LoRA: native keeps a GGUF quantized (QLoRA), fp32/bf16 dequantize
    # objective (tinkerlm.tune.preference): sft, or preference tuning on pairs (dpo, orpo) or labelled answers (kto)
    method: str = "sft"
    beta: float = 0.1  # DPO/IPO/KTO: strength of the pull towards the reference; ORPO: weight of the odds-ratio term
    dpo_loss: str = "sigmoid"  # sigmoid (DPO), ipo, robust (rDPO)
    label_smoothing: float = 0.0  # sigmoid: conservative DPO (cDPO); robust: the assumed rate of flipped labels
    ref: str | None = None  # reference model (store name or path); default the base (LoRA: adapter switched off)
    desirable_weight: float = 1.0  # KTO: weight of desirable answers' losses (balance a skewed data set)
    undesirable_weight: float = 1.0  # KTO: weight of undesirable answers' losses
    # optimisation
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4  # packed rows per micro-batch
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = False  # bfloat16 autocast for matmuls
    grad_checkpointing: bool | None = None  # recompute activations; None: when they would be large (tune/memory.py)
    seed: int = 0
    # bookkeeping
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch and at the end
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    threads: int | None = None
    save_dtype: str = "float32"  # dtype of saved weights: float32 or bfloat16
    distributed: str = "ddp"  # under torchrun: ddp (replicas) or fsdp (sharded); docs/distributed.md

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Fields a resumed run may change without invalidating its checkpoint.
    RESUMABLE_CHANGES = ("max_steps", "epochs", "eval_every", "save_every", "threads", "data_license", "distributed")

    def check(self) -> None:
        """Raises TinkerError naming the first field of the wrong type or out of range (`tinkerlm.limits`)."""
        if not self.base:
            raise TinkerError("base: which model to fine-tune? (a store name such as smollm2, or a path)")
        if not self.data:
            raise TinkerError("data: a training JSONL file is required (--data train.jsonl)")
        if not self.out:
            raise TinkerError("out: a store name for the result is required (--out NAME)")
        for name in ("base", "data", "out", "eval_data", "data_license", "quant", "save_dtype", "method", "ref"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > 4096 or "\0" in value):
                raise TinkerError(f"{name}: must be a string (a name or path), got {_short(value)}")
        if self.data_license is not None and not _SPDX.fullmatch(self.data_license):
            raise TinkerError(
                f"data_license: must be an SPDX licence id or expression such as CC-BY-4.0 or "
                f"Apache-2.0 AND CC-BY-4.0, got {_short(self.data_license)}"
            )
        for name in ("full", "rslora", "bf16", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool) and not (
                name == "grad_checkpointing" and self.grad_checkpointing is None
            ):
                raise TinkerError(f"{name}: must be true or false, got {_short(getattr(self, name))}")
        ints = {  # name: (lowest, highest)
            "lora_rank": (1, limits.MAX_LORA_RANK),
            "batch_size": (1, limits.MAX_BATCH),
            "grad_accum": (1, limits.MAX_BATCH),
            "seq_len": (1, limits.MAX_CONTEXT),
            "warmup_steps": (0, limits.MAX_STEPS),
            "eval_every": (0, limits.MAX_STEPS),
            "save_every": (0, limits.MAX_STEPS),
            "max_steps": (1, limits.MAX_STEPS),
            "threads": (1, limits.MAX_THREADS),
            "seed": (0, 2**63 - 1),
        }
        for name, (lo, hi) in ints.items():
            value = getattr(self, name)
            if value is None and name in ("max_steps", "threads"):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise TinkerError(f"{name}: must be an integer, got {_short(value)}")
            if not lo <= value <= hi:
                raise TinkerError(f"{name}: must be between {lo} and {hi:,}, got {_short(value)}")
        floats = {  # name: (lowest, highest, lowest excluded, highest excluded)
            "lr": (0.0, limits.MAX_LR, True, False),
            "lora_alpha": (0.0, 1e6, True, False),
            "lora_dropout": (0.0, 1.0, False, True),
            "val_fraction": (0.0, 1.0, True, True),
            "min_lr_ratio": (0.0, 1.0, False, False),
            "weight_decay": (0.0, 1e3, False, False),
            "max_grad_norm": (0.0, 1e9, False, False),  # 0: no clipping
            "epochs": (0.0, limits.MAX_EPOCHS, self.max_steps is None, False),
            "beta": (0.0, 1e6, True, False),
            "label_smoothing": (0.0, 0.5, False, True),
            "desirable_weight": (0.0, 1e6, True, False),
            "undesirable_weight": (0.0, 1e6, True, False),
        }
        for name, (lo, hi, open_lo, open_hi) in floats.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise TinkerError(f"{name}: must be a finite number, got {_short(value)}")
            if value < lo or value > hi or (open_lo and value == lo) or (open_hi and value == hi):
                span = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
                raise TinkerError(f"{name}: must be in {span}, got {_short(value)}")
        if self.quant not in ("native", "fp32", "bf16"):
            raise TinkerError(f"quant: must be native, fp32 or bf16, got {self.quant!r}")
        check_distributed(self.distributed)
        if self.method not in METHODS:
            raise TinkerError(f"method: must be one of {', '.join(METHODS)}, got {_short(self.method)}")
        if self.dpo_loss not in DPO_LOSSES:
            raise TinkerError(f"dpo_loss: must be one of {', '.join(DPO_LOSSES)}, got {_short(self.dpo_loss)}")
        if self.label_smoothing and (self.method != "dpo" or self.dpo_loss == "ipo"):
            raise TinkerError("label_smoothing: applies to --method dpo with --dpo-loss sigmoid or robust only")
        if (self.desirable_weight, self.undesirable_weight) != (1.0, 1.0) and self.method != "kto":
            raise TinkerError("desirable_weight, undesirable_weight: apply to --method kto only")
        if self.ref is not None and self.method in ("sft", "orpo"):
            raise TinkerError(f"ref: --method {self.method} uses no reference model; drop --ref")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise TinkerError(f"save_dtype: must be float32 or bfloat16, got {self.save_dtype!r}")
        targets = self.lora_targets
        if (
            not isinstance(targets, list)
            or not targets
            or len(targets) > 256
            or not all(isinstance(t, str) and 0 < len(t) <= 256 for t in targets)
        ):
            raise TinkerError(
                f"lora_targets: must be a non-empty list of module names (such as q_proj, v_proj), got {_short(targets)}"
            )


METHODS = ("sft", "dpo", "orpo", "kto")
DPO_LOSSES = ("sigmoid", "ipo", "robust")

# An SPDX licence id (LicenseRef-... included) or a simple expression of them joined by AND / OR / WITH.
_SPDX_ID = r"[A-Za-z0-9][A-Za-z0-9.+-]{0,99}"
_SPDX = re.compile(rf"{_SPDX_ID}(?: (?:AND|OR|WITH) {_SPDX_ID}){{0,15}}")


def _short(value: Any) -> str:
    """repr(value), cut to one short line (a hostile recipe may hold megabytes in one value)."""
    text = (
        repr(value)
        if not isinstance(value, int) or abs(value) < 10**30
        else f"an integer of {len(str(abs(value)))} digits"
    )
    text = text.replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


FIELDS = {f.name: f for f in fields(Recipe)}


def _kind(cls, name: str, default: Any) -> type:
    """The scalar type of field `name`: its default's, or for a None default the annotation's (`int | None`)."""
    if default is not None:
        return type(default)
    note = str(cls.__dataclass_fields__[name].type)
    return next((t for t in (bool, int, float) if t.__name__ in note.split(" | ")), str)


def _coerce(name: str, value: Any, where: str, cls: type = None) -> Any:
    cls = cls or Recipe
    default = getattr(cls(), name)
    if value is None:
        return None
    if isinstance(default, list):
        if isinstance(value, str):  # a flag: comma-separated module names, or one data source
            value = [v.strip() for v in value.split(",") if v.strip()] if name == "lora_targets" else [value]
        if not isinstance(value, list) or (name == "lora_targets" and not all(isinstance(v, str) for v in value)):
            raise TinkerError(
                f"{where}: {name} must be a list" + (" of module names" if name == "lora_targets" else "")
            )
        return value
    kind = _kind(cls, name, default)
    if kind is bool:
        if not isinstance(value, bool):
            raise TinkerError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    bad = TinkerError(f"{where}: {name} must be {kind.__name__}, got {_short(value)}")
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise bad
    if not isinstance(value, (str, int, float)) or (kind is str and not isinstance(value, str)):
        raise bad  # str() of a list or mapping is not a name, and int() of one is not a number
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):  # int("1e9"), int(float("inf"))
        raise bad from None


def load_yaml(path: str | Path, cls: type = None) -> dict[str, Any]:
    """The recipe fields (of `cls`, default `Recipe`) a YAML file sets, checked and typed.

    Raises:
        TinkerError: unreadable YAML, unknown keys (with the closest known name), values of the wrong type.
    """
    from tinkerlm.formats import safe_yaml

    path = Path(path)
    if not path.is_file():
        raise TinkerError(f"{path}: recipe file not found")
    data = safe_yaml.load(path) or {}
    if not isinstance(data, dict):
        raise TinkerError(f"{path}: expected a mapping of recipe fields at the top level")
    cls = cls or Recipe
    known = {f.name for f in fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TinkerError(f"{path}: unknown recipe field {key!r}{hint}")
        out[name] = _coerce(name, value, f"{path}: {key}", cls)
    return out


def resolve(config: str | None = None, cls: type = None, **flags):
    """Defaults, then the YAML file's values, then flags that were given (not None); a `cls` recipe (default
    `Recipe`; `tinkerlm.tune.pretrain.PretrainRecipe`), checked."""
    cls = cls or Recipe
    known = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    if config:
        values.update(load_yaml(config, cls))
    for k, v in flags.items():
        if k not in known:
            raise TypeError(f"unknown recipe field {k}")
        if v is not None:
            values[k] = _coerce(k, v, k, cls)
    recipe = cls(**values)
    recipe.check()
    return recipe


def dump_yaml(recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


DISTRIBUTED = ("ddp", "fsdp")  # tinkerlm.tune.dist.STRATEGIES (this module imports no torch)


def check_distributed(value) -> None:
    if value not in DISTRIBUTED:
        raise TinkerError(f"distributed: must be one of {', '.join(DISTRIBUTED)}, got {_short(value)}")
