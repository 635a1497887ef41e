"""What the executor's window-limited attention and grouped RoPE rotation save, side by side in one run.

A naive-style prefill on the default model (fp32): a sequence of `--reused` + `--new` tokens whose first
`--reused` slots already hold K/V (one full prefill), then `Executor.run` over the whole sequence with
only the last `--new` tokens active at every layer, as `naive` runs a prompt with a spliced span.

* windowed: the executor as shipped; a sliding layer (window 512 on 15 of gemma-3-270m's 18 layers)
  is handed only the slots its queries can see.
* all slots: the same run with every layer handed every slot, masked (what the executor did before).
* rotation: a spliced span's keys rotated by a position delta, per layer (`rotate` in a loop) vs
  `rotate_layers` (cos/sin once per RoPE layout).

Usage (from the repository root):

    python benchmarks/executor.py [--reused 2000] [--new 112] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from relay_llm import RelayEngine
from relay_llm.rope import rotate, rotate_layers
from relay_llm.schedules import StaticPlan


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reused", type=int, default=2000)
    ap.add_argument("--new", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    ex = RelayEngine.load("default", dtype="float32").executor
    n = args.reused + args.new
    ids = torch.randint(10, ex.config.vocab_size - 10, (n,), generator=torch.Generator().manual_seed(0))
    filled = ex.new_buffers(n)
    ex.run(ids, 0, filled)
    plan = StaticPlan(torch.arange(args.reused, n))
    windowed_mask = ex._run_mask

    def all_slots(masks, act, q_pos, end, window):
        return 0, ex._mask(q_pos, torch.arange(end), window)

    def run(variant: str) -> tuple[float, torch.Tensor]:
        ex._run_mask = windowed_mask if variant == "windowed" else all_slots
        kv = ex.new_buffers(n)
        kv.write(0, filled.keys, filled.values)
        t0 = time.perf_counter()
        logits = ex.run(ids, 0, kv, plan).logits
        return time.perf_counter() - t0, logits

    keys = filled.keys[:, :, : args.reused]
    rotations = {"per-layer loop": lambda: torch.stack([rotate(keys[i], 37, s) for i, s in enumerate(ex.rope)]),
                 "rotate_layers": lambda: rotate_layers(keys, 37, ex.rope)}
    times: dict[str, list[float]] = {"windowed": [], "all slots": [], **{k: [] for k in rotations}}
    out: dict[str, torch.Tensor] = {}
    for r in range(args.repeats + 1):  # round 0 warms up
        for variant in ("windowed", "all slots") if r % 2 else ("all slots", "windowed"):
            dt, out[variant] = run(variant)
            if r:
                times[variant].append(dt)
        for name, fn in rotations.items():
            t0 = time.perf_counter()
            out[name] = fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    ex._run_mask = windowed_mask
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.reused} reused + {args.new} "
          f"computed tokens; medians of {args.repeats} interleaved repeats")
    for a, b in (("all slots", "windowed"), ("per-layer loop", "rotate_layers")):
        ta, tb = statistics.median(times[a]), statistics.median(times[b])
        diff = (out[a] - out[b]).abs().max().item()
        print(f"{a:>15}: {ta * 1e3:8.1f} ms | {b:>13}: {tb * 1e3:8.1f} ms | ratio {tb / ta:.2f} | "
              f"max |diff| {diff:.2g}")


if __name__ == "__main__":
    main()
