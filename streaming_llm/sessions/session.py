"""Multi-turn conversations that never end and never re-process history.

A :class:`StreamingSession` owns one :class:`StreamingCache` for its whole life. Each turn feeds only
its own new tokens (the chat template is rendered incrementally), the model's reply is generated on
the same cache, and memory stays fixed however long the conversation runs. A system prompt can be
pinned next to the attention sinks so it is never evicted; long documents are fed chunk by chunk;
the whole state can be saved to a safetensors file and restored exactly.
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
from ..core.cache import StreamingCache
from ..runtime.generation import GenerationChunk, _stream, auto_chunk_size, check_max_new_tokens, prefill
from ..runtime.sampling import Sampler, SamplingConfig
from ..runtime.tokenize import stream_tokens
from .chat_template import IncrementalChatTemplate
from .documents import Document, IngestProgress, ProgressBar
from .memory import HybridMemory
from .persistence import SessionFileError, read_session_file, write_session_file
from .retrieval import RetrievalMemory


class SessionBrokenError(RuntimeError):
    """The session cannot continue: generation failed inside a forward, so its cache may be half-updated."""


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
    """An endless chat on one streaming cache.

    Args:
        model: A supported causal LM (switched to the streaming attention).
        tokenizer: Its tokenizer, with a chat template.
        system_prompt: Optional system message, rendered first.
        start_size: Attention sinks (default 4).
        recent_size: Recent tokens kept (default 2000).
        pin_system_prompt: Keep the whole system prompt forever, beside the sinks (default True).
        sampling: How replies are sampled (greedy by default).
        memory: Optional :class:`HybridMemory` (summarise evicted text into a pinned slot) or
            :class:`~streaming_llm.sessions.retrieval.RetrievalMemory` (index evicted text, pin the best matches
            per turn).
        prefill_chunk: Tokens per forward when feeding prompts and documents.

    Turn boundaries: after every turn the tokens the model has seen are the chat template's rendering
    of the conversation (as returned to the caller), however the reply ended: end-of-turn token,
    ``max_new_tokens``, a stop string, or the caller closing the stream early (Ctrl-C, a client that
    disconnects). One exception, inherent to a cache that cannot take tokens back: when a stop string
    spans several tokens, the tokens before the one that completes it were already fed, so the context
    keeps that start of the stop string (the session then records the reply as the model saw it). An
    exception inside a forward leaves the cache half-updated: the session raises
    :class:`SessionBrokenError` from then on (restore it from a saved state).

    Memory: the cache is fixed; the session itself holds O(1) more: the sink ids (``start_size``), the
    template's last few messages, the sampler's bounded history and, with hybrid memory only, the ids
    in the window (``recent_size``) and at most ``memory.update_every`` evicted ids awaiting a summary.
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
    ):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        install(model)
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt
        self.sampling = sampling or SamplingConfig()
        self.memory = memory
        self.prefill_chunk = prefill_chunk
        self.template = IncrementalChatTemplate(tokenizer)
        self.sampler = Sampler(self.sampling, device=model.device, tokenizer=tokenizer)
        self.turns = 0
        self.last_logits: torch.Tensor | None = None
        self.broken: str | None = None
        opening = self._tokens(self.template.add("system", system_prompt)) if system_prompt else []
        pinned = max(start_size, len(opening)) if pin_system_prompt else start_size
        capacity = memory.max_tokens if memory else 0
        if memory and any(layer.sliding_window for layer in describe(model.config).layers):
            raise NotImplementedError(
                "Hybrid memory is not available for models with sliding-window layers (their local layers have no "
                "pinned slot for a summary); use plain streaming with this model."
            )
        self.cache = StreamingCache(model.config, pinned, recent_size, segment_capacity=capacity)
        self.sink_ids: list[int] = []  # the pinned tokens' ids (hybrid memory re-encodes them)
        # With hybrid memory only: ids in the window, and those evicted but not yet summarised.
        self.window_ids: deque[int] = deque(maxlen=recent_size if memory else 0)
        self.pending_ids: list[int] = []
        self.summary = ""
        if opening:
            self.feed(opening)

    # -- feeding ----------------------------------------------------------------------------------
    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _check_usable(self) -> None:
        if self.broken:
            raise SessionBrokenError(
                f"This session cannot continue: {self.broken}. Its cache may be half-updated; restore it from a "
                "saved state (StreamingSession.load) or start a new session."
            )

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Feed token ids into the cache (never re-processed); return the next-token logits (vocab,)."""
        self._check_usable()
        size = self.prefill_chunk or auto_chunk_size(self.model, self.cache)  # None: chosen from free memory
        for chunk_start in range(0, len(ids), size):
            chunk = ids[chunk_start : chunk_start + size]
            try:
                self.last_logits = prefill(self.model, self.cache, chunk, size)
            except BaseException as error:
                self.broken = f"a forward failed while feeding tokens ({type(error).__name__}: {error})"
                raise
            self._track(chunk)
        return self.last_logits

    def _track(self, ids: list[int]) -> None:
        """Keep the sink ids, and (hybrid memory) follow which ids leave the window to be summarised."""
        seen_before = self.cache.seen_tokens - len(ids)
        skip = max(0, self.cache.start_size - seen_before)  # pinned tokens never enter the window
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
            self.memory.observe(self)  # index evicted text as passages

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
        check_max_new_tokens(max_new_tokens)
        if not isinstance(message, str):
            raise ValueError(f"The message must be a string, got {type(message).__name__}.")
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"Stop strings must be non-empty strings, got {stop!r}.")
        self._check_usable()
        return self._reply(message, max_new_tokens, stop)

    def _reply(self, message: str, max_new_tokens: int | None, stop: tuple[str, ...]) -> Iterator[GenerationChunk]:
        # Nothing happens until the first piece is asked for (a stream never iterated changes nothing).
        if isinstance(self.memory, RetrievalMemory):
            self.memory.recall(self, message)  # pin the evicted passages that best match the message
        logits = self.feed(self._tokens(self.template.add("user", message, generation_prompt=True)))
        first = self.cache.seen_tokens
        generated: list[int] = []
        text: list[str] = []
        stream = _stream(self.model, self.tokenizer, self.cache, logits, self.sampler, max_new_tokens, stop)
        try:
            while True:
                try:
                    piece = next(stream)
                except StopIteration:
                    break
                except BaseException as error:
                    self.broken = f"generation failed ({type(error).__name__}: {error})"
                    raise
                if piece.token_id is not None:
                    generated.append(piece.token_id)
                text.append(piece.text)
                yield piece
        finally:
            stream.close()
            if not self.broken:
                # Tokens fed while generating: every sampled one but the last (an end-of-turn token is
                # never fed; the template's closing text renders it).
                self._close_turn(generated[: self.cache.seen_tokens - first], generated, "".join(text))

    def add_message(self, role: str, content: str) -> None:
        """Feed a whole message without generating (e.g. earlier turns of a conversation being resumed)."""
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"role must be 'system', 'user' or 'assistant', got {role!r}")
        self.feed(self._tokens(self.template.add(role, content)))
        self.turns += role == "user"

    def use_sampling(self, sampling: SamplingConfig) -> None:
        """Sample the next replies differently (keeps the repetition-penalty history)."""
        recent = list(self.sampler.recent)
        self.sampling, self.sampler = sampling, Sampler(sampling, device=self.model.device, tokenizer=self.tokenizer)
        self.sampler.observe(recent)

    def chat(self, message: str, max_new_tokens: int | None = 512, stop: tuple[str, ...] | list[str] = ()) -> str:
        """Add a user message and return the whole reply (``max_new_tokens`` as in :meth:`send`)."""
        return "".join(piece.text for piece in self.send(message, max_new_tokens, stop))

    def _close_turn(self, fed: list[int], generated: list[int], reply: str) -> None:
        """Make the context equal the template's rendering of ``reply``, then close the assistant turn."""
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
        self.feed(extra + self._tokens(self.template.assistant_tail(content)))
        self.turns += 1

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
        size = chunk_size or auto_chunk_size(self.model, self.cache)
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

    def stats(self) -> SessionStats:
        return SessionStats(
            turns=self.turns, seen_tokens=self.cache.seen_tokens, evicted_tokens=self.cache.evicted_tokens,
            cached_tokens=self.cache.cached_tokens, pinned_tokens=self.cache.start_size,
            summary_tokens=self.cache.segment_len, capacity=self.cache.window.capacity + self.cache.segment_capacity,
            cache_bytes=self.cache.nbytes,
        )  # fmt: skip

    def stats_dict(self) -> dict[str, int]:
        return asdict(self.stats())

    # -- state ---------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything needed to continue this session exactly: ``(tensors, state)``.

        ``tensors`` maps names to tensors (the cache's, the tracked ids, the last logits, the RNG
        state); ``state`` is JSON-serialisable (counters, template context, summary, sampling). Its
        size does not grow with the conversation. Rebuild with :meth:`from_state`.
        """
        self._check_usable()
        cache_tensors, counters = self.cache.state()
        tensors = {f"cache.{k}": v for k, v in cache_tensors.items()}
        tensors["session.sink_ids"] = torch.tensor(self.sink_ids, dtype=torch.int64)
        if self.memory:
            tensors["session.window_ids"] = torch.tensor(list(self.window_ids), dtype=torch.int64)
            tensors["session.pending_ids"] = torch.tensor(self.pending_ids, dtype=torch.int64)
        if self.last_logits is not None:
            tensors["session.last_logits"] = self.last_logits
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
            "template_context": self.template.context, "sampling": asdict(self.sampling),
            "recent_ids": list(self.sampler.recent), "prefill_chunk": self.prefill_chunk, "memory": memory,
        }  # fmt: skip
        return tensors, state

    @classmethod
    def from_state(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tensors: dict[str, torch.Tensor],
                   state: dict, memory: HybridMemory | RetrievalMemory | None = None) -> StreamingSession:  # fmt: skip
        """Rebuild a session from :meth:`state`'s output (tensors on any device).

        ``memory`` supplies the summariser for a session saved with hybrid memory (its sizes come from
        the state); without it the model summarises itself. Raises ``KeyError``/``TypeError``/``ValueError``
        for inconsistent input (:meth:`load` turns them into :class:`SessionFileError`).
        """
        counters = state["cache"]
        saved_memory = state["memory"]
        if saved_memory is not None and saved_memory.get("kind") == RetrievalMemory.kind:
            memory_tensors = {k.removeprefix("memory."): v for k, v in tensors.items() if k.startswith("memory.")}
            if isinstance(memory, RetrievalMemory):  # the caller's object, with the saved index
                memory.load_state(memory_tensors)
            else:
                memory = RetrievalMemory.from_state(memory_tensors, saved_memory)
        elif saved_memory is not None:
            summarizer = memory.summarizer if isinstance(memory, HybridMemory) else None
            memory = HybridMemory(summarizer, **saved_memory)
        elif memory is not None:
            raise ValueError("This session was saved without memory; load it without `memory`.")
        session = cls(
            model, tokenizer, None, start_size=counters["start_size"], recent_size=counters["recent_size"],
            pin_system_prompt=False, sampling=SamplingConfig(**state["sampling"]), memory=memory,
            prefill_chunk=state["prefill_chunk"],
        )  # fmt: skip
        device = model.device
        cache_tensors = {k.removeprefix("cache."): v.to(device) for k, v in tensors.items() if k.startswith("cache.")}
        session.cache = StreamingCache.from_state(model.config, cache_tensors, counters)
        if session.cache.segment_capacity != (memory.max_tokens if memory else 0):
            raise ValueError("The cache's pinned-segment slot does not match the session's memory settings.")
        session.system_prompt = state["system_prompt"]
        session.turns, session.summary = int(state["turns"]), str(state["summary"])
        context = state["template_context"]
        if not all(isinstance(m, dict) and set(m) == {"role", "content"} for m in context):
            raise ValueError("The template context is not a list of messages.")
        session.template.context = list(context)
        session.sink_ids = tensors["session.sink_ids"].tolist()
        if len(session.sink_ids) != min(session.cache.start_size, session.cache.seen_tokens):
            raise ValueError("The saved sink ids do not match the cache's sinks.")
        if memory:
            session.window_ids.extend(tensors["session.window_ids"].tolist())
            session.pending_ids = tensors["session.pending_ids"].tolist()
        session.sampler.observe([int(t) for t in state["recent_ids"]])
        if "session.rng_state" in tensors and session.sampler.generator is not None:
            session.sampler.generator.set_state(tensors["session.rng_state"].cpu())
        if "session.last_logits" in tensors:
            session.last_logits = tensors["session.last_logits"].to(device)
        return session

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole session to ``path`` (safetensors), atomically; returns ``path``."""
        tensors, state = self.state()
        return write_session_file(path, tensors, state, self.model)

    @classmethod
    def load(cls, path: str | os.PathLike, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             memory: HybridMemory | RetrievalMemory | None = None) -> StreamingSession:  # fmt: skip
        """Restore a session saved with :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            SessionFileError: whatever else is wrong with the file (corrupt, edited, foreign, other model).
        """
        state, tensors = read_session_file(path, model)
        try:
            return cls.from_state(model, tokenizer, tensors, state, memory)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
            raise SessionFileError(f"{path} holds an inconsistent session ({type(error).__name__}: {error}).") from None
