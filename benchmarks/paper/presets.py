"""Run sizes: `quick` (a smoke test, under 5 minutes) and `full` (the published numbers, about 90 minutes).

The full preset's time is estimated from the quick preset's measured per-unit times (docs/results/README.md,
"Run time"): `estimate_s` scales each kind of unit by its count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Preset:
    name: str
    facts: int  # fact-relay items
    code: int  # HumanEval problems
    notes: int  # chain-of-notes items (cycling 5, 2, 3, 4 agents)
    records: int = 24  # records per fact-relay log
    report_tokens: int = 160  # agent 1's report (fact relay)
    code_tokens: int = 160  # each code completion
    note_tokens: int = 96  # each chain note
    contexts: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)  # long-context sweep (agent 3's prompt)
    sweep_items: int = 6  # items per family (facts, notes) whose probes also run the Q3 / Q4 variants
    sweeps: dict | None = None  # Q4: knob -> values (None: SWEEPS, every value)
    repeats: int = 2  # TTFT timings per method and probe (median)
    steps: int = 20  # teacher-forced steps for KL / top-1 / identical continuation
    peer_tokens: int = 96  # new tokens per agent when peers run the 5-agent chain
    peers: bool = True
    chain_lengths: tuple[int, ...] = (5, 2, 3, 4)  # agents per chain-of-notes item, cycled
    # Q2 in bf16 too: the first `bf16_chains` 5-agent chain items and these long-context points, re-run whole
    # (upstream outputs included) by a bf16 engine; KL against bf16's own full prefill.
    bf16_chains: int = 4
    bf16_contexts: tuple[int, ...] = (1024, 4096)

    def signature(self) -> dict:
        """What a per-item record must match to be reused on resume."""
        d = asdict(self)
        for key in ("name", "repeats", "bf16_chains", "bf16_contexts"):  # bf16 units are records of their own
            d.pop(key)
        return d

    def sweep_values(self) -> dict:
        return self.sweeps if self.sweeps is not None else SWEEPS


SWEEPS = {  # Q4 knob -> values; band width and detection layer are relay band settings
    "tau_dev": [1.0, 1.25, 1.5, 2.0, 3.0],
    "tau_inf": [1.0, 1.2, 1.45, 2.0, 3.0],
    "suffix": [0, 5, 10, 20],
    "end_layer": [5, 8, 11, 14, 17],  # band width: start 0, det 1, end varied
    "det_layer": [1, 2, 4, 8],  # start 0, end 17
}
FULL_SWEEPS = {"tau_dev": [1.0, 2.0, 3.0], "tau_inf": [1.0, 2.0, 3.0], "suffix": [0, 5, 20], "end_layer": [5, 11],
               "det_layer": [2, 4, 8]}  # beside the shipped values (relay itself is the reference row)
QUICK_SWEEPS = {"tau_dev": [3.0], "tau_inf": [3.0], "suffix": [0], "end_layer": [8], "det_layer": [4]}

PRESETS = {
    "quick": Preset("quick", facts=2, code=1, notes=1, records=10, report_tokens=64, code_tokens=48, note_tokens=32,
                    contexts=(512, 1024), sweep_items=1, sweeps=QUICK_SWEEPS, repeats=1, peer_tokens=16,
                    bf16_chains=1, bf16_contexts=(1024,)),
    # Sized from the quick preset's per-item times (docs/results/README.md, "Run time of --preset full").
    "full": Preset("full", facts=40, code=40, notes=40, records=12, report_tokens=80, code_tokens=96, note_tokens=48,
                   sweep_items=4, sweeps=FULL_SWEEPS),
}


def smallest() -> Preset:
    """The quick preset at its smallest sizes (the test suite's)."""
    return replace(PRESETS["quick"], facts=1, code=1, notes=1, records=4, report_tokens=20, code_tokens=8,
                   note_tokens=16, contexts=(160,), sweeps={"suffix": [0]}, peer_tokens=4, steps=4,
                   chain_lengths=(2,), peers=False, bf16_chains=0, bf16_contexts=(), name="smallest")
