"""Parity with mergekit: the same recipe on the same tiny random Llama models gives the same merged tensors.

mergekit (the `mergekit` extra: `pip install -e '.[mergekit]'`) runs through its `mergekit-yaml` command, every
recipe in one subprocess (its imports take seconds); tinkerlm runs the same recipe with the models' store names
in place of their directories. Every deterministic method both support is compared; DARE's random drops draw from
different generators, so DARE is compared at density 1 (its known answers are in test_merge.py).
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny import make_hf_model

from tinkerlm import store
from tinkerlm.merge import merge

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None,
    reason="mergekit is not installed (pip install -e '.[mergekit]'; scripts/test.sh does)",
)

MODELS = ("a", "b", "c")

RECIPES = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "a", "parameters": {"weight": 0.3}},
            {"model": "b", "parameters": {"weight": 0.5}},
            {"model": "c", "parameters": {"weight": 0.4}},
        ],
    },
    "linear_raw": {
        "merge_method": "linear",
        "parameters": {"normalize": False},
        "models": [
            {"model": "a", "parameters": {"weight": 0.3}},
            {"model": "b", "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.2}]}},
        ],
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "a",
        "parameters": {"t": 0.3},
        "models": [{"model": "a"}, {"model": "b"}],
    },
    "slerp_gradient": {
        "merge_method": "slerp",
        "base_model": "b",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 3]}, {"model": "b", "layer_range": [0, 3]}]}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "a",
        "parameters": {"lambda": 0.8},
        "models": [{"model": "b", "parameters": {"weight": 0.7}}, {"model": "c", "parameters": {"weight": [0.2, 1.0]}}],
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "a",
        "parameters": {"normalize": True, "int8_mask": True},
        "models": [
            {"model": "a"},
            {"model": "b", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "c", "parameters": {"weight": 0.5, "density": 0.3}},
        ],
    },
    "ties_raw": {
        "merge_method": "ties",
        "base_model": "a",
        "parameters": {"normalize": False, "lambda": 1.3},
        "models": [
            {"model": "b", "parameters": {"weight": 1.0, "density": 0.7}},
            {"model": "c", "parameters": {"weight": -0.4, "density": 1.0}},
        ],
    },
    "dare_linear": {
        "merge_method": "dare_linear",
        "base_model": "a",
        "models": [
            {"model": "b", "parameters": {"weight": 0.6, "density": 1.0}},
            {"model": "c", "parameters": {"weight": 0.4, "density": 1.0}},
        ],
    },
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": "a",
        "models": [
            {"model": "b", "parameters": {"weight": 0.6, "density": 1.0}},
            {"model": "c", "parameters": {"weight": 0.4, "density": 1.0}},
        ],
    },
    "passthrough": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}]},
            {
                "sources": [{"model": "b", "layer_range": [1, 3]}],
                "parameters": {
                    "scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]
                },
            },
            {"sources": [{"model": "c", "layer_range": [2, 3]}]},
        ],
    },
    "lora": {
        "merge_method": "linear",
        "models": [{"model": "a+lora", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.5}}],
    },
}

# Runs each (recipe, output) pair through mergekit-yaml's own click command in one process.
DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
args = sys.argv[1:]
for cfg, out in zip(args[0::2], args[1::2]):
    main([cfg, out, "--lora-merge-cache", out + "-lora-cache", "--quiet"], standalone_mode=False)
"""


def _with_paths(recipe, paths: dict[str, str]):
    """The recipe with each model name replaced by its directory (what mergekit reads)."""
    if isinstance(recipe, dict):
        return {
            k: (_with_paths(v, paths) if k not in ("model", "base_model") else "+".join(paths[p] for p in v.split("+")))
            for k, v in recipe.items()
        }
    if isinstance(recipe, list):
        return [_with_paths(x, paths) for x in recipe]
    return recipe


def _adapter(path, base: dict, rank=4, alpha=8.0):
    """A peft LoRA adapter for q/v/down projections of `base`."""
    g = torch.Generator().manual_seed(9)
    tensors = {}
    for key, w in base.items():
        module = key.removesuffix(".weight")
        if module.endswith(("q_proj", "v_proj", "down_proj")):
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.1
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three-layer tiny Llamas a, b, c and a LoRA adapter for a, on disk; each recipe as mergekit reads it."""
    root = tmp_path_factory.mktemp("mergekit")
    paths = {}
    for i, name in enumerate(MODELS):
        _make_llama(root / name, seed=i)
        paths[name] = str(root / name)
    paths["lora"] = str(root / "lora")
    _adapter(root / "lora", load_file(root / "a" / "model.safetensors"))
    args = []
    for key, recipe in RECIPES.items():
        cfg = root / f"{key}.yaml"
        cfg.write_text(yaml.safe_dump({**_with_paths(recipe, paths), "dtype": "float32"}))
        args += [str(cfg), str(root / f"out-{key}")]
    return root, paths, args


def _make_llama(path, seed):
    """tests/tiny.py's Llama with three layers, so gradients and slices have an interior layer."""
    import tiny

    tiny.CONFIGS["llama-3layers"] = (tiny.CONFIGS["llama"][0], {**tiny.CONFIGS["llama"][1], "num_hidden_layers": 3})
    try:
        make_hf_model("llama-3layers", path, seed=seed)
    finally:
        del tiny.CONFIGS["llama-3layers"]


@pytest.fixture(scope="module")
def mergekit_outputs(inputs):
    root, _, args = inputs
    r = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.mark.parametrize("key", list(RECIPES))
def test_same_tensors_as_mergekit(inputs, mergekit_outputs, key):
    root, paths, _ = inputs
    for name in MODELS:
        store.pull(paths[name], name=name, progress=False)

    def copy_adapter(d):
        for f in (root / "lora").iterdir():
            (d / f.name).write_bytes(f.read_bytes())

    store.add("lora", copy_adapter, source={"type": "test"}, parents=[], license="mit")
    m = merge({**RECIPES[key], "dtype": "float32"}, "merged", progress=False)
    ours = load_file(store.model_path(m) / "model.safetensors")
    theirs = {}
    for f in sorted((root / f"out-{key}").glob("*.safetensors")):
        theirs |= load_file(f)
    assert ours.keys() == theirs.keys(), sorted(ours.keys() ^ theirs.keys())[:5]
    for name, t in ours.items():
        diff = (t - theirs[name]).abs().max().item()
        assert diff <= 1e-6, f"{name} differs from mergekit's by {diff:.3g}"
    cfg = json.loads((root / f"out-{key}" / "config.json").read_text())
    ours_cfg = json.loads((store.model_path(m) / "config.json").read_text())
    assert ours_cfg["num_hidden_layers"] == cfg["num_hidden_layers"]
