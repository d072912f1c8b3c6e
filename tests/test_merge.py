"""`tinkerlm merge`: known answers for every method, recipes as mergekit writes them, LoRA and GGUF inputs, lineage
and licences, the streaming safetensors writer, and clear errors that leave nothing in the store.

Models are tiny random checkpoints built here (tests/tiny.py) and pulled into the per-test store.
"""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import make_hf_model

from tinkerlm import cli, store
from tinkerlm.errors import TinkerError
from tinkerlm.formats.hf import SafetensorsWriter, save_config
from tinkerlm.merge import merge
from tinkerlm.merge.methods import METHODS, linear, slerp
from tinkerlm.merge.recipe import evaluate


def stored(tmp_path, name, kind="llama", seed=0, licence=None):
    """A tiny random model of `kind` pulled into the store as `name`; returns its tensors."""
    d = tmp_path / "src" / name
    make_hf_model(kind, d, seed=seed)
    if licence:
        (d / "README.md").write_text(f"---\nlicense: {licence}\n---\n# {name}\n")
    store.pull(str(d), name=name, progress=False)
    return load_file(d / "model.safetensors")


def weights(m) -> dict[str, torch.Tensor]:
    return load_file(store.model_path(m) / "model.safetensors")


def nothing_stored(expected: set[str]) -> bool:
    """Only the inputs are in the store and no tmp directory is left behind."""
    tmp = store.home() / "tmp"
    return {m.name for m in store.list_models()} == expected and (not tmp.exists() or not any(tmp.iterdir()))


@pytest.fixture
def ab(tmp_path):
    return stored(tmp_path, "a", seed=0), stored(tmp_path, "b", seed=1)


def two(method, pa=None, pb=None, **top):
    return {
        "merge_method": method,
        "models": [{"model": "a", "parameters": pa or {}}, {"model": "b", "parameters": pb or {}}],
        **top,
    }


# ---------------------------------------------------------------------------------------------------------------
# Known answers


def test_linear_weights_one_zero_is_a(ab):
    a, _ = ab
    out = weights(merge(two("linear", {"weight": 1.0}, {"weight": 0.0}), "m", progress=False))
    assert out.keys() == a.keys()
    for k in a:
        assert torch.equal(out[k], a[k]), k


def test_linear_normalize(ab):
    a, b = ab
    out = weights(merge(two("linear", {"weight": 1.0}, {"weight": 3.0}), "n", progress=False))
    raw = weights(
        merge(two("linear", {"weight": 1.0}, {"weight": 3.0}, parameters={"normalize": False}), "r", progress=False)
    )
    k = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(out[k], (a[k] + 3 * b[k]) / 4)
    torch.testing.assert_close(raw[k], a[k] + 3 * b[k])


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_endpoints(ab, t):
    a, b = ab
    recipe = two("slerp", base_model="a", parameters={"t": t})
    out = weights(merge(recipe, f"s{int(t)}", progress=False))
    want = a if t == 0 else b
    for k in a:
        torch.testing.assert_close(out[k], want[k], rtol=0, atol=1e-6)


def test_slerp_half_keeps_norm_geometry():
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(64, 32, generator=g)
    v1 = torch.randn(64, 32, generator=g)
    v1 *= v0.norm() / v1.norm()  # equal norms: the arc stays on that sphere
    mid = slerp(0.5, v0, v1)
    torch.testing.assert_close(mid.norm(), v0.norm())
    assert mid.norm() > (0.5 * (v0 + v1)).norm()  # linear interpolation cuts the chord inside the sphere
    cos = lambda x, y: torch.dot(x.flatten(), y.flatten()) / (x.norm() * y.norm())  # noqa: E731
    torch.testing.assert_close(cos(mid, v0), cos(mid, v1))  # halfway along the arc
    theta = torch.acos(cos(v0, v1))
    torch.testing.assert_close(torch.acos(cos(mid, v0)), theta / 2)


def test_slerp_colinear_falls_back_to_linear():
    v0 = torch.randn(10)
    torch.testing.assert_close(slerp(0.3, v0, 2 * v0), 0.7 * v0 + 0.3 * 2 * v0)
    torch.testing.assert_close(slerp(0.3, torch.zeros(10), torch.zeros(10)), torch.zeros(10))


def _task(method, tensors, base, shared, per_input, seed=None):
    m = METHODS[method]
    full = {p.name: p.default for p in m.params if p.scope == "shared"} | shared
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return m.fn([t.clone() for t in tensors], base, full, per_input, gen)  # methods may overwrite their inputs


def test_ties_density_one_without_sign_conflict_is_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 8, generator=g)
    d1 = torch.rand(16, 8, generator=g) + 0.1
    d2 = torch.rand(16, 8, generator=g) + 0.1
    sign = torch.where(torch.rand(16, 8, generator=g) > 0.5, 1.0, -1.0)  # same sign in both task vectors
    xs = [base, base + sign * d1, base + sign * d2]
    per = [{}, {"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}]
    ta = _task("task_arithmetic", xs, 0, {}, per)
    torch.testing.assert_close(ta, base + 0.6 * sign * d1 + 0.4 * sign * d2)
    torch.testing.assert_close(_task("ties", xs, 0, {"normalize": False}, per), ta)
    torch.testing.assert_close(_task("ties", xs, 0, {}, per), ta)  # weights sum to 1: normalize changes nothing


def test_ties_trims_and_elects_signs():
    base = torch.zeros(4)
    x1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    x2 = torch.tensor([-1.0, -2.0, 4.0, 0.1])
    per = [{}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    out = _task("ties", [base, x1, x2], 0, {}, per)
    # trimmed: x1 -> [3, 0, 0, 2], x2 -> [0, -2, 4, 0]; every entry has one voter, so normalize leaves it whole
    torch.testing.assert_close(out, torch.tensor([3.0, -2.0, 4.0, 2.0]))
    x2 = torch.tensor([-4.0, 0.0, 0.0, 1.0])  # entry 0: +3 vs -4 -> the negative wins, +3 is dropped
    per = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    torch.testing.assert_close(_task("ties", [base, x1, x2], 0, {}, per), torch.tensor([-4.0, -1.0, 0.5, 1.5]))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drop_rate_zero_is_task_arithmetic(method):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(32, 8, generator=g)
    xs = [base, base + torch.rand(32, 8, generator=g), base + torch.rand(32, 8, generator=g)]  # no sign conflicts
    per = [{}, {"weight": 0.5, "density": 1.0}, {"weight": 0.7, "density": 1.0}]
    torch.testing.assert_close(_task(method, xs, 0, {}, per, seed=3), _task("task_arithmetic", xs, 0, {}, per))


def test_dare_drops_and_rescales_to_the_l1_norm():
    base = torch.zeros(10000)
    x = torch.ones(10000)
    out = _task("dare_linear", [base, x], 0, {}, [{}, {"weight": 1.0, "density": 0.3}], seed=0)
    kept = out != 0
    assert 0.25 < kept.float().mean() < 0.35
    torch.testing.assert_close(out.abs().sum(), x.sum())  # rescaled to the task vector's L1 norm
    plain = _task("dare_linear", [base, x], 0, {"rescale": False}, [{}, {"weight": 1.0, "density": 0.3}], seed=0)
    assert torch.equal(plain != 0, kept) and plain[kept].eq(1).all()


def test_seeded_dare_is_reproducible(ab):
    recipe = two(
        "dare_ties", {"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.5}, base_model="a", random_seed=7
    )
    m1, m2 = merge(recipe, "d1", progress=False), merge(recipe, "d2", progress=False)
    sha = lambda m: next(f["sha256"] for f in m.files if f["path"] == "model.safetensors")  # noqa: E731
    assert sha(m1) == sha(m2)  # the same bytes
    m3 = merge({**recipe, "random_seed": 8}, "d3", progress=False)
    k = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(weights(m1)[k], weights(m3)[k])
    # Without a seed one is drawn and recorded, so the merge can be repeated from its manifest.
    del recipe["random_seed"]
    m4 = merge(recipe, "d4", progress=False, random_seed=None)
    seed = m4.source["recipe"]["random_seed"]
    m5 = merge({**recipe, "random_seed": seed}, "d5", progress=False)
    assert torch.equal(weights(m4)[k], weights(m5)[k])


def test_passthrough_slices_stack_layers(ab):
    a, b = ab
    recipe = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}]},
            {"sources": [{"model": "b", "layer_range": [1, 2]}]},
        ],
    }
    m = merge(recipe, "frank", progress=False)
    out = weights(m)
    cfg = json.loads((store.model_path(m) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    assert sorted({k.split(".")[2] for k in out if k.startswith("model.layers.")}) == ["0", "1", "2"]
    for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(out[f"model.layers.0.{suffix}"], a[f"model.layers.0.{suffix}"])
        assert torch.equal(out[f"model.layers.1.{suffix}"], a[f"model.layers.1.{suffix}"])
        assert torch.equal(out[f"model.layers.2.{suffix}"], b[f"model.layers.1.{suffix}"])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice's
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])  # last slice's
    import tinkerlm

    llm = tinkerlm.load("frank", pull=False)
    assert len(llm.model.model.layers) == 3
    assert isinstance(llm.generate("hi", max_tokens=3), str)


def test_passthrough_scale_with_a_filter(ab):
    a, _ = ab
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {
                "sources": [{"model": "a", "layer_range": [0, 2]}],
                "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]},
            }
        ],
    }
    out = weights(merge(recipe, "scaled", progress=False))
    assert out["model.layers.1.self_attn.o_proj.weight"].abs().max() == 0
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])


def test_parameter_values_filters_and_gradients():
    assert evaluate(0.5, "x", 0.3, float, "w") == 0.5
    assert evaluate("1e-3", "x", 0.0, float, "w") == 0.001  # YAML 1.1 reads 1e-3 as a string
    grad = [0, 0.5, 0.3, 0.7, 1]
    assert evaluate(grad, "x", 0.0, float, "w") == 0
    assert evaluate(grad, "x", 1.0, float, "w") == 1
    assert evaluate(grad, "x", 0.5, float, "w") == pytest.approx(0.3)
    assert evaluate(grad, "x", 0.375, float, "w") == pytest.approx(0.4)  # halfway between 0.5 and 0.3
    conds = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.5}]
    assert evaluate(conds, "model.layers.3.self_attn.q_proj.weight", 0.25, float, "w") == 0.25
    assert evaluate(conds, "model.layers.3.mlp.up_proj.weight", 0.25, float, "w") == 0.75
    assert evaluate(conds, "model.norm.weight", 0.25, float, "w") == 0.5
    assert evaluate([{"filter": "mlp", "value": 1}], "model.norm.weight", 0, float, "w") is None
    assert evaluate([True, False], "x", 0.9, bool, "w") is True  # non-numeric lists step


def test_slerp_t_gradient_across_layers(ab):
    a, b = ab
    recipe = two(
        "slerp",
        base_model="a",
        parameters={
            "t": [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.5}]
        },
    )
    out = weights(merge(recipe, "grad", progress=False))
    close = lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=1e-6)  # noqa: E731
    close(out["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])  # t=0
    close(out["model.layers.1.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])  # t=1
    close(out["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    close(out["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    k = "model.layers.1.input_layernorm.weight"
    close(out[k], slerp(0.5, a[k], b[k]))


def test_task_arithmetic_and_ties_through_the_store(tmp_path, ab):
    a, b = ab
    c = stored(tmp_path, "c", seed=2)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "a",
        "parameters": {"lambda": 0.5},
        "models": [{"model": "b", "parameters": {"weight": 1.0}}, {"model": "c", "parameters": {"weight": 2.0}}],
    }
    out = weights(merge(recipe, "ta", progress=False))
    k = "model.layers.0.self_attn.v_proj.weight"
    torch.testing.assert_close(out[k], a[k] + 0.5 * ((b[k] - a[k]) + 2 * (c[k] - a[k])))
    m = merge({**recipe, "merge_method": "ties", "parameters": {"density": 0.4}}, "ties", progress=False)
    assert weights(m)[k].shape == a[k].shape and not torch.equal(weights(m)[k], out[k])


@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "dare_ties"])
def test_streaming_holds_one_weight_per_input(tmp_path, ab, monkeypatch, method):
    """At every read, the tensors read before are gone: memory never holds more than one weight per input."""
    import weakref

    from tinkerlm.merge.sources import HFSource

    stored(tmp_path, "c", seed=2)
    alive, most, read = set(), [0], HFSource.tensor

    def tracked(self, name):
        t = read(self, name)
        key = object()
        alive.add(key)
        weakref.finalize(t, alive.discard, key)
        most[0] = max(most[0], len(alive))
        return t

    monkeypatch.setattr(HFSource, "tensor", tracked)
    params = {"weight": 0.5, "density": 0.5}
    recipe = {
        "merge_method": method,
        "models": [{"model": "a", "parameters": params}, {"model": "b", "parameters": params}],
        "parameters": {"t": 0.3},
    }
    if method != "slerp":
        recipe["models"].append({"model": "c", "parameters": params})
    if method != "linear":
        recipe["base_model"] = "a"
    merge(recipe, "streamed", progress=False, random_seed=0)
    assert most[0] == len(recipe["models"])


# ---------------------------------------------------------------------------------------------------------------
# Inputs: tied heads, LoRA adapters, GGUF files


def test_tied_models_keep_one_embedding(tmp_path):
    stored(tmp_path, "q1", kind="qwen2", seed=0)
    stored(tmp_path, "q2", kind="qwen2", seed=1)
    m = merge(
        {
            "merge_method": "linear",
            "models": [{"model": "q1", "parameters": {"weight": 1}}, {"model": "q2", "parameters": {"weight": 1}}],
        },
        "q",
        progress=False,
    )
    assert "lm_head.weight" not in weights(m) and "model.layers.0.self_attn.q_proj.bias" in weights(m)
    import tinkerlm

    assert isinstance(tinkerlm.load("q", pull=False).generate("hi", max_tokens=2), str)


def _store_adapter(tmp_path, name, base_tensors, targets=("q_proj", "v_proj"), rank=2, alpha=4.0):
    g = torch.Generator().manual_seed(5)
    tensors, deltas = {}, {}
    for key, w in base_tensors.items():
        module = key.removesuffix(".weight")
        if module.rpartition(".")[2] in targets:
            A = torch.randn(rank, w.shape[1], generator=g)
            B = torch.randn(w.shape[0], rank, generator=g)
            tensors[f"base_model.model.{module}.lora_A.weight"] = A
            tensors[f"base_model.model.{module}.lora_B.weight"] = B
            deltas[key] = (alpha / rank) * B @ A
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "a",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
    }

    def fill(d):
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(json.dumps(config))

    store.add(name, fill, source={"type": "test"}, parents=[], license="mit")
    return deltas


def test_lora_adapter_fused_on_the_fly(tmp_path, ab):
    a, b = ab
    deltas = _store_adapter(tmp_path, "ad", a)
    m = merge(
        {
            "merge_method": "linear",
            "models": [{"model": "a+ad", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 0.0}}],
        },
        "fused",
        progress=False,
    )
    out = weights(m)
    for k in a:
        want = a[k] + deltas[k] if k in deltas else a[k]
        torch.testing.assert_close(out[k], want, rtol=0, atol=1e-5)
    assert {(p["name"], p["relation"]) for p in m.parents} == {
        ("a:latest", "merge-input"),
        ("ad:latest", "adapter"),
        ("b:latest", "merge-input"),
    }
    with pytest.raises(TinkerError, match="is a LoRA adapter, not a model; fuse it .* writing a\\+ad"):
        merge({"merge_method": "passthrough", "models": [{"model": "ad"}]}, "x", progress=False)
    with pytest.raises(TinkerError, match="not a LoRA adapter"):
        merge({"merge_method": "passthrough", "models": [{"model": "a+b"}]}, "x", progress=False)


def test_bf16_inputs_are_read_in_steps(tmp_path, monkeypatch):
    import tinkerlm.merge.sources as sources

    d = tmp_path / "src" / "h"
    make_hf_model("llama", d, seed=3)
    half = {k: v.bfloat16() for k, v in load_file(d / "model.safetensors").items()}
    save_file(half, str(d / "model.safetensors"), metadata={"format": "pt"})
    store.pull(str(d), name="h", progress=False)
    monkeypatch.setattr(sources, "_STEP", 100)  # many steps per tensor, one ending mid-way
    out = weights(
        merge({"merge_method": "passthrough", "models": [{"model": "h"}], "dtype": "float32"}, "hf32", progress=False)
    )
    for k, v in half.items():
        assert out[k].dtype == torch.float32 and torch.equal(out[k], v.float()), k
    default = weights(merge({"merge_method": "passthrough", "models": [{"model": "h"}]}, "hbf", progress=False))
    assert all(v.dtype == torch.bfloat16 for v in default.values())  # no dtype: the inputs' dtype


def test_gguf_inputs_are_dequantized_and_renamed(tmp_path):
    from ggufwriter import write_gguf
    from test_gguf import gpt2_weights, llama_weights

    wa = llama_weights(np.random.default_rng(0))
    wb = llama_weights(np.random.default_rng(1))
    for name, w in (("ga", wa), ("gb", wb)):
        write_gguf(tmp_path / f"{name}.gguf", "llama", w)
        store.pull(str(tmp_path / f"{name}.gguf"), name=name, progress=False)
    m = merge(
        {
            "merge_method": "linear",
            "models": [
                {"model": "ga", "parameters": {"weight": 0.25}},
                {"model": "gb", "parameters": {"weight": 0.75}},
            ],
        },
        "g",
        progress=False,
    )
    out = weights(m)
    assert out.keys() == wa.keys()
    for k in wa:  # HF names and layout: q/k rows un-permuted
        torch.testing.assert_close(out[k], torch.from_numpy(0.25 * wa[k] + 0.75 * wb[k]))
    cfg = json.loads((store.model_path(m) / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    import tinkerlm

    assert isinstance(tinkerlm.load("g", pull=False).generate("he", max_tokens=2), str)  # GGUF tokenizer saved as HF

    wg = gpt2_weights(np.random.default_rng(2))
    write_gguf(tmp_path / "g2.gguf", "gpt2", wg, meta={"attention.layer_norm_epsilon": 1e-5})
    store.pull(str(tmp_path / "g2.gguf"), name="g2", progress=False)
    out = weights(merge({"merge_method": "passthrough", "models": [{"model": "g2"}]}, "g2copy", progress=False))
    k = "transformer.h.1.attn.c_attn.weight"
    assert torch.equal(out[k], torch.from_numpy(wg[k]).t())  # back in HF's Conv1D (in, out) layout
    assert isinstance(tinkerlm.load("g2copy", pull=False).generate("he", max_tokens=2), str)


# ---------------------------------------------------------------------------------------------------------------
# Output: lineage, licence, tokenizer, CLI


def test_lineage_licence_and_tokenizer(tmp_path, caplog):
    stored(tmp_path, "a", seed=0, licence="apache-2.0")
    stored(tmp_path, "b", seed=1, licence="cc-by-nc-4.0")
    recipe = two("slerp", base_model="a", parameters={"t": 0.5})
    with caplog.at_level("WARNING"):
        m = merge(recipe, "kid:v1", progress=False)
    assert m.ref == "kid:v1" and m.format == "hf" and m.architecture == "llama"
    assert m.source["type"] == "merge" and m.source["method"] == "slerp"
    assert m.source["recipe"]["parameters"] == {"t": 0.5} and m.source["recipe"]["dtype"] == "float32"
    by_name = {p["name"]: p for p in m.parents}
    assert by_name["a:latest"]["relation"] == "base" and by_name["b:latest"]["relation"] == "merge-input"
    for p in m.parents:
        assert p["sha256"] == store.digest(store.get(p["name"]))
    assert m.license == "apache-2.0 AND cc-by-nc-4.0"
    assert "cc-by-nc-4.0: no commercial use" in m.obligations and m.licence_conflicts == []
    assert store.get("kid:v1").obligations == m.obligations
    assert "non-commercial" in caplog.text and "differ" in caplog.text
    d = store.model_path(m)
    assert "license: apache-2.0 AND cc-by-nc-4.0" in (d / "README.md").read_text()
    assert "merge_method: slerp" in (d / "mergekit_config.yml").read_text()
    from tinkerlm.formats.tokenizer import Tokenizer

    tok, base_tok = Tokenizer.from_hf_dir(d), Tokenizer.from_hf_dir(tmp_path / "src" / "a")
    assert tok.chat_template == base_tok.chat_template and tok.encode("héllo") == base_tok.encode("héllo")
    assert store.find("kid:v1") == m


# ---------------------------------------------------------------------------------------------------------------
# Inputs named as mergekit names them: local paths and Hub ids, imported into the store on the fly


def test_recipe_naming_local_paths_imports_them(tmp_path, ab, monkeypatch, capsys):
    a, _ = ab
    x = tmp_path / "work" / "x"
    make_hf_model("llama", x, seed=2)
    other_a = tmp_path / "work" / "a"  # named like the stored model a, but another model
    make_hf_model("llama", other_a, seed=3)
    monkeypatch.chdir(tmp_path / "work")
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": "a", "parameters": {"weight": 1.0}},
            {"model": "./x", "parameters": {"weight": 0.0}},
            {"model": str(other_a), "parameters": {"weight": 0.0}},
        ],
    }
    m = merge(recipe, "mixed", progress=False)
    err = capsys.readouterr().err
    assert "merge: imported ./x into the store as x:latest" in err
    assert f"merge: imported {other_a} into the store as a-2:latest" in err
    xm, am = store.get("x"), store.get("a-2")
    assert xm.source == {"type": "local", "uri": str(x.resolve())}
    assert am.source == {"type": "local", "uri": str(other_a.resolve())}
    files = {f["path"]: f["sha256"] for f in xm.files}
    assert files["model.safetensors"] == store.sha256_file(x / "model.safetensors")
    by_name = {p["name"]: p for p in m.parents}
    assert set(by_name) == {"a:latest", "x:latest", "a-2:latest"}
    assert by_name["x:latest"] == {
        "name": "x:latest",
        "sha256": store.digest(xm),
        "relation": "merge-input",
        "license": None,
    }
    assert by_name["a-2:latest"]["sha256"] == store.digest(am)
    assert weights(m).keys() == a.keys()
    for k in a:
        assert torch.equal(weights(m)[k], a[k]), k
    # Named again, the imported models are reused: nothing is copied or announced.
    merge(recipe, "mixed2", progress=False)
    assert "imported" not in capsys.readouterr().err
    assert {mm.name for mm in store.list_models()} == {"a", "b", "x", "a-2", "mixed", "mixed2"}


def test_recipe_naming_a_hub_id_pulls_it(tmp_path, ab, monkeypatch, capsys):
    from hubserver import HubServer, Repo

    a, _ = ab
    src = tmp_path / "hubsrc"
    make_hf_model("llama", src, seed=2)
    repos = {"org/tiny-b": Repo({p.name: p.read_bytes() for p in src.iterdir()})}
    with HubServer(repos=repos) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        recipe = {
            "merge_method": "slerp",
            "base_model": "a",
            "parameters": {"t": 0.0},
            "models": [{"model": "a"}, {"model": "org/tiny-b"}],
        }
        m = merge(recipe, "hubmix", progress=False)
        assert "merge: imported org/tiny-b into the store as tiny-b:latest" in capsys.readouterr().err
        b = store.get("tiny-b")
        assert b.source["type"] == "hf" and b.source["repo"] == "org/tiny-b"
        assert b.source["revision"] == repos["org/tiny-b"].sha
        by_name = {p["name"]: p for p in m.parents}
        assert by_name["tiny-b:latest"]["sha256"] == store.digest(b)
        assert by_name["tiny-b:latest"]["relation"] == "merge-input"
        for k in a:
            assert torch.equal(weights(m)[k], a[k]), k
        # hf:ORG/REPO names the same pull; no second download.
        n = len(hub.requests)
        merge({**recipe, "models": [{"model": "a"}, {"model": "hf:org/tiny-b"}]}, "hubmix2", progress=False)
        assert len(hub.requests) == n and "imported" not in capsys.readouterr().err
        with pytest.raises(TinkerError, match=r"hf:org/nope: cannot read the repo"):
            merge({**recipe, "models": [{"model": "a"}, {"model": "org/nope"}]}, "bad", progress=False)
    assert nothing_stored({"a", "b", "tiny-b", "hubmix", "hubmix2"})


def test_recipe_chat_template_replaces_the_base(ab):
    m = merge(
        two("linear", {"weight": 1}, {"weight": 1}, chat_template="{{ messages[0]['content'] }}"), "ct", progress=False
    )
    from tinkerlm.formats.tokenizer import Tokenizer

    assert Tokenizer.from_hf_dir(store.model_path(m)).chat_template == "{{ messages[0]['content'] }}"


def test_cli_merge_then_run(tmp_path, ab, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("""\
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
      - model: b
        layer_range: [0, 2]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""")
    assert cli.main(["merge", str(recipe), "--out", "merged"]) == 0
    out = capsys.readouterr().out
    assert "merged:latest" in out and "slerp" in out and "licence:" in out
    assert all(t.dtype == torch.bfloat16 for t in weights(store.get("merged")).values())
    assert cli.main(["run", "merged", "hello", "--max-tokens", "3"]) == 0
    assert cli.main(["merge", str(recipe), "--out", "merged"]) == 2  # taken
    assert "already in the store" in capsys.readouterr().err
    assert cli.main(["merge", str(recipe), "--out", "merged", "--force"]) == 0


# ---------------------------------------------------------------------------------------------------------------
# Errors: one clear line, nothing stored


@pytest.mark.parametrize(
    "recipe,match",
    [
        (two("frankenstein"), "merge_method 'frankenstein' is unknown; tinkerlm merges with: dare_linear"),
        (two("model_stock"), "a mergekit method tinkerlm does not implement"),
        ({"models": [{"model": "a"}]}, "merge_method is missing"),
        (two("ties", {"weight": 1}, {"weight": 1}), "ties needs base_model"),
        (two("slerp", base_model="a"), "parameter t is missing"),
        (two("linear", {"weight": 1}), "parameter weight is missing for b"),
        (two("linear", {"weight": 1}, {"weight": -1}), "sum to 0"),
        (two("ties", {"weight": 1}, {"weight": 1, "density": 1.5}, base_model="a"), "density 1.5 for b .* outside"),
        (two("slerp", base_model="c", parameters={"t": 0.5}), "'c' \\(c:latest\\) is not in the store"),
        (
            {"merge_method": "passthrough", "models": [{"model": "./somewhere/a"}]},
            r"\./somewhere/a: no such file or directory",
        ),
        ({**two("linear"), "merge_metod": "linear"}, "unknown key 'merge_metod'; did you mean 'merge_method'"),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "a"}],
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}],
            },
            "models: .* or slices:",
        ),
        (
            {"merge_method": "passthrough", "models": [{"model": "a"}, {"model": "b"}]},
            "passthrough takes exactly 1 input",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 3]}]}]},
            "goes past its 2 layers",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "parameters": {"t": 0.5},
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 1]}]}],
            },
            "different numbers of layers",
        ),
        (two("linear", {"weight": 1}, {"weight": 1}, dtype="float8"), "dtype: 'float8' is not one of"),
        (two("linear", {"weight": {"filter": 3, "value": 1}}), "filter must be a string"),
        (two("linear", {"weight": 1}, {"weight": 1}, tokenizer_source="union"), "tokenizer_source: 'union'"),
    ],
)
def test_bad_recipes(ab, recipe, match):
    with pytest.raises(TinkerError, match=match):
        merge(recipe, "bad", progress=False)
    assert nothing_stored({"a", "b"})


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("merge_method: linear\nmodels: [\n")
    with pytest.raises(TinkerError, match="r.yaml: not valid YAML at line"):
        merge(bad, "x", progress=False)
    with pytest.raises(TinkerError, match="no such recipe file"):
        merge(tmp_path / "nope.yaml", "x", progress=False)


def two_named(x, y):
    return {
        "merge_method": "linear",
        "models": [{"model": x, "parameters": {"weight": 1}}, {"model": y, "parameters": {"weight": 1}}],
    }


@pytest.mark.parametrize(
    "kind,match",
    [
        ("qwen2", "architectures differ: a \\(a:latest\\) is llama, z \\(z:latest\\) is qwen2"),
        (
            "llama-headdim",
            "tensor model.layers.0.self_attn.o_proj.weight is \\[64, 64\\] in a .* but \\[64, 128\\] in z",
        ),
        ("mistral-window", "architectures differ"),
    ],
)
def test_mismatched_models(tmp_path, kind, match):
    stored(tmp_path, "a", seed=0)
    stored(tmp_path, "z", kind=kind, seed=1)
    with pytest.raises(TinkerError, match=match):
        merge(two_named("a", "z"), "bad", progress=False)
    assert nothing_stored({"a", "z"})


def test_mismatched_vocabularies(tmp_path):
    stored(tmp_path, "a", seed=0)
    d = tmp_path / "src" / "v"
    make_hf_model("llama", d, seed=1)
    tok = json.loads((d / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(k for k, v in vocab.items() if v == 65)
    vocab["ZZ"] = vocab.pop(first)  # same size, one token different
    (d / "tokenizer.json").write_text(json.dumps(tok))
    store.pull(str(d), name="v", progress=False)
    with pytest.raises(TinkerError, match="vocabularies differ: token 65 is 'A' in a .* but 'ZZ' in v"):
        merge(two_named("a", "v"), "bad", progress=False)
    assert nothing_stored({"a", "v"})


def test_failure_while_writing_leaves_nothing(ab, monkeypatch):
    calls = []

    def boom(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return args[0][0]

    monkeypatch.setitem(METHODS, "linear", METHODS["linear"].__class__(**{**METHODS["linear"].__dict__, "fn": boom}))
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge(two("linear", {"weight": 1}, {"weight": 1}), "bad", progress=False)
    assert nothing_stored({"a", "b"})


def test_linear_function_matches_formula():
    xs = [torch.full((3,), 1.0), torch.full((3,), 5.0)]
    torch.testing.assert_close(
        linear(xs, None, {"normalize": True}, [{"weight": 1}, {"weight": 3}]), torch.full((3,), 4.0)
    )
    v0, v1 = torch.randn(8), torch.randn(8)
    out = slerp(0.3, v0, v1)
    assert out is not v0 and torch.equal(slerp(0.3, v0.clone(), v1, inplace=True), out)


# ---------------------------------------------------------------------------------------------------------------
# The streaming safetensors writer


def test_safetensors_writer_follows_the_spec(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g),
        "a.bias": torch.randn(7, generator=g).bfloat16(),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "half": torch.randn(2, 2, generator=g).half(),
    }
    path = tmp_path / "model.safetensors"
    with SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], {"k": "v"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8 + n - 1 : 8 + n].strip() in (b"}", b"")  # padded with spaces to 8 bytes
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == {"k": "v"}
    assert header["b.weight"] == {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 60]}
    assert header["a.bias"]["dtype"] == "BF16" and header["a.bias"]["data_offsets"] == [60, 74]
    assert len(raw) == 8 + n + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    assert list(tmp_path.iterdir()) == [path]


def test_safetensors_writer_casts_checks_order_and_aborts(tmp_path):
    path = tmp_path / "m.safetensors"
    w = SafetensorsWriter(path, [("x", torch.bfloat16, (2,)), ("y", torch.float32, (1,))])
    w.write("x", torch.tensor([1.5, 2.0]))  # fp32 in, cast to the listed bf16
    with pytest.raises(ValueError, match="expected y"):
        w.write("z", torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        w.write("y", torch.zeros(2))
    with pytest.raises(ValueError, match="closed after 1 of 2"):
        w.close()
    assert list(tmp_path.iterdir()) == []  # the partial file is gone
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(path, [("x", torch.float32, (1,))]) as w:
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    with SafetensorsWriter(path, [("x", torch.bfloat16, (2,))]) as w:
        w.write("x", torch.tensor([1.5, 2.0]))
    assert load_file(path)["x"].dtype == torch.bfloat16


def test_save_config(tmp_path):
    save_config(tmp_path, {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": [1, 2], "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
