"""Cost of grammar-constrained decoding (relay_llm.structured, xgrammar) on the default model.

Reports
* the one-off cost of reading the tokenizer's vocabulary into xgrammar (once per engine);
* grammar compile time for the test schemas and the tool-call grammars (a fresh cache per compile),
  and the time of a cache hit;
* the per-token cost of the mask, measured inside the decode loop: filling the next-token bitmask,
  applying it to the [vocab] logits, and accepting the sampled token (means over every decode step);
* decode tokens/s with and without a grammar: the same prompt, greedy, unconstrained runs capped at the
  constrained run's length; repeats interleaved, medians reported. On a shared machine these swing with
  the load; the per-token mask times above are the direct measure.

`--validity` measures what comes back instead, on schemas with free strings (no maxLength / maxItems):
20 seeds x 3 schemas (nested object, array of strings, enums + a free string) sampled at temperature
0.7 with `--max-new-tokens` 96: the rate of valid JSON (parses and validates against the schema); and
20 prompts with `tool_choice="required"`: the rate of replies with a call, and of complete calls (finish
"tool_calls", arguments valid against the tool's parameters). The requests of each group run at once
(the engine batches them).

Usage (from the repository root):

    PYTHONPATH=. RELAY_LLM_CACHE=/tmp/relaycache python benchmarks/structured.py [--repeats 2] [--json out.json]
    PYTHONPATH=. python benchmarks/structured.py --validity --max-new-tokens 96 [--no-budget-ending]
        [--no-string-guard] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from relay_llm import RelayEngine, structured

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "country": {"type": "string", "maxLength": 20}},
                "required": ["city", "country"]}},
    "required": ["name", "age", "address"]}
REVIEW = {"type": "object", "properties": {
    "verdict": {"enum": ["approve", "request_changes", "reject"]},
    "severity": {"type": "string", "enum": ["low", "medium", "high"]}}, "required": ["verdict", "severity"]}
COLOURS = {"type": "object", "properties": {
    "colours": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}},
    "required": ["colours"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                      "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                                                     "required": ["timezone"]}}},
]
GRAMMARS = {
    "json_schema nested (PERSON)": structured.plan_request({"type": "json_schema", "schema": PERSON}),
    "json_schema enums (REVIEW)": structured.plan_request({"type": "json_schema", "schema": REVIEW}),
    "json_schema arrays (COLOURS)": structured.plan_request({"type": "json_schema", "schema": COLOURS}),
    "json_object": structured.plan_request({"type": "json_object"}),
    "tools required (2 tools)": structured.plan_request(tools=TOOLS, tool_choice="required"),
    "tools named (get_time)": structured.plan_request(tools=TOOLS, tool_choice="get_time"),
    "tools auto (2 tools)": structured.plan_request(tools=TOOLS, tool_choice="auto"),
    "tools required, parallel": structured.plan_request(tools=TOOLS, tool_choice="required", parallel_tool_calls=True),
}
RUNS = {  # name -> (messages, structured kwargs)
    "json_schema PERSON": ([{"role": "user",
                             "content": "Alice is 30 and lives in Paris, France. Her details as JSON."}],
                           {"response_format": {"type": "json_schema", "schema": PERSON}}),
    "tools required": ([{"role": "user", "content": "What is the weather in Paris?"}],
                       {"tools": TOOLS, "tool_choice": "required"}),
    "tools auto (free text)": ([{"role": "user", "content": "What is the weather in Paris?"}],
                               {"tools": TOOLS, "tool_choice": "auto"}),
}


FREE_SCHEMAS = {  # strings the model must end by itself
    "nested object": ({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "country": {"type": "string"}},
                    "required": ["street", "city", "country"]}},
        "required": ["name", "age", "address"]}, "Make up a customer of a bookshop and give their details."),
    "array of strings": ({"type": "object", "properties": {"serial_numbers": {"type": "array",
                                                                              "items": {"type": "string"}}},
                          "required": ["serial_numbers"]}, "List the serial numbers of the devices in the lab."),
    "enums": ({"type": "object", "properties": {
        "verdict": {"enum": ["approve", "request_changes", "reject"]},
        "severity": {"type": "string", "enum": ["low", "medium", "high"]}, "reason": {"type": "string"}},
        "required": ["verdict", "severity", "reason"]}, "Review this change: it renames a variable in a parser."),
}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Perth", "Seoul", "Rome"]
ZONES = ["Europe/Berlin", "Asia/Tokyo", "America/New_York", "Africa/Lagos", "Australia/Sydney",
         "Europe/Madrid", "Asia/Kolkata", "America/Chicago", "Pacific/Auckland", "Europe/London"]


def validity(engine: RelayEngine, seeds: int, max_new_tokens: int, temperature: float, **endings) -> dict:
    """Valid-JSON rates per schema, and call / complete-call rates under tool_choice="required".

    endings: budget_ending / string_guard (relay_llm.closing) for every request. Also times the grammar's
    work per token (mask, accept, and the closing policy)."""
    import jsonschema

    from relay_llm.closing import Closer

    out: dict = {"settings": {"seeds": seeds, "max_new_tokens": max_new_tokens, "temperature": temperature,
                              **endings}}
    timer, choose = MaskTimer(), Closer.choose
    closer_s: list[float] = []

    def timed_choose(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return choose(self, *a, **k)
        finally:
            closer_s.append(time.perf_counter() - t0)

    Closer.choose = timed_choose
    for name, (schema, ask) in FREE_SCHEMAS.items():
        msgs = [{"role": "user", "content": ask}]
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        streams = [engine.stream(msgs, max_new_tokens=max_new_tokens, temperature=temperature, seed=s,
                                 response_format=fmt, **endings) for s in range(seeds)]
        rows = []
        for st in streams:
            res = engine._collect(st)
            try:
                jsonschema.validate(json.loads(res.text), schema)
                ok = True
            except (ValueError, jsonschema.ValidationError):
                ok = False
            rows.append({"valid": ok, "finish": res.finish_reason, "tokens": res.stats.completion_tokens,
                         "budget_ending": res.stats.budget_ending, "guarded_strings": res.stats.guarded_strings,
                         "text": res.text})
        out[name] = {"valid_rate": sum(r["valid"] for r in rows) / len(rows),
                     "mean_tokens": statistics.mean(r["tokens"] for r in rows),
                     "budget_endings": sum(r["budget_ending"] for r in rows),
                     "guarded_strings": sum(r["guarded_strings"] for r in rows), "rows": rows}
        print(f"# {name}: {out[name]['valid_rate']:.0%} valid", flush=True)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    asks = [f"What is the weather in {c}?" for c in CITIES] + [f"What time is it in {z}?" for z in ZONES]
    streams = [engine.stream([{"role": "user", "content": a}], max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=i, tools=TOOLS, tool_choice="required", **endings)
               for i, a in enumerate(asks[:seeds])]
    rows = []
    for st in streams:
        res = engine._collect(st)
        complete = False
        if res.tool_calls and res.finish_reason == "tool_calls":
            fn = res.tool_calls[0]["function"]
            try:
                jsonschema.validate(json.loads(fn["arguments"]), params[fn["name"]])
                complete = True
            except (ValueError, jsonschema.ValidationError):
                pass
        rows.append({"call": bool(res.tool_calls), "complete": complete, "finish": res.finish_reason,
                     "tokens": res.stats.completion_tokens, "budget_ending": res.stats.budget_ending,
                     "text": res.text, "tool_calls": res.tool_calls})
    out["tools required"] = {"call_rate": sum(r["call"] for r in rows) / len(rows),
                             "complete_rate": sum(r["complete"] for r in rows) / len(rows),
                             "budget_endings": sum(r["budget_ending"] for r in rows), "rows": rows}
    print(f"# tools required: {out['tools required']['call_rate']:.0%} calls, "
          f"{out['tools required']['complete_rate']:.0%} complete", flush=True)
    Closer.choose = choose
    masks = timer.summary()
    timer.close()
    steps = max(1, masks["steps"])
    out["grammar_ms_per_token"] = {**masks, "closer_ms": 1000 * sum(closer_s) / steps,
                                   "total_ms": masks["total_ms"] + 1000 * sum(closer_s) / steps}
    engine.store.clear()
    engine.prefix_cache.clear()
    plain = engine.chat([{"role": "user", "content": FREE_SCHEMAS["nested object"][1]}], max_new_tokens=48,
                        schedule="full")  # one sequence alone, no grammar: the decode step to compare with
    out["decode_ms_per_token_alone"] = 1000 * plain.stats.decode_s / max(1, plain.stats.completion_tokens - 1)
    print(f"# grammar {out['grammar_ms_per_token']['total_ms']:.2f} ms/token "
          f"(closer {out['grammar_ms_per_token']['closer_ms']:.2f}); decode alone "
          f"{out['decode_ms_per_token_alone']:.1f} ms/token", flush=True)
    return out


class MaskTimer:
    """Wraps Constraint.mask / accept and times them, split into fill / apply / accept (seconds, per step)."""

    def __init__(self):
        self.fill, self.apply, self.accept = [], [], []
        self._orig = structured.Constraint.mask, structured.Constraint.accept
        timer = self

        def mask(c, logits):
            t0 = time.perf_counter()
            c._matcher.fill_next_token_bitmask(c._bitmask)
            t1 = time.perf_counter()
            c._xgr.apply_token_bitmask_inplace(logits.view(1, -1), c._bitmask, vocab_size=c.vocab_size)
            t2 = time.perf_counter()
            timer.fill.append(t1 - t0)
            timer.apply.append(t2 - t1)

        def accept(c, token):
            t0 = time.perf_counter()
            ok = c._matcher.accept_token(token)
            timer.accept.append(time.perf_counter() - t0)
            return ok

        structured.Constraint.mask, structured.Constraint.accept = mask, accept

    def reset(self) -> None:
        self.fill, self.apply, self.accept = [], [], []

    def summary(self) -> dict:
        ms = lambda xs: 1000 * statistics.mean(xs) if xs else 0.0  # noqa: E731
        return {"steps": len(self.fill), "fill_ms": ms(self.fill), "apply_ms": ms(self.apply),
                "accept_ms": ms(self.accept), "total_ms": ms(self.fill) + ms(self.apply) + ms(self.accept)}

    def close(self) -> None:
        structured.Constraint.mask, structured.Constraint.accept = self._orig


def decode_tps(stats) -> float:
    """Decode tokens per second: tokens after the first over the time after the first."""
    return (stats.completion_tokens - 1) / stats.decode_s if stats.decode_s > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--validity", action="store_true", help="measure valid-JSON and complete-call rates instead")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--no-budget-ending", action="store_true", help="--validity without the budget-aware ending")
    ap.add_argument("--no-string-guard", action="store_true", help="--validity without the string-loop guard")
    args = ap.parse_args()
    engine = RelayEngine.load("default", dtype=args.dtype)
    out: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                             "platform": platform.platform(), "load_avg_start": os.getloadavg()},
                 "dtype": args.dtype, "vocab": engine.executor.config.vocab_size}
    if args.validity:
        out["validity"] = validity(engine, args.seeds, args.max_new_tokens, args.temperature,
                                   budget_ending=not args.no_budget_ending, string_guard=not args.no_string_guard)
        engine.close()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return

    cache = structured.grammar_cache(engine)
    t0 = time.perf_counter()
    _ = cache.compiler
    out["tokenizer_info_s"] = time.perf_counter() - t0
    compile_s = {}
    for name, plan in GRAMMARS.items():
        fresh = structured.GrammarCache(engine.tokenizer, cache.vocab_size, set(engine.eos_ids))
        fresh._compiler = cache.compiler  # share the vocabulary; the grammar cache itself is empty
        t0 = time.perf_counter()
        fresh.get(plan.grammar_spec())
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fresh.get(plan.grammar_spec())
        compile_s[name] = {"compile_s": first, "cache_hit_s": time.perf_counter() - t0}
    out["compile"] = compile_s

    timer = MaskTimer()
    runs: dict = {name: {"constrained_tps": [], "free_tps": [], "tokens": [], "mask": []} for name in RUNS}
    try:
        for _ in range(args.repeats):
            for name, (msgs, kwargs) in RUNS.items():
                engine.store.clear()
                engine.prefix_cache.clear()
                timer.reset()
                res = engine.chat(msgs, max_new_tokens=args.max_new_tokens, **kwargs)
                runs[name]["mask"].append(timer.summary())
                runs[name]["constrained_tps"].append(decode_tps(res.stats))
                runs[name]["tokens"].append(res.stats.completion_tokens)
                engine.store.clear()
                engine.prefix_cache.clear()
                free_kwargs = {k: v for k, v in kwargs.items() if k == "tools"}  # same prompt, no grammar
                if free_kwargs:
                    free_kwargs["tool_choice"] = "none"
                    msgs = [{"role": "system", "content": structured.tools_preamble(
                        structured.plan_request(tools=TOOLS, tool_choice=kwargs["tool_choice"]))}] + msgs
                free = engine.chat(msgs, max_new_tokens=max(2, res.stats.completion_tokens), **free_kwargs)
                runs[name]["free_tps"].append(decode_tps(free.stats))
    finally:
        timer.close()
        engine.close()
    for r in runs.values():
        masks = r.pop("mask")
        r["mask_ms_per_token"] = {k: statistics.median(m[k] for m in masks) for k in masks[0]}
        r["median_constrained_tps"] = statistics.median(r["constrained_tps"])
        r["median_free_tps"] = statistics.median(r["free_tps"])
    out["runs"] = runs
    out["machine"]["load_avg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
