"""relay-llm's own CPU kernels (`csrc/`), compiled once per machine and loaded as torch ops.

`ops()` builds the extension on first use with torch's C++ extension builder (ninja, g++, AVX2 + FMA
flags) into `cache_dir()/kernels/<tag>`, where the tag hashes the sources, torch's version and this CPU's
flags; later processes load the built library in milliseconds. Where the CPU lacks AVX2 or FMA, or the
build fails, `ops()` returns None and `unavailable()` says why: callers keep torch's own kernels.

    torch.ops.relay_llm.gemv_f32(x [B, K] f32, w [N, K] f32, bias [N] | None) -> [B, N] f32
    torch.ops.relay_llm.gemv_grid(x [B, K] f32, q [N, K] int8, scale [N, K/G] f32, offset | None, bias | None)
    ... rms_norm, rope, attend_one, and decode_layer (a whole decoder layer of a decode step): `csrc/ops.h`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger("relay_llm")

_SOURCES = Path(__file__).with_name("csrc")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _build() -> None:
    from . import kernels
    from .loading import cache_dir

    flags = kernels.cpu_flags()
    if os.environ.get("RELAY_LLM_NATIVE", "1") == "0":
        raise RuntimeError("RELAY_LLM_NATIVE=0 set")
    if not {"avx2", "fma"} <= flags:
        raise RuntimeError("the CPU lacks AVX2 or FMA")
    files = sorted(p for p in _SOURCES.iterdir() if p.suffix in (".cpp", ".h"))
    source = b"".join(p.name.encode() + p.read_bytes() for p in files)
    tag = hashlib.sha256(source + torch.__version__.encode() + " ".join(sorted(flags)).encode()).hexdigest()[:12]
    build_dir = cache_dir() / "kernels" / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    built = build_dir / "relay_llm_gemv.so"
    if not built.exists():
        import ninja  # the build tool torch's extension builder runs; a dependency of relay-llm
        from torch.utils import cpp_extension

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        log.info("relay-llm: compiling CPU kernels into %s (once per machine)", build_dir)
        sources = [str(p) for p in files if p.suffix == ".cpp"]
        cpp_extension.load(name="relay_llm_gemv", sources=sources, build_directory=str(build_dir),
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False,
                           verbose=False)
    else:
        torch.ops.load_library(str(built))


def ops():
    """torch.ops.relay_llm once built and loaded here, else None (see `unavailable()`)."""
    with _lock:
        if "ops" not in _state:
            try:
                _build()
                _state["ops"] = torch.ops.relay_llm
                _state["reason"] = ""
            except Exception as exc:  # a missing compiler or a failed build: keep torch's kernels
                _state["ops"] = None
                _state["reason"] = f"relay-llm CPU kernels unavailable: {str(exc).splitlines()[0][:160]}"
                log.info("%s", _state["reason"])
        return _state["ops"]


def unavailable() -> str:
    """'' when `ops()` loaded, else why not."""
    ops()
    return str(_state["reason"])
