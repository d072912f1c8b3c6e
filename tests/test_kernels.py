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
