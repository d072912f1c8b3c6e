"""The Model Openness Framework (MOF 1.0): which class a release earns from its components and their licences.

The rules are data (`data/mof.yaml`: the 17 components, the class each belongs to, required or optional, content
type; `data/spdx.json`: SPDX licences with OSI/FSF status and the content types the MOF accepts each for). The
computation follows the Model Openness Tool (the MOF's reference implementation, github.com/lfai/model_openness_tool,
`ModelEvaluator.php`) so that a MOT declaration gets the class and progress figures the MOT shows:

- a component counts ("included") when its licence is open: OSI-approved, FSF libre, on the MOF's open-data list, or
  OpenMDW; an open licence not meant for the component's content type (MIT on a dataset) still counts, and is flagged
  as not type-appropriate;
- a component without a licence is "unlicensed", with a licence that is not open "invalid"; neither counts;
- a class is met when every required component of it and of every class above it counts (Class I needs II's and
  III's); progress is the share counted of the first class not met, and 0 below it;
- a research paper may stand in for the technical report (the report may then be omitted).

References: Model Openness Framework, arXiv:2403.13784; SPDX licence list https://spdx.org/licenses/.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Component:
    id: int
    name: str
    cls: int  # the class (3, 2 or 1) that first asks for it
    required: bool
    type: str  # "code" | "data" | "document"
    what: str


@dataclass(frozen=True)
class SpdxLicence:
    id: str
    name: str
    osi: bool
    fsf: bool
    deprecated: bool
    types: tuple[str, ...]  # content types the MOF accepts it for


@dataclass(frozen=True, eq=False)
class Rules:
    components: dict[int, Component]
    labels: dict[int, str]
    licences: dict[str, SpdxLicence]
    open_data: frozenset[str]
    open_other: frozenset[str]
    hf_to_spdx: dict[str, str]
    report: int  # the technical report's id ...
    paper: int  # ... and the research paper's, which may stand in for it
    folded: dict[str, str]  # lowercased SPDX id -> SPDX id

    def by_name(self, name: str) -> Component | None:
        for c in self.components.values():
            if c.name == name:
                return c
        return None

    def required(self, cls: int) -> list[int]:
        return [c.id for c in self.components.values() if c.cls == cls and c.required]

    def optional(self, cls: int) -> list[int]:
        return [c.id for c in self.components.values() if c.cls == cls and not c.required]

    def is_open(self, licence: str) -> bool:
        """OSI-approved, FSF libre, an open-data licence, or OpenMDW (exact SPDX id, as the MOT compares). An
        expression "A AND B" is open when every part is, "A OR B" when one is."""
        return _expression(licence, self._open_id)

    def _open_id(self, licence: str) -> bool:
        row = self.licences.get(licence)
        return bool(row and (row.osi or row.fsf)) or licence in self.open_data or licence in self.open_other

    def fits(self, licence: str, content_type: str) -> bool:
        """Whether the MOF accepts `licence` for content of this type (code, data or document)."""
        return _expression(licence, lambda one: content_type in getattr(self.licences.get(one), "types", ()))

    def osi(self, licence: str) -> bool:
        """OSI-approved (every part of an AND, one part of an OR)."""
        return _expression(licence, lambda one: bool(getattr(self.licences.get(one), "osi", False)))

    def spdx(self, licence: str | None) -> str | None:
        """The SPDX id for a licence written as an SPDX id in any case, or as a Hugging Face licence id
        ("apache-2.0" -> "Apache-2.0", "odc-by" -> "ODC-By-1.0"); None when it is neither."""
        if not licence:
            return None
        text = licence.strip()
        if text in self.licences or text in self.open_other:
            return text
        key = text.lower()
        if key in self.hf_to_spdx:
            return self.hf_to_spdx[key]
        return self.folded.get(key)


def _expression(licence: str, test) -> bool:
    """`test` over an SPDX expression of ANDs and ORs (no parentheses); a plain id is tested as is."""
    if " AND " not in licence and " OR " not in licence:
        return test(licence)
    return any(all(test(p.strip()) for p in alt.split(" AND ")) for alt in licence.split(" OR "))


@functools.cache
def rules() -> Rules:
    """The MOF's rules, read once from the package data."""
    import yaml

    mof = yaml.safe_load((DATA / "mof.yaml").read_text(encoding="utf-8"))
    spdx = json.loads((DATA / "spdx.json").read_text(encoding="utf-8"))
    comps = {
        c["id"]: Component(c["id"], c["name"], c["class"], c["required"], c["type"], c["what"])
        for c in mof["components"]
    }
    lics = {row[0]: SpdxLicence(row[0], row[1], row[2], row[3], row[4], tuple(row[5])) for row in spdx["licences"]}
    return Rules(
        components=comps,
        labels={int(k): v for k, v in mof["classes"].items()},
        licences=lics,
        open_data=frozenset(spdx["open_data"]),
        open_other=frozenset(spdx["open_other"]),
        hf_to_spdx=dict(spdx["hf_to_spdx"]),
        report=mof["paper_for_report"]["report"],
        paper=mof["paper_for_report"]["paper"],
        folded={k.lower(): k for k in [*lics, *spdx["open_other"]]},
    )


# ---------------------------------------------------------------------------------------------------------------
# Classification


@dataclass
class Status:
    """One component's standing: "included" (open licence), "invalid" (a licence that is not open), "unlicensed"
    or "missing"; `type_appropriate` is False for an open licence the MOF does not list for its content type."""

    status: str
    licence: str | None = None
    open: bool = False
    type_appropriate: bool = False


@dataclass
class Classification:
    cls: int  # 1, 2, 3, or 0 for unclassified
    label: str
    progress: dict[int, float]  # class -> percent of its requirements met (the MOT's figure)
    statuses: dict[int, Status]  # component id -> status
    missing: dict[int, list[int]] = field(default_factory=dict)  # class -> required components not counted


def classify(licences: dict[int, str | None]) -> Classification:
    """The MOF class of a release.

    Args:
        licences: component id -> its resolved licence (an SPDX id, or any other string, which is not open), or
            None when the component is released without a licence. Components not in the dict are not released.
    Returns:
        The class, its label, each class's progress and each component's status.
    """
    r = rules()
    statuses: dict[int, Status] = {}
    for cid, comp in r.components.items():
        if cid not in licences:
            statuses[cid] = Status("missing")
            continue
        lic = licences[cid]
        if lic is None or lic == "":
            statuses[cid] = Status("unlicensed")
        elif r.is_open(lic):
            statuses[cid] = Status("included", lic, True, r.fits(lic, comp.type))
        else:
            statuses[cid] = Status("invalid", lic)

    def counted(cid: int) -> bool:
        return statuses[cid].status == "included"

    # The paper stands in for the report: when the report does not count and the paper was released (with any
    # licence), the report is no longer missing, and the paper is judged in its place for Classes III and II.
    stand_in = not counted(r.report) and statuses[r.paper].status != "missing"

    progress: dict[int, float] = {}
    missing: dict[int, list[int]] = {}
    for cls in (3, 2, 1):
        total, included, met_above = 0, 0, True
        for level in range(3, cls - 1, -1):
            req = r.required(level)
            total += len(req)
            # counted components among every required one up to this level, the paper in the report's place
            needed = [cid for lv in range(3, level - 1, -1) for cid in r.required(lv)]
            included = sum(counted(cid) for cid in needed)
            if stand_in and level > 1 and counted(r.paper):
                included += 1
            if included < total:
                met_above = level == cls
                break
        if not met_above:
            progress[cls] = 0.0
        else:
            if cls == 1 and not counted(r.report) and counted(r.paper):
                total -= 1
            progress[cls] = min(100.0, included / total * 100)
        needed = [cid for lv in range(3, cls - 1, -1) for cid in r.required(lv)]
        missing[cls] = [cid for cid in needed if not counted(cid) and not (cid == r.report and counted(r.paper))]
    cls = next((c for c in (1, 2, 3) if progress[c] == 100.0), 0)
    return Classification(cls, r.labels[cls], progress, statuses, missing)
