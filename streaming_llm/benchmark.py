"""Decode latency and memory at a given context, for a streaming cache or transformers' DynamicCache.

Used by ``streaming-llm bench`` (also under tensor parallelism, one process per GPU) and by
``benchmarks/gpu_decode.py``. Random tokens stream up to the context in chunks, then greedy decode
steps are timed with device synchronisation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from transformers import Cache, PreTrainedModel

from .compat import cache_kwargs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mib() -> float:
    """Resident memory of this process now (MiB; Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cache_bytes(cache: Cache) -> int:
    """Bytes held by this process's part of the cache (keys and values of every layer)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def measure_decode(
    model: PreTrainedModel, make_cache: Callable[[], Cache], context: int, decode: int = 64, chunk: int = 2048,
    seed: int = 0,
) -> dict:  # fmt: skip
    """Stream ``context`` random tokens, then time ``decode`` greedy steps.

    Returns:
        ``context``, ``ms_per_token``, ``tokens_per_s``, ``prefill_tokens_per_s``, ``cache_mib``,
        ``peak_gpu_mib`` (None on CPU) and the generated ``tokens``.
    """
    device = model.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cache = make_cache()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator).to(device)
    sync(device)
    began = time.perf_counter()
    for i in range(0, context, chunk):
        out = model(input_ids=ids[:, i : i + chunk], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    sync(device)
    prefill = time.perf_counter() - began
    token, tokens = out.logits[:, -1:].argmax(-1), []
    for _ in range(3):  # warm-up steps (not timed)
        token = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    sync(device)
    began = time.perf_counter()
    for _ in range(decode):
        token = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    sync(device)
    step = (time.perf_counter() - began) / decode
    return {
        "context": context, "ms_per_token": 1000 * step, "tokens_per_s": 1 / step,
        "prefill_tokens_per_s": context / prefill, "cache_mib": cache_bytes(cache) / 2**20,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "tokens": tokens,
    }  # fmt: skip
