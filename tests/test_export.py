"""`tinkerlm export` and `tinkerlm quantize` on tiny random models: lossless round trips (bit-exact), HF exports that
transformers loads with equal logits, LoRA adapters exported as fused models, lineage through `pull`, bad input.

The real model (every type, llama.cpp interop, importance matrices) is tests/test_export_smollm2.py.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import assert_user_error, cli
from test_tune import write_chat_data
from tiny import make_hf_model

from tinkerlm import store
from tinkerlm.errors import TinkerError
from tinkerlm.export import export, quantize
from tinkerlm.formats.gguf import read_gguf
from tinkerlm.loading import load_checkpoint

KINDS = ["llama", "llama3-tied", "llama-headdim", "qwen2", "qwen3", "gpt2"]
IDS = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tinies(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinies")
    out = {}
    for kind in KINDS:
        make_hf_model(kind, root / kind)
        (root / kind / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
        out[kind] = root / kind
    return out


def logits(path, quant="fp32"):
    model = load_checkpoint(Path(path), torch.float32, quant)[0]
    with torch.no_grad():
        return model(IDS)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_f32_gguf_reads_back_bit_exact(tinies, kind, tmp_path):
    out = tmp_path / "m.gguf"
    result = export(str(tinies[kind]), to="gguf", type="f32", out=str(out), progress=False)
    src = load_checkpoint(tinies[kind], torch.float32, "fp32")[0]
    ckpt = read_gguf(out)
    mine = dict(src.state_dict())
    for name in ckpt.hf_names():
        assert torch.equal(ckpt.hf_tensor(name), mine[name]), name
    assert torch.equal(logits(out), logits(tinies[kind]))
    v = result["verification"]
    assert v["kl_max"] == 0 and v["top1"] == 1.0 and v["ppl_reference"] == v["ppl_candidate"]
    assert ckpt.metadata["general.license"] == "apache-2.0"
    assert ckpt.metadata["general.file_type"] == 0


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_gguf_to_gguf_of_the_same_type_copies_every_block(tinies, qtype, tmp_path):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export(str(tinies["llama"]), to="gguf", type=qtype, out=str(first), progress=False)
    result = export(str(first), to="gguf", type=qtype, out=str(second), progress=False)
    a, b = read_gguf(first), read_gguf(second)
    assert [t[0] for t in a.tensor_infos()] == [t[0] for t in b.tensor_infos()]
    for name in a.hf_names():
        ra, rb = a.raw_tensor(name), b.raw_tensor(name)
        assert ra.type == rb.type and np.array_equal(np.asarray(ra.data), np.asarray(rb.data)), name
    assert all(t["copied"] for t in result["tensors"])
    assert result["verification"]["kl_max"] == 0


@pytest.mark.parametrize("kind", ["llama", "llama3-tied", "qwen3", "gpt2"])
def test_hf_export_loads_in_transformers_with_equal_logits(tinies, kind, tmp_path):
    import transformers

    gguf = tmp_path / "m.gguf"
    export(str(tinies[kind]), to="gguf", type="q8_0", out=str(gguf), progress=False)
    out = tmp_path / "hf"
    export(str(gguf), to="hf", out=str(out), progress=False)
    ours = logits(gguf)  # the quantized values, exactly: HF export of a GGUF writes them in float32
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = theirs(IDS).logits[0]
    torch.testing.assert_close(ref, ours, atol=2e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Grüße, 世界! def f(x): return x**2 🙂"
    assert tok(text)["input_ids"] == load_checkpoint(gguf, torch.float32, "fp32")[1].encode(text)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "base_model" in card and "apache-2.0" in card
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == theirs.config.eos_token_id == 258


def test_hf_export_shards_past_the_size_limit(tinies, tmp_path):
    from tinkerlm.export import hf as hf_mod
    from tinkerlm.export.source import open_source

    out = tmp_path / "sharded"
    out.mkdir()
    hf_mod.write(open_source(str(tinies["llama"])), out, max_shard_bytes=100_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert torch.equal(logits(out), logits(tinies["llama"]))


def test_lora_adapter_exports_as_the_fused_model(tinies, tmp_path):
    import tinkerlm
    from tinkerlm.tune import finetune

    data = write_chat_data(tmp_path / "d.jsonl", 16)
    m = finetune(
        base=str(tinies["llama"]), data=str(data), out="ad", seq_len=64, batch_size=2, max_steps=3, lr=5e-2,
        progress=False,
    )  # fmt: skip
    assert m.format == "lora"
    llm = tinkerlm.load("ad", quant="fp32")
    with torch.no_grad():
        ref = llm.model(IDS)[0]
    assert not torch.allclose(ref, logits(tinies["llama"]), atol=1e-3)  # the adapter changed the model
    f32, q8 = tmp_path / "f32.gguf", tmp_path / "q8.gguf"
    export("ad", to="gguf", type="f32", out=str(f32), progress=False)
    torch.testing.assert_close(logits(f32), ref, atol=1e-5, rtol=1e-5)
    result = export("ad", to="gguf", type="q8_0", out=str(q8), progress=False)
    err = (logits(q8) - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err
    assert result["verification"]["top1"] > 0.9
    lineage = json.loads(read_gguf(q8).metadata["tinkerlm.lineage"])
    assert lineage["parents"][0]["name"] == "ad:latest"
    assert lineage["parents"][0]["relation"] == "quantized"
    assert any(p["relation"] == "base" for p in lineage["parents"][0]["parents"])


def test_pull_of_an_exported_gguf_restores_the_lineage(tinies, tmp_path):
    first = store.pull(str(tinies["qwen2"]), name="tq", progress=False)
    out = tmp_path / "tq.gguf"
    export("tq", to="gguf", type="q8_0", out=str(out), progress=False)
    m = store.pull(str(out), name="back", progress=False)
    assert m.license == "apache-2.0"
    assert m.parents[0]["name"] == "tq:latest"
    assert m.parents[0]["sha256"] == store.digest(first)
    assert m.parents[0]["relation"] == "quantized"


def test_quantize_stores_a_child_with_its_verification(tinies, tmp_path):
    store.pull(str(tinies["llama"]), name="base", progress=False)
    m = quantize("base", type="q8_0", out="base-q8", progress=False)
    assert m.format == "gguf" and m.quantization == "Q8_0"
    assert m.parents[0]["name"] == "base:latest" and m.parents[0]["relation"] == "quantized"
    assert m.license == "apache-2.0"
    v = store.get("base-q8").verification
    assert 0 < v["kl_mean"] < 0.05 and v["top1"] > 0.9
    shown = cli("show", "base-q8", env={"TINKERLM_HOME": os.environ["TINKERLM_HOME"]}, check=0).stdout
    assert "verification:" in shown and "KL mean" in shown and "quantized: base:latest" in shown


def test_report_lists_every_tensor(tinies, tmp_path):
    result = export(str(tinies["llama"]), to="gguf", type="q4_0", out=str(tmp_path / "r.gguf"), report=True,
                    progress=False)  # fmt: skip
    rows = {r["name"]: r for r in result["tensors"]}
    assert rows["blk.0.attn_q.weight"]["type"] == "Q4_0" and 0 < rows["blk.0.attn_q.weight"]["error"] < 0.2
    assert rows["blk.0.attn_norm.weight"]["type"] == "F32" and rows["blk.0.attn_norm.weight"]["error"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing half-written


def _env():
    return {"TINKERLM_HOME": os.environ["TINKERLM_HOME"]}


def test_bad_input_is_one_line_and_leaves_nothing(tinies, tmp_path):
    src = str(tinies["llama"])
    out = tmp_path / "out"
    out.mkdir()
    assert_user_error(cli("export", src, "--type", "q9_k", "--out", str(out / "a.gguf")), "q9_k", "q4_k_m")
    assert_user_error(cli("export", src, "--out", str(out / "nodir" / "a.gguf")), "does not exist")
    (out / "exists.gguf").write_bytes(b"keep")
    assert_user_error(cli("export", src, "--out", str(out / "exists.gguf")), "already exists", "--force")
    assert (out / "exists.gguf").read_bytes() == b"keep"
    assert_user_error(cli("export", src, "--out", str(out / "a.bin")), ".gguf")
    assert_user_error(cli("export", src, "--to", "hf", "--type", "q4_0", "--out", str(out / "h")), "--type")
    assert_user_error(cli("export", "nosuchmodel", "--out", str(out / "a.gguf"), env=_env()), "nosuchmodel")
    assert_user_error(cli("quantize", src, "--type", "q8_0", "--out", "Bad Name!", env=_env()))
    odd = out.parent / "odd-template"
    shutil.copytree(src, odd)
    (odd / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}")
    assert_user_error(cli("export", str(odd), "--out", str(out / "a.gguf"), "--ollama"), "Ollama")
    assert sorted(p.name for p in out.iterdir()) == ["exists.gguf"]


def test_unwritable_directory(tinies, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert_user_error(cli("export", str(tinies["llama"]), "--out", str(ro / "a.gguf")), "not writable")
    finally:
        ro.chmod(0o700)


def test_a_type_the_model_cannot_take(tmp_path):
    """Rows of 40 values are not whole blocks of 32: no quantized type fits, and saying so beats a silent F16."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=40, intermediate_size=80, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "odd")
    from tiny import write_tokenizer

    write_tokenizer(tmp_path / "odd")
    proc = cli("export", str(tmp_path / "odd"), "--type", "q4_0", "--out", str(tmp_path / "o.gguf"))
    assert_user_error(proc, "q4_0", "40")
    assert not (tmp_path / "o.gguf").exists()
    export(str(tmp_path / "odd"), to="gguf", type="f16", out=str(tmp_path / "f.gguf"), progress=False)


def test_unknown_architecture_is_refused(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 2)}, str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(TinkerError, match="bert"):
        export(str(d), to="gguf", type="f16", out=str(tmp_path / "b.gguf"), progress=False)
    assert not (tmp_path / "b.gguf").exists()


def test_a_file_that_does_not_read_back_exactly_is_not_kept(tinies, tmp_path, monkeypatch):
    import tinkerlm.quant.encode as enc

    real = enc.encode

    def off_by_one(w, qtype, imatrix=None, **kw):  # a writer bug: one weight of each F32 matrix changes
        data = real(w, qtype, imatrix, **kw)
        if qtype == "F32" and data.shape[0] > 1:
            data = data.copy()
            data[0, 0] += 1.0
        return data

    monkeypatch.setattr(enc, "encode", off_by_one)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TinkerError, match="does not read back identically"):
        export(str(tinies["llama"]), type="f32", out=str(out / "m.gguf"), progress=False)
    assert list(out.iterdir()) == []
    store.pull(str(tinies["llama"]), name="src", progress=False)
    with pytest.raises(TinkerError, match="does not read back identically"):
        quantize("src", type="f32", out="bad", progress=False)
    assert store.find("bad") is None


def test_recorded_lineage_from_hostile_metadata_is_dropped_not_raised():
    from tinkerlm.formats.describe import gguf_lineage

    assert gguf_lineage({"tinkerlm.lineage": "[" * 100_000}) == []  # nested past the recursion limit
    assert gguf_lineage({"tinkerlm.lineage": "not json"}) == []
    assert gguf_lineage({"tinkerlm.lineage": '["a list"]'}) == []
    assert gguf_lineage({"tinkerlm.lineage": '{"parents": [{"name": "a"}, 3, {"name": 4}]}'}) == [{"name": "a"}]
    meta = {"general.base_model.count": 10**9, "general.base_model.0.name": "org/base", "general.base_model.1.name": 7}
    assert gguf_lineage(meta) == [{"name": "org/base", "relation": "base"}]
