"""export/card.py: the model card's front matter parses and has the Hub's fields; hostile names stay inside it."""

import re

import pytest
import yaml

from tinkerlm.errors import TinkerError
from tinkerlm.export.card import model_card

VERIFY = dict(
    tokens=1023, kl_mean=0.0123, kl_p99=0.0456, kl_max=0.2, top1=0.978, ppl_reference=12.31, ppl_candidate=12.45
)


def split(card: str) -> tuple[dict, str]:
    """(front matter, body) as the Hub reads them: the YAML between the first two lines that are exactly ---."""
    lines = card.split("\n")
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end])), "\n".join(lines[end + 1 :])


def card(**kw):
    args = dict(
        name="smollm2-q4",
        license="apache-2.0",
        base_models=["HuggingFaceTB/SmolLM2-135M-Instruct"],
        relation="quantized",
        description="SmolLM2 135M Instruct, quantized to Q4_K_M.",
        lineage=[
            {
                "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "sha256": "ab" * 32,
                "relation": "base",
                "licence": "apache-2.0",
            }
        ],
        verification=VERIFY,
        files=["smollm2-q4.gguf", "Modelfile"],
    )
    args.update(kw)
    return model_card(**args)


def test_front_matter_fields_and_body():
    meta, body = split(card())
    assert meta == {
        "license": "apache-2.0",
        "base_model": ["HuggingFaceTB/SmolLM2-135M-Instruct"],
        "base_model_relation": "quantized",
        "library_name": "gguf",
        "tags": ["tinkerlm", "gguf", "quantized"],
        "pipeline_tag": "text-generation",
    }
    assert body.startswith("\n# smollm2-q4\n")
    assert "| HuggingFaceTB/SmolLM2-135M-Instruct | `" + "ab" * 32 + "` | base | apache-2.0 |" in body
    assert "KL mean 0.0123, p99 0.0456; top-1 97.8%; PPL 12.31 -> 12.45 (+1.1%) over 1023 tokens" in body
    assert "tinkerlm pull ./smollm2-q4.gguf --name smollm2-q4" in body


def test_licences_and_libraries():
    meta, _ = split(card(license="Apache 2.0", files=["config.json", "model.safetensors"], relation="finetune"))
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    meta, _ = split(card(license="My Custom Licence v2", files=["adapter_config.json"], relation="adapter"))
    assert meta["license"] == "other" and meta["license_name"] == "my-custom-licence-v2"
    assert meta["library_name"] == "peft"
    meta, body = split(card(license=None, base_models=[], relation=None, verification=None, lineage=[]))
    assert "license" not in meta and "base_model" not in meta and "base_model_relation" not in meta
    assert "Not verified" in body and "No licence was recorded" in body
    with pytest.raises(TinkerError, match="relation 'distilled'"):
        card(relation="distilled")


HOSTILE = [
    'x"\nlicense: mit\n---\nevil: 1',
    "---",
    "a\n---\nb",
    "'; rm -rf / #",
    "line\u2028sep\u0085nel\u2029para",
    '\\" \\n {{ }} [ ] & * ! | > % @ `',
    "\x00\x1b[31mred",
]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_strings_stay_inside_the_front_matter(hostile):
    text = card(
        name=hostile,
        license=hostile,
        base_models=[hostile, "org/" + hostile],
        description=hostile,
        lineage=[{"name": hostile, "sha256": hostile, "relation": hostile, "licence": hostile}],
    )
    meta, body = split(text)
    assert set(meta) == {
        "license",
        "license_name",
        "base_model",
        "base_model_relation",
        "library_name",
        "tags",
        "pipeline_tag",
    }
    assert meta["base_model"] == [hostile, "org/" + hostile]  # the value survives exactly
    assert meta["license"] == "other"
    # the body: the name heads it on one line; the lineage row is one line of four cells
    row = next(line for line in body.split("\n") if line.startswith("| ") and "Model" not in line)
    assert len(re.findall(r"(?<!\\)(?:\\\\)*\|", row)) == 5  # unescaped pipes: 4 cells
    assert body.count("\n# ") == 1
