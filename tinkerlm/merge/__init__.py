"""`tinkerlm merge recipe.yaml --out NAME`: merge store models by a mergekit recipe into a new store model.

The merge streams: for each output tensor it reads that tensor from every input (dequantizing GGUF, fusing LoRA
adapters), merges it, and writes it straight into the output safetensors file, so memory holds about one weight
across the inputs, never whole models. The result is a Hugging Face directory in the store with the base model's
config, tokenizer and chat template, the resolved recipe (`mergekit_config.yml`), a model card, and a manifest
whose lineage names every parent with its sha256, the recipe and the method; its licence and obligations are
inherited from the parents' (`tinkerlm.openness.licences.inherit`), and parents whose licences conflict are refused
before anything is read unless `accept_licence_conflict` is set (`tinkerlm.openness.remix`).

    from tinkerlm.merge import merge
    merge({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
           "parameters": {"t": 0.5}}, "ab")

Modules: `recipe` (the YAML and parameter values), `methods` (the merge functions), `sources` (reading store
models tensor by tensor), `plan` (which tensors merge with which, checked before anything is written).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any

from tinkerlm import limits
from tinkerlm.errors import TinkerError

log = logging.getLogger(__name__)

RECIPE_FILE = "mergekit_config.yml"


def merge(
    recipe: str | Path | dict,
    out: str,
    *,
    force: bool = False,
    progress: bool = True,
    random_seed: int | None = None,
    threads: int | None = None,
    accept_licence_conflict: bool = False,
) -> Any:
    """Merge the models a mergekit recipe names into the store model `out`.

    Args:
        recipe: a YAML file or its parsed dict (mergekit's format; see `tinkerlm.merge.recipe`).
        out: store name `NAME[:TAG]` of the result.
        force: replace a model already stored under `out`.
        progress: show a progress bar over tensors on stderr.
        random_seed: seed for the random methods (DARE) when the recipe has no `random_seed`; without either a
            seed is drawn, and recorded in the saved recipe so the merge can be repeated.
        threads: CPU threads for torch's arithmetic; default: torch's own setting.
        accept_licence_conflict: merge even parents whose licences conflict (`tinkerlm.openness.licences.conflicts`);
            the conflicts are recorded in the manifest.

    Returns:
        The new model's `store.Manifest`.

    Raises:
        TinkerError: a bad recipe (unknown method, missing base model, parameters that do not fit), inputs not in
            the store, inputs that differ in architecture, tensors, shapes or vocabulary, or parents whose licences
            conflict without `accept_licence_conflict`. Nothing is stored then.
    """
    import torch
    from tqdm.auto import tqdm

    from tinkerlm import store
    from tinkerlm.formats import hf
    from tinkerlm.merge import methods
    from tinkerlm.merge import recipe as recipe_mod
    from tinkerlm.merge.plan import output_bytes, plan
    from tinkerlm.merge.sources import open_source
    from tinkerlm.openness import remix

    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= limits.MAX_THREADS:
            raise TinkerError(f"threads: must be between 1 and {limits.MAX_THREADS}, got {threads!r}")
        torch.set_num_threads(threads)
    r = recipe_mod.load(recipe)
    method = methods.METHODS.get(r.method)
    if method is None:
        known = ", ".join(sorted(methods.METHODS))
        extra = " (a mergekit method tinkerlm does not implement)" if r.method in methods.MERGEKIT_ONLY else ""
        raise TinkerError(f"{r.where}: merge_method {r.method!r} is unknown{extra}; tinkerlm merges with: {known}")
    name, tag = store.parse_name(out)
    if not force and store.find(f"{name}:{tag}") is not None:
        raise TinkerError(f"{name}:{tag} is already in the store; pick another --out name, or replace it with --force")
    if r.tokenizer_source not in (None, "base") and r.tokenizer_source not in r.models():
        raise TinkerError(f"{r.where}: tokenizer_source {r.tokenizer_source!r} is not one of the recipe's models")

    sources: dict = {}
    made_of: list[tuple[store.Manifest, str, str]] = []  # (manifest, kind, recipe ref)
    try:
        for ref in r.models():
            sources[ref], parts = open_source(ref, r.where, progress)
            made_of += [(m, kind, ref) for m, kind in parts]
        parents = _parents(r, made_of)
        terms = remix.check(
            [p.get("license") for p in parents],
            kind="merge",
            name=name,
            accept_licence_conflict=accept_licence_conflict,
        )
        tasks, config = plan(r, sources, method)
        _check_vocabularies(r, sources)
        # Before anything is written: what the merge will write, said, and refused past the store's free space.
        size = output_bytes(tasks)
        print(
            f"{name}:{tag}: {len(tasks)} tensors, {config.get('num_hidden_layers', config.get('n_layer', '?'))} "
            f"layers, {store.format_size(size)} of weights to write",
            file=sys.stderr,
            flush=True,
        )
        store.check_space(size, f"merge into {name}:{tag}")

        seed = r.random_seed if r.random_seed is not None else random_seed
        if method.random and seed is None:
            seed = secrets.randbelow(2**31)
        resolved = dict(r.raw)
        resolved.setdefault("dtype", config["torch_dtype"])
        if method.random:
            resolved["random_seed"] = seed
        try:
            json.dumps(resolved)  # it goes into the manifest: fail now, not after the merge
        except (TypeError, ValueError) as e:
            raise TinkerError(
                f"{r.where}: the recipe holds a value that is not plain data ({e}); use numbers, "
                "strings, lists and mappings"
            ) from None

        tok_ref = (
            r.tokenizer_source
            if r.tokenizer_source not in (None, "base")
            else (r.base_model or r.slices[0].sources[0].model)
        )

        def merged():
            """(name, tensor) for each output tensor, merged as it is asked for: one weight in memory at a time."""
            for task in tqdm(tasks, desc=f"merge {method.name}", unit="tensor", disable=not progress):
                xs = [src.tensor(n) for src, n in task.inputs]
                gen = None
                if method.random:
                    gen = torch.Generator().manual_seed(_tensor_seed(seed, task.name))
                out = method.fn(xs, task.base, task.shared, task.per_input, gen)
                del xs
                yield task.name, out
                del out

        def fill(model_dir: Path) -> None:
            hf.write_model(
                model_dir,
                config,
                [(t.name, t.dtype, t.shape) for t in tasks],
                merged(),
                metadata={"format": "pt", "merge_method": method.name},
                tokenizer=sources[tok_ref].save_tokenizer,
                chat_template=r.chat_template,
            )
            _write_yaml(model_dir / RECIPE_FILE, resolved)
            _write_card(model_dir, name, method.name, parents, terms, resolved)

        source = {"type": "merge", "method": method.name, "recipe": resolved}
        m = store.add(
            f"{name}:{tag}",
            fill,
            source=source,
            parents=parents,
            license=terms.licence,
            force=force,
            obligations=terms.obligations,
            licence_conflicts=terms.conflicts,
        )
        remix.announce(m.ref, terms)
        return m
    finally:
        for s in sources.values():
            s.close()


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so each tensor's random draws depend on the seed and its name only (not on order)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _parents(r, made_of) -> list[dict]:
    """Lineage records: the base model "base", other inputs "merge-input", fused LoRA adapters "adapter"."""
    from tinkerlm import store

    base_ref = r.base_model or ""
    entries: dict[str, dict] = {}
    for manifest, kind, ref in made_of:
        if kind == "adapter":
            relation = "adapter"
        elif ref.partition("+")[0] == base_ref.partition("+")[0] and base_ref:
            relation = "base"
        else:
            relation = "merge-input"
        entry = store.parent_entry(manifest, relation)
        if manifest.ref not in entries or relation == "base":
            entries[manifest.ref] = entry
    order = {"base": 0, "merge-input": 1, "adapter": 2}
    return sorted(entries.values(), key=lambda e: order.get(e["relation"], 3))


def _check_vocabularies(r, sources) -> None:
    """Every input must share the base's vocabulary: the merged model keeps one tokenizer. Inputs whose tokenizer
    files hash the same are not read."""
    ref = r.base_model or r.slices[0].sources[0].model
    want_key = sources[ref].vocab_key()
    others = {s.vocab_key(): s for s in sources.values() if s.vocab_key() != want_key}
    if not others:
        return
    want = sources[ref].vocab()
    for s in others.values():
        have = s.vocab()
        if have == want:
            continue
        a = {i: tok for tok, i in want.items()}
        b = {i: tok for tok, i in have.items()}
        for i in sorted(set(a) | set(b)):
            if a.get(i) != b.get(i):
                raise TinkerError(
                    f"{r.where}: vocabularies differ: token {i} is {a.get(i)!r} in {sources[ref].label} but "
                    f"{b.get(i)!r} in {s.label}; merged models share one tokenizer, so merge models of one family"
                )


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _write_card(model_dir: Path, name: str, method: str, parents: list[dict], terms, recipe: dict) -> None:
    """README.md: the model card, with the licence and parents in its front matter (as the Hub reads it), and the
    obligations (`terms`, a `tinkerlm.openness.remix.Terms`) and accepted licence conflicts in its body."""
    import yaml

    licence = terms.licence or "unknown"
    front = {"license": licence} if terms.licence else {}
    front |= {
        "base_model": [p["name"] for p in parents if p["relation"] != "adapter"],
        "tags": ["merge", "tinkerlm", method],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"A merge made with tinkerlm (`tinkerlm merge`, method `{method}`).",
        "",
        "## Parents",
        "",
    ]
    lines += [
        f"- {p['relation']}: {p['name']} (sha256 `{p['sha256']}`, licence {p.get('license') or 'unknown'})"
        for p in parents
    ]
    lines += ["", "## Licence", "", f"{licence}. Inherited obligations:", ""]
    lines += [f"- {t}" for t in terms.obligations] or ["- none recorded"]
    if terms.conflicts:
        lines += ["", "Licence conflicts accepted by its maker (--accept-licence-conflict): do not share it.", ""]
        lines += [f"- {c}" for c in terms.conflicts]
    lines += [
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(json.loads(json.dumps(recipe)), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    (model_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main(args) -> None:
    """CLI: `tinkerlm merge RECIPE --out NAME [--force] [--random-seed N] [--threads N]
    [--accept-licence-conflict]`; prints the result and its licence (the obligations go to stderr with the
    merge's other messages)."""
    import sys

    from tinkerlm import store

    m = merge(
        args.recipe,
        args.out,
        force=args.force,
        random_seed=args.random_seed,
        threads=args.threads,
        accept_licence_conflict=args.accept_licence_conflict,
    )
    recipe = m.source.get("recipe", {})
    print(
        f"{m.ref}  {m.source.get('method')}  {m.architecture}  {store.format_params(m.parameters)}  "
        f"{recipe.get('dtype', '')}"
    )
    print("parents: " + ", ".join(f"{p['name']} ({p['relation']})" for p in m.parents))
    print(f"licence: {m.license}")
    sys.stdout.flush()
