"""The long-context sweep: a 3-agent chain whose agent-3 prompt holds about `context` tokens.

Agent 1 and agent 2 "wrote" one half each of a synthetic design specification (`benchmarks/ttft.py`'s seeded
generator). Decoding thousands of tokens per point is too slow on 2 CPU cores, so, as in
`benchmarks/fidelity.py`, each output's K/V come from one full prefill of it after the upstream prefix, at
its original positions, stored as a decode Segment with its captured hidden states: what the engine stores
for an output it generated, up to decode-vs-prefill float noise. Agent 2's prompt pastes agent 1's output
behind its own instructions; agent 3's pastes both.
"""

from __future__ import annotations

from benchmarks.fidelity import make_segment
from benchmarks.ttft import bos, spec_text, tokens

from .methods import Probe

SYSTEM2 = ("You are the Developer agent. The Architect's specification is below. List the components you "
           "will build first, in order, and the interface of each.\n\nSpecification:\n")
SYSTEM3 = ("You are the Reviewer agent. Below are the Architect's specification and the Developer's plan. "
           "Check the plan against the specification, point by point.\n\nSpecification:\n")
BETWEEN = "\n\nThe Developer's plan:\n"
ASK2 = "\n\nNow write the build order.\nAnswer:"
ASK3 = "\n\nWhich component does the plan leave out?\nAnswer:"


def probes(engine, context: int) -> list[Probe]:
    """Store agent 1's and agent 2's outputs (about context/2 tokens each) and return the agent 2 and agent 3
    probes. The caller clears the store first."""
    over = len(tokens(engine, SYSTEM3 + BETWEEN + ASK3)) + 1
    half = max(16, (context - over) // 2)
    text = tokens(engine, spec_text(min_words=context + 200, seed=context))
    out1, out2 = text[:half], text[half : 2 * half]
    for span in (out1, out2):
        engine.store.add(make_segment(engine, span))
    p2 = bos(engine) + tokens(engine, SYSTEM2) + out1 + tokens(engine, ASK2)
    p3 = bos(engine) + tokens(engine, SYSTEM3) + out1 + tokens(engine, BETWEEN) + out2 + tokens(engine, ASK3)
    return [Probe(key=f"ctx{context}-agent2", ids=p2, shared_prefix=len(bos(engine)), meta={"agent": 2}),
            Probe(key=f"ctx{context}-agent3", ids=p3, shared_prefix=len(bos(engine)), meta={"agent": 3})]
