"""`tinkerlm pretrain`: parity of the training with transformers' LlamaForCausalLM, exact resume, token shards,
bad input through the CLI, and the stored model (loads, generates, manifest feeds `tinkerlm openness`).

Tiny models (2 layers, width 32) on the Python standard library's json package, one thread: seconds each.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import write_tokenizer

from tinkerlm import store
from tinkerlm.errors import TinkerError
from tinkerlm.kernels import ops
from tinkerlm.tune import shards, trainer
from tinkerlm.tune.pretrain import init_weights, load_tokenizer, pretrain, resolve, split_rows

ROOT = Path(__file__).resolve().parent.parent
DATA = ["stdlib/json/*.py"]
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    seq_len=32,
    batch_size=2,
    grad_accum=2,
    lr=3e-3,
    warmup_steps=2,
    threads=1,
    eval_fraction=0.05,
    eval_max_rows=4,
    progress=False,
)


@pytest.fixture
def tok(tmp_path) -> Path:
    d = tmp_path / "tok"
    d.mkdir()
    write_tokenizer(d)
    return d


def _run(tok, out, **kw):
    opts = dict(TINY, data=DATA, tokenizer=str(tok), out=out)
    opts.update(kw)
    return pretrain(**opts)


def _losses(m) -> list[float]:
    rows = (store.model_path(m) / "loss.csv").read_text().splitlines()[1:]
    return [float(r.split(",")[3]) for r in rows]


def _weights(m) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(store.model_path(m) / "model.safetensors"))


def test_training_equals_transformers_llama(tok):
    """Our model trained N steps by the trainer equals transformers' LlamaForCausalLM trained N steps on the same
    rows, from the same init, with the same AdamW, schedule, accumulation and clipping (fp32)."""
    import transformers

    steps = 6
    m = _run(tok, "ours", max_steps=steps, max_grad_norm=0.5, weight_decay=0.1)
    ours = _losses(m)
    assert len(ours) == steps

    recipe = resolve(**{k: v for k, v in dict(TINY, data=DATA, tokenizer=str(tok), out="x").items() if k != "progress"})
    tokenizer, _ = load_tokenizer(str(tok))
    cfg = m.source["model_config"]
    data = shards.prepare(shards.expand(DATA), tokenizer, store.home() / "shards", progress=False)
    assert data.reused
    stream = shards.TokenRows(data, recipe.seq_len)
    train_idx, _ = split_rows(stream.n_stream_rows, recipe.eval_fraction, recipe.seed)
    rows = stream.subset(train_idx)

    from tinkerlm import models

    init = models.build(cfg, "test", device="cpu")
    init_weights(init, recipe.init_std, recipe.seed)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    hf = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(
        {k: v for k, v in init.state_dict().items() if k != "inv_freq"}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert torch.equal(hf.lm_head.weight, init.model.embed_tokens.weight)
    hf.train()

    params = dict(hf.named_parameters())
    groups = [
        {"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, recipe.adam_beta2), eps=1e-8)
    tcfg = trainer.TrainConfig(
        total_steps=steps,
        batch_size=2,
        grad_accum=2,
        lr=recipe.lr,
        min_lr_ratio=recipe.min_lr_ratio,
        warmup_steps=2,
        weight_decay=0.1,
        max_grad_norm=0.5,
        seed=recipe.seed,
    )
    theirs = []
    for step in range(steps):
        idx = trainer.step_rows(step, len(rows), tcfg)
        n_target = rows.count_targets(idx)
        total = 0.0
        for a in range(0, len(idx), 2):
            ids, _, _ = rows.batch(idx[a : a + 2])
            logits = hf(input_ids=ids).logits  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            (loss / n_target).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(list(params.values()), 0.5)
        for g in opt.param_groups:
            g["lr"] = trainer.lr_at(step, tcfg)
        opt.step()
        opt.zero_grad()
        theirs.append(total / n_target)
    assert ours[0] > 5.0  # a real start: ln(320) = 5.77 for a fresh model
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert ours[-1] < ours[0] - 0.2  # and it learned something, so equal losses are not equal stalls
    stored = _weights(m)
    for name, p in hf.state_dict().items():
        if name in stored:
            torch.testing.assert_close(stored[name], p, rtol=1e-3, atol=1e-4)


def test_resume_is_bit_exact(tok):
    a = _run(tok, "a", max_steps=6, save_every=2)
    assert _run(tok, "b", max_steps=6, save_every=2, stop_after=3) is None
    run = store.home() / "runs" / "b" / "latest"
    assert trainer.latest_checkpoint(run).name == "step-000002"
    b = _run(tok, "b", max_steps=6, save_every=2, resume=True)
    assert _losses(a) == _losses(b)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_failed_checkpoint_write_leaves_the_previous_one(tok, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def failing(tensors, path, *args, **kw):
        if "000004" in str(path) and "optimizer" in str(path):
            real(tensors, path, *args, **kw)
            raise OSError(28, "No space left on device")  # the file is half there; the rename never happens
        return real(tensors, path, *args, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError):
        _run(tok, "c", max_steps=6, save_every=2)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    run = store.home() / "runs" / "c" / "latest"
    assert trainer.latest_checkpoint(run).name == "step-000002"
    assert store.find("c") is None
    c = _run(tok, "c", max_steps=6, save_every=2, resume=True)
    a = _run(tok, "a", max_steps=6, save_every=2)
    assert _losses(a) == _losses(c)


def test_kill_during_a_checkpoint_leaves_the_previous_one(tok, tmp_path):
    """kill -9 while the second checkpoint is being written (the process stops itself mid-save)."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import safetensors.torch
real = safetensors.torch.save_file
def dying(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    if "000004" in str(path) and "trainable" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = dying
from tinkerlm.tune.pretrain import pretrain
pretrain(**{json.dumps(dict(TINY, data=DATA, tokenizer=str(tok), out="k", max_steps=6, save_every=2))})
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script.replace("false", "False").replace("true", "True")], env=env)
    assert r.returncode == -9
    run = store.home() / "runs" / "k" / "latest"
    assert trainer.latest_checkpoint(run).name == "step-000002"
    k = _run(tok, "k", max_steps=6, save_every=2, resume=True)
    a = _run(tok, "a", max_steps=6, save_every=2)
    assert _losses(a) == _losses(k)


def test_shards_round_trip_reuse_and_resume(tok, tmp_path, monkeypatch):
    tokenizer, _ = load_tokenizer(str(tok / "tokenizer.json"))
    d = tmp_path / "text"
    d.mkdir()
    texts = ["héllo wörld\n" * 50, "def f(x):\n    return x\n" * 40, "", "last one"]
    for i, t in enumerate(texts):
        (d / f"{i}.txt").write_text(t, encoding="utf-8")
    (d / "blob.bin").write_bytes(b"\xff\xfe\x00binary")  # not UTF-8: skipped inside a directory
    monkeypatch.setattr(shards, "SHARD_BYTES", 700)  # several shards
    sources = shards.expand([{"path": str(d), "license": "CC0-1.0", "provenance": "written by the test"}])
    assert [s.path.name for s in sources] == ["0.txt", "1.txt", "2.txt", "3.txt"]
    root = tmp_path / "shards"
    first = shards.prepare(sources, tokenizer, root, progress=False)
    assert not first.reused and len(first.index["shards"]) >= 3
    stream = np.concatenate([np.fromfile(first.dir / s["file"], dtype="<u2") for s in first.index["shards"]])
    want = []
    for t in texts:
        want += tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert stream.tolist() == want
    for rec, t, s in zip(first.index["sources"], texts, sources):
        assert rec["sha256"] == hashlib.sha256(t.encode()).hexdigest() == s.sha256
        assert rec["license"] == "CC0-1.0" and rec["provenance"] == "written by the test"
    rows = shards.TokenRows(first, 16)
    ids, _, _ = rows.batch(torch.arange(len(rows)))
    assert ids.reshape(-1).tolist() == want[: len(rows) * 16]  # rows cut across shard boundaries

    files = sorted(first.dir.iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again = shards.prepare(shards.expand([str(d)]), tokenizer, root, progress=False)
    assert again.reused and again.dir == first.dir
    assert {p: p.stat().st_mtime_ns for p in sorted(first.dir.iterdir())} == mtimes

    # Interrupted after the first shards: a rerun writes only what is missing.
    (first.dir / shards.INDEX).unlink()
    last = first.index["shards"][-1]["file"]
    (first.dir / last).unlink()
    (first.dir / last.replace(".bin", ".json")).unlink()
    resumed = shards.prepare(sources, tokenizer, root, progress=False)
    assert not resumed.reused and resumed.index["tokens"] == first.index["tokens"]
    for p, t in mtimes.items():
        if p.name.startswith("shard-") and p.stem != Path(last).stem:
            assert p.stat().st_mtime_ns == t, p.name
    # Changed data: a new key, a new directory.
    (d / "3.txt").write_text("last one, changed")
    changed = shards.prepare(shards.expand([str(d)]), tokenizer, root, progress=False)
    assert changed.dir != first.dir


def test_not_enough_disk_is_one_line_and_writes_nothing(tok, tmp_path, monkeypatch):
    import shutil

    tokenizer, _ = load_tokenizer(str(tok))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    root = tmp_path / "shards"
    with pytest.raises(TinkerError, match="MB are free") as e:
        shards.prepare(shards.expand(DATA), tokenizer, root, progress=False)
    assert "\n" not in str(e.value) and not root.exists()


def _cli(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TINKERLM_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "tinkerlm", "pretrain", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("empty", ["--data", "{empty}"], "no text"),
        ("missing", ["--data", "{missing}"], "no such file"),
        ("heads", ["--num-attention-heads", "5"], "does not divide hidden_size"),
        ("kv-heads", ["--num-key-value-heads", "3"], "does not divide num_attention_heads"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_stored(tok, tmp_path, case, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "hidden_size: 32\nintermediate_size: 64\nnum_hidden_layers: 1\nnum_attention_heads: 4\n"
        "max_position_embeddings: 32\nseq_len: 32\nmax_steps: 1\nthreads: 1\n"
        f"data: [stdlib/json/*.py]\ntokenizer: {tok}\n"
    )
    args = [a.format(empty=empty, missing=tmp_path / "nope.txt") for a in args]
    home = tmp_path / "home"
    r = _cli(["-c", str(recipe), "--out", "bad", *args], home)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tinkerlm: error: ") and message in lines[0], r.stderr
    assert not (home / "models").exists() and not (home / "shards").exists()


def test_flags_override_the_yaml_recipe(tok, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"hidden-size: 64\nnum_attention_heads: 4\nlr: 0.01\ndata: [a.txt]\ntokenizer: {tok}\nout: x\n")
    r = resolve(str(recipe), lr=0.5, data=["b.txt", "c.txt"])
    assert (r.hidden_size, r.lr, r.data) == (64, 0.5, ["b.txt", "c.txt"])
    recipe.write_text("hiden_size: 64\n")
    with pytest.raises(TinkerError, match="did you mean hidden_size"):
        resolve(str(recipe))


def test_stored_model_loads_generates_and_records_its_making(tok):
    import tinkerlm
    from tinkerlm.openness import assess

    m = _run(tok, "made", max_steps=4, license="Apache-2.0", eval_every=2)
    llm = tinkerlm.load(m.ref)
    text = llm.generate("import json", max_tokens=8, temperature=0)
    assert isinstance(text, str)
    src = m.source
    assert src["type"] == "pretrain" and src["recipe"]["hidden_size"] == 32 and src["steps"] == 4
    json_dir = Path(__import__("sysconfig").get_paths()["stdlib"]) / "json"
    want = {str(p.resolve()): store.sha256_file(p) for p in json_dir.glob("*.py")}
    assert {d["path"]: d["sha256"] for d in src["data"]} == want
    assert all(d["license"] == "PSF-2.0" and "standard library" in d["provenance"] for d in src["data"])
    assert src["data_license"] == "PSF-2.0" and src["tokenizer"]["sha256"] and src["code"]["tinkerlm"]
    assert src["eval_loss"] is not None
    files = {f["path"] for f in m.files}
    assert {"recipe.yaml", "loss.csv", "loss.png", "DATA.md", "config.json", "tokenizer.json"} <= files
    header = (store.model_path(m) / "loss.csv").read_text().splitlines()[0]
    assert header.endswith("tokens_per_s")
    ev = assess(m.ref).evidence
    for name in ("Datasets", "Training code", "Data preprocessing code", "Data card", "Model metadata"):
        assert ev[name].source == "confirmed", name
    assert ev["Datasets"].licence == "PSF-2.0"
    assert "pretrained here from scratch on" in store.format_manifest(m)


def test_example_recipe_is_valid_and_names_the_stdlib():
    r = resolve(str(ROOT / "examples" / "pretrain" / "stdlib-code.yaml"), out="x")
    assert r.data == ["stdlib"] and r.license == "Apache-2.0" and r.hidden_size % r.num_attention_heads == 0
    sources = shards.expand(r.data)
    assert len(sources) > 100 and all(s.license == "PSF-2.0" for s in sources)
    assert not any("site-packages" in s.path.parts or "test" in s.path.parts for s in sources)


def test_a_tokenizer_trained_into_the_store_is_used_by_name(tmp_path):
    from tinkerlm.tokenizer_train import train_tokenizer

    json_dir = Path(__import__("sysconfig").get_paths()["stdlib"]) / "json"
    trained = train_tokenizer([str(json_dir)], 300, "jsontok", compare="none", license="PSF-2.0", progress=False)
    tok = store.model_path(trained.manifest)
    m = pretrain(**dict(TINY, data=DATA, tokenizer="jsontok", out="bytok", max_steps=2))
    rec = m.source["tokenizer"]
    assert rec["name"] == trained.manifest.ref and rec["store_sha256"] == store.digest(trained.manifest)
    tokenizer, _ = load_tokenizer(str(tok))
    assert rec["sha256"] == shards.tokenizer_sha256(tokenizer) and m.source["model_config"]["vocab_size"] == 320


def test_rm_removes_the_run_and_the_shards_no_other_model_uses(tok, tmp_path, capsys):
    from tinkerlm.cli import main as cli_main

    steps = dict(max_steps=1, eval_fraction=0.0)
    a, b = _run(tok, "a", **steps), _run(tok, "b", **steps)  # the same data: one set of shards
    own = tmp_path / "mine"
    c = _run(tok, "c", shards_dir=str(own), **steps)  # shards in a directory of the user's own
    key = a.source["shards"]["key"]
    assert b.source["shards"]["key"] == c.source["shards"]["key"] == key
    run_a, run_b, shared = (
        store.home() / "runs" / "a" / "latest",
        store.home() / "runs" / "b" / "latest",
        store.home() / "shards" / key,
    )
    assert (run_a / "checkpoints").is_dir() and run_b.is_dir() and shared.is_dir() and (own / key).is_dir()

    assert store.training_data(a) == [run_a]  # b still uses the shards
    store.rm("a")
    assert store.find("a") is None and not run_a.exists() and not (store.home() / "runs" / "a").exists()
    assert shared.is_dir() and run_b.is_dir()

    assert cli_main(["rm", "b"]) in (None, 0)  # the last model on them: the shards go too
    assert not run_b.exists() and not shared.exists()
    assert f"removed {shared} (" in capsys.readouterr().out
    store.rm("c")
    assert (own / key).is_dir()  # the user's shards_dir is theirs


def test_bf16_mixed_precision_trains_through_the_fused_head(tok, monkeypatch):
    """`bf16: true`: autocast products, fp32 weights and optimizer; the fused head takes the bf16 path, the loss
    falls as fp32's does, close to it but not equal (the products did run in bf16)."""
    calls = []
    real = trainer._FusedHeadCE.apply
    monkeypatch.setattr(trainer._FusedHeadCE, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    steps = dict(max_steps=6, eval_fraction=0.0, lr=1e-2)
    fp32 = _losses(_run(tok, "f32", **steps))
    bf16 = _losses(_run(tok, "b16", bf16=True, **steps))
    assert calls.count(torch.bfloat16) == 6 * 2 and calls.count(None) == 6 * 2  # 2 micro-batches per step
    assert bf16[-1] < bf16[0] - 0.3
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05
    assert bf16 != fp32


def test_attention_under_autocast_runs_in_fp32():
    """Mixed precision with fp32 weights: RoPE gives q and k in fp32 and attention keeps them there (autocast would
    round them to bf16); bf16 activations (bf16 models) are left to autocast."""
    from tinkerlm.models.base import CAUSAL, attend

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g)
    v = torch.randn(2, 2, 16, 8, generator=g).bfloat16()  # from a Linear under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attend(q, k, v, CAUSAL)
        y16 = attend(q.bfloat16(), k.bfloat16(), v, CAUSAL)
    assert y.dtype == torch.float32 and y16.dtype == torch.bfloat16
    torch.testing.assert_close(y, attend(q, k, v.float(), CAUSAL), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(ops() is None, reason="the C++ kernels are not built here")
def test_rope_of_bf16_activations_with_fp32_tables_equals_the_formula(monkeypatch):
    """Under autocast q and k come out of their Linear in bf16 while the tables are fp32: the kernel then runs on
    their fp32 copies, the values and gradients of the PyTorch formula (which promotes to fp32 the same way)."""
    from tinkerlm import kernels
    from tinkerlm.models import base

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 8, generator=g).bfloat16()
    positions = torch.arange(16).expand(2, 16)
    cos, sin = base.rope_cos_sin(base.rope_inv_freq(8, 10000.0), positions, torch.float32)

    def run():
        xi = x.clone().requires_grad_()
        y = base.apply_rope(xi, cos, sin)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        return y, xi.grad

    y, grad = run()
    assert type(y.grad_fn).__name__ == "_RopeFnBackward"  # the kernel ran
    monkeypatch.setattr(kernels, "ops", lambda: None)  # the PyTorch formula
    y_ref, grad_ref = run()
    assert y.dtype == y_ref.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
