"""Scorers and confidence intervals."""

from __future__ import annotations

import math
import re


def normalise(text: str) -> str:
    """Lower case, punctuation other than '-' dropped, whitespace collapsed."""
    text = re.sub(r"[^\w\s-]", " ", text.lower())
    return " ".join(text.split())


def exact_match(answer: str, gold: str) -> bool:
    """The answer's first line, normalised, starts with the normalised gold answer as whole words.

    A base model keeps writing after the answer ("4821-K. The next parcel ..."), so only the leading words
    count; "4821-KX" or "4821" for gold "4821-K" do not match.
    """
    first = normalise(answer.strip().split("\n", 1)[0]) if answer.strip() else ""
    want = normalise(gold)
    return bool(want) and (first == want or first.startswith(want + " "))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (0, 1 for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95 % interval (0 for fewer than 2 values)."""
    if not values:
        return float("nan"), 0.0
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, z * math.sqrt(var / len(values))
