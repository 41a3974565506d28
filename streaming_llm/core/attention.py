"""The streaming attention function, registered with transformers' attention interface.

Registered as ``"streaming_llm"``. With a :class:`~streaming_llm.core.cache.StreamingCache` it is a thin
adapter: the cache has already done the step (stored keys in the model's frame, pinned keys turned,
new tokens written), and the step's plan says what each layer computes: plain attention over the
keys it returned (a decode step whose rows all see the same slots, or a chunk with no eviction
inside), attention over per-row slot ranges (a decode step of rows that differ), or the banded kernel
(a chunk that crosses the eviction point). With any other cache, or none, it *is* transformers'
``sdpa`` attention, mask included, so a model can be switched once (:func:`install`) and used with
every kind of cache.

Learned sink logits (gpt-oss passes its per-head ``s_aux`` to the attention function) join the softmax of
every path as one more term with no value: the plain paths go through the kernels that take them (decode
attention for one query per row, the banded kernel with no pinned keys for a chunk), and the path for
other caches writes the scores out, as transformers' eager gpt-oss attention does (its ``sdpa`` has no
sinks). They are the model's own and apply besides StreamingLLM's sink tokens.

The plan reaches this function through the mask: a ``StreamingCache`` hands transformers a
:class:`~streaming_llm.core.cache.StreamingStep` as its query offset, and the registered mask function
turns it into a :class:`StreamingMask`, through which each layer reads its part of the plan
(``cache.attention_plan(layer_idx)``, an immutable description).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .architectures import bind_model
from .cache import ATTN_IMPLEMENTATION, ChunkPlan, DecodePlan, StreamingCache, StreamingStep
from .kernels import banded_attention, decode_attention


@dataclass(frozen=True)
class StreamingMask:
    """The "mask" of a forward on a :class:`StreamingCache`: the cache, whose current plan says what each
    layer attends to."""

    cache: StreamingCache
    ndim = 4  # so that transformers hands it back unchanged when a caller passes it in again


def streaming_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | StreamingMask | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for one layer; same signature and output layout as transformers' ``sdpa``.

    Shapes: query ``(batch, heads, q_len, head_dim)``, key/value ``(batch, kv_heads, kv_len, head_dim)``;
    returns ``(batch, q_len, heads, head_dim)``.
    """
    softcap = kwargs.get("softcap")  # Gemma 2's attention-logit soft-capping
    sinks = kwargs.get("s_aux")  # gpt-oss's learned sink logits, one per query head
    if not isinstance(attention_mask, StreamingMask):  # any other cache, or none: plain attention
        if softcap is None and sinks is None:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if attention_mask is None:  # what sdpa would do with is_causal: bottom-right causal
            attention_mask = _bottom_right(query.shape[-2], key.shape[-2], query.device)
        out = _eager(query, key, value, attention_mask, scaling, softcap, sinks)
        return out.transpose(1, 2).contiguous(), None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    plan = attention_mask.cache.attention_plan(module.layer_idx)
    if isinstance(plan, DecodePlan) and plan.uniform is None:  # one token per row, rows see different slots
        out = decode_attention(query, key, value, plan.lo, plan.hi, scaling, softcap, sinks=sinks)
    elif isinstance(plan, ChunkPlan) and plan.mode == "banded":
        out = _banded(query, key, value, plan, scaling, softcap, sinks)
    else:  # every query sees every key it is given (bottom-right causal for several queries)
        out = _causal(query, key, value, scaling, softcap, sinks)
    return out.transpose(1, 2).contiguous(), None


def _bottom_right(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """``(q_len, kv_len)`` bool: the queries are the last ``q_len`` keys, each sees itself and what precedes it."""
    if q_len == 1:
        return None
    q_idx = torch.arange(kv_len - q_len, kv_len, device=device)
    return torch.arange(kv_len, device=device)[None, :] <= q_idx[:, None]


def _causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Plain attention where the queries are the last ``q_len`` keys (bottom-right causal).

    With learned sinks: one query per row through decode attention over all its keys; several through the
    banded kernel with no pinned keys and a window covering every key (the same bottom-right causal band)."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if sinks is not None and q_len == 1:
        rows = query.shape[0]
        lo = torch.zeros(rows, dtype=torch.int64, device=query.device)
        hi = torch.full((rows,), kv_len, dtype=torch.int64, device=query.device)
        return decode_attention(query, key, value, lo, hi, scaling, softcap, sinks=sinks)
    if sinks is not None:
        none = torch.zeros(0, dtype=torch.int64, device=query.device)
        return banded_attention(
            query, query, key[:, :, :0], value[:, :, :0], none, key, value, 0, kv_len - q_len, kv_len, scaling,
            softcap, sinks=sinks,
        )  # fmt: skip
    mask = _bottom_right(q_len, kv_len, query.device)
    if softcap is not None:
        return _eager(query, key, value, mask, scaling, softcap)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)


def _eager(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float,
    softcap: float | None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention written out (for soft-capped logits and learned sinks, which SDPA cannot do). ``mask``: boolean
    (True = attend) or additive, broadcastable to the scores; ``sinks`` ``(heads,)``: one more softmax term per
    head with no value; returns ``(batch, heads, q_len, dim)``."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, q_len, dim)
    scores = (q @ key[:, :, None].transpose(-1, -2)).float() * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        mask = mask if mask.dim() < 4 else mask[:, :, None]  # (batch, 1, q, kv) -> per kv-head group
        # The lowest finite value, not -inf: a fully padded row must give finite garbage, not NaNs
        # that would leak into later tokens through their (zero-weighted) values.
        lowest = torch.finfo(scores.dtype).min
        scores = scores.masked_fill(~mask, lowest) if mask.dtype == torch.bool else scores + mask
    if sinks is not None:
        column = sinks.float().reshape(1, kv_heads, heads // kv_heads, 1, 1).expand(batch, -1, -1, q_len, 1)
        probs = torch.cat((scores, column), dim=-1).softmax(dim=-1)[..., :-1].to(value.dtype)
    else:
        probs = scores.softmax(dim=-1).to(value.dtype)
    return (probs @ value[:, :, None]).reshape(batch, heads, q_len, -1)


def _banded(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: ChunkPlan, scaling: float,
    softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Each query attends to the pinned keys (turned to sit before its window) and its own window.

    ``key``/``value`` are the working set ``[pinned | recent]``; recent key ``r`` has stream index
    ``plan.rest_start + r``. Query ``i`` (stream ``t``) sees recent keys in ``[t - recent_size, t]``
    and the sinks ``j <= t``; the kernel (:func:`~streaming_llm.core.kernels.banded_attention`) picks a
    fused path by device (no per-query loop, no score matrix larger than one block).
    """
    n_pin = plan.n_pinned
    n_sinks = n_pin - plan.segment_len
    device = query.device
    # Pinned logits use the query turned back by its offset: q' . k_pin == q . R(e) k_pin.
    q_back = plan.rope.rotate(query, -plan.offsets.to(device))
    pin_index = torch.cat((torch.arange(n_sinks, device=device), torch.full((plan.segment_len,), -1, device=device)))
    return banded_attention(
        query, q_back, key[:, :, :n_pin], value[:, :, :n_pin], pin_index, key[:, :, n_pin:], value[:, :, n_pin:],
        plan.rest_start, plan.t0, plan.recent_size, scaling, softcap, sinks=sinks,
    )  # fmt: skip


def streaming_mask(*args, q_offset=0, attention_mask: torch.Tensor | None = None, q_length: int = 0, **kwargs):
    """Mask function for ``"streaming_llm"``: a :class:`StreamingMask` for a streaming cache, else
    transformers' sdpa mask (padding, ordinary caches).

    Raises:
        ValueError: A padded batch (zeros among the new tokens' attention mask) on a streaming cache,
            which cannot be served exactly (every row would need its own positions).
    """
    if isinstance(q_offset, StreamingStep):
        if isinstance(attention_mask, StreamingMask):  # prepared earlier (generate() does so)
            attention_mask = None
        if attention_mask is not None and not bool(attention_mask[:, -q_length:].all()):
            raise ValueError(
                "This batch is padded (the attention mask has zeros), which a StreamingCache cannot serve exactly: "
                "rows would need their own positions. Feed one unpadded sequence per cache, or rows of equal length."
            )
        return StreamingMask(q_offset.cache)
    return sdpa_mask(*args, q_offset=q_offset, attention_mask=attention_mask, q_length=q_length, **kwargs)


def register() -> None:
    """Register ``"streaming_llm"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, streaming_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, streaming_mask)


def install(model: PreTrainedModel) -> PreTrainedModel:
    """Switch ``model`` to the streaming attention (it behaves like ``sdpa`` with other caches).

    Raises:
        NotImplementedError: If the architecture cannot be streamed exactly.
    """
    if getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        return model  # already switched (and bound)
    bind_model(model)  # also raises for unsupported architectures
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def uninstall(model: PreTrainedModel, implementation: str = "sdpa") -> PreTrainedModel:
    """Switch ``model`` back to a stock attention implementation."""
    model.set_attn_implementation(implementation)
    return model
