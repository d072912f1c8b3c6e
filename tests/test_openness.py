"""`tinkerlm openness`: the MOF class as the Model Openness Tool computes it, declarations, evidence from the store,
remixes judged from their parents, and the OSAID verdict, on real models.

tests/data/mot/ holds files of the Model Openness Tool (github.com/lfai/model_openness_tool, MIT licence, see its
LICENSE and README): its test files with the expected results it publishes (Test_Data/expected_results.json), and a
dozen of its model files with the results of the MOT's own evaluator (expected_models.json, made by running its
ModelEvaluator.php on them: mot_evaluate.php).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinkerlm import store
from tinkerlm.errors import TinkerError
from tinkerlm.openness import assess, declaration, mof

MOT = Path(__file__).parent / "data" / "mot"


def _expected_results() -> dict:
    # The MOT's file has trailing commas (it is not strict JSON).
    text = re.sub(r",(\s*[}\]])", r"\1", (MOT / "Test_Data" / "expected_results.json").read_text())
    return {m["release"]["name"]: m["classification"] for m in json.loads(text)["models"]}


TEST_FILES = sorted((MOT / "Test_Data").glob("*.yml"))
MODEL_FILES = sorted((MOT / "models").glob("*.yml"))


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.stem[:40])
def test_mot_test_files_get_the_published_class_and_progress(path):
    expected = _expected_results()
    d = declaration.load(path)
    got = mof.classify(d.licences())
    want = expected[d.name]
    assert got.cls == want["class"]
    for k, v in want["progress"].items():
        assert got.progress[int(k)] == pytest.approx(float(v))


def test_every_mot_test_file_is_checked():
    assert len(TEST_FILES) == len(_expected_results()) == 27


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_mot_model_files_match_the_mot_evaluator(path):
    want = json.loads((MOT / "expected_models.json").read_text())[path.name]
    got = mof.classify(declaration.load(path, lenient=True).licences())
    assert got.cls == want["class"]
    for k, v in want["progress"].items():
        assert got.progress[int(k)] == pytest.approx(v)


def test_the_model_files_span_every_class():
    classes = {v["class"] for v in json.loads((MOT / "expected_models.json").read_text()).values()}
    assert classes == {0, 1, 2, 3} and len(MODEL_FILES) >= 12


# ---------------------------------------------------------------------------------------------------------------
# The rules as data


def test_rules_have_the_mof_components_and_classes():
    r = mof.rules()
    assert len(r.components) == 17
    assert [len(r.required(c)) for c in (3, 2, 1)] == [6, 4, 4]
    assert {r.components[i].name for i in r.optional(3) + r.optional(2) + r.optional(1)} == {
        "Sample model outputs",
        "Supporting libraries and tools",
        "Model metadata",
    }
    assert r.components[r.report].name == "Technical report" and r.components[r.paper].name == "Research paper"


def test_licence_table_by_exact_spdx_id():
    r = mof.rules()
    assert r.is_open("Apache-2.0") and r.fits("Apache-2.0", "code") and not r.fits("Apache-2.0", "data")
    assert r.is_open("CDLA-Permissive-2.0") and r.fits("CDLA-Permissive-2.0", "data")
    assert r.is_open("CC-BY-4.0") and r.fits("CC-BY-4.0", "document")
    assert not r.is_open("CC-BY-NC-4.0") and not r.is_open("apache-2.0")  # exact ids, as the MOT compares
    assert r.is_open("Apache-2.0 AND MIT") and not r.is_open("Apache-2.0 AND CC-BY-NC-4.0")
    assert r.osi("MIT") and not r.osi("CC-BY-4.0")


@pytest.mark.parametrize(
    "hf,spdx",
    [("apache-2.0", "Apache-2.0"), ("mit", "MIT"), ("odc-by", "ODC-By-1.0"), ("gpl-3.0", "GPL-3.0-only"),
     ("cc-by-sa-4.0", "CC-BY-SA-4.0"), ("openmdw-1.0", "OpenMDW-1.0"), ("gemma", None), ("llama3.2", None)],
)  # fmt: skip
def test_hf_licence_ids_map_to_spdx(hf, spdx):
    assert mof.rules().spdx(hf) == spdx


def test_research_paper_stands_in_for_the_technical_report():
    base = {9: "Apache-2.0", 10: "Apache-2.0", 12: "CC-BY-4.0", 13: "CC-BY-4.0", 14: "CC-BY-4.0"}
    assert mof.classify(base).cls == 0
    assert mof.classify({**base, 21: "CC-BY-4.0"}).cls == 3  # paper instead of report
    assert mof.classify({**base, 21: None}).cls == 0  # a paper without a licence does not stand in
    assert mof.classify({**base, 11: "CC-BY-4.0"}).progress[3] == 100.0


# ---------------------------------------------------------------------------------------------------------------
# Declarations: the MOT's YAML, with errors naming the line


DECL = """\
framework:
  name: Model Openness Framework
release:
  name: demo
  license:
    distribution: {name: Apache-2.0}
    document: {name: CC-BY-4.0}
  components:
    - name: Model architecture
    - name: Model card
    - name: Datasets
      license: unlicensed
    - name: Training code
      license: MIT
    - name: Evaluation data
      license: ''
"""


def test_licences_resolve_component_then_type_then_distribution():
    d = declaration.loads(DECL)
    assert d.licences() == {9: "Apache-2.0", 13: "CC-BY-4.0", 15: None, 7: "MIT", 19: None}


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_unknown_component_names_the_line_and_the_nearest_name():
    text = DECL.replace("- name: Model card", "- name: Model cards")
    with pytest.raises(TinkerError) as e:
        declaration.loads(text, "m.yml")
    assert f"m.yml: line {_line_of(text, 'Model cards')}: 'Model cards' is not a Model Openness Framework" in str(
        e.value
    )
    assert "did you mean 'Model card'?" in str(e.value)
    with pytest.raises(TinkerError, match="not a Model Openness Framework component"):
        declaration.loads(text, "m.yml", lenient=True)  # lenient is about licences only


def test_free_text_licence_names_the_line_unless_lenient():
    text = DECL.replace("license: MIT", "license: Apache 2.0")
    with pytest.raises(TinkerError) as e:
        declaration.loads(text, "m.yml")
    line = _line_of(text, "Apache 2.0")
    assert f"m.yml: line {line}: Training code: licence 'Apache 2.0' is not an SPDX licence id" in str(e.value)
    assert "write 'Apache-2.0'" in str(e.value)
    d = declaration.loads(text, "m.yml", lenient=True)  # the MOT's reading: a licence that is not open
    assert mof.classify(d.licences()).statuses[7].status == "invalid"


def test_other_declaration_errors():
    with pytest.raises(TinkerError, match=r"line \d+: 'Datasets' is listed twice \(also at line 11\)"):
        declaration.loads(DECL + "    - name: Datasets\n", "m.yml")
    with pytest.raises(TinkerError, match="release.license.weights is not a licence kind"):
        declaration.loads(DECL.replace("document: {name: CC-BY-4.0}", "weights: {name: MIT}"), "m.yml")
    with pytest.raises(TinkerError, match="no `release:` section"):
        declaration.loads("framework: {}\n", "m.yml")
    with pytest.raises(TinkerError, match="m.yml: not valid YAML at line"):
        declaration.loads("release: [\n", "m.yml")


def test_strict_mode_refuses_a_real_mot_file_with_free_text_and_names_the_line():
    path = MOT / "models" / "gemma-2b.yml"
    text = path.read_text()
    with pytest.raises(TinkerError) as e:
        declaration.load(path)
    assert f"line {_line_of(text, 'license: gemma')}: Inference code: licence 'gemma'" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Real models


@pytest.fixture
def smol(smollm2_gguf):
    store.pull(str(smollm2_gguf), name="smol", progress=False)
    return "smol"


def _component(d: dict, name: str) -> dict:
    return next(c for c in d["components"] if c["name"] == name)


def test_smollm2_what_the_store_proves_and_its_card_declares(smol, tmp_path):
    d = assess(smol).to_json()
    weights = _component(d, "Model parameters (Final)")
    assert weights["licence"] == "Apache-2.0" and weights["evidence"] == "confirmed" and weights["status"] == "included"
    assert _component(d, "Model architecture")["where"].endswith("tinkerlm/models/llama.py")
    assert _component(d, "Training code")["evidence"] == "declared"
    # The paper's licence could not be checked: it does not count, so no report stands in and Class III is missed.
    assert d["class"] == 0 and d["progress"]["3"] == pytest.approx(83.33)
    assert [m["component"] for m in d["next_class"]["missing"]] == ["Technical report"]
    assert "research paper" in d["next_class"]["missing"][0]["why"]
    assert d["osaid"]["open_source_ai"] is True and d["osaid"]["evidence"] == "declared"
    assert any("Apache-2.0 licence text" in o for o in d["obligations"])
    assert "HuggingFaceTB/smol-smoltalk" in d["datasets"]

    # A declaration that the paper is CC-BY-4.0 lifts it to Class III, declared (the paper's licence is not proven).
    decl = tmp_path / "paper.yml"
    decl.write_text("release:\n  name: SmolLM2\n  components:\n    - name: Research paper\n      license: CC-BY-4.0\n")
    d2 = assess(smol, declaration=str(decl)).to_json()
    assert d2["class"] == 3 and d2["evidence"] == "declared" and d2["label"] == "Class III - Open Model"


def test_cli_prints_the_table_and_json(smol, tmp_path):
    env_cmd = [sys.executable, "-m", "tinkerlm", "openness", smol]
    out = subprocess.run(env_cmd, capture_output=True, text=True, check=True).stdout
    assert "smol:latest: Unclassified" in out and "Open Source AI Definition 1.0: yes (declared)" in out
    assert re.search(r"Model parameters \(Final\)\s+III\s+yes\s+Apache-2.0", out)
    js = json.loads(subprocess.run([*env_cmd, "--json"], capture_output=True, text=True, check=True).stdout)
    assert js["format"] == "tinkerlm-openness/1" and len(js["components"]) == 17
    bad = tmp_path / "bad.yml"
    bad.write_text("release:\n  components:\n    - name: Weights\n")
    r = subprocess.run([*env_cmd, "--declaration", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (
        f"tinkerlm: error: {bad}: line 3: 'Weights' is not a Model Openness Framework component; the MOF's "
        "components are: " + ", ".join(c.name for c in mof.rules().components.values())
    )


def test_a_finetune_and_a_merge_are_judged_from_their_parents(smol, tmp_path):
    from test_tune import write_chat_data

    from tinkerlm.evaluate import evaluate
    from tinkerlm.merge import merge
    from tinkerlm.tune import finetune

    data = write_chat_data(tmp_path / "d.jsonl", 16)
    finetune(base=smol, data=str(data), out="smol-ft", seq_len=64, batch_size=2, max_steps=2, progress=False)
    ft = assess("smol-ft").to_json()
    assert [(p["name"], p["relation"]) for p in ft["lineage"]["parents"]] == [("smol:latest", "base")]
    assert ft["lineage"]["parents"][0]["label"] == "Unclassified"
    training = _component(ft, "Training code")
    # both the parent's (declared) training code and this fine-tune's (tinkerlm, confirmed) are needed
    assert "nanotron" in training["where"] and "tinkerlm/tune/" in training["where"]
    assert training["evidence"] == "declared" and training["licence"] == "Apache-2.0"
    data_c = _component(ft, "Datasets")
    assert data_c["status"] == "unlicensed" and "d.jsonl" in data_c["where"]  # our data has no declared licence
    assert _component(ft, "Model card")["evidence"] == "confirmed"
    assert ft["licence"] == "apache-2.0" and any("apache-2.0" in o for o in ft["obligations"])

    m = merge(
        {
            "merge_method": "linear",
            "dtype": "bfloat16",
            "models": [
                {"model": smol, "parameters": {"weight": 0.5}},
                {"model": f"{smol}+smol-ft", "parameters": {"weight": 0.5}},
            ],
        },
        "smol-merged",
        progress=False,
    )
    mg = assess(m.ref).to_json()
    relations = {(p["name"], p["relation"]) for p in mg["lineage"]["parents"]}
    assert ("smol-ft:latest", "adapter") in relations and ("smol:latest", "merge-input") in relations
    assert "tinkerlm/merge/ (linear)" in _component(mg, "Training code")["where"]
    # a merge trains on no data: its datasets are its parents' (the fine-tune's unlicensed data among them)
    assert _component(mg, "Datasets")["status"] == "unlicensed"
    # OSAID asks for data information, not open data: the merge is open source AI (on declared evidence)
    assert mg["class"] == 0 and mg["osaid"]["open_source_ai"] is True and mg["osaid"]["evidence"] == "declared"
    # Class III needs evaluation results and a report (or paper) under an open licence: with a declaration of the
    # paper's licence, the merge lacks only results. Once `tinkerlm eval` has scored it on ARC (open data), the
    # evaluation code and data are there too, and with tinkerlm's training code it is Class II.
    decl = tmp_path / "paper.yml"
    decl.write_text("release:\n  name: x\n  components:\n    - name: Research paper\n      license: CC-BY-4.0\n")
    before = assess(m.ref, declaration=str(decl))
    assert before.cls == 0 and [x["component"] for x in before.next_class()["missing"]] == ["Evaluation results"]
    evaluate(m.ref, ["arc_easy"], limit=4, progress=False)
    after = assess(m.ref, declaration=str(decl)).to_json()
    assert after["class"] == 2 and after["label"] == "Class II - Open Tooling Model" and after["evidence"] == "declared"
    missing = {x["component"] for x in after["next_class"]["missing"]}
    assert missing == {"Datasets", "Model parameters (Intermediate)"}  # the fine-tune's data has no licence
    assert _component(after, "Evaluation results")["evidence"] == "confirmed"
    assert _component(after, "Evaluation data")["licence"] == "CC-BY-SA-4.0"  # ARC's


def test_gemma_is_not_open_source_ai_and_says_why(gemma_gguf):
    store.pull(str(gemma_gguf), name="gemma3", progress=False)
    d = assess("gemma3").to_json()
    weights = _component(d, "Model parameters (Final)")
    assert weights["licence"] == "LicenseRef-gemma" and weights["status"] == "invalid"
    assert d["class"] == 0 and d["osaid"]["open_source_ai"] is False
    reason = d["osaid"]["reasons"][0]
    assert reason.startswith("parameters: the weights' licence LicenseRef-gemma is not OSI-approved")
    assert "prohibited_use_policy" in reason
    assert {"component": "Model parameters (Final)", "why": "licence LicenseRef-gemma is not an open licence"} in d[
        "next_class"
    ]["missing"]
    assert any("Gemma Prohibited Use Policy" in o for o in d["obligations"])
    # tinkerlm runs Gemma 3 (models/gemma.py), so its architecture code is confirmed by the store; the built-in
    # declaration adds no training code or data
    assert _component(d, "Model architecture")["evidence"] == "confirmed"
    assert d["osaid"]["reasons"][1] == "code: training code is not published; data preprocessing code is not published"


def test_a_pulled_model_card_declares_its_paper_and_datasets(tmp_path):
    from tiny import make_hf_model

    d = tmp_path / "m"
    make_hf_model("llama", d)
    (d / "README.md").write_text(
        "---\nlicense: mit\ndatasets:\n- org/corpus\n---\n# M\n\nSee https://arxiv.org/abs/2401.12345 for details.\n"
    )
    store.pull(str(d), name="carded", progress=False)
    out = assess("carded").to_json()
    card = _component(out, "Model card")
    assert card["evidence"] == "confirmed" and card["licence"] == "MIT" and card["status"] == "included"
    paper = _component(out, "Research paper")
    assert paper["evidence"] == "declared" and paper["status"] == "unlicensed"
    assert paper["where"] == "https://arxiv.org/abs/2401.12345"
    assert _component(out, "Datasets")["status"] == "unlicensed" and out["datasets"] == ["org/corpus"]
