"""Resumable per-item JSON records and progress with an ETA."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class Records:
    """One JSON file per unit under `root`/<section>/<key>.json; a file whose signature differs is stale."""

    def __init__(self, root: Path, signature: dict):
        self.root = Path(root)
        self.signature = json.loads(json.dumps(signature))  # as it reads back (tuples become lists)

    def path(self, section: str, key: str) -> Path:
        return self.root / section / f"{key}.json"

    def load(self, section: str, key: str) -> dict | None:
        p = self.path(section, key)
        if not p.exists():
            return None
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:  # a write cut short
            return None
        return rec if rec.get("signature") == self.signature else None

    def save(self, section: str, key: str, data: dict) -> dict:
        p = self.path(section, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        rec = {**data, "signature": self.signature}
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(p)  # atomic: an interrupted run never leaves half a record
        return rec

    def all(self, section: str) -> list[dict]:
        folder = self.root / section
        out = []
        for p in sorted(folder.glob("*.json")) if folder.exists() else []:
            rec = self.load(section, p.stem)
            if rec is not None:
                out.append(rec)
        return out


class Progress:
    """Units of several kinds with nominal weights; the ETA scales each kind's measured mean time."""

    def __init__(self, plan: dict[str, int], weights: dict[str, float], stream=sys.stderr):
        self.left = dict(plan)
        self.weights = weights
        self.spent: dict[str, list[float]] = {k: [] for k in plan}
        self.t0 = time.perf_counter()
        self.stream = stream
        self.done = 0
        self.total = sum(plan.values())

    def per_unit(self, kind: str) -> float:
        if self.spent[kind]:
            return sum(self.spent[kind]) / len(self.spent[kind])
        seen = [(sum(v) / len(v)) / self.weights[k] for k, v in self.spent.items() if v]
        return self.weights[kind] * (sum(seen) / len(seen) if seen else 1.0)

    def eta_s(self) -> float:
        return sum(n * self.per_unit(k) for k, n in self.left.items())

    def step(self, kind: str, label: str, seconds: float | None, resumed: bool = False) -> None:
        self.left[kind] -= 1
        self.done += 1
        if seconds is not None and not resumed:
            self.spent[kind].append(seconds)
        elapsed = time.perf_counter() - self.t0
        how = "resumed from its record" if resumed else f"{seconds:.0f} s"
        print(f"[{self.done}/{self.total}] {label}: {how}; elapsed {_fmt(elapsed)}, ETA {_fmt(self.eta_s())}",
              file=self.stream, flush=True)


def _fmt(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s"
