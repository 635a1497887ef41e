"""One layer-wise forward over an HF decoder's own layers, with a per-layer active token set.

Every prefill method (full, prefix, naive, and the rectifying schedules) and every decode step runs
through `Executor.run`: only the active tokens of a layer are computed there; their fresh K/V are
scattered into full per-layer buffers (`KVBuffers`) and they attend over all filled slots under an
explicit mask (causal by position, plus the layer's sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .decoder import lean_layers
from .kernels import GemvLinear
from .rope import RopeSpec, layer_specs, rotate


class KVBuffers:
    """Per-layer K/V of one sequence, laid out by slot (slot i holds the token at position i).

    keys, values: [num_layers, kv_heads, capacity, head_dim]. Slots [0, length) are filled.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy K/V [num_layers, kv_heads, n, head_dim] into slots [start, start + n)."""
        n = keys.shape[2]
        self.keys[:, :, start : start + n] = keys
        self.values[:, :, start : start + n] = values

    def slice(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of slots [start, end): two [num_layers, kv_heads, end - start, head_dim] tensors."""
        return self.keys[:, :, start:end].clone(), self.values[:, :, start:end].clone()


class _ScatterCache:
    """What an HF attention layer sees as its cache: `update` scatters the active tokens' K/V and returns
    slots [lo, length), the ones the active queries may see (lo > 0 only under a sliding window).

    slots: the active tokens' slots, as an index tensor or (all tokens of a run) a slice."""

    def __init__(self, kv: KVBuffers, slots: torch.Tensor | slice, lo: int, length: int):
        self.kv, self.slots, self.lo, self.length = kv, slots, lo, length

    def store(self, key_states, value_states, layer_idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter key_states, value_states [1, kv_heads, n_active, head_dim]; return the layer's whole
        buffers, keys and values [kv_heads, capacity, head_dim] (visible: slots [lo, length))."""
        keys, values = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        keys[:, self.slots] = key_states[0]
        values[:, self.slots] = value_states[0]
        return keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.store(key_states, value_states, layer_idx)
        return keys[:, self.lo : self.length].unsqueeze(0), values[:, self.lo : self.length].unsqueeze(0)


@dataclass
class LayerState:
    """What a schedule may look at between layers of one `Executor.run`.

    hidden: [T, hidden_size] residual stream of the run's tokens, as of entering the current layer for
    the tokens active there (stale for the others).
    """

    layer: int
    hidden: torch.Tensor
    kv: KVBuffers
    positions: torch.Tensor  # [T] position of each run token (= its slot)


class LayerPlan(Protocol):
    """Per-layer active sets: what a schedule hands the executor."""

    def active(self, state: LayerState) -> torch.Tensor:
        """Sorted indices into the run's T tokens to compute at `state.layer`.

        Never modify a returned tensor in place: the executor reuses work (the attention mask) for a
        tensor it has already seen in this run.
        """
        ...

    def after_layer(self, state: LayerState) -> None:
        """Called after `state.layer` ran; K/V of active tokens are already in `state.kv`."""
        ...


class AllTokens:
    """Every token at every layer: full prefill, and every decode step."""

    def __init__(self, n: int, device: torch.device):
        self.idx = torch.arange(n, device=device)

    def active(self, state: LayerState) -> torch.Tensor:
        return self.idx

    def after_layer(self, state: LayerState) -> None:
        pass


@dataclass
class RunResult:
    """logits: [len(logit_rows), vocab] fp32. captured: [T, hidden] input of the capture layer (or None).
    token_layers: [T] int, at how many layers each token was computed."""

    logits: torch.Tensor | None
    captured: torch.Tensor | None
    token_layers: torch.Tensor


class Executor:
    """Runs an HF Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 causal LM layer by layer."""

    def __init__(self, model, lean: bool = True):
        """lean: run the layers through `decoder.LeanLayer` where it covers them (else HF's own forward)."""
        self.model = model
        self.base = model.model
        cfg = self.base.config
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.layers = list(self.base.layers[: self.num_layers])
        self.layer_types = (getattr(cfg, "layer_types", None) or ["full_attention"] * self.num_layers)[
            : self.num_layers
        ]
        self.windows = [self._window(layer) for layer in self.layers]
        self.rope: list[RopeSpec] = layer_specs(model)
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self._per_type_rope = not hasattr(self.base.rotary_emb, "inv_freq")
        self.lean = lean_layers(model, self.layers) if lean else None
        self._calls = self.lean or self.layers  # what `run` calls per layer

    def _window(self, layer) -> int | None:
        attn = layer.self_attn
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return getattr(self.config, "sliding_window", None)  # Mistral: every layer slides

    def new_buffers(self, capacity: int) -> KVBuffers:
        return KVBuffers(self.num_layers, self.kv_heads, self.head_dim, capacity, self.dtype, self.device)

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """Additive mask [1, 1, n_q, n_k]: 0 where a query may attend a key, dtype-min elsewhere."""
        diff = q_pos[:, None] - k_pos[None, :]
        allowed = diff >= 0
        if window is not None:
            allowed &= diff < window
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        neg = torch.tensor(torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, neg)[None, None]

    def _run_mask(self, masks: dict, act: torch.Tensor, q_pos: torch.Tensor, end: int,
                  window: int | None) -> tuple[int, torch.Tensor]:
        """(lo, mask) for queries at q_pos [n] over slots [0, end) under `window`.

        lo: the first slot any of the queries can see (0 without a window); mask: additive
        [1, 1, n, end - lo] over slots [lo, end). Keys before lo are not even handed to attention, so a
        sliding layer attends over at most window + n - 1 slots however long the sequence is.
        masks: window -> (act, lo, mask) of the last active set seen with that window in this run. It is
        reused for the same tensor object (static plans) or for an equal set (plans that rebuild it).
        """
        if window is not None and window >= end:
            window = None  # the window covers every slot: the same mask as a global layer
        seen = masks.get(window)
        if seen is not None and (seen[0] is act or (seen[0].shape == act.shape and torch.equal(seen[0], act))):
            return seen[1], seen[2]
        lo = max(0, int(q_pos.min()) - window + 1) if window is not None else 0
        mask = self._mask(q_pos, torch.arange(lo, end, device=self.device), window)
        masks[window] = (act, lo, mask)
        return lo, mask

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ Gemma's softcap) on [n, hidden] -> [n, vocab] fp32."""
        out = self.model.lm_head(self.base.norm(hidden[None]))[0].float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    @torch.inference_mode()
    def keys_values(self, layer_idx: int, hidden: torch.Tensor,
                    positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys (RoPE at positions [n]) and values one layer would write for tokens whose residual-stream
        input is hidden [n, hidden_size]: the input norm and the k/v-projections (+ k-norm) alone, no
        attention and no MLP. Returns (keys, values), each [kv_heads, n, head_dim]."""
        layer = self.layers[layer_idx]
        attn, n = layer.self_attn, hidden.shape[0]
        h = layer.input_layernorm(hidden[None])
        k = attn.k_proj(h)[0].view(n, -1, self.head_dim).transpose(0, 1)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        v = attn.v_proj(h)[0].view(n, -1, self.head_dim).transpose(0, 1)
        return rotate(k, positions, self.rope[layer_idx]), v

    @torch.inference_mode()
    def attention_probs(self, layer_idx: int, hidden: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor
                        ) -> torch.Tensor:
        """Attention probabilities of queries at one layer over slots [0, length), mean over heads.

        hidden: [n, hidden_size] residual-stream input of the layer for the query tokens at positions
        q_pos [n]; keys: the layer's post-RoPE keys of slots [0, length), [kv_heads, length, head_dim].
        Returns [n, length] fp32. Computed by hand (q-projection, q-norm, RoPE, q.k) so the fast attention
        kernel stays in use everywhere else.
        """
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        n, length = hidden.shape[0], keys.shape[1]
        q = attn.q_proj(layer.input_layernorm(hidden[None]))[0].view(n, -1, self.head_dim).transpose(0, 1)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = rotate(q, q_pos, self.rope[layer_idx]).float()  # RoPE at q_pos = rotation from position 0
        k = keys.float().repeat_interleave(q.shape[0] // keys.shape[0], dim=0)
        scores = (q @ k.transpose(1, 2)) * attn.scaling  # [heads, n, length]
        softcap = getattr(self.config, "attn_logit_softcapping", None)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        mask = self._mask(q_pos, torch.arange(length, device=self.device), self.windows[layer_idx])
        scores = scores + mask[0].float()
        return torch.softmax(scores, dim=-1).mean(0)

    def _run_all(self, hidden: torch.Tensor, positions: torch.Tensor, end: int, kv: KVBuffers, rope_cache: dict,
                 capture_layer: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every token at every layer (full prefill, decode steps): contiguous slots, no gathers or scatters.

        A single query sees every slot handed to it (slots before a sliding window's start are not handed
        over), so decode steps attend without a mask.
        """
        t = hidden.shape[0]
        slots = slice(int(positions[0]), end)
        masks: dict = {}
        x, captured = hidden[None], None
        for i, layer in enumerate(self._calls):
            if capture_layer == i:
                captured = x[0].clone()
            if t == 1:
                lo = max(0, end - self.windows[i]) if self.windows[i] is not None else 0
                mask = None
            else:
                lo, mask = self._run_mask(masks, positions, positions, end, self.windows[i])
            out = layer(x, attention_mask=mask, position_embeddings=rope_cache[self.layer_types[i]],
                        position_ids=positions[None], cache=_ScatterCache(kv, slots, lo, end))
            x = out if not isinstance(out, tuple) else out[0]
        return x[0], captured

    def _run_plan(self, hidden: torch.Tensor, positions: torch.Tensor, end: int, kv: KVBuffers, rope_cache: dict,
                  plan: LayerPlan, capture_layer: int | None):
        """Per-layer active sets from `plan`: (hidden, captured, token_layers), as `run` returns them."""
        t = hidden.shape[0]
        captured = None
        token_layers = torch.zeros(t, dtype=torch.long, device=self.device)
        masks: dict[int | None, tuple[torch.Tensor, int, torch.Tensor]] = {}  # see `_run_mask`
        for i, layer in enumerate(self._calls):
            if capture_layer == i:
                captured = hidden.clone()
            state = LayerState(i, hidden, kv, positions)
            act = plan.active(state)
            token_layers[act] += 1
            if act.numel():
                cos, sin = rope_cache[self.layer_types[i]]
                q_pos = positions[act]
                lo, mask = self._run_mask(masks, act, q_pos, end, self.windows[i])
                out = layer(
                    hidden[act][None],
                    attention_mask=mask,
                    position_embeddings=(cos[:, act], sin[:, act]),
                    position_ids=q_pos[None],
                    cache=_ScatterCache(kv, q_pos, lo, end),
                )
                hidden[act] = out[0] if not isinstance(out, tuple) else out[0][0]
            plan.after_layer(state)
        return hidden, captured, token_layers

    def _rope_tables(self, hidden: torch.Tensor,
                     positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """layer type -> (cos, sin) [1, T, head_dim] at `positions` [T]; hidden: [1, T, hidden] (dtype, device)."""
        tables = {}
        for layer_type in set(self.layer_types):
            args = (hidden, positions[None]) + ((layer_type,) if self._per_type_rope else ())
            tables[layer_type] = self.base.rotary_emb(*args)
        return tables

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, kvs: list[KVBuffers], logit_rows: torch.Tensor | None = None,
             capture_layer: int | None = None) -> RunResult:
        """One decode step of B sequences: token b ([B]) goes to slot kvs[b].length of its own buffers.

        The rows share every linear and the LM head (weights read once for the batch); attention runs per
        sequence over its own slots, at its own position and under each layer's sliding window. Where every
        layer runs on the fused native decode layer, up to GEMV_ROWS rows (one included) call it per layer
        (`LeanLayer.native_rows`, what `run` calls too, on the same arguments); elsewhere one row takes `run`'s
        path. Either way a sequence alone computes exactly what `run` does. Without lean layers the rows run
        one by one. logit_rows: rows whose logits to return (default: all). Returns logits
        [len(logit_rows), vocab] fp32 and captured [B, hidden].
        """
        b = tokens.shape[0]
        rows = logit_rows if logit_rows is not None else torch.arange(b)
        positions = [kv.length for kv in kvs]
        for kv, p in zip(kvs, positions, strict=True):
            if p + 1 > kv.capacity:
                raise ValueError(f"sequence of {p + 1} tokens exceeds the buffer capacity {kv.capacity}")
        native = b <= GemvLinear.GEMV_ROWS and self.lean is not None and all(m.native_args for m in self.lean)
        if not native and (b == 1 or self.lean is None):
            want = set(rows.tolist())
            results = [self.run(tokens[i : i + 1], positions[i], kv, capture_layer=capture_layer,
                                logit_rows=torch.zeros(int(i in want), dtype=torch.long)) for i, kv in enumerate(kvs)]
            logits = [r.logits for r in results if r.logits is not None]
            captured = [r.captured for r in results]
            return RunResult(logits=torch.cat(logits) if logits else None,
                             captured=torch.cat(captured) if capture_layer is not None else None,
                             token_layers=torch.full((b,), self.num_layers, dtype=torch.long))
        pos = torch.tensor(positions, device=self.device)
        hidden = self.base.embed_tokens(tokens[None].to(self.device))
        rope_cache = self._rope_tables(hidden, pos)
        if native:  # the native layer's [B, d] tables, made once per layer type and step
            rope_cache = {kind: tuple(t[0].contiguous() for t in pair) for kind, pair in rope_cache.items()}
        x, captured = hidden, None
        for i, layer in enumerate(self.lean):
            if capture_layer == i:
                captured = x[0].clone()
            w = self.windows[i]
            los = [max(0, p + 1 - w) if w is not None else 0 for p in positions]
            if native:  # what `run` calls per layer too, without its per-layer plumbing
                cos, sin = rope_cache[self.layer_types[i]]
                x = layer.native_rows(x[0], cos, sin, [kv.keys[i] for kv in kvs], [kv.values[i] for kv in kvs],
                                      positions, los)[None]
            else:
                caches = [_ScatterCache(kv, slice(p, p + 1), lo, p + 1)
                          for kv, p, lo in zip(kvs, positions, los, strict=True)]
                x = layer.rows(x, rope_cache[self.layer_types[i]], caches)
        for kv, p in zip(kvs, positions, strict=True):
            kv.length = max(kv.length, p + 1)
        logits = self.logits(x[0][rows]) if rows.numel() else None
        return RunResult(logits=logits, captured=captured,
                         token_layers=torch.full((b,), self.num_layers, dtype=torch.long))

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,
        start: int,
        kv: KVBuffers,
        plan: LayerPlan | None = None,
        logit_rows: torch.Tensor | None = None,
        capture_layer: int | None = None,
    ) -> RunResult:
        """Compute tokens `input_ids` ([T]) that occupy slots/positions [start, start + T).

        K/V of slots [0, start) and of any token inactive at a layer must already be in `kv`.
        plan: per-layer active sets (default: all tokens). logit_rows: indices of the run tokens whose
        logits to return (default: the last). capture_layer: return the residual-stream input of that
        layer for all T tokens. A plan may write `state.hidden` rows in `active` (e.g. stored upstream
        states for tokens that enter at that layer).
        """
        t = input_ids.shape[0]
        end = start + t
        if end > kv.capacity:
            raise ValueError(f"sequence of {end} tokens exceeds the buffer capacity {kv.capacity}")
        plan = plan or AllTokens(t, self.device)
        positions = torch.arange(start, end, device=self.device)
        hidden = self.base.embed_tokens(input_ids[None].to(self.device))[0]
        kv.length = max(kv.length, end)
        rope_cache = self._rope_tables(hidden[None], positions)
        if isinstance(plan, AllTokens):
            hidden, captured = self._run_all(hidden, positions, end, kv, rope_cache, capture_layer)
            token_layers = torch.full((t,), self.num_layers, dtype=torch.long, device=self.device)
        else:
            hidden, captured, token_layers = self._run_plan(hidden, positions, end, kv, rope_cache, plan,
                                                           capture_layer)
        rows = logit_rows if logit_rows is not None else torch.tensor([t - 1], device=self.device)
        logits = self.logits(hidden[rows]) if rows.numel() else None
        return RunResult(logits=logits, captured=captured, token_layers=token_layers)
