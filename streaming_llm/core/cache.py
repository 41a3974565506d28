"""The StreamingLLM KV cache: attention sinks plus a rolling window in a preallocated ring.

The cache owns the streaming step. Every ``update`` call receives the keys and values the model
just computed (already rotated at the model's positions) and the model's position ids, and returns
keys and values that attention can use as they are: stored keys brought into the model's frame,
sinks turned to sit right before the window, the new tokens written into their slots. The
attention function (:mod:`streaming_llm.core.attention`) only picks a kernel from the step's
:class:`Plan`. Position arithmetic lives in :mod:`streaming_llm.core.positions`.

Layers that share a window and a RoPE (all full-attention layers of a model, say) form one
:class:`StreamGroup`: one stream state (tokens seen, frame), one storage tensor for all of them and
one per-step plan, so per-step work that is the same for every layer (turning the sinks) runs once
for the whole group.

Layout of one layer's buffer, shape ``(batch, kv_heads, slots, head_dim)``::

    [ segment (capacity Z) | sinks (S) | ring (W + 1) ]

* sinks: the first ``start_size`` stream tokens, never evicted;
* ring: the recent tokens; stream token ``u >= S`` lives in slot ``Z + S + (u - S) mod (W + 1)``.
  One slot more than ``recent_size`` so a new token is written in place while the query still
  sees the ``recent_size`` tokens before it;
* segment: an optional injected pinned segment (hybrid or retrieval memory), right-aligned before
  the sinks so that ``[segment | sinks | ring]`` is one contiguous view.

The pinned keys (segment and sinks) are also kept *canonically*, rotated at their in-cache
positions, in a second buffer with the same slot layout; each step writes them into the main
buffer turned by ``e = m - K(t)`` (see positions).

A decode step once the ring is full is *steady*: it writes one slot chosen by a device tensor,
turns the pinned keys by a device tensor, and attends to the whole buffer with no mask. It reads
no host value, so it can be captured in a CUDA graph and replayed (:mod:`streaming_llm.core.decode`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from .architectures import ModelSpec, describe
from .positions import Rope, Window

ATTN_IMPLEMENTATION = "streaming_llm"
PositionMode = Literal["absolute", "compact"]


@dataclass
class Plan:
    """What one step of a stream group does; read by every layer of the group and by attention.

    Attributes:
        t0: Stream index of the step's first token.
        m0: Model position of the step's first token.
        length: Tokens in the step.
        mode: ``"steady"``: one token, ring full, the buffer is attended to whole with no mask;
            ``"inplace"``: keys are a view of the buffer in stream order (plain bottom-right causal
            attention is exact); ``"banded"``: the chunk crosses the eviction point, keys are a
            temporary ``[pinned | recent]`` working set and every query needs its own window.
        n_new_sinks: Tokens of this step that are sinks.
        first_slot: ``inplace``/``steady``: first buffer slot of the returned view.
        last_slot: ``inplace``/``steady``: one past the last buffer slot of the returned view.
        n_pinned: ``banded``: pinned keys at the start of the working set.
        rest_start: ``banded``: stream index of the first recent key of the working set.
        offsets: ``banded``: per-query rotation ``e`` of the pinned keys, int64 ``(length,)``.
    """

    t0: int
    m0: int
    length: int
    mode: Literal["steady", "inplace", "banded"]
    n_new_sinks: int = 0
    first_slot: int = 0
    last_slot: int = 0
    n_pinned: int = 0
    rest_start: int = 0
    offsets: torch.Tensor | None = None


class StreamGroup:
    """Stream state and storage shared by layers with the same window and RoPE.

    Storage, allocated on the first update: ``keys``/``values`` ``(layers, batch, kv_heads, slots,
    dim)`` and ``pinned`` (canonical pinned keys, same slot layout, only the first ``Z + S`` slots).
    """

    def __init__(self, window: Window, rope: Rope, layer_ids: list[int], segment_capacity: int):
        self.window, self.rope, self.layer_ids = window, rope, layer_ids
        self.segment_capacity = segment_capacity
        self.seen = 0  # stream tokens processed
        self.shift: int | None = None  # a ring key of stream u is rotated at model position u - shift
        self.segment_len = 0
        self.pinned_rotation: int | None = None  # rotation currently applied to the pinned slots of `keys`
        self.plan: Plan | None = None
        self.prepared = False  # the current plan was made by prepare_decode(), not yet used
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.pinned: torch.Tensor | None = None
        # Device scalars of the steady decode step (what a captured graph reads).
        self.slot_index: torch.Tensor | None = None  # (1,) int64: ring slot of the new token
        self.rotation: torch.Tensor | None = None  # (1,) int64: e of the query
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- layout -------------------------------------------------------------------------------------
    @property
    def sink_base(self) -> int:
        return self.segment_capacity

    @property
    def ring_base(self) -> int:
        return self.segment_capacity + self.window.start_size

    @property
    def ring_size(self) -> int:
        return self.window.recent_size + 1

    @property
    def slots(self) -> int:
        return self.ring_base + self.ring_size

    def ring_slot(self, u: int | torch.Tensor) -> int | torch.Tensor:
        """Buffer slot of stream token ``u >= start_size``."""
        return self.ring_base + (u - self.window.start_size) % self.ring_size

    @property
    def num_sinks(self) -> int:
        return min(self.seen, self.window.start_size)

    @property
    def initialized(self) -> bool:
        return self.keys is not None

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        n = len(self.layer_ids)
        kw = {"dtype": key_states.dtype, "device": key_states.device}
        self.keys = torch.zeros(n, batch, heads, self.slots, dim, **kw)
        self.values = torch.zeros(n, batch, heads, self.slots, value_states.shape[-1], **kw)
        self.pinned = torch.zeros(n, batch, heads, self.ring_base, dim, **kw)
        self.slot_index = torch.zeros(1, dtype=torch.int64, device=key_states.device)
        self.rotation = torch.zeros(1, dtype=torch.int64, device=key_states.device)
        work = torch.promote_types(key_states.dtype, torch.float32)
        cos, sin = self.rope.cos_sin(torch.arange(self.table_rows), key_states.device)
        self._table = (cos.to(work), sin.to(work))

    def reset(self) -> None:
        self.seen, self.shift, self.segment_len, self.pinned_rotation, self.plan = 0, None, 0, None, None
        self.prepared = False
        if self.initialized:
            for t in (self.keys, self.values, self.pinned):
                t.zero_()

    # -- the step, planned once per forward for the whole group ------------------------------------------
    def plan_step(self, length: int, m0: int) -> Plan:
        """Plan a step of ``length`` tokens whose first model position is ``m0``, and advance the stream.

        Host work only (plus the rare eager work a step may need: re-framing the ring after a frame
        change, turning the sinks for a non-steady step). For a steady step it writes the device
        scalars :attr:`slot_index` and :attr:`rotation` that the step's device work reads.
        """
        w, t0 = self.window, self.seen
        shift_in = t0 - m0
        if self.shift is None:
            self.shift = shift_in
        if shift_in != self.shift:  # a new frame (rebase, or positions chosen by the caller): re-frame once
            ring = self.keys[..., self.ring_base :, :]
            ring.copy_(self.rope.rotate(ring, self.shift - shift_in))
            self.shift = shift_in
        end = t0 + length
        n_new_sinks = max(0, min(w.start_size, end) - t0)
        if length == 1 or end - 1 <= w.capacity:
            if end <= w.start_size:
                last = self.sink_base + end
            else:
                last = self.ring_base + min(end - w.start_size, self.ring_size)
            first = self.sink_base - self.segment_len
            e = m0 - w.in_cache_position(t0, self.segment_len)
            steady = length == 1 and end - w.start_size >= self.ring_size and n_new_sinks == 0 and self.table_covers(e)
            plan = Plan(t0, m0, length, "steady" if steady else "inplace", n_new_sinks, first, last)
            if steady:
                self.slot_index.fill_(self.ring_slot(t0))
                self.rotation.fill_(e)
                self.pinned_rotation = None
            else:
                self._turn_pinned(e)
        else:
            offsets = w.pin_offsets(t0, m0, length, self.segment_len)
            plan = Plan(
                t0, m0, length, "banded", n_new_sinks,
                n_pinned=min(end, w.start_size) + self.segment_len, rest_start=max(w.start_size, t0 - w.recent_size),
                offsets=offsets,
            )  # fmt: skip
        self.seen = end
        self.plan = plan
        return plan

    def turn_steady(self) -> None:
        """Device work of a steady step shared by all layers: turn the pinned keys by :attr:`rotation`."""
        first = self.sink_base - self.segment_len
        last = self.sink_base + self.window.start_size
        if last > first:
            self.keys[..., first:last, :] = self.turn_by_table(self.pinned[..., first:last, :])

    def _turn_pinned(self, e: int) -> None:
        """Write the canonical pinned keys into the buffer turned by ``e`` (all layers at once)."""
        if self.pinned_rotation == e:
            return
        first = self.sink_base - self.segment_len
        last = self.sink_base + self.num_sinks
        if last > first:
            self.keys[..., first:last, :] = self.rope.rotate(self.pinned[..., first:last, :], e)
        self.pinned_rotation = e

    def table_covers(self, e: int) -> bool:
        return 0 <= e < self.table_rows

    @property
    def table_rows(self) -> int:
        return 2 * (self.window.capacity + self.segment_capacity) + 2 * self.ring_size + 64

    def turn_by_table(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rotated by the device scalar :attr:`rotation` (cos/sin gathered from a table, no host value)."""
        cos = self._table[0].index_select(0, self.rotation)
        sin = self._table[1].index_select(0, self.rotation)
        return self.rope.apply(x, cos, sin)

    # -- one layer's part of the step ----------------------------------------------------------------
    def write(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer ``i``'s new keys/values for the current plan; return what attention reads."""
        plan = self.plan
        keys, values, pinned = self.keys[i], self.values[i], self.pinned[i]
        if plan.mode == "steady":
            keys.index_copy_(2, self.slot_index, k)
            values.index_copy_(2, self.slot_index, v)
            return keys[:, :, plan.first_slot : plan.last_slot], values[:, :, plan.first_slot : plan.last_slot]
        n = plan.n_new_sinks
        if n:  # canonical copies of new sinks (rotated at their stream index)
            pinned[:, :, self.sink_base + plan.t0 : self.sink_base + plan.t0 + n] = self.rope.rotate(
                k[:, :, :n], plan.t0 - plan.m0
            )
        if plan.mode == "inplace":
            if n:  # in the buffer they sit at the step's own frame: exactly the keys the model handed over
                keys[:, :, self.sink_base + plan.t0 : self.sink_base + plan.t0 + n] = k[:, :, :n]
                values[:, :, self.sink_base + plan.t0 : self.sink_base + plan.t0 + n] = v[:, :, :n]
            if n < plan.length:
                start = self.ring_slot(plan.t0 + n)
                keys[:, :, start : start + plan.length - n] = k[:, :, n:]
                values[:, :, start : start + plan.length - n] = v[:, :, n:]
            return keys[:, :, plan.first_slot : plan.last_slot], values[:, :, plan.first_slot : plan.last_slot]
        return self._banded(i, k, v)

    def _banded(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``[pinned (canonical) | past recent | new recent]`` as a temporary working set,
        then keep only what survives the chunk."""
        plan, s = self.plan, self.window.start_size
        keys, values, pinned = self.keys[i], self.values[i], self.pinned[i]
        n_old = min(plan.t0, s)
        n = plan.n_new_sinks
        seg = slice(self.sink_base - self.segment_len, self.sink_base)
        sinks = slice(self.sink_base, self.sink_base + n_old + n)
        pieces_k = [pinned[:, :, sinks], pinned[:, :, seg]]
        pieces_v = [values[:, :, self.sink_base : self.sink_base + n_old], v[:, :, :n], values[:, :, seg]]
        if plan.t0 > plan.rest_start:
            slots = self.ring_slot(torch.arange(plan.rest_start, plan.t0, device=keys.device))
            pieces_k.append(keys.index_select(2, slots))
            pieces_v.append(values.index_select(2, slots))
        pieces_k.append(k[:, :, n:])
        pieces_v.append(v[:, :, n:])
        work_k, work_v = torch.cat(pieces_k, dim=2), torch.cat(pieces_v, dim=2)
        # Keep what survives: the new sinks, and the last ring_size recent tokens of the chunk.
        if n:
            keys[:, :, self.sink_base + plan.t0 : self.sink_base + plan.t0 + n] = k[:, :, :n]
            values[:, :, self.sink_base + plan.t0 : self.sink_base + plan.t0 + n] = v[:, :, :n]
        keep = min(plan.length - n, self.ring_size)
        end = plan.t0 + plan.length
        slots = self.ring_slot(torch.arange(end - keep, end, device=keys.device))
        keys.index_copy_(2, slots, k[:, :, plan.length - keep :])
        values.index_copy_(2, slots, v[:, :, plan.length - keep :])
        return work_k, work_v

    def finish(self) -> None:
        """After the group's last layer: end the step."""
        self.prepared = False
        if self.plan is not None and self.plan.mode == "banded":
            self.pinned_rotation = None  # the buffer's sink slots hold keys at the chunk's frame


class StreamingLayer(CacheLayerMixin):
    """One decoder layer of a :class:`StreamingCache`: a view of its group's storage.

    Exposes transformers' layer interface (``keys``, ``values``, ``get_seq_length``, ...); the
    streaming step itself is the group's.
    """

    is_sliding = False
    is_compileable = True
    is_croppable = False

    def __init__(self, group: StreamGroup, index: int):
        super().__init__()
        self.group, self.index = group, index

    @property
    def window(self) -> Window:
        return self.group.window

    @property
    def rope(self) -> Rope:
        return self.group.rope

    @property
    def seen(self) -> int:
        return self.group.seen

    @seen.setter
    def seen(self, value: int) -> None:
        self.group.seen = value

    @property
    def shift(self) -> int | None:
        return self.group.shift

    @shift.setter
    def shift(self, value: int | None) -> None:
        self.group.shift = value

    @property
    def segment_len(self) -> int:
        return self.group.segment_len

    @property
    def ring_size(self) -> int:
        return self.group.ring_size

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
    def pinned_keys(self) -> torch.Tensor | None:
        """Canonical pinned keys ``(batch, kv_heads, Z + S, head_dim)``: segment slots, then sinks."""
        return None if self.group.pinned is None else self.group.pinned[self.index]

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        return self.group.initialized

    @is_initialized.setter
    def is_initialized(self, value) -> None:
        pass

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not self.group.initialized:
            self.group.allocate(key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("StreamingLayer.update is driven by StreamingCache.update.")

    def get_seq_length(self) -> int:
        return self.group.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.group.seen

    def get_max_length(self) -> int:
        return self.group.window.capacity

    def reset(self) -> None:
        self.group.reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "A StreamingCache cannot be cropped: evicted tokens are gone, so it cannot roll back (assisted decoding "
            "and contrastive search need a cache that can). Use greedy or sampling generation."
        )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError(
            "Selecting batch rows of a StreamingCache is not supported; use one cache per stream."
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("Beam search / num_return_sequences > 1 need one StreamingCache per sequence.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(
            "Beam search is not supported with a StreamingCache: it needs one StreamingCache per sequence."
        )

    @property
    def nbytes(self) -> int:
        g = self.group
        if not g.initialized:
            return 0
        return sum(t[self.index].numel() * t.element_size() for t in (g.keys, g.values, g.pinned))


class StreamingCache(Cache):
    """A transformers ``Cache`` that keeps attention sinks plus a rolling window, exactly.

    After a token is processed the cache holds the first ``start_size`` tokens and the latest
    ``recent_size`` tokens (that token included); the next token attends to those and itself, at
    positions inside the cache. Memory is fixed: ``start_size + recent_size + 1`` slots per layer
    (plus ``start_size`` canonical sink keys).

    The model must run the streaming attention (``enable_streaming_llm(model)`` or
    :func:`streaming_llm.core.attention.install` sets it up); with it, a model still behaves exactly like
    ``sdpa`` with any other cache.

    **What the cache tells transformers.** ``get_seq_length()`` is the number of tokens processed,
    so ``generate()`` continues a conversation by feeding exactly the new tokens. Positions: the
    model may use any contiguous positions (the cache brings stored keys into their frame). Loops
    that let the model derive positions from the cache rotate at absolute positions, exact while
    float32 RoPE is (tens of thousands of tokens). For endless streams, either pass
    ``position_ids=cache.position_ids(n)`` (what :func:`~streaming_llm.runtime.generation.stream_generate`
    and sessions do) or create the cache with ``positions="compact"`` (what the seed API does): then
    ``get_seq_length()`` is the position for the next token, kept below ``2 * (start + recent)``.

    Args:
        config: The model's config (or the model).
        start_size: Number of first tokens kept forever (attention sinks). Default 4.
        recent_size: Number of most recent tokens kept. Default 2000.
        segment_capacity: Slots for an injected pinned segment after the sinks (memory features).
        positions: ``"absolute"`` or ``"compact"``, see above. Default ``"absolute"``, except for
            models whose RoPE changes past a position (Phi-3 longrope), which need ``"compact"``.

    Raises:
        NotImplementedError: Unsupported architecture (the message lists the supported ones).
        ValueError / TypeError: Impossible sizes.

    Example:
        >>> cache = StreamingCache(model.config, start_size=4, recent_size=2000)
        >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=10_000)
    """

    def __init__(
        self, config: PretrainedConfig, start_size: int = 4, recent_size: int = 2000, segment_capacity: int = 0,
        positions: PositionMode | None = None,
    ):  # fmt: skip
        check_sizes(start_size, recent_size)
        if not isinstance(segment_capacity, int) or segment_capacity < 0:
            raise ValueError(f"segment_capacity must be an int >= 0, got {segment_capacity!r}")
        if positions not in (None, "absolute", "compact"):
            raise ValueError(f"positions must be 'absolute' or 'compact', got {positions!r}")
        self.config = getattr(config, "config", config)
        self.spec: ModelSpec = describe(self.config)
        limit = self.spec.position_limit
        if positions is None:  # a RoPE that changes past a position cannot run at absolute positions
            positions = "absolute" if limit is None else "compact"
        self.window = Window(start_size, recent_size, limit)
        if limit is not None and self.window.capacity + segment_capacity >= limit:
            raise ValueError(
                f"This model's RoPE changes frequencies past position {limit}, so the cache must stay well below it: "
                f"start_size + recent_size = {self.window.capacity} is too large; use at most {limit // 2}."
            )
        self.segment_capacity = segment_capacity
        self.positions: PositionMode = positions
        groups: dict[tuple, StreamGroup] = {}
        members: list[tuple[StreamGroup, int]] = []
        for i, spec in enumerate(self.spec.layers):
            full = spec.sliding_window is None  # full attention: sinks + window; else the model's own window
            key = (spec.sliding_window, spec.rope.rotary_dim, tuple(spec.rope.inv_freq.tolist()))
            if key not in groups:
                window = self.window if full else Window(0, spec.sliding_window - 1, limit)
                groups[key] = StreamGroup(window, spec.rope, [], segment_capacity if full else 0)
            group = groups[key]
            members.append((group, len(group.layer_ids)))
            group.layer_ids.append(i)
        super().__init__(layers=[StreamingLayer(g, j) for g, j in members])
        self.groups = list(groups.values())
        # Positions follow the group that holds the most (a full-attention group when there is one).
        self.main = max(self.groups, key=lambda g: (g.window is self.window, g.window.capacity))
        self._position_memo: tuple[torch.Tensor, int] | None = None
        self._issued: torch.Tensor | None = None

    # -- sizes and counters -----------------------------------------------------------------------
    @property
    def start_size(self) -> int:
        return self.window.start_size

    @property
    def recent_size(self) -> int:
        return self.window.recent_size

    @property
    def seen_tokens(self) -> int:
        """Tokens processed since the cache was created or reset."""
        return self.main.seen

    @property
    def cached_tokens(self) -> int:
        """Tokens the next query can attend to (besides itself), the pinned segment included."""
        return min(self.seen_tokens, self.window.capacity) + self.segment_len

    @property
    def evicted_tokens(self) -> int:
        return self.seen_tokens - min(self.seen_tokens, self.window.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes held by all cache tensors (constant once allocated)."""
        return sum(
            t.numel() * t.element_size() for g in self.groups if g.initialized for t in (g.keys, g.values, g.pinned)
        )

    @property
    def segment_len(self) -> int:
        """Tokens in the injected pinned segment (memory features), 0 without one."""
        return self.main.segment_len

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        # The layers' storage is static, but a step is planned on the host: generate() must not
        # auto-compile a forward around it. The captured decode step (streaming_llm.core.decode) is the
        # compiled path.
        return False

    # -- positions ------------------------------------------------------------------------------------
    def next_position(self) -> int:
        """The small model position to give the next token (rebased when it would pass 2x the cache)."""
        g = self.main
        return g.window.next_model_position(g.seen, g.shift, g.segment_len)

    def position_ids(self, length: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Position ids ``(1, length)`` for the next ``length`` tokens, kept small for endless streams.

        Pass them to the model (``position_ids=``); the cache recognises them and reads nothing back
        from the device.
        """
        device = device if device is not None else (self.main.keys.device if self.main.initialized else "cpu")
        m = self.next_position()
        ids = torch.arange(m, m + length, device=device)[None]
        self._issued, self._position_memo = ids, (ids, m)
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
                "Feed one unpadded sequence per cache, or batches of equal-length rows."
            )
        limit = self.window.position_limit
        if limit is not None and m0 + length > limit:
            raise ValueError(
                f"This model's RoPE switches to other frequencies past position {limit}, and this chunk reaches "
                f"{m0 + length}. Feed shorter chunks with cache.position_ids(n) (or stream_generate), which keep "
                "positions small; generate() uses absolute positions."
            )
        self._position_memo = (position_ids, m0)
        return m0

    # -- transformers' Cache contract -------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store a layer's new keys/values ``(batch, kv_heads, length, head_dim)`` and return what its
        attention reads. The first layer of each group plans the step (see :class:`Plan`)."""
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"This StreamingCache was built for a model with {len(self.layers)} layers, but layer {layer_idx} "
                "used it. Build the cache from the model that uses it."
            )
        implementation = getattr(self.config, "_attn_implementation", None)
        if implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"A StreamingCache needs the streaming attention, but this model runs '{implementation}'. Call "
                "`streaming_llm.enable_streaming_llm(model)` (or `streaming_llm.install(model)`) first."
            )
        layer = self.layers[layer_idx]
        group = layer.group
        if not group.initialized:
            group.allocate(key_states, value_states)
        self._check_shapes(group, key_states, value_states)
        if layer.index == 0:
            if not group.prepared:
                step_kwargs = kwargs.get("kwargs") or {}
                m0 = self._first_position(step_kwargs.get("position_ids"), key_states.shape[-2])
                group.plan_step(key_states.shape[-2], m0)
            if group.plan.mode == "steady":
                group.turn_steady()
        keys, values = group.write(layer.index, key_states, value_states)
        if layer.index == len(group.layer_ids) - 1:
            group.finish()
        return keys, values

    def prepare_decode(self, m0: int | None = None) -> bool:
        """Plan the next one-token step of every group on the host (before a captured graph replays it).

        Returns True when every group's step is steady (then the step reads only device tensors and
        a captured graph can run it). The next forward uses these plans instead of planning again.
        """
        m0 = self.next_position() if m0 is None else m0
        for group in self.groups:
            group.plan_step(1, m0)
            group.prepared = True
        return all(group.plan.mode == "steady" for group in self.groups)

    def layout(self) -> tuple:
        """What a captured steady step depends on besides device scalars (views and shapes)."""
        return tuple((g.plan.first_slot, g.plan.last_slot, g.segment_len) for g in self.groups if g.plan)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed (``"absolute"``), or the position for the next token (``"compact"``)."""
        if self.positions == "compact":
            return self.next_position()
        return self.seen_tokens

    def get_query_offset(self, layer_idx: int = 0) -> StreamingStep:
        # Not an offset: a marker that makes the "streaming_llm" mask function build a StreamingMask,
        # through which the attention function finds this cache (works for every architecture).
        return StreamingStep(self)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """``(query_length, tokens seen)``: the new keys, at their stream indices (the streaming mask
        function reads padding from those columns of a 2D attention mask).

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
        for group in self.groups:
            group.reset()
        self._position_memo = self._issued = None

    def _check_shapes(self, group: StreamGroup, k: torch.Tensor, v: torch.Tensor) -> None:
        expected = (group.keys.shape[1], group.keys.shape[2], group.keys.shape[4])
        got = (k.shape[0], k.shape[1], k.shape[3])
        if got != expected or k.dtype != group.keys.dtype or v.shape[-1] != group.values.shape[-1]:
            raise ValueError(
                f"This StreamingCache holds (batch, kv_heads, head_dim) = {expected} in {group.keys.dtype}, "
                f"but the model handed it {got} in {k.dtype}. A cache belongs to one model and one batch; "
                "create a new cache for this input."
            )

    # -- pinned segment (memory features) ------------------------------------------------------------
    def set_segment(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Replace the pinned segment placed after the sinks.

        Args:
            keys: Per layer, ``(batch, kv_heads, n, head_dim)`` keys rotated at the canonical
                positions ``start_size .. start_size + n - 1`` (what a forward at those positions gives).
            values: Per layer, the matching values.

        Raises:
            ValueError: More than ``segment_capacity`` tokens, or the sinks are not all in yet.
        """
        n = keys[0].shape[-2]
        if n > self.segment_capacity:
            raise ValueError(f"The segment holds at most {self.segment_capacity} tokens, got {n}.")
        if self.seen_tokens < self.start_size:
            raise ValueError("A pinned segment can only be set once all the sinks are in the cache.")
        for group in self.groups:
            if not group.segment_capacity:  # sliding layers keep their own window only
                continue
            first = group.sink_base - n
            for j, i in enumerate(group.layer_ids):
                self._check_shapes(group, keys[i], values[i])
                group.pinned[j][:, :, first : group.sink_base] = keys[i]  # canonical: rotated at S .. S + n - 1
                group.values[j][:, :, first : group.sink_base] = values[i]
            group.segment_len = n
            group.pinned_rotation = None

    # -- state, for saving and restoring sessions ------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The tensors and counters needed to rebuild this cache exactly, sized by content.

        Only filled slots are returned: the segment in use, the sinks seen and the ring slots
        written so far, so a short stream saves little.

        Raises:
            ValueError: The cache is empty.
        """
        if not all(g.initialized for g in self.groups):
            raise ValueError("The cache is empty: nothing to save yet.")
        tensors: dict[str, torch.Tensor] = {}
        counters: dict = {
            "start_size": self.start_size, "recent_size": self.recent_size, "segment_capacity": self.segment_capacity,
            "positions": self.positions, "groups": [],
        }  # fmt: skip
        for gi, g in enumerate(self.groups):
            first = g.sink_base - g.segment_len
            filled = g.ring_base + min(max(g.seen - g.window.start_size, 0), g.ring_size)
            tensors[f"groups.{gi}.keys"] = g.keys[..., first:filled, :]
            tensors[f"groups.{gi}.values"] = g.values[..., first:filled, :]
            tensors[f"groups.{gi}.pinned"] = g.pinned[..., first : g.ring_base, :]
            counters["groups"].append({"seen": g.seen, "shift": g.shift, "segment_len": g.segment_len, "first": first})
        return tensors, counters

    @classmethod
    def from_state(cls, config: PretrainedConfig, tensors: dict[str, torch.Tensor], counters: dict) -> StreamingCache:
        """Rebuild a cache saved with :meth:`state` (tensors may be on any device; they are copied).

        Raises:
            ValueError: Counters or tensors that do not fit this model or these sizes.
        """
        cache = cls(
            config, counters["start_size"], counters["recent_size"], counters["segment_capacity"],
            positions=counters.get("positions"),
        )  # fmt: skip
        if len(counters["groups"]) != len(cache.groups):
            raise ValueError(f"{len(counters['groups'])} layer groups saved, but this model has {len(cache.groups)}.")
        for gi, (g, saved) in enumerate(zip(cache.groups, counters["groups"], strict=True)):
            keys, values, pinned = (tensors[f"groups.{gi}.{name}"] for name in ("keys", "values", "pinned"))
            first = saved["first"]
            if keys.dim() != 5 or keys.shape[0] != len(g.layer_ids) or first != g.sink_base - saved["segment_len"]:
                raise ValueError(f"Layer group {gi} tensors do not fit this model and these sizes.")
            g.allocate(keys[0], values[0])
            filled = first + keys.shape[-2]
            if filled > g.slots or pinned.shape[-2] != g.ring_base - first or keys.shape[1:3] != g.keys.shape[1:3]:
                raise ValueError(f"Layer group {gi} tensors do not have the shapes these sizes need.")
            g.keys[..., first:filled, :] = keys
            g.values[..., first:filled, :] = values
            g.pinned[..., first : g.ring_base, :] = pinned
            g.seen, g.shift, g.segment_len = saved["seen"], saved["shift"], saved["segment_len"]
            g.pinned_rotation = None
        return cache

    # -- conversions ---------------------------------------------------------------------------------
    @classmethod
    def from_dynamic(
        cls, config: PretrainedConfig, cache: DynamicCache, start_size: int = 4, recent_size: int = 2000,
        positions: PositionMode | None = None,
    ) -> StreamingCache:  # fmt: skip
        """Take over a ``DynamicCache`` filled by a plain forward at positions ``0..T-1``, keeping
        its first ``start_size`` and last ``recent_size`` tokens.

        Raises:
            ValueError: The cache comes from another model, or has already dropped tokens.
        """
        streaming = cls(config, start_size, recent_size, positions=positions)
        if len(cache.layers) != len(streaming.layers):
            raise ValueError(
                f"The DynamicCache has {len(cache.layers)} layers but this model has {len(streaming.layers)}; "
                "it comes from another model."
            )
        total = max(getattr(source, "cumulative_length", 0) or source.get_seq_length() for source in cache.layers)
        for source, layer in zip(cache.layers, streaming.layers, strict=True):
            keys, values = source.keys, source.values
            if keys is None or keys.numel() == 0:
                continue
            g = layer.group
            if not g.initialized:
                g.allocate(keys, values)
            streaming._check_shapes(g, keys, values)
            held = keys.shape[-2]  # a sliding layer of transformers holds only its last tokens
            start, recent = g.window.start_size, g.window.recent_size
            n_sinks = min(total, start)
            if n_sinks and held != total:
                raise ValueError("This DynamicCache has already dropped tokens; it cannot be taken over.")
            j = layer.index
            g.keys[j][:, :, g.sink_base : g.sink_base + n_sinks] = keys[:, :, :n_sinks]
            g.values[j][:, :, g.sink_base : g.sink_base + n_sinks] = values[:, :, :n_sinks]
            g.pinned[j][:, :, g.sink_base : g.sink_base + n_sinks] = keys[:, :, :n_sinks]
            first = max(start, total - recent, total - held)
            if first < total:
                slots = g.ring_slot(torch.arange(first, total, device=keys.device))
                g.keys[j].index_copy_(2, slots, keys[:, :, first - total + held :])
                g.values[j].index_copy_(2, slots, values[:, :, first - total + held :])
            g.seen, g.shift, g.pinned_rotation = total, 0, 0
        return streaming


@dataclass(frozen=True)
class StreamingStep:
    """Handed to transformers as the query offset of a :class:`StreamingCache` (see ``get_query_offset``)."""

    cache: StreamingCache


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
