"""Fixtures for the server tests: a tiny model engine and real uvicorn servers on loopback ports."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn
from openai import AsyncOpenAI, OpenAI
from relay_server import create_app

from relay_llm import EngineConfig, RelayEngine

from ..tiny import make_model

MODEL = "tiny"
MAX_BODY = 64 << 10


class ServerThread:
    """A uvicorn server for `app` on 127.0.0.1 and a free port, in a daemon thread."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="session")
def server_engine(tmp_path_factory) -> RelayEngine:
    """A tiny random llama (ChatML template), naive reuse, min match 8 tokens."""
    folder = make_model("llama", tmp_path_factory.mktemp("server") / "llama")
    engine = RelayEngine.load(str(folder), config=EngineConfig(min_match_tokens=8, default_schedule="naive"))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def server(server_engine) -> ServerThread:
    app = create_app(server_engine, model_id=MODEL, max_body_bytes=MAX_BODY, default_max_tokens=16)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture
def client(server) -> OpenAI:
    with OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def aclient(server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
