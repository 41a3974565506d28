"""The OpenAI-compatible server: responses, streaming, session reuse, clear errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from streaming_llm.server import create_app


@pytest.fixture
def client(model, tokenizer):
    model.generation_config.eos_token_id = None  # random tiny model: always run to max_tokens
    app = create_app(model, tokenizer, start_size=4, recent_size=64, max_sessions=2)
    with TestClient(app) as client:
        client.app = app
        yield client


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        "max_tokens": 8}  # fmt: skip


def test_models_and_health(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "streaming-llm"
    assert client.get("/health").json()["status"] == "ok"


def test_chat_completion(client):
    body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8 and body["usage"]["prompt_tokens"] > 5


def test_streamed_chat_equals_the_whole_reply(client):
    whole = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
    lines = client.post("/v1/chat/completions", json={**CHAT, "stream": True}).text.strip().split("\n\n")
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_continued_conversation_feeds_only_the_new_message(client):
    first = client.post("/v1/chat/completions", json=CHAT).json()
    reply = first["choices"][0]["message"]
    follow_up = {**CHAT, "messages": [*CHAT["messages"], reply, {"role": "user", "content": "And then?"}]}
    second = client.post("/v1/chat/completions", json=follow_up).json()
    engine = client.app.state.engine
    assert engine.pool.resumed == 1  # the live session was continued ...
    assert second["usage"]["prompt_tokens"] < first["usage"]["prompt_tokens"] + 10  # ... not re-fed from the start
    other = {**CHAT, "messages": [{"role": "user", "content": "Unrelated."}]}
    client.post("/v1/chat/completions", json=other)
    assert engine.pool.resumed == 1 and len(engine.pool.sessions) == 2  # bounded by max_sessions


def test_text_completion(client):
    body = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 5}).json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "last message must come from the user"),
    ],
)
def test_malformed_requests_get_a_clear_400(client, payload, message):
    response = client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_not_json_is_a_clear_400(client):
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_serve_command_answers_over_http():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "streaming_llm.cli", "serve", "--port", str(port), "--recent-size", "256"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        body = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 12},
                          timeout=120).json()  # fmt: skip
        assert body["choices"][0]["message"]["content"].strip()
    finally:
        process.terminate()
        process.wait(timeout=30)
