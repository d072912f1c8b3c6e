"""Architecture specs (tinkerlm/formats/specs/): every registered architecture has its tiny parity configuration, the
registry agrees with transformers, and the GGUF checkpoint's public API (`hf_names`, `hf_shape`, `hf_tensor`,
`raw_tensor`) gives HF names, shapes and rows, the q/k permutation of llama.cpp's converter undone exactly."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from ggufwriter import gguf_name, llamacpp_permute, write_gguf
from test_gguf import gpt2_weights, llama_weights
from tiny import CONFIGS

from tinkerlm import models
from tinkerlm.errors import TinkerError
from tinkerlm.formats import specs
from tinkerlm.formats.gguf import read_gguf


def tiny_model_types() -> dict[str, list[str]]:
    """model_type -> the tiny parity configurations (tests/tiny.py, run by test_models.py) of that type."""
    import transformers

    out: dict[str, list[str]] = {}
    for kind, (cfg_name, _) in CONFIGS.items():
        out.setdefault(getattr(transformers, cfg_name).model_type, []).append(kind)
    return out


@pytest.mark.parametrize("model_type", specs.model_types())
def test_every_model_type_has_a_tiny_parity_configuration(model_type):
    assert model_type in tiny_model_types(), (
        f"model_type {model_type!r} is registered in tinkerlm/formats/specs/ but tests/tiny.py CONFIGS has no tiny "
        "configuration of it, so no parity test covers it (docs/adding-a-model.md)"
    )


@pytest.mark.parametrize("model_type", specs.model_types())
def test_registry_agrees_with_transformers(model_type):
    import transformers

    spec = specs.for_model_type(model_type)
    hf_class = getattr(transformers, spec.hf_classes[model_type])
    assert hf_class.config_class.model_type == model_type
    module = __import__(f"tinkerlm.models.{spec.family}", fromlist=["_"])
    assert all(hasattr(module, name) for name in spec.model)
    assert set(spec.defaults) <= set(spec.model_types)


def test_registry_lookups():
    assert specs.gguf_architectures() == {
        "llama": "llama",
        "mistral": "mistral",
        "qwen2": "qwen2",
        "qwen3": "qwen3",
        "gemma3": "gemma3_text",
        "phi3": "phi3",
        "gpt2": "gpt2",
        "qwen3moe": "qwen3_moe",
    }
    assert set(specs.gguf_architectures().values()) <= set(specs.model_types())
    assert specs.for_gguf("qwen2") is specs.for_model_type("qwen2")
    assert specs.gguf_model_type("qwen3") == "qwen3" and specs.gguf_model_type("rwkv6") == "rwkv6"
    with pytest.raises(TinkerError, match=r"x\.gguf: architecture 'bert' is not supported \(supported: llama, "):
        specs.for_gguf("bert", "x.gguf")
    with pytest.raises(TinkerError, match="architecture 'mamba' is not supported"):
        specs.for_model_type("mamba")
    assert specs.with_defaults({"model_type": "qwen2"})["attention_bias"] is True
    assert specs.with_defaults({"model_type": "qwen2", "attention_bias": False})["attention_bias"] is False
    assert specs.with_defaults({"model_type": "gpt2"})["tie_word_embeddings"] is True
    assert "tie_word_embeddings" not in specs.with_defaults({"model_type": "llama"})
    assert specs.with_defaults({"model_type": "rwkv6", "a": 1}) == {"model_type": "rwkv6", "a": 1}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_name_table_round_trips_and_matches_the_writer(kind, rng):
    spec = specs.for_model_type(kind)
    weights = llama_weights(rng, bias=True, qk_norm=True) if kind == "llama" else gpt2_weights(rng)
    for hf in weights:
        g = spec.gguf_name(hf)
        assert g == gguf_name(hf), hf  # the spec's table and tests/ggufwriter.py's, written independently
        assert spec.hf_name(g)[0] == hf
    assert spec.hf_name("blk.0.not_a_tensor.weight") is None
    assert spec.gguf_name("model.layers.0.nope.weight") is None


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_public_checkpoint_api(tmp_path, rng, qtype):
    weights = llama_weights(rng, bias=True)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", weights, qtype=qtype)
    ckpt = read_gguf(path)
    assert ckpt.hf_names() == list(weights)  # file order
    sd = ckpt.state_dict()
    for hf, value in weights.items():
        assert ckpt.hf_shape(hf) == value.shape, hf
        t = ckpt.hf_tensor(hf)
        assert t.dtype == torch.float32 and torch.equal(t, sd[hf]), hf
        if qtype == Q.F32:
            assert torch.equal(t, torch.from_numpy(value)), hf
        raw = ckpt.raw_tensor(hf)
        assert (raw.name, raw.shape) == (gguf_name(hf), value.shape)
        assert raw.type == ("F32" if value.ndim == 1 else qtype.name)
        stored = torch.from_numpy(np.array(raw.dequantize(), dtype=np.float32).reshape(raw.shape))
        assert torch.equal(stored if raw.row_order is None else stored[torch.from_numpy(raw.row_order)], t), hf
        assert (raw.row_order is not None) == (".q_proj." in hf or ".k_proj." in hf), hf
    with pytest.raises(TinkerError, match="no tensor model.layers.9.mlp.up_proj.weight"):
        ckpt.hf_tensor("model.layers.9.mlp.up_proj.weight")


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_qk_permutation_round_trip(model_type, tmp_path, rng):
    """llama.cpp's permutation (the test writer's) read back through the spec's inverse gives HF's rows; the spec's
    writer direction is llama.cpp's permutation."""
    spec = specs.for_model_type(model_type)
    weights = llama_weights(rng, bias=True)
    path = tmp_path / "tiny.gguf"
    stored = write_gguf(path, model_type, weights)
    ckpt = read_gguf(path)
    config = ckpt.config()
    for hf, value in weights.items():
        rows = value.shape[0]
        order = spec.row_order(hf, config, rows)
        to_gguf = spec.row_order(hf, config, rows, to_gguf=True)
        if order is None:
            assert to_gguf is None and np.array_equal(stored[gguf_name(hf)], value), hf
            continue
        heads = config["num_attention_heads" if ".q_proj." in hf else "num_key_value_heads"]
        assert not np.array_equal(stored[gguf_name(hf)], value), hf  # the file really holds permuted rows
        assert np.array_equal(value[to_gguf], llamacpp_permute(value, heads)), hf  # spec's writer == llama.cpp's
        assert np.array_equal(stored[gguf_name(hf)][order], value), hf  # the reader's inverse
        assert torch.equal(ckpt.hf_tensor(hf), torch.from_numpy(value)), hf


def test_unpermuted_model_types_keep_rows(tmp_path, rng):
    weights = llama_weights(rng, bias=True)
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, "qwen2", weights)
    ckpt = read_gguf(path)
    assert all(ckpt.raw_tensor(hf).row_order is None for hf in ckpt.hf_names())


def test_gpt2_conv1d_layout(tmp_path, rng):
    """GGUF and the model hold GPT-2's projections as nn.Linear (out, in); HF files hold the spec's Conv1D ones
    transposed, and `models.hf_layout` turns them back."""
    weights = gpt2_weights(rng)
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "gpt2", weights, meta={"attention.layer_norm_epsilon": 1e-5})
    ckpt = read_gguf(path)
    spec = ckpt.spec
    config = ckpt.config()
    conv = [n for n in ckpt.hf_names() if spec.is_conv1d(n)]
    assert len(conv) == 4 * 2 and not any(n.endswith(".bias") for n in conv)
    hf_file = {n: (ckpt.hf_tensor(n).t() if spec.is_conv1d(n) else ckpt.hf_tensor(n)) for n in ckpt.hf_names()}
    back = models.hf_layout(config, hf_file, "gpt2")
    for n in ckpt.hf_names():
        assert ckpt.hf_shape(n) == weights[n].shape and torch.equal(back[n], torch.from_numpy(weights[n])), n


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_shapes_cover_the_name_table(kind):
    """Every tensor the name table knows has a shape for each tiny configuration (so the GGUF reader checks it)."""
    import transformers

    cfg_name, kwargs = CONFIGS[kind]
    config = dict(kwargs, model_type=getattr(transformers, cfg_name).model_type)
    spec = specs.for_model_type(config["model_type"])
    assert set(spec.shapes(config)) == set(spec.tensor_names.values())
    assert spec.num_layers(config) == kwargs.get("num_hidden_layers", 2)  # GPT-2: n_layer=2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_state_dict_rows_equal_hf_tensor(arch, tmp_path, rng):
    """The packer (tinkerlm.quant) reorders quantized blocks by the spec's row order: each packed weight unpacks to
    exactly the fp32 reader's tensor."""
    from tinkerlm.quant import packed_state_dict, qops

    weights = llama_weights(rng, bias=True)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, arch, weights, qtype=Q.Q8_0)
    ckpt = read_gguf(path)
    packed = packed_state_dict(ckpt)
    assert list(packed) == ckpt.hf_names()
    for name, t in packed.items():
        got = t if isinstance(t, torch.Tensor) else qops.unpack(t).dequantize()
        assert isinstance(t, torch.Tensor) == (weights[name].ndim == 1), name
        assert torch.equal(got, ckpt.hf_tensor(name)), name
