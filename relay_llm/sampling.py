"""Choosing the next token: sampling penalties on the logits, then greedy or top-k / top-p sampling.

Penalties (applied before any grammar mask, at every temperature):
- presence / frequency (OpenAI): over the tokens generated so far in this call,
  logit[j] -= frequency * count[j] + presence * (count[j] > 0).
- repetition (Hugging Face / vLLM): over the prompt's and the generated tokens,
  logit[j] = logit[j] / p if logit[j] > 0 else logit[j] * p.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import GenerationOptions

# Penalised logits are clamped to +-LOGIT_LIMIT: an extreme repetition penalty must not make an inf or a NaN
# (a NaN after softmax, or an all -inf row under a grammar mask). Real logits are far inside it.
LOGIT_LIMIT = 1e4


@torch.inference_mode()  # the executor's logits are inference tensors
def apply_penalties(logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, presence: float = 0.0,
                    frequency: float = 0.0, repetition: float = 1.0) -> None:
    """Penalise, in place, the logits [vocab] of the distinct token ids [k] that occurred.

    counts: [vocab] fp32, how often each token was generated so far (0 for prompt-only tokens). The
    repetition penalty applies to every id in `ids`, presence and frequency to those with counts > 0.
    Costs O(k), not O(vocab).
    """
    picked = logits[ids].float()
    if repetition != 1.0:
        picked = torch.where(picked > 0, picked / repetition, picked * repetition)
    if presence or frequency:
        seen = counts[ids]
        picked = picked - frequency * seen - presence * (seen > 0).float()
    # nan: a zero logit times a penalty beyond the fp32 range, which is 0
    logits[ids] = picked.nan_to_num(0.0).clamp(-LOGIT_LIMIT, LOGIT_LIMIT).to(logits.dtype)


class Penalties:
    """The running state of one generation's penalties: the ids to penalise and the generated counts."""

    def __init__(self, opts: GenerationOptions, prompt_ids: list[int], vocab: int, device: torch.device):
        self.presence, self.frequency = opts.presence_penalty, opts.frequency_penalty
        self.repetition = opts.repetition_penalty
        self._seen = set(prompt_ids) if self.repetition != 1.0 else set()
        self.ids = torch.tensor(sorted(self._seen), dtype=torch.long, device=device)
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)

    @staticmethod
    def active(opts: GenerationOptions) -> bool:
        """Whether `opts` asks for any penalty (at the defaults the penalty step is skipped)."""
        return bool(opts.presence_penalty or opts.frequency_penalty or opts.repetition_penalty != 1.0)

    def apply(self, logits: torch.Tensor) -> None:
        """Penalise the next-token logits [vocab] in place."""
        if self.ids.numel():
            apply_penalties(logits, self.ids, self.counts, self.presence, self.frequency, self.repetition)

    def update(self, token: int) -> None:
        """Count one generated token."""
        self.counts[token] += 1
        if token not in self._seen:
            self._seen.add(token)
            self.ids = torch.cat([self.ids, torch.tensor([token], device=self.ids.device)])


GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as in vLLM): logits / 1e-300 would overflow


def argmax(logits: torch.Tensor) -> int:
    """Index of the first largest of [vocab] logits. On CPU through numpy: torch's argmax costs 0.45 ms on a
    262k vocabulary row (2 threads), numpy's 0.02 ms (measured on the 2-core benchmark VMs)."""
    if logits.device.type == "cpu":
        return int(logits.numpy().argmax())
    return int(torch.argmax(logits))


def sample(logits: torch.Tensor, opts: GenerationOptions, gen: torch.Generator) -> int:
    """One token id from [vocab] logits: greedy at temperature ~0, else top-k / top-p sampling."""
    if opts.temperature < GREEDY_BELOW:
        return argmax(logits)
    scores = logits.float().cpu() / opts.temperature
    if opts.top_k:
        kth = torch.topk(scores, min(opts.top_k, scores.numel())).values[-1]
        scores[scores < kth] = float("-inf")
    if opts.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, -1) >= opts.top_p  # keep the smallest set reaching top_p
        scores[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=gen))
