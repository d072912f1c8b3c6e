"""`compile: true`: the pretraining loop under torch.compile gives eager's losses, and the C++ kernels (RMSNorm,
RoPE, SwiGLU) trace as custom ops (`tinkerlm.tune.compile_ops`) instead of breaking the graph at every call.

The backend is aot_eager: dynamo's tracing and AOTAutograd's forward/backward graphs, the parts that meet the
custom ops and their fake implementations, without inductor's code generation (minutes on 2 shared cores; the
inductor path is measured by `bench/pretrain_bench.py --engines tinkerlm,tinkerlm-compiled`).
"""

from __future__ import annotations

import pytest
import torch
from test_pretrain import _losses, _run
from tiny import write_tokenizer

from tinkerlm.kernels import ops
from tinkerlm.tune import pretrain as pretrain_mod


@pytest.mark.skipif(ops() is None, reason="the C++ kernels are not built here")
def test_compiled_losses_equal_eager_and_the_kernels_do_not_break_the_graph(tmp_path, monkeypatch):
    tok = tmp_path / "tok"
    tok.mkdir()
    write_tokenizer(tok)
    from torch._dynamo.utils import counters

    steps = dict(max_steps=4, eval_fraction=0.0)
    eager = _losses(_run(tok, "eager", **steps))
    monkeypatch.setattr(pretrain_mod, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = _losses(_run(tok, "compiled", compile=True, **steps))
    assert len(compiled) == len(eager) == 4
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4, (eager, compiled)
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert not counters["graph_break"], dict(counters["graph_break"])
