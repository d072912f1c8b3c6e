"""`tinkerlm openness NAME`: how open a stored model is, by the Model Openness Framework and the OSI's definition.

For a model in the store (and, recursively, its parents): the MOF class with "confirmed" where the store proves
everything the class needs and "declared" where a declaration does part of it, each component's standing (present,
where, licence, fit for its content type), what the next class needs, and the Open Source AI Definition 1.0 verdict
with its reasons. See `evidence` for where the facts come from and `mof` for the class rules.

OSAID 1.0 (https://opensource.org/ai/open-source-ai-definition) asks for three things, each checked here:
- parameters: the weights under OSI-approved terms, without use restrictions;
- code: the complete code to train and run the model (architecture, inference, training, data processing) under
  OSI-approved licences;
- data information: enough detail about the training data to rebuild a similar system (its datasets listed or
  documented in a data card).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

from tinkerlm.errors import TinkerError
from tinkerlm.openness import evidence as ev_mod
from tinkerlm.openness import licences as lic_mod
from tinkerlm.openness import mof

FORMAT = "tinkerlm-openness/1"
OSAID_CODE = ("Model architecture", "Inference code", "Training code", "Data preprocessing code")


@dataclass
class Assessment:
    model: str
    sha256: str
    licence: str | None
    classification: mof.Classification
    evidence: dict[str, ev_mod.Evidence]
    lineage: dict
    obligations: list[str] = field(default_factory=list)
    osaid: dict = field(default_factory=dict)
    declaration: str | None = None

    @property
    def cls(self) -> int:
        return self.classification.cls

    def evidence_level(self) -> str | None:
        """ "confirmed" when every component the class counts is proven by the store, else "declared"."""
        c = self.classification
        if c.cls == 0:
            return None
        r = mof.rules()
        needed = [cid for lv in range(3, c.cls - 1, -1) for cid in r.required(lv)]
        used = [cid for cid in needed if c.statuses[cid].status == "included"]
        if r.report in needed and c.statuses[r.report].status != "included":
            used.append(r.paper)
        sources = {self.evidence[r.components[cid].name].source for cid in used}
        return ev_mod.DECLARED if ev_mod.DECLARED in sources else ev_mod.CONFIRMED

    def components(self) -> list[dict]:
        r = mof.rules()
        out = []
        for comp in sorted(r.components.values(), key=lambda c: (-c.cls, not c.required, c.id)):
            st = self.classification.statuses[comp.id]
            e = self.evidence.get(comp.name)
            out.append(
                {
                    "id": comp.id,
                    "name": comp.name,
                    "class": comp.cls,
                    "required": comp.required,
                    "content_type": comp.type,
                    "status": st.status,
                    "evidence": e.source if e else None,
                    "where": e.where if e else None,
                    "licence": e.licence if e else None,
                    "open": st.open,
                    "type_appropriate": st.type_appropriate,
                    "note": e.note if e else None,
                }
            )
        return out

    def next_class(self) -> dict | None:
        c = self.classification
        target = {0: 3, 3: 2, 2: 1}.get(c.cls)
        if target is None:
            return None
        r = mof.rules()
        missing = []
        for cid in c.missing[target]:
            comp, st = r.components[cid], c.statuses[cid]
            if st.status == "missing" and cid == r.report and c.statuses[r.paper].status != "missing":
                why = "not published, and the research paper that could stand in for it has no open licence"
            elif st.status == "missing":
                why = "not published" + (" (or a research paper in its place)" if cid == r.report else "")
            elif st.status == "unlicensed":
                why = "published without a licence"
            else:
                why = f"licence {st.licence} is not an open licence"
            missing.append({"component": comp.name, "why": why})
        return {"class": target, "label": r.labels[target], "missing": missing}

    def datasets(self) -> list[str]:
        """Hub dataset ids named by the Datasets component (for a card's `datasets`)."""
        e = self.evidence.get("Datasets")
        found = re.findall(r"huggingface\.co/datasets/([\w.-]+/[\w.-]+)", (e.where or "") if e else "")
        return list(dict.fromkeys(found))

    def to_json(self) -> dict:
        c = self.classification
        return {
            "format": FORMAT,
            "model": self.model,
            "sha256": self.sha256,
            "class": c.cls,
            "label": c.label,
            "evidence": self.evidence_level(),
            "progress": {str(k): round(v, 2) for k, v in sorted(c.progress.items())},
            "components": self.components(),
            "next_class": self.next_class(),
            "osaid": self.osaid,
            "licence": self.licence,
            "obligations": self.obligations,
            "datasets": self.datasets(),
            "declaration": self.declaration,
            "lineage": self.lineage,
        }


def assess(name: str, *, declaration: str | None = None, lenient: bool = False) -> Assessment:
    """The openness of a stored model.

    Args:
        name: a model in the store (`NAME[:TAG]`).
        declaration: a MOT-format YAML declaring what was published beyond what the store proves.
        lenient: accept free-text licences in the declaration as the MOT does (as licences that are not open).
    Raises:
        TinkerError: the model is not in the store; the declaration is unreadable or invalid (naming the line).
    """
    from tinkerlm import store
    from tinkerlm.openness import declaration as decl_mod

    m = store.find(name)
    if m is None:
        raise TinkerError(f"{name}: not in the store (see `tinkerlm list`)")
    decl = decl_mod.load(declaration, lenient=lenient) if declaration else None
    evidence, lineage = _gather(m, relation=None, depth=0)
    if decl is not None:
        evidence = ev_mod.overlay(evidence, ev_mod.declared(decl))
    licences = _licences(evidence)
    classification = mof.classify(licences)
    _, obligations, _ = lic_mod.inherit([m.license])
    a = Assessment(
        model=m.ref,
        sha256=store.digest(m),
        licence=m.license,
        classification=classification,
        evidence=evidence,
        lineage=lineage,
        obligations=obligations,
        declaration=str(declaration) if declaration else None,
    )
    a.osaid = osaid(evidence, m.license)
    lineage["class"], lineage["label"], lineage["evidence"] = a.cls, classification.label, a.evidence_level()
    return a


def _licences(evidence: dict[str, ev_mod.Evidence]) -> dict[int, str | None]:
    r = mof.rules()
    out: dict[int, str | None] = {}
    for name, e in evidence.items():
        comp = r.by_name(name)
        if comp is not None:
            out[comp.id] = e.licence
    return out


_MAX_DEPTH = 32  # lineage deeper than this is cut (a cycle written by hand into manifests)


def _gather(m, *, relation: str | None, depth: int) -> tuple[dict[str, ev_mod.Evidence], dict]:
    """The evidence for one stored model, and its lineage tree (each node classified by its own evidence)."""
    from tinkerlm import store

    own = ev_mod.own(m, None)
    node: dict = {"name": m.ref, "sha256": store.digest(m), "relation": relation, "licence": m.license, "parents": []}
    if m.parents and depth < _MAX_DEPTH:
        step = ev_mod.remix_step(m, None)
        parents: list[dict[str, ev_mod.Evidence]] = []
        for p in m.parents:
            pm = store.find(p.get("name", "")) if p.get("name") else None
            if pm is not None and p.get("sha256") and store.digest(pm) != p["sha256"]:
                pm = None  # the name now holds other weights: the parent itself is gone
            if pm is None:
                parents.append({})
                node["parents"].append(
                    {
                        "name": p.get("name"),
                        "sha256": p.get("sha256"),
                        "relation": p.get("relation"),
                        "licence": p.get("license"),
                        "class": None,
                        "label": "not in the store",
                        "evidence": None,
                        "parents": [],
                    }
                )
                continue
            pev, pnode = _gather(pm, relation=p.get("relation"), depth=depth + 1)
            pcls = mof.classify(_licences(pev))
            pnode["class"], pnode["label"] = pcls.cls, pcls.label
            pnode["evidence"] = Assessment(pm.ref, "", pm.license, pcls, pev, {}).evidence_level()
            parents.append(pev)
            node["parents"].append(pnode)
        evidence: dict[str, ev_mod.Evidence] = {}
        for name, rule in ev_mod.REMIX.items():
            if rule == "own":
                if name in own:
                    evidence[name] = own[name]
                elif name in step:
                    evidence[name] = step[name]
            elif rule == "both":
                evidence.update(ev_mod.combine([*parents, {name: step[name]}] if name in step else [{}]))
            else:
                evidence.update({k: v for k, v in ev_mod.combine(parents).items() if k == name})
    else:
        evidence = own
    builtin = ev_mod.builtin_declaration(m)
    if builtin is not None:
        evidence = ev_mod.overlay(evidence, ev_mod.declared(builtin))
    return evidence, node


def osaid(evidence: dict[str, ev_mod.Evidence], store_licence: str | None) -> dict:
    """The Open Source AI Definition 1.0 verdict: {"open_source_ai", "evidence", "checks": [{"requirement", "met",
    "detail"}], "reasons": [why not, one line each]}."""
    r = mof.rules()
    checks = []

    w = evidence.get("Model parameters (Final)")
    restrictions = []
    for part in re.split(r"\s+AND\s+", store_licence or ""):
        row = lic_mod.lookup(part)
        if row is not None and row.use_policy:
            restrictions.append(f"{row.id} restricts use ({row.use_policy})")
        elif row is not None and not row.commercial:
            restrictions.append(f"{row.id} forbids commercial use")
        elif row is not None and not row.derivatives:
            restrictions.append(f"{row.id} forbids derivatives")
    if w is None or w.licence is None:
        checks.append(("parameters", False, "the weights carry no licence"))
    elif not r.osi(w.licence):
        extra = f"; {'; '.join(restrictions)}" if restrictions else ""
        checks.append(("parameters", False, f"the weights' licence {w.licence} is not OSI-approved{extra}"))
    elif restrictions:
        checks.append(("parameters", False, "; ".join(restrictions)))
    else:
        checks.append(("parameters", True, f"weights under {w.licence} (OSI-approved)"))

    bad = []
    for name in OSAID_CODE:
        e = evidence.get(name)
        if e is None:
            bad.append(f"{name.lower()} is not published")
        elif e.licence is None or not r.osi(e.licence):
            bad.append(f"{name.lower()} is under {e.licence or 'no licence'}, not an OSI-approved licence")
    checks.append(("code", not bad, "; ".join(bad) or "architecture, inference, training and data code: OSI-approved"))

    data = [evidence.get("Datasets"), evidence.get("Data card")]
    data = [d for d in data if d is not None]
    checks.append(
        (
            "data information",
            bool(data),
            "training data listed or documented" if data else "no dataset list or data card is published",
        )
    )
    met = all(ok for _, ok, _ in checks)
    used = [evidence.get(n) for n in ("Model parameters (Final)", *OSAID_CODE, "Datasets", "Data card")]
    level = ev_mod.DECLARED if any(e is not None and e.source == ev_mod.DECLARED for e in used) else ev_mod.CONFIRMED
    return {
        "open_source_ai": met,
        "evidence": level if met else None,
        "checks": [{"requirement": req, "met": ok, "detail": d} for req, ok, d in checks],
        "reasons": [f"{req}: {d}" for req, ok, d in checks if not ok],
    }


# ---------------------------------------------------------------------------------------------------------------
# Text


def format_report(d: dict) -> str:
    """The assessment as text: class line, component table, next class, OSAID verdict, obligations."""
    level = f" ({d['evidence']})" if d.get("evidence") else ""
    prog = ", ".join(f"Class {'I' * int(k)} {v:.0f}%" for k, v in sorted(d["progress"].items()))
    lines = [f"{d['model']}: {d['label']}{level}", f"licence: {d.get('licence') or 'unknown'}; progress: {prog}", ""]
    rows = [("component", "class", "present", "licence", "fit", "evidence", "where")]
    roman = {1: "I", 2: "II", 3: "III"}
    for c in d["components"]:
        present = {"included": "yes", "missing": "no", "unlicensed": "no licence", "invalid": "not open"}[c["status"]]
        fit = "-" if c["status"] != "included" else ("yes" if c["type_appropriate"] else f"not for {c['content_type']}")
        rows.append(
            (
                c["name"] + ("" if c["required"] else " (optional)"),
                roman[c["class"]],
                present,
                c["licence"] or "-",
                fit,
                c["evidence"] or "-",
                _short((c.get("note") if c["status"] != "included" else None) or c["where"] or "-", 60),
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    for i, r in enumerate(rows):
        lines.append("  ".join(str(v).ljust(widths[j]) for j, v in enumerate(r[:-1])) + "  " + r[-1])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-----")
    nxt = d.get("next_class")
    if nxt:
        lines += ["", f"for {nxt['label']}:"] + [f"  - {m['component']}: {m['why']}" for m in nxt["missing"]]
    o = d["osaid"]
    verdict = "yes" + (f" ({o['evidence']})" if o.get("evidence") else "") if o["open_source_ai"] else "no"
    lines += ["", f"Open Source AI Definition 1.0: {verdict}"]
    lines += [f"  {'ok ' if c['met'] else 'NO '} {c['requirement']}: {c['detail']}" for c in o["checks"]]
    if d.get("obligations"):
        lines += ["", "obligations this model carries:"] + [f"  - {x}" for x in d["obligations"]]
    lines += ["", "lineage:"] + _tree(d["lineage"], "  ")
    return "\n".join(lines)


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _tree(node: dict, indent: str) -> list[str]:
    rel = f"{node['relation']}: " if node.get("relation") else ""
    label = node.get("label") or ""
    out = [f"{indent}{rel}{node['name']}  [{node.get('licence') or 'no licence'}; {label}]"]
    for p in node.get("parents", []):
        out += _tree(p, indent + "    ")
    return out


def main(a) -> None:
    import json

    result = assess(a.name, declaration=a.declaration, lenient=a.lenient).to_json()
    if a.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(result))
