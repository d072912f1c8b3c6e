"""Training across processes (`tinkerlm.tune.dist`): golden loss curves for one process, DDP and FSDP; resuming with
another number of processes; the rows each rank sees; fine-tuning under FSDP.

The golden curve (torchtitan's practice) is 20 steps of a tiny fixed pretraining recipe (a 2-layer Llama of width
32, a byte-level tokenizer, a corpus written here from a fixed seed) stored in tests/data/golden_pretrain.json.
Every way of running it must give those 20 losses within GOLDEN_RTOL: DDP and FSDP sum the same per-row gradients
in another order (two partial sums, then one all-reduce or reduce-scatter), which moves fp32 losses by about 1e-7
relative (measured: at most 1.1e-7 over the 20 steps), and another CPU's kernels move them by as much again; a
run that skips the gradient synchronisation is off by more than 1e-3 from step 2 (the report of the change that
added this test gives the numbers).

The multi-process runs use gloo on loopback, launched through torchrun as a user does (`-m tinkerlm pretrain`).
Regenerate the golden file (only when the model or the loop changes on purpose):
    python tests/test_distributed.py
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import write_tokenizer

from tinkerlm import store
from tinkerlm.tune import trainer

GOLDEN = Path(__file__).parent / "data" / "golden_pretrain.json"
GOLDEN_RTOL = 1e-4
RECIPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    seq_len=32,
    batch_size=2,
    grad_accum=2,
    max_steps=20,
    lr=0.003,
    warmup_steps=2,
    threads=1,
    eval_fraction=0.05,
    eval_max_rows=4,
    data_license="CC0-1.0",
    seed=0,
)
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxers near old mills"


def write_recipe(d: Path, **extra) -> Path:
    """The golden recipe in `d`: corpus.txt (400 lines of 12 words drawn with seed 0), tok/, recipe.yaml."""
    import yaml

    r = random.Random(0)
    words = WORDS.split()
    (d / "corpus.txt").write_text("\n".join(" ".join(r.choice(words) for _ in range(12)) for _ in range(400)))
    (d / "tok").mkdir(exist_ok=True)
    write_tokenizer(d / "tok")
    recipe = dict(RECIPE, data=[str(d / "corpus.txt")], tokenizer=str(d / "tok"), **extra)
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return d / "recipe.yaml"


def _losses(name: str) -> list[float]:
    rows = (store.model_path(store.get(name)) / "loss.csv").read_text().splitlines()[1:]
    return [float(r.split(",")[3]) for r in rows]


def _golden() -> list[float]:
    return json.loads(GOLDEN.read_text())["losses"]


def _assert_golden(losses: list[float]) -> None:
    golden = _golden()
    assert len(losses) == len(golden) == 20
    worst = max(abs(a - b) / b for a, b in zip(losses, golden))
    assert worst <= GOLDEN_RTOL, f"largest relative difference {worst:.2e}: {losses} vs {golden}"


def _torchrun(args: list[str], nproc: int = 2, module: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m tinkerlm ARGS` (or a script), one thread a process, gloo on loopback."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(29000 + os.getpid() % 997 + random.randrange(500))]
    cmd += ["-m", "tinkerlm", *args] if module else args
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path.cwd()
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _pretrain(recipe: Path, out: str, **kw):
    from tinkerlm.tune.pretrain import pretrain

    return pretrain(config=str(recipe), out=out, progress=False, **kw)


def test_one_process_gives_the_golden_curve(tmp_path):
    _pretrain(write_recipe(tmp_path), "one")
    _assert_golden(_losses("one"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_the_golden_curve(tmp_path, strategy):
    """torchrun -m tinkerlm pretrain: rank 0 alone tokenizes, prints and stores; both train; FSDP's stored weights
    are gathered whole (the same names as one process writes, the tied head once)."""
    recipe = write_recipe(tmp_path)
    r = _torchrun(["pretrain", "-c", str(recipe), "--out", "two", "--distributed", strategy])
    _assert_golden(_losses("two"))
    assert r.stderr.count("stored two:latest") == 1 and r.stderr.count("model: 28,832 parameters") == 1
    from safetensors.torch import load_file

    weights = load_file(str(store.model_path(store.get("two")) / "model.safetensors"))
    assert "lm_head.weight" not in weights and weights["model.embed_tokens.weight"].shape == (320, 32)
    assert len(list((store.home() / "shards").iterdir())) == 1


RESUME_SCRIPT = """
import sys
from tinkerlm.tune.pretrain import pretrain
recipe, out, strategy, stop, resume = sys.argv[1:]
pretrain(config=recipe, out=out, distributed=strategy, progress=False, save_every=5,
         stop_after=int(stop) or None, resume=resume == "1")
"""


def test_resume_with_another_number_of_processes(tmp_path):
    """A checkpoint holds whole tensors whatever wrote it: 2 FSDP processes save at step 10 (killed at 12), then one
    process resumes to 20; one process saves at 10, then 2 FSDP processes resume (shards cut from the whole
    tensors): both give the golden curve."""
    recipe = write_recipe(tmp_path, save_every=5)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    _torchrun([str(script), str(recipe), "a", "fsdp", "12", "0"], module=False)
    ckpt = trainer.latest_checkpoint(store.home() / "runs" / "a" / "latest")
    assert ckpt.name == "step-000010"
    _pretrain(recipe, "a", resume=True)
    _assert_golden(_losses("a"))

    _pretrain(recipe, "b", stop_after=12)
    assert trainer.latest_checkpoint(store.home() / "runs" / "b" / "latest").name == "step-000010"
    _torchrun([str(script), str(recipe), "b", "fsdp", "0", "1"], module=False)
    _assert_golden(_losses("b"))


@pytest.mark.parametrize("how", ["lora", "full"])
def test_finetune_under_fsdp_equals_one_process(tmp_path, how):
    """torchrun -m tinkerlm finetune --distributed fsdp, LoRA (the frozen base sharded with its adapters) and full:
    3 rows a step over 2 ranks, so rank 1 runs a weightless micro-batch to join the collectives; the losses and
    the stored weights equal one process's."""
    from test_tune import write_chat_data
    from tiny import make_hf_model

    from tinkerlm.tune import finetune

    make_hf_model("llama", tmp_path / "base")
    (tmp_path / "base" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    data = write_chat_data(tmp_path / "d.jsonl", 40)
    opts = dict(seq_len=64, batch_size=1, grad_accum=3, max_steps=4, lr=5e-3, warmup_steps=2, threads=1)
    opts["full"] = how == "full"
    finetune(base=str(tmp_path / "base"), data=str(data), out="one", progress=False, **opts)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items() if k != "full"] + ["--full"] * opts["full"]
    r = _torchrun(
        ["finetune", str(tmp_path / "base"), "--data", str(data), "--out", "two", *flags, "--distributed=fsdp"]
    )
    assert r.stderr.count("stored two:latest") == 1
    assert _losses("two") == pytest.approx(_losses("one"), rel=1e-5)
    from safetensors.torch import load_file

    files = {n: next(store.model_path(store.get(n)).glob("*.safetensors")) for n in ("one", "two")}
    a, b = load_file(str(files["one"])), load_file(str(files["two"]))
    assert sorted(a) == sorted(b) and files["one"].name == files["two"].name
    for k in a:  # AdamW divides by sqrt(v): a gradient summed in another order can move a near-zero weight by
        # a small fraction of one step (lr 5e-3); a rank's missing gradient moves it by whole steps
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_ranks_see_each_row_once_per_epoch_across_a_restart():
    """The rows of step s are a function of (seed, s): split by rank, 2 ranks for the first steps and 3 after a
    restart, the union over ranks and steps is the one-process run's rows, each exactly once per epoch."""
    cfg = trainer.TrainConfig(
        total_steps=0,
        batch_size=2,
        grad_accum=3,
        lr=1.0,
        min_lr_ratio=0.1,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        seed=7,
    )
    n_rows = 50  # 9 steps an epoch, the last one short (2 rows)
    per_epoch = trainer.steps_per_epoch(n_rows, cfg.batch_size, cfg.grad_accum)
    restart = 4
    for epoch in range(2):
        seen, single = [], []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            rows = trainer.step_rows(step, n_rows, cfg)
            single += rows.tolist()
            world = 2 if step < restart else 3
            shares = [trainer.rank_rows(rows, r, world) for r in range(world)]
            for share in shares:  # FSDP: the same micro-batch count on every rank, enough for the largest share
                assert -(-len(share) // cfg.batch_size) <= trainer.micro_batches(len(rows), cfg.batch_size, world)
            seen += [i for share in shares for i in share.tolist()]
        assert sorted(seen) == sorted(single) == list(range(n_rows))


def test_fsdp_refuses_a_packed_quantized_base():
    from tinkerlm.errors import TinkerError
    from tinkerlm.tune import dist

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    model.model.layers[0].register_buffer("blocks", torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(TinkerError, match=r"fsdp cannot shard the packed quantized base \(model.layers.0.blocks\)"):
        dist.shard(model)


def test_flat_bucket_all_reduce_sums_every_gradient(tmp_path):
    """`all_reduce_grads` across 2 gloo processes: every gradient summed (one with no gradient on a rank counts as
    zeros), with buckets smaller than the parameters so several are sent."""
    script = tmp_path / "reduce.py"
    script.write_text(
        """
import torch, torch.distributed as d
from tinkerlm.tune import dist
dist.BUCKET_ELEMENTS = 5
d.init_process_group("gloo")
r = d.get_rank()
ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(3,), (2, 4), (7,)]]
for i, p in enumerate(ps):
    if not (r == 1 and i == 1):
        p.grad = torch.full_like(p, float(10 * i + r + 1))
dist.all_reduce_grads(ps)
want = [1 + 2, 11, 21 + 22]
assert all(torch.equal(p.grad, torch.full_like(p, float(w))) for p, w in zip(ps, want)), [p.grad for p in ps]
d.destroy_process_group()
"""
    )
    _torchrun([str(script)], module=False)


def main() -> None:
    """Write tests/data/golden_pretrain.json from a one-process run of the golden recipe."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TINKERLM_HOME"] = str(Path(tmp) / "store")
        _pretrain(write_recipe(Path(tmp)), "golden")
        losses = _losses("golden")
    GOLDEN.write_text(
        json.dumps(
            {
                "about": "losses of tests/test_distributed.py's golden pretraining recipe, one process, fp32, "
                "torch " + torch.__version__,
                "recipe": RECIPE,
                "losses": losses,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {GOLDEN}: {losses}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
