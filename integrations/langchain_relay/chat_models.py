"""ChatRelayLLM: a LangChain chat model on the in-process relay-llm engine.

A thin adapter: LangChain messages -> {"role", "content"} dicts -> `RelayEngine.chat` / `.stream`.
Every instance naming the same (model, dtype) shares one process-wide engine (`shared_engine`), so
outputs generated through one instance are reused when they reappear in another instance's prompt.
The model loads on first use, never at construction.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, SecretStr

from relay_llm import Chunk, RelayEngine, RequestStats, shared_engine
from relay_llm.loading import DEFAULT_MODEL_DIRNAME

# The one switch for tool calling and structured output. It stays False until the engine accepts
# `tools=` / `tool_choice=` (the structured-generation issue); the standard-test capability flags in
# tests/langchain read it too.
TOOL_CALLING = False
_NO_TOOLS = (
    "tool calling needs the structured-generation engine feature, which relay-llm does not have yet: "
    "bind_tools() records the tools, but the engine cannot generate tool calls"
)

PROVIDER = "relay_llm"
_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
          "ai": "assistant", "tool": "tool", "function": "tool"}
_SKIPPED_AI_BLOCKS = {"tool_call", "tool_call_chunk", "invalid_tool_call", "tool_use", "reasoning", "thinking"}


def _text(content: str | list, *, ai: bool = False) -> str:
    """Plain text of a message's content (a string or a list of content blocks)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif not (ai and isinstance(block, dict) and block.get("type") in _SKIPPED_AI_BLOCKS):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ChatRelayLLM accepts text content only, got a {kind!r} content block")
    return "".join(parts)


def render_tool_calls(tool_calls: Sequence[dict]) -> str:
    """Tool calls of an AIMessage as text, one `<tool_call>{"name", "arguments"}</tool_call>` each."""
    return "\n".join(
        "<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c.get("args", {})}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in tool_calls
    )


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict]:
    """LangChain messages -> the engine's {"role", "content"} dicts (system/user/assistant/tool)."""
    out = []
    for m in messages:
        if isinstance(m, SystemMessage):
            role, content = "system", _text(m.content)
        elif isinstance(m, HumanMessage):
            role, content = "user", _text(m.content)
        elif isinstance(m, AIMessage):
            role, content = "assistant", _text(m.content, ai=True)
            if m.tool_calls:
                content = "\n".join(p for p in (content, render_tool_calls(m.tool_calls)) if p)
        elif isinstance(m, (ToolMessage, FunctionMessage)):
            role, content = "tool", _text(m.content)
        elif isinstance(m, ChatMessage) and m.role in _ROLES:
            role, content = _ROLES[m.role], _text(m.content)
        else:
            raise ValueError(f"ChatRelayLLM cannot render a {type(m).__name__} (role {getattr(m, 'role', '?')!r})")
        out.append({"role": role, "content": content})
    return out


def _normalize_tool_choice(tool_choice: dict | str | bool, tools: list[dict]) -> dict | str:
    """LangChain tool_choice -> OpenAI style: "auto" | "none" | "required" | {"type": "function", ...}."""
    if tool_choice is True or tool_choice in ("any", "required"):
        return "required"
    if tool_choice in ("auto", "none") or isinstance(tool_choice, dict):
        return tool_choice
    names = [t["function"]["name"] for t in tools]
    if isinstance(tool_choice, str) and tool_choice in names:
        return {"type": "function", "function": {"name": tool_choice}}
    raise ValueError(f"tool_choice {tool_choice!r} is not 'auto', 'any', 'required', 'none' or a bound tool ({names})")


class ChatRelayLLM(BaseChatModel):
    """Local chat model that reuses the KV cache of text it generated (RelayCaching).

    Example:
        ```python
        from langchain_relay import ChatRelayLLM

        llm = ChatRelayLLM(max_tokens=128)  # the packaged gemma-3-270m; or model="/path/to/hf-folder"
        msg = llm.invoke("Hello")
        msg.usage_metadata["input_token_details"]["cache_read"]  # prompt tokens reused from the cache
        msg.response_metadata["relay"]  # engine stats: reuse_rate, ttft_s, schedule, ...
        ```
    """

    model: str = "default"
    """"default" (the packaged gemma-3-270m), a local Hugging Face folder, or a .gguf file."""
    dtype: str = "auto"
    """"auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16" or "float16"."""
    temperature: float | None = None
    """Sampling temperature; 0 or None is greedy."""
    max_tokens: int | None = None
    """Most tokens to generate (engine default when None)."""
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    """Stop strings: generation ends before the first one."""
    streaming: bool = False
    """Stream through `_stream` even on `invoke` (so callbacks get every token)."""
    schedule: str | None = None
    """Prefill schedule (full, prefix, naive, ...); None uses the engine default."""
    api_key: SecretStr | None = Field(default=None, exclude=True)
    """Ignored: the model runs in-process."""
    timeout: float | None = None
    """Ignored."""
    max_retries: int | None = None
    """Ignored."""

    @property
    def _llm_type(self) -> str:
        return "relay-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "stop": self.stop, "schedule": self.schedule}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=PROVIDER, ls_model_name=self._model_name(kwargs.get("model")),
                                 ls_model_type="chat")
        if (temperature := kwargs.get("temperature", self.temperature)) is not None:
            params["ls_temperature"] = temperature
        if (max_tokens := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = max_tokens
        if stop := (stop if stop is not None else self.stop):
            params["ls_stop"] = stop
        return params

    # ---- engine plumbing -----------------------------------------------------------------------

    def _model_name(self, model: str | None = None) -> str:
        model = model or self.model
        return DEFAULT_MODEL_DIRNAME if model == "default" else model

    def _engine(self, model: str | None = None) -> RelayEngine:
        """The process-wide engine for (model, dtype); loads the model on first use."""
        return shared_engine(model or self.model, self.dtype)

    def _request(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> tuple[str | None, list[dict], dict[str, Any]]:
        """(model override, engine messages, engine generation kwargs) for one call."""
        opts: dict[str, Any] = {}
        for field, key in (("temperature", "temperature"), ("max_tokens", "max_new_tokens"), ("top_p", "top_p"),
                           ("top_k", "top_k"), ("seed", "seed"), ("schedule", "schedule")):
            value = kwargs.get(field, getattr(self, field))
            if value is not None:
                opts[key] = value
        stop = stop if stop is not None else self.stop
        if stop:
            opts["stop"] = list(stop)
        tools, tool_choice = kwargs.get("tools"), kwargs.get("tool_choice")
        if tools and tool_choice != "none":
            if not TOOL_CALLING:
                raise NotImplementedError(_NO_TOOLS)
            opts["tools"], opts["tool_choice"] = tools, tool_choice
        return kwargs.get("model"), to_engine_messages(messages), opts

    def _message_fields(self, model: str | None, finish_reason: str | None, stats: RequestStats) -> dict[str, Any]:
        """usage_metadata and response_metadata of a finished generation."""
        usage = UsageMetadata(input_tokens=stats.prompt_tokens, output_tokens=stats.completion_tokens,
                              total_tokens=stats.prompt_tokens + stats.completion_tokens,
                              input_token_details={"cache_read": stats.reused_tokens})
        metadata = {"model_name": self._model_name(model), "model_provider": PROVIDER,
                    "finish_reason": finish_reason, "relay": stats.to_dict()}
        return {"usage_metadata": usage, "response_metadata": metadata}

    def _chunk(self, model: str | None, chunk: Chunk) -> ChatGenerationChunk | None:
        """An engine delta as a LangChain chunk; the last one alone carries model_name and usage."""
        if chunk.stats is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=chunk.text)) if chunk.text else None
        fields = self._message_fields(model, chunk.finish_reason, chunk.stats)
        return ChatGenerationChunk(message=AIMessageChunk(content=chunk.text, chunk_position="last", **fields),
                                   generation_info={"finish_reason": chunk.finish_reason})

    # ---- generation ----------------------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        model, request, opts = self._request(messages, stop, kwargs)
        result = self._engine(model).chat(request, **opts)
        message = AIMessage(content=result.text, **self._message_fields(model, result.finish_reason, result.stats))
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"finish_reason": result.finish_reason})],
                          llm_output={"model_name": self._model_name(model)})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # LangChain calls run_manager.on_llm_new_token for every chunk yielded here: one per token.
        model, request, opts = self._request(messages, stop, kwargs)
        chunks = self._engine(model).stream(request, **opts)
        try:
            for c in chunks:
                if (out := self._chunk(model, c)) is not None:
                    yield out
        finally:
            chunks.close()  # cancels the generation if the consumer stopped early

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        model, request, opts = self._request(messages, stop, kwargs)
        async for c in _in_thread(lambda: self._engine(model).stream(request, **opts)):
            if (out := self._chunk(model, c)) is not None:
                yield out

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        model, request, opts = self._request(messages, stop, kwargs)
        parts, last = [], None
        async for c in _in_thread(lambda: self._engine(model).stream(request, **opts)):
            parts.append(c.text)
            last = c
        if last is None or last.stats is None:
            raise RuntimeError("the engine ended without a final chunk")
        message = AIMessage(content="".join(parts), **self._message_fields(model, last.finish_reason, last.stats))
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"finish_reason": last.finish_reason})],
                          llm_output={"model_name": self._model_name(model)})

    # ---- tokens and tools ----------------------------------------------------------------------

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` under the model's own tokenizer (no special tokens)."""
        if not text:
            return []
        engine = self._engine()
        ids = engine.encode(text)
        bos = engine.tokenizer.bos_token_id
        return ids[1:] if bos is not None and ids and ids[0] == bos else ids

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Prompt tokens of `messages` under the chat template (generation prompt included); tools not counted."""
        return len(self._engine().render(to_engine_messages(messages)))

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | Literal["auto", "any", "required", "none"] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (converted to OpenAI tool specs) and an optional tool_choice.

        tool_choice: "auto", "any"/"required" (must call a tool), "none", or a tool's name.
        Calling the bound model raises NotImplementedError until the engine supports tool calls
        (except with tool_choice="none", which generates plain text).
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None and tool_choice is not False:
            kwargs["tool_choice"] = _normalize_tool_choice(tool_choice, formatted)
        return super().bind(tools=formatted, **kwargs)


class _End:
    pass


async def _in_thread(make: Callable[[], Iterator[Chunk]]) -> AsyncIterator[Chunk]:
    """Iterate `make()` (engine load, tokenisation, generation: all blocking) on a thread, off the event loop.

    Leaving the loop early (break, cancellation) closes the engine iterator at its next token, which
    cancels the generation.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening
            stop.set()

    def produce() -> None:
        try:
            chunks = make()
            try:
                for c in chunks:
                    if stop.is_set():
                        break
                    put(c)
            finally:
                chunks.close()
            put(_End())
        except BaseException as exc:  # handed to the consumer
            put(exc)

    threading.Thread(target=produce, name="relay-llm-langchain", daemon=True).start()
    try:
        while not isinstance(item := await items.get(), _End):
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
