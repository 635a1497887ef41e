"""Equivalences on the real default model (gemma-3-270m, fp32), loaded once per session."""

import pytest

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
    import torch

    e = default_engine
    ids = torch.tensor(e.encode("Relay caching reuses the keys and values of generated text. " * 3))
    with torch.inference_mode():
        ref = e.model(ids[None]).logits[0].float()
    got = e.executor.run(ids, 0, e.executor.new_buffers(len(ids)), logit_rows=torch.arange(len(ids))).logits
    assert (got - ref).abs().max().item() < 1e-3
