"""Connection limits of the server (``--header-timeout``, ``--max-connections-per-client``) on a real uvicorn on
loopback: the protocol class :func:`streaming_llm.serving.connections.guarded_h11` that ``serve`` gives uvicorn,
serving a minimal ASGI app (the limits act before any request reaches the app)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

uvicorn = pytest.importorskip("uvicorn")

from streaming_llm.serving.connections import guarded_h11  # noqa: E402


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


class Running:
    def __init__(self, header_timeout, max_per_client):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(hello, host="127.0.0.1", port=self.port, log_level="warning",
                                http=guarded_h11(header_timeout, max_per_client))  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def read_until_closed(sock: socket.socket, limit: float = 10.0) -> bytes:
    sock.settimeout(limit)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


def test_a_request_head_sent_too_slowly_gets_a_408_in_time_and_keep_alive_requests_are_not_cut():
    running = Running(header_timeout=0.5, max_per_client=None)
    try:
        with socket.create_connection(("127.0.0.1", running.port)) as slow:
            began = time.monotonic()
            slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends (slowloris)
            raw = read_until_closed(slow)
            took = time.monotonic() - began
        status, error = status_and_error(raw)
        assert status == 408 and error["code"] == "header_timeout" and "--header-timeout" in error["message"]
        assert 0.4 <= took < 2.0, took
        # One keep-alive connection, three requests 0.35 s apart (1 s in all, twice the deadline): each head is
        # due 0.5 s after the previous response, so all are answered.
        with httpx.Client(base_url=f"http://127.0.0.1:{running.port}") as client:
            answers = []
            for _ in range(3):
                answers.append(client.get("/").status_code)
                time.sleep(0.35)
        assert answers == [200, 200, 200]
    finally:
        running.stop()


def test_one_address_holds_at_most_its_cap_of_connections_and_a_freed_one_is_reusable():
    running = Running(header_timeout=None, max_per_client=2)
    try:
        first = socket.create_connection(("127.0.0.1", running.port))
        second = socket.create_connection(("127.0.0.1", running.port))
        time.sleep(0.3)  # both accepted and counted
        with socket.create_connection(("127.0.0.1", running.port)) as third:
            status, error = status_and_error(read_until_closed(third))
        assert status == 429 and error["code"] == "too_many_connections"
        second.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert read_until_closed(second).startswith(b"HTTP/1.1 200")  # the connections under the cap work
        first.close()
        second.close()
        time.sleep(0.3)  # the server has seen both close
        assert httpx.get(f"http://127.0.0.1:{running.port}/").status_code == 200
    finally:
        running.stop()
