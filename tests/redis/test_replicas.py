"""Two `relay-llm serve --store redis://...` replicas as subprocesses on a tiny model, driven by the openai client."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from ..tiny import make_model
from .conftest import RedisServer, free_port
from .helpers import wait_for

RELAY_LLM = str(Path(sys.executable).with_name("relay-llm"))
FIRST = [{"role": "user", "content": "Agent one: write the spec."}]


def quoting(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are the reviewer."},
            {"role": "user", "content": f"Review this specification:\n{text}\nIs it complete?"}]


class Replica:
    """`relay-llm serve` on a free loopback port, its output in a log file."""

    def __init__(self, model: str, store: str, log: Path):
        self.port, self.log = free_port(), log
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([RELAY_LLM, "serve", "--model", model, "--port", str(self.port),
                                          "--store", store], stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def wait_ready(self, timeout: float = 180) -> Replica:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def chat(self, messages, max_tokens: int):
        return self.client.chat.completions.create(model="llama", messages=messages, max_tokens=max_tokens,
                                                   temperature=0)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_model("llama", tmp_path_factory.mktemp("replicas") / "llama"))


@pytest.fixture
def replicas(model, tmp_path):
    """replicas(url, n) -> n replicas on that Redis, started together, stopped after the test."""
    started = []

    def start(url: str, n: int = 2) -> list[Replica]:
        new = [Replica(model, url, tmp_path / f"replica{len(started) + i}.log") for i in range(n)]
        started.extend(new)
        return [r.wait_ready() for r in new]

    yield start
    for r in started:
        r.stop()


def _synced(a: Replica, b: Replica) -> bool:
    published = a.metric("relay_shared_store_published_total")
    return published >= 1 and b.metric("relay_shared_store_announced_total") >= published


def test_an_output_generated_on_a_is_reused_on_b(redis_db, replicas):
    a, b = replicas(redis_db)
    spec = a.chat(FIRST, 40).choices[0].message.content
    wait_for(lambda: _synced(a, b), what="b to index a's output")
    on_b = b.chat(quoting(spec), 12)
    relay = on_b.model_extra["relay"]
    assert on_b.usage.prompt_tokens_details.cached_tokens > 0 and relay["span_tokens"] >= 16
    assert b.metric("relay_shared_store_fetched_total") >= 1
    on_a = a.chat(quoting(spec), 12)
    assert on_a.usage.prompt_tokens_details.cached_tokens > 0
    assert on_b.choices[0].message.content == on_a.choices[0].message.content


def test_requests_are_answered_while_redis_is_down(replicas):
    server = RedisServer().start()
    try:
        a, b = replicas(server.url)
        spec = a.chat(FIRST, 40).choices[0].message.content
        wait_for(lambda: _synced(a, b), what="b to index a's output")
        server.kill()
        # Every request is answered (max_retries=0: a 5xx would raise): B cannot fetch A's blob, so it computes.
        down_b = b.chat(quoting(spec), 8)
        down_a = a.chat(quoting(spec), 8)
        assert down_b.choices[0].finish_reason == "length" and down_a.usage.prompt_tokens_details.cached_tokens > 0
        streamed = list(b.client.chat.completions.create(model="llama", messages=FIRST, max_tokens=6, temperature=0,
                                                         stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        wait_for(lambda: a.metric("relay_shared_store_connected") == 0 == b.metric("relay_shared_store_connected"),
                 what="the replicas to notice")
        server = RedisServer(port=server.port).start()  # back, empty
        wait_for(lambda: a.metric("relay_shared_store_connected") == 1 == b.metric("relay_shared_store_connected"),
                 what="reconnecting")
        spec2 = a.chat([{"role": "user", "content": "Agent two: write the code."}], 40).choices[0].message.content
        wait_for(lambda: b.metric("relay_shared_store_announced_total") >= 2, what="b to index a's new output")
        again = b.chat(quoting(spec2), 8)
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        log = a.log.read_text()
        assert "unreachable" in log and "reconnected" in log
    finally:
        server.kill()
