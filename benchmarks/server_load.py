"""Loopback load run of the OpenAI-compatible server: aggregate decode tokens/s, TTFT and ms/token per
number of concurrent clients.

Starts the server in-process (uvicorn on 127.0.0.1, a free port). Each level sends `--rounds` waves of
`clients` streaming chat requests that arrive at once (one `AsyncOpenAI` client each), each a distinct
prompt, temperature 0. Measured client-side: TTFT from sending the request to the first content delta (so
it includes waiting for the prefills queued ahead), ms per token over the deltas after the first, and the
aggregate decode rate = completion tokens of the level / its wall time.

    PYTHONPATH=. .venv/bin/python benchmarks/server_load.py --model default --clients 1,2,4,8 \
        --rounds 2 --max-tokens 64 --json docs/server_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time

import uvicorn
from openai import AsyncOpenAI
from relay_server import create_app

from relay_llm import EngineConfig, RelayEngine


def start_server(app) -> tuple[uvicorn.Server, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


async def one(client: AsyncOpenAI, model: str, i: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft = last = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "You are one agent of a small software team."},
                  {"role": "user", "content": f"Task {i}: describe step {i} of building a word counter."}])
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            ttft = ttft if ttft is not None else last - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    ttft = ttft if ttft is not None else time.perf_counter() - t0
    decode = (last - t0 - ttft) if last is not None else 0.0
    return {"ttft_s": ttft, "tokens": tokens, "ms_per_token": 1000 * decode / (tokens - 1) if tokens > 1 else None}


async def level(base_url: str, model: str, clients: int, rounds: int, max_tokens: int, first: int) -> dict:
    """`rounds` waves of `clients` requests arriving at once; request numbers start at `first`."""
    results: list[dict] = []
    async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600) as client:
        t0 = time.perf_counter()
        for r in range(rounds):
            results += await asyncio.gather(*(one(client, model, first + r * clients + c, max_tokens)
                                              for c in range(clients)))
        wall = time.perf_counter() - t0
    ttfts = sorted(x["ttft_s"] for x in results)
    q = statistics.quantiles(ttfts, n=20, method="inclusive") if len(ttfts) > 1 else ttfts * 19
    per_token = [x["ms_per_token"] for x in results if x["ms_per_token"] is not None]
    tokens = sum(x["tokens"] for x in results)
    return {"clients": clients, "requests": len(results), "max_tokens": max_tokens, "wall_s": wall,
            "completion_tokens": tokens, "decode_tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": q[18],
            "ms_per_token_p50": statistics.median(per_token) if per_token else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=2, help="waves of simultaneous requests per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--json", help="also write the rows (and the machine) to this file")
    args = parser.parse_args()

    t0 = time.perf_counter()
    engine = RelayEngine.load(args.model, dtype=args.dtype, config=EngineConfig(max_batch=args.max_batch))
    app = create_app(engine)
    server, base_url = start_server(app)
    model = app.state.relay.model_id
    info = engine.info()
    print(f"# {model} loaded in {time.perf_counter() - t0:.1f} s: {json.dumps(info)}", file=sys.stderr, flush=True)
    asyncio.run(level(base_url, model, 1, 1, 2, first=10_000))  # warm-up
    rows, first = [], 0
    for c in map(int, args.clients.split(",")):
        rows.append(asyncio.run(level(base_url, model, c, args.rounds, args.max_tokens, first)))
        first += c * args.rounds
        print(f"# {json.dumps(rows[-1])}", file=sys.stderr, flush=True)  # progress, in case the run is cut short
    server.should_exit = True
    base = rows[0]
    print("| clients | requests | decode tokens/s | vs 1 client | p50 TTFT (s) | p95 TTFT (s) | p50 ms/token |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['decode_tokens_per_s']:.1f} "
              f"| {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x "
              f"| {r['ttft_p50_s']:.2f} ({r['ttft_p50_s'] / base['ttft_p50_s']:.1f}x) "
              f"| {r['ttft_p95_s']:.2f} ({r['ttft_p95_s'] / base['ttft_p50_s']:.1f}x) | {r['ms_per_token_p50']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                   **info}, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
