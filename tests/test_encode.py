"""tinkerlm.quant.encode: float weights -> ggml blocks, checked three ways: the `gguf` package's dequantizer gives
the weights back within each type's error; an imatrix lowers the error where it puts weight; and the blocks are
byte-identical to llama.cpp's own ggml_quantize_chunk (llama-cpp-python's libggml-base, called through ctypes),
with and without an imatrix, on a real SmolLM2 weight and on random rows with zero and constant blocks."""

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from tinkerlm import kernels
from tinkerlm.errors import TinkerError
from tinkerlm.quant.encode import FLOAT_TYPES, GGML_TYPES, bits_per_weight, encode, fits, row_bytes

QUANT_TYPES = [t for t in GGML_TYPES if t not in FLOAT_TYPES]
# Relative RMS error on standard normal rows (measured: Q8_0 0.53%, Q6_K 1.8, Q5_K 3.6, Q5_1 3.8, Q5_0 4.3,
# Q4_K 7.2, IQ4_NL 7.6, Q4_1 7.8, Q4_0 8.6, Q3_K 15, Q2_K 30), bounds with ~20% margin.
MAX_REL_RMS = {
    "Q8_0": 0.007,
    "Q6_K": 0.022,
    "Q5_K": 0.045,
    "Q5_1": 0.047,
    "Q5_0": 0.053,
    "Q4_K": 0.088,
    "IQ4_NL": 0.093,
    "Q4_1": 0.095,
    "Q4_0": 0.105,
    "Q3_K": 0.185,
    "Q2_K": 0.36,
}


def normal_rows(rows=32, K=1024, seed=0) -> torch.Tensor:
    """Standard normal rows with the cases quantizers trip on: an all-zero row, a zero and a constant block, an
    outlier, and rows of very different scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, K, generator=g)
    w[1] = 0
    w[2, :256] = 0
    w[3, 32:64] = 0.5
    w[4, 100] = 40.0
    w[5] *= 1e-3
    w[6] *= 50
    return w


def back(blocks: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(dequantize(blocks, gguf.GGMLQuantizationType[qtype])))


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).pow(2).mean() / b.pow(2).mean()).sqrt())


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_round_trip_through_gguf_dequantizer(qtype):
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    blocks = encode(w, qtype)
    assert blocks.dtype == np.uint8 and blocks.shape == (64, row_bytes(qtype, 1024))
    assert rel_rms(back(blocks, qtype), w) < MAX_REL_RMS[qtype]
    # the hard rows come back too: zeros exactly, the tiny row and the outlier row within the same error
    w = normal_rows()
    got = back(encode(w, qtype), qtype)
    assert torch.equal(got[1], torch.zeros(1024))
    assert torch.equal(got[2, :256], torch.zeros(256))
    for r in (4, 5, 6):
        assert rel_rms(got[r], w[r]) < MAX_REL_RMS[qtype] * (3 if r == 4 else 1.2), r


def test_float_types_are_plain_casts():
    w = normal_rows(8, 128)
    w[0, 0] = float("nan")
    assert np.array_equal(encode(w, "F32"), w.numpy(), equal_nan=True)
    f16 = encode(w, "f16")
    assert f16.dtype == np.float16 and np.array_equal(f16, w.numpy().astype(np.float16), equal_nan=True)
    bf16 = encode(w, "BF16")  # ggml rounds to nearest even, as torch does; a NaN stays a NaN
    assert bf16.dtype == np.uint16
    want = w.bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16[:, 1:], want[:, 1:]) and np.array_equal(bf16[1:], want[1:])
    assert torch.isnan(torch.from_numpy(bf16[:1, :1].view(np.int16)).view(torch.bfloat16)).all()
    ties = torch.tensor([[1.0 + 2**-8, 1.0 + 3 * 2**-8]])  # exactly halfway: down to even, up to even
    assert encode(ties, "BF16").tolist() == [[0x3F80, 0x3F82]]


@pytest.mark.parametrize("qtype", [t for t in QUANT_TYPES if t != "Q8_0"])
def test_imatrix_lowers_the_error_where_it_weighs(qtype):
    w = normal_rows(32, 1024, seed=2)
    im = torch.ones(1024)
    im[::5] = 50.0  # every fifth column matters much more

    def weighted_error(blocks):
        return float((im * (back(blocks, qtype) - w).pow(2)).sum())

    assert weighted_error(encode(w, qtype, im)) < 0.9 * weighted_error(encode(w, qtype))


def test_metadata_and_errors():
    assert bits_per_weight("Q4_K") == 4.5 and bits_per_weight("q8_0") == 8.5 and bits_per_weight("F16") == 16
    assert fits("Q4_K", 1536) and not fits("Q4_K", 576) and fits("Q4_0", 576) and fits("F32", 7)
    with pytest.raises(TinkerError, match="unknown quantization type 'Q7_K'"):
        encode(torch.zeros(2, 256), "Q7_K")
    with pytest.raises(TinkerError, match="blk.0.attn_q.weight: rows of 576 values .* blocks of 256"):
        encode(torch.zeros(2, 576), "Q4_K", name="blk.0.attn_q.weight")
    with pytest.raises(TinkerError, match="imatrix has 10 values, expected one per column \\(256\\)"):
        encode(torch.zeros(2, 256), "Q4_K", torch.ones(10))
    with pytest.raises(TinkerError, match="negative or non-finite"):
        encode(torch.zeros(2, 256), "Q4_K", -torch.ones(256))
    w = torch.zeros(3, 64)
    w[2, 5] = float("inf")
    with pytest.raises(TinkerError, match="row 2 holds NaN or infinite"):
        encode(w, "Q8_0")


def test_rows_go_through_in_chunks(monkeypatch):
    import tinkerlm.quant.encode as enc

    w, im = normal_rows(32, 512), torch.rand(512) + 0.1
    whole = {t: encode(w, t, im) for t in ("Q4_K", "F16")}
    monkeypatch.setattr(enc, "CHUNK_VALUES", 3 * 512)  # 3 rows at a time, the last chunk short
    for qtype, want in whole.items():
        assert np.array_equal(encode(w, qtype, im), want), qtype


def test_fallback_without_kernels(monkeypatch):
    w = normal_rows(16, 256)
    with_kernels = {t: encode(w, t) for t in ("Q8_0", "Q4_0", "Q5_1")}
    monkeypatch.setattr(kernels, "ops", lambda: None)
    for qtype, blocks in with_kernels.items():  # the gguf package's numpy quantizers round as ggml does
        assert np.array_equal(encode(w, qtype), blocks), qtype
    with pytest.raises(TinkerError, match="Q4_K needs tinkerlm's C\\+\\+ kernels.*TINKERLM_KERNELS=0"):
        encode(w, "Q4_K")
    with pytest.raises(TinkerError, match="Q4_0 with an imatrix needs tinkerlm's C\\+\\+ kernels"):
        encode(w, "Q4_0", torch.ones(256))
    w[7, 3] = float("nan")
    with pytest.raises(TinkerError, match="row 7 holds NaN"):
        encode(w, "Q8_0")


# ---------------------------------------------------------------- equality with llama.cpp


@pytest.fixture(scope="module")
def ggml():
    """llama.cpp's ggml_quantize_chunk from llama-cpp-python's libggml-base (what llama-quantize runs)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(w: torch.Tensor, qtype: str, imatrix: torch.Tensor | None) -> np.ndarray:
        x = np.ascontiguousarray(w.float().numpy())
        im = None if imatrix is None else np.ascontiguousarray(imatrix.float().numpy())
        type_id = GGML_TYPES[qtype][0]
        out = np.zeros((x.shape[0], lib.ggml_row_size(type_id, x.shape[1])), np.uint8)
        written = lib.ggml_quantize_chunk(
            type_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None if im is None else im.ctypes.data
        )
        assert written == out.nbytes
        return out

    return quantize


@pytest.fixture(scope="module")
def smollm2_ffn_down(smollm2_gguf) -> torch.Tensor:
    """A real weight: SmolLM2's blk.0.ffn_down (576 x 1536; 1536 splits into 256-value super-blocks), first rows."""
    reader = gguf.GGUFReader(smollm2_gguf)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    return torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)[:128]))


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_blocks_equal_llama_cpp(qtype, ggml, smollm2_ffn_down):
    g = torch.Generator().manual_seed(3)
    cases = {"smollm2 blk.0.ffn_down": smollm2_ffn_down, "normal rows": normal_rows(32, 1024, seed=4)}
    for label, w in cases.items():
        # an imatrix as llama.cpp's tool makes: mean squared activations, a few columns far above the rest
        im = torch.rand(w.shape[1], generator=g).pow(4) * 10
        im[torch.randint(0, w.shape[1], (8,), generator=g)] = 500.0
        for imatrix in (None, im):
            ours, theirs = encode(w, qtype, imatrix), ggml(w, qtype, imatrix)
            same = (ours == theirs).mean()
            assert same == 1.0, f"{qtype} {label} {'with' if imatrix is not None else 'without'} imatrix: {same:.4%}"


def test_portable_build_quantizes_alike():
    """The build for a CPU without AVX2, FMA or F16C (as tests/test_quant.py makes it) writes the same blocks."""
    portable = kernels.build(("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c"))
    w, im = normal_rows(16, 512, seed=5), torch.rand(512) + 0.5
    for qtype in QUANT_TYPES:
        type_id = GGML_TYPES[qtype][0]
        for imatrix in (None, im):
            assert torch.equal(
                portable.quantize_rows(w, type_id, imatrix), kernels.ops().quantize_rows(w, type_id, imatrix)
            )
