"""Sessions of the server decode together as rows of one cache: 16 concurrent sessions, each with its own
system prompt (pinned beside the sinks, of different lengths) and its own planted code word, get exactly the
greedy replies each gets alone in-process, while /health shows batched decode steps (and spills: 16 sessions
on 8 rows)."""

from __future__ import annotations

import threading

from test_server import GREEDY, WINDOW, Served, chat

from streaming_llm import StreamingSession, load_model

WORDS = ["amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "heron", "indigo", "jasper", "kestrel",
         "lichen", "marble", "nectar", "onyx", "pewter"]  # fmt: skip


def system_prompt(i: int) -> str:
    return f"You are assistant number {i}. " + "Be brief. " * (i % 5) + f"The secret code word is {WORDS[i]}."


TURNS = ["Hello! Remember the code word.", "What is the code word?", "Say it once more, please."]


def test_sixteen_concurrent_sessions_with_system_prompts_equal_each_alone(tiny_dir):
    server = Served(tiny_dir, *GREEDY, "--rows", "8", "--max-sessions", "32", "--max-queue", "64")
    replies: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def talk(i: int) -> None:
        try:
            client = server.client()
            out = []
            for t, turn in enumerate(TURNS):
                messages = ([{"role": "system", "content": system_prompt(i)}] if t == 0 else []) + [
                    {"role": "user", "content": turn}
                ]
                out.append(chat(client, messages, session=f"s{i}", stream=t == 1, max_tokens=10))
            replies[i] = out
        except BaseException as error:  # reported below
            errors.append(error)

    try:
        threads = [threading.Thread(target=talk, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        health = server.get("/health").json()
        described = {i: server.get(f"/v1/sessions/s{i}").json() for i in range(16)}
    finally:
        server.stop()
    assert not errors, errors
    assert health["max_batch"] > 1 and health["decode_steps"] < health["batched_tokens"]  # rows shared forwards
    assert health["spills"] > 0 and health["restores"] > 0  # 16 sessions on 8 rows
    model, tokenizer = load_model(str(tiny_dir), device="cpu", dtype="float32")
    for i in range(16):
        session = StreamingSession(model, tokenizer, system_prompt(i), recent_size=WINDOW)
        expected = [session.chat(turn, max_new_tokens=10) for turn in TURNS]
        assert replies[i] == expected, i
        assert described[i]["seen_tokens"] == session.stats().seen_tokens
        assert described[i]["pinned_tokens"] == session.stats().pinned_tokens > 4  # the system prompt is pinned
    # No session saw another's code word: each reply is its own session's, token for token (above).
