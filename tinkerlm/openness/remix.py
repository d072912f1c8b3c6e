"""What every remix verb (finetune, fuse, merge, quantize, export) does about its parents' licences.

Before any heavy work, `check` refuses a remix whose parents' licences conflict (`licences.conflicts`: a
no-derivatives parent, share-alike terms another parent's restrictions break, two share-alike licences) with one
line naming the licences and the flag that overrides it, `--accept-licence-conflict`; it warns about the rest
(`licences.inherit`'s warnings, `licences.cautions`: format conversions of no-derivatives models, Llama's naming
rule). After the remix, `announce` prints the obligations the result inherits (which the verbs also store in its
manifest, `Manifest.obligations`, with the accepted conflicts in `Manifest.licence_conflicts`) and the result's
openness class (`tinkerlm.openness.assess`), which never fails the remix.

This is an aid, not legal advice: the licence texts are what binds.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from tinkerlm.errors import TinkerError
from tinkerlm.openness import licences

log = logging.getLogger(__name__)

FLAG = "--accept-licence-conflict"


@dataclass
class Terms:
    """The licence terms a remix's result carries.

    Attributes:
        licence: the inherited licence ("A AND B" when the parents' differ), None when no parent's is known.
        obligations: what distributing the result obliges, one line each, prefixed by the licence it comes from.
        conflicts: the licence conflicts accepted with `--accept-licence-conflict` (empty otherwise).
        warnings: what else to take care over (restrictions, unknown licences, naming rules); `announce` logs them
            once the remix is made, so a remix that fails for another reason says only why.
    """

    licence: str | None
    obligations: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check(parents: list[str | None], *, kind: str, name: str, accept_licence_conflict: bool = False) -> Terms:
    """The terms a remix of `kind` from models under `parents`' licences inherits; refuses a conflict.

    Args:
        parents: each parent's licence identifier (None when unknown).
        kind: one of `licences.REMIX_KINDS`.
        name: the result's name (store name or output file), for messages and naming rules.
        accept_licence_conflict: make the remix despite conflicts; they are then returned (and `announce` warns).
    Raises:
        TinkerError: the licences conflict and `accept_licence_conflict` is not set; the message names the licences,
            the reasons and the flag.
    """
    reasons = licences.conflicts(parents, kind=kind)
    if reasons and not accept_licence_conflict:
        raise TinkerError(
            f"{name}: the parents' licences conflict, so {licences.REMIX_KINDS[kind]} of them may not be made or "
            f"shared: {'; '.join(reasons)}. Nothing was written; pass {FLAG} to make it anyway for your own use "
            "(the conflict is recorded with it)"
        )
    licence, obligations, warnings = licences.inherit(parents)
    warnings += licences.cautions(parents, kind=kind, name=name)
    return Terms(None if licence == licences.UNKNOWN else licence, obligations, reasons, warnings)


def announce(ref: str, terms: Terms, *, assess: bool = True) -> None:
    """Log the warnings of the remix `ref`, print to stderr the obligations it inherits and the conflicts
    accepted, and (for a stored model, `assess`) its openness class. An assessment that fails is logged, never
    raised: the remix is already made."""
    for w in terms.warnings:
        log.warning("%s: %s", ref, w)
    lines = ["obligations this model inherits:"]
    lines += [f"  {o}" for o in terms.obligations] or ["  none recorded: read the parents' licences before sharing it"]
    if terms.conflicts:
        lines.append(f"licence conflicts accepted ({FLAG}); do not share this model:")
        lines += [f"  {c}" for c in terms.conflicts]
    print("\n".join(lines), file=sys.stderr, flush=True)
    if assess:
        openness(ref)


def openness(ref: str) -> None:
    """Print `openness: <label> (<evidence>)` for the stored model `ref`; a failure is logged as a warning."""
    from tinkerlm.openness import assess

    try:
        a = assess(ref).to_json()
        print(f"openness: {a['label']} ({a.get('evidence') or 'not confirmed'})", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - the remix is stored; an assessment problem must not fail it
        log.warning("%s: openness not assessed (%s: %s)", ref, type(e).__name__, e)
