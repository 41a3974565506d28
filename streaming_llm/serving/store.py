"""Where the server keeps its sessions: streams of the server's engine, a bounded LRU, and (with a state folder) disk.

Every session is a :class:`~streaming_llm.sessions.session.StreamingSession` on the server's one engine:
a row of its cache while resident, a host-memory snapshot when the engine needs the row for another
session (the engine spills the least recently used idle row and restores it on demand). Beyond
``max_sessions`` sessions in memory, the least recently used idle one leaves memory altogether.

With ``state_dir`` every completed turn is written to ``state_dir/sessions/<sha256(id)>.safetensors``
(atomically, see :mod:`streaming_llm.sessions.persistence`) and indexed in ``state_dir/index.sqlite3`` (id,
file, message digest, counters, last update), so a session that left memory comes back from its file
exactly as it was, also after a restart. Without ``state_dir`` a session pushed out of memory is gone
(the next request rebuilds it from its history).

Memory: ``rows`` fixed-size cache rows on the device, at most ``max_sessions`` sessions in all (rows
and host snapshots). The index grows with the number of sessions, never with their length. The lock
guards the bookkeeping that HTTP handlers and the engine's thread share.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..runtime.engine import Engine
from ..sessions.persistence import (
    SessionFileError,
    read_session_file,
    remove_stale_temporaries,
    server_secret,
    write_session_file,
)
from ..sessions.session import StreamingSession

log = logging.getLogger(__name__)


class StateDirError(RuntimeError):
    """The state dir cannot be used (not writable, or its index cannot be created); one line, for the operator."""


@dataclass(eq=False)
class Live:
    """A session in memory, with the digest chain of the messages it has processed.

    Attributes:
        inflight: Requests submitted for it and not done (a session in flight never leaves memory).
        memory: The size of its memory after its last turn (retrieval: passages and index bytes), or None.
    """

    id: str
    session: StreamingSession
    digest: str = ""
    messages: int = 0
    inflight: int = 0
    memory: dict | None = None

    def record_memory(self) -> None:
        """Note the size of the session's memory (on the engine's thread, after a turn)."""
        self.memory = self.session.memory_info()


def chain(digest: str, role: str, content: str) -> str:
    """The digest after one more message (a hash chain: O(1) memory however long the conversation)."""
    return hashlib.sha256(f"{digest}\x00{role}\x00{content}".encode("utf-8", "surrogatepass")).hexdigest()


class SessionStore:
    """Sessions by id: live ones in an LRU of ``max_sessions`` on ``engine``, the rest on disk (with ``state_dir``)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, engine: Engine, max_sessions: int,
                 state_dir: str | Path | None = None):  # fmt: skip
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.model, self.tokenizer, self.engine, self.max_sessions = model, tokenizer, engine, max_sessions
        self.live: OrderedDict[str, Live] = OrderedDict()
        self.claimed: set[str] = set()  # ids an anonymous request has claimed and not yet counted in flight
        self.lock = threading.RLock()
        self.state_dir = Path(state_dir) if state_dir else None
        self.db: sqlite3.Connection | None = None
        self.secret: bytes | None = None  # HMAC key of the files this server writes (state_dir/secret.key)
        if self.state_dir:
            folder = self.state_dir / "sessions"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write-probe.{os.getpid()}.tmp"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as error:
                raise StateDirError(f"the state dir {self.state_dir} is not writable ({error.strerror or error}); "
                                    "give the server a folder it can write") from None  # fmt: skip
            self.secret = server_secret(self.state_dir)
            for stale in remove_stale_temporaries(folder):
                log.warning("removed a stale temporary file: %s", stale)
            self.db = self._open_index(self.state_dir / "index.sqlite3")
            self._rebuild_index()

    @staticmethod
    def _open_index(path: Path) -> sqlite3.Connection:
        """The index, created if missing; a damaged one (not SQLite, truncated, a folder) is moved aside."""
        for attempt in range(2):
            try:
                db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, file TEXT NOT NULL, digest TEXT NOT "
                    "NULL, messages INTEGER NOT NULL, turns INTEGER, seen_tokens INTEGER, evicted_tokens INTEGER, "
                    "cached_tokens INTEGER, cache_bytes INTEGER, updated REAL NOT NULL)"
                )
                db.execute("CREATE INDEX IF NOT EXISTS sessions_digest ON sessions (digest)")
                db.execute("SELECT id, file, digest, messages, updated FROM sessions LIMIT 1").fetchall()
                return db
            except (sqlite3.DatabaseError, OSError) as error:
                if attempt:
                    raise StateDirError(f"cannot create the session index {path} ({error})") from None
                aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
                log.warning("the session index %s is damaged (%s): moved aside to %s; rebuilding it from the "
                            "session files", path, error, aside.name)  # fmt: skip
                os.replace(path, aside)
                for suffix in ("-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def _rebuild_index(self) -> None:
        """Index every session file the index lacks (the files are the truth): a missing or moved-aside index
        hides no session. Files that cannot be read are left in place and logged."""
        assert self.state_dir is not None and self.db is not None
        indexed = {row[0] for row in self.db.execute("SELECT file FROM sessions")}
        added = 0
        for file in sorted((self.state_dir / "sessions").glob("*.safetensors")):
            if file.name in indexed:
                continue
            try:
                state, _ = read_session_file(file, self.model, self.secret)
                server = state["server"]
                row = (str(server["id"]), file.name, str(server["digest"]), int(server["messages"]),
                       int(state.get("turns", 0)), file.stat().st_mtime)  # fmt: skip
            except (SessionFileError, KeyError, TypeError, ValueError, OSError) as error:
                log.warning("session file %s not indexed: %s", file.name, error)
                continue
            self.db.execute("INSERT OR REPLACE INTO sessions (id, file, digest, messages, turns, updated) "
                            "VALUES (?, ?, ?, ?, ?, ?)", row)  # fmt: skip
            added += 1
        if added:
            log.warning("indexed %d session file(s) the index lacked", added)

    def path(self, session_id: str) -> Path:
        assert self.state_dir is not None
        return self.state_dir / "sessions" / f"{hashlib.sha256(session_id.encode()).hexdigest()[:40]}.safetensors"

    # -- lookup --------------------------------------------------------------------------------------------
    def claim_by_digest(self, digest: str, namespace: str = "") -> str | None:
        """Claim the id of an idle session (in memory or on disk) whose processed messages have this digest and
        whose id starts with ``namespace``, or None. A claimed session is not offered again until
        :meth:`release` (call it once the request is counted in the session's ``inflight``), and a session in
        flight is never offered: two concurrent requests with the same history never get the same session."""
        with self.lock:
            candidates = [x.id for x in self.live.values() if x.digest == digest and x.inflight == 0]
            if self.db is not None:
                rows = self.db.execute("SELECT id FROM sessions WHERE digest = ? ORDER BY updated DESC", (digest,))
                candidates += [row[0] for row in rows if row[0] not in self.live]
            for session_id in candidates:
                if session_id.startswith(namespace) and session_id not in self.claimed:
                    self.claimed.add(session_id)
                    return session_id
        return None

    def release(self, session_id: str) -> None:
        """End the claim of :meth:`claim_by_digest` (no-op for an id not claimed)."""
        with self.lock:
            self.claimed.discard(session_id)

    def get(self, session_id: str) -> Live | None:
        """The session (from memory, or restored from disk onto the engine), or None when unknown.

        Raises :class:`SessionFileError` when its file exists but cannot be used.
        """
        with self.lock:
            if session_id in self.live:
                self.live.move_to_end(session_id)
                return self.live[session_id]
        if self.state_dir is None or not self.path(session_id).is_file():
            return None
        path = self.path(session_id)
        try:
            state, tensors = read_session_file(path, self.model, self.secret)
        except SessionFileError as error:  # its message names the file: never show a client a server path
            raise SessionFileError(str(error).replace(str(path), "Its file")) from None
        live = self._restore(session_id, state, tensors, server_required=True)
        self.put(live)
        return live

    def restore(self, session_id: str, state: dict, tensors: dict) -> Live:
        """A new :class:`Live` (a fresh stream of the engine) from a snapshot ``(tensors, state)`` of a session,
        ``state["server"]`` holding its digest and message count; not yet put in memory."""
        return self._restore(session_id, state, tensors, server_required=True)

    def _restore(self, session_id: str, state: dict, tensors: dict, server_required: bool) -> Live:
        try:
            session = StreamingSession.from_state(self.model, self.tokenizer, tensors, state, engine=self.engine,
                                                  name=session_id)  # fmt: skip
            server = state["server"] if server_required else state.get("server", {"digest": "", "messages": 0})
            return Live(session_id, session, str(server["digest"]), int(server["messages"]))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
            raise SessionFileError(f"The stored session {session_id!r} is inconsistent ({error}).") from None

    # -- moving sessions between servers ---------------------------------------------------------------------
    def export(self, session_id: str) -> bytes | None:
        """The session as one session file (what :func:`write_session_file` writes), or None when unknown. Run it
        on the engine's thread (a session in memory is written afresh from its row); one only on disk is its
        file as stored (checked on import)."""
        with self.lock:
            live = self.live.get(session_id)
        if live is None:
            stored = self.path(session_id) if self.state_dir is not None else None
            return stored.read_bytes() if stored is not None and stored.is_file() else None
        with tempfile.TemporaryDirectory(prefix="streaming-llm-export-") as folder:
            return self._write(live, Path(folder) / "session.safetensors").read_bytes()

    def import_(self, session_id: str, data: bytes) -> Live:
        """Make the session file ``data`` the session ``session_id`` (replacing one of that id), and persist it.

        The file gets the checks of a load (format, checksum, model identity, consistency); a file saved by
        :meth:`StreamingSession.save` is taken too (it continues with new messages only). Raises
        :class:`SessionFileError`, and then nothing changes.
        """
        with tempfile.TemporaryDirectory(prefix="streaming-llm-import-") as folder:
            path = Path(folder) / "session.safetensors"
            path.write_bytes(data)
            try:
                state, tensors = read_session_file(path, self.model)
            except SessionFileError as error:
                raise SessionFileError(str(error).replace(str(path), "The uploaded file")) from None
        live = self._restore(session_id, state, tensors, server_required=False)
        self.discard(session_id)
        self.put(live)
        self.persist(live)
        return live

    # -- updates (worker thread) -----------------------------------------------------------------------------
    def put(self, live: Live) -> None:
        """Make ``live`` the most recent session in memory; beyond ``max_sessions`` the least recent idle ones
        leave memory (their files stay)."""
        with self.lock:
            old = self.live.pop(live.id, None)
            if old is not None and old is not live:
                self._forget(old)
            self.live[live.id] = live
            idle = [x for x in self.live.values() if x.inflight == 0 and x is not live]
            while len(self.live) > self.max_sessions and idle:
                gone = idle.pop(0)
                del self.live[gone.id]  # already on disk (every turn is), or dropped
                self._forget(gone)

    def _forget(self, live: Live) -> None:
        """Free the session's row (or snapshot) on the engine's thread."""
        stream = live.session.stream
        self.engine.call_soon(lambda: self.engine.close(stream))

    def update_digest(self, live: Live, digest: str, messages: int) -> None:
        with self.lock:
            live.digest, live.messages = digest, messages

    def persist(self, live: Live) -> None:
        """Write the session's state to its file and the index (no-op without ``state_dir``)."""
        if self.state_dir is None or self.db is None:
            return
        path = self.path(live.id)
        # The file and the index change together or not at all: the previous file is kept (a hard link named
        # like a temporary, so a crash leaves nothing that start-up does not remove) until the index is updated.
        backup = path.with_name(f".{path.name}.{os.getpid()}.previous.tmp")
        backup.unlink(missing_ok=True)
        had = path.is_file()
        if had:
            os.link(path, backup)
        try:
            self._write(live, path)
            self._index(live, path)
        except BaseException:
            if had:
                os.replace(backup, path)
            else:
                path.unlink(missing_ok=True)
            raise
        finally:
            backup.unlink(missing_ok=True)

    def _index(self, live: Live, path: Path) -> None:
        """Record ``live`` (written to ``path``) in the index."""
        assert self.db is not None
        stats = live.session.stats(recorded=True)
        with self.lock:
            self.db.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (live.id, path.name, live.digest, live.messages, stats.turns, stats.seen_tokens, stats.evicted_tokens,
                 stats.cached_tokens, stats.cache_bytes, time.time()),
            )  # fmt: skip

    def _write(self, live: Live, path: Path) -> Path:
        tensors, state = live.session.state()
        state["server"] = {"id": live.id, "digest": live.digest, "messages": live.messages}
        return write_session_file(path, tensors, state, self.model, self.secret)

    def discard(self, session_id: str) -> None:
        """Forget the in-memory copy (e.g. after a failure); the file, if any, stays."""
        with self.lock:
            live = self.live.pop(session_id, None)
            if live is not None:
                self._forget(live)

    # -- for the HTTP handlers ---------------------------------------------------------------------------------
    def describe(self, session_id: str) -> dict | None:
        with self.lock:
            if session_id in self.live:
                live = self.live[session_id]
                return {"id": session_id, "object": "session", "in_memory": True, "messages": live.messages,
                        **live.session.stats_dict(recorded=True), "memory": live.memory}  # fmt: skip
            if self.db is None:
                return None
            row = self.db.execute(
                "SELECT id, messages, turns, seen_tokens, evicted_tokens, cached_tokens, cache_bytes, updated "
                "FROM sessions WHERE id = ?", (session_id,),
            ).fetchone()  # fmt: skip
        if row is None:
            return None
        keys = ("id", "messages", "turns", "seen_tokens", "evicted_tokens", "cached_tokens", "cache_bytes", "updated")
        return {"object": "session", "in_memory": False, **dict(zip(keys, row, strict=True))}

    def ids(self) -> list[str]:
        with self.lock:
            ids = list(self.live)
            if self.db is not None:
                rows = self.db.execute("SELECT id FROM sessions ORDER BY updated DESC")
                ids += [row[0] for row in rows if row[0] not in ids]
        return ids

    def delete(self, session_id: str) -> bool:
        """Remove a session from memory, disk and the index; False when it did not exist."""
        with self.lock:
            found = session_id in self.live
            self.discard(session_id)
            if self.db is not None:
                found |= self.db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0
                path = self.path(session_id)
                found |= path.is_file()
                path.unlink(missing_ok=True)
        return found

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
