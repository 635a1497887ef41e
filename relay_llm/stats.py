"""Per-request statistics, shared by every face."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RequestStats:
    """What one request reused and computed.

    Reuse rate (DESIGN.md): 1 - computed (token, layer) cells of reusable content / all such cells,
    where reusable content = exact-prefix-hit tokens + tokens of stored spans found in the prompt.
    """

    schedule: str = "full"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefix_hit_tokens: int = 0
    reused_tokens: int = 0  # reusable tokens whose stored K/V was used at one layer or more
    span_tokens: int = 0  # tokens of stored spans found in the prompt
    spans: int = 0
    reusable_cells: int = 0
    recomputed_cells: int = 0
    reuse_rate: float = 0.0
    ttft_s: float = 0.0  # from submission: includes queued_s
    queued_s: float = 0.0  # waiting for the scheduler to admit it
    prefill_s: float = 0.0  # from admission to the prefill's end (other sequences' decode steps included)
    decode_s: float = 0.0
    fallback: str | None = None
    # Structured output (relay_llm.closing): the budget-aware ending took over for the last tokens; JSON
    # strings closed by the loop guard.
    budget_ending: bool = False
    guarded_strings: int = 0
    span_kinds: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
