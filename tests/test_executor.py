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


class _FreshAll:
    """Every token at every layer, as a new tensor object per layer (like plans that rebuild their sets)."""

    def __init__(self, n: int):
        self.n = n

    def active(self, state):
        return torch.arange(self.n)

    def after_layer(self, state):
        pass


class _PerLayer:
    """A fixed list of active sets, one per layer."""

    def __init__(self, sets: list[torch.Tensor]):
        self.sets = sets

    def active(self, state):
        return self.sets[state.layer]

    def after_layer(self, state):
        pass


@pytest.mark.parametrize("family", ["gemma3", "mistral", "llama"])
@pytest.mark.parametrize("n", [12, 50])  # 12: shorter than the sliding windows
def test_fresh_active_tensors_per_layer_match_model(tiny_engines, family, n):
    engine = tiny_engines[family]
    ex = engine.executor
    ids = torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = engine.model(ids[None]).logits[0].float()
    rows = torch.arange(n)
    fresh = ex.run(ids, 0, ex.new_buffers(n), _FreshAll(n), logit_rows=rows).logits
    assert (fresh - ref).abs().max().item() < 1e-4
    assert (ex.run(ids, 0, ex.new_buffers(n), logit_rows=rows).logits - ref).abs().max().item() < 1e-4


def test_changing_active_sets_never_reuse_a_stale_mask(tiny_engines, monkeypatch):
    """Same-size but different sets at consecutive layers (and an equal set as a new object): the run
    equals one that builds every layer's mask afresh over all slots (no window slicing)."""
    engine = tiny_engines["gemma3"]
    ex = engine.executor
    ids = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(6))
    a, b = torch.arange(20, 40), torch.cat([torch.arange(4, 14), torch.arange(30, 40)])
    sets = [a, b, b.clone(), torch.arange(10, 30)]  # layer 2 is the global layer

    def run():
        kv = ex.new_buffers(40)
        ex.run(ids, 0, kv)  # fill every slot, then recompute the sets over it
        res = ex.run(ids, 0, kv, _PerLayer(sets), logit_rows=torch.arange(40))
        return res.logits, kv.keys.clone(), kv.values.clone()

    got = run()  # cached masks; sliding layers see only the slots inside the window
    monkeypatch.setattr(ex, "_run_mask", lambda masks, act, q_pos, end, window: (
        0, ex._mask(q_pos, torch.arange(end), window)))  # every mask fresh, over every slot
    want = run()
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keys_values_equal_what_the_layer_writes(tiny_engines, family):
    """The detection's shortcut (input norm + k/v-projections, RoPE on keys) computes the K/V a full layer
    writes, at every layer, from the layer's residual-stream input; and `attention_probs` over those keys
    is a distribution."""
    engine = tiny_engines[family]
    ex = engine.executor
    ids = torch.randint(3, engine.model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(40)
    for layer in range(ex.num_layers):
        kv = ex.new_buffers(40)
        hidden = ex.run(ids, 0, kv, capture_layer=layer).captured
        keys, values = ex.keys_values(layer, hidden, positions)
        assert (keys - kv.keys[layer]).abs().max().item() < 1e-4
        assert (values - kv.values[layer]).abs().max().item() < 1e-4
        probs = ex.attention_probs(layer, hidden[30:], positions[30:], keys)
        assert probs.shape == (10, 40)
        assert torch.allclose(probs.sum(-1), torch.ones(10), atol=1e-5)
        assert probs[0, 31:].abs().max().item() == 0  # causal
