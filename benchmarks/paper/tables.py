"""The Q1-Q4 tables from the per-item records: each table is {"key", "title", "columns", "rows", "note"}, a row
a dict keyed by column. Every table has a "method" column holding every method of `methods.METHODS`."""

from __future__ import annotations

from statistics import mean

from .methods import ABLATIONS, METHODS
from .scoring import wilson

TARGETS = {"agent5": 4.7, "longctx": 9.2, "reuse": 0.8, "accuracy_points": 1.0}
PERCENT = ("accuracy", "reuse", "mean reuse", "min reuse", "top-1", "share of saving")
FAMILIES = {"facts": "fact relay (exact match)", "code": "code relay (pass@1)", "notes": "chain of notes (exact match)"}


def _rows(records: list[dict], keep=lambda key: True) -> dict[str, list[dict]]:
    """method/variant label -> every probe row of `records` whose probe key passes `keep`."""
    out: dict[str, list[dict]] = {}
    for rec in records:
        for key, rows in rec["probes"].items():
            if keep(key):
                for label, row in rows.items():
                    out.setdefault(label, []).append(row)
    return out


def _speedup(rows: list[dict], full: list[dict]) -> float:
    return mean(r["ttft_s"] for r in full) / mean(r["ttft_s"] for r in rows) if rows and full else float("nan")


def _fidelity(rows: list[dict]) -> dict:
    return {"mean KL": mean(r["kl_mean"] for r in rows), "max KL": max(r["kl_max"] for r in rows),
            "top-1": mean(r["top1"] for r in rows), "identical": mean(r["identical"] for r in rows),
            "reuse": mean(r["reuse_rate"] for r in rows)}


def _sweep_rows(fam: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """label -> rows of the probes that ran the Q3 / Q4 variants (the sweep items' prompts)."""
    out: dict[str, list[dict]] = {}
    for rec in fam.get("facts", []) + fam.get("notes", []):
        for rows in rec["probes"].values():
            if next(iter(ABLATIONS)) in rows:
                for label, row in rows.items():
                    out.setdefault(label, []).append(row)
    return out


def q1(fam: dict[str, list[dict]]) -> dict:
    rows = []
    for family, title in FAMILIES.items():
        by = _rows(fam.get(family, []))
        scored = _rows(fam.get(family, []), lambda k: k in ("answer", "rewrite", "question"))
        for m in METHODS:
            if m not in by:
                continue
            hits = [bool(r["correct"]) for r in scored.get(m, [])]
            lo, hi = wilson(sum(hits), len(hits))
            rows.append({"task": title, "method": m, "items": len(hits),
                         "accuracy": sum(hits) / len(hits) if hits else float("nan"), "ci": [lo, hi],
                         **_fidelity(by[m]), "speed-up": _speedup(by[m], by["full"])})
    return {"key": "q1", "title": "Q1. Quality: accuracy and fidelity to full prefill", "rows": rows,
            "columns": ["task", "method", "items", "accuracy", "ci", "mean KL", "max KL", "top-1", "identical",
                        "reuse", "speed-up"],
            "note": "accuracy: exact match (fact relay, chain of notes: the ticket number after the last agent) or "
                    "pass@1 of agent 2's rewrite (code relay), with its 95 % Wilson interval. Fidelity over every "
                    "downstream prompt of the task: KL(full || method) in nats per teacher-forced step, top-1 "
                    "agreement and identical greedy continuation (leading tokens equal to full's) over the steps; "
                    "speed-up: mean TTFT of full / mean TTFT of the method."}


def q2_agents(fam: dict[str, list[dict]], bf16: list[dict] | None = None) -> dict:
    rows = []
    for dtype, recs in (("float32", fam.get("notes", [])), ("bfloat16", bf16 or [])):
        for agent in (2, 3, 4, 5):
            by = _rows(recs, lambda k, a=agent: k == f"agent{a}")
            for m in METHODS:
                if m in by:
                    rs = by[m]
                    rows.append({"dtype": dtype, "agent": agent, "method": m, "items": len(rs),
                                 "prompt": mean(r["prompt_tokens"] for r in rs),
                                 "TTFT (s)": mean(r["ttft_s"] for r in rs), "speed-up": _speedup(rs, by["full"]),
                                 "reuse": mean(r["reuse_rate"] for r in rs), "mean KL": mean(r["kl_mean"] for r in rs)})
    return {"key": "q2_agents", "title": "Q2a. Per-agent TTFT in the chain of notes (agents 2-5)", "rows": rows,
            "columns": ["dtype", "agent", "method", "items", "prompt", "TTFT (s)", "speed-up", "reuse", "mean KL"],
            "note": "mean over the chain items that have that agent (agent 5: the 5-agent chains); speed-up vs full "
                    "in the same precision. bfloat16 rows: the first 5-agent chains re-run whole by a bf16 engine "
                    "(its own upstream outputs; KL against bf16 full prefill)."}


def q2_reuse(fam: dict[str, list[dict]]) -> dict:
    everything = [r for recs in fam.values() for r in recs]
    by = _rows(everything)
    rows = [{"method": m, "probes": len(by[m]), "mean reuse": mean(r["reuse_rate"] for r in by[m]),
             "min reuse": min(r["reuse_rate"] for r in by[m]),
             "span tokens": mean(r["span_tokens"] for r in by[m])} for m in METHODS if m in by]
    return {"key": "q2_reuse", "title": "Q2b. KV reuse rate over every downstream prompt", "rows": rows,
            "columns": ["method", "probes", "mean reuse", "min reuse", "span tokens"],
            "note": "DESIGN.md's definition: 1 - computed (token, layer) cells of reusable content / all such cells "
                    "(reusable: prefix-cache hits and stored spans found in the prompt)."}


def q2_context(ctx: list[dict], bf16: list[dict] | None = None) -> dict:
    rows = []
    for dtype, recs in (("float32", ctx), ("bfloat16", bf16 or [])):
        for rec in sorted(recs, key=lambda r: r["context"]):
            p = rec["probes"]
            for m in METHODS:
                sp = [p[a]["full"]["ttft_s"] / p[a][m]["ttft_s"] for a in ("agent2", "agent3")]
                rows.append({"dtype": dtype, "context": rec["context"], "method": m,
                             "agent 2 TTFT (s)": p["agent2"][m]["ttft_s"], "agent 3 TTFT (s)": p["agent3"][m]["ttft_s"],
                             "avg speed-up": mean(sp),
                             "reuse": mean(p[a][m]["reuse_rate"] for a in ("agent2", "agent3")),
                             "mean KL": mean(p[a][m]["kl_mean"] for a in ("agent2", "agent3"))})
    return {"key": "q2_context", "title": "Q2c. Long context: 3 agents, agent 3's prompt of about N tokens",
            "rows": rows, "columns": ["dtype", "context", "method", "agent 2 TTFT (s)", "agent 3 TTFT (s)",
                                      "avg speed-up", "reuse", "mean KL"],
            "note": "avg speed-up: mean over agents 2 and 3 of full's TTFT / the method's (the paper's per-agent "
                    "average), in the same precision. Upstream outputs made by prefill (`longctx.py`)."}


def q2_floor(fam: dict[str, list[dict]], ctx: list[dict]) -> dict:
    """Where each method sits between full (0 %) and the ideal floor (100 %) of the TTFT saving."""
    settings = []
    for agent in (2, 3, 4, 5):
        by = _rows(fam.get("notes", []), lambda k, a=agent: k == f"agent{a}")
        if by:
            settings.append((f"chain agent {agent}", {m: mean(r["ttft_s"] for r in by[m]) for m in by}))
    for rec in sorted(ctx, key=lambda r: r["context"]):
        p = rec["probes"]["agent3"]
        settings.append((f"long context {rec['context']}, agent 3", {m: p[m]["ttft_s"] for m in p}))
    rows = []
    for name, t in settings:
        saving = t["full"] - t["ideal"]
        for m in METHODS:
            rows.append({"setting": name, "method": m, "TTFT (s)": t[m],
                         "share of saving": (t["full"] - t[m]) / saving if saving > 0 else float("nan")})
    return {"key": "q2_floor", "title": "Q2d. Between full prefill and the ideal floor", "rows": rows,
            "columns": ["setting", "method", "TTFT (s)", "share of saving"],
            "note": "share of saving: (full - method) / (full - ideal) of TTFT; ideal = every span reused with no "
                    "repair and the prompt cached up to its first span."}


def q2_wall(fam: dict[str, list[dict]], peers: dict | None) -> dict:
    most = max((len(r["agents"]) for r in fam.get("notes", [])), default=0)
    chains = [r for r in fam.get("notes", []) if len(r["agents"]) == most]
    rows = []
    for m in METHODS:
        if not chains:
            break
        ttft = mean(c["agents"][0]["ttft_s"] + sum(c["probes"][f"agent{k}"][m]["ttft_s"] for k in range(2, most + 1))
                    for c in chains)
        dec = mean(sum(a["decode_s"] for a in c["agents"]) for c in chains)
        rows.append({"system": "relay-llm", "method": m, "TTFT sum (s)": ttft, "decode (s)": dec,
                     "wall (s)": ttft + dec})
    if chains and peers:
        new = [a["new"] for a in chains[0]["agents"]]
        for name, res in peers["peers"].items():
            if "skipped" in res:
                rows.append({"system": name, "method": "-", "TTFT sum (s)": float("nan"), "decode (s)": float("nan"),
                             "wall (s)": float("nan"), "note": f"skipped: {res['skipped']}"})
                continue
            ttft = sum(a["ttft_s"] for a in res["agents"])
            dec = sum(a["ms_per_token"] / 1000 * max(0, n - 1) for a, n in zip(res["agents"], new, strict=False))
            rows.append({"system": res["label"], "method": "full (its own)", "TTFT sum (s)": ttft, "decode (s)": dec,
                         "wall (s)": ttft + dec})
    return {"key": "q2_wall", "title": "Q2e. The whole chain (the longest, 5 agents in the presets): what a user waits",
            "rows": rows, "columns": ["system", "method", "TTFT sum (s)", "decode (s)", "wall (s)"],
            "note": "prefill + decode. relay-llm: agent 1's TTFT + each method's TTFT for agents 2-5 + the "
                    "decode time of the reference run (decode does not depend on the prefill method). Peers: "
                    "measured TTFT on the same prompt ids, decode at their measured ms/token for the same number of "
                    "new tokens per agent. Peers suffer most from other load on the cores (llama.cpp's threads "
                    "spin-wait): compare them on an idle machine."}


def _vacuous(shipped: dict) -> str:
    """Which ablations change nothing under the shipped profile (`shipped`: band and selector of the run)."""
    notes = []
    band, sel = shipped.get("band"), shipped.get("selector") or {}
    if band and band[0] == 0 and band[2] == shipped.get("layers", band[2]):
        notes.append(f"the shipped band already spans every layer (start {band[0]}, det {band[1]}, end {band[2]}), "
                     "so 'w/o layer band' runs relay's schedule")
    if sel.get("suffix") == 0:
        notes.append("the shipped profile has suffix 0, so 'w/o suffix rule' runs relay's schedule")
    if sel.get("detect") is False:
        notes.append("the shipped profile skips detection, so the deviation and influence rules select nothing")
    return (" Under this run's profile " + "; ".join(notes) + ".") if notes else ""


def q3(fam: dict[str, list[dict]], shipped: dict | None = None) -> dict:
    vacuous = _vacuous(shipped or {})
    by = _sweep_rows(fam)
    rows = []
    for m in [*METHODS, *ABLATIONS]:
        if m in by:
            rows.append({"method": m, "probes": len(by[m]), "speed-up": _speedup(by[m], by["full"]),
                         **_fidelity(by[m])})
    return {"key": "q3", "title": "Q3. Ablation: relay without one of its parts", "rows": rows,
            "columns": ["method", "probes", "speed-up", "reuse", "mean KL", "max KL", "top-1", "identical"],
            "note": "on the sweep items' prompts (fact relay: agent 2; chain of notes: the last agent)." + vacuous}


def q4(fam: dict[str, list[dict]], sweeps: dict) -> dict:
    by = _sweep_rows(fam)
    rows = []
    for m in METHODS:
        if m in by:
            rows.append({"knob": "method", "value": m, "method": m, "speed-up": _speedup(by[m], by["full"]),
                         **_fidelity(by[m])})
    for knob, values in sweeps.items():
        for v in values:
            label = f"{knob}={v}"
            if label in by:
                rows.append({"knob": knob, "value": v, "method": "relay", "speed-up": _speedup(by[label], by["full"]),
                             **_fidelity(by[label])})
    return {"key": "q4", "title": "Q4. Sensitivity of relay to its knobs", "rows": rows,
            "columns": ["knob", "value", "method", "speed-up", "reuse", "mean KL", "top-1", "identical"],
            "note": "each point: relay with one knob changed from the shipped profile (band width: end_layer; "
                    "detection layer: det_layer), on the sweep items' prompts; the method rows are the reference."}


def supported_defaults(q4_table: dict) -> list[str]:
    """Per knob: the value with the best speed-up among points at least as faithful as the shipped relay."""
    ref = next((r for r in q4_table["rows"] if r["knob"] == "method" and r["method"] == "relay"), None)
    if ref is None:
        return []
    lines = []
    knobs = sorted({r["knob"] for r in q4_table["rows"] if r["knob"] != "method"})
    for knob in knobs:
        pts = [r for r in q4_table["rows"] if r["knob"] == knob]
        ok = [r for r in pts if r["mean KL"] <= ref["mean KL"] * 1.05 and r["top-1"] >= ref["top-1"]]
        if not ok:
            lines.append(f"{knob}: no point was as faithful as the shipped relay (mean KL {ref['mean KL']:.4f}).")
            continue
        best = max(ok, key=lambda r: r["speed-up"])
        lines.append(f"{knob}: {best['value']} (speed-up {best['speed-up']:.2f}x at mean KL {best['mean KL']:.4f}; "
                     f"shipped relay {ref['speed-up']:.2f}x at {ref['mean KL']:.4f}).")
    return lines


def targets(tables: dict[str, dict]) -> dict:
    rows = []
    q1_rows = tables["q1"]["rows"]
    for title in FAMILIES.values():
        full = next((r for r in q1_rows if r["task"] == title and r["method"] == "full"), None)
        relay = next((r for r in q1_rows if r["task"] == title and r["method"] == "relay"), None)
        if full and relay:
            gap = 100 * (full["accuracy"] - relay["accuracy"])
            rows.append({"target": f"relay accuracy within 1 point of full: {title}", "paper": "negligible loss",
                         "method": "relay",
                         "ours": f"{100 * relay['accuracy']:.1f} % vs {100 * full['accuracy']:.1f} %",
                         "met": gap <= TARGETS["accuracy_points"], "gap": f"{gap:+.1f} points"})
    a5 = next((r for r in tables["q2_agents"]["rows"]
               if r["agent"] == 5 and r["method"] == "relay" and r["dtype"] == "float32"), None)
    if a5:
        rows.append({"target": "agent-5 TTFT speed-up vs full", "paper": "4.7x", "method": "relay",
                     "ours": f"{a5['speed-up']:.2f}x", "met": a5["speed-up"] >= TARGETS["agent5"],
                     "gap": f"{a5['speed-up'] / TARGETS['agent5']:.0%} of the target"})
    ctx = [r for r in tables["q2_context"]["rows"] if r["method"] == "relay" and r["dtype"] == "float32"]
    if ctx:
        top = max(ctx, key=lambda r: r["context"])
        rows.append({"target": f"long-context avg per-agent speed-up (at {top['context']} tokens)", "paper": "9.2x",
                     "method": "relay", "ours": f"{top['avg speed-up']:.2f}x",
                     "met": top["avg speed-up"] >= TARGETS["longctx"],
                     "gap": f"{top['avg speed-up'] / TARGETS['longctx']:.0%} of the target"})
    reuse = next((r for r in tables["q2_reuse"]["rows"] if r["method"] == "relay"), None)
    if reuse:
        rows.append({"target": "KV reuse rate", "paper": "> 80 %", "method": "relay",
                     "ours": f"{reuse['mean reuse']:.1%}",
                     "met": reuse["mean reuse"] > TARGETS["reuse"],
                     "gap": f"{100 * (reuse['mean reuse'] - TARGETS['reuse']):+.1f} points"})
    return {"key": "targets", "title": "Targets", "rows": rows,
            "columns": ["target", "paper", "method", "ours", "met", "gap"], "note": "relay vs the paper's claims."}


def _shipped(run: dict) -> dict:
    """The relay band, selector and layer count the run used: from its engine record, else the packaged profile."""
    if run.get("selector") and run.get("layers"):
        return {"band": run["band"], "selector": run["selector"], "layers": run["layers"] - 1}
    import json
    from pathlib import Path

    import relay_llm

    files = sorted((Path(relay_llm.__file__).parent / "data" / "profiles").glob("*.json"))
    if not files:
        return {}
    prof = json.loads(files[0].read_text())
    return {"band": [prof["start_layer"], prof["det_layer"], prof["end_layer"]], "selector": prof.get("selector", {}),
            "layers": prof["num_layers"] - 1}


def build(records, sweeps: dict) -> dict[str, dict]:
    shipped = _shipped(records.load("run", "engine") or {})
    fam = {f: records.all(f) for f in FAMILIES}
    ctx = records.all("context")
    peers = records.load("peers", "chain")
    bf = records.__class__(records.root / "bf16", {**records.signature, "dtype": "bfloat16"})
    tables = {"q1": q1(fam), "q2_agents": q2_agents(fam, bf.all("notes")), "q2_reuse": q2_reuse(fam),
              "q2_context": q2_context(ctx, bf.all("context")),
              "q2_floor": q2_floor(fam, ctx), "q2_wall": q2_wall(fam, peers), "q3": q3(fam, shipped),
              "q4": q4(fam, sweeps)}
    tables["targets"] = targets(tables)
    return tables


def cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (tuple, list)):
        return f"{100 * value[0]:.0f}-{100 * value[1]:.0f} %"
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.4f}" if abs(value) < 0.1 else f"{value:.2f}"
    return str(value)


def markdown(table: dict) -> str:
    cols = table["columns"]
    lines = [f"### {table['title']}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table["rows"]:
        cells = []
        for c in cols:
            v = row.get(c, "")
            if c in PERCENT and isinstance(v, float):
                v = "-" if v != v else f"{100 * v:.1f} %"
            elif c == "speed-up" or c == "avg speed-up":
                v = "-" if v != v else f"{v:.2f}x"
            cells.append(cell(v))
        lines.append("| " + " | ".join(cells) + " |")
    if any("note" in r for r in table["rows"]):
        lines += [""] + [f"* {r['system']}: {r['note']}" for r in table["rows"] if "note" in r]
    lines += ["", table["note"], ""]
    return "\n".join(lines)
