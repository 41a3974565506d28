"""Per-token negative log-likelihood of a long text under several cache methods, on the same tokens.

``streaming`` runs the stream in chunks through a :class:`StreamingCache`; chunking is exact (each
token sees what it would see token by token), so evaluation is fast.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..attention import install
from ..cache import StreamingCache
from ..compat import cache_kwargs


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of ``targets`` (n,) under ``logits`` (n, vocab), in float32."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


@torch.no_grad()
def streaming_nll(
    model: PreTrainedModel,
    ids: torch.Tensor,
    start_size: int,
    recent_size: int,
    chunk_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """NLL of every token after the first, streaming with ``start_size`` sinks + ``recent_size`` window.

    Args:
        model: A supported causal LM (switched to the streaming attention if needed).
        ids: Token ids ``(n,)`` or ``(1, n)``.
        start_size: Attention sinks (0 for a plain window).
        recent_size: Recent tokens kept.
        chunk_size: Tokens per forward; any value gives the same result.
        progress: Show a progress bar.

    Returns:
        Float32 tensor ``(n - 1,)``: ``nll[i] = -log p(ids[i + 1] | what the cache keeps)``.
    """
    install(model)
    ids = ids.reshape(1, -1).to(model.device)
    cache = StreamingCache(model.config, start_size, recent_size)
    out = []
    bar = tqdm(total=ids.shape[1], unit="tok", disable=not progress, desc=f"streaming {start_size}+{recent_size}")
    for i in range(0, ids.shape[1], chunk_size):
        chunk = ids[:, i : i + chunk_size]
        logits = model(input_ids=chunk, use_cache=True, **cache_kwargs(model, cache)).logits[0]
        targets = ids[0, i + 1 : i + 1 + chunk.shape[1]]
        out.append(_nll(logits[: targets.shape[0]], targets).cpu())
        bar.update(chunk.shape[1])
    bar.close()
    return torch.cat(out)


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL)."""
    return float(nll.double().mean().exp())
