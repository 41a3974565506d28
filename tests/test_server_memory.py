"""Retrieval memory in the server (``serve --memory retrieval``), on the real embedded SmolLM2.

Two sessions each plant their own pass code, then bury it under text far past the window. Asked later,
each answers with its own code (from its own index, pinned before the turn) and never with the other's;
``/v1/sessions/{id}`` reports the index; the state folder saves the index with the session, so a server
restarted on the same folder still answers.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

WINDOW = 256
CODES = {"red": "4817", "blue": "2390"}


def filler(shakespeare: str, start: int) -> str:
    return shakespeare[start : start + 3500]  # about 1,000 tokens: the fact leaves the 256-token window


def ask(client, session: str, content: str, max_tokens: int) -> str:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    reply = client.post("/v1/chat/completions", headers={"X-Session-Id": session}, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def test_each_session_recalls_its_own_planted_code_through_the_server(smollm, shakespeare, tmp_path):
    from fastapi.testclient import TestClient

    from streaming_llm.runtime.sampling import SamplingConfig
    from streaming_llm.serving.server import create_app

    model, tokenizer = smollm
    kwargs = dict(recent_size=WINDOW, rows=2, memory="retrieval", state_dir=tmp_path, web=False,
                  sampling=SamplingConfig())  # greedy  # fmt: skip
    question = "What is the pass code of the {} door? Answer with the number."
    with TestClient(create_app(model, tokenizer, **kwargs), base_url="http://127.0.0.1") as client:
        for i, (door, code) in enumerate(CODES.items()):
            planted = f"Remember this: the pass code of the {door} door is {code}.\n\n" + filler(
                shakespeare, 50_000 * i
            )
            ask(client, door, planted, 1)
        answers = {door: ask(client, door, question.format(door), 24) for door in CODES}
        described = {door: client.get(f"/v1/sessions/{door}").json() for door in CODES}
    for door, code in CODES.items():
        other = next(c for d, c in CODES.items() if d != door)
        assert code in answers[door] and other not in answers[door], answers
        assert described[door]["evicted_tokens"] > 500  # the fact left the window long ago
        memory = described[door]["memory"]
        assert memory["kind"] == "retrieval" and memory["passages"] > 5 and memory["index_bytes"] > 0
    # The index travels with the session file: a new server on the same folder still finds the code.
    with TestClient(create_app(model, tokenizer, **kwargs), base_url="http://127.0.0.1") as client:
        again = ask(client, "red", question.format("red"), 24)
    assert CODES["red"] in again
