"""examples/pretrain/demo.py end to end, so the demo cannot rot: tokenizer, pretraining, samples before and after,
curve. A tiny model on the standard library's json package, 3 steps, one thread: seconds.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tinkerlm import store

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "pretrain" / "demo.py"
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_steps": 3,
    "eval_every": 3,
    "save_every": 0,
    "warmup_steps": 1,
    "eval_max_rows": 4,
    "data": "[stdlib/json/*.py]",
}


def test_demo_runs_end_to_end_and_samples_the_init_and_the_trained_model(tmp_path, store_home):
    samples, curve = tmp_path / "samples.md", tmp_path / "curve.png"
    args = [sys.executable, str(DEMO), "--threads", "1", "--quiet", "--tokenizer-data", "json/*.py"]
    args += ["--vocab-size", "512", "--max-new-tokens", "6", "--samples", str(samples), "--curve", str(curve)]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TINKERLM_HOME=str(store_home))
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for stage in ("tokenizer", "pretrain", "samples", "total"):
        assert re.search(rf"\[demo\] {stage} +\d+\.\d s", r.stderr), stage

    tok, m = store.find("stdlib-py"), store.find("stdlib-code-demo")
    assert tok.format == "tokenizer" and m.source["steps"] == 3
    assert m.source["tokenizer"]["name"] == tok.ref and math.isfinite(m.source["eval_loss"])
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = samples.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)\n```", text, re.S)
    assert len(blocks) == 3 * 2 * 2  # prompts x seeds x (before, after)
    assert blocks[0].startswith("def parse_args(") and blocks[-1].startswith("import os\n\ndef ")
    befores, afters = blocks[0::2], blocks[1::2]
    assert befores != afters  # three steps of training changed what the model writes
    assert text.count("Before (step 0)") == 6 and text.count("After (3 steps)") == 6

    # "before" is the trainer's own starting point: the loaded model re-initialised as the demo does it equals the
    # model pretrain built and initialised, tensor for tensor (same names, same order, tied head included).
    from tinkerlm import models
    from tinkerlm.api import load
    from tinkerlm.tune.pretrain import init_weights

    llm = load(m.ref, threads=1, prefix_cache_mb=0)
    init_weights(llm.model, 0.02, 0)
    fresh = models.build(m.source["model_config"], "test", device="cpu")
    init_weights(fresh, 0.02, 0)
    ours, theirs = llm.model.state_dict(), fresh.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
