"""Mixture-of-experts (tinkerlm/models/moe.py): Mixtral and Qwen3-MoE against transformers (the tiny rows of
tests/tiny.py run through tests/test_models.py too), from HF safetensors in both expert layouts and from GGUF files
written here as llama.cpp's converter writes them, compared with transformers and with llama.cpp itself; experts kept
quantized; the batched expert products against a per-token loop; the fused decode step refusing MoE models; the
writers (HF export and merges in each model's own checkpoint names, GGUF export refused), LoRA through experts."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from ggufwriter import llamacpp_permute
from peers import llama_cpp_model
from safetensors.torch import save_file
from tiny import CONFIGS, make_hf_model

import tinkerlm
from tinkerlm import kernels
from tinkerlm.errors import TinkerError
from tinkerlm.formats import specs
from tinkerlm.formats.gguf import read_gguf
from tinkerlm.formats.gguf_write import TensorPlan, write_gguf
from tinkerlm.formats.tokenizer import Tokenizer
from tinkerlm.models.moe import SparseMoE


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """kind -> (path, transformers model) for the tiny MoE rows of tests/tiny.py."""
    root = tmp_path_factory.mktemp("moe")
    return {kind: (root / kind, make_hf_model(kind, root / kind)) for kind in ("mixtral", "qwen3-moe")}


# ---------------------------------------------------------------------------------------------------------------
# HF checkpoints


def test_transformers_saves_experts_per_expert(hf):
    """transformers 5 holds experts fused (3-D) but saves them per expert, in each model's historical names."""
    from safetensors import safe_open

    saved = {
        "mixtral": "model.layers.0.block_sparse_moe.experts.3.w2.weight",
        "qwen3-moe": "model.layers.0.mlp.experts.3.down_proj.weight",
    }
    for kind, (path, ref) in hf.items():
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert saved[kind] in set(f.keys()), kind
        assert "model.layers.0.mlp.experts.gate_up_proj" in ref.state_dict(), kind


@pytest.mark.parametrize(
    "layers",
    [dict(mlp_only_layers=[1]), dict(decoder_sparse_step=2), dict(norm_topk_prob=False)],
    ids=["mlp_only_layers", "sparse_step", "no_norm_topk"],
)
def test_qwen3_moe_variants_match_transformers(tmp_path, layers):
    """Dense layers among sparse ones (mlp_only_layers, decoder_sparse_step) and unnormalised top-k weights."""
    CONFIGS["qwen3-moe-variant"] = (CONFIGS["qwen3-moe"][0], {**CONFIGS["qwen3-moe"][1], **layers})
    try:
        ref = make_hf_model("qwen3-moe-variant", tmp_path)
    finally:
        del CONFIGS["qwen3-moe-variant"]
    llm = tinkerlm.load(str(tmp_path))
    sparse = [type(layer.mlp) is SparseMoE for layer in llm.model.model.layers]
    assert sparse == [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in ref.model.layers]
    assert (logits(llm.model, IDS) - logits(ref, IDS)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe"])
def test_fused_expert_checkpoints_load(kind, hf, tmp_path):
    """A checkpoint holding transformers 5's in-memory layout (fused 3-D `experts.gate_up_proj`/`down_proj`)."""
    path, ref = hf[kind]
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    sd = {n: t.contiguous() for n, t in ref.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(tmp_path / "model.safetensors"))
    llm = tinkerlm.load(str(tmp_path))
    assert (logits(llm.model, IDS) - logits(ref, IDS)).abs().max().item() <= 1e-4


def test_batched_experts_equal_a_per_token_loop(hf):
    """The grouped products (one per expert, index_add back) against routing each token on its own."""
    model = tinkerlm.load(str(hf["mixtral"][0])).model
    block = model.model.layers[0].mlp
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = block(x)
        want = torch.zeros_like(x)
        for b in range(3):
            for t in range(7):
                h = x[b, t]
                probs = torch.softmax(block.gate(h), -1)
                w, chosen = torch.topk(probs, block.top_k)
                w = w / w.sum()
                want[b, t] = sum(wi * block.experts[int(e)](h[None])[0] for wi, e in zip(w, chosen))
    assert (got - want).abs().max().item() <= 1e-5
    assert not torch.allclose(got, block.experts[0](x), atol=1e-3)  # routing matters


def test_bad_configs(hf):
    from tinkerlm import models

    config = json.loads((hf["mixtral"][0] / "config.json").read_text())
    with pytest.raises(TinkerError, match=r"num_experts_per_tok \(5\) exceeds num_experts \(4\)"):
        models.build({**config, "num_experts_per_tok": 5}, "c.json")
    with pytest.raises(TinkerError, match="'num_experts' must be a positive integer"):
        models.build({**config, "num_local_experts": 0}, "c.json")


# ---------------------------------------------------------------------------------------------------------------
# GGUF, written here as llama.cpp's converter writes Mixtral ("llama" with experts) and Qwen3-MoE ("qwen3moe")


def write_moe_gguf(path, kind: str, ref, hf_dir, qtype=Q.F32, override: dict | None = None) -> dict:
    """The converter's tensors and keys, from the transformers model (fused experts split into the three stacks
    gate/up/down, q/k rows permuted for Mixtral); returns the round-tripped HF state dict (the reference weights)."""
    c = ref.config
    arch = "llama" if kind == "mixtral" else "qwen3moe"
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    meta = {
        "general.architecture": arch,
        "general.file_type": 0 if qtype == Q.F32 else 7,
        **{
            f"{arch}.{key}": value
            for key, value in {
                "context_length": c.max_position_embeddings,
                "embedding_length": c.hidden_size,
                "feed_forward_length": c.intermediate_size,
                "block_count": c.num_hidden_layers,
                "attention.head_count": c.num_attention_heads,
                "attention.head_count_kv": c.num_key_value_heads,
                "attention.key_length": head_dim,
                "attention.value_length": head_dim,
                "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
                "rope.dimension_count": head_dim,
                "rope.freq_base": float(c.rope_parameters["rope_theta"]),
                "expert_count": c.num_local_experts if kind == "mixtral" else c.num_experts,
                "expert_used_count": c.num_experts_per_tok,
            }.items()
        },
        **Tokenizer.from_hf_dir(hf_dir).gguf_metadata(vocab_size=c.vocab_size),
    }
    if kind != "mixtral":
        meta[f"{arch}.expert_feed_forward_length"] = c.moe_intermediate_size
    meta.update({f"{arch}.{key}": value for key, value in (override or {}).items()})
    plans = []

    def add(name: str, a: np.ndarray) -> np.ndarray:
        """Write `a` (torch order) as `qtype` where llama.cpp quantizes it; return what reading it back gives."""
        if a.ndim == 1 or qtype == Q.F32 or name.endswith("ffn_gate_inp.weight"):  # llama.cpp keeps the router F32
            plans.append(TensorPlan(name, "F32", a.shape, lambda a=a: a))
            return a
        q = gguf.quants.quantize(a, qtype)
        plans.append(TensorPlan(name, qtype.name, a.shape, lambda q=q, a=a: q.reshape(-1, q.shape[-1])))
        return gguf.quants.dequantize(q, qtype).reshape(a.shape)

    back = {}
    layer = {
        "input_layernorm.weight": "attn_norm",
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_output",
        "self_attn.q_norm.weight": "attn_q_norm",
        "self_attn.k_norm.weight": "attn_k_norm",
        "post_attention_layernorm.weight": "ffn_norm",
        "mlp.gate.weight": "ffn_gate_inp",
    }
    for name, t in ref.state_dict().items():
        a = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            back[name] = add("token_embd.weight", a)
        elif name == "model.norm.weight":
            back[name] = add("output_norm.weight", a)
        elif name == "lm_head.weight":
            back[name] = add("output.weight", a)
        elif name.endswith("mlp.experts.gate_up_proj"):
            i, half = name.split(".")[2], a.shape[1] // 2
            gate = add(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(a[:, :half]))
            up = add(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(a[:, half:]))
            back[name] = np.concatenate([gate, up], axis=1)
        elif name.endswith("mlp.experts.down_proj"):
            back[name] = add(f"blk.{name.split('.')[2]}.ffn_down_exps.weight", a)
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{layer[rest]}.weight"
            if kind == "mixtral" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                heads = c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads
                stored = add(g, llamacpp_permute(a, heads))
                back[name] = stored.reshape(heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)  # unpermute
            else:
                back[name] = add(g, a)
    write_gguf(path, meta, plans)
    return {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in back.items()}


def reference(ref, state: dict):
    """The transformers model carrying `state` (the weights as the GGUF file holds them)."""
    out = type(ref)(ref.config).eval()
    out.load_state_dict(state)
    return out


@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe"])
def test_gguf_is_read_as_moe(kind, hf, tmp_path):
    path, ref = hf[kind]
    write_moe_gguf(tmp_path / "m.gguf", kind, ref, path)
    ckpt = read_gguf(tmp_path / "m.gguf")
    assert ckpt.spec is specs.for_model_type("mixtral" if kind == "mixtral" else "qwen3_moe")
    config = ckpt.config()
    assert config["model_type"] == ("mixtral" if kind == "mixtral" else "qwen3_moe")
    assert config["num_experts_per_tok"] == 2
    assert specs.gguf_model_type(ckpt.architecture, ckpt.metadata) == config["model_type"]  # the store's entry
    names = ckpt.hf_names()
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names and "model.layers.0.mlp.gate.weight" in names
    up = ref.model.layers[1].mlp.experts.gate_up_proj[2].detach()
    assert torch.equal(ckpt.hf_tensor("model.layers.1.mlp.experts.2.up_proj.weight"), up[up.shape[0] // 2 :])
    llm = tinkerlm.load(str(tmp_path / "m.gguf"), quant="fp32")
    assert (logits(llm.model, IDS) - logits(ref, IDS)).abs().max().item() <= 1e-4


def test_inconsistent_expert_metadata_is_refused(hf, tmp_path):
    path, ref = hf["qwen3-moe"]
    write_moe_gguf(tmp_path / "a.gguf", "qwen3-moe", ref, path, override={"expert_count": 3})
    with pytest.raises(
        TinkerError, match=r"ffn_gate_exps.weight has shape \(4, 64, 64\), but the metadata implies \(3,"
    ):
        read_gguf(tmp_path / "a.gguf").hf_names()
    write_moe_gguf(tmp_path / "b.gguf", "qwen3-moe", ref, path, override={"expert_used_count": 5})
    with pytest.raises(TinkerError, match="expert_used_count is 5, outside 1..4"):
        read_gguf(tmp_path / "b.gguf").config()


def test_llama_gguf_without_experts_stays_llama(tmp_path):
    from ggufwriter import write_gguf as write_llama
    from test_gguf import llama_weights

    write_llama(tmp_path / "l.gguf", "llama", llama_weights(np.random.default_rng(0)))
    assert read_gguf(tmp_path / "l.gguf").config()["model_type"] == "llama"


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe"])
def test_quantized_gguf_keeps_experts_quantized(kind, qtype, hf, tmp_path):
    """Native loading: one QLinear per expert over the file's blocks (no fp32 copy of the experts), logits as the
    reference model carrying the same round-tripped weights (within the kernels' activation rounding)."""
    from tinkerlm.quant import QLinear
    from tinkerlm.quant.decode import FusedLlamaDecoder

    path, ref = hf[kind]
    state = write_moe_gguf(tmp_path / "m.gguf", kind, ref, path, qtype)
    llm = tinkerlm.load(str(tmp_path / "m.gguf"))
    moe = llm.model.model.layers[0].mlp
    assert isinstance(moe, SparseMoE) and len(moe.experts) == 4
    assert all(isinstance(getattr(e, p), QLinear) for e in moe.experts for p in ("gate_proj", "up_proj", "down_proj"))
    assert not any(n.endswith("experts.0.gate_proj.weight") for n, _ in llm.model.named_parameters())
    # The fused one-token decode step computes dense MLPs: it must not take over a MoE model.
    assert not FusedLlamaDecoder.supports(llm.model) and llm.model.fused_decode is None
    want = logits(reference(ref, state), IDS)
    got = logits(llm.model, IDS)
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()
    fp32 = logits(tinkerlm.load(str(tmp_path / "m.gguf"), quant="fp32").model, IDS)
    assert (fp32 - want).abs().max().item() <= 1e-4


@pytest.mark.skipif(kernels.ops() is None, reason="C++ kernels unavailable (no compiler)")
def test_fused_decode_takes_the_dense_model_but_not_moe(hf, tmp_path):
    """The same check as above on a dense model passes (so the MoE refusal is the structure, not the setup)."""
    from tinkerlm.quant.decode import FusedLlamaDecoder

    path = tmp_path / "llama"
    make_hf_model("llama", path)
    dense = tinkerlm.load(str(path), quant="int8").model
    moe = tinkerlm.load(str(hf["mixtral"][0]), quant="int8").model
    assert FusedLlamaDecoder.supports(dense)
    assert not FusedLlamaDecoder.supports(moe) and moe.fused_decode is None


@pytest.mark.parametrize(("qtype", "tol"), [(Q.F32, 2e-3), (Q.Q8_0, 3e-2), (Q.Q4_0, 3e-2)], ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe"])
def test_llama_cpp_runs_the_same_moe_file(kind, qtype, tol, hf, tmp_path):
    """llama.cpp on the same file: F32 logits equal transformers'; quantized ones equal tinkerlm's within the
    engines' different activation rounding (relative error of the logits)."""
    pytest.importorskip("llama_cpp")
    path, ref = hf[kind]
    write_moe_gguf(tmp_path / "m.gguf", kind, ref, path, qtype)
    ids = IDS[0].tolist()
    llm = llama_cpp_model(tmp_path / "m.gguf", n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    ours = logits(tinkerlm.load(str(tmp_path / "m.gguf")).model, IDS[:1])[0].numpy()
    if qtype == Q.F32:
        np.testing.assert_allclose(theirs, logits(ref, IDS[:1])[0].numpy(), atol=tol, rtol=1e-3)
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert rel < tol, rel


# ---------------------------------------------------------------------------------------------------------------
# Writers: not supported yet, refused by name


@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe"])
def test_hf_export_loads_in_transformers(kind, hf, tmp_path):
    """HF writers give each model_type's own checkpoint names (Mixtral: block_sparse_moe.experts.N.w1/w3/w2)."""
    import transformers

    from tinkerlm.export import export

    path, ref = hf[kind]
    export(str(path), to="hf", out=str(tmp_path / "out"), progress=False)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (logits(again, IDS) - logits(ref, IDS)).abs().max().item() <= 1e-5


def test_gguf_export_is_refused(hf, tmp_path):
    from tinkerlm.export import export

    with pytest.raises(TinkerError, match="experts.0.gate_proj.weight has no GGUF name"):
        export(str(hf["mixtral"][0]), to="gguf", type="f32", out=str(tmp_path / "m.gguf"), progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_names_of_experts_are_refused_for_writers():
    spec = specs.for_model_type("mixtral")
    assert spec.gguf_name("model.layers.0.mlp.gate.weight") == "blk.0.ffn_gate_inp.weight"
    assert spec.gguf_name("model.layers.0.mlp.experts.1.gate_proj.weight") is None  # stacked: no one-to-one name
    with pytest.raises(TinkerError, match="dense layers"):
        spec.gguf_metadata({"model_type": "qwen3_moe", "mlp_only_layers": [1], "norm_topk_prob": True})


@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe"])
def test_spec_metadata_is_the_converters(kind, hf, tmp_path):
    """The spec's writer direction (`gguf_metadata`) gives the keys llama.cpp's converter writes (as written above)."""
    path, ref = hf[kind]
    write_moe_gguf(tmp_path / "m.gguf", kind, ref, path)
    ckpt = read_gguf(tmp_path / "m.gguf")
    config = json.loads((path / "config.json").read_text())
    meta = ckpt.spec.gguf_metadata(config)
    arch = meta["general.architecture"]
    assert arch == ckpt.architecture == specs.gguf_architecture(config["model_type"])
    shared = [k for k in meta if k in ckpt.metadata]
    assert {f"{arch}.expert_count", f"{arch}.expert_used_count", f"{arch}.block_count"} <= set(shared)
    for key in shared:
        assert meta[key] == pytest.approx(ckpt.metadata[key]), key


def test_ragged_batch_generates_as_single_rows(hf):
    """Right-padded prompts of different lengths in one batch decode exactly as each alone (greedy): padding tokens
    are routed too, but each token's experts depend on that token alone."""
    llm = tinkerlm.load(str(hf["mixtral"][0]))
    prompts = ["a", "hello there, a longer prompt", "mid size"]
    assert llm.generate(prompts, max_tokens=12) == [llm.generate(p, max_tokens=12) for p in prompts]


def test_lora_trains_through_the_experts(hf):
    """LoRA on every linear layer (router and experts included): B=0 leaves the logits as they were, and the loss
    sends gradients to the experts a token was routed to, through the grouped products."""
    from tinkerlm import lora

    model = tinkerlm.load(str(hf["qwen3-moe"][0])).model
    before = logits(model, IDS)
    names = lora.apply_lora(model, lora.LoRAConfig(rank=4, targets="all-linear"), seed=0)
    assert "model.layers.0.mlp.experts.3.down_proj" in names and "model.layers.0.mlp.gate" in names
    assert torch.equal(logits(model, IDS), before)
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    grads = [m.lora_B.grad for n, m in lora.lora_modules(model).items() if ".experts." in n]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > len(grads) // 2


def test_merge_known_answer(tmp_path):
    """A linear merge with weights [1, 0] of two Mixtrals is the first, saved as transformers reads Mixtral."""
    import transformers
    from safetensors.torch import load_file

    from tinkerlm import store
    from tinkerlm.merge import merge

    refs = {}
    for name, seed in (("a", 0), ("b", 1)):
        refs[name] = make_hf_model("mixtral", tmp_path / "src" / name, seed=seed)
        store.pull(str(tmp_path / "src" / name), name=name, progress=False)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 0.0}}],
    }
    out = store.model_path(merge(recipe, "m", progress=False))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in load_file(out / "model.safetensors")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(merged, IDS) - logits(refs["a"], IDS)).abs().max().item() <= 1e-5
