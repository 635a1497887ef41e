"""Translate OpenAI request bodies into the engine's inputs: messages, prompt and generation kwargs."""

from __future__ import annotations

import dataclasses

from relay_llm import structured
from relay_llm.engine import GenerationOptions

from .errors import bad_request, unsupported
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, RelayOptions, SamplingFields

ROLE_MAP = {"developer": "system"}  # OpenAI's newer name for the system role


def _content_text(msg: ChatMessage, index: int) -> str:
    content = msg.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise unsupported(f"content part of type {part.type!r} is not supported: this server serves a text model",
                              param=f"messages.{index}.content.{j}")
        texts.append(part.text)
    return "".join(texts)


def engine_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI chat messages -> the engine's {"role", "content", ["tool_calls"]} dicts.

    Assistant tool calls pass through in OpenAI shape; the engine renders them into the prompt.
    """
    out = []
    for i, msg in enumerate(messages):
        item = {"role": ROLE_MAP.get(msg.role, msg.role), "content": _content_text(msg, i)}
        if msg.tool_calls:
            if msg.role != "assistant":
                raise bad_request("only assistant messages may carry tool_calls", param=f"messages.{i}.tool_calls")
            item["tool_calls"] = [c.model_dump(exclude_none=True) for c in msg.tool_calls]
        out.append(item)
    return out


def engine_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completions request: a string or token ids."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise unsupported("only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    return prompt


def structured_kwargs(req: ChatCompletionRequest) -> dict:
    """Engine kwargs for `tools`, `tool_choice`, `parallel_tool_calls` and `response_format` (OpenAI shapes,
    passed through as dicts), checked by the engine's own validation (ValueError -> 400 naming the field)."""
    kwargs: dict = {}
    if req.tools:
        kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        kwargs["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump(exclude_none=True)
    if req.parallel_tool_calls is not None:
        kwargs["parallel_tool_calls"] = req.parallel_tool_calls
    if req.response_format is not None:
        kwargs["response_format"] = req.response_format.model_dump(by_alias=True, exclude_none=True)
    try:
        structured.plan_request(kwargs.get("response_format"), kwargs.get("tools"), kwargs.get("tool_choice"),
                                kwargs.get("parallel_tool_calls", False))
    except ValueError as exc:
        raise bad_request(str(exc), param=structured_param(str(exc))) from None
    return kwargs


def structured_param(message: str) -> str | None:
    """The request field a structured-output error message is about."""
    for field in ("response_format", "tool_choice", "parallel_tool_calls", "tools"):
        if field in message or (field == "tools" and "tool" in message):
            return field
    return None


def relay_kwargs(opts: RelayOptions | None) -> dict:
    """Engine kwargs for the `relay` extension field: the schedule, and its per-call settings.

    `thresholds` go to the engine as its per-call schedule settings (`relay=`: selector thresholds such as
    tau_dev / tau_inf / l_suf, band layers); the engine validates names and values (ValueError -> 400).
    """
    if opts is None:
        return {}
    kwargs: dict = {}
    if opts.schedule is not None:
        kwargs["schedule"] = opts.schedule
    if opts.thresholds:
        if "relay" not in {f.name for f in dataclasses.fields(GenerationOptions)}:
            raise unsupported("relay.thresholds are not available: this engine takes no per-call schedule settings",
                              param="relay.thresholds")
        kwargs["relay"] = dict(opts.thresholds)
    return kwargs


def sampling_kwargs(req: SamplingFields) -> dict:
    """Engine kwargs for the sampling fields shared by chat and completions (OpenAI defaults: T = 1, top_p = 1,
    no penalties)."""
    if req.n not in (None, 1):
        raise unsupported("n > 1 is not supported", param="n")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0:  # the smallest nucleus: the most likely token
        temperature, top_p = 0.0, 1.0
    kwargs: dict = {"temperature": temperature, "top_p": top_p, "top_k": req.top_k or 0}
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        if (value := getattr(req, name)) is not None:
            kwargs[name] = value
    if req.seed is not None:
        kwargs["seed"] = req.seed % 2**64
    if req.stop:
        kwargs["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    kwargs.update(relay_kwargs(req.relay))
    return kwargs


def chat_kwargs(req: ChatCompletionRequest) -> dict:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs")
    kwargs = sampling_kwargs(req)
    if req.logprobs:
        kwargs["logprobs"] = req.top_logprobs or 0
    kwargs.update(structured_kwargs(req))
    return kwargs


def completion_kwargs(req: CompletionRequest) -> dict:
    if req.echo:
        raise unsupported("echo is not supported", param="echo")
    if req.suffix:
        raise unsupported("suffix is not supported", param="suffix")
    if req.best_of not in (None, 1):
        raise unsupported("best_of > 1 is not supported", param="best_of")
    kwargs = sampling_kwargs(req)
    if req.logprobs is not None:
        kwargs["logprobs"] = req.logprobs
    return kwargs
