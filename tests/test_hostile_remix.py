"""Hostile inputs to the remix verbs and the store (issue 12): recipes (YAML bombs, out-of-range values), merge
output sizes, fine-tune JSONL data and checkpoints, symbolic links, interrupted replacements and Hub endpoints that
send more than they list. Every bad input is a one-line TinkerError naming the file or field; nothing is stored.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_store import assert_store_clean, hub, sha256, write_gguf, write_hf_dir  # noqa: F401 (hub: fixture)
from tiny import make_hf_model

from tinkerlm import limits, store
from tinkerlm.errors import TinkerError
from tinkerlm.merge import merge
from tinkerlm.merge import recipe as merge_recipe
from tinkerlm.tune import data, trainer
from tinkerlm.tune.recipe import resolve


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and len(text) < 400, text
    return text


# ---------------------------------------------------------------------------------------------------------------
# YAML: aliases, size, depth


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The classic: each level lists the previous one `width` times (9 levels of 9: 387 million strings)."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    lines.append(f"merge_method: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def _time_and_memory(fn) -> tuple[float, int]:
    tracemalloc.start()
    t = time.perf_counter()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return time.perf_counter() - t, peak


@pytest.mark.parametrize("loader", [merge_recipe.load, resolve], ids=["merge", "finetune"])
def test_alias_bomb_fails_fast_in_little_memory(tmp_path, loader):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert bomb.stat().st_size < 700

    def run():
        with pytest.raises(TinkerError, match=r"bomb\.yaml: more than 64 aliases"):
            loader(str(bomb))

    seconds, peak = _time_and_memory(run)
    assert seconds < 2 and peak < 20 << 20, (seconds, peak)
    # Under the alias count, the expansion is what is bounded: 7 levels of 9 is 63 aliases, 4.8 million values.
    bomb.write_text(alias_bomb(levels=8, width=9).replace("*a7", "*a6").replace("a7: &a7", "a7:"))
    seconds, peak = _time_and_memory(lambda: pytest.raises(TinkerError, loader, str(bomb)))
    with pytest.raises(TinkerError, match="expands to more than .* values through its aliases"):
        loader(str(bomb))
    assert seconds < 2 and peak < 20 << 20, (seconds, peak)


def test_a_few_aliases_still_work(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: &w {weight: 0.5}\n  - model: b\n    parameters: *w\n"
    )
    r = merge_recipe.load(str(y))
    assert [s.parameters for s in r.slices[0].sources] == [{"weight": 0.5}, {"weight": 0.5}]


@pytest.mark.parametrize(
    "text, match",
    [
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 64 levels at line 1"),
        ("lora_rank: " + "9" * 5000 + "\n", "a value cannot be read"),
        ("a: &a [*a]\n", "an alias refers to a value that contains it"),
        (b"lora_rank: 8\nbase: \xff\xfe\n", r"recipe is not UTF-8 text \(bad byte at offset 19\)"),
        ("x: " + "y" * (limits.MAX_YAML_BYTES + 10) + "\n", "recipe is larger than 1,048,576 bytes"),
    ],
    ids=["deep", "huge-int", "recursive", "not-utf8", "too-big"],
)
@pytest.mark.parametrize("loader", [merge_recipe.load, resolve], ids=["merge", "finetune"])
def test_yaml_bounds(tmp_path, loader, text, match):
    y = tmp_path / "r.yaml"
    (y.write_bytes if isinstance(text, bytes) else y.write_text)(text)
    with pytest.raises(TinkerError, match=r"r\.yaml: " + match) as e:
        loader(str(y))
    one_line(e)


def test_yaml_special_files_refused(tmp_path):
    from tinkerlm.formats import safe_yaml

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading would block forever
    with pytest.raises(TinkerError, match="not a regular file"):
        safe_yaml.load(fifo)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tune recipe values

BAD_FINETUNE = [
    ("lora_rank", 10**9, "lora_rank: must be between 1 and 4,096"),
    ("threads", -5, "threads: must be between 1 and 1,024"),
    ("lr", float("inf"), "lr: must be a finite number"),
    ("lr", 1e308, r"lr: must be in \(0, 10\]"),
    ("lr", "fast", "lr must be float"),
    ("epochs", float("nan"), "epochs: must be a finite number"),
    ("epochs", 1e308, "epochs: must be in"),
    ("batch_size", 10**12, "batch_size: must be between 1 and 65,536"),
    ("grad_accum", -1, "grad_accum: must be between 1"),
    ("seq_len", 10**12, "seq_len: must be between 1 and 16,777,216"),
    ("warmup_steps", 10**30, "warmup_steps: must be between 0"),
    ("max_steps", 2**80, "max_steps: must be between 1"),
    ("eval_every", -3, "eval_every: must be between 0"),
    ("seed", -1, "seed: must be between 0"),
    ("seed", 2**64, "seed: must be between 0"),
    ("min_lr_ratio", 2.0, r"min_lr_ratio: must be in \[0, 1\]"),
    ("weight_decay", float("nan"), "weight_decay: must be a finite number"),
    ("lora_alpha", 0, r"lora_alpha: must be in \(0, "),
    ("max_grad_norm", -1.0, "max_grad_norm: must be in"),
    ("val_fraction", 1.0, r"val_fraction: must be in \(0, 1\)"),
    ("lora_targets", [], "lora_targets: must be a non-empty list"),
    ("lora_targets", ["q_proj", 3], "lora_targets must be a list of module names"),
    ("out", ["a"], "out must be str"),
    ("bf16", "yes", "bf16 must be true or false"),
]


@pytest.mark.parametrize("field, value, match", BAD_FINETUNE, ids=[f"{f}={str(v)[:12]}" for f, v, _ in BAD_FINETUNE])
def test_finetune_recipe_values_are_checked(tmp_path, field, value, match):
    base = {"base": "smollm2", "data": "d.jsonl", "out": "o"}
    with pytest.raises(TinkerError, match=match) as e:
        resolve(**{**base, field: value})
    one_line(e)
    if isinstance(value, float) and value != value:
        return  # YAML has .nan, but the flag path above is the one that matters
    y = tmp_path / "r.yaml"
    y.write_text(json.dumps({**base, field: value}, allow_nan=True).replace("Infinity", ".inf"))  # JSON is YAML
    with pytest.raises(TinkerError, match=match) as e:
        resolve(str(y))
    one_line(e)


def test_finetune_recipe_good_values_pass():
    r = resolve(base="b", data="d", out="o", max_grad_norm=0.0, threads=2, epochs=0.5, seed=2**63 - 1)
    assert (r.max_grad_norm, r.threads, r.epochs) == (0.0, 2, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Merge recipes: values, layers, output size


@pytest.fixture
def ab(tmp_path):
    for name, seed in (("a", 0), ("b", 1)):
        d = tmp_path / "src" / name
        make_hf_model("llama", d, seed=seed)
        store.pull(str(d), name=name, progress=False)


def two(method, pa=None, pb=None, **top):
    return {
        "merge_method": method,
        "models": [{"model": "a", "parameters": pa or {}}, {"model": "b", "parameters": pb or {}}],
        **top,
    }


def stack(n_slices, **params):
    return {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 2], **params}]}] * n_slices,
    }


BAD_MERGE = [
    (two("linear", {"weight": 1e308}, {"weight": 1.0}), r"weight 1e\+308 for a .* outside \[-10000, 10000\]"),
    (two("linear", {"weight": "-inf"}, {"weight": 1.0}), "weight is -inf for a"),
    (two("slerp", base_model="a", parameters={"t": 5}), r"t 5 for the merge .* outside \[0, 1\]"),
    (two("slerp", base_model="a", parameters={"t": [0, 1.5]}), r"t 1.5 for the merge .* outside \[0, 1\]"),
    (two("ties", {"weight": 1}, {"weight": 1}, base_model="a", parameters={"lambda": 1e300}), "lambda 1e"),
    (two("ties", {"weight": 1}, {"weight": 1, "density": -0.5}, base_model="a"), "density -0.5 for b"),
    (stack(1, parameters={"scale": 1e308}), r"scale 1e\+308 for a"),
    (two("linear", {"weight": [1.0] * 5000}, {"weight": 1}), "a list of 5,000 entries"),
    (two("linear", {"weight": 1}, {"weight": 1}, random_seed=2**70), "random_seed must be an integer from 0"),
    (two("linear", {"weight": 1}, {"weight": 1}, dtype=["bf16"]), r"dtype: \['bf16'\] is not one of"),
    (
        {**stack(1), "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": "x"}]},
        "residual_weight: expected a finite number",
    ),
    (stack(2000), "2000 slices; at most 1024"),
    (stack(600), "the slices stack 1,200 layers; at most 1024"),
    (two("linear", {"weight": "x" * 100000}, {"weight": 1}), "a string of 100,000 characters"),
    ({"merge_method": "linear", "models": ["a"] * 300}, "models lists 300 models; at most 256"),
]


@pytest.mark.parametrize("recipe, match", BAD_MERGE)
def test_merge_recipe_values_are_checked(ab, recipe, match):
    with pytest.raises(TinkerError, match=match) as e:
        merge(recipe, "m", progress=False)
    one_line(e)
    assert {m.name for m in store.list_models()} == {"a", "b"}


def test_merge_threads_checked(ab):
    with pytest.raises(TinkerError, match="threads: must be between 1 and 1024, got -5"):
        merge(two("linear", {"weight": 1}, {"weight": 1}), "m", threads=-5, progress=False)


def test_merge_output_size_is_shown_and_refused_past_free_space(ab, monkeypatch, capsys):
    recipe = stack(8)  # 16 layers from a 2-layer model
    free = shutil.disk_usage(store.home()).free
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    with pytest.raises(
        TinkerError, match=r"not enough disk space in .* for merge into m:latest: need 2.5 MB, 1.0 kB free"
    ):
        merge(recipe, "m", progress=False)
    err = capsys.readouterr().err
    assert "m:latest: " in err and "16 layers" in err and "of weights to write" in err
    assert {m.name for m in store.list_models()} == {"a", "b"}
    tmp = store.home() / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())
    # With room, the estimate is the size of the weights actually written.
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=free, used=0, free=free))
    m = merge(recipe, "m", progress=False)
    written = (store.model_path(m) / "model.safetensors").stat().st_size
    from safetensors import safe_open

    with safe_open(store.model_path(m) / "model.safetensors", "pt") as f:
        expected = sum(_nbytes(f, k) for k in f.keys())
    line = next(ln for ln in capsys.readouterr().err.splitlines() if "of weights to write" in ln)
    assert store.format_size(expected) in line and written > expected


def _nbytes(f, key) -> int:
    t = f.get_tensor(key)
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------------------------
# Fine-tune data and checkpoints


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r":2: not UTF-8 text \(bad byte at column 11\)"),
        (b'{"text": "ok"}\n{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", ":2: JSON nested deeper than 64 levels"),
        (b'{"a": ' + b"[" * 70 + b"]" * 70 + b"}\n", ":1: JSON nested deeper than 64 levels"),
        (b'{"text": "a", "n": ' + b"9" * 5000 + b"}\n", ":1: a value cannot be read"),
        (b'{"text": "a\\ud800"}\n', ":1: a string holds a lone surrogate"),
        (b'{"\\udfff": 1, "text": "a"}\n', ":1: key .* holds a lone surrogate"),
        (b"[1, 2]\n", ":1: expected a JSON object, got list"),
        (b'{"text": "a"}\n\n{"text": "' + b"a" * 200 + b'"}\n', ":3: line longer than 100 bytes"),
        (b'{"text": "' + b"a" * 200, ":1: line longer than 100 bytes"),  # no newline at all
    ],
    ids=["utf8", "deep-recursion", "deep", "huge-int", "surrogate", "surrogate-key", "not-object", "long", "no-nl"],
)
def test_jsonl_lines_are_checked(tmp_path, monkeypatch, content, match):
    if "longer" in match:
        monkeypatch.setattr(limits, "MAX_JSONL_LINE_BYTES", 100)
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(TinkerError, match=r"d\.jsonl" + match) as e:
        data.read_jsonl(p)
    one_line(e)


def _checkpoint(tmp_path) -> tuple[Path, dict, torch.optim.Optimizer]:
    params = {"w": torch.nn.Parameter(torch.randn(4, 3)), "b": torch.nn.Parameter(torch.zeros(3))}
    opt = torch.optim.AdamW(list(params.values()), lr=0.1)
    sum(p.sum() for p in params.values()).backward()
    opt.step()
    ckpt = trainer.save_checkpoint(tmp_path / "run", params, opt, trainer.State(step=1, tokens=10), {"identity": "x"})
    return ckpt, params, opt


def test_checkpoints_are_safetensors_never_pickle():
    src = Path(trainer.__file__).read_text()
    assert "torch.load(" not in src and "import pickle" not in src


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda c: (c / "trainable.safetensors").write_bytes((c / "trainable.safetensors").read_bytes()[:40]),
            "unreadable",
        ),
        (lambda c: (c / "optimizer.safetensors").write_bytes(os.urandom(300)), "unreadable"),
        (lambda c: (c / "state.json").write_text("{garbage"), "unreadable"),
        (lambda c: (c / "state.json").write_bytes(b"\xff\xfe"), "unreadable"),
        (lambda c: (c / "state.json").write_text('{"step": "one"}'), "state.json lacks step"),
        (lambda c: (c / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    ],
    ids=["truncated", "garbage", "json", "utf8", "fields", "missing"],
)
def test_damaged_checkpoint_on_resume(tmp_path, damage, match):
    ckpt, params, opt = _checkpoint(tmp_path)
    before = {k: p.detach().clone() for k, p in params.items()}
    damage(ckpt)
    with pytest.raises(TinkerError, match=f"{ckpt.name}: {match}.*damaged.*without --resume") as e:
        trainer.load_checkpoint(ckpt, params, torch.optim.AdamW(list(params.values())))
    one_line(e)
    assert all(torch.equal(before[k], p) for k, p in params.items())  # nothing restored halfway


def test_checkpoint_of_other_shapes_refused(tmp_path):
    ckpt, _, _ = _checkpoint(tmp_path)
    other = {"w": torch.nn.Parameter(torch.randn(5, 3)), "b": torch.nn.Parameter(torch.zeros(3))}
    with pytest.raises(TinkerError, match=r"w is \[4, 3\] in the checkpoint, the model's is \[5, 3\]"):
        trainer.load_checkpoint(ckpt, other, torch.optim.AdamW(list(other.values())))
    _, params, _ = _checkpoint(tmp_path / "ok")
    fresh = torch.optim.AdamW(list(params.values()))
    state, info = trainer.load_checkpoint(ckpt, params, fresh)
    assert state.step == 1 and info["identity"] == "x"


# ---------------------------------------------------------------------------------------------------------------
# Store: symbolic links, rm, atomic replacement, bounded downloads


def test_symlink_out_of_a_pulled_folder_is_refused(tmp_path, store_home):
    d = write_hf_dir(tmp_path / "m")
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to(secret)
    with pytest.raises(TinkerError, match=r"tokenizer\.json: a symbolic link to .*secret\.txt, outside the model") as e:
        store.pull(str(d), "m", progress=False)
    one_line(e)
    assert_store_clean(store_home)


def test_symlinks_of_the_hf_cache_layout_are_copied(tmp_path):
    src = write_hf_dir(tmp_path / "src")
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / sha256(f)
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    m = store.pull(str(snap), "cached", progress=False)
    for f in m.files:
        stored = store.model_path(m) / f["path"]
        assert not stored.is_symlink() and stored.read_bytes() == (src / f["path"]).read_bytes()


def test_rm_unlinks_a_linked_model_and_keeps_its_target(tmp_path, store_home):
    store.pull(str(write_gguf(tmp_path / "a.gguf")), "x", progress=False)
    store.pull(str(write_gguf(tmp_path / "b.gguf")), "y", progress=False)
    # models/x/latest a link to a directory elsewhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(store_home / "models" / "x" / "latest", elsewhere / "latest")
    (store_home / "models" / "x" / "latest").symlink_to(elsewhere / "latest")
    store.rm("x")
    assert (elsewhere / "latest" / "manifest.json").is_file() and store.find("x") is None
    # models/y a link to a NAME directory elsewhere
    shutil.move(store_home / "models" / "y", elsewhere / "y")
    (store_home / "models" / "y").symlink_to(elsewhere / "y")
    assert store.find("y") is not None
    store.rm("y")
    assert (elsewhere / "y" / "latest" / "manifest.json").is_file() and store.find("y") is None
    assert not (store_home / "models" / "y").exists()


def _two_pulls(tmp_path) -> tuple[Path, Path]:
    a = write_gguf(tmp_path / "a.gguf", n_embd=8)
    b = write_gguf(tmp_path / "b.gguf", n_embd=16)
    store.pull(str(a), "m", progress=False)
    return a, b


def test_force_replacement_interrupted_between_renames_keeps_the_old_copy(tmp_path, monkeypatch):
    from tinkerlm.store import staging

    a, b = _two_pulls(tmp_path)
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 3:  # manifest.tmp -> manifest, final -> old, then the new copy in: Ctrl-C lands here
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(staging.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        store.pull(str(b), "m", force=True, progress=False)
    monkeypatch.setattr(staging.os, "rename", real)
    assert sha256(store.model_path(store.get("m"))) == sha256(a)


KILL_BETWEEN_RENAMES = """
import os, sys
from tinkerlm import store
from tinkerlm.store import staging
real, n = os.rename, [0]
def rename(src, dst):
    n[0] += 1
    real(src, dst)
    if n[0] == 2:  # the old copy has just been renamed aside: die before the new one goes in
        os._exit(9)
staging.os.rename = rename
store.pull(sys.argv[1], "m", force=True, progress=False)
"""


def test_force_replacement_killed_between_renames_keeps_the_old_copy(tmp_path, store_home):
    a, b = _two_pulls(tmp_path)
    script = tmp_path / "kill.py"
    script.write_text(KILL_BETWEEN_RENAMES)
    env = {**os.environ, "TINKERLM_HOME": str(store_home), "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, str(script), str(b)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert not (store_home / "models" / "m" / "latest").exists()  # killed with the old copy aside
    m = store.get("m")  # the next look at the store puts it back
    assert sha256(store.model_path(m)) == sha256(a)
    assert [x.name for x in store.list_models()] == ["m"]
    # and a later pull cleans the dead process's tmp dir
    store.pull(str(b), "m", force=True, progress=False)
    assert sha256(store.model_path(store.get("m"))) == sha256(b)
    assert not any((store_home / "tmp").iterdir())


def test_hub_download_stops_at_the_listed_size(hub, store_home):  # noqa: F811 (hub: the fixture)
    name = "gguf/Tiny.Q8_0.gguf"
    listed = len(hub.repos["org/tiny-gguf"].files[name])
    hub.flood[name] = 300 << 20
    t = time.perf_counter()
    with pytest.raises(TinkerError, match=f"sent more than the {listed:,} bytes the Hub lists") as e:
        store.pull("hf:org/tiny-gguf", progress=False)
    one_line(e)
    assert time.perf_counter() - t < 30
    assert hub.sent[name] < 64 << 20, hub.sent[name]  # the client hung up long before 300 MB
    assert_store_clean(store_home)


def test_hub_listing_without_a_size_is_refused(hub, store_home, monkeypatch):  # noqa: F811
    from huggingface_hub import HfApi

    real = HfApi.model_info

    def no_sizes(self, *a, **k):
        info = real(self, *a, **k)
        for s in info.siblings:
            s.size, s.lfs = "lots", None
        return info

    monkeypatch.setattr(HfApi, "model_info", no_sizes)
    with pytest.raises(TinkerError, match="lists no valid size for gguf/Tiny.Q8_0.gguf"):
        store.pull("hf:org/tiny-gguf", progress=False)
    assert_store_clean(store_home)


# ---------------------------------------------------------------------------------------------------------------
# Through the CLI: exit 2 and one line, no traceback


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "{bomb}", "--out", "x"],
        ["finetune", "-c", "{bomb}"],
        ["finetune", "smollm2", "--data", "d.jsonl", "--out", "o", "--lora-rank", "1000000000"],
        ["finetune", "smollm2", "--data", "d.jsonl", "--out", "o", "--threads", "-5"],
        ["merge", "{weights}", "--out", "x"],
    ],
    ids=["merge-bomb", "finetune-bomb", "lora-rank", "threads", "merge-weight"],
)
def test_cli_exit_2_with_one_line(tmp_path, capsys, argv):
    from tinkerlm import cli

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    weights = tmp_path / "w.yaml"
    weights.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1e308}\n")
    argv = [x.format(bomb=bomb, weights=weights) for x in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinkerlm: error: "), err
