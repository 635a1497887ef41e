"""The shared segment store on Redis (relay_llm.redis_store): splicing a fetched segment against computing it,
bytes per token on the wire, and throughput of 1 and 2 `relay-llm serve --store` replicas on loopback.

1. Splice vs compute (in-process, the default model). A `--tokens`-token stretch is prefilled once (the
   "full prefill" time, best of `--repeats`); its K/V, hidden states and ids become a segment that one store
   publishes to Redis. Each repeat then connects a fresh store (its index learns the segment from the
   stream), matches a prompt quoting the stretch at another position (MGET, CRC and header checks, safetensors
   parse, into the local cache), rotates the keys to the new position and writes K/V into a request's
   buffers: what a replica does before the first token of a prompt that quotes another replica's output.
2. Throughput. `--chains` two-agent chains run at once, each agent a non-streaming chat request through the
   openai client: agent 1 writes (`--max-tokens`), agent 2 quotes it. With 2 replicas agent 2 always goes
   to the other replica (round robin), so every reuse crosses Redis. Agent 2 is sent as soon as agent 1's
   reply arrives, with no wait for the announcement: a reuse missed in that race is counted as it falls.
   On a 2-core machine the replicas share the cores: 1 replica runs 2 threads, 2 replicas 1 thread each.

    PYTHONPATH=. .venv/bin/python benchmarks/redis_store.py --json docs/redis_store.json

Starts its own redis-server (no persistence, maxmemory 1gb, allkeys-lru) on a free port unless --redis is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from openai import OpenAI

from relay_llm import RelayEngine, wire
from relay_llm.redis_store import RedisSegmentStore
from relay_llm.rope import rotate_layers

TEXT = (Path(__file__).resolve().parents[1] / "README.md").read_text()
FIRST = "Agent {i}: write a short specification of a command-line tool that counts words, lines and bytes."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server(url: str | None):
    """The Redis at `url`, or a redis-server started here for the run."""
    if url:
        yield url
        return
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no", "--maxmemory", "1gb",
                             "--maxmemory-policy", "allkeys-lru"], stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        for _ in range(200):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait()


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def splice_vs_compute(url: str, n: int, repeats: int) -> dict:
    engine = RelayEngine.load("default", dtype="float32")
    ex, fp = engine.executor, engine.store_fingerprint
    ids = engine.encode(TEXT, special_tokens=False)[:n]
    assert len(ids) == n, f"README.md has only {len(ids)} tokens"
    ids_t = torch.tensor(ids, dtype=torch.long)

    def prefill():
        kv = ex.new_buffers(n)
        return kv, ex.run(ids_t, 0, kv, capture_layer=engine.capture_layer)

    with torch.inference_mode():
        prefill()  # warm-up
        full_s = best(prefill, repeats)
        kv, res = prefill()
        keys, values = kv.slice(0, n)
        seg = engine._segment(ids, keys, values, 0, res.captured, "decode", [])
        bf16 = engine._segment(ids, keys.bfloat16(), values.bfloat16(), 0, res.captured.bfloat16(), "decode", [])
        writer = RedisSegmentStore(url, min_match_tokens=16)
        writer.connect(fp)
        writer.client.flushdb()
        writer.publish(seg)
        blob_bytes, bf16_bytes = len(wire.pack(seg)), len(wire.pack(bf16))
        shift = 200  # the quote sits 200 tokens later in the new prompt
        prompt = engine.encode("Review this text. " * 40, special_tokens=False)[:shift] + ids + [ids[0]]
        rows = {"find_fetch_s": [], "rotate_write_s": [], "total_s": []}
        for _ in range(repeats):
            reader = RedisSegmentStore(url, min_match_tokens=16)
            reader.connect(fp)  # learns the segment from the stream: a stub, no K/V yet
            assert len(reader) == 1 and next(iter(reader)).keys is None
            t0 = time.perf_counter()
            (m,) = reader.find(prompt, 0, len(prompt) - 1, fingerprint=fp)
            t1 = time.perf_counter()
            buf = ex.new_buffers(len(prompt))
            k = rotate_layers(m.segment.keys[:, :, m.offset : m.offset + m.length], m.start - m.segment.start_pos,
                              ex.rope)
            buf.write(m.start, k, m.segment.values[:, :, m.offset : m.offset + m.length])
            t2 = time.perf_counter()
            assert m.length == n and torch.equal(buf.values[:, :, m.start : m.start + n], values)
            rows["find_fetch_s"].append(t1 - t0)
            rows["rotate_write_s"].append(t2 - t1)
            rows["total_s"].append(t2 - t0)
            reader.close()
        writer.close()
    engine.close()
    out = {k: min(v) for k, v in rows.items()}
    out.update(tokens=n, full_prefill_s=full_s, ratio=out["total_s"] / full_s, blob_bytes=blob_bytes,
               bytes_per_token=blob_bytes / n, bf16_bytes_per_token=bf16_bytes / n,
               median_total_s=statistics.median(rows["total_s"]))
    return out


class Replica:
    def __init__(self, url: str, threads: int, log: Path):
        self.port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        exe = str(Path(sys.executable).with_name("relay-llm"))
        self.proc = subprocess.Popen([exe, "serve", "--model", "default", "--port", str(self.port), "--store", url],
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=600)

    def wait(self) -> Replica:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("replica exited")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def throughput(url: str, replicas: int, chains: int, max_tokens: int, logs: Path) -> dict:
    import redis

    redis.Redis.from_url(url).flushdb()
    threads = max(1, (os.cpu_count() or 2) // replicas)
    reps = [Replica(url, threads, logs / f"replica{i}.log") for i in range(replicas)]
    try:
        for r in reps:
            r.wait()
        results, errors = [], []

        def chain(i: int) -> None:
            try:
                a, b = reps[i % replicas], reps[(i + 1) % replicas]
                first = a.client.chat.completions.create(model="default", max_tokens=max_tokens, temperature=0,
                                                         messages=[{"role": "user", "content": FIRST.format(i=i)}])
                spec = first.choices[0].message.content
                second = b.client.chat.completions.create(model="default", max_tokens=max_tokens, temperature=0,
                                                          messages=[{"role": "system", "content": "You review specs."},
                                                                    {"role": "user", "content": f"Review:\n{spec}"}])
                results.append((first.usage, second.usage))
            except Exception as exc:  # reported, never hidden
                errors.append(repr(exc))

        t0 = time.perf_counter()
        workers = [threading.Thread(target=chain, args=(i,)) for i in range(chains)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
    finally:
        for r in reps:
            r.stop()
    completion = sum(u1.completion_tokens + u2.completion_tokens for u1, u2 in results)
    second_prompt = sum(u2.prompt_tokens for _, u2 in results)
    cached = sum(u2.prompt_tokens_details.cached_tokens for _, u2 in results)
    return {"replicas": replicas, "threads_each": threads, "chains": chains, "requests": 2 * len(results),
            "failed": len(errors), "errors": errors[:3], "wall_s": wall, "requests_per_s": 2 * len(results) / wall,
            "completion_tokens_per_s": completion / wall, "agent2_cached_share": cached / max(second_prompt, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default=None, help="redis://host:port/db to use (default: start one here)")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", help="also write the results (and the machine) to this file")
    args = parser.parse_args()
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "relay-redis-bench"
    logs.mkdir(exist_ok=True)
    with redis_server(args.redis) as url:
        splice = splice_vs_compute(url, args.tokens, args.repeats)
        print(json.dumps(splice), flush=True)
        runs = []
        if not args.skip_throughput:
            for n in (1, 2):
                runs.append(throughput(url, n, args.chains, args.max_tokens, logs))
                print(json.dumps(runs[-1]), flush=True)
    print(f"\n| {splice['tokens']}-token segment | seconds |\n|---|---:|")
    print(f"| full prefill (compute) | {splice['full_prefill_s']:.3f} |")
    print(f"| find + fetch from Redis (MGET, checks, parse) | {splice['find_fetch_s']:.4f} |")
    print(f"| rotate keys + write into the request's K/V | {splice['rotate_write_s']:.4f} |")
    print(f"| fetched and spliced, total | {splice['total_s']:.4f} ({splice['ratio']:.3f} of the prefill) |")
    print(f"\nwire: {splice['bytes_per_token']:.0f} bytes/token fp32 ({splice['blob_bytes'] / 1e6:.1f} MB), "
          f"{splice['bf16_bytes_per_token']:.0f} bf16 (store_dtype='bfloat16')")
    if runs:
        print("\n| replicas | threads each | requests | failed | wall s | requests/s | completion tok/s | "
              "agent-2 prompt cached |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            print(f"| {r['replicas']} | {r['threads_each']} | {r['requests']} | {r['failed']} | {r['wall_s']:.1f} | "
                  f"{r['requests_per_s']:.2f} | {r['completion_tokens_per_s']:.1f} | {r['agent2_cached_share']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                   "torch": torch.__version__},
                       "splice": splice, "throughput": runs}, f, indent=1)


if __name__ == "__main__":
    main()
