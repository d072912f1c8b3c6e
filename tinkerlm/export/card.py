"""A Hugging Face model card (README.md) for an exported model: YAML front matter the Hub reads, then what the
model is, where it came from, how well it survived export and how to run it.

Front matter keys (https://huggingface.co/docs/hub/model-cards): `license` (a Hub licence identifier; any other
licence is `other` with `license_name`), `base_model` (the parents' Hub ids), `base_model_relation` (adapter,
merge, quantized or finetune: how the Hub draws the model tree), `library_name`, `tags`, `pipeline_tag`.

Names, descriptions and licences come from users and from other people's model files, so the front matter is
written with every string value double-quoted by PyYAML (newlines, quotes and `---` become escapes inside one
quoted scalar): no value can end the front matter or add keys. In the Markdown body, table cells have `|` and line
breaks escaped.
"""

from __future__ import annotations

import math
import re

from tinkerlm.errors import TinkerError
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
    tags = ["tinkerlm"] + ([library] if library == "gguf" else []) + ([relation] if relation else [])
    meta["tags"] = tags
    meta["pipeline_tag"] = "text-generation"
    evaluations = {k: v for k, v in (evaluations or {}).items() if isinstance(v, dict) and _scores(v)}
    head = front_matter(meta, _model_index(name, evaluations))
    return head + "\n" + _body(name, license, description, lineage, verification, files, library, evaluations)


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
        lines += ["    source:", f"      name: {_quoted('tinkerlm eval')}"]
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


def _body(name, license, description, lineage, verification, files, library, evaluations=None) -> str:  # noqa: A002
    title = " ".join(name.split()) or "model"
    out = [f"# {title}", "", description.strip() or "A model exported with tinkerlm.", ""]
    out += ["## Licence", ""]
    out.append(
        f"Licence: `{_cell(license)}`. It applies together with the licences of every model in the lineage below."
        if license
        else "No licence was recorded: read the licences of the models in the lineage below before using it."
    )
    out.append("")
    if lineage:
        out += ["## Lineage", "", "| Model | sha256 | Relation | Licence |", "|---|---|---|---|"]
        for item in lineage:
            sha = item.get("sha256")
            out.append(
                f"| {_cell(item.get('name'))} | {'`' + _cell(sha) + '`' if sha else '-'} | "
                f"{_cell(item.get('relation'))} | {_cell(item.get('licence', item.get('license')))} |"
            )
        out.append("")
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


def _store_name(name: str) -> str:
    """A store name from the model's name: the last path part, with characters a shell needs quoted replaced."""
    return re.sub(r"[^A-Za-z0-9._:-]+", "-", name.rsplit("/", 1)[-1]).strip("-") or "model"


def _shell(word: str) -> str:
    import shlex

    return shlex.quote(word)
