"""The kernels package's build cache: its key covers every C++ source and header, so editing any of them (an
instruction-set header included) builds anew instead of importing a stale module. And the thread count the kernels get, from the CPUs this process may use."""

import os
import subprocess
import sys

import pytest

from tinkerlm import kernels


def test_build_cache_key_covers_every_source(tmp_path, monkeypatch):
    names = {p.name for p in kernels.sources()}
    assert {"module.cpp", "common.h", "isa_avx512.h", "isa_avx2.h", "isa_plain.h", "decode.cpp"} <= names
    for p in kernels.sources():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(kernels, "HERE", tmp_path)
    base = kernels._build_hash(())
    assert kernels._build_hash(("-mno-avx512f",)) != base  # flags count too
    for name in sorted(names):
        f = tmp_path / name
        saved = f.read_bytes()
        f.write_bytes(saved + b"\n")
        assert kernels._build_hash(()) != base, name
        f.write_bytes(saved)
    assert kernels._build_hash(()) == base


def test_kernels_run_without_the_gil():
    """While one thread is inside a kernel, another runs Python: the server's event loop is not stalled by decoding.
    A kernel holding the GIL lets the other thread in only after it returns, so none of that thread's time stamps
    would fall in the first half of a long call."""
    import threading
    import time

    import torch

    from tinkerlm.quant import qops
    from tinkerlm.quant.qtensor import quantize

    k = kernels.ops()
    w = qops.pack(quantize(torch.randn(4096, 4096), 4))
    x = torch.randn(128, 4096)
    k.qmatmul(x, w.data, w.fmt, w.rows)  # built and warm
    stamps, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0)

    t = threading.Thread(target=tick)
    t.start()
    try:
        while len(stamps) < 10:  # the ticker is running
            time.sleep(0.001)
        early = 0
        for _ in range(5):
            t0 = time.perf_counter()
            k.qmatmul(x, w.data, w.fmt, w.rows)  # 4 GFLOP: tens of milliseconds inside one C++ call
            t1 = time.perf_counter()
            early += sum(t0 < s < (t0 + t1) / 2 for s in stamps[-200000:])
    finally:
        stop.set()
        t.join()
    assert early > 0


def test_a_killed_builds_lock_is_cleared_and_a_live_ones_waited_for(tmp_path):
    """torch's builder waits forever on the `lock` file a killed build leaves; tinkerlm's builds hold a flock while
    that file exists, so one found under the flock is stale and removed, while a live builder's is waited for."""
    import time

    (tmp_path / "lock").touch()  # left by a build that was killed
    with kernels._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    holder = (  # a live builder: holds the flock, makes torch's lock file, works a while, then finishes
        "import fcntl, os, sys, time\n"
        f"folder = {str(tmp_path)!r}\n"
        "with open(os.path.join(folder, 'tinkerlm.flock'), 'a') as h:\n"
        "    fcntl.flock(h, fcntl.LOCK_EX)\n"
        "    open(os.path.join(folder, 'lock'), 'w').close()\n"
        "    print('held', flush=True)\n"
        "    time.sleep(1.0)\n"
        "    open(os.path.join(folder, 'built'), 'w').close()\n"
        "    os.remove(os.path.join(folder, 'lock'))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    start = time.monotonic()
    with kernels._build_lock(tmp_path):
        waited = time.monotonic() - start
        assert (tmp_path / "built").exists()  # entered only once the live builder had finished
    assert proc.wait(timeout=30) == 0
    assert waited > 0.3


def test_flags_for_features_the_cpu_lacks_name_the_native_build(monkeypatch):
    """`-mno-avx512f` on a CPU without AVX-512 compiles the same code as no flag: the same cached build, not a
    second compile (each costs a minute or two)."""
    seen = []
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setattr(kernels, "_build_hash", lambda flags: seen.append(flags) or "x")
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose: "/nonexistent/tinkerlm-test")

    def stop(folder):  # the build would start here
        raise RuntimeError("stop")

    monkeypatch.setattr(kernels, "_build_lock", stop)
    for flags in [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")]:
        try:
            kernels.build(flags)
        except RuntimeError:
            pass
    assert seen == [(), ("-mno-avx2", "-mno-fma")]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_thread_count_follows_the_affinity_mask():
    """`taskset -c N` or a container's cpuset gives tinkerlm one core's worth of threads, not the whole host's.
    The child first widens its mask to every CPU it may use (a test worker is pinned to one)."""
    code = (
        "import os; from tinkerlm.loading import physical_cores; os.sched_setaffinity(0, range(os.cpu_count())); "
        "n = len(os.sched_getaffinity(0)); full = physical_cores(); "
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(n, full, physical_cores())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    n, full, pinned = map(int, out)
    if n < 2:
        pytest.skip("one CPU")
    assert pinned == 1
    assert 1 <= full <= n
