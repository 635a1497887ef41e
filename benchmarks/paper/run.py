"""The paper reproduction run: every task item, every method, resumable, then the results page.

    relay-llm bench paper --preset quick|full [--out docs/results]
    PYTHONPATH=. python -m benchmarks.paper --preset quick

Per item (one JSON record under OUT/raw/<family>/), the upstream agents run once with `full` prefill
(greedy; repetition penalty 1.1 for prose, as `benchmarks/chain.py`), so the store holds their decode-phase
K/V as the engine kept it (prompts are not stored: only generated outputs are relayed); then every method
of `methods.METHODS` (and on the first `sweep_items` items the Q3 / Q4 relay variants) runs each downstream
prompt (`methods.measure`). An interrupted run reuses every record whose preset signature matches.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from . import coding, facts, longctx, notes
from .execute import passes
from .methods import ABLATIONS, METHODS, Probe, common_prefix, measure
from .presets import PRESETS, Preset
from .records import Progress, Records
from .scoring import exact_match

PROSE_PENALTY = 1.1
WEIGHTS = {"facts": 1.0, "code": 2.5, "notes": 3.0, "context": 4.0, "peers": 3.0, "bf16": 4.0}  # nominal relative cost


def variants(engine, preset: Preset) -> dict[str, tuple[str, dict]]:
    """Q3 ablations and Q4 sweep points as relay methods (label -> ("relay", settings))."""
    start, det, end = engine.profile.band
    out = {label: ("relay", settings) for label, settings in ABLATIONS.items()}
    for knob, values in preset.sweep_values().items():
        for v in values:
            if knob == "end_layer":
                settings = {"start_layer": start, "det_layer": min(det, v), "end_layer": v}
            elif knob == "det_layer":
                settings = {"start_layer": start, "det_layer": v, "end_layer": end}
            else:
                settings = {knob: v}
            out[f"{knob}={v}"] = ("relay", settings)
    return out


def _fresh(engine) -> None:
    engine.store.clear()
    engine.prefix_cache.clear()


def _upstream(engine, ids: list[int], tokens: int, **opts):
    engine.prefix_cache.clear()
    return engine.complete(ids, max_new_tokens=tokens, schedule="full", **opts)


def fact_item(engine, item: dict, preset: Preset, methods: dict) -> dict:
    _fresh(engine)
    ids1 = engine.render(facts.agent1_messages(item))
    r1 = _upstream(engine, ids1, preset.report_tokens, repetition_penalty=PROSE_PENALTY)
    record = facts.pick_question(item, r1.text)
    lead = f"The parcel code of courier {record['courier']} is"
    ids2 = engine.render(facts.agent2_messages(r1.text, record)) + engine.encode(lead, special_tokens=False)
    probe = Probe("answer", ids2, gen=12, stop=["\n"], shared_prefix=common_prefix(ids2, ids1 + r1.token_ids))
    rows = measure(engine, probe, methods, preset.steps)
    for row in rows.values():
        row["correct"] = exact_match(row["text"], record["code"])
    return {"id": item["id"], "family": "facts", "report": r1.text, "question": record,
            "agent1_ttft_s": r1.stats.ttft_s,
            "probes": {"answer": rows}}


def code_item(engine, item: dict, preset: Preset, methods: dict) -> dict:
    _fresh(engine)
    msgs, start = coding.agent1(item)
    ids1 = engine.render(msgs) + engine.encode(start, special_tokens=False)
    r1 = _upstream(engine, ids1, preset.code_tokens, stop=coding.STOP)
    body1 = coding.cut(r1.text)
    msgs, start = coding.agent2(item, body1)
    ids2 = engine.render(msgs) + engine.encode(start, special_tokens=False)
    probe = Probe("rewrite", ids2, gen=preset.code_tokens, stop=coding.STOP,
                  shared_prefix=common_prefix(ids2, ids1 + r1.token_ids))
    rows = measure(engine, probe, methods, preset.steps)
    for row in rows.values():
        row["correct"] = passes(coding.program(item, coding.cut(row["text"])))
    return {"id": item["id"], "family": "code", "agent1_body": body1,
            "agent1_pass": passes(coding.program(item, body1)), "probes": {"rewrite": rows}}


def notes_item(engine, item: dict, preset: Preset, methods: dict) -> dict:
    _fresh(engine)
    written: list[str] = []
    seqs: list[list[int]] = []
    probes: list[Probe] = []
    agents = []
    for k in range(item["agents"]):
        ids = engine.render(notes.agent_messages(item, k, written))
        if k:
            shared = max(common_prefix(ids, s) for s in seqs)
            probes.append(Probe(f"agent{k + 1}", ids, shared_prefix=shared, meta={"agent": k + 1}))
        r = _upstream(engine, ids, preset.note_tokens, repetition_penalty=PROSE_PENALTY)
        agents.append({"agent": k + 1, "prompt": len(ids), "ids": ids, "ttft_s": r.stats.ttft_s,
                       "decode_s": r.stats.decode_s, "new": r.stats.completion_tokens})
        written.append(r.text)
        seqs.append(ids + r.token_ids)
    ids_q = engine.render(notes.question_messages(item, written)) + engine.encode(notes.ANSWER_PREFIX,
                                                                                   special_tokens=False)
    shared = max(common_prefix(ids_q, s) for s in seqs)
    probes.append(Probe("question", ids_q, gen=10, stop=["\n"], shared_prefix=shared))
    out = {}
    last = probes[-2].key  # the last agent's prompt, which pastes the most: the only one running the variants
    for p in probes:
        repeats = preset.repeats if p.key != "question" else 1  # repeated timings where TTFT is the question (Q2)
        out[p.key] = measure(engine, p, methods if p.key == last else METHODS, preset.steps, repeats)
        if p.key == "question":
            for row in out[p.key].values():
                row["correct"] = exact_match(row["text"], item["ticket"])
    return {"id": item["id"], "family": "notes", "agents": agents, "notes": written,
            "ticket_in_notes": any(item["ticket"] in t for t in written), "probes": out}


def context_point(engine, context: int, preset: Preset) -> dict:
    _fresh(engine)
    out = {}
    for p in longctx.probes(engine, context):
        out[p.key.split("-")[-1]] = {**measure(engine, p, METHODS, preset.steps, preset.repeats)}
    return {"context": context, "prompt_tokens": {k: v["full"]["prompt_tokens"] for k, v in out.items()},
            "probes": out}


def bf16_pass(preset: Preset, records: Records, chains: list[dict], progress: Progress, log) -> None:
    """Q2 in bf16: `chains` (chain-of-notes items) and `preset.bf16_contexts`, whole, on a bf16 engine; records in
    OUT/raw/<preset>/bf16/ ("notes", "context")."""
    from relay_llm import EngineConfig, RelayEngine

    bf = Records(records.root / "bf16", {**records.signature, "dtype": "bfloat16"})
    units = [("notes", it["id"], lambda e, it=it: notes_item(e, it, preset, METHODS)) for it in chains]
    units += [("context", f"ctx{c:05d}", lambda e, c=c: context_point(e, c, preset)) for c in preset.bf16_contexts]
    engine = None
    for section, key, fn in units:
        if bf.load(section, key) is not None:
            progress.step("bf16", f"bf16 {key}", None, resumed=True)
            continue
        if engine is None:
            print("# loading the default model (bf16)", file=log, flush=True)
            t = time.perf_counter()
            engine = RelayEngine.load("default", dtype="bfloat16", config=EngineConfig(store_prompt=False))
            engine.complete(engine.render([{"role": "user", "content": "Hello there."}]), max_new_tokens=2)  # warm-up
            bf.save("run", "engine", {"info": engine.info(), "load_s": time.perf_counter() - t, "git": git_state()})
        t = time.perf_counter()
        bf.save(section, key, {**fn(engine), "elapsed_s": time.perf_counter() - t})
        progress.step("bf16", f"bf16 {key}", time.perf_counter() - t)
    if engine is not None:
        engine.close()


def git_state() -> dict:
    """The commit measured and the tracked files changed on top of it (the run measures the working tree)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "changed": [line[3:] for line in status if line]}


def profiles_signature() -> str:
    """A hash of the shipped relay profiles: records measured under another profile are stale, not resumed."""
    import hashlib

    import relay_llm

    folder = Path(relay_llm.__file__).parent / "data" / "profiles"
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.json")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def run(preset: Preset, out: Path, log=sys.stderr) -> dict:
    """Measure everything `preset` asks for into OUT/raw, then write the page (`page.write`)."""
    from relay_llm import EngineConfig, RelayEngine
    from relay_llm.loading import default_model_dir

    from . import page

    t0 = time.perf_counter()
    out = Path(out)
    records = Records(out / "raw" / preset.name, {"preset": preset.signature(), "profiles": profiles_signature(),
                                                  "dtype": "float32"})
    loaded: dict = {}

    def engine():
        """The fp32 engine, loaded at the first unit that is not resumed from its record."""
        if "engine" not in loaded:
            t = time.perf_counter()
            print("# loading the default model (fp32)", file=log, flush=True)
            e = loaded["engine"] = RelayEngine.load("default", dtype="float32", config=EngineConfig(store_prompt=False))
            e.complete(e.render([{"role": "user", "content": "Hello there."}]), max_new_tokens=2)  # warm-up
            loaded["load_s"] = time.perf_counter() - t
            records.save("run", "engine", {"info": e.info(), "load_s": loaded["load_s"], "eos": sorted(e.eos_ids),
                                            "band": list(e.profile.band), "selector": asdict(e.selector),
                                            "layers": e.executor.num_layers,
                                            "git": git_state()})
        return loaded["engine"]

    jobs = [("facts", it, fact_item) for it in facts.make_items(preset.facts, records=preset.records)]
    jobs += [("code", it, code_item) for it in coding.make_items(preset.code)]
    jobs += [("notes", it, notes_item) for it in notes.make_items(preset.notes, lengths=preset.chain_lengths)]
    plan = {k: sum(1 for j in jobs if j[0] == k) for k in ("facts", "code", "notes")}
    bf16_chains = [it for it in notes.make_items(preset.notes, lengths=preset.chain_lengths)
                   if it["agents"] == 5][: preset.bf16_chains]
    plan |= {"context": len(preset.contexts), "peers": int(preset.peers),
             "bf16": len(bf16_chains) + len(preset.bf16_contexts)}
    progress = Progress(plan, WEIGHTS, log)
    seen: dict[str, int] = {}
    for family, item, fn in jobs:
        index = seen[family] = seen.get(family, -1) + 1
        if records.load(family, item["id"]) is not None:
            progress.step(family, item["id"], None, resumed=True)
            continue
        e = engine()
        t = time.perf_counter()
        methods = {**METHODS, **variants(e, preset)} if family != "code" and index < preset.sweep_items else METHODS
        data = fn(e, item, preset, methods)
        records.save(family, item["id"], {**data, "elapsed_s": time.perf_counter() - t})
        progress.step(family, item["id"], time.perf_counter() - t)
    for context in preset.contexts:
        key = f"ctx{context:05d}"
        if records.load("context", key) is not None:
            progress.step("context", key, None, resumed=True)
            continue
        e = engine()
        t = time.perf_counter()
        data = context_point(e, context, preset)
        records.save("context", key, {**data, "elapsed_s": time.perf_counter() - t})
        progress.step("context", key, time.perf_counter() - t)
    if "engine" in loaded:
        loaded["engine"].close()  # the bf16 engine and the peers run alone: nothing of ours stays resident
    bf16_pass(preset, records, bf16_chains, progress, log)
    chain = next((r for r in records.all("notes") if len(r["agents"]) == 5), None)
    if preset.peers and records.load("peers", "chain") is None and chain is not None:
        from .peers import run_peers

        t = time.perf_counter()
        eos = records.load("run", "engine")["eos"]
        peers = run_peers([a["ids"] for a in chain["agents"]], preset.peer_tokens, eos, str(default_model_dir()))
        records.save("peers", "chain", {"chain": chain["id"], "tokens": preset.peer_tokens, "peers": peers,
                                        "elapsed_s": time.perf_counter() - t})
        progress.step("peers", "peers", time.perf_counter() - t)
    elif preset.peers:
        progress.step("peers", "peers", None, resumed=True)
    info = records.load("run", "engine") or {}
    run_info = {"wall_s": time.perf_counter() - t0, "load_s": info.get("load_s", 0.0), "engine": info.get("info", {}),
                "git": info.get("git", git_state()),
                "resumed": "engine" not in loaded}
    bf = Records(records.root / "bf16", {**records.signature, "dtype": "bfloat16"})
    sections = ("facts", "code", "notes", "context", "peers")
    spent = [r.get("elapsed_s", 0.0) for sec in sections for r in records.all(sec)]
    spent += [r.get("elapsed_s", 0.0) for sec in ("notes", "context") for r in bf.all(sec)]
    run_info["measured_s"] = run_info["load_s"] + (bf.load("run", "engine") or {}).get("load_s", 0.0) + sum(spent)
    run_info["bf16_git"] = (bf.load("run", "engine") or {}).get("git")
    return page.write(out, records, preset, run_info)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="relay-llm bench paper", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--out", default="docs/results", help="results folder (default: docs/results)")
    args = ap.parse_args(argv)
    run(PRESETS[args.preset], Path(args.out))
    print(f"results page: {Path(args.out) / 'README.md'}")
    return 0
