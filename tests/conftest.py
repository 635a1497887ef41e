"""Shared fixtures: tiny random models of every family (built here), and the real default model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from relay_llm.engine import EngineConfig, RelayEngine  # noqa: E402

from .tiny import FAMILIES, make_model  # noqa: E402

TINY_CONFIG = dict(min_match_tokens=8)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    """family -> folder of a saved tiny random model with its tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_model(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def tiny_engines(tiny_dirs) -> dict:
    """family -> RelayEngine on that tiny model (fp32, CPU). Tests reset store/prefix cache themselves."""
    engines = {fam: RelayEngine.load(str(d), config=EngineConfig(**TINY_CONFIG)) for fam, d in tiny_dirs.items()}
    yield engines
    for e in engines.values():
        e.close()


@pytest.fixture(params=list(FAMILIES))
def tiny(request, tiny_engines) -> RelayEngine:
    """Each tiny engine in turn, with an empty store and prefix cache."""
    engine = tiny_engines[request.param]
    engine.store.clear()
    engine.prefix_cache.clear()
    return engine


@pytest.fixture(scope="session")
def default_engine() -> RelayEngine:
    """The packaged gemma-3-270m (fp32), loaded once per test session."""
    engine = RelayEngine.load("default", dtype="float32")
    yield engine
    engine.close()
