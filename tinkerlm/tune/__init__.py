"""`tinkerlm finetune` and `tinkerlm fuse`: LoRA (default) or full fine-tuning into the store, with lineage.

    from tinkerlm.tune import finetune
    m = finetune(base="smollm2", data="train.jsonl", out="smollm2-dates", epochs=3)   # -> store Manifest

A LoRA result is stored as a peft adapter (format "lora") that `tinkerlm run` applies to its base on load and
`tinkerlm fuse` folds into a full model; `--full` stores a Hugging Face model. Either way the store keeps the
resolved recipe (`recipe.yaml`), the loss curve (`loss.csv`, `loss.png`), the chat template the data was rendered
with (`chat_template.jinja`, which serving uses too), and a manifest naming the base (with sha256), the data files
(with sha256, and their licence when `data_license` says it), the licence inherited from the base and the
obligations it brings. A base whose licence forbids derivatives is refused unless `accept_licence_conflict` is set
(`tinkerlm.openness.remix`).

`method` (sft by default) picks the objective: `dpo`, `orpo` or `kto` tune on preference data (preference.py), with
a `rewards.png` beside the loss curve. `tinkerlm pretrain` (a new model from scratch on text files) is
`tinkerlm.tune.pretrain`, its token shards `tinkerlm.tune.shards`; it shares the loop, checkpoints and curves of
trainer.py and `save_full`.

Modules: recipe.py (the flags), data.py (JSONL -> packed rows), preference.py (preference data, losses, reference
log-probs), trainer.py (the loop, checkpoints), dist.py (torchrun: DDP and FSDP, docs/distributed.md); the LoRA
module swap is `tinkerlm.lora`, the adapter files `tinkerlm.formats.peft`, model loading `tinkerlm.loading`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

from tinkerlm.errors import TinkerError
from tinkerlm.formats import specs
from tinkerlm.tune.recipe import Recipe, dump_yaml, resolve

log = logging.getLogger(__name__)

__all__ = ["finetune", "fuse", "save_full", "Recipe"]  # `pretrain`: tinkerlm.tune.pretrain


def _base(name_or_path: str):
    """(path, manifest or None, lineage record) of the base model."""
    from tinkerlm import store
    from tinkerlm.api import resolve as resolve_model

    path, manifest = resolve_model(name_or_path)
    if manifest is not None:
        if manifest.format == "lora":
            raise TinkerError(
                f"base: {manifest.ref} is a LoRA adapter; fuse it first (`tinkerlm fuse "
                f"{manifest.ref} --out NAME`) and fine-tune the fused model"
            )
        return path, manifest, store.parent_entry(manifest, "base")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    records = [
        {"path": f.relative_to(path).as_posix() if path.is_dir() else f.name, "sha256": store.sha256_file(f)}
        for f in files
    ]
    license = store.describe(path).get("license")
    return (
        path,
        None,
        {"name": str(path.resolve()), "sha256": store.files_digest(records), "relation": "base", "license": license},
    )


def _run_dir(out: str) -> Path:
    from tinkerlm import store

    name, tag = store.parse_name(out)
    return store.home() / "runs" / name / tag


def finetune(
    *,
    config: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    accept_licence_conflict: bool = False,
    **flags,
):
    """Fine-tune a model and store the result; returns its Manifest.

    Args:
        config: a YAML recipe; `flags` (the fields of `Recipe`) override it.
        resume: continue from the newest checkpoint of the run writing `out`.
        force: replace a model already stored as `out`.
        stop_after: stop after this step without storing a result, as if killed (tests of resume).
        accept_licence_conflict: fine-tune even a base whose licence forbids it (no derivatives); the conflict is
            recorded in the manifest.
    Raises:
        TinkerError: bad recipe, data or base model; `out` already taken without `force`; the base's licence
            forbids fine-tunes and `accept_licence_conflict` is not set.

    Under torchrun the process group is set up here (`tinkerlm.tune.dist.session`; docs/distributed.md).
    """
    from tinkerlm.tune import dist

    with dist.session():
        return _finetune(config, resume, force, progress, stop_after, accept_licence_conflict, flags)


def _finetune(config, resume, force, progress, stop_after, accept_licence_conflict, flags):
    import torch

    from tinkerlm import lora, store
    from tinkerlm.loading import load_checkpoint, physical_cores
    from tinkerlm.openness import remix
    from tinkerlm.tune import dist, memory, trainer

    recipe = resolve(config, **flags)
    out_name, out_tag = store.parse_name(recipe.out)
    if not force and store.find(f"{out_name}:{out_tag}") is not None:
        raise TinkerError(f"out: {out_name}:{out_tag} is already in the store; pick another name or pass --force")
    torch.set_num_threads(recipe.threads or dist.threads_per_process(physical_cores()))

    path, base_manifest, base_record = _base(recipe.base)
    terms = remix.check(
        [base_record.get("license")],
        kind="finetune" if recipe.full else "adapter",
        name=out_name,
        accept_licence_conflict=accept_licence_conflict,
    )
    quant = "fp32" if recipe.full else recipe.quant
    model, tokenizer, gen_config = load_checkpoint(path, quant=quant)

    if recipe.full:
        for p in model.parameters():
            p.requires_grad_(True)
        params = dict(model.named_parameters())
        method = "full"
    else:
        cfg = lora.LoRAConfig(
            recipe.lora_rank, recipe.lora_alpha, recipe.lora_dropout, recipe.lora_targets, recipe.rslora
        )
        wrapped = lora.apply_lora(model, cfg, seed=recipe.seed)
        if recipe.bf16 and not (dist.rank_world()[1] > 1 and recipe.distributed == "fsdp"):  # FSDP2: one dtype
            lora.bf16_bases(model)  # the bf16 copy autocast would make of the frozen weights, made once
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        method = "lora"
    data_files = [("train", Path(recipe.data))] + ([("eval", Path(recipe.eval_data))] if recipe.eval_data else [])
    data_records = [
        {"role": role, "path": str(p.resolve()), "sha256": store.sha256_file(p)}
        for role, p in data_files
        if p.is_file()
    ]
    if recipe.seq_len > model.max_context:
        print(f"seq_len: {recipe.seq_len} is beyond the model's context; using {model.max_context}", file=sys.stderr)
        recipe.seq_len = model.max_context
    ref_record = None
    if recipe.method == "sft":
        train_data, val_data, stats = _sft_data(recipe, tokenizer)
    else:
        from tinkerlm.tune import preference

        ref_sha, load_ref = base_record["sha256"], None
        if recipe.ref is not None:
            ref_path, _, ref_record = _base(recipe.ref)
            ref_sha, load_ref = ref_record["sha256"], lambda: _reference_model(ref_path, tokenizer)
        train_data, val_data, stats = preference.prepare(
            recipe,
            model,
            tokenizer,
            adapter_ref=method == "lora" and recipe.ref is None,
            ref_sha256=ref_sha,
            load_ref=load_ref,
        )

    model.checkpoint_layers = memory.recompute(
        model.config, recipe.batch_size * recipe.seq_len, recipe.grad_checkpointing, recipe.bf16
    )
    n_train = sum(p.numel() for p in params.values())
    print(f"{method}: training {n_train:,} parameters", file=sys.stderr)

    per_epoch = trainer.steps_per_epoch(len(train_data), recipe.batch_size, recipe.grad_accum)
    total = recipe.max_steps or max(1, round(recipe.epochs * per_epoch))
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
        eval_every=recipe.eval_every,
        save_every=recipe.save_every,
    )
    fixed = {k: v for k, v in recipe.to_dict().items() if k not in Recipe.RESUMABLE_CHANGES}
    identity = hashlib.sha256(
        json.dumps([fixed, data_records, base_record["sha256"]], sort_keys=True, default=str).encode()
    ).hexdigest()
    run_dir = _run_dir(recipe.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = trainer.train(
        model,
        params,
        train_data,
        val_data,
        tcfg,
        run_dir,
        resume=resume,
        meta={"identity": identity, "recipe": recipe.to_dict()},
        progress=progress,
        stop_after=stop_after,
        distributed=recipe.distributed,
    )
    if stop_after is not None:
        return None
    full_state = dist.full_state_dict(model)  # FSDP: every rank helps gather the shards, rank 0 keeps them
    if trainer.rank() != 0:
        return None  # under torchrun only rank 0 stores the result
    dist.gather_model(model, full_state)

    template = tokenizer.chat_template
    save_dtype = torch.bfloat16 if recipe.save_dtype == "bfloat16" else torch.float32
    base_ref = base_manifest.ref if base_manifest else str(Path(path).resolve())

    def fill(model_dir: Path) -> None:
        if method == "lora":
            fan_in_fan_out = bool(specs.for_model_type(model.config.model_type).conv1d)
            lora.save_adapter(
                model, model_dir, lora.peft_config(cfg, wrapped, base_ref, fan_in_fan_out), dtype=save_dtype
            )
        else:
            save_full(model, tokenizer, gen_config, path, model_dir, save_dtype, state=full_state)
        if template is not None:
            (model_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
        (model_dir / "recipe.yaml").write_text(dump_yaml(recipe))
        (model_dir / "loss.csv").write_text(trainer.history_csv(state.history))
        title = f"{recipe.out}: {method} {'' if recipe.method == 'sft' else recipe.method + ' '}fine-tune of {base_ref}"
        trainer.plot_history(state.history, model_dir / "loss.png", title)
        if recipe.method != "sft":
            from tinkerlm.tune.preference import plot_rewards

            plot_rewards(state.history, model_dir / "rewards.png", title)

    source = {
        "type": "finetune",
        "uri": f"finetune:{run_dir.name}",
        "method": method,
        "objective": recipe.method,
        "recipe": recipe.to_dict(),
        "data": data_records,
        "data_stats": stats.__dict__,
        "steps": state.step,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "eval_loss": next((r["eval_loss"] for r in reversed(state.history) if r.get("eval_loss") is not None), None),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
    }
    if recipe.method != "sft":
        last_eval = next((r for r in reversed(state.history) if r.get("eval_loss") is not None), {})
        source["eval_accuracy"] = last_eval.get("eval_accuracy")
        source["eval_margin"] = last_eval.get("eval_margin")
        source["reference"] = ref_record or ("adapters off" if method == "lora" else "base")
    parents = [base_record]
    m = store.add(
        recipe.out,
        fill,
        source=source,
        parents=parents,
        license=terms.licence,
        force=force,
        obligations=terms.obligations,
        licence_conflicts=terms.conflicts,
    )
    print(f"stored {m.ref} ({m.format}); base {base_ref}; licence {m.license or 'unknown'}", file=sys.stderr)
    remix.announce(m.ref, terms)
    return m


def _sft_data(recipe, tokenizer):
    """SFT's training and held-out rows, packed, and the data stats."""
    from tinkerlm.tune import data as data_mod

    examples, stats = data_mod.load_examples(recipe.data, tokenizer, recipe.seq_len)
    print(f"data: {stats.summary()}", file=sys.stderr)
    if recipe.eval_data:
        val, val_stats = data_mod.load_examples(recipe.eval_data, tokenizer, recipe.seq_len)
        print(f"eval data: {val_stats.summary()}", file=sys.stderr)
        train_ex = examples
    else:
        train_ex, val = data_mod.split(examples, recipe.val_fraction, recipe.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train_rows = data_mod.pack(train_ex, recipe.seq_len, pad)
    val_rows = data_mod.pack(val, recipe.seq_len, pad)
    print(
        f"packed {len(train_ex)} training examples into {len(train_rows)} rows of {recipe.seq_len} tokens; "
        f"{len(val)} held out for evaluation",
        file=sys.stderr,
    )
    return train_rows, val_rows, stats


def _reference_model(path: Path, tokenizer):
    """A preference run's `--ref` model, in fp32; it must share the base's tokenizer (log-probs of the same ids)."""
    from tinkerlm.loading import load_checkpoint

    ref, ref_tok, _ = load_checkpoint(path, quant="fp32")
    if ref_tok.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise TinkerError(f"ref: {path} has another tokenizer than the base; the reference must score the same tokens")
    ref.eval()
    return ref


def save_full(
    model,
    tokenizer,
    gen_config: dict,
    base_path: Path | None,
    model_dir: Path,
    dtype=None,
    config: dict | None = None,
    state: dict | None = None,
) -> None:
    """Write `model` as a Hugging Face directory: config.json, model.safetensors, tokenizer files; the config is
    `config` when given (a model made from scratch), else the base checkpoint's. `state`: the model's tensors when
    not its own `state_dict()` (gathered from FSDP shards, `tinkerlm.tune.dist.full_state_dict`)."""
    import torch

    from tinkerlm.formats import hf
    from tinkerlm.loading import checkpoint_config

    dtype = dtype or torch.float32
    config = dict(config) if config is not None else checkpoint_config(base_path)
    config["torch_dtype"] = "bfloat16" if dtype == torch.bfloat16 else "float32"
    tensors, state = state if state is not None else model.state_dict(), {}
    seen = {}
    for name, t in tensors.items():
        if name == "inv_freq" or name.endswith(".inv_freq"):
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen and config.get("tie_word_embeddings"):
            continue  # a tied head is stored once, as the embedding
        seen[key] = name
        state[name] = t.detach()
    spec = specs.for_model_type(model.config.model_type)
    state = {k: (v.t() if spec.is_conv1d(k) else v) for k, v in state.items()}  # HF's Conv1D layout: (in, out)
    # In name order, as safetensors' own save_file lays out tensors of one dtype; each is cast as it is written.
    names = sorted(state)
    hf.write_model(
        model_dir,
        config,
        [(n, dtype, tuple(state[n].shape)) for n in names],
        ((n, state[n]) for n in names),
        generation_config=gen_config,
        tokenizer=tokenizer.save_hf,
    )


def fuse(name: str, out: str, *, force: bool = False, dtype: str = "float32", accept_licence_conflict: bool = False):
    """Fold a stored LoRA adapter into its base and store the full model (Hugging Face format) as `out`.

    Args:
        accept_licence_conflict: fuse even where the licences forbid it (a no-derivatives base); the conflict is
            recorded in the manifest.
    Raises:
        TinkerError: `name` is not an adapter, its base is missing, `out` is taken without `force`, or the
            licences conflict without `accept_licence_conflict`.
    """
    import torch

    from tinkerlm import lora, store
    from tinkerlm.api import resolve_adapter
    from tinkerlm.loading import load_adapted
    from tinkerlm.openness import remix

    adapter_m = store.get(name)
    if adapter_m.format != "lora":
        raise TinkerError(f"{adapter_m.ref} is a {adapter_m.format} model, not a LoRA adapter; nothing to fuse")
    if not force and store.find(out) is not None:
        raise TinkerError(f"out: {out} is already in the store; pick another name or pass --force")
    adapter_dir = store.model_path(adapter_m)
    adapter, base_path, base_m = resolve_adapter(adapter_m)
    parents = [store.parent_entry(adapter_m, "adapter")]
    if base_m is not None:
        parents.append(store.parent_entry(base_m, "base"))
    terms = remix.check(
        [p.get("license") for p in parents],
        kind="fuse",
        name=store.parse_name(out)[0],
        accept_licence_conflict=accept_licence_conflict,
    )
    model, tokenizer, gen_config = load_adapted(adapter, base_path, quant="fp32", source=adapter_m.ref)
    lora.fuse_lora(model)
    torch_dtype = torch.bfloat16 if dtype in ("bfloat16", "bf16") else torch.float32

    def fill(model_dir: Path) -> None:
        save_full(model, tokenizer, gen_config, base_path, model_dir, torch_dtype)
        for extra in ("recipe.yaml", "loss.csv", "loss.png"):
            if (adapter_dir / extra).is_file():
                (model_dir / extra).write_bytes((adapter_dir / extra).read_bytes())

    source = {
        "type": "fuse",
        "uri": f"fuse:{adapter_m.ref}",
        "adapter": adapter_m.ref,
        "base": base_m.ref if base_m else str(base_path),
    }
    m = store.add(
        out,
        fill,
        source=source,
        parents=parents,
        license=adapter_m.license or terms.licence,
        force=force,
        obligations=terms.obligations,
        licence_conflicts=terms.conflicts,
    )
    print(f"stored {m.ref}: {adapter_m.ref} fused into {source['base']}", file=sys.stderr)
    remix.announce(m.ref, terms)
    return m


def main(a) -> None:
    flags = {k: getattr(a, k) for k in Recipe.__dataclass_fields__ if hasattr(a, k)}
    finetune(
        config=a.config,
        resume=a.resume,
        force=a.force,
        accept_licence_conflict=a.accept_licence_conflict,
        **flags,
    )


def fuse_main(a) -> None:
    fuse(a.name, a.out, force=a.force, dtype=a.dtype, accept_licence_conflict=a.accept_licence_conflict)
