"""SegmentStore (budget, eviction policy, stats), the radix exact-prefix cache, fingerprints, persistence."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_llm.engine import EngineConfig, RelayEngine
from relay_llm.matcher import KGramIndex
from relay_llm.profiler import Profile
from relay_llm.store import INDEX_BYTES_PER_TOKEN, PrefixCache, Segment, SegmentStore

from .test_matching import DOC, SPEC_ANSWER, relay_answer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the subprocess imports relay_llm from here


def seg(ids, kind: str = "decode", fp: str = "fp", width: int = 4) -> Segment:
    ids = list(ids)
    n = len(ids)
    return Segment(torch.tensor(ids), torch.randn(2, 1, n, width), torch.randn(2, 1, n, width), 0, fp, kind)


def find(store: SegmentStore, ids) -> list:
    ids = list(ids)
    return store.find([0] + ids + [0], fingerprint=None)


# ---- budget and eviction policy ------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "add", "add", "find", "remove"]), st.integers(0, 30),
                          st.integers(4, 60), st.sampled_from(["decode", "prefill"])), max_size=60),
       st.integers(200, 6000))
def test_budget_is_never_exceeded_under_random_operations(ops, budget):
    store = SegmentStore(budget_bytes=budget, min_match_tokens=4)
    for op, key, n, kind in ops:
        ids = range(1000 * key, 1000 * key + n)
        if op == "add":
            s = seg(ids, kind, width=1)
            added = store.add(s)
            assert added or s.charged_bytes > budget or n < 4 or any(len(x) == n and x.token_ids[0] == 1000 * key
                                                              for x in store)
        elif op == "find":
            find(store, ids)
        elif store.get(key) is not None:
            store.remove(key)
        assert store.stats.bytes <= budget
        segs = list(store)
        assert store.stats.bytes == sum(s.charged_bytes for s in segs) and store.stats.segments == len(segs)
        assert len(store._index) == sum(len(s) - 3 for s in segs)  # every k-gram of every segment, no more


def test_plain_lru_when_nothing_is_reused():
    store = SegmentStore(budget_bytes=3 * seg(range(10)).charged_bytes, min_match_tokens=4)
    a, b, c, d = (seg(range(100 * i, 100 * i + 10)) for i in range(4))
    for s in (a, b, c):
        store.add(s)
    store.add(d)
    assert store.get(a.id) is None and {s.id for s in store} == {b.id, c.id, d.id}
    assert store.stats.evictions == 1


def test_a_hot_segment_outlives_newer_cold_ones_but_ages_out():
    one = seg(range(10)).charged_bytes
    store = SegmentStore(budget_bytes=3 * one, min_match_tokens=4)
    hot = seg(range(10))
    store.add(hot)
    for _ in range(3):
        find(store, range(10))  # reused whole three times: credit 1 + log2(4) = 3
    for i in range(1, 5):
        store.add(seg(range(100 * i, 100 * i + 10)))
        assert store.get(hot.id) is not None  # newer cold segments go first
    for i in range(5, 12):
        store.add(seg(range(100 * i, 100 * i + 10)))
    assert store.get(hot.id) is None  # ... but not forever


def test_a_long_segment_quoted_a_little_goes_before_a_short_one_reused_whole():
    long_seg, short_seg = seg(range(1000, 1200)), seg(range(5000, 5020))
    budget = long_seg.charged_bytes + short_seg.charged_bytes + seg(range(20)).charged_bytes - 1
    store = SegmentStore(budget_bytes=budget, min_match_tokens=8)
    store.add(long_seg)
    store.add(short_seg)
    find(store, range(1050, 1066))  # a 16-token quote of 200 tokens
    find(store, range(5000, 5020))  # the whole short segment
    store.add(seg(range(9000, 9020)))
    assert store.get(long_seg.id) is None and store.get(short_seg.id) is not None


def test_prompt_chunks_go_before_outputs_of_the_same_age():
    store = SegmentStore(budget_bytes=2 * seg(range(10)).charged_bytes, min_match_tokens=4)
    out, chunk = seg(range(10), "decode"), seg(range(100, 110), "prefill")
    store.add(out)
    store.add(chunk)
    store.add(seg(range(200, 210), "decode"))
    assert store.get(chunk.id) is None and store.get(out.id) is not None


def test_duplicates_are_stored_once_and_oversized_or_short_segments_refused():
    store = SegmentStore(budget_bytes=seg(range(50)).charged_bytes, min_match_tokens=8)
    assert store.add(seg(range(20)))
    assert not store.add(seg(range(20)))  # same content, same fingerprint
    assert store.add(seg(range(20), fp="other"))  # same content made by another model: a different item
    assert not store.add(seg(range(100)))  # larger than the whole budget
    assert not store.add(seg(range(5)))  # shorter than min_match_tokens: could never be found
    s = store.stats()
    assert (s["entries"], s["duplicates"], s["rejected"], s["evictions"]) == (2, 1, 2, 0)


def test_stats_and_clear():
    store = SegmentStore(budget_bytes=1 << 20, min_match_tokens=4)
    store.add(seg(range(10)))
    store.add(seg(range(100, 130), "prefill"))
    find(store, range(100, 130))
    find(store, range(500, 530))
    s = store.stats()
    assert {"entries", "bytes", "hits", "misses", "evictions"} <= set(s)
    assert (s["entries"], s["hits"], s["misses"], s["reused_tokens"], s["tokens"]) == (2, 1, 1, 30, 40)
    assert s["bytes"] == store.stats.bytes > 0 and s["by_kind"] == {"decode": 1, "prefill": 1}
    assert s["bytes_per_token"] == s["bytes"] / 40
    store.clear()
    assert len(store) == 0 and store.stats.bytes == 0 and find(store, range(100, 130)) == []


def test_index_charge_covers_the_measured_index_memory():
    """The budget's per-token charge for the k-gram index is at least what the index really allocates."""
    import tracemalloc

    ids = [np.random.default_rng(i).integers(0, 262144, 100).astype(np.int64) for i in range(300)]
    index = KGramIndex(16)
    tracemalloc.start()
    try:
        for i, x in enumerate(ids):
            index.add(1000 + i, x)
        allocated, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_token = (allocated + 8 * sum(len(x) for x in ids)) / sum(len(x) for x in ids)  # + the store's id copy
    assert 100 < per_token <= INDEX_BYTES_PER_TOKEN, per_token


def test_engine_bytes_per_token(tiny):
    """Decode segments hold K/V (+ ids and one hidden vector) per token, and a sketch of the prompt ahead of
    them (8 bytes per distinct 4-gram: one here): measured, not assumed."""
    tiny.complete([5] * 10, max_new_tokens=20)
    s = tiny.store.stats()
    kv = tiny.executor.kv_bytes_per_token()
    hidden = tiny.executor.config.hidden_size * 4
    assert s["bytes_per_token"] == kv + hidden + 8 + INDEX_BYTES_PER_TOKEN + 8 / s["tokens"]
    assert s["index_bytes"] == INDEX_BYTES_PER_TOKEN * s["tokens"]


# ---- radix exact-prefix cache ------------------------------------------------------------------------------


def kv_for(ids: list[int]) -> torch.Tensor:
    """Deterministic K/V [2, 1, n, 3] where position p depends on ids[: p + 1] (like real exact-prefix K/V)."""
    rows = [[float(hash(tuple(ids[: p + 1])) % 1000), float(p), float(ids[p])] for p in range(len(ids))]
    return torch.tensor(rows).expand(2, 1, len(ids), 3).contiguous()


def common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of a and b."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_radix_shares_prefixes_and_returns_exact_kv():
    cache = PrefixCache(budget_bytes=1 << 20)
    system = list(range(50))
    a, b = system + [100, 101, 102], system + [200, 201]
    per_token = 2 * kv_for([1]).numel() * 4 // 1
    assert cache.add(a, kv_for(a), kv_for(a), "fp") == len(a)
    assert cache.add(b, kv_for(b), kv_for(b), "fp") == 2  # only the new suffix is stored
    assert cache.bytes == (len(a) + 2) * per_token and cache.nodes == 3
    q = system + [200, 7, 7]
    n, k, v = cache.lookup(q, "fp")
    assert n == 51 and torch.equal(k, kv_for(q)[:, :, :51]) and torch.equal(v, kv_for(q)[:, :, :51])
    n, k, _ = cache.lookup(system[:30] + [9], "fp")  # ends inside an edge
    assert n == 30 and torch.equal(k, kv_for(system)[:, :, :30])
    assert cache.lookup(q, "fp", limit=10)[0] == 10
    assert cache.lookup(q, "other")[0] == 0  # another model's / profile's tree is never used
    assert cache.lookup([7] + system, "fp")[0] == 0


def test_radix_evicts_least_recently_used_leaves_within_budget():
    per_token = 2 * kv_for([1]).numel() * 4
    cache = PrefixCache(budget_bytes=100 * per_token)
    system = list(range(40))
    seqs = [system + [1000 + i] * 20 for i in range(4)]
    for s in seqs[:3]:
        cache.add(s, kv_for(s), kv_for(s), "fp")  # 40 + 3 * 20 = 100 tokens: full
    assert cache.bytes == 100 * per_token
    cache.lookup(seqs[0], "fp")  # seqs[1] is now the least recently used leaf
    cache.add(seqs[3], kv_for(seqs[3]), kv_for(seqs[3]), "fp")
    assert cache.bytes <= 100 * per_token and cache.evictions == 1
    assert cache.lookup(seqs[1], "fp")[0] == 40 and cache.lookup(seqs[0], "fp")[0] == 60
    assert cache.lookup(seqs[3], "fp")[0] == 60
    assert cache.add(list(range(500, 700)), kv_for(list(range(200))), kv_for(list(range(200))), "fp") == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=8),
       st.lists(st.integers(0, 3), max_size=14))
def test_radix_lookup_is_the_longest_common_prefix(seqs, query):
    cache = PrefixCache(budget_bytes=1 << 30)
    for s in seqs:
        cache.add(s, kv_for(s), kv_for(s), "fp")

    n, k, _ = cache.lookup(query, "fp")
    assert n == max(common(s, query) for s in seqs)
    if n:
        assert torch.equal(k, kv_for(query)[:, :, :n])


def test_multi_turn_chat_and_repeated_system_prompt_hit_the_prefix_cache(llama):
    system = {"role": "system", "content": "You are the reviewer. " * 6}
    turn1 = [system, {"role": "user", "content": "Read the specification."}]
    r1 = llama.chat(turn1, max_new_tokens=8)
    turn2 = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And the code?"}]
    seq1 = llama.render(turn1) + r1.token_ids
    stats = llama.chat(turn2, max_new_tokens=2).stats
    assert stats.prefix_hit_tokens == common(seq1, llama.render(turn2)) > len(llama.render(turn1))
    other = [system, {"role": "user", "content": "Something else entirely."}]
    stats = llama.chat(other, max_new_tokens=1).stats
    assert stats.prefix_hit_tokens == common(llama.render(turn1), llama.render(other)) > 60
    assert llama.prefix_cache.stats()["hits"] >= 2


@pytest.fixture
def llama(tiny_engines):
    engine = tiny_engines["llama"]
    engine.store.clear()
    engine.prefix_cache.clear()
    yield engine
    engine.store.clear()
    engine.prefix_cache.clear()


# ---- fingerprints --------------------------------------------------------------------------------------


def test_kv_of_another_model_dtype_or_profile_is_never_spliced(llama):
    ans = relay_answer(llama, "Q", SPEC_ANSWER)
    prompt = llama.render([{"role": "user", "content": f"Review: {SPEC_ANSWER}"}])
    assert llama.complete(prompt, max_new_tokens=1, schedule="naive").stats.span_tokens >= len(ans) - 3
    llama.prefix_cache.clear()
    (s,) = [s for s in llama.store if s.kind == "decode"]
    forged = Segment(s.token_ids, s.keys, s.values, s.start_pos, "llama:other-weights:float32|no-profile")
    llama.store.clear()
    assert llama.store.add(forged)
    stats = llama.complete(prompt, max_new_tokens=1, schedule="naive").stats
    assert stats.span_tokens == 0 and stats.reused_tokens == 0

    llama.store.clear()
    llama.prefix_cache.clear()
    relay_answer(llama, "Q", SPEC_ANSWER)
    llama.complete(prompt, max_new_tokens=2)  # leaves an exact prefix too
    n = llama.executor.num_layers
    profile = Profile(architecture="llama", weights=llama.fingerprint.weights, dtype="float32", num_layers=n,
                      start_layer=1, det_layer=1, end_layer=n - 1)
    llama.set_profile(profile)
    try:
        assert "profile-v" in llama.store_fingerprint
        stats = llama.complete(prompt, max_new_tokens=1, schedule="naive").stats
        assert stats.span_tokens == 0 and stats.prefix_hit_tokens == 0  # made under another profile
    finally:
        llama.set_profile(None)
    assert llama.complete(prompt, max_new_tokens=1, schedule="naive").stats.prefix_hit_tokens > 0


# ---- storage dtype --------------------------------------------------------------------------------------


def test_bf16_storage_halves_kv_bytes_and_stays_close(tiny_dirs):
    prompts = {}
    stores = {}
    for dt in (None, "bfloat16"):
        e = RelayEngine.load(str(tiny_dirs["llama"]), config=EngineConfig(min_match_tokens=8, store_dtype=dt))
        try:
            ans = relay_answer(e, "Q", SPEC_ANSWER)
            (s,) = list(e.store)
            stores[dt] = s
            ids = e.render([{"role": "user", "content": f"Please check: {SPEC_ANSWER}"}])
            cont = e.encode(" The reviewer reads both", special_tokens=False)
            prompts[dt] = e.teacher_force(ids, cont, schedule="naive")
            assert e.complete(ids, max_new_tokens=1, schedule="naive").stats.span_tokens >= len(ans) - 3
        finally:
            e.close()
    assert stores["bfloat16"].keys.dtype == torch.bfloat16
    assert stores["bfloat16"].keys.nbytes * 2 == stores[None].keys.nbytes
    kl = torch.sum(prompts[None].exp() * (prompts[None] - prompts["bfloat16"]), -1)
    assert kl.max().item() < 1e-2


# ---- persistence -------------------------------------------------------------------------------------------


def persisted_engine(tiny_dirs, folder, family: str = "llama", budget: int = 2 << 30) -> RelayEngine:
    return RelayEngine.load(str(tiny_dirs[family]), config=EngineConfig(
        min_match_tokens=8, persist_dir=str(folder), store_budget_bytes=budget))


def test_persistence_round_trip_across_two_engines(tiny_dirs, tmp_path):
    a = persisted_engine(tiny_dirs, tmp_path)
    try:
        prompt = a.render([{"role": "user", "content": DOC}])
        out = a.complete(prompt, max_new_tokens=12).token_ids
        saved = {s.content_key: s for s in a.store}
        assert {s.kind for s in saved.values()} == {"decode", "prefill"}
    finally:
        a.close()
    b = persisted_engine(tiny_dirs, tmp_path)
    try:
        loaded = {s.content_key: s for s in b.store}
        assert loaded.keys() == saved.keys()
        for key, s in loaded.items():
            assert torch.equal(s.keys, saved[key].keys) and torch.equal(s.hidden, saved[key].hidden)
            assert s.fingerprint == b.store_fingerprint
        new = b.render([{"role": "system", "content": "Another agent."},
                        {"role": "user", "content": "Check this: " + DOC}]) + out + [5]
        stats = b.complete(new, max_new_tokens=1, schedule="naive").stats
        assert stats.span_kinds.get("prefill", 0) > 50 and stats.span_kinds.get("decode", 0) == len(out)
    finally:
        b.close()
    other = persisted_engine(tiny_dirs, tmp_path, family="qwen2")  # another model: its own folder, empty
    try:
        assert len(other.store) == 0
    finally:
        other.close()


def test_persistence_survives_a_restart_in_a_subprocess(tiny_dirs, tmp_path):
    script = textwrap.dedent(f"""
        import json
        from relay_llm.engine import EngineConfig, RelayEngine
        e = RelayEngine.load({str(tiny_dirs["llama"])!r},
                             config=EngineConfig(min_match_tokens=8, persist_dir={str(tmp_path)!r}))
        r = e.complete([7, 8, 9, 10, 11], max_new_tokens=16)
        print(json.dumps(r.token_ids))
        e.close()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    e = persisted_engine(tiny_dirs, tmp_path)
    try:
        stats = e.complete([3, 4] * 10 + out + [5], max_new_tokens=1, schedule="naive").stats
        assert stats.span_kinds == {"decode": len(out)} and stats.reuse_rate == 1.0
    finally:
        e.close()


def test_corrupt_truncated_or_foreign_files_are_skipped_with_a_warning(tmp_path, caplog):
    store = SegmentStore(budget_bytes=1 << 20, min_match_tokens=4, persist_dir=tmp_path)
    segs = [seg(range(100 * i, 100 * i + 20)) for i in range(4)]
    for s in segs:
        assert store.add(s)
    store.add(seg(range(900, 920), fp="another-model"))
    files = {s.content_key: store.files.path(s.content_key) for s in segs}
    keys = [s.content_key for s in segs]
    data = files[keys[0]].read_bytes()
    files[keys[0]].write_bytes(data[: len(data) // 2])  # truncated
    data = bytearray(files[keys[1]].read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the tensors
    files[keys[1]].write_bytes(bytes(data))
    (tmp_path / "orphan.safetensors").write_bytes(b"junk")  # left by a crash before the index was written
    with caplog.at_level(logging.WARNING, logger="relay_llm.persist"):
        again = SegmentStore(budget_bytes=1 << 20, min_match_tokens=4, persist_dir=tmp_path)
        assert again.load_persisted("fp") == 2
    assert {s.content_key for s in again} == set(keys[2:])
    text = caplog.text
    assert "bytes" in text and "CRC-32" in text and "another model" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["index.json"] + [f"{k}.safetensors" for k in keys[2:]])
    assert set(json.loads((tmp_path / "index.json").read_text())["entries"]) == set(keys[2:])


def test_persist_folder_follows_the_budget(tmp_path):
    one = seg(range(20)).charged_bytes
    store = SegmentStore(budget_bytes=3 * one, min_match_tokens=4, persist_dir=tmp_path)
    for i in range(10):
        store.add(seg(range(100 * i, 100 * i + 20)))
    assert len(store) == 3 and len(list(tmp_path.glob("*.safetensors"))) == 3
    headers = store.files.disk_bytes() - (store.stats.bytes - store.stats.index_bytes)
    assert headers < 3 * 600 + (tmp_path / "index.json").stat().st_size
    small = SegmentStore(budget_bytes=2 * one, min_match_tokens=4, persist_dir=tmp_path)  # a smaller budget
    assert small.load_persisted("fp") == 3 and len(small) == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    small.clear()
    assert list(tmp_path.glob("*.safetensors")) == []


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(10, 40), min_size=1, max_size=12))
def test_persisted_store_reloads_exactly_what_was_kept(tmp_path_factory, lengths):
    folder = tmp_path_factory.mktemp("p")
    store = SegmentStore(budget_bytes=3 * seg(range(40)).charged_bytes, min_match_tokens=4, persist_dir=folder)
    for i, n in enumerate(lengths):
        store.add(seg(range(1000 * i, 1000 * i + n)))
        assert store.stats.bytes <= store.budget_bytes
    again = SegmentStore(budget_bytes=store.budget_bytes, min_match_tokens=4, persist_dir=folder)
    again.load_persisted("fp")
    assert {s.content_key for s in again} == {s.content_key for s in store}
