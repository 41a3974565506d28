"""Generation on a streaming cache: prefill in chunks, decode one token at a time, stream text out.

Layered like mlx-lm: :func:`prefill` / :func:`decode_step` (tensors) -> :func:`generate_tokens`
(token ids) -> :func:`stream_generate` (text pieces with stats) -> :func:`generate` (one string).
Generation can run forever (``max_new_tokens=None``): memory is the cache's, which is fixed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core.attention import install
from ..core.cache import StreamingCache
from ..core.compat import cache_kwargs
from ..core.decode import decoder_for
from .detokenize import IncrementalDetokenizer, StopMatcher
from .sampling import Sampler, SamplingConfig

PREFILL_CHUNK = 512


@dataclass(frozen=True)
class GenerationChunk:
    """One piece of streamed output, with the cache's state after it.

    Attributes:
        text: New text (may be empty while a character or a possible stop string is incomplete).
        token_id: The token just generated (None on the final, text-flushing chunk).
        generated: Tokens generated so far.
        seen_tokens: Tokens the cache has processed in total (prompt + generated).
        cached_tokens: Tokens the next query can attend to.
        evicted_tokens: Tokens evicted so far.
        cache_bytes: Bytes held by the cache (constant once allocated).
        tokens_per_second: Decode speed so far.
        finish_reason: None while generating, then ``"eos"``, ``"stop"`` or ``"length"``.
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


def auto_chunk_size(model: PreTrainedModel, cache: StreamingCache) -> int:
    """Prefill chunk size from free memory: on CUDA the largest power of two (256..8192) whose activations
    (about ``24 * hidden_size`` bytes per token per layer in flight, plus the banded working set) fit in a
    quarter of the free device memory; on the CPU 512 (larger chunks gain nothing on few cores)."""
    if model.device.type != "cuda":
        return PREFILL_CHUNK
    free, _ = torch.cuda.mem_get_info(model.device)
    hidden = model.config.hidden_size
    per_token = 24 * hidden * model.dtype.itemsize + 4 * model.config.num_attention_heads * cache.window.capacity
    size = 8192
    while size > 256 and size * per_token > free // 4:
        size //= 2
    return size


@torch.no_grad()
def prefill(
    model: PreTrainedModel, cache: StreamingCache, ids: list[int] | torch.Tensor, chunk_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Feed ``ids`` through ``cache`` in chunks; return the logits (vocab,) after the last one.

    Args:
        chunk_size: Tokens per forward; None picks one from free memory (:func:`auto_chunk_size`).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(model.device)
    if ids.shape[1] == 0:
        raise ValueError("Nothing to feed: the token list is empty.")
    if chunk_size is None:
        chunk_size = auto_chunk_size(model, cache)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    logits = None
    with tqdm(total=ids.shape[1], unit="tok", desc="prefill", disable=not progress, leave=False) as bar:
        for chunk in ids.split(chunk_size, dim=1):
            positions = cache.position_ids(chunk.shape[1], chunk.device)
            logits = model(
                input_ids=chunk, position_ids=positions, use_cache=True, **cache_kwargs(model, cache), logits_to_keep=1
            ).logits
            bar.update(chunk.shape[1])
    return logits[0, -1]


@torch.no_grad()
def decode_step(model: PreTrainedModel, cache: StreamingCache, token_id: int | torch.Tensor) -> torch.Tensor:
    """Feed one token; return the next-token logits (vocab,).

    Runs through the cache's :class:`~streaming_llm.core.decode.Decoder`: on CUDA, steady steps replay a
    captured CUDA graph (the returned logits are then overwritten by the next step).
    """
    return decoder_for(model, cache)(token_id)


def check_max_new_tokens(max_new_tokens: object, endless_ok: bool = True) -> None:
    """Raise a clear ``ValueError`` unless ``max_new_tokens`` is an int >= 1 (or None when ``endless_ok``).

    The one rule for every surface (functions, sessions, CLI, server): 0, negatives, floats, bools and
    strings are refused rather than rounded or read as "one token".
    """
    if max_new_tokens is None and endless_ok:
        return
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        endless = " or None (no limit)" if endless_ok else ""
        raise ValueError(f"max_new_tokens must be an integer >= 1{endless}, got {max_new_tokens!r}")


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends generation for this model."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Iterable):
            ids.update(int(v) for v in value)
    return ids


class DecodeHandoff:
    """Where :func:`generate_tokens` tells a batching engine which token it feeds next, and gets the result.

    ``pending[id(cache)] = (cache, token)`` while a generator is suspended and will feed ``token`` to
    ``cache`` as soon as it is resumed; an engine that fed it already (in a batched forward) puts
    ``ready[id(cache)] = (cache, logits (vocab,) or the exception the forward raised)`` before resuming
    it. Used from the engine's one worker thread only.
    """

    def __init__(self) -> None:
        self.pending: dict[int, tuple[StreamingCache, int]] = {}
        self.ready: dict[int, tuple[StreamingCache, torch.Tensor | BaseException]] = {}


HANDOFF = DecodeHandoff()


def generate_tokens(
    model: PreTrainedModel,
    cache: StreamingCache,
    logits: torch.Tensor,
    sampler: Sampler,
    max_new_tokens: int | None,
    stop_ids: set[int],
) -> Iterator[int]:
    """Yield sampled token ids, starting from ``logits``; stops after an id in ``stop_ids``
    (which is yielded) or ``max_new_tokens`` ids (None: never).

    Every yielded id except the last one has been fed to the cache when the next one is yielded;
    the last one never is (callers that keep the conversation going feed it themselves).
    """
    count = 0
    try:
        while True:
            token = sampler(logits)
            count += 1
            last = token in stop_ids or (max_new_tokens is not None and count >= max_new_tokens)
            if not last:
                HANDOFF.pending[id(cache)] = (cache, token)  # fed when resumed (a batching engine may do it)
            yield token
            if last:
                return
            HANDOFF.pending.pop(id(cache), None)
            ready = HANDOFF.ready.pop(id(cache), None)
            if ready is not None and ready[0] is cache:
                if isinstance(ready[1], BaseException):
                    raise ready[1]
                logits = ready[1]
            else:
                logits = decode_step(model, cache, token)
    finally:
        HANDOFF.pending.pop(id(cache), None)


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
) -> Iterator[GenerationChunk]:
    """Generate text as it is produced, far past the model's context, in constant memory.

    Args:
        model: A supported causal LM (switched to the streaming attention if needed).
        tokenizer: Its tokenizer.
        prompt: Text (tokenized as is, no chat template) or token ids.
        cache: A cache to continue from; default a new ``StreamingCache(start_size, recent_size)``.
        start_size: Attention sinks for a new cache.
        recent_size: Window for a new cache.
        max_new_tokens: Stop after this many tokens; None generates until EOS or a stop string.
        sampling: Greedy by default.
        stop: Strings that end generation (not included in the output).
        prefill_chunk: Prompt tokens per forward (None: chosen from free memory).

    Yields:
        :class:`GenerationChunk` pieces; the last one has ``finish_reason`` set.
    """
    check_max_new_tokens(max_new_tokens)
    if isinstance(prompt, str) and not prompt:
        raise ValueError("The prompt is empty: give at least one character (or token id) to continue from.")
    install(model)
    cache = cache if cache is not None else StreamingCache(model.config, start_size, recent_size)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
    sampler = Sampler(sampling, device=model.device, tokenizer=tokenizer)
    sampler.observe(ids)
    logits = prefill(model, cache, ids, prefill_chunk)
    yield from _stream(model, tokenizer, cache, logits, sampler, max_new_tokens, stop)


def _stream(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cache: StreamingCache,
    logits: torch.Tensor,
    sampler: Sampler,
    max_new_tokens: int | None,
    stop: list[str] | tuple[str, ...],
) -> Iterator[GenerationChunk]:
    """Text pieces for tokens generated from ``logits`` on ``cache`` (shared with sessions)."""
    stop_ids = eos_ids(model, tokenizer)
    detok, matcher = IncrementalDetokenizer(tokenizer), StopMatcher(stop)
    began, count, reason = time.perf_counter(), 0, "length"

    def chunk(text: str, token: int | None, finish: str | None = None) -> GenerationChunk:
        speed = count / max(time.perf_counter() - began, 1e-9)
        return GenerationChunk(
            text, token, count, cache.seen_tokens, cache.cached_tokens, cache.evicted_tokens, cache.nbytes, speed,
            finish,
        )  # fmt: skip

    for token in generate_tokens(model, cache, logits, sampler, max_new_tokens, stop_ids):
        count += 1
        if token in stop_ids:
            reason = "eos"
            break
        text, stopped = matcher.push(detok.add(token))
        if stopped:
            reason = "stop"
            yield chunk(text, token, reason)
            return
        yield chunk(text, token)
    tail, stopped = matcher.push(detok.flush())
    reason = "stop" if stopped else reason
    yield chunk(tail + ("" if stopped else matcher.flush()), None, reason)


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str | list[int], **kwargs) -> str:
    """Like :func:`stream_generate`, returning the whole text (``max_new_tokens`` must be finite)."""
    if "max_new_tokens" in kwargs and kwargs["max_new_tokens"] is None:
        raise ValueError("generate() needs a finite max_new_tokens; use stream_generate() for endless output.")
    return "".join(piece.text for piece in stream_generate(model, tokenizer, prompt, **kwargs))
