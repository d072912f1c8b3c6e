"""The kernels package's build cache: its key covers every C++ source and header, so editing any of them (an
instruction-set header included) builds anew instead of importing a stale module."""

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
