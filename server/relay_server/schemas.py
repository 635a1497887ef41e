"""Request bodies of the OpenAI endpoints we serve (unknown fields are ignored, as OpenAI clients add new ones)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from relay_llm.logprobs import MAX_TOP_LOGPROBS

MAX_STOP = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(BaseModel):
    """A part of a message's content; only `text` parts can be rendered for a text model."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = ""


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class RelayOptions(_Body):
    """The `relay` extension: reuse schedule and (for rectifying schedules) selector thresholds."""

    schedule: str | None = Field(None, description="reuse schedule, e.g. full, prefix, naive")
    thresholds: dict[str, int | float] | None = Field(
        None, description="per-call schedule settings passed to the engine: selector thresholds (tau_dev, tau_inf, "
        "l_suf) or band layers (start_layer, det_layer, end_layer)")


class SamplingFields(_Body):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension: sample from the k most likely tokens")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="subtracted from the logit of every "
                                           "token generated so far")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="times its count so far, subtracted "
                                            "from each generated token's logit")
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False, description="extension (as in vLLM): "
                                             "divides positive / multiplies negative logits of prompt and generated "
                                             "tokens; 1 = off")
    user: str | None = None
    relay: RelayOptions | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token; needs "
                                     "`logprobs: true`")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="return each token's logprob and "
                                 "this many likeliest alternatives")
    best_of: int | None = None


# Response bodies: declared in the OpenAPI schema (the handlers build plain dicts, see responses.py).

class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Out):
    cached_tokens: int = Field(..., ge=0, description="prompt tokens whose stored K/V was reused")


class Usage(_Out):
    prompt_tokens: int = Field(..., ge=0)
    completion_tokens: int = Field(..., ge=0)
    total_tokens: int = Field(..., ge=0)
    prompt_tokens_details: PromptTokensDetails


class OutFunctionCall(_Out):
    name: str
    arguments: str


class OutToolCall(_Out):
    id: str
    type: Literal["function"]
    function: OutFunctionCall


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str | None
    refusal: None = None
    tool_calls: list[OutToolCall] | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = Field(None, description='with `logprobs: true`: {"content": [{"token", '
                                            '"logprob", "bytes", "top_logprobs"}]}')
    finish_reason: str


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: dict[str, Any] | None = Field(None, description='with `logprobs: k`: {"tokens", "token_logprobs", '
                                            '"top_logprobs", "text_offset"}')
    finish_reason: str


class _Completed(_Out):
    id: str
    created: int
    model: str
    system_fingerprint: str
    usage: Usage
    relay: dict[str, Any] = Field(..., description="extension: the engine's stats for this request (reuse rate, "
                                  "recomputed cells, TTFT, schedule, fallbacks)")


class ChatCompletion(_Completed):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class Completion(_Completed):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Out):
    status: Literal["ok"]
    model: str
    generations_in_flight: int = Field(..., ge=0)


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Out):
    error: ErrorDetail
