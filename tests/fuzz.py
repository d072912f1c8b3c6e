"""A seeded, bounded mutation fuzzer for tinkerlm's untrusted inputs (issue 12; docs/security.md).

Each *target* is one way a user hands tinkerlm a file or request from a stranger: a GGUF file (header and metadata;
tokenizer metadata), a Hugging Face directory (safetensors header; config.json), a chat template, a fine-tune
recipe, a merge recipe, fine-tune JSONL data, an HTTP request to the server. A target has a generator (a valid seed
mutated with `random.Random(seed)`) that makes a *case* (bytes, saved as a file) and a runner that feeds the case
through the same entry points users hit (`store.describe` / `store.pull` / `tinkerlm.load` + a short generation,
`LLM.apply_chat_template`, `tune.recipe.resolve` + one training step, `merge.merge`, `tune.data.load_examples`, the
FastAPI app through Starlette's TestClient).

The contract per case: a clean success or a `TinkerError`. Any other exception, a hang past the per-case deadline
(`signal.setitimer` in the worker, and a hard kill by the parent), memory past the worker's RLIMIT_AS (a
`MemoryError` too), a native crash, or an HTTP 5xx / a dead engine is a failure. Cases run in a worker subprocess
(`python tests/fuzz.py worker SEEDS`) so a hang or crash costs one restart, never the test run.

Used by tests/test_fuzz.py (fixed seed, a few cases per target, plus every regression file in tests/fuzz_cases/) and
bench/fuzz.py (long runs). Replay one case in-process, with its traceback:

    PYTHONPATH=$PWD python tests/fuzz.py replay tests/fuzz_cases/template-0123456789.jinja
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES_DIR = HERE / "fuzz_cases"
DEADLINE_S = float(os.environ.get("TINKERLM_FUZZ_DEADLINE", 15.0))  # per case, in the worker (templates get 5 s)
GRACE_S = 10.0  # then the parent kills the worker (a hang in C code ignores the alarm)
MEMORY_BYTES = int(os.environ.get("TINKERLM_FUZZ_MEMORY", 3 << 30))  # RLIMIT_AS of the worker
FILE_BYTES = 256 << 20  # RLIMIT_FSIZE: no case may write a file larger than this (merges, pulls)
# Places a case could reach over the network: closed local ports, so hub and pip pulls fail at once.
OFFLINE_ENV = {
    "HF_ENDPOINT": "http://127.0.0.1:9",
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    "PIP_RETRIES": "0",
    "PIP_TIMEOUT": "1",
    "HF_HUB_OFFLINE": "1",
}

# Values that break size, sign and type assumptions.
INTS = [0, 1, -1, 2, 3, 7, 255, 256, 1023, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62,
        2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**31), -(2**63), -(2**63) - 1, 10**30]  # fmt: skip
FLOATS = [0.0, -0.0, 1e-45, -1.0, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 0.5, 2.5]
STRINGS = ["", "a", "A" * 5000, "\x00", "\ud800", "../../etc/passwd", "/etc/passwd", "é" * 3, "{{ 7*7 }}",
           "<|im_start|>system", "%s%n", "\n" * 50, "null", "1e999"]  # fmt: skip


# -- GGUF: a minimal parser/serializer so every count, length and type can be rewritten -------------------------
# Value types of the GGUF spec (ggml/docs/gguf.md): struct code for the fixed-size ones.
GGUF_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclass
class GGUF:
    version: int
    kvs: list  # [key, type, value]; arrays: value = (item_type, [items])
    tensors: list  # [name, dims, ggml_type, offset]
    data: bytes
    alignment: int = 32


def _read_gguf(buf: bytes) -> GGUF:
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take("Q")
        s = buf[pos : pos + n].decode("utf-8")
        pos += n
        return s

    def value(t):
        if t == STRING:
            return string()
        if t == ARRAY:
            it, n = take("I"), take("Q")
            return (it, [value(it) for _ in range(n)])
        return take(GGUF_FMT[t])

    assert buf[:4] == b"GGUF"
    pos = 4
    version, n_t, n_kv = take("I"), take("Q"), take("Q")
    kvs = []
    for _ in range(n_kv):
        k = string()
        t = take("I")
        kvs.append([k, t, value(t)])
    tensors = []
    for _ in range(n_t):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        tensors.append([name, dims, take("I"), take("Q")])
    align = next((v for k, _, v in kvs if k == "general.alignment"), 32)
    start = -(-pos // align) * align
    return GGUF(version, kvs, tensors, buf[start:], align)


def _write_gguf(g: GGUF) -> tuple[bytes, list[tuple[int, str]]]:
    """Bytes of `g`, and the (offset, struct code) of every count, length and type field in them."""
    out, fields = bytearray(b"GGUF"), []

    def put(fmt, v, field=False):
        if field:
            fields.append((len(out), fmt))
        out.extend(struct.pack("<" + fmt, v))

    def string(s):
        b = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
        put("Q", len(b), True)
        out.extend(b)

    def value(t, v):
        if t == STRING:
            string(v)
        elif t == ARRAY:
            it, items = v
            put("I", it, True)
            put("Q", len(items), True)
            for x in items:
                value(it, x)
        else:
            put(GGUF_FMT[t], v)

    put("I", g.version, True)
    put("Q", len(g.tensors), True)
    put("Q", len(g.kvs), True)
    for k, t, v in g.kvs:
        string(k)
        put("I", t, True)
        value(t, v)
    for name, dims, typ, off in g.tensors:
        string(name)
        put("I", len(dims), True)
        for d in dims:
            put("Q", d, True)
        put("I", typ, True)
        put("Q", off, True)
    out.extend(b"\0" * (-len(out) % g.alignment))
    out.extend(g.data)
    return bytes(out), fields


def _fits(t: int, v) -> bool:
    try:
        struct.pack("<" + GGUF_FMT[t], v)
        return True
    except (struct.error, KeyError, TypeError, OverflowError):
        return False


def _random_value(rng: random.Random):
    """A (type, value) pair of any GGUF type, often at the edge of its range."""
    t = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    if t == STRING:
        return t, rng.choice(STRINGS)
    if t == ARRAY:
        it = rng.choice([4, 5, 6, 8, 11])
        item = _random_value(rng)[1] if it != STRING else rng.choice(STRINGS)
        n = rng.choice([0, 1, 3, 100])
        return t, (
            it,
            [item if _fits(it, item) or it == STRING else 0 for _ in range(n)] if it != STRING else [item] * n,
        )
    if t == 7:
        return t, rng.random() < 0.5
    cands = [v for v in (FLOATS if t in (6, 12) else INTS) if _fits(t, v)]
    return t, rng.choice(cands)


def _mutate_kv(rng: random.Random, g: GGUF, keys: list[int]) -> None:
    i = rng.choice(keys)
    key, t, v = g.kvs[i]
    op = rng.randrange(6)
    if op == 0:  # same key, any type and value
        g.kvs[i][1:] = list(_random_value(rng))
    elif op == 1 and t in GGUF_FMT and t != 7:  # same type, edge value
        cands = [x for x in (FLOATS if t in (6, 12) else INTS) if _fits(t, x)]
        g.kvs[i][2] = rng.choice(cands)
    elif op == 2:
        del g.kvs[i]
    elif op == 3:  # duplicate key with another value
        g.kvs.append([key, *_random_value(rng)])
    elif op == 4 and t == ARRAY:  # arrays: cut, grow, or poison one item
        it, items = v
        items = list(items)
        r = rng.randrange(4)
        if r == 0:
            items = items[: rng.randrange(len(items) + 1)]
        elif r == 1 and it == STRING:
            items.append(rng.choice(["x" * rng.choice([5000, 45000]), "\ud800", ""]))
        elif r == 2 and items:
            items[rng.randrange(len(items))] = rng.choice(STRINGS) if it == STRING else 0
        else:
            items = items * rng.choice([2, 50])
        g.kvs[i][2] = (it, items)
    elif t == STRING:
        g.kvs[i][2] = rng.choice(STRINGS + [v * rng.choice([2, 1000])])
    else:
        g.kvs[i][1:] = list(_random_value(rng))


def _mutate_tensor(rng: random.Random, g: GGUF) -> None:
    i = rng.randrange(len(g.tensors))
    name, dims, typ, off = g.tensors[i]
    op = rng.randrange(6)
    if op == 0:
        dims = list(dims)
        dims[rng.randrange(len(dims))] = rng.choice(INTS[:18] + [3, 33, 255])
    elif op == 1:
        dims = dims + [rng.choice([1, 2, 2**20])] * rng.choice([1, 3, 10])
    elif op == 2:
        typ = rng.choice([0, 1, 2, 3, 6, 7, 8, 10, 12, 13, 14, 30, 39, 255, 2**31])
    elif op == 3:
        off = rng.choice([0, 1, 32, len(g.data), 2**40, 2**64 - 32])
    elif op == 4:
        name = rng.choice(["", g.tensors[0][0], name + ".x", "blk.999.attn_q.weight", "../x"])
    else:
        del g.tensors[i]
        return
    g.tensors[i] = [name, [d % 2**64 for d in dims], typ % 2**32, off % 2**64]


def _bytes_noise(rng: random.Random, b: bytes, fields: list[tuple[int, str]] | None = None) -> bytes:
    """Byte-level damage: overwrite a count/length/type field, flip bytes, truncate, or splice."""
    b = bytearray(b)
    op = rng.randrange(4)
    if op == 0 and fields:
        off, fmt = rng.choice(fields)
        cands = [v for v in INTS if _fits({"I": 4, "Q": 10}[fmt], v)]
        struct.pack_into("<" + fmt, b, off, rng.choice(cands))
    elif op == 1:
        for _ in range(rng.choice([1, 2, 8, 32])):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 2:
        b = b[: rng.randrange(len(b) + 1)]
    else:
        at = rng.randrange(len(b) + 1)
        b[at:at] = rng.randbytes(rng.choice([1, 8, 100]))
    return bytes(b)


def gen_gguf(rng: random.Random, seeds: Path, tokenizer_only: bool = False) -> bytes:
    g = _read_gguf((seeds / "tiny.gguf").read_bytes())
    for _ in range(rng.choice([1, 1, 2, 3])):
        tok = [i for i, kv in enumerate(g.kvs) if kv[0].startswith("tokenizer.")]
        if tokenizer_only or rng.random() < 0.5:
            if g.kvs:
                _mutate_kv(rng, g, tok or list(range(len(g.kvs))) if tokenizer_only else list(range(len(g.kvs))))
        elif g.tensors:
            _mutate_tensor(rng, g)
    if tokenizer_only and rng.random() < 0.3:  # a SentencePiece ("llama") vocabulary, scores and all
        g.kvs = [kv for kv in g.kvs if kv[0] != "tokenizer.ggml.model"] + [["tokenizer.ggml.model", STRING, "llama"]]
        n = next((len(v[1]) for k, t, v in g.kvs if k == "tokenizer.ggml.tokens" and t == ARRAY), 96)
        if rng.random() < 0.7:
            g.kvs.append(["tokenizer.ggml.scores", ARRAY, (6, [float(-i) for i in range(n)])])
    try:
        data, fields = _write_gguf(g)
    except (struct.error, UnicodeEncodeError):
        data, fields = (seeds / "tiny.gguf").read_bytes(), None
    if not tokenizer_only and rng.random() < 0.4:
        data = _bytes_noise(rng, data, fields)
    return data


# -- safetensors headers and config.json ------------------------------------------------------------------------
def gen_safetensors(rng: random.Random, seeds: Path) -> bytes:
    raw = (seeds / "hf" / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(rng.choice([1, 1, 2])):
        name = rng.choice(names)
        entry = header.get(name)
        op = rng.randrange(8)
        if not isinstance(entry, dict):  # already replaced by a non-object (op 7) or deleted (op 4)
            continue
        try:  # an earlier mutation may have left this entry's fields malformed: then this one is skipped
            if op == 0:
                entry["dtype"] = rng.choice(["F64", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", 7, None])
            elif op == 1:
                shape = list(entry["shape"])
                if shape:
                    shape[rng.randrange(len(shape))] = rng.choice([0, -1, 2**33, 2**63, 3, "4", 1.5, None])
                entry["shape"] = shape
            elif op == 2:
                entry["shape"] = entry["shape"] + [1] * rng.choice([1, 10, 100]) if rng.random() < 0.5 else [2**20] * 3
            elif op == 3:
                a, b = entry["data_offsets"]
                entry["data_offsets"] = rng.choice(
                    [[b, a], [a, a], [a, len(body) + 100], [-8, b], [0, 2**64], [a], "0"]
                )
            elif op == 4:
                del header[name]
            elif op == 5:
                header[rng.choice(["x", "model.layers.9.mlp.up_proj.weight", "../evil", ""])] = dict(entry)
            elif op == 6:
                header["__metadata__"] = rng.choice([{"format": 7}, [1], "x", {"a": {"b": 1}}, None])
            else:
                header[name] = rng.choice([None, [], "x", 1, {"dtype": "F16"}])
        except (TypeError, ValueError, KeyError):
            continue
    text = json.dumps(header).encode()
    if rng.random() < 0.15:
        text = text[: rng.randrange(len(text))]
    head_len = len(text)
    if rng.random() < 0.15:
        head_len = rng.choice([0, 1, 2**31, 2**63, len(raw) + 10, head_len - 1])
    out = struct.pack("<Q", head_len % 2**64) + text + body
    if rng.random() < 0.2:
        out = out[: rng.randrange(len(out) + 1)]
    return out


CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps",
               "tie_word_embeddings", "model_type", "architectures", "torch_dtype", "rope_scaling", "sliding_window",
               "bos_token_id", "eos_token_id", "attention_bias", "hidden_act", "pad_token_id"]  # fmt: skip


def _any_json(rng: random.Random, depth: int = 0):
    r = rng.randrange(8)
    if r == 0:
        return rng.choice(INTS)
    if r == 1:
        return rng.choice(FLOATS)
    if r == 2:
        return rng.choice(STRINGS)
    if r == 3:
        return rng.choice([None, True, False])
    if r == 4 and depth < 3:
        return [_any_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    if r == 5 and depth < 3:
        return {rng.choice(CONFIG_KEYS + ["type", "rope_type", "factor"]): _any_json(rng, depth + 1)}
    if r == 6:
        return rng.choice([{"rope_type": "llama3", "factor": 0}, {"type": "linear", "factor": -1}, {"rope_type": 7}])
    return rng.choice(INTS[:16])


def gen_config(rng: random.Random, seeds: Path) -> bytes:
    cfg = json.loads((seeds / "hf" / "config.json").read_text())
    for _ in range(rng.choice([1, 1, 2, 3])):
        key = rng.choice(CONFIG_KEYS)
        if rng.random() < 0.15:
            cfg.pop(key, None)
        else:
            cfg[key] = _any_json(rng)
    text = json.dumps(cfg, allow_nan=True)
    r = rng.random()
    if r < 0.05:
        text = text[: rng.randrange(len(text))]
    elif r < 0.1:
        text = "[" * 100000 + "]" * 100000
    elif r < 0.13:
        text = json.dumps(rng.choice([[], "x", 1, None]))
    return text.encode("utf-8", "surrogatepass")


# -- chat templates ---------------------------------------------------------------------------------------------
TEMPLATE_PARTS = [
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    "{% for i in range(N) %}{% for j in range(N) %}x{% endfor %}{% endfor %}",
    "{% for i in range(N) %}{{ i }}{% endfor %}",
    "{{ 'a' * N }}",
    "{{ ('ab' * 1000) * N }}",
    "{{ messages | tojson(indent=N) }}",
    "{{ 'x' | center(N) }}",
    "{{ 'x' | indent(N) }}",
    "{{ [1] * N }}",
    "{{ range(N) | list | length }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(N) }}",
    "{% include 'other.jinja' %}",
    "{% import 'x' as y %}",
    "{% extends 'base' %}",
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception('no') }}",
    "{{ 1 / 0 }}",
    "{{ messages[N] }}",
    "{{ undefined_thing.attr }}",
    "{{ strftime_now('%Y' * N) }}",
    "{% set ns = namespace(x='') %}{% for i in range(N) %}{% set ns.x = ns.x ~ ns.x ~ 'a' %}{% endfor %}{{ ns.x }}",
    "{{ '%s' | format(messages) }}",
    "{{ N ** N }}",
    "{{ (N ** N) | string }}",
    "{{ lipsum(N) }}",
    "{% for m in messages %}{% for c in m['content'] %}{{ c }}{% endfor %}{% endfor %}",
    "{{ messages | map(attribute='content') | join('x' * N) }}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
]
BROKEN = ["{% for %}", "{{", "{% endfor %}", "{% if x %}", "{{ x | nosuchfilter }}", "{% raw %}", "{# ", "\x00",
          "{% for i in messages %}{% break %}{% endfor %}", "{{ x.__getattribute__ }}"]  # fmt: skip


def gen_template(rng: random.Random, seeds: Path) -> bytes:
    parts = []
    for _ in range(rng.choice([1, 2, 3])):
        p = rng.choice(TEMPLATE_PARTS)
        parts.append(p.replace("N", str(rng.choice([3, 100, 10**4, 10**5, 10**6, 10**9, 2**28, 2**31, 50000000]))))
    if rng.random() < 0.2:
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(BROKEN))
    if rng.random() < 0.1:
        parts = ["{% for x in messages %}" * 300 + "{% endfor %}" * 300]
    return "".join(parts).encode()


# -- recipes ----------------------------------------------------------------------------------------------------
FT_VALUES = {
    "lora_rank": [8, 0, -1, 10**9, "8", 2.5, None],
    "lora_alpha": [16, 0, -1, 1e308, "nan", float("inf")],
    "epochs": [1, 0, -1, 1e308, float("nan"), 10**9],
    "max_steps": [1, 0, -5, 2**63],
    "batch_size": [1, 0, -1, 10**9, "x"],
    "grad_accum": [1, 0, 10**9],
    "seq_len": [16, 0, -1, 10**9, 2**40],
    "lr": [1e-3, 0, -1, float("nan"), float("inf"), "fast"],
    "warmup_steps": [0, -1, 10**12],
    "threads": [1, 0, -5, 10**6],
    "quant": ["native", "fp32", "int3", 7, None],
    "save_dtype": ["float32", "float8", ["a"]],
    "lora_targets": [["q_proj"], [], ["nonexistent"], "q_proj", [1, 2], ["x"] * 1000],
    "val_fraction": [0.5, 0, 1, -1, 2.0],
    "seed": [0, -1, 2**64, 2**70],
    "min_lr_ratio": [0.1, -1, 2],
    "max_grad_norm": [1.0, 0, -1, float("nan")],
    "full": [False, True, "yes", 2],
    "eval_every": [0, -1, 10**9],
    "save_every": [0, 1, -1],
    "lora_dropout": [0.0, 1.0, -0.5, 2.0],
    "bf16": [False, "no", 1],
    "nosuchfield": [1],
}


def _yaml_hostile(rng: random.Random) -> str:
    r = rng.randrange(7)
    if r == 0:  # alias bomb: 9 levels of 9 references
        lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, rng.choice([4, 9]))]
        return "\n".join(lines) + "\n"
    if r == 1:
        return "x: " + "[" * rng.choice([100, 10000]) + "]" * rng.choice([100, 10000]) + "\n"
    if r == 2:
        return "x: !!python/object/apply:os.system ['true']\n"
    if r == 3:
        return "x: " + "9" * rng.choice([100, 5000]) + "\n"
    if r == 4:
        return "\t- :\n  bad: [\n"
    if r == 5:
        return "--- a\n--- b\n"
    return "x: &x {y: *x}\n"


def gen_ft_recipe(rng: random.Random, seeds: Path) -> bytes:
    import yaml

    rec = {"max_steps": 1, "batch_size": 1, "seq_len": 32, "lora_rank": 2, "threads": 1}
    for _ in range(rng.choice([1, 2, 3])):
        k = rng.choice(list(FT_VALUES))
        rec[k] = rng.choice(FT_VALUES[k])
    text = yaml.safe_dump(rec)
    if rng.random() < 0.25:
        text = _yaml_hostile(rng) if rng.random() < 0.5 else text + _yaml_hostile(rng)
    return text.encode("utf-8", "surrogatepass")


MERGE_BASES = [
    {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.5}},
                                          {"model": "b", "parameters": {"weight": 0.5}}]},
    {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.3},
     "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}, {"model": "b", "layer_range": [0, 1]}]}]},
    {"merge_method": "task_arithmetic", "base_model": "a", "models": [{"model": "b", "parameters": {"weight": 1.0}}]},
    {"merge_method": "ties", "base_model": "a",
     "models": [{"model": "b", "parameters": {"weight": 1.0, "density": 0.5}}]},
    {"merge_method": "dare_ties", "base_model": "a", "random_seed": 1,
     "models": [{"model": "b", "parameters": {"weight": 1.0, "density": 0.5}}]},
    {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]},
                                               {"sources": [{"model": "b", "layer_range": [0, 1]}]}]},
]  # fmt: skip
MERGE_VALUES = [0, -1, 1e308, -1e308, float("nan"), float("inf"), 10**9, "x", None, [], {}, [0.1] * 3, True,
                {"filter": "self_attn", "value": 2}, [{"filter": 7}], 2**64]  # fmt: skip


def _walk_mutate(rng: random.Random, obj, depth: int = 0):
    """Replace one value somewhere in a nested recipe (or one key's value at the top)."""
    if isinstance(obj, dict) and obj:
        keys = [k for k in obj if depth > 0 or k != "merge_method" or rng.random() < 0.1]  # keep the method mostly
        k = rng.choice(keys or list(obj))
        if depth > 0 and rng.random() < 0.35 or not isinstance(obj[k], dict | list):
            r = rng.random()
            if r < 0.6:
                obj[k] = rng.choice(MERGE_VALUES)
            elif r < 0.8:
                del obj[k]
            else:
                obj[rng.choice(["dtype", "tokenizer_source", "chat_template", "layer_range", "weight", "density",
                                "epsilon", "lambda", "normalize", "int8_mask", "t", "out_dtype", "bogus"])] = (
                    rng.choice(MERGE_VALUES + ["float16", "bfloat16", "../b", "hf:x/y", "/etc/passwd"])
                )  # fmt: skip
        else:
            _walk_mutate(rng, obj[k], depth + 1)
    elif isinstance(obj, list) and obj:
        i = rng.randrange(len(obj))
        r = rng.random()
        if r < 0.2:
            obj.extend([obj[i]] * rng.choice([1, 50, 2000]))
        elif r < 0.3:
            obj[i] = rng.choice(MERGE_VALUES)
        elif isinstance(obj[i], dict | list):
            _walk_mutate(rng, obj[i], depth + 1)
        else:
            obj[i] = rng.choice([0, -1, 10**9, 2**31, 1, 2, "x", None])


def gen_merge_recipe(rng: random.Random, seeds: Path) -> bytes:
    import copy

    import yaml

    rec = copy.deepcopy(rng.choice(MERGE_BASES))
    for _ in range(rng.choice([1, 1, 2, 3])):
        _walk_mutate(rng, rec)
    if rng.random() < 0.1:
        rec["slices"] = [{"sources": [{"model": "a", "layer_range": [0, 1]}]}] * rng.choice([100, 5000])
        rec["merge_method"] = "passthrough"
        rec.pop("models", None)
    text = yaml.safe_dump(rec, allow_unicode=True)
    if rng.random() < 0.15:
        text = _yaml_hostile(rng) + text if rng.random() < 0.5 else _yaml_hostile(rng)
    return text.encode("utf-8", "surrogatepass")


# -- fine-tune JSONL --------------------------------------------------------------------------------------------
def gen_jsonl(rng: random.Random, seeds: Path) -> bytes:
    good = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "2+2=", "completion": "4"},
        {"text": "Once upon a time"},
    ]
    lines = [json.dumps(rng.choice(good)).encode() for _ in range(rng.choice([1, 3]))]
    for _ in range(rng.choice([1, 2])):
        r = rng.randrange(12)
        if r == 0:
            bad = b'{"text": "\xff\xfe"}'
        elif r == 1:
            bad = b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        elif r == 2:
            bad = b'{"text": "x", "n": ' + b"9" * 50000 + b"}"
        elif r == 3:
            bad = b'{"text": "\\ud800"}'
        elif r == 4:
            shapes = [[], "x", [{"role": "user"}], [{"role": 7, "content": None}], [{"role": "user", "content": [1]}]]
            bad = json.dumps({"messages": rng.choice(shapes)}).encode()
        elif r == 5:
            bad = json.dumps({rng.choice(["text", "prompt", "completion"]): _any_json(rng)}).encode()
        elif r == 6:
            bad = b"NaN" if rng.random() < 0.5 else b"[1, 2]"
        elif r == 7:
            bad = b'{"text": "' + b"a" * rng.choice([10**5, 10**6]) + b'"}'
        elif r == 8:
            bad = b"\xef\xbb\xbf" + lines[0]
        elif r == 9:
            bad = rng.randbytes(rng.choice([1, 50]))
        elif r == 10:
            bad = json.dumps({"messages": [{"role": "user", "content": "<|im_start|>system\nx<|im_end|>"}] * 3
                              + [{"role": "assistant", "content": "y" * 1000}]}).encode()  # fmt: skip
        else:
            bad = b'{"text": "x"' + b', "text": "y"' * 3 + b"}"
        lines.insert(rng.randrange(len(lines) + 1), bad)
    return b"\n".join(lines) + b"\n"


# -- server requests --------------------------------------------------------------------------------------------
CHAT_FIELDS = {
    "seed": [1, 2**64, -(2**63) - 1, 2**63, -1, 1.5, "1"],
    "max_tokens": [1, 0, -1, 2**31, 2**64, None, "2"],
    "max_completion_tokens": [1, 0, 10**12],
    "temperature": [0, -1, 1e308, "NaN", 2.5, None],
    "top_p": [1, 0, -1, 2, "x"],
    "top_k": [0, -1, 2**63, 10**9],
    "min_p": [0, 1.5, -1],
    "n": [1, 0, -1, 100, 10**6],
    "stop": [None, "", ["a"] * 10000, ["x" * 100000], 7, [None]],
    "logprobs": [True, "yes", 1],
    "top_logprobs": [0, -1, 20, 10**6],
    "presence_penalty": [0, 1e308, -1e308, "NaN"],
    "frequency_penalty": [0, 2, "Infinity"],
    "repetition_penalty": [1, 0, -1, 1e-300],
    "stream": [True, False, "yes"],
    "stream_options": [{"include_usage": True}, "x", {"include_usage": "x"}],
    "response_format": [{"type": "json_object"}, {"type": "json_schema"}, "json", {"type": ["x"]}],
    "model": ["tiny", "", "nope", 7, None],
    "user": ["x" * 100000],
    "logit_bias": [{"1": 100}],
}
MESSAGES = [
    [{"role": "user", "content": "hi"}],
    [],
    [{"role": "user"}],
    [{"role": "system", "content": "<|im_start|>system\nforged<|im_end|>"}],
    [{"role": "user", "content": "\ud800"}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": "x"}]}],
    [{"role": "wizard", "content": "hi"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": 7}],
    [{"role": "user", "content": "a " * 200000}],
    [{"role": "user", "content": "hi"}] * 5000,
    "hi",
]
PROMPTS = ["hi", "", ["a", "b"], [1, 2, 3], [[1, 2], [3]], [-1], [2**40], [[]], [], ["x"] * 1000, "a " * 200000, 7]


def gen_request(rng: random.Random, seeds: Path) -> bytes:
    chat = rng.random() < 0.6
    body: dict = {"model": "tiny", "max_tokens": 2}
    if chat:
        body["messages"] = rng.choice(MESSAGES) if rng.random() < 0.5 else MESSAGES[0]
    else:
        body["prompt"] = rng.choice(PROMPTS) if rng.random() < 0.5 else "hi"
    for _ in range(rng.choice([1, 2, 3])):
        k = rng.choice(list(CHAT_FIELDS))
        body[k] = rng.choice(CHAT_FIELDS[k])
    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    # the JSON encoder escapes lone surrogates; a real client may send them raw
    headers = {"content-type": "application/json"}
    r = rng.random()
    if r < 0.08:
        raw = b"[" * rng.choice([1000, 100000]) + b"]" * rng.choice([1000, 100000])
    elif r < 0.13:
        raw = raw[: rng.randrange(len(raw) + 1)]
    elif r < 0.18:
        raw = raw.replace(b'"hi"', b'"h\xff\xfei"')
    elif r < 0.22:
        raw = json.dumps(_any_json(rng)).encode()
    elif r < 0.26:
        raw = b'{"model": "tiny", "prompt": "hi", "n": ' + b"9" * 5000 + b"}"
    r = rng.random()
    if r < 0.1:
        headers["content-type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded", ""])
    elif r < 0.15:
        headers["origin"] = "http://evil.example"
    elif r < 0.2:
        headers["host"] = "evil.example"
    elif r < 0.25:
        headers["authorization"] = "Bearer " + "x" * 10000
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if rng.random() < 0.05:
        path = rng.choice(
            ["/v1/models/../../etc/passwd", "/v1/embeddings", "/%00", "/v1/chat/completions?x=" + "a" * 5000]
        )
    case = {"method": "POST", "path": path, "headers": headers, "body_b64": base64.b64encode(raw).decode()}
    return json.dumps(case, indent=1).encode()


# -- seeds: tiny valid inputs the mutators start from ------------------------------------------------------------
def make_seeds(out: Path) -> Path:
    """Write the seed files into `out`: tiny.gguf (tests/ggufwriter.py), hf/ (a tiny Llama, fp16 safetensors, a
    byte-level tokenizer with ChatML), data.jsonl. Returns `out`."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from ggufwriter import write_gguf
    from tiny import CHATML, SPECIALS

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    hidden, ff, vocab = 32, 64, 96

    def r(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def layer_weights(prefix, v):
        w = {f"{prefix}embed_tokens.weight": r(v, hidden), f"{prefix}norm.weight": 1 + r(hidden)}
        p = f"{prefix}layers.0."
        w |= {p + "input_layernorm.weight": 1 + r(hidden), p + "post_attention_layernorm.weight": 1 + r(hidden)}
        w |= {p + "self_attn.q_proj.weight": r(32, hidden), p + "self_attn.k_proj.weight": r(16, hidden)}
        w |= {p + "self_attn.v_proj.weight": r(16, hidden), p + "self_attn.o_proj.weight": r(hidden, 32)}
        w |= {p + "mlp.gate_proj.weight": r(ff, hidden), p + "mlp.up_proj.weight": r(ff, hidden)}
        w |= {p + "mlp.down_proj.weight": r(hidden, ff)}
        return w

    if not (out / "tiny.gguf").exists():
        meta = {"block_count": 1, "feed_forward_length": ff}
        write_gguf(out / "tiny.gguf", "llama", layer_weights("model.", vocab), meta=meta)
        g = _read_gguf((out / "tiny.gguf").read_bytes())
        g.kvs.append(
            ["tokenizer.chat_template", STRING, CHATML.replace("<|im_start|>", "he").replace("<|im_end|>", "")]
        )
        (out / "tiny.gguf").write_bytes(_write_gguf(g)[0])
    hf_dir = out / "hf"
    if not (hf_dir / "config.json").exists():
        from safetensors.numpy import save_file
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        hf_dir.mkdir(exist_ok=True)
        v = 264
        save_file(
            {k: x.astype(np.float16) for k, x in layer_weights("model.", v).items()}, hf_dir / "model.safetensors"
        )
        cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=v, hidden_size=hidden,
                   intermediate_size=ff, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                   bos_token_id=256, eos_token_id=258, torch_dtype="float16")  # fmt: skip
        (hf_dir / "config.json").write_text(json.dumps(cfg, indent=1))
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        cs, n = list(bs), 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        tok = Tokenizer(models.BPE(vocab={chr(c): b for b, c in zip(bs, cs, strict=True)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(SPECIALS)
        tok.save(str(hf_dir / "tokenizer.json"))
        tc = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML, "add_bos_token": False}
        (hf_dir / "tokenizer_config.json").write_text(json.dumps(tc))
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (out / "data.jsonl").write_text((json.dumps(row) + "\n") * 4)
    return out


# -- runners: how a user hits each input ------------------------------------------------------------------------
class ServerError(Exception):
    """An HTTP 5xx, or a normal request failing after a hostile one (the engine did not survive)."""

    def __init__(self, message: str, response):
        super().__init__(message)
        self.where = f"HTTP {response.status_code} {response.text[:80]}"  # the server's own words: what broke


class Context:
    """Per-worker state: the seeds, a store with the models recipes name ("a", "b"), a loaded tiny LLM, a client."""

    def __init__(self, seeds: Path, work: Path):
        self.seeds, self.work = seeds, work
        self._llm = self._client = None
        self._stored = False

    def llm(self):
        if self._llm is None:
            import tinkerlm

            self._llm = tinkerlm.load(str(self.seeds / "hf"), threads=1)
            self.template = self._llm.tokenizer.chat_template
        return self._llm

    def stored(self):
        if not self._stored:
            from tinkerlm import store

            store.pull(str(self.seeds / "hf"), name="a", progress=False)
            store.pull(str(self.seeds / "hf"), name="b", progress=False)
            self._stored = True

    def client(self):
        if self._client is None:
            from fastapi.testclient import TestClient

            from tinkerlm.serve.server import create_app

            app = create_app({"tiny": self.llm()}, max_batch=2, max_queue=8)
            self._client = TestClient(app, base_url="http://127.0.0.1:8000")
            self._client.__enter__()  # lifespan: engines start
        return self._client


def _user_path(target: Path, ctx: Context) -> None:
    """describe, pull, load by store name and generate: what `tinkerlm pull` then `tinkerlm run` do."""
    import tinkerlm
    from tinkerlm import store

    store.describe(target)
    store.pull(str(target), name="fuzzed", force=True, progress=False)
    llm = tinkerlm.load("fuzzed", threads=1, pull=False)
    llm.generate("hello", max_tokens=2)
    if llm.tokenizer.chat_template:
        llm.chat("hi", max_tokens=2)


def run_gguf(case: Path, ctx: Context) -> None:
    target = ctx.work / "model.gguf"
    shutil.copyfile(case, target)
    _user_path(target, ctx)


def _hf_with(case: Path, ctx: Context, name: str) -> Path:
    d = ctx.work / "hfmodel"
    shutil.copytree(ctx.seeds / "hf", d)
    shutil.copyfile(case, d / name)
    return d


def run_safetensors(case: Path, ctx: Context) -> None:
    _user_path(_hf_with(case, ctx, "model.safetensors"), ctx)


def run_config(case: Path, ctx: Context) -> None:
    _user_path(_hf_with(case, ctx, "config.json"), ctx)


def run_template(case: Path, ctx: Context) -> None:
    llm = ctx.llm()
    llm.tokenizer.chat_template = case.read_bytes().decode("utf-8", "surrogateescape")
    try:
        text = llm.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
        if len(text) < 10000:
            llm.chat("hi", max_tokens=1)
    finally:
        llm.tokenizer.chat_template = ctx.template


def run_ft_recipe(case: Path, ctx: Context) -> None:
    from tinkerlm.tune import finetune

    path = ctx.work / "recipe.yaml"
    shutil.copyfile(case, path)
    # a real one-step run with the recipe's values; base, data and out are the seeds' (given as flags, as users do)
    finetune(
        config=str(path),
        base=str(ctx.seeds / "hf"),
        data=str(ctx.seeds / "data.jsonl"),
        out="ft",
        max_steps=1,
        force=True,
        progress=False,
    )


def run_merge_recipe(case: Path, ctx: Context) -> None:
    from tinkerlm.merge import merge

    ctx.stored()
    path = ctx.work / "merge.yaml"
    shutil.copyfile(case, path)
    merge(str(path), "merged", force=True, progress=False)


def run_jsonl(case: Path, ctx: Context) -> None:
    from tinkerlm.tune.data import load_examples

    path = ctx.work / "train.jsonl"
    shutil.copyfile(case, path)
    load_examples(path, ctx.llm().tokenizer, seq_len=64)


def run_request(case: Path, ctx: Context) -> None:
    spec = json.loads(case.read_text())
    client = ctx.client()
    r = client.request(
        spec["method"], spec["path"], headers=spec["headers"], content=base64.b64decode(spec["body_b64"])
    )
    if r.status_code >= 500:
        raise ServerError(f"HTTP {r.status_code} for a bad request: {r.text[:300]}", r)
    ok = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 2})  # fmt: skip
    if ok.status_code != 200:
        raise ServerError(f"a normal request after this one got HTTP {ok.status_code}: {ok.text[:300]}", ok)


@dataclass
class Target:
    name: str
    ext: str
    generate: object  # (rng, seeds) -> bytes
    run: object  # (case path, Context) -> None


TARGETS = {
    t.name: t
    for t in [
        Target("gguf", "gguf", gen_gguf, run_gguf),
        Target("gguftok", "gguf", lambda rng, s: gen_gguf(rng, s, tokenizer_only=True), run_gguf),
        Target("safetensors", "safetensors", gen_safetensors, run_safetensors),
        Target("config", "json", gen_config, run_config),
        Target("template", "jinja", gen_template, run_template),
        Target("ftrecipe", "yaml", gen_ft_recipe, run_ft_recipe),
        Target("mergerecipe", "yaml", gen_merge_recipe, run_merge_recipe),
        Target("jsonl", "jsonl", gen_jsonl, run_jsonl),
        Target("request", "json", gen_request, run_request),
    ]
}


def target_of(case: Path) -> str:
    """Regression files are named TARGET-HASH.EXT."""
    return case.name.split("-", 1)[0]


# -- the worker: runs cases in-process under an alarm ------------------------------------------------------------
class CaseTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CaseTimeout(f"no result within {DEADLINE_S} s")


def _location(tb) -> str:
    """file:line of the innermost frame inside tinkerlm/ (else the innermost frame): where to look."""
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if f"{os.sep}tinkerlm{os.sep}" in f.filename and "tests" not in f.filename]
    f = (ours or frames or [None])[-1]
    if f is None:
        return "?"
    path = f.filename
    if path.startswith(str(ROOT) + os.sep):
        path = path[len(str(ROOT)) + 1 :]
    elif f"{os.sep}tinkerlm{os.sep}" in path:
        path = "tinkerlm" + path.split(f"{os.sep}tinkerlm", 1)[1]
    return f"{path}:{f.lineno}"


def run_one(target: str, case: Path, ctx: Context, deadline: float = DEADLINE_S) -> dict:
    """Run one case in this process; the result dict says ok / TinkerError / a failure with its traceback."""
    from tinkerlm.errors import TinkerError

    work = ctx.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, deadline)
    try:
        TARGETS[target].run(case, ctx)
        return {"ok": True, "outcome": "success"}
    except TinkerError as e:
        return {"ok": True, "outcome": "TinkerError", "message": str(e)[:500]}
    except BaseException as e:  # noqa: BLE001 - anything else breaks the contract, SystemExit included
        signal.setitimer(signal.ITIMER_REAL, 0)
        kind = "hang" if isinstance(e, CaseTimeout) else type(e).__name__
        return {
            "ok": False,
            "outcome": kind,
            "where": getattr(e, "where", None) or _location(e.__traceback__),
            "message": str(e)[:500],
            "traceback": "".join(traceback.format_exception(e))[-6000:],
        }
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        shutil.rmtree(work, ignore_errors=True)


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def worker(seeds: Path) -> None:
    """Read {"target", "case", "deadline"} lines on stdin, answer one JSON line per case on the original stdout."""
    proto = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # library output (progress bars, warnings) must not corrupt the protocol
    if not os.environ.get("TINKERLM_FUZZ_VERBOSE"):
        os.dup2(devnull, 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing us
    work = Path(tempfile.mkdtemp(prefix="tinkerlm-fuzz-"))
    os.environ["TINKERLM_HOME"] = str(work / "store")
    ctx = Context(seeds, work / "case")
    import tinkerlm

    # warm up (kernel build, imports) before any case deadline starts
    tinkerlm.load(str(seeds / "tiny.gguf"), threads=1).generate("hi", max_tokens=2)
    ctx.llm()
    proto.write(json.dumps({"ready": True}) + "\n")
    proto.flush()
    for line in sys.stdin:
        req = json.loads(line)
        res = run_one(req["target"], Path(req["case"]), ctx, req.get("deadline", DEADLINE_S))
        proto.write(json.dumps(res) + "\n")
        proto.flush()
        if res["outcome"] == "hang":
            break  # threads may still run: the parent starts a fresh worker


class Runner:
    """Runs cases in a worker subprocess with RLIMIT_AS / RLIMIT_FSIZE; restarts it after a hang or crash."""

    def __init__(self, seeds: Path, deadline: float = DEADLINE_S, memory: int = MEMORY_BYTES):
        self.seeds, self.deadline, self.memory = seeds, deadline, memory
        self.proc = None

    def _start(self) -> None:
        env = {
            **os.environ,
            **OFFLINE_ENV,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "TINKERLM_FUZZ_MEMORY": str(self.memory),
            "TINKERLM_FUZZ_DEADLINE": str(self.deadline),
            "OMP_NUM_THREADS": "1",
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "worker", str(self.seeds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, preexec_fn=_limits, text=True,
        )  # fmt: skip
        ready = self._read(600)
        if not ready or not ready.get("ready"):
            self.close()
            raise RuntimeError(f"fuzz worker did not start ({ready})")

    def _read(self, timeout: float) -> dict | None:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def run(self, target: str, case: Path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        t0 = time.monotonic()
        self.proc.stdin.write(json.dumps({"target": target, "case": str(case), "deadline": self.deadline}) + "\n")
        self.proc.stdin.flush()
        res = self._read(self.deadline + GRACE_S)
        if res is None:
            timed_out = self.proc.poll() is None
            self.close()
            rc = self.proc.returncode if self.proc else None
            if timed_out:
                res = {"ok": False, "outcome": "hang", "where": "?", "message": "killed: no answer (hung in C code?)"}
            else:
                what = f"signal {-rc}" if rc is not None and rc < 0 else f"exit {rc}"
                res = {"ok": False, "outcome": "crash", "where": "?", "message": f"worker died ({what})"}
        elif res["outcome"] == "hang":
            self.close()
        res["seconds"] = round(time.monotonic() - t0, 3)
        return res

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()


def save_case(data: bytes, target: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{target}-{hashlib.sha256(data).hexdigest()[:10]}.{TARGETS[target].ext}"
    path.write_bytes(data)
    return path


def report(target: str, case: Path, res: dict) -> str:
    """What a failing case prints: the target, the file, the outcome and the traceback."""
    return (f"target {target}: {res['outcome']} at {res.get('where')} ({res.get('seconds')} s)\n  case: {case}\n"
            f"  replay: PYTHONPATH=$PWD python tests/fuzz.py replay {case}\n  {res.get('message')}\n"
            f"{res.get('traceback', '')}")  # fmt: skip


def fuzz(
    runner: Runner,
    target: str,
    seed: int,
    cases: int | None,
    seconds: float | None,
    folder: Path,
    known: set | None = None,
    outcomes: dict | None = None,
):
    """Generate and run cases for one target until `cases` or `seconds` run out. Returns (tried, failures): each
    failure (key, path, result), one per distinct (outcome, where) not in `known`; failing cases are saved into
    `folder`; `outcomes` counts how cases ended (success, TinkerError, each failure kind)."""
    rng = random.Random(f"{seed}:{target}")
    known = set() if known is None else known
    tried, failures, t0 = 0, [], time.monotonic()
    outcomes = {} if outcomes is None else outcomes  # outcome -> count: success, TinkerError, failures
    tmp = Path(tempfile.mkdtemp(prefix="tinkerlm-fuzz-cases-"))
    try:
        while (cases is None or tried < cases) and (seconds is None or time.monotonic() - t0 < seconds):
            data = TARGETS[target].generate(rng, runner.seeds)
            case = tmp / f"case.{TARGETS[target].ext}"
            case.write_bytes(data)
            res = runner.run(target, case)
            tried += 1
            outcomes[res["outcome"]] = outcomes.get(res["outcome"], 0) + 1
            if not res["ok"]:
                key = (target, res["outcome"], res.get("where"))
                if key not in known:
                    known.add(key)
                    failures.append((key, save_case(data, target, folder), res))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tried, failures


def main(argv: list[str]) -> None:
    if argv[:1] == ["worker"]:
        worker(Path(argv[1]))
    elif argv[:1] == ["replay"]:  # one case, in this process, traceback shown
        case = Path(argv[1])
        seeds = make_seeds(Path(tempfile.gettempdir()) / "tinkerlm-fuzz-seeds")
        os.environ.update(OFFLINE_ENV)
        work = Path(tempfile.mkdtemp(prefix="tinkerlm-fuzz-"))
        os.environ["TINKERLM_HOME"] = str(work / "store")
        try:
            res = run_one(target_of(case), case, Context(seeds, work / "case"), 1e6)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(report(target_of(case), case, res) if not res["ok"] else res)
        sys.exit(0 if res["ok"] else 1)
    else:
        sys.exit(f"usage: {sys.argv[0]} worker SEEDS | replay CASE")


if __name__ == "__main__":
    main(sys.argv[1:])
