"""Log-likelihood scoring: equals transformers' full forward per request; shared prefixes, batching and the cut to
the context change nothing; greedy flags are right; the native quantized SmolLM2 stays close to its fp32 weights."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_hf_model  # noqa: E402

import tinkerlm  # noqa: E402
from tinkerlm.errors import TinkerError  # noqa: E402
from tinkerlm.evaluate.perplexity import token_nll  # noqa: E402
from tinkerlm.evaluate.scoring import loglikelihoods, rolling_loglikelihood  # noqa: E402

KINDS = ["llama", "qwen2", "gpt2", "mistral-window"]


def reference(model, context, continuation, max_context=None):
    """The harness's computation written out: one full forward (no cache) over (c + k)[-(max + 1):][:-1], fp32
    log_softmax, the last len(k) positions scored."""
    whole = list(context) + list(continuation)
    if max_context is not None:
        whole = whole[-(max_context + 1) :]
    with torch.no_grad():
        out = model(torch.tensor([whole[:-1]]))
    logits = out.logits if hasattr(out, "logits") else out  # transformers or tinkerlm
    logp = torch.log_softmax(logits[0, -len(continuation) :].float(), dim=-1)
    target = torch.tensor(continuation)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def questions(seed, n, context=(1, 30), continuation=(1, 8), choices=4, vocab=300):
    """`n` questions of `choices` requests each sharing a context, random lengths and tokens."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    out = []
    for _ in range(n):
        c = ids(*context)
        out += [(c, ids(*continuation)) for _ in range(choices)]
    return out


def close(a, b, tol):
    assert len(a) == len(b)
    for i, ((la, ga), (lb, gb)) in enumerate(zip(a, b)):
        assert abs(la - lb) <= tol, (i, la, lb)
        assert ga == gb, (i, ga, gb)


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, path).float()
    return hf, tinkerlm.load(str(path)).model


def test_equals_transformers(tiny):
    hf, model = tiny
    reqs = questions(0, 6) + questions(1, 2, choices=3, continuation=(1, 1))
    ours = loglikelihoods(model, reqs, batch_size=8)
    close(ours, [reference(hf, c, k) for c, k in reqs], 1e-4)


def test_shared_prefix_and_batching_change_nothing(tiny):
    _, model = tiny
    reqs = questions(2, 6, choices=5)  # 5 choices, batch 4: a question's choices scored in two passes
    shared = loglikelihoods(model, reqs, batch_size=4)
    close(shared, loglikelihoods(model, reqs, batch_size=4, share_prefix=False), 1e-5)
    close(shared, loglikelihoods(model, reqs, batch_size=1, share_prefix=False), 1e-5)
    close(shared, loglikelihoods(model, reqs, batch_size=1), 1e-5)  # one prefill, then one choice a pass
    close(shared, loglikelihoods(model, reqs, batch_size=16), 1e-5)


def test_long_inputs_cut_from_the_left_as_the_harness_does(tiny):
    hf, model = tiny
    n = model.max_context  # 128
    reqs = questions(3, 2, context=(n - 3, n + 40), continuation=(1, 12)) + questions(4, 1, context=(n, n))
    reqs.append(([5] * 10, list(range(n))))  # the continuation alone fills the context
    ours = loglikelihoods(model, reqs, batch_size=3)
    close(ours, [reference(hf, c, k, n) for c, k in reqs], 1e-4)


def test_only_one_token_continuations(tiny):
    hf, model = tiny
    reqs = questions(5, 3, continuation=(1, 1))
    close(loglikelihoods(model, reqs), [reference(hf, c, k) for c, k in reqs], 1e-4)


def test_greedy_flag_on_a_constructed_case(tmp_path):
    make_hf_model("llama", tmp_path)
    model = tinkerlm.load(str(tmp_path)).model
    context, greedy = [1, 2, 3, 4], []
    for _ in range(4):  # the model's own greedy continuation, one full forward per token
        with torch.no_grad():
            greedy.append(int(model(torch.tensor([context + greedy]))[0, -1].argmax()))
    wrong_last = greedy[:-1] + [(greedy[-1] + 1) % 300]
    wrong_first = [(greedy[0] + 1) % 300] + greedy[1:]
    out = loglikelihoods(
        model, [(context, greedy), (context, wrong_last), (context, wrong_first), (context, greedy[:1])]
    )
    assert [g for _, g in out] == [True, False, False, True]
    assert out[0][0] > out[1][0]  # the argmax token has the higher log-probability


def test_bad_requests(tmp_path):
    make_hf_model("gpt2", tmp_path)
    model = tinkerlm.load(str(tmp_path)).model
    with pytest.raises(TinkerError, match="request 1: empty context"):
        loglikelihoods(model, [([1], [2]), ([], [2])])
    with pytest.raises(TinkerError, match="request 0: empty continuation"):
        loglikelihoods(model, [([1], [])])
    with pytest.raises(TinkerError, match="does not fit the model's context of 128"):
        loglikelihoods(model, [([1], [2] * 129)])
    with pytest.raises(TinkerError, match="batch_size"):
        loglikelihoods(model, [([1], [2])], batch_size=0)
    assert loglikelihoods(model, []) == []


def test_rolling_loglikelihood(tmp_path):
    make_hf_model("llama", tmp_path)
    model = tinkerlm.load(str(tmp_path)).model
    ids = questions(6, 1, context=(300, 300), choices=1)[0][0]
    # One window: the plain sum over a full forward; the prefix token makes the first token scored.
    assert rolling_loglikelihood(model, ids[:50], prefix_token=256) == pytest.approx(
        reference(model, [256], ids[:50])[0], abs=1e-4
    )
    # Several windows: perplexity.py's token_nll, summed.
    total = rolling_loglikelihood(model, ids, context=64, stride=40)
    assert total == pytest.approx(-float(token_nll(model, ids, context=64, stride=40).double().sum()), abs=1e-6)


# -- SmolLM2 ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_gguf):
    return tinkerlm.load(str(smollm2_gguf), quant="fp32")


def smollm2_questions(tokenizer):
    items = [
        ("The capital of France is", [" Paris.", " London.", " a large city with many museums.", " Berlin."]),
        ("Water boils at a temperature of", [" 100 degrees Celsius.", " 10 degrees.", " minus forty.", " noon."]),
        (
            "Alice was beginning to get very tired of sitting by her sister on the bank, and",
            [" of having nothing to do"],
        ),
    ]
    return [(tokenizer.encode(c), tokenizer.encode(k, add_special_tokens=False)) for c, ks in items for k in ks]


def test_smollm2_equals_full_forward(smollm2_fp32):
    """Reference: our own full forward without cache (test_smollm2.py holds those logits to transformers')."""
    model = smollm2_fp32.model
    reqs = smollm2_questions(smollm2_fp32.tokenizer)
    ours = loglikelihoods(model, reqs, batch_size=8)
    close(ours, [reference(model, c, k) for c, k in reqs], 1e-4)
    assert ours[0][0] > max(lp for lp, _ in ours[1:4])  # Paris wins
    # Same batch size: only the sharing differs, and with it the attention kernel (shared rows: torch's, for packed
    # documents; plain rows: the C++ causal one where the build has it): measured 6e-6 to 1.05e-5 on 23-nat scores.
    close(ours, loglikelihoods(model, reqs, batch_size=8, share_prefix=False), 2e-5)
    # Other batch shapes change the fp32 rounding of the matmuls (measured 1.5e-5 at batch 1).
    close(ours, loglikelihoods(model, reqs, batch_size=1), 5e-5)


def test_smollm2_native_close_to_fp32(smollm2_gguf, smollm2_fp32):
    native = tinkerlm.load(str(smollm2_gguf), quant="native")
    reqs = smollm2_questions(native.tokenizer)
    fp32 = loglikelihoods(smollm2_fp32.model, reqs)
    ours = loglikelihoods(native.model, reqs)
    for (a, ga), (b, gb), (_, k) in zip(ours, fp32, reqs):  # Q4_1 kernels, q8 activations: measured <= 3e-3
        assert abs(a - b) <= 2e-3 * len(k) and ga == gb, (a, b)
    assert ours[0][0] > max(lp for lp, _ in ours[1:4])


def test_many_choices_split_into_rows_that_fit(tiny):
    """30 choices of one context do not fit one row of the model's 128 tokens: the scorer splits them across rows
    (each holding the context again), and nothing changes."""
    hf, model = tiny
    reqs = questions(7, 2, context=(40, 60), continuation=(2, 8), choices=30)
    close(loglikelihoods(model, reqs, batch_size=64), [reference(hf, c, k) for c, k in reqs], 1e-4)
