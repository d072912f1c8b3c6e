"""Quantized weights: repacking round trips, kernels against the PyTorch fallback and float math, the fused decode
step against the module path, native GGUF loading against the fp32 path, and the fallback without kernels."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tiny import make_hf_model

import tinkerlm
from tinkerlm import kernels
from tinkerlm.quant import qops
from tinkerlm.quant.qtensor import PACKED_FORMATS, Packed, QTensor, from_gguf, quantize


@pytest.fixture
def no_kernels(monkeypatch):
    """The pure-PyTorch path, as on a machine without a compiler."""
    monkeypatch.setenv("TINKERLM_KERNELS", "0")
    kernels.ops.cache_clear()
    yield
    monkeypatch.delenv("TINKERLM_KERNELS")
    kernels.ops.cache_clear()


def test_kernels_build_here():
    """CI machines have a compiler: the fast path must be the one tested below, not silently the fallback."""
    assert kernels.ops() is not None


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_gguf_repack_is_lossless(qtype):
    w = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    qt = from_gguf(raw, qtype.name, w.shape)
    want = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
    assert torch.equal(qt.dequantize(), torch.from_numpy(want))
    assert qt.qtype == qtype.name and qt.data.data_ptr() == torch.from_numpy(raw).data_ptr()  # used in place


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_error_within_half_a_step(bits):
    w = torch.randn(64, 128)
    qt = quantize(w, bits)
    assert qt.qtype == ("Q4_1" if bits == 4 else "Q8_0")
    raw = qt.data.numpy()  # the blocks are ggml's: the gguf package reads them the same way
    assert np.array_equal(gguf.quants.dequantize(raw, Q[qt.qtype]).reshape(64, 128), qt.dequantize().numpy())
    blocks = w.reshape(64, 4, 32)
    step = (blocks.amax(-1) - blocks.amin(-1)) / 15 if bits == 4 else blocks.abs().amax(-1) / 127
    err = (qt.dequantize() - w).reshape(64, 4, 32).abs().amax(-1)
    assert (err <= step * 0.51 + 1e-6).all()


def test_row_views_and_cat_round_trip():
    qt = quantize(torch.randn(10, 64), 4)
    parts = [qt.rows(slice(0, 3)), qt.rows(slice(3, 10))]
    assert torch.equal(QTensor.cat(parts).dequantize(), qt.dequantize())
    perm = torch.randperm(10)
    assert torch.equal(qt.rows(perm).dequantize(), qt.dequantize()[perm])


CASES = [
    ("Q4_1", 576, 1),
    ("Q4_1", 576, 3),
    ("Q4_0", 96, 5),
    ("Q8_0", 96, 9),
    ("Q8_0", 576, 4),
    ("Q4_0", 1536, 2),
    ("Q5_1", 576, 1),
    ("Q5_0", 96, 13),
]


@pytest.mark.parametrize("qtype,K,B", CASES)
def test_kernel_matches_fallback_and_float(qtype, K, B, monkeypatch):
    torch.manual_seed(K + B)
    w = torch.randn(37, K).numpy()
    qt = from_gguf(gguf.quants.quantize(w, Q[qtype]), qtype, w.shape)
    x = torch.randn(B, K) * torch.logspace(0, 3, K)  # outlier channels, as real hidden states have
    fast = qops.qmatmul(x, qops.pack(qt))
    monkeypatch.setattr(kernels, "ops", lambda: None)
    slow = qops.qmatmul(x, qt)
    exact = x @ qt.dequantize().T
    scale = exact.abs().max()
    assert (fast - slow).abs().max() <= 1e-5 * scale  # the fallback rounds activations exactly as the kernel
    # int16 activation blocks: each value within amax / 65534 of its block's largest value
    assert (fast - exact).abs().max() <= 2e-4 * scale
    assert (fast - exact).abs().max() > 0  # the activations really are rounded


@pytest.mark.parametrize(
    "qtype,rows", [("Q4_0", 40), ("Q4_1", 37), ("Q8_0", 16), ("Q8_0", 3), ("Q5_1", 37), ("Q5_0", 20)]
)
def test_pack_round_trips(qtype, rows):
    """Packing (groups of 16 rows, padded) loses nothing: unpacking gives the GGUF blocks back bit for bit."""
    w = torch.randn(rows, 96).numpy()
    qt = from_gguf(gguf.quants.quantize(w, Q[qtype]), qtype, w.shape)
    packed = qops.pack(qt)
    assert isinstance(packed, Packed) and packed.shape == qt.shape
    assert packed.data.shape[0] == -(-rows // 16)
    assert torch.equal(qops.unpack(packed).data, qt.data)
    assert torch.equal(qops.dequantize(packed), qt.dequantize())
    ids = torch.tensor([[0, rows - 1], [rows // 2, 1]])
    assert torch.equal(qops.embed(ids, packed), qt.dequantize()[ids])


def test_activation_rounding_matches_fallback():
    x = torch.randn(5, 256) * torch.logspace(-3, 4, 256)
    x[2, :32] = 0  # an all-zero block
    fast = kernels.ops().round_acts(x)
    assert torch.equal(fast, qops.round_acts(x))  # bit for bit: the fallback computes what the kernel does
    err = (fast - x).reshape(5, 8, 32).abs().amax(-1)
    amax = x.reshape(5, 8, 32).abs().amax(-1)
    assert (err <= amax * (1 / 65534 + 2**-22)).all()  # half a step of amax / 32767, plus fp32 rounding


def test_fused_products_equal_separate_ones(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(11, 128)
    q, k, v = (qops.pack(quantize(torch.randn(n, 128), 4)) for n in (64, 32, 32))
    for got, want in zip(qops.qmatmul_multi(x, [q, k, v]), (qops.qmatmul(x, w) for w in (q, k, v))):
        assert torch.equal(got, want)
    gate, up = (qops.pack(quantize(torch.randn(80, 128), 8)) for _ in range(2))
    want = torch.nn.functional.silu(qops.qmatmul(x, gate)) * qops.qmatmul(x, up)
    got = qops.qmatmul_swiglu(x, gate, up)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    blocks = qops.unpack(gate), qops.unpack(up)
    monkeypatch.setattr(kernels, "ops", lambda: None)
    slow = qops.qmatmul_swiglu(x, *blocks)
    assert (got - slow).abs().max() <= 1e-4 * want.abs().max()


def test_dequantize_and_embed_kernels():
    qt = quantize(torch.randn(50, 128), 4)
    assert torch.equal(qops.dequantize(qt), qt.dequantize())
    ids = torch.tensor([[3, 49], [0, 7]])
    assert torch.equal(qops.embed(ids, qt), qt.dequantize()[ids])


# ---------------------------------------------------------------------------------------------------------------
# Whole models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    kinds = ["llama", "llama3-tied", "mistral-window", "qwen2", "qwen3", "gpt2"]
    for kind in kinds:
        make_hf_model(kind, root / kind)
    return {kind: root / kind for kind in kinds}


@pytest.mark.parametrize("kind", ["llama", "llama3-tied", "mistral-window", "qwen2", "qwen3"])
def test_fused_decode_equals_module_path(kind, tiny_models):
    llm = tinkerlm.load(str(tiny_models[kind]), quant="int8")
    model = llm.model
    assert model.fused_decode is not None
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))

    def decode(fused):
        saved = model.fused_decode
        model.fused_decode = saved if fused else None
        cache = model.new_cache(3, 32)
        cache.lengths = [0, 0, 0]
        with torch.no_grad():
            model(ids[:, :5], cache=cache)
            cache.advance(5)
            cache.lengths = [5, 3, 4]  # ragged rows: each decodes from its own position
            steps = []
            for t in range(5, 20):
                steps.append(model(ids[:, t : t + 1], cache=cache))
                cache.advance(1)
        model.fused_decode = saved
        return torch.cat(steps, 1)

    fused, modules = decode(True), decode(False)
    # Both round activations to int16 blocks before each product, so a last-bit difference upstream (another
    # summation order) can move a value across a rounding step: agreement is to that precision.
    assert (fused - modules).abs().max() <= 1e-4 * modules.abs().max()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_fused_projections_equal_module_path(kind, tiny_models):
    """q/k/v and gate/up as one kernel call each (prefill) against the separate projections; unfuse undoes it."""
    from tinkerlm.quant import unfuse

    model = tinkerlm.load(str(tiny_models[kind]), quant="int4").model
    assert model.model.layers[0].self_attn.fused_qkv is not None and model.model.layers[0].mlp.fused_gate_up
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused = model(ids)
        unfuse(model)
        assert model.model.layers[0].self_attn.fused_qkv is None and model.fused_decode is None
        separate = model(ids)
    assert (fused - separate).abs().max() <= 1e-5 * separate.abs().max()


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("quant,tol", [("int8", 0.02), ("int4", 0.25)])
def test_int_modes_close_to_fp32(kind, quant, tol, tiny_models):
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    ref = tinkerlm.load(str(tiny_models[kind]), quant="fp32").model
    q = tinkerlm.load(str(tiny_models[kind]), quant=quant).model
    with torch.no_grad():
        want, got = ref(ids), q(ids)
    assert (got - want).abs().max() <= tol * want.abs().max()
    assert (got - want).abs().max() > 0  # really quantized


def test_fallback_without_kernels_equals_kernels(tiny_models, no_kernels):
    slow = tinkerlm.load(str(tiny_models["qwen3"]), quant="int8")
    assert slow.model.fused_decode is None
    text_slow = slow.generate("hello", max_tokens=12)
    kernels.ops.cache_clear()
    import os

    os.environ["TINKERLM_KERNELS"] = "1"
    fast = tinkerlm.load(str(tiny_models["qwen3"]), quant="int8")
    assert fast.model.fused_decode is not None
    assert fast.generate("hello", max_tokens=12) == text_slow


PORTABLE = {"avx2": ("-mno-avx512f",), "scalar": ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")}


@pytest.fixture(scope="module", params=list(PORTABLE))
def portable_ops(request):
    """The kernels built as for a CPU without AVX-512 (AVX2 loops) or without AVX2 either (plain C++ loops). On a
    machine without AVX-512 the AVX2 one is this CPU's own build under other flags: still compared, as a build."""
    module = kernels.build(PORTABLE[request.param])
    assert module.isa == request.param
    return module


def test_portable_builds_prefill_in_their_own_kernels(portable_ops, monkeypatch):
    """A prefill-sized product on an AVX2 build stays in its integer kernels (int16-rounded activations); only the
    plain build hands it to BLAS on the dequantized weight."""
    monkeypatch.setattr(kernels, "ops", lambda: portable_ops)
    torch.manual_seed(5)
    x = torch.randn(qops.PORTABLE_MAX_ROWS + 48, 96) * torch.logspace(0, 3, 96)
    for qtype in ("Q4_0", "Q8_0"):
        packed = qops.pack(from_gguf(gguf.quants.quantize(torch.randn(37, 96).numpy(), Q[qtype]), qtype, (37, 96)))
        integer = portable_ops.qmatmul(x, packed.data, packed.fmt, 37)
        blas = x @ qops.dequantize(packed).T
        assert not torch.equal(integer, blas)  # the two paths are told apart
        assert torch.equal(qops.qmatmul(x, packed), blas if portable_ops.isa == "scalar" else integer)
        assert torch.equal(qops.qmatmul(x[:3], packed), portable_ops.qmatmul(x[:3], packed.data, packed.fmt, 37))


def test_portable_build_matches_vector_build(portable_ops, tiny_models, monkeypatch):
    fast = kernels.ops()
    torch.manual_seed(3)
    x = torch.randn(13, 96) * torch.logspace(0, 3, 96)
    for qtype in ("Q4_0", "Q4_1", "Q8_0", "Q5_1"):
        qt = from_gguf(gguf.quants.quantize(torch.randn(37, 96).numpy(), Q[qtype]), qtype, (37, 96))
        packed = fast.pack(qt.data, qt.code)
        assert torch.equal(portable_ops.pack(qt.data, qt.code), packed)
        fmt = PACKED_FORMATS[qtype]
        assert torch.equal(portable_ops.dequantize_packed(packed, fmt, 37), qt.dequantize())
        want = fast.qmatmul(x, packed, fmt, 37)
        assert (portable_ops.qmatmul(x, packed, fmt, 37) - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(portable_ops.round_acts(x), fast.round_acts(x))
    q, k, v = torch.randn(1, 4, 20, 32), torch.randn(1, 2, 20, 32), torch.randn(1, 2, 20, 32)
    torch.testing.assert_close(portable_ops.attention_causal(q, k, v, 0.2), fast.attention_causal(q, k, v, 0.2))

    def logits():  # prefill, then fused decode steps
        model = tinkerlm.load(str(tiny_models["llama"]), quant="int4").model
        assert model.fused_decode is not None
        ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(4))
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            out = [model(ids[:, :8], cache=cache)]
            cache.advance(8)
            for t in range(8, 12):
                out.append(model(ids[:, t : t + 1], cache=cache))
                cache.advance(1)
        return torch.cat(out, 1)

    want = logits()
    monkeypatch.setattr(kernels, "ops", lambda: portable_ops)
    got = logits()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_native_gguf_keeps_weights_packed(smollm2_gguf):
    llm = tinkerlm.load(str(smollm2_gguf))  # native is the default
    from tinkerlm.quant import QEmbedding, QLinear, weight_bytes

    layer = llm.model.model.layers[0]
    assert isinstance(layer.mlp.gate_proj, QLinear) and layer.mlp.gate_proj.qtype == "Q4_1"
    assert isinstance(llm.model.model.embed_tokens, QEmbedding) and llm.model.lm_head.qtype == "Q8_0"
    assert llm.model.lm_head.blocks.data_ptr() == llm.model.model.embed_tokens.blocks.data_ptr()  # tied: one copy
    assert weight_bytes(llm.model) < 1.1 * smollm2_gguf.stat().st_size  # nothing dequantized or duplicated


def test_native_matches_fp32_on_real_model(smollm2_gguf):
    """The native path's logits track the fp32-dequantized path (one token, a prompt, and a fused decode step),
    and greedy answers agree on these prompts (bench/quality.py counts agreement over more prompts and reports
    perplexity). Same weights on both sides: what differs is int16 activation rounding and summation order."""
    native = tinkerlm.load(str(smollm2_gguf))
    ref = tinkerlm.load(str(smollm2_gguf), quant="fp32")
    ids = torch.tensor(
        [ref.tokenizer.encode(ref.apply_chat_template("What is the capital of France?"), add_special_tokens=False)]
    )
    with torch.no_grad():
        for rows in (1, ids.shape[1]):
            got, want = native.model(ids[:, :rows]), ref.model(ids[:, :rows])
            assert (got - want).abs().max() <= 2e-3 * want.abs().max()  # measured: ~4e-4
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        steps = []
        for llm in (native, ref):
            cache = llm.model.new_cache(1, 64)
            llm.model(ids, cache=cache)
            cache.advance(ids.shape[1])
            steps.append(llm.model(ids[:, -1:], cache=cache))
        assert native.model.fused_decode is not None and ref.model.fused_decode is None
        assert (steps[0] - steps[1]).abs().max() <= 2e-3 * steps[1].abs().max()
    for prompt in ["What is the capital of France?", "Write a haiku about the sea."]:
        assert native.chat(prompt, max_tokens=32) == ref.chat(prompt, max_tokens=32)
