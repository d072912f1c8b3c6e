"""Licence inheritance: which terms a model derived here (a merge, a fine-tune) carries from its parents.

A derived model is a derivative work of every parent, so every parent's terms apply to it at once: the result is
the conjunction of the parents' licences (an SPDX-style "A AND B"), with each one's obligations listed, and
warnings where the terms restrict use (non-commercial, acceptable-use policies, no derivatives) or where parents'
licences differ (the strictest terms win; some combinations cannot be met at all, e.g. share-alike with
non-commercial). The table is data: one `Licence` row per known licence, looked up by its Hugging Face model-card
identifier (https://huggingface.co/docs/hub/repositories-licenses) or an alias.

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
    """

    id: str
    name: str
    url: str
    commercial: bool = True
    derivatives: bool = True
    share_alike: bool = False
    use_policy: str | None = None
    obligations: tuple[str, ...] = ()

    @property
    def permissive(self) -> bool:
        return self.commercial and self.derivatives and not self.share_alike and self.use_policy is None


_LLAMA3_AUP = "https://www.llama.com/llama3/use-policy/"
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
                _LLAMA_BUILT,
                _LLAMA_NAME,
                _LLAMA_MAU,
                "follow the Llama 3 Acceptable Use Policy",
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
