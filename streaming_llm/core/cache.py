"""The StreamingLLM KV cache: rows of independent streams in one preallocated buffer per layer group.

Each *row* is a whole StreamingLLM stream: its own tokens seen, frame and positions, its own pinned
prefix (the attention sinks, or a whole system prompt up to ``pinned_capacity`` tokens), an optional
pinned memory segment (a summary or retrieved passages) and a rolling window of ``recent_size``
tokens. One row is the single-stream case; the engine (:mod:`streaming_llm.runtime.engine`) keeps many
sessions as rows of one cache and decodes them together.

The cache owns the streaming step. Before every forward it makes one host-side :class:`StepPlan` from
host integers alone (no device read): which rows the forward feeds, where their tokens go, how
their pinned keys turn, and which attention each layer runs. The model's ``cache.update`` calls then
write the new keys and values as planned, and the attention function
(:mod:`streaming_llm.core.attention`) reads the plan's per-layer description. Two kinds of step:

* a **chunk** of ``L`` tokens for a range of rows in the same state (one row for the engine's prefill;
  every row of an aligned batch for a plain transformers forward). Eager.
* a **decode** step: one token for each of the rows ``0 .. n-1`` (``n`` a bucket). Everything that
  changes between steps lives in device tensors written before the step, so the stepper
  (:mod:`streaming_llm.core.stepper`) captures it once per bucket in a CUDA graph and replays it.

Layers that share a window and RoPE form one :class:`LayerGroup` (all full-attention layers, say; a
model with sliding-window layers has a second group that keeps the model's own window, no sinks).

Layout of one layer's buffer, shape ``(rows, kv_heads, slots + 1, head_dim)``, with ``R = Z + P``::

    [ segment area (Z) | pinned area (P) | ring (W + 1) | scratch (1) ]

* Row ``b``'s pinned prefix (its first ``S_b <= P`` stream tokens) sits right-aligned against the ring,
  in ``[R - S_b, R)``; its segment (``z_b <= Z`` tokens) right before it. What row ``b`` attends to,
  ``[R - S_b - z_b, R + fill_b)``, is therefore one contiguous range.
* Stream token ``u >= S_b`` lives in ring slot ``R + (u - S_b) mod (W + 1)``: one slot more than
  ``recent_size``, so a new token is written in place while the query still sees the ``W`` before it.
* The scratch slot takes the writes of rows that ride along in a decode bucket without decoding.

The pinned keys are also kept *canonically*, rotated at their in-cache positions, in a second
buffer; a step writes them into the main buffer turned by ``e = m - K(t)`` (see positions), so the
pinned tokens sit right before the window for the query at model position ``m``.

Hybrid models (Qwen3-Next, LFM2, Falcon-H1) also have recurrent layers, whose conv windows and
recurrent states the model reads and writes through transformers' ``get_conv_state`` /
``update_conv_state`` / ``get_recurrent_state`` / ``update_recurrent_state``. The cache keeps them in
:class:`RecurrentStates`, one slice per row, exactly as transformers' own cache keeps them: constant
size, nothing positional, so streaming leaves them alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionCacheLayerMixin

from .architectures import ModelSpec, describe
from .positions import Rope, Window
from .quant import QuantTensor, check_kv_dtype, float_dtype, is_quantized

ATTN_IMPLEMENTATION = "streaming_llm"
HYBRID_SEGMENTS = (
    "Pinned memory segments (hybrid and retrieval memory) are not available for hybrid recurrent models: their "
    "recurrent layers have no keys to pin a segment into. Use plain streaming with this model."
)
PositionMode = Literal["absolute", "compact"]
CacheState = tuple[dict[str, torch.Tensor], dict]
"""``(tensors, counters)``: one row's saved state (see :meth:`StreamingCache.row_state`)."""


# -- what a step does (host data, read by the layers and by attention) ----------------------------------
@dataclass(frozen=True)
class ChunkPlan:
    """A chunk of ``length`` tokens for the rows ``rows`` (all in the same state), in one layer group.

    Attributes:
        rows: The rows fed (batch dimension of the forward).
        t0: Stream index of the chunk's first token.
        m0: Model position of the chunk's first token.
        length: Tokens in the chunk.
        mode: ``"view"``: keys are a view of the buffer in which the queries come last (plain
            bottom-right causal attention is exact); ``"banded"``: the chunk crosses the eviction
            point, keys are a temporary ``[pinned | recent]`` working set and every query needs its own
            window (:func:`~streaming_llm.core.kernels.banded_attention`).
        n_new_sinks: Tokens of this chunk that join the pinned prefix.
        first_slot: ``view``: first buffer slot of the returned view.
        last_slot: ``view``: one past its last slot.
        n_pinned: ``banded``: pinned keys at the start of the working set (segment included).
        segment_len: Tokens of the row's pinned segment.
        rest_start: ``banded``: stream index of the first recent key of the working set.
        offsets: ``banded``: per-query rotation ``e`` of the pinned keys, int64 ``(length,)``.
        recent_size: The window.
        rope: The group's rotary embedding (attention turns queries back for the pinned keys).
    """

    rows: range
    t0: int
    m0: int
    length: int
    mode: Literal["view", "banded"]
    n_new_sinks: int = 0
    first_slot: int = 0
    last_slot: int = 0
    n_pinned: int = 0
    segment_len: int = 0
    rest_start: int = 0
    offsets: torch.Tensor | None = None
    recent_size: int = 0
    rope: Rope | None = None


@dataclass(frozen=True)
class DecodePlan:
    """One token for each of rows ``0 .. n-1`` of one layer group.

    Attributes:
        n: The bucket (batch dimension of the forward).
        uniform: ``(lo, hi)`` when every row of the bucket decodes and attends to the same slots (plain
            attention over that slice, no mask); None when the rows differ (per-row ``lo``/``hi``).
        turn_from: First slot whose pinned keys are turned this step (up to the ring).
        lo: ``(n,)`` int64 device tensor: first slot row ``b`` attends to (read when not uniform).
        hi: ``(n,)`` int64 device tensor: one past its last slot.
    """

    n: int
    uniform: tuple[int, int] | None
    turn_from: int
    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def key(self) -> tuple:
        """What a captured step depends on besides device tensors."""
        return (self.n, self.uniform, self.turn_from)


GroupPlan = ChunkPlan | DecodePlan


@dataclass(frozen=True)
class StepPlan:
    """One forward: a plan per layer group, in the cache's group order."""

    groups: tuple[GroupPlan, ...]
    rows: tuple[int, ...]  # rows whose stream advances
    idle: bool = False  # a decode bucket with rows that ride along (their recurrent states must not move)

    @property
    def decode(self) -> bool:
        return isinstance(self.groups[0], DecodePlan)

    @property
    def key(self) -> tuple:
        return (*(g.key for g in self.groups), self.idle) if self.decode else ()


# Per-row fields of a decode step, packed in one host buffer (one device copy per step): the token and
# model position (shared by the groups), then per group the write slot, the rotation-table index of
# the pinned turn, and the attended range [lo, hi); last, whether the row decodes (1) or rides along (0).
SHARED_FIELDS = ("token", "position")
GROUP_FIELDS = ("slot", "turn", "lo", "hi")


@dataclass
class Row:
    """One row's stream in one layer group.

    Attributes:
        window: ``(S_b, W)``: this row's pinned prefix and the window (``(0, w - 1)`` in a sliding group).
        seen: Stream tokens processed.
        shift: A ring key of stream index ``u`` is rotated at model position ``u - shift`` (None: no key yet).
        segment_len: Tokens of the pinned segment.
        rotation: Rotation the main buffer's pinned slots hold now (None: unknown, rewritten before use).
    """

    window: Window
    seen: int = 0
    shift: int | None = None
    segment_len: int = 0
    rotation: int | None = None

    def same_stream(self, other: Row) -> bool:
        return (self.window, self.seen, self.shift, self.segment_len) == (
            other.window, other.seen, other.shift, other.segment_len
        )  # fmt: skip


class LayerGroup:
    """Storage and per-row stream state of the layers that share a window and a RoPE.

    Storage, allocated once: ``keys``/``values`` ``(layers, rows, kv_heads, slots + 1, dim)`` and
    ``pinned`` (canonical pinned keys, ``(layers, rows, kv_heads, Z + P, dim)``).
    """

    def __init__(
        self, shape: Window, rope: Rope, layer_ids: list[int], segment_capacity: int, pinned_capacity: int,
        query_rope: Rope | None = None,
    ):  # fmt: skip
        self.shape, self.rope, self.layer_ids = shape, rope, layer_ids
        self.query_rope = query_rope or rope  # how attention turns queries back (latent attention differs)
        self.segment_capacity, self.pinned_capacity = segment_capacity, pinned_capacity
        self.rows: list[Row] = []
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.pinned: torch.Tensor | None = None
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin for signed rotations
        self.compute: torch.dtype | None = None  # the dtype attention reads (keys/values may be stored otherwise)

    # -- layout -------------------------------------------------------------------------------------------
    @property
    def ring_base(self) -> int:
        return self.segment_capacity + self.pinned_capacity

    @property
    def ring_size(self) -> int:
        return self.shape.recent_size + 1

    @property
    def slots(self) -> int:
        """Slots a row attends to at most (the scratch slot is one more)."""
        return self.ring_base + self.ring_size

    @property
    def span(self) -> int:
        """Largest rotation the decode table holds (either sign)."""
        return 2 * (self.shape.recent_size + self.pinned_capacity + self.segment_capacity) + 64

    def sink_base(self, b: int) -> int:
        return self.ring_base - self.rows[b].window.start_size

    def first(self, b: int) -> int:
        """First slot row ``b`` attends to (its segment, else its pinned prefix, else its ring)."""
        return self.sink_base(b) - self.rows[b].segment_len

    def filled(self, b: int) -> int:
        """One past the last slot row ``b`` has written."""
        row = self.rows[b]
        return self.ring_base + min(max(row.seen - row.window.start_size, 0), self.ring_size)

    def ring_slot(self, u: int | torch.Tensor, start: int) -> int | torch.Tensor:
        """Buffer slot of stream token ``u >= start`` (``start``: the row's pinned prefix)."""
        return self.ring_base + (u - start) % self.ring_size

    @property
    def initialized(self) -> bool:
        return self.keys is not None

    def allocate(
        self, rows: int, heads: int, dim: int, dim_v: int, dtype: torch.dtype, device, kv_dtype: str | None = None
    ) -> None:
        """Storage for ``rows`` rows in compute dtype ``dtype``; ``kv_dtype`` ``"int8"``/``"float8_e4m3"`` keeps
        ``keys``/``values`` quantized (:class:`~streaming_llm.core.quant.QuantTensor`), the canonical pinned keys
        stay in ``dtype``."""
        n = len(self.layer_ids)
        self.compute = dtype
        kw = {"dtype": dtype if kv_dtype is None or is_quantized(kv_dtype) else float_dtype(kv_dtype), "device": device}
        if is_quantized(kv_dtype):
            qkw = {"kv_dtype": kv_dtype, "dtype": dtype, "device": device}
            self.keys = QuantTensor.zeros(n, rows, heads, self.slots + 1, dim, **qkw)
            self.values = QuantTensor.zeros(n, rows, heads, self.slots + 1, dim_v, **qkw)
        else:
            self.keys = torch.zeros(n, rows, heads, self.slots + 1, dim, **kw)
            self.values = torch.zeros(n, rows, heads, self.slots + 1, dim_v, **kw)
        self.pinned = torch.zeros(n, rows, heads, self.ring_base, dim, **kw)
        work = torch.promote_types(dtype, torch.float32)
        cos, sin = self.rope.cos_sin(torch.arange(-self.span, self.span + 1), torch.device(device))
        self._table = (cos.to(work), sin.to(work))

    def clear_row(self, b: int, window: Window) -> None:
        """Start row ``b`` afresh with pinned prefix ``window.start_size`` (its storage zeroed)."""
        while len(self.rows) <= b:
            self.rows.append(Row(self.shape))
        self.rows[b] = Row(window)
        if self.initialized:
            for t in (self.keys, self.values, self.pinned):
                t[:, b].zero_()

    # -- a chunk (eager) -----------------------------------------------------------------------------
    def plan_chunk(self, rows: range, length: int, m0: int) -> ChunkPlan:
        """Plan a chunk of ``length`` tokens at model positions ``m0 ..`` for ``rows``, and advance them.

        Host work, plus the eager work a chunk may need: re-framing the ring after a frame change,
        turning the pinned keys.
        """
        b = rows.start
        row = self.rows[b]
        w, t0 = row.window, row.seen
        self._enter_frame(rows, t0 - m0)
        end = t0 + length
        n_new_sinks = max(0, min(w.start_size, end) - t0)
        if length == 1 or end - 1 <= w.capacity:
            last = (
                self.sink_base(b) + end
                if end <= w.start_size
                else self.ring_base + min(end - w.start_size, self.ring_size)
            )
            self._turn_pinned(rows, m0 - w.in_cache_position(t0, row.segment_len))
            plan = ChunkPlan(rows, t0, m0, length, "view", n_new_sinks, self.first(b), last,
                             segment_len=row.segment_len, recent_size=w.recent_size, rope=self.query_rope)  # fmt: skip
        else:
            plan = ChunkPlan(
                rows, t0, m0, length, "banded", n_new_sinks, n_pinned=min(end, w.start_size) + row.segment_len,
                segment_len=row.segment_len, rest_start=max(w.start_size, t0 - w.recent_size),
                offsets=w.pin_offsets(t0, m0, length, row.segment_len), recent_size=w.recent_size, rope=self.query_rope,
            )  # fmt: skip
        for r in rows:
            self.rows[r].seen = end
            if plan.mode == "banded":
                self.rows[r].rotation = None  # the buffer's sink slots will hold keys at the chunk's frame
        return plan

    def _enter_frame(self, rows: range, shift: int) -> None:
        """Make ``shift`` the rows' frame, re-rotating their ring once if it changes (a rebase)."""
        old = self.rows[rows.start].shift
        if old is not None and old != shift:
            ring = self.keys[:, rows.start : rows.stop, :, self.ring_base : self.slots]
            # quantized: dequantize -> re-rotate (float32) -> re-quantize, once per rebase
            source = ring.dequantize(torch.float32) if isinstance(ring, QuantTensor) else ring
            ring.copy_(self.rope.rotate(source, old - shift))
        for r in rows:
            self.rows[r].shift = shift

    def _turn_pinned(self, rows: range, e: int) -> None:
        """Write the canonical pinned keys of ``rows`` into the buffer, turned by ``e`` (all layers at once)."""
        row = self.rows[rows.start]
        if row.rotation == e:
            return
        first, last = self.first(rows.start), self.sink_base(rows.start) + min(row.seen, row.window.start_size)
        if last > first:
            canonical = self.pinned[:, rows.start : rows.stop, :, first:last]
            self.keys[:, rows.start : rows.stop, :, first:last] = self.rope.rotate(canonical, e)
        for r in rows:
            self.rows[r].rotation = e

    def write_chunk(self, plan: ChunkPlan, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store layer ``i``'s new keys/values ``(rows, kv_heads, length, dim)``; return what attention reads."""
        keys, values, pinned = (t[i, plan.rows.start : plan.rows.stop] for t in (self.keys, self.values, self.pinned))
        base, n = self.sink_base(plan.rows.start), plan.n_new_sinks
        if n:  # canonical copies of new pinned tokens (rotated at their stream index)
            pinned[:, :, base + plan.t0 : base + plan.t0 + n] = self.rope.rotate(k[:, :, :n], plan.t0 - plan.m0)
        if plan.mode == "banded":
            return self._banded(plan, keys, values, pinned, k, v)
        if n:  # in the buffer they sit at the chunk's own frame: exactly the keys the model handed over
            keys[:, :, base + plan.t0 : base + plan.t0 + n] = k[:, :, :n]
            values[:, :, base + plan.t0 : base + plan.t0 + n] = v[:, :, :n]
        if n < plan.length:
            start = self.ring_slot(plan.t0 + n, self.rows[plan.rows.start].window.start_size)
            keys[:, :, start : start + plan.length - n] = k[:, :, n:]
            values[:, :, start : start + plan.length - n] = v[:, :, n:]
        seen = slice(plan.first_slot, plan.last_slot)
        return self.read(keys[:, :, seen]), self.read(values[:, :, seen])

    def _banded(
        self, plan: ChunkPlan, keys, values, pinned, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """``[pinned (canonical) | past recent | new recent]`` as a temporary working set; then keep only
        what survives the chunk."""
        start = self.rows[plan.rows.start].window.start_size
        base, n = self.sink_base(plan.rows.start), plan.n_new_sinks
        n_old = min(plan.t0, start)
        seg = slice(base - plan.segment_len, base)
        sinks = slice(base, base + n_old + n)
        pieces_k = [pinned[:, :, sinks], pinned[:, :, seg]]
        pieces_v = [self.read(values[:, :, base : base + n_old]), v[:, :, :n], self.read(values[:, :, seg])]
        if plan.t0 > plan.rest_start:
            slots = self.ring_slot(torch.arange(plan.rest_start, plan.t0, device=keys.device), start)
            pieces_k.append(self.read(keys.index_select(2, slots)))
            pieces_v.append(self.read(values.index_select(2, slots)))
        pieces_k.append(k[:, :, n:])
        pieces_v.append(v[:, :, n:])
        work_k, work_v = torch.cat(pieces_k, dim=2), torch.cat(pieces_v, dim=2)
        if n:  # keep what survives: the new pinned tokens, and the last ring_size recent tokens of the chunk
            keys[:, :, base + plan.t0 : base + plan.t0 + n] = k[:, :, :n]
            values[:, :, base + plan.t0 : base + plan.t0 + n] = v[:, :, :n]
        keep = min(plan.length - n, self.ring_size)
        end = plan.t0 + plan.length
        slots = self.ring_slot(torch.arange(end - keep, end, device=keys.device), start)
        keys.index_copy_(2, slots, self.stored(k[:, :, plan.length - keep :]))
        values.index_copy_(2, slots, self.stored(v[:, :, plan.length - keep :]))
        return work_k, work_v

    def read(self, x: torch.Tensor | QuantTensor) -> torch.Tensor:
        """What attention reads of stored keys/values: dequantized, or cast to the compute dtype."""
        if isinstance(x, QuantTensor):
            return x.dequantize()
        return x if x.dtype == self.compute else x.to(self.compute)

    def stored(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype the storage takes it (a quantized buffer quantizes it itself)."""
        if isinstance(self.keys, QuantTensor) or x.dtype == self.keys.dtype:
            return x
        return x.to(self.keys.dtype)

    # -- a decode step (device work reads device tensors only) ------------------------------------------
    def decodable(self, b: int, m: int) -> bool:
        """Whether row ``b`` can take a one-token decode step at model position ``m``: its pinned prefix is
        complete and its pinned rotation is in the table."""
        row = self.rows[b]
        if row.seen < row.window.start_size:
            return False
        return abs(m - row.window.in_cache_position(row.seen, row.segment_len)) <= self.span

    def decode_fields(self, b: int, m: int) -> tuple[int, int, int, int]:
        """``(slot, turn index, lo, hi)`` of row ``b``'s one-token step at model position ``m``; advances it
        (re-framing its ring first after a rebase)."""
        row = self.rows[b]
        t = row.seen
        self._enter_frame(range(b, b + 1), t - m)
        e = m - row.window.in_cache_position(t, row.segment_len)
        row.seen, row.rotation = t + 1, e
        return self.ring_slot(t, row.window.start_size), e + self.span, self.first(b), self.filled(b)

    def idle_fields(self, b: int) -> tuple[int, int, int, int]:
        """Fields of a row that rides along without decoding: writes go to the scratch slot, its pinned
        keys are rewritten at the rotation they hold (0 when unknown), and it attends to one slot."""
        row = self.rows[b]
        if row.rotation is None:
            row.rotation = 0
        return self.slots, row.rotation + self.span, 0, 1

    def turn_decode(self, plan: DecodePlan, turn: torch.Tensor) -> None:
        """Turn the pinned keys of rows ``0 .. n-1`` (all layers) by each row's rotation ``turn`` (table index)."""
        if plan.turn_from >= self.ring_base:
            return
        cos = self._table[0].index_select(0, turn)[:, None, None, :]  # (n, 1, 1, half)
        sin = self._table[1].index_select(0, turn)[:, None, None, :]
        region = slice(plan.turn_from, self.ring_base)
        self.keys[:, : plan.n, :, region] = self.rope.apply(self.pinned[:, : plan.n, :, region], cos, sin)

    def write_decode(
        self, plan: DecodePlan, i: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer ``i``'s new key/value ``(n, kv_heads, 1, dim)`` of each row at its slot; return the rows'
        buffers (the uniform slice, or every slot when rows differ)."""
        keys, values = self.keys[i, : plan.n], self.values[i, : plan.n]
        k, v = self.stored(k), self.stored(v)
        index = slot[:, None, None, None].expand(-1, keys.shape[1], 1, keys.shape[3])
        keys.scatter_(2, index, k)
        values.scatter_(2, slot[:, None, None, None].expand(-1, values.shape[1], 1, values.shape[3]), v)
        lo, hi = plan.uniform or (0, self.slots)
        return self.read(keys[:, :, lo:hi]), self.read(values[:, :, lo:hi])

    # -- saving and restoring one row -----------------------------------------------------------------
    def row_tensors(self, b: int) -> dict[str, torch.Tensor]:
        """Copies of row ``b``'s filled slots: ``[segment | pinned | ring written so far]``."""
        first, filled = self.first(b), self.filled(b)
        out = {"pinned": self.pinned[:, b : b + 1, :, first : self.ring_base].clone()}
        for name, t in (("keys", self.keys), ("values", self.values)):
            part = t[:, b : b + 1, :, first:filled]
            if isinstance(part, QuantTensor):  # the quantized ring as stored: raw data + scales
                out[name], out[f"{name}_scale"] = part.data.clone(), part.scale.clone()
            else:
                out[name] = part.clone()
        return out

    def restore_row(self, b: int, tensors: dict[str, torch.Tensor], saved: dict, window: Window) -> None:
        """Copy a saved row into row ``b`` (after :meth:`clear_row`).

        Raises:
            ValueError: Tensors or counters that do not fit this group.
        """
        keys, values, pinned = tensors["keys"], tensors["values"], tensors["pinned"]
        segment_len = int(saved["segment_len"])
        if not 0 <= segment_len <= self.segment_capacity:
            raise ValueError(f"A segment of {segment_len} tokens does not fit this cache's {self.segment_capacity}.")
        self.rows[b] = Row(window, int(saved["seen"]), saved["shift"], segment_len)
        first, filled = self.first(b), self.filled(b)
        expected = (len(self.layer_ids), 1, self.keys.shape[2], filled - first, self.keys.shape[4])
        if tuple(keys.shape) != expected or tuple(pinned.shape[-2:]) != (self.ring_base - first, expected[-1]):
            raise ValueError(f"Saved tensors of shape {tuple(keys.shape)} do not fit this model and these sizes.")
        for name, buffer, saved_data in (("keys", self.keys, keys), ("values", self.values, values)):
            if isinstance(buffer, QuantTensor):
                part = buffer[:, b : b + 1, :, first:filled]
                part.data.copy_(saved_data.view(part.data.dtype))
                part.scale.copy_(tensors[f"{name}_scale"])
            else:
                buffer[:, b : b + 1, :, first:filled] = saved_data
        self.pinned[:, b : b + 1, :, first : self.ring_base] = pinned

    def set_segment(self, b: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Make ``keys``/``values`` (per model layer, ``(1, kv_heads, n, dim)``, keys rotated at the canonical
        positions ``S_b ..``) row ``b``'s pinned segment."""
        n = keys[0].shape[-2]
        base = self.sink_base(b)
        for j, layer in enumerate(self.layer_ids):
            self.pinned[j, b : b + 1, :, base - n : base] = keys[layer]
            self.values[j, b : b + 1, :, base - n : base] = values[layer]
        self.rows[b].segment_len, self.rows[b].rotation = n, None


class RecurrentStates:
    """The recurrent layers' own constant-size states, one slice per row, kept as the model hands them over.

    ``tensors["conv.{layer}.{state}"]``: a conv window ``(rows, channels, kernel)``;
    ``tensors["recurrent.{layer}.{state}"]``: an SSM / delta-rule state ``(rows, ...)``. A layer's storage is
    allocated, zeroed, on its first write (the model decides the shapes and dtype). A zero state is exactly a
    fresh stream's: a zero conv window is the zero padding a first chunk gets, a zero recurrent state the
    initial state of the scan.
    """

    def __init__(self, layer_ids: tuple[int, ...]):
        self.layer_ids = layer_ids
        self.tensors: dict[str, torch.Tensor] = {}

    def allocate(self, name: str, rows: int, sample: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Zeroed storage for ``rows`` rows shaped like ``sample`` ``(batch, ...)`` (last dim ``width`` if given)."""
        shape = (rows, *sample.shape[1:-1], width if width is not None else sample.shape[-1])
        self.tensors[name] = sample.new_zeros(shape)
        return self.tensors[name]

    def clear_row(self, b: int) -> None:
        for t in self.tensors.values():
            t[b].zero_()

    def row_tensors(self, b: int) -> dict[str, torch.Tensor]:
        """Copies of row ``b``'s states, ``(1, ...)`` each."""
        return {f"states.{name}": t[b : b + 1].clone() for name, t in self.tensors.items()}

    def restore_row(self, b: int, tensors: Mapping[str, torch.Tensor], rows: int, device: torch.device) -> None:
        """Copy saved states (:meth:`row_tensors`, on any device) into row ``b``; storage missing here is allocated
        from them, for ``rows`` rows on ``device``.

        Raises:
            ValueError: A saved state of another shape than this cache's.
        """
        for key, saved in tensors.items():
            if not key.startswith("states."):
                continue
            name = key[len("states.") :]
            stored = self.tensors.get(name)
            if stored is None:
                stored = self.allocate(name, rows, saved.to(device))
            if tuple(saved.shape[1:]) != tuple(stored.shape[1:]):
                raise ValueError(
                    f"A saved recurrent state {name} of shape {tuple(saved.shape)} does not fit this model."
                )
            stored[b : b + 1] = saved.to(stored.device, stored.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class RecurrentLayer(LinearAttentionCacheLayerMixin):
    """A recurrent layer of a :class:`StreamingCache`, as transformers sees it (``cache.is_linear``); its
    states live in the cache's :class:`RecurrentStates` and are reached through the cache's methods."""

    is_sliding = False
    is_compileable = False

    def lazy_initialization(self, *args, **kwargs) -> None:
        raise RuntimeError("A StreamingCache allocates recurrent states itself (StreamingCache.update_conv_state).")

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        raise RuntimeError("RecurrentLayer.update_conv_state is driven by StreamingCache.update_conv_state.")

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        raise RuntimeError("RecurrentLayer.update_recurrent_state is driven by StreamingCache.update_recurrent_state.")

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("Reset the whole StreamingCache (cache.reset()).")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("A StreamingCache cannot be cropped: a recurrent state cannot roll back either.")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("Selecting batch rows of a StreamingCache is not supported; use its rows.")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("Beam search / num_return_sequences > 1 need one StreamingCache per sequence.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("Beam search is not supported with a StreamingCache.")


class StreamingLayer(CacheLayerMixin):
    """One decoder layer of a :class:`StreamingCache`, as transformers sees it: a view of its group.

    The streaming step itself is the group's; this class answers transformers' layer interface.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, group: LayerGroup, index: int):
        super().__init__()
        self.group, self.index = group, index

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self.group.keys is None else self.group.keys[self.index]

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ assigns None
        pass

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self.group.values is None else self.group.values[self.index]

    @values.setter
    def values(self, value) -> None:
        pass

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        return self.group.initialized

    @is_initialized.setter
    def is_initialized(self, value) -> None:
        pass

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("A StreamingCache allocates its storage itself (StreamingCache.update).")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("StreamingLayer.update is driven by StreamingCache.update.")

    def get_seq_length(self) -> int:
        return self.group.rows[0].seen if self.group.rows else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.get_seq_length()

    def get_max_length(self) -> int:
        return self.group.shape.capacity

    def reset(self) -> None:
        raise NotImplementedError("Reset the whole StreamingCache (cache.reset()).")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "A StreamingCache cannot be cropped: evicted tokens are gone, so it cannot roll back (assisted decoding "
            "and contrastive search need a cache that can). Use greedy or sampling generation."
        )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError(
            "Selecting batch rows of a StreamingCache is not supported; use one StreamingCache per sequence (or rows)."
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("Beam search / num_return_sequences > 1 need one StreamingCache per sequence.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(
            "Beam search is not supported with a StreamingCache: it needs one StreamingCache per sequence."
        )


@dataclass(frozen=True)
class RowStats:
    """Where one row stands (what sessions and the server report).

    Attributes:
        seen_tokens: Tokens processed since the row was assigned.
        cached_tokens: Tokens the next query attends to besides itself (pinned, segment, window).
        evicted_tokens: Tokens dropped from the window so far.
        pinned_tokens: The row's pinned prefix (sinks, or a whole pinned system prompt).
        segment_tokens: Tokens of its pinned memory segment.
        capacity: Most tokens the row ever holds (pinned + window + segment capacity).
        cache_bytes: Bytes of cache storage that belong to the row (constant).
    """

    seen_tokens: int
    cached_tokens: int
    evicted_tokens: int
    pinned_tokens: int
    segment_tokens: int
    capacity: int
    cache_bytes: int


class StreamingCache(Cache):
    """A transformers ``Cache`` that keeps attention sinks plus a rolling window, exactly, for one or many rows.

    After a token is processed a row holds its first ``start_size`` tokens and its latest
    ``recent_size`` tokens (that token included); the next token attends to those and itself, at
    positions inside the cache. Memory is fixed: per row and layer ``segment_capacity +
    pinned_capacity + recent_size + 2`` slots (plus the canonical pinned keys).

    With ``rows=1`` (the default) it is a single stream that any transformers loop can drive:
    ``model(..., past_key_values=cache)``, ``generate()``, the seed loop. The model must run the
    streaming attention (``enable_streaming_llm(model)`` or :func:`streaming_llm.core.attention.install`);
    with it, a model still behaves exactly like ``sdpa`` with any other cache. With ``rows > 1`` each
    row is an independent stream: the engine and the stepper plan each forward (:meth:`plan_chunk`,
    :meth:`plan_decode`); a plain forward must then feed every row, all in the same state.

    **What the cache tells transformers.** ``get_seq_length()`` is the number of tokens processed (row
    0), so ``generate()`` continues a conversation by feeding exactly the new tokens. Positions: the
    model may use any contiguous positions (the cache brings stored keys into their frame). For endless
    streams, pass ``position_ids=cache.position_ids(n)`` (what the engine does) or create the cache with
    ``positions="compact"`` (what the seed API does): then ``get_seq_length()`` is the position for the
    next token, kept below ``2 * (start + recent)``.

    Args:
        config: The model's config (or the model).
        start_size: Attention sinks of a new row (default 4).
        recent_size: Recent tokens kept per row (default 2000).
        segment_capacity: Slots per row for an injected pinned segment (memory features).
        positions: ``"absolute"`` or ``"compact"``, see above. Default ``"absolute"``, except for
            models whose RoPE changes past a position (Phi-3 longrope), which need ``"compact"``.
        rows: Independent streams held. None (default): one, or as many as the first forward's batch.
        pinned_capacity: Largest pinned prefix of a row (default ``start_size``); a row assigned with a
            longer ``start_size`` (a whole system prompt) needs it.
        dtype, device: Allocate the storage now (default: on the first update, from the keys).
        kv_dtype: How keys/values are stored: None (default: as the model hands them over, in its dtype),
            ``"bfloat16"``/``"float16"``/``"float32"`` (stored in that dtype, read back in the compute dtype),
            ``"int8"`` or ``"float8_e4m3"`` (quantized with one float32 scale per token and kv head, see
            :mod:`streaming_llm.core.quant`; dequantized only where attention reads them). The canonical pinned
            keys stay in the compute dtype.

    Raises:
        NotImplementedError: Unsupported architecture (the message lists the supported ones).
        ValueError / TypeError: Impossible sizes.

    Example:
        >>> cache = StreamingCache(model.config, start_size=4, recent_size=2000)
        >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=10_000)
    """

    def __init__(
        self, config: PretrainedConfig, start_size: int = 4, recent_size: int = 2000, segment_capacity: int = 0,
        positions: PositionMode | None = None, *, rows: int | None = None, pinned_capacity: int | None = None,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None, kv_dtype: str | None = None,
    ):  # fmt: skip
        check_sizes(start_size, recent_size)
        self.kv_dtype = check_kv_dtype(kv_dtype)
        pinned_capacity = start_size if pinned_capacity is None else pinned_capacity
        check_int("segment_capacity", segment_capacity, 0)
        check_int("pinned_capacity", pinned_capacity, start_size)
        check_int("rows", 1 if rows is None else rows, 1)
        if positions not in (None, "absolute", "compact"):
            raise ValueError(f"positions must be 'absolute' or 'compact', got {positions!r}")
        self.config = getattr(config, "config", config)
        self.spec: ModelSpec = describe(self.config)
        limit = self.spec.position_limit
        self.positions: PositionMode = positions or ("absolute" if limit is None else "compact")
        self.window = Window(start_size, recent_size, limit)
        if limit is not None and pinned_capacity + recent_size + segment_capacity >= limit:
            raise ValueError(
                f"This model's RoPE changes frequencies past position {limit}, so the cache must stay well below it: "
                f"{pinned_capacity} pinned + {recent_size} recent + {segment_capacity} segment tokens is too large; "
                f"use at most {limit // 2}."
            )
        self.segment_capacity, self.pinned_capacity = segment_capacity, pinned_capacity
        self.groups, members = self._make_groups(limit)
        self.main = max(self.groups, key=lambda g: (g.shape is self.window, g.shape.capacity))
        super().__init__(layers=[RecurrentLayer() if m is None else StreamingLayer(*m) for m in members])
        self.states = RecurrentStates(self.spec.recurrent_layers)
        self._first_attention = next(i for i, layer in enumerate(self.spec.layers) if layer.attention)
        # Recurrent states of the forward in progress: its rows, whether idle rows must keep theirs, and the
        # views (or, with idle rows, working copies) handed to the model.
        self._touched: set[tuple[int, str]] = set()
        self._state_rows: range | None = None
        self._state_merge = False
        self._state_work: dict[str, torch.Tensor] = {}
        self.free: set[int] = set()
        self._n_rows = rows
        self._plan: StepPlan | None = None  # the current forward's plan (attention reads it after the updates)
        self._plan_used = False
        self._position_memo: tuple[torch.Tensor, int] | None = None
        self._host: torch.Tensor | None = None  # decode fields (host), see plan_decode
        self._dev: torch.Tensor | None = None
        if rows is not None:
            self._start_rows(rows, live=rows == 1)
        else:  # a lazily sized cache: one provisional row until the first forward sizes it (still _n_rows=None)
            for g in self.groups:
                g.clear_row(0, g.shape)
        if dtype is not None or device is not None:
            if rows is None:
                raise ValueError("Give rows= to allocate the storage up front (dtype/device).")
            self._allocate(rows, dtype or torch.float32, torch.device(device or "cpu"))

    def _make_groups(self, limit: int | None) -> tuple[list[LayerGroup], list[tuple[LayerGroup, int] | None]]:
        """The layer groups, and for every model layer its group and index in it (None: no attention)."""
        groups: dict[tuple, LayerGroup] = {}
        members: list[tuple[LayerGroup, int] | None] = []
        for i, spec in enumerate(self.spec.layers):
            if not spec.attention:
                members.append(None)
                continue
            full = spec.sliding_window is None  # full attention: sinks + window; else the model's own window
            key = (spec.sliding_window, spec.rope.key, spec.queries.key)
            if key not in groups:
                shape = self.window if full else Window(0, spec.sliding_window - 1, limit)
                segment, pinned = (self.segment_capacity, self.pinned_capacity) if full else (0, 0)
                groups[key] = LayerGroup(shape, spec.rope, [], segment, pinned, spec.query_rope)
            members.append((groups[key], len(groups[key].layer_ids)))
            groups[key].layer_ids.append(i)
        return list(groups.values()), members

    # -- rows ---------------------------------------------------------------------------------------------
    def _start_rows(self, rows: int, live: bool) -> None:
        """``rows`` fresh rows: all live (one row, or an aligned batch), or all free (for the engine to assign)."""
        self._n_rows = rows
        for b in range(rows):
            for g in self.groups:
                g.clear_row(b, g.shape)
            if b < min((t.shape[0] for t in self.states.tensors.values()), default=0):
                self.states.clear_row(b)
        self.free = set() if live else set(range(rows))

    def _allocate(self, rows: int, dtype: torch.dtype, device: torch.device, heads: int | None = None) -> None:
        """Storage for ``rows`` rows; ``heads``: kv heads per layer as the model hands them over (a tensor-parallel
        rank holds only its share), default the model's."""
        heads, dim = heads or self.spec.num_kv_heads, self.spec.head_dim
        for g in self.groups:
            g.allocate(rows, heads, dim, self.spec.value_size, dtype, device, self.kv_dtype)
        fields = len(SHARED_FIELDS) + len(GROUP_FIELDS) * len(self.groups) + 1  # + the "active" row
        self._host = torch.zeros(fields, rows, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._dev = torch.zeros(fields, rows, dtype=torch.int64, device=device)

    def allocate(self, dtype: torch.dtype, device: torch.device | str) -> None:
        """Allocate the storage now if it is not yet (a lazily sized cache gets one row). Idempotent.

        Raises:
            ValueError: The storage exists with another dtype or device.
        """
        if self.groups[0].initialized:
            keys = self.groups[0].pinned
            if keys.dtype != dtype or keys.device != torch.device(device):
                raise ValueError(f"This cache lives in {keys.dtype} on {keys.device}, not {dtype} on {device}.")
            return
        if self._n_rows is None:
            self._start_rows(1, live=True)
        self._allocate(self.rows, dtype, torch.device(device))

    @property
    def storage(self) -> tuple[torch.dtype, torch.device] | None:
        """The dtype and device of the allocated storage (None: a lazily sized cache before its first forward)."""
        keys = self.groups[0].pinned  # in the compute dtype whatever the kv dtype
        return None if keys is None else (keys.dtype, keys.device)

    @property
    def rows(self) -> int:
        """Rows held (1 until a lazily allocated cache sees its first batch)."""
        return self._n_rows or 1

    @property
    def live(self) -> list[int]:
        """Assigned rows, in order."""
        return [b for b in range(self.rows) if b not in self.free]

    def assign(self, b: int | None = None, *, start_size: int | None = None, state: CacheState | None = None) -> int:
        """Give row ``b`` (default: the lowest free row) a new stream, fresh or restored from ``state``.

        Args:
            b: The row; must be free.
            start_size: Its pinned prefix (default: the cache's ``start_size``), at most ``pinned_capacity``.
            state: A saved row (:meth:`row_state` of this or another cache of the same model and sizes).

        Returns:
            The row.

        Raises:
            RuntimeError: No free row.
            ValueError: ``b`` taken or out of range; a pinned prefix or state that does not fit.
        """
        self._require_storage()
        if b is None:
            if not self.free:
                raise RuntimeError(f"All {self.rows} rows are taken; release one first.")
            b = min(self.free)
        self._check_row(b)
        if b not in self.free:
            raise ValueError(f"Row {b} already holds a stream; release({b}) it first.")
        if state is not None:
            self._restore(b, *state)
        else:
            self._clear(b, self.window.start_size if start_size is None else start_size)
        self.free.discard(b)
        return b

    def release(self, b: int) -> None:
        """Free row ``b``; its storage is zeroed when it is assigned again.

        Raises:
            ValueError: ``b`` is out of range or already free.
        """
        self._check_row(b)
        if b in self.free:
            raise ValueError(f"Row {b} is not assigned.")
        self.free.add(b)

    def _check_row(self, b: int) -> None:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.rows:
            raise ValueError(f"Row {b!r} does not exist: this cache has rows 0..{self.rows - 1}.")

    def _check_live(self, b: int) -> None:
        self._check_row(b)
        if b in self.free:
            raise ValueError(f"Row {b} is not assigned; call assign({b}) first.")

    def _clear(self, b: int, start_size: int) -> None:
        if (
            isinstance(start_size, bool)
            or not isinstance(start_size, int)
            or not 0 <= start_size <= self.pinned_capacity
        ):
            raise ValueError(
                f"A row's pinned prefix must be 0..{self.pinned_capacity} tokens (pinned_capacity), got {start_size!r}."
            )
        for g in self.groups:
            g.clear_row(b, replace(g.shape, start_size=start_size) if g.pinned_capacity else g.shape)
        self.states.clear_row(b)

    def _require_storage(self) -> None:
        if not self.groups[0].initialized:
            raise RuntimeError("This cache has no storage yet: create it with rows=, dtype= and device=.")

    def row(self, b: int) -> RowStats:
        """Where row ``b`` stands (read-only numbers)."""
        self._check_live(b)
        r = self.main.rows[b]
        return self._stats(r.window.start_size, r.seen, r.segment_len)

    def stats_for(self, state: CacheState) -> RowStats:
        """The :class:`RowStats` a row restored from ``state`` would have (no row needed)."""
        counters = state[1]
        saved = counters["groups"][self.groups.index(self.main)]
        return self._stats(int(counters["start_size"]), int(saved["seen"]), int(saved["segment_len"]))

    def _stats(self, start: int, seen: int, segment: int) -> RowStats:
        capacity = start + self.recent_size
        held = min(seen, capacity)
        return RowStats(seen, held + segment, seen - held, start, segment, capacity + self.segment_capacity,
                        self.row_bytes)  # fmt: skip

    @property
    def row_bytes(self) -> int:
        """Bytes of storage one row holds (constant)."""
        return self.nbytes // self.rows

    # -- sizes and counters (row 0: the single-stream case) ----------------------------------------------
    @property
    def start_size(self) -> int:
        """Row 0's pinned prefix (the cache's default for new rows before any row exists)."""
        return self.main.rows[0].window.start_size if self.main.rows else self.window.start_size

    @property
    def recent_size(self) -> int:
        return self.window.recent_size

    @property
    def seen_tokens(self) -> int:
        """Tokens row 0 has processed since it was assigned."""
        return self.main.rows[0].seen if self.main.rows else 0

    @property
    def cached_tokens(self) -> int:
        """Tokens row 0's next query can attend to (besides itself), the pinned segment included."""
        return self.row(0).cached_tokens if self.main.rows else 0

    @property
    def evicted_tokens(self) -> int:
        return self.row(0).evicted_tokens if self.main.rows else 0

    @property
    def segment_len(self) -> int:
        """Tokens in row 0's pinned segment (memory features), 0 without one."""
        return self.main.rows[0].segment_len if self.main.rows else 0

    @property
    def nbytes(self) -> int:
        """Bytes held by all cache tensors (constant once allocated), recurrent states included."""
        return self.states.nbytes + sum(
            t.nbytes if isinstance(t, QuantTensor) else t.numel() * t.element_size()
            for g in self.groups
            if g.initialized
            for t in (g.keys, g.values, g.pinned)
        )

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        # Steps are planned on the host: generate() must not auto-compile a forward around them. The
        # captured decode step (streaming_llm.core.stepper) is the compiled path.
        return False

    # -- positions -----------------------------------------------------------------------------------------
    def next_position(self, b: int = 0) -> int:
        """The small model position to give row ``b``'s next token (rebased when it would pass 2x the cache)."""
        r = self.main.rows[b] if self.main.rows else Row(self.window)
        return r.window.next_model_position(r.seen, r.shift, r.segment_len)

    def position_ids(self, length: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Position ids ``(1, length)`` for row 0's next ``length`` tokens, kept small for endless streams.

        Pass them to the model (``position_ids=``); the cache recognises them and reads nothing back.
        """
        device = device if device is not None else (self.main.keys.device if self.main.initialized else "cpu")
        m = self.next_position()
        ids = torch.arange(m, m + length, device=device)[None]
        self._position_memo = (ids, m)
        return ids

    def _first_position(self, position_ids: torch.Tensor | None, length: int) -> int:
        """Model position of the step's first token (one host read per forward for foreign ids)."""
        if position_ids is None:  # the model derived them from get_seq_length()
            return self.get_seq_length()
        memo = self._position_memo
        if memo is not None and memo[0] is position_ids:
            return memo[1]
        rows = position_ids.reshape(-1, position_ids.shape[-1])
        m0 = int(rows[0, 0])
        expected = torch.arange(m0, m0 + length, device=rows.device)
        if rows.shape[-1] != length or not bool((rows == expected).all()):
            raise ValueError(
                "StreamingCache needs contiguous position ids, identical for every row of the batch (no padding). "
                "Feed one unpadded sequence per row, or batches of equal-length rows."
            )
        self._position_memo = (position_ids, m0)
        return m0

    def _check_limit(self, m0: int, length: int) -> None:
        limit = self.window.position_limit
        if limit is not None and m0 + length > limit:
            raise ValueError(
                f"This model's RoPE switches to other frequencies past position {limit}, and this chunk reaches "
                f"{m0 + length}. Feed shorter chunks with cache.position_ids(n) (or the engine), which keep "
                "positions small; generate() uses absolute positions."
            )

    # -- planning (host integers only) -------------------------------------------------------------------
    def plan_chunk(self, b: int, length: int) -> int:
        """Plan the next forward: ``length`` tokens of row ``b`` (batch 1). Returns the model position of the first;
        the forward must use positions ``m0 .. m0 + length - 1``. (A lazily sized cache gets its one row here and
        its storage on the forward's first update.)

        Raises:
            ValueError: ``b`` is not assigned, ``length < 1``, or the positions would pass the model's limit.
        """
        if self._n_rows is None:
            self._start_rows(1, live=True)
        self._check_live(b)
        if length < 1:
            raise ValueError("Nothing to feed: a chunk needs at least one token.")
        m0 = self.next_position(b)
        self._check_limit(m0, length)
        self._set_plan(StepPlan(tuple(g.plan_chunk(range(b, b + 1), length, m0) for g in self.groups), (b,)))
        return m0

    def decodable(self, b: int) -> bool:
        """Whether row ``b``'s next token can join a batched decode step (its pinned prefix is complete)."""
        if not self.groups[0].initialized:
            return False
        m = self.next_position(b)
        return all(g.decodable(b, m) for g in self.groups)

    def plan_decode(self, tokens: Mapping[int, int], n: int) -> StepPlan:
        """Plan the next forward: one token ``tokens[b]`` for each given row, in a bucket of rows ``0 .. n-1``.

        Fills the host field buffer (copied to the device by :meth:`stage`), re-frames rows that rebase,
        and advances the decoding rows. Rows of the bucket without a token ride along unchanged.

        Raises:
            ValueError: A row outside the bucket, not assigned, or not :meth:`decodable`.
        """
        for b in tokens:
            if not 0 <= b < n:
                raise ValueError(f"Row {b} is outside this step's rows 0..{n - 1}.")
            self._check_live(b)
            if not self.decodable(b):
                raise ValueError(f"Row {b} cannot take a batched decode step now (its pinned prefix is not complete).")
        host = self._host
        host[:, :n] = 0
        groups: list[list[tuple[int, int, int, int]]] = [[] for _ in self.groups]
        for b in range(n):
            token = tokens.get(b)
            if token is None:
                for fields, g in zip(groups, self.groups, strict=True):
                    fields.append(g.idle_fields(b))
                continue
            m = self.next_position(b)
            host[0, b], host[1, b], host[-1, b] = int(token), m, 1
            for fields, g in zip(groups, self.groups, strict=True):
                fields.append(g.decode_fields(b, m))
        plans = []
        for gi, fields in enumerate(groups):
            at = len(SHARED_FIELDS) + len(GROUP_FIELDS) * gi
            host[at : at + 4, :n] = torch.tensor(fields, dtype=torch.int64).T
            bounds = {(lo, hi) for _, _, lo, hi in fields}
            uniform = bounds.pop() if len(bounds) == 1 and len(tokens) == n else None
            turn_from = min(lo for _, _, lo, _ in fields) // 32 * 32
            plans.append(DecodePlan(n, uniform, turn_from, self._dev[at + 2, :n], self._dev[at + 3, :n]))
        self._set_plan(StepPlan(tuple(plans), tuple(sorted(tokens)), idle=len(tokens) < n))
        return self._plan

    def stage(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the decode fields to the device (no sync); returns the step's input ids and positions ``(n, 1)``
        (device views the captured step reads)."""
        n = plan.groups[0].n
        self._dev[:, :n].copy_(self._host[:, :n], non_blocking=True)
        return self._dev[0, :n, None], self._dev[1, :n, None]

    def _set_plan(self, plan: StepPlan) -> None:
        self._plan, self._plan_used = plan, False

    def prepared(self, plan: StepPlan) -> None:
        """Make ``plan`` the next forward's plan again (a captured step's warm-up consumed it)."""
        self._set_plan(plan)

    def end_step(self) -> None:
        """The planned step ran without calling :meth:`update` (a CUDA graph replayed it): drop its plan."""
        self._plan = None

    def attention_plan(self, layer_idx: int) -> GroupPlan:
        """What layer ``layer_idx``'s attention computes in the current forward (read by the attention function)."""
        return self._plan.groups[self.groups.index(self.layers[layer_idx].group)]

    # -- recurrent states (hybrid models), through transformers' own methods ---------------------------------
    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """The conv window ``(batch, channels, kernel)`` of this forward's rows (None before the layer's first
        write). The model may update it in place (its one-token path does)."""
        return self._state("conv", layer_idx, state_idx, "conv_get")

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """The recurrent state ``(batch, ...)`` of this forward's rows (None before the layer's first write)."""
        return self._state("recurrent", layer_idx, state_idx, "recurrent_get")

    def update_conv_state(
        self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, conv_kernel_size: int | None = None,
        **kwargs,
    ) -> torch.Tensor:  # fmt: skip
        """Append ``conv_states`` ``(batch, channels, L)`` to the rows' windows; return ``[window | new]`` (what
        the model's causal convolution runs over) and keep its last ``kernel`` columns."""
        kernel = conv_kernel_size or conv_states.shape[-1]
        stored = self._state("conv", layer_idx, state_idx, "conv_set", conv_states, kernel)
        full = torch.cat((stored, conv_states.to(stored.dtype)), dim=-1)
        stored.copy_(full[..., -stored.shape[-1] :])
        return full

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs
    ) -> torch.Tensor:  # fmt: skip
        """Store the rows' new recurrent state ``(batch, ...)``; return the stored tensor."""
        stored = self._state("recurrent", layer_idx, state_idx, "recurrent_set", recurrent_states)
        stored.copy_(recurrent_states)
        return stored

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        """Whether the recurrent layer (default: the last one) has written its states yet."""
        layers = self.states.layer_ids
        if not layers:
            raise ValueError("This model has no recurrent layers (has_previous_state is for linear-attention layers).")
        layer = layers[-1] if layer_idx is None else layer_idx
        names = [n for n in self.states.tensors if n.split(".")[1] == str(layer)]
        if state_idx is not None:
            names = [n for n in names if n.endswith(f".{state_idx}")]
        return bool(names)

    def _state(
        self, kind: str, layer_idx: int, state_idx: int, access: str, sample: torch.Tensor | None = None,
        width: int | None = None,
    ) -> torch.Tensor | None:  # fmt: skip
        """The rows' ``kind`` state of ``layer_idx`` for this forward (allocated from ``sample`` if new)."""
        if layer_idx not in self.states.layer_ids:
            raise ValueError(f"Layer {layer_idx} of this model has no recurrent state.")
        self._touch(layer_idx, access)
        name = f"{kind}.{layer_idx}.{state_idx}"
        work = self._state_work.get(name)
        if work is not None:
            return work
        stored = self.states.tensors.get(name)
        if stored is None:
            if sample is None:
                return None
            if self._n_rows is None:  # a lazily sized cache: one row per sequence of the first batch
                self._start_rows(sample.shape[0], live=True)
            stored = self.states.allocate(name, self.rows, sample, width)
        rows = self._state_rows or range(self.rows)
        if sample is not None and sample.shape[0] != len(rows):
            raise ValueError(
                f"This forward feeds rows {rows.start}..{rows.stop - 1} of this StreamingCache, but the model handed "
                f"it a batch of {sample.shape[0]} recurrent states."
            )
        view = stored[rows.start : rows.stop]
        work = self._state_work[name] = view.clone() if self._state_merge else view
        return work

    def _touch(self, layer_idx: int, access: str) -> None:
        """Note a cache access of the forward in progress; a repeated one means a new forward has begun."""
        mark = (layer_idx, access)
        if not self._touched or mark in self._touched or any(layer > layer_idx for layer, _ in self._touched):
            self._begin_states()
        self._touched.add(mark)

    def _begin_states(self) -> None:
        """A new forward: the rows its recurrent layers read and write (a planned step's, or every row)."""
        self.finish_forward()
        self._touched.clear()
        plan = self._plan if self._plan is not None and not self._plan_used else None
        if plan is None:
            self._state_rows, self._state_merge = None, False
        elif plan.decode:
            self._state_rows, self._state_merge = range(plan.groups[0].n), plan.idle
        else:
            self._state_rows, self._state_merge = plan.groups[0].rows, False

    def finish_forward(self) -> None:
        """End of a decode step whose bucket had rows riding along without a token: the model updated the
        recurrent states of every row of the bucket, so only the decoding rows keep the new ones (a masked copy,
        device work only: part of a captured step). Otherwise it only marks the end of the forward; the stepper
        calls it after every forward (plain transformers loops need not: a new forward is recognised anyway)."""
        if self._state_merge and self._state_work:
            rows = self._state_rows
            active = self._dev[-1, rows.start : rows.stop].bool()
            for name, work in self._state_work.items():
                stored = self.states.tensors[name][rows.start : rows.stop]
                keep = active.reshape(-1, *([1] * (work.dim() - 1)))
                stored.copy_(torch.where(keep, work, stored))
        self._state_work = {}
        self._state_merge = False
        self._touched = set()  # the next access begins a new forward (and compiled steps see the same state)

    def snapshot_states(self) -> dict[str, torch.Tensor]:
        """Copies of every recurrent state (the stepper restores them after a capture's warm-up step)."""
        return {name: t.clone() for name, t in self.states.tensors.items()}

    def restore_states(self, snapshot: Mapping[str, torch.Tensor]) -> None:
        """Put back what :meth:`snapshot_states` returned (in place: captured graphs keep their addresses)."""
        for name, t in snapshot.items():
            self.states.tensors[name].copy_(t)

    # -- transformers' Cache contract -------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store a layer's new keys/values ``(batch, kv_heads, length, head_dim)`` and return what its
        attention reads. Without a prepared plan, the first layer plans a chunk for every row."""
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"This StreamingCache was built for a model with {len(self.layers)} layers, but layer {layer_idx} "
                "used it. Build the cache from the model that uses it."
            )
        if self.spec.latent:  # (latent, RoPE key): the RoPE key is stored where keys go, and rotated
            key_states, value_states = value_states, key_states
        implementation = getattr(self.config, "_attn_implementation", None)
        if implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"A StreamingCache needs the streaming attention, but this model runs '{implementation}'. Call "
                "`streaming_llm.enable_streaming_llm(model)` (or `streaming_llm.install(model)`) first."
            )
        layer = self.layers[layer_idx]
        if not layer.group.initialized:
            if self._n_rows is None:  # a lazily sized cache: one row per sequence of the first batch
                self._start_rows(key_states.shape[0], live=True)
            self._allocate(self.rows, key_states.dtype, key_states.device, key_states.shape[1])
        self._check_shapes(key_states, value_states)
        if self.states.layer_ids:
            self._touch(layer_idx, "attention")
        if layer_idx == self._first_attention:  # a new forward: its prepared plan, or a chunk planned now
            if self._plan is None or self._plan_used:
                step_kwargs = kwargs.get("kwargs") or {}
                self._plan_forward(step_kwargs.get("position_ids"), key_states.shape[0], key_states.shape[-2])
            self._plan_used = True
        plan = self._plan.groups[self.groups.index(layer.group)]
        if isinstance(plan, DecodePlan):
            at = len(SHARED_FIELDS) + len(GROUP_FIELDS) * self.groups.index(layer.group)
            if layer.index == 0:
                layer.group.turn_decode(plan, self._dev[at + 1, : plan.n])
            out = layer.group.write_decode(plan, layer.index, self._dev[at, : plan.n], key_states, value_states)
        else:
            out = layer.group.write_chunk(plan, layer.index, key_states, value_states)
        return (out[1], out[0]) if self.spec.latent else out

    def _plan_forward(self, position_ids: torch.Tensor | None, batch: int, length: int) -> None:
        """A forward nobody planned (a transformers loop): a chunk for every row, all in the same state."""
        if batch != self.rows or self.free:
            raise ValueError(
                f"This StreamingCache holds {self.rows} rows ({len(self.free)} free) but the forward feeds a batch of "
                f"{batch}. A plain forward feeds every row; to feed some rows, let the engine plan it "
                "(plan_chunk / plan_decode)."
            )
        if any(not r.same_stream(g.rows[0]) for g in self.groups for r in g.rows):
            raise ValueError("The rows of this cache are in different states; a plain forward cannot feed them all.")
        m0 = self._first_position(position_ids, length)
        self._check_limit(m0, length)
        self._set_plan(
            StepPlan(tuple(g.plan_chunk(range(0, batch), length, m0) for g in self.groups), tuple(range(batch)))
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed (``"absolute"``), or the position for the next token (``"compact"``), of row 0."""
        if self.positions == "compact":
            return self.next_position()
        return self.seen_tokens

    def get_query_offset(self, layer_idx: int = 0) -> StreamingStep:
        # Not an offset: a marker that makes the "streaming_llm" mask function build a StreamingMask,
        # through which the attention function reads this forward's plan (works for every architecture).
        return StreamingStep(self)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """``(query_length, tokens seen)``: the new keys at their stream indices (the mask function reads
        padding from those columns of a 2D attention mask).

        Raises:
            ValueError: Nothing to process, as when ``generate()`` is given fewer tokens than the cache has
                seen (it must get the whole conversation, history plus new tokens).
        """
        if query_length == 0:
            raise ValueError(
                f"This call gives the model no new token: the cache has already seen {self.seen_tokens} tokens and "
                "the input is not longer than that. With generate(), pass the whole conversation so far (the history "
                "the cache saw, then the new tokens), as with any transformers cache; only the new tokens are fed. "
                "To run a forward on new tokens alone, call the model directly."
            )
        return query_length, self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.window.capacity

    def reset(self) -> None:
        """Start every row afresh (row 0 assigned with the default pinned prefix)."""
        self._plan = self._position_memo = None
        self._touched, self._state_work, self._state_merge = set(), {}, False
        if self._n_rows is not None:
            self._start_rows(self._n_rows, live=self._n_rows == 1 or not self.free)

    def _check_shapes(self, k: torch.Tensor, v: torch.Tensor) -> None:
        g = self.groups[0]
        expected = (g.keys.shape[2], g.keys.shape[4])
        got = (k.shape[1], k.shape[3])
        if got != expected or k.dtype != g.compute or v.shape[-1] != g.values.shape[-1] or k.shape[0] > self.rows:
            raise ValueError(
                f"This StreamingCache holds {self.rows} rows of (kv_heads, head_dim) = {expected} in {g.compute}, "
                f"but the model handed it a batch of {k.shape[0]} with {got} in {k.dtype}. A cache belongs to one "
                "model; create a new cache for this input."
            )

    def fast_forward(self, tokens: int, b: int = 0) -> int:
        """Advance a full row's counters by about ``tokens`` (a multiple of the ring size), as if that many more
        tokens had streamed past and been evicted. Every kept token keeps its slot and model position, so the
        row is in exactly the state such a stream leaves (with these kept tokens). For benchmarks and tests at
        millions of tokens. Returns the tokens skipped.

        Raises:
            ValueError: Layer groups with different ring sizes, or a row whose ring is not full yet.
        """
        ring = self.main.ring_size
        jump = (tokens // ring) * ring
        for g in self.groups:
            r = g.rows[b]
            if jump % g.ring_size or r.seen < r.window.capacity:
                raise ValueError("fast_forward needs a full row and layer groups that share the ring size.")
            r.seen, r.shift = r.seen + jump, (r.shift or 0) + jump
        return jump

    # -- pinned segment (memory features) ------------------------------------------------------------
    def set_segment(self, keys: list[torch.Tensor], values: list[torch.Tensor], b: int | None = None) -> None:
        """Replace the pinned segment of row ``b`` (or of every row: an aligned batch), placed after the pinned prefix.

        Args:
            keys: Per model layer, ``(rows_given, kv_heads, n, head_dim)`` keys rotated at the canonical positions
                ``start_size .. start_size + n - 1`` (what a forward at those positions gives); one row for ``b``,
                or one per row of the cache when ``b`` is None.
            values: Per layer, the matching values.
            b: The row; None: row 0 of a one-row cache, or every row (batch ``i`` of ``keys`` for row ``i``).

        Raises:
            ValueError: More than ``segment_capacity`` tokens, the pinned prefix is not all in yet, or a batch
                that fits neither one row nor every row.
        """
        given = keys[0].shape[0]
        if b is None and given == self.rows and given > 1:
            for row in range(given):
                self.set_segment([k[row : row + 1] for k in keys], [v[row : row + 1] for v in values], row)
            return
        b = 0 if b is None else b
        if given != 1:
            raise ValueError(f"A segment for one row has batch 1, got {given} (this cache has {self.rows} rows).")
        self._check_live(b)
        if self.spec.recurrent_layers:
            raise NotImplementedError(HYBRID_SEGMENTS)
        n = keys[0].shape[-2]
        if n > self.segment_capacity:
            raise ValueError(f"The segment holds at most {self.segment_capacity} tokens, got {n}.")
        if self.main.rows[b].seen < self.main.rows[b].window.start_size:
            raise ValueError("A pinned segment can only be set once the whole pinned prefix is in the cache.")
        if self.spec.latent:  # the model's (latent, RoPE key), stored the other way round (see update)
            keys, values = values, keys
        for g in self.groups:
            if g.segment_capacity:  # sliding layers keep their own window only
                g.set_segment(b, keys, values)

    # -- state, for saving and restoring ------------------------------------------------------------------
    def row_state(self, b: int = 0) -> CacheState:
        """A snapshot of row ``b``: the tensors and counters needed to rebuild it exactly, sized by content.

        The tensors are copies (later steps cannot change them), on the cache's device; only filled
        slots are returned (the segment in use, the pinned prefix and the ring written so far).

        Raises:
            ValueError: The row is not assigned, or the cache is empty.
        """
        self._check_live(b)
        if not self.groups[0].initialized:
            raise ValueError("The cache is empty: nothing to save yet.")
        tensors: dict[str, torch.Tensor] = {}
        start = self.main.rows[b].window.start_size
        counters: dict = {
            "start_size": start, "recent_size": self.recent_size, "segment_capacity": self.segment_capacity,
            "positions": self.positions, "groups": [], "kv_dtype": self.kv_dtype,
        }  # fmt: skip
        for gi, g in enumerate(self.groups):
            tensors.update({f"groups.{gi}.{name}": t for name, t in g.row_tensors(b).items()})
            r = g.rows[b]
            counters["groups"].append({"seen": r.seen, "shift": r.shift, "segment_len": r.segment_len})
        tensors.update(self.states.row_tensors(b))
        return tensors, counters

    def state(self) -> CacheState:
        """A snapshot of the single stream (:meth:`row_state` of row 0), or of an aligned batch: every row live
        and in the same state, their tensors stacked along the batch dimension (``(layers, rows, ...)``).

        Raises:
            ValueError: Rows in different states (take :meth:`row_state` of each).
        """
        if self.rows == 1:
            return self.row_state(0)
        if self.free or any(not r.same_stream(g.rows[0]) for g in self.groups for r in g.rows):
            raise ValueError("The rows of this cache are in different states: take row_state(b) of each row.")
        states = [self.row_state(b) for b in range(self.rows)]
        tensors = {k: torch.cat([s[0][k] for s in states], dim=1) for k in states[0][0]}
        return tensors, states[0][1]

    def _restore(self, b: int, tensors: dict[str, torch.Tensor], counters: dict) -> None:
        """Rebuild row ``b`` from a saved state (any device; copied).

        Raises:
            ValueError: Counters or tensors that do not fit this model or these sizes.
        """
        if counters["recent_size"] != self.recent_size:
            raise ValueError(
                f"This state keeps {counters['recent_size']} recent tokens; this cache {self.recent_size}."
            )
        if counters.get("kv_dtype") != self.kv_dtype:
            raise ValueError(
                f"This state stores keys/values as kv_dtype={counters.get('kv_dtype')!r}, but this cache uses "
                f"kv_dtype={self.kv_dtype!r}: load it into a cache of the same kv dtype."
            )
        if len(counters["groups"]) != len(self.groups):
            raise ValueError(f"{len(counters['groups'])} layer groups saved, but this model has {len(self.groups)}.")
        self._clear(b, int(counters["start_size"]))
        for gi, (g, saved) in enumerate(zip(self.groups, counters["groups"], strict=True)):
            scales = ("keys_scale", "values_scale") if is_quantized(self.kv_dtype) else ()
            names = ("keys", "values", "pinned", *scales)
            found = {name: tensors[f"groups.{gi}.{name}"].to(g.pinned.device) for name in names}
            found["pinned"] = found["pinned"].to(g.pinned.dtype)
            for name, buffer in (("keys", g.keys), ("values", g.values)):
                if isinstance(buffer, QuantTensor):  # raw data of the same kv dtype, as saved
                    found[name] = found[name].view(buffer.data.dtype)
                else:
                    found[name] = found[name].to(buffer.dtype)
            g.restore_row(b, found, saved, g.rows[b].window)
        if self.states.layer_ids:
            self.states.restore_row(b, tensors, self.rows, self.groups[0].keys.device)
        if counters.get("positions") not in (None, self.positions):
            raise ValueError(f"This state uses {counters['positions']!r} positions; this cache {self.positions!r}.")

    @classmethod
    def from_state(cls, config: PretrainedConfig, tensors: dict[str, torch.Tensor], counters: dict) -> StreamingCache:
        """A cache rebuilt from :meth:`row_state` (one row) or :meth:`state` (an aligned batch: one row per batch
        entry); tensors on any device are copied, and the cache lives on their device.

        Raises:
            ValueError: Counters or tensors that do not fit this model or these sizes.
        """
        sample = tensors["groups.0.pinned"]  # in the compute dtype whatever the kv dtype
        rows = sample.shape[1]  # one row, or an aligned batch (see state())
        cache = cls(
            config, int(counters["start_size"]), int(counters["recent_size"]), int(counters["segment_capacity"]),
            positions=counters.get("positions"), rows=rows, dtype=sample.dtype, device=sample.device,
            kv_dtype=counters.get("kv_dtype"),
        )  # fmt: skip
        for b in range(rows):  # group tensors are (layers, rows, ...), recurrent states (rows, ...)
            row = {k: v[b : b + 1] if k.startswith("states.") else v[:, b : b + 1] for k, v in tensors.items()}
            cache._restore(b, row, counters)
        cache.free.clear()
        return cache

    # -- conversions ---------------------------------------------------------------------------------
    @classmethod
    def from_dynamic(
        cls, config: PretrainedConfig, cache: DynamicCache, start_size: int = 4, recent_size: int = 2000,
        positions: PositionMode | None = None,
    ) -> StreamingCache:  # fmt: skip
        """Take over a ``DynamicCache`` filled by a plain forward at positions ``0..T-1`` (any batch: one row per
        sequence), keeping its first ``start_size`` and last ``recent_size`` tokens.

        Raises:
            ValueError: The cache comes from another model, or has already dropped tokens.
        """
        first = next(
            (layer.keys for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()),
            None,
        )
        batch = first.shape[0] if first is not None else 1
        dtype, device = (first.dtype, first.device) if first is not None else (torch.float32, "cpu")
        streaming = cls(config, start_size, recent_size, positions=positions, rows=batch, dtype=dtype, device=device)
        if len(cache.layers) != len(streaming.layers):
            raise ValueError(
                f"The DynamicCache has {len(cache.layers)} layers but this model has {len(streaming.layers)}; "
                "it comes from another model."
            )
        total = max(
            getattr(source, "cumulative_length", 0) or source.get_seq_length()
            for source in cache.layers
            if isinstance(source, CacheLayerMixin)
        )
        for i, (source, layer) in enumerate(zip(cache.layers, streaming.layers, strict=True)):
            if isinstance(source, LinearAttentionCacheLayerMixin):  # recurrent states: taken over as they are
                streaming._take_states(i, source)
            if not isinstance(layer, StreamingLayer) or source.keys is None or source.keys.numel() == 0:
                continue
            keys, values = (source.values, source.keys) if streaming.spec.latent else (source.keys, source.values)
            streaming._check_shapes(keys, values)
            streaming._take_layer(layer, keys, values, total)
        for g in streaming.groups:
            for r in g.rows:
                r.seen, r.shift, r.rotation = total, 0, 0
        return streaming

    def _take_states(self, layer_idx: int, source: LinearAttentionCacheLayerMixin) -> None:
        for kind, states in (("conv", source.conv_states), ("recurrent", source.recurrent_states)):
            for state_idx, t in states.items():
                if t is not None:
                    self.states.allocate(f"{kind}.{layer_idx}.{state_idx}", self.rows, t).copy_(t)

    def _take_layer(self, layer: StreamingLayer, keys: torch.Tensor, values: torch.Tensor, total: int) -> None:
        g, j = layer.group, layer.index
        held = keys.shape[-2]  # a sliding layer of transformers holds only its last tokens
        start, recent = g.rows[0].window.start_size, g.shape.recent_size
        n_sinks = min(total, start)
        if n_sinks and held != total:
            raise ValueError("This DynamicCache has already dropped tokens; it cannot be taken over.")
        base = g.sink_base(0)
        for buffer, source in ((g.keys, keys), (g.values, values), (g.pinned, keys)):
            buffer[j][:, :, base : base + n_sinks] = source[:, :, :n_sinks]
        first = max(start, total - recent, total - held)
        if first < total:
            slots = g.ring_slot(torch.arange(first, total, device=keys.device), start)
            g.keys[j].index_copy_(2, slots, g.stored(keys[:, :, first - total + held :]))
            g.values[j].index_copy_(2, slots, g.stored(values[:, :, first - total + held :]))


@dataclass(frozen=True)
class StreamingStep:
    """Handed to transformers as the query offset of a :class:`StreamingCache` (see ``get_query_offset``)."""

    cache: StreamingCache


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise a clear ``ValueError`` unless ``value`` is an int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}.")


def check_sizes(start_size: int, recent_size: int) -> None:
    """Validate cache sizes: errors for impossible ones, warnings for ones that hurt quality.

    Raises:
        TypeError: A size that is not an int.
        ValueError: ``start_size < 0`` or ``recent_size < 1``.
    """
    for name, value in (("start_size", start_size), ("recent_size", recent_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if start_size < 0:
        raise ValueError(f"start_size must be >= 0 (number of attention-sink tokens), got {start_size}.")
    if recent_size < 1:
        raise ValueError(f"recent_size must be >= 1 (number of recent tokens kept), got {recent_size}.")
    if start_size == 0:
        warnings.warn(
            "start_size=0 keeps no attention sinks: a plain window, whose quality collapses once tokens are "
            "evicted. Use start_size=4 unless you are measuring that collapse.",
            stacklevel=3,
        )
    if recent_size < 256:
        warnings.warn(
            f"recent_size={recent_size} is very small; the model will only see the last {recent_size} tokens. "
            "Use at least 256 (default 2000) unless you are testing.",
            stacklevel=3,
        )
