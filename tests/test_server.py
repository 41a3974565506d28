"""The OpenAI-compatible server, run for real: uvicorn on a free loopback port, the official openai client.

A tiny random Llama saved with the SmolLM2 tokenizer keeps these fast; behaviour is checked against an
independent expectation (the same conversation run in-process with StreamingSession).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import REPO

openai = pytest.importorskip("openai")

KEY = "test-key-123"
SYSTEM = "You are a terse assistant."
WINDOW = 64


class Served:
    def __init__(self, tiny_dir: Path, *flags: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "streaming_llm.cli", "serve", "--model", str(tiny_dir), "--port",
                   str(self.port), "--recent-size", str(WINDOW), "--device", "cpu", *flags]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # tiny model: one thread is faster
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stdout.read()}")
            try:
                httpx.get(f"{self.url}/health", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **kwargs)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture(scope="module")
def served(tiny_dir):
    server = Served(tiny_dir, "--api-key", KEY, "--allowed-origins", "http://ok.example", "--max-sessions", "4",
                    "--max-tokens-cap", "4000")  # fmt: skip
    yield server
    server.stop()


def chat(client, messages, session=None, stream=False, max_tokens=8):
    headers = {"X-Session-Id": session} if session else None
    if not stream:
        return client.chat.completions.create(model="x", messages=messages, max_tokens=max_tokens,
                                              extra_headers=headers).choices[0].message.content  # fmt: skip
    pieces = client.chat.completions.create(model="x", messages=messages, max_tokens=max_tokens, stream=True,
                                            extra_headers=headers)  # fmt: skip
    return "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)


def reference(tiny_dir, turns: list[str], max_tokens=8):
    """The same conversation run in-process: replies and the session."""
    from streaming_llm import StreamingSession, load_model

    model, tokenizer = load_model(str(tiny_dir), device="cpu", dtype="float32")
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=WINDOW)
    return [session.chat(t, max_new_tokens=max_tokens) for t in turns], session


def test_thirty_turns_past_the_window_with_flat_memory_streamed_and_not(served, tiny_dir):
    client = served.client()
    turns = [f"Turn {i}: please tell me about item number {i}." for i in range(30)]
    replies, stats = [], []
    for i, turn in enumerate(turns):
        messages = ([{"role": "system", "content": SYSTEM}] if i == 0 else []) + [{"role": "user", "content": turn}]
        replies.append(chat(client, messages, session="long", stream=i % 2 == 1))
        stats.append(served.get("/v1/sessions/long").json())
    assert stats[-1]["evicted_tokens"] > 5 * WINDOW  # far past the window
    assert len({s["cache_bytes"] for s in stats}) == 1  # memory is flat
    assert stats[-1]["turns"] == 30 and stats[-1]["messages"] == 61
    expected, _ = reference(tiny_dir, turns)
    assert replies == expected  # only new messages fed, nothing re-processed or lost


def test_interleaved_sessions_never_mix(served, tiny_dir):
    planted = ["My secret code is PLANTED-4711. Remember it.", "What is my code?", "Say it again."]
    other = ["Tell me about apples.", "And pears?", "And plums?"]
    results: dict[str, list[str]] = {"a": [], "b": []}

    def talk(name, turns):
        client = served.client()
        for i, turn in enumerate(turns):
            messages = ([{"role": "system", "content": SYSTEM}] if i == 0 else []) + [{"role": "user", "content": turn}]
            results[name].append(chat(client, messages, session=f"mix-{name}", stream=True, max_tokens=24))

    threads = [threading.Thread(target=talk, args=a) for a in (("a", planted), ("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected_a, _ = reference(tiny_dir, planted, 24)
    expected_b, session_b = reference(tiny_dir, other, 24)
    assert results == {"a": expected_a, "b": expected_b}  # each equals its conversation run alone
    seen_b = served.get("/v1/sessions/mix-b").json()["seen_tokens"]
    assert seen_b == session_b.cache.seen_tokens  # not one token of session a went into b


def test_history_resend_without_id_continues_and_usage_counts_everything(served, tokenizer):
    client = served.client()
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello, who are you?"}]
    first = client.chat.completions.create(model="x", messages=history, max_tokens=6)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Go on."}]  # fmt: skip
    second = client.chat.completions.create(model="x", messages=history, max_tokens=6)
    assert second.usage.prompt_tokens < first.usage.prompt_tokens  # continued: only the new message was fed
    # An unknown conversation is rebuilt, and prompt_tokens counts the whole rebuilt history.
    rebuilt = client.chat.completions.create(model="x", messages=[*history[:-1], {"role": "user", "content": "Hm?"}],
                                             max_tokens=2, extra_headers={"X-Session-Id": "fresh"})  # fmt: skip
    rendered = tokenizer.apply_chat_template([*history[:3], {"role": "user", "content": "Hm?"}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    assert rebuilt.usage.prompt_tokens >= len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_a_contradicting_history_is_a_409(served):
    client = served.client()
    chat(client, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}], session="h409")
    with pytest.raises(openai.ConflictError, match="contradict"):
        chat(client, [{"role": "system", "content": "Other."}, {"role": "user", "content": "Hi"}], session="h409")


def test_sessions_endpoints(served):
    client = served.client()
    chat(client, [{"role": "user", "content": "Hello"}], session="listed")
    listed = served.get("/v1/sessions").json()["data"]
    assert "listed" in [s["id"] for s in listed]
    one = served.get("/v1/sessions/listed").json()
    assert {"seen_tokens", "evicted_tokens", "cached_tokens", "cache_bytes"} <= set(one)
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.delete(f"{served.url}/v1/sessions/listed", headers=headers).json()["deleted"] is True
    missing = served.get("/v1/sessions/listed")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"


def test_a_client_disconnect_frees_the_worker(served):
    body = {"messages": [{"role": "user", "content": "Count forever."}], "max_tokens": 4000, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.time() + 10
    while served.get("/health").json()["load"] and time.time() < deadline:
        time.sleep(0.1)
    assert served.get("/health").json()["load"] == 0
    began = time.time()
    chat(served.client(), [{"role": "user", "content": "Quick?"}], max_tokens=2)
    assert time.time() - began < 10


def test_a_long_request_does_not_block_others(served):
    """Sessions are interleaved token by token: a short request finishes while a long one runs."""
    client = served.client()
    done = {}

    def long():
        chat(client, [{"role": "user", "content": "Long one."}], session="long-one", max_tokens=400)
        done["long"] = time.time()

    thread = threading.Thread(target=long)
    thread.start()
    time.sleep(0.5)
    chat(client, [{"role": "user", "content": "Short one."}], session="short-one", max_tokens=2)
    done["short"] = time.time()
    thread.join()
    assert done["short"] < done["long"]


BAD = [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 1e308}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, 400, "response_"),
    ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, 400, "frobnicate"),
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, 400, "surrogate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, "content"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "last message must come from the user"),
    ({"messages": [{"role": "user", "content": "x"}] * 300}, 400, "max-messages"),
    ({"messages": [{"role": "user", "content": "word " * 20000}]}, 400, "max-prompt-tokens"),
    ({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, "limit"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ""}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": -5}, 400, "seed"),
]


@pytest.mark.parametrize(("payload", "status", "message"), BAD)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_their_4xx_and_the_server_keeps_serving(served, payload, status, message, stream):
    body = json.dumps({**payload, "stream": payload.get("stream", stream)}, ensure_ascii=True)
    response = httpx.post(f"{served.url}/v1/chat/completions", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"]


def test_malformed_bodies(served):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    deep = "[" * 100_000 + "]" * 100_000
    for raw, status, message in [(b"{not json", 400, "not valid JSON"), (deep.encode(), 400, "nested"),
                                 (b"[1, 2]", 400, "JSON object"), (b'{"prompt": ""}', 400, "prompt")]:  # fmt: skip
        path = "/v1/completions" if b"prompt" in raw else "/v1/chat/completions"
        response = httpx.post(served.url + path, content=raw, headers=headers, timeout=30)
        assert response.status_code == status and message in response.json()["error"]["message"], response.text
    text_plain = httpx.post(f"{served.url}/v1/chat/completions", content=b"{}", timeout=30,
                            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})  # fmt: skip
    assert text_plain.status_code == 415
    for method, path, status in [("GET", "/nope", 404), ("GET", "/v1/chat/completions", 405)]:
        response = httpx.request(method, served.url + path, headers=headers, timeout=30)
        assert response.status_code == status and response.json()["error"]["message"]
    assert chat(served.client(), [{"role": "user", "content": [{"type": "text", "text": "Parts"}]}]) is not None


def test_api_key_origin_and_host_checks(served):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    url = f"{served.url}/v1/chat/completions"
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    good = {"Authorization": f"Bearer {KEY}"}
    evil = httpx.post(url, json=body, headers={**good, "Origin": "http://evil.example"}, timeout=30)
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "origin_not_allowed"
    ok = httpx.post(url, json=body, headers={**good, "Origin": "http://ok.example"}, timeout=30)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://ok.example"
    rebound = httpx.post(url, json=body, headers={**good, "Host": "attacker.example"}, timeout=30)
    assert rebound.status_code in (400, 421) and rebound.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{served.url}/health", timeout=30).status_code == 200  # health needs no key


def test_kill_9_restart_continues_with_identical_logits_and_sigterm_saves(tiny_dir, tmp_path):
    from streaming_llm import StreamingSession, load_model

    state = tmp_path / "state"
    turns = ["First question about streams?", "Second, a longer question about attention sinks?",
             "Third question?", "Fourth and last question?"]  # fmt: skip
    expected, reference_session = reference(tiny_dir, turns[:3])
    server = Served(tiny_dir, "--api-key", KEY, "--state-dir", str(state), "--max-sessions", "1")
    try:
        client = server.client()
        got = [chat(client, ([{"role": "system", "content": SYSTEM}] if i == 0 else []) +
                    [{"role": "user", "content": t}], session="durable") for i, t in enumerate(turns[:3])]  # fmt: skip
        chat(client, [{"role": "user", "content": "Other session."}], session="spilled")  # pushes 'durable' to disk
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(30)
    finally:
        server.stop()
    assert got == expected
    (state / "sessions" / ".x.safetensors.999999999.dead.tmp").write_bytes(b"orphan")
    files = list((state / "sessions").glob("*.safetensors"))
    assert len(files) == 2
    model, tokenizer = load_model(str(tiny_dir), device="cpu", dtype="float32")
    restored = [StreamingSession.load(f, model, tokenizer) for f in files]
    durable = max(restored, key=lambda s: s.turns)
    assert durable.turns == 3
    torch.testing.assert_close(durable.last_logits, reference_session.last_logits, atol=1e-5, rtol=0)
    server = Served(tiny_dir, "--api-key", KEY, "--state-dir", str(state), "--max-sessions", "1")
    try:
        assert not list((state / "sessions").glob("*.tmp"))  # stale temporaries cleaned at start
        fourth = chat(server.client(), [{"role": "user", "content": turns[3]}], session="durable")
        assert fourth == reference_session.chat(turns[3], max_new_tokens=8)
        assert server.get("/v1/sessions/durable").json()["turns"] == 4
        # SIGTERM during a long streamed reply: exits within seconds, the session saved.
        body = {"messages": [{"role": "user", "content": "Long."}], "max_tokens": 3000, "stream": True}
        headers = {"Authorization": f"Bearer {KEY}", "X-Session-Id": "durable"}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            next(lines)
            began = time.time()
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(20)
        assert time.time() - began < 10
    finally:
        server.stop()
    saved = [StreamingSession.load(f, model, tokenizer) for f in (state / "sessions").glob("*.safetensors")]
    assert max(s.turns for s in saved) == 5  # the interrupted turn was closed and saved
