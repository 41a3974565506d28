"""The one object through which the server does model work: jobs in, token events out.

Contract (what any engine must honour, e.g. a continuous-batching scheduler that decodes many sessions
in one forward; this one runs everything on a single worker thread):

- ``submit(job) -> Ticket`` never blocks. It raises :class:`QueueFull` when ``max_queue`` jobs are
  already running or waiting (the server answers 429), and :class:`EngineStopped` after shutdown.
- A :class:`Job` names a ``session_id`` (None for stateless text completions) and a ``work`` factory:
  ``work()`` returns an iterator whose every ``next()`` is one small step of model work (feeding a
  prompt, or exactly one sampled token) and which yields the events below. A batching scheduler would
  take the same job description (session, new messages, sampling, limits) and step many sessions per
  forward instead of calling ``next()`` on one iterator at a time.
- ``Ticket.events()`` is an async iterator of the events a job yields, in order:
  :class:`~streaming_llm.runtime.generation.GenerationChunk` pieces, then exactly one final item: a
  :class:`Done` (usage) or an exception (:class:`JobCancelled`, :class:`JobTimeout`, or whatever the
  work raised, e.g. ``ValueError`` for bad input found late).
- Jobs for the same ``session_id`` run one after another in submission order; jobs for different
  sessions interleave one step at a time (round robin), so no request holds the model for longer than
  one step while others wait.
- ``Ticket.cancel()`` (client gone) and the job's ``deadline`` (per-request timeout) stop the job
  before its next step: its iterator is closed, which closes the session's turn consistently (and the
  work persists it), then the final event is :class:`JobCancelled` / :class:`JobTimeout`.
- ``shutdown(timeout)`` refuses new jobs, cancels running and waiting ones (each still closes and
  persists its turn), and joins the worker within ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many jobs are running or waiting; try again later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no more jobs."""


class JobCancelled(RuntimeError):
    """The job was cancelled (client disconnected, or the server is shutting down)."""


class JobTimeout(TimeoutError):
    """The job ran past its deadline."""


@dataclass(frozen=True)
class Done:
    """The last event of a successful job."""

    usage: dict[str, int]
    session_id: str | None = None


@dataclass
class Job:
    """A unit of model work: ``work()`` yields events, one small step per ``next()``."""

    session_id: str | None
    work: Callable[[], Iterator[object]]
    deadline: float | None = None  # time.monotonic() by which the job must end


@dataclass(eq=False)
class Ticket:
    """The handle of a submitted job: read its events, or cancel it."""

    job: Job
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the job before its next step (idempotent, from any thread)."""
        if not self.cancelled.is_set():
            self.reason = reason
            self.cancelled.set()

    def _put(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop (server gone): nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def events(self) -> AsyncIterator[object]:
        """The job's events; the last one is a :class:`Done` or an exception instance."""
        while True:
            item = await self.queue.get()
            yield item
            if isinstance(item, Done | BaseException):
                return


class Engine:
    """Single-worker engine: serialises model calls, interleaving sessions token by token.

    Args:
        max_queue: Most jobs running or waiting at once; more raise :class:`QueueFull`.
    """

    def __init__(self, max_queue: int = 64):
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue[Ticket | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._count = 0  # tickets submitted and not finished
        self._stopping = False
        self._all: set[Ticket] = set()
        self._last: dict[Ticket, object] = {}  # each running job's latest event (worker thread only)
        self._thread = threading.Thread(target=self._run, name="streaming-llm-engine", daemon=True)
        self._thread.start()

    @property
    def load(self) -> int:
        """Jobs running or waiting."""
        return self._count

    def submit(self, job: Job) -> Ticket:
        """Queue ``job``; call from the event loop that will read the ticket's events."""
        ticket = Ticket(job, asyncio.get_running_loop())
        with self._lock:
            if self._stopping:
                raise EngineStopped("The server is shutting down.")
            if self._count >= self.max_queue:
                raise QueueFull(f"The server is busy ({self._count} requests running or waiting); retry later.")
            self._count += 1
            self._all.add(ticket)
        self._inbox.put(ticket)
        return ticket

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel everything, let each job close (and persist) its turn, and stop the worker."""
        with self._lock:
            self._stopping = True
            tickets = list(self._all)
        for ticket in tickets:
            ticket.cancel("shutdown")
        self._inbox.put(None)
        self._thread.join(timeout)

    # -- the worker --------------------------------------------------------------------------------------
    def _run(self) -> None:
        waiting: deque[Ticket] = deque()  # in submission order
        running: dict[Ticket, Iterator[object] | None] = {}  # iterator created on first step
        busy: set[str] = set()
        stop = False
        while not (stop and not waiting and not running):
            # Take new tickets: block only when there is nothing to do.
            try:
                item = self._inbox.get(timeout=None if not (waiting or running or stop) else 0)
                while True:
                    if item is None:
                        stop = True
                    else:
                        waiting.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            # Start waiting jobs whose session is free (same-session jobs keep their order).
            blocked: set[str] = set()
            for ticket in list(waiting):
                sid = ticket.job.session_id
                if sid is not None and (sid in busy or sid in blocked):
                    blocked.add(sid)
                    continue
                waiting.remove(ticket)
                running[ticket] = None
                if sid is not None:
                    busy.add(sid)
            self._step_all(running, busy)

    def _step_all(self, running: dict, busy: set[str]) -> None:
        """One step of every running job, round robin."""
        for ticket in list(running):
            self._advance(ticket, running, busy)

    def _advance(self, ticket: Ticket, running: dict, busy: set[str]) -> None:
        event, ended = self._step(ticket, running)
        if ended:
            del running[ticket]
            if ticket.job.session_id is not None:
                busy.discard(ticket.job.session_id)
            self._finish(ticket)  # counted as finished before its last event is seen
        ticket._put(event)
        self._last[ticket] = event
        if ended:
            self._last.pop(ticket, None)

    def _ending(self, ticket: Ticket) -> bool:
        """Whether the job's next step ends it (cancelled, or past its deadline)."""
        deadline = ticket.job.deadline
        return ticket.cancelled.is_set() or (deadline is not None and time.monotonic() > deadline)

    def _step(self, ticket: Ticket, running: dict) -> tuple[object, bool]:
        """Advance one job by one step: ``(event, ended)``; an ended job's event is its final one."""
        job = ticket.job
        expired = job.deadline is not None and time.monotonic() > job.deadline
        if ticket.cancelled.is_set() or expired:
            iterator = running[ticket]
            try:
                if iterator is not None:
                    iterator.close()  # closes the turn (and persists it) as far as it got
            except Exception as error:  # pragma: no cover - closing should not fail
                log.exception("closing a cancelled job failed")
                return error, True
            if expired and not ticket.cancelled.is_set():
                return JobTimeout("The request ran past the server's time limit (--request-timeout)."), True
            return JobCancelled(f"The request was cancelled ({ticket.reason})."), True
        try:
            if running[ticket] is None:
                running[ticket] = job.work()
            event = next(running[ticket])
        except StopIteration:
            return RuntimeError("The job ended without a result."), True
        except Exception as error:
            return error, True
        if isinstance(event, Done):
            running[ticket].close()
            return event, True
        return event, False

    def _finish(self, ticket: Ticket) -> None:
        ticket.finished.set()
        with self._lock:
            self._count -= 1
            self._all.discard(ticket)


class BatchingEngine(Engine):
    """Continuous batching: every iteration, the jobs about to feed one sampled token to a row of
    ``decoder.cache`` (a :class:`~streaming_llm.core.slots.SlotCache`) are fed together in one batched
    forward; then every job takes its step as in :class:`Engine` (prompt feeding stays per job, each
    session samples its own row's logits). The work runs a session on row ``b`` of that cache
    (``cache.row(b)`` as its cache) and records ``engine.rows[session_id] = b`` while it does; tokens for
    other caches are fed one job at a time as before.

    Args:
        decoder: The :class:`~streaming_llm.core.slots.BatchedDecoder` over the rows.
        max_queue: As in :class:`Engine`.
    """

    def __init__(self, decoder, max_queue: int = 64):
        self.decoder = decoder
        self.batched_steps = self.batched_tokens = 0  # batched forwards, and tokens they fed
        self.rows: dict[str | None, int] = {}  # session id -> its row while a job of it runs (set by the work)
        super().__init__(max_queue)

    def _step_all(self, running: dict, busy: set[str]) -> None:
        from ..runtime.generation import HANDOFF, GenerationChunk

        # Jobs that end now never feed their pending token (as in Engine): end them first.
        for ticket in [t for t in running if self._ending(t)]:
            self._advance(ticket, running, busy)
        cache = self.decoder.cache
        tokens: dict[int, int] = {}
        for ticket in running:
            event = self._last.get(ticket)
            if not isinstance(event, GenerationChunk) or event.finish_reason or event.token_id is None:
                continue  # the next step feeds a prompt, or ends the reply: no sampled token to feed
            b = self.rows.get(ticket.job.session_id)
            if b is None or b in cache.free:
                continue
            row = cache.row(b)
            pending = HANDOFF.pending.get(id(row))
            if pending is not None and pending[0] is row and pending[1] == event.token_id:
                tokens[b] = pending[1]
        if tokens:
            self.batched_steps += 1
            self.batched_tokens += len(tokens)
            try:
                logits = self.decoder(tokens)
                results: dict[int, object] = {b: logits[b].clone() for b in tokens}
            except Exception as error:  # every row of the step may be half-updated: its sessions break
                log.exception("a batched decode step failed")
                results = dict.fromkeys(tokens, error)
            for b, result in results.items():
                HANDOFF.ready[id(cache.row(b))] = (cache.row(b), result)
        try:
            super()._step_all(running, busy)
        finally:
            HANDOFF.ready.clear()
