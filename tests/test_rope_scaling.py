"""Long-context RoPE (YaRN, dynamic NTK) and Qwen's per-layer sliding windows, against transformers.

The frequencies and YaRN's attention factor equal transformers' `modeling_rope_utils` bit for bit over a table of
settings; tiny random models give transformers' logits past the original context (dynamic NTK) and past the window
(Qwen2's `max_window_layers`, Qwen3's `layer_types`), cached decode equals the full forward, packed and batched rows
use each layer's window, the fused decode step declines what it cannot compute, and YaRN travels through GGUF.
(The `llama-yarn` and `qwen2-window` rows of tests/tiny.py add the parity, GGUF and llama.cpp tests of the tables.)
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peers import llama_cpp_model
from tiny import COMMON, write_tokenizer

import tinkerlm
from tinkerlm.errors import TinkerError
from tinkerlm.formats import specs
from tinkerlm.models.base import rope_attention_factor, rope_inv_freq

YARN = [
    {"factor": 4.0, "original_max_position_embeddings": 512},
    {"factor": 8.0, "original_max_position_embeddings": 256, "beta_fast": 16, "beta_slow": 2},
    {"factor": 4.0, "original_max_position_embeddings": 512, "truncate": False},
    {"factor": 2.0, "original_max_position_embeddings": 1024, "attention_factor": 1.3},
    {"factor": 16.0, "original_max_position_embeddings": 4096, "mscale": 0.8, "mscale_all_dim": 0.707},
    {"factor": 0.5, "original_max_position_embeddings": 2048},  # factor <= 1: no attention temperature
]


def hf_model(path, cfg_name: str, seed: int = 0, **kwargs):
    """A tiny random transformers model of config class `cfg_name` saved to `path` (as tests/tiny.py does)."""
    import transformers

    kwargs = copy.deepcopy(kwargs)  # transformers fills rope_scaling dicts in place
    config = getattr(transformers, cfg_name)(**dict(COMMON, num_key_value_heads=2, **kwargs))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


def ids_of(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 300, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Frequencies


@pytest.mark.parametrize("params", YARN, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("head_dim", [32, 128])
def test_yarn_frequencies_equal_transformers(params, head_dim):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", "rope_theta": 1e6, **params}
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=8192)
    config.rope_parameters = dict(scaling)
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    got = rope_inv_freq(head_dim, 1e6, scaling)
    assert torch.equal(got, want)
    assert rope_attention_factor(scaling) == want_factor
    assert not torch.equal(got, rope_inv_freq(head_dim, 1e6))  # scaling changed something


@pytest.mark.parametrize("seq_len", [100, 2048, 2049, 5000, 30000])
def test_dynamic_frequencies_equal_transformers(seq_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=2048)
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    want, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=torch.tensor(seq_len))
    scaling = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 2048}
    got = rope_inv_freq(64, 10000.0, scaling, seq_len=seq_len)
    assert torch.equal(got, want)
    assert torch.equal(got, rope_inv_freq(64, 10000.0)) == (seq_len <= 2048)


@pytest.mark.parametrize(
    ("scaling", "match"),
    [
        ({"rope_type": "longrope", "factor": 4.0}, "'longrope' is not supported"),
        ({"rope_type": "yarn"}, "rope_scaling"),  # no factor
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "attention_factor": "x"}, "x"),
        ({"rope_type": "dynamic", "factor": "big", "original_max_position_embeddings": 8}, "rope_scaling"),
    ],
)
def test_unsupported_or_malformed_scaling_is_refused(scaling, match):
    with pytest.raises(TinkerError, match=match):
        rope_inv_freq(64, 10000.0, scaling, seq_len=100)


# ---------------------------------------------------------------------------------------------------------------
# Dynamic NTK: past the original context, as transformers computes it


DYNAMIC = dict(max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def test_dynamic_past_the_original_context_matches_transformers(tmp_path):
    ref = hf_model(tmp_path, "LlamaConfig", **DYNAMIC)
    model = tinkerlm.load(str(tmp_path)).model
    assert model.max_context == 64  # factor x the original context
    ids = ids_of(2, 48, 1)
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
        plain = ref(ids[:, :30]).logits  # within the original context: no scaling
    assert (got - want).abs().max().item() <= 1e-4
    assert (model(ids[:, :30]) - plain).abs().max().item() <= 1e-4
    model.config.rope_scaling = None  # the default frequencies differ past the original context
    with torch.no_grad():
        assert (model(ids) - want).abs().max().item() > 1e-2


def test_dynamic_cached_decode_matches_transformers_cached_decode(tmp_path):
    """Decoding one token at a time past the original context, each step's frequencies follow its length while the
    cache keeps the keys rotated before (transformers does the same): equal logits at every step; within the original
    context cached decode equals the full forward."""
    ref = hf_model(tmp_path, "LlamaConfig", **DYNAMIC)
    model = tinkerlm.load(str(tmp_path)).model
    ids = ids_of(1, 44, 2)
    with torch.no_grad():
        out = ref(ids[:, :20], use_cache=True)
        want, past = [out.logits], out.past_key_values
        for t in range(20, 44):
            out = ref(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            want.append(out.logits)
        cache = model.new_cache(1, 64)
        got = [model(ids[:, :20], cache=cache)]
        cache.advance(20)
        for t in range(20, 44):
            got.append(model(ids[:, t : t + 1], cache=cache))
            cache.advance(1)
        full = model(ids[:, :32])
    got, want = torch.cat(got, 1), torch.cat(want, 1)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got[:, :32] - full).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Per-layer sliding windows

QWEN3_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
QWEN3 = dict(head_dim=32, num_hidden_layers=3, use_sliding_window=True, sliding_window=6, layer_types=QWEN3_TYPES)
QWEN2 = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)  # tests/tiny.py's qwen2-window


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-windows")
    return {
        "qwen2": (root / "qwen2", hf_model(root / "qwen2", "Qwen2Config", **QWEN2)),
        "qwen3": (root / "qwen3", hf_model(root / "qwen3", "Qwen3Config", **QWEN3)),
    }


def test_layer_windows_as_transformers_derives_them(qwen):
    for kind, windows in (("qwen2", [None, 8]), ("qwen3", [6, None, 6])):
        path, ref = qwen[kind]
        model = tinkerlm.load(str(path)).model
        assert model.layer_windows() == windows
        assert [
            ref.config.sliding_window if t == "sliding_attention" else None for t in ref.config.layer_types
        ] == windows


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_per_layer_windows_match_transformers_and_cached_decode(kind, qwen):
    path, ref = qwen[kind]
    model = tinkerlm.load(str(path)).model
    ids = ids_of(2, 24, 3)
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :5], cache=cache)]
        cache.advance(5)
        for t in range(5, 24):
            steps.append(model(ids[:, t : t + 1], cache=cache))
            cache.advance(1)
    assert (got - want).abs().max().item() <= 1e-4
    assert (torch.cat(steps, 1) - got).abs().max().item() <= 1e-5
    model.config.layer_types = None  # the window on every layer: logits past it differ
    with torch.no_grad():
        assert (model(ids) - want).abs().max().item() > 1e-3


def test_packed_documents_use_each_layers_window(qwen):
    """Two documents packed in one training row (positions restart, attention stays inside each) give the logits
    of each run alone, with the window on the sliding layers (documents longer than the window)."""
    model = tinkerlm.load(str(qwen["qwen3"][0])).model
    a, b = ids_of(1, 14, 4), ids_of(1, 10, 5)
    segments = torch.tensor([[0] * 14 + [1] * 10])
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), segments=segments)
        alone = torch.cat([model(a), model(b)], 1)
    assert (packed - alone).abs().max().item() <= 1e-5


def test_batched_ragged_rows_equal_single_rows(qwen):
    llm = tinkerlm.load(str(qwen["qwen2"][0]))
    prompts = ["a", "hello there, a longer prompt than the window", "mid size"]
    assert llm.generate(prompts, max_tokens=12) == [llm.generate(p, max_tokens=12) for p in prompts]


def test_window_config_checks(tmp_path):
    from tinkerlm import models

    llama = dict(COMMON, model_type="qwen2", num_key_value_heads=2, use_sliding_window=True, sliding_window=8)
    with pytest.raises(TinkerError, match="layer_types"):
        models.build(dict(llama, layer_types=["sliding_attention"]), "config.json")
    with pytest.raises(TinkerError, match="max_window_layers"):
        models.build(dict(llama, max_window_layers="1"), "config.json")
    # Windows on no layer or on all of them: one window for the model (which the fused decode step can take).
    none = models.build(dict(llama, max_window_layers=2), "config.json")
    every = models.build(dict(llama, max_window_layers=0), "config.json")
    assert (none.config.sliding_window, none.config.layer_types) == (None, None)
    assert (every.config.sliding_window, every.config.layer_types) == (8, None)
    off = models.build(dict(llama, use_sliding_window=False, layer_types=["sliding_attention"] * 2), "config.json")
    assert off.layer_windows() == [None, None]


# ---------------------------------------------------------------------------------------------------------------
# The fused decode step computes cos and sin from inv_freq and takes one window: it declines the rest


def test_fused_decode_declines_what_it_cannot_compute(tmp_path, qwen):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    hf_model(tmp_path / "yarn", "LlamaConfig", rope_scaling=yarn)
    hf_model(tmp_path / "dynamic", "LlamaConfig", **DYNAMIC)
    hf_model(tmp_path / "uniform", "Qwen2Config", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    declined = [tmp_path / "yarn", tmp_path / "dynamic", qwen["qwen2"][0], qwen["qwen3"][0]]
    for path in declined:
        assert tinkerlm.load(str(path), quant="int8").model.fused_decode is None, path
    # A window on every layer stays the step's: cached decode through it equals the module path.
    model = tinkerlm.load(str(tmp_path / "uniform"), quant="int8").model
    assert model.fused_decode is not None and model.layer_windows() == [8, 8]
    ids = ids_of(1, 20, 6)
    outs = []
    for fused in (model.fused_decode, None):
        model.fused_decode = fused
        cache = model.new_cache(1, 32)
        with torch.no_grad():
            steps = [model(ids[:, :4], cache=cache)]
            cache.advance(4)
            for t in range(4, 20):
                steps.append(model(ids[:, t : t + 1], cache=cache))
                cache.advance(1)
        outs.append(torch.cat(steps, 1))
    assert (outs[0] - outs[1]).abs().max() <= 1e-4 * outs[1].abs().max()


# ---------------------------------------------------------------------------------------------------------------
# GGUF


YARN_GGUF = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 16.0,
    "beta_slow": 2.0,
    "attention_factor": 1.25,
}


def test_yarn_through_gguf_and_back(tmp_path):
    """HF -> GGUF -> HF: the yarn keys are written as llama.cpp's converter writes them, read back into the config,
    and the GGUF and the HF directory exported from it give transformers' logits."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tinkerlm.export import export
    from tinkerlm.formats.gguf import read_gguf

    ref = hf_model(tmp_path / "hf", "LlamaConfig", rope_scaling=YARN_GGUF)
    export(str(tmp_path / "hf"), to="gguf", type="f32", out=str(tmp_path / "m.gguf"), progress=False, verify=False)
    meta = read_gguf(tmp_path / "m.gguf").metadata
    assert meta["llama.rope.scaling.type"] == "yarn"
    assert meta["llama.rope.scaling.original_context_length"] == 32
    assert (meta["llama.rope.scaling.yarn_beta_fast"], meta["llama.rope.scaling.yarn_attn_factor"]) == (16.0, 1.25)
    llm = tinkerlm.load(str(tmp_path / "m.gguf"))
    assert {k: llm.model.config.rope_scaling[k] for k in YARN_GGUF} == YARN_GGUF
    export(str(tmp_path / "m.gguf"), to="hf", out=str(tmp_path / "back"), progress=False, verify=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert torch.equal(
        ROPE_INIT_FUNCTIONS["yarn"](back.config, "cpu")[0], ROPE_INIT_FUNCTIONS["yarn"](ref.config, "cpu")[0]
    )
    ids = ids_of(2, 40, 7)
    with torch.no_grad():
        want = ref(ids).logits
        assert (llm.model(ids) - want).abs().max().item() <= 1e-4
        assert (back(ids).logits - want).abs().max().item() <= 1e-4


def test_yarn_gguf_keys_read(tmp_path):
    """Keys as llama.cpp's converter writes them; the original context defaults to the training context (as
    llama.cpp's n_ctx_orig_yarn), yarn_log_multiplier is mscale_all_dim with mscale 1 (as llama.cpp reads it)."""
    spec = specs.for_model_type("llama")
    config = dict(COMMON, model_type="llama", num_key_value_heads=2, max_position_embeddings=64)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5}
    meta = spec.gguf_metadata(config)
    assert meta["llama.rope.scaling.yarn_log_multiplier"] == 0.5
    assert meta["llama.rope.scaling.original_context_length"] == 64

    class Meta:  # the GGUFMetadata protocol over a dict
        architecture, path = "llama", "m.gguf"

        def __init__(self, m):
            self.m = m

        def arch_key(self, name, default=..., kind=int, limit=None):
            value = self.m.get(f"llama.{name}", default)
            if value is ...:
                raise TinkerError(f"m.gguf: llama.{name} is missing")
            return value

    del meta["llama.rope.scaling.original_context_length"]
    from tinkerlm.formats.specs.llama import _rope_scaling

    assert _rope_scaling(Meta(meta)) == {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
    }
    with pytest.raises(TinkerError, match="yarn_ext_factor"):
        _rope_scaling(Meta({**meta, "llama.rope.scaling.yarn_ext_factor": 0.5}))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' cannot be written to GGUF"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": False}}, "truncate"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "mscale": 0.7, "mscale_all_dim": 1}}, "mscale"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "sliding"),
    ],
)
def test_what_gguf_cannot_hold_is_refused(extra, match):
    config = {**COMMON, "model_type": "llama", "num_key_value_heads": 2, **extra}
    with pytest.raises(TinkerError, match=match):
        specs.for_model_type(config["model_type"]).gguf_metadata(config)
    # Qwen's sliding_window key alone (use_sliding_window false, as every released Qwen2.5 config) is no window.
    qwen = dict(COMMON, model_type="qwen2", use_sliding_window=False, sliding_window=4096, max_window_layers=1)
    assert "qwen2.context_length" in specs.for_model_type("qwen2").gguf_metadata(qwen)


def test_gemma_refuses_yarn_and_dynamic():
    """Gemma 3's forward (models/gemma.py) applies neither YaRN's attention factor nor dynamic frequencies."""
    from tinkerlm import models

    gemma = dict(COMMON, model_type="gemma3_text", num_key_value_heads=2, head_dim=16)
    for kind in ("yarn", "dynamic"):
        with pytest.raises(TinkerError, match=f"'{kind}' is not supported for Gemma 3"):
            models.build(dict(gemma, rope_scaling={"rope_type": kind, "factor": 4.0}), "config.json")


def test_config_json_keys_are_kept(tmp_path):
    """transformers 5 writes `rope_parameters` with rope_theta inside; the yarn keys survive into the config."""
    hf_model(tmp_path, "LlamaConfig", rope_scaling=YARN_GGUF)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "yarn"
    model = tinkerlm.load(str(tmp_path)).model
    assert model.rope_scale == 1.25 and model.max_context == 128


def test_llama_cpp_runs_a_yarn_gguf_as_tinkerlm_does(tmp_path):
    """A random-weight YaRN model exported to GGUF (f32): llama.cpp computes tinkerlm's logits at all 40 positions
    of a prompt longer than the original context of 32. (llama.cpp's llama architecture reads only the factor and
    the original context: it takes beta 32/1 and the attention factor from the factor, HF's defaults.)"""
    import numpy as np

    from tinkerlm.export import export

    pytest.importorskip("llama_cpp")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    hf_model(tmp_path / "hf", "LlamaConfig", head_dim=32, rope_scaling=yarn)
    export(str(tmp_path / "hf"), to="gguf", type="f32", out=str(tmp_path / "m.gguf"), progress=False, verify=False)
    ids = ids_of(1, 40, 8)[0].tolist()
    llm = llama_cpp_model(tmp_path / "m.gguf", n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    want = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        got = tinkerlm.load(str(tmp_path / "m.gguf")).model(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
    plain = tinkerlm.load(str(tmp_path / "m.gguf")).model
    plain.inv_freq, plain.rope_scale = rope_inv_freq(32, 10000.0), 1.0  # without YaRN the logits differ
    with torch.no_grad():
        assert np.abs(plain(torch.tensor([ids]))[0].numpy() - want).max() > 1e-2
