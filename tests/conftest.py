"""Shared fixtures: an isolated store per test, and the real default model cached across runs."""

import os
from pathlib import Path

import pytest

# Tests never reach a real hub; the hub tests start their own stand-in server.
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

CACHE = Path(os.environ.get("TINKERLM_TEST_CACHE", Path.home() / ".cache" / "tinkerlm-test"))


@pytest.fixture(autouse=True)
def store_home(tmp_path, monkeypatch):
    """Every test gets an empty store, so no test sees another's models or the user's."""
    home = tmp_path / "store"
    monkeypatch.setenv("TINKERLM_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF, pulled once through the real catalogue path into a cache kept across runs."""
    from tinkerlm import store

    home = CACHE / "store"
    old = os.environ.get("TINKERLM_HOME")
    os.environ["TINKERLM_HOME"] = str(home)
    try:
        manifest = store.pull("smollm2", progress=False)
        return store.model_path(manifest)
    finally:
        if old is None:
            os.environ.pop("TINKERLM_HOME", None)
        else:
            os.environ["TINKERLM_HOME"] = old
