"""The fine-tuning recipe: one dataclass whose fields are the `tinkerlm finetune` flags.

A YAML recipe (`-c recipe.yaml`) uses the same names (`lora_rank: 16`, or `lora-rank: 16`); flags given on the
command line override it. The resolved recipe is saved beside the output as `recipe.yaml`.
This module imports no torch, so `tinkerlm finetune --help` stays fast.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tinkerlm.errors import TinkerError
from tinkerlm.formats.peft import DEFAULT_TARGETS


@dataclass
class Recipe:
    base: str = ""  # store name, .gguf file or HF directory
    data: str = ""  # training JSONL
    out: str = ""  # store name for the result
    eval_data: str | None = None  # held-out JSONL; default: val_fraction of data
    val_fraction: float = 0.05
    # method
    full: bool = False  # full fine-tuning instead of LoRA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False
    quant: str = "native"  # base weights for LoRA: native keeps a GGUF quantized (QLoRA), fp32/bf16 dequantize
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
    grad_checkpointing: bool = False
    seed: int = 0
    # bookkeeping
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch and at the end
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    threads: int | None = None
    save_dtype: str = "float32"  # dtype of saved weights: float32 or bfloat16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Fields a resumed run may change without invalidating its checkpoint.
    RESUMABLE_CHANGES = ("max_steps", "epochs", "eval_every", "save_every", "threads")

    def check(self) -> None:
        """Raises TinkerError naming the first out-of-range field."""
        if not self.base:
            raise TinkerError("base: which model to fine-tune? (a store name such as smollm2, or a path)")
        if not self.data:
            raise TinkerError("data: a training JSONL file is required (--data train.jsonl)")
        if not self.out:
            raise TinkerError("out: a store name for the result is required (--out NAME)")
        positive = {
            "lora_rank": self.lora_rank,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "seq_len": self.seq_len,
            "lr": self.lr,
        }
        for k, v in positive.items():
            if not v > 0:
                raise TinkerError(f"{k}: must be > 0, got {v}")
        if self.max_steps is None and not self.epochs > 0:
            raise TinkerError(f"epochs: must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TinkerError(f"max_steps: must be >= 1, got {self.max_steps}")
        if not 0 <= self.lora_dropout < 1:
            raise TinkerError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.val_fraction < 1:
            raise TinkerError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.quant not in ("native", "fp32", "bf16"):
            raise TinkerError(f"quant: must be native, fp32 or bf16, got {self.quant!r}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise TinkerError(f"save_dtype: must be float32 or bfloat16, got {self.save_dtype!r}")
        for k in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, k) < 0:
                raise TinkerError(f"{k}: must be >= 0, got {getattr(self, k)}")


FIELDS = {f.name: f for f in fields(Recipe)}


def _coerce(name: str, value: Any, where: str) -> Any:
    default = Recipe().__getattribute__(name)
    if value is None:
        return None
    if name == "lora_targets":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TinkerError(f"{where}: lora_targets must be a list of module names")
        return value
    kind = type(default) if default is not None else {"max_steps": int, "threads": int}.get(name, str)
    if kind is bool:
        if not isinstance(value, bool):
            raise TinkerError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    bad = TinkerError(f"{where}: {name} must be {kind.__name__}, got {value!r}")
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise bad
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise bad from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The recipe fields a YAML file sets, checked and typed.

    Raises:
        TinkerError: unreadable YAML, unknown keys (with the closest known name), values of the wrong type.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TinkerError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TinkerError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise TinkerError(f"{path}: expected a mapping of recipe fields at the top level")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, list(FIELDS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TinkerError(f"{path}: unknown recipe field {key!r}{hint}")
        out[name] = _coerce(name, value, f"{path}: {key}")
    return out


def resolve(config: str | None = None, **flags) -> Recipe:
    """Defaults, then the YAML file's values, then flags that were given (not None)."""
    values: dict[str, Any] = {}
    if config:
        values.update(load_yaml(config))
    for k, v in flags.items():
        if k not in FIELDS:
            raise TypeError(f"unknown recipe field {k}")
        if v is not None:
            values[k] = _coerce(k, v, k)
    recipe = Recipe(**values)
    recipe.check()
    return recipe


def dump_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
