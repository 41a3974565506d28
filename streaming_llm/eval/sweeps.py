"""Sweeps over cache shapes: how many sinks, how large a window."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .perplexity import perplexity, streaming_nll


def sink_sweep(
    model: PreTrainedModel, ids: torch.Tensor, sinks: list[int], total: int = 1024, chunk_size: int = 512,
    progress: bool = False,
) -> list[dict]:  # fmt: skip
    """Perplexity with ``s`` sinks + ``total - s`` recent tokens, for each ``s`` (same total cache)."""
    return [
        {
            "start_size": s,
            "recent_size": total - s,
            "ppl": perplexity(streaming_nll(model, ids, s, total - s, chunk_size, progress)),
        }  # fmt: skip
        for s in sinks
    ]


def recent_sweep(
    model: PreTrainedModel, ids: torch.Tensor, recents: list[int], start_size: int = 4, chunk_size: int = 512,
    progress: bool = False,
) -> list[dict]:  # fmt: skip
    """Perplexity vs cache size, streaming (``start_size`` sinks) beside a plain window of the same
    total size. Sizes the model cannot hold (beyond its trained length) are skipped."""
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    rows = []
    for recent in recents:
        if start_size + recent > limit:
            continue
        total = start_size + recent
        streaming = streaming_nll(model, ids, start_size, recent, chunk_size, progress)
        window = streaming_nll(model, ids, 0, total, chunk_size, progress)
        rows.append({"cache_size": total, "streaming_ppl": perplexity(streaming), "window_ppl": perplexity(window)})
    return rows
