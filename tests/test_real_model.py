"""Equivalences on the real default model (gemma-3-270m, fp32), loaded once per session."""

import pytest
import torch

pytestmark = pytest.mark.real_model


def test_identical_context_reuse_reproduces_full_prefill(default_engine):
    e = default_engine
    e.store.clear()
    e.prefix_cache.clear()
    prompt = e.encode("The three agents of the pipeline are the architect, the developer and")
    out = e.complete(prompt, max_new_tokens=24).token_ids
    e.prefix_cache.clear()
    new = prompt + out + e.encode("\n\nIn short,")[1:]
    cont = e.encode(" the pipeline passes text from one agent to the next.")[1:]
    full = e.teacher_force(new, cont, schedule="full")
    naive = e.teacher_force(new, cont, schedule="naive")
    assert (naive - full).abs().max().item() < 2e-3
    assert (naive.argmax(-1) == full.argmax(-1)).all()
    stats = e.complete(new, max_new_tokens=1, schedule="naive").stats
    assert stats.span_tokens == len(out) - (out[-1] in e.eos_ids) and stats.reuse_rate == 1.0


def test_executor_reproduces_model_logits(default_engine):
    e = default_engine
    ids = torch.tensor(e.encode("Relay caching reuses the keys and values of generated text. " * 3))
    with torch.inference_mode():
        ref = e.model(ids[None]).logits[0].float()
    got = e.executor.run(ids, 0, e.executor.new_buffers(len(ids)), logit_rows=torch.arange(len(ids))).logits
    assert (got - ref).abs().max().item() < 1e-3


LONG_OTHER_TEXT = (
    "Minutes of the harbour committee. The committee met on Tuesday to discuss the new breakwater, the "
    "budget for dredging the inner basin, and complaints about the noise from the fish market. The chair "
    "opened the meeting by thanking the volunteers who repaired the lighthouse stairs during the winter. "
) * 6


def test_profile_ships_and_relay_is_the_default(default_engine):
    assert default_engine.profile is not None
    assert default_engine.default_schedule == "relay"
    assert default_engine.capture_layer == default_engine.profile.start_layer


def test_relay_is_far_more_faithful_than_naive_after_a_long_different_prefix(default_engine):
    e = default_engine
    e.store.clear()
    e.prefix_cache.clear()
    up = e.chat([{"role": "user", "content": "Explain in a few sentences how a hash map stores and finds keys."}],
                max_new_tokens=48, temperature=0.7, top_p=0.95, seed=3)
    prompt = e.render([
        {"role": "system", "content": LONG_OTHER_TEXT},
        {"role": "user", "content": f"Here is an explanation from a colleague:\n\n{up.text}\n\nSummarise it."},
    ])
    assert len(prompt) > 300 + 40
    cont = e.complete(prompt, max_new_tokens=16, schedule="full").token_ids
    e.prefix_cache.clear()  # measure span reuse, not the exact-prefix hit the call above left
    full = e.teacher_force(prompt, cont, schedule="full")

    def kl(schedule):
        lp = e.teacher_force(prompt, cont, schedule=schedule)
        return torch.sum(full.exp() * (full - lp), -1).mean().item()

    k_naive, k_relay = kl("naive"), kl("relay")
    stats = e.complete(prompt, max_new_tokens=1, schedule="relay").stats
    # The sampled upstream text depends on the CPU's kernels (AVX2: reuse > 0.5; AVX512 + AMX: 0.499 on the
    # same seed, with torch's plain kernels too): relay must still reuse close to half the span's cells.
    assert stats.span_tokens >= 30 and stats.reuse_rate > 0.45
    assert k_relay < k_naive / 3, (k_relay, k_naive)


def test_batched_decode_equals_single_sequences_on_the_default_model(default_engine):
    """Executor.step on three sequences at different positions (past the 512-token sliding window too)
    equals one single-sequence run each; greedy requests decoded together equal each run alone."""
    e = default_engine
    ex = e.executor
    base = e.encode("Agents pass their outputs to each other, and the cache keeps what they wrote. " * 40)
    prompts = [base[:30], base[:200], base[:560]]
    tokens = torch.tensor([e.encode(w)[-1] for w in (" cache", " agent", " text")])

    def filled():
        kvs = [ex.new_buffers(len(p) + 1) for p in prompts]
        for p, kv in zip(prompts, kvs, strict=True):
            ex.run(torch.tensor(p), 0, kv)
        return kvs

    batch = ex.step(tokens, filled())
    for i, kv in enumerate(filled()):
        alone = ex.run(tokens[i : i + 1], len(prompts[i]), kv).logits[0]
        assert (batch.logits[i] - alone).abs().max().item() < 1e-3
        assert batch.logits[i].argmax() == alone.argmax()
    e.store.clear()
    e.prefix_cache.clear()
    alone = [e.complete(p, max_new_tokens=8, schedule="full").token_ids for p in prompts]
    streams = [e.stream(p, max_new_tokens=8, schedule="full") for p in prompts]
    assert [e._collect(s).token_ids for s in streams] == alone
