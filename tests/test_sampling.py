"""The one sampling engine: the declaration drives the CLI and the server (no drift), the Python API has every
option (logprobs, penalties, JSON), streaming detokenization is linear, BatchGenerator equals the API, and the
papercuts (max_tokens 0, --debug after the verb, generation_config.json defaults)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny import make_hf_model, penalised_greedy

import tinkerlm
from tinkerlm import sampling
from tinkerlm.errors import TinkerError
from tinkerlm.sampling import Detokenizer, SamplingParams

# Request fields that are not generation options (the request itself, streaming, OpenAI's spellings).
NOT_OPTIONS = {
    "model",
    "messages",
    "prompt",
    "n",
    "stream",
    "stream_options",
    "user",
    "max_completion_tokens",
    "top_logprobs",
    "tools",  # tool calling (tinkerlm.toolcalls): what to call, not how to sample
    "tool_choice",
    "parallel_tool_calls",
}
MODEL_FLAGS = {"dtype", "quant", "threads", "kv_cache"}  # options of loading, listed beside sampling's


# ----------------------------------------------------------------------------------------------------------------
# The declaration is the one source


def _generation_group(verb: str):
    from tinkerlm.cli import parser

    sub = next(a for a in parser()._actions if a.dest == "verb")
    group = next(g for g in sub.choices[verb]._action_groups if g.title == "generation")
    return {a.dest: a for a in group._group_actions}


@pytest.mark.parametrize("verb", ["run", "chat"])
def test_cli_flags_are_the_declaration(verb):
    declared = sampling.params()
    flags = _generation_group(verb)
    assert set(flags) - MODEL_FLAGS == set(declared)
    for name, (_, p) in declared.items():
        action = flags[name]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert p.help in action.help and "(default: " in action.help


def test_server_fields_are_the_declaration():
    from tinkerlm.serve.protocol import ChatRequest, CompletionRequest

    declared = {p.api or name for name, (_, p) in sampling.params().items()}
    for model in (ChatRequest, CompletionRequest):
        fields = set(model.model_fields)
        assert fields - NOT_OPTIONS == declared, model.__name__
        # Ranges come from the declaration (OpenAI's tighter ones aside): top_p's (0, 1], top_k's >= 0.
        meta = {type(m).__name__: m for m in model.model_fields["top_p"].metadata}
        assert meta["Gt"].gt == 0 and meta["Le"].le == 1


def test_every_option_is_validated():
    for name, (f, p) in sampling.params().items():
        if p.ge is None and p.gt is None:
            continue
        below = (p.ge if p.ge is not None else p.gt) - 1
        with pytest.raises(TinkerError, match=f"sampling: {name} must be"):
            SamplingParams(**{name: type(sampling.default(f) or 0)(below)}).check()
    for bad in [dict(logprobs=True), dict(top_k=1.5), dict(temperature="hot"), dict(json=1), dict(stop=[3])]:
        with pytest.raises(TinkerError, match=f"sampling: {next(iter(bad))} must be"):
            SamplingParams(**bad).check()


# ----------------------------------------------------------------------------------------------------------------
# Streaming detokenization


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampling") / "llama"
    make_hf_model("llama", path)
    return tinkerlm.load(str(path))


def test_detokenizer_is_linear(llm):
    """2,000 tokens: the detokenizer decodes a bounded window per token, not the whole answer each time."""
    text = ("héllo wörld → 世界 👋🏽 " * 120)[:2000]
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    counting = CountingTokenizer(llm.tokenizer)
    row = Detokenizer(counting, ["never"])
    pieces = []
    for t in ids:
        row.push(t)
        pieces.append(row.flush(final=False)[0])
    pieces.append(row.flush(final=True)[0])
    assert "".join(pieces) == llm.tokenizer.decode(ids)
    assert counting.decoded < 12 * len(ids)  # the quadratic version decodes ~len(ids)**2 / 2 = 2.6M token ids


def test_stop_string_across_pieces_and_characters(llm):
    """A stop string that starts in one token and ends several tokens later, after multi-byte characters."""
    text = "ab→世界 STOP here"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    row = Detokenizer(llm.tokenizer, ["界 ST"])
    out, hit = "", False
    for t in ids:
        row.push(t)
        piece, hit = row.flush(final=False)
        out += piece
        if hit:
            break
    assert hit and out == "ab→世"


# ----------------------------------------------------------------------------------------------------------------
# The Python API has every option


def test_logprobs_from_the_python_api(llm):
    ids = llm.tokenizer.encode("logprobs", add_special_tokens=False)
    out = llm.generate("logprobs", max_tokens=4, logprobs=2)
    assert isinstance(out, str) and out.finish_reason in ("stop", "length")
    assert out == llm.generate("logprobs", max_tokens=4)  # asking for logprobs changes nothing else
    seq = list(ids)
    for t in out.logprobs:
        with torch.no_grad():
            ref = torch.log_softmax(llm.model(torch.tensor([seq]))[0, -1].float(), -1)
        assert t.id == int(ref.argmax()) and abs(t.logprob - ref[t.id].item()) < 1e-4
        assert [i for i, _ in t.top] == ref.topk(2).indices.tolist() and isinstance(t.text, str)
        seq.append(t.id)
    streamed = list(llm.stream("logprobs", max_tokens=4, logprobs=0))
    assert [t.id for p in streamed for t in p.logprobs] == [t.id for t in out.logprobs]
    assert all(p.logprobs[0].top == [] for p in streamed)
    assert llm.generate("logprobs", max_tokens=4).logprobs == []


def test_penalties_from_the_python_api(llm):
    """Greedy with OpenAI's penalties equals a plain loop (as the server's test checks for the server)."""
    ids = llm.tokenizer.encode("penalty test", add_special_tokens=False)
    out = penalised_greedy(llm, ids, 12, frequency=1.5, presence=0.5)
    got = llm.generate("penalty test", max_tokens=12, frequency_penalty=1.5, presence_penalty=0.5, logprobs=0)
    assert [t.id for t in got.logprobs] == out


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=1.0, seed=1)])
@pytest.mark.parametrize("max_tokens", [3, 40])
def test_json_from_the_python_api(llm, settings, max_tokens):
    answer = llm.chat("JSON please", json=True, max_tokens=max_tokens, **settings)
    assert isinstance(json.loads(answer), dict) and answer.finish_reason == "stop"


def test_unknown_option_is_refused(llm):
    with pytest.raises(TinkerError, match="'temprature' is not known"):
        llm.generate("x", temprature=1)


# ----------------------------------------------------------------------------------------------------------------
# BatchGenerator in the caller's thread


def test_batch_generator_equals_the_api(llm):
    from tinkerlm.batching import BatchGenerator

    settings = [
        dict(max_tokens=6),
        dict(max_tokens=9, temperature=0.8, seed=4),
        dict(max_tokens=5, top_k=3, seed=1, temperature=1.0, repetition_penalty=1.2),
    ]
    bg = BatchGenerator(llm.model, llm.tokenizer, max_batch=2)  # three prompts, two slots: one waits
    seqs = [bg.submit(f"p{i}", llm.sampling(**s)) for i, s in enumerate(settings)]
    texts, reasons = {s.index: "" for s in seqs}, {}
    for ev in bg.events():
        texts[ev.index] += ev.text
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    assert [texts[s.index] for s in seqs] == [llm.generate(f"p{i}", **s) for i, s in enumerate(settings)]
    assert set(reasons) == {s.index for s in seqs} and bg.pending() == 0


# ----------------------------------------------------------------------------------------------------------------
# Papercuts


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tinkerlm", *args], capture_output=True, text=True, **kw)


def test_max_tokens_zero_is_refused(llm):
    """As OpenAI (max_tokens >= 1): 0 is an error everywhere, never a full answer."""
    with pytest.raises(TinkerError, match="max_tokens must be >= 1"):
        llm.generate("hi", max_tokens=0)
    proc = cli("run", "not-pulled-model", "hi", "--max-tokens", "0")  # refused before any pull or load
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["tinkerlm: error: sampling: max_tokens must be >= 1 (got 0)"]


def test_debug_after_the_verb(tmp_path):
    from tinkerlm.cli import parser

    assert parser().parse_args(["run", "m", "hi", "--debug"]).debug is True
    assert parser().parse_args(["--debug", "run", "m", "hi"]).debug is True
    assert parser().parse_args(["run", "m", "hi"]).debug is False
    proc = cli("run", str(tmp_path / "nope.gguf"), "hi", "--debug")
    assert "unrecognized arguments" not in proc.stderr and "Traceback" in proc.stderr


GEN_CONFIG = {
    "do_sample": True,
    "temperature": 0.7,
    "top_k": 5,
    "top_p": 0.9,
    "repetition_penalty": 1.3,
    "bos_token_id": 256,
    "eos_token_id": 258,
}


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    path = tmp_path_factory.mktemp("genconfig") / "llama"
    make_hf_model("llama", path)
    (path / "generation_config.json").write_text(json.dumps(GEN_CONFIG))
    return path


def test_generation_config_defaults():
    assert sampling.generation_config_defaults(GEN_CONFIG) == dict(
        temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3
    )
    assert sampling.generation_config_defaults({"do_sample": False, "temperature": 0.6}) == {"temperature": 0.0}
    assert sampling.generation_config_defaults({"temperature": 0.6, "top_p": 0.8}) == {"top_p": 0.8}
    assert sampling.generation_config_defaults({"top_p": 7, "top_k": "x"}) == {}  # out of range: ignored


def test_generation_config_sets_api_defaults(configured):
    llm = tinkerlm.load(str(configured))
    explicit = dict(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3)
    got = llm.generate("hello", max_tokens=12, seed=3)
    assert got == llm.generate("hello", max_tokens=12, seed=3, **explicit)
    greedy = llm.generate("hello", max_tokens=12, temperature=0, repetition_penalty=1.3)
    assert llm.generate("hello", max_tokens=12, temperature=0) == greedy  # a given value wins
    assert any(llm.generate("hello", max_tokens=12, seed=s) != greedy for s in range(3))
    # The CLI takes the same defaults.
    proc = cli("run", str(configured), "hello", "--raw", "--max-tokens", "12", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == got + "\n"


def test_generation_config_sets_server_defaults(configured):
    import openai
    from test_serve import live_server

    llm = tinkerlm.load(str(configured))
    with live_server({"m": llm}) as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="m", prompt="hello", max_tokens=12, seed=3)
        assert r.choices[0].text == llm.generate("hello", max_tokens=12, seed=3)
        r = client.completions.create(model="m", prompt="hello", max_tokens=12, temperature=0)
        assert r.choices[0].text == llm.generate("hello", max_tokens=12, temperature=0)


def test_extreme_values_stay_finite():
    """A tiny temperature samples the top token (no inf - inf = NaN); penalties that would overflow are refused."""
    logits = torch.tensor([[30.0, 29.0, -5.0], [1.0, 8.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    assert sampling.sample(logits, SamplingParams(temperature=1e-30), gen).tolist() == [0, 1]
    with pytest.raises(TinkerError, match="repetition_penalty must be >= 0.01"):
        SamplingParams(repetition_penalty=1e-300).check()
