"""Decode latency and memory at a given context: a streaming cache (eager or captured) or a transformers cache.

Used by ``streaming-llm bench`` (also under tensor parallelism, one process per GPU) and by
``benchmarks/gpu_decode.py``. Random tokens stream up to the context in chunks, then greedy decode
steps are timed one by one with device synchronisation (as a text stream reads every token), so
p50 and p99 include the rare steps (frame rebases).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
from transformers import Cache, PreTrainedModel

from ..core.cache import StreamingCache
from ..core.compat import cache_kwargs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mib() -> float:
    """Resident memory of this process now (MiB; Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cache_bytes(cache: Cache) -> int:
    """Bytes held by this process's part of the cache (every tensor the cache owns)."""
    if isinstance(cache, StreamingCache):
        return cache.nbytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@torch.no_grad()
def measure_decode(
    model: PreTrainedModel, make_cache: Callable[[], Cache], context: int, decode: int = 64, chunk: int = 2048,
    seed: int = 0, cuda_graphs: bool | None = None, stream_for_real: int | None = None,
) -> dict:  # fmt: skip
    """Stream ``context`` random tokens, then time ``decode`` greedy steps one by one.

    Args:
        model: The model (switched to the streaming attention for streaming caches).
        make_cache: Builds the cache to measure.
        context: Tokens streamed before decoding.
        decode: Timed steps (after 3 untimed warm-up steps).
        chunk: Prefill chunk size.
        cuda_graphs: Streaming caches: capture steady steps (default: on CUDA).
        stream_for_real: Streaming caches: actually stream at most this many tokens and fast-forward the
            rest (:meth:`StreamingCache.fast_forward`); None streams everything.

    Returns:
        ``context``, ``ms_per_token`` (mean), ``p50_ms``, ``p99_ms``, ``tokens_per_s``,
        ``prefill_tokens_per_s`` (over what was really streamed), ``streamed``, ``cache_mib``,
        ``peak_gpu_mib`` (None on CPU) and the generated ``tokens``.
    """
    from ..core.stepper import Stepper

    device = model.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cache = make_cache()
    streaming = isinstance(cache, StreamingCache)
    real = context if not streaming or stream_for_real is None else min(context, stream_for_real)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, real), generator=generator).to(device)
    sync(device)
    began = time.perf_counter()
    if streaming:
        stepper = Stepper(model, cache, cuda_graphs)
        for piece in ids[0].split(chunk):
            logits = stepper.prefill(0, piece)
        if real < context:
            cache.fast_forward(context - real)

        def step(token: torch.Tensor) -> torch.Tensor:
            return stepper.decode({0: int(token)})[0]

    else:
        for i in range(0, real, chunk):
            out = model(input_ids=ids[:, i : i + chunk], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        logits = out.logits[0, -1]

        def step(token: torch.Tensor) -> torch.Tensor:
            return model(input_ids=token.reshape(1, 1), use_cache=True, **cache_kwargs(model, cache)).logits[0, -1]

    sync(device)
    prefill_s = time.perf_counter() - began
    token, tokens, times = logits.argmax(-1), [], []
    for i in range(3 + decode):
        sync(device)
        began = time.perf_counter()
        token = step(token).argmax(-1)
        tokens.append(int(token))  # reads the token back, as a text stream does
        if i >= 3:
            times.append(time.perf_counter() - began)
    mean = statistics.fmean(times)
    result = {
        "context": context, "ms_per_token": 1000 * mean, "p50_ms": 1000 * percentile(times, 0.5),
        "p99_ms": 1000 * percentile(times, 0.99), "tokens_per_s": 1 / mean, "prefill_tokens_per_s": real / prefill_s,
        "streamed": real, "cache_mib": cache_bytes(cache) / 2**20,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "tokens": tokens,
    }  # fmt: skip
    if streaming:
        result["graph_replays"] = stepper.replays
    return result
