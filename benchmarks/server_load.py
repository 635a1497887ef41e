"""Bounded loopback load run of the OpenAI-compatible server: requests/s and p50/p95 TTFT per concurrency.

Starts the server in-process (uvicorn on 127.0.0.1, a free port), then for each concurrency level runs
`--requests` streaming chat requests from that many concurrent `AsyncOpenAI` clients. TTFT is measured
client-side: from sending the request to the first content delta (so it includes queueing on the
engine's single worker). Each request asks a distinct question, so no two prompts are identical.

    PYTHONPATH=. RELAY_LLM_CACHE=/tmp/relaycache .venv/bin/python benchmarks/server_load.py \\
        --model default --concurrency 1,4,8 --requests 16 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time

import uvicorn
from openai import AsyncOpenAI
from relay_server import create_app


def start_server(app) -> tuple[uvicorn.Server, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


async def one(client: AsyncOpenAI, model: str, i: int, max_tokens: int) -> float:
    t0 = time.perf_counter()
    ttft = None
    stream = await client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0, stream=True,
        messages=[{"role": "system", "content": "You are one agent of a small software team."},
                  {"role": "user", "content": f"Task {i}: describe step {i} of building a word counter."}])
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
    return ttft if ttft is not None else time.perf_counter() - t0


async def level(base_url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    ttfts: list[float] = []

    async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600) as client:
        async def worker() -> None:
            while not queue.empty():
                ttfts.append(await one(client, model, queue.get_nowait(), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(ttfts, n=20, method="inclusive") if len(ttfts) > 1 else ttfts * 19
    return {"concurrency": concurrency, "requests": requests, "max_tokens": max_tokens, "wall_s": wall,
            "requests_per_s": requests / wall, "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": q[18]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    t0 = time.perf_counter()
    app = create_app(args.model, dtype=args.dtype)
    server, base_url = start_server(app)
    model = app.state.relay.model_id
    print(f"# {model} loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    asyncio.run(level(base_url, model, 1, 1, 2))  # warm-up
    rows = []
    for c in args.concurrency.split(","):
        rows.append(asyncio.run(level(base_url, model, int(c), args.requests, args.max_tokens)))
        print(f"# {json.dumps(rows[-1])}", file=sys.stderr, flush=True)  # progress, in case the run is cut short
    server.should_exit = True
    print("| clients | requests | max tokens | requests/s | p50 TTFT (s) | p95 TTFT (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['max_tokens']} | {r['requests_per_s']:.2f} "
              f"| {r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
