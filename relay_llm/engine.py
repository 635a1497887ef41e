"""The engine: render -> plan (prefix hit, reused spans) -> prefill by schedule -> decode -> store.

One thread owns the model (`scheduler.Scheduler`): `chat`, `complete`, `stream` and `teacher_force`
may be called from any thread; generations queue there and run batched, each decode step serving
every running sequence.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import loading, structured
from .closing import Closer
from .executor import Executor, KVBuffers
from .kernels import KernelInfo
from .logprobs import MAX_TOP_LOGPROBS
from .matcher import chunk_bounds, context_sketch
from .prefill import Prefill
from .profiler import Profile, find_profile
from .scheduler import Done, Failed, Scheduler
from .schedules import PrefillPlan, Schedule, get_schedule
from .selector import SelectorConfig
from .sequence import Sequence
from .stats import RequestStats
from .store import PrefixCache, Segment, SegmentStore
from .templates import ensure_template, stop_token_ids, validate_messages

# Tokens that open or close a chat turn (besides special tokens and EOS ids): prompt chunk boundaries.
TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>")


@dataclass
class EngineConfig:
    """Engine-wide settings. Byte budgets are in bytes.

    default_schedule: None = "relay" when the model has a profile, else "naive".
    capture_layer: residual-stream input stored per generated token; None = the profile's start_layer
    (0 without a profile). relay: SelectorConfig overrides on top of the profile's selector settings.

    Store (relay_llm.store): store_budget_bytes bounds the segment store, prefix_budget_bytes the
    exact-prefix cache. min_match_tokens: the shortest stored stretch found in a prompt (partial quotes
    included). store_prompt: also keep the prompt's freshly computed K/V as "prefill" segments, one per
    message (split at special / turn-marker tokens), skipping stretches shorter than prompt_segment_min_tokens
    and cutting longer ones than prompt_segment_max_tokens. store_dtype: dtype of stored segment K/V and
    hidden states (None = the model's; "bfloat16" halves an fp32 model's store). persist_dir: opt-in folder
    where segments are written (safetensors + JSON index) and reloaded from on start. store_url:
    "redis://host:port/db" shares the segment store with every engine on that Redis (relay_llm.redis_store;
    store_budget_bytes then bounds this replica's index and hot-blob cache); None keeps it in memory.
    """

    default_schedule: str | None = None
    store_budget_bytes: int = 2 << 30
    prefix_budget_bytes: int = 1 << 30
    min_match_tokens: int = 16
    store_prompt: bool = True
    prompt_segment_min_tokens: int = 64
    prompt_segment_max_tokens: int = 512
    store_dtype: str | None = None
    persist_dir: str | None = None
    store_url: str | None = None
    capture_layer: int | None = None
    relay: dict = field(default_factory=dict)
    max_context: int | None = None  # default: the model's max_position_embeddings
    # Continuous batching (relay_llm.scheduler): sequences decoded together in one step, generations waiting
    # beyond that (more -> QueueFull, HTTP 429), bytes of K/V buffers all admitted sequences may hold
    # (prompt + max_new_tokens slots each; a request larger than this alone -> ValueError), and the most
    # prompt tokens computed between two decode steps (several short prompts, or a chunk of a long one).
    max_batch: int = 8
    max_queue: int = 64
    kv_budget_bytes: int = 4 << 30
    prefill_chunk_tokens: int = 512


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # Penalties (relay_llm.sampling), before any grammar mask, greedy too. OpenAI's, over the generated tokens:
    # logit -= frequency_penalty * count + presence_penalty * (count > 0). Hugging Face's, over prompt and
    # generated tokens: logit / repetition_penalty if logit > 0 else logit * repetition_penalty.
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    schedule: str | Schedule | None = None
    relay: dict | None = None  # per-call schedule settings (relay: selector fields and band layers)
    # Structured output (relay_llm.structured): {"type": "json_schema", "json_schema": {"name", "schema"}} |
    # {"type": "json_schema", "schema": S} | {"type": "json_object"} | {"type": "text"}
    response_format: dict | None = None
    tools: list[dict] | None = None  # OpenAI tool specs [{"type": "function", "function": {...}}]
    tool_choice: str | dict | None = None  # "auto" (default) | "none" | "required" | "any" | name | {"type": ...}
    parallel_tool_calls: bool = False  # allow several calls per reply (off by default: small models repeat calls)
    grammar: structured.Grammar | None = None  # set by `stream` from the fields above: masks each decode step
    # Under a grammar (relay_llm.closing): budget_ending closes the open JSON (or tool call) when the tokens
    # left are just enough for it; string_guard closes a JSON string whose end loops ("0000000000000").
    budget_ending: bool = True
    string_guard: bool = True
    # None = off; k in [0, 20]: each returned token's log-probability and its k likeliest alternatives, of the
    # model's raw distribution (log-softmax of the fp32 logits before penalties, grammar mask and temperature).
    logprobs: int | None = None

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" | "length" | "tool_calls"
    token_ids: list[int]
    stats: RequestStats
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI shape: {"id", "type", "function": {...}}
    logprobs: list[dict] | None = None  # with options.logprobs: one entry per token_ids item (relay_llm.logprobs)


@dataclass
class Chunk:
    """One streamed item: a text delta; the last one carries finish_reason and stats."""

    text: str
    finish_reason: str | None = None
    stats: RequestStats | None = None
    token_ids: list[int] | None = None  # last chunk only: every generated id
    tool_call_deltas: list[dict] | None = None  # [{"index", "id", "name", "arguments" delta}]; id/name: 1st only
    tool_calls: list[dict] | None = None  # last chunk only, when tools were offered: the complete calls
    logprobs: list[dict] | None = None  # last chunk only, with options.logprobs: one entry per token_ids item


class ChunkStream(Iterator[Chunk]):
    """The items of one queued job, in order. Iterate it; `cancel()` may be called from any thread."""

    def __init__(self, out: queue.Queue, cancel: threading.Event):
        self._out, self._cancel, self._finished = out, cancel, False

    def __next__(self):
        if self._finished:
            raise StopIteration
        item = self._out.get()
        if isinstance(item, (Done, _Cancelled)):
            self._finished = True
            self._cancel.set()
            raise StopIteration
        if isinstance(item, Failed):
            self._finished = True
            raise item.exc
        return item

    def cancel(self) -> None:
        """Stop the job at its next token (or skip it if still queued); iteration then ends."""
        if not self._finished:
            self._cancel.set()
            self._out.put(_Cancelled())

    close = cancel

    def __del__(self):
        self._cancel.set()


class _Cancelled:
    pass


class RelayEngine:
    """A local causal LM that keeps and reuses the K/V of text it generated."""

    def __init__(self, model, tokenizer, fingerprint: loading.Fingerprint, config: EngineConfig | None = None,
                 kernels: KernelInfo | None = None, worker: Scheduler | None = None):
        self.model = model
        self.kernels = kernels or KernelInfo("plain", fingerprint.dtype, "model handed in, not loaded by relay-llm")
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.config = config or EngineConfig()
        self.executor = Executor(model, lean=self.kernels.lean_layers)
        ensure_template(tokenizer, model.config.model_type)
        self.eos_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        self.max_context = self.config.max_context or model.config.max_position_embeddings
        self.store = self._open_store()
        self.prefix_cache = PrefixCache(self.config.prefix_budget_bytes)
        self._store_dtype = getattr(torch, self.config.store_dtype) if self.config.store_dtype else None
        # Prompt chunks stored as prefill segments end at these ids (special tokens, chat turn markers).
        vocab = tokenizer.get_vocab()
        self._boundary_ids = set(tokenizer.all_special_ids) | self.eos_ids | {
            vocab[t] for t in TURN_MARKERS if t in vocab}
        self._tok_lock = threading.Lock()
        self.set_profile(find_profile(fingerprint))
        self.store.connect(self.store_fingerprint)  # a shared store starts syncing; the in-memory one: no-op
        if self.store.files is not None:
            self.store.load_persisted(self.store_fingerprint)
        self._worker = worker or Scheduler()
        cfg = self.config
        self._worker.configure(self, cfg.max_batch, cfg.max_queue, cfg.kv_budget_bytes, cfg.prefill_chunk_tokens)

    def set_profile(self, profile: Profile | None) -> None:
        """Use `profile` (or none) for the relay band, the default schedule and the capture layer."""
        if profile is not None and profile.num_layers != self.executor.num_layers:
            raise ValueError(f"profile has {profile.num_layers} layers, the model {self.executor.num_layers}")
        self.profile = profile
        cfg = self.config
        self.default_schedule = cfg.default_schedule or ("relay" if profile else "naive")
        self.capture_layer = cfg.capture_layer if cfg.capture_layer is not None else (
            profile.start_layer if profile else 0)
        self.selector = SelectorConfig(**(profile.selector if profile else {})).updated(cfg.relay)
        self._make_schedule(self.default_schedule, None)

    def _make_schedule(self, name: str | Schedule, settings: dict | None) -> Schedule:
        """A schedule for one call; relay takes its band from the profile unless `settings` names one."""
        settings = dict(settings or {})
        band = self.profile.band if self.profile else None
        if name == "relay":
            keys = ("start_layer", "det_layer", "end_layer")
            if any(not isinstance(settings.get(k, 0), int) or isinstance(settings.get(k), bool) for k in keys):
                raise ValueError("relay band layers (start_layer, det_layer, end_layer) must be integers")
            if any(k in settings for k in keys):
                if band is None and not all(k in settings for k in keys):
                    raise ValueError("without a profile, relay settings must give start_layer, det_layer, end_layer")
                band = tuple(settings.pop(k, band[i] if band else None) for i, k in enumerate(keys))
            if band is None:
                raise ValueError(f"no profile for this model ({self.fingerprint.key()}): run `relay-llm profile "
                                 "--model ...` or pass start_layer/det_layer/end_layer in the relay settings")
        return get_schedule(name, settings, band=band, selector=self.selector)

    @classmethod
    def load(cls, model: str = "default", dtype: str = "auto", device: str = "auto",
             config: EngineConfig | None = None, kernels: str = "auto") -> RelayEngine:
        """Load "default" (packaged gemma-3-270m), a local HF folder or a .gguf file.

        dtype and kernels: see `loading.load` ("auto" is lossless; "fast" is this machine's fastest precision).
        """
        worker = Scheduler()  # loads on the thread that will run the model (see `scheduler`)
        try:
            hf_model, tokenizer, fp, info = worker.call(
                lambda: loading.load(model, dtype=dtype, device=device, kernels=kernels))
        except BaseException:
            worker.close()
            raise
        return cls(hf_model, tokenizer, fp, config=config, kernels=info, worker=worker)

    def info(self) -> dict:
        """What this engine runs on: model, precision, linear kernel path, device, CPU features, schedule."""
        ex = self.executor
        return {"model": self.model_name, "architecture": self.fingerprint.architecture,
                "weights": self.kernels.weights, "activations": str(ex.dtype).removeprefix("torch."),
                "kernels": self.kernels.path, "kernels_note": self.kernels.reason, "lean_layers": ex.lean is not None,
                "device": str(ex.device),
                "cpu_features": list(self.kernels.cpu), "threads": torch.get_num_threads(),
                "default_schedule": self.default_schedule, "max_batch": self.config.max_batch}

    def load_stats(self) -> dict:
        """The scheduler's load now: waiting and running sequences, the last decode step's batch size."""
        return self._worker.load()

    @property
    def model_name(self) -> str:
        return getattr(self.model.config, "_name_or_path", "") or self.fingerprint.architecture

    def close(self) -> None:
        self._worker.close()
        self.store.close()

    # ---- rendering -----------------------------------------------------------------------------

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               tool_choice: str | dict | None = None) -> list[int]:
        """Token ids of `messages` under the chat template, ending with the generation prompt.

        Assistant `tool_calls` render as call blocks in the content; `tools` (unless tool_choice is "none")
        are listed in a system preamble (relay_llm.structured). Pass the same tools to `stream`.
        """
        plan = structured.plan_request(tools=tools, tool_choice=tool_choice) if tools else None
        msgs = structured.template_messages(validate_messages(messages), plan)
        with self._tok_lock:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, prompt: str | list[int], special_tokens: bool = True) -> list[int]:
        """Token ids of a raw prompt (with the tokenizer's BOS, if any, unless `special_tokens` is False);
        a list of ids passes through."""
        if isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
            vocab = self.executor.config.vocab_size
            if any(not 0 <= i < vocab for i in prompt):
                raise ValueError(f"token ids must be in [0, {vocab})")
            return list(prompt)
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
        with self._tok_lock:
            return self.tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"]

    def _ids(self, request: list[dict] | str | list[int]) -> list[int]:
        """Prompt ids of a chat (list of message dicts), a raw string, or a list of token ids."""
        if isinstance(request, list) and request and isinstance(request[0], dict):
            return self.render(request)
        if isinstance(request, list) and not request:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        return self.encode(request)

    def count_tokens(self, text: str) -> int:
        with self._tok_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ---- public API ----------------------------------------------------------------------------

    def chat(self, messages: list[dict], **opts) -> Result:
        """Generate a reply to chat `messages` ({"role", "content"} dicts) under the chat template."""
        return self._collect(self.stream(validate_messages(messages), **opts))

    def complete(self, prompt: str | list[int], **opts) -> Result:
        """Continue a raw prompt (no template): a string or prompt token ids."""
        return self._collect(self.stream(prompt, **opts))

    def stream(self, request: list[dict] | str | list[int], **opts) -> ChunkStream | structured.ToolCallStream:
        """Yield `Chunk` text deltas; the last chunk has `finish_reason`, `stats` and `token_ids`.

        request: chat messages (rendered by the chat template), a raw prompt string, or prompt token ids
        (for a chat with tools, ids from `render(messages, tools, tool_choice)`).
        Structured output (see GenerationOptions): `response_format` constrains the text to JSON; `tools`
        (unless tool_choice="none") split the output into text deltas and `tool_call_deltas`, and the
        last chunk carries `tool_calls` (finish_reason "tool_calls" when calls were made).
        `logprobs=k`: the last chunk also carries `logprobs`, one entry per `token_ids` item (relay_llm.logprobs);
        text deltas carry none, since one delta may span several tokens or hold back part of one.
        `cancel()` (from any thread) or closing the stream early stops the generation at the next token
        (or before it starts, if still queued), and nothing is stored.
        """
        options = GenerationOptions(**opts)
        if isinstance(options.stop, str):
            options.stop = [options.stop]
        options.check()
        plan = structured.plan_request(options.response_format, options.tools, options.tool_choice,
                                       options.parallel_tool_calls)
        schedule = self._make_schedule(options.schedule or self.default_schedule, options.relay)
        is_chat = isinstance(request, list) and bool(request) and isinstance(request[0], dict)
        ids = self.render(request, options.tools, options.tool_choice) if is_chat else self._ids(request)
        self._check_length(len(ids), options.max_new_tokens)
        spec = plan.grammar_spec()
        if spec is not None and options.grammar is None:
            options.grammar = structured.grammar_cache(self).get(spec)
        out: queue.Queue = queue.Queue()
        cancel = threading.Event()
        seq = Sequence(ids, options, schedule, out.put, cancel, self._decode, self.eos_ids, Chunk,
                       closer=self._closer_for(options))
        self._worker.add(seq, seq.capacity * self.executor.kv_bytes_per_token())
        if not plan.calls_tools:
            return ChunkStream(out, cancel)
        seed = hashlib.sha256(repr((ids, options.seed)).encode()).hexdigest()
        return structured.ToolCallStream(ChunkStream(out, cancel), seed, plan.allowed)

    def _closer_for(self, options: GenerationOptions):
        """constraint -> Closer for a grammar-constrained request with either ending setting on (else None)."""
        if options.grammar is None or not (options.budget_ending or options.string_guard):
            return None
        cache = structured.grammar_cache(self)
        cands, texts = cache.closing_candidates, cache.token_texts
        return lambda constraint: Closer(constraint, cands, texts.__getitem__,
                                         lambda text: self.encode(text, special_tokens=False),
                                         budget=options.budget_ending, string_guard=options.string_guard,
                                         restart_at=structured.CALL_OPEN)

    def teacher_force(self, request: list[dict] | str | list[int], continuation_ids: list[int],
                      schedule: str | Schedule = "full", relay: dict | None = None) -> torch.Tensor:
        """Log-probabilities [steps, vocab] (fp32) of each continuation step, prefilled by `schedule`.

        Row i is the distribution of the token after prompt + continuation_ids[:i]. Stores nothing.
        """
        sched = self._make_schedule(schedule, relay)
        ids = self._ids(request)
        cont = list(continuation_ids)
        if not cont:
            raise ValueError("continuation_ids must not be empty")
        self._check_length(len(ids), len(cont))
        return self._worker.call(lambda: self._teacher_force(ids, cont, sched))

    # ---- worker side ---------------------------------------------------------------------------

    def _check_length(self, prompt_tokens: int, new_tokens: int) -> None:
        if prompt_tokens + new_tokens > self.max_context:
            raise ValueError(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({new_tokens}) exceeds the model's "
                f"context of {self.max_context} tokens"
            )

    @staticmethod
    def _collect(chunks: Iterator[Chunk]) -> Result:
        parts, last = [], None
        for c in chunks:
            parts.append(c.text)
            last = c
        assert last is not None and last.stats is not None
        return Result("".join(parts), last.finish_reason, last.token_ids or [], last.stats, last.tool_calls or [],
                      last.logprobs)

    def _prefill(self, ids: list[int], capacity: int, schedule: Schedule, stats: RequestStats,
                 touch: bool = True) -> tuple[torch.Tensor, KVBuffers, PrefillPlan]:
        """The whole prefill of `ids` at once (see `prefill.Prefill`): (last-token logits [vocab], buffers
        holding slots [0, len(ids)), plan)."""
        p = Prefill(self, ids, capacity, schedule, stats, touch=touch).run(self.config.prefill_chunk_tokens)
        return p.logits, p.kv, p.plan

    def _span_hidden(self, m) -> tuple[int, torch.Tensor] | None:
        seg = m.segment if m.segment is not None else self.store.get(m.segment_id)
        if seg.hidden is None:
            return None
        return seg.hidden_layer, seg.hidden[m.offset : m.offset + m.length]

    @property
    def store_fingerprint(self) -> str:
        """What stored K/V must carry to be spliced here: model weights, dtype and profile version."""
        profile = self.profile.version_key if getattr(self, "profile", None) else "no-profile"
        return f"{self.fingerprint.key()}|{profile}"

    def _open_store(self) -> SegmentStore:
        """The segment store: in memory, or shared through Redis when config.store_url is set."""
        cfg = self.config
        args = (cfg.store_budget_bytes, cfg.min_match_tokens, self._persist_folder())
        if not cfg.store_url:
            return SegmentStore(*args)
        if not cfg.store_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"store_url must be a redis:// (rediss://, unix://) URL, got {cfg.store_url!r}")
        from .redis_store import RedisSegmentStore

        return RedisSegmentStore(cfg.store_url, *args)

    def _persist_folder(self) -> str | None:
        """persist_dir/<hash of the model fingerprint>: one folder per model and dtype (None: no persistence)."""
        if not self.config.persist_dir:
            return None
        digest = hashlib.sha256(self.fingerprint.key().encode()).hexdigest()[:16]
        return os.path.join(self.config.persist_dir, f"{self.fingerprint.architecture}-{digest}")

    # The scheduler's runner (relay_llm.scheduler.Runner): these run on the model thread.

    def begin(self, seq: Sequence) -> None:
        seq.admitted()
        seq.prefill = Prefill(self, seq.ids, seq.capacity, seq.schedule, seq.stats)

    def finish(self, seq: Sequence) -> None:
        stats = seq.close_stats()
        if seq.closer is not None:
            stats.budget_ending, stats.guarded_strings = seq.closer.closing, seq.closer.guarded
        body = seq.body()
        self._remember(seq.ids, body, seq.prefill, torch.cat(seq.hidden), seq.schedule.splice_spans)
        logprobs = seq.recorder.entries(len(body), self._token_texts) if seq.recorder is not None else None
        seq.emit(Chunk("", finish_reason=seq.finish, stats=stats, token_ids=body, logprobs=logprobs))

    def _token_texts(self, ids: list[int]) -> list[str]:
        """The decoded text of each id on its own (special tokens: "", as in the returned text)."""
        with self._tok_lock:
            return self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False)

    def _remember(self, ids: list[int], generated: list[int], prefill: Prefill, hidden: torch.Tensor,
                  spliced: bool) -> None:
        """Store the prompt's new chunks and the output as Segments, and the exact part of the sequence in
        the prefix cache.

        hidden: [len(generated), hidden] capture-layer input of each generated token. spliced: whether the
        prefill spliced its stored spans (their K/V are approximate).
        """
        n = len(ids)
        fp = self.store_fingerprint
        kv, plan = prefill.kv, prefill.plan
        if self.config.store_prompt:
            self._remember_prompt(ids, kv, plan, prefill.captured)
        body = generated[:-1] if generated and generated[-1] in self.eos_ids else generated
        if body:
            keys, values = kv.slice(n, n + len(body))
            self.store.add(self._segment(body, keys, values, n, hidden[: len(body)], "decode", ids))
        # K/V are exact (equal to a full prefill) only up to the first spliced span.
        exact = plan.spans[0].start if spliced and plan.spans else n + len(generated)
        self.prefix_cache.add((ids + generated)[:exact], kv.keys[:, :, :exact], kv.values[:, :, :exact], fp)

    def _remember_prompt(self, ids: list[int], kv: KVBuffers, plan: PrefillPlan,
                         captured: torch.Tensor | None) -> None:
        """Keep the prompt's freshly computed stretches (one per message, see `matcher.chunk_bounds`) as
        prefill segments. Prefix-hit and span tokens are skipped: they are stored already."""
        cfg = self.config
        computed = (~plan.reusable_mask()).tolist()
        for s, e in chunk_bounds(ids, computed, self._boundary_ids, max(cfg.prompt_segment_min_tokens, self.store.k),
                                 cfg.prompt_segment_max_tokens):
            keys, values = kv.slice(s, e)
            hidden = captured[s:e] if captured is not None else None
            self.store.add(self._segment(ids[s:e], keys, values, s, hidden, "prefill", ids[:s]))

    def _segment(self, ids: list[int], keys: torch.Tensor, values: torch.Tensor, start: int,
                 hidden: torch.Tensor | None, kind: str, before: list[int]) -> Segment:
        """A Segment of this engine (its fingerprint, capture layer and store dtype); before: the tokens ahead
        of it, sketched as its context."""
        dt = self._store_dtype
        if dt is not None:
            keys, values = keys.to(dt), values.to(dt)
            hidden = hidden.to(dt) if hidden is not None else None
        return Segment(token_ids=torch.tensor(ids, dtype=torch.long), keys=keys, values=values, start_pos=start,
                       fingerprint=self.store_fingerprint, kind=kind,
                       hidden=hidden.clone() if hidden is not None else None, hidden_layer=self.capture_layer,
                       context=context_sketch(before))

    def _teacher_force(self, ids: list[int], cont: list[int], schedule: Schedule) -> torch.Tensor:
        ex = self.executor
        n = len(ids)
        first, kv, _ = self._prefill(ids, n + len(cont), schedule, RequestStats(schedule=schedule.name), touch=False)
        rows = [first[None]]
        if len(cont) > 1:
            rest = torch.tensor(cont[:-1], dtype=torch.long, device=ex.device)
            rows.append(ex.run(rest, n, kv, logit_rows=torch.arange(len(cont) - 1)).logits)
        return torch.log_softmax(torch.cat(rows).float(), dim=-1).cpu()


_SHARED: dict[tuple[str, str, str], RelayEngine] = {}
_SHARED_LOCK = threading.Lock()


def shared_engine(model: str = "default", dtype: str = "auto", device: str = "auto",
                  config: EngineConfig | None = None) -> RelayEngine:
    """The process-wide engine for (model, dtype, device), loaded on first use (with `config`, if given:
    it only applies to the call that loads the engine).

    Every face (LangChain, LlamaIndex, the server) gets its engine here, so instances naming the same
    model share one model, one worker and one segment store, and reuse each other's outputs.
    """
    key = (model, dtype, device)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = RelayEngine.load(model, dtype=dtype, device=device, config=config)
        return _SHARED[key]
