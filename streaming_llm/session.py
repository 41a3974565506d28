"""Multi-turn conversations that never end and never re-process history.

A :class:`StreamingSession` owns one :class:`StreamingCache` for its whole life. Each turn feeds only
its own new tokens (the chat template is rendered incrementally), the model's reply is generated on
the same cache, and memory stays fixed however long the conversation runs. A system prompt can be
pinned next to the attention sinks so it is never evicted; long documents are fed chunk by chunk;
the whole state can be saved to a safetensors file and restored exactly.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .architectures import describe
from .attention import install
from .cache import StreamingCache
from .chat_template import IncrementalChatTemplate
from .generation import PREFILL_CHUNK, GenerationChunk, _stream, eos_ids, prefill
from .memory import HybridMemory
from .retrieval import RetrievalMemory
from .sampling import Sampler, SamplingConfig


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
    """What :meth:`StreamingSession.ingest` did."""

    tokens: int
    seconds: float
    tokens_per_second: float


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
            :class:`~streaming_llm.retrieval.RetrievalMemory` (index evicted text, pin the best matches per turn).
        prefill_chunk: Tokens per forward when feeding prompts and documents.
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
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        install(model)
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt
        self.sampling = sampling or SamplingConfig()
        self.memory = memory
        self.prefill_chunk = prefill_chunk
        self.template = IncrementalChatTemplate(tokenizer)
        self.sampler = Sampler(self.sampling, device=model.device)
        self.turns = 0
        self.last_logits: torch.Tensor | None = None
        opening = self._tokens(self.template.add("system", system_prompt)) if system_prompt else []
        pinned = max(start_size, len(opening)) if pin_system_prompt else start_size
        capacity = memory.max_tokens if memory else 0
        if memory and any(layer.sliding_window for layer in describe(model.config).layers):
            raise NotImplementedError(
                "Hybrid memory is not available for models with sliding-window layers (their local layers have no "
                "pinned slot for a summary); use plain streaming with this model."
            )
        self.cache = StreamingCache(model.config, pinned, recent_size, segment_capacity=capacity)
        # Token ids currently in the window, and those evicted but not yet summarised (hybrid memory).
        self.window_ids: deque[int] = deque(maxlen=recent_size)
        self.pending_ids: list[int] = []
        self.summary = ""
        if opening:
            self.feed(opening)

    # -- feeding ----------------------------------------------------------------------------------
    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Feed token ids into the cache (never re-processed); return the next-token logits."""
        for chunk_start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[chunk_start : chunk_start + self.prefill_chunk]
            self.last_logits = prefill(self.model, self.cache, chunk, self.prefill_chunk)
            self._track(chunk)
        return self.last_logits

    def _track(self, ids: list[int]) -> None:
        """Follow which ids are in the window, so evicted text can be summarised."""
        seen_before = self.cache.seen_tokens - len(ids)
        skip = max(0, self.cache.start_size - seen_before)  # pinned tokens never enter the window
        for token in ids[skip:]:
            if len(self.window_ids) == self.window_ids.maxlen:
                self.pending_ids.append(self.window_ids[0])
            self.window_ids.append(token)
        if isinstance(self.memory, RetrievalMemory):
            self.memory.observe(self)  # index evicted text as passages
        elif self.memory and len(self.pending_ids) >= self.memory.update_every:
            self.update_summary()

    def update_summary(self) -> None:
        """Fold the evicted-but-unsummarised text into the pinned summary (hybrid memory)."""
        if not isinstance(self.memory, HybridMemory) or not self.pending_ids:
            return
        evicted = self.tokenizer.decode(self.pending_ids, skip_special_tokens=True)
        self.pending_ids = []
        self.summary = self.memory.summarize(self, self.summary, evicted)
        self.memory.install(self.model, self.tokenizer, self.cache, self.summary)

    # -- conversation ---------------------------------------------------------------------------------
    def send(
        self, message: str, max_new_tokens: int | None = 512, stop: tuple[str, ...] = ()
    ) -> Iterator[GenerationChunk]:
        """Add a user message and stream the reply; the turn is closed when the stream ends."""
        if isinstance(self.memory, RetrievalMemory):
            self.memory.recall(self, message)  # pin the evicted passages that best match the message
        logits = self.feed(self._tokens(self.template.add("user", message, generation_prompt=True)))
        generated: list[int] = []
        text: list[str] = []
        stream = _stream(self.model, self.tokenizer, self.cache, logits, self.sampler, max_new_tokens, stop)
        try:
            for piece in stream:
                if piece.token_id is not None:
                    generated.append(piece.token_id)
                    if len(generated) > 1:
                        self._track(generated[-2:-1])  # the previous token was fed to produce this one
                text.append(piece.text)
                yield piece
        finally:
            stream.close()
            self._close_turn(generated, "".join(text))

    def add_message(self, role: str, content: str) -> None:
        """Feed a whole message without generating (e.g. earlier turns of a conversation being resumed)."""
        self.feed(self._tokens(self.template.add(role, content)))
        self.turns += role == "user"

    def use_sampling(self, sampling: SamplingConfig) -> None:
        """Sample the next replies differently (keeps the repetition-penalty history)."""
        recent = list(self.sampler.recent)
        self.sampling, self.sampler = sampling, Sampler(sampling, device=self.model.device)
        self.sampler.observe(recent)

    def chat(self, message: str, max_new_tokens: int | None = 512, stop: tuple[str, ...] = ()) -> str:
        """Add a user message and return the whole reply."""
        return "".join(piece.text for piece in self.send(message, max_new_tokens, stop))

    def _close_turn(self, generated: list[int], reply: str) -> None:
        # Every generated token but the last was fed while generating; feed the last (unless it is an
        # end-of-turn token, which the template adds back), then the template's closing text.
        last = [generated[-1]] if generated and generated[-1] not in eos_ids(self.model, self.tokenizer) else []
        self.feed(last + self._tokens(self.template.assistant_tail(reply)))
        self.turns += 1

    def ingest(self, source: str | os.PathLike, chunk_size: int = PREFILL_CHUNK, progress: bool = True) -> IngestStats:
        """Feed a long document (text, or a path to a text file) as a user message, chunk by chunk.

        Memory stays bounded (the file is read and tokenized in blocks; the cache is fixed) and the
        result equals feeding the tokens one by one. Ask about it afterwards with :meth:`chat`.
        """
        import time

        before, after = self.template.split("user")
        began, fed = time.perf_counter(), 0
        previous_chunk, self.prefill_chunk = self.prefill_chunk, chunk_size
        try:
            self.feed(self._tokens(before))
            with tqdm(unit="tok", desc="ingest", disable=not progress) as bar:
                for block in _text_blocks(source):
                    ids = self._tokens(block)
                    self.feed(ids)
                    fed += len(ids)
                    bar.update(len(ids))
            self.feed(self._tokens(after))
        finally:
            self.prefill_chunk = previous_chunk
        seconds = time.perf_counter() - began
        return IngestStats(fed, seconds, fed / max(seconds, 1e-9))

    def stats(self) -> SessionStats:
        return SessionStats(
            turns=self.turns, seen_tokens=self.cache.seen_tokens, evicted_tokens=self.cache.evicted_tokens,
            cached_tokens=self.cache.cached_tokens, pinned_tokens=self.cache.start_size,
            summary_tokens=self.cache.segment_len, capacity=self.cache.window.capacity + self.cache.segment_capacity,
            cache_bytes=self.cache.nbytes,
        )  # fmt: skip

    def stats_dict(self) -> dict[str, int]:
        return asdict(self.stats())

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole session to ``path`` (safetensors), atomically."""
        from .persistence import save_session

        return save_session(self, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             memory: HybridMemory | RetrievalMemory | None = None) -> StreamingSession:  # fmt: skip
        """Restore a session saved with :meth:`save` (raises :class:`SessionFileError` on bad files)."""
        from .persistence import load_session

        return load_session(cls, Path(path), model, tokenizer, memory)


def _text_blocks(source: str | os.PathLike, block_chars: int = 1 << 16) -> Iterator[str]:
    """The text in blocks that end at line breaks (or spaces), so tokenization is not cut mid-word.

    A ``Path`` (or a string naming an existing file) is read lazily; any other string is the text.
    """
    if isinstance(source, os.PathLike) and not Path(source).is_file():
        raise FileNotFoundError(f"No such file: {source}")
    is_file = isinstance(source, os.PathLike) or _names_a_file(source)
    pieces = _read_lazily(Path(source), block_chars) if is_file else _slices(str(source), block_chars)
    carry = ""
    for piece in pieces:
        block = carry + piece
        cut = max(block.rfind("\n"), block.rfind(" ")) + 1 or len(block)
        carry = block[cut:]
        if block[:cut]:
            yield block[:cut]
    if carry:
        yield carry


def _names_a_file(text: str) -> bool:
    if "\n" in text or len(text) > 1024:
        return False
    try:
        return Path(text).is_file()
    except OSError:  # e.g. a sentence too long to be a file name
        return False


def _read_lazily(path: Path, block_chars: int) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        while block := f.read(block_chars):
            yield block


def _slices(text: str, block_chars: int) -> Iterator[str]:
    for i in range(0, len(text), block_chars):
        yield text[i : i + block_chars]
