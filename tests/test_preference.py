"""Preference tuning (DPO, IPO, robust DPO, ORPO, KTO): losses and gradients against TRL's trainers on the same batch,
the adapter-off reference, the cached reference of full fine-tuning, bad input, the CLI end to end with resume.

TRL (1.16) is the reference: its trainers' loss methods are run on a transformers + peft copy of the same tiny model
with the same adapter, on the very token ids and answer masks tinkerlm built.
"""

import contextlib
import json
import math
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cli import assert_user_error, cli
from tiny import make_hf_model

from tinkerlm import lora, store
from tinkerlm.errors import TinkerError
from tinkerlm.loading import load_checkpoint
from tinkerlm.tune import preference

SEQ = 64


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, seed in (("llama", 0), ("llama-b", 1)):
        make_hf_model("llama", root / name, seed=seed)
        (root / name / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
        out[name] = root / name
    return out


def write_pairs(path: Path, n: int, seed: int = 0, kto: bool = False) -> Path:
    """Addition: the right sum is chosen, a wrong one rejected (KTO: each as its own labelled line)."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = r.randint(0, 99), r.randint(0, 99)
            prompt = {"prompt": f"{a}+{b}"} if i % 2 else {"messages": [{"role": "user", "content": f"{a}+{b}="}]}
            if kto:
                good = i % 3 != 0
                f.write(json.dumps({**prompt, "completion": str(a + b if good else a + b + 1), "label": good}) + "\n")
            else:
                f.write(json.dumps({**prompt, "chosen": str(a + b), "rejected": str(a + b + r.randint(1, 9))}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# TRL side by side: the same adapter on transformers + peft, TRL's loss methods on our ids and masks


def policy(base, seed=1):
    """Our model with a LoRA adapter whose B is random, so policy and reference differ."""
    model, tok, _ = load_checkpoint(base)
    cfg = lora.LoRAConfig(rank=4, alpha=8, targets=["all-linear"])
    names = lora.apply_lora(model, cfg, seed=0)
    g = torch.Generator().manual_seed(seed)
    for m in lora.lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return model, tok, cfg, names


def trl_peft_model(base, model, cfg, names, tmp_path):
    import peft
    import transformers
    from trl.trainer.utils import add_fused_lm_head

    lora.save_adapter(model, tmp_path / "adapter", lora.peft_config(cfg, names, str(base)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # as TRL's trainers do
    return peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).train()


def trainer_stub(cls, pm, **attrs):
    """A TRL trainer object holding only what its loss method reads (no datasets, no accelerate launch)."""
    t = cls.__new__(cls)
    ident = lambda x: x  # noqa: E731
    t.accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        unwrap_model=ident,
        gather=ident,
        gather_for_metrics=ident,
        autocast=contextlib.nullcontext,
    )
    t.model, t.ref_model, t.args = pm, None, SimpleNamespace(gradient_checkpointing_kwargs=None)
    t.aux_loss_enabled, t.precompute_ref_logps = False, False
    t._metrics, t._total_train_tokens, t._tp_size = {"train": defaultdict(list), "eval": defaultdict(list)}, 0, 1
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


def padded(seqs, pad):
    """TRL's collated layout: right-padded input_ids, attention_mask, completion_mask."""
    n = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), n), pad)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    comp = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        att[i, : len(s.ids)] = 1
        comp[i, : len(s.ids)] = torch.tensor(s.target, dtype=torch.long)
    return ids, att, comp


def ours_vs_trl_grads(model, pm, names):
    """Pairs of (our, peft's) gradients of every A and B."""
    out = []
    for name in names:
        ours = model.get_submodule(name)
        theirs = pm.base_model.model.get_submodule(name)
        out.append((ours.lora_A.grad, theirs.lora_A["default"].weight.grad))
        out.append((ours.lora_B.grad, theirs.lora_B["default"].weight.grad))
    return out


def assert_same(loss, trl_loss, model, pm, names):
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=0)
    grads = ours_vs_trl_grads(model, pm, names)
    assert any(a.abs().max() > 1e-4 for a, _ in grads)  # the gradient is not trivially zero
    for a, b in grads:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("kind", "smoothing"), [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.1)])
def test_dpo_loss_and_gradients_equal_trl(bases, tmp_path, kind, smoothing):
    from trl import DPOTrainer

    model, tok, cfg, names = policy(bases["llama"])
    prefs, _ = preference.load(write_pairs(tmp_path / "p.jsonl", 6), tok, SEQ, "dpo")
    n, pad = len(prefs), tok.pad_token_id
    beta = 0.5
    obj = preference.Preference(
        prefs, range(n), "dpo", beta=beta, seq_len=SEQ, pad=pad, dpo_loss=kind, label_smoothing=smoothing
    )
    loss, metrics = obj.batch(model, torch.arange(n), False)
    (loss / n).backward()

    pm = trl_peft_model(bases["llama"], model, cfg, names, tmp_path)
    t = trainer_stub(
        DPOTrainer,
        pm,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[kind],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=smoothing,
        use_weighting=False,
    )
    ids, att, comp = padded(prefs.seqs[0::2] + prefs.seqs[1::2], pad)  # TRL's batch: chosen..., rejected...
    trl_loss = t._compute_loss(pm, {"input_ids": ids, "attention_mask": att, "completion_mask": comp}, False)
    trl_loss.backward()
    assert_same(loss / n, trl_loss, model, pm, names)
    m = obj.summarise({k: list(v) for k, v in metrics.items()})
    assert m["chosen_reward"] == pytest.approx(t._metrics["train"]["rewards/chosen"][-1], abs=1e-5)
    assert m["margin"] == pytest.approx(t._metrics["train"]["rewards/margins"][-1], abs=1e-5)
    assert m["accuracy"] == pytest.approx(t._metrics["train"]["rewards/accuracies"][-1])


def test_conservative_dpo_mixes_trl_sigmoid_losses_of_both_orders(bases, tmp_path):
    """cDPO (sigmoid with label smoothing e), which TRL 1.16 no longer has: (1 - e) x TRL's sigmoid loss on the
    pairs + e x TRL's sigmoid loss on the pairs swapped, in value and gradient."""
    from trl import DPOTrainer

    model, tok, cfg, names = policy(bases["llama"])
    prefs, _ = preference.load(write_pairs(tmp_path / "p.jsonl", 4), tok, SEQ, "dpo")
    n, pad, e = len(prefs), tok.pad_token_id, 0.2
    obj = preference.Preference(prefs, range(n), "dpo", beta=0.3, seq_len=SEQ, pad=pad, label_smoothing=e)
    loss, _ = obj.batch(model, torch.arange(n), False)
    (loss / n).backward()
    pm = trl_peft_model(bases["llama"], model, cfg, names, tmp_path)
    t = trainer_stub(
        DPOTrainer,
        pm,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=0.3,
        label_smoothing=0.0,
        use_weighting=False,
    )
    total = 0
    for weight, seqs in ((1 - e, prefs.seqs[0::2] + prefs.seqs[1::2]), (e, prefs.seqs[1::2] + prefs.seqs[0::2])):
        ids, att, comp = padded(seqs, pad)
        part = weight * t._compute_loss(pm, {"input_ids": ids, "attention_mask": att, "completion_mask": comp}, False)
        part.backward()
        total = total + part.detach()
    assert_same(loss / n, total, model, pm, names)


def test_orpo_loss_and_gradients_equal_trl(bases, tmp_path):
    """Plain-text pairs with a one-token prompt, where TRL's NLL (over prompt and answer) is SFT's (over the answer)."""
    from trl.experimental.orpo import ORPOTrainer

    model, tok, cfg, names = policy(bases["llama"])
    tok.chat_template = None
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": "Q", "chosen": f"{a} is {a * 2}", "rejected": f"{a} is {a * 2 + b}"}) + "\n"
            for a, b in ((3, 1), (17, 5), (40, 2), (8, 9))
        )
    )
    prefs, _ = preference.load(path, tok, SEQ, "orpo")
    assert all(len(s.ids) - sum(s.target) == 1 for s in prefs.seqs)  # one prompt token
    n, pad, beta = len(prefs), tok.pad_token_id, 0.25
    obj = preference.Preference(prefs, range(n), "orpo", beta=beta, seq_len=SEQ, pad=pad)
    loss, metrics = obj.batch(model, torch.arange(n), False)
    (loss / n).backward()

    pm = trl_peft_model(bases["llama"], model, cfg, names, tmp_path)
    t = trainer_stub(ORPOTrainer, pm, is_encoder_decoder=False, padding_value=pad, beta=beta)
    batch = {}
    for side, seqs in (("chosen", prefs.seqs[0::2]), ("rejected", prefs.seqs[1::2])):
        ids, att, comp = padded(seqs, pad)
        batch.update(
            {
                f"{side}_input_ids": ids,
                f"{side}_attention_mask": att,
                f"{side}_labels": ids.masked_fill(comp == 0, -100),
            }
        )
    trl_loss, trl_metrics = t.get_batch_loss_metrics(pm, batch)
    trl_loss.backward()
    assert_same(loss / n, trl_loss, model, pm, names)
    m = obj.summarise({k: list(v) for k, v in metrics.items()})
    assert m["rejected_reward"] == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5)
    # A random model's answers are improbable, where odds are almost probabilities; near log-prob 0 they are not.
    chosen = torch.tensor([-0.01, -0.3, -0.69, -0.7, -2.0, -9.0])
    rejected = torch.tensor([-0.02, -0.05, -1.5, -0.6, -2.5, -8.0])
    t.beta = 1.0
    torch.testing.assert_close(preference.orpo_ratio(chosen, rejected), t.odds_ratio_loss(chosen, rejected)[0])
    assert m["margin"] == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)


@pytest.mark.parametrize(
    ("seed", "weights"),
    [(1, (1.0, 1.0)), (4, (1.0, 1.0)), (1, (1.3, 0.6))],  # KL estimate positive, negative (clamped); weighted
)
def test_kto_loss_and_gradients_equal_trl(bases, tmp_path, seed, weights):
    from trl import KTOTrainer

    model, tok, cfg, names = policy(bases["llama"], seed)
    prefs, _ = preference.load(write_pairs(tmp_path / "k.jsonl", 6, kto=True), tok, SEQ, "kto")
    n, pad, beta = len(prefs), tok.pad_token_id, 0.4
    assert 0 < int(prefs.labels.sum()) < n
    obj = preference.Preference(
        prefs,
        range(n),
        "kto",
        beta=beta,
        seq_len=SEQ,
        pad=pad,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
    )
    loss, metrics = obj.batch(model, torch.arange(n), False)
    (loss / n).backward()

    pm = trl_peft_model(bases["llama"], model, cfg, names, tmp_path)
    t = trainer_stub(
        KTOTrainer,
        pm,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
    )
    ids, att, comp = padded(prefs.seqs[0::2], pad)
    kl_ids, kl_att, kl_comp = padded(prefs.seqs[1::2], pad)  # the previous line's answer to each prompt
    inputs = {
        "input_ids": ids,
        "attention_mask": att,
        "completion_mask": comp,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_att,
        "KL_completion_mask": kl_comp,
        "label": prefs.labels.clone(),
    }
    trl_loss = t._compute_loss(pm, inputs, False)
    trl_loss.backward()
    assert_same(loss / n, trl_loss, model, pm, names)
    m = obj.summarise({k: list(v) for k, v in metrics.items()})
    assert m["kl"] == pytest.approx(t._metrics["train"]["kl"][-1], abs=1e-5)
    assert (m["kl"] > 0.01) == (seed == 1) and m["kl"] >= 0
    assert m["margin"] == pytest.approx(t._metrics["train"]["rewards/margins"][-1], abs=1e-5)


def test_kto_mismatched_answers_rotate_by_one_line(bases, tmp_path):
    _, tok, _ = load_checkpoint(bases["llama"])
    prefs, _ = preference.load(write_pairs(tmp_path / "k.jsonl", 5, kto=True), tok, SEQ, "kto")
    render = lambda s: tok.decode(s.ids)  # noqa: E731
    answers = [render(prefs.seqs[2 * i]).rsplit("assistant\n", 1)[1] for i in range(5)]
    for i in range(5):
        assert render(prefs.seqs[2 * i + 1]).endswith("assistant\n" + answers[i - 1])


# ---------------------------------------------------------------------------------------------------------------
# The reference


def test_adapter_off_reference_equals_a_frozen_copy(bases, tmp_path):
    model, tok, _, _ = policy(bases["llama"])
    frozen, _, _ = load_checkpoint(bases["llama"])
    prefs, _ = preference.load(write_pairs(tmp_path / "p.jsonl", 6), tok, SEQ, "dpo")
    pad = tok.pad_token_id
    with torch.no_grad():
        with lora.adapters_off(model):
            off, counts = preference.seq_logps(model, prefs.seqs, SEQ, pad)
        on, _ = preference.seq_logps(model, prefs.seqs, SEQ, pad)
        ref, _ = preference.seq_logps(frozen, prefs.seqs, SEQ, pad)
    assert torch.equal(off, ref)
    assert (on - ref).abs().max() > 1e-3  # the adapter is back on after the block
    assert counts.min() > 0 and (ref < 0).all()
    # And the sums are those of transformers' log-softmax over the answer tokens.
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(bases["llama"], dtype=torch.float32)
    for i in (0, 3):
        s = prefs.seqs[i]
        with torch.no_grad():
            lp = hf(torch.tensor([s.ids])).logits[0, :-1].log_softmax(-1)
        want = torch.tensor(s.target[1:])
        expect = lp[torch.arange(len(s.ids) - 1), torch.tensor(s.ids[1:])][want].sum()
        assert ref[i].item() == pytest.approx(expect.item(), abs=1e-4)


def _ft(bases, data, out, **kw):
    from tinkerlm.tune import finetune

    opts = dict(
        base=str(bases["llama"]),
        data=str(data),
        out=out,
        method="dpo",
        seq_len=SEQ,
        batch_size=2,
        lr=5e-3,
        warmup_steps=1,
        progress=False,
    )
    opts.update(kw)
    return finetune(**opts)


def test_full_finetune_caches_reference_logps_keyed_by_data_and_base(bases, tmp_path, capsys):
    data = write_pairs(tmp_path / "p.jsonl", 8)
    cache = store.home() / "reference"

    def run(name, data=data, base="llama"):
        m = _ft(bases, data, name, full=True, max_steps=1, base=str(bases[base]))
        err = capsys.readouterr().err
        return m, [line for line in err.splitlines() if line.startswith("reference log-probs")]

    _, first = run("a")
    assert len(first) == 1 and "computed" in first[0]
    (key,) = [p.stem for p in cache.iterdir()]
    _, again = run("b")
    assert "cached" in again[0] and key[:12] in again[0]
    # The cache holds the base's log-probs (not the trained model's), as a fresh frozen base gives them.
    from safetensors.torch import load_file

    frozen, tok, _ = load_checkpoint(bases["llama"])
    prefs, _ = preference.load(data, tok, SEQ, "dpo")
    expect = preference.reference_logps(frozen, prefs, SEQ, tok.pad_token_id, 2)
    torch.testing.assert_close(load_file(str(cache / f"{key}.safetensors"))["logps"], expect, atol=1e-5, rtol=0)

    with open(data, "a") as f:  # the data changed
        f.write(json.dumps({"prompt": "1+1", "chosen": "2", "rejected": "3"}) + "\n")
    _, changed = run("c")
    assert "computed" in changed[0]
    _, other_base = run("d", base="llama-b")  # the base changed
    assert "computed" in other_base[0]
    assert len(list(cache.iterdir())) == 3


def test_ref_flag_uses_another_model_as_reference(bases, tmp_path, capsys):
    data = write_pairs(tmp_path / "p.jsonl", 8)
    m = _ft(bases, data, "withref", ref=str(bases["llama-b"]), max_steps=1)
    err = capsys.readouterr().err
    assert "reference log-probs" in err and "computed" in err
    assert m.source["reference"]["sha256"] != m.parents[0]["sha256"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("method", "line", "needle"),
    [
        ("dpo", {"prompt": "q", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are the same answer"),
        ("dpo", {"prompt": "q", "chosen": "  ", "rejected": "b"}, "'chosen' is empty"),
        ("orpo", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
        ("dpo", {"chosen": "a", "rejected": "b"}, "missing field 'prompt' (or 'messages')"),
        ("kto", {"prompt": "q", "completion": "a"}, "'label' must be true"),
        ("kto", {"prompt": "q", "completion": "a", "label": "yes"}, "'label' must be true"),
        ("kto", {"prompt": "q", "chosen": "a", "rejected": "b"}, "missing field 'completion'"),
        ("dpo", {"messages": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "must not end"),
    ],
)
def test_bad_lines_name_file_and_line(bases, tmp_path, method, line, needle):
    _, tok, _ = load_checkpoint(bases["llama"])
    path = tmp_path / "bad.jsonl"
    good = (
        {"prompt": "1+1", "chosen": "2", "rejected": "3"}
        if method != "kto"
        else {"prompt": "x", "completion": "y", "label": True}
    )
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(TinkerError) as e:
        preference.load(path, tok, SEQ, method)
    assert str(e.value).startswith(f"{path}:2: ") and needle in str(e.value)


def test_recipe_checks_preference_fields():
    from tinkerlm.tune.recipe import resolve

    base = dict(base="b", data="d", out="o")
    with pytest.raises(TinkerError, match="method: must be one of"):
        resolve(**base, method="ppo")
    with pytest.raises(TinkerError, match="label_smoothing"):
        resolve(**base, method="dpo", dpo_loss="ipo", label_smoothing=0.1)
    with pytest.raises(TinkerError, match="label_smoothing: must be in"):
        resolve(**base, method="dpo", dpo_loss="robust", label_smoothing=0.5)
    with pytest.raises(TinkerError, match="ref: --method orpo uses no reference"):
        resolve(**base, method="orpo", ref="x")
    with pytest.raises(TinkerError, match="apply to --method kto only"):
        resolve(**base, method="dpo", desirable_weight=2.0)
    with pytest.raises(TinkerError, match="beta: must be in"):
        resolve(**base, method="dpo", beta=0)


# ---------------------------------------------------------------------------------------------------------------
# End to end


def _losses(m):
    import csv

    return list(csv.DictReader((store.model_path(m) / "loss.csv").read_text().splitlines()))


def test_dpo_resume_gives_the_same_losses_and_metrics(bases, tmp_path):
    data = write_pairs(tmp_path / "p.jsonl", 20)
    kw = dict(max_steps=6, save_every=2, eval_every=3, lora_dropout=0.1)
    full = _ft(bases, data, "whole", **kw)
    assert _ft(bases, data, "part", stop_after=3, **kw) is None
    resumed = _ft(bases, data, "part", resume=True, **kw)
    a, b = _losses(full), _losses(resumed)
    keys = ["loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "eval_loss", "eval_accuracy"]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    # Step 1 starts from B = 0, where the policy is the reference: loss log 2, rewards 0.
    assert float(a[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6) and float(a[0]["margin"]) == 0


def test_dpo_learns_the_preference(bases, tmp_path):
    data = write_pairs(tmp_path / "p.jsonl", 4)
    m = _ft(bases, data, "learn", eval_data=str(data), batch_size=4, max_steps=12, lr=2e-2, eval_every=12)
    rows = _losses(m)
    assert float(rows[-1]["loss"]) < math.log(2) - 0.1
    assert float(rows[-1]["eval_accuracy"]) == 1.0 and float(rows[-1]["eval_margin"]) > 0.1


def test_kto_and_orpo_train_and_store(bases, tmp_path):
    kto = _ft(bases, write_pairs(tmp_path / "k.jsonl", 12, kto=True), "kto", method="kto", max_steps=3)
    rows = _losses(kto)
    assert rows[-1]["kl"] != "" and rows[-1]["eval_accuracy"] != ""
    orpo = _ft(bases, write_pairs(tmp_path / "p.jsonl", 12), "orpo", method="orpo", max_steps=3, full=True)
    assert orpo.format == "hf" and orpo.source["reference"] == "base" and orpo.source["objective"] == "orpo"


def test_cli_dpo_end_to_end(bases, tmp_path):
    data = write_pairs(tmp_path / "prefs.jsonl", 16)
    home = store.home()
    p = cli(
        "finetune",
        str(bases["llama"]),
        "--method",
        "dpo",
        "--data",
        str(data),
        "--out",
        "tiny-dpo",
        "--beta",
        "0.5",
        "--seq-len",
        str(SEQ),
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--lr",
        "0.01",
        check=0,
    )
    assert "stored tiny-dpo:latest" in p.stderr and "reference: the base, adapters off" in p.stderr
    m = store.get("tiny-dpo")
    assert m.format == "lora" and m.license == "apache-2.0" and m.source["objective"] == "dpo"
    assert m.parents[0]["relation"] == "base" and len(m.parents[0]["sha256"]) == 64
    assert m.source["data"][0]["sha256"] == store.sha256_file(data)
    assert m.source["eval_accuracy"] is not None
    d = store.model_path(m)
    header = (d / "loss.csv").read_text().splitlines()[0].split(",")
    for col in ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "eval_accuracy", "eval_margin"):
        assert col in header
    assert (d / "loss.png").read_bytes()[:4] == b"\x89PNG" and (d / "rewards.png").read_bytes()[:4] == b"\x89PNG"
    assert "method: dpo" in (d / "recipe.yaml").read_text() and "beta: 0.5" in (d / "recipe.yaml").read_text()
    assert cli("run", "tiny-dpo", "2+2=", "--max-tokens", "3", check=0).returncode == 0

    # Bad input: one line naming file:line, exit 2, nothing new in the store.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    before = sorted(p.name for p in (home / "models").iterdir())
    assert_user_error(
        cli("finetune", str(bases["llama"]), "--method", "dpo", "--data", str(bad), "--out", "nope", "--seq-len", "64"),
        f"{bad}:1:",
        "same answer",
    )
    kto_bad = tmp_path / "kto.jsonl"
    kto_bad.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    assert_user_error(
        cli(
            "finetune",
            str(bases["llama"]),
            "--method",
            "kto",
            "--data",
            str(kto_bad),
            "--out",
            "nope",
            "--seq-len",
            "64",
        ),
        f"{kto_bad}:1:",
        "'label'",
    )
    assert sorted(p.name for p in (home / "models").iterdir()) == before


DDP_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
torch.set_num_threads(1)
from tinkerlm.tune import finetune
m = finetune(base=sys.argv[1], data=sys.argv[2], out="ddp", method="dpo", seq_len=64, batch_size=2, grad_accum=2,
             max_steps=4, lr=5e-3, warmup_steps=1, threads=1, progress=False)
dist.destroy_process_group()
"""


def test_two_process_torchrun_equals_one_process(bases, tmp_path):
    """DPO under torchrun (2 ranks, gloo): each step's pairs split between ranks, gradients and metrics summed."""
    import os
    import subprocess
    import sys

    data = write_pairs(tmp_path / "p.jsonl", 20)
    single = _ft(bases, data, "single", grad_accum=2, max_steps=4, threads=1)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        + ["--master_port", str(29600 + os.getpid() % 1000), str(script), str(bases["llama"]), str(data)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ours, theirs = _losses(single), _losses(store.get("ddp"))
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        for k in ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy"):
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-4, abs=1e-6), k
