"""Generation behaviour on tiny models: stop strings, streaming, bad input, budgets, threads, cancel."""

import threading

import pytest
import torch

from relay_llm.store import Segment, SegmentStore

USER = [{"role": "user", "content": "The architect writes a specification for the developer."}]


def _boundary_stop(engine, ids: list[int]) -> str:
    """A 4-character stop string straddling a token boundary of the greedy output for `ids`."""
    res = engine.complete(ids, max_new_tokens=30)
    text = res.text
    for i in range(1, len(res.token_ids)):
        b = len(engine._decode(res.token_ids[:i]))
        piece = text[b - 2 : b + 2]
        if b >= 2 and text.startswith(engine._decode(res.token_ids[:i])) and len(piece) == 4 \
                and piece.isascii() and piece.strip():
            return piece
    raise AssertionError(f"no clean token boundary in {text!r}")


def test_stop_string_across_token_boundary(tiny):
    ids = torch.randint(3, 500, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    full = tiny.complete(ids, max_new_tokens=30)
    assert full.finish_reason == "length"
    stop = _boundary_stop(tiny, ids)
    res = tiny.complete(ids, max_new_tokens=30, stop=["zzzz-not-there", stop])
    assert res.finish_reason == "stop"
    assert res.text == full.text[: full.text.find(stop)]
    assert stop not in res.text
    # token_ids are the tokens of the returned text, without the stop string's; so is the stored output.
    assert res.text.startswith(tiny._decode(res.token_ids)) and stop not in tiny._decode(res.token_ids)
    assert res.token_ids == full.token_ids[: len(res.token_ids)] and len(res.token_ids) < res.stats.completion_tokens
    stored = [s.token_ids.tolist() for s in tiny.store if s.kind == "decode"]
    assert res.token_ids in stored or len(res.token_ids) < tiny.store.k


def test_stream_joins_to_the_non_streaming_text(tiny):
    for opts in ({}, {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7}):
        whole = tiny.chat(USER, max_new_tokens=20, **opts)
        chunks = list(tiny.stream(USER, max_new_tokens=20, **opts))
        assert "".join(c.text for c in chunks) == whole.text
        assert chunks[-1].finish_reason == "length" and chunks[-1].stats.completion_tokens == 20
        assert all(c.finish_reason is None for c in chunks[:-1])


def test_seeded_sampling_is_reproducible_and_differs_by_seed(tiny):
    a = tiny.chat(USER, max_new_tokens=15, temperature=1.0, seed=1)
    b = tiny.chat(USER, max_new_tokens=15, temperature=1.0, seed=1)
    c = tiny.chat(USER, max_new_tokens=15, temperature=1.0, seed=2)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


@pytest.mark.parametrize("messages, opts, match", [
    ([], {}, "non-empty"),
    ([{"role": "wizard", "content": "hi"}], {}, "unknown role"),
    ([{"content": "hi"}], {}, "role"),
    (USER, {"max_new_tokens": 0}, "max_new_tokens"),
    (USER, {"max_new_tokens": -3}, "max_new_tokens"),
    (USER, {"schedule": "magic"}, "unknown schedule"),
])
def test_bad_input_gives_clear_errors_and_engine_stays_usable(tiny, messages, opts, match):
    with pytest.raises(ValueError, match=match):
        tiny.chat(messages, **opts)
    assert tiny.chat(USER, max_new_tokens=2).stats.completion_tokens == 2


def test_prompt_over_context_is_refused(tiny):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny.complete([5] * (tiny.max_context - 3), max_new_tokens=10)
    assert tiny.complete([5] * 10, max_new_tokens=2).stats.completion_tokens == 2


def _segment(n: int, first: int = 0) -> Segment:
    return Segment(token_ids=torch.arange(first, first + n), keys=torch.zeros(2, 1, n, 4),
                   values=torch.zeros(2, 1, n, 4), start_pos=0, fingerprint="x")


def test_store_never_exceeds_its_budget():
    one = _segment(20).charged_bytes
    store = SegmentStore(budget_bytes=int(3.5 * one), min_match_tokens=4)
    for i in range(10):
        assert store.add(_segment(20, first=1000 * i))  # distinct contents (equal ones are stored once)
        assert store.stats.bytes <= store.budget_bytes
    assert len(store) == 3 and store.stats.evictions == 7
    assert not store.add(_segment(200))  # larger than the whole budget: refused, nothing evicted
    assert len(store) == 3


def test_store_evicts_least_recently_used():
    store = SegmentStore(budget_bytes=2 * _segment(10).charged_bytes, min_match_tokens=4)
    a, b = _segment(10), Segment(token_ids=torch.arange(100, 110), keys=torch.zeros(2, 1, 10, 4),
                                 values=torch.zeros(2, 1, 10, 4), start_pos=0, fingerprint="x")
    store.add(a)
    store.add(b)
    assert store.find(list(range(10)), 0, 10)  # touches a
    assert store.add(_segment(10, first=500))  # evicts b, the least recently used
    assert store.get(a.id) is not None and store.get(b.id) is None
    assert not store.find(list(range(100, 110)), 0, 10)  # its index entries went with it


def test_engine_store_stays_within_budget(tiny):
    budget = 3 * 16 * tiny.executor.kv_bytes_per_token()
    tiny.store.budget_bytes = budget
    try:
        for i in range(6):
            tiny.complete([7 + i] * 5, max_new_tokens=16)
            assert tiny.store.stats.bytes <= budget
        assert tiny.store.stats.evictions > 0
    finally:
        tiny.store.budget_bytes = 2 << 30


def test_concurrent_calls_match_serial_calls(tiny):
    prompts = [[{"role": "user", "content": f"Question number {i}: what does the reviewer read?"}]
               for i in range(6)]
    serial = [tiny.chat(p, max_new_tokens=12, schedule="full").text for p in prompts]
    results: dict[int, str] = {}

    def work(i):
        results[i] = tiny.chat(prompts[i], max_new_tokens=12, schedule="full").text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(6)] == serial


def test_cancelled_stream_stores_nothing(tiny):
    stream = tiny.stream(USER, max_new_tokens=200)
    next(stream)
    stream.close()  # the consumer goes away
    done = tiny.chat(USER, max_new_tokens=3)  # queued behind the cancelled job; engine still works
    assert done.stats.completion_tokens == 3
    assert all(len(tiny.store.get(i)) <= 3 for i in list(tiny.store._segments))  # nothing half-made


def test_teacher_force_shape(tiny):
    out = tiny.teacher_force(USER, [10, 11, 12, 13], schedule="full")
    assert out.shape == (4, tiny.model.config.vocab_size)
    assert torch.allclose(out.exp().sum(-1), torch.ones(4), atol=1e-4)


def test_teacher_force_measures_without_touching_the_store(tiny):
    """teacher_force stores nothing and counts nothing: hits, reuse credit and prefix-cache stats stay put."""
    prompt = torch.randint(3, 500, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    out = tiny.complete(prompt, max_new_tokens=12).token_ids
    later = [7, 8, 9] + out + [10, 11, 12]
    seg_hits = {s.id: (s.hits, s.reused_tokens, s.priority) for s in tiny.store}
    before, prefix_before = tiny.store.stats(), tiny.prefix_cache.stats()
    tiny.teacher_force(later, [10, 11], schedule="naive")
    assert {s.id: (s.hits, s.reused_tokens, s.priority) for s in tiny.store} == seg_hits
    assert tiny.store.stats() == before and tiny.prefix_cache.stats() == prefix_before
    stats = tiny.complete(later, max_new_tokens=1, schedule="naive").stats  # a real call does count
    assert stats.span_tokens == len(out) and tiny.store.stats.hits == before["hits"] + 1
