"""Translate OpenAI request bodies into the engine's inputs: messages, prompt and generation kwargs."""

from __future__ import annotations

import dataclasses
import json

from relay_llm.engine import GenerationOptions

from .errors import bad_request, unsupported
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, RelayOptions, SamplingFields, ToolCall

ROLE_MAP = {"developer": "system"}  # OpenAI's newer name for the system role


def tool_calls_text(calls: list[ToolCall]) -> str:
    """Render an assistant's tool calls as text for the chat template (Hermes / Qwen style tags).

    Arguments that are valid JSON are embedded as JSON objects; anything else is kept as a string.
    """
    parts = []
    for call in calls:
        try:
            args = json.loads(call.function.arguments) if call.function.arguments else {}
        except json.JSONDecodeError:
            args = call.function.arguments
        payload = json.dumps({"name": call.function.name, "arguments": args}, ensure_ascii=False)
        parts.append(f"<tool_call>\n{payload}\n</tool_call>")
    return "\n".join(parts)


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
    """OpenAI chat messages -> the engine's {"role", "content"} dicts (tool calls rendered as text)."""
    out = []
    for i, msg in enumerate(messages):
        text = _content_text(msg, i)
        if msg.tool_calls:
            if msg.role != "assistant":
                raise bad_request("only assistant messages may carry tool_calls", param=f"messages.{i}.tool_calls")
            calls = tool_calls_text(msg.tool_calls)
            text = f"{text}\n{calls}" if text else calls
        out.append({"role": ROLE_MAP.get(msg.role, msg.role), "content": text})
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
    """Engine kwargs for `tools`, `tool_choice` and `response_format`.

    Structured generation (constrained decoding) is not in the engine yet, so any request that needs
    it is refused here. Wire the engine's structured-generation options in this one function.
    """
    if req.tools and req.tool_choice != "none":
        raise unsupported("tools are not available yet: structured generation is not implemented in this server",
                          param="tools")
    if req.response_format is not None and req.response_format.type != "text":
        raise unsupported(f"response_format {req.response_format.type!r} is not available yet: structured "
                          "generation is not implemented in this server", param="response_format")
    return {}


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
    """Engine kwargs for the sampling fields shared by chat and completions (OpenAI defaults: T = 1, top_p = 1)."""
    if req.n not in (None, 1):
        raise unsupported("n > 1 is not supported", param="n")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0:  # the smallest nucleus: the most likely token
        temperature, top_p = 0.0, 1.0
    kwargs: dict = {"temperature": temperature, "top_p": top_p, "top_k": req.top_k or 0}
    if req.seed is not None:
        kwargs["seed"] = req.seed % 2**64
    if req.stop:
        kwargs["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    kwargs.update(relay_kwargs(req.relay))
    return kwargs


def chat_kwargs(req: ChatCompletionRequest) -> dict:
    if req.logprobs or req.top_logprobs:
        raise unsupported("logprobs are not supported", param="logprobs")
    kwargs = sampling_kwargs(req)
    kwargs.update(structured_kwargs(req))
    return kwargs


def completion_kwargs(req: CompletionRequest) -> dict:
    if req.echo:
        raise unsupported("echo is not supported", param="echo")
    if req.suffix:
        raise unsupported("suffix is not supported", param="suffix")
    if req.logprobs:
        raise unsupported("logprobs are not supported", param="logprobs")
    if req.best_of not in (None, 1):
        raise unsupported("best_of > 1 is not supported", param="best_of")
    return sampling_kwargs(req)
