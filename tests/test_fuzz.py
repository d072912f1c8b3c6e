"""The error contract under fuzzing (issue 12): every hostile input ends in a clean result or a `TinkerError`.

A fixed seed and a few cases per target (tests/fuzz.py: GGUF headers and metadata, GGUF tokenizer metadata,
safetensors headers, config.json, chat templates, fine-tune and merge recipes, fine-tune JSONL, server requests),
then every regression file in tests/fuzz_cases/ (TARGET-HASH.EXT: a case that once failed), then a few inputs
through `python -m tinkerlm` (exit status 0 or 2, no traceback). Cases run in a worker subprocess with a memory
limit (RLIMIT_AS) and a per-case deadline; a failure prints the target, the saved case, how to replay it and the
traceback. A new failing case is saved under the test's tmp folder: copy it into tests/fuzz_cases/ to keep it.
Longer runs: bench/fuzz.py.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz import (
    CASES_DIR,
    MEMORY_BYTES,
    OFFLINE_ENV,
    ROOT,
    STRING,
    TARGETS,
    Runner,
    _read_gguf,
    _write_gguf,
    fuzz,
    make_seeds,
    report,
    target_of,
)

SEED = 12
# Cases per target: about a minute in all on 2 cores. Templates cost up to the render deadline each.
CASES = {"template": 30, "ftrecipe": 40, "mergerecipe": 40}
DEFAULT_CASES = 80


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    return make_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.fixture(scope="module")
def runner(seeds):
    r = Runner(seeds)
    yield r
    r.close()


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_target(runner, target, tmp_path):
    tried, failures = fuzz(runner, target, SEED, CASES.get(target, DEFAULT_CASES), None, tmp_path / "failed")
    assert tried > 0
    assert not failures, f"{len(failures)} distinct failure(s) in {tried} cases:\n" + "\n".join(
        report(target, path, res) for _, path, res in failures
    )


REGRESSIONS = sorted(p for p in CASES_DIR.glob("*-*.*") if target_of(p) in TARGETS)


@pytest.mark.parametrize("case", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_regression_case(runner, case):
    res = runner.run(target_of(case), case)
    assert res["ok"], report(target_of(case), case, res)


def test_regression_files_are_named_for_a_target():
    stray = [p.name for p in CASES_DIR.iterdir() if p.name != "README.md" and target_of(p) not in TARGETS]
    assert not stray, f"tests/fuzz_cases/ files must be named TARGET-HASH.EXT, TARGET one of {list(TARGETS)}"


def _cli_inputs(seeds: Path, tmp: Path) -> list[list[str]]:
    """A few hostile inputs, each as the argv a user would type."""
    g = _read_gguf((seeds / "tiny.gguf").read_bytes())
    for kv in g.kvs:
        if kv[0] == "llama.block_count":
            kv[1:] = [10, 2**31]  # u64 layer count
        if kv[0] == "tokenizer.ggml.tokens":
            kv[2] = (STRING, kv[2][1] + ["x" * 45000])
    (tmp / "layers.gguf").write_bytes(_write_gguf(g)[0])
    (tmp / "cut.gguf").write_bytes((seeds / "tiny.gguf").read_bytes()[:700])
    g = _read_gguf((seeds / "tiny.gguf").read_bytes())
    g.kvs = [kv if kv[0] != "tokenizer.chat_template" else [kv[0], STRING, "{% for i in range(10**9) %}x{% endfor %}"]
             for kv in g.kvs]  # fmt: skip
    (tmp / "template.gguf").write_bytes(_write_gguf(g)[0])
    (tmp / "ft.yaml").write_text("lora_rank: 1000000000\nthreads: -5\nmax_steps: 1\n")
    hf, hf2 = seeds / "hf", tmp / "hf2"
    shutil.copytree(hf, hf2)
    (tmp / "merge.yaml").write_text(
        f"merge_method: linear\nmodels:\n- model: {hf}\n  parameters: {{weight: 1.0e+308}}\n"
        f"- model: {hf2}\n  parameters: {{weight: .nan}}\n"
    )
    (tmp / "bad.jsonl").write_bytes(b'{"text": "\xff"}\n{"text": ' + b"[" * 50000 + b"]" * 50000 + b"}\n")
    return [
        ["pull", str(tmp / "layers.gguf"), "--name", "x"],
        ["run", str(tmp / "layers.gguf"), "hi", "--max-tokens", "2"],
        ["run", str(tmp / "cut.gguf"), "hi", "--max-tokens", "2"],
        ["run", str(tmp / "template.gguf"), "hi", "--max-tokens", "2", "--chat"],
        ["finetune", str(hf), "-c", str(tmp / "ft.yaml"), "--data", str(seeds / "data.jsonl"), "--out", "f"],
        ["finetune", str(hf), "--data", str(tmp / "bad.jsonl"), "--out", "g", "--max-steps", "1"],
        ["merge", str(tmp / "merge.yaml"), "--out", "m"],
    ]


def _memory_limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))


def test_cli_exit_status_and_no_traceback(seeds, tmp_path):
    env = {**os.environ, **OFFLINE_ENV, "TINKERLM_HOME": str(tmp_path / "store"), "PYTHONPATH": str(ROOT)}
    bad = []
    for argv in _cli_inputs(seeds, tmp_path):
        try:
            p = subprocess.run(
                [sys.executable, "-m", "tinkerlm", *argv],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                preexec_fn=_memory_limit,
            )
        except subprocess.TimeoutExpired:
            bad.append(f"tinkerlm {' '.join(argv)}: no exit within 60 s")
            continue
        if p.returncode not in (0, 2) or "Traceback" in p.stderr:
            bad.append(f"tinkerlm {' '.join(argv)}: exit {p.returncode}\n{p.stderr[-3000:]}")
    assert not bad, "\n\n".join(bad)
