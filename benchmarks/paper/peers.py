"""Peers on the same prompt ids (Q2): HF transformers `generate` and llama.cpp, each alone in a fresh process.

`run_peers` writes the prompts to a JSON file and runs this module once per peer (models resident beside
each other slow each other down, see `benchmarks/decode.py`); each child times a cold prefill (TTFT) and
greedy decode per prompt with `benchmarks/decode.py`'s peer classes. A peer that cannot load (llama-cpp-python
not installed) is reported as skipped, with the reason.

    python -m benchmarks.paper.peers PEER IN.json   (prints one JSON line)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

PEERS = ("HF generate", "llama.cpp")
REPO = Path(__file__).resolve().parents[2]


def run_peers(prompts: list[list[int]], tokens: int, eos_ids: list[int], model_dir: str) -> dict[str, dict]:
    """{peer: {"label", "agents": [{"prompt", "ttft_s", "ms_per_token", "new"}]} or {"skipped": reason}}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompts": prompts, "tokens": tokens, "eos_ids": eos_ids, "model_dir": model_dir}, f)
    out = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    try:
        for peer in PEERS:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.paper.peers", peer, f.name], capture_output=True,
                                  text=True, env=env, cwd=REPO)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                out[peer] = {"skipped": err[:300]}
            else:
                out[peer] = json.loads(lines[-1])
    finally:
        os.unlink(f.name)
    return out


def _child(peer: str, path: str) -> dict:
    from benchmarks.decode import HFGenerate, LlamaCpp

    spec = json.loads(Path(path).read_text())
    # The peer classes read only the model folder and the EOS ids from the engine: no engine is loaded here.
    stand_in = SimpleNamespace(model_name=spec["model_dir"], eos_ids=set(spec["eos_ids"]))
    system = LlamaCpp(stand_in) if peer == "llama.cpp" else HFGenerate(stand_in)
    system.decode(spec["prompts"][0][:32], 2)  # warm-up
    agents = []
    for ids in spec["prompts"]:
        ttft, ms, new = system.decode(ids, spec["tokens"])
        agents.append({"prompt": len(ids), "ttft_s": ttft, "ms_per_token": ms, "new": new})
    return {"label": system.label, "agents": agents}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2])))
