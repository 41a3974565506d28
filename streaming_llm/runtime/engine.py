"""The engine: the one loop every surface runs on (``stream_generate``, sessions, the server).

An :class:`Engine` owns a model, a :class:`~streaming_llm.core.cache.StreamingCache` with rows and a
:class:`~streaming_llm.core.stepper.Stepper`. Work comes as :class:`Request` objects on
:class:`Stream` objects (one endless token stream each: a row of the cache while it is resident, a
host snapshot while it is spilled). Each :meth:`Engine.step`:

1. ends requests that were cancelled or ran past their deadline (their closing tokens are still fed,
   so a session's turn always closes consistently);
2. admits waiting requests, at most one per stream, in submission order; a stream that is not resident
   gets a row, spilling the least recently used idle stream to host memory when every row is taken;
3. feeds prompt chunks, oldest request first, at most ``chunk_size`` tokens in all per step (so many
   short prompts start together, and a long prompt delays the others by one chunk per step, never by
   the whole prompt);
4. runs one batched decode step for every request that is generating, and samples each row's token.

Requests go through three phases: *feed* the prompt (any tokens the stream still owes first), then
*generate* up to ``max_new_tokens`` tokens (each sampled token is fed at the next decode step, except
the last one), then feed the *tail* its ``on_finish`` callback returns (a chat template's closing
tokens, the last generated token). Callbacks run on the thread that steps the engine.

Drive it with :meth:`Engine.run` (synchronously, until a request is done: what ``stream_generate`` and
sessions do) or from one worker thread (:meth:`Engine.serve_forever`, what the server does); requests
can be submitted and cancelled from any thread. There is no module-level state: everything lives in
the engine and its requests.

The sampling rule, the same on every surface: the repetition penalty and DRY look at the last
``penalty_window`` (``dry_window``) tokens of the stream's context, prompt, system prompt, ingested text
and generated tokens alike (llama.cpp's ``repeat_last_n``): every token fed to a stream is shown to its
sampler.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from ..core.cache import CacheState, RowStats, StreamingCache, check_int
from ..core.stepper import Stepper
from .sampling import Sampler, SamplingConfig, greedy_picks

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no more requests."""


class StreamBrokenError(RuntimeError):
    """The stream cannot continue: a forward failed while it was fed, so its row may be half-updated."""


def auto_chunk_size(model: PreTrainedModel, capacity: int) -> int:
    """Prefill chunk size from free memory: on CUDA the largest power of two (256..8192) whose activations
    (about ``24 * hidden_size`` bytes per token per layer in flight, plus the banded working set) fit in a
    quarter of the free device memory; on the CPU 512 (larger chunks gain nothing on few cores)."""
    if model.device.type != "cuda":
        return PREFILL_CHUNK
    free, _ = torch.cuda.mem_get_info(model.device)
    hidden = model.config.hidden_size
    per_token = 24 * hidden * model.dtype.itemsize + 4 * model.config.num_attention_heads * capacity
    size = 8192
    while size > 256 and size * per_token > free // 4:
        size //= 2
    return size


class Stream:
    """One endless token stream on an engine: a row of its cache while resident, a host snapshot while spilled.

    Attributes:
        name: A label (the session id, say), used in messages.
        sampler: Picks its tokens and remembers its recent context (see the module's sampling rule).
        last_logits: Next-token logits ``(vocab,)`` after the last token fed (None before any).
        broken: Why the stream cannot continue, or None.
        stats: Its :class:`~streaming_llm.core.cache.RowStats` after its last request (a consistent snapshot
            any thread may read), None before its first.
    """

    def __init__(self, name: str, start_size: int, sampler: Sampler):
        self.name, self.start_size, self.sampler = name, start_size, sampler
        self.row: int | None = None
        self.last_logits: torch.Tensor | None = None
        self.broken: str | None = None
        self.stats: RowStats | None = None
        self._snapshot: CacheState | None = None  # while spilled (or before its first residency)
        self._owed: list[int] = []  # tokens to feed before its next request's prompt
        self._last_used = 0
        self._busy = False

    @property
    def resident(self) -> bool:
        return self.row is not None

    def use_sampling(self, config: SamplingConfig, tokenizer=None) -> None:
        """Sample the next tokens with ``config``, keeping the recent context (and the seed's stream when
        ``config`` is the same)."""
        if config == self.sampler.config:
            return
        recent = list(self.sampler.recent)
        self.sampler = Sampler(config, device=self.sampler.device, tokenizer=tokenizer or self.sampler.tokenizer)
        self.sampler.observe(recent)

    def restore_logits(self, logits: torch.Tensor) -> None:
        """Set :attr:`last_logits` (restoring a saved stream)."""
        self.last_logits = logits

    # -- changed by the engine through these methods only ------------------------------------------
    def _bind(self, row: int | None, snapshot: CacheState | None = None) -> None:
        self.row, self._snapshot = row, snapshot

    def owe(self, ids: list[int]) -> None:
        """Tokens to feed before the next request's prompt (a system prompt rendered ahead, say)."""
        self._owed = list(ids)

    def _take_owed(self) -> list[int]:
        owed, self._owed = self._owed, []
        return owed

    def _touch(self, clock: int, busy: bool) -> None:
        self._last_used, self._busy = clock, busy

    def _fed(self, ids: list[int], logits: torch.Tensor) -> None:
        self.sampler.observe(ids)
        self.last_logits = logits

    def _break(self, why: str) -> None:
        self.broken = why

    def _record(self, stats: RowStats) -> None:
        self.stats = stats


@dataclass(eq=False)
class Request:
    """Work on one stream: feed ``prompt``, generate up to ``max_new_tokens``, feed the tail.

    Args:
        stream: The stream it works on.
        prompt: Token ids to feed, or a callable returning them, called on the engine's thread when the
            request starts (so work a turn needs, e.g. rendering its template, happens only if it runs).
        max_new_tokens: Tokens to generate: 0 feeds only, None has no limit.
        stop_ids: Token ids that end generation (yielded, never fed).
        on_token: ``(token) -> stop``; called for every generated token; True ends generation ("stop").
        on_finish: ``(request) -> tail ids`` to feed after generation ends, however it ended.
        on_fed: ``(ids)``; called after every chunk of prompt or tail tokens is fed.
        on_event: Called (engine thread) after every generated token (with ``every_token``) and once when the
            request is done (after :attr:`done` is set): to wake a reader on another thread.
        every_token: Call ``on_event`` for every token (a streamed reply), or only at the end.
        deadline: ``time.monotonic()`` by which the request must end ("timeout").
        chunk_size: Tokens per prefill chunk for this request (default: the engine's).
        sampling: Sample with these settings from now on (the stream keeps its recent context).
        on_done: ``(request)``; called on the engine's thread when the request is done, before waiters wake
            (e.g. to persist the turn); an exception it raises becomes the request's error.

    Attributes (read-only; the engine advances them through the request's own methods):
        tokens: Generated so far.
        prompt_tokens: Tokens the feed phase fed (owed tokens and the prompt).
        finish_reason: ``"eos"``, ``"length"``, ``"stop"``, ``"cancelled"``, ``"timeout"``, ``"error"``, or None.
        error: The exception that ended it, if any.
    """

    stream: Stream
    prompt: list[int] | Callable[[], list[int]]
    max_new_tokens: int | None = 0
    stop_ids: frozenset[int] = frozenset()
    on_token: Callable[[int], bool] | None = None
    on_finish: Callable[[Request], list[int]] | None = None
    on_fed: Callable[[list[int]], None] | None = None
    on_event: Callable[[], None] | None = None
    every_token: bool = True
    deadline: float | None = None
    chunk_size: int | None = None
    sampling: SamplingConfig | None = None
    on_done: Callable[[Request], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    prompt_tokens: int = 0
    _feed: list[int] = field(default_factory=list, repr=False)
    _fed: int = 0
    _phase: str = "waiting"  # waiting -> feed -> generate -> tail -> done
    _next: int | None = None  # sampled, to be fed at the next decode step
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _why: str = "cancelled"

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the request before its next step (idempotent, from any thread); its tail is still fed."""
        if not self._cancel.is_set():
            self._why = reason
            self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request is done (for another thread than the engine's)."""
        return self._done.wait(timeout)

    # -- the engine moves a request through its phases with these ------------------------------------
    def _start(self, owed: list[int]) -> None:
        if self.sampling is not None:
            self.stream.use_sampling(self.sampling)
        prompt = self.prompt() if callable(self.prompt) else self.prompt
        self._feed, self._fed, self._phase = [*owed, *prompt], 0, "feed"
        self.prompt_tokens = len(self._feed)

    def _chunk(self, size: int) -> list[int]:
        return self._feed[self._fed : self._fed + size]

    def _advance(self, n: int) -> None:
        self._fed += n

    def _emit(self, token: int) -> bool:
        """Record a generated token; True when generation ends with it."""
        self.tokens.append(token)
        stop = self.on_token(token) if self.on_token is not None else False
        if stop or token in self.stop_ids:
            self.finish_reason = "stop" if stop and token not in self.stop_ids else "eos"
        elif self.max_new_tokens is not None and len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        self._next = None if self.finish_reason else token
        return self.finish_reason is not None

    def _end_generation(self, reason: str | None = None) -> list[int]:
        """Leave the generate phase (``reason`` overrides, e.g. "cancelled"); returns the tail to feed."""
        if reason is not None:
            self.finish_reason = reason
        tail = self.on_finish(self) if self.on_finish is not None else []
        self._feed, self._fed, self._next, self._phase = list(tail), 0, None, "tail"
        return self._feed

    def _finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.error, self.finish_reason = error, self.finish_reason or "error"
        self._phase = "done"
        if self.on_done is not None:
            try:
                self.on_done(self)
            except BaseException as failure:  # e.g. persisting the turn failed
                log.exception("a request's on_done failed")
                self.error = self.error or failure
        self._done.set()
        if self.on_event is not None:
            self.on_event()


class Engine:
    """Runs requests of many streams on one cache with rows: chunked prefill interleaved with batched decode.

    Args:
        model: A supported causal LM.
        cache: The cache (its rows are the resident streams). Rows already assigned that hold tokens can be
            adopted with :meth:`open` ``(row=...)``; empty ones are freed for any stream.
        chunk_size: Prompt tokens fed per step (None: chosen from free memory, see :func:`auto_chunk_size`).
        cuda_graphs: Capture decode steps (default: on CUDA).
        compile: CPU: compile decode steps (see :class:`~streaming_llm.core.stepper.Stepper`).

    Attributes:
        stepper: Runs the forwards.
        decode_steps: Batched decode steps run; ``stepper.batched_rows`` counts the row-tokens they fed.
        spills, restores: Streams moved to host memory and back; ``spill_seconds``/``restore_seconds``
            their total time.
    """

    def __init__(
        self, model: PreTrainedModel, cache: StreamingCache, *, chunk_size: int | None = None,
        cuda_graphs: bool | None = None, compile: bool = False,
    ):  # fmt: skip
        if chunk_size is not None:
            check_int("chunk_size (None: chosen from free memory)", chunk_size, 1)
        self.model, self.cache = model, cache
        self.stepper = Stepper(model, cache, cuda_graphs, compile)
        self.chunk_size = chunk_size or auto_chunk_size(model, cache.window.capacity + cache.segment_capacity)
        self.decode_steps = self.spills = self.restores = 0
        self.spill_seconds = self.restore_seconds = 0.0
        self._streams: dict[int, Stream] = {}  # row -> resident stream
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._inbox: deque[Request] = deque()
        self._calls: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._clock = itertools.count(1)
        self._stopping = False
        self._worker: int | None = None  # the thread that serves the engine (serve_forever), if any
        if cache.storage is None:  # a lazily sized cache gets its one row now, in the model's dtype
            cache.allocate(model.dtype, model.device)
        for b in cache.live:  # fresh rows (a one-row cache's row 0) are free for any stream; others wait for open(row=)
            if cache.row(b).seen_tokens == 0:
                cache.release(b)

    # -- streams ------------------------------------------------------------------------------------------
    def open(
        self, name: str = "stream", *, start_size: int | None = None, state: CacheState | None = None,
        sampler: Sampler | None = None, row: int | None = None,
    ) -> Stream:  # fmt: skip
        """A new stream: fresh (``start_size`` pinned tokens), restored from a saved ``state``, or adopting
        an assigned ``row`` of the cache as it is. It takes a row when its first request runs.

        Raises:
            ValueError: A pinned prefix larger than the cache's ``pinned_capacity``, or a row not assigned.
        """
        start = self.cache.window.start_size if start_size is None else start_size
        if state is not None:
            start = int(state[1]["start_size"])
        if not 0 <= start <= self.cache.pinned_capacity:
            raise ValueError(
                f"A pinned prefix of {start} tokens does not fit this engine's rows (pinned_capacity "
                f"{self.cache.pinned_capacity}); create the cache with a larger pinned_capacity."
            )
        stream = Stream(name, start, sampler or Sampler(device=self.model.device))
        if row is not None:
            if row in self.cache.free or row in self._streams:
                raise ValueError(f"Row {row} is not an assigned row without a stream.")
            self._streams[row] = stream
            stream._bind(row)
        elif state is not None:
            stream._bind(None, state)
            stream._record(self.cache.stats_for(state))
        return stream

    def close(self, stream: Stream) -> None:
        """Forget ``stream`` and free its row.

        Raises:
            ValueError: It has a request waiting or running.
        """
        if stream._busy or any(r.stream is stream for r in (*self._waiting, *self._inbox)):
            raise ValueError(f"Stream {stream.name!r} has a request in flight; cancel it first.")
        if stream.row is not None:
            self._streams.pop(stream.row, None)
            self.cache.release(stream.row)
        stream._bind(None)

    def snapshot(self, stream: Stream) -> CacheState:
        """A copy of the stream's cache state (its row's, or its spilled snapshot's), on the host.

        Raises:
            ValueError: The stream has nothing yet.
        """
        if stream.row is not None:
            tensors, counters = self.cache.row_state(stream.row)
            return {k: v.cpu() for k, v in tensors.items()}, counters
        if stream._snapshot is None:
            raise ValueError("The stream has no state yet.")
        tensors, counters = stream._snapshot
        return {k: v.clone() for k, v in tensors.items()}, dict(counters)

    def row_stats(self, stream: Stream) -> RowStats:
        """The stream's :class:`~streaming_llm.core.cache.RowStats` now (engine thread), made resident if needed."""
        self._resident(stream)
        return self.cache.row(stream.row)

    def set_segment(self, stream: Stream, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Replace the stream's pinned memory segment (see :meth:`StreamingCache.set_segment`)."""
        self._resident(stream)
        self.cache.set_segment(keys, values, stream.row)

    def _resident(self, stream: Stream) -> None:
        """Give ``stream`` a row (restoring its snapshot), spilling the least recently used idle stream if needed.

        Raises:
            RuntimeError: Every row runs a request.
        """
        if stream.row is not None:
            return
        if not self.cache.free:
            idle = [s for s in self._streams.values() if not s._busy]
            if not idle:
                raise RuntimeError(f"All {self.cache.rows} rows run requests; none can be spilled.")
            self._spill(min(idle, key=lambda s: s._last_used))
        began = time.perf_counter()
        snapshot = stream._snapshot
        b = self.cache.assign(start_size=stream.start_size, state=snapshot)
        if snapshot is not None:
            self.restores += 1
            self.restore_seconds += time.perf_counter() - began
        self._streams[b] = stream
        stream._bind(b)

    def _spill(self, stream: Stream) -> None:
        """Move a resident stream's row to host memory (pinned buffers on CUDA) and free the row."""
        began = time.perf_counter()
        tensors, counters = self.cache.row_state(stream.row)
        pin = tensors and next(iter(tensors.values())).device.type == "cuda"
        host = {}
        for name, t in tensors.items():
            host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin)
        if pin:
            torch.cuda.current_stream().synchronize()
        self._streams.pop(stream.row)
        self.cache.release(stream.row)
        stream._bind(None, (host, counters))
        self.spills += 1
        self.spill_seconds += time.perf_counter() - began

    # -- requests -----------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue ``request`` (any thread); it starts after the stream's earlier requests.

        Raises:
            EngineStopped: The engine is shutting down.
            StreamBrokenError: The stream failed earlier inside a forward.
            ValueError: A bad ``max_new_tokens``.
        """
        check_max_new_tokens(request.max_new_tokens, endless_ok=True, zero_ok=True)
        if request.stream.broken:
            raise StreamBrokenError(request.stream.broken)
        with self._lock:
            if self._stopping:
                raise EngineStopped("The engine is shutting down.")
            self._inbox.append(request)
            self._wake.notify()
        return request

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine's thread at the start of its next step (any thread); e.g. closing a stream.
        An exception it raises is logged."""
        with self._lock:
            self._calls.append(fn)
            self._wake.notify()

    def run_on_thread(self, fn: Callable[[], object], timeout: float | None = None) -> object:
        """``fn()`` run on the engine's thread between steps (directly when no worker thread drives the engine,
        or when called from it); returns its result or raises its exception. For work that reads or changes
        rows, e.g. exporting a session.

        Raises:
            TimeoutError: The engine did not run it within ``timeout`` seconds.
        """
        if self._worker is None or self._worker == threading.get_ident():
            return fn()
        done, box = threading.Event(), {}

        def call() -> None:
            try:
                box["result"] = fn()
            except BaseException as error:
                box["error"] = error
            finally:
                done.set()

        self.call_soon(call)
        if not done.wait(timeout):
            raise TimeoutError("The engine did not get to the call in time.")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def run(self, request: Request) -> Iterator[None]:
        """Step the engine until ``request`` is done, yielding after every step (to read its progress).
        For callers that own the engine (no worker thread)."""
        while not request.done:
            if not self.step() and not request.done:
                raise RuntimeError("The engine has nothing to run but this request is not done.")
            yield

    def run_to_end(self, request: Request) -> Request:
        """Step until ``request`` is done; returns it (raises its error, if it failed)."""
        for _ in self.run(request):
            pass
        if request.error is not None:
            raise request.error
        return request

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._running or self._inbox or self._calls)

    @property
    def load(self) -> int:
        """Requests waiting or running."""
        return len(self._waiting) + len(self._running) + len(self._inbox)

    # -- the loop -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """One iteration: end cancelled/expired requests, admit, one prefill chunk, one batched decode step.
        Returns False when there was nothing to do."""
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            calls, self._calls = list(self._calls), deque()
        for fn in calls:
            try:
                fn()
            except Exception:
                log.exception("a call on the engine's thread failed")
        worked = bool(calls) | self._expire()
        worked |= self._admit()
        worked |= self._prefill()
        worked |= self._decode()
        return worked

    def serve_forever(self, stop: threading.Event) -> None:
        """Step from this thread until ``stop`` is set and nothing is left; sleeps while idle."""
        self._worker = threading.get_ident()
        while not (stop.is_set() and self.idle):
            if not self.step():
                with self._lock:
                    if not self._inbox and not self._calls and not stop.is_set():
                        self._wake.wait(timeout=0.05)

    def shutdown(self) -> None:
        """Refuse new requests and cancel the ones waiting or running (their tails are still fed)."""
        with self._lock:
            self._stopping = True
            pending = [*self._inbox, *self._waiting, *self._running]
            self._wake.notify_all()
        for request in pending:
            request.cancel("shutdown")

    def _expire(self) -> bool:
        """End waiting requests that were cancelled or expired, and generating ones (a request still feeding its
        prompt ends once the prompt is in, so a turn never holds half a message)."""
        worked = False
        for request in list(self._waiting):
            reason = self._stop_reason(request)
            if reason is not None:
                self._waiting.remove(request)
                request.finish_reason = reason
                request._finish()
                worked = True
        for request in list(self._running):
            reason = self._stop_reason(request)
            if request._phase == "generate" and reason is not None:
                self._end(request, reason)
                worked = True
        return worked

    @staticmethod
    def _stop_reason(request: Request) -> str | None:
        if request._cancel.is_set():
            return request._why
        if request.deadline is not None and time.monotonic() > request.deadline:
            return "timeout"
        return None

    def _admit(self) -> bool:
        worked, started = False, set()
        for request in list(self._waiting):
            stream = request.stream
            if stream._busy or id(stream) in started:
                started.add(id(stream))
                continue
            try:
                self._resident(stream)
            except RuntimeError:
                continue  # every row runs a request: wait for one to finish
            self._waiting.remove(request)
            stream._touch(next(self._clock), busy=True)
            started.add(id(stream))
            try:
                request._start(stream._take_owed())
            except BaseException as error:  # the prompt callable failed: nothing was fed
                self._complete(request, error)
                continue
            self._running.append(request)
            worked = True
        return worked

    def _prefill(self) -> bool:
        """Feed prompt or tail chunks, oldest request first, up to ``chunk_size`` tokens in all this step (so many
        short prompts start together, and a long one takes one chunk per step)."""
        budget = self.chunk_size
        worked = False
        for request in [r for r in self._running if r._phase in ("feed", "tail")]:
            if budget <= 0:
                break
            chunk = request._chunk(min(budget, request.chunk_size or self.chunk_size))
            budget -= max(len(chunk), 1)
            worked = True
            if chunk and not self._feed_chunk(request, chunk):
                continue
            if request._chunk(1):
                continue
            if request._phase == "tail" or request.max_new_tokens == 0:
                self._complete(request)
            elif (reason := self._stop_reason(request)) is not None:
                self._end(request, reason)
            else:
                request._phase = "generate"
                self._emit([(request, request.stream.last_logits)])
        return worked

    def _feed_chunk(self, request: Request, chunk: list[int]) -> bool:
        """One prefill forward of ``request``'s next chunk; False when it failed (the request is then done)."""
        try:
            logits = self.stepper.prefill(request.stream.row, chunk)
        except BaseException as error:
            request.stream._break(f"a forward failed while feeding tokens ({type(error).__name__}: {error})")
            self._complete(request, error)
            return False
        request._advance(len(chunk))
        request.stream._fed(chunk, logits)
        if request.on_fed is not None:
            try:
                request.on_fed(chunk)
            except BaseException as error:
                self._complete(request, error)
                return False
        return True

    def _decode(self) -> bool:
        decoding = [r for r in self._running if r._phase == "generate" and r._next is not None]
        if not decoding:
            return False
        tokens = {r.stream.row: r._next for r in decoding}
        try:
            logits = self.stepper.decode(tokens)
        except BaseException as error:  # every row of the step may be half-updated: their streams break
            log.exception("a batched decode step failed")
            for request in decoding:
                request.stream._break(f"a batched decode step failed ({type(error).__name__}: {error})")
                self._complete(request, error)
            return True
        self.decode_steps += 1
        for request in decoding:
            request.stream.sampler.observe([request._next])  # fed now
        self._emit([(r, logits[r.stream.row]) for r in decoding])
        return True

    def _emit(self, rows: list[tuple[Request, torch.Tensor]]) -> None:
        """Sample each request's next token and hand it on (one device read for an all-greedy batch)."""
        picks: list[int | BaseException]
        if all(r.stream.sampler.greedy for r, _ in rows):
            picks = list(greedy_picks([r.stream.sampler for r, _ in rows], [lg for _, lg in rows]))
        else:
            picks = [_sample_or_error(r.stream.sampler, lg) for r, lg in rows]
        for (request, _), token in zip(rows, picks, strict=True):
            if isinstance(token, BaseException):  # sampling failed: nothing was emitted, the cache is whole
                self._complete(request, token)
                continue
            try:
                ended = request._emit(int(token))
            except BaseException as error:  # a callback failed: close the turn as far as it got
                request.error = error
                ended = True
                request.finish_reason = "error"
            if ended:
                self._end(request, None)
            if request.on_event is not None and request.every_token and not request.done:
                request.on_event()

    def _end(self, request: Request, reason: str | None) -> None:
        """End generation and feed the tail ``on_finish`` returns. Without ``on_finish`` the stream owes its last
        sampled token (not a stop id) to its next request, so the context stays whole."""
        last = request.tokens[-1] if request.tokens else None
        owed = [last] if request.on_finish is None and last is not None and last not in request.stop_ids else []
        request.stream.owe(owed)
        try:
            tail = request._end_generation(reason)
        except BaseException as error:
            self._complete(request, error)
            return
        if not tail:
            self._complete(request)

    def _complete(self, request: Request, error: BaseException | None = None) -> None:
        if request in self._running:
            self._running.remove(request)
        stream = request.stream
        stream._touch(next(self._clock), busy=False)
        if stream.row is not None:
            stream._record(self.cache.row(stream.row))
        request._finish(error)


def _sample_or_error(sampler, logits: torch.Tensor) -> int | BaseException:
    """The sampler's pick, or the exception it raised (one row's bad sampling must not stop the engine)."""
    try:
        return sampler(logits)
    except Exception as error:  # e.g. probabilities that are not finite
        log.warning("sampling failed for one request: %s", error)
        return error


def check_max_new_tokens(max_new_tokens: object, endless_ok: bool = True, zero_ok: bool = False) -> None:
    """Raise a clear ``ValueError`` unless ``max_new_tokens`` is an int >= 1 (or None when ``endless_ok``, 0 when
    ``zero_ok``). The one rule for every surface: negatives, floats, bools and strings are refused rather
    than rounded or read as "one token"."""
    if max_new_tokens is None and endless_ok:
        return
    low = 0 if zero_ok else 1
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < low:
        endless = " or None (no limit)" if endless_ok else ""
        raise ValueError(f"max_new_tokens must be an integer >= 1{endless}, got {max_new_tokens!r}")


class CacheView:
    """A session's row of the cache, read-only: its counters and sizes (what ``session.cache`` gives).

    Attributes mirror a one-row :class:`~streaming_llm.core.cache.StreamingCache`: ``seen_tokens``,
    ``cached_tokens``, ``evicted_tokens``, ``segment_len``, ``start_size``, ``recent_size``,
    ``segment_capacity``, ``nbytes``. The pinned segment is replaced with :meth:`set_segment` (through
    the engine); nothing else of the cache can be changed through a view.
    """

    def __init__(self, engine: Engine, stream: Stream):
        self._engine, self._stream = engine, stream

    def _row(self) -> RowStats:
        return self._engine.row_stats(self._stream)

    @property
    def seen_tokens(self) -> int:
        return self._row().seen_tokens

    @property
    def cached_tokens(self) -> int:
        return self._row().cached_tokens

    @property
    def evicted_tokens(self) -> int:
        return self._row().evicted_tokens

    @property
    def segment_len(self) -> int:
        return self._row().segment_tokens

    @property
    def start_size(self) -> int:
        return self._stream.start_size

    @property
    def recent_size(self) -> int:
        return self._engine.cache.recent_size

    @property
    def segment_capacity(self) -> int:
        return self._engine.cache.segment_capacity

    @property
    def capacity(self) -> int:
        return self._row().capacity

    @property
    def nbytes(self) -> int:
        """Bytes of cache storage the session's row holds (constant)."""
        return self._row().cache_bytes

    @property
    def forward_cache(self) -> StreamingCache:
        """The cache object the model's forwards receive (the engine's, shared by its rows): what a forward hook
        compares with to recognise this engine's forwards."""
        return self._engine.cache

    def set_segment(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Replace the row's pinned segment (see :meth:`StreamingCache.set_segment`)."""
        self._engine.set_segment(self._stream, keys, values)

    def clear_segment(self) -> None:
        """Remove the row's pinned segment."""
        empty = torch.zeros(1, self._engine.cache.spec.num_kv_heads, 0, self._engine.cache.spec.head_dim)
        layers = self._engine.cache.spec.num_layers
        self._engine.set_segment(self._stream, [empty] * layers, [empty] * layers)
