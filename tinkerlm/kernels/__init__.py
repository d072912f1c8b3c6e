"""The C++ kernels, built on first use with torch's extension tooling for this CPU, and the build cache.

One source per concern: quantized.cpp (pack/unpack incl. K-quant super-blocks, dequantize, int16 x 2..8-bit products), attention.cpp (causal
prefill attention), elementwise.cpp (RMSNorm, RoPE, SwiGLU forward and backward), decode.cpp (the fused Llama decode
step), quantize.cpp (float rows -> ggml's block formats, as llama.cpp quantizes them); common.h (block formats
and the packed layout) and one header per instruction set (isa_avx512.h, isa_avx2.h, isa_plain.h) holding the
inner loops, chosen at compile time; alloc.cpp (a caching CPU allocator for training: `caching_allocator()`). module.cpp
compiles them as one translation unit.

`ops()` returns the compiled module, or None where it cannot be built (no compiler) or is turned off with
TINKERLM_KERNELS=0; callers then take their PyTorch fallbacks (tinkerlm.quant.qops for the quantized ops,
tinkerlm.models.base for the elementwise ones). Callers look the module up through `ops()` at each call (as
`kernels.ops()` or an import inside the function), so replacing `ops` here reaches them all (tests and profilers do).
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
MODULE = HERE / "module.cpp"  # includes every other source
FULL_ISA = "avx512-vnni"  # `ops().isa` of the build with every vector path (prefill products, attention)
# Builds whose causal attention kernel (attention.cpp) beats torch's flash attention for CPU, and up to how many keys
# (None: any): AVX-512 ~1.5x; AVX2 (Zen 3, 2 threads, grouped heads of 64) 1.35-2.1x up to 512 keys, 1.1x at 1,024,
# 0.87-0.94x at 2,048 (its score rows outgrow the cache). The scalar build's tiles are 10-18x slower than torch's.
ATTENTION_ISAS = {FULL_ISA: None, "avx2": 1024}
# Every build's flags (part of the cache key). Functions start on 64-byte lines: a hot loop's place within its
# lines then no longer moves with edits elsewhere in the file (one such 16-byte shift cost AVX2 prefill products
# 7% on Zen 3: 49.5 -> 46 GMAC/s; bench/matvec_bench.py --rows 256).
BASE_FLAGS = ("-O3", "-march=native", "-falign-functions=64", "-fopenmp")


def sources() -> list[Path]:
    """Every C++ source and header of the kernels (what the build cache's key covers)."""
    return sorted(p for p in HERE.iterdir() if p.suffix in (".cpp", ".h"))


@lru_cache(maxsize=1)
def ops():
    """The compiled kernels, or None (then the PyTorch fallbacks run)."""
    if os.environ.get("TINKERLM_KERNELS", "1") == "0":
        return None
    try:
        return build()
    except Exception as e:  # no compiler, no ninja, a build error: fall back, say so once
        log.warning("tinkerlm: CPU kernels unavailable (%s); using the slower PyTorch path", str(e).splitlines()[0])
        return None


def build(flags: tuple[str, ...] = ()):
    """Compile the kernels for this CPU (-O3 -march=native, then `flags`), or import the cached build; raises on
    failure. Builds are cached under a name hashing the sources, the flags and this CPU's features, so a cache
    shared between machines never hands one a build for another's instruction set. A flag turning off a feature
    this CPU lacks (`-mno-avx512f` on an AVX2 machine) changes nothing, so it is dropped: such a build is the
    native one."""
    from torch.utils.cpp_extension import _get_build_directory, load

    have = _cpu_flags()
    flags = tuple(f for f in flags if not (f.startswith("-mno-") and have and f[5:].replace("-", "_") not in have))
    name = "tinkerlm_kernels_" + _build_hash(flags)
    folder = Path(_get_build_directory(name, verbose=False))
    built = folder / f"{name}.so"
    if not built.exists():
        with _build_lock(folder):
            if not built.exists():  # another process may have built it while this one waited
                print("tinkerlm: compiling CPU kernels (once, about a minute)...", file=sys.stderr, flush=True)
                return load(
                    name=name,
                    sources=[str(MODULE)],
                    extra_cflags=[*BASE_FLAGS, *flags],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
    # import the cached build directly: asking ninja whether it is current costs seconds
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, built)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def _build_lock(folder: Path):
    """Hold an advisory lock (flock, released by the OS when its holder dies) on `folder` while building there.

    torch's extension builder marks a build in progress with a `lock` file and waits, without limit, for it to
    disappear; a build that was killed (Ctrl-C during the first compile) leaves it behind, and every later import
    hung. Every tinkerlm build holds this flock while torch's `lock` file exists, so one found while holding the
    flock is a dead builder's: it is removed (with a line saying so) instead of waited on."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tinkerlm.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = folder / "lock"
            if stale.exists():
                print(f"tinkerlm: removing {stale}, left by a kernel build that was stopped", file=sys.stderr)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@lru_cache(maxsize=1)
def _cpu_line() -> str:
    """This CPU's architecture and feature-flags line from /proc/cpuinfo ("" where there is none)."""
    import platform

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return cpu


def _cpu_flags() -> set[str]:
    """The feature names /proc/cpuinfo lists for this CPU (an empty set where it lists none)."""
    line = _cpu_line()
    return set(line.partition(":")[2].split()) if ":" in line else set()


def _build_hash(flags: tuple[str, ...]) -> str:
    import hashlib

    cpu = _cpu_line()
    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return hashlib.sha256(digest.digest() + repr(BASE_FLAGS + flags).encode() + cpu.encode()).hexdigest()[:12]


def caching_allocator(enable: bool = True, cap_bytes: int | None = None) -> bool:
    """Make alloc.cpp's caching allocator PyTorch's CPU allocator (enable=False: the default one back) for tensors
    allocated from now on; blocks of 256 KiB and more are then reused by size class instead of going through glibc
    malloc, and at most `cap_bytes` (default 1 GiB) of freed blocks are kept. Returns False (nothing changed) where
    the kernels are unavailable. Tensors free through the allocator that made them, whichever is installed."""
    mod = ops()
    if mod is None:
        return False
    mod.alloc_install(enable, -1 if cap_bytes is None else cap_bytes)
    return True


def allocator_stats() -> dict[str, int]:
    """The caching allocator's live_bytes, cached_bytes, peak_live_bytes, peak_footprint_bytes (live + cached),
    hits, misses, unmaps, cap_bytes, live_blocks, installed (0/1); {} without the kernels."""
    mod = ops()
    return {} if mod is None else {**mod.alloc_stats(), "installed": int(mod.alloc_installed())}


def allocator_release() -> int:
    """Unmap every cached-but-free block of the caching allocator; returns the bytes given back."""
    mod = ops()
    return 0 if mod is None else mod.alloc_release()
