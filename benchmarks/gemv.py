"""Decode-shaped linears, cold weights: torch's F.linear vs relay-llm's fp32 GEMV vs its int8-grid GEMV.

Each shape of the default model (gemma-3-270m) runs as 18 distinct random matrices in turn (one for the
LM head), so the weights stream from DRAM as in a decode step. Best of 5 passes, per call.

    PYTHONPATH=. .venv/bin/python benchmarks/gemv.py --rows 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from relay_llm import native
from relay_llm.kernels import cpu_flags, pack

SHAPES = [("q/k/v fused", 1536, 640, 32, False), ("o (offsets, like Q4_K)", 640, 1024, 32, True),
          ("gate/up fused", 4096, 640, 32, False), ("down (group 16, like Q6_K)", 640, 2048, 16, False),
          ("LM head", 262144, 640, 32, False)]


def best(fn, x: torch.Tensor, weights: list) -> float:
    """Best of 5 passes of fn(x, *w) over every w in weights, seconds per call."""
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for w in weights:
            fn(x, *w)
        times.append((time.perf_counter() - t) / len(weights))
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1, help="activation rows (decode batch)")
    args = ap.parse_args()
    ops = native.ops()
    if ops is None:
        raise SystemExit(native.unavailable())
    print(f"cpu flags {sorted(cpu_flags())}, {torch.get_num_threads()} threads, rows {args.rows}\n")
    print("| linear | F.linear (us) | fp32 GEMV (us) | int8 grid (us) | grid GB/s |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name, n, k, size, offset in SHAPES:
        copies = 1 if n > 100000 else 18
        dense = [(torch.randn(n, k, generator=gen), None) for _ in range(copies)]
        grids = [(pack(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)),
                  torch.rand(n, k // size, generator=gen), torch.rand(n, k // size, generator=gen) if offset else None,
                  None)
                 for _ in range(copies)]
        x = torch.randn(args.rows, k, generator=gen)
        with torch.inference_mode():
            t_mkl = best(F.linear, x, dense)
            t_f32 = best(ops.gemv_f32, x, dense)
            t_grid = best(ops.gemv_grid, x, grids)
        grid_bytes = n * k + 4 * n * (k // size) * (2 if offset else 1)
        print(f"| {name} [{n} x {k}] | {t_mkl * 1e6:.0f} | {t_f32 * 1e6:.0f} | {t_grid * 1e6:.0f} | "
              f"{grid_bytes / t_grid / 1e9:.1f} |")


if __name__ == "__main__":
    main()
