"""The OpenAI-compatible server over real HTTP on loopback, driven by the official `openai` client (tiny model)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from .conftest import MODEL

FULL = {"relay": {"schedule": "full"}}  # full prefill: outputs comparable with a direct engine call


def msgs(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are the architect."}, {"role": "user", "content": text}]


def sse_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line]


def wait_for(predicate, what: str, limit_s: float = 60.0) -> None:
    """Poll until `predicate()` holds (a generous safety limit, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def traced(server_engine, monkeypatch) -> list[dict]:
    """Records every generation as it leaves the engine's scheduler: max tokens, tokens generated, cancelled."""
    log: list[dict] = []
    scheduler = server_engine._worker
    leave = scheduler._leave

    def record(seq):
        if seq.state.value != "done":
            log.append({"max": seq.options.max_new_tokens, "steps": len(seq.generated),
                        "cancelled": seq.cancel.is_set()})
        return leave(seq)

    monkeypatch.setattr(scheduler, "_leave", record)
    return log


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    schema = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= schema["paths"].keys()


def test_chat_non_streaming(client, server_engine):
    res = client.chat.completions.create(model=MODEL, messages=msgs("Write the specification."), max_tokens=8,
                                         temperature=0, extra_body=FULL)
    direct = server_engine.chat(msgs("Write the specification."), max_new_tokens=8, schedule="full")
    choice = res.choices[0]
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-") and res.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content == direct.text
    assert choice.finish_reason == "length"
    assert res.usage.prompt_tokens == len(server_engine.render(msgs("Write the specification.")))
    assert res.usage.completion_tokens == 8
    assert res.usage.total_tokens == res.usage.prompt_tokens + 8
    assert res.usage.prompt_tokens_details.cached_tokens == 0
    relay = res.model_extra["relay"]
    assert relay["schedule"] == "full" and relay["prompt_tokens"] == res.usage.prompt_tokens
    assert {"reuse_rate", "recomputed_cells", "ttft_s", "fallback"} <= relay.keys()


def test_chat_streaming_matches_non_streaming(client):
    kwargs = dict(model=MODEL, messages=msgs("Stream the code."), max_tokens=10, temperature=0, extra_body=FULL)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].model_extra["relay"]["completion_tokens"] == 10
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 10 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_raw_sse_format(http):
    body = {"model": MODEL, "messages": msgs("Raw events."), "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(r)
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["choices"][0]["delta"] == {}
    assert all("usage" not in e for e in events)  # no include_usage: no usage fields at all


def test_async_client(aclient):
    async def main():
        async with aclient:
            res = await aclient.chat.completions.create(model=MODEL, messages=msgs("Async call."), max_tokens=5,
                                                        temperature=0, extra_body=FULL)
            stream = await aclient.chat.completions.create(model=MODEL, messages=msgs("Async call."), max_tokens=5,
                                                           temperature=0, extra_body=FULL, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return res.choices[0].message.content, text

    whole, streamed = asyncio.run(main())
    assert whole == streamed and whole


def test_stop_sequences(client):
    kwargs = dict(model=MODEL, messages=msgs("Stop somewhere."), temperature=0, extra_body=FULL)
    full = client.chat.completions.create(max_tokens=16, **kwargs).choices[0].message.content
    k = next(i for i in range(1, len(full) - 3) if full[i:i + 3].isascii() and full[i:i + 3].strip()
             and full.find(full[i:i + 3]) == i)
    stop = full[k:k + 3]
    for stop_arg in (stop, ["zzz-never", stop]):
        res = client.chat.completions.create(max_tokens=16, stop=stop_arg, **kwargs)
        assert res.choices[0].finish_reason == "stop"
        assert res.choices[0].message.content == full[:k]


def test_completions_endpoint(client, server_engine):
    res = client.completions.create(model=MODEL, prompt="The architect writes", max_tokens=6, temperature=0,
                                    extra_body=FULL)
    direct = server_engine.complete("The architect writes", max_new_tokens=6, schedule="full")
    assert res.object == "text_completion" and res.choices[0].text == direct.text
    assert res.choices[0].finish_reason == "length" and res.usage.completion_tokens == 6
    ids = server_engine.encode("The architect writes")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, extra_body=FULL)
    assert by_ids.choices[0].text == direct.text and by_ids.usage.prompt_tokens == len(ids)
    chunks = list(client.completions.create(model=MODEL, prompt="The architect writes", max_tokens=6, temperature=0,
                                            extra_body=FULL, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_default_max_tokens_and_sampling(client):
    kwargs = dict(model=MODEL, messages=msgs("No limit given."), seed=3, temperature=0.8, top_p=0.9, extra_body=FULL)
    res = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert res.usage.completion_tokens == 16  # the app's default_max_tokens in this fixture
    assert res.choices[0].message.content == again.choices[0].message.content  # seeded


def test_cached_tokens_when_an_output_is_quoted(client, server_engine):
    server_engine.store.clear()
    server_engine.prefix_cache.clear()
    first = client.chat.completions.create(model=MODEL, messages=msgs("Agent one: write the spec."), max_tokens=30,
                                           temperature=0)
    spec = first.choices[0].message.content
    second = client.chat.completions.create(
        model=MODEL, max_tokens=2, temperature=0,
        messages=[{"role": "system", "content": "You are the reviewer."},
                  {"role": "user", "content": f"Review this specification:\n{spec}\nIs it complete?"}])
    relay = second.model_extra["relay"]
    assert relay["span_tokens"] >= 8 and relay["spans"] >= 1
    assert second.usage.prompt_tokens_details.cached_tokens == relay["reused_tokens"] >= relay["span_tokens"]


def test_tool_call_history_renders(client, server_engine):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
    ]
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    rendered = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant",
         "content": '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'},
        {"role": "tool", "content": "sunny, 21 C"},
        {"role": "system", "content": "Answer briefly."},
    ]
    assert res.usage.prompt_tokens == len(server_engine.render(rendered))


def test_tools_with_tool_choice_none_are_ignored(client):
    res = client.chat.completions.create(
        model=MODEL, messages=msgs("No tools."), max_tokens=2, tool_choice="none", temperature=0, extra_body=FULL,
        tools=[{"type": "function", "function": {"name": "weather"}}])
    assert res.choices[0].finish_reason == "length"


def test_concurrent_clients_get_complete_answers(aclient, server_engine):
    prompts = [f"Agent {i} writes part {i} of the code." for i in range(8)]
    expected = [server_engine.chat(msgs(p), max_new_tokens=6, schedule="full").text for p in prompts]

    async def main():
        async with aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(
                model=MODEL, messages=msgs(p), max_tokens=6, temperature=0, extra_body=FULL) for p in prompts))

    results = asyncio.run(main())
    assert [r.choices[0].message.content for r in results] == expected
    assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6 for r in results)


def test_health_and_metrics_answer_during_a_long_generation(client, http, traced):
    stream = client.chat.completions.create(model=MODEL, messages=msgs("A very long answer."), max_tokens=1500,
                                            temperature=0, stream=True, extra_body=FULL)
    try:
        next(iter(stream))  # the role chunk: the request is in
        wait_for(lambda: http.get("/health").json()["generations_in_flight"] == 1, "the generation to be in flight")
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and "relay_generations_in_flight 1" in metrics.text
    finally:
        stream.close()
    wait_for(lambda: traced, "the worker to finish the cancelled generation")
    assert traced[0]["cancelled"] and traced[0]["steps"] < 1500


def test_client_disconnect_cancels_the_generation(client, http, traced):
    stream = client.chat.completions.create(model=MODEL, messages=msgs("Talk for a long time."), max_tokens=1500,
                                            temperature=0, stream=True, extra_body=FULL)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 3:
            break
    stream.close()  # drops the connection mid-stream
    wait_for(lambda: traced, "the worker to finish the cancelled generation")
    assert traced[0]["cancelled"] and traced[0]["max"] == 1500 and traced[0]["steps"] < 1500
    wait_for(lambda: http.get("/health").json()["generations_in_flight"] == 0, "the server to count it as ended")
    res = client.chat.completions.create(model=MODEL, messages=msgs("And now a short one."), max_tokens=3,
                                         temperature=0, extra_body=FULL)
    assert res.usage.completion_tokens == 3 and not traced[1]["cancelled"]
    assert "relay_generations_cancelled_total 0" not in http.get("/metrics").text


def test_mid_stream_failure_sends_an_error_event_then_done(client, http, server_engine, monkeypatch):
    real_stream = server_engine.stream

    def failing(request, **opts):
        inner = real_stream(request, **opts)
        for i, chunk in enumerate(inner):
            if i == 2:
                inner.close()
                raise RuntimeError("the accelerator caught fire")
            yield chunk

    monkeypatch.setattr(server_engine, "stream", failing)
    body = {"model": MODEL, "messages": msgs("Fail midway."), "max_tokens": 12, "stream": True, "temperature": 0,
            **FULL}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = sse_lines(r)
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "server_error" and "caught fire" in error["message"]
    with pytest.raises(openai.APIError, match="caught fire"):
        list(client.chat.completions.create(model=MODEL, messages=msgs("Fail midway."), max_tokens=12, stream=True,
                                            temperature=0, extra_body=FULL))
    monkeypatch.undo()
    assert client.chat.completions.create(model=MODEL, messages=msgs("Fine again."), max_tokens=2).choices


def test_metrics_exposition(client, http):
    # 20 tokens: long enough for the output to be stored, so the store gauge is > 0 even when run alone
    client.chat.completions.create(model=MODEL, messages=msgs("Count me."), max_tokens=20, temperature=0)
    text = http.get("/metrics").text
    assert http.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['relay_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    for name in ("relay_prompt_tokens_total", "relay_reused_tokens_total", "relay_generated_tokens_total",
                 "relay_store_bytes", "relay_store_evictions_total", "relay_ttft_seconds_count"):
        assert name in samples
    assert samples["relay_generated_tokens_total"] >= 2 and samples["relay_store_bytes"] > 0
    assert samples['relay_ttft_seconds_bucket{le="+Inf"}'] == samples["relay_ttft_seconds_count"] >= 1
    assert "# TYPE relay_ttft_seconds histogram" in text


def test_a_request_sent_while_one_streams_runs_beside_it(client, traced):
    """A non-streaming request sent while a stream runs is batched with it; both complete."""
    stream = client.chat.completions.create(model=MODEL, messages=msgs("First in line."), max_tokens=20,
                                            temperature=0, stream=True, extra_body=FULL)
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(res=client.chat.completions.create(
        model=MODEL, messages=msgs("Second in line."), max_tokens=4, temperature=0, extra_body=FULL)))
    worker.start()
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    worker.join(timeout=120)
    assert text and out["res"].usage.completion_tokens == 4
    assert sorted(t["max"] for t in traced) == [4, 20] and not any(t["cancelled"] for t in traced)


def test_relay_extension_passes_schedule_and_settings(client, http):
    from relay_llm.schedules import SCHEDULES

    res = client.chat.completions.create(model=MODEL, messages=msgs("Prefix only."), max_tokens=2,
                                         extra_body={"relay": {"schedule": "prefix"}})
    assert res.model_extra["relay"]["schedule"] == "prefix"
    bad = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs("x"), "max_tokens": 2,
                                                  "relay": {"schedule": "naive", "thresholds": {"no_such": 1}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("relay")
    if "relay" not in SCHEDULES:
        pytest.skip("the engine has no relay schedule yet")
    band = {"start_layer": 0, "det_layer": 1, "end_layer": 2, "tau_dev": 1.2}
    res = client.chat.completions.create(model=MODEL, messages=msgs("Rectify."), max_tokens=2,
                                         extra_body={"relay": {"schedule": "relay", "thresholds": band}})
    assert res.model_extra["relay"]["schedule"] == "relay"


def test_client_disconnect_cancels_a_non_streaming_request(server, http, traced):
    body = json.dumps({"model": MODEL, "messages": msgs("A long answer nobody waits for."), "max_tokens": 1500,
                       "temperature": 0, **FULL})
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        wait_for(lambda: http.get("/health").json()["generations_in_flight"] == 1, "the generation to start")
    wait_for(lambda: traced, "the worker to finish the cancelled generation")
    assert traced[0]["cancelled"] and traced[0]["steps"] < 1500
    wait_for(lambda: http.get("/health").json()["generations_in_flight"] == 0, "the server to count it as ended")


def test_a_full_queue_answers_429_with_retry_after(client, http, server_engine, monkeypatch):
    scheduler = server_engine._worker
    monkeypatch.setattr(scheduler, "max_queue", 1)
    gate = threading.Event()
    scheduler.submit(lambda emit, cancel: gate.wait(60))  # hold the model thread: requests stay queued
    out: dict = {}
    first = threading.Thread(target=lambda: out.update(res=client.chat.completions.create(
        model=MODEL, messages=msgs("Queued first."), max_tokens=2, temperature=0)))
    try:
        first.start()
        wait_for(lambda: server_engine.load_stats()["waiting"] == 1, "the first request to be queued")
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs("No room."), "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "max_queue=1" in r.json()["error"]["message"]
        assert "relay_queue_depth 1" in http.get("/metrics").text
    finally:
        gate.set()
        first.join(timeout=120)
    assert out["res"].usage.completion_tokens == 2
    text = http.get("/metrics").text
    assert "relay_queue_depth 0" in text and "# TYPE relay_batch_size gauge" in text


def test_a_request_that_can_never_fit_the_kv_budget_is_a_400(client, http, server_engine, monkeypatch):
    monkeypatch.setattr(server_engine._worker, "kv_budget_bytes", server_engine.executor.kv_bytes_per_token() * 100)
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs("Too big."), "max_tokens": 500})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "KV budget" in r.json()["error"]["message"]
    ok = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs("Fits."), "max_tokens": 3})
    assert ok.status_code == 200


def test_serve_options_reach_the_engine_it_loads(tmp_path):
    """`relay-llm serve --max-batch 3 --max-queue 5` parses, and create_app loads its engine with that config."""
    from relay_server import create_app

    from relay_llm import EngineConfig, cli, engine

    from ..tiny import make_model

    args = cli.build_parser().parse_args(["serve", "--max-batch", "3", "--max-queue", "5"])
    assert (args.max_batch, args.max_queue) == (3, 5)
    folder = str(make_model("llama", tmp_path / "llama"))
    app = create_app(folder, config=EngineConfig(max_batch=args.max_batch, max_queue=args.max_queue))
    loaded = app.state.relay.engine
    try:
        assert loaded.config.max_batch == 3 and loaded._worker.max_queue == 5 and loaded._worker.max_batch == 3
    finally:
        engine._SHARED.pop((folder, "auto", "auto"), None)
        loaded.close()
