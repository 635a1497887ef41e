"""RelayLLM: a LlamaIndex function-calling LLM on the in-process relay-llm engine.

A thin adapter: LlamaIndex `ChatMessage`s -> {"role", "content"[, "tool_calls"]} dicts -> `RelayEngine.chat`
/ `.stream`. Every instance naming the same (model, dtype) shares one process-wide engine (`shared_engine`),
so text generated through one instance (or through the LangChain face, or the server) is reused when it
reappears in another's prompt. The model loads on first use, never at construction.

Where the results go:

* `response.raw`: {"model", "finish_reason", "usage", "relay"}; "relay" is the engine's `RequestStats` as a
  dict (reuse_rate, reused_tokens, span_tokens, ttft_s, schedule, ...).
* `response.additional_kwargs`: token counts {"prompt_tokens", "completion_tokens", "total_tokens",
  "reused_tokens"} (what LlamaIndex's TokenCountingHandler reads).
* Streaming: every chunk carries the text so far and its `delta`; only the last one has `raw` and the counts.
* Tool calls: `ToolCallBlock`s in `response.message.blocks` (while streaming, their `tool_kwargs` is the
  partial JSON text so far; on the last chunk and in `chat`, a dict).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    LogProb,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json

from relay_llm import Chunk, RelayEngine, RequestStats, shared_engine
from relay_llm.aio import iterate_in_thread
from relay_llm.engine import GenerationOptions
from relay_llm.loading import DEFAULT_MODEL_DIRNAME, cache_dir
from relay_llm.logprobs import token_bytes

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "model": "assistant",
          "chatbot": "assistant", "tool": "tool", "function": "tool"}
# Per-call kwargs -> engine generation options (anything else LlamaIndex passes along is ignored).
_OPTIONS = {"temperature": "temperature", "max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens",
            "top_p": "top_p", "top_k": "top_k", "seed": "seed", "schedule": "schedule", "relay": "relay",
            "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
            "repetition_penalty": "repetition_penalty",
            "response_format": "response_format", "tools": "tools", "tool_choice": "tool_choice",
            "parallel_tool_calls": "parallel_tool_calls"}


def _role(message: ChatMessage) -> str:
    role = getattr(message.role, "value", message.role)
    if role not in _ROLES:
        raise ValueError(f"RelayLLM cannot render a message with role {role!r}; expected one of {', '.join(_ROLES)}")
    return _ROLES[role]


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict]:
    """LlamaIndex messages -> the engine's {"role", "content"} dicts; assistant ToolCallBlocks -> "tool_calls"."""
    if not messages:
        raise ValueError("RelayLLM needs at least one message, got an empty message list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, ChatMessage):
            raise ValueError(f"messages[{i}] must be a llama_index ChatMessage, got {type(m).__name__}")
        role = _role(m)
        texts, calls = [], []
        for block in m.blocks:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolCallBlock) and role == "assistant":
                calls.append({"id": block.tool_call_id, "type": "function",
                              "function": {"name": block.tool_name, "arguments": block.tool_kwargs}})
            elif not (isinstance(block, ThinkingBlock) and role == "assistant"):
                raise ValueError(f"RelayLLM accepts text content only; messages[{i}] ({role}) has a "
                                 f"{type(block).__name__}")
        msg: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _tool_kwargs(kwargs: dict | str) -> dict:
    """A ToolCallBlock's arguments as a dict; partial JSON (mid-stream) is completed, junk gives {}."""
    if isinstance(kwargs, dict):
        return kwargs
    if not kwargs.strip():
        return {}
    try:
        parsed = parse_partial_json(kwargs)
    except (ValueError, json.JSONDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


class _Reply:
    """Accumulates engine chunks (text and tool-call deltas) into the assistant message so far."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: dict[int, dict] = {}
        self.final: list[dict] | None = None

    def add(self, chunk: Chunk) -> None:
        self.text += chunk.text
        for d in chunk.tool_call_deltas or ():
            call = self.calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = d.get("id") or call["id"]
            call["name"] = d.get("name") or call["name"]
            call["arguments"] += d.get("arguments") or ""
        if chunk.stats is not None and chunk.tool_calls is not None:
            self.final = chunk.tool_calls

    def message(self) -> ChatMessage:
        if self.final is not None:  # complete calls: arguments parsed
            calls = [ToolCallBlock(tool_call_id=c["id"], tool_name=c["function"]["name"],
                                   tool_kwargs=_parsed(c["function"]["arguments"])) for c in self.final]
        else:  # mid-stream: arguments are the partial JSON text so far
            calls = [ToolCallBlock(tool_call_id=c["id"], tool_name=c["name"], tool_kwargs=c["arguments"])
                     for _, c in sorted(self.calls.items())]
        blocks = ([TextBlock(text=self.text)] if self.text or not calls else []) + calls
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)


def _logprobs(entries: list[dict] | None) -> list[list[LogProb]] | None:
    """The engine's logprob entries as LlamaIndex's: per token its top alternatives (as llama-index-llms-openai
    does), or the chosen token alone when no alternatives were asked for."""
    if entries is None:
        return None
    return [[LogProb(token=t, logprob=v, bytes=token_bytes(t))
             for _, t, v in e["top"] or [(e["token_id"], e["token"], e["logprob"])]] for e in entries]


def _parsed(arguments: str | dict) -> dict | str:
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return arguments


class RelayLLM(FunctionCallingLLM):
    """Local LLM that reuses the KV cache of text it generated (RelayCaching), for LlamaIndex.

    Example:
        ```python
        from llama_index.core import Settings
        from llama_index.core.llms import ChatMessage
        from llama_index.llms.relay import RelayLLM

        Settings.llm = RelayLLM(max_tokens=128)  # the packaged gemma-3-270m; or model="/path/to/hf-folder"
        response = Settings.llm.chat([ChatMessage(role="user", content="Hello")])
        response.raw["relay"]["reuse_rate"]  # engine stats; token counts in response.additional_kwargs
        ```

    `complete` / `stream_complete` continue a raw prompt (no chat template: `completion_to_prompt` applies);
    `chat` and everything LlamaIndex builds on it (query engines, agents) use the model's chat template.
    Per-call kwargs: temperature, max_tokens, top_p, top_k, presence_penalty, frequency_penalty,
    repetition_penalty, seed, stop, schedule, relay, response_format, tools, tool_choice, parallel_tool_calls,
    logprobs, top_logprobs (None keeps the instance's value); other kwargs are ignored. With `logprobs`, the final
    response's `logprobs` holds, per token, its top alternatives (the token alone when top_logprobs is 0).
    """

    model: str = Field(default="default",
                       description='"default" (the packaged gemma-3-270m), a local Hugging Face folder or a .gguf')
    dtype: str = Field(default="auto", description='"auto" (lossless: fp32 on CPU, bf16 on CUDA), "fast", '
                                                   '"float32", "bfloat16", "int8", ...')
    temperature: float | None = Field(default=None, description="Sampling temperature; 0 or None is greedy.")
    max_tokens: int | None = Field(default=None, description="Most tokens to generate (engine default when None).")
    top_p: float | None = Field(default=None, description="Nucleus sampling mass.")
    top_k: int | None = Field(default=None, description="Top-k sampling (0: off).")
    presence_penalty: float | None = Field(
        default=None, description="In [-2, 2]: subtracted from the logit of every token generated so far (OpenAI's).")
    frequency_penalty: float | None = Field(
        default=None, description="In [-2, 2]: times a token's count so far, subtracted from its logit (OpenAI's).")
    repetition_penalty: float | None = Field(
        default=None, description="> 0, 1 = off: divides positive and multiplies negative logits of prompt and "
        "generated tokens (Hugging Face / vLLM's).")
    seed: int | None = Field(default=None, description="Sampling seed.")
    stop: list[str] | None = Field(default=None, description="Stop strings: generation ends before the first one.")
    schedule: str | None = Field(default=None,
                                 description="Prefill schedule (full, prefix, naive, relay, ...); None: the engine's.")
    context_window: int | None = Field(default=None, description="Context window; None: the model's.")
    logprobs: bool = Field(default=False, description="Fill `response.logprobs` (the model's raw token logprobs).")
    top_logprobs: int = Field(default=0, description="With `logprobs`: alternatives per token, in [0, 20].")

    @classmethod
    def class_name(cls) -> str:
        return "RelayLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self._context_window(),
                           num_output=self.max_tokens or GenerationOptions.max_new_tokens,
                           is_chat_model=True, is_function_calling_model=True, model_name=self._model_name())

    # ---- engine plumbing -----------------------------------------------------------------------

    @property
    def engine(self) -> RelayEngine:
        """The process-wide engine for (model, dtype); loads the model on first use."""
        return shared_engine(self.model, self.dtype)

    def _model_name(self) -> str:
        return DEFAULT_MODEL_DIRNAME if self.model == "default" else self.model

    def _context_window(self) -> int:
        """The configured window, else the model folder's max_position_embeddings (read without loading)."""
        if self.context_window:
            return self.context_window
        folder = cache_dir() / DEFAULT_MODEL_DIRNAME if self.model == "default" else Path(self.model)
        try:
            config = json.loads((folder / "config.json").read_text())
            window = config.get("max_position_embeddings") or config.get("text_config", {}).get(
                "max_position_embeddings")
            if isinstance(window, int):
                return window
        except (OSError, ValueError):
            pass
        return self.engine.max_context

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Engine generation options for one call: instance fields overridden by per-call kwargs."""
        opts: dict[str, Any] = {}
        for field in ("temperature", "max_tokens", "top_p", "top_k", "presence_penalty", "frequency_penalty",
                      "repetition_penalty", "seed", "schedule"):
            if (value := getattr(self, field)) is not None:
                opts[_OPTIONS[field]] = value
        for key, value in kwargs.items():
            if key in _OPTIONS and value is not None:
                opts[_OPTIONS[key]] = value
        stop = kwargs["stop"] if kwargs.get("stop") is not None else self.stop
        if stop:
            opts["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if kwargs.get("logprobs", self.logprobs):
            opts["logprobs"] = kwargs.get("top_logprobs", self.top_logprobs)
        return opts

    def _result(self, finish_reason: str | None, stats: RequestStats) -> tuple[dict, dict]:
        """(raw, additional_kwargs) of a finished generation."""
        usage = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                 "total_tokens": stats.prompt_tokens + stats.completion_tokens, "reused_tokens": stats.reused_tokens}
        raw = {"model": self._model_name(), "finish_reason": finish_reason, "usage": usage, "relay": stats.to_dict()}
        return raw, dict(usage)

    def _chat_chunk(self, reply: _Reply, chunk: Chunk) -> ChatResponse | None:
        """The ChatResponse for one engine chunk (None if it adds nothing); the last one carries stats."""
        reply.add(chunk)
        if chunk.stats is None:
            if not chunk.text and not chunk.tool_call_deltas:
                return None
            return ChatResponse(message=reply.message(), delta=chunk.text)
        raw, extra = self._result(chunk.finish_reason, chunk.stats)
        return ChatResponse(message=reply.message(), delta=chunk.text, raw=raw, additional_kwargs=extra,
                            logprobs=_logprobs(chunk.logprobs))

    def _completion_chunk(self, text: str, chunk: Chunk) -> CompletionResponse | None:
        if chunk.stats is None:
            return CompletionResponse(text=text, delta=chunk.text) if chunk.text else None
        raw, extra = self._result(chunk.finish_reason, chunk.stats)
        return CompletionResponse(text=text, delta=chunk.text, raw=raw, additional_kwargs=extra,
                                  logprobs=_logprobs(chunk.logprobs))

    def _prompt(self, prompt: str, formatted: bool) -> str:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("RelayLLM.complete needs a non-empty prompt string")
        return prompt if formatted else self.completion_to_prompt(prompt)

    # ---- chat ----------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request, opts = to_engine_messages(messages), self._options(kwargs)
        result = self.engine.chat(request, **opts)
        reply = _Reply()
        reply.add(Chunk(result.text, result.finish_reason, result.stats, result.token_ids,
                        tool_calls=result.tool_calls))
        raw, extra = self._result(result.finish_reason, result.stats)
        return ChatResponse(message=reply.message(), raw=raw, additional_kwargs=extra,
                            logprobs=_logprobs(result.logprobs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request, opts = to_engine_messages(messages), self._options(kwargs)
        chunks = self.engine.stream(request, **opts)

        def gen() -> ChatResponseGen:
            reply = _Reply()
            try:
                for c in chunks:
                    if (out := self._chat_chunk(reply, c)) is not None:
                        yield out
            finally:
                chunks.close()  # cancels the generation if the consumer stopped early

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        last = await _final(self._achat_stream(to_engine_messages(messages), self._options(kwargs)))
        return ChatResponse(message=last.message, raw=last.raw, additional_kwargs=last.additional_kwargs,
                            logprobs=last.logprobs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return self._achat_stream(to_engine_messages(messages), self._options(kwargs))

    async def _achat_stream(self, request: list[dict], opts: dict[str, Any]) -> ChatResponseAsyncGen:
        reply = _Reply()
        async for c in iterate_in_thread(lambda: self.engine.stream(request, **opts), "relay-llm-llamaindex"):
            if (out := self._chat_chunk(reply, c)) is not None:
                yield out

    # ---- completion (raw prompt, no chat template) ---------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = self.engine.complete(self._prompt(prompt, formatted), **self._options(kwargs))
        raw, extra = self._result(result.finish_reason, result.stats)
        return CompletionResponse(text=result.text, raw=raw, additional_kwargs=extra,
                                  logprobs=_logprobs(result.logprobs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        chunks = self.engine.stream(self._prompt(prompt, formatted), **self._options(kwargs))

        def gen() -> CompletionResponseGen:
            text = ""
            try:
                for c in chunks:
                    text += c.text
                    if (out := self._completion_chunk(text, c)) is not None:
                        yield out
            finally:
                chunks.close()

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        last = await _final(self._acomplete_stream(self._prompt(prompt, formatted), self._options(kwargs)))
        return CompletionResponse(text=last.text, raw=last.raw, additional_kwargs=last.additional_kwargs,
                                  logprobs=last.logprobs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        return self._acomplete_stream(self._prompt(prompt, formatted), self._options(kwargs))

    async def _acomplete_stream(self, prompt: str, opts: dict[str, Any]) -> CompletionResponseAsyncGen:
        text = ""
        async for c in iterate_in_thread(lambda: self.engine.stream(prompt, **opts), "relay-llm-llamaindex"):
            text += c.text
            if (out := self._completion_chunk(text, c)) is not None:
                yield out

    # ---- tools ---------------------------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """chat() kwargs: messages, OpenAI tool specs, tool_choice ("auto", "none", "required" or a tool's
        name; `tool_required` means "required") and parallel_tool_calls."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str)
                            else user_msg)
        specs = [t.metadata.to_openai_tool(skip_length_check=True) for t in tools]
        if tool_choice is None and tool_required:
            tool_choice = "required"
        return {"messages": messages, "tools": specs or None, "tool_choice": tool_choice if specs else None,
                "parallel_tool_calls": allow_parallel_tool_calls, **kwargs}

    def _validate_chat_with_tools_response(self, response: ChatResponse, tools: Sequence[BaseTool],
                                           allow_parallel_tool_calls: bool = False, **kwargs: Any) -> ChatResponse:
        """Keep only the first tool call unless parallel calls were allowed."""
        if not allow_parallel_tool_calls:
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            if len(calls) > 1:
                response.message.blocks = [b for b in response.message.blocks
                                           if not isinstance(b, ToolCallBlock) or b is calls[0]]
        return response

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        """The ToolCallBlocks of `response.message` as ToolSelections (partial streamed arguments completed)."""
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls:
            if error_on_no_tool_call:
                raise ValueError(f"expected at least one tool call, got none (reply: {response.message.content!r})")
            return []
        return [ToolSelection(tool_id=c.tool_call_id or f"call_{i}", tool_name=c.tool_name,
                              tool_kwargs=_tool_kwargs(c.tool_kwargs)) for i, c in enumerate(calls)]


async def _final(responses: AsyncIterator) -> Any:
    """The last response of a stream: the one that carries `raw` (stats and usage)."""
    last = None
    async for response in responses:
        last = response
    if last is None or last.raw is None:
        raise RuntimeError("the engine ended without a final chunk")
    return last
