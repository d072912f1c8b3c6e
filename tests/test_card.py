"""`tinkerlm card`: the model card of a stored model for each remix kind (front matter read by huggingface_hub's
ModelCard), the openness sections, the real SmolLM2's card, and the verb's file handling.

Remixes are made from tiny random models pulled from the stand-in hub (tests/hubserver.py), so their parents have
Hub ids as real ones would.
"""

import os
from pathlib import Path

import pytest
from hubserver import HubServer, Repo
from test_cli import assert_user_error, cli
from test_tune import write_chat_data
from tiny import make_hf_model

from tinkerlm import store
from tinkerlm.export.card import model_card, store_card

APACHE = "---\nlicense: apache-2.0\n---\n# tiny\n"


def parse(text: str):
    """The card as the Hub's client reads it: (front matter dict, body)."""
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    return card.data.to_dict(), card.text


def repo_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinies")
    out = {}
    for name, seed in (("base", 0), ("other", 1)):
        make_hf_model("llama", root / name, seed=seed)
        (root / name / "README.md").write_text(APACHE)
        out[name] = root / name
    return out


@pytest.fixture
def hub(monkeypatch, tiny_dirs):
    """The stand-in hub holding org/base and org/other, with a write token; HF_ENDPOINT and HF_TOKEN point at it."""
    import huggingface_hub.constants

    with HubServer(token="hf_test_token") as server:
        server.repos["org/base"] = Repo(files=repo_files(tiny_dirs["base"]))
        server.repos["org/other"] = Repo(files=repo_files(tiny_dirs["other"]), sha="1" * 40)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # for subprocesses; the stand-in serves LFS, not Xet
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield server


@pytest.fixture
def base(hub):
    return store.pull("hf:org/base", name="base", progress=False)


def _finetune(out, tmp_path, **kw):
    from tinkerlm.tune import finetune

    data = write_chat_data(tmp_path / "d.jsonl", 8)
    return finetune(
        base="base", data=str(data), out=out, seq_len=64, batch_size=2, max_steps=2, progress=False, **kw
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# One card per remix kind


def test_lora_finetune_card_is_an_adapter(base, tmp_path):
    m = _finetune("ad", tmp_path)
    assert m.format == "lora"
    meta, body = parse(store_card("ad"))
    assert meta["base_model"] == ["org/base"] and meta["base_model_relation"] == "adapter"
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "peft"
    assert "adapter" in meta["tags"] and "tinkerlm" in meta["tags"]
    # the lineage tree: the adapter, its base indented under it with the relation and licence
    assert "- **ad:latest**: licence `apache-2.0`" in body
    assert "  - **base:latest** (base): licence `apache-2.0`" in body
    assert "apache-2.0: keep the copyright and licence notices" in body  # the obligations it inherits
    assert "## Openness" in body and "| Training code |" in body  # the assessment of the adapter


def test_full_finetune_card_is_a_finetune(base, tmp_path):
    _finetune("full", tmp_path, full=True)
    meta, _ = parse(store_card("full"))
    assert meta["base_model"] == ["org/base"] and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers"


def test_merge_card_is_a_merge_of_both_parents(base):
    from tinkerlm.merge import merge

    store.pull("hf:org/other", name="other", progress=False)
    recipe = {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 0.5}},
                                                   {"model": "other", "parameters": {"weight": 0.5}}]}  # fmt: skip
    merge(recipe, "mixed", progress=False)
    meta, body = parse(store_card("mixed"))
    assert meta["base_model_relation"] == "merge"
    assert sorted(meta["base_model"]) == ["org/base", "org/other"]
    assert "(merge-input)" in body


def test_quantize_card_is_quantized_and_carries_the_verification(base):
    from tinkerlm.export import quantize

    quantize("base", type="q8_0", out="base-q8", progress=False)
    meta, body = parse(store_card("base-q8"))
    assert meta["base_model"] == ["org/base"] and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "gguf" and "gguf" in meta["tags"]
    assert "top-1" in body  # the stored verification figures


def test_a_model_as_pulled_has_no_base_and_a_local_parent_is_left_out(base, tiny_dirs):
    meta, _ = parse(store_card("base"))
    assert "base_model" not in meta and "base_model_relation" not in meta
    store.pull(str(tiny_dirs["other"]), name="local", progress=False)  # not on any hub
    from tinkerlm.export import quantize

    quantize("local", type="q8_0", out="local-q8", progress=False, verify=False)
    meta, body = parse(store_card("local-q8"))
    assert "base_model" not in meta  # the Hub refuses ids it does not have
    assert "local:latest" in body  # the lineage still names it


# ---------------------------------------------------------------------------------------------------------------
# The openness sections, from an assessment dict


OPENNESS = {
    "format": "tinkerlm-openness/1",
    "model": "ad:latest",
    "class": 3,
    "label": "Class III - Open Model",
    "evidence": "confirmed",
    "progress": {"1": 40.0, "2": 60.0, "3": 100.0},
    "components": [
        {
            "id": 10,
            "name": "Model parameters (Final)",
            "class": 3,
            "required": True,
            "content_type": "data",
            "status": "included",
            "evidence": "confirmed",
            "where": "model.safetensors",
            "licence": "Apache-2.0",
            "open": True,
            "type_appropriate": True,
            "note": None,
        },
        {
            "id": 3,
            "name": "Training code",
            "class": 2,
            "required": True,
            "content_type": "code",
            "status": "missing",
            "evidence": None,
            "where": None,
            "licence": None,
            "open": False,
            "type_appropriate": False,
            "note": None,
        },
    ],  # fmt: skip
    "next_class": {"class": 2, "missing": ["Training code"]},
    "osaid": {"open_source_ai": False, "reasons": ["training code is not published"]},
    "licence": "apache-2.0",
    "obligations": ["apache-2.0: keep the copyright and licence notices of the parent weights"],
    "datasets": ["HuggingFaceTB/smollm-corpus", "me/my-chat-data"],
    "lineage": {
        "name": "ad:latest",
        "sha256": "ab" * 32,
        "relation": None,
        "licence": "apache-2.0",
        "class": 3,
        "parents": [
            {
                "name": "base:latest",
                "sha256": "cd" * 32,
                "relation": "base",
                "licence": "apache-2.0",
                "class": 3,
                "parents": [],
            }
        ],
    },  # fmt: skip
}


def test_openness_goes_into_front_matter_and_body():
    text = model_card(
        name="ad:latest", license="apache-2.0", base_models=["org/base"], relation="adapter", description="x",
        lineage=[], verification=None, files=["adapter_config.json"], openness=OPENNESS,
    )  # fmt: skip
    meta, body = parse(text)
    assert meta["datasets"] == ["HuggingFaceTB/smollm-corpus", "me/my-chat-data"]
    assert "mof-class-3" in meta["tags"] and meta["base_model_relation"] == "adapter"
    assert "**Class III - Open Model** (confirmed:" in body
    assert (
        "| Model parameters (Final) | 3 | yes | included | confirmed | model.safetensors | Apache-2.0 | yes |" in body
    )
    assert "| Training code | 2 | yes | missing | - | - | - | - |" in body
    assert "Missing for class II:\n\n- Training code\n" in body
    assert "does not meet the OSI's Open Source AI Definition" in body and "- training code is not published" in body
    assert "- apache-2.0: keep the copyright and licence notices of the parent weights" in body
    assert "- **ad:latest**: licence `apache-2.0`, MOF class III, sha256 `abababababab`" in body
    assert "  - **base:latest** (base): licence `apache-2.0`, MOF class III" in body


def test_hostile_assessment_strings_stay_in_their_cells():
    evil = {**OPENNESS, "datasets": ['x"\n---\nevil: 1'], "label": "a\n---\nb|c"}
    evil["components"] = [{**OPENNESS["components"][0], "name": "x | y\n## z", "where": "---"}]
    meta, body = parse(model_card(
        name="m", license="mit", base_models=[], relation=None, description="", lineage=[], verification=None,
        files=[], openness=evil,
    ))  # fmt: skip
    assert meta["datasets"] == ['x"\n---\nevil: 1'] and "evil" not in meta
    assert "| x \\| y ## z |" in body and "\n## z" not in body


# ---------------------------------------------------------------------------------------------------------------
# The real default model


@pytest.fixture
def smollm2_stored(smollm2_gguf, store_home):
    """The catalogue's SmolLM2 in this test's store: a link to the cached catalogue pull (read only here)."""
    cached = smollm2_gguf.parent
    (store_home / "models" / "smollm2").mkdir(parents=True)
    os.symlink(cached, store_home / "models" / "smollm2" / cached.name)
    return store.get("smollm2")


def test_smollm2_card(smollm2_stored, tmp_path, monkeypatch):
    import tinkerlm

    monkeypatch.chdir(tmp_path)  # the default --out is ./README.md; the subprocess imports this checkout
    cli("card", "smollm2", env={"PYTHONPATH": str(Path(tinkerlm.__file__).parent.parent)}, check=0)
    meta, body = parse((tmp_path / "README.md").read_text())
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert meta["base_model_relation"] == "quantized" and meta["library_name"] == "gguf"
    assert body.startswith("\n# smollm2:135m-instruct-q4_1\n") or "# smollm2:135m-instruct-q4_1" in body
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in body
    assert "include the Apache-2.0 licence text" in body
    assert "  - **HuggingFaceTB/SmolLM2-135M-Instruct** (quantized): licence `apache-2.0`" in body
    # the openness assessment: its datasets in the front matter, its class, table and OSAID verdict in the body
    assert "HuggingFaceTB/smollm-corpus" in meta["datasets"]
    assert "## Openness" in body and "| Model parameters (Final) | 3 | yes | included | confirmed |" in body
    assert "Open Source AI Definition 1.0" in body


# ---------------------------------------------------------------------------------------------------------------
# The verb


def test_card_verb_refuses_to_overwrite_without_force(base, tmp_path):
    out = tmp_path / "card.md"
    out.write_text("mine")
    assert_user_error(cli("card", "base", "--out", str(out)), str(out), "--force")
    assert out.read_text() == "mine"
    cli("card", "base", "--out", str(out), "--force", check=0)
    meta, _ = parse(out.read_text())
    assert meta["license"] == "apache-2.0"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    assert_user_error(cli("card", "nosuch", "--out", str(tmp_path / "x.md")), "nosuch")
    assert_user_error(cli("card", "base", "--out", str(tmp_path / "x.md"), "--declaration", "no.yml"), "no.yml")
    assert not (tmp_path / "x.md").exists()
