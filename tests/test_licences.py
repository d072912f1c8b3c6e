"""Licence inheritance for derived models (merges, fine-tunes): the table lookup, the combined licence, obligations
and warnings."""

import pytest

from tinkerlm.openness.licences import LICENCES, inherit, lookup


def test_one_parent_passes_its_licence_on():
    licence, terms, warnings = inherit(["apache-2.0"])
    assert licence == "apache-2.0"
    assert any("NOTICE" in t for t in terms) and all(t.startswith("apache-2.0: ") for t in terms)
    assert warnings == []


def test_same_licence_twice_is_one_licence_without_warnings():
    assert inherit(["mit", "MIT"]) == inherit(["mit"])


@pytest.mark.parametrize(
    "spelling,expected",
    [
        ("Apache 2.0", "apache-2.0"),
        ("LLAMA3.1", "llama3.1"),
        ("llama-2", "llama2"),
        ("cc-by-nc", "cc-by-nc-4.0"),
        ("bsd", "bsd-3-clause"),
    ],
)
def test_aliases(spelling, expected):
    assert lookup(spelling).id == expected


def test_differing_permissive_licences_combine_and_warn():
    licence, terms, warnings = inherit(["apache-2.0", "mit"])
    assert licence == "apache-2.0 AND mit"
    assert any(t.startswith("mit: ") for t in terms) and any(t.startswith("apache-2.0: ") for t in terms)
    assert len(warnings) == 1 and "differ" in warnings[0]


def test_non_commercial_parent_restricts_the_merge():
    licence, terms, warnings = inherit(["apache-2.0", "cc-by-nc-4.0"])
    assert licence == "apache-2.0 AND cc-by-nc-4.0"
    assert any("non-commercial" in w for w in warnings)
    assert "cc-by-nc-4.0: no commercial use" in terms


def test_llama_community_licence_terms():
    licence, terms, warnings = inherit(["llama3.1", "llama3.1"])
    assert licence == "llama3.1"
    text = "\n".join(terms)
    assert "700 million monthly active users" in text and 'begin with "Llama"' in text
    assert "Built with Llama" in text and "use-policy" in text
    assert any("acceptable-use policy" in w for w in warnings)


def test_use_policies_and_openrail_warn():
    for lic in ("gemma", "openrail", "creativeml-openrail-m", "llama2"):
        _, terms, warnings = inherit([lic])
        assert LICENCES[lic].use_policy and any("acceptable-use" in w for w in warnings), lic


def test_share_alike_mixed_with_other_terms_warns():
    _, terms, warnings = inherit(["cc-by-sa-4.0", "cc-by-nc-4.0"])
    assert any("same licence" in w for w in warnings)
    assert any("share-alike" in t for t in terms)


def test_no_derivatives_warns():
    _, _, warnings = inherit(["cc-by-nc-nd-4.0"])
    assert any("forbids sharing derived models" in w for w in warnings)


def test_unknown_and_missing_licences_warn():
    licence, _, warnings = inherit(["apache-2.0", None])
    assert licence == "apache-2.0 AND unknown"
    assert any("no licence is recorded" in w for w in warnings)
    licence, _, warnings = inherit(["other"])
    assert licence == "other" and any("not in tinkerlm's table" in w for w in warnings)
    assert inherit([])[0] == "unknown"


def test_a_merge_of_merges_flattens_conjunctions():
    licence, _, _ = inherit(["apache-2.0 AND mit", "mit"])
    assert licence == "apache-2.0 AND mit"


@pytest.mark.parametrize(
    "licence,commercial,derivatives,share_alike",
    [
        ("cc-by-nd-4.0", True, False, False),
        ("cc-by-nc-nd-3.0", False, False, False),
        ("cc-by-sa-3.0", True, True, True),
        ("cc-by-nc-sa-3.0", False, True, True),
        ("gpl-2.0", True, True, True),
        ("gpl-3.0", True, True, True),
        ("lgpl-3.0", True, True, True),
        ("agpl-3.0", True, True, True),
        ("openmdw-1.0", True, True, False),
        ("cc0-1.0", True, True, False),
        ("odc-by", True, True, False),
    ],
)
def test_added_rows(licence, commercial, derivatives, share_alike):
    row = LICENCES[licence]
    assert (row.commercial, row.derivatives, row.share_alike, row.use_policy) == (
        commercial,
        derivatives,
        share_alike,
        None,
    )
    assert row.url.startswith("https://")
    assert row.permissive == (commercial and derivatives and not share_alike)


@pytest.mark.parametrize(
    "spelling,expected",
    [("GPL-3.0-only", "gpl-3.0"), ("AGPL-3.0-or-later", "agpl-3.0"), ("CC0", "cc0-1.0"), ("CC-BY-ND", "cc-by-nd-4.0")],
)
def test_spdx_aliases(spelling, expected):
    assert lookup(spelling).id == expected


def test_public_domain_dedication_obliges_nothing():
    assert inherit(["cc0-1.0"]) == ("cc0-1.0", [], [])


def test_compatibility_rows_name_known_licences():
    for row in LICENCES.values():
        for other in row.compatible_with:
            assert LICENCES[other].share_alike and row.share_alike, (row.id, other)
        assert all(i in LICENCES for i in row.incompatible), row.id


def test_llama3_naming_and_attribution_are_its_own():
    _, terms, _ = inherit(["llama3"])
    assert 'llama3: the model name must begin with "Llama 3" when the model is distributed' in terms
    assert any("Built with Meta Llama 3" in t for t in terms)
    assert all(LICENCES[i].name_rule for i in ("llama3", "llama3.1", "llama3.2", "llama3.3"))
    assert LICENCES["llama2"].name_rule is None
