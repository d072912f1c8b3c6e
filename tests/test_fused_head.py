"""The trainer's fused output head (`trainer._FusedHeadCE`): the same summed cross-entropy and the same gradients as
the chunked, recomputed head it replaces in fp32 training, for pretraining rows and packed SFT rows, tied and
untied heads, a frozen head (LoRA), and more rows than one chunk; under bf16 autocast, the autocast head's."""

from __future__ import annotations

import pytest
import torch

from tinkerlm import models
from tinkerlm.tune import trainer

CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    hidden_act="silu",
)


def _model(tied: bool):
    torch.manual_seed(0)
    model = models.build(dict(CONFIG, tie_word_embeddings=tied), "test", device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.train()


def _loss_and_grads(model, fused: bool, ids, segments, target, bf16: bool = False):
    model.zero_grad(set_to_none=True)
    if fused:
        assert trainer._fused_head_ok(model, bf16)
        loss = trainer.loss_sum(model, ids, segments, target, bf16)
    else:
        loss = sum(trainer._over_targets(trainer._head_ce, model, ids, segments, target, bf16))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_head_equals_recomputed_head(tied, packed, monkeypatch):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (3, 40), generator=g)
    segments = target = None
    if packed:  # two documents per row, loss on the second half of each
        segments = torch.cat([torch.zeros(3, 24), torch.ones(3, 16)], dim=1).long()
        target = torch.rand(3, 40, generator=g) > 0.4
    monkeypatch.setattr(trainer, "HEAD_CHUNK", 25)  # several chunks, the last one short
    model = _model(tied)
    ref, ref_grads = _loss_and_grads(model, False, ids, segments, target)
    got, grads = _loss_and_grads(model, True, ids, segments, target)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and "lm_head.weight" in grads or tied
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_head_frozen_head_and_when_it_stands_aside():
    model = _model(False)
    model.lm_head.weight.requires_grad_(False)  # as under LoRA: no gradient for the head, the rest still gets one
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    ref, ref_grads = _loss_and_grads(model, False, ids, None, None)
    got, grads = _loss_and_grads(model, True, ids, None, None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    assert model.lm_head.weight.grad is None and grads.keys() == ref_grads.keys()
    with torch.no_grad():
        assert not trainer._fused_head_ok(model, False)  # evaluation: the plain path


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [None, 25])
def test_fused_head_under_bf16_equals_the_autocast_head(tied, chunk, monkeypatch):
    """Mixed precision: the fused head rounds what autocast's Linear rounds (inputs, weight, logits, the logits'
    gradient) to bf16, so in one chunk it gives the autocast path's loss and gradients; over several chunks it sums
    the head's gradient in fp32 where autocast sums it in bf16, so its error from fp32 is no larger (in norm)."""
    ids = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(3))
    if chunk:
        monkeypatch.setattr(trainer, "HEAD_CHUNK", chunk)
    model = _model(tied)
    ref, ref_grads = _loss_and_grads(model, False, ids, None, None, bf16=True)
    got, grads = _loss_and_grads(model, True, ids, None, None, bf16=True)
    _, fp32 = _loss_and_grads(model, True, ids, None, None)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert (ref_grads[head] - fp32[head]).abs().max() > 1e-3  # bf16 products, not fp32's
    for name in ref_grads:
        if chunk is None:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert (grads[name] - fp32[name]).norm() <= 1.01 * (ref_grads[name] - fp32[name]).norm(), name


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fused_head_rows_whose_target_probability_underflows(dtype):
    """A target 200 nats below the best logit has probability 0 in fp32: its loss comes from the log-sum-exp of
    its recomputed logits, finite and equal to cross_entropy's, gradients too."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 8, generator=g)
    w = torch.randn(16, 8, generator=g)
    h[2] = w[3] * 30.0  # row 2's logit for token 3 towers over the others (by ~100s)
    labels = torch.tensor([1, 5, 7, 0, 9, 15])
    hd, wd = (h, w) if dtype is None else (h.to(dtype).float(), w.to(dtype).float())  # autocast's rounding
    logits = (hd @ wd.T).to(dtype or torch.float32).float()
    assert torch.softmax(logits, -1)[2, 7] == 0  # the case at hand
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = trainer._FusedHeadCE.apply(h1, w1, labels, dtype)
    got.backward()
    ref = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    assert torch.isfinite(got) and float(ref) > 100
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-4)
    if dtype is None:
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        torch.nn.functional.cross_entropy(h2 @ w2.T, labels, reduction="sum").backward()
        torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)
