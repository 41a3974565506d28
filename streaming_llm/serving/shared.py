"""Sessions shared by many server processes: their files in one place, and the layer that keeps each process in step.

Each replica (one server process among several, see :mod:`streaming_llm.serving.replicas`) keeps the
sessions it serves in memory, as the single-process server does. :class:`SessionSync` wraps its HTTP
app so that the session files in one shared place (:class:`SessionFiles`: a folder, or an fsspec URL
such as ``s3://bucket/prefix``) are the truth:

- Before a request that names a session, the replica's copy is checked against the stamp of the shared
  file (fsspec's ``ukey``: one ``stat``, or one HEAD on an object store). When it is missing (this
  replica never held the session, or let it go) or stale (another replica advanced the session since),
  the shared file is imported first, with the checks of a load.
- After a request that may have changed the session (a chat turn, an import), and before the last
  bytes of its response go out, the session is exported and written to the shared place. A reply that
  has completed is therefore durable: a replica that dies afterwards loses nothing. If the shared file
  changed meanwhile (another replica advanced the same session at the same time), nothing is written,
  the replica drops its copy, and the reply ends in a 409 instead (for a stream: an error event).
- A delete removes the shared file too.

It works only through the server's HTTP API (``GET /v1/sessions/{id}``, ``GET /v1/sessions/{id}/export``,
``PUT /v1/sessions/{id}``), called in-process, so it does not depend on how the server keeps sessions.
Requests name their session with ``X-Session-Id`` (or the body's ``user``); a chat request without
one gets a new session, which is shared under the id returned in the reply's ``X-Session-Id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import fsspec
import httpx
from fastapi.responses import JSONResponse

from .schemas import error_response

log = logging.getLogger(__name__)
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Statuses after which a chat request may have changed its session (a reply, or a turn closed early and kept).
CHANGED = {200, 503, 504}


class SessionFiles:
    """Session files in one shared place, named like the server's own (``sessions/<sha256(id)>.safetensors``).

    Args:
        location: A folder, or any fsspec URL (``s3://bucket/prefix``, ``gs://...``; the matching fsspec
            package, e.g. ``s3fs``, must be installed). Writes to a folder are atomic (temporary file,
            fsync, rename); an object store's single PUT is atomic by itself.
    """

    def __init__(self, location: str | os.PathLike):
        self.fs, root = fsspec.core.url_to_fs(str(location))
        self.root = f"{root.rstrip('/')}/sessions"
        self.local = "file" in self.fs.protocol
        if self.local:  # an object store's folders are only prefixes
            self.fs.makedirs(self.root, exist_ok=True)

    def path(self, session_id: str) -> str:
        return f"{self.root}/{hashlib.sha256(session_id.encode()).hexdigest()[:40]}.safetensors"

    def stamp(self, session_id: str) -> str | None:
        """What identifies the file's current version (it changes with every write), or None when absent."""
        path = self.path(session_id)
        self.fs.invalidate_cache(path)
        try:
            return self.fs.ukey(path)
        except FileNotFoundError:
            return None

    def read(self, session_id: str, attempts: int = 3) -> tuple[bytes, str] | None:
        """``(data, stamp)`` of one version of the file (re-read if it changed while read), or None when absent."""
        for _ in range(attempts):
            before = self.stamp(session_id)
            if before is None:
                return None
            try:
                data = self.fs.cat_file(self.path(session_id))
            except FileNotFoundError:
                return None
            if self.stamp(session_id) == before:
                return data, before
        raise OSError(f"the shared file of session {session_id!r} kept changing while it was read")

    def write(self, session_id: str, data: bytes) -> str:
        """Replace the file with ``data`` (atomically); return its new stamp."""
        path = self.path(session_id)
        if not self.local:
            self.fs.pipe_file(path, data)
            return self.stamp(session_id) or ""
        folder, name = os.path.split(path)
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return self.stamp(session_id) or ""

    def delete(self, session_id: str) -> bool:
        """Remove the file; False when there was none."""
        try:
            self.fs.rm_file(self.path(session_id))
        except FileNotFoundError:
            return False
        return True


class SessionSync:
    """ASGI layer around the server's app that keeps its sessions in step with :class:`SessionFiles`.

    Put it inside the :class:`~streaming_llm.serving.guard.Guard` (so that only authorised requests
    touch the shared files) and give it the server's ``api_key`` for its own in-process calls.

    Args:
        app: The server's ASGI app (:func:`~streaming_llm.serving.server.create_app`, without a state folder:
            the shared files are its only storage).
        files: Where the sessions live.
        api_key: The server's API key, if any.
        replica: A name returned in every response's ``X-Replica-Id`` header (None: no header).
        idle_after: Seconds after its last request that a session stops counting as live here.
        max_body_bytes: Largest chat body read to find the ``user`` field (larger ones are the server's 413).
    """

    def __init__(self, app, files: SessionFiles, *, api_key: str | None = None, replica: str | None = None,
                 idle_after: float = 300.0, max_body_bytes: int = 1 << 20):  # fmt: skip
        self.app, self.files, self.replica = app, files, replica
        self.idle_after, self.max_body_bytes = idle_after, max_body_bytes
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1",
                                        headers=headers, timeout=None)  # fmt: skip
        self.known: OrderedDict[str, str] = OrderedDict()  # session -> stamp of the shared file our copy equals
        self.max_known = 1 << 16
        self.served: OrderedDict[str, float] = OrderedDict()  # session -> time of its last request here
        self.locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # -- what the replica reports ------------------------------------------------------------------------
    def live_sessions(self) -> int:
        """Sessions that had a chat turn (or an import) here within ``idle_after`` seconds, and still exist."""
        horizon = time.monotonic() - self.idle_after
        while self.served and next(iter(self.served.values())) < horizon:
            self.served.popitem(last=False)
        return len(self.served)

    # -- ASGI ------------------------------------------------------------------------------------------------
    async def __call__(self, scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._tag(send)
        method, path = scope["method"], _route_path(scope)
        session_id = _path_session(path)
        if method == "POST" and path == "/v1/chat/completions":
            body, receive = await _buffered(receive, self.max_body_bytes)
            session_id = _header(scope, b"x-session-id") or _user(body)
            return await self._guarded(session_id, scope, receive, send, pull=True, push="chat")
        if session_id is None or method not in ("GET", "PUT", "DELETE"):
            return await self.app(scope, receive, send)
        push = {"GET": None, "PUT": "import", "DELETE": "delete"}[method]
        return await self._guarded(session_id, scope, receive, send, pull=method == "GET", push=push)

    async def _guarded(self, session_id: str | None, scope, receive: Receive, send: Send, *, pull: bool,
                       push: str | None) -> None:  # fmt: skip
        if session_id is None:  # a new anonymous session: its id comes with the reply
            return await self._forward(None, scope, receive, send, push)
        if push in ("chat", "import"):
            self._touch(session_id)
        lock = self.locks.get(session_id)
        if lock is None:
            lock = self.locks[session_id] = asyncio.Lock()
        async with lock:
            problem = await self._pull(session_id) if pull else None
            if problem is not None:
                return await problem(scope, receive, send)
            await self._forward(session_id, scope, receive, send, push)

    async def _forward(self, session_id: str | None, scope, receive: Receive, send: Send, push: str | None) -> None:
        """Run the app; before its last response message, make the session durable (``push``)."""
        start: Message | None = None
        streaming = finished = False

        async def finish() -> object:
            nonlocal finished
            finished = True
            status = start["status"] if start else 500
            sid = (_header(start, b"x-session-id") if start else None) or session_id
            if push is None or sid is None:
                return None
            if session_id is None:
                self._touch(sid)
            if push == "delete":
                return await self._push_delete(sid, status)
            if push == "chat" and status not in CHANGED:
                return None
            return await self._push(sid, check=push == "chat")

        async def intercept(message: Message) -> None:
            nonlocal start, streaming
            if message["type"] == "http.response.start":
                start = message  # held until we know whether the reply is a stream
                return
            if message["type"] != "http.response.body" or finished:
                return await send(message)
            if message.get("more_body", False):
                if start is not None and not streaming:
                    streaming = True
                    await send(start)
                return await send(message)
            problem = await finish()  # None, a replacement (status < 400) or an error response
            if problem is None:
                if not streaming and start is not None:
                    await send(start)
                return await send(message)
            if streaming and problem.status_code >= 400:  # the tokens are out: end the stream with an error event
                detail = json.loads(problem.body)["error"]
                await send({"type": "http.response.body", "body": f"data: {json.dumps({'error': detail})}\n\n".encode(),
                            "more_body": True})  # fmt: skip
                return await send(message)
            return await problem(scope, receive, send)

        try:
            await self.app(scope, receive, intercept)
        finally:
            if not finished:  # the app ended without a last message (e.g. cancelled): keep what it kept
                await asyncio.shield(finish())

    # -- in step with the shared files -------------------------------------------------------------------
    async def _pull(self, session_id: str):
        """Make this replica's copy the shared one; None, or an error response."""
        try:
            stamp = await asyncio.to_thread(self.files.stamp, session_id)
            have = (await self.client.get(_url(session_id))).status_code == 200
            if have and stamp is not None and self.known.get(session_id) == stamp:
                return None
            found = await asyncio.to_thread(self.files.read, session_id) if stamp is not None else None
        except OSError as error:
            return _unavailable(session_id, error)
        if found is None:  # not shared (anymore): a copy we had shared was deleted elsewhere
            if have and session_id in self.known:
                await self._drop(session_id)
            return None
        data, stamp = found
        imported = await self.client.put(_url(session_id), content=data,
                                         headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        if imported.status_code != 200:
            message = imported.json().get("error", {}).get("message", imported.text)
            return error_response(409, f"The shared copy of session {session_id!r} cannot be used: {message} "
                                       "Delete it (DELETE /v1/sessions/{id}) to start over.",
                                  code="session_unreadable")  # fmt: skip
        self._remember(session_id, stamp)
        return None

    async def _push(self, session_id: str, check: bool):
        """Write this replica's copy to the shared place; None, or an error response.

        With ``check``, only if the shared file is still the version this copy came from.
        """
        exported = await self.client.get(f"{_url(session_id)}/export")
        if exported.status_code == 404:
            return None  # nothing here (e.g. a failed turn dropped it): the shared file stays the truth
        try:
            if exported.status_code != 200:
                raise OSError(f"export failed with {exported.status_code}: {exported.text[:200]}")
            if check and await asyncio.to_thread(self.files.stamp, session_id) != self.known.get(session_id):
                await self._drop(session_id)
                return error_response(409, f"Session {session_id!r} was changed by another replica during this "
                                           "request, so this reply was not kept; send the message again.",
                                      code="session_conflict")  # fmt: skip
            stamp = await asyncio.to_thread(self.files.write, session_id, exported.content)
        except OSError as error:
            await self._drop(session_id)
            return _unavailable(session_id, error)
        self._remember(session_id, stamp)
        return None

    async def _push_delete(self, session_id: str, status: int):
        try:
            existed = await asyncio.to_thread(self.files.delete, session_id)
        except OSError as error:
            return _unavailable(session_id, error)
        self.known.pop(session_id, None)
        self.served.pop(session_id, None)
        if status == 404 and existed:  # it was only in the shared place: that was the session, now deleted
            return JSONResponse({"id": session_id, "object": "session.deleted", "deleted": True})
        return None

    async def _drop(self, session_id: str) -> None:
        """Forget this replica's copy (the server's DELETE; no state folder, so memory only)."""
        self.known.pop(session_id, None)
        self.served.pop(session_id, None)
        await self.client.delete(_url(session_id))

    def _remember(self, session_id: str, stamp: str) -> None:
        self.known[session_id] = stamp
        self.known.move_to_end(session_id)
        while len(self.known) > self.max_known:  # forgetting only costs a re-import
            self.known.popitem(last=False)

    def _touch(self, session_id: str) -> None:
        self.served[session_id] = time.monotonic()
        self.served.move_to_end(session_id)

    def _tag(self, send: Send) -> Send:
        if self.replica is None:
            return send

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-replica-id", self.replica.encode())],
                }
            await send(message)

        return tagged


# -- helpers ---------------------------------------------------------------------------------------------------
def _url(session_id: str) -> str:
    return f"/v1/sessions/{quote(session_id, safe='')}"


def _route_path(scope) -> str:
    """The path the app routes on: without the ``root_path`` a mount or a route prefix put before it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def _path_session(path: str) -> str | None:
    """The session a ``/v1/sessions/{id}`` or ``/v1/sessions/{id}/export`` path names (None: another path)."""
    prefix = "/v1/sessions/"
    if not path.startswith(prefix) or len(path) == len(prefix):
        return None
    rest = path[len(prefix) :]
    return rest.removesuffix("/export") or None


def _header(scope_or_message: dict, name: bytes) -> str | None:
    for key, value in scope_or_message.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1") or None
    return None


def _user(body: bytes) -> str | None:
    try:
        user = json.loads(body).get("user")
    except (ValueError, AttributeError, RecursionError):
        return None
    return user if isinstance(user, str) and user else None


async def _buffered(receive: Receive, limit: int) -> tuple[bytes, Receive]:
    """Read the request body (up to ``limit`` bytes, then stop); return it and a ``receive`` that replays it."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        if not message.get("more_body", False) or size > limit:
            break
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return body, replay


def _unavailable(session_id: str, error: OSError):
    log.error("shared session store failed for %r: %s", session_id, error)
    return error_response(503, f"The shared session store is unavailable ({error}); try again.", "server_error",
                          code="session_store_unavailable")  # fmt: skip
