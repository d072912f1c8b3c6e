"""Logits parity with transformers for every architecture, cached decode vs full forward, batching, bad configs."""

import pytest
import torch
from tiny import CONFIGS, make_hf_model

import tinkerlm
from tinkerlm.errors import TinkerError

KINDS = list(CONFIGS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (path, transformers model) for every tiny architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: (root / kind, make_hf_model(kind, root / kind)) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, checkpoints):
    path, ref = checkpoints[kind]
    llm = tinkerlm.load(str(path))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = llm.model(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_equals_full_forward(kind, checkpoints):
    path, _ = checkpoints[kind]
    model = tinkerlm.load(str(path)).model
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        prefix = model(ids[:, :7], cache=cache)  # a prefill chunk, then one token at a time
        cache.advance(7)
        steps = [prefix]
        for t in range(7, 20):
            steps.append(model(ids[:, t : t + 1], cache=cache))
            cache.advance(1)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_sliding_window_changes_attention(checkpoints):
    """The Mistral window is applied: with it removed, logits past the window differ."""
    path, ref = checkpoints["mistral-window"]
    model = tinkerlm.load(str(path)).model
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        windowed = model(ids)
        model.config.sliding_window = None
        full = model(ids)
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-6)
    assert (windowed[:, 8:] - full[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_ragged_rows_equal_single_rows(kind, checkpoints):
    """Right-padded prompts of different lengths in one batch decode exactly as each alone (greedy)."""
    path, _ = checkpoints[kind]
    llm = tinkerlm.load(str(path))
    prompts = ["a", "hello there, a longer prompt", "mid size"]
    batched = llm.generate(prompts, max_tokens=12)
    single = [llm.generate(p, max_tokens=12) for p in prompts]
    assert batched == single


def test_prompt_longer_than_context(checkpoints):
    path, _ = checkpoints["gpt2"]
    llm = tinkerlm.load(str(path))
    with pytest.raises(TinkerError, match="do not fit the model's context of 128"):
        llm.generate("x" * 200, max_tokens=4)


def test_sharded_checkpoint_loads_like_single(tmp_path):
    """An HF directory saved in several safetensors shards (with index) gives the same logits."""
    ref = make_hf_model("qwen3", tmp_path / "single")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    from tiny import write_tokenizer

    write_tokenizer(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(ids).logits
        got = tinkerlm.load(str(tmp_path / "sharded")).model(ids)
    assert (got - want).abs().max().item() <= 1e-4
