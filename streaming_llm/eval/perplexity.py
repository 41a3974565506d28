"""Per-token negative log-likelihood of a long text under four cache methods, on the same tokens.

* ``dense``: a full cache (every token sees the whole prefix). Valid only up to the model's trained
  length; past it, it shows what happens when positions run out.
* ``window``: a plain rolling window without sinks (``start_size=0``).
* ``recompute``: sliding window with re-computation, the paper's quality oracle: each scored token
  is predicted by re-running the last ``L`` tokens from scratch (positions ``0..L-1``). ``stride``
  scores every ``stride``-th token only, so it finishes on a CPU; unscored tokens are NaN.
* ``streaming``: this library, ``start_size`` sinks + ``recent_size`` window.

``window`` and ``streaming`` run the stream in chunks through a :class:`StreamingCache`; chunking
is exact (tests compare it with token-by-token), so evaluation is fast.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from ..core.attention import install
from ..core.cache import StreamingCache
from ..core.compat import cache_kwargs

METHODS = ("dense", "window", "recompute", "streaming")


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of ``targets`` (n,) under ``logits`` (n, vocab), in float32, on the CPU."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none").cpu()


def _as_row(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(model.device)


@torch.no_grad()
def streaming_nll(
    model: PreTrainedModel,
    ids: torch.Tensor,
    start_size: int,
    recent_size: int,
    chunk_size: int = 512,
    progress: bool = False,
    kv_dtype: str | None = None,
) -> torch.Tensor:
    """NLL of every token after the first, streaming with ``start_size`` sinks + ``recent_size`` window.

    Args:
        model: A supported causal LM (switched to the streaming attention if needed).
        ids: Token ids ``(n,)`` or ``(1, n)``.
        start_size: Attention sinks (0 for a plain window).
        recent_size: Recent tokens kept.
        chunk_size: Tokens per forward; any value gives the same result.
        progress: Show a progress bar.
        kv_dtype: How the cache stores keys/values (see :class:`StreamingCache`; None: the model's dtype).

    Returns:
        Float32 tensor ``(n - 1,)``: ``nll[i] = -log p(ids[i + 1] | what the cache keeps)``.
    """
    install(model)
    cache = StreamingCache(model.config, start_size, recent_size, kv_dtype=kv_dtype)
    return _chunked_nll(model, ids, cache, chunk_size, progress, f"streaming {start_size}+{recent_size}")


@torch.no_grad()
def dense_nll(
    model: PreTrainedModel, ids: torch.Tensor, chunk_size: int = 1024, progress: bool = False
) -> torch.Tensor:
    """NLL with a full cache (``DynamicCache``): every token attends to the whole prefix."""
    return _chunked_nll(model, ids, DynamicCache(config=model.config), chunk_size, progress, "dense")


def _chunked_nll(
    model: PreTrainedModel, ids: torch.Tensor, cache, chunk_size: int, progress: bool, desc: str
) -> torch.Tensor:
    """Feed ``ids`` through ``cache`` in chunks; NLL of every token after the first."""
    ids = _as_row(model, ids)
    out = []
    with tqdm(total=ids.shape[1], unit="tok", disable=not progress, desc=desc) as bar:
        for i in range(0, ids.shape[1], chunk_size):
            chunk = ids[:, i : i + chunk_size]
            logits = model(input_ids=chunk, use_cache=True, **cache_kwargs(model, cache)).logits[0]
            targets = ids[0, i + 1 : i + 1 + chunk.shape[1]]
            out.append(_nll(logits[: targets.shape[0]], targets))
            bar.update(chunk.shape[1])
    return torch.cat(out)


@torch.no_grad()
def recompute_nll(
    model: PreTrainedModel, ids: torch.Tensor, window: int, stride: int = 1, batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:  # fmt: skip
    """NLL where token ``i + 1`` is predicted by re-running ``ids[i - window + 1 .. i]`` from scratch.

    Only every ``stride``-th position is scored (the others are NaN); windows are batched.
    """
    ids = _as_row(model, ids)[0]
    n = ids.shape[0]
    out = torch.full((n - 1,), float("nan"))
    positions = list(range(0, n - 1, stride))
    with tqdm(total=len(positions), unit="pos", disable=not progress, desc=f"recompute L={window}") as bar:
        for b in range(0, len(positions), batch_size):
            batch = positions[b : b + batch_size]
            # Left-pad short windows (the first few positions) and mask the padding.
            length = min(window, batch[-1] + 1)
            rows = torch.zeros(len(batch), length, dtype=torch.long, device=ids.device)
            mask = torch.zeros_like(rows)
            for r, i in enumerate(batch):
                piece = ids[max(0, i - window + 1) : i + 1]
                rows[r, length - piece.shape[0] :] = piece
                mask[r, length - piece.shape[0] :] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=rows, attention_mask=mask, position_ids=position_ids, use_cache=False, logits_to_keep=1
            ).logits
            targets = ids[torch.tensor(batch, device=ids.device) + 1]
            out[batch] = _nll(logits[:, -1], targets)
            bar.update(len(batch))
    return out


def nll_by_method(
    model: PreTrainedModel,
    ids: torch.Tensor,
    methods: tuple[str, ...] = METHODS,
    start_size: int = 4,
    recent_size: int = 1020,
    stride: int = 1,
    chunk_size: int = 512,
    progress: bool = False,
    recompute_batch: int = 8,
    kv_dtype: str | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token NLL for each method, on the same tokens (``window`` and ``recompute`` use the
    same total cache, ``start_size + recent_size``); ``kv_dtype``: KV storage of the streaming caches
    (``window`` and ``streaming``)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"Unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}.")
    total = start_size + recent_size
    runs = {
        "dense": lambda: dense_nll(model, ids, chunk_size, progress),
        "window": lambda: streaming_nll(model, ids, 0, total, chunk_size, progress, kv_dtype),
        "recompute": lambda: recompute_nll(model, ids, total, stride, recompute_batch, progress),
        "streaming": lambda: streaming_nll(model, ids, start_size, recent_size, chunk_size, progress, kv_dtype),
    }
    return {method: runs[method]() for method in methods}


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL) over the scored (non-NaN) tokens."""
    scored = nll[~nll.isnan()].double()
    return math.exp(float(scored.mean())) if scored.numel() else float("nan")


def windowed_perplexity(nll: torch.Tensor, window: int) -> list[float]:
    """Perplexity of consecutive ``window``-token slices (the last one may be shorter)."""
    return [perplexity(nll[i : i + window]) for i in range(0, nll.shape[0], window)]


def paired_ratio(nll: torch.Tensor, reference: torch.Tensor, z: float = 1.959963984540054) -> dict[str, float]:
    """Perplexity of ``nll`` over that of ``reference`` on the positions both scored, with a 95% interval.

    The ratio is ``exp(mean(nll - reference))`` (exactly the ratio of the two perplexities on those
    positions); the interval comes from the per-position differences (normal approximation), so it is
    as narrow as the two methods are correlated.

    Returns:
        ``{"ratio", "ci_low", "ci_high", "positions"}``.
    """
    both = ~(nll.isnan() | reference.isnan())
    diff = (nll[both] - reference[both]).double()
    n = diff.numel()
    if n == 0:
        return {"ratio": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "positions": 0}
    mean = float(diff.mean())
    half = z * float(diff.std()) / math.sqrt(n) if n > 1 else float("inf")
    return {"ratio": math.exp(mean), "ci_low": math.exp(mean - half), "ci_high": math.exp(mean + half), "positions": n}
