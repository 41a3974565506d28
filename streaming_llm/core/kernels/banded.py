"""Exact attention for a chunk that crosses the eviction point: pinned keys plus a sliding window.

Every query of the chunk sees (1) the pinned keys (attention sinks, then an optional memory
segment), scored with the query *turned back* so that the pinned keys sit right before its own
window, and (2) the recent keys of its window. One softmax runs over the union. Several paths
compute the same thing; :func:`banded_attention` picks one by device, dtype and soft-capping
(see :data:`DEFAULT_PATH`), and every path is exact up to floating-point rounding:

- ``"explicit"``: query blocks with their scores written out (float32) -- the only CPU path for
  soft-capped logits (Gemma 2), and the readable statement of the semantics.
- ``"sdpa_concat"``: one public SDPA call per query block with a doubled head dimension, queries
  ``[query | query_back]`` against keys ``[rest_k | 0]`` (recent) and ``[0 | pin_k]`` (pinned), so
  each dot product is the right logit for its part; a boolean band mask does the rest.
- ``"sdpa_lse"``: per query block, the window part by the fused SDPA kernel that also returns the
  log-sum-exp (a private ATen op), the few pinned logits written out, the two merged by
  log-sum-exp. No key copies, no doubled head dimension.
- ``"flex"``: the window part by FlexAttention (compiled) with a sliding-window block mask over
  the whole chunk (soft-capping as a ``score_mod``), merged with the pinned part by log-sum-exp.
  Needs ``return_lse``, which compiled FlexAttention on CPU does not have (torch 2.13): GPU only.
- ``"flex_concat"``: one compiled FlexAttention call over the whole chunk with the doubled head
  dimension of ``"sdpa_concat"`` and a block mask for pinned + window (runs on CPU too).

No path loops over single queries, and no path builds a score matrix larger than one query block
times ``(pinned + block + window)`` keys (the pinned part of ``"flex"`` is ``q_len x pinned``).

Learned sink logits (gpt-oss's ``s_aux``, one per query head, ``sinks=``) are one more softmax term per head
with no value, visible to every query; not to be confused with StreamingLLM's sink tokens (pinned keys). The
paths that write pinned logits out (``explicit``, ``sdpa_lse``, ``flex``) append them as one more pinned
column of zero value; the concatenating paths give the queries one more head dimension holding
``s_h / scaling`` and add one key that is 1 there and 0 elsewhere (zero value), so its logit is ``s_h``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

PATHS = ("explicit", "sdpa_concat", "sdpa_lse", "flex", "flex_concat")

# Path chosen by (device type, soft-capped). Filled from benchmarks/ingest_kernels.py measurements.
DEFAULT_PATH: dict[tuple[str, bool], str] = {
    ("cpu", False): "sdpa_lse",
    ("cpu", True): "explicit",
    # Measured on an H200 (benchmarks/results/ingest_kernels_cuda.md): flex 0.87x, sdpa_concat 1.10x dense
    # causal SDPA at W=4092, Q=4096. flex needs a compile per new chunk shape (8.5 s the first time) and failed
    # to compile a 64-query chunk on torch 2.11, so the robust sdpa_concat is the default.
    ("cuda", False): "sdpa_concat",
    ("cuda", True): "explicit",
}

# Queries per block by (path, device type); "flex" runs the whole chunk in one call.
QUERY_BLOCK: dict[tuple[str, str], int] = {
    ("explicit", "cpu"): 128,
    ("explicit", "cuda"): 1024,
    ("sdpa_concat", "cpu"): 256,
    ("sdpa_concat", "cuda"): 1024,
    ("sdpa_lse", "cpu"): 64,
    ("sdpa_lse", "cuda"): 1024,
}


def banded_attention(
    query: Tensor,
    query_back: Tensor,
    pin_k: Tensor,
    pin_v: Tensor,
    pin_index: Tensor,
    rest_k: Tensor,
    rest_v: Tensor,
    rest_first: int,
    query_first: int,
    window: int,
    scaling: float,
    softcap: float | None = None,
    *,
    path: str | None = None,
    block: int | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention of a chunk of queries over pinned keys plus each query's sliding window, exactly.

    Args:
        query: ``(B, H, Q, D)`` queries, rotated by the model at their own positions.
        query_back: ``(B, H, Q, D)`` the same queries turned back per query; used only for pinned keys.
        pin_k: ``(B, Hkv, P, D)`` pinned keys (sinks, then an optional segment); ``P`` may be 0.
        pin_v: ``(B, Hkv, P, Dv)`` their values.
        pin_index: ``(P,)`` int64 stream index of each pinned key: pinned key ``j`` is visible to the
            query with stream index ``t`` iff ``pin_index[j] <= t`` (segment keys: ``-1``, always visible).
        rest_k: ``(B, Hkv, R, D)`` recent keys with contiguous stream indices, ending with the chunk's
            own keys (all ``Q`` of them, or fewer when the chunk's first tokens are sinks, pinned instead;
            ``R`` may then be 0). Every query must see at least one key (its own, recent or pinned).
        rest_v: ``(B, Hkv, R, Dv)`` their values.
        rest_first: stream index of ``rest_k[:, :, 0]``.
        query_first: stream index of query 0 (queries are contiguous); ``rest_first + R == query_first + Q``.
        window: the recent size ``W``: query ``t`` sees recent keys ``u`` with ``t - W <= u <= t``.
        scaling: factor applied to every logit (usually ``D ** -0.5``).
        softcap: if given, logits become ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2).
        path: one of :data:`PATHS` to force a path; default: :data:`DEFAULT_PATH` for the device.
        block: queries per block for the blocked paths; default: :data:`QUERY_BLOCK`.
        sinks: optional ``(H,)`` learned sink logits (gpt-oss), any float dtype, on ``query``'s device: head
            ``h``'s softmax gets one more term ``exp(sinks[h])`` (no value), after scaling and soft-capping.

    Returns:
        ``(B, H, Q, Dv)`` in ``query``'s dtype. Head ``h`` uses key/value head ``h // (H // Hkv)``.

    Raises:
        ValueError: If shapes, indices or the path do not fit together (the message says which).
    """
    _check(query, query_back, pin_k, pin_v, pin_index, rest_k, rest_v, rest_first, query_first, window, softcap)
    _check_sinks(sinks, query)
    device = query.device.type
    if path is None:
        path = os.environ.get("STREAMING_LLM_BANDED_PATH") or DEFAULT_PATH.get(
            (device, softcap is not None), "explicit"
        )
    if path not in PATHS:
        raise ValueError(f"Unknown banded attention path {path!r}; choose one of {PATHS}.")
    if path in ("sdpa_concat", "sdpa_lse") and softcap is not None:
        raise ValueError(f"Path {path!r} cannot soft-cap logits; use 'explicit' or 'flex' with softcap.")
    if path == "flex" and device == "cpu":
        raise ValueError("Path 'flex' needs FlexAttention's log-sum-exp, not compiled on CPU; use 'flex_concat'.")
    if path == "sdpa_lse" and device not in ("cpu", "cuda"):
        raise ValueError(f"Path 'sdpa_lse' runs on CPU and CUDA only, not {device!r}; use 'sdpa_concat'.")
    if block is None:
        block = QUERY_BLOCK.get((path, device), 256)
    if block < 1:
        raise ValueError(f"block must be a positive number of queries, got {block}.")
    if query.shape[-2] == 0:
        return query.new_empty(*query.shape[:-1], rest_v.shape[-1])
    band = _Band(rest_first, query_first, window, rest_k.shape[-2], query.device)
    args = (query, query_back, pin_k, pin_v, pin_index, rest_k, rest_v, band, scaling)
    if path == "explicit":
        return _explicit(*args, softcap, block, sinks)
    if path == "sdpa_concat":
        return _sdpa_concat(*args, block, sinks)
    if path == "sdpa_lse":
        return _sdpa_lse(*args, block, sinks)
    if path == "flex_concat":
        return _flex_concat(*args, softcap, sinks)
    return _flex(*args, softcap, sinks)


def _check_sinks(sinks: Tensor | None, query: Tensor) -> None:
    if sinks is None:
        return
    heads = query.shape[1]
    if sinks.shape != (heads,) or not sinks.is_floating_point():
        raise ValueError(f"sinks must be a float tensor of shape ({heads},), got {sinks.dtype} {tuple(sinks.shape)}.")
    if sinks.device != query.device:
        raise ValueError(f"sinks must be on query's device {query.device}, got {sinks.device}.")


def _check(
    query: Tensor, query_back: Tensor, pin_k: Tensor, pin_v: Tensor, pin_index: Tensor, rest_k: Tensor,
    rest_v: Tensor, rest_first: int, query_first: int, window: int, softcap: float | None,
) -> None:  # fmt: skip
    """Shape and index checks that need no device sync."""
    if query.dim() != 4:
        raise ValueError(f"query must be (batch, heads, q_len, head_dim), got shape {tuple(query.shape)}.")
    batch, heads, q_len, dim = query.shape
    if query_back.shape != query.shape:
        raise ValueError(f"query_back must have query's shape {tuple(query.shape)}, got {tuple(query_back.shape)}.")
    for name, t in (("pin_k", pin_k), ("pin_v", pin_v), ("rest_k", rest_k), ("rest_v", rest_v)):
        if t.dim() != 4 or t.shape[0] != batch:
            raise ValueError(f"{name} must be (batch={batch}, kv_heads, len, dim), got shape {tuple(t.shape)}.")
    kv_heads = rest_k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads}).")
    if pin_k.shape[1] != kv_heads or pin_v.shape[1] != kv_heads or rest_v.shape[1] != kv_heads:
        raise ValueError("pin_k, pin_v, rest_k and rest_v must have the same number of key/value heads.")
    if pin_k.shape[-1] != dim or rest_k.shape[-1] != dim:
        raise ValueError(
            f"Keys must have the queries' head_dim {dim}: pin_k {pin_k.shape[-1]}, rest_k {rest_k.shape[-1]}."
        )
    if pin_v.shape[-1] != rest_v.shape[-1]:
        raise ValueError(f"pin_v and rest_v must share the value dim, got {pin_v.shape[-1]} and {rest_v.shape[-1]}.")
    if pin_k.shape[-2] != pin_v.shape[-2] or rest_k.shape[-2] != rest_v.shape[-2]:
        raise ValueError("Keys and values must have the same length (pin_k/pin_v, rest_k/rest_v).")
    if pin_index.shape != (pin_k.shape[-2],) or pin_index.dtype != torch.int64:
        raise ValueError(
            f"pin_index must be an int64 tensor of shape ({pin_k.shape[-2]},), "
            f"got {pin_index.dtype} {tuple(pin_index.shape)}."
        )
    n_rest = rest_k.shape[-2]
    if rest_first + n_rest != query_first + q_len:
        raise ValueError(
            f"rest_k must end with the chunk's last key: rest_first + R = {rest_first + n_rest} "
            f"but query_first + Q = {query_first + q_len}."
        )
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}.")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}.")


class _Band:
    """Index bookkeeping: which recent keys (and pinned keys) the queries ``i0:i1`` see."""

    def __init__(self, rest_first: int, query_first: int, window: int, n_rest: int, device: torch.device):
        self.rest_first, self.query_first, self.window, self.n_rest = rest_first, query_first, window, n_rest
        self.device = device

    def blocks(self, q_len: int, block: int) -> Iterator[tuple[int, int, int, int]]:
        """``(i0, i1, lo, hi)``: query block and the range of recent keys any of its queries sees."""
        for i0 in range(0, q_len, block):
            i1 = min(q_len, i0 + block)
            lo = max(0, self.query_first + i0 - self.window - self.rest_first)
            hi = max(lo, self.query_first + i1 - self.rest_first)  # == lo: only pinned keys (sink queries)
            yield i0, i1, lo, hi

    @property
    def n_blind(self) -> int:
        """Leading queries that see no recent key: chunk tokens before ``rest_first`` (pinned sinks)."""
        return max(0, self.rest_first - self.query_first)

    def stream(self, i0: int, i1: int) -> Tensor:
        """Stream indices of queries ``i0:i1``."""
        return torch.arange(self.query_first + i0, self.query_first + i1, device=self.device)

    def recent_visible(self, i0: int, i1: int, lo: int, hi: int) -> Tensor:
        """``(i1 - i0, hi - lo)`` bool: query sees recent key (``t - W <= u <= t``)."""
        u = torch.arange(self.rest_first + lo, self.rest_first + hi, device=self.device)
        t = self.stream(i0, i1)[:, None]
        return (u >= t - self.window) & (u <= t)

    def pinned_visible(self, pin_index: Tensor, i0: int, i1: int) -> Tensor:
        """``(i1 - i0, P)`` bool: query sees pinned key (``pin_index <= t``)."""
        return pin_index.to(self.device)[None, :] <= self.stream(i0, i1)[:, None]


def _grouped(x: Tensor, kv_heads: int) -> Tensor:
    """``(B, H, Q, D) -> (B, Hkv, groups, Q, D)``: grouped-query attention without copying keys."""
    batch, heads, q_len, dim = x.shape
    return x.reshape(batch, kv_heads, heads // kv_heads, q_len, dim)


def _pinned_logits(
    q_back: Tensor, pin_k: Tensor, visible: Tensor, scaling: float, softcap: float | None
) -> Tensor:  # fmt: skip
    """Float32 logits ``(B, Hkv, groups, q, P)`` of the pinned keys, ``-inf`` where not visible."""
    scores = (q_back.float() @ pin_k[:, :, None].float().transpose(-1, -2)).mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap).mul_(softcap)
    return scores.masked_fill_(~visible, float("-inf"))


def _with_sinks(pin_logits: Tensor, pin_v: Tensor, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    """Learned sink logits as one more pinned column (every query sees it) whose value is zero.

    ``pin_logits (B, Hkv, g, q, P)`` -> ``(B, Hkv, g, q, P + 1)``; ``pin_v (B, Hkv, P, Dv)`` -> ``P + 1`` rows."""
    if sinks is None:
        return pin_logits, pin_v
    batch, kv_heads, groups, q_len, _ = pin_logits.shape
    column = sinks.float().reshape(1, kv_heads, groups, 1, 1).expand(batch, -1, -1, q_len, 1)
    zero = pin_v.new_zeros(*pin_v.shape[:2], 1, pin_v.shape[-1])
    return torch.cat((pin_logits, column), dim=-1), torch.cat((pin_v, zero), dim=2)


def _sink_column(query: Tensor, sinks: Tensor | None, scaling: float) -> Tensor | None:
    """``(B, H, Q, 8)`` extra query dims for the concatenating paths: ``s_h / scaling`` then zeros (8 keeps
    the head dimension a multiple of 8 for fused kernels); None without sinks."""
    if sinks is None:
        return None
    extra = query.new_zeros(*query.shape[:-1], 8)
    extra[..., 0] = (sinks.float() / scaling).to(query.dtype)[None, :, None]
    return extra


def _blind_rows(out_w: Tensor, lse_w: Tensor, n_blind: int) -> None:
    """Queries that see no recent key: an empty window part (zero output, ``-inf`` log-sum-exp).

    Fused kernels report 0 as the log-sum-exp of a fully masked row, and crash on zero keys."""
    if n_blind:
        out_w[..., :n_blind, :] = 0
        lse_w[..., :n_blind] = float("-inf")


def _merge(out_w: Tensor, lse_w: Tensor, pin_logits: Tensor, pin_v: Tensor) -> Tensor:
    """Join a window part (normalised output, log-sum-exp) with the pinned logits; float32 result.

    Shapes (grouped): ``out_w (B, Hkv, g, q, Dv)``, ``lse_w (B, Hkv, g, q)``, ``pin_logits (B, Hkv, g, q, P)``.
    Every query sees at least one key (its own), so the joint log-sum-exp is finite.
    """
    lse = torch.logaddexp(lse_w, pin_logits.logsumexp(dim=-1))
    out = out_w.float() * torch.exp(lse_w - lse)[..., None]
    if pin_logits.shape[-1]:
        out = out + torch.exp(pin_logits - lse[..., None]) @ pin_v[:, :, None].float()
    return out


def _explicit(
    query: Tensor, query_back: Tensor, pin_k: Tensor, pin_v: Tensor, pin_index: Tensor, rest_k: Tensor,
    rest_v: Tensor, band: _Band, scaling: float, softcap: float | None, block: int, sinks: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Scores written out per query block (float32), one softmax over pinned + window.

    The window mask of every block is a slice of one band mask; the pinned logits of all queries
    (``q_len x P``) are computed once and joined to each block's window scores.
    """
    batch, heads, q_len, _ = query.shape
    kv_heads = rest_k.shape[1]
    groups = heads // kv_heads
    q = _grouped(query, kv_heads)
    visible = band.pinned_visible(pin_index, 0, q_len)
    pin_logits = _pinned_logits(_grouped(query_back, kv_heads), pin_k, visible, scaling, softcap)
    pin_logits, pin_v = _with_sinks(pin_logits, pin_v, sinks)
    rk, rv, pv = rest_k[:, :, None], rest_v[:, :, None], pin_v[:, :, None]
    template = _band_bias(min(block, q_len), band.window, 1, torch.float32, query.device)[0]
    out = query.new_empty(batch, kv_heads, groups, q_len, rest_v.shape[-1])
    for i0, i1, lo, hi in band.blocks(q_len, block):
        first_key = band.query_first + i0 - band.window - band.rest_first
        scores = (q[:, :, :, i0:i1] @ rk[..., lo:hi, :].transpose(-1, -2)).float().mul_(scaling)
        if softcap is not None:
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        scores.add_(template[: i1 - i0, lo - first_key : hi - first_key])
        pinned = pin_logits[:, :, :, i0:i1]
        top = torch.stack([x.amax(dim=-1) for x in (scores, pinned) if x.shape[-1]]).amax(dim=0)[..., None]
        probs, pin_probs = scores.sub_(top).exp_(), (pinned - top).exp_()
        total = probs.sum(dim=-1, keepdim=True) + pin_probs.sum(dim=-1, keepdim=True)
        mixed = (probs.to(rest_v.dtype) @ rv[..., lo:hi, :]).float() + pin_probs @ pv.float()
        out[:, :, :, i0:i1] = mixed.div_(total)
    return out.view(batch, heads, q_len, -1)


def _sdpa_concat(
    query: Tensor, query_back: Tensor, pin_k: Tensor, pin_v: Tensor, pin_index: Tensor, rest_k: Tensor,
    rest_v: Tensor, band: _Band, scaling: float, block: int, sinks: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """One SDPA call per block over ``[pinned | window]`` keys with a doubled head dimension (learned sinks:
    one more key, first in the buffer, reached through the queries' extra dimensions)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, n_pin = rest_k.shape[1], pin_k.shape[-2]
    extra = _sink_column(query, sinks, scaling)
    n_sink = 0 if extra is None else 1
    n_pin_all = n_pin + n_sink
    span = n_pin_all + min(q_len, block) + band.window
    # Buffers reused by every block: the pinned rows and the zero halves are written once.
    keys = rest_k.new_zeros(batch, kv_heads, span, 2 * dim + (0 if extra is None else extra.shape[-1]))
    keys[:, :, n_sink:n_pin_all, dim : 2 * dim] = pin_k
    values = rest_v.new_empty(batch, kv_heads, span, rest_v.shape[-1])
    values[:, :, n_sink:n_pin_all] = pin_v
    if n_sink:  # the learned sink key: 1 in the first extra dimension, zero value
        keys[:, :, 0, 2 * dim] = 1
        values[:, :, 0] = 0
    queries = torch.cat((query, query_back) if extra is None else (query, query_back, extra), dim=-1)
    out = query.new_empty(batch, heads, q_len, rest_v.shape[-1])
    for i0, i1, lo, hi in band.blocks(q_len, block):
        n = n_pin_all + hi - lo
        keys[:, :, n_pin_all:n, :dim] = rest_k[:, :, lo:hi]
        values[:, :, n_pin_all:n] = rest_v[:, :, lo:hi]
        parts = [band.pinned_visible(pin_index, i0, i1), band.recent_visible(i0, i1, lo, hi)]
        if n_sink:
            parts.insert(0, torch.ones(i1 - i0, 1, dtype=torch.bool, device=query.device))
        out[:, :, i0:i1] = F.scaled_dot_product_attention(
            queries[:, :, i0:i1], keys[:, :, :n], values[:, :, :n], attn_mask=torch.cat(parts, dim=-1),
            scale=scaling, enable_gqa=True,
        )  # fmt: skip
    return out


def _window_lse(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Fused attention returning ``(output, logsumexp)``; ``q (B, Hkv, n_q, D)``, ``bias`` additive."""
    if q.device.type == "cpu":
        dim, dim_v = q.shape[-1], v.shape[-1]
        if dim_v < dim:  # the fused CPU kernel wants one head size: zero columns change nothing
            v = F.pad(v, (0, dim - dim_v))
        elif dim < dim_v:
            q, k = F.pad(q, (0, dim_v - dim)), F.pad(k, (0, dim_v - dim))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scaling)
        return out[..., :dim_v], lse
    n_q = q.shape[-2]
    # Memory-efficient kernel: the bias needs a 16-aligned last dimension; pad with -inf keys' bias.
    n_k = k.shape[-2]
    pad = (-n_k) % 16
    full = bias.new_full((*bias.shape[:-1], n_k + pad), float("-inf"))[..., :n_k]
    full.copy_(bias)
    full = full.expand(q.shape[0], q.shape[1], n_q, n_k)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, full, True, scale=scaling)
    return out, lse[..., :n_q]


def _band_bias(block: int, window: int, groups: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(groups, block, block + window)`` additive mask of a full block: local query ``i`` sees keys
    ``i .. i + window`` (keys counted from ``window`` before the block's first query)."""
    i = torch.arange(block, device=device)[:, None]
    j = torch.arange(block + window, device=device)[None, :]
    bias = torch.zeros(block, block + window, dtype=dtype, device=device)
    return bias.masked_fill_((j < i) | (j > i + window), float("-inf")).expand(groups, -1, -1)


def _sdpa_lse(
    query: Tensor, query_back: Tensor, pin_k: Tensor, pin_v: Tensor, pin_index: Tensor, rest_k: Tensor,
    rest_v: Tensor, band: _Band, scaling: float, block: int, sinks: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Per block: fused window attention with log-sum-exp; then the pinned logits, one LSE merge.

    Query heads of one key/value head are folded into the query axis, so no kernel copies keys.
    Every block's mask is a slice of one band mask (blocks cut short at ``rest_first`` included).
    """
    batch, heads, q_len, _ = query.shape
    kv_heads = rest_k.shape[1]
    groups = heads // kv_heads
    q = _grouped(query, kv_heads)
    template = _band_bias(min(block, q_len), band.window, groups, query.dtype, query.device)
    out_w = query.new_empty(batch, kv_heads, groups, q_len, rest_v.shape[-1])
    lse_w = torch.empty(batch, kv_heads, groups, q_len, dtype=torch.float32, device=query.device)
    for i0, i1, lo, hi in band.blocks(q_len, block):
        if hi == lo:  # every query of the block is a pinned sink: no recent key (fixed below)
            continue
        n_q = i1 - i0
        first_key = band.query_first + i0 - band.window - band.rest_first  # template column 0 (may be < lo)
        bias = template[:, :n_q, lo - first_key : hi - first_key].reshape(groups * n_q, hi - lo)
        folded = q[:, :, :, i0:i1].reshape(batch, kv_heads, groups * n_q, -1)
        out, lse = _window_lse(folded, rest_k[:, :, lo:hi], rest_v[:, :, lo:hi], bias, scaling)
        out_w[:, :, :, i0:i1] = out.view(batch, kv_heads, groups, n_q, -1)
        lse_w[:, :, :, i0:i1] = lse.view(batch, kv_heads, groups, n_q)
    _blind_rows(out_w, lse_w, band.n_blind)
    visible = band.pinned_visible(pin_index, 0, q_len)
    pin_logits = _pinned_logits(_grouped(query_back, kv_heads), pin_k, visible, scaling, None)
    pin_logits, pin_v = _with_sinks(pin_logits, pin_v, sinks)
    return _merge(out_w, lse_w, pin_logits, pin_v).to(query.dtype).view(batch, heads, q_len, -1)


_flex_compiled: Callable | None = None
_block_masks: dict[tuple, object] = {}


def _flex_attention() -> Callable:
    """``torch.compile``-d ``flex_attention`` (compiled once per process; eager flex is only a reference)."""
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_compiled = torch.compile(flex_attention)
    return _flex_compiled


def _window_block_mask(q_len: int, n_rest: int, window: int, device: torch.device):
    """Sliding-window block mask: query ``i`` (rest index ``i + n_rest - q_len``) sees its window."""
    key = (q_len, n_rest, window, str(device))
    mask = _block_masks.get(key)
    if mask is None:
        from torch.nn.attention.flex_attention import create_block_mask

        offset = n_rest - q_len

        def sliding(b, h, q_idx, kv_idx):
            pos = q_idx + offset
            return (kv_idx <= pos) & (kv_idx >= pos - window)

        if len(_block_masks) > 64:
            _block_masks.clear()
        mask = _block_masks[key] = create_block_mask(sliding, None, None, q_len, n_rest, device=device)
    return mask


def _flex(
    query: Tensor, query_back: Tensor, pin_k: Tensor, pin_v: Tensor, pin_index: Tensor, rest_k: Tensor,
    rest_v: Tensor, band: _Band, scaling: float, softcap: float | None, sinks: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """FlexAttention over the whole chunk's windows (block-sparse), pinned part merged by LSE."""
    batch, heads, q_len, _ = query.shape
    kv_heads = rest_k.shape[1]
    score_mod = _softcap_mod(softcap)
    if rest_k.shape[-2]:
        block_mask = _window_block_mask(q_len, rest_k.shape[-2], band.window, query.device)
        out_w, lse_w = _flex_attention()(
            query, rest_k, rest_v, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=True,
            return_lse=True,
        )  # fmt: skip
    else:  # the whole chunk is pinned sinks
        out_w = query.new_zeros(*query.shape[:-1], rest_v.shape[-1])
        lse_w = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
    _blind_rows(out_w, lse_w, band.n_blind)
    pin_logits = _pinned_logits(
        _grouped(query_back, kv_heads), pin_k, band.pinned_visible(pin_index, 0, q_len), scaling, softcap
    )
    pin_logits, pin_v = _with_sinks(pin_logits, pin_v, sinks)
    out = _merge(_grouped(out_w, kv_heads), _grouped(lse_w[..., None], kv_heads)[..., 0], pin_logits, pin_v)
    return out.to(query.dtype).view(batch, heads, q_len, -1)


def _softcap_mod(softcap: float | None, spared: int = 0) -> Callable | None:
    """Soft-capping as a ``score_mod``; the first ``spared`` keys (learned sinks) keep their logit."""
    if softcap is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        capped = torch.tanh(score / softcap) * softcap
        return capped if not spared else torch.where(kv_idx < spared, score, capped)

    return score_mod


def _concat_block_mask(pin_index: Tensor, band: _Band, q_len: int):
    """Block mask over keys ``[pinned | recent]``: key ``k`` is seen by queries ``first[k] <= t <= last[k]``
    (a pinned index of ``-2 ** 40`` marks a learned sink key, seen by all)."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = band.device
    pins = (pin_index.to(device) - band.query_first).clamp(min=-1)  # in query-index units
    recent = torch.arange(band.n_rest, device=device) + (band.rest_first - band.query_first)
    first = torch.cat((pins, recent))
    last = torch.cat((torch.full_like(pins, q_len), recent + band.window))
    key = ("concat", q_len, band.n_rest, str(device), tuple(first[: pins.shape[0]].tolist()), band.window)
    mask = _block_masks.get(key)
    if mask is None:

        def visible(b, h, q_idx, kv_idx):
            return (first[kv_idx] <= q_idx) & (q_idx <= last[kv_idx])

        if len(_block_masks) > 64:
            _block_masks.clear()
        mask = _block_masks[key] = create_block_mask(visible, None, None, q_len, first.shape[0], device=device)
    return mask


def _flex_concat(
    query: Tensor, query_back: Tensor, pin_k: Tensor, pin_v: Tensor, pin_index: Tensor, rest_k: Tensor,
    rest_v: Tensor, band: _Band, scaling: float, softcap: float | None, sinks: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """One FlexAttention call: queries ``[query | query_back]``, keys ``[0 | pin_k]`` then ``[rest_k | 0]``
    (learned sinks: one more key first, reached through the queries' extra dimensions, as in ``sdpa_concat``)."""
    dim, n_pin = query.shape[-1], pin_k.shape[-2]
    extra = _sink_column(query, sinks, scaling)
    n_sink = 0 if extra is None else 1
    width = 2 * dim + (0 if extra is None else extra.shape[-1])
    keys = rest_k.new_zeros(*rest_k.shape[:2], n_sink + n_pin + rest_k.shape[-2], width)
    keys[:, :, n_sink : n_sink + n_pin, dim : 2 * dim] = pin_k
    keys[:, :, n_sink + n_pin :, :dim] = rest_k
    values = torch.cat((pin_v, rest_v), dim=2)
    queries = torch.cat((query, query_back), dim=-1)
    if n_sink:
        keys[:, :, 0, 2 * dim] = 1
        values = torch.cat((values.new_zeros(*values.shape[:2], 1, values.shape[-1]), values), dim=2)
        queries = torch.cat((queries, extra), dim=-1)
        pin_index = torch.cat((pin_index.new_full((1,), -(2**40)), pin_index))
    return _flex_attention()(
        queries, keys, values, score_mod=_softcap_mod(softcap, n_sink),
        block_mask=_concat_block_mask(pin_index, band, query.shape[-2]), scale=scaling, enable_gqa=True,
    )  # fmt: skip
