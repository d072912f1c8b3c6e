"""K-quants kept in their own bits: Q4_K, Q5_K, Q6_K, Q3_K and Q2_K super-blocks packed straight into the kernels'
layout (X4K, X5K, X6K, X3K, X2K: kernels/common.h) with the file's integers, d, dmin and sub-block scales, so that
they dequantize exactly as gguf does and unpack to the file's super-blocks.

Bounds used below. Packing changes a weight only through its sub-block's scale d * sc and offset -dmin * mn, each
rounded to fp16 (relative error <= 2^-11), so |w_ours - w_ref| <= 2^-11 * (|w_ref - offset| + |offset|) + fp32
slack, elementwise; a product's error is then <= 2^-11 * (|x| @ that bound^T) plus fp32 accumulation slack. The
activations are rounded to int16 blocks as the kernels see them (`round_acts`), so the references use them too.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from peers import llama_cpp_model
from tiny import VOCAB, write_tokenizer

from tinkerlm import kernels
from tinkerlm.quant import qops
from tinkerlm.quant.encode import encode
from tinkerlm.quant.qtensor import PACKED_FORMATS, _k_scales, from_gguf, k_dequantize

pytestmark = pytest.mark.skipif(kernels.ops() is None, reason="needs the C++ kernels")

TYPES = ["Q6_K", "Q3_K", "Q2_K", "Q4_K", "Q5_K"]
BITS = {"Q6_K": 6.625, "Q3_K": 3.625, "Q2_K": 2.625, "Q4_K": 4.5, "Q5_K": 5.5}  # packed bits a weight (scales included)
EPS = 2.0**-11


def weights(rows: int, K: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, K, generator=g) * torch.logspace(-1, 1, K)[torch.randperm(K, generator=g)]
    return (w + 0.3 * torch.rand(rows, 1, generator=g)).numpy()  # an offset per row: the mins matter


def offsets(raw: np.ndarray, qtype: str) -> np.ndarray:
    """|offset| of every weight's sub-block (zero for the symmetric types), shape of the dequantized matrix."""
    rows = raw.shape[0]
    if qtype in ("Q4_K", "Q5_K"):
        sb = raw.reshape(-1, {"Q4_K": 144, "Q5_K": 176}[qtype])
        m = _k_scales(sb)[..., 2:4].copy().view(np.float16).astype(np.float32)  # (n, 8, 1)
        return np.abs(np.repeat(m, 32, axis=-1)).reshape(rows, -1)
    if qtype == "Q2_K":
        sb = raw.reshape(-1, 84)
        dmin = sb[:, 82:84].copy().view(np.float16).astype(np.float32)
        m = dmin * (sb[:, :16] >> 4).astype(np.float32)  # (n, 16): one per 16 values
        return np.abs(np.repeat(m, 16, axis=-1)).reshape(rows, -1)
    return np.zeros((rows, raw.shape[1] // {"Q6_K": 210, "Q3_K": 110}[qtype] * 256), np.float32)


def loaded(qtype: str, rows: int, K: int, seed: int = 0):
    w = weights(rows, K, seed)
    raw = encode(torch.from_numpy(w), qtype)
    qt = from_gguf(raw, qtype, (rows, K))
    ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(rows, K))
    bound = torch.from_numpy(EPS * (np.abs(ref.numpy()) + 2 * offsets(raw, qtype)) + 1e-6 * np.abs(ref.numpy()))
    return qt, qops.pack(qt), ref, bound


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [48, 37])
def test_packed_k_quants_dequantize_as_gguf_within_the_fp16_scale_rounding(qtype, rows):
    qt, packed, ref, bound = loaded(qtype, rows, 512)
    assert qt.qtype == qtype and packed.fmt == PACKED_FORMATS[qtype]
    assert packed.qtype == qtype
    assert packed.nbytes * 8 / (-(-rows // 16) * 16 * 512) == BITS[qtype]
    ours = qops.dequantize(packed)
    assert ours.shape == ref.shape
    assert ((ours - ref).abs() <= bound).all(), (ours - ref).abs().max().item()
    # the scalar entry point (embedding rows, unpacking) and the PyTorch fallback agree with the vector one
    ids = torch.tensor([[0, rows - 1], [rows // 2, 3]])
    assert torch.equal(qops.embed(ids, packed), ours[ids])
    torch.testing.assert_close(qt.dequantize(), ours, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.from_numpy(k_dequantize(qt.data.numpy(), qtype, rows, 512)), ours)
    assert torch.equal(ours, ref)  # the file's scales: gguf's values exactly
    assert torch.equal(qops.unpack(packed).data, qt.data)  # and the file's super-blocks back bit for bit


def extreme_q4_k(rows: int, K: int, seed: int) -> np.ndarray:
    """Random Q4_K super-blocks whose d and dmin run from fp16 subnormals to 2^15 (and zero), with the 6-bit scales
    and mins random, all 63 or all 0, so every bit of the scale bytes and every min matters."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, K // 256, 144), dtype=np.uint8)
    scales = np.array([0.0, 6e-8, 3e-5, 1e-3, 0.5, 7.0, 1000.0, 32768.0], np.float16)
    raw[..., 0:2] = rng.choice(scales, size=raw.shape[:2])[..., None].view(np.uint8)
    raw[..., 2:4] = rng.choice(scales, size=raw.shape[:2])[..., None].view(np.uint8)
    raw[:, 0, 4:16] = 0xFF  # every sc and mn 63
    raw[:, -1, 4:16] = 0x00  # every sc and mn 0
    return raw.reshape(rows, -1)


def extreme_q5_k(rows: int, K: int, seed: int) -> np.ndarray:
    """Q5_K super-blocks as extreme_q4_k's (the same head) with random fifth bits, all set in the first super-block
    and all clear in the last: every 5-bit integer from 0 to 31 at the extremes of the scales."""
    q4 = extreme_q4_k(rows, K, seed).reshape(rows, K // 256, 144)
    rng = np.random.default_rng(seed + 1)
    raw = np.concatenate(
        (q4[..., :16], rng.integers(0, 256, size=(rows, K // 256, 32), dtype=np.uint8), q4[..., 16:]), -1
    )
    raw[:, 0, 16:48] = 0xFF
    raw[:, -1, 16:48] = 0x00
    return raw.reshape(rows, -1)


def extreme_q6_k(rows: int, K: int, seed: int) -> np.ndarray:
    """Random Q6_K super-blocks whose d runs from fp16 subnormals to 2^15 (and zero), int8 scales random, all -128
    or all 127."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, K // 256, 210), dtype=np.uint8)
    scales = np.array([0.0, 6e-8, 3e-5, 1e-3, 0.5, 7.0, 1000.0, 32768.0], np.float16)
    raw[..., 208:210] = rng.choice(scales, size=raw.shape[:2])[..., None].view(np.uint8)
    raw[:, 0, 192:208] = 0x80  # every scale -128
    raw[:, -1, 192:208] = 0x7F  # every scale 127
    return raw.reshape(rows, -1)


def extreme_q3_k(rows: int, K: int, seed: int) -> np.ndarray:
    """Random Q3_K super-blocks whose d runs from fp16 subnormals to 2^15 (and zero), with the 6-bit scales random,
    all 63 or all 0 (sc - 32 = 31 or -32) and the high bits and low bits all set in the first super-block, all clear
    in the last: every 3-bit integer from 0 to 7 at the extremes of the scales."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, K // 256, 110), dtype=np.uint8)
    scales = np.array([0.0, 6e-8, 3e-5, 1e-3, 0.5, 7.0, 1000.0, 32768.0, -0.5, -32768.0], np.float16)
    raw[..., 108:110] = rng.choice(scales, size=raw.shape[:2])[..., None].view(np.uint8)
    raw[:, 0, :108] = 0xFF  # every u 7, every sc 63
    raw[:, -1, :108] = 0x00  # every u 0, every sc 0
    return raw.reshape(rows, -1)


def extreme_q2_k(rows: int, K: int, seed: int) -> np.ndarray:
    """Random Q2_K super-blocks whose d and dmin run from fp16 subnormals to 2^15 (zero, and negative), with every
    4-bit scale and min and every 2-bit integer random, all at its top (15, 3) or all 0."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, K // 256, 84), dtype=np.uint8)
    scales = np.array([0.0, 6e-8, 3e-5, 1e-3, 0.5, 7.0, 1000.0, 32768.0, -0.5, -32768.0], np.float16)
    raw[..., 80:82] = rng.choice(scales, size=raw.shape[:2])[..., None].view(np.uint8)
    raw[..., 82:84] = rng.choice(scales, size=raw.shape[:2])[..., None].view(np.uint8)
    raw[:, 0, :80] = 0xFF
    raw[:, -1, :80] = 0x00
    return raw.reshape(rows, -1)


@pytest.mark.parametrize(
    "qtype, extreme, per_256",
    [
        ("Q6_K", "extreme_q6_k", 212),
        ("Q4_K", "extreme_q4_k", 144),
        ("Q5_K", "extreme_q5_k", 176),
        ("Q3_K", "extreme_q3_k", 116),
        ("Q2_K", "extreme_q2_k", 84),
    ],
)
@pytest.mark.parametrize("rows", [16, 37])
def test_own_bits_formats_on_extreme_blocks_match_gguf(qtype, extreme, per_256, rows):
    """X6K (Q6_K: every scale -128 or 127), X4K and X5K (Q4_K, Q5_K: extreme d, dmin, scales and mins), X3K (Q3_K:
    extreme d of both signs, every scale 63 or 0, every integer 7 or 0), X2K (Q2_K: the same for d, dmin, its scales,
    mins and integers): packed bytes, exact dequantization and embedding rows, unpacking to the file's blocks,
    products within fp32 rounding."""
    K = 768
    raw = globals()[extreme](rows, K, seed=rows)
    qt = from_gguf(raw, qtype, (rows, K))
    ref = torch.from_numpy(gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype)).reshape(rows, K))
    packed = qops.pack(qt)
    assert packed.fmt == PACKED_FORMATS[qtype] and packed.nbytes == -(-rows // 16) * 16 * K // 256 * per_256
    assert torch.equal(qops.dequantize(packed), ref)
    assert torch.equal(qops.embed(torch.tensor([rows - 1, 0]), packed), ref[[rows - 1, 0]])
    assert torch.equal(qops.unpack(packed).data, qt.data)
    g = torch.Generator().manual_seed(rows)
    for T in (1, 2, 12, 13):
        x = torch.randn(T, K, generator=g) * torch.logspace(-2, 3, K)
        xr = qops.round_acts(x)
        want = xr.double() @ ref.double().T
        # exact weights: only fp32 rounding of the block products and their sum
        tol = 1e-5 * (xr.abs() @ ref.abs().T).double() + 1e-30
        assert ((qops.qmatmul(x, packed).double() - want).abs() <= tol).all(), T


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("T", [1, 2, 5, 12, 29])  # decode sizes (1, 2) and prefill tiles
def test_products_of_k_quants(qtype, T):
    rows, K = 37, 768
    qt, packed, ref, bound = loaded(qtype, rows, K, seed=T)
    g = torch.Generator().manual_seed(100 + T)
    x = torch.randn(T, K, generator=g) * torch.logspace(0, 3, K)  # outlier channels too
    xr = qops.round_acts(x)
    want = xr @ ref.T
    tol = xr.abs() @ (bound + 1e-5 * ref.abs()).T + 1e-6 * (xr.abs() @ ref.abs().T)
    assert ((qops.qmatmul(x, packed) - want).abs() <= tol).all()
    assert ((qops.qmatmul(x, qt) - want).abs() <= tol).all()  # a QTensor of super-blocks packs on the fly
    y_multi = qops.qmatmul_multi(x, [packed, packed])
    assert torch.equal(y_multi[0], qops.qmatmul(x, packed)) and torch.equal(y_multi[1], y_multi[0])
    _, up, ref_up, bound_up = loaded(qtype, rows, K, seed=T + 50)
    got = qops.qmatmul_swiglu(x, packed, up)
    want_up = xr @ ref_up.T
    tol_up = xr.abs() @ (bound_up + 1e-5 * ref_up.abs()).T + 1e-6 * (xr.abs() @ ref_up.abs().T)
    lo = torch.nn.functional.silu(want) * want_up
    # silu is 1-Lipschitz-ish (|silu'| <= 1.1): the product's error from both inputs' bounds
    err = 1.1 * tol * want_up.abs() + (want.abs() + 1.1 * tol) * tol_up
    assert ((got - lo).abs() <= err + 1e-4 * lo.abs().max()).all()


PORTABLE = {"avx2": ("-mno-avx512f",), "scalar": ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")}


@pytest.mark.parametrize("isa", list(PORTABLE))
def test_portable_builds_compute_the_k_formats_as_the_vector_build(isa):
    fast, slow = kernels.ops(), kernels.build(PORTABLE[isa])
    assert slow.isa == isa
    x = torch.randn(13, 512) * torch.logspace(0, 3, 512)
    extreme = {
        "extreme Q4_K": from_gguf(extreme_q4_k(37, 512, seed=3), "Q4_K", (37, 512)),
        "extreme Q6_K": from_gguf(extreme_q6_k(37, 512, seed=3), "Q6_K", (37, 512)),
        "extreme Q5_K": from_gguf(extreme_q5_k(37, 512, seed=3), "Q5_K", (37, 512)),
        "extreme Q3_K": from_gguf(extreme_q3_k(37, 512, seed=3), "Q3_K", (37, 512)),
        "extreme Q2_K": from_gguf(extreme_q2_k(37, 512, seed=3), "Q2_K", (37, 512)),
    }
    for qtype in [*TYPES, *extreme]:
        qt, packed, _, _ = (
            loaded(qtype, 37, 512) if qtype in TYPES else (extreme[qtype], qops.pack(extreme[qtype]), 0, 0)
        )
        assert torch.equal(slow.pack(qt.data, qt.code), packed.data)
        assert torch.equal(slow.dequantize_packed(packed.data, packed.fmt, 37), qops.dequantize(packed))
        for n in (1, 13):
            want = fast.qmatmul(x[:n], packed.data, packed.fmt, 37)
            got = slow.qmatmul(x[:n], packed.data, packed.fmt, 37)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), qtype


def test_other_types_still_requantize_to_8_bits():
    """A type without a packed format of its own (IQ4_NL): dequantized by gguf, requantized to Q8_0 blocks (error
    <= half a step of each 32-value block)."""
    rng = np.random.default_rng(1)
    _, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
    raw = (rng.integers(0, 256, size=(8, 8 * type_size), dtype=np.uint8) & 0xBF).astype(np.uint8)  # finite fp16 d

    def deq(r):
        return gguf.quants.dequantize(r, gguf.GGMLQuantizationType.IQ4_NL)

    ref = torch.from_numpy(deq(raw).reshape(8, 256))
    qt = from_gguf(raw, "IQ4_NL", (8, 256), deq)
    step = ref.reshape(8, 8, 32).abs().amax(-1) / 127
    err = (qt.dequantize() - ref).reshape(8, 8, 32).abs().amax(-1)
    assert qt.qtype == "Q8_0" and (err <= step * 0.5 + 1e-3 * step.max()).all()


def test_without_kernels_k_quants_dequantize_in_numpy(monkeypatch):
    qt, packed, ref, bound = loaded("Q3_K", 20, 256)
    monkeypatch.setattr(kernels, "ops", lambda: None)
    x = torch.randn(3, 256)
    ours = qops.dequantize(qt)
    assert ((ours - ref).abs() <= bound).all()
    torch.testing.assert_close(qops.qmatmul(x, qt), qops.round_acts(x) @ ours.T)


# ---------------------------------------------------------------------------------------------------------------
# End to end: a llama GGUF whose weights are Q6_K, Q3_K and Q2_K, run by tinkerlm and by llama.cpp

MIXES = {"q6_k": ["Q6_K"], "q3_k_m": ["Q3_K", "Q6_K", "Q4_K"], "q2_k": ["Q2_K", "Q3_K", "Q5_K"]}


@pytest.mark.parametrize("mix", list(MIXES))
def test_llama_cpp_agrees_on_a_k_quant_model(mix, tmp_path):
    """The same file's logits from tinkerlm (prefill products and the fused decode step) and from llama.cpp.
    llama.cpp rounds activations to 8 bits (Q8_K) for K-quant products, we to 16: the tolerance is that of 8-bit
    activations, ~2^-8 of each projection's scale compounded over 2 layers, taken as 3% of the logits' range."""
    import transformers

    import tinkerlm
    from tinkerlm.formats import specs
    from tinkerlm.formats.gguf_write import TensorPlan, write_gguf
    from tinkerlm.formats.tokenizer import Tokenizer

    pytest.importorskip("llama_cpp")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=256, eos_token_id=258,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    write_tokenizer(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    spec = specs.for_model_type("llama")
    cfg = config.to_dict()
    metadata = {**spec.gguf_metadata(cfg), **tok.gguf_metadata(vocab_size=VOCAB)}
    metadata["general.file_type"] = 0
    plans, types = [], MIXES[mix]
    for i, (hf, tensor) in enumerate(model.state_dict().items()):
        array = tensor.float().numpy()
        order = spec.row_order(hf, cfg, array.shape[0], to_gguf=True)
        array = np.ascontiguousarray(array if order is None else array[order])
        if array.ndim == 2:
            qtype = types[i % len(types)]
            data = encode(torch.from_numpy(array), qtype)
            plans.append(TensorPlan(spec.gguf_name(hf), qtype, array.shape, lambda d=data: d))
        else:
            plans.append(TensorPlan(spec.gguf_name(hf), "F32", array.shape, lambda a=array: a))
    path = write_gguf(tmp_path / "m.gguf", metadata, plans)
    written = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert set(types) <= written

    ids = list(range(40, 64))
    llm = llama_cpp_model(path, n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    want = torch.from_numpy(np.asarray(llm.scores[: len(ids)]).copy())
    ours = tinkerlm.load(str(path))
    held = {m.qtype for m in ours.model.modules() if hasattr(m, "qtype")}
    assert held == set(types)
    with torch.no_grad():
        got = ours.model(torch.tensor([ids]))[0]
    tol = 0.03 * (want.max() - want.min())
    assert (got - want).abs().max() <= tol, ((got - want).abs().max(), tol)
    # the fused decode step on the same weights: the last token after a prefill of the others
    model = ours.model
    assert model.fused_decode is not None
    cache = model.new_cache(1, 64)
    with torch.no_grad():
        model(torch.tensor([ids[:-1]]), cache=cache)
        cache.advance(len(ids) - 1)
        step = model(torch.tensor([ids[-1:]]), cache=cache)[0, -1]
    assert (step - want[-1]).abs().max() <= tol
    assert (step - got[-1]).abs().max() <= 1e-3 * tol  # ours, both paths: the same int16 products


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K", "Q5_K", "Q3_K", "Q2_K"])
def test_a_row_alone_is_the_same_product_as_in_a_tile(qtype):
    """Decode (one activation row) and prefill (tiles of rows) run register tiles of different sizes (a table of
    group_rows<FMT, 1..TILE_ROWS>), and a decode-only inner loop is the obvious next speed-up. The integer sums are
    exact and each row's scales are applied alike, so a row's output must be bit for bit the same alone as in a
    tile (batched and single-stream serving then agree), down to the extremes of the integer lanes' partial sums:
    every nibble 15 against activations all at +amax or -amax. (An AVX2 decode loop on byte products that let its
    int16 partial sums overflow failed here.) 27 rows: AVX2 prefill unpacks each half group once for all its tiles
    (from two tiles up), so that path is held to the same bits."""
    rows, K = 40, 512
    rng = np.random.default_rng(7)
    nbytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}.get(qtype) or dict(Q4_K=144, Q6_K=210, Q5_K=176, Q3_K=110, Q2_K=84)[
        qtype
    ]
    per_row = K // (32 if nbytes in (18, 20, 34) else 256)
    raw = rng.integers(0, 256, (rows, per_row, nbytes), dtype=np.uint8)
    half = lambda v: np.frombuffer(np.float16(v).tobytes(), np.uint8)  # noqa: E731
    scale_at = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208], "Q5_K": [0, 2], "Q3_K": [108],
                "Q2_K": [80, 82]}[qtype]  # fmt: skip
    for at in scale_at:  # finite scales
        raw[:, :, at : at + 2] = half(0.01)
    if qtype in ("Q4_0", "Q4_1"):
        raw[:16, :, len(scale_at) * 2 :] = 0xFF  # the first group: every nibble 15
    elif qtype in ("Q4_K", "Q5_K"):  # (Q5_K: every fifth bit too, so every integer 31)
        raw[:16, :, 16:] = 0xFF
    elif qtype == "Q3_K":  # every high and low bit: every integer 7 (u - 4 = 3)
        raw[:16, :, :96] = 0xFF
    elif qtype == "Q2_K":  # every scale and min 15, every integer 3
        raw[:16, :, :80] = 0xFF
    raw = raw.reshape(rows, per_row * nbytes)
    packed = qops.pack(from_gguf(raw, qtype, (rows, K)))
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.ones(1, K), -torch.ones(1, K), torch.randn(25, K, generator=g) * torch.logspace(0, 3, K)])
    together = qops.qmatmul(x, packed)
    for i in range(len(x)):
        assert torch.equal(qops.qmatmul(x[i : i + 1], packed), together[i : i + 1]), i
    assert torch.isfinite(together).all() and together[0].abs().max() > 0
