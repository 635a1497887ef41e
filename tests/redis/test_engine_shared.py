"""Engines sharing one segment store through Redis (EngineConfig.store_url), in one process."""

from __future__ import annotations

import pytest

from relay_llm import EngineConfig, RelayEngine

from ..tiny import make_model
from .conftest import free_port
from .helpers import wait_for

FIRST = [{"role": "user", "content": "Agent one: write the spec."}]


def quoting(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are the reviewer."},
            {"role": "user", "content": f"Review this specification:\n{text}\nIs it complete?"}]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(make_model("llama", tmp_path_factory.mktemp("shared") / "llama"))


def test_an_output_of_one_engine_is_reused_by_another(llama, redis_db):
    config = EngineConfig(store_url=redis_db, min_match_tokens=8)
    a, b = RelayEngine.load(llama, config=config), RelayEngine.load(llama, config=config)
    try:
        spec = a.chat(FIRST, max_new_tokens=40)
        wait_for(lambda: b.store.shared.announced >= 1 and b.store.shared.announced == a.store.shared.published,
                 what="b to index a's segments")
        on_b = b.chat(quoting(spec.text), max_new_tokens=12)
        assert on_b.stats.span_tokens >= 8 and on_b.stats.reused_tokens > 0 and b.store.shared.fetched >= 1
        on_a = a.chat(quoting(spec.text), max_new_tokens=12)
        assert on_b.text == on_a.text
    finally:
        a.close()
        b.close()
    assert not any(t.is_alive() for t in a.store._threads + b.store._threads)


def test_an_engine_serves_while_redis_is_unreachable(llama):
    engine = RelayEngine.load(llama, config=EngineConfig(store_url=f"redis://127.0.0.1:{free_port()}/0",
                                                         min_match_tokens=8))
    threads = list(engine.store._threads)
    try:
        spec = engine.chat(FIRST, max_new_tokens=30)
        again = engine.chat(quoting(spec.text), max_new_tokens=4)
        assert again.stats.span_tokens >= 8  # its own output, from the local store
        assert not engine.store.connected and engine.store.shared.disconnects == 1
    finally:
        engine.close()
    assert threads and not any(t.is_alive() for t in threads)


def test_store_url_must_be_redis(llama):
    with pytest.raises(ValueError, match="redis://"):
        RelayEngine.load(llama, config=EngineConfig(store_url="http://127.0.0.1:6379"))
