"""RoPE delta rotation: move cached (post-RoPE) keys from position p_old to p_new.

RoPE is a rotation R(p) per frequency pair, and R(a) R(b) = R(a + b), so a key cached at p_old becomes
the key at p_new by k' = R(p_new - p_old) k. Values are never rotated. Static scalings (linear, llama3,
yarn) only change `inv_freq`, so they compose too; yarn's attention factor multiplies cos/sin in HF, which
scales the cached key once - the delta rotation is a pure rotation and does not apply it again.
Dynamic scalings (dynamic NTK, longrope) change `inv_freq` with the sequence length: not composable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NOT_COMPOSABLE = ("dynamic", "longrope")


@dataclass(frozen=True)
class RopeSpec:
    """One layer's RoPE layout.

    inv_freq: [rotary_dim // 2] fp32 inverse frequencies (after any static scaling).
    rotary_dim: how many leading head dims rotate (< head_dim for partial rotary).
    interleaved: GPT-J pairing (2i, 2i+1) if True, NeoX rotate-half pairing (i, i + rotary_dim/2) if False.
    rope_type: HF rope type name; `composable` is False for dynamic scalings.
    """

    inv_freq: torch.Tensor
    rotary_dim: int
    interleaved: bool = False
    rope_type: str = "default"

    @property
    def composable(self) -> bool:
        return not any(name in self.rope_type for name in _NOT_COMPOSABLE)


def rotate(keys: torch.Tensor, delta: torch.Tensor | int, spec: RopeSpec) -> torch.Tensor:
    """Rotate post-RoPE keys by `delta` positions.

    keys: [..., T, head_dim] in any float dtype; computed in fp32, returned in keys' dtype.
    delta: int, or [T] integer tensor of per-token shifts (p_new - p_old).
    """
    return _rotate_by(keys, *_cos_sin(delta, keys.shape[-2], spec, keys.device), spec)


def rotate_layers(keys: torch.Tensor, delta: torch.Tensor | int, specs: list[RopeSpec]) -> torch.Tensor:
    """Rotate every layer's post-RoPE keys by `delta` positions; cos/sin computed once per distinct spec.

    keys: [num_layers, ..., T, head_dim] (e.g. [num_layers, kv_heads, T, head_dim]); specs: one per layer.
    delta: int, or [T] integer tensor. Returns keys' shape and dtype, equal to
    `torch.stack([rotate(keys[i], delta, spec) for i, spec in enumerate(specs)])`.
    Layers are applied one by one: on CPU one call over a whole group of layers is slower (its
    temporaries leave the cache).
    """
    if len(specs) != keys.shape[0]:
        raise ValueError(f"{len(specs)} RoPE specs for {keys.shape[0]} layers")
    out = torch.empty_like(keys)
    angles: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # spec layout -> (cos, sin)
    for i, spec in enumerate(specs):
        layout = (tuple(spec.inv_freq.tolist()), spec.rotary_dim, spec.interleaved, spec.rope_type)
        if layout not in angles:
            angles[layout] = _cos_sin(delta, keys.shape[-2], spec, keys.device)
        out[i] = _rotate_by(keys[i], *angles[layout], spec)
    return out


def _cos_sin(delta: torch.Tensor | int, t: int, spec: RopeSpec, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotation angles: [1, rotary_dim // 2] for one shift, [T, rotary_dim // 2] per token."""
    if not spec.composable:
        raise ValueError(f"RoPE type {spec.rope_type!r} is not composable; recompute instead of rotating")
    d = torch.as_tensor(delta, device=device, dtype=torch.float64).reshape(-1, 1)
    if d.shape[0] not in (1, t):
        raise ValueError(f"{d.shape[0]} shifts for {t} keys")
    angles = (d * spec.inv_freq.to(device, torch.float64)[None, :]).float()
    return angles.cos(), angles.sin()


def _rotate_by(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """keys [..., T, head_dim] rotated by the angles of `_cos_sin`, in fp32; returned in keys' dtype."""
    k = keys.float()
    rot = k[..., : spec.rotary_dim]
    if spec.interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        half = spec.rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if spec.rotary_dim < k.shape[-1]:
        out = torch.cat((out, k[..., spec.rotary_dim :]), dim=-1)
    return out.to(keys.dtype)


def layer_specs(model) -> list[RopeSpec]:
    """One `RopeSpec` per decoder layer of an HF Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 model.

    All of these use NeoX (rotate-half) pairing in transformers; Gemma 3 has per-layer-type bases.
    """
    base = model.model
    rotary = base.rotary_emb
    config = base.config
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    specs = []
    for layer_type in types[: config.num_hidden_layers]:
        if hasattr(rotary, "inv_freq"):
            inv_freq, rope_type = rotary.inv_freq, rotary.rope_type
        else:
            inv_freq = getattr(rotary, f"{layer_type}_inv_freq")
            rope_type = rotary.rope_type[layer_type]
        inv = inv_freq.detach().float().cpu()
        specs.append(RopeSpec(inv_freq=inv, rotary_dim=2 * inv.numel(), rope_type=str(rope_type)))
    return specs
