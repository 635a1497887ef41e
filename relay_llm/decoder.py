"""A lean forward of one HF decoder layer, on the layer's own modules (weights, norms, activation).

HF's `DecoderLayer.__call__` spends about as long in Python (kwargs plumbing, the attention-interface
dispatch, rotate-half through `cat`, six-op RMSNorms) as a decode step spends reading the weights of a
small model. `LeanLayer` computes the same math with few ops: fused RMSNorm (`F.rms_norm`, in fp32 as
HF does), RoPE on views, one SDPA call with grouped-query heads. It covers the layouts of every supported
family (Llama / Mistral / Qwen2: pre-norm; Qwen3: + q/k norms; Gemma 3: + q/k norms and sandwich norms,
(1 + w) norm weights); `lean_layers` returns None for anything else, and the executor then calls the HF
layer itself. Equivalence with HF's forward is tested on tiny models of every family and on the default model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Norm:
    """An HF RMSNorm as one fused op: y = rms_norm(x in fp32) * w, cast back (Gemma: w = 1 + weight, applied
    in fp32; Llama-style: the normalised x is cast to the input dtype first, then scaled by weight)."""

    def __init__(self, module: nn.Module, gemma: bool):
        self.eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        self.dim = module.weight.shape[-1]
        self.gemma = gemma
        w = module.weight.detach()
        self.weight = (1.0 + w.float()) if gemma else w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemma:
            return F.rms_norm(x.float(), (self.dim,), self.weight, self.eps).type_as(x)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (self.dim,), None, self.eps).to(x.dtype)


def _rms_norm_kind(module: nn.Module) -> str | None:
    """'gemma' for (1 + w) norms, 'llama' for w norms, None for a norm this module does not know."""
    name = type(module).__name__
    if not name.endswith("RMSNorm") or getattr(module, "weight", None) is None:
        return None
    if name.startswith("Gemma"):
        return "gemma"
    return "llama" if name.startswith(("Llama", "Mistral", "Qwen2", "Qwen3")) else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX (rotate-half) RoPE. x: [1, heads, n, d]; cos, sin: [1, 1, n, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LeanLayer:
    """Calls like an HF decoder layer under the executor: (hidden [1, n, hidden], mask, cos/sin, cache) ->
    hidden [1, n, hidden]."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        gemma = _rms_norm_kind(layer.input_layernorm) == "gemma"
        self.idx = attn.layer_idx
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.gqa = attn.num_key_value_groups > 1
        self.input_norm = _Norm(layer.input_layernorm, gemma)
        self.q_norm = _Norm(attn.q_norm, gemma) if hasattr(attn, "q_norm") else None
        self.k_norm = _Norm(attn.k_norm, gemma) if hasattr(attn, "k_norm") else None
        if gemma:  # sandwich norms around attention and MLP
            self.post_attn_norm = _Norm(layer.post_attention_layernorm, gemma)
            self.pre_mlp_norm = _Norm(layer.pre_feedforward_layernorm, gemma)
            self.post_mlp_norm = _Norm(layer.post_feedforward_layernorm, gemma)
        else:
            self.post_attn_norm, self.post_mlp_norm = None, None
            self.pre_mlp_norm = _Norm(layer.post_attention_layernorm, gemma)

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor, position_embeddings, cache,
                 **_) -> torch.Tensor:
        n = x.shape[1]
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        h = self.input_norm(x)
        q = self.q_proj(h).view(1, n, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(1, n, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(1, n, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys, values = cache.update(k, v, self.idx)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=attention_mask, scale=self.scaling,
                                           enable_gqa=self.gqa)
        a = self.o_proj(a.transpose(1, 2).reshape(1, n, -1))
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x = x + a
        h = self.pre_mlp_norm(x)
        m = self.down(self.act(self.gate(h)) * self.up(h))
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        return x + m


def lean_layers(model, layers: list[nn.Module]) -> list[LeanLayer] | None:
    """LeanLayers for `layers`, or None where a layer has a part LeanLayer does not reproduce."""
    cfg = model.config
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return None
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norms = [getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)]
        norms += [getattr(attn, name) for name in ("q_norm", "k_norm") if hasattr(attn, name)]
        if attn is None or mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return None
        if any(n is None or _rms_norm_kind(n) is None for n in norms):
            return None
        gemma = _rms_norm_kind(layer.input_layernorm) == "gemma"
        if gemma != hasattr(layer, "pre_feedforward_layernorm"):
            return None
    return [LeanLayer(layer) for layer in layers]
