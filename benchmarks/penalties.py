"""Sampling penalties on the default model: how much they cut greedy loops, and what they cost per token.

For 3 short raw prompts, greedy decoding of 80 tokens (full prefill) under each setting: no penalty,
repetition_penalty 1.2, frequency_penalty 0.5, and both. Reports per output the fraction of distinct
4-grams of token ids (1.0 = no 4-gram repeats; a loop drives it down), and the decode time per generated
token (`stats.decode_s / completion_tokens`; settings interleaved, medians over the repeats). On a shared
machine the decode times swing with the load, so the penalty step alone (`Penalties.apply` + `update` on
the 262k-vocabulary logits, 90 distinct ids) is also timed directly.

Usage (from the repository root):

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/penalties.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from relay_llm import RelayEngine
from relay_llm.engine import GenerationOptions
from relay_llm.sampling import Penalties

PROMPTS = ["The history of the old harbour town begins", "def parse_config(path):", "My grandmother's soup recipe:"]
SETTINGS = {
    "none": {},
    "repetition 1.2": {"repetition_penalty": 1.2},
    "frequency 0.5": {"frequency_penalty": 0.5},
    "repetition 1.2 + frequency 0.5": {"repetition_penalty": 1.2, "frequency_penalty": 0.5},
}
NEW_TOKENS = 80


def distinct_4grams(ids: list[int]) -> float:
    """Distinct 4-grams / all 4-grams of a token id sequence (1.0 for fewer than 4 ids)."""
    grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def penalty_step_ms(vocab: int, steps: int = 200) -> float:
    """Milliseconds of one penalty step (apply + update) on [vocab] fp32 logits, 10 prompt + 80 generated ids."""
    opts = GenerationOptions(repetition_penalty=1.2, frequency_penalty=0.5)
    penalties = Penalties(opts, list(range(10)), vocab, torch.device("cpu"))
    for tok in range(1000, 1080):
        penalties.update(tok)
    logits = torch.randn(vocab)
    t0 = time.perf_counter()
    for i in range(steps):
        penalties.apply(logits)
        penalties.update(1000 + i % 80)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    engine = RelayEngine.load("default", dtype="float32")
    rows: dict[tuple[str, str], dict] = {}
    for _ in range(args.repeats):
        for prompt in PROMPTS:
            for name, opts in SETTINGS.items():
                res = engine.complete(prompt, max_new_tokens=NEW_TOKENS, schedule="full", **opts)
                row = rows.setdefault((prompt, name), {"ids": res.token_ids, "ms_per_token": []})
                assert row["ids"] == res.token_ids, "greedy decoding is deterministic"
                row["ms_per_token"].append(res.stats.decode_s / res.stats.completion_tokens * 1e3)
    out = []
    print(f"{'prompt':<44} {'setting':<31} {'tokens':>6} {'distinct 4-grams':>16} {'ms/token':>9}")
    for (prompt, name), row in rows.items():
        item = {"prompt": prompt, "setting": name, "tokens": len(row["ids"]),
                "distinct_4grams": round(distinct_4grams(row["ids"]), 3),
                "ms_per_token": round(statistics.median(row["ms_per_token"]), 2),
                "text": engine.tokenizer.decode(row["ids"])}
        out.append(item)
        print(f"{prompt:<44} {name:<31} {item['tokens']:>6} {item['distinct_4grams']:>16.3f} "
              f"{item['ms_per_token']:>9.2f}")
    for name in SETTINGS:
        mine = [o for o in out if o["setting"] == name]
        grams, ms = (statistics.mean(o[k] for o in mine) for k in ("distinct_4grams", "ms_per_token"))
        print(f"mean over prompts, {name:<31}: distinct 4-grams {grams:.3f}, ms/token {ms:.2f}")
    step = penalty_step_ms(engine.executor.config.vocab_size)
    print(f"penalty step alone (apply + update, vocab {engine.executor.config.vocab_size}): {step:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": out, "penalty_step_ms": round(step, 4), "torch_threads": torch.get_num_threads()},
                      f, indent=1)
    engine.close()


if __name__ == "__main__":
    main()
