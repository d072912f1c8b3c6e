"""The lm-evaluation-harness backend: per request the same log-likelihoods as lm-eval's own `hf` model (HFLM) on the
same weights (a tiny random model, and SmolLM2's Q4_1 weights dequantized to fp32 and exported as an HF directory),
the same rolling log-likelihoods and greedy generations, and a real `simple_evaluate` on the local arc_easy whose
accuracy is tinkerlm's own scoring of the same items."""

import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval==0.4.13')")

sys.path.insert(0, str(Path(__file__).parent))
from lm_eval.api.instance import Instance  # noqa: E402
from tiny import make_hf_model  # noqa: E402

from tinkerlm.errors import TinkerError  # noqa: E402
from tinkerlm.evaluate import harness  # noqa: E402
from tinkerlm.evaluate.scoring import loglikelihoods  # noqa: E402

TOL = 1e-4
THREADS = 1  # tinkerlm.load sets torch's threads for both engines; one thread is fastest on a shared CI machine
QUESTION = "Question: Which gas do plants take in from the air?\nAnswer:"
REQUESTS = [
    (QUESTION, " carbon dioxide"),
    (QUESTION, " oxygen"),
    (QUESTION, " nitrogen gas from the soil"),
    ("The cat sat on the ", "mat."),  # trailing space moves onto the continuation (lm-eval's _encode_pair)
    ("", "An empty context is started with the prefix token."),
    ("Ünïcödé text: naïve café ", "résumé"),
]
LONG_TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 5


def hflm(path, batch_size=4):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), dtype="float32", batch_size=batch_size, device="cpu")


def instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def same_loglikelihoods(ours, theirs, requests):
    a = ours.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    b = theirs.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    for i, ((la, ga), (lb, gb)) in enumerate(zip(a, b, strict=True)):
        assert abs(la - lb) <= TOL, (i, requests[i], la, lb)
        assert ga == gb, (i, requests[i], ga, gb)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model("llama", path)
    return harness.TinkerLM(model=str(path), quant="fp32", batch_size=3, threads=THREADS), hflm(path)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    """Our backend on the store's GGUF dequantized to fp32; HFLM on the same weights exported as an HF directory."""
    from tinkerlm.export import export

    out = tmp_path_factory.mktemp("smollm2-hf") / "model"
    export(str(smollm2_gguf), to="hf", out=str(out), dtype="float32", verify=False, progress=False)
    return harness.TinkerLM(model=str(smollm2_gguf), quant="fp32", batch_size=4, threads=THREADS), hflm(out)


def test_tiny_loglikelihoods_equal_hflm(tiny):
    ours, theirs = tiny
    assert (ours.prefix_token_id, ours.eot_token_id, ours.max_length) == (
        theirs.prefix_token_id,
        theirs.eot_token_id,
        theirs.max_length,
    )
    # 300 bytes of a byte-level tokenizer against a 128-token context: inputs cut from the left as HFLM does.
    same_loglikelihoods(ours, theirs, REQUESTS + [("x" * 300, " y"), ("ab", "c" * 100)])


def test_tiny_rolling_uses_the_harness_windows(tiny):
    ours, theirs = tiny
    texts = [("short text",), (LONG_TEXT,)]  # the long one (400 tokens) spans four 128-token windows
    a = ours.loglikelihood_rolling(instances("loglikelihood_rolling", texts), disable_tqdm=True)
    b = theirs.loglikelihood_rolling(instances("loglikelihood_rolling", texts), disable_tqdm=True)
    assert a == pytest.approx(b, abs=TOL)


def test_tiny_greedy_generation_equals_hflm(tiny):
    ours, theirs = tiny
    args = [("Once upon", {"until": ["q"], "max_gen_toks": 12, "do_sample": False}), ("Hi", {"max_gen_toks": 5})]
    got = ours.generate_until(instances("generate_until", args), disable_tqdm=True)
    want = theirs.generate_until(instances("generate_until", args), disable_tqdm=True)
    # Random weights emit stray UTF-8 continuation bytes: at the length limit tinkerlm drops an incomplete character
    # where transformers decodes it as U+FFFD.
    assert got == [s.rstrip("\ufffd") for s in want]


def test_smollm2_loglikelihoods_equal_hflm(smollm2):
    ours, theirs = smollm2
    same_loglikelihoods(ours, theirs, REQUESTS)


def test_smollm2_rolling_and_generation_equal_hflm(smollm2):
    ours, theirs = smollm2
    texts = instances("loglikelihood_rolling", [(LONG_TEXT,)])
    assert ours.loglikelihood_rolling(texts, True) == pytest.approx(theirs.loglikelihood_rolling(texts, True), abs=TOL)
    args = [
        ("The capital of France is", {"until": ["."], "max_gen_toks": 12}),
        ("Question: What colour is the sky?\nAnswer:", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
    ]
    got = ours.generate_until(instances("generate_until", args), disable_tqdm=True)
    assert got == theirs.generate_until(instances("generate_until", args), disable_tqdm=True)
    assert any(got)


def test_simple_evaluate_on_local_arc_easy_equals_tinkerlm_scoring(smollm2_gguf, tmp_path):
    from tinkerlm.evaluate.tasks import load_task

    result = lm_eval.simple_evaluate(
        model="tinkerlm",
        model_args=f"model={smollm2_gguf},quant=native,threads={THREADS}",
        tasks=["arc_easy"],
        limit=8,
        batch_size=8,
        task_manager=harness.task_manager(include_defaults=False),
        log_samples=True,
    )
    samples = sorted(result["samples"]["arc_easy"], key=lambda s: s["doc_id"])
    assert len(samples) == 8

    # The same items through tinkerlm's own task loader and scorer, batched as the harness batched them (the native
    # kernels' sums depend slightly, ~1e-3, on which rows share a pass).
    task = load_task("arc_easy", limit=8)
    lm = harness.TinkerLM(model=str(smollm2_gguf), quant="native", threads=THREADS)
    requests = [lm._encode_pair(c, k) for item in task.items for c, k in task.requests(item)]
    lls = [ll for ll, _ in loglikelihoods(lm.model, requests, batch_size=8)]
    for item, sample in zip(task.items, samples, strict=True):
        ours, lls = lls[: len(item.choices)], lls[len(item.choices) :]
        assert sample["target"] == item.gold
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(ours, abs=TOL)
        assert sample["acc"] == float(max(range(len(ours)), key=ours.__getitem__) == item.gold)
    acc = result["results"]["arc_easy"]["acc,none"]
    assert acc == pytest.approx(sum(s["acc"] for s in samples) / 8)


def test_registered_and_task_files(tmp_path):
    from lm_eval.api.registry import get_model

    assert get_model("tinkerlm") is harness.TinkerLM
    assert get_model("hf").__name__ == "HFLM"  # the stock backends stay registered
    written = harness.write_tasks(tmp_path / "tasks")
    names = {p.stem for p in written.glob("*.yaml")}
    assert set(harness.SINGLE_TASKS) <= names and "mmlu_anatomy" in names
    assert 'dataset_path: "arrow"' in (written / "boolq.yaml").read_text()


def test_bad_model_args():
    with pytest.raises(TinkerError, match="model= is missing"):
        harness.TinkerLM()
    with pytest.raises(TinkerError, match="unknown pretrained"):
        harness.TinkerLM(model="x", pretrained="gpt2")
    with pytest.raises(TinkerError, match="batch_size"):
        harness.TinkerLM(model="x", batch_size="many")
