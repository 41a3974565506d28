"""Connection-level limits uvicorn does not have: a deadline for a request's headers, and a cap on the
connections one client address may hold open.

uvicorn takes the HTTP protocol class to run (``uvicorn.Config(http=...)``); :func:`guarded_h11` returns a
subclass of its own h11 protocol that adds both, so parsing, keep-alive and flow control stay uvicorn's.
A connection that has not delivered a whole request head within ``header_timeout`` seconds of opening (or of
its previous response) gets a ``408`` and is closed (slowloris); a client address already holding
``max_per_client`` connections has its next one answered ``429`` and closed. Bodies are bounded by the
server's ``--body-timeout`` (see :mod:`streaming_llm.serving.server`).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_h11(header_timeout: float | None, max_per_client: int | None) -> type[H11Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` with a header deadline and a per-client cap.

    Args:
        header_timeout: Seconds a connection may take to send a request head (None: no deadline).
        max_per_client: Most connections open at once from one client IP address (None: no cap).

    The per-address counts live in the returned class (one class per server), not in this module.
    """
    open_by_client: Counter[str] = Counter()

    class GuardedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _counted: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else None
            if max_per_client is not None and host is not None:
                if open_by_client[host] >= max_per_client:
                    self._refuse(429, "too_many_connections", f"This address already holds {max_per_client} open "
                                 "connections (--max-connections-per-client).")  # fmt: skip
                    return
                open_by_client[host] += 1
                self._counted = host
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request head has arrived (or the connection ended)
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's head is due in time too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._counted is not None:
                open_by_client[self._counted] -= 1
                if open_by_client[self._counted] <= 0:
                    del open_by_client[self._counted]
                self._counted = None
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if header_timeout is not None and not self.transport.is_closing():
                self._deadline = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE:  # no whole request head yet
                self._refuse(408, "header_timeout", f"The request head did not arrive within {header_timeout:g} s "
                             "(--header-timeout).")  # fmt: skip

        def _refuse(self, status: int, code: str, message: str) -> None:
            """Answer in OpenAI's error shape and close (the connection carries no request to answer otherwise)."""
            body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                         "code": code}}).encode()  # fmt: skip
            reason = {408: "Request Timeout", 429: "Too Many Requests"}[status]
            extra = "retry-after: 1\r\n" if status == 429 else ""
            head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                    f"{extra}connection: close\r\n\r\n")  # fmt: skip
            self.transport.write(head.encode() + body)
            self.transport.close()

    return GuardedH11
