"""`tinkerlm card NAME`: a Hugging Face model card (README.md) for a stored or exported model: YAML front matter the
Hub reads, then what the model is, where it came from (its lineage tree), how open it is (the Model Openness
Framework class with its component table, the OSI's Open Source AI Definition verdict), what its licences oblige,
how well it survived export and how to run it. `tinkerlm push` and `tinkerlm export --to hf` publish the same card.

Front matter keys (https://huggingface.co/docs/hub/model-cards): `license` (a Hub licence identifier; any other
licence is `other` with `license_name`), `base_model` (the parents' Hub ids), `base_model_relation` (adapter,
merge, quantized or finetune: how the Hub draws the model tree), `library_name`, `tags`, `pipeline_tag`, and
`model-index` (https://huggingface.co/docs/hub/model-cards#evaluation-results): the scores `tinkerlm eval` stored
for the model, one result per task scored in full, metrics as fractions.

Names, descriptions and licences come from users and from other people's model files, so the front matter is
written with every string value double-quoted by PyYAML (newlines, quotes and `---` become escapes inside one
quoted scalar): no value can end the front matter or add keys. In the Markdown body, table cells have `|` and line
breaks escaped.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from tinkerlm.errors import TinkerError
from tinkerlm.fileio import write_atomic
from tinkerlm.openness import licences
from tinkerlm.store.display import format_verification

RELATIONS = ("adapter", "merge", "quantized", "finetune")


def model_card(
    *,
    name: str,
    license: str | None,  # noqa: A002 - the Hub's key name
    base_models: list[str],
    relation: str | None,
    description: str,
    lineage: list[dict],
    verification: dict | None,
    files: list[str],
    evaluations: dict | None = None,
    openness: dict | None = None,
    obligations: list[str] | None = None,
) -> str:
    """The README.md text of an exported model.

    Args:
        name: the model's name (a store name or Hub id); it heads the card and the run command.
        license: a licence identifier (Hub id, an alias or an "A AND B" conjunction); None when unknown.
        base_models: the parents' Hub ids (`org/name`), for `base_model`.
        relation: "adapter", "merge", "quantized" or "finetune" (`base_model_relation`), or None.
        description: a paragraph saying what the model is.
        lineage: one dict per ancestor: "name", "sha256", "relation", "licence" (or "license"); missing keys
            show as blanks.
        verification: `tinkerlm.export.verify.compare`'s figures, or None if not verified.
        files: the files written beside the card (decide `library_name`: gguf, peft or transformers).
        evaluations: stored scores (`Manifest.evaluations`: task -> {"metrics", "main", "n", "shots", "limit",
            ...}): a table in the body, and `model-index` results in the front matter for runs over whole tasks.
        openness: `tinkerlm.openness.assess(...).to_json()`, or None: its "datasets" go in the front matter, its
            lineage tree, class, component table and OSAID verdict in the body, its class in the tags.
        obligations: what the model's licences ask of whoever shares it (default: the openness dict's, else
            `licences.inherit([license])`'s).
    Raises:
        TinkerError: an unknown relation.
    """
    if relation is not None and relation not in RELATIONS:
        raise TinkerError(f"model card: relation {relation!r} is not one of {', '.join(RELATIONS)}")
    meta: dict[str, object] = {}
    row = licences.lookup(license) if license else None
    if row is not None:
        meta["license"] = row.id
    elif license and license.strip():
        meta["license"] = "other"
        meta["license_name"] = _slug(license)
    if base_models:
        meta["base_model"] = list(base_models)
    if relation and base_models:  # the Hub ignores a relation without a base model
        meta["base_model_relation"] = relation
    library = _library(files)
    if library:
        meta["library_name"] = library
    datasets = [d for d in (openness or {}).get("datasets") or [] if isinstance(d, str) and d.strip()]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    tags = ["tinkerlm"] + ([library] if library == "gguf" else []) + ([relation] if relation else [])
    cls = (openness or {}).get("class")
    if isinstance(cls, int) and not isinstance(cls, bool) and cls in (1, 2, 3):
        tags.append(f"mof-class-{cls}")
    meta["tags"] = tags
    meta["pipeline_tag"] = "text-generation"
    evaluations = {k: v for k, v in (evaluations or {}).items() if isinstance(v, dict) and _scores(v)}
    if obligations is None:
        obligations = (openness or {}).get("obligations")
    if obligations is None:
        obligations = licences.inherit([license])[1] if license else []
    head = front_matter(meta, _model_index(name, evaluations))
    body = _body(name, license, description, lineage, verification, files, library, evaluations, openness, obligations)
    return head + "\n" + body


def front_matter(meta: dict[str, object], extra: list[str] | None = None) -> str:
    """`---`, one `key: "value"` line (or `key:` and `- "item"` lines) per entry, the `extra` lines (built here,
    e.g. `_model_index`), `---`. Keys are this module's own identifiers; every value is a double-quoted YAML
    scalar on one line."""
    lines = ["---"]
    for key, value in meta.items():
        if not re.fullmatch(r"[a-z_]+", key):
            raise ValueError(f"front matter key {key!r}")  # keys are fixed in this module: a bug, not user input
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {_quoted(str(v))}" for v in value)
        else:
            lines.append(f"{key}: {_quoted(str(value))}")
    lines += extra or []
    lines.append("---")
    return "\n".join(lines) + "\n"


def _quoted(s: str) -> str:
    """One double-quoted YAML scalar on one line: PyYAML escapes quotes, backslashes, control characters and the
    characters YAML takes as line breaks (NEL, LS, PS)."""
    import yaml

    out = yaml.safe_dump(s, default_style='"', width=float("inf"), allow_unicode=True).rstrip("\n")
    out = out.removesuffix("\n...")
    assert "\n" not in out and out.startswith('"') and out.endswith('"'), out
    return out


def _slug(licence: str) -> str:
    """A `license_name` for a licence the Hub has no identifier for: lowercase letters, digits, `-` and `.`."""
    slug = re.sub(r"[^a-z0-9.]+", "-", licence.strip().lower()).strip("-.")
    return slug[:64] or "unknown"


def _library(files: list[str]) -> str | None:
    names = [f.rsplit("/", 1)[-1] for f in files]
    if any(n.endswith(".gguf") for n in names):
        return "gguf"
    if "adapter_config.json" in names:
        return "peft"
    if "config.json" in names:
        return "transformers"
    return None


def _cell(value: object) -> str:
    """A Markdown table cell: one line, `|` escaped, at most 200 characters."""
    text = " ".join(str(value if value is not None else "").split())
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return text[:200] + ("..." if len(text) > 200 else "") or "-"


def _scores(e: dict) -> list[tuple[str, float]]:
    """(metric, value) pairs worth showing of one stored evaluation: its main metric, then acc_norm."""
    metrics = e.get("metrics")
    if not isinstance(metrics, dict):
        return []
    names = [e.get("main"), "acc_norm"]
    out = []
    for n in dict.fromkeys(n for n in names if isinstance(n, str)):
        v = metrics.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((n, float(v)))
    return out


def _model_index(name: str, evaluations: dict) -> list[str]:
    """`model-index` lines (the Hub's evaluation results): one result per task scored in full (no --limit), its
    metrics as fractions. Task names and metric names are quoted scalars like every other value."""
    results = [(task, e) for task, e in evaluations.items() if e.get("limit") is None]
    if not results:
        return []
    lines = ["model-index:", f"- name: {_quoted(' '.join(name.split()) or 'model')}", "  results:"]
    for task, e in results:
        lines += [
            "  - task:",
            f"      type: {_quoted('text-generation')}",
            "    dataset:",
            f"      name: {_quoted(task)}",
            f"      type: {_quoted(task)}",
            "    metrics:",
        ]
        for metric, value in _scores(e):
            shots = e.get("shots", 0)
            label = f"{metric} ({shots}-shot)" if isinstance(shots, int) else metric
            lines += [f"    - type: {_quoted(metric)}", f"      value: {value!r}", f"      name: {_quoted(label)}"]
    return lines


def _evaluation_rows(evaluations: dict) -> list[str]:
    out = ["## Evaluation", "", "Scored with `tinkerlm eval` (fractions; acc_norm: length-normalised accuracy):", ""]
    out += ["| Task | Metric | Value | Items | Shots | Settings |", "|---|---|---|---|---|---|"]
    for task, e in evaluations.items():
        settings = [f"limit {e['limit']}"] if e.get("limit") is not None else []
        settings += ["chat"] if e.get("chat") else []
        settings += [str(e["quant"])] if e.get("quant") else []
        for metric, value in _scores(e):
            stderr = (e.get("metrics") or {}).get(f"{metric}_stderr")
            shown = f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) and stderr else "")
            out.append(
                f"| {_cell(task)} | {_cell(metric)} | {shown} | {_cell(e.get('n'))} | {_cell(e.get('shots', 0))} | "
                f"{_cell(', '.join(settings))} |"
            )
    return out + [""]


def _body(  # noqa: A002
    name, license, description, lineage, verification, files, library, evaluations=None, openness=None, obligations=()
) -> str:
    title = " ".join(name.split()) or "model"
    out = [f"# {title}", "", description.strip() or "A model exported with tinkerlm.", ""]
    out += ["## Licence", ""]
    out.append(
        f"Licence: `{_cell(license)}`. It applies together with the licences of every model in the lineage below."
        if license
        else "No licence was recorded: read the licences of the models in the lineage below before using it."
    )
    out.append("")
    if obligations:
        out += ["Sharing or using this model obliges you to:", ""] + [f"- {_cell(o)}" for o in obligations] + [""]
    tree = (openness or {}).get("lineage")
    if isinstance(tree, dict):
        out += ["## Lineage", "", "Each model with how the one above was made from it, its licence and MOF class:", ""]
        out += _tree(tree) + [""]
    elif lineage:
        out += ["## Lineage", "", "| Model | sha256 | Relation | Licence |", "|---|---|---|---|"]
        for item in lineage:
            sha = item.get("sha256")
            out.append(
                f"| {_cell(item.get('name'))} | {'`' + _cell(sha) + '`' if sha else '-'} | "
                f"{_cell(item.get('relation'))} | {_cell(item.get('licence', item.get('license')))} |"
            )
        out.append("")
    if openness and "class" in openness:  # an assessment, not only a lineage tree
        out += _openness(openness)
    out += ["## Verification", ""]
    if verification:
        out.append(
            "Compared with the model it was written from on tinkerlm's fixed evaluation text (KL divergence of the "
            "next-token distributions, agreement of the most likely token, perplexity):"
        )
        out += ["", f"    {format_verification(verification)}", ""]
    else:
        out += ["Not verified against its source.", ""]
    if evaluations:
        out += _evaluation_rows(evaluations)
    if files:
        out += ["## Files", ""] + [f"- `{_cell(f)}`" for f in files] + [""]
    gguf = next((f for f in files if f.endswith(".gguf")), None)
    local = f"./{gguf}" if gguf else "."
    out += [
        "## Run it",
        "",
        "With tinkerlm, from a download of this repository:",
        "",
        "```bash",
        f"tinkerlm pull {_shell(local)} --name {_shell(_store_name(title))}",
        f'tinkerlm run {_shell(_store_name(title))} "Hello!"',
        "```",
    ]
    if library == "gguf":
        out += ["", "The GGUF file also runs in llama.cpp and tools built on it (Ollama, LM Studio)."]
    return "\n".join(out) + "\n"


def _tree(node: dict, depth: int = 0, limit: int = 200) -> list[str]:
    """The lineage as a nested Markdown list: one line per model (name, relation, licence, class, short sha256),
    its parents indented below it. At most `limit` lines, 16 levels deep (a hostile record cannot blow it up)."""
    out: list[str] = []

    def visit(n: dict, depth: int) -> None:
        if len(out) >= limit or depth > 16 or not isinstance(n, dict):
            return
        sha = n.get("sha256")
        cls = n.get("class")
        parts = [f"**{_cell(n.get('name'))}**"]
        if n.get("relation"):
            parts.append(f"({_cell(n.get('relation'))})")
        parts.append(f"licence `{_cell(n.get('licence') or n.get('license') or 'unknown')}`")
        if isinstance(cls, int) and not isinstance(cls, bool):
            parts.append(f"MOF class {_roman(cls)}")
        if isinstance(sha, str) and sha:
            parts.append(f"sha256 `{_cell(sha)[:12]}`")
        head = parts.pop(0) + (f" {parts.pop(0)}" if n.get("relation") else "")
        out.append("  " * depth + f"- {head}: " + ", ".join(parts))
        for p in n.get("parents") or []:
            visit(p, depth + 1)

    visit(node, depth)
    return out


def _roman(cls: int) -> str:
    return {1: "I", 2: "II", 3: "III"}.get(cls, "unclassified")


def _openness(d: dict) -> list[str]:
    """The openness section: MOF class and its evidence, the component table, what the next class needs, OSAID."""
    out = ["## Openness", ""]
    cls = d.get("class")
    label = d.get("label") or (f"Class {_roman(cls)}" if isinstance(cls, int) else "unclassified")
    evidence = d.get("evidence")
    how = {
        "confirmed": "confirmed: every component the class needs is proven by the files tinkerlm holds",
        "declared": "declared: some components the class needs are only declared (a model card or MOT form says so)",
    }.get(evidence, "no evidence")
    out += [
        f"Model Openness Framework (https://isitopen.ai): **{_cell(label)}** ({how}).",
        "",
    ]
    progress = d.get("progress")
    if isinstance(progress, dict) and progress:
        shown = ", ".join(
            f"class {_roman(int(k)) if str(k).isdigit() else _cell(k)} {v:.0f}%"
            for k, v in sorted(progress.items(), key=lambda kv: str(kv[0]), reverse=True)
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        if shown:
            out += [f"Components present per class: {shown}.", ""]
    comps = [c for c in d.get("components") or [] if isinstance(c, dict)]
    if comps:
        out += [
            "| Component | Class | Required | Status | Evidence | Where | Licence | Licence fits |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in comps:
            fits = "yes" if c.get("open") and c.get("type_appropriate") else "no" if c.get("licence") else "-"
            out.append(
                f"| {_cell(c.get('name'))} | {_cell(c.get('class'))} | {'yes' if c.get('required') else 'no'} | "
                f"{_cell(c.get('status'))} | {_cell(c.get('evidence'))} | {_cell(c.get('where'))} | "
                f"{_cell(c.get('licence'))} | {fits} |"
            )
        out.append("")
    nxt = d.get("next_class")
    if isinstance(nxt, dict) and nxt.get("missing"):
        items = []
        for x in nxt["missing"]:  # "Training code", or {"component": ..., "why": ...}
            if isinstance(x, dict):
                why = f" ({_cell(x.get('why'))})" if x.get("why") else ""
                items.append(_cell(x.get("component")) + why)
            else:
                items.append(_cell(x))
        out += [f"Missing for class {_roman(nxt.get('class'))}:", ""] + [f"- {i}" for i in items] + [""]
    osaid = d.get("osaid")
    if isinstance(osaid, dict):
        verdict = "meets" if osaid.get("open_source_ai") else "does not meet"
        out += ["### Open Source AI Definition", "", f"This model {verdict} the OSI's Open Source AI Definition 1.0."]
        reasons = [r for r in osaid.get("reasons") or [] if r]
        out += ([""] + [f"- {_cell(r)}" for r in reasons]) if reasons else []
        out.append("")
    return out


def _store_name(name: str) -> str:
    """A store name from the model's name: the last path part, with characters a shell needs quoted replaced."""
    return re.sub(r"[^A-Za-z0-9._:-]+", "-", name.rsplit("/", 1)[-1]).strip("-") or "model"


def _shell(word: str) -> str:
    import shlex

    return shlex.quote(word)


# ---------------------------------------------------------------------------------------------------------------
# The card of a stored model (`tinkerlm card`, `tinkerlm push`, `tinkerlm export --to hf`)

# How the Hub draws a model made here from its parents, by the manifest's source type.
_RELATION = {"fuse": "finetune", "merge": "merge", "quantize": "quantized"}


def relation_of(m) -> str | None:
    """`base_model_relation` of a stored model: a LoRA fine-tune is an adapter, a full one (or a fused adapter) a
    finetune, a merge a merge, a quantization quantized; a catalogue file says itself (SmolLM2's GGUF: quantized);
    a GGUF pulled back from an export keeps its recorded relation. None: a model as published."""
    from tinkerlm.store import CATALOGUE

    kind = m.source.get("type")
    if kind == "finetune":
        return "adapter" if m.format == "lora" else "finetune"
    if kind in _RELATION:
        return _RELATION[kind]
    if kind == "catalogue":
        entry = CATALOGUE.get(str(m.source.get("uri", "")).partition(":")[0])
        return entry.hub_relation if entry else None
    rels = {p.get("relation") for p in m.parents}
    return "quantized" if rels == {"quantized"} else None


def hub_id(m) -> str | None:
    """The Hub id a stored model is published under: the repo it was pulled from, the catalogue entry's Hub model,
    or the last repo `tinkerlm push` sent it to."""
    from tinkerlm.store import CATALOGUE
    from tinkerlm.store.hub import _parse_hf

    src = m.source
    if src.get("type") == "hf":
        try:
            return src.get("repo") or _parse_hf(str(src.get("uri", "")))[0]
        except Exception:  # a hand-edited manifest: no id rather than a crash
            return None
    if src.get("type") == "catalogue":
        entry = CATALOGUE.get(str(src.get("uri", "")).partition(":")[0])
        return entry.hub_id if entry else None
    pushed = src.get("pushed")
    return pushed[-1] if isinstance(pushed, list) and pushed and isinstance(pushed[-1], str) else None


def _parent_manifest(entry: dict):
    """The stored model a lineage record names, if it is still the same model (same digest)."""
    from tinkerlm import store
    from tinkerlm.errors import TinkerError

    try:
        m = store.find(str(entry.get("name", "")))
    except TinkerError:  # a path or Hub id, not a store name
        return None
    return m if m is not None and store.digest(m) == entry.get("sha256") else None


def base_models(m) -> list[str]:
    """`base_model` of a stored model: the Hub ids of its parents (adapters folded into a merge or fuse are not
    bases); for a model with no parents made here, the Hub model its catalogue file was made from. Parents the
    Hub does not know (local models never pushed) are left out: the Hub refuses ids it does not have."""
    from tinkerlm.store import CATALOGUE

    if not m.parents:
        if m.source.get("type") == "catalogue":
            entry = CATALOGUE.get(str(m.source.get("uri", "")).partition(":")[0])
            return [entry.hub_id] if entry and entry.hub_id else []
        return []
    ids = []
    for p in m.parents:
        if p.get("relation") == "adapter" and m.source.get("type") in ("merge", "fuse"):
            continue
        parent = _parent_manifest(p)
        if parent is not None and (hid := hub_id(parent)):
            ids.append(hid)
    return list(dict.fromkeys(ids))


def _hub_origin(m) -> list[dict]:
    """For a catalogue file: the Hub model it was made from, as a lineage parent (the store records no parent)."""
    from tinkerlm.store import CATALOGUE

    if m.source.get("type") != "catalogue":
        return []
    entry = CATALOGUE.get(str(m.source.get("uri", "")).partition(":")[0])
    if entry is None or not entry.hub_id:
        return []
    return [{"name": entry.hub_id, "relation": entry.hub_relation, "licence": entry.license, "parents": []}]


def store_card(
    name: str,
    *,
    declaration: str | None = None,
    openness: dict | None = None,
    files: list[str] | None = None,
    verification: dict | None = None,
    description: str | None = None,
    evaluations: bool = True,
    copy_of: bool = False,
) -> str:
    """The README.md of a stored model: front matter from its manifest (licence, Hub ids of its parents, relation,
    scores) and its openness assessment (datasets, class), the body with its lineage, openness and obligations.

    Args:
        name: store name NAME[:TAG] (or hf:ORG/REPO of a pulled model).
        declaration: a MOT-format YAML file for the assessment.
        openness: an assessment dict to use instead of computing one (`assess(...).to_json()`).
        files: the files published beside the card (default: the model's stored files, without its README.md).
        verification: export verification figures, if the card is for a written copy.
        description: the paragraph under the title (default: what the store knows of where the model came from).
        evaluations: put the stored `tinkerlm eval` scores in (False for a copy that is not the same model).
        copy_of: the card is for a lossy copy (an export to other dtypes): a published model becomes its base,
            relation quantized.
    Raises:
        TinkerError: not in the store, or an assessment error.
    """
    from tinkerlm import store
    from tinkerlm.store.display import _source_text

    m = store.get(name)
    if openness is None:
        from tinkerlm.openness import assess

        openness = assess(m.ref, declaration=declaration).to_json()
    if files is None:
        files = [f["path"] for f in m.files if f["path"] != "README.md"]
    rel, bases = relation_of(m), base_models(m)
    if copy_of and (hid := hub_id(m)):
        rel, bases = "quantized", [hid]
    root = openness.get("lineage") if isinstance(openness.get("lineage"), dict) else None
    if root is not None and not root.get("parents") and (origin := _hub_origin(m)):
        openness = {**openness, "lineage": {**root, "parents": origin}}  # show the Hub model it was made from
    flat = [
        {"name": p.get("name"), "sha256": p.get("sha256"), "relation": p.get("relation"), "licence": p.get("license")}
        for p in m.parents
    ]
    kind = {"adapter": "a LoRA adapter", "merge": "a merge", "quantized": "a quantization", "finetune": "a fine-tune"}
    what = f"{kind[rel]} made with tinkerlm" if rel in kind and m.parents else "a model in tinkerlm's store"
    text = description or f"{m.ref}: {what} ({m.format}, {m.architecture}); source: {_source_text(m.source)}."
    return model_card(
        name=m.ref,
        license=m.license,
        base_models=bases,
        relation=rel,
        description=text,
        lineage=flat,
        verification=verification or (m.verification or None),
        files=files,
        evaluations=m.evaluations if evaluations else None,
        openness=openness,
    )


def card(name: str, *, out: str = "README.md", declaration: str | None = None, force: bool = False) -> Path:
    """`tinkerlm card NAME`: write the Hugging Face model card of a stored model to `out`.

    Raises:
        TinkerError: not in the store, `out` exists without `force` or cannot be written, a bad declaration.
    """
    path = Path(out).expanduser()
    if path.is_dir():
        raise TinkerError(f"--out: {path} is a directory; give a file name (e.g. {path / 'README.md'})")
    if path.exists() and not force:
        raise TinkerError(f"--out: {path} exists; pass --force to replace it")
    if declaration and not Path(declaration).is_file():
        raise TinkerError(f"--declaration: {declaration}: no such file")
    text = store_card(name, declaration=declaration)
    try:
        write_atomic(path, text)
    except OSError as e:
        raise TinkerError(f"--out: cannot write {path} ({e.strerror or e}); choose another path")
    return path


def main(a) -> None:
    path = card(a.name, out=a.out, declaration=a.declaration, force=a.force)
    print(f"wrote {path}", file=sys.stderr)
