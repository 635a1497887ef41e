"""Matching benchmark (issue 4): lookup cost, reuse found in a templated 5-agent pipeline, store memory.

Parts (each prints a Markdown table; `--json PATH` also writes every number):

1. lookup time vs number of stored segments (10 .. 10 000) at a fixed prompt, next to a per-segment scan
   (what a lookup costs when it walks every stored segment);
2. lookup time vs prompt length at a fixed number of segments;
3. exact-prefix lookup (radix tree) vs number of cached sequences, next to a linear scan over them;
4. (model) a 5-agent pipeline whose prompts are built by LangChain `ChatPromptTemplate`s: the tokens of
   earlier outputs the engine found in each prompt, vs the ideal (every earlier output found whole);
5. (model) store bytes per token, and the fidelity cost of bf16 storage: KL(full || naive reuse) with
   fp32-stored vs bf16-stored K/V.

Parts 1-3 use synthetic token ids (random ids from a 262k vocabulary, like gemma-3's) and no model; the
stored K/V there are 1-element placeholders, since a lookup never reads K/V. Run:

    PYTHONPATH=. RELAY_LLM_CACHE=/tmp/relaycache .venv/bin/python benchmarks/matching.py --json /tmp/matching.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time

import torch

from relay_llm.store import PrefixCache, Segment, SegmentStore

VOCAB = 262_144


def _seg(ids: list[int]) -> Segment:
    n = len(ids)
    z = torch.zeros(1, 1, n, 1)
    return Segment(torch.tensor(ids), z, z, 0, "bench")


def _timeit(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _scan_find(segments: list[list[int]], prompt: list[int], k: int) -> int:
    """Baseline: walk every stored segment and look its k-grams up in the prompt's (O(stored tokens))."""
    grams = {tuple(prompt[i : i + k]) for i in range(len(prompt) - k + 1)}
    hits = 0
    for ids in segments:
        hits += sum(tuple(ids[i : i + k]) in grams for i in range(len(ids) - k + 1))
    return hits


def _prompt(rng: random.Random, segments: list[list[int]], length: int) -> list[int]:
    """About `length` tokens: random glue with three whole stored segments and one 50-token quote pasted in."""
    pastes = [segments[rng.randrange(len(segments))] for _ in range(3)]
    pastes.append(segments[rng.randrange(len(segments))][10:60])
    glue_total = max(length - sum(len(p) for p in pastes), 40)
    glue = [rng.randrange(VOCAB) for _ in range(glue_total)]
    bounds = [0] + sorted(rng.sample(range(1, glue_total), len(pastes))) + [glue_total]
    out: list[int] = []
    for i, p in enumerate(pastes):
        out += glue[bounds[i] : bounds[i + 1]] + p
    return out + glue[bounds[-2] :]


def lookup_vs_segments(counts: list[int], seg_len: int, prompt_len: int, k: int, scan_max: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for count in counts:
        segments = [[rng.randrange(VOCAB) for _ in range(seg_len)] for _ in range(count)]
        store = SegmentStore(budget_bytes=1 << 40, min_match_tokens=k)
        for ids in segments:
            store.add(_seg(ids))
        prompt = _prompt(rng, segments, prompt_len)
        found = sum(m.length for m in store.find(prompt, touch=False))
        t = _timeit(lambda s=store, p=prompt: s.find(p, touch=False), repeats=9)
        scan = _timeit(lambda s=segments, p=prompt: _scan_find(s, p, k), 3) if count <= scan_max else None
        rows.append({"segments": count, "stored_tokens": count * seg_len, "prompt_tokens": len(prompt),
                     "found_tokens": found, "lookup_ms": 1e3 * t, "scan_ms": None if scan is None else 1e3 * scan})
        del store, segments
        gc.collect()
    return rows


def lookup_vs_prompt(lengths: list[int], count: int, seg_len: int, k: int) -> list[dict]:
    rng = random.Random(1)
    segments = [[rng.randrange(VOCAB) for _ in range(seg_len)] for _ in range(count)]
    store = SegmentStore(budget_bytes=1 << 40, min_match_tokens=k)
    for ids in segments:
        store.add(_seg(ids))
    rows = []
    for length in lengths:
        prompt = _prompt(rng, segments, length)
        found = sum(m.length for m in store.find(prompt, touch=False))
        t = _timeit(lambda p=prompt: store.find(p, touch=False), repeats=9)
        rows.append({"prompt_tokens": len(prompt), "segments": count, "found_tokens": found, "lookup_ms": 1e3 * t})
    return rows


def prefix_vs_entries(counts: list[int], length: int) -> list[dict]:
    """Radix lookup vs a linear scan (the previous PrefixCache) over `count` cached sequences."""
    rng = random.Random(2)
    rows = []
    z = torch.zeros(1, 1, length, 1)
    for count in counts:
        system = [rng.randrange(VOCAB) for _ in range(length // 2)]
        seqs = [system + [rng.randrange(VOCAB) for _ in range(length - len(system))] for _ in range(count)]
        cache = PrefixCache(budget_bytes=1 << 40)
        for s in seqs:
            cache.add(s, z, z, "fp")
        query = seqs[count // 2][: length - 5] + [1, 2, 3, 4, 5]

        def scan(q=query, ss=seqs):
            best = 0
            for s in ss:
                n = 0
                while n < len(s) and s[n] == q[n]:
                    n += 1
                best = max(best, n)
            return best

        assert cache.lookup(query, "fp")[0] == scan() == length - 5
        rows.append({"entries": count, "tokens_each": length,
                     "radix_ms": 1e3 * _timeit(lambda c=cache, q=query: c.lookup(q, "fp"), 9),
                     "scan_ms": 1e3 * _timeit(scan, 3)})
    return rows


# ---- model parts -------------------------------------------------------------------------------------------

AGENTS = [
    ("Architect", "You are the architect. Write a short specification.",
     "Design a command-line tool that counts words in text files."),
    ("Developer", "You are the developer. Write the code the specification asks for.",
     "Specification from the architect:\n{a0}\n\nWrite the Python code."),
    ("Reviewer", "You are the reviewer. Point out problems.",
     "Specification:\n{a0}\n\nCode:\n{a1}\n\nList the problems in the code."),
    ("Tester", "You are the tester. Write test cases.",
     "The code under test:\n{a1}\n\nThe review said:\n{a2}\n\nWrite three test cases."),
    ("Manager", "You are the project manager. Summarise the state of the work.",
     "Spec: {a0}\nCode: {a1}\nReview: {a2}\nTests: {a3}\n\nWrite a two-line status report."),
]


def pipeline(engine, max_new_tokens: int) -> list[dict]:
    """Run the five agents; per agent, decode tokens found in its prompt vs the ideal (earlier outputs)."""
    from langchain_core.prompts import ChatPromptTemplate

    roles = {"system": "system", "human": "user", "ai": "assistant"}
    outputs: list[str] = []
    out_tokens: list[int] = []
    rows = []
    for i, (name, system, human) in enumerate(AGENTS):
        template = ChatPromptTemplate.from_messages([("system", system), ("human", human)])
        values = {f"a{j}": outputs[j] for j in range(i) if f"{{a{j}}}" in human}
        msgs = [{"role": roles[m.type], "content": m.content} for m in template.format_messages(**values)]
        res = engine.chat(msgs, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95, seed=i)
        used = [int(k[1:]) for k in values]
        ideal = sum(out_tokens[j] for j in used)
        s = res.stats
        rows.append({"agent": name, "prompt_tokens": s.prompt_tokens, "ideal_tokens": ideal,
                     "found_decode_tokens": s.span_kinds.get("decode", 0),
                     "found_prefill_tokens": s.span_kinds.get("prefill", 0),
                     "prefix_hit_tokens": s.prefix_hit_tokens, "spans": s.spans, "reuse_rate": s.reuse_rate})
        outputs.append(res.text)
        out_tokens.append(len([t for t in res.token_ids if t not in engine.eos_ids]))
        print(f"  {name}: {rows[-1]}", file=sys.stderr)
    return rows


def bf16_fidelity(engine, steps: int) -> dict:
    """KL(full || naive) over full's greedy continuation, with the store's K/V in fp32 vs rounded to bf16."""
    decode = [s for s in engine.store if s.kind == "decode"]
    seg = max(decode, key=len)
    text = engine._decode(seg.token_ids.tolist())
    msgs = [{"role": "system", "content": "You are an editor who checks the text below for clarity. " * 3},
            {"role": "user", "content": f"Text:\n{text}\n\nRewrite the first sentence."}]
    prompt = engine.render(msgs)
    engine.prefix_cache.clear()
    cont = engine.complete(prompt, max_new_tokens=steps, schedule="full").token_ids
    engine.prefix_cache.clear()
    full = engine.teacher_force(prompt, cont, schedule="full")
    out = {"span_tokens": len(seg), "steps": len(cont)}
    saved = {s.id: (s.keys, s.values, s.hidden) for s in engine.store}
    for name, dt in (("fp32", None), ("bf16", torch.bfloat16)):
        for s in engine.store:
            k, v, h = saved[s.id]
            if dt is not None:
                s.keys, s.values = k.to(dt), v.to(dt)
                s.hidden = h.to(dt) if h is not None else None
        lp = engine.teacher_force(prompt, cont, schedule="naive")
        kl = torch.sum(full.exp() * (full - lp), -1)
        out[f"kl_mean_{name}"] = kl.mean().item()
        out[f"kl_max_{name}"] = kl.max().item()
        out[f"top1_{name}"] = (lp.argmax(-1) == full.argmax(-1)).float().mean().item()
    for s in engine.store:
        s.keys, s.values, s.hidden = saved[s.id]
    return out


# ---- output ------------------------------------------------------------------------------------------------


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "---|" * len(cols)
    body = ["| " + " | ".join("-" if r.get(c[0]) is None else format(r[c[0]], c[2]) for c in cols) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="10,100,1000,10000")
    ap.add_argument("--lengths", default="500,1000,2000,4000,8000,16000")
    ap.add_argument("--segment-tokens", type=int, default=100)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--model", default="default", help='"default", an HF folder, or "none" to skip parts 4-5')
    ap.add_argument("--agent-tokens", type=int, default=40)
    ap.add_argument("--fidelity-steps", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    results: dict = {}

    counts = [int(c) for c in args.counts.split(",")]
    rows = lookup_vs_segments(counts, args.segment_tokens, args.prompt_tokens, args.k, scan_max=10_000)
    base = rows[0]["lookup_ms"]
    for r in rows:
        r["lookup_vs_first"] = r["lookup_ms"] / base
        r["scan_vs_lookup"] = r["scan_ms"] / r["lookup_ms"] if r["scan_ms"] else None
    results["lookup_vs_segments"] = rows
    print(f"\n### Lookup time vs stored segments ({args.prompt_tokens}-token prompt, {args.segment_tokens}-token "
          f"segments, k = {args.k}; median of 9)\n")
    print(_table(rows, [("segments", "segments", "d"), ("stored_tokens", "stored tokens", "d"),
                        ("found_tokens", "found tokens", "d"), ("lookup_ms", "lookup (ms)", ".2f"),
                        ("lookup_vs_first", "vs 10 segments", ".2f"), ("scan_ms", "per-segment scan (ms)", ".1f"),
                        ("scan_vs_lookup", "scan / lookup", ".0f")]))

    lengths = [int(x) for x in args.lengths.split(",")]
    rows = lookup_vs_prompt(lengths, 1000, args.segment_tokens, args.k)
    for r in rows:
        r["ms_per_1k_tokens"] = r["lookup_ms"] / r["prompt_tokens"] * 1000
        r["vs_first"] = r["lookup_ms"] / rows[0]["lookup_ms"]
        r["length_ratio"] = r["prompt_tokens"] / rows[0]["prompt_tokens"]
    results["lookup_vs_prompt"] = rows
    print("\n### Lookup time vs prompt length (1000 stored segments; median of 9)\n")
    print(_table(rows, [("prompt_tokens", "prompt tokens", "d"), ("found_tokens", "found tokens", "d"),
                        ("lookup_ms", "lookup (ms)", ".2f"), ("ms_per_1k_tokens", "ms per 1k prompt tokens", ".2f"),
                        ("length_ratio", "length ratio", ".0f"), ("vs_first", "time ratio", ".1f")]))

    rows = prefix_vs_entries([10, 100, 1000], 1000)
    for r in rows:
        r["scan_vs_radix"] = r["scan_ms"] / r["radix_ms"]
    results["prefix_vs_entries"] = rows
    print("\n### Exact-prefix lookup vs cached sequences (1000 tokens each, half a shared system prompt)\n")
    print(_table(rows, [("entries", "sequences", "d"), ("radix_ms", "radix (ms)", ".3f"),
                        ("scan_ms", "linear scan (ms)", ".2f"), ("scan_vs_radix", "scan / radix", ".0f")]))

    if args.model != "none":
        from relay_llm.engine import RelayEngine

        engine = RelayEngine.load(args.model, dtype="float32")
        try:
            t0 = time.perf_counter()
            rows = pipeline(engine, args.agent_tokens)
            later = [r for r in rows if r["ideal_tokens"]]
            total = {"agent": "all", "ideal_tokens": sum(r["ideal_tokens"] for r in later),
                     "found_decode_tokens": sum(min(r["found_decode_tokens"], r["ideal_tokens"]) for r in later)}
            for r in rows + [total]:
                r["found_vs_ideal"] = r["found_decode_tokens"] / r["ideal_tokens"] if r["ideal_tokens"] else None
            results["pipeline"] = {"rows": rows, "total": total, "seconds": time.perf_counter() - t0,
                                   "schedule": engine.default_schedule}
            print(f"\n### 5-agent pipeline, LangChain ChatPromptTemplate prompts ({args.model}, fp32, "
                  f"{args.agent_tokens} new tokens per agent, schedule {engine.default_schedule})\n")
            print(_table(rows + [total], [
                ("agent", "agent", "s"), ("prompt_tokens", "prompt tokens", "d"),
                ("ideal_tokens", "earlier-output tokens in prompt (ideal)", "d"),
                ("found_decode_tokens", "found (decode spans)", "d"), ("found_vs_ideal", "found / ideal", ".2f"),
                ("found_prefill_tokens", "also found (prefill spans)", "d"),
                ("prefix_hit_tokens", "prefix hit", "d"), ("reuse_rate", "reuse rate", ".2f")]))
            kinds: dict[str, list[int]] = {}
            for s in engine.store:
                kinds.setdefault(s.kind, []).append(s.nbytes // len(s))
            mem = {k: v[0] for k, v in kinds.items()}
            mem["kv_only"] = engine.executor.kv_bytes_per_token()
            mem["bf16_decode"] = (mem["kv_only"] // 2 + engine.executor.config.hidden_size * 2 + 8)
            results["bytes_per_token"] = mem
            fid = bf16_fidelity(engine, args.fidelity_steps)
            results["bf16_fidelity"] = fid
            print("\n### Store memory and bf16 storage\n")
            print(f"bytes per stored token: {mem}")
            print(f"bf16 fidelity: {fid}")
        finally:
            engine.close()

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
