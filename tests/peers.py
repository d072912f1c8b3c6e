"""Peers' readings of the real models, shared by the parity tests (and the test cache they are kept in)."""

import contextlib
import fcntl
import functools
import os
from pathlib import Path

CACHE = Path(os.environ.get("TINKERLM_TEST_CACHE", Path.home() / ".cache" / "tinkerlm-test"))


@contextlib.contextmanager
def cache_lock(name: str):
    """One process at a time fills an entry of the test cache: scripts/test.sh runs the suite in several pytest
    processes (pytest-xdist), and each asks for the session's real models at its start."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def llama_cpp_model(path, **kw):
    """llama.cpp's model of a GGUF (llama-cpp-python), with as many threads as this process has cores: its default
    counts the host's CPUs, and its spinning threads crawl where a test process may use fewer (scripts/test.sh pins
    each pytest worker to its share of the CPUs)."""
    import llama_cpp

    from tinkerlm.loading import physical_cores

    threads = physical_cores()
    return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, **kw)


def transformers_from_gguf(path: Path, kind: str = "model", **kw):
    """transformers' own reading of a GGUF, the peer of the parity tests: `kind` "model" (AutoModelForCausalLM, fp32)
    or "tokenizer" (AutoTokenizer). Its GGUF loader dequantizes with numpy and rebuilds the tokenizer each time (80 s
    for Gemma 3 270M, 40 s for SmolLM2 here), so what it read is saved once under the test cache (the tokenizer as
    transformers saves it; the model's config and weights as safetensors, since transformers refuses to save a model
    read from a GGUF), keyed by the file's sha256 and transformers' version, and later runs load that. A cache
    written by another version, or of another file, is never read; one is renamed into place only when complete."""
    import torch
    import transformers

    folder = CACHE / "transformers" / f"{path.stem}-{kind}-{transformers.__version__}-{_sha256(path)[:16]}"
    if kind == "model":
        cls, kw = transformers.AutoModelForCausalLM, {"dtype": torch.float32, **kw}
    else:
        cls = transformers.AutoTokenizer
    with cache_lock(f"transformers-{path.stem}-{kind}"):  # one process converts, the others wait, then load it
        if not folder.is_dir():
            return _convert(cls, path, kind, kw, folder)
    return _load_saved(folder, kind, kw)


def _convert(cls, path: Path, kind: str, kw: dict, folder: Path):
    """Read `path` with transformers and save what it read into `folder` (renamed into place when complete)."""
    import shutil

    loaded = cls.from_pretrained(str(path.parent), gguf_file=path.name, **kw)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if kind == "model":  # transformers will not save a model it read from a GGUF: its config and weights as they are
        import json

        from safetensors.torch import save_model

        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config))
        save_model(loaded, str(tmp / "model.safetensors"))
    else:
        loaded.save_pretrained(str(tmp))
    try:
        tmp.rename(folder)
    except OSError:  # another run, not under this cache's lock, saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return loaded.eval() if kind == "model" else loaded


def _load_saved(folder: Path, kind: str, kw: dict):
    """What `transformers_from_gguf` saved: a tokenizer as transformers saved it, or a model of the class its config
    names (built by transformers from the config) with the weights it had read."""
    import transformers

    if kind != "model":
        return transformers.AutoTokenizer.from_pretrained(str(folder), **kw)
    from safetensors.torch import load_model

    config = transformers.AutoConfig.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_config(config, **kw)
    load_model(model, str(folder / "model.safetensors"))
    return model.eval()


@functools.cache
def _sha256(path: Path) -> str:
    """The file's sha256, hashed once per test session (the tests sharing a peer ask again and again)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
