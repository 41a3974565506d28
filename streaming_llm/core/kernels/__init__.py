"""Attention kernels: streaming ingestion (:mod:`.banded`) and batched decode with per-row bounds (:mod:`.decode`).

:func:`decode_attention` computes one query token per row over that row's slots ``[lo[b], hi[b])`` of a
``(rows, kv_heads, slots, dim)`` buffer (the slot cache's batched decode step); on CUDA a Triton
flash-decoding kernel that reads only the keys in range and can be captured in a CUDA graph.

:func:`banded_attention` computes, exactly, the attention of a chunk that crosses the eviction point:
pinned keys (sinks, segment) scored with the turned-back queries, plus each query's sliding window.
With today's cache (``Step`` from ``StreamingLayer._update_banded``: working set ``[pinned | recent]``),
it replaces the body of ``attention._banded``::

    n_pin = step.n_pinned
    n_sinks = n_pin - layer.segment_len
    q_back = layer.rope.rotate(query, -offsets.to(query.device))
    pin_index = torch.cat((torch.arange(n_sinks, device=query.device),
                           torch.full((layer.segment_len,), -1, device=query.device)))
    return banded_attention(query, q_back, key[:, :, :n_pin], value[:, :, :n_pin], pin_index,
                            key[:, :, n_pin:], value[:, :, n_pin:], step.rest_start, step.t0,
                            layer.window.recent_size, scaling, softcap)
"""

from .banded import DEFAULT_PATH, PATHS, QUERY_BLOCK, banded_attention
from .decode import TritonConfig, check_decode_inputs, decode_attention

__all__ = [
    "DEFAULT_PATH",
    "PATHS",
    "QUERY_BLOCK",
    "TritonConfig",
    "banded_attention",
    "check_decode_inputs",
    "decode_attention",
]
