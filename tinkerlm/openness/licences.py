"""Licence inheritance: which terms a model derived here (a merge, a fine-tune) carries from its parents.

A derived model is a derivative work of every parent, so every parent's terms apply to it at once: the result is
the conjunction of the parents' licences (an SPDX-style "A AND B"), with each one's obligations listed, and
warnings where the terms restrict use (non-commercial, acceptable-use policies, no derivatives) or where parents'
licences differ (the strictest terms win; some combinations cannot be met at all, e.g. share-alike with
non-commercial). The table is data: one `Licence` row per known licence, looked up by its Hugging Face model-card
identifier (https://huggingface.co/docs/hub/repositories-licenses) or an alias.

`conflicts(parents, kind=...)` says why a remix of given parents may not be made or shared at all (a parent that
forbids derivatives; share-alike terms that another parent's restrictions break; two share-alike licences that
cannot both be met), and `cautions(parents, kind=..., name=...)` what is allowed but needs care (a technical
modification of a no-derivatives model; Llama's naming rule). The verbs refuse a conflicting remix unless
`--accept-licence-conflict` is given (`tinkerlm.openness.remix`).

This is an aid, not legal advice: the licence texts referenced in each row are what binds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Obligation texts shared by several rows.
_NOTICE = "keep the copyright and licence notices of the parent weights"
_CHANGES = "state that the weights were changed (e.g. in the model card)"
_ATTRIBUTE = "credit the parent model's authors and link its licence"
_LLAMA_MAU = "products or services with more than 700 million monthly active users need a separate licence from Meta"
_LLAMA_NAME = 'the model name must begin with "Llama" when the model is distributed'
_LLAMA_BUILT = 'display "Built with Llama" with products or services that use it'
_GPL_SOURCE = "convey the derived model with its corresponding source (the weights in their preferred form for changes)"


@dataclass(frozen=True)
class Licence:
    """What a licence asks of a derived model.

    Attributes:
        id: Hugging Face / SPDX-style identifier used in manifests and model cards.
        name: human-readable name.
        url: the licence text.
        commercial: commercial use allowed.
        derivatives: derivative works (merges, fine-tunes) allowed.
        share_alike: derivatives must be released under the same licence.
        use_policy: an acceptable-use policy (or use-based restrictions) travels with the weights; its URL.
        obligations: what someone distributing the derived model must do.
        compatible_with: for a share-alike licence, the other share-alike licences its derivatives may be released
            under (so the two can be combined, the result carrying the latter): CC BY-SA 3.0 -> 4.0 (its section
            4(b), "a later version"), CC BY-SA 4.0 -> GPL-3.0 (CC's compatibility list), (L)GPL-3.0 <-> AGPL-3.0
            (section 13 of each).
        incompatible: licences this one cannot be combined with though neither restricts use (GPL-2.0 and
            Apache-2.0, by the FSF: Apache's patent terms are restrictions GPL-2.0 does not allow).
        name_rule: a regular expression a distributed derived model's name must start with (case ignored), and the
            rule in words: Llama 3.x's "include Llama at the beginning of any such AI model name".
    """

    id: str
    name: str
    url: str
    commercial: bool = True
    derivatives: bool = True
    share_alike: bool = False
    use_policy: str | None = None
    obligations: tuple[str, ...] = ()
    compatible_with: tuple[str, ...] = ()
    incompatible: tuple[str, ...] = ()
    name_rule: tuple[str, str] | None = None

    @property
    def permissive(self) -> bool:
        return self.commercial and self.derivatives and not self.share_alike and self.use_policy is None


_LLAMA3_AUP = "https://www.llama.com/llama3/use-policy/"
_LLAMA_NAME_RULE = ("llama", 'a distributed derived model\'s name must begin with "Llama" (section 1.b.i)')
_OPENRAIL_USE = "use-based restrictions (Attachment A of the licence) must be passed on to every user"

LICENCES: dict[str, Licence] = {
    lic.id: lic
    for lic in [
        Licence(
            "apache-2.0",
            "Apache License 2.0",
            "https://www.apache.org/licenses/LICENSE-2.0",
            obligations=(_NOTICE, "include the Apache-2.0 licence text and any NOTICE file", _CHANGES),
        ),
        Licence("mit", "MIT License", "https://opensource.org/license/mit", obligations=(_NOTICE,)),
        Licence(
            "bsd-2-clause",
            "BSD 2-Clause License",
            "https://opensource.org/license/bsd-2-clause",
            obligations=(_NOTICE,),
        ),
        Licence(
            "bsd-3-clause",
            "BSD 3-Clause License",
            "https://opensource.org/license/bsd-3-clause",
            obligations=(_NOTICE, "do not use the parent authors' names to endorse the model"),
        ),
        Licence(
            "cc-by-4.0",
            "Creative Commons Attribution 4.0",
            "https://creativecommons.org/licenses/by/4.0/",
            obligations=(_ATTRIBUTE, _CHANGES),
        ),
        Licence(
            "cc-by-sa-4.0",
            "Creative Commons Attribution-ShareAlike 4.0",
            "https://creativecommons.org/licenses/by-sa/4.0/",
            share_alike=True,
            compatible_with=("gpl-3.0",),
            obligations=(_ATTRIBUTE, _CHANGES, "release the derived model under CC-BY-SA-4.0 (share-alike)"),
        ),
        Licence(
            "cc-by-nc-4.0",
            "Creative Commons Attribution-NonCommercial 4.0",
            "https://creativecommons.org/licenses/by-nc/4.0/",
            commercial=False,
            obligations=(_ATTRIBUTE, _CHANGES, "no commercial use"),
        ),
        Licence(
            "cc-by-nc-sa-4.0",
            "Creative Commons Attribution-NonCommercial-ShareAlike 4.0",
            "https://creativecommons.org/licenses/by-nc-sa/4.0/",
            commercial=False,
            share_alike=True,
            obligations=(
                _ATTRIBUTE,
                _CHANGES,
                "no commercial use",
                "release the derived model under CC-BY-NC-SA-4.0 (share-alike)",
            ),
        ),
        Licence(
            "cc-by-nc-nd-4.0",
            "Creative Commons Attribution-NonCommercial-NoDerivatives 4.0",
            "https://creativecommons.org/licenses/by-nc-nd/4.0/",
            commercial=False,
            derivatives=False,
            obligations=(_ATTRIBUTE, "no commercial use", "derived models may not be shared"),
        ),
        Licence(
            "cc-by-nd-4.0",
            "Creative Commons Attribution-NoDerivatives 4.0",
            "https://creativecommons.org/licenses/by-nd/4.0/",
            derivatives=False,
            obligations=(_ATTRIBUTE, "derived models may not be shared"),
        ),
        Licence(
            "cc-by-3.0",
            "Creative Commons Attribution 3.0",
            "https://creativecommons.org/licenses/by/3.0/",
            obligations=(_ATTRIBUTE, _CHANGES),
        ),
        Licence(
            "cc-by-sa-3.0",
            "Creative Commons Attribution-ShareAlike 3.0",
            "https://creativecommons.org/licenses/by-sa/3.0/",
            share_alike=True,
            compatible_with=("cc-by-sa-4.0",),
            obligations=(
                _ATTRIBUTE,
                _CHANGES,
                "release the derived model under CC-BY-SA-3.0 or a later version (share-alike)",
            ),
        ),
        Licence(
            "cc-by-nc-3.0",
            "Creative Commons Attribution-NonCommercial 3.0",
            "https://creativecommons.org/licenses/by-nc/3.0/",
            commercial=False,
            obligations=(_ATTRIBUTE, _CHANGES, "no commercial use"),
        ),
        Licence(
            "cc-by-nc-sa-3.0",
            "Creative Commons Attribution-NonCommercial-ShareAlike 3.0",
            "https://creativecommons.org/licenses/by-nc-sa/3.0/",
            commercial=False,
            share_alike=True,
            compatible_with=("cc-by-nc-sa-4.0",),
            obligations=(
                _ATTRIBUTE,
                _CHANGES,
                "no commercial use",
                "release the derived model under CC-BY-NC-SA-3.0 or a later version (share-alike)",
            ),
        ),
        Licence(
            "cc-by-nc-nd-3.0",
            "Creative Commons Attribution-NonCommercial-NoDerivs 3.0",
            "https://creativecommons.org/licenses/by-nc-nd/3.0/",
            commercial=False,
            derivatives=False,
            obligations=(_ATTRIBUTE, "no commercial use", "derived models may not be shared"),
        ),
        Licence(
            "cc0-1.0",
            "Creative Commons Zero 1.0 (public domain dedication)",
            "https://creativecommons.org/publicdomain/zero/1.0/",
        ),
        Licence(
            "odc-by",
            "Open Data Commons Attribution License 1.0",
            "https://opendatacommons.org/licenses/by/1-0/",
            obligations=(_ATTRIBUTE, "keep the ODC-By notice with any public use of the database"),
        ),
        Licence(
            "openmdw-1.0",
            "OpenMDW License 1.0",
            "https://openmdw.ai/license/",
            obligations=(_NOTICE, "include the OpenMDW licence text with the model"),
        ),
        Licence(
            "gpl-2.0",
            "GNU General Public License v2.0 only",
            "https://www.gnu.org/licenses/old-licenses/gpl-2.0.html",
            share_alike=True,
            incompatible=("apache-2.0",),
            obligations=(_NOTICE, _GPL_SOURCE, "release the derived model under GPL-2.0 (copyleft)"),
        ),
        Licence(
            "gpl-3.0",
            "GNU General Public License v3.0",
            "https://www.gnu.org/licenses/gpl-3.0.html",
            share_alike=True,
            compatible_with=("agpl-3.0",),
            obligations=(_NOTICE, _CHANGES, _GPL_SOURCE, "release the derived model under GPL-3.0 (copyleft)"),
        ),
        Licence(
            "lgpl-3.0",
            "GNU Lesser General Public License v3.0",
            "https://www.gnu.org/licenses/lgpl-3.0.html",
            share_alike=True,
            compatible_with=("gpl-3.0", "agpl-3.0"),
            obligations=(_NOTICE, _CHANGES, _GPL_SOURCE, "release the changed model under LGPL-3.0 (copyleft)"),
        ),
        Licence(
            "agpl-3.0",
            "GNU Affero General Public License v3.0",
            "https://www.gnu.org/licenses/agpl-3.0.html",
            share_alike=True,
            compatible_with=("gpl-3.0",),
            obligations=(
                _NOTICE,
                _CHANGES,
                _GPL_SOURCE,
                "offer that source to everyone who uses the model over a network",
                "release the derived model under AGPL-3.0 (copyleft)",
            ),
        ),
        Licence(
            "llama2",
            "Llama 2 Community License",
            "https://ai.meta.com/llama/license/",
            use_policy="https://ai.meta.com/llama/use-policy/",
            obligations=(
                "include the Llama 2 licence and its attribution notice",
                _LLAMA_MAU,
                "follow the Llama 2 Acceptable Use Policy",
                "do not use the model or its outputs to improve other large language models",
            ),
        ),
        Licence(
            "llama3",
            "Meta Llama 3 Community License",
            "https://www.llama.com/llama3/license/",
            use_policy=_LLAMA3_AUP,
            obligations=(
                "include the Llama 3 licence and its attribution notice",
                'display "Built with Meta Llama 3" with products or services that use it',
                'the model name must begin with "Llama 3" when the model is distributed',
                _LLAMA_MAU,
                "follow the Llama 3 Acceptable Use Policy",
            ),
            name_rule=(
                r"llama[-_.]?3",
                'a distributed derived model\'s name must begin with "Llama 3" (section 1.b.i)',
            ),
        ),
        Licence(
            "llama3.1",
            "Llama 3.1 Community License",
            "https://www.llama.com/llama3_1/license/",
            use_policy="https://www.llama.com/llama3_1/use-policy/",
            obligations=(
                "include the Llama 3.1 licence and its attribution notice",
                _LLAMA_BUILT,
                _LLAMA_NAME,
                _LLAMA_MAU,
                "follow the Llama 3.1 Acceptable Use Policy",
            ),
            name_rule=_LLAMA_NAME_RULE,
        ),
        Licence(
            "llama3.2",
            "Llama 3.2 Community License",
            "https://www.llama.com/llama3_2/license/",
            use_policy="https://www.llama.com/llama3_2/use-policy/",
            obligations=(
                "include the Llama 3.2 licence and its attribution notice",
                _LLAMA_BUILT,
                _LLAMA_NAME,
                _LLAMA_MAU,
                "follow the Llama 3.2 Acceptable Use Policy",
            ),
            name_rule=_LLAMA_NAME_RULE,
        ),
        Licence(
            "llama3.3",
            "Llama 3.3 Community License",
            "https://www.llama.com/llama3_3/license/",
            use_policy="https://www.llama.com/llama3_3/use-policy/",
            obligations=(
                "include the Llama 3.3 licence and its attribution notice",
                _LLAMA_BUILT,
                _LLAMA_NAME,
                _LLAMA_MAU,
                "follow the Llama 3.3 Acceptable Use Policy",
            ),
            name_rule=_LLAMA_NAME_RULE,
        ),
        Licence(
            "gemma",
            "Gemma Terms of Use",
            "https://ai.google.dev/gemma/terms",
            use_policy="https://ai.google.dev/gemma/prohibited_use_policy",
            obligations=(
                "pass the Gemma Terms of Use and their use restrictions on to every recipient",
                "follow the Gemma Prohibited Use Policy",
                _CHANGES,
            ),
        ),
        Licence(
            "openrail",
            "Open RAIL License",
            "https://huggingface.co/blog/open_rail",
            use_policy="https://huggingface.co/blog/open_rail",
            obligations=(_OPENRAIL_USE, _ATTRIBUTE),
        ),
        Licence(
            "openrail++",
            "Open RAIL++-M License",
            "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md",
            use_policy="https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md",
            obligations=(_OPENRAIL_USE, _ATTRIBUTE),
        ),
        Licence(
            "creativeml-openrail-m",
            "CreativeML Open RAIL-M",
            "https://huggingface.co/spaces/CompVis/stable-diffusion-license",
            use_policy="https://huggingface.co/spaces/CompVis/stable-diffusion-license",
            obligations=(_OPENRAIL_USE, _ATTRIBUTE),
        ),
        Licence(
            "bigscience-openrail-m",
            "BigScience Open RAIL-M",
            "https://bigscience.huggingface.co/blog/bigscience-openrail-m",
            use_policy="https://bigscience.huggingface.co/blog/bigscience-openrail-m",
            obligations=(_OPENRAIL_USE, _ATTRIBUTE),
        ),
        Licence(
            "bigscience-bloom-rail-1.0",
            "BigScience BLOOM RAIL 1.0",
            "https://bigscience.huggingface.co/blog/the-bigscience-rail-license",
            use_policy="https://bigscience.huggingface.co/blog/the-bigscience-rail-license",
            obligations=(_OPENRAIL_USE, _ATTRIBUTE),
        ),
    ]
}

# Other spellings seen in model cards, GGUF `general.license` and SPDX -> table id.
ALIASES = {
    "apache 2.0": "apache-2.0",
    "apache2": "apache-2.0",
    "apache-2": "apache-2.0",
    "apache license 2.0": "apache-2.0",
    "bsd": "bsd-3-clause",
    "bsd-3": "bsd-3-clause",
    "bsd-2": "bsd-2-clause",
    "cc-by-sa": "cc-by-sa-4.0",
    "cc-by-nc": "cc-by-nc-4.0",
    "cc-by-nc-sa": "cc-by-nc-sa-4.0",
    "cc-by-nc-nd": "cc-by-nc-nd-4.0",
    "cc-by": "cc-by-4.0",
    "cc-by-nd": "cc-by-nd-4.0",
    "cc0": "cc0-1.0",
    "odc-by-1.0": "odc-by",
    "openmdw": "openmdw-1.0",
    "gpl-2.0-only": "gpl-2.0",
    "gplv2": "gpl-2.0",
    "gpl-3": "gpl-3.0",
    "gplv3": "gpl-3.0",
    "gpl-3.0-only": "gpl-3.0",
    "gpl-3.0-or-later": "gpl-3.0",
    "gpl-3.0+": "gpl-3.0",
    "lgpl-3.0-only": "lgpl-3.0",
    "lgpl-3.0-or-later": "lgpl-3.0",
    "lgplv3": "lgpl-3.0",
    "agpl-3.0-only": "agpl-3.0",
    "agpl-3.0-or-later": "agpl-3.0",
    "agplv3": "agpl-3.0",
    "llama-2": "llama2",
    "llama 2": "llama2",
    "llama-3": "llama3",
    "llama-3.1": "llama3.1",
    "llama-3.2": "llama3.2",
    "llama-3.3": "llama3.3",
    "gemma-terms": "gemma",
}

UNKNOWN = "unknown"  # no licence recorded, or "other": the terms must be read by hand


def lookup(licence: str | None) -> Licence | None:
    """The table row for a licence identifier (case and common variants forgiven), or None if unknown."""
    if not licence:
        return None
    key = re.sub(r"\s+", " ", licence.strip().lower())
    key = ALIASES.get(key, key)
    return LICENCES.get(key)


def _split(licence: str | None) -> list[str]:
    """'apache-2.0 AND mit' -> ['apache-2.0', 'mit']; a missing licence is 'unknown'."""
    if not licence or not licence.strip():
        return [UNKNOWN]
    return [p.strip() for p in re.split(r"\s+AND\s+", licence.strip(), flags=re.I) if p.strip()]


def inherit(parents: list[str | None]) -> tuple[str, list[str], list[str]]:
    """The licence a model derived from `parents` carries, what it obliges, and what to warn about.

    Args:
        parents: each parent's licence identifier (None or "" when unknown); a parent may itself carry a
            conjunction "A AND B" from an earlier merge.

    Returns:
        (licence, obligations, warnings): `licence` is the one parent licence when all agree, else the
        conjunction of the distinct ones ("apache-2.0 AND llama3.1"); `obligations` are one line each, with the
        licence they come from; `warnings` flag restrictions and conflicts.
    """
    ids: list[str] = []
    for p in parents or [None]:
        for part in _split(p):
            row = lookup(part)
            ident = row.id if row else part.lower()
            if ident not in ids:
                ids.append(ident)
    known = [LICENCES[i] for i in ids if i in LICENCES]
    unknown = [i for i in ids if i not in LICENCES]
    licence = " AND ".join(ids)

    obligations = [f"{lic.id}: {o}" for lic in known for o in lic.obligations]
    for lic in known:
        if lic.use_policy:
            obligations.append(f"{lic.id}: acceptable-use terms: {lic.use_policy}")

    warnings = []
    if len(ids) > 1:
        warnings.append(
            f"the parents' licences differ ({', '.join(ids)}): the derived model carries all of their terms at once"
        )
    for i in unknown:
        what = "no licence is recorded for a parent" if i == UNKNOWN else f"licence {i!r} is not in tinkerlm's table"
        warnings.append(f"{what}: read the parent's terms before using or sharing the derived model")
    for lic in known:
        if not lic.derivatives:
            warnings.append(f"{lic.id} forbids sharing derived models: keep the derived model private")
        if not lic.commercial:
            warnings.append(f"{lic.id} is non-commercial: the derived model may not be used commercially")
        if lic.use_policy:
            warnings.append(f"{lic.id} restricts use by an acceptable-use policy ({lic.use_policy})")
    share_alike = [lic for lic in known if lic.share_alike]
    if share_alike and len(ids) > 1:
        names = ", ".join(lic.id for lic in share_alike)
        warnings.append(
            f"{names} requires derived models to carry the same licence, which the other parents' terms "
            f"may not allow: the combination may not be distributable"
        )
    return licence, obligations, warnings


# ---------------------------------------------------------------------------------------------------------------
# Conflicts: remixes whose parents' terms cannot all be met

REMIX_KINDS = {  # kind -> what it makes, for messages
    "finetune": "a fine-tune",
    "adapter": "a LoRA adapter",
    "merge": "a merge",
    "fuse": "a fused adapter",
    "quantize": "a quantization",
    "export": "a format export",
}
# Format shifts: a quantization or a format export changes how the weights are stored, not what the model is.
# CC 4.0 section 2(a)(4) lets a licensee "make technical modifications necessary" to use the work in other media and
# formats and says such modifications "never produce Adapted Material" (CC 3.0 section 3 has the same clause), so a
# no-derivatives model may be quantized or exported; a fine-tune, adapter, merge or fuse makes Adapted Material.
TECHNICAL_KINDS = ("quantize", "export")


def _known(parents: list[str | None]) -> list[Licence]:
    """The table rows of the parents' licences, each once, in order; unknown licences are left out (they are
    warnings of `inherit`, never conflicts)."""
    rows: list[Licence] = []
    for p in parents or []:
        for part in _split(p):
            row = lookup(part)
            if row is not None and row not in rows:
                rows.append(row)
    return rows


def _reaches(a: Licence, b: Licence) -> bool:
    """Adapted material under share-alike `a` may be released under share-alike `b` (directly or in steps)."""
    seen, todo = {a.id}, list(a.compatible_with)
    while todo:
        i = todo.pop()
        if i == b.id:
            return True
        if i not in seen and i in LICENCES:
            seen.add(i)
            todo += LICENCES[i].compatible_with
    return False


def _added(share_alike: Licence, other: Licence) -> list[str]:
    """The restrictions `other` adds to what `share_alike` allows (share-alike forbids adding any)."""
    out = []
    if share_alike.commercial and not other.commercial:
        out.append("a non-commercial restriction")
    if other.use_policy and other.use_policy != share_alike.use_policy:
        out.append(f"an acceptable-use policy ({other.use_policy})")
    if not other.derivatives:
        out.append("a no-derivatives restriction")
    return out


def conflicts(parents: list[str | None], *, kind: str) -> list[str]:
    """Why a remix of `kind` made from models under `parents`' licences may not be made or shared: one line each,
    naming the licences and the reason; empty when there is none.

    The rules: a parent that forbids derivatives (CC BY-ND, BY-NC-ND) refuses fine-tunes, adapters, merges and fuses
    (a quantization or export is a technical modification, allowed: see `cautions`); a share-alike parent (CC
    BY-SA, BY-NC-SA, GPL family) refuses any other parent whose terms add restrictions (non-commercial, an
    acceptable-use policy, no derivatives), because share-alike licences forbid imposing further restrictions on
    derived works; two share-alike licences refuse each other unless one lets its derivatives be released under the
    other (`Licence.compatible_with`); and pairs known to be incompatible (`Licence.incompatible`) refuse each
    other. Licences without share-alike terms only add up (non-commercial with a use policy is allowed: both
    restrict, neither forbids the other's restriction). Unknown licences are never conflicts: `inherit` warns.

    Args:
        parents: each parent's licence identifier (a parent may carry "A AND B" from an earlier merge).
        kind: one of `REMIX_KINDS`.
    Raises:
        ValueError: an unknown `kind` (a bug in the caller).
    """
    if kind not in REMIX_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(REMIX_KINDS)}")
    known = _known(parents)
    derivative = kind not in TECHNICAL_KINDS
    reasons = []
    if derivative:
        for lic in known:
            if not lic.derivatives:
                others = [o.id for o in known if o is not lic]
                with_ = f" (with {', '.join(others)})" if others else ""
                reasons.append(
                    f"{lic.id}{with_}: {lic.name} forbids derivative models, and {REMIX_KINDS[kind]} is one "
                    "(only unmodified copies and format conversions may be shared)"
                )
    for i, a in enumerate(known):
        for b in known[i + 1 :]:
            if a.share_alike and b.share_alike:
                if not (_reaches(a, b) or _reaches(b, a)):
                    reasons.append(
                        f"{a.id} and {b.id}: two different share-alike licences, each requiring the derived model "
                        "to be released under its own terms only; no licence meets both"
                    )
                    continue
            for sa, other in ((a, b), (b, a)):
                if not sa.share_alike or other.share_alike:
                    continue
                added = [r for r in _added(sa, other) if not (derivative and r == "a no-derivatives restriction")]
                if added:
                    reasons.append(
                        f"{sa.id} and {other.id}: {other.id} adds {' and '.join(added)}, but {sa.id} is share-alike "
                        "and forbids adding restrictions to derived models"
                    )
            if b.id in a.incompatible or a.id in b.incompatible:
                reasons.append(f"{a.id} and {b.id}: known to be incompatible (their terms cannot be met together)")
    return reasons


def cautions(parents: list[str | None], *, kind: str, name: str | None = None) -> list[str]:
    """What a remix of `kind` named `name` may do but must take care over: a format conversion of a
    no-derivatives model (allowed as a technical modification), and naming rules such as Llama 3.x's (the name
    must begin with "Llama"). One line each; none of these refuse the remix."""
    known = _known(parents)
    out = []
    if kind in TECHNICAL_KINDS:
        for lic in known:
            if not lic.derivatives:
                out.append(
                    f"{lic.id} forbids derivative models; {REMIX_KINDS[kind]} is a technical modification (CC 4.0 section "
                    "2(a)(4)), not Adapted Material, so it is allowed: share it only with the licence and "
                    "attribution, and keep it otherwise unchanged"
                )
    if name is not None:
        stem = name.partition(":")[0]
        for lic in known:
            if lic.name_rule and not re.match(lic.name_rule[0], stem, flags=re.I):
                out.append(
                    f"{lic.id}: {lic.name_rule[1]}, and {stem!r} does not; rename it before sharing it "
                    f"({lic.name}, {lic.url})"
                )
    return out
