"""Declarations: what a model's producer says was released, in the Model Openness Tool's YAML format.

A MOT model file (github.com/lfai/model_openness_tool, `models/*.yml`, `schema/mof_schema.json`) names the release
and lists the components published, each with an optional licence and paths:

    release:
      name: Pythia-70M
      license:                      # global licences: by content type, then `distribution` for the rest
        distribution: {name: Apache-2.0, path: ...}
      components:
        - name: Training code       # one of the MOF's 17 component names, exactly
          license: MIT              # an SPDX id; `unlicensed` when published without one; omitted: the global one
          component_path: https://...

Unlike the MOT, which maps an unknown component name to the first component in its list without a word, an unknown
name here is an error naming its line (with the nearest valid name). Licences must be SPDX ids (or `LicenseRef-...`
for other terms, which are not open); free text such as "Apache 2.0" or "Gemma Terms of Use" is an error naming the
line, unless `lenient=True`, which treats any other string as the MOT does: a licence that is not open.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from tinkerlm.errors import TinkerError
from tinkerlm.openness import licences, mof

UNLICENSED = "unlicensed"
_INHERIT = object()  # the component names no licence of its own: the global one applies


@dataclass
class DeclaredComponent:
    id: int
    line: int
    licence: object  # a string, None (published without a licence) or _INHERIT
    component_path: str | None = None
    license_path: str | None = None


@dataclass
class Declaration:
    path: str
    name: str
    producer: str = ""
    fields: dict = field(default_factory=dict)  # the other release fields (version, repository, huggingface, ...)
    global_licences: dict[str, str] = field(default_factory=dict)  # distribution|code|data|document -> licence
    components: dict[int, DeclaredComponent] = field(default_factory=dict)

    def licences(self) -> dict[int, str | None]:
        """Component id -> resolved licence (None: unlicensed), for the components declared: a component's own
        licence, else the global one for its content type, else the distribution licence (the MOT's order)."""
        r = mof.rules()
        out: dict[int, str | None] = {}
        for cid, c in self.components.items():
            if c.licence is _INHERIT:
                kind = r.components[cid].type
                out[cid] = self.global_licences.get(kind) or self.global_licences.get("distribution") or None
            else:
                out[cid] = c.licence  # type: ignore[assignment]
        return out

    def where(self, cid: int) -> str | None:
        c = self.components.get(cid)
        return (c.component_path or None) if c else None


def load(path: str | Path, *, lenient: bool = False) -> Declaration:
    """Read a MOT model YAML.

    Raises:
        TinkerError: unreadable or invalid YAML, a missing `release`, an unknown component name, a repeated
            component, an unknown global licence kind, or (unless `lenient`) a licence that is not an SPDX id;
            each naming the file and line.
    """
    from tinkerlm.formats import safe_yaml

    where = str(path)
    text = safe_yaml.read_text(path, "declaration")
    safe_yaml.loads(text, where)  # bounds and YAML errors first, with their messages
    import yaml

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    return _parse(root, where, lenient)


def loads(text: str, where: str = "<declaration>", *, lenient: bool = False) -> Declaration:
    """`load` for text already read."""
    from tinkerlm.formats import safe_yaml

    safe_yaml.loads(text, where)
    import yaml

    return _parse(yaml.compose(text, Loader=yaml.SafeLoader), where, lenient)


def _line(node) -> int:
    return node.start_mark.line + 1


def _mapping(node, where: str, what: str) -> dict:
    """A mapping node's entries: key -> value node (keys are scalars)."""
    import yaml

    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise TinkerError(f"{where}: line {_line(node)}: {what} should be a mapping (key: value lines)")
    out = {}
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode):
            raise TinkerError(f"{where}: line {_line(k)}: {what} has a key that is not plain text")
        out[k.value] = v
    return out


def _scalar(node, where: str, what: str) -> str | None:
    import yaml

    if node is None:
        return None
    if not isinstance(node, yaml.ScalarNode):
        raise TinkerError(f"{where}: line {_line(node)}: {what} should be a single value")
    if node.tag.endswith(":null"):
        return None
    return str(node.value)


def _licence(value: str | None, node, where: str, what: str, lenient: bool) -> str | None:
    """A declared licence: an SPDX id (exact), `LicenseRef-...`, or in lenient mode any text."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    r = mof.rules()
    if value in r.licences or value in r.open_other or value.startswith("LicenseRef-") or lenient:
        return value
    row = licences.lookup(value)  # a spelling seen in model cards ("Apache 2.0", "llama-3")
    hint = r.spdx(value) or r.spdx(re.sub(r"\s+", "-", value)) or (r.spdx(row.id) if row else None)
    suggestion = (
        f"write {hint!r}"
        if hint
        else "write its SPDX id (https://spdx.org/licenses/), or LicenseRef-<name> for other terms"
    )
    raise TinkerError(f"{where}: line {_line(node)}: {what} {value!r} is not an SPDX licence id; {suggestion}")


def _parse(root, where: str, lenient: bool) -> Declaration:
    import yaml

    if root is None:
        raise TinkerError(f"{where}: empty declaration; see `tinkerlm openness --help` for the MOT format")
    top = _mapping(root, where, "the declaration")
    if "release" not in top:
        raise TinkerError(f"{where}: line {_line(root)}: no `release:` section (the MOT format puts the model there)")
    rel = _mapping(top["release"], where, "release")
    name = _scalar(rel.get("name"), where, "release.name") or Path(where).stem
    decl = Declaration(path=where, name=name, producer=_scalar(rel.get("producer"), where, "producer") or "")
    for key in ("version", "date", "type", "architecture", "origin", "contact", "repository", "huggingface"):
        if key in rel and isinstance(rel[key], yaml.ScalarNode):
            decl.fields[key] = _scalar(rel[key], where, f"release.{key}") or ""

    kinds = ("distribution", "code", "data", "document")
    for kind, node in _mapping(rel.get("license"), where, "release.license").items():
        if kind not in kinds:
            raise TinkerError(
                f"{where}: line {_line(node)}: release.license.{kind} is not a licence kind; use {', '.join(kinds)}"
            )
        entry = _mapping(node, where, f"release.license.{kind}")
        lic = _licence(
            _scalar(entry.get("name"), where, f"release.license.{kind}.name"),
            entry.get("name", node),
            where,
            f"release.license.{kind}.name",
            lenient,
        )
        if lic:
            decl.global_licences[kind] = lic

    comps = rel.get("components")
    if comps is not None and not (isinstance(comps, yaml.ScalarNode) and comps.tag.endswith(":null")):
        if not isinstance(comps, yaml.SequenceNode):
            raise TinkerError(f"{where}: line {_line(comps)}: release.components should be a list (- name: ...)")
        r = mof.rules()
        names = [c.name for c in r.components.values()]
        for item in comps.value:
            c = _mapping(item, where, "a component")
            cname = _scalar(c.get("name"), where, "component name")
            if not cname:
                raise TinkerError(f"{where}: line {_line(item)}: a component has no name")
            comp = r.by_name(cname.strip())
            if comp is None:
                close = difflib.get_close_matches(cname, names, n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}?" if close else f"the MOF's components are: {', '.join(names)}"
                raise TinkerError(
                    f"{where}: line {_line(c['name'])}: {cname!r} is not a Model Openness Framework component; {hint}"
                )
            if comp.id in decl.components:
                first = decl.components[comp.id].line
                raise TinkerError(f"{where}: line {_line(item)}: {comp.name!r} is listed twice (also at line {first})")
            if "license" in c:
                raw = _scalar(c["license"], where, f"{comp.name} licence")
                if raw is None:  # `license:` with no value: the global licence applies, as in the MOT
                    lic: object = _INHERIT
                elif raw.strip() in ("", UNLICENSED):  # published without a licence
                    lic = None
                else:
                    lic = _licence(raw, c["license"], where, f"{comp.name}: licence", lenient)
            else:
                lic = _INHERIT
            decl.components[comp.id] = DeclaredComponent(
                comp.id,
                _line(item),
                lic,
                _scalar(c.get("component_path"), where, "component_path"),
                _scalar(c.get("license_path"), where, "license_path"),
            )
    return decl
