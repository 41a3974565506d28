"""Moving a session between two servers (separate processes) over HTTP: export, import, continue exactly.

The expectation is independent of both servers: the same conversation run in this process with
StreamingSession; the exported files are loaded here and their next-token logits compared.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import tiny_llama
from test_server import GREEDY, KEY, SYSTEM, WINDOW, Served, chat, reference

TURNS = ["First question about rivers?", "Second, about lakes and the sea?", "Third one?", "And a fourth?"]


@pytest.fixture(scope="module")
def two_servers(tiny_dir, tmp_path_factory):
    state = tmp_path_factory.mktemp("state-b")
    servers = []
    try:
        servers.append(Served(tiny_dir, *GREEDY, "--api-key", KEY))
        servers.append(Served(tiny_dir, *GREEDY, "--api-key", KEY, "--state-dir", str(state)))
        yield servers
    finally:
        for server in servers:
            server.stop()


def auth(**extra) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", **extra}


def put(server: Served, session_id: str, data: bytes, kind: str = "application/octet-stream") -> httpx.Response:
    headers = auth(**{"Content-Type": kind})
    return httpx.put(f"{server.url}/v1/sessions/{session_id}", content=data, headers=headers, timeout=60)


def loaded(tiny_dir, data: bytes, tmp_path, name: str):
    from streaming_llm import StreamingSession, load_model

    model, tokenizer = load_model(str(tiny_dir), device="cpu", dtype="float32")
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    return StreamingSession.load(path, model, tokenizer)


def test_export_from_one_server_import_into_another_continues_exactly(two_servers, tiny_dir, tmp_path):
    a, b = two_servers
    replies, session = reference(tiny_dir, TURNS[:3])
    got = [chat(a.client(), ([{"role": "system", "content": SYSTEM}] if i == 0 else []) +
                [{"role": "user", "content": t}], session="mover/1") for i, t in enumerate(TURNS[:3])]  # fmt: skip
    assert got == replies
    exported = a.get("/v1/sessions/mover/1/export")
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/octet-stream"
    torch.testing.assert_close(
        loaded(tiny_dir, exported.content, tmp_path, "a").last_logits, session.last_logits, atol=1e-5, rtol=0
    )

    imported = put(b, "moved", exported.content)
    assert imported.status_code == 200, imported.text
    assert imported.json()["turns"] == 3 and imported.json()["messages"] == 7
    fourth = chat(b.client(), [{"role": "user", "content": TURNS[3]}], session="moved")
    assert fourth == session.chat(TURNS[3], max_new_tokens=8)  # the uninterrupted run's fourth reply
    after = b.get("/v1/sessions/moved/export").content
    torch.testing.assert_close(
        loaded(tiny_dir, after, tmp_path, "b").last_logits, session.last_logits, atol=1e-5, rtol=0
    )


def test_tampered_foreign_and_other_files_are_refused_and_change_nothing(two_servers, tiny_dir, tmp_path):
    from streaming_llm import StreamingSession, install, load_model

    a, b = two_servers
    chat(a.client(), [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi."}], session="src")
    good = a.get("/v1/sessions/src/export").content
    assert put(b, "target", good).status_code == 200
    before = b.get("/v1/sessions/target").json()

    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0x01  # one bit inside the tensors
    _, tokenizer = load_model(str(tiny_dir), device="cpu", dtype="float32")
    other = install(tiny_llama(seed=1, vocab_size=len(tokenizer)))  # same shapes, other weights
    StreamingSession(other, tokenizer, SYSTEM, recent_size=WINDOW).save(tmp_path / "foreign.safetensors")
    foreign = (tmp_path / "foreign.safetensors").read_bytes()
    refusals = [
        (bytes(tampered), "corrupt or was edited"),
        (foreign, "another model"),
        (b"not a session file", "not a readable session file"),
        (good[: len(good) // 2], "truncated"),
    ]
    for data, words in refusals:
        refused = put(b, "target", data)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "invalid_session_file" and words in error["message"]
        assert b.get("/v1/sessions/target").json() == before  # the session there is unchanged

    assert put(b, "target", good, kind="application/json").status_code == 415
    assert httpx.put(f"{b.url}/v1/sessions/target", content=good, timeout=30).status_code == 401  # auth applies
    assert httpx.get(f"{b.url}/v1/sessions/src/export", timeout=30).status_code == 401
    assert b.get("/v1/sessions/nobody/export").status_code == 404
