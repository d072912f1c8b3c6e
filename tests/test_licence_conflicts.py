"""Licence conflicts on every remix: the rules (`licences.conflicts`, `cautions`), refusals end to end through the
CLI (exit status 2, one line naming the licences and the flag, nothing stored), `--accept-licence-conflict`
recording the conflicts, and the inherited obligations printed and stored, on tiny models and on SmolLM2.
"""

import json

import pytest
from test_cli import assert_user_error, cli
from test_merge import nothing_stored, stored
from test_tune import write_chat_data
from tiny import make_hf_model

from tinkerlm import store
from tinkerlm.errors import TinkerError
from tinkerlm.openness.licences import cautions, conflicts
from tinkerlm.store.manifest import Manifest

# ---------------------------------------------------------------------------------------------------------------
# The rules


@pytest.mark.parametrize(
    "parents,kind,names,why",
    [
        (["cc-by-nc-nd-4.0"], "finetune", ["cc-by-nc-nd-4.0"], "forbids derivative models"),
        (["cc-by-nd-4.0"], "adapter", ["cc-by-nd-4.0"], "forbids derivative models"),
        (["apache-2.0", "cc-by-nd-4.0"], "merge", ["cc-by-nd-4.0", "apache-2.0"], "forbids derivative models"),
        (["cc-by-nc-nd-3.0"], "fuse", ["cc-by-nc-nd-3.0"], "forbids derivative models"),
        (["cc-by-sa-4.0", "cc-by-nc-4.0"], "merge", ["cc-by-sa-4.0", "cc-by-nc-4.0"], "non-commercial"),
        (["gpl-3.0", "llama3.1"], "merge", ["gpl-3.0", "llama3.1"], "acceptable-use policy"),
        (["cc-by-nc-sa-4.0", "gemma"], "merge", ["cc-by-nc-sa-4.0", "gemma"], "acceptable-use policy"),
        (["cc-by-sa-4.0", "cc-by-nc-sa-4.0"], "merge", ["cc-by-sa-4.0", "cc-by-nc-sa-4.0"], "two different share"),
        (["gpl-2.0", "gpl-3.0"], "merge", ["gpl-2.0", "gpl-3.0"], "two different share-alike"),
        (["apache-2.0", "gpl-2.0"], "merge", ["apache-2.0", "gpl-2.0"], "incompatible"),
        # a merge made with --accept-licence-conflict carries the conjunction: its exports and quantizations too
        (["cc-by-sa-4.0 AND cc-by-nc-4.0"], "export", ["cc-by-sa-4.0", "cc-by-nc-4.0"], "non-commercial"),
        (["agpl-3.0 AND openrail"], "quantize", ["agpl-3.0", "openrail"], "acceptable-use policy"),
    ],
)
def test_conflicts_name_the_licences_and_why(parents, kind, names, why):
    reasons = conflicts(parents, kind=kind)
    assert len(reasons) == 1, reasons
    assert all(n in reasons[0] for n in names) and why in reasons[0]
    assert "\n" not in reasons[0]


@pytest.mark.parametrize(
    "parents,kind",
    [
        (["apache-2.0", "mit", "cc-by-4.0", "cc0-1.0", "odc-by", "openmdw-1.0"], "merge"),
        (["cc-by-sa-4.0", "apache-2.0"], "merge"),  # permissive terms add no restriction
        (["cc-by-sa-4.0", "cc-by-sa-4.0"], "merge"),
        (["cc-by-sa-3.0", "cc-by-sa-4.0"], "merge"),  # BY-SA 3.0 allows "a later version"
        (["cc-by-sa-4.0", "gpl-3.0"], "merge"),  # CC's one-way compatibility of BY-SA 4.0 with GPLv3
        (["gpl-3.0", "agpl-3.0", "lgpl-3.0"], "merge"),  # section 13 of the GPLv3 family
        (["cc-by-nc-4.0", "cc-by-nc-sa-4.0"], "merge"),  # NC adds nothing NC-SA does not already forbid
        (["cc-by-nc-4.0", "llama3.1", "gemma"], "merge"),  # restrictions add up without share-alike
        (["cc-by-nc-nd-4.0"], "quantize"),  # a technical modification (CC 4.0 section 2(a)(4))
        (["cc-by-nd-4.0"], "export"),
        (["apache-2.0", None, "other"], "finetune"),  # unknown licences warn (inherit), never conflict
    ],
)
def test_no_conflict(parents, kind):
    assert conflicts(parents, kind=kind) == []


def test_unknown_kind_is_a_bug():
    with pytest.raises(ValueError, match="kind 'distill'"):
        conflicts(["mit"], kind="distill")


def test_format_conversion_of_a_no_derivatives_model_is_a_caution():
    (line,) = cautions(["cc-by-nc-nd-4.0"], kind="quantize")
    assert "cc-by-nc-nd-4.0" in line and "technical modification" in line and "2(a)(4)" in line
    assert cautions(["cc-by-nc-nd-4.0"], kind="finetune") == []  # a conflict there, not a caution


@pytest.mark.parametrize(
    "licence,name,warns",
    [
        ("llama3.1", "mymodel:v1", True),
        ("llama3.2", "Llama-3.2-mine", False),
        ("llama3.3 AND apache-2.0", "llamaish", False),
        ("llama3", "llama-mine", True),  # Llama 3 asks for "Llama 3" at the start
        ("llama3", "llama3-mine", False),
        ("llama2", "mine", False),  # Llama 2 has no naming rule
    ],
)
def test_llama_naming_rule(licence, name, warns):
    lines = cautions([licence], kind="merge", name=name)
    assert bool(lines) == warns, lines
    if warns:
        assert "must begin with" in lines[0] and repr(name.partition(":")[0]) in lines[0]


# ---------------------------------------------------------------------------------------------------------------
# The manifest fields


def test_old_manifests_read_and_update(store_home):
    old = {
        "name": "m",
        "tag": "latest",
        "format": "hf",
        "license": "mit",
        "source": {"type": "merge", "license_terms": ["mit: keep the notices"]},
    }
    m = Manifest.from_json(old)
    assert m.obligations == ["mit: keep the notices"] and m.licence_conflicts == []
    m = Manifest.from_json({**old, "source": {}, "obligations": "not a list", "licence_conflicts": [1, "x"]})
    assert m.obligations == [] and m.licence_conflicts == ["x"]
    d = store_home / "models" / "m" / "latest"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({**old, "source": {}}))
    assert store.get("m").obligations == []
    store.update("m", obligations=["mit: keep the notices"], licence_conflicts=["a and b: reason"])
    m = store.get("m")
    assert m.obligations == ["mit: keep the notices"] and m.licence_conflicts == ["a and b: reason"]
    text = store.format_manifest(m)
    assert "obligations:" in text and "a and b: reason" in text


# ---------------------------------------------------------------------------------------------------------------
# Refusals end to end, and --accept-licence-conflict


def _recipe(tmp_path, a="a", b="b"):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  weight: 0.5\n")
    return path


def test_merge_of_conflicting_licences_is_refused_then_accepted(tmp_path):
    stored(tmp_path, "a", seed=0, licence="cc-by-sa-4.0")
    stored(tmp_path, "b", seed=1, licence="cc-by-nc-4.0")
    recipe = _recipe(tmp_path)
    p = cli("merge", str(recipe), "--out", "kid")
    assert_user_error(p, "cc-by-sa-4.0", "cc-by-nc-4.0", "share-alike", "--accept-licence-conflict")
    assert nothing_stored({"a", "b"})

    p = cli("merge", str(recipe), "--out", "kid", "--accept-licence-conflict", check=0)
    m = store.get("kid")
    assert m.license == "cc-by-sa-4.0 AND cc-by-nc-4.0"
    assert len(m.licence_conflicts) == 1 and "cc-by-sa-4.0 and cc-by-nc-4.0" in m.licence_conflicts[0]
    assert "cc-by-nc-4.0: no commercial use" in m.obligations
    assert any(o.startswith("cc-by-sa-4.0: release the derived model under CC-BY-SA-4.0") for o in m.obligations)
    assert "license_terms" not in m.source
    err = p.stderr
    assert "obligations this model inherits:\n  cc-by-sa-4.0: " in err and "licence conflicts accepted" in err
    assert any(line.startswith("openness: ") for line in err.splitlines()), err
    card = (store.model_path(m) / "README.md").read_text()
    assert "Licence conflicts accepted" in card and "cc-by-nc-4.0: no commercial use" in card
    assert "obligations:" in cli("show", "kid", check=0).stdout

    # The accepted merge carries the conjunction: exporting it is refused again, until accepted again.
    out = tmp_path / "kid.gguf"
    assert_user_error(cli("export", "kid", "--out", str(out), "--no-verify"), "cc-by-nc-4.0", "--accept-licence")
    assert not out.exists()
    p = cli("export", "kid", "--out", str(out), "--no-verify", "--accept-licence-conflict", check=0)
    assert out.is_file() and "obligations this model inherits:" in p.stderr


def test_finetune_of_a_no_derivatives_base_is_refused_then_accepted(tmp_path):
    base = tmp_path / "nd"
    make_hf_model("llama", base)
    (base / "README.md").write_text("---\nlicense: cc-by-nd-4.0\n---\n# nd\n")
    data = write_chat_data(tmp_path / "d.jsonl", 12)
    args = ["finetune", str(base), "--data", str(data), "--out", "ft", "--seq-len", "64", "--max-steps", "1"]
    assert_user_error(cli(*args), "cc-by-nd-4.0", "forbids derivative models", "--accept-licence-conflict")
    assert not (store.home() / "models").exists() and not (store.home() / "runs").exists()

    p = cli(*args, "--accept-licence-conflict", "--data-license", "CC-BY-4.0", check=0)
    m = store.get("ft")
    assert m.format == "lora" and m.license == "cc-by-nd-4.0"
    assert len(m.licence_conflicts) == 1 and "cc-by-nd-4.0" in m.licence_conflicts[0]
    assert "cc-by-nd-4.0: derived models may not be shared" in m.obligations
    assert m.source["recipe"]["data_license"] == "CC-BY-4.0"
    assert "cc-by-nd-4.0: derived models may not be shared" in p.stderr

    # Fusing the adapter into its no-derivatives base is a derivative too.
    assert_user_error(cli("fuse", "ft", "--out", "ft-full"), "cc-by-nd-4.0", "--accept-licence-conflict")
    assert store.find("ft-full") is None


def test_quantizing_a_no_derivatives_model_is_allowed_with_a_caution(tmp_path, caplog):
    from tinkerlm.export import quantize

    stored(tmp_path, "nd", licence="cc-by-nc-nd-4.0")
    with caplog.at_level("WARNING"):
        m = quantize("nd", type="q8_0", out="nd-q8", verify=False, progress=False)
    assert "technical modification" in caplog.text
    assert m.licence_conflicts == [] and "cc-by-nc-nd-4.0: derived models may not be shared" in m.obligations


def test_llama_naming_rule_is_a_warning_not_a_refusal(tmp_path, caplog):
    from tinkerlm.merge import merge

    stored(tmp_path, "a", seed=0, licence="llama3.1")
    stored(tmp_path, "b", seed=1, licence="llama3.1")
    recipe = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 0.5}}
    with caplog.at_level("WARNING"):
        m = merge(recipe, "kid", progress=False)
    assert m.licence_conflicts == [] and 'must begin with "Llama"' in caplog.text and "'kid'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        merge(recipe, "llama-kid", progress=False)
    assert "must begin with" not in caplog.text


def test_api_refusal_names_the_flag(tmp_path):
    from tinkerlm.merge import merge

    stored(tmp_path, "a", seed=0, licence="gpl-2.0")
    stored(tmp_path, "b", seed=1, licence="apache-2.0")
    recipe = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 0.5}}
    with pytest.raises(TinkerError, match="gpl-2.0 and apache-2.0: known to be incompatible.*--accept-licence"):
        merge(recipe, "kid", progress=False)
    assert nothing_stored({"a", "b"})


def test_data_license_must_be_spdx(tmp_path):
    from tinkerlm.tune.recipe import resolve

    assert resolve(base="x", data="d", out="o", data_license="Apache-2.0 AND CC-BY-4.0").data_license
    with pytest.raises(TinkerError, match="data_license: must be an SPDX"):
        resolve(base="x", data="d", out="o", data_license="CC BY 4.0; see the card")


# ---------------------------------------------------------------------------------------------------------------
# The real model


def test_smollm2_lora_stores_and_prints_its_obligations(smollm2_gguf, tmp_path, capsys):
    from tinkerlm.openness import assess
    from tinkerlm.tune import finetune

    store.pull(str(smollm2_gguf), name="smol", progress=False)
    data = write_chat_data(tmp_path / "d.jsonl", 8)
    m = finetune(base="smol", data=str(data), out="smol-ft", seq_len=64, batch_size=2, max_steps=1,
                 progress=False, data_license="CC-BY-4.0")  # fmt: skip
    err = capsys.readouterr().err
    assert m.license == "apache-2.0" and m.licence_conflicts == []
    assert m.obligations and all(o.startswith("apache-2.0: ") for o in m.obligations)
    assert any("NOTICE" in o for o in m.obligations)
    assert "obligations this model inherits:" in err and m.obligations[0] in err
    (line,) = [x for x in err.splitlines() if x.startswith("openness: ")]
    assert line == f"openness: {(a := assess('smol-ft').to_json())['label']} ({a['evidence'] or 'not confirmed'})"
    assert store.get("smol-ft").obligations == m.obligations  # stored, not only returned


def test_a_failing_assessment_never_fails_the_remix(tmp_path, monkeypatch, caplog):
    from tinkerlm.merge import merge
    from tinkerlm.openness import report

    def broken(*a, **k):
        raise RuntimeError("assessment broke")

    monkeypatch.setattr(report, "assess", broken)
    stored(tmp_path, "a", seed=0, licence="mit")
    stored(tmp_path, "b", seed=1, licence="mit")
    recipe = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 0.5}}
    with caplog.at_level("WARNING"):
        m = merge(recipe, "kid", progress=False)
    assert store.find("kid") == m and "openness not assessed (RuntimeError: assessment broke)" in caplog.text
