"""A small synchronous scheduler over a :class:`~streaming_llm.core.slots.SlotCache` (no HTTP).

Each :meth:`Scheduler.step` runs at most one prefill chunk (of the oldest request still ingesting
its prompt, in its own row) and then one batched decode step for every request that is generating.
So a long prompt delays the others by one chunk per step, never by the whole prompt.

A session keeps its row between requests: its next request continues the same stream (the last
generated token, not yet fed, goes in first). When every row is taken, the least recently used
idle session loses its row (its stream is dropped; save it first with ``cache.row(b).state()`` if
it must survive). Drive it from one thread (a server runs it in a worker thread).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from ..core.compat import cache_kwargs
from ..core.slots import BatchedDecoder, SlotCache
from .sampling import Sampler, SamplingConfig


@dataclass
class Handle:
    """One submitted request. Iterate it to get its tokens (iteration drives the scheduler).

    Attributes:
        session_id: The session it belongs to.
        tokens: Tokens generated so far.
        done: Finished (``finish_reason``: ``"length"``, ``"eos"`` or ``"cancelled"``).
        row: The cache row serving it (None until admitted).
    """

    session_id: str
    prompt: list[int]
    max_new_tokens: int
    sampler: Sampler
    on_token: Callable[[int], None] | None = None
    scheduler: Scheduler | None = field(default=None, repr=False)
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None
    row: int | None = None
    feed: list[int] = field(default_factory=list)
    fed: int = 0
    next_token: int | None = None  # emitted, to be fed at the next decode step

    def __iter__(self) -> Iterator[int]:
        i = 0
        while True:
            while i < len(self.tokens):
                yield self.tokens[i]
                i += 1
            if self.done:
                return
            if not self.scheduler.step():
                raise RuntimeError("The scheduler has nothing to run but this request is not finished.")


@dataclass
class _Session:
    row: int | None = None
    pending: list[int] = field(default_factory=list)  # tokens of the stream not yet fed (last generated token)
    active: Handle | None = None
    last_used: int = 0


class Scheduler:
    """Runs requests of many sessions on one :class:`SlotCache`.

    Args:
        model: A model switched to the streaming attention.
        cache: The slot cache (one row per live session).
        chunk_size: Prompt tokens ingested per step (bounds how long decoding rows wait).
        eos_ids: Token ids that end a request.
        cuda_graphs: Capture batched decode steps (default: on CUDA).

    Raises:
        ValueError: ``chunk_size < 1``.
    """

    def __init__(
        self, model: PreTrainedModel, cache: SlotCache, chunk_size: int = 256, eos_ids: set[int] | None = None,
        cuda_graphs: bool | None = None,
    ):  # fmt: skip
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        self.model, self.cache, self.chunk_size = model, cache, chunk_size
        self.eos_ids = set(eos_ids or ())
        self.decoder = BatchedDecoder(model, cache, cuda_graphs)
        self.sessions: dict[str, _Session] = {}
        self.waiting: list[Handle] = []
        self.running: list[Handle] = []
        self._clock = itertools.count()

    # -- API --------------------------------------------------------------------------------------------
    def submit(
        self, session_id: str, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Handle:  # fmt: skip
        """Queue a request: feed ``prompt_ids`` to the session's stream, then generate up to ``max_new_tokens``.

        Raises:
            ValueError: Empty prompt, ``max_new_tokens < 1``, or the session already has a request running.
        """
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("The prompt is empty: give at least one token id.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        session = self.sessions.setdefault(session_id, _Session())
        if session.active is not None or any(h.session_id == session_id for h in self.waiting):
            raise ValueError(f"Session {session_id!r} already has a request in flight; wait for it or cancel it.")
        handle = Handle(
            session_id, prompt, max_new_tokens, Sampler(sampling, self.cache.device), on_token, scheduler=self
        )
        handle.sampler.observe(prompt)
        self.waiting.append(handle)
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop a request; the tokens it already produced (and the prompt) stay in the session's stream."""
        if handle.done:
            return
        if handle in self.waiting:
            self.waiting.remove(handle)
        else:
            session = self.sessions[handle.session_id]
            if handle.next_token is not None:
                session.pending = [handle.next_token]
            else:
                session.pending = handle.feed[handle.fed :]
        self._finish(handle, "cancelled")

    def end_session(self, session_id: str) -> None:
        """Forget a session and free its row.

        Raises:
            ValueError: The session has a request in flight.
        """
        session = self.sessions.get(session_id)
        if session is None:
            return
        if session.active is not None:
            raise ValueError(f"Session {session_id!r} has a request in flight; cancel it first.")
        if session.row is not None:
            self.cache.release(session.row)
        del self.sessions[session_id]

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def run(self) -> None:
        """Step until every submitted request is finished."""
        while not self.idle:
            if not self.step():
                raise RuntimeError("Requests are waiting but no row can be freed (every row runs a request).")

    @torch.no_grad()
    def step(self) -> bool:
        """Admit waiting requests, run one prefill chunk and one batched decode step. Returns False when
        there was nothing to do."""
        self._admit()
        worked = False
        ingesting = [h for h in self.running if h.next_token is None]
        if ingesting:
            self._prefill_chunk(ingesting[0])
            worked = True
        decoding = [h for h in self.running if h.next_token is not None]
        if decoding:
            logits = self.decoder({h.row: h.next_token for h in decoding})
            picks = self._pick([(h, logits[h.row]) for h in decoding])
            for h, token in zip(decoding, picks, strict=True):
                self._emit(h, token)
            worked = True
        return worked

    # -- internals --------------------------------------------------------------------------------------
    def _admit(self) -> None:
        for handle in list(self.waiting):
            session = self.sessions[handle.session_id]
            if session.row is None:
                if not self.cache.free:
                    idle = [s for s in self.sessions.values() if s.row is not None and s.active is None]
                    if not idle:
                        continue
                    victim = min(idle, key=lambda s: s.last_used)
                    self.cache.release(victim.row)
                    victim.row, victim.pending = None, []
                session.row = self.cache.assign()
            self.waiting.remove(handle)
            handle.row, handle.feed = session.row, session.pending + handle.prompt
            session.pending, session.active = [], handle
            session.last_used = next(self._clock)
            self.running.append(handle)

    def _prefill_chunk(self, handle: Handle) -> None:
        cache = self.cache.row(handle.row)
        chunk = handle.feed[handle.fed : handle.fed + self.chunk_size]
        device = self.cache.device
        ids = torch.tensor([chunk], dtype=torch.long, device=device)
        logits = self.model(
            input_ids=ids, position_ids=cache.position_ids(len(chunk), device), use_cache=True, logits_to_keep=1,
            **cache_kwargs(self.model, cache),
        ).logits  # fmt: skip
        handle.fed += len(chunk)
        if handle.fed == len(handle.feed):
            self._emit(handle, self._pick([(handle, logits[0, -1])])[0])

    def _pick(self, rows: list[tuple[Handle, torch.Tensor]]) -> list[int]:
        greedy = [h.sampler.config == SamplingConfig() for h, _ in rows]
        if all(greedy):  # one device read for the whole batch
            picks = torch.stack([lg for _, lg in rows]).argmax(-1).tolist()
            for (h, _), t in zip(rows, picks, strict=True):
                h.sampler.recent.append(t)
            return picks
        return [h.sampler(lg) for h, lg in rows]

    def _emit(self, handle: Handle, token: int) -> None:
        handle.tokens.append(token)
        if handle.on_token is not None:
            handle.on_token(token)
        if token in self.eos_ids or len(handle.tokens) >= handle.max_new_tokens:
            self.sessions[handle.session_id].pending = [token]
            self._finish(handle, "eos" if token in self.eos_ids else "length")
        else:
            handle.next_token = token

    def _finish(self, handle: Handle, reason: str) -> None:
        handle.done, handle.finish_reason, handle.next_token = True, reason, None
        if handle in self.running:
            self.running.remove(handle)
        session = self.sessions.get(handle.session_id)
        if session is not None and session.active is handle:
            session.active = None
            session.last_used = next(self._clock)
