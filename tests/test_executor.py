"""The layer-wise executor running the full schedule reproduces the model's own forward."""

import pytest
import torch

from .tiny import FAMILIES


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_schedule_reproduces_model_logits(tiny_engines, family):
    engine = tiny_engines[family]
    ex = engine.executor
    ids = torch.randint(3, engine.model.config.vocab_size, (60,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = engine.model(ids[None]).logits[0].float()
    got = ex.run(ids, 0, ex.new_buffers(64), logit_rows=torch.arange(60)).logits
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_steps_reproduce_model_logits(tiny_engines, family):
    """Prefill 40 tokens, then feed 20 one at a time: every step matches the one-shot forward."""
    engine = tiny_engines[family]
    ex = engine.executor
    ids = torch.randint(3, engine.model.config.vocab_size, (60,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = engine.model(ids[None]).logits[0].float()
    kv = ex.new_buffers(60)
    steps = [ex.run(ids[:40], 0, kv).logits]
    steps += [ex.run(ids[i : i + 1], i, kv).logits for i in range(40, 60)]
    assert (torch.cat(steps) - ref[39:]).abs().max().item() < 1e-4


def test_sliding_window_is_applied(tiny_engines):
    """Gemma 3's sliding layers must not see tokens beyond the window: changing a token far back
    changes the output only through the global layer, so removing the window would change logits."""
    engine = tiny_engines["gemma3"]
    ex = engine.executor
    assert ex.windows == [16, 16, None, 16]
    ids = torch.randint(3, 500, (50,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = engine.model(ids[None]).logits[0, -1].float()
    saved = list(ex.windows)
    try:
        ex.windows = [None] * len(saved)
        no_window = ex.run(ids, 0, ex.new_buffers(50)).logits[0]
    finally:
        ex.windows = saved
    assert (no_window - ref).abs().max().item() > 1e-3
    assert (ex.run(ids, 0, ex.new_buffers(50)).logits[0] - ref).abs().max().item() < 1e-4
