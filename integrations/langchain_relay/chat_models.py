"""ChatRelayLLM: a LangChain chat model on the in-process relay-llm engine.

A thin adapter: LangChain messages -> OpenAI-shaped message dicts -> `RelayEngine.chat` / `.stream`.
Every instance naming the same (model, dtype) shares one process-wide engine (`shared_engine`), so
outputs generated through one instance are reused when they reappear in another instance's prompt.
The model loads on first use, never at construction.

Tool calling and structured output are the engine's (relay_llm.structured: grammar-constrained
decoding): this module passes `tools` / `tool_choice` / `parallel_tool_calls` / `response_format`
through and maps the engine's OpenAI-shaped tool calls to LangChain's `tool_calls` / `tool_call_chunks`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
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
from langchain_core.messages.tool import InvalidToolCall, ToolCall, ToolCallChunk, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.base import OutputParserLike
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
    make_invalid_tool_call,
    parse_tool_call,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, Field, SecretStr

from relay_llm import Chunk, RelayEngine, RequestStats, shared_engine
from relay_llm.aio import iterate_in_thread
from relay_llm.loading import DEFAULT_MODEL_DIRNAME
from relay_llm.logprobs import openai_chat_logprobs

# Tool calling and structured output (grammar-constrained decoding in the engine). The standard-test
# capability flags in tests/langchain read this switch.
TOOL_CALLING = True

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


def _engine_tool_calls(m: AIMessage) -> list[dict]:
    """An AIMessage's tool calls (valid and invalid) in OpenAI shape, arguments as a JSON string."""
    calls = [{"id": c.get("id") or "", "type": "function",
              "function": {"name": c["name"], "arguments": json.dumps(c["args"], ensure_ascii=False)}}
             for c in m.tool_calls]
    calls += [{"id": c.get("id") or "", "type": "function", "function": {"name": c["name"], "arguments": c["args"]}}
              for c in m.invalid_tool_calls if isinstance(c.get("name"), str) and isinstance(c.get("args"), str)]
    return calls


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict]:
    """LangChain messages -> the engine's OpenAI-shaped message dicts (system/user/assistant/tool).

    An AIMessage's tool calls travel as structured "tool_calls" (the engine renders them in the exact
    format it generates, so they are reused); a ToolMessage keeps its "tool_call_id".
    """
    out = []
    for m in messages:
        extra: dict[str, Any] = {}
        if isinstance(m, SystemMessage):
            role, content = "system", _text(m.content)
        elif isinstance(m, HumanMessage):
            role, content = "user", _text(m.content)
        elif isinstance(m, AIMessage):
            role, content = "assistant", _text(m.content, ai=True)
            if calls := _engine_tool_calls(m):
                extra["tool_calls"] = calls
        elif isinstance(m, ToolMessage):
            role, content = "tool", _text(m.content)
            extra["tool_call_id"] = m.tool_call_id
        elif isinstance(m, FunctionMessage):
            role, content = "tool", _text(m.content)
        elif isinstance(m, ChatMessage) and m.role in _ROLES:
            role, content = _ROLES[m.role], _text(m.content)
        else:
            raise ValueError(f"ChatRelayLLM cannot render a {type(m).__name__} (role {getattr(m, 'role', '?')!r})")
        out.append({"role": role, "content": content, **extra})
    return out


def _parse_tool_calls(raw_calls: Sequence[dict], cut: bool = False) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    """The engine's OpenAI-shaped calls -> (tool_calls, invalid_tool_calls); arguments must be a JSON object.

    cut: the output hit the token budget (finish_reason "length"), so the last call may be cut off: it is
    valid only if its arguments are a complete JSON object."""
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for i, raw in enumerate(raw_calls):
        try:
            if cut and i == len(raw_calls) - 1:
                try:
                    json.loads(raw["function"]["arguments"])
                except ValueError:
                    raise ValueError(f"the call of {raw['function']['name']!r} was cut off by the token budget "
                                     "(finish_reason 'length')") from None
            parsed = parse_tool_call(raw, return_id=True)
            if parsed is None or not isinstance(json.loads(raw["function"]["arguments"] or "{}"), dict):
                raise ValueError(f"the arguments of {raw['function']['name']!r} are not a JSON object")
            calls.append(ToolCall(name=parsed["name"], args=parsed["args"], id=parsed["id"], type="tool_call"))
        except Exception as exc:  # noqa: BLE001 - any parse failure makes an invalid call, as langchain-openai does
            invalid.append(make_invalid_tool_call(raw, str(exc)))
    return calls, invalid


def _tool_call_chunks(deltas: Sequence[dict] | None) -> list[ToolCallChunk]:
    """The engine's streamed call deltas ({"index", "id", "name", "arguments"}) as LangChain tool-call chunks."""
    return [tool_call_chunk(name=d.get("name"), args=d.get("arguments"), id=d.get("id"), index=d["index"])
            for d in deltas or []]


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
    """"auto" (lossless: fp32 on CPU, bf16 on CUDA), "fast", "float32", "bfloat16", "float16" or "int8"."""
    temperature: float | None = None
    """Sampling temperature; 0 or None is greedy."""
    max_tokens: int | None = None
    """Most tokens to generate (engine default when None)."""
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    """In [-2, 2]: subtracted from the logit of every token generated so far (OpenAI's)."""
    frequency_penalty: float | None = None
    """In [-2, 2]: times a token's count so far, subtracted from its logit (OpenAI's)."""
    repetition_penalty: float | None = None
    """> 0, 1 = off: divides positive and multiplies negative logits of prompt and generated tokens (HF / vLLM's)."""
    seed: int | None = None
    stop: list[str] | None = None
    """Stop strings: generation ends before the first one."""
    streaming: bool = False
    """Stream through `_stream` even on `invoke` (so callbacks get every token)."""
    schedule: str | None = None
    """Prefill schedule (full, prefix, naive, ...); None uses the engine default."""
    logprobs: bool | None = None
    """Return token log-probabilities in `response_metadata["logprobs"]` ({"content": [...]}, OpenAI's shape)."""
    top_logprobs: int | None = None
    """With `logprobs`: the likeliest alternatives per token, in [0, 20]."""
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
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "repetition_penalty": self.repetition_penalty, "stop": self.stop, "schedule": self.schedule,
                "logprobs": self.logprobs, "top_logprobs": self.top_logprobs}

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
                           ("top_k", "top_k"), ("seed", "seed"), ("schedule", "schedule"),
                           ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
                           ("repetition_penalty", "repetition_penalty")):
            value = kwargs.get(field, getattr(self, field))
            if value is not None:
                opts[key] = value
        stop = stop if stop is not None else self.stop
        if stop:
            opts["stop"] = list(stop)
        for key in ("tools", "tool_choice", "parallel_tool_calls", "response_format"):
            if kwargs.get(key) is not None:
                opts[key] = kwargs[key]
        if kwargs.get("logprobs", self.logprobs):
            opts["logprobs"] = kwargs.get("top_logprobs", self.top_logprobs) or 0
        return kwargs.get("model"), to_engine_messages(messages), opts

    def _message_fields(self, model: str | None, finish_reason: str | None, stats: RequestStats,
                        logprobs: list[dict] | None) -> dict[str, Any]:
        """usage_metadata and response_metadata (with "logprobs" when asked for) of a finished generation."""
        usage = UsageMetadata(input_tokens=stats.prompt_tokens, output_tokens=stats.completion_tokens,
                              total_tokens=stats.prompt_tokens + stats.completion_tokens,
                              input_token_details={"cache_read": stats.reused_tokens})
        metadata = {"model_name": self._model_name(model), "model_provider": PROVIDER,
                    "finish_reason": finish_reason, "relay": stats.to_dict()}
        if logprobs is not None:
            metadata["logprobs"] = openai_chat_logprobs(logprobs)
        return {"usage_metadata": usage, "response_metadata": metadata}

    def _message(self, model: str | None, text: str, finish_reason: str | None, tool_calls: Sequence[dict],
                 stats: RequestStats, logprobs: list[dict] | None) -> ChatResult:
        """A finished generation as a ChatResult: text, parsed tool calls, usage and metadata."""
        calls, invalid = _parse_tool_calls(tool_calls, cut=finish_reason == "length")
        message = AIMessage(content=text, tool_calls=calls, invalid_tool_calls=invalid,
                            **self._message_fields(model, finish_reason, stats, logprobs))
        generation = ChatGeneration(message=message, generation_info={"finish_reason": finish_reason})
        return ChatResult(generations=[generation], llm_output={"model_name": self._model_name(model)})

    def _chunk(self, model: str | None, chunk: Chunk) -> ChatGenerationChunk | None:
        """An engine delta as a LangChain chunk (text and tool-call chunks); the last one alone carries
        model_name and usage. The complete calls on the engine's last chunk are not repeated: merged
        chunks rebuild them from the tool-call chunks."""
        calls = _tool_call_chunks(chunk.tool_call_deltas)
        if chunk.stats is None:
            if not chunk.text and not calls:
                return None
            return ChatGenerationChunk(message=AIMessageChunk(content=chunk.text, tool_call_chunks=calls))
        fields = self._message_fields(model, chunk.finish_reason, chunk.stats, chunk.logprobs)
        message = AIMessageChunk(content=chunk.text, tool_call_chunks=calls, chunk_position="last", **fields)
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": chunk.finish_reason})

    # ---- generation ----------------------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        model, request, opts = self._request(messages, stop, kwargs)
        result = self._engine(model).chat(request, **opts)
        return self._message(model, result.text, result.finish_reason, result.tool_calls, result.stats,
                             result.logprobs)

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
        async for c in iterate_in_thread(lambda: self._engine(model).stream(request, **opts), "relay-llm-langchain"):
            if (out := self._chunk(model, c)) is not None:
                yield out

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        model, request, opts = self._request(messages, stop, kwargs)
        parts, last = [], None
        async for c in iterate_in_thread(lambda: self._engine(model).stream(request, **opts), "relay-llm-langchain"):
            parts.append(c.text)
            last = c
        if last is None or last.stats is None:
            raise RuntimeError("the engine ended without a final chunk")
        return self._message(model, "".join(parts), last.finish_reason, last.tool_calls or [], last.stats,
                             last.logprobs)

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
        """Prompt tokens of `messages` under the chat template (generation prompt included), with the tools
        preamble when `tools` are given."""
        specs = [convert_to_openai_tool(t) for t in tools] if tools else None
        return len(self._engine().render(to_engine_messages(messages), tools=specs))

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | Literal["auto", "any", "required", "none"] | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (converted to OpenAI tool specs) for grammar-constrained tool calling.

        tool_choice: None / "auto" (text or calls), "any" / "required" / True (must call a tool), "none"
        (plain text), or a tool's name (must call that tool). parallel_tool_calls: allow several calls in
        one reply (the engine's default is one call: small models tend to repeat calls).
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None and tool_choice is not False:
            kwargs["tool_choice"] = _normalize_tool_choice(tool_choice, formatted)
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """A runnable whose output is `schema` (a Pydantic class, a TypedDict, or a JSON Schema / OpenAI
        function dict): a model instance for a Pydantic class, a dict otherwise.

        method: "json_schema" (default): the engine's `response_format` constrains the reply to the
        schema; "function_calling": a forced call of a tool whose parameters are the schema;
        "json_mode": the reply is constrained to some JSON object (put the keys in the prompt).
        include_raw: return {"raw": AIMessage, "parsed": ..., "parsing_error": ...} instead.
        strict: accepted for compatibility; the output is always grammar-constrained (strict).
        """
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        is_pydantic = is_basemodel_subclass(schema) if isinstance(schema, type) else False
        ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        parser: OutputParserLike
        if method == "function_calling":
            tool_name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=tool_name, ls_structured_output_format=ls_format)
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                      else JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema":
                json_schema = _json_schema(schema)
                response_format = {"type": "json_schema", "json_schema": {
                    "name": json_schema.get("title") or "response", "schema": json_schema,
                    **({"strict": strict} if strict is not None else {})}}
            else:
                response_format = {"type": "json_object"}
            llm = self.bind(response_format=response_format, ls_structured_output_format=ls_format)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")


def _json_schema(schema: dict[str, Any] | type) -> dict[str, Any]:
    """JSON Schema of a Pydantic class, TypedDict or OpenAI function / tool dict; a JSON Schema dict as is."""
    if isinstance(schema, dict) and "function" not in schema and "parameters" not in schema \
            and ("properties" in schema or "type" in schema):
        return schema
    return convert_to_json_schema(schema)
