"""Phi-3 and Phi-4-mini (tinkerlm/models/phi3.py, tinkerlm/formats/specs/phi3.py) against transformers' Phi3ForCausalLM.

Tiny random checkpoints with LongRoPE (original context 16 of 64) loaded the way users load them: logits with the
short factors, the long ones and at the switch; cached decoding growing past the original length, step for step as
transformers' forward with a cache does; each row of a ragged batch choosing its own factors; partial rotary
(Phi-4-mini's 0.75); GGUF written and read back (llama.cpp's names and keys, the factors as tensors) and run by
llama.cpp itself. tests/tiny.py's phi3 rows run the generic parity, decode and GGUF tests over the long factors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peers import llama_cpp_model
from tiny import VOCAB, write_tokenizer

import tinkerlm
from tinkerlm import models
from tinkerlm.errors import TinkerError
from tinkerlm.export import export
from tinkerlm.formats.gguf import read_gguf

ORIG, MAX_POS = 16, 64
KINDS = {"phi3": dict(partial=1.0, tied=False), "phi4-mini": dict(partial=0.75, tied=True)}


def hf_config(partial: float, tied: bool, orig: int = ORIG, max_pos: int = MAX_POS, seed: int = 0):
    import transformers

    rot = int(16 * partial)  # head_dim 16
    rng = np.random.default_rng(seed)
    return transformers.Phi3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        original_max_position_embeddings=orig,
        partial_rotary_factor=partial,
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": (1 + rng.random(rot // 2)).tolist(),
            "long_factor": (1 + 16 * rng.random(rot // 2)).tolist(),
        },
        tie_word_embeddings=tied,
        pad_token_id=256,
        bos_token_id=256,
        eos_token_id=258,
    )


def make_phi3(path, partial=1.0, tied=False, **kw):
    """Save a tiny random Phi3ForCausalLM and the test tokenizer to `path`; return the transformers model."""
    import transformers

    torch.manual_seed(0)
    config = hf_config(partial, tied, **kw)
    model = transformers.Phi3ForCausalLM._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3")
    return {kind: (root / kind, make_phi3(root / kind, **kw)) for kind, kw in KINDS.items()}


def ids_of(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_short_long_and_at_the_switch(kind, checkpoints):
    path, ref = checkpoints[kind]
    model = tinkerlm.load(str(path)).model
    got = {}
    for n in (12, ORIG, ORIG + 1, 40):  # short factors up to the original length, long ones beyond
        ids = ids_of(2, n)
        with torch.no_grad():
            want, got[n] = ref(ids).logits, model(ids)
        assert (got[n] - want).abs().max().item() <= 1e-4, n
    # The switch matters: the first 12 tokens of a 40-token sequence are computed with the long factors.
    assert (got[40][:, :12] - got[12]).abs().max().item() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_past_the_original_length_matches_transformers(kind, checkpoints):
    """Prefill 10 tokens, then one at a time to 24: each step equals transformers' forward with its cache, where
    the keys cached before the switch keep the short factors and later tokens use the long ones."""
    from transformers import DynamicCache

    path, ref = checkpoints[kind]
    model = tinkerlm.load(str(path)).model
    ids = ids_of(1, 24, seed=2)
    with torch.no_grad():
        hf_cache = DynamicCache(config=ref.config)
        want = [ref(ids[:, :10], cache=hf_cache, use_cache=True).logits]
        for t in range(10, 24):
            want.append(ref(ids[:, t : t + 1], cache=hf_cache, use_cache=True).logits)
        cache = model.new_cache(1, 32)
        got = [model(ids[:, :10], cache=cache)]
        cache.advance(10)
        for t in range(10, 24):
            got.append(model(ids[:, t : t + 1], cache=cache))
            cache.advance(1)
        full = model(ids)
    got, want = torch.cat(got, 1), torch.cat(want, 1)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got[:, :ORIG] - model(ids[:, :ORIG])).abs().max().item() <= 1e-5  # short factors throughout
    assert (got[:, ORIG:] - full[:, ORIG:]).abs().max().item() > 1e-2  # the mixed cache is not the full pass


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_equals_full_forward_on_either_side(kind, checkpoints):
    path, _ = checkpoints[kind]
    model = tinkerlm.load(str(path)).model
    for start, stop in ((3, ORIG), (ORIG + 2, 30)):  # all short, all long (prefill already past the original)
        ids = ids_of(2, stop, seed=3)
        with torch.no_grad():
            full = model(ids)
            cache = model.new_cache(2, 32)
            steps = [model(ids[:, :start], cache=cache)]
            cache.advance(start)
            for t in range(start, stop):
                steps.append(model(ids[:, t : t + 1], cache=cache))
                cache.advance(1)
        assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5, (start, stop)


def test_ragged_batch_rows_choose_their_own_factors(checkpoints):
    """A short prompt batched with one past the original length decodes as it does alone (transformers would give
    the whole batch the long factors)."""
    path, _ = checkpoints["phi3"]
    llm = tinkerlm.load(str(path), prefix_cache_mb=0)
    prompts = ["hi", "a prompt longer than sixteen bytes"]
    assert llm.generate(prompts, max_tokens=6) == [llm.generate(p, max_tokens=6) for p in prompts]


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_round_trip(kind, checkpoints, tmp_path):
    import gguf

    path, ref = checkpoints[kind]
    out = tmp_path / "m.gguf"
    export(str(path), to="gguf", type="f32", out=str(out), progress=False)
    ckpt = read_gguf(out)
    names = {name for name, _, _ in ckpt.tensor_infos()}
    phi3 = gguf.MODEL_ARCH.PHI3
    known = {gguf.TENSOR_NAMES[t].format(bid=0) + ".weight" for t in gguf.MODEL_TENSORS[phi3]}
    assert {n.replace("blk.1.", "blk.0.") for n in names} <= known  # llama.cpp's names for its phi3 architecture
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "rope_factors_long.weight"} <= names
    config = ref.config
    rot = int(16 * (0.75 if kind == "phi4-mini" else 1.0))  # head_dim 16
    meta = ckpt.metadata
    assert meta["general.architecture"] == "phi3"
    assert meta["phi3.rope.scaling.original_context_length"] == ORIG
    assert meta["phi3.rope.dimension_count"] == rot
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(ORIG)))
    assert ("output.weight" in names) == (kind == "phi3")  # Phi-4-mini ties its head
    back = ckpt.config()
    params = config.rope_parameters
    for key in ("short_factor", "long_factor"):
        assert back["rope_scaling"][key] == np.float32(params[key]).tolist()
    assert "attention_factor" not in back["rope_scaling"]  # the default, computed again from the lengths
    assert back["partial_rotary_factor"] == rot / 16
    model = tinkerlm.load(str(out)).model
    for n in (12, 40):
        ids = ids_of(1, n, seed=4)
        with torch.no_grad():
            assert (model(ids) - ref(ids).logits).abs().max().item() <= 1e-4, n


def test_quantized_gguf_decodes_through_its_modules(checkpoints, tmp_path):
    """A Q8_0 file keeps its blocks (qkv_proj and gate_up_proj packed, one product each), attaches no fused
    decode step (quant/decode.py computes Llama's layers) and stays close to the float model."""
    path, ref = checkpoints["phi3"]
    out = tmp_path / "q8.gguf"
    export(str(path), to="gguf", type="q8_0", out=str(out), progress=False)
    model = tinkerlm.load(str(out)).model
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "QLinear"
    assert getattr(model, "fused_decode", None) is None
    ids = ids_of(1, 20, seed=5)
    with torch.no_grad():
        got, want = model(ids), ref(ids).logits
        cache = model.new_cache(1, 24)
        model(ids[:, :19], cache=cache)
        cache.advance(19)
        last = model(ids[:, 19:], cache=cache)
    assert (got - want).abs().max().item() < 0.1 * want.abs().max().item()
    assert (last[:, -1] - got[:, -1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("orig, n_ctx, n", [(256, 256, 12), (16, 32, 24)], ids=["short-factors", "long-factors"])
def test_llama_cpp_runs_the_written_phi3_as_transformers_does(tmp_path, monkeypatch, orig, n_ctx, n):
    """llama.cpp reads our phi3 GGUF (fused q/k/v and gate/up, partial rotary, the factor tensors, the attention
    factor) as transformers means it. llama.cpp picks the factors by its context size (padded to 256), so each case
    sets the original length where both choose the same ones."""
    pytest.importorskip("llama_cpp")
    ref = make_phi3(tmp_path / "hf", partial=0.75, tied=True, orig=orig, max_pos=4 * orig)
    out = tmp_path / "m.gguf"
    # A relative source: general.name is "hf", whatever the temporary path (llama.cpp fails to load this test
    # vocabulary under a general.name that contains "phi3", as a --basetemp may).
    monkeypatch.chdir(tmp_path)
    export("./hf", to="gguf", type="f32", out=str(out), progress=False)
    llm = llama_cpp_model(out, n_ctx=n_ctx, logits_all=True, verbose=False)
    ids = ids_of(1, n, seed=6)[0].tolist()
    llm.eval(ids)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[:n]), want, atol=2e-3, rtol=1e-3)


def test_bad_configs_are_refused_by_name():
    base = hf_config(1.0, False).to_dict()
    wrong = dict(base, rope_scaling=dict(base["rope_parameters"], short_factor=[1.0, 2.0]))
    wrong.pop("rope_parameters")
    with pytest.raises(TinkerError, match=r"rope_scaling\.short_factor must list 8 positive numbers"):
        models.build(wrong, "config.json")
    linear = dict(base, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(TinkerError, match="rope scaling type 'linear' is not supported for phi3"):
        models.build(linear, "config.json")
    yarn = dict(base, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(TinkerError, match="short_factor must list 8"):  # Phi3Config reads yarn as longrope
        models.build(yarn, "config.json")
    with pytest.raises(TinkerError, match="partial_rotary_factor 0.1 gives 1 rotary dims"):
        models.build(dict(base, rope_parameters=dict(base["rope_parameters"], partial_rotary_factor=0.1)), "c.json")


def test_phi3_mini_4k_plain_rope_and_sliding_window(tmp_path):
    """Phi-3-mini-4k's shape: no RoPE scaling (no factor tensors in GGUF) and a sliding window (2047 there, 8 here),
    which transformers applies and so does tinkerlm, from HF files and GGUF alike."""
    import transformers

    config = hf_config(1.0, False)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    config.sliding_window = 8
    torch.manual_seed(0)
    ref = transformers.Phi3ForCausalLM._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ref.save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf")
    export(str(tmp_path / "hf"), to="gguf", type="f32", out=str(tmp_path / "m.gguf"), progress=False)
    ckpt = read_gguf(tmp_path / "m.gguf")
    assert "rope_factors_long.weight" not in {name for name, _, _ in ckpt.tensor_infos()}
    assert ckpt.config()["sliding_window"] == 8 and ckpt.config()["rope_scaling"] is None
    ids = ids_of(1, 24, seed=7)
    with torch.no_grad():
        want = ref(ids).logits
        for path in (tmp_path / "hf", tmp_path / "m.gguf"):
            model = tinkerlm.load(str(path)).model
            assert (model(ids) - want).abs().max().item() <= 1e-4, path
        model.config.sliding_window = None  # the window is really applied
        assert (model(ids)[:, 8:] - want[:, 8:]).abs().max().item() > 1e-3
