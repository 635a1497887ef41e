"""Token log-probabilities of a generation, and their OpenAI shapes.

The log-probabilities are those of the model's own next-token distribution: log-softmax of the fp32 logits
before penalties, grammar mask and temperature (vLLM's default "raw" logprobs). One entry per returned token:
{"token_id", "token" (its decoded text), "logprob", "top": [(token_id, token_text, logprob), ...]}, the top list
most likely first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MAX_TOP_LOGPROBS = 20


class LogprobRecorder:
    """Collects, per decode step, the chosen token's log-probability and the `k` most likely alternatives."""

    def __init__(self, k: int):
        self.k = k
        self._step: torch.Tensor | None = None
        self.steps: list[tuple[int, float, list[int], list[float]]] = []

    def observe(self, logits: torch.Tensor) -> None:
        """Note the raw next-token logits [vocab]; call before any penalty or mask changes them in place."""
        self._step = torch.log_softmax(logits.float(), dim=-1)

    def record(self, token: int) -> None:
        """Record the token chosen from the logits last observed."""
        top = torch.topk(self._step, self.k)
        self.steps.append((token, float(self._step[token]), top.indices.tolist(), top.values.tolist()))

    def entries(self, count: int, texts: Callable[[list[int]], list[str]]) -> list[dict]:
        """The first `count` steps as entries; `texts` decodes each of a list of ids on its own."""
        steps = self.steps[:count]
        ids = sorted({i for tok, _, top, _ in steps for i in (tok, *top)})
        text = dict(zip(ids, texts(ids), strict=True))
        return [{"token_id": tok, "token": text[tok], "logprob": lp,
                 "top": [(i, text[i], v) for i, v in zip(top, values, strict=True)]} for tok, lp, top, values in steps]


def token_bytes(token: str) -> list[int]:
    """The UTF-8 bytes of a token's text, as OpenAI's `bytes` field lists them."""
    return list(token.encode("utf-8"))


def openai_chat_logprobs(entries: list[dict]) -> dict:
    """Chat completions' `choices[i].logprobs`: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    content = [{"token": e["token"], "logprob": e["logprob"], "bytes": token_bytes(e["token"]),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": token_bytes(t)} for _, t, v in e["top"]]}
               for e in entries]
    return {"content": content, "refusal": None}


def openai_completion_logprobs(entries: list[dict]) -> dict:
    """Text completions' `choices[i].logprobs`: tokens, token_logprobs, top_logprobs (token text -> logprob;
    of two ids with the same text the likelier is kept) and text_offset (characters into the completion)."""
    offsets, pos = [], 0
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    top = []
    for e in entries:
        alternatives: dict[str, float] = {}
        for _, t, v in e["top"]:
            alternatives.setdefault(t, v)
        top.append(alternatives)
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": top, "text_offset": offsets}
