"""Why relay recomputes the first tokens of every reused span: the demo's Reviewer prompt, measured.

The demo pipeline (relay_llm.demo, plain transcripts) runs its Architect and Developer with the demo's
sampling settings (64 new tokens each), which stores their outputs and their prompts (as "prefill"
segments). The Reviewer's prompt then holds:

* the two earlier outputs (decode segments), pasted by its template;
* its few-shot example, whose specification and code also appear in the earlier agents' prompts;
* the few-shot review, whose lines restate the specification's lines and so match short (19-token)
  pieces of the stored Architect prompt, each starting right after "Review:" / ": done." where the
  stored copy had "Specification:" / a line end.

For each way of reusing that prompt the script reports KL(full || schedule) of the first generated
token and the mean over 16 teacher-forced steps of full prefill's greedy continuation, and the tokens
reused. Deterministic: rerun it for the same numbers.

Usage (from the repository root):

    python benchmarks/span_edges.py
"""

from __future__ import annotations

import torch

from relay_llm import RelayEngine, demo
from relay_llm.matcher import Match

STEPS = 16


def main() -> None:
    e = RelayEngine.load("default", dtype="float32")
    s = demo.Sampling()
    outputs: dict[str, str] = {}
    for i, agent in enumerate(demo.AGENTS[:2]):
        prompt = demo.render_plain(demo.build_messages(agent, demo.TASK, outputs))
        outputs[agent.key] = e.complete(prompt, max_new_tokens=64, temperature=s.temperature, top_p=s.top_p,
                                        top_k=s.top_k, seed=s.seed + i, stop=list(agent.stop)).text
    ids = e.encode(demo.render_plain(demo.build_messages(demo.AGENTS[2], demo.TASK, outputs)))
    spans = e.store.find(ids, 0, len(ids) - 1, fingerprint=e.store_fingerprint, touch=False)
    print(f"Reviewer prompt: {len(ids)} tokens; spans found:")
    for m in spans:
        text = e._decode(ids[m.start : m.end]).replace("\n", "\\n")
        print(f"  at {m.start:4d}, {m.length:3d} tokens, {m.segment.kind:7s} {text[:60]!r}")
    e.prefix_cache.clear()
    cont = e.complete(ids, max_new_tokens=STEPS, schedule="full").token_ids
    full = e.teacher_force(ids, cont, schedule="full")
    find = e.store.find

    def measure(label: str, schedule: str, relay: dict | None = None, keep=lambda m: True, trim: int = 0) -> None:
        """KL of one way of reusing the prompt: the spans `keep` accepts, the first piece (the first span
        under 32 tokens) without its first `trim` tokens. teacher_force only: it stores nothing, so every
        row sees the same store."""
        piece = next(m for m in spans if m.length < 32)

        def pick(*a, **k) -> list[Match]:
            out = [m for m in find(*a, **k) if keep(m)]
            return [Match(m.start + trim, m.segment_id, m.offset + trim, m.length - trim, m.segment)
                    if (m.start, m.length) == (piece.start, piece.length) else m for m in out]

        e.store.find = pick
        try:
            e.prefix_cache.clear()
            kl = torch.sum(full.exp() * (full - e.teacher_force(ids, cont, schedule=schedule, relay=relay)), -1)
            used = sum(m.length for m in pick(ids, 0, len(ids) - 1, fingerprint=e.store_fingerprint, touch=False))
        finally:
            e.store.find = find
        print(f"| {label} | {kl[0].item():.4f} | {kl.mean().item():.4f} | {used} |")

    print(f"\n| reuse | first-token KL | mean KL ({STEPS} steps) | span tokens |\n|---|---|---|---|")
    measure("naive, every span", "naive")
    measure("naive, outputs only (decode spans)", "naive", keep=lambda m: m.segment.kind == "decode")
    for prefix in (0, 1, 2, 3, 4, 8):
        measure(f"relay, prefix {prefix}{' (default)' if prefix == 4 else ''}", "relay", {"prefix": prefix})
    measure("relay, prefix 0, outputs only", "relay", {"prefix": 0}, keep=lambda m: m.segment.kind == "decode")
    measure("relay, prefix 0, without the 19-token pieces", "relay", {"prefix": 0}, keep=lambda m: m.length >= 32)
    first = next(m for m in spans if m.length < 32)
    outputs_and_first = lambda m: m.segment.kind == "decode" or (m.start, m.length) == (first.start, first.length)  # noqa: E731
    for trim in (0, 1, 2, 3, 4):
        measure(f"naive, outputs + the first piece less its first {trim} tokens", "naive", keep=outputs_and_first,
                trim=trim)


if __name__ == "__main__":
    main()
