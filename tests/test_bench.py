"""`tinkerlm bench` on a tiny model: every field present, positive and consistent (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_hf_model  # noqa: E402

import tinkerlm  # noqa: E402
from tinkerlm import kernels  # noqa: E402
from tinkerlm.bench import bench, prompt_ids, weight_bytes  # noqa: E402
from tinkerlm.errors import TinkerError  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "llama"
    make_hf_model("llama", path)
    return path


def unique_state_bytes(model):
    """Parameters and buffers (shared ones once), plus tensors kept as plain attributes (e.g. RoPE inv_freq)."""
    tensors = {}
    for t in list(model.parameters()) + list(model.buffers()):
        tensors[(t.data_ptr(), t.nbytes)] = t
    for m in model.modules():
        for name, t in vars(m).items():
            if isinstance(t, torch.Tensor) and not name.startswith("_"):
                tensors[(t.data_ptr(), t.nbytes)] = t
    return sum(t.nbytes for t in tensors.values())


def test_bench_fields(tiny):
    r = bench(str(tiny), prompt_tokens="16,8", decode_tokens=12, runs=2, quiet=True)
    assert r["prompt_tokens"] == [8, 16]
    for key in ("load_s", "warmup_s", "ttft_s", "decode_tok_s", "effective_gb_s", "peak_rss_mb", "weight_bytes"):
        assert r[key] > 0, key
    for n in ("8", "16"):
        assert r["prefill_s"][n] > 0
        assert r["prefill_tok_s"][n] * r["prefill_s"][n] == pytest.approx(int(n))  # N tokens per prefill
    assert r["ttft_tokens"] == 8 and r["ttft_s"] == r["prefill_s"]["8"]
    assert r["decode_tokens"] == 12 and len(r["decode_tok_s_runs"]) == 2
    assert r["threads"] == torch.get_num_threads() and r["dtype"] == "float32" and r["quant"] == "native"
    assert r["kernels"] == "PyTorch (float weights)"  # a float checkpoint at --quant native stays float
    q = bench(str(tiny), prompt_tokens="8", decode_tokens=4, runs=1, quant="int8", quiet=True)
    assert q["kernels"] == f"C++ {kernels.ops().isa}, fused decode step" and q["quant"] == "int8"
    model = tinkerlm.load(str(tiny)).model
    assert r["weight_bytes"] == r["bytes_per_token"] == unique_state_bytes(model)
    assert r["weight_bytes"] >= 4 * sum(p.numel() for p in model.parameters())
    assert r["effective_gb_s"] == pytest.approx(r["weight_bytes"] * r["decode_tok_s"] / 1e9)


def test_prompt_is_exactly_n_tokens(tiny):
    tok = tinkerlm.load(str(tiny)).tokenizer
    for n in (1, 50, 100_000):  # longer than the shipped text: it repeats
        assert len(prompt_ids(tok, n)) == n


def test_weight_bytes_counts_tied_once_and_packed_buffers(tmp_path):
    make_hf_model("llama3-tied", tmp_path / "t")
    model = tinkerlm.load(str(tmp_path / "t")).model
    assert weight_bytes(model) == unique_state_bytes(model)

    class Packed(torch.nn.Module):  # a quantized layer may keep packed weights as a plain attribute
        def __init__(self):
            super().__init__()
            self.register_buffer("scales", torch.ones(4, dtype=torch.float16))
            self.packed = torch.zeros(4, 8, dtype=torch.uint8)
            self.bias = torch.nn.Parameter(torch.zeros(4))

    assert weight_bytes(Packed()) == 4 * 2 + 32 + 4 * 4


def test_bench_rejects_what_does_not_fit(tiny):
    with pytest.raises(TinkerError, match="context of 128"):
        bench(str(tiny), prompt_tokens="8,128", decode_tokens=4, runs=1, quiet=True)
    with pytest.raises(TinkerError, match="decode-tokens"):
        bench(str(tiny), prompt_tokens="8", decode_tokens=200, runs=1, quiet=True)
    with pytest.raises(TinkerError, match="prompt-tokens"):
        bench(str(tiny), prompt_tokens="8,x", quiet=True)
    with pytest.raises(TinkerError, match="kv_cache: 'q4'"):
        bench(str(tiny), prompt_tokens="8", kv_cache="q4", quiet=True)


def test_cli_bench_json(tiny):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinkerlm",
            "bench",
            str(tiny),
            "--prompt-tokens",
            "8,24",
            "--decode-tokens",
            "8",
            "--runs",
            "1",
            "--json",
            "--threads",
            "1",
            "--kv-cache",
            "q8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["kv_cache"] == "q8" and r["threads"] == 1 and r["prompt_tokens"] == [8, 24] and r["decode_tokens"] == 8
    assert r["decode_tok_s"] > 0 and r["prefill_tok_s"]["24"] > 0 and r["peak_rss_mb"] > 0
    assert "prefill 24 tokens" in proc.stderr  # progress goes to stderr, results alone to stdout


def test_cli_bench_table(tiny):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinkerlm",
            "bench",
            str(tiny),
            "--prompt-tokens",
            "8",
            "--decode-tokens",
            "4",
            "--runs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for label in (
        "load",
        "prefill 8 tokens",
        "time to first token",
        "decode 4 tokens",
        "effective bandwidth",
        "peak RSS",
    ):
        assert label in proc.stdout


def test_pretrain_bench_tinkerlm_engine(tmp_path):
    """bench/pretrain_bench.py's tinkerlm engine, 2 steps of a tiny model in a fresh process: the script cannot rot."""
    import argparse

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import pretrain_bench
    from tiny import write_tokenizer

    (tmp_path / "tok").mkdir()
    write_tokenizer(tmp_path / "tok")
    args = argparse.Namespace(
        cache=str(tmp_path / "cache"),
        data=["stdlib/json/*.py"],
        tokenizer=str(tmp_path / "tok"),
        vocab=0,
        seq_len=32,
        batch_size=2,
        grad_accum=2,
        steps=2,
        lr_warmup=1,
        threads=1,
        precision="fp32",
    )
    tiny = dict(
        pretrain_bench.MODEL, hidden_size=32, intermediate_size=64, num_hidden_layers=1, max_position_embeddings=32
    )
    tiny.update(num_attention_heads=4, num_key_value_heads=2)
    spec = pretrain_bench.prepare(args, model=tiny)
    assert np.load(spec["rows"]).shape == (2, 4, 32)  # steps, rows per step, seq_len: what every engine is fed
    r = pretrain_bench.run("tinkerlm", spec, warmup=0)
    assert len(r["losses"]) == 2 and all(4 < x < 7 for x in r["losses"])  # ln(320) = 5.77 at the start
    assert len(r["step_tok_s"]) == 1 and r["step_tok_s"][0] > 0  # the interval between the two optimizer steps
    assert r["peak_rss_mb"] > 50 and r["threads"] == 1 and r["tokens_per_step"] == 2 * 2 * 32


def test_preference_bench_tinkerlm_worker(tiny, tmp_path):
    """bench/preference_bench.py's tinkerlm engine, 2 steps on the tiny model: it runs, counts the real tokens TRL's
    chat-template tokenization gives (prompt + chosen, prompt + rejected), and starts from policy = reference."""
    import math

    import transformers

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from bench import preference_bench as pb

    small = dict(seed=0, prompt_words=3, answer_words=(2, 6), instruction="Go on:")  # fits 128 byte tokens
    data = pb.make_pairs(tmp_path / "pairs.jsonl", 4, **small)
    assert data.read_text() == pb.make_pairs(tmp_path / "again.jsonl", 4, **small).read_text()
    spec = {"model": str(tiny), "data": str(data), "seq_len": 128, "batch_size": 2, "steps": 2, "threads": 1}
    r = pb.worker_tinkerlm(spec)
    hf = transformers.AutoTokenizer.from_pretrained(tiny)
    want = []
    for line in data.read_text().splitlines():
        pair = json.loads(line)
        prompt = [{"role": "user", "content": pair["prompt"]}]
        n = [
            len(
                hf.apply_chat_template(
                    prompt + [{"role": "assistant", "content": pair[k]}], tokenize=True, return_dict=True
                )["input_ids"]
            )
            for k in ("chosen", "rejected")
        ]
        assert max(n) < spec["seq_len"]  # nothing cut: the counts compare whole sequences
        want.append(sum(n))
    assert r["tokens"] == [want[0] + want[1], want[2] + want[3]]
    assert r["losses"][0] == pytest.approx(math.log(2), abs=1e-5)  # LoRA B = 0: the policy is the reference
    assert all(math.isfinite(x) for x in r["losses"]) and len(r["times"]) == 2 and r["peak_rss_mb"] > 0
