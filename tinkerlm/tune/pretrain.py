"""`tinkerlm pretrain`: a new Llama-family model trained from scratch on text files, into the store.

    from tinkerlm.tune.pretrain import pretrain
    m = pretrain(config="examples/pretrain/stdlib-code.yaml", out="stdlib-code")   # -> store Manifest

The recipe (`PretrainRecipe`, a YAML file whose fields flags override, as `tinkerlm finetune` takes them) names the
model's shape in Hugging Face's config names, the data, the tokenizer and the optimisation. Then:
1. the data is tokenized once into memory-mapped shards (`tinkerlm.tune.shards`), reused while the sources and the
   tokenizer are unchanged; a fraction of the rows, drawn with the seed, is held out for evaluation;
2. the model is built with tinkerlm's own architecture code (`tinkerlm.models.build`) and initialised as
   transformers initialises Llama (normal(0, init_std) weights, norms at one);
3. `tinkerlm.tune.trainer` trains it: AdamW with warmup + cosine decay, gradient accumulation, clipping, evaluation
   every N steps, checkpoints that resume bit-exactly, loss and tokens/s curves (`loss.csv`, `loss.png`);
4. the result is stored in Hugging Face's layout with the tokenizer, and its manifest records every source file
   (sha256, licence, provenance), the tokenizer (sha256), the recipe and the code version, which is what
   `tinkerlm openness` reads to show the data, code and recipe components.

References: Radford et al. 2019 (GPT-2: documents joined by an end-of-text token); Touvron et al. 2023 (Llama:
AdamW with beta2 0.95, weight decay 0.1, warmup then cosine decay to 10%); Karpathy's nanoGPT (uint16 token files).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinkerlm import limits
from tinkerlm.errors import TinkerError

COMPILE_BACKEND = "inductor"  # torch.compile's backend for `compile: true`


@dataclass
class PretrainRecipe:
    # the model: Hugging Face LlamaConfig names
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # default: num_attention_heads (no grouped-query attention)
    max_position_embeddings: int = 512  # the context
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    vocab_size: int | None = None  # default: the tokenizer's, rounded up to a multiple of 64
    init_std: float = 0.02  # weights drawn from normal(0, init_std), as transformers' initializer_range
    # data
    data: list = field(default_factory=list)  # files, directories, globs, `stdlib[/GLOB]`, or {path, license, ...}
    tokenizer: str = ""  # a tokenizer.json, an HF tokenizer directory, or a store name (its tokenizer)
    data_license: str | None = None  # SPDX licence of sources that do not name their own
    data_provenance: str | None = None  # where sources that do not say came from
    eval_fraction: float = 0.01  # rows held out for evaluation
    eval_max_rows: int = 64  # at most this many held-out rows are evaluated
    shards_dir: str | None = None  # default: STORE/shards
    # output
    out: str = ""  # store name for the result
    license: str | None = None  # SPDX licence of the weights (yours to choose)
    save_dtype: str = "float32"
    # optimisation
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None  # the budget in steps...
    max_tokens: int | None = None  # ...or in tokens; neither: one pass over the training rows
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    bf16: bool = False
    compile: bool = False  # torch.compile the model
    seed: int = 0
    eval_every: int = 0  # steps between evaluations; 0: at the end only
    save_every: int = 0  # steps between checkpoints; 0: at the end only
    threads: int | None = None
    distributed: str = "ddp"  # under torchrun: ddp (replicas) or fsdp (sharded); docs/distributed.md

    # Fields a resumed run may change without invalidating its checkpoint (the number of processes is free too).
    RESUMABLE_CHANGES = (
        "max_steps",
        "max_tokens",
        "eval_every",
        "save_every",
        "threads",
        "compile",
        "license",
        "distributed",
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Raises TinkerError naming the first bad field: types, ranges, and shapes that do not divide."""
        from tinkerlm.tune.recipe import _SPDX, _short

        if not self.data:
            raise TinkerError("data: files to train on are required (--data FILE_OR_DIR ..., or data: in the recipe)")
        if not self.tokenizer:
            raise TinkerError("tokenizer: which tokenizer? (a tokenizer.json, an HF directory, or a store name)")
        if not self.out:
            raise TinkerError("out: a store name for the result is required (--out NAME)")
        for name in ("tie_word_embeddings", "bf16", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TinkerError(f"{name}: must be true or false, got {_short(getattr(self, name))}")
        ints = {
            "hidden_size": (1, limits.MAX_WIDTH),
            "intermediate_size": (1, limits.MAX_WIDTH),
            "num_hidden_layers": (1, limits.MAX_LAYERS),
            "num_attention_heads": (1, limits.MAX_HEADS),
            "num_key_value_heads": (1, limits.MAX_HEADS),
            "max_position_embeddings": (1, limits.MAX_CONTEXT),
            "vocab_size": (1, limits.MAX_VOCAB),
            "eval_max_rows": (1, limits.MAX_BATCH * 1024),
            "seq_len": (2, limits.MAX_CONTEXT),
            "batch_size": (1, limits.MAX_BATCH),
            "grad_accum": (1, limits.MAX_BATCH),
            "max_steps": (1, limits.MAX_STEPS),
            "max_tokens": (1, 2**62),
            "warmup_steps": (0, limits.MAX_STEPS),
            "eval_every": (0, limits.MAX_STEPS),
            "save_every": (0, limits.MAX_STEPS),
            "threads": (1, limits.MAX_THREADS),
            "seed": (0, 2**63 - 1),
        }
        for name, (lo, hi) in ints.items():
            value = getattr(self, name)
            if value is None and name in ("num_key_value_heads", "vocab_size", "max_steps", "max_tokens", "threads"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise TinkerError(f"{name}: must be an integer between {lo} and {hi:,}, got {_short(value)}")
        floats = {  # name: (lowest, highest, lowest allowed)
            "rope_theta": (0.0, 1e12, False),
            "rms_norm_eps": (0.0, 1.0, False),
            "init_std": (0.0, 10.0, False),
            "eval_fraction": (0.0, 0.5, True),
            "lr": (0.0, limits.MAX_LR, False),
            "min_lr_ratio": (0.0, 1.0, True),
            "weight_decay": (0.0, 1e3, True),
            "adam_beta2": (0.0, 0.999999, False),
            "max_grad_norm": (0.0, 1e9, True),  # 0: no clipping
        }
        for name, (lo, hi, lo_ok) in floats.items():
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or not (lo <= value <= hi if lo_ok else lo < value <= hi):
                span = f"{'[' if lo_ok else '('}{lo:g}, {hi:g}]"
                raise TinkerError(f"{name}: must be a number in {span}, got {_short(value)}")
        heads, kv = self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads
        if self.hidden_size % heads:
            raise TinkerError(
                f"num_attention_heads: {heads} does not divide hidden_size {self.hidden_size}; pick a head count "
                f"that does (e.g. {self.hidden_size // 64 or 1})"
            )
        if heads % kv:
            raise TinkerError(
                f"num_key_value_heads: {kv} does not divide num_attention_heads {heads}; pick a divisor of {heads}"
            )
        if self.seq_len > self.max_position_embeddings:
            raise TinkerError(
                f"seq_len: {self.seq_len} is longer than the context (max_position_embeddings "
                f"{self.max_position_embeddings})"
            )
        for name in ("license", "data_license"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and _SPDX.fullmatch(value)):
                raise TinkerError(f"{name}: must be an SPDX licence id such as Apache-2.0, got {_short(value)}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise TinkerError(f"save_dtype: must be float32 or bfloat16, got {self.save_dtype!r}")
        from tinkerlm.tune.recipe import check_distributed

        check_distributed(self.distributed)

    def model_config(self, tokenizer) -> dict:
        """The Hugging Face config.json of the model this recipe describes, for `tokenizer`."""
        vocab = self.vocab_size or -(-tokenizer.vocab_size // 64) * 64
        if vocab < tokenizer.vocab_size:
            raise TinkerError(f"vocab_size: {vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads or self.num_attention_heads,
            "head_dim": self.hidden_size // self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": self.init_std,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }


def resolve(config: str | None = None, **flags) -> PretrainRecipe:
    """Defaults, then the YAML recipe, then the flags given (not None); checked."""
    from tinkerlm.tune import recipe as recipe_mod

    return recipe_mod.resolve(config, cls=PretrainRecipe, **flags)


def load_tokenizer(name: str):
    """(Tokenizer, record for the manifest) for a tokenizer.json, an HF directory, a .gguf, a tokenizer in the store
    (`tinkerlm tokenizer train`), or a stored model's name (its tokenizer; a catalogue name is pulled).

    Raises:
        TinkerError: nothing of that name, or no tokenizer in it.
    """
    from tinkerlm import store
    from tinkerlm.api import resolve as resolve_model
    from tinkerlm.formats.tokenizer import Tokenizer
    from tinkerlm.tune import shards

    p = Path(name).expanduser()
    stored = None if p.exists() else store.find(name)
    if stored is not None and stored.format == "tokenizer":
        path, manifest = store.model_path(stored), stored
    else:
        path, manifest = resolve_model(str(p.parent) if p.is_file() and p.name == "tokenizer.json" else name)
    if path.is_dir():
        tok = Tokenizer.from_hf_dir(path)
    else:
        from tinkerlm.formats.gguf import read_gguf

        tok = read_gguf(path).tokenizer()
    record = {"name": str(path.resolve()), "sha256": shards.tokenizer_sha256(tok), "vocab_size": tok.vocab_size}
    if manifest is not None:  # the store entry, named by its files' digest, as lineage records name parents
        record.update(name=manifest.ref, store_sha256=store.digest(manifest), license=manifest.license)
    return tok, record


def code_version() -> dict:
    """tinkerlm's version, and the git commit of its checkout when it runs from one (with uncommitted changes)."""
    from tinkerlm import __version__

    out: dict[str, Any] = {"tinkerlm": __version__}
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if commit:
            dirty = subprocess.run(
                ["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            out["git_commit"] = commit
            out["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def init_weights(model, std: float, seed: int) -> None:
    """transformers' Llama initialisation: Linear and Embedding weights from normal(0, std), norms at one."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=g)


def split_rows(n_rows: int, fraction: float, seed: int):
    """(training rows, held-out rows) of the stream: a seeded draw of round(fraction * n_rows) rows held out."""
    import numpy as np

    n_eval = 0 if fraction <= 0 else max(1, round(fraction * n_rows))
    if n_rows - n_eval < 1:
        raise TinkerError(f"eval_fraction: holds out {n_eval} of {n_rows} rows, leaving none to train on")
    order = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def _data_licence(records: list[dict]) -> str | None:
    """The conjunction of the sources' licences; None if any source has none."""
    found = []
    for r in records:
        if not r.get("license"):
            return None
        if r["license"] not in found:
            found.append(r["license"])
    return " AND ".join(found) or None


def data_card(name: str, records: list[dict], tok_record: dict, index: dict) -> str:
    """DATA.md: what the model was trained on, one row per source file (sha256, bytes, tokens, licence, provenance)."""
    lines = [
        f"# Training data of {name}",
        "",
        f"{len(records)} files, {sum(r['bytes'] for r in records):,} bytes, {index['tokens']:,} tokens with the "
        f"tokenizer {tok_record['name']} (sha256 {tok_record['sha256'][:16]}), each file followed by token "
        f"{index['doc_end']}; shards {index['key']} ({index['dtype']}).",
        "",
    ]
    for prov in dict.fromkeys(r.get("provenance") for r in records if r.get("provenance")):
        lines.append(f"- provenance: {prov}")
    lines += ["", "| file | sha256 | bytes | tokens | licence |", "|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['path']} | {r['sha256']} | {r['bytes']} | {r.get('tokens')} | {r.get('license') or '-'} |")
    return "\n".join(lines) + "\n"


def pretrain(
    *,
    config: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    **flags,
):
    """Pretrain a model from scratch and store it; returns its Manifest (None with `stop_after`).

    Args:
        config: a YAML recipe; `flags` (the fields of `PretrainRecipe`) override it.
        resume: continue from the newest checkpoint of the run writing `out`.
        force: replace a model already stored as `out`.
        stop_after: stop after this step without storing a result, as if killed (tests of resume).
    Under torchrun the process group is set up here (`tinkerlm.tune.dist.session`): rank 0 alone tokenizes the
    shards, writes checkpoints and stores the result; `distributed` picks DDP or FSDP.

    Raises:
        TinkerError: a bad recipe (shapes that do not divide, ranges), missing or empty data, too little disk for
            the shards, `out` already taken without `force`.
    """
    from tinkerlm.tune import dist

    with dist.session():
        return _pretrain(config=config, resume=resume, force=force, progress=progress, stop_after=stop_after, **flags)


def _pretrain(*, config, resume, force, progress, stop_after, **flags):
    import torch

    from tinkerlm import models, store
    from tinkerlm.loading import physical_cores
    from tinkerlm.tune import dist, save_full, shards, trainer
    from tinkerlm.tune.recipe import dump_yaml

    recipe = resolve(config, **flags)
    out_name, out_tag = store.parse_name(recipe.out)
    if not force and store.find(f"{out_name}:{out_tag}") is not None:
        raise TinkerError(f"out: {out_name}:{out_tag} is already in the store; pick another name or pass --force")
    torch.set_num_threads(recipe.threads or dist.threads_per_process(physical_cores()))

    tokenizer, tok_record = load_tokenizer(recipe.tokenizer)
    config_dict = recipe.model_config(tokenizer)
    sources = shards.expand(recipe.data, recipe.data_license, recipe.data_provenance)
    root = Path(recipe.shards_dir).expanduser() if recipe.shards_dir else store.home() / "shards"
    data = dist.rank0_first(lambda: shards.prepare(sources, tokenizer, root, progress))  # the others reuse them
    print(
        f"data: {len(sources)} files, {sum(s.bytes for s in sources):,} bytes -> {data.tokens:,} tokens "
        f"({'reused' if data.reused else 'tokenized into'} {data.dir})",
        file=sys.stderr,
    )
    stream = shards.TokenRows(data, recipe.seq_len)
    if stream.n_stream_rows < 2:
        raise TinkerError(
            f"data: {data.tokens:,} tokens make {stream.n_stream_rows} rows of seq_len {recipe.seq_len}; at least 2 "
            "are needed (add data or shorten seq_len)"
        )
    train_idx, eval_idx = split_rows(stream.n_stream_rows, recipe.eval_fraction, recipe.seed)
    train_rows = stream.subset(train_idx)
    val_rows = stream.subset(eval_idx[: recipe.eval_max_rows]) if len(eval_idx) else None

    per_step = recipe.batch_size * recipe.grad_accum
    if recipe.max_steps:
        total = recipe.max_steps
    elif recipe.max_tokens:
        total = max(1, math.ceil(recipe.max_tokens / (per_step * recipe.seq_len)))
    else:
        total = trainer.steps_per_epoch(len(train_rows), recipe.batch_size, recipe.grad_accum)
    model = models.build(config_dict, "recipe", device="cpu")
    init_weights(model, recipe.init_std, recipe.seed)
    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    print(
        f"model: {n_params:,} parameters; {total:,} steps of {per_step * recipe.seq_len:,} tokens "
        f"({len(train_rows):,} training rows, {len(eval_idx):,} held out)",
        file=sys.stderr,
    )
    if recipe.compile:
        from tinkerlm.tune import compile_ops

        compile_ops.register()  # the C++ kernels as custom ops: one graph per forward, no breaks at each kernel
        model.compile(backend=COMPILE_BACKEND)  # in place: the parameters keep their names and tensors

    tcfg = trainer.TrainConfig(
        total_steps=total,
        batch_size=recipe.batch_size,
        grad_accum=recipe.grad_accum,
        lr=recipe.lr,
        min_lr_ratio=recipe.min_lr_ratio,
        warmup_steps=min(recipe.warmup_steps, total),
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        seed=recipe.seed,
        bf16=recipe.bf16,
        eval_every=recipe.eval_every or total,
        save_every=recipe.save_every,
        betas=(0.9, recipe.adam_beta2),
    )
    fixed = {k: v for k, v in recipe.to_dict().items() if k not in PretrainRecipe.RESUMABLE_CHANGES}
    identity = hashlib.sha256(json.dumps([fixed, data.dir.name], sort_keys=True, default=str).encode()).hexdigest()
    run_dir = store.home() / "runs" / out_name / out_tag
    run_dir.mkdir(parents=True, exist_ok=True)
    state = trainer.train(
        model,
        params,
        train_rows,
        val_rows,
        tcfg,
        run_dir,
        resume=resume,
        meta={"identity": identity, "recipe": recipe.to_dict(), "shards": data.dir.name},
        progress=progress,
        stop_after=stop_after,
        desc="pretrain",
        distributed=recipe.distributed,
    )
    if stop_after is not None:
        return None
    full_state = dist.full_state_dict(model)  # FSDP: every rank helps gather the shards; rank 0 stores the model
    if trainer.rank() != 0:
        return None

    save_dtype = torch.bfloat16 if recipe.save_dtype == "bfloat16" else torch.float32
    gen_config = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    records = [s.record() for s in sources]
    by_sha = {r["sha256"]: r for r in data.index["sources"]}
    for r in records:
        r["tokens"] = by_sha.get(r["sha256"], {}).get("tokens")

    def fill(model_dir: Path) -> None:
        save_full(model, tokenizer, gen_config, None, model_dir, save_dtype, config=config_dict, state=full_state)
        (model_dir / "recipe.yaml").write_text(dump_yaml(recipe))
        (model_dir / "DATA.md").write_text(data_card(recipe.out, records, tok_record, data.index), encoding="utf-8")
        (model_dir / "loss.csv").write_text(trainer.history_csv(state.history))
        trainer.plot_history(
            state.history, model_dir / "loss.png", f"{recipe.out}: pretrained, {n_params / 1e6:.1f}M", throughput=True
        )

    source = {
        "type": "pretrain",
        "uri": f"pretrain:{out_name}:{out_tag}",
        "method": "pretrain",
        "recipe": recipe.to_dict(),
        "model_config": config_dict,
        "data": records,
        "data_license": _data_licence(records),
        "tokenizer": tok_record,
        "shards": {"key": data.dir.name, "tokens": data.tokens, "dtype": data.index["dtype"]},
        "code": code_version(),
        "parameters": n_params,
        "steps": state.step,
        "tokens": state.tokens,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "eval_loss": next((r["eval_loss"] for r in reversed(state.history) if r.get("eval_loss") is not None), None),
    }
    m = store.add(recipe.out, fill, source=source, parents=[], license=recipe.license, force=force)
    print(f"stored {m.ref}: {n_params:,} parameters, {state.tokens:,} tokens seen", file=sys.stderr)
    return m


def main(a) -> None:
    flags = {k: getattr(a, k) for k in PretrainRecipe.__dataclass_fields__ if getattr(a, k, None) is not None}
    pretrain(config=a.config, resume=a.resume, force=a.force, **flags)
