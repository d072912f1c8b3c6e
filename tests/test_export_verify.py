"""export/verify.py: KL divergence, top-1 agreement and perplexities of a written model against its source."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_hf_model  # noqa: E402

import tinkerlm  # noqa: E402
from tinkerlm.errors import TinkerError  # noqa: E402
from tinkerlm.evaluate.perplexity import shipped_text, token_nll  # noqa: E402
from tinkerlm.export.verify import compare, format_verification, tensor_error, text_ids  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "m"
    make_hf_model("llama", path)
    llm = tinkerlm.load(str(path))
    ids = text_ids(llm.tokenizer, max_tokens=300)
    assert ids == llm.tokenizer.encode(shipped_text())[:300]  # the shipped text by default
    return llm.model, ids


def perturbed(model, scale: float, seed: int = 1):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return out


def test_model_against_itself(tiny):
    model, ids = tiny
    d = compare(model, model, ids, context=64)
    assert d["tokens"] == len(ids) - 1 == 299
    assert d["kl_mean"] == d["kl_max"] == 0.0
    assert d["top1"] == 1.0
    assert d["ppl_reference"] == d["ppl_candidate"]
    assert all(type(v) in (int, float) for v in d.values())


def test_kl_grows_with_the_perturbation(tiny):
    model, ids = tiny
    results = [compare(model, perturbed(model, s), ids, context=64) for s in (0.01, 0.05, 0.25)]
    kls = [r["kl_mean"] for r in results]
    assert 0 < kls[0] < kls[1] < kls[2]
    assert results[0]["top1"] >= results[2]["top1"] and results[2]["top1"] < 1.0
    assert all(r["kl_mean"] <= r["kl_p99"] <= r["kl_max"] for r in results)
    assert results[0]["ppl_reference"] == results[2]["ppl_reference"]


def test_perplexity_equals_evaluate(tiny):
    model, ids = tiny
    d = compare(model, perturbed(model, 0.1), ids, context=48)
    expected = math.exp(token_nll(model, ids, context=48).double().mean().item())
    assert d["ppl_reference"] == pytest.approx(expected, rel=1e-9)


class Bigram(torch.nn.Module):
    """Logits depend on the previous token only: a model whose KL per position is known without windows."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table[ids]  # (1, T, V)


def test_kl_equals_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    ref, cand = torch.randn(7, 7, generator=g) * 3, torch.randn(7, 7, generator=g) * 3
    ids = torch.randint(0, 7, (40,), generator=g).tolist()
    d = compare(Bigram(ref), Bigram(cand), ids, context=8, progress=True)
    prev = torch.tensor(ids[:-1])
    logp, logq = F.log_softmax(ref[prev], -1), F.log_softmax(cand[prev], -1)
    kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1).double()  # KL(P || Q) per position
    assert d["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-6)
    assert d["kl_max"] == pytest.approx(kl.max().item(), rel=1e-6)
    assert d["top1"] == pytest.approx((logp.argmax(-1) == logq.argmax(-1)).double().mean().item())
    nll = -logq.gather(-1, torch.tensor(ids[1:])[:, None]).double().mean().item()
    assert d["ppl_candidate"] == pytest.approx(math.exp(nll), rel=1e-6)


def test_padded_candidate_vocab_and_errors():
    ref = torch.randn(5, 5)
    padded = torch.cat([ref, torch.full((5, 3), -1e9)], dim=1)  # padding rows the model never predicts
    d = compare(Bigram(ref), Bigram(padded), [0, 1, 2, 3, 4, 0], context=4)
    assert d["kl_max"] == pytest.approx(0.0, abs=1e-6) and d["top1"] == 1.0
    with pytest.raises(TinkerError, match="vocabulary"):
        compare(Bigram(padded), Bigram(ref), [0, 1, 2], context=4)
    with pytest.raises(TinkerError, match="fewer than 2"):
        compare(Bigram(ref), Bigram(ref), [1], context=4)


def test_format_and_tensor_error():
    d = dict(
        tokens=1023, kl_mean=0.0123, kl_p99=0.0456, kl_max=0.3, top1=0.978, ppl_reference=12.31, ppl_candidate=12.45
    )
    assert (
        format_verification(d) == "KL mean 0.0123, p99 0.0456; top-1 97.8%; PPL 12.31 -> 12.45 (+1.1%) over 1023 tokens"
    )
    w = torch.randn(64, 32)
    assert tensor_error(w, w.clone()) == 0.0
    assert tensor_error(w, w * 1.01) == pytest.approx(0.01, rel=1e-6)
    with pytest.raises(TinkerError, match="shapes differ"):
        tensor_error(w, w.T)
