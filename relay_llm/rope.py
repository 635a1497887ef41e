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
    if not spec.composable:
        raise ValueError(f"RoPE type {spec.rope_type!r} is not composable; recompute instead of rotating")
    t = keys.shape[-2]
    d = torch.as_tensor(delta, device=keys.device, dtype=torch.float64).expand(t)
    angles = (d[:, None] * spec.inv_freq.to(keys.device, torch.float64)[None, :]).float()  # [T, r/2]
    cos, sin = angles.cos(), angles.sin()
    k = keys.float()
    rot, rest = k[..., : spec.rotary_dim], k[..., spec.rotary_dim :]
    if spec.interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        half = spec.rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, rest), dim=-1).to(keys.dtype)


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
