"""Redis for the shared-store tests: the server `.ci/run` started (RELAY_LLM_TEST_REDIS_URL), else one started
here if `redis-server` is installed, else the tests skip. Under CI=true, or with RELAY_LLM_TEST_REDIS_URL set,
a missing Redis (server binary or Python package) fails them instead: those runs promise one.

Tests that set their own `maxmemory` or kill Redis start their own `RedisServer` on a free port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest

URL_ENV = "RELAY_LLM_TEST_REDIS_URL"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true" or os.environ.get(URL_ENV):
        pytest.fail(f"Redis is required in this run (CI=true or {URL_ENV} set), but {reason}")
    pytest.skip(reason)


def need_redis_package() -> None:
    try:
        import redis  # noqa: F401
    except ImportError:
        _missing("the redis package is not installed (pip install -e '.[all]')")


def need_redis_server() -> str:
    """The redis-server binary; skip without it (fail where a Redis is required)."""
    need_redis_package()
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    return binary


class RedisServer:
    """A redis-server on 127.0.0.1 and a free port, in the foreground of a child process (no persistence)."""

    def __init__(self, maxmemory: str = "256mb", port: int | None = None):
        self.binary = need_redis_server()
        self.maxmemory = maxmemory
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru", "--maxmemory-samples", "10"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return self
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


@pytest.fixture(autouse=True)
def _redis_package() -> None:
    need_redis_package()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A shared Redis for the session: $RELAY_LLM_TEST_REDIS_URL, or one started here."""
    need_redis_package()
    url = os.environ.get(URL_ENV)
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_db(redis_url) -> str:
    """The shared Redis, emptied (FLUSHDB) for this test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return redis_url


def unique_fingerprint() -> str:
    return f"test:{uuid.uuid4().hex}:float32|no-profile"
