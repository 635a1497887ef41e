"""Tiny model folders for the LangChain tests, made once per process.

A module-level cache, not a fixture, because the standard suites read their model parameters from
class properties, which cannot request fixtures.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from ..tiny import make_model


@functools.cache
def tiny_model_dir(family: str = "llama") -> str:
    """Folder of a tiny random `family` model (see tests/tiny.py), removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="relay-langchain-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return str(make_model(family, root / family))
