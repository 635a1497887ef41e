"""Synthetic segments for the shared-store tests (no model needed)."""

from __future__ import annotations

import time

import torch

from relay_llm.store import Segment


def make_segment(fingerprint: str, n: int = 32, seed: int = 0, start: int = 5, layers: int = 3, heads: int = 2,
                 dim: int = 16, hidden: bool = True, dtype=torch.float32) -> Segment:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (n,), generator=g)
    kv = lambda: torch.randn(layers, heads, n, dim, generator=g).to(dtype)  # noqa: E731
    return Segment(token_ids=ids, keys=kv(), values=kv(), start_pos=start, fingerprint=fingerprint, kind="decode",
                   hidden=torch.randn(n, 8, generator=g).to(dtype) if hidden else None, hidden_layer=1)


def prompt_with(seg: Segment, before: int = 7, after: int = 5) -> list[int]:
    """Token ids of a prompt quoting all of `seg` between unrelated ids (>= 60000: never in a segment)."""
    return list(range(60_000, 60_000 + before)) + seg.token_ids.tolist() + list(range(61_000, 61_000 + after))


def wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
