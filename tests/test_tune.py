"""Fine-tuning: LoRA maths and peft parity, loss masks, packing, the loop (resume, kill during save), CLI end to end.

Tiny random models built here (fp32); peft and transformers are the references.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import assert_user_error, cli
from tiny import make_hf_model

from tinkerlm import lora, store
from tinkerlm.errors import TinkerError
from tinkerlm.formats.peft import read_adapter
from tinkerlm.loading import load_checkpoint
from tinkerlm.tune import data as data_mod
from tinkerlm.tune import trainer

ALL = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for kind in ["llama", "qwen2", "gpt2", "llama3-tied"]:
        make_hf_model(kind, root / kind)
        (root / kind / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
        out[kind] = root / kind
    return out


def write_chat_data(path: Path, n: int, seed: int = 0) -> Path:
    """Addition in chat form: a skill the tiny model can start to learn in a few steps."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(0, 99), r.randint(0, 99)
            msgs = [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in lora.lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------------
# LoRA maths and the peft layout


@pytest.mark.parametrize("kind", ALL)
def test_lora_with_b_zero_equals_base(bases, kind):
    model, _, _ = load_checkpoint(bases[kind])
    with torch.no_grad():  # the same attention path both times (with gradients it is torch's, else the kernel)
        ref = model(IDS)
        names = lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, targets=["all-linear"]), seed=0)
        assert len(names) >= 4 * 2 and "lm_head" not in names
        assert torch.equal(model(IDS), ref)
        randomise_lora(model)
        assert (model(IDS) - ref).abs().max() > 1e-3  # the adapter is really in the forward pass


@pytest.mark.parametrize("kind", ALL)
def test_fused_equals_unfused(bases, kind):
    model, _, _ = load_checkpoint(bases[kind])
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, targets=["all-linear"]), seed=0)
    randomise_lora(model)
    unfused = model(IDS)
    assert lora.fuse_lora(model) > 0 and not lora.lora_modules(model)
    torch.testing.assert_close(model(IDS), unfused, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ALL)
def test_adapter_loads_in_peft_with_same_logits(bases, kind, tmp_path):
    import peft
    import transformers

    model, _, _ = load_checkpoint(bases[kind])
    cfg = lora.LoRAConfig(rank=4, alpha=16, targets=["all-linear"], rslora=kind == "qwen2")
    names = lora.apply_lora(model, cfg, seed=0)
    randomise_lora(model)
    ours = model(IDS)
    lora.save_adapter(model, tmp_path, lora.peft_config(cfg, names, str(bases[kind]), fan_in_fan_out=kind == "gpt2"))

    hf = transformers.AutoModelForCausalLM.from_pretrained(bases[kind], dtype=torch.float32)
    base_logits = hf(IDS).logits
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    assert (theirs - base_logits).abs().max() > 1e-3  # peft really applied it
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_peft_adapter_reads_back_and_deltas_match(bases, tmp_path):
    """An adapter peft itself saved loads into our model with peft's logits; `read_adapter` deltas equal fusing."""
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(bases["llama"], dtype=torch.float32)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    pm = peft.get_peft_model(hf, pcfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = pm(IDS).logits

    model, _, _ = load_checkpoint(bases["llama"])
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = read_adapter(tmp_path)
    assert lora.load_adapter(model, adapter) and len(lora.lora_modules(model)) == 2 * 3
    torch.testing.assert_close(model(IDS), theirs, atol=2e-5, rtol=1e-5)
    lora.fuse_lora(model)
    for name, w in model.state_dict().items():
        d = adapter.delta(name)
        expect = base_sd[name] + d if d is not None else base_sd[name]
        torch.testing.assert_close(w, expect, atol=1e-6, rtol=0)
    assert adapter.delta("model.layers.0.self_attn.k_proj.weight") is None


def test_adapter_for_another_model_is_refused(bases, tmp_path):
    model, _, _ = load_checkpoint(bases["llama"])
    names = lora.apply_lora(model, lora.LoRAConfig(rank=2, targets=["q_proj"]), seed=0)
    lora.save_adapter(model, tmp_path, lora.peft_config(lora.LoRAConfig(rank=2), names, None))
    other, _, _ = load_checkpoint(bases["gpt2"])
    with pytest.raises(TinkerError, match="does not have"):
        lora.load_adapter(other, read_adapter(tmp_path))
    with pytest.raises(TinkerError, match="matches no linear layer"):
        lora.apply_lora(other, lora.LoRAConfig(targets=["q_proj"]))


def test_frozen_quantized_layer_gradient_equals_dequantized(bases):
    """QLoRA: the input gradient through a packed layer equals the one through its dequantized float weight."""
    from tinkerlm import quant
    from tinkerlm.quant.qops import dequantize

    model, _, _ = load_checkpoint(bases["llama"], quant="int4")
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, quant.QLinear)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, dequantize(layer.qweight)).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-5)


def test_lora_on_a_fused_quantized_model_trains_every_target(bases):
    """Loading packs and fuses q/k/v, gate/up and the decode step; wrapping layers in LoRA must undo that, or the
    fused calls would read the base weights alone and the adapters in them would get no gradient."""
    model, _, _ = load_checkpoint(bases["llama"], quant="int4")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.fused_qkv is not None and mlp.fused_gate_up is not None and model.fused_decode is not None
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, targets=["all-linear"]), seed=0)
    assert attn.fused_qkv is None and mlp.fused_gate_up is None and model.fused_decode is None
    randomise_lora(model)
    model(IDS).square().mean().backward()
    for name, m in lora.lora_modules(model).items():
        assert m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "quant, mode, dropout",
    [
        ("fp32", True, 0.0),
        ("int4", True, 0.0),
        ("fp32", "selective", 0.0),
        ("int4", "selective", 0.1),
        ("fp32", True, 0.1),
    ],
)
def test_recomputed_layers_give_the_same_loss_and_gradients_bit_for_bit(
    bases, tmp_path, quant, mode, dropout, monkeypatch
):
    """`--grad-checkpointing` (layers recomputed in the backward pass, whole or all but their matmuls) trades memory
    for time, never the maths: LoRA's dropout masks are drawn again the same."""
    import torch.utils.checkpoint as ckpt

    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda fn, *a, **kw: calls.append(fn) or real(fn, *a, **kw))
    model, tok, _ = load_checkpoint(bases["llama"], quant=quant)
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, dropout=dropout, targets=["all-linear"]), seed=0)
    randomise_lora(model)
    model.train()
    examples, _ = data_mod.load_examples(write_chat_data(tmp_path / "d.jsonl", 9), tok, 64)
    rows = data_mod.pack(examples, 64, tok.pad_token_id)
    out = []
    for recompute in (False, mode):
        model.checkpoint_layers = recompute
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = trainer.loss_sum(model, rows.ids, rows.segments, rows.target)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, grads0), (loss1, grads1) = out
    layers = [c for c in calls if c in list(model.model.layers)]
    assert len(layers) == len(model.model.layers)  # every layer went through the recomputing path, once
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    assert any(g.abs().sum() > 0 for g in grads0.values())


def test_lora_dropout_keeps_the_mask_not_a_copy_and_matches_nn_dropout(bases):
    """LoRA's dropout is one op with A's product: the same outputs and gradients as nn.Dropout then A, bit for bit,
    with a 1-byte mask kept for the backward pass instead of a dropped fp32 copy of the input."""
    layer = lora.LoRALinear(torch.nn.Linear(48, 40), rank=4, alpha=8, dropout=0.25)
    randomise_lora(layer)
    layer.train()
    x = torch.randn(3, 70, 48, requires_grad=True)
    g = torch.randn(3, 70, 40)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(5)
        y = layer(x)
    (y * g).sum().backward()
    ours = (y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    torch.manual_seed(5)
    h = torch.nn.functional.linear(torch.nn.Dropout(0.25)(x), layer.lora_A)
    y_ref = layer.base(x) + torch.nn.functional.linear(h, layer.lora_B) * layer.scaling
    (y_ref * g).sum().backward()
    torch.testing.assert_close(ours[0], y_ref.detach(), rtol=1e-6, atol=1e-6)  # addmm vs add: rounding only
    assert torch.equal(ours[2], layer.lora_A.grad)
    torch.testing.assert_close(ours[1], x.grad, rtol=1e-5, atol=1e-6)
    big = {t.data_ptr(): t.dtype for t in saved if t.numel() == x.numel()}  # x itself and the mask
    assert sorted(map(str, big.values())) == ["torch.bool", "torch.float32"]


def test_quantized_head_is_dequantized_block_by_block(bases, monkeypatch):
    """A frozen quantized weight too large to dequantize whole (a 1B model's output head) runs a block of rows at a
    time, forward and backward, with the same results as the whole dequantized weight."""
    from tinkerlm.quant import linear as qlinear
    from tinkerlm.quant.qops import dequantize

    model, _, _ = load_checkpoint(bases["llama"], quant="int4")
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 7, layer.in_features, requires_grad=True)
    g = torch.randn(2, 7, layer.out_features)
    monkeypatch.setattr(qlinear, "BLOCK_BYTES", 16 * layer.in_features * 4)  # 16 rows a block
    assert qlinear._block_rows(layer) == 16 < layer.out_features
    seen = []
    real = qlinear.qops.dequantize
    monkeypatch.setattr(qlinear.qops, "dequantize", lambda w: seen.append(w.shape) or real(w))
    y = layer(x)
    (y * g).sum().backward()
    assert seen and max(s[0] for s in seen) == 16
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, dequantize(layer.qweight))
    (y2 * g).sum().backward()
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-5)


def test_recomputation_is_on_by_default_when_activations_are_large(bases):
    """grad_checkpointing unset: the cheap ops recomputed when a micro-batch would keep more than the budget, whole
    layers above the larger one; set: as asked."""
    from tinkerlm.tune import memory

    model, _, _ = load_checkpoint(bases["llama"])
    small = memory.activation_bytes(model.config, 64)
    assert 0 < small < memory.ACTIVATION_BUDGET
    assert memory.recompute(model.config, 64, None) is False
    many = memory.ACTIVATION_BUDGET // small * 64 + 64
    assert memory.recompute(model.config, many, None) == "selective"
    most = memory.WHOLE_LAYER_BUDGET // small * 64 + 64
    assert memory.recompute(model.config, most, None) is True
    assert memory.recompute(model.config, many, False) is False and memory.recompute(model.config, 64, True) is True


# ---------------------------------------------------------------------------------------------------------------
# Data: masks, packing, errors


def test_chat_mask_covers_exactly_the_assistant_turns(bases):
    _, tok, _ = load_checkpoint(bases["llama"])
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ex = data_mod.chat_example(tok, msgs, "x")
    from tinkerlm.chat import render

    assert tok.decode(ex.ids, skip_special_tokens=False) == render(tok, msgs, add_generation_prompt=False)
    runs, cur = [], []
    for i, t in zip(ex.ids, ex.target):
        if t:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur) if cur else None
    texts = [tok.decode(r, skip_special_tokens=False) for r in runs]
    assert texts == ["hello there<|im_end|>\n", "4<|im_end|>\n"]


def test_prompt_completion_and_text_masks(bases):
    _, tok, _ = load_checkpoint(bases["llama"])
    ex = data_mod.plain_example(tok, "Q: 1+1\nA:", " 2")
    picked = [i for i, t in zip(ex.ids, ex.target) if t]
    assert tok.decode(picked, skip_special_tokens=False) == " 2<|im_end|>"
    ex = data_mod.plain_example(tok, "all of it", None)
    assert all(ex.target) and ex.ids[-1] == tok.eos_token_id


@pytest.mark.parametrize(
    "line, needle",
    [
        ("{not json", ":3: not valid JSON"),
        ('["a"]', ":3: expected a JSON object"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', ":3: no assistant message"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', ":3: messages[0].role is 'robot'"),
        ('{"question": "x"}', ":3: unknown example shape (keys: question)"),
        ('{"prompt": "x", "completion": 3}', ":3: 'prompt' and 'completion' must be strings"),
    ],
)
def test_bad_lines_name_file_and_line(bases, tmp_path, line, needle):
    _, tok, _ = load_checkpoint(bases["llama"])
    f = write_chat_data(tmp_path / "d.jsonl", 2)
    with open(f, "a") as fh:
        fh.write(line + "\n")
    with pytest.raises(TinkerError) as e:
        data_mod.load_examples(f, tok, 64)
    assert str(f) + needle in str(e.value)


def test_truncation_is_counted(bases, tmp_path):
    _, tok, _ = load_checkpoint(bases["llama"])
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": "x" * 100}) + "\n" + json.dumps({"text": "short"}) + "\n")
    examples, stats = data_mod.load_examples(f, tok, 40)
    assert stats.truncated == 1 and stats.cut_tokens == 101 - 40 and max(len(e.ids) for e in examples) == 40
    assert "1 cut to fit (61 tokens dropped)" in stats.summary()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_rows_equal_separate_examples(bases, tmp_path, kind):
    """Packing changes speed, not maths: each document's logits equal those of running it alone."""
    model, tok, _ = load_checkpoint(bases[kind])
    examples, _ = data_mod.load_examples(write_chat_data(tmp_path / "d.jsonl", 9), tok, 64)
    rows = data_mod.pack(examples, 64, tok.pad_token_id)
    assert len(rows) < len(examples)  # several per row
    logits = model(rows.ids, segments=rows.segments)
    seen = 0
    for row in range(len(rows)):
        for s in rows.segments[row].unique():
            at = (rows.segments[row] == s).nonzero().flatten()
            if int(s) < 0:
                continue  # padding
            alone = model(rows.ids[row, at][None])[0]
            torch.testing.assert_close(logits[row, at], alone, atol=2e-5, rtol=1e-5)
            seen += 1
    assert seen == len(examples)
    # and the summed loss equals the per-example sum
    total = trainer.loss_sum(model, rows.ids, rows.segments, rows.target)
    expect = 0.0
    for ex in examples:
        ids = torch.tensor(ex.ids)[None]
        lg = model(ids)[0, :-1]
        want = torch.tensor(ex.target[1:])
        expect += torch.nn.functional.cross_entropy(lg[want], ids[0, 1:][want], reduction="sum")
    torch.testing.assert_close(total, expect, atol=1e-3, rtol=1e-5)


def test_schedule_warms_up_then_decays_to_floor():
    cfg = trainer.TrainConfig(
        total_steps=20,
        batch_size=1,
        grad_accum=1,
        lr=1.0,
        min_lr_ratio=0.1,
        warmup_steps=5,
        weight_decay=0,
        max_grad_norm=0,
        seed=0,
    )
    lrs = [trainer.lr_at(s, cfg) for s in range(20)]
    assert lrs[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------------
# The loop: determinism, resume, kill during save


def _ft(bases, data, out, **kw):
    from tinkerlm.tune import finetune

    opts = dict(
        base=str(bases["llama"]),
        data=str(data),
        out=out,
        seq_len=64,
        batch_size=2,
        lr=5e-3,
        warmup_steps=2,
        progress=False,
    )
    opts.update(kw)
    return finetune(**opts)


def _losses(m):
    path = store.model_path(m) / "loss.csv"
    rows = path.read_text().splitlines()[1:]
    return [(float(r.split(",")[3]), r.split(",")[4]) for r in rows]


def test_training_lowers_loss_and_seed_makes_it_deterministic(bases, tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", 40)
    a = _ft(bases, data, "a", max_steps=12, lora_dropout=0.1)
    b = _ft(bases, data, "b", max_steps=12, lora_dropout=0.1)
    la, lb = _losses(a), _losses(b)
    assert la == lb
    assert la[-1][0] < la[0][0] * 0.9
    assert a.source["eval_loss"] is not None and a.source["data"][0]["sha256"] == store.sha256_file(data)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(bases, tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", 40)
    full = _ft(bases, data, "full", max_steps=9, save_every=2, lora_dropout=0.1, eval_every=3)
    assert _ft(bases, data, "part", max_steps=9, save_every=2, lora_dropout=0.1, eval_every=3, stop_after=5) is None
    run = store.home() / "runs" / "part" / "latest"
    assert trainer.latest_checkpoint(run).name == "step-000004"
    resumed = _ft(bases, data, "part", max_steps=9, save_every=2, lora_dropout=0.1, eval_every=3, resume=True)
    assert _losses(resumed) == _losses(full)
    a = read_adapter(store.model_path(full))
    b = read_adapter(store.model_path(resumed))
    for k in a.modules:
        assert torch.equal(a.modules[k][1], b.modules[k][1])


def test_resume_refuses_a_different_recipe(bases, tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", 20)
    _ft(bases, data, "r", max_steps=4, save_every=2, stop_after=3)
    with pytest.raises(TinkerError, match="different recipe"):
        _ft(bases, data, "r", max_steps=4, save_every=2, lr=1e-2, resume=True)


KILL_SCRIPT = """
import sys, time
import safetensors.torch as st
real = st.save_file
def slow(*a, **k):
    real(*a, **k)
    time.sleep(0.4)  # a save that takes a while, so the kill lands inside it
st.save_file = slow
from tinkerlm.tune import finetune
finetune(base=sys.argv[1], data=sys.argv[2], out="k", seq_len=64, batch_size=2, max_steps=40, save_every=1,
         progress=False, resume=len(sys.argv) > 3)
"""


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_usable(bases, tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", 20)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    ckpts = store.home() / "runs" / "k" / "latest" / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(bases["llama"]), str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    try:
        # Wait until a checkpoint exists and the next one is being written, then kill.
        while time.time() < deadline:
            done = list(ckpts.glob("step-*")) if ckpts.exists() else []
            partial = list(ckpts.glob(".step-*.tmp-*")) if ckpts.exists() else []
            if done and partial:
                proc.send_signal(signal.SIGKILL)
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint save observed")
    finally:
        proc.kill()
        proc.wait()
    assert list(ckpts.glob(".step-*.tmp-*"))  # the half-written one is there, and ignored
    latest = trainer.latest_checkpoint(ckpts.parent)
    assert (latest / "state.json").is_file()
    step = json.loads((latest / "state.json").read_text())["step"]
    r = subprocess.run(
        [sys.executable, str(script), str(bases["llama"]), str(data), "resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    m = store.get("k")
    assert m.source["steps"] == 40 and step < 40
    assert not list(ckpts.glob(".step-*.tmp-*"))  # cleaned by the next save


# ---------------------------------------------------------------------------------------------------------------
# Outputs and the CLI


def test_full_finetune_writes_a_model_transformers_loads(bases, tmp_path):
    import transformers

    data = write_chat_data(tmp_path / "d.jsonl", 20)
    m = _ft(bases, data, "fullft", full=True, max_steps=3, lr=1e-3)
    assert m.format == "hf" and m.license == "apache-2.0"
    d = store.model_path(m)
    ours, tok, _ = load_checkpoint(d)
    base, _, _ = load_checkpoint(bases["llama"])
    assert (ours(IDS) - base(IDS)).abs().max() > 1e-4  # weights changed
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-4, rtol=1e-4)
    assert tok.chat_template and (d / "recipe.yaml").is_file()


def test_tied_full_finetune_round_trips(bases, tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", 10)
    m = _ft(bases, data, "tied", base=str(bases["llama3-tied"]), full=True, max_steps=2)
    model, _, _ = load_checkpoint(store.model_path(m))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_yaml_recipe_and_flags(tmp_path):
    from tinkerlm.tune.recipe import resolve

    y = tmp_path / "r.yaml"
    y.write_text("base: smollm2\ndata: d.jsonl\nout: x\nlora-rank: 16\nlr: 0.001\nlora_targets: [q_proj, v_proj]\n")
    r = resolve(str(y), lr=0.01, lora_alpha=None)
    assert (r.lora_rank, r.lr, r.lora_targets, r.lora_alpha) == (16, 0.01, ["q_proj", "v_proj"], 16.0)
    y.write_text("base: smollm2\nlearning_rate: 0.1\n")
    with pytest.raises(TinkerError, match="unknown recipe field 'learning_rate'"):
        resolve(str(y))
    y.write_text("lora_rank: eight\n")
    with pytest.raises(TinkerError, match="lora_rank must be int"):
        resolve(str(y))


def test_cli_finetune_run_fuse_end_to_end(bases, tmp_path):
    data = write_chat_data(tmp_path / "train.jsonl", 30)
    evald = write_chat_data(tmp_path / "eval.jsonl", 6, seed=9)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {data}\nlora_rank: 4\nseq_len: 64\nbatch_size: 2\nmax_steps: 3\n")
    home = store.home()
    p = cli(
        "finetune",
        str(bases["llama"]),
        "-c",
        str(recipe),
        "--eval-data",
        str(evald),
        "--lr",
        "0.01",
        "--out",
        "tiny-add",
        check=0,
    )
    assert "stored tiny-add:latest" in p.stderr
    m = store.get("tiny-add")
    assert m.format == "lora" and m.architecture == "llama" and m.license == "apache-2.0"
    assert m.parents[0]["relation"] == "base" and len(m.parents[0]["sha256"]) == 64
    assert [d["role"] for d in m.source["data"]] == ["train", "eval"]
    d = store.model_path(m)
    saved = (d / "recipe.yaml").read_text()
    assert "lr: 0.01" in saved and "lora_rank: 4" in saved and "max_steps: 3" in saved
    assert (d / "loss.png").read_bytes()[:4] == b"\x89PNG" and len((d / "loss.csv").read_text().splitlines()) == 4
    assert (d / "chat_template.jinja").read_text() == load_checkpoint(bases["llama"])[1].chat_template

    unfused = cli("run", "tiny-add", "7+8", "--max-tokens", "6", check=0).stdout
    p = cli("fuse", "tiny-add", "--out", "tiny-add-full", check=0)
    fused = store.get("tiny-add-full")
    assert fused.format == "hf" and [x["relation"] for x in fused.parents] == ["adapter"]
    assert cli("run", "tiny-add-full", "7+8", "--max-tokens", "6", check=0).stdout == unfused

    # Taken names and bad input: one line, exit 2, nothing new in the store.
    assert_user_error(cli("fuse", "tiny-add", "--out", "tiny-add-full"), "already in the store")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    before = sorted(p.name for p in (home / "models").iterdir())
    assert_user_error(
        cli("finetune", str(bases["llama"]), "--data", str(bad), "--out", "nope", "--seq-len", "64"), f"{bad}:1:"
    )
    assert_user_error(
        cli(
            "finetune",
            str(bases["llama"]),
            "--data",
            str(data),
            "--out",
            "nope",
            "--lora-targets",
            "qkv",
            "--seq-len",
            "64",
        ),
        "lora_targets: 'qkv' matches no linear layer",
    )
    assert sorted(p.name for p in (home / "models").iterdir()) == before
    assert not (home / "tmp").exists() or not list((home / "tmp").iterdir())


DDP_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
torch.set_num_threads(1)
from tinkerlm.tune import finetune
m = finetune(base=sys.argv[1], data=sys.argv[2], out="ddp", seq_len=64, batch_size=2, grad_accum=2, max_steps=6,
             lr=5e-3, warmup_steps=2, threads=1, progress=False)
if dist.get_rank() == 0:
    print(json.dumps(m.source["final_loss"]))
dist.destroy_process_group()
"""


def test_two_process_torchrun_equals_one_process(bases, tmp_path):
    """The loop under torchrun (2 ranks, gloo): each step's rows are split between ranks and the gradients summed,
    so the losses and the adapter equal a single-process run of the same recipe (to float summation order)."""
    data = write_chat_data(tmp_path / "d.jsonl", 40)
    single = _ft(bases, data, "single", batch_size=2, grad_accum=2, max_steps=6, threads=1)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            str(script),
            str(bases["llama"]),
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = store.get("ddp")
    ours, theirs = _losses(single), _losses(ddp)
    assert len(ours) == len(theirs) == 6
    for (a, _), (b, _) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-5)
    a = read_adapter(store.model_path(single))
    b = read_adapter(store.model_path(ddp))
    for k in a.modules:
        torch.testing.assert_close(a.modules[k][1], b.modules[k][1], atol=1e-5, rtol=1e-4)
