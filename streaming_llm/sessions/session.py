"""Multi-turn conversations that never end and never re-process history.

A :class:`StreamingSession` is one stream of an :class:`~streaming_llm.runtime.engine.Engine` for its
whole life: a row of the engine's cache while it is resident (a private one-row engine by default,
or a shared engine's row, as in the server). Each turn feeds only its own new tokens (the chat
template is rendered incrementally), the model's reply is generated on the same row, and memory
stays fixed however long the conversation runs. A system prompt can be pinned next to the attention
sinks so it is never evicted; long documents are fed chunk by chunk; the whole state can be saved to
a safetensors file and restored exactly.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core.architectures import describe
from ..core.attention import install
from ..core.cache import CacheState, StreamingCache, check_int
from ..core.quant import check_kv_dtype
from ..runtime.engine import CacheView, Engine, Request, StreamBrokenError, check_max_new_tokens
from ..runtime.generation import GenerationChunk, TextStream, eos_ids, run_text_request
from ..runtime.sampling import Sampler, SamplingConfig
from ..runtime.tokenize import stream_tokens
from .chat_template import SENTINEL, IncrementalChatTemplate
from .documents import Document, IngestProgress, ProgressBar
from .memory import HybridMemory
from .persistence import SessionFileError, read_session_file, write_session_file
from .retrieval import RetrievalMemory

SessionBrokenError = StreamBrokenError
"""The session cannot continue: a forward failed while it was fed, so its row may be half-updated."""


@dataclass(frozen=True)
class SessionStats:
    """Where a session stands.

    Attributes:
        turns: Completed user turns.
        seen_tokens: Tokens processed since the session started.
        evicted_tokens: Tokens dropped from the window so far.
        cached_tokens: Tokens the next query attends to (sinks, pinned, summary, window).
        pinned_tokens: Start tokens kept forever (the sinks, or the whole pinned system prompt).
        summary_tokens: Tokens of the hybrid-memory summary currently pinned (0 without memory).
        capacity: Most tokens the cache ever holds.
        cache_bytes: Bytes held by the cache (constant).
    """

    turns: int
    seen_tokens: int
    evicted_tokens: int
    cached_tokens: int
    pinned_tokens: int
    summary_tokens: int
    capacity: int
    cache_bytes: int


@dataclass(frozen=True)
class IngestStats:
    """What :meth:`StreamingSession.ingest` did: tokens fed (the document with its message markup), seconds,
    tokens per second, and the document's characters."""

    tokens: int
    seconds: float
    tokens_per_second: float
    characters: int = 0


class StreamingSession:
    """An endless chat on one stream of an engine.

    Args:
        model: A supported causal LM (switched to the streaming attention).
        tokenizer: Its tokenizer, with a chat template.
        system_prompt: Optional system message, rendered first.
        start_size: Attention sinks (default 4).
        recent_size: Recent tokens kept (default 2000); with ``engine``, the engine's.
        pin_system_prompt: Keep the whole system prompt forever, beside the sinks (default True).
        sampling: How replies are sampled (greedy by default).
        memory: Optional :class:`HybridMemory` (summarise evicted text into a pinned slot) or
            :class:`~streaming_llm.sessions.retrieval.RetrievalMemory` (index evicted text, pin the best matches
            per turn).
        prefill_chunk: Tokens per forward when feeding prompts and documents (None: chosen from free memory).
        engine: Run on this engine's rows (shared with other sessions) instead of a private one-row engine.
            A shared engine that a worker thread drives is used through :meth:`turn_request` only. Its rows pin
            at most ``pinned_capacity`` tokens: a longer system prompt pins its first ones (the rest scrolls).
        name: The session's name on the engine (messages, the server's session id).
        kv_dtype: KV storage of a private engine's cache (see :class:`StreamingCache`): None (the model's dtype),
            ``"int8"``, ``"float8_e4m3"``, ... A shared ``engine`` keeps its cache's.

    Raises:
        ValueError: Bad sizes, or settings that do not fit ``engine``'s cache.
        NotImplementedError: Memory with a model that has sliding-window layers.

    Turn boundaries: after every turn the tokens the model has seen are the chat template's rendering
    of the conversation (as returned to the caller), however the reply ended: end-of-turn token,
    ``max_new_tokens``, a stop string, or the caller closing the stream early (Ctrl-C, a client that
    disconnects). One exception, inherent to a cache that cannot take tokens back: when a stop string
    spans several tokens, the tokens before the one that completes it were already fed, so the context
    keeps that start of the stop string (the session then records the reply as the model saw it). An
    exception inside a forward leaves the row half-updated: the session raises
    :class:`SessionBrokenError` from then on (restore it from a saved state).

    Memory: the cache row is fixed; the session itself holds O(1) more: the sink ids (``start_size``),
    the template's last few messages, the sampler's bounded history and, with hybrid memory only, the
    ids in the window (``recent_size``) and at most ``memory.update_every`` evicted ids awaiting a summary.
    Nothing grows with the length of the conversation.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str | None = None,
        *,
        start_size: int = 4,
        recent_size: int = 2000,
        pin_system_prompt: bool = True,
        sampling: SamplingConfig | None = None,
        memory: HybridMemory | RetrievalMemory | None = None,
        prefill_chunk: int | None = None,
        engine: Engine | None = None,
        name: str = "session",
        kv_dtype: str | None = None,
        _state: CacheState | None = None,
    ):
        if prefill_chunk is not None:
            check_int("prefill_chunk", prefill_chunk, 1)
        install(model)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.system_prompt = system_prompt
        self.memory = memory
        self.prefill_chunk = prefill_chunk
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.template = IncrementalChatTemplate(tokenizer)
        self.turns = 0
        self.stop_ids = frozenset(eos_ids(model, tokenizer))
        if memory and any(layer.sliding_window for layer in describe(model.config).layers):
            raise NotImplementedError(
                "Memory is not available for models with sliding-window layers (their local layers have no pinned "
                "slot for a summary or passages); use plain streaming with this model."
            )
        opening = self._message("system", system_prompt) if system_prompt else []
        pinned = max(start_size, len(opening)) if pin_system_prompt else start_size
        if _state is not None:
            pinned = int(_state[1]["start_size"])
        elif engine is not None:  # a shared engine's rows pin at most pinned_capacity tokens: the prompt's start
            pinned = min(pinned, engine.cache.pinned_capacity)
        capacity = memory.max_tokens if memory else 0
        self.engine, self.owns_engine = self._engine_for(engine, pinned, recent_size, capacity, _state)
        sampler = Sampler(sampling or SamplingConfig(), device=model.device, tokenizer=tokenizer)
        if self.owns_engine:
            cache = self.engine.cache
            if cache.free:  # a fresh one-row cache: the stream takes row 0 with this session's pinned prefix
                self.stream = self.engine.open(name, start_size=cache.start_size, sampler=sampler)
            else:  # restored from a state: adopt the row as it is
                self.stream = self.engine.open(name, row=0, sampler=sampler)
        else:
            self.stream = self.engine.open(name, start_size=pinned, state=_state, sampler=sampler)
        self.cache = CacheView(self.engine, self.stream)
        self.sink_ids: list[int] = []  # the pinned tokens' ids (memory re-encodes them)
        # With hybrid memory only: ids in the window, and those evicted but not yet summarised.
        self.window_ids: deque[int] = deque(maxlen=recent_size if memory else 0)
        self.pending_ids: list[int] = []
        self.summary = ""
        if opening:
            self._open_with(opening)

    def _engine_for(self, engine: Engine | None, pinned: int, recent_size: int, capacity: int,
                    state: CacheState | None) -> tuple[Engine, bool]:  # fmt: skip
        if engine is not None:
            cache = engine.cache
            if cache.recent_size != recent_size or cache.segment_capacity < capacity:
                raise ValueError(
                    f"This session needs rows of {recent_size} recent tokens with a {capacity}-token segment; the "
                    f"engine's rows have {cache.recent_size} and {cache.segment_capacity}."
                )
            return engine, False
        model = self.model
        if state is not None:
            tensors, counters = state
            moved = {k: v.to(model.device) for k, v in tensors.items()}
            cache = StreamingCache.from_state(model.config, moved, counters)
            if cache.segment_capacity < capacity:
                raise ValueError("The cache's pinned-segment slot is smaller than the session's memory needs.")
        else:
            cache = StreamingCache(model.config, pinned, recent_size, capacity, rows=1, dtype=model.dtype,
                                   device=model.device, kv_dtype=self.kv_dtype)  # fmt: skip
        return Engine(model, cache, chunk_size=self.prefill_chunk), True

    def _open_with(self, opening: list[int]) -> None:
        """Feed the rendered system prompt now (a private engine), or owe it to the first request (shared)."""
        if self.owns_engine:
            self.feed(opening)
        else:
            self.stream.owe(opening)

    # -- what the session is made of -------------------------------------------------------------------
    @property
    def sampler(self) -> Sampler:
        return self.stream.sampler

    @sampler.setter
    def sampler(self, sampler: Sampler) -> None:
        self.stream.sampler = sampler

    @property
    def sampling(self) -> SamplingConfig:
        return self.stream.sampler.config

    @property
    def last_logits(self) -> torch.Tensor | None:
        """Next-token logits ``(vocab,)`` after the last token fed."""
        return self.stream.last_logits

    @property
    def broken(self) -> str | None:
        return self.stream.broken

    # -- feeding ----------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """The token ids of ``text`` as this session feeds them (no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    _tokens = tokenize

    def _message(self, role: str, content: str, generation_prompt: bool = False) -> list[int]:
        """The tokens of one message as the chat template frames it. Special tokens written in ``content``
        (``<|im_end|>``, ``<|im_start|>system``, ...) stay text: only the template's own markup is control
        tokens, so a message cannot forge a turn of another role. Content without such text is tokenized with
        its markup in one piece, as the template renders it.

        Raises:
            ValueError: the content holds special-token text and the template alters content (it cannot then
                be framed apart).
        """
        if not any(special in content for special in self.tokenizer.added_tokens_encoder):
            return self._tokens(self.template.add(role, content, generation_prompt=generation_prompt))
        probe = self.template.add(role, SENTINEL, generation_prompt=generation_prompt)
        self.template.context[-1] = {"role": role, "content": content}
        if probe.count(SENTINEL) != 1:
            raise ValueError("This message contains special-token text, and the chat template alters content so "
                             "it cannot be kept as text; remove the special tokens from the message.")  # fmt: skip
        before, after = probe.split(SENTINEL)
        text = self.tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return self._tokens(before) + text + self._tokens(after)

    def _check_usable(self) -> None:
        if self.broken:
            raise SessionBrokenError(
                f"This session cannot continue: {self.broken}. Its cache may be half-updated; restore it from a "
                "saved state (StreamingSession.load) or start a new session."
            )

    def _check_owned(self) -> None:
        if not self.owns_engine:
            raise RuntimeError(
                "This session runs on a shared engine: submit its turn_request() to the engine instead of calling "
                "send()/feed() (the engine's thread runs it)."
            )

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Feed token ids into the cache (never re-processed); return the next-token logits ``(vocab,)``.

        Raises:
            SessionBrokenError: The session failed earlier, or this forward failed.
        """
        self._check_owned()
        self._check_usable()
        if ids:
            request = Request(self.stream, list(ids), 0, on_fed=self._track, chunk_size=self.prefill_chunk)
            self.engine.run_to_end(self.engine.submit(request))
        return self.last_logits

    def _track(self, ids: list[int]) -> None:
        """After ``ids`` were fed: keep the sink ids, and (memory) follow which ids leave the window to be
        summarised or indexed."""
        seen_before = self.cache.seen_tokens - len(ids)
        skip = max(0, self.stream.start_size - seen_before)  # pinned tokens never enter the window
        self.sink_ids.extend(ids[:skip])
        if not self.memory:
            return
        for token in ids[skip:]:
            if len(self.window_ids) == self.window_ids.maxlen:
                self.pending_ids.append(self.window_ids[0])
            self.window_ids.append(token)
            if isinstance(self.memory, HybridMemory) and len(self.pending_ids) >= self.memory.update_every:
                self.update_summary()
        if isinstance(self.memory, RetrievalMemory):
            evicted, self.pending_ids = self.pending_ids, []
            self.memory.observe(self, evicted)  # index evicted text as passages

    def update_summary(self) -> None:
        """Fold the evicted-but-unsummarised text into the pinned summary (hybrid memory)."""
        if not isinstance(self.memory, HybridMemory) or not self.pending_ids:
            return
        evicted = self.tokenizer.decode(self.pending_ids, skip_special_tokens=True)
        self.pending_ids = []
        self.summary = self.memory.summarize(self.model, self.tokenizer, self.summary, evicted)
        self.memory.install(self.model, self.tokenizer, self.cache, self.sink_ids, self.summary)

    # -- conversation ---------------------------------------------------------------------------------
    def send(
        self, message: str, max_new_tokens: int | None = 512, stop: tuple[str, ...] | list[str] = ()
    ) -> Iterator[GenerationChunk]:
        """Add a user message and stream the reply; the turn is closed when the stream ends or is closed.

        Args:
            message: The user's text (may be empty: the template still marks the turn).
            max_new_tokens: Longest reply (int >= 1), or None for no limit.
            stop: Strings that end the reply (not included in it).

        Raises:
            ValueError: at once (before anything is fed) for a bad ``max_new_tokens``, ``stop`` or message.
            SessionBrokenError: the session failed earlier inside a forward.
        """
        request, text = self.turn_request([("user", message)], max_new_tokens, stop)
        self._check_owned()
        self._check_usable()
        return self._drive(request, text)

    def _drive(self, request: Request, text: TextStream) -> Iterator[GenerationChunk]:
        # Nothing happens until the first piece is asked for (a stream never iterated changes nothing).
        self.engine.submit(request)
        yield from run_text_request(self.engine, request, text)

    def turn_request(
        self, messages: list[tuple[str, str]], max_new_tokens: int | None = 512, stop: tuple[str, ...] | list[str] = (),
        *, sampling: SamplingConfig | None = None, deadline: float | None = None, on_event=None, on_done=None,
        every_token: bool = True,
    ) -> tuple[Request, TextStream]:  # fmt: skip
        """The engine request of one turn: feed ``messages`` (earlier ones whole, the last one a user message
        followed by the assistant header), generate the reply, close the turn. Nothing changes until the
        engine starts it; its pieces come out of the returned :class:`TextStream`.

        Args:
            messages: ``(role, content)`` pairs, or a callable returning them when the turn starts (on the
                engine's thread, in order with the session's other turns; an exception it raises fails the
                request before anything is fed).
            on_event, on_done, every_token: Passed to the :class:`~streaming_llm.runtime.engine.Request`.

        Raises:
            ValueError: A bad ``max_new_tokens``, ``stop``, role or message.
        """
        check_max_new_tokens(max_new_tokens)
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"Stop strings must be non-empty strings, got {stop!r}.")
        if not callable(messages):
            _check_messages(messages)
        text = TextStream(self.tokenizer, stop, set(self.stop_ids), lambda: self.engine.row_stats(self.stream))

        def prompt() -> list[int]:  # on the engine's thread, when the turn starts
            turn = messages() if callable(messages) else messages
            if callable(messages):
                _check_messages(turn)
            if isinstance(self.memory, RetrievalMemory):
                self.memory.recall(self, turn[-1][1])  # pin the evicted passages that best match the message
            ids = []
            for role, content in turn[:-1]:
                ids += self._message(role, content)
                self.turns += role == "user"
            return ids + self._message("user", turn[-1][1], generation_prompt=True)

        def finish(request: Request) -> list[int]:
            text.finish(request.finish_reason)
            return self._close_turn(request.tokens, "".join(text.text))

        request = Request(
            self.stream, prompt, max_new_tokens, self.stop_ids, on_token=text.on_token, on_finish=finish,
            on_fed=self._track, on_event=on_event, deadline=deadline, chunk_size=self.prefill_chunk,
            sampling=sampling, on_done=on_done, every_token=every_token,
        )  # fmt: skip
        return request, text

    def add_message(self, role: str, content: str) -> None:
        """Feed a whole message without generating (e.g. earlier turns of a conversation being resumed)."""
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"role must be 'system', 'user' or 'assistant', got {role!r}")
        self.feed(self._message(role, content))
        self.turns += role == "user"

    def use_sampling(self, sampling: SamplingConfig) -> None:
        """Sample the next replies differently (keeps the repetition-penalty history)."""
        self.stream.use_sampling(sampling, self.tokenizer)

    def chat(self, message: str, max_new_tokens: int | None = 512, stop: tuple[str, ...] | list[str] = ()) -> str:
        """Add a user message and return the whole reply (``max_new_tokens`` as in :meth:`send`)."""
        return "".join(piece.text for piece in self.send(message, max_new_tokens, stop))

    def _close_turn(self, tokens: list[int], reply: str) -> list[int]:
        """The tokens that make the context equal the template's rendering of ``reply`` and close the turn.

        ``tokens`` are the generated ones: all but the last were fed (a stop id is never fed)."""
        fed = tokens[:-1]
        generated = [t for t in tokens if t not in self.stop_ids]
        self._track(fed)
        decode = self.tokenizer.decode
        fed_text = decode(fed, skip_special_tokens=True) if fed else ""
        unfed = generated[len(fed) :]
        if reply.startswith(fed_text):
            # The sampled token itself when the reply is all of it (cut by max_new_tokens, stream closed);
            # else the missing text (e.g. what came before a stop string inside the last token).
            exact = unfed and decode(generated, skip_special_tokens=True) == reply
            extra = unfed if exact else self._tokens(reply[len(fed_text) :])
            content = reply
        else:  # a stop string spanning tokens: its start was fed and cannot be taken back
            extra, content = [], fed_text
        self.turns += 1
        return extra + self._tokens(self.template.assistant_tail(content))

    def ingest(
        self,
        source: str | os.PathLike,
        chunk_size: int | None = None,
        progress: bool | Callable[[IngestProgress], None] = True,
    ) -> IngestStats:
        """Feed a long document (text, or a path to a UTF-8 text file) as one user message, chunk by chunk.

        The model sees exactly the tokens of the same text sent as a message (the document is tokenized
        incrementally, :func:`~streaming_llm.runtime.tokenize.stream_tokens`, never block by block), in
        bounded memory: the file is read in blocks and the cache is fixed. Chunking gives the same result as
        feeding token by token. Ask about it afterwards with :meth:`chat`.

        Args:
            source: The text, or a path (``os.PathLike``, or a string naming an existing file).
            chunk_size: Tokens per forward (None: chosen from free memory, 512 on CPU).
            progress: True: a progress bar on stderr (the document's bytes or characters, characters and tokens
                fed, rate, time left; after half a second, one line estimating the whole run). A callable gets an
                :class:`~streaming_llm.sessions.documents.IngestProgress` after every fed chunk. False: silent.

        Returns:
            :class:`IngestStats`: tokens fed (the document with its message markup), seconds, rate, characters.

        Raises:
            FileNotFoundError: a path that is not a file (before anything is fed).
            ValueError: a bad ``chunk_size``.
        """
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1 (or None: chosen from free memory), got {chunk_size!r}")
        document = Document(source)
        size = chunk_size or self.prefill_chunk or self.engine.chunk_size
        before, after = self.template.split("user")
        read = [0]  # characters of the document read so far

        def blocks() -> Iterator[str]:
            for block in document.blocks():
                read[0] += len(block)
                yield block

        began, fed, chars, done, markup = time.perf_counter(), 0, 0, 0, len(before)  # markup: left to skip
        previous_chunk, self.prefill_chunk = self.prefill_chunk, size
        report = progress if callable(progress) else ProgressBar(document, str(self.model.device)) if progress else None
        try:
            for piece in stream_tokens(self.tokenizer, itertools.chain([before], blocks(), [after])):
                body = piece.text[markup:]  # this piece's document text (and, at the very end, the closing markup)
                markup = max(0, markup - len(piece.text))
                for start in range(0, len(piece.ids), size):
                    chunk = piece.ids[start : start + size]
                    self.feed(chunk)
                    fed += len(chunk)
                    if report is not None:
                        part = body[: len(body) * (start + len(chunk)) // len(piece.ids)]
                        report(IngestProgress(min(done + document.size(part), document.total), document.total,
                                              document.unit, min(chars + len(part), read[0]), fed,
                                              time.perf_counter() - began))  # fmt: skip
                chars, done = min(chars + len(body), read[0]), min(done + document.size(body), document.total)
            seconds = time.perf_counter() - began
            if report is not None:  # all of it (a file's bytes are counted from its decoded text until here)
                report(IngestProgress(document.total, document.total, document.unit, read[0], fed, seconds))
        finally:
            self.prefill_chunk = previous_chunk
            if isinstance(report, ProgressBar):
                report.close()
        return IngestStats(fed, seconds, fed / max(seconds, 1e-9), read[0])

    def stats(self, recorded: bool = False) -> SessionStats:
        """Where the session stands now; ``recorded=True``: as of its last completed request (a snapshot any
        thread may read, e.g. while a shared engine's thread runs it)."""
        row = self.stream.stats if recorded else self.engine.row_stats(self.stream)
        if row is None:  # nothing fed yet
            row = self.engine.cache.stats_for(({}, {"start_size": self.stream.start_size, "groups": [
                {"seen": 0, "segment_len": 0}] * len(self.engine.cache.groups)}))  # fmt: skip
        return SessionStats(
            turns=self.turns, seen_tokens=row.seen_tokens, evicted_tokens=row.evicted_tokens,
            cached_tokens=row.cached_tokens, pinned_tokens=row.pinned_tokens, summary_tokens=row.segment_tokens,
            capacity=row.capacity, cache_bytes=row.cache_bytes,
        )  # fmt: skip

    def stats_dict(self, recorded: bool = False) -> dict[str, int]:
        return asdict(self.stats(recorded))

    def memory_info(self) -> dict | None:
        """The memory's kind and size: retrieval ``{"kind", "passages", "index_bytes"}``, hybrid ``{"kind",
        "summary_tokens"}``, or None without memory."""
        if isinstance(self.memory, RetrievalMemory):
            return {"kind": "retrieval", "passages": len(self.memory), "index_bytes": self.memory.nbytes}
        if self.memory:
            return {"kind": "hybrid", "summary_tokens": self.cache.segment_len}
        return None

    # -- state ---------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """A snapshot of everything needed to continue this session exactly: ``(tensors, state)``.

        ``tensors`` maps names to tensors (the cache row's, the tracked ids, the last logits, the RNG
        state), all copies on the host that later turns cannot change; ``state`` is JSON-serialisable
        (counters, template context, summary, sampling). Its size does not grow with the conversation.
        Rebuild with :meth:`from_state`.

        Raises:
            SessionBrokenError: The session failed inside a forward.
        """
        self._check_usable()
        cache_tensors, counters = self.engine.snapshot(self.stream)
        tensors = {f"cache.{k}": v for k, v in cache_tensors.items()}
        tensors["session.sink_ids"] = torch.tensor(self.sink_ids, dtype=torch.int64)
        if self.memory:
            tensors["session.window_ids"] = torch.tensor(list(self.window_ids), dtype=torch.int64)
            tensors["session.pending_ids"] = torch.tensor(self.pending_ids, dtype=torch.int64)
        if self.last_logits is not None:
            tensors["session.last_logits"] = self.last_logits.detach().to("cpu", copy=True)
        if self.sampler.generator is not None:
            tensors["session.rng_state"] = self.sampler.generator.get_state()
        memory = None
        if isinstance(self.memory, RetrievalMemory):  # its index travels inside the session file
            memory_tensors, memory = self.memory.state()
            tensors.update({f"memory.{k}": v for k, v in memory_tensors.items()})
        elif self.memory:
            memory = {"max_tokens": self.memory.max_tokens, "update_every": self.memory.update_every,
                      "frame": self.memory.frame}  # fmt: skip
        state = {
            "cache": counters, "system_prompt": self.system_prompt, "turns": self.turns, "summary": self.summary,
            "template_context": [dict(m) for m in self.template.context], "sampling": asdict(self.sampling),
            "recent_ids": list(self.sampler.recent), "prefill_chunk": self.prefill_chunk, "memory": memory,
        }  # fmt: skip
        return tensors, state

    @classmethod
    def from_state(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tensors: dict[str, torch.Tensor],
                   state: dict, memory: HybridMemory | RetrievalMemory | None = None, *, engine: Engine | None = None,
                   name: str = "session") -> StreamingSession:  # fmt: skip
        """Rebuild a session from :meth:`state`'s output (tensors on any device), on a private engine or on
        ``engine``'s rows.

        ``memory`` supplies the summariser for a session saved with hybrid memory (its sizes come from
        the state); without it the model summarises itself. Raises ``KeyError``/``TypeError``/``ValueError``
        for inconsistent input (:meth:`load` turns them into :class:`SessionFileError`).
        """
        counters = state["cache"]
        memory = _saved_memory(tensors, state["memory"], memory)
        cache_tensors = {k.removeprefix("cache."): v for k, v in tensors.items() if k.startswith("cache.")}
        session = cls(
            model, tokenizer, None, start_size=int(counters["start_size"]), recent_size=int(counters["recent_size"]),
            pin_system_prompt=False, sampling=SamplingConfig(**state["sampling"]), memory=memory,
            prefill_chunk=state["prefill_chunk"], engine=engine, name=name, _state=(cache_tensors, counters),
        )  # fmt: skip
        session._restore_fields(tensors, state)
        return session

    def _restore_fields(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.system_prompt = state["system_prompt"]
        self.turns, self.summary = int(state["turns"]), str(state["summary"])
        self.template.restore(state["template_context"])
        self.sink_ids = tensors["session.sink_ids"].tolist()
        seen = int(state["cache"]["groups"][0]["seen"])
        if len(self.sink_ids) != min(self.stream.start_size, seen):
            raise ValueError("The saved sink ids do not match the cache's sinks.")
        if self.memory:
            self.window_ids.extend(tensors["session.window_ids"].tolist())
            self.pending_ids = tensors["session.pending_ids"].tolist()
        self.sampler.observe([int(t) for t in state["recent_ids"]])
        if "session.rng_state" in tensors and self.sampler.generator is not None:
            self.sampler.generator.set_state(tensors["session.rng_state"].cpu())
        if "session.last_logits" in tensors:
            self.stream.restore_logits(tensors["session.last_logits"].to(self.model.device))

    def fork(
        self, *, keep_memory: bool = True, engine: Engine | None = None, name: str | None = None
    ) -> StreamingSession:
        """An independent copy that continues from this session's state (a snapshot): on a private engine, or on
        ``engine``'s rows. ``keep_memory=False`` drops the memory (its index or summary) from the copy."""
        tensors, state = self.state()
        if not keep_memory:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("memory.")}
            tensors.pop("session.window_ids", None)
            tensors.pop("session.pending_ids", None)
            state = {**state, "memory": None}
        return StreamingSession.from_state(self.model, self.tokenizer, tensors, state, engine=engine,
                                           name=name or f"{self.name}-fork")  # fmt: skip

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole session to ``path`` (safetensors), atomically; returns ``path``."""
        tensors, state = self.state()
        return write_session_file(path, tensors, state, self.model)

    @classmethod
    def load(cls, path: str | os.PathLike, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             memory: HybridMemory | RetrievalMemory | None = None, *,
             kv_dtype: str | None = "saved") -> StreamingSession:  # fmt: skip
        """Restore a session saved with :meth:`save`.

        ``kv_dtype``: the KV storage the caller expects (None: the model's dtype, ``"int8"``, ...); a file saved
        with another one is refused. ``"saved"`` (default): whatever the file holds (its quantized ring is loaded
        as stored).

        Raises:
            FileNotFoundError: no file at ``path``.
            SessionFileError: whatever else is wrong with the file (corrupt, edited, foreign, other model, another
                KV dtype than ``kv_dtype``).
        """
        state, tensors = read_session_file(path, model)
        saved = state.get("cache", {}).get("kv_dtype") if isinstance(state.get("cache"), dict) else None
        if kv_dtype != "saved" and saved != check_kv_dtype(kv_dtype):
            raise SessionFileError(
                f"{path} stores its KV cache as kv_dtype={saved!r}, not {kv_dtype!r}: load it with the KV dtype it "
                "was saved with (a quantized ring cannot be converted without loss)."
            )
        try:
            return cls.from_state(model, tokenizer, tensors, state, memory)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
            raise SessionFileError(f"{path} holds an inconsistent session ({type(error).__name__}: {error}).") from None


def _check_messages(messages: list[tuple[str, str]]) -> None:
    if not messages or messages[-1][0] != "user":
        raise ValueError("A turn ends with a user message.")
    for role, content in messages:
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"role must be 'system', 'user' or 'assistant', got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"The message must be a string, got {type(content).__name__}.")


def _saved_memory(tensors: dict[str, torch.Tensor], saved: dict | None,
                  memory: HybridMemory | RetrievalMemory | None) -> HybridMemory | RetrievalMemory | None:  # fmt: skip
    """The memory a saved session continues with: its retrieval index, or a hybrid memory with its sizes."""
    if saved is not None and saved.get("kind") == RetrievalMemory.kind:
        memory_tensors = {k.removeprefix("memory."): v for k, v in tensors.items() if k.startswith("memory.")}
        if isinstance(memory, RetrievalMemory):  # the caller's object, with the saved index
            memory.load_state(memory_tensors)
            return memory
        return RetrievalMemory.from_state(memory_tensors, saved)
    if saved is not None:
        summarizer = memory.summarizer if isinstance(memory, HybridMemory) else None
        return HybridMemory(summarizer, **saved)
    if memory is not None:
        raise ValueError("This session was saved without memory; load it without `memory`.")
    return None
