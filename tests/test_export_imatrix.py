"""export/imatrix.py: importance matrices equal a direct computation, and llama.cpp's two file formats round-trip
or are read; malformed files give one-line TinkerErrors naming the file."""

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_hf_model  # noqa: E402

import tinkerlm  # noqa: E402
from tinkerlm.errors import TinkerError  # noqa: E402
from tinkerlm.export import imatrix  # noqa: E402
from tinkerlm.export.imatrix import Imatrix  # noqa: E402
from tinkerlm.quant.linear import QLinear  # noqa: E402

IDS = [(i * 37 + 11) % 256 for i in range(100)]  # byte tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("imatrix") / "tied"
    make_hf_model("llama3-tied", path)
    return path


def sq_sums(x: torch.Tensor) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).double().square().sum(0).float().numpy()


def test_values_equal_a_direct_computation(tied):
    model = tinkerlm.load(str(tied)).model
    im = imatrix.compute(model, IDS, context=128, progress=False)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        x0 = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))  # what q/k/v of layer 0 meet
        final = model(ids, head=False)  # the normed hidden states the (tied) head multiplies
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        sums, count = im.entries[name]
        assert count == len(IDS) and sums.dtype == np.float32 and sums.shape == (64,)
        np.testing.assert_allclose(sums, sq_sums(x0), rtol=1e-5)
    np.testing.assert_allclose(im.entries["token_embd.weight"][0], sq_sums(final), rtol=1e-5)
    np.testing.assert_allclose(im.weights("blk.0.attn_q.weight"), sq_sums(x0) / len(IDS), rtol=1e-5)
    assert im.weights("blk.9.attn_q.weight") is None
    # every weight matrix, named as in GGUF; the tied head under the embedding's name
    expected = {"token_embd.weight"} | {
        f"blk.{i}.{t}.weight"
        for i in range(2)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    }
    assert set(im.entries) == expected
    assert im.entries["blk.1.ffn_down.weight"][0].shape == (128,)  # the intermediate width


def test_chunks_and_counts(tied):
    model = tinkerlm.load(str(tied)).model
    whole = imatrix.compute(model, IDS, context=128, progress=False)
    chunked = imatrix.compute(model, IDS, context=30, progress=False)  # 4 chunks, the last of 10 tokens
    assert (chunked.chunk_count, chunked.chunk_size) == (4, 30)
    assert all(c == len(IDS) for _, c in chunked.entries.values())
    # layer 0's inputs do not depend on the context; deeper layers' do
    np.testing.assert_allclose(chunked.entries["blk.0.attn_q.weight"][0], whole.entries["blk.0.attn_q.weight"][0])
    assert not np.allclose(chunked.entries["blk.1.attn_q.weight"][0], whole.entries["blk.1.attn_q.weight"][0])


def test_untied_head_and_quantized_model(tmp_path):
    make_hf_model("llama", tmp_path / "m")
    float_im = imatrix.compute(tinkerlm.load(str(tmp_path / "m")).model, IDS, progress=False)
    assert "output.weight" in float_im.entries and "token_embd.weight" not in float_im.entries
    model = tinkerlm.load(str(tmp_path / "m"), quant="int8").model  # QLinear layers, q/k/v fused where it can
    assert isinstance(model.model.layers[0].self_attn.q_proj, QLinear)
    q_im = imatrix.compute(model, IDS, progress=False)
    assert set(q_im.entries) == set(float_im.entries)
    for name, (sums, count) in float_im.entries.items():
        assert q_im.entries[name][1] == count
        np.testing.assert_allclose(q_im.entries[name][0], sums, rtol=0.1)  # int8 weights: close, not equal
    from tinkerlm.kernels import ops

    if ops() is not None:  # the fused q/k/v call bypasses the modules' hooks: compute unfused and put it back
        assert model.model.layers[0].self_attn.fused_qkv is not None


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    im = Imatrix(
        {
            "blk.0.attn_q.weight": (rng.random(64, dtype=np.float32) * 100, 512),
            "output.weight": (rng.random(96, dtype=np.float32), 7),
        },
        chunk_count=3,
        chunk_size=512,
        datasets=["alice_ch1-2.txt"],
    )
    path = im.save(tmp_path / "imatrix.gguf")
    back = imatrix.load(path)
    assert (back.chunk_count, back.chunk_size, back.datasets) == (3, 512, ["alice_ch1-2.txt"])
    assert back.entries.keys() == im.entries.keys()
    for name, (sums, count) in im.entries.items():
        np.testing.assert_array_equal(back.entries[name][0], sums)
        assert back.entries[name][1] == count
    # an independent reader (the gguf package) sees llama.cpp's layout: keys, <name>.in_sum2 / <name>.counts, F32
    from gguf import GGUFReader

    reader = GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.chunk_size"].contents() == 512
    assert "general.architecture" not in reader.fields
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(f"{n}{s}" for n in im.entries for s in (".in_sum2", ".counts"))
    np.testing.assert_array_equal(tensors["output.weight.in_sum2"].data, im.entries["output.weight"][0])
    assert tensors["output.weight.counts"].data.tolist() == [7.0]


def legacy_bytes(entries, trailer=(5, b"calibration.txt")) -> bytes:
    """llama.cpp's legacy .dat layout, written from its description: values are (sum / count) * ncall."""
    out = [struct.pack("<i", len(entries))]
    for name, values, ncall in entries:
        b = name.encode()
        out.append(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, len(values)))
        out.append(np.asarray(values, dtype="<f4").tobytes())
    if trailer is not None:
        chunks, dataset = trailer
        out.append(struct.pack("<ii", chunks, len(dataset)) + dataset)
    return b"".join(out)


def test_legacy_dat_is_read(tmp_path):
    mean_sq = np.array([0.5, 2.0, 4.0, 1.0], dtype=np.float32)  # sum / count
    path = tmp_path / "imatrix.dat"
    path.write_bytes(legacy_bytes([("blk.0.ffn_down.weight", mean_sq * 10, 10), ("output.weight", [1.0, 3.0], 0)]))
    im = imatrix.load(path)
    assert im.datasets == ["calibration.txt"] and im.chunk_count == 5
    np.testing.assert_allclose(im.weights("blk.0.ffn_down.weight"), mean_sq)
    np.testing.assert_allclose(im.weights("output.weight"), [1.0, 3.0])  # ncall 0: values taken as they are
    path.write_bytes(legacy_bytes([("output.weight", [2.0], 2)], trailer=None))  # files from before the trailer
    assert imatrix.load(path).weights("output.weight").tolist() == [1.0]
    # read back as legacy, saved as GGUF, the quantizer's weights are unchanged
    np.testing.assert_allclose(imatrix.load(im.save(tmp_path / "x.gguf")).weights("blk.0.ffn_down.weight"), mean_sq)


def gguf_with(tmp_path, entries, kind="imatrix") -> Path:
    """A GGUF file with arbitrary (name, array) tensors, through tinkerlm's GGUF writer."""
    from tinkerlm.formats.gguf_write import TensorPlan, Typed, write_gguf

    plans = []
    for name, values in entries:
        array = np.asarray(values, dtype=np.float32)
        plans.append(TensorPlan(name, "F32", array.shape, lambda v=array: v))
    meta = {"general.type": kind, "imatrix.chunk_count": Typed(1, "UINT32")}
    return write_gguf(tmp_path / "bad.gguf", meta, plans)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_bytes(b""), "entry count runs past the end"),
        (lambda p: p.write_bytes(struct.pack("<i", 1 << 30) + b"\0" * 64), "declares 1073741824 entries"),
        (lambda p: p.write_bytes(legacy_bytes([("w", [1.0, 2.0], 1)])[:-25]), "declares 2 values, 6 bytes"),
        (lambda p: p.write_bytes(legacy_bytes([("w", [1.0, 2.0], 1)])[:-10]), "dataset name declares 15 bytes"),
        (lambda p: p.write_bytes(struct.pack("<ii", 1, 1 << 30) + b"\0" * 40), "a name of 1073741824 bytes"),
        (lambda p: p.write_bytes(struct.pack("<ii", 1, 1) + b"w" + struct.pack("<ii", 1, -3) + b"\0" * 8), "-3 values"),
        (lambda p: p.write_bytes(legacy_bytes([("w", [float("nan")], 1)])), "non-finite or negative"),
        (lambda p: p.write_bytes(legacy_bytes([("w", [-1.0], 1)])), "non-finite or negative"),
        (lambda p: p.write_bytes(legacy_bytes([("w", [1.0], 1), ("w", [1.0], 1)])), "appears twice"),
        (lambda p: p.write_bytes(legacy_bytes([("w", [1.0], 1)]) + b"junk"), "unexpected bytes"),
        (lambda p: p.write_bytes(b"\xff\xfe" * 50), "entries"),
    ],
)
def test_malformed_legacy_files(tmp_path, make, message):
    path = tmp_path / "bad.dat"
    make(path)
    with pytest.raises(TinkerError, match=message) as e:
        imatrix.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize(
    "entries,kind,message",
    [
        ([("w.in_sum2", [1.0, 2.0])], "imatrix", "no w.counts"),
        ([("w.counts", [1.0])], "imatrix", "no w.in_sum2"),
        ([("w.in_sum2", [1.0, 2.0]), ("w.counts", [1.0, 1.0])], "imatrix", "mixture-of-experts"),
        ([("w.in_sum2", [1.0, float("inf")]), ("w.counts", [1.0])], "imatrix", "non-finite"),
        ([("w.in_sum2", [1.0]), ("w.counts", [-4.0])], "imatrix", "count -4.0"),
        ([("w.in_sum2", [1.0]), ("w.counts", [1.0])], "model", "not an importance matrix"),
        ([("token_embd.weight", [1.0])], "imatrix", "no importance matrix entries"),
    ],
)
def test_malformed_gguf_files(tmp_path, entries, kind, message):
    path = gguf_with(tmp_path, entries, kind)
    with pytest.raises(TinkerError, match=message) as e:
        imatrix.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_truncated_gguf_and_missing_file(tmp_path):
    path = Imatrix({"w": (np.ones(64, np.float32), 1)}).save(tmp_path / "i.gguf")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(TinkerError, match="i.gguf"):
        imatrix.load(path)
    with pytest.raises(TinkerError, match="no such imatrix file"):
        imatrix.load(tmp_path / "missing.gguf")
    with pytest.raises(TinkerError, match="no entries"):
        Imatrix().save(tmp_path / "empty.gguf")


def test_gpt2_names(tmp_path):
    make_hf_model("gpt2", tmp_path / "g")
    im = imatrix.compute(tinkerlm.load(str(tmp_path / "g")).model, IDS, progress=False)
    layer = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
    assert set(im.entries) == {"token_embd.weight"} | {f"blk.{i}.{t}.weight" for i in range(2) for t in layer}
    assert im.entries["blk.0.ffn_down.weight"][0].shape == (256,)  # n_inner = 4 * n_embd
