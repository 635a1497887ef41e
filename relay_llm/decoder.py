"""A lean forward of one HF decoder layer, on the layer's own modules (weights, norms, activation).

HF's `DecoderLayer.__call__` spends about as long in Python (kwargs plumbing, the attention-interface
dispatch, rotate-half through `cat`, six-op RMSNorms) as a decode step spends reading the weights of a
small model. `LeanLayer` computes the same math with few ops: fused RMSNorm (`F.rms_norm`, in fp32 as
HF does), RoPE on views, one SDPA call with grouped-query heads. It covers the layouts of every supported
family (Llama / Mistral / Qwen2: pre-norm; Qwen3: + q/k norms; Gemma 3: + q/k norms and sandwich norms,
(1 + w) norm weights); `lean_layers` returns None for anything else, and the executor then calls the HF
layer itself. Equivalence with HF's forward is tested on tiny models of every family and on the default model.

Decode steps of an fp32 model on relay-llm's GEMV (`kernels.GemvLinear`) take one native call per layer
instead (`native` `decode_layer`, `csrc/layer.cpp`): the same math on the same weights, with no Python or
temporaries between the ops; equal to this module's own path to float rounding (tests/test_kernels.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .kernels import GemvLinear, RowsOf, native_unavailable


class _Norm:
    """An HF RMSNorm as one fused op: y = rms_norm(x in fp32) * w, cast back (Gemma: w = 1 + weight, applied
    in fp32; Llama-style: the normalised x is cast to the input dtype first, then scaled by weight). fp32 rows
    go through relay-llm's own one-pass op where it is built (`native`): ATen's costs ~4x more per call."""

    def __init__(self, module: nn.Module, gemma: bool):
        self.eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        self.dim = module.weight.shape[-1]
        self.gemma = gemma
        w = module.weight.detach()
        self.weight = (1.0 + w.float()) if gemma else w
        ops = _native_ops(module)
        self.fused = ops.rms_norm if ops is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and x.dtype == torch.float32 and x.is_contiguous():
            return self.fused(x, self.weight, self.eps)
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


def _fused(*parts: nn.Module) -> tuple[nn.Module, list[int]] | None:
    """(the shared fused linear, each part's width) where `parts` are `kernels.RowsOf` views of one linear,
    side by side in order; else None."""
    if not all(isinstance(p, RowsOf) for p in parts) or any(p.fused is not parts[0].fused for p in parts):
        return None
    if [p.lo for p in parts] != [0] + [p.hi for p in parts[:-1]] or parts[-1].hi != parts[0].fused.out_features:
        return None
    return parts[0].fused, [p.hi - p.lo for p in parts]


def _native_ops(module: nn.Module):
    """relay-llm's native ops where `module` can run on them (`kernels.native_unavailable`), else None."""
    return None if native_unavailable(module) else native.ops()


_ACTIVATIONS = {"GELUTanh": 0, "PytorchGELUTanh": 0, "SiLUActivation": 1, "SiLU": 1}  # -> decode_layer's act


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
        self.qkv = _fused(attn.q_proj, attn.k_proj, attn.v_proj)  # (linear, split sizes) or None
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate_up = _fused(mlp.gate_proj, mlp.up_proj)
        self.gate, self.up, self.down, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.ops = _native_ops(layer)  # fp32 on CPU: RoPE and one-query attention as single native calls
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
        self.heads, self.kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
        self.native_args = self._native_args()

    def _native_args(self) -> tuple | None:
        """(norm weights, linear arguments, eps, activation code) for `native.decode_layer`, or None where this
        layer has a part that op does not compute: no native ops, q/k/v or gate/up not fused, a linear not on
        the GEMV, an activation other than GELU-tanh or SiLU, or norms of different eps."""
        act = _ACTIVATIONS.get(type(self.act).__name__)
        if getattr(self.act, "act", None) is not None and not isinstance(self.act.act, functools.partial):
            act = None  # GELUTanh's pure-Python variant
        linears = [self.qkv and self.qkv[0], self.o_proj, self.gate_up and self.gate_up[0], self.down]
        if self.ops is None or act is None or not all(isinstance(lin, GemvLinear) for lin in linears):
            return None
        norms = [self.input_norm, self.q_norm, self.k_norm, self.post_attn_norm, self.pre_mlp_norm,
                 self.post_mlp_norm]
        if len({n.eps for n in norms if n is not None}) != 1 or self.head_dim % 2:
            return None
        args = []
        for lin in linears:
            args += [lin.q, lin.scale, lin.offset, lin.bias] if lin.grid else [lin.weight, None, None, lin.bias]
        weights = [None if n is None else n.weight.float().contiguous() for n in norms]
        return weights, args, self.input_norm.eps, act

    def _qkv(self, x: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [1, n, hidden] -> q [1, heads, n, d], k and v [1, kv_heads, n, d], q and k normed and rotated."""
        n = x.shape[1]
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        h = self.input_norm(x)
        if self.qkv is not None:
            q, k, v = self.qkv[0](h).split(self.qkv[1], dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q, k, v = (t.reshape(1, n, -1, self.head_dim) for t in (q, k, v))
        if self.q_norm is not None:  # per head, before the transpose: rows stay contiguous
            q, k = self.q_norm(q), self.k_norm(k)
        if self.ops is not None:  # [1, n, heads, d], cos/sin [1, n, d]
            c, s = (t.contiguous() for t in position_embeddings)
            q, k = self.ops.rope(q.contiguous(), c, s), self.ops.rope(k.contiguous(), c, s)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _attend(self, q: torch.Tensor, cache, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """Scatter k, v into `cache`, attend q over what it hands back -> [1, heads, n, d]. One query without a
        mask (decode) attends natively over the visible slots, where the native ops run."""
        if self.ops is not None and mask is None and q.shape[2] == 1 and hasattr(cache, "store"):
            keys, values = cache.store(k, v, self.idx)
            heads = q.shape[1]
            out = self.ops.attend_one(q.reshape(heads, self.head_dim), keys, values, cache.lo, cache.length,
                                      self.scaling)
            return out.view(1, heads, 1, self.head_dim)
        keys, values = cache.update(k, v, self.idx)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=self.gqa)

    def _rest(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and MLP: x [1, n, hidden], attention a [1, heads, n, d] -> [1, n, hidden]."""
        a = self.o_proj(a.transpose(1, 2).reshape(1, x.shape[1], -1))
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x = x + a
        h = self.pre_mlp_norm(x)
        if self.gate_up is not None:
            g, u = self.gate_up[0](h).split(self.gate_up[1], dim=-1)
        else:
            g, u = self.gate(h), self.up(h)
        m = self.down(self.act(g) * u)
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        return x + m

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor, position_embeddings, cache,
                 **_) -> torch.Tensor:
        if attention_mask is None and x.shape[1] == 1 and self.native_args is not None and hasattr(cache, "store"):
            return self._native_rows(x, position_embeddings, [cache])
        q, k, v = self._qkv(x, position_embeddings)
        return self._rest(x, self._attend(q, cache, k, v, attention_mask))

    def _native_rows(self, x: torch.Tensor, position_embeddings, caches: list) -> torch.Tensor:
        """`rows` as one native call (`csrc/layer.cpp`): x [1, B, hidden] fp32, each cache's last slot the row's."""
        cos, sin = (t[0].contiguous() for t in position_embeddings)
        keys = [c.kv.keys[self.idx] for c in caches]
        values = [c.kv.values[self.idx] for c in caches]
        return self.native_rows(x[0].contiguous(), cos, sin, keys, values, [c.length - 1 for c in caches],
                                [c.lo for c in caches])[None]

    def native_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: list, values: list,
                    pos: list[int], lo: list[int]) -> torch.Tensor:
        """The native decode layer on B rows: x [B, hidden] fp32 contiguous, cos and sin [B, d]; row b writes
        slot pos[b] of keys[b] and values[b] ([kv_heads, capacity, d], this layer's) and attends over slots
        [lo[b], pos[b]] -> [B, hidden]."""
        norms, linears, eps, act = self.native_args
        return self.ops.decode_layer(x, norms, linears, cos, sin, keys, values, pos, lo, self.heads, self.kv_heads,
                                     eps, self.scaling, act)

    def rows(self, x: torch.Tensor, position_embeddings, caches: list) -> torch.Tensor:
        """One decode token per sequence: x [1, B, hidden], row b at its own position, attending over its own
        sequence's slots through `caches[b]` (no mask: a single query sees every slot handed to it)."""
        if self.native_args is not None and x.shape[1] <= GemvLinear.GEMV_ROWS:
            return self._native_rows(x, position_embeddings, caches)
        q, k, v = self._qkv(x, position_embeddings)
        a = torch.cat([self._attend(q[:, :, b : b + 1], c, k[:, :, b : b + 1], v[:, :, b : b + 1], None)
                       for b, c in enumerate(caches)], dim=2)
        return self._rest(x, a)


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
