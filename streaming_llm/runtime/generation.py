"""Text generation on the engine: token ids in, text pieces with the cache's state out.

Layered like mlx-lm: the engine's requests (token ids, :mod:`streaming_llm.runtime.engine`) ->
:class:`TextStream` (incremental detokenization, stop strings, stats per piece) ->
:func:`stream_generate` (text pieces as they come) -> :func:`generate` (one string). Generation can
run forever (``max_new_tokens=None``): memory is the cache's, which is fixed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core.cache import RowStats, StreamingCache
from .detokenize import IncrementalDetokenizer, StopMatcher
from .engine import Engine, Request, Stream, check_max_new_tokens
from .sampling import Sampler, SamplingConfig

__all__ = ["GenerationChunk", "TextStream", "check_max_new_tokens", "eos_ids", "generate", "stream_generate"]


@dataclass(frozen=True)
class GenerationChunk:
    """One piece of streamed output, with the stream's cache state after it.

    Attributes:
        text: New text (may be empty while a character or a possible stop string is incomplete).
        token_id: The token just generated (None on the final, text-flushing chunk).
        generated: Tokens generated so far.
        seen_tokens: Tokens the stream has processed in total (prompt + generated).
        cached_tokens: Tokens the next query can attend to.
        evicted_tokens: Tokens evicted so far.
        cache_bytes: Bytes of cache the stream holds (constant once allocated).
        tokens_per_second: Decode speed so far.
        finish_reason: None while generating, then ``"eos"``, ``"stop"``, ``"length"``, ``"cancelled"``...
    """

    text: str
    token_id: int | None
    generated: int
    seen_tokens: int
    cached_tokens: int
    evicted_tokens: int
    cache_bytes: int
    tokens_per_second: float
    finish_reason: str | None = None


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends generation for this model."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Iterable):
            ids.update(int(v) for v in value)
    return ids


class TextStream:
    """Turns a request's generated tokens into :class:`GenerationChunk` pieces (on the engine's thread).

    Args:
        tokenizer: Decodes the tokens.
        stop: Strings that end generation (not included in the text).
        stop_ids: Token ids that end generation (their text is not included).
        stats: Returns the stream's cache state for each piece.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Iterable[str], stop_ids: set[int],
                 stats: Callable[[], RowStats]):  # fmt: skip
        self.detok, self.matcher = IncrementalDetokenizer(tokenizer), StopMatcher(tuple(stop))
        self.stop_ids, self.stats = stop_ids, stats
        self.pieces: deque[GenerationChunk] = deque()
        self.text: list[str] = []
        self.count, self.began = 0, time.perf_counter()
        self.stopped = False

    def on_token(self, token: int) -> bool:
        """``Request.on_token``: queue the piece; True when a stop string completed."""
        self.count += 1
        if token in self.stop_ids:
            return False
        text, self.stopped = self.matcher.push(self.detok.add(token))
        self._piece(text, token, "stop" if self.stopped else None)
        return self.stopped

    def finish(self, reason: str | None) -> None:
        """Queue the final piece: the text still held back, and the finish reason."""
        if not self.stopped:
            tail, stopped = self.matcher.push(self.detok.flush())
            reason = "stop" if stopped else reason
            self._piece(tail + ("" if stopped else self.matcher.flush()), None, reason)
        elif self.pieces and self.pieces[-1].finish_reason == "stop":
            pass  # the stop piece already carries the reason

    def _piece(self, text: str, token: int | None, reason: str | None) -> None:
        stats = self.stats()
        speed = self.count / max(time.perf_counter() - self.began, 1e-9)
        self.text.append(text)
        self.pieces.append(GenerationChunk(
            text, token, self.count, stats.seen_tokens, stats.cached_tokens, stats.evicted_tokens, stats.cache_bytes,
            speed, reason,
        ))  # fmt: skip

    def drain(self) -> Iterator[GenerationChunk]:
        while self.pieces:
            yield self.pieces.popleft()


def run_text_request(engine: Engine, request: Request, text: TextStream) -> Iterator[GenerationChunk]:
    """Drive ``engine`` (owned by the caller) until ``request`` is done, yielding its pieces as they come.
    Closing the iterator early cancels the request (its tail is still fed)."""
    try:
        for _ in engine.run(request):
            yield from text.drain()
        if request.error is not None:
            raise request.error
        yield from text.drain()
    finally:
        if not request.done:
            request.cancel("closed")
            for _ in engine.run(request):
                pass


def private_engine(
    model: PreTrainedModel, cache: StreamingCache, chunk_size: int | None = None, cuda_graphs: bool | None = None
) -> tuple[Engine, Stream]:
    """An engine over a one-row ``cache``, and the stream of its row 0 (what single-stream surfaces use)."""
    fresh = cache.seen_tokens == 0
    engine = Engine(model, cache, chunk_size=chunk_size, cuda_graphs=cuda_graphs)
    return engine, engine.open("stream", start_size=cache.start_size) if fresh else engine.open("stream", row=0)


def stream_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[int],
    *,
    cache: StreamingCache | None = None,
    start_size: int = 4,
    recent_size: int = 2000,
    max_new_tokens: int | None = 256,
    sampling: SamplingConfig | None = None,
    stop: list[str] | tuple[str, ...] = (),
    prefill_chunk: int | None = None,
    kv_dtype: str | None = None,
) -> Iterator[GenerationChunk]:
    """Generate text as it is produced, far past the model's context, in constant memory.

    Runs on a private :class:`~streaming_llm.runtime.engine.Engine` over a one-row cache: the prompt is
    fed in chunks, decode steps replay a CUDA graph on GPU.

    Args:
        model: A supported causal LM (switched to the streaming attention if needed).
        tokenizer: Its tokenizer.
        prompt: Text (tokenized as is, no chat template) or token ids.
        cache: A one-row cache to continue from (the last token generated into it is not fed); default a
            new ``StreamingCache(start_size, recent_size)``.
        start_size: Attention sinks for a new cache.
        recent_size: Window for a new cache.
        max_new_tokens: Stop after this many tokens; None generates until EOS or a stop string.
        sampling: Greedy by default. The repetition controls see the prompt too.
        stop: Strings that end generation (not included in the output).
        prefill_chunk: Prompt tokens per forward (None: chosen from free memory).
        kv_dtype: KV storage of a new cache (see :class:`StreamingCache`; None: the model's dtype).

    Yields:
        :class:`GenerationChunk` pieces; the last one has ``finish_reason`` set.

    Raises:
        ValueError: An empty prompt, a bad ``max_new_tokens`` or ``stop``, a cache with several rows.
    """
    check_max_new_tokens(max_new_tokens)
    if (isinstance(prompt, str) and not prompt) or (not isinstance(prompt, str) and len(prompt) == 0):
        raise ValueError("The prompt is empty: give at least one character (or token id) to continue from.")
    stop = tuple(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"Stop strings must be non-empty strings, got {stop!r}.")
    if cache is None:
        cache = StreamingCache(model.config, start_size, recent_size, rows=1, dtype=model.dtype, device=model.device,
                               kv_dtype=kv_dtype)  # fmt: skip
    elif cache.rows != 1:
        raise ValueError(f"stream_generate continues a one-row cache; this one has {cache.rows} rows (use an Engine).")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
    engine, stream = private_engine(model, cache, prefill_chunk)
    stream.use_sampling(sampling or SamplingConfig(), tokenizer)
    stops = eos_ids(model, tokenizer)
    text = TextStream(tokenizer, stop, stops, lambda: engine.row_stats(stream))
    request = Request(stream, ids, max_new_tokens, frozenset(stops), on_token=text.on_token,
                      on_finish=lambda r: text.finish(r.finish_reason) or [])  # fmt: skip
    engine.submit(request)
    yield from run_text_request(engine, request, text)


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str | list[int], **kwargs) -> str:
    """Like :func:`stream_generate`, returning the whole text (``max_new_tokens`` must be finite)."""
    if "max_new_tokens" in kwargs and kwargs["max_new_tokens"] is None:
        raise ValueError("generate() needs a finite max_new_tokens; use stream_generate() for endless output.")
    return "".join(piece.text for piece in stream_generate(model, tokenizer, prompt, **kwargs))


@torch.no_grad()
def prefill(model: PreTrainedModel, cache: StreamingCache, ids: list[int] | torch.Tensor, chunk_size: int | None = None,
            progress: bool = False) -> torch.Tensor:  # fmt: skip
    """Feed ``ids`` to a one-row ``cache`` in chunks (a private engine, no sampling); return the logits
    ``(vocab,)`` after the last token. For evaluation and benchmarks.

    Raises:
        ValueError: No tokens, or a bad ``chunk_size``.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()
    if not ids:
        raise ValueError("Nothing to feed: the token list is empty.")
    engine, stream = private_engine(model, cache, chunk_size)
    if progress:
        from tqdm.auto import tqdm

        with tqdm(total=len(ids), unit="tok", desc="prefill", leave=False) as bar:
            for start in range(0, len(ids), engine.chunk_size):
                piece = ids[start : start + engine.chunk_size]
                engine.run_to_end(engine.submit(Request(stream, piece, 0)))
                bar.update(len(piece))
    else:
        engine.run_to_end(engine.submit(Request(stream, ids, 0)))
    return stream.last_logits


def sampler_for(sampling: SamplingConfig | None, model: PreTrainedModel, tokenizer=None) -> Sampler:
    """A sampler on the model's device (whitespace/punctuation spared by the penalty when ``tokenizer`` is given)."""
    return Sampler(sampling, device=model.device, tokenizer=tokenizer)
