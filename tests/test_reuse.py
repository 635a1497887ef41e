"""Reuse equivalences: spliced K/V in an identical context and exact-prefix hits reproduce full prefill."""

import pytest
import torch

from relay_llm.engine import EngineConfig, RelayEngine


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_segment_reuse_in_identical_context_reproduces_full_prefill(tiny):
    prompt = _ids(30, 1)
    out = tiny.complete(prompt, max_new_tokens=24).token_ids
    tiny.prefix_cache.clear()  # force the span path, not the prefix path
    new = prompt + out + _ids(10, 2)
    cont = _ids(8, 3)
    full = tiny.teacher_force(new, cont, schedule="full")
    naive = tiny.teacher_force(new, cont, schedule="naive")
    assert (naive - full).abs().max().item() < 1e-4
    stats = tiny.complete(new, max_new_tokens=1, schedule="naive").stats
    assert stats.spans == 1 and stats.span_tokens == 24 and stats.prefix_hit_tokens == 0
    assert stats.reused_tokens == 24 and stats.reuse_rate == 1.0
    assert stats.span_kinds == {"decode": 24}


def test_prefix_hit_reproduces_full_prefill(tiny):
    prompt = _ids(30, 4)
    out = tiny.complete(prompt, max_new_tokens=10).token_ids
    new = prompt + out[:5] + _ids(12, 5)
    cont = _ids(6, 6)
    full = tiny.teacher_force(new, cont, schedule="full")
    prefix = tiny.teacher_force(new, cont, schedule="prefix")
    assert (prefix - full).abs().max().item() < 1e-4
    stats = tiny.complete(new, max_new_tokens=1, schedule="prefix").stats
    assert stats.prefix_hit_tokens == 35
    assert stats.recomputed_cells == 0 and stats.reuse_rate == 1.0


def test_moved_span_is_reused_and_stays_close(tiny):
    """At a new position (new text in front) the span is rotated and spliced: an approximation,
    so only check it is used, and that its predictions stay close to full prefill."""
    prompt = _ids(30, 7)
    out = tiny.complete(prompt, max_new_tokens=24).token_ids
    new = _ids(17, 8) + out + _ids(6, 9)
    cont = _ids(5, 10)
    full = tiny.teacher_force(new, cont, schedule="full")
    naive = tiny.teacher_force(new, cont, schedule="naive")
    kl = torch.sum(full.exp() * (full - naive), -1)
    assert torch.isfinite(kl).all() and kl.max().item() < 1.0
    stats = tiny.complete(new, max_new_tokens=1, schedule="naive").stats
    assert stats.span_tokens == 24 and stats.prefix_hit_tokens == 0


def test_full_schedule_reuses_nothing(tiny):
    prompt = _ids(30, 11)
    out = tiny.complete(prompt, max_new_tokens=12).token_ids
    stats = tiny.complete(_ids(9, 12) + out + _ids(3, 15), max_new_tokens=1, schedule="full").stats
    assert stats.span_tokens == 12 and stats.reused_tokens == 0 and stats.reuse_rate == 0.0
    assert stats.recomputed_cells == stats.reusable_cells == 12 * tiny.executor.num_layers


def test_chat_output_is_found_in_a_later_user_message(default_free_tiny_chat):
    engine = default_free_tiny_chat
    reply = engine.chat([{"role": "user", "content": "Write about the fox and the river."}],
                        max_new_tokens=20)
    ids = engine.render([{"role": "user", "content": "Review: " + reply.text + " Thanks."}])
    assert engine.store.find(ids, 0, len(ids))  # re-tokenised text still contains a stored stretch


@pytest.fixture
def default_free_tiny_chat(tiny_engines):
    """The tiny Llama with an empty store (its decoded text round-trips through the tokenizer)."""
    engine = tiny_engines["llama"]
    engine.store.clear()
    engine.prefix_cache.clear()
    return engine


def test_dynamic_rope_falls_back_to_computing_spans(tmp_path):
    from .tiny import make_model

    folder = make_model("llama", tmp_path / "dyn", rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    engine = RelayEngine.load(str(folder), config=EngineConfig(min_match_tokens=8))
    try:
        prompt = _ids(20, 13)
        out = engine.complete(prompt, max_new_tokens=12).token_ids
        engine.prefix_cache.clear()
        res = engine.complete(_ids(5, 14) + out, max_new_tokens=1, schedule="naive")
        assert "cannot be rotated" in res.stats.fallback
        assert res.stats.span_tokens == 0 and res.stats.reused_tokens == 0
    finally:
        engine.close()
