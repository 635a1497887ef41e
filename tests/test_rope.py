"""Rotated keys equal keys computed at the new positions: every pairing, partial rotary, scalings."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from relay_llm.rope import RopeSpec, layer_specs, rotate, rotate_layers

from .tiny import FAMILIES


def _apply(k, pos, inv_freq, rotary_dim, interleaved, scale=1.0):
    """Reference RoPE at absolute positions `pos` ([T]) on k [..., T, d], written independently."""
    ang = pos[:, None].double() * inv_freq[None].double()
    cos, sin = (ang.cos() * scale).float(), (ang.sin() * scale).float()
    rot, rest = k[..., :rotary_dim], k[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
    else:
        h = rotary_dim // 2
        x1, x2 = rot[..., :h], rot[..., h:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
    return torch.cat((out, rest), -1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [32, 16])  # 16 of 32 dims: partial rotary
def test_delta_rotation_matches_direct_rope(interleaved, rotary_dim):
    torch.manual_seed(0)
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    spec = RopeSpec(inv_freq=inv, rotary_dim=rotary_dim, interleaved=interleaved)
    raw = torch.randn(2, 40, 32)
    old = torch.arange(40)
    for delta in (1, 37, 327, -5):
        moved = rotate(_apply(raw, old, inv, rotary_dim, interleaved), delta, spec)
        assert torch.allclose(moved, _apply(raw, old + delta, inv, rotary_dim, interleaved), atol=1e-4)


def test_per_token_deltas():
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    spec = RopeSpec(inv_freq=inv, rotary_dim=16)
    raw = torch.randn(1, 5, 16)
    delta = torch.tensor([0, 3, 10, 100, 1000])
    got = rotate(_apply(raw, torch.arange(5), inv, 16, False), delta, spec)
    assert torch.allclose(got, _apply(raw, torch.arange(5) + delta, inv, 16, False), atol=1e-4)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
])
def test_static_scalings_compose_with_hf_rotary(rope):
    """HF's own rotary embedding (with yarn's attention factor folded into cos/sin) at p and p + d."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_theta": 10000.0, **rope})
    emb = LlamaRotaryEmbedding(config)
    spec = RopeSpec(inv_freq=emb.inv_freq.float(), rotary_dim=32, rope_type=rope["rope_type"])
    raw = torch.randn(1, 2, 30, 32)
    pos = torch.arange(30)[None]

    def hf(p):
        cos, sin = emb(raw, p)
        return apply_rotary_pos_emb(raw, raw, cos, sin)[1]

    if rope["rope_type"] == "yarn":
        assert emb.attention_scaling != 1.0  # the factor is present, and must not be applied twice
    assert torch.allclose(rotate(hf(pos), 500, spec), hf(pos + 500), atol=1e-4)


def test_dynamic_scaling_is_refused():
    spec = RopeSpec(inv_freq=torch.ones(4), rotary_dim=8, rope_type="dynamic")
    assert not spec.composable
    with pytest.raises(ValueError, match="not composable"):
        rotate(torch.randn(3, 8), 2, spec)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer0_keys_rotate_to_new_positions(tiny_engines, family):
    """Layer-0 keys depend only on (token, position): run the same ids at positions 0.. and d.., and
    the rotated first run must equal the second at every layer type's base."""
    engine = tiny_engines[family]
    ex = engine.executor
    ids = torch.randint(3, 500, (20,), generator=torch.Generator().manual_seed(4))
    d = 33
    kv_a = ex.new_buffers(20)
    ex.run(ids, 0, kv_a)
    kv_b = ex.new_buffers(d + 20)
    ex.run(torch.cat([torch.full((d,), 5), ids]), 0, kv_b)
    moved = rotate(kv_a.keys[0, :, :20], d, ex.rope[0])
    assert torch.allclose(moved, kv_b.keys[0, :, d:], atol=1e-4)
    assert not torch.allclose(kv_a.keys[0, :, :20], kv_b.keys[0, :, d:], atol=1e-2)  # rotation mattered


def test_gemma3_layer_types_have_their_own_bases(tiny_engines):
    engine = tiny_engines["gemma3"]
    specs = layer_specs(engine.model)
    types = engine.executor.layer_types
    full = specs[types.index("full_attention")]
    sliding = specs[types.index("sliding_attention")]
    assert not torch.allclose(full.inv_freq, sliding.inv_freq)
    rotary = engine.model.model.rotary_emb
    raw = torch.randn(1, 1, 10, 16)
    pos = torch.arange(10)[None]
    for layer_type, spec in (("full_attention", full), ("sliding_attention", sliding)):
        def hf(p, lt=layer_type):
            cos, sin = rotary(raw, p, lt)
            return apply_rotary_pos_emb(raw, raw, cos, sin)[1]
        assert torch.allclose(rotate(hf(pos), 200, spec), hf(pos + 200), atol=1e-4)


@pytest.mark.parametrize("delta", [57, -9, "per_token"])
def test_rotate_layers_equals_per_layer_loop(tiny_engines, delta):
    """Gemma 3's two layer types (different bases), grouped, give the per-layer result."""
    specs = tiny_engines["gemma3"].executor.rope
    assert len({tuple(s.inv_freq.tolist()) for s in specs}) == 2
    keys = torch.randn(len(specs), 1, 30, 16)
    if delta == "per_token":
        delta = torch.randint(-50, 500, (30,), generator=torch.Generator().manual_seed(7))
    want = torch.stack([rotate(keys[i], delta, spec) for i, spec in enumerate(specs)])
    assert torch.allclose(rotate_layers(keys, delta, specs), want, rtol=0, atol=1e-6)


def test_rotate_layers_groups_by_layout_not_by_object():
    """Equal inv_freq in separate objects group together; pairing and rotary_dim keep groups apart."""
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    specs = [RopeSpec(inv, 16), RopeSpec(inv.clone(), 16), RopeSpec(inv, 16, interleaved=True),
             RopeSpec(inv[:4].clone(), 8), RopeSpec(inv * 0.5, 16)]
    keys = torch.randn(len(specs), 2, 9, 16, dtype=torch.bfloat16)
    for delta in (3, torch.arange(9) * 11):
        want = torch.stack([rotate(keys[i], delta, spec) for i, spec in enumerate(specs)])
        got = rotate_layers(keys, delta, specs)
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), want.float(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="specs for"):
        rotate_layers(keys, 1, specs[:2])
    with pytest.raises(ValueError, match="shifts for"):
        rotate_layers(keys, torch.arange(4), specs)
    with pytest.raises(ValueError, match="not composable"):
        rotate_layers(keys, 1, specs[:4] + [RopeSpec(inv, 16, rope_type="dynamic")])
