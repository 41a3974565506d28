"""Sessions shared by several servers through one folder (streaming_llm.serving.shared), in-process and without Ray.

Two apps with their own model copies stand for two replicas; requests go to whichever the test picks,
as a router that moved a session would. Every expectation is the conversation run alone, in this process,
with StreamingSession.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from streaming_llm.runtime.sampling import SamplingConfig
from streaming_llm.serving.shared import SessionFiles, SessionSync

SYSTEM = "You are a terse assistant."
WINDOW = 64
TURNS = ["First question about rivers?", "Second, about lakes?", "Third, about the sea?", "Fourth and last?"]


def load(tiny_dir):
    from streaming_llm import load_model

    return load_model(str(tiny_dir), device="cpu", dtype="float32")


def reference(tiny_dir, turns: list[str]):
    from streaming_llm import StreamingSession

    model, tokenizer = load(tiny_dir)
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=WINDOW)
    return [session.chat(t, max_new_tokens=8) for t in turns], session


class Replicas:
    """Two servers over one shared folder, each wrapped in SessionSync; ``wrap`` may sit between sync and app."""

    def __init__(self, tiny_dir, folder, files=SessionFiles, wrap=None):
        from streaming_llm.serving.server import create_app

        self.apps, self.syncs, self.clients = [], [], []
        for name in ("a", "b"):
            model, tokenizer = load(tiny_dir)
            app = create_app(model, tokenizer, recent_size=WINDOW, sampling=SamplingConfig())  # greedy: the reference
            sync = SessionSync(wrap(app) if wrap else app, files(folder), replica=name)
            self.apps.append(app)
            self.syncs.append(sync)
            self.clients.append(httpx.AsyncClient(transport=httpx.ASGITransport(app=sync), base_url="http://127.0.0.1"))

    async def chat(self, i: int, text: str, session: str | None, first: bool = False) -> httpx.Response:
        messages = ([{"role": "system", "content": SYSTEM}] if first else []) + [{"role": "user", "content": text}]
        headers = {"X-Session-Id": session} if session else {}
        body = {"model": "streaming-llm", "messages": messages, "max_tokens": 8}
        return await self.clients[i].post("/v1/chat/completions", json=body, headers=headers, timeout=120)

    async def close(self) -> None:
        for client, sync, app in zip(self.clients, self.syncs, self.apps, strict=True):
            await client.aclose()
            await sync.client.aclose()
            await asyncio.to_thread(app.state.server.shutdown, 5)


def reply(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def run(tiny_dir, folder, scenario, **kwargs):
    async def main():
        replicas = Replicas(tiny_dir, folder, **kwargs)
        try:
            return await scenario(replicas)
        finally:
            await replicas.close()

    return asyncio.run(main())


def test_session_files_write_atomically_and_stamp_every_version(tmp_path):
    files = SessionFiles(tmp_path / "shared")
    assert files.stamp("s") is None and files.read("s") is None and not files.delete("s")
    first = files.write("s", b"one")
    assert files.read("s") == (b"one", first)
    second = files.write("s", b"two")
    assert second != first and files.read("s") == (b"two", second)
    assert [p.name for p in (tmp_path / "shared" / "sessions").iterdir()] == [files.path("s").rsplit("/", 1)[1]]
    assert files.delete("s") and files.stamp("s") is None
    assert SessionFiles(f"file://{tmp_path}/shared").path("s") == files.path("s")  # a URL names the same place


def test_a_session_moving_back_and_forth_continues_exactly(tiny_dir, tmp_path):
    expected, session = reference(tiny_dir, TURNS)

    async def scenario(r: Replicas):
        got = [reply(await r.chat(0, TURNS[0], "s", first=True))]
        got.append(reply(await r.chat(1, TURNS[1], "s")))  # moved to b: imported from the shared file
        got.append(reply(await r.chat(0, TURNS[2], "s")))  # back to a, whose copy is stale: re-imported
        third = await r.chat(1, TURNS[3], "s")
        got.append(reply(third))
        assert third.headers["x-replica-id"] == "b"
        exported = await r.clients[0].get("/v1/sessions/s/export")  # a catches up from the shared file
        return got, exported.content

    got, exported = run(tiny_dir, tmp_path, scenario)
    assert got == expected
    from streaming_llm import StreamingSession

    (tmp_path / "out.safetensors").write_bytes(exported)
    restored = StreamingSession.load(tmp_path / "out.safetensors", *load(tiny_dir))
    assert restored.turns == 4
    # The same tokens (above); the logits to fp32 rounding: the server's engine feeds a prompt in chunks of its
    # token budget and steps rows in buckets, the in-process reference feeds each prompt whole.
    torch.testing.assert_close(restored.last_logits, session.last_logits, atol=1e-5, rtol=0)


def test_delete_anonymous_and_live_count(tiny_dir, tmp_path):
    async def scenario(r: Replicas):
        reply(await r.chat(0, TURNS[0], "gone", first=True))
        assert (await r.clients[1].get("/v1/sessions/gone")).json()["turns"] == 1  # b reads the shared copy
        assert (await r.clients[1].delete("/v1/sessions/gone")).status_code == 200
        assert (await r.clients[0].get("/v1/sessions/gone")).status_code == 404  # a's copy went with the file
        anonymous = await r.chat(0, TURNS[0], None, first=True)
        sid = anonymous.headers["x-session-id"]
        second = await r.chat(1, TURNS[1], sid)  # continued elsewhere by the id the reply gave
        return reply(anonymous), reply(second), r.syncs[0].live_sessions(), r.syncs[1].live_sessions()

    first, second, live_a, live_b = run(tiny_dir, tmp_path, scenario)
    assert [first, second] == reference(tiny_dir, TURNS[:2])[0]
    assert (live_a, live_b) == (1, 1)  # the anonymous session on each; 'gone' is gone from both


def test_a_reply_that_cannot_be_shared_is_not_kept(tiny_dir, tmp_path):
    """A concurrent writer (another replica advancing the session) wins: 409, and the shared file stays its."""
    competing: dict[str, bytes] = {}

    def wrap(app):
        async def racing(scope, receive, send):
            async def hooked(message):
                if message["type"] == "http.response.body" and not message.get("more_body") and competing.get("go"):
                    SessionFiles(tmp_path).write("s", competing["go"])  # lands between this turn and its push
                await send(message)

            await app(scope, receive, hooked)

        return racing

    async def race(r: Replicas):  # a holds turn 1; b advances to turn 2; a's next turn then races b's write
        reply(await r.chat(0, TURNS[0], "s", first=True))
        reply(await r.chat(1, TURNS[1], "s"))
        competing["go"] = (await r.clients[1].get("/v1/sessions/s/export")).content
        lost = await r.chat(0, TURNS[2], "s")  # a pulls turn 2, answers, then b's write lands first
        competing.pop("go")
        after = await r.clients[0].get("/v1/sessions/s")
        return lost, after.json()

    lost, after = run(tiny_dir, tmp_path, race, wrap=wrap)
    assert lost.status_code == 409 and lost.json()["error"]["code"] == "session_conflict"
    assert after["turns"] == 2  # a dropped its reply and took the winner's version


def test_a_failed_shared_write_drops_the_turn_and_the_session_continues_from_the_last_saved_one(tiny_dir, tmp_path):
    failures = {"left": 0}

    class Flaky(SessionFiles):
        def write(self, session_id: str, data: bytes) -> str:
            if failures["left"]:
                failures["left"] -= 1
                raise OSError("disk full")
            return super().write(session_id, data)

    async def scenario(r: Replicas):
        first = reply(await r.chat(0, TURNS[0], "s", first=True))
        failures["left"] = 1
        failed = await r.chat(0, TURNS[1], "s")
        again = reply(await r.chat(0, TURNS[1], "s"))  # the client retries: as if the failed turn never was
        return first, failed, again

    first, failed, again = run(tiny_dir, tmp_path, scenario, files=Flaky)
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "session_store_unavailable"
    assert [first, again] == reference(tiny_dir, TURNS[:2])[0]


@pytest.mark.parametrize("path", ["/v1/sessions/a%2Fb/export", "/v1/sessions/a%2Fb"])
def test_session_paths_with_a_slash(tiny_dir, tmp_path, path):
    async def scenario(r: Replicas):
        reply(await r.chat(0, TURNS[0], "a/b", first=True))
        return await r.clients[1].get(path)

    response = run(tiny_dir, tmp_path, scenario)
    assert response.status_code == 200


def test_a_replica_checks_host_origin_and_key_once_and_sends_cors_once(tiny_dir, tmp_path):
    from streaming_llm.serving.replicas import ReplicaConfig, replica_app
    from streaming_llm.serving.server import create_app

    config = ReplicaConfig(model=str(tiny_dir), state=str(tmp_path), recent_size=WINDOW, api_key="k",
                           allowed_origins=("http://ok.example",))  # fmt: skip
    model, tokenizer = load(tiny_dir)
    app = create_app(model, tokenizer, recent_size=WINDOW, api_key="k", allowed_origins=config.allowed_origins)
    sync, asgi = replica_app(app, config, "r1")
    body = {"model": "streaming-llm", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://127.0.0.1") as c:
            good = {"Authorization": "Bearer k", "Origin": "http://ok.example", "X-Session-Id": "cors"}
            ok = await c.post("/v1/chat/completions", json=body, headers=good)
            stamp = SessionFiles(tmp_path).stamp("cors")
            no_key = await c.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "cors"})
            bad_origin = await c.post("/v1/chat/completions", json=body, headers={**good, "Origin": "http://evil"})
        await sync.client.aclose()
        await asyncio.to_thread(app.state.server.shutdown, 5)
        return ok, stamp, no_key, bad_origin

    ok, stamp, no_key, bad_origin = asyncio.run(scenario())
    assert ok.status_code == 200 and ok.headers.get_list("access-control-allow-origin") == ["http://ok.example"]
    assert ok.headers["x-replica-id"] == "r1" and stamp is not None
    assert (no_key.status_code, bad_origin.status_code) == (401, 403)
    assert SessionFiles(tmp_path).stamp("cors") == stamp  # refused requests touched nothing
