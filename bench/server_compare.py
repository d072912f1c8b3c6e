"""`tinkerlm serve` against llama.cpp's `llama-server` on the same GGUF: aggregate tok/s, time to first token and
inter-token latency (p50/p99) with 1, 4, 16 and 64 concurrent streaming clients.

    bench/build_llama_server.sh                                     # once: ~/.cache/tinkerlm-bench/llama-server/...
    .venv/bin/python bench/server_compare.py                        # SmolLM2 from the store, 64 tokens per answer
    .venv/bin/python bench/server_compare.py --model /work/gguf/llama1b-q4_0.gguf --clients 1,4,16 --rounds 3 \
        --max-tokens 128 --out /tmp/server_compare.json

Both servers run on 127.0.0.1 with the same threads, both alive for the whole run, engines alternating per
concurrency (which goes first rotates), each serving `clients` streaming clients that send `--per-client` requests
one after another. Fairness:
- Same prompts: token ids (`/v1/completions` with `prompt: [ids]`, both accept them) cut from the shipped
  public-domain text; every request of the run starts at a different offset, so no request shares a prefix with
  an earlier one (neither server's prompt cache helps), and both engines get the same ids in the same order.
- Same answers' length: `max_tokens`, temperature 0. tinkerlm has no `ignore_eos`, so neither gets it; a
  continuation of running text rarely ends in 64-128 tokens, and the table counts the requests that got all
  `max_tokens` (`full`). Tokens are counted from each stream's final `usage` (both send it).
- Same capacity: tinkerlm `--max-batch` and llama-server `-np` are the largest client count, each slot holds one
  prompt plus its answer (llama-server's `-c` is slots x that, as it splits the context between slots).

Per request: TTFT = time from sending to the first chunk with text; inter-token latency = the gaps between
successive chunks with text. Per round: aggregate tok/s = all generated tokens / the round's wall time; p50/p99 over
all its requests (TTFT) or gaps (ITL). With `--rounds` > 1 each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ENGINES = ("tinkerlm", "llama-server")
DEFAULT_LLAMA_SERVER = Path.home() / ".cache/tinkerlm-bench/llama-server/bin/llama-server"


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of xs by nearest rank (nan when empty)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    flags, name = set(), platform.processor()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    want = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"cpu": name, "cpus": os.cpu_count(), "flags": [f for f in want if f in flags]}


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


# ----------------------------------------------------------------------------------------------------------------
# Servers


def start_tinkerlm(model: str, port: int, a, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tinkerlm", "serve", model, "--port", str(port), "--threads", str(a.threads)]
    cmd += ["--max-batch", str(a.slots), "--max-queue", str(a.slots), "--max-context", str(a.slot_context)]
    cmd += ["--prefill-chunk", str(a.prefill_chunk)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def start_llama_server(binary: str, model: str, port: int, a, log) -> subprocess.Popen:
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(a.threads)]
    cmd += ["-tb", str(a.threads), "-np", str(a.slots), "-c", str(a.slots * a.slot_context), "--cont-batching"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(base: str, proc: subprocess.Popen, log_path: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}); its log: {log_path}")
            try:
                if (await c.get(base + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError(f"server at {base} not ready after {timeout} s; its log: {log_path}")


# ----------------------------------------------------------------------------------------------------------------
# Clients


async def one_request(c: httpx.AsyncClient, base: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streaming /v1/completions request: TTFT, gaps between text chunks, tokens (usage), finish reason."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    out = {"ttft": None, "gaps": [], "tokens": 0, "finish": None, "error": None}
    last = None
    async with c.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = str(chunk["error"])[:200]
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices") or []:
                if ch.get("text"):
                    if last is None:
                        out["ttft"] = now - t0
                    else:
                        out["gaps"].append(now - last)
                    last = now
                if ch.get("finish_reason"):
                    out["finish"] = ch["finish_reason"]
    return out


async def run_round(base: str, model: str, prompts: list[list[list[int]]], max_tokens: int) -> dict:
    """`len(prompts)` clients, client i sending prompts[i] one after another; the round's figures."""
    clients = len(prompts)
    # A new connection per request: llama-server closes a kept-alive connection after a streamed answer, and the
    # next request on it would fail; both servers get the same treatment.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as c:

        async def client(mine: list[list[int]]) -> list[dict]:
            return [await one_request(c, base, model, p, max_tokens) for p in mine]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[client(p) for p in prompts]) for r in rs]
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if r["error"]]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "full": sum(r["tokens"] == max_tokens for r in results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": wall,
        "tok_s": tokens / wall,
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "itl_p50": pct(gaps, 0.5),
        "itl_p99": pct(gaps, 0.99),
    }


class Prompts:
    """Distinct prompts of `length` token ids from the shipped text: the k-th one starts at offset k * stride
    (mod the text), so no two share a first token position; the same sequence for every engine."""

    def __init__(self, ids: list[int], length: int, stride: int = 53):
        while len(ids) < 4 * length:
            ids = ids + ids
        self.ids, self.length, self.stride = ids, length, stride
        self.starts = len(ids) - length

    def batch(self, first: int, clients: int, per_client: int) -> list[list[list[int]]]:
        k = lambda i, j: (first + i * per_client + j) * self.stride % self.starts  # noqa: E731
        return [[self.ids[k(i, j) : k(i, j) + self.length] for j in range(per_client)] for i in range(clients)]


# ----------------------------------------------------------------------------------------------------------------
# Report

COLUMNS = ("tok_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99")


def summarize(rounds: list[dict]) -> dict:
    """Medians over rounds of one (engine, clients) cell."""
    out = {k: statistics.median(r[k] for r in rounds) for k in COLUMNS}
    out |= {k: sum(r[k] for r in rounds) for k in ("requests", "tokens", "full", "errors")}
    out["rounds"] = len(rounds)
    return out


def table(cells: dict, clients: list[int], engines: list[str]) -> str:
    lines = [
        "| clients | engine | tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) | full / requests |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in clients:
        for e in engines:
            s = cells[e][str(n)]
            ms = [f"{1000 * s[k]:.0f}" if k != "itl_p50" else f"{1000 * s[k]:.1f}" for k in COLUMNS[1:]]
            err = f" ({s['errors']} errors)" if s["errors"] else ""
            lines.append(f"| {n} | {e} | {s['tok_s']:.1f} | {' | '.join(ms)} | {s['full']} / {s['requests']}{err} |")
        if len(engines) == 2:
            t, ll = cells["tinkerlm"][str(n)], cells["llama-server"][str(n)]
            lines.append(
                f"| {n} | **tinkerlm / llama-server** | **{t['tok_s'] / ll['tok_s']:.2f}x** | "
                f"{t['ttft_p50'] / ll['ttft_p50']:.2f}x | {t['ttft_p99'] / ll['ttft_p99']:.2f}x | "
                f"{t['itl_p50'] / ll['itl_p50']:.2f}x | {t['itl_p99'] / ll['itl_p99']:.2f}x | |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------


async def main(a) -> dict:
    from tinkerlm.api import resolve
    from tinkerlm.evaluate.perplexity import shipped_text
    from tinkerlm.formats.gguf import read_gguf

    model_path, _ = resolve(a.model)
    model_path = model_path.resolve()
    if model_path.suffix != ".gguf":
        raise SystemExit(f"--model: {model_path} is not a GGUF file (both servers are given the same GGUF)")
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if any(e not in ENGINES for e in engines):
        raise SystemExit(f"--engines: choose from {', '.join(ENGINES)}")
    if "llama-server" in engines and not os.access(a.llama_server, os.X_OK):
        raise SystemExit(f"--llama-server: {a.llama_server} is not executable (run bench/build_llama_server.sh)")
    clients = [int(x) for x in a.clients.split(",")]
    a.slots = max(clients)
    a.slot_context = a.prompt_tokens + a.max_tokens + 16
    tokenizer = read_gguf(model_path).tokenizer()
    prompts = Prompts(tokenizer.encode(shipped_text(), add_special_tokens=False), a.prompt_tokens)

    logdir = Path(tempfile.mkdtemp(prefix="server_compare-"))
    procs, bases, models = {}, {}, {}
    report: dict = {
        "model": str(model_path),
        "machine": machine(),
        "threads": a.threads,
        "slots": a.slots,
        "prompt_tokens": a.prompt_tokens,
        "max_tokens": a.max_tokens,
        "per_client": a.per_client,
        "rounds": a.rounds,
        "load_before": loadavg(),
    }
    print(f"machine: {report['machine']}; load average before: {report['load_before']}", flush=True)
    try:
        for e in engines:
            port = free_port()
            bases[e] = f"http://127.0.0.1:{port}"
            log = open(logdir / f"{e}.log", "w")
            if e == "tinkerlm":
                procs[e] = start_tinkerlm(str(model_path), port, a, log)
            else:
                procs[e] = start_llama_server(a.llama_server, str(model_path), port, a, log)
            await wait_ready(bases[e], procs[e], str(logdir / f"{e}.log"))
            async with httpx.AsyncClient() as c:
                models[e] = (await c.get(bases[e] + "/v1/models")).json()["data"][0]["id"]
            # Warm-up: two short requests (first-use kernel builds, allocations), on prompts the run never uses.
            await run_round(bases[e], models[e], Prompts(prompts.ids[::-1], a.prompt_tokens).batch(0, 2, 1), 8)
        print(f"servers ready (logs in {logdir})", flush=True)

        raw = {e: {str(n): [] for n in clients} for e in engines}
        first = 0
        for r in range(a.rounds):
            for ci, n in enumerate(clients):
                batch = prompts.batch(first, n, a.per_client)
                first += n * a.per_client
                order = engines[(r + ci) % len(engines) :] + engines[: (r + ci) % len(engines)]
                for e in order:
                    before = loadavg()
                    res = await run_round(bases[e], models[e], batch, a.max_tokens)
                    res |= {"load_before": before, "load_after": loadavg()}
                    raw[e][str(n)].append(res)
                    print(
                        f"round {r + 1} clients {n:>3} {e:<12} {res['tok_s']:7.1f} tok/s  TTFT p50/p99 "
                        f"{1000 * res['ttft_p50']:.0f}/{1000 * res['ttft_p99']:.0f} ms  ITL p50/p99 "
                        f"{1000 * res['itl_p50']:.1f}/{1000 * res['itl_p99']:.0f} ms  full {res['full']}/"
                        f"{res['requests']}  errors {res['errors']}  load {before} -> {res['load_after']}",
                        flush=True,
                    )
                    if res["errors"]:
                        print(f"  first error: {res['first_error']}", flush=True)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    report["load_after"] = loadavg()
    report["raw"] = raw
    report["summary"] = cells = {e: {n: summarize(rs) for n, rs in raw[e].items()} for e in engines}
    report["table"] = table(cells, clients, engines)
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2", help="store name or .gguf path")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, of: " + ", ".join(ENGINES))
    p.add_argument("--llama-server", default=str(DEFAULT_LLAMA_SERVER), help="the llama-server binary")
    p.add_argument("--clients", default="1,4,16,64", help="concurrent streaming clients per round, comma-separated")
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (temperature 0)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    p.add_argument(
        "--prefill-chunk", type=int, default=256, help="tinkerlm serve --prefill-chunk (0: whole prompts at once)"
    )
    p.add_argument("--rounds", type=int, default=1, help="rounds over all client counts (medians reported)")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args()
    result = asyncio.run(main(args))
    m = result["machine"]
    print(
        f"\n{Path(result['model']).name}, {args.threads} threads each, {result['prompt_tokens']}-token prompts, "
        f"{result['max_tokens']} tokens per answer, {args.per_client} requests per client, {args.rounds} round(s); "
        f"{m['cpu']} ({m['cpus']} CPUs, {' '.join(m['flags'])}); load average {result['load_before']} before, "
        f"{result['load_after']} after\n"
    )
    print(result["table"])
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.out)
        print(f"\nwrote {args.out}")
