"""The pass@1 executor: run a program (a solution and its tests) in a fresh Python subprocess with a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def run_program(source: str, timeout_s: float = 5.0) -> dict:
    """Run `source` in `python -I` in an empty temporary folder. Returns {"status": "passed" | "failed" |
    "timeout", "detail": last stderr line}; "passed" means exit status 0 within `timeout_s`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(source)
        try:
            proc = subprocess.run([sys.executable, "-I", path], cwd=tmp, capture_output=True, text=True,
                                  timeout=timeout_s, stdin=subprocess.DEVNULL,
                                  env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "detail": f"no exit within {timeout_s} s"}
    lines = proc.stderr.strip().splitlines()
    return {"status": "passed" if proc.returncode == 0 else "failed", "detail": lines[-1][:200] if lines else ""}


def passes(source: str, timeout_s: float = 5.0) -> bool:
    return run_program(source, timeout_s)["status"] == "passed"
