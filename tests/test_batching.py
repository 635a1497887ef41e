"""Continuous batching: a batched decode step equals single-sequence runs, every request in a batch gets
what it gets alone, and the scheduler's limits (queue, KV budget, prefill chunks) hold."""

from __future__ import annotations

import threading

import pytest
import torch

from relay_llm.engine import EngineConfig, RelayEngine
from relay_llm.scheduler import QueueFull

from .conftest import TINY_CONFIG


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n random prompts of different lengths (some past the tiny models' sliding windows)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (int(L),), generator=g).tolist() for L in torch.linspace(5, 60, n)]


def test_batched_step_equals_one_run_per_sequence(tiny):
    """Rows stacked through the linears, attention per sequence: logits, K/V and captured states equal
    single-sequence decode steps, at different positions (sliding windows included)."""
    ex = tiny.executor
    prompts = _prompts(5)
    tokens = torch.tensor([7, 8, 9, 10, 11])

    def filled():
        kvs = [ex.new_buffers(len(p) + 2) for p in prompts]
        for p, kv in zip(prompts, kvs, strict=True):
            ex.run(torch.tensor(p), 0, kv)
        return kvs

    alone_kvs, batch_kvs = filled(), filled()
    alone = [ex.run(tokens[i : i + 1], len(p), kv, capture_layer=1) for i, (p, kv) in
             enumerate(zip(prompts, alone_kvs, strict=True))]
    batch = ex.step(tokens, batch_kvs, capture_layer=1)
    assert batch.logits.shape == (5, ex.config.vocab_size)
    for i, r in enumerate(alone):
        assert (batch.logits[i] - r.logits[0]).abs().max().item() < 1e-4
        assert (batch.captured[i] - r.captured[0]).abs().max().item() < 1e-5
        assert batch_kvs[i].length == alone_kvs[i].length == len(prompts[i]) + 1
        assert (batch_kvs[i].keys - alone_kvs[i].keys).abs().max().item() < 1e-5
        assert (batch_kvs[i].values - alone_kvs[i].values).abs().max().item() < 1e-5
    rows = ex.step(tokens[:3], filled()[:3], logit_rows=torch.tensor([0, 2]))
    assert (rows.logits - batch.logits[[0, 2]]).abs().max().item() < 1e-4


def _margin_at_divergence(engine, ids: list[int], alone: list[int], batched: list[int]) -> float | None:
    """None if the outputs agree; else the gap between the two likeliest tokens where they split (a tie
    when tiny: float rounding of the batched kernels may flip it)."""
    k = next((i for i, (a, b) in enumerate(zip(alone, batched, strict=False)) if a != b), None)
    if k is None:
        assert len(alone) == len(batched)
        return None
    logp = engine.teacher_force(ids, alone[: k + 1], schedule="full")[k]
    top = logp.topk(2).values
    return float(top[0] - top[1])


def _together(engine, jobs: list[tuple[list[int], dict]]) -> list:
    """Start every job's stream before reading any, so the scheduler batches them; collect results."""
    streams = [engine.stream(ids, **opts) for ids, opts in jobs]
    return [engine._collect(s) for s in streams]


def test_greedy_requests_in_a_batch_equal_running_alone(tiny):
    jobs = [(ids, dict(max_new_tokens=6 + 3 * i, schedule="full")) for i, ids in enumerate(_prompts(6, seed=1))]
    alone = []
    for ids, opts in jobs:
        tiny.store.clear()
        tiny.prefix_cache.clear()
        alone.append(tiny.complete(ids, **opts))
    tiny.store.clear()
    tiny.prefix_cache.clear()
    before = tiny.load_stats()["peak_batch"]
    together = _together(tiny, jobs)
    assert tiny.load_stats()["peak_batch"] >= max(before, 2)  # they did share decode steps
    for (ids, _), a, b in zip(jobs, alone, together, strict=True):
        margin = _margin_at_divergence(tiny, ids, a.token_ids, b.token_ids)
        assert margin is None or margin < 1e-4, f"outputs split where the top-2 gap is {margin}"
        assert b.finish_reason == a.finish_reason and b.stats.completion_tokens == a.stats.completion_tokens


def test_every_per_request_feature_holds_inside_a_batch(tiny):
    """Seeded sampling, penalties, stop strings, logprobs and a JSON grammar, side by side: each result
    equals the same request run alone."""
    p = _prompts(5, seed=2)
    jobs = [
        (p[0], dict(max_new_tokens=12, temperature=1.0, seed=11)),
        (p[1], dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=12, frequency_penalty=1.0)),
        (p[2], dict(max_new_tokens=12, repetition_penalty=1.3, logprobs=2)),
        (p[3], dict(max_new_tokens=16, response_format={"type": "json_object"}, seed=3, temperature=0.7)),
        (p[4], dict(max_new_tokens=20, stop=["e", "a"])),
    ]
    for _, opts in jobs:
        opts["schedule"] = "full"
    alone = [tiny.complete(ids, **opts) for ids, opts in jobs]
    together = _together(tiny, jobs)
    for (ids, opts), a, b in zip(jobs, alone, together, strict=True):
        margin = _margin_at_divergence(tiny, ids, a.token_ids, b.token_ids)
        assert margin is None or margin < 1e-4, (opts, margin)
        if margin is None:
            assert (a.text, a.finish_reason) == (b.text, b.finish_reason), opts
    assert together[2].logprobs is not None and len(together[2].logprobs) == len(together[2].token_ids)
    assert all(abs(x["logprob"] - y["logprob"]) < 1e-4 for x, y in zip(alone[2].logprobs, together[2].logprobs,
                                                                            strict=True))
    assert together[4].finish_reason == "stop" or "e" not in together[4].text


def test_cancelling_one_sequence_leaves_the_others_untouched(tiny):
    p = _prompts(3, seed=3)
    alone = [tiny.complete(ids, max_new_tokens=10, schedule="full").token_ids for ids in p]
    tiny.store.clear()
    tiny.prefix_cache.clear()
    streams = [tiny.stream(ids, max_new_tokens=10 if i != 1 else 200, schedule="full") for i, ids in enumerate(p)]
    next(streams[1])
    streams[1].cancel()
    got = [tiny._collect(s).token_ids for i, s in enumerate(streams) if i != 1]
    assert got == [alone[0], alone[2]]
    assert all(len(s) <= 10 for s in tiny.store if s.kind == "decode")  # the cancelled one stored nothing
    assert tiny.load_stats()["kv_reserved_bytes"] == 0


@pytest.fixture
def engine_with(tiny_dirs):
    """A fresh tiny llama engine with extra EngineConfig settings (closed after the test)."""
    made = []

    def make(**settings) -> RelayEngine:
        e = RelayEngine.load(str(tiny_dirs["llama"]), config=EngineConfig(**TINY_CONFIG, **settings))
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def test_a_full_queue_refuses_with_queue_full(engine_with):
    engine = engine_with(max_queue=2, max_batch=1)
    gate = threading.Event()
    engine._worker.submit(lambda emit, cancel: gate.wait(30))  # hold the model thread
    ids = _prompts(1)[0]
    streams = [engine.stream(ids, max_new_tokens=3) for _ in range(2)]
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.stream(ids, max_new_tokens=3)
    assert engine.load_stats()["waiting"] == 2
    gate.set()
    assert [engine._collect(s).stats.completion_tokens for s in streams] == [3, 3]
    assert engine.complete(ids, max_new_tokens=2).stats.completion_tokens == 2  # room again


def test_kv_budget_bounds_admission_and_refuses_what_never_fits(engine_with):
    probe = engine_with()
    per_token = probe.executor.kv_bytes_per_token()
    engine = engine_with(kv_budget_bytes=per_token * 80)
    with pytest.raises(ValueError, match="KV budget"):
        engine.stream(_prompts(1)[0], max_new_tokens=100)
    p = [ids[:30] for ids in _prompts(3, seed=4)[1:]] * 2  # 30 + 20 tokens each: one fits at a time
    alone = [probe.complete(ids, max_new_tokens=20, schedule="full").token_ids for ids in p]
    together = [r.token_ids for r in _together(engine, [(ids, dict(max_new_tokens=20, schedule="full")) for ids in p])]
    assert together == alone
    assert engine.load_stats()["peak_batch"] == 1 and engine.load_stats()["kv_reserved_bytes"] == 0


@pytest.mark.parametrize("schedule", ["full", "naive"])
def test_chunked_prefill_equals_one_pass(engine_with, schedule):
    """Prompts computed 7 tokens per step (with a prefix hit too) give the logits and text of one pass."""
    whole, chunked = engine_with(prefill_chunk_tokens=4096), engine_with(prefill_chunk_tokens=7)
    ids = _prompts(6, seed=5)[-1]
    a = whole.teacher_force(ids, [5, 6, 7], schedule=schedule)
    b = chunked.teacher_force(ids, [5, 6, 7], schedule=schedule)
    assert (a - b).abs().max().item() < 1e-4
    for e in (whole, chunked):
        e.complete(ids[:40], max_new_tokens=4)  # a prefix hit for the next call
    ra, rb = (e.complete(ids, max_new_tokens=8, schedule=schedule) for e in (whole, chunked))
    assert ra.token_ids == rb.token_ids
    assert ra.stats.prefix_hit_tokens == rb.stats.prefix_hit_tokens >= 40
    assert ra.stats.reuse_rate == rb.stats.reuse_rate


def test_a_long_prompt_does_not_stall_running_decodes(engine_with, monkeypatch):
    """While a long prompt is prefilled in chunks, a running sequence takes a decode step between them."""
    engine = engine_with(prefill_chunk_tokens=4)
    ex = engine.executor
    events: list[tuple[str, int]] = []  # ("chunk", tokens) of the long prompt, ("step", rows) of decode steps
    run, step = ex.run, ex.step
    short, long = _prompts(6, seed=6)[0], _prompts(6, seed=6)[-1]

    def logged_run(ids, start, kv, *a, **k):
        if kv.capacity == len(long) + 1:
            events.append(("chunk", len(ids)))
        return run(ids, start, kv, *a, **k)

    monkeypatch.setattr(ex, "run", logged_run)
    monkeypatch.setattr(ex, "step", lambda tokens, *a, **k: (events.append(("step", len(tokens))),
                                                              step(tokens, *a, **k))[1])
    gate = threading.Event()
    engine._worker.submit(lambda emit, cancel: gate.wait(30))  # both arrive before either starts
    first = engine.stream(short, max_new_tokens=30, schedule="full")
    second = engine.stream(long, max_new_tokens=1, schedule="full")
    gate.set()
    assert engine._collect(second).stats.prompt_tokens == len(long) == 60
    assert engine._collect(first).stats.completion_tokens == 30
    chunks = [i for i, e in enumerate(events) if e[0] == "chunk"]
    assert all(events[i][1] <= 4 for i in chunks) and sum(events[i][1] for i in chunks) == 60
    between = events[chunks[0] : chunks[-1]]
    assert sum(e[0] == "step" for e in between) == len(chunks) - 1  # one decode step after every chunk


def test_short_prompts_arriving_together_are_prefilled_in_one_turn(engine_with, monkeypatch):
    """Within one turn's token budget, every waiting prompt is prefilled before the next decode step."""
    engine = engine_with(prefill_chunk_tokens=512)
    events: list[str] = []
    step = engine.executor.step
    monkeypatch.setattr(engine.executor, "step", lambda tokens, *a, **k: (events.append(len(tokens)),
                                                                           step(tokens, *a, **k))[1])
    gate = threading.Event()
    engine._worker.submit(lambda emit, cancel: gate.wait(30))
    streams = [engine.stream(ids, max_new_tokens=5, schedule="full") for ids in _prompts(4, seed=7)]
    gate.set()
    assert [engine._collect(s).stats.completion_tokens for s in streams] == [5] * 4
    assert events[0] == 4  # the first decode step already holds all four
