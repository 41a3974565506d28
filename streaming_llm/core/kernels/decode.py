"""Decode attention with per-row bounds: one query token per row over a contiguous slot range.

A batched decode step of the slot cache holds ``N`` independent streams (rows) in one buffer per layer,
``(rows, kv_heads, slots, head_dim)``. Row ``b`` feeds one token, whose query heads attend to the keys in
slots ``[lo[b], hi[b])`` of that row (its pinned prefix and its ring of recent tokens lie there side by side;
slots outside the range are garbage). :func:`decode_attention` computes exactly that, on one of the paths
in :data:`PATHS` (picked by :func:`default_path` for the device and soft-capping, or forced):

- ``"triton"``: flash-decoding (CUDA, or Triton's CPU interpreter with ``TRITON_INTERPRET=1``). Each row's
  range is cut into ``splits`` chunks of whole ``BLOCK_N`` tiles over a grid ``(rows, kv_heads, splits)``;
  a program scores the ``Hq / Hkv`` query heads of its kv head together, so every key/value tile in range
  is read from memory once and nothing outside the range is read at all; a small reduce kernel merges the
  partial (log-sum-exp, output) pairs in float32. ``splits`` and the grid follow from shapes and the
  device only, every bound is read on the device: no host sync, no value-dependent allocation or launch,
  so it can be captured in a CUDA graph and replayed with new ``lo``/``hi``.
- ``"sdpa"``: one ``F.scaled_dot_product_attention`` call with a boolean mask from ``lo``/``hi``; the query
  heads of a kv head are folded into the query length so keys are never repeated. Runs anywhere; it reads
  all ``S`` slots of every row. No soft-capping.
- ``"explicit"``: the scores written out in float32 (any device, soft-capping included): the readable
  statement of the semantics and the CPU path for Gemma 2.

Learned sink logits (gpt-oss's ``s_aux``, one per query head, ``sinks=``) join every path's softmax as one
more term of the denominator with a zero value: ``out = sum_j exp(x_j) v_j / (sum_j exp(x_j) + exp(s_h))``.
They are not keys (nothing is stored or read for them) and are independent of StreamingLLM's sink tokens,
which are ordinary keys in the row's range. The triton path adds the term where it normalises (the split
kernel with one split, else the reduce kernel); ``sdpa`` takes the fused kernel's log-sum-exp ``L`` and
scales its output by ``sigmoid(L - s_h)``; ``explicit`` appends the logit to the scores.

Softmax is in float32 on every path. For bf16/fp16 the triton path rounds the probabilities to the
value dtype before the ``p @ V`` product, as fused attention kernels do (relative error <= 2^-8 for bf16).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PATHS = ("triton", "sdpa", "explicit")

ENV_PATH = "STREAMING_LLM_DECODE_PATH"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of the triton path (shapes-only: the same for every replay of a graph).

    Attributes:
        block_n: keys per tile (a power of two >= 16).
        num_warps: warps per program of the split kernel.
        num_stages: software-pipelining stages of the split kernel's key loop.
        programs_per_sm: target ``rows * kv_heads * splits`` as a multiple of the SM count.
        max_splits: upper bound on ``splits``.
        splits: force this many splits (``None``: from :func:`choose_splits`).
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: float = 2.0
    max_splits: int = 64
    splits: int | None = None


DEFAULT_CONFIG = TritonConfig()


@functools.cache
def triton_available() -> bool:
    """True if Triton can be imported (the ``"triton"`` path then runs on CUDA tensors)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_path(device: torch.device | str, softcap: float | None = None) -> str:
    """The path :func:`decode_attention` takes without ``path=``: the environment variable
    ``STREAMING_LLM_DECODE_PATH`` if set, else triton on CUDA (when importable), else sdpa (explicit
    with soft-capping)."""
    forced = os.environ.get(ENV_PATH)
    if forced:
        return forced
    if torch.device(device).type == "cuda" and triton_available():
        return "triton"
    return "sdpa" if softcap is None else "explicit"


def decode_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    lo: Tensor,
    hi: Tensor,
    scaling: float,
    softcap: float | None = None,
    *,
    path: str | None = None,
    out: Tensor | None = None,
    config: TritonConfig | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention of one query token per row over that row's slots ``[lo[b], hi[b])``.

    Args:
        query: ``(n, Hq, 1, D)`` float16/bfloat16/float32, one query token per row; any strides.
        keys: ``(n, Hkv, S, D)`` in ``query``'s dtype, e.g. ``buffer[:n]`` of a larger buffer (no
            contiguity assumed). ``Hq % Hkv == 0``; head ``h`` uses kv head ``h // (Hq // Hkv)``. The
            triton path never reads slots outside the ranges; ``sdpa`` and ``explicit`` read every slot and
            need them finite (a NaN there, e.g. from ``torch.empty``, turns the row's output into NaN).
        values: ``(n, Hkv, S, Dv)`` in ``query``'s dtype.
        lo: ``(n,)`` int32/int64 on ``query``'s device: first slot of each row's range.
        hi: ``(n,)`` int32/int64 on ``query``'s device: one past the last slot. The contract is
            ``0 <= lo < hi <= S`` (every row sees at least one key); it is not checked (that would need
            a host sync; see :func:`check_ranges`). Out of contract, the triton path clamps the range
            to ``[0, S)`` and never reads outside it, and an empty range gives zeros (sdpa: NaN).
        scaling: factor applied to every logit (usually ``D ** -0.5``).
        softcap: if given, logits become ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2).
        path: one of :data:`PATHS`; default :func:`default_path` for the device.
        out: optional ``(n, Hq, 1, Dv)`` tensor in ``query``'s dtype on its device to write the result into
            (any strides; not aliasing the inputs), e.g. a CUDA graph's static output.
        config: launch parameters of the triton path (default :data:`DEFAULT_CONFIG`).
        sinks: optional ``(Hq,)`` learned sink logits (gpt-oss), any float dtype, on ``query``'s device: head
            ``h``'s softmax gets one more term ``exp(sinks[h])`` in its denominator (no value). Applied after
            ``scaling`` and ``softcap`` (the logit is used as it is).

    Returns:
        ``(n, Hq, 1, Dv)`` in ``query``'s dtype (``out`` itself if given). Softmax in float32.

    Raises:
        ValueError: If shapes, dtypes, devices or the path do not fit together (the message says which).
    """
    check_decode_inputs(query, keys, values, lo, hi, softcap, out)
    check_sinks(sinks, query)
    if path is None:
        path = default_path(query.device, softcap)
    if path not in PATHS:
        raise ValueError(f"Unknown decode attention path {path!r}; choose one of {PATHS}.")
    if path == "sdpa" and softcap is not None:
        raise ValueError("Path 'sdpa' cannot soft-cap logits; use 'triton' or 'explicit' with softcap.")
    if path == "triton":
        if not triton_available():
            raise ValueError("Path 'triton' needs the triton package, which cannot be imported here.")
        if query.device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"Path 'triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got {query.device}."
            )
    if out is None:
        out = query.new_empty(query.shape[0], query.shape[1], 1, values.shape[-1])
    if query.shape[0] == 0:
        return out
    if path == "triton":
        _triton(query, keys, values, lo, hi, scaling, softcap, out, config or DEFAULT_CONFIG, sinks)
    elif path == "sdpa":
        out.copy_(_sdpa(query, keys, values, lo, hi, scaling, sinks))
    else:
        out.copy_(_explicit(query, keys, values, lo, hi, scaling, softcap, sinks))
    return out


def check_sinks(sinks: Tensor | None, query: Tensor) -> None:
    """Validate learned sink logits: ``(Hq,)`` floating point on ``query``'s device (or None).

    Raises:
        ValueError: Naming what does not fit.
    """
    if sinks is None:
        return
    heads = query.shape[1]
    if sinks.shape != (heads,) or not sinks.is_floating_point():
        raise ValueError(f"sinks must be a float tensor of shape ({heads},), got {sinks.dtype} {tuple(sinks.shape)}.")
    if sinks.device != query.device:
        raise ValueError(f"sinks must be on query's device {query.device}, got {sinks.device}.")


def check_decode_inputs(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    lo: Tensor,
    hi: Tensor,
    softcap: float | None = None,
    out: Tensor | None = None,
) -> None:
    """Validate shapes, dtypes and devices of :func:`decode_attention`'s inputs without a device sync.

    Raises:
        ValueError: Naming the first argument that does not fit.
    """
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"query must be (rows, heads, 1, head_dim), got shape {tuple(query.shape)}.")
    if query.dtype not in FLOAT_DTYPES:
        raise ValueError(f"query must be float16, bfloat16 or float32, got {query.dtype}.")
    rows, heads, _, dim = query.shape
    for name, t in (("keys", keys), ("values", values)):
        if t.dim() != 4 or t.shape[0] != rows:
            raise ValueError(f"{name} must be (rows={rows}, kv_heads, slots, dim), got shape {tuple(t.shape)}.")
        if t.dtype != query.dtype:
            raise ValueError(f"{name} must have query's dtype {query.dtype}, got {t.dtype}.")
        if t.device != query.device:
            raise ValueError(f"{name} must be on query's device {query.device}, got {t.device}.")
    kv_heads, slots = keys.shape[1], keys.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a positive multiple of key/value heads ({kv_heads}).")
    if keys.shape[-1] != dim:
        raise ValueError(f"keys must have the queries' head_dim {dim}, got {keys.shape[-1]}.")
    if values.shape[1] != kv_heads or values.shape[2] != slots:
        raise ValueError(
            f"values must be (rows, {kv_heads}, {slots}, dim_v) like keys, got shape {tuple(values.shape)}."
        )
    if slots == 0:
        raise ValueError("keys must have at least one slot (every row sees at least one key).")
    for name, t in (("lo", lo), ("hi", hi)):
        if t.shape != (rows,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{name} must be an int32/int64 tensor of shape ({rows},), got {t.dtype} {tuple(t.shape)}."
            )
        if t.device != query.device:
            raise ValueError(f"{name} must be on query's device {query.device}, got {t.device}.")
    if out is not None:
        want = (rows, heads, 1, values.shape[-1])
        if tuple(out.shape) != want or out.dtype != query.dtype or out.device != query.device:
            raise ValueError(
                f"out must be a {query.dtype} tensor of shape {want} on {query.device}, "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}."
            )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}.")


def check_ranges(lo: Tensor, hi: Tensor, slots: int) -> None:
    """Check ``0 <= lo < hi <= slots`` for every row. Reads the values: a host sync, for tests and debugging.

    Raises:
        ValueError: Naming the first row out of contract.
    """
    bad = ~((lo >= 0) & (lo < hi) & (hi <= slots))
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"row {b}: need 0 <= lo < hi <= {slots}, got lo={int(lo[b])}, hi={int(hi[b])}.")


def range_mask(lo: Tensor, hi: Tensor, slots: int) -> Tensor:
    """``(n, slots)`` bool: slot ``j`` of row ``b`` is in ``[lo[b], hi[b])``."""
    j = torch.arange(slots, device=lo.device)
    return (j >= lo[:, None]) & (j < hi[:, None])


def _sdpa(
    query: Tensor, keys: Tensor, values: Tensor, lo: Tensor, hi: Tensor, scaling: float, sinks: Tensor | None = None
) -> Tensor:  # fmt: skip
    """One SDPA call, ``(n, Hkv, groups, D)`` queries (heads folded into the query axis), boolean mask.

    With ``sinks``: the fused kernel that also returns the log-sum-exp ``L`` (additive mask), and the output
    scaled by ``exp(L) / (exp(L) + exp(s)) = sigmoid(L - s)``."""
    rows, heads, _, dim = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    mask = range_mask(lo, hi, slots)[:, None, None, :]
    if sinks is None:
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        return o.reshape(rows, heads, 1, values.shape[-1])
    from .banded import _window_lse

    bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
    o, lse = _window_lse(q, keys, values, bias, scaling)  # (n, Hkv, groups, Dv), (n, Hkv, groups)
    keep = torch.sigmoid(lse.float() - sinks.float().reshape(1, kv_heads, -1))
    return (o.float() * keep[..., None]).to(query.dtype).reshape(rows, heads, 1, values.shape[-1])


def _explicit(
    query: Tensor, keys: Tensor, values: Tensor, lo: Tensor, hi: Tensor, scaling: float, softcap: float | None,
    sinks: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Float32 scores ``(n, Hkv, groups, S)``, soft-capped, masked, [sink logit appended], softmax, ``@ values``."""
    rows, heads, _, dim = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim).float()
    scores = (q @ keys.float().transpose(-1, -2)).mul_(scaling)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    scores.masked_fill_(~range_mask(lo, hi, slots)[:, None, None, :], float("-inf"))
    if sinks is not None:  # one more softmax term per head, with no value: dropped after the softmax
        sink = sinks.float().reshape(1, kv_heads, -1, 1).expand(rows, -1, -1, 1)
        probs = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :slots]
        o = probs @ values.float()
        return o.reshape(rows, heads, 1, values.shape[-1]).to(query.dtype)
    o = scores.softmax(dim=-1) @ values.float()
    return o.reshape(rows, heads, 1, values.shape[-1]).to(query.dtype)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_splits(rows: int, kv_heads: int, slots: int, device: torch.device, config: TritonConfig) -> int:
    """Chunks per row: enough that ``rows * kv_heads * splits`` reaches ``programs_per_sm`` x the SMs, but no
    more than the buffer has tiles and at most ``max_splits``. Depends on shapes and the device only."""
    if config.splits is not None:
        return max(1, config.splits)
    target = math.ceil(config.programs_per_sm * sm_count(device))
    want = -(-target // (rows * kv_heads))
    return max(1, min(want, -(-slots // config.block_n), config.max_splits))


def _pad(x: int) -> int:
    """Power of two >= max(x, 16): tile sizes for ``tl.dot``."""
    return max(16, 1 << (x - 1).bit_length())


def _widen(query: Tensor) -> bool:
    """Products in float32: float32 inputs (exactness), and bfloat16 under the interpreter (its bf16 dot is wrong)."""
    return query.dtype == torch.float32 or (query.device.type != "cuda" and query.dtype == torch.bfloat16)


def _triton(
    query: Tensor, keys: Tensor, values: Tensor, lo: Tensor, hi: Tensor, scaling: float, softcap: float | None,
    out: Tensor, config: TritonConfig, sinks: Tensor | None = None,
) -> None:  # fmt: skip
    from . import _decode_triton as kernels

    if config.block_n < 16 or config.block_n & (config.block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {config.block_n}.")
    rows, heads, _, dim = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    dim_v = values.shape[-1]
    groups = heads // kv_heads
    splits = choose_splits(rows, kv_heads, slots, query.device, config)
    direct = splits == 1
    if direct:
        part_o = part_l = out  # unused
    else:
        part_o = torch.empty(rows, heads, splits, dim_v, dtype=torch.float32, device=query.device)
        part_l = torch.empty(rows, heads, splits, dtype=torch.float32, device=query.device)
    has_sinks = sinks is not None
    sink_arg = sinks if has_sinks else lo  # any pointer when there are none (never read)
    kernels.decode_split[(rows, kv_heads, splits)](
        query, keys, values, lo, hi, out, part_o, part_l, sink_arg,
        query.stride(0), query.stride(1), query.stride(3),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        values.stride(0), values.stride(1), values.stride(2), values.stride(3),
        out.stride(0), out.stride(1), out.stride(3),
        lo.stride(0), hi.stride(0), sink_arg.stride(0),
        slots, splits, float(scaling), float(softcap or 1.0),
        GROUPS=groups, G_PAD=_pad(groups), D=dim, D_PAD=_pad(dim), DV=dim_v, DV_PAD=_pad(dim_v),
        BLOCK_N=config.block_n, SOFTCAP=softcap is not None, WIDEN=_widen(query), DIRECT=direct, SINKS=has_sinks,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if not direct:
        kernels.decode_reduce[(rows, heads)](
            lo, hi, out, part_o, part_l, sink_arg,
            out.stride(0), out.stride(1), out.stride(3), lo.stride(0), hi.stride(0), sink_arg.stride(0),
            slots, splits, heads, config.block_n,
            DV=dim_v, DV_PAD=_pad(dim_v), SPLITS_PAD=max(2, 1 << (splits - 1).bit_length()), SINKS=has_sinks,
            num_warps=1 if splits * _pad(dim_v) <= 2048 else 4,
        )  # fmt: skip
