"""Perplexity: sliding windows score every token once; equals exp(mean NLL) from transformers' own loss."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_hf_model  # noqa: E402

import tinkerlm  # noqa: E402
from tinkerlm.errors import TinkerError  # noqa: E402
from tinkerlm.evaluate import perplexity, shipped_text  # noqa: E402
from tinkerlm.evaluate.perplexity import windows  # noqa: E402


@pytest.mark.parametrize("n,context,stride", [(2, 4, 1), (10, 4, 2), (10, 4, 3), (100, 16, 8), (17, 64, 32)])
def test_windows_score_every_token_once(n, context, stride):
    targets = []
    for begin, end, first in windows(n, context, stride):
        assert end - begin <= context and begin < first < end + 1 and first >= 1
        targets += range(first, end)
    assert targets == list(range(1, n))


def hf_perplexity(model, ids, context, stride):
    """The Hugging Face guide's loop, written out here independently: mean of the model's own loss per window."""
    ids = torch.tensor([ids])
    n = ids.shape[1]
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(x, labels=labels).loss.double()
        valid = int((labels[:, 1:] != -100).sum())
        nll_sum += loss.item() * valid
        count += valid
        prev_end = end
        if end == n:
            break
    assert count == n - 1
    return math.exp(nll_sum / count)


@pytest.mark.parametrize("context,stride", [(64, 32), (48, 47), (128, 100)])
def test_perplexity_matches_transformers_loss(tmp_path, context, stride):
    hf = make_hf_model("llama", tmp_path / "m").float()
    llm = tinkerlm.load(str(tmp_path / "m"))
    text = shipped_text()[:400]
    ids = llm.tokenizer.encode(text)
    assert len(ids) > 3 * context  # several windows
    ours = perplexity(llm.model, llm.tokenizer, text, context=context, stride=stride)
    ref = hf_perplexity(hf, ids, context, stride)
    assert math.isfinite(ours)
    assert ours == pytest.approx(ref, rel=1e-4)


def test_bad_windows(tmp_path):
    make_hf_model("llama", tmp_path / "m")
    llm = tinkerlm.load(str(tmp_path / "m"))
    with pytest.raises(TinkerError, match="stride"):
        perplexity(llm.model, llm.tokenizer, shipped_text()[:300], context=32, stride=32)
    with pytest.raises(TinkerError, match="fewer than 2 tokens"):
        perplexity(llm.model, llm.tokenizer, "a", context=32)


def test_shipped_text_is_packaged():
    text = shipped_text()
    assert text.startswith("ALICE'S ADVENTURES IN WONDERLAND") and 4000 < len(text.split()) < 6000
    assert "Gutenberg" not in text  # no licence header or footer


def test_smollm2_perplexity_is_sane(smollm2_gguf):
    llm = tinkerlm.load(str(smollm2_gguf))
    ppl = perplexity(llm.model, llm.tokenizer, shipped_text(), context=512, stride=511)
    print(f"SmolLM2-135M-Instruct Q4_1, alice_ch1-2.txt, context 512, stride 511: perplexity {ppl:.3f}")
    assert math.isfinite(ppl) and 5 < ppl < 100
