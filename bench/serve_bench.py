"""Benchmark `tinkerlm serve`: aggregate decode throughput with 1, 4 and 16 concurrent streaming clients, time to
first token (p50/p99), and a bounded soak test (cancellations and malformed requests mixed in).

    .venv/bin/python bench/serve_bench.py                      # SmolLM2 (the default model)
    .venv/bin/python bench/serve_bench.py --model PATH.gguf --clients 1,4,16 --soak-requests 300

The server runs in a subprocess on 127.0.0.1 (a free port), so its RSS is measured alone. Results are printed as a
table (and as JSON with --json). The soak passes when no response is a 5xx, every KV-cache slot is free at the end,
and the server's RSS after the soak is within 10% of its RSS after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx

PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain how a steam engine works, in detail.",
    "Describe a walk through a busy market in Marrakech.",
    "Tell me about the history of the printing press.",
    "Write a letter to a friend about your summer holiday.",
    "Explain photosynthesis to a ten year old.",
    "Describe the rules of chess.",
    "Write a poem about autumn leaves and rain.",
]
MALFORMED = [
    b"{not json",
    b'{"model": "M", "messages": "hi"}',
    b'{"model": "M", "messages": [], "foo": 1}',
    b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000000000}',
    b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_server(model: str, port: int, max_batch: int, max_context: int, threads: int | None):
    code = (
        "import sys; from tinkerlm.serve.server import serve; "
        f"serve([{model!r}], host='127.0.0.1', port={port}, max_batch={max_batch}, max_queue=64, "
        f"max_context={max_context}, threads={threads!r})"
    )
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


async def wait_ready(base: str, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()}")
            try:
                if (await c.get(base + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("server did not become ready")


async def stream_chat(
    c: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int, cancel_after: int | None = None
) -> dict:
    """One streaming chat request; returns status, time to first token, tokens (from usage) and duration."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": random.randrange(1 << 30),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    out = {"status": None, "ttft": None, "tokens": 0, "seconds": None}
    async with c.stream("POST", base + "/v1/chat/completions", json=body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            return out
        pieces = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices", []):
                if ch["delta"].get("content"):
                    pieces += 1
                    if out["ttft"] is None:
                        out["ttft"] = time.perf_counter() - t0
            if cancel_after is not None and pieces >= cancel_after:
                break  # leaving the block closes the connection mid-stream
    out["seconds"] = time.perf_counter() - t0
    return out


async def throughput(base: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as c:

        async def client(i: int):
            return [
                await stream_chat(c, base, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens)
                for k in range(per_client)
            ]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[client(i) for i in range(clients)]) for r in rs]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "seconds": round(wall, 2),
        "tok_s": round(tokens / wall, 2),
        "ttft": [r["ttft"] for r in results if r["ttft"] is not None],
        "errors": sum(r["status"] != 200 for r in results),
    }


async def soak(base: str, model: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    rng = random.Random(0)
    kinds = ["cancel"] * (requests // 10) + ["malformed"] * (requests // 20)
    kinds += ["ok"] * (requests - len(kinds))
    rng.shuffle(kinds)
    statuses: list[int] = []
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as c:

        async def one(i: int, kind: str):
            async with sem:
                if kind == "malformed":
                    body = rng.choice(MALFORMED).replace(b'"M"', json.dumps(model).encode())
                    r = await c.post(
                        base + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
                    )
                    statuses.append(r.status_code)
                    return
                n = rng.randint(4, max_tokens)
                r = await stream_chat(
                    c, base, model, PROMPTS[i % len(PROMPTS)], n, cancel_after=2 if kind == "cancel" else None
                )
                statuses.append(r["status"])

        await asyncio.gather(*[one(i, k) for i, k in enumerate(kinds)])
    return {
        "requests": requests,
        "cancelled": kinds.count("cancel"),
        "malformed": kinds.count("malformed"),
        "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "server_errors": sum(s >= 500 for s in statuses),
    }


async def slots(base: str) -> tuple[float, float]:
    async with httpx.AsyncClient() as c:
        text = (await c.get(base + "/metrics")).text
    get = lambda name: sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + "{"))  # noqa
    return get("tinkerlm_slots_busy"), get("tinkerlm_queue_waiting")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def main(a) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = start_server(a.model, port, a.max_batch, a.max_context, a.threads)
    report: dict = {"model": a.model, "max_batch": a.max_batch, "max_tokens": a.max_tokens, "cpus": os.cpu_count()}
    try:
        await wait_ready(base, proc)
        async with httpx.AsyncClient() as c:
            model = (await c.get(base + "/v1/models")).json()["data"][0]["id"]
        await throughput(base, model, 2, 1, 8)  # warm-up
        rounds = []
        for n in [int(x) for x in a.clients.split(",")]:
            r = await throughput(base, model, n, a.per_client, a.max_tokens)
            rounds.append(r)
            print(
                f"{n:>3} clients: {r['tokens']} tokens in {r['seconds']} s = {r['tok_s']} tok/s "
                f"(TTFT p50 {pct(r['ttft'], 0.5):.2f} s, p99 {pct(r['ttft'], 0.99):.2f} s, errors {r['errors']})",
                flush=True,
            )
        ttfts = [t for r in rounds for t in r["ttft"]]
        report["throughput"] = [
            {k: v for k, v in r.items() if k != "ttft"}
            | {"ttft_p50": round(pct(r["ttft"], 0.5), 3), "ttft_p99": round(pct(r["ttft"], 0.99), 3)}
            for r in rounds
        ]
        report["ttft_p50"], report["ttft_p99"] = round(pct(ttfts, 0.5), 3), round(pct(ttfts, 0.99), 3)
        if len(rounds) > 1:
            report["speedup_max_vs_1"] = round(rounds[-1]["tok_s"] / rounds[0]["tok_s"], 2)
            print(
                f"speedup {rounds[-1]['clients']} clients vs {rounds[0]['clients']}: "
                f"{report['speedup_max_vs_1']}x (target >= 4x)"
            )
        if a.soak_requests:
            rss_warm = rss_kib(proc.pid)
            t0 = time.perf_counter()
            s = await soak(base, model, a.soak_requests, a.soak_concurrency, a.soak_max_tokens)
            s["seconds"] = round(time.perf_counter() - t0, 1)
            deadline = time.monotonic() + 10
            while (busy := await slots(base)) != (0, 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            rss_after = rss_kib(proc.pid)
            s |= {
                "slots_busy_after": busy[0],
                "queue_after": busy[1],
                "rss_warm_mib": round(rss_warm / 1024),
                "rss_after_mib": round(rss_after / 1024),
                "rss_growth": round(rss_after / rss_warm - 1, 4),
            }
            s["passed"] = s["server_errors"] == 0 and busy == (0, 0) and abs(s["rss_growth"]) <= 0.10
            report["soak"] = s
            print(
                f"soak: {s['requests']} requests ({s['cancelled']} cancelled, {s['malformed']} malformed), "
                f"{a.soak_concurrency} concurrent, {s['seconds']} s; statuses {s['status_counts']}; "
                f"5xx {s['server_errors']}; slots busy after {busy[0]:.0f}, queued {busy[1]:.0f}; RSS "
                f"{s['rss_warm_mib']} -> {s['rss_after_mib']} MiB ({100 * s['rss_growth']:+.1f}%): "
                f"{'PASS' if s['passed'] else 'FAIL'}",
                flush=True,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2", help="store name, .gguf path or Hugging Face directory")
    p.add_argument("--clients", default="1,4,16", help="concurrent streaming clients per round, comma-separated")
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer in the throughput rounds")
    p.add_argument("--max-batch", type=int, default=16, help="server slots (--max-batch)")
    p.add_argument("--max-context", type=int, default=2048, help="server context per slot")
    p.add_argument("--threads", type=int, default=None, help="server CPU threads (default: physical cores)")
    p.add_argument("--soak-requests", type=int, default=300, help="soak requests; 0 skips the soak")
    p.add_argument("--soak-concurrency", type=int, default=32, help="soak requests in flight at once")
    p.add_argument("--soak-max-tokens", type=int, default=24, help="longest answer in the soak (4..this)")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = p.parse_args()
    result = asyncio.run(main(args))
    if args.json:
        print(json.dumps(result, indent=2))
