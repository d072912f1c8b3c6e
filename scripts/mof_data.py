"""Rebuild tinkerlm/openness/data/spdx.json from a snapshot of the Model Openness Tool (MIT licence).

    python scripts/mof_data.py /path/to/model_openness_tool

Reads the MOT's licence lists (web/modules/mof/licenses.json: the SPDX licence list, CC0; mof-licenses.json: the
content types the MOF accepts each licence for) and its open-data list (LicenseHandler.php), and writes one compact
table: SPDX id -> name, OSI-approved, FSF libre, deprecated, content types. Where the MOT's second list repeats an id
with another content type (CC0-1.0, CC-PDDC), the types are joined; the MOT's importer keeps only the last.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tinkerlm" / "openness" / "data" / "spdx.json"

# Hugging Face model-card licence ids (https://huggingface.co/docs/hub/repositories-licenses) whose SPDX id is not
# the same string in another case; the rest match case-insensitively, and ids with no SPDX entry (llama3, gemma,
# openrail, ...) are custom terms.
HF_TO_SPDX = {
    "agpl-3.0": "AGPL-3.0-only",
    "gpl-2.0": "GPL-2.0-only",
    "gpl-3.0": "GPL-3.0-only",
    "lgpl-2.1": "LGPL-2.1-only",
    "lgpl-3.0": "LGPL-3.0-only",
    "gfdl": "GFDL-1.3-only",
    "odc-by": "ODC-By-1.0",
    "odbl": "ODbL-1.0",
    "pddl": "PDDL-1.0",
    "c-uda": "C-UDA-1.0",
    "bsd-3-clause-clear": "BSD-3-Clause-Clear",
    "cc0-1.0": "CC0-1.0",
    "openmdw-1.0": "OpenMDW-1.0",
}


def git_show(repo: Path, path: str) -> str:
    if (repo / path).exists():
        return (repo / path).read_text(encoding="utf-8")
    return subprocess.check_output(["git", "--git-dir", str(repo), "show", f"HEAD:{path}"], text=True)


def main(repo: str) -> None:
    root = Path(repo)
    spdx = json.loads(git_show(root, "web/modules/mof/licenses.json"))
    mof = json.loads(git_show(root, "web/modules/mof/mof-licenses.json"))
    handler = git_show(root, "web/modules/mof/src/LicenseHandler.php")
    open_data = re.findall(r"'([^']+)'", handler.split("OPEN_DATA_LICENSES", 1)[1].split("];", 1)[0])
    open_other = re.findall(r"'([^']+)'", handler.split("const OPEN_LICENSES", 1)[1].split("];", 1)[0])
    table: dict[str, dict] = {}
    for lic in spdx["licenses"]:
        table[lic["licenseId"]] = {
            "name": lic["name"],
            "osi": bool(lic.get("isOsiApproved")),
            "fsf": bool(lic.get("isFsfLibre")),
            "deprecated": bool(lic.get("isDeprecatedLicenseId")),
            "types": [],
        }
    for lic in mof["licenses"]:  # the MOF's list overrides the flags, as the MOT's importer does
        row = table.setdefault(lic["licenseId"], {"name": lic["name"], "deprecated": False, "types": []})
        row["osi"] = bool(lic.get("isOsiApproved"))
        row["fsf"] = bool(lic.get("isFsfLibre"))
        types = lic.get("ContentType") or []
        for t in [types] if isinstance(types, str) else types:
            if t not in row["types"]:
                row["types"].append(t)
    hf = dict(HF_TO_SPDX)
    for k in HF_TO_SPDX.values():
        assert k in table, k
    out = {
        "about": "SPDX licences with the MOF's acceptable content types; built by scripts/mof_data.py from the "
        "Model Openness Tool (github.com/lfai/model_openness_tool, MIT) and the SPDX licence list (CC0-1.0)",
        "spdx_list_version": spdx["licenseListVersion"],
        "open_data": open_data,
        "open_other": open_other,
        "hf_to_spdx": hf,
        "licences": [[k, r["name"], r["osi"], r["fsf"], r["deprecated"], r["types"]] for k, r in sorted(table.items())],
    }
    OUT.write_text(json.dumps(out, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(table)} licences)")


if __name__ == "__main__":
    main(sys.argv[1])
