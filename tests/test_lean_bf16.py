"""bf16 LoRA training with the frozen weights cast once (`lora.bf16_bases`): half the weight bytes, the same
numbers as bf16 autocast over the fp32 weights (losses and LoRA gradients bit for bit), fp32 adapters and AdamW
state, recomputation still exact, and `finetune --bf16` end to end equal to autocast over fp32 weights.

Tiny random models built here (tests/tiny.py).
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_tune import randomise_lora, write_chat_data
from tiny import make_hf_model
from torch import nn

from tinkerlm import lora, store
from tinkerlm.formats.peft import read_adapter
from tinkerlm.loading import load_checkpoint
from tinkerlm.tune import data as data_mod
from tinkerlm.tune import memory, trainer


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for kind in ["llama", "llama3-tied"]:
        make_hf_model(kind, root / kind)
        (root / kind / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
        out[kind] = root / kind
    return out


def _lora_model(base: Path, cast: bool, dropout: float = 0.0):
    model, tok, _ = load_checkpoint(base, quant="fp32")
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, dropout=dropout, targets=["all-linear"]), seed=0)
    randomise_lora(model)  # B != 0: the adapters' gradients reach A too
    freed = lora.bf16_bases(model) if cast else 0
    return model.train(), tok, freed


def _step(model, rows):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = trainer.loss_sum(model, rows.ids, rows.segments, rows.target, True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _rows(tok, tmp_path):
    examples, _ = data_mod.load_examples(write_chat_data(tmp_path / "d.jsonl", 9), tok, 64)
    return data_mod.pack(examples, 64, tok.pad_token_id)


@pytest.mark.parametrize("kind", ["llama", "llama3-tied"])
def test_frozen_weights_held_once_in_bf16_and_autocast_gives_the_same_numbers(bases, tmp_path, kind):
    ref, tok, _ = _lora_model(bases[kind], cast=False)
    model, _, freed = _lora_model(bases[kind], cast=True)
    tied = kind == "llama3-tied"
    frozen = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")}
    assert frozen and all(m.weight.dtype == torch.bfloat16 for m in frozen.values())
    assert all(m.bias is None or m.bias.dtype == torch.bfloat16 for m in frozen.values())
    # The head stays fp32, tied to the embedding (which autocast does not cast) or not (the trainer's head casts it).
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    # Once: the parameter bytes fall by half of every cast weight, and no fp32 copy is left anywhere.
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    cast = sum(p.numel() for p in model.parameters() if p.dtype == torch.bfloat16)
    assert cast > 0 and freed == 2 * cast and size(ref) - size(model) == freed
    assert lora.bf16_bases(model) == 0  # nothing left to cast

    rows = _rows(tok, tmp_path)
    loss0, grads0 = _step(ref, rows)
    loss1, grads1 = _step(model, rows)
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert grads1[name].dtype == torch.float32 and torch.equal(grads0[name], grads1[name]), name


@pytest.mark.parametrize("mode", ["selective", True])
def test_recomputation_is_exact_in_bf16(bases, tmp_path, mode):
    model, tok, _ = _lora_model(bases["llama"], cast=True, dropout=0.1)
    rows = _rows(tok, tmp_path)
    out = []
    for recompute in (False, mode):
        model.checkpoint_layers = recompute
        out.append(_step(model, rows))
    (loss0, grads0), (loss1, grads1) = out
    assert torch.equal(loss0, loss1) and grads0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


def test_bf16_saves_bf16_activations(bases, tmp_path):
    """What the matmuls keep for the backward pass is bf16 (autocast's outputs), not fp32 copies."""
    model, tok, _ = _lora_model(bases["llama"], cast=True)
    rows = _rows(tok, tmp_path)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        trainer.loss_sum(model, rows.ids, rows.segments, rows.target, True)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    big = [t for t in saved if t.dim() >= 2 and t.shape[-1] >= 32 and t.untyped_storage().data_ptr() not in weights]
    by_dtype = {}
    for t in big:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel()
    assert by_dtype.get(torch.bfloat16, 0) > 2 * by_dtype.get(torch.float32, 0)


def test_recompute_budget_counts_bf16_bytes_and_skips_selective(bases):
    """bf16: activations at 2 bytes; above the budget whole layers rerun (the matmuls are cheap to redo in bf16)."""
    model, _, _ = load_checkpoint(bases["llama"])
    fp32 = memory.activation_bytes(model.config, 64)
    assert memory.activation_bytes(model.config, 64, bf16=True) * 2 == fp32
    under = memory.ACTIVATION_BUDGET // fp32 * 64 + 64  # over the budget in fp32, under it in bf16
    assert memory.recompute(model.config, under, None) == "selective"
    assert memory.recompute(model.config, under, None, bf16=True) is False
    over = 2 * under
    assert memory.recompute(model.config, over, None) == "selective"
    assert memory.recompute(model.config, over, None, bf16=True) is True
    assert memory.recompute(model.config, over, "selective", bf16=True) == "selective"


def test_finetune_bf16_equals_autocast_over_fp32_weights(bases, tmp_path, monkeypatch):
    """`finetune --bf16` end to end: losses fall, the same losses and adapter bit for bit as autocast over fp32
    weights, fp32 adapters and AdamW moments in the checkpoints, and the adapter fuses."""
    from tinkerlm.tune import finetune

    data = write_chat_data(tmp_path / "d.jsonl", 40)
    seen = []
    real_train = trainer.train

    def train(model, params, *a, **kw):
        seen.append({p.dtype for n, p in model.named_parameters() if not p.requires_grad and "layers" in n})
        return real_train(model, params, *a, **kw)

    monkeypatch.setattr(trainer, "train", train)
    opts = dict(base=str(bases["llama"]), data=str(data), seq_len=64, batch_size=2, lr=5e-3, warmup_steps=2)
    a = finetune(out="a", max_steps=8, bf16=True, progress=False, **opts)
    monkeypatch.setattr(lora, "bf16_bases", lambda model: 0)
    b = finetune(out="b", max_steps=8, bf16=True, progress=False, **opts)
    assert seen[0] >= {torch.bfloat16} and torch.bfloat16 not in seen[1]

    la, lb = (store.model_path(m) / "loss.csv" for m in (a, b))
    losses = [float(r.split(",")[3]) for r in la.read_text().splitlines()[1:]]
    assert la.read_text().split("\n")[1:] != [] and losses[-1] < losses[0] * 0.95
    strip = lambda p: [r.rsplit(",", 2)[0] for r in p.read_text().splitlines()]  # noqa: E731 - timings differ
    assert strip(la) == strip(lb)
    wa, wb = (load_file(str(store.model_path(m) / "adapter_model.safetensors")) for m in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(t.dtype == torch.float32 for t in wa.values())
    ckpts = sorted((store.home() / "runs" / "a" / "latest" / "checkpoints").iterdir())
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        saved = load_file(str(ckpts[-1] / name))
        assert saved and all(t.dtype == torch.float32 for k, t in saved.items() if k != "rng.torch"), name

    from tinkerlm.tune import fuse

    fused = fuse("a", "a-full")  # `tinkerlm fuse`: the adapter folded into the fp32 base
    model, _, _ = load_checkpoint(bases["llama"], quant="fp32")
    lora.load_adapter(model, read_adapter(store.model_path(a)))
    ids = torch.arange(12)[None]
    with torch.no_grad():
        want = model(ids)
        got = load_checkpoint(store.model_path(fused), quant="fp32")[0](ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_a_young_adapter_is_not_rounded_away_under_bf16(bias):
    """Added to the base's bf16 output, an update below half its rounding step would vanish (5% of it survived
    so); added inside the base's GEMM, before the one rounding, it survives on average."""
    torch.manual_seed(0)
    base = nn.Linear(256, 512, bias=bias)
    with torch.no_grad():
        base.weight.normal_(0.0, 0.2)
    m = lora.LoRALinear(base, 8, 16)
    with torch.no_grad():
        m.lora_B.normal_(0.0, 1e-4)  # an update ~1e-4 of the output: after a few steps at lr 1e-4
    x = torch.randn(64, 256)
    d = (F.linear(x, m.lora_A) @ (m.lora_B * m.scaling).t()).double()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, out = base(x).double(), m(x).double()
    assert out.dtype == torch.float64 and ((out - y) * d).sum() / (d * d).sum() > 0.8


def test_a_young_adapter_on_a_quantized_base_is_not_rounded_away_under_bf16():
    """QLoRA under bf16: the update is added inside the dequantized product too, and its gradients flow."""
    from tinkerlm.quant.linear import QLinear
    from tinkerlm.quant.qtensor import quantize

    torch.manual_seed(0)
    w = torch.randn(512, 256) * 0.2
    base = QLinear(quantize(w, 4), bias=torch.randn(512) * 0.1)
    m = lora.LoRALinear(base, 8, 16)
    with torch.no_grad():
        m.lora_B.normal_(0.0, 1e-4)
    x = torch.randn(64, 256, requires_grad=True)
    d = (F.linear(x.detach(), m.lora_A) @ (m.lora_B * m.scaling).t()).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, out = base(x.detach()).double(), m(x)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - y) * d).sum() / (d * d).sum() > 0.8
    out.float().square().sum().backward()
    assert x.grad is not None and m.lora_A.grad is not None and m.lora_B.grad.abs().sum() > 0
