"""Many independent streams in one cache: slots, stepped together in one forward.

A :class:`SlotCache` holds storage for ``rows`` streams (batch dimension = rows). Every row is a
whole StreamingLLM stream with its own counters (tokens seen, frame, segment): :meth:`SlotCache.row`
returns a single-stream :class:`~streaming_llm.core.cache.StreamingCache` whose buffers are *views* of
that row, so prefill, chunked ingest, ``state()`` and restore run the single-stream code unchanged.

A batched decode step (:class:`BatchedDecoder`) feeds one token to each of rows ``0 .. n-1`` in one
forward (``n`` a bucket 1, 2, 4, ... >= the highest decoding row + 1). Rows need not be aligned:
every row gets its own model position, ring slot, sink rotation and a visibility mask over the
buffer slots (the segment and sinks seen so far plus the ring slots filled so far). A row may be
filling its sinks, filling its ring, steady, or just rebased (its ring is re-framed eagerly before
the step). Rows of the bucket that do not decode this step are left untouched (their writes are
no-ops and their query attends to one slot, so nothing is NaN).

Everything that changes between steps lives in device tensors written before the step, so on CUDA
the step is captured once per bucket in a CUDA graph and replayed.

Attention (``streaming_llm.core.attention._slots``) folds the grouped-query heads into the query length,
so keys are never repeated. Only models whose layers form one stream group (every layer full
attention with one RoPE: Llama, Qwen2, Mistral without sliding window, SmolLM2...) are supported.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache

from .attention import SlotMask
from .cache import StreamGroup, StreamingCache, StreamingLayer
from .compat import cache_kwargs

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Per-row integer fields of a batched step, packed in one host buffer: token, position, write slot,
# pinned write slot, rotation index, canonical rotation index, is-sink, decodes, and the visibility
# bounds: segment/sinks [lo, hi) and ring [ring_base, ring_base + fill).
_FIELDS = ("token", "position", "slot", "pin_slot", "turn", "canon", "sink", "active", "lo", "hi", "fill")


def bucket_for(n: int, rows: int) -> int:
    """Smallest bucket (1, 2, 4, ... 64, or ``rows``) holding ``n`` rows."""
    for b in BUCKETS:
        if b >= n:
            return min(b, rows)
    return rows


class SlotCache(Cache):
    """A cache for ``rows`` independent StreamingLLM streams.

    Memory is exactly ``rows`` times one stream's :class:`StreamingCache` (allocated at once).

    Args:
        config: The model's config (or the model).
        rows: Number of streams held.
        start_size: Attention sinks per stream.
        recent_size: Recent tokens kept per stream.
        segment_capacity: Pinned-segment slots per stream (memory features).
        dtype: Storage dtype (the model's dtype).
        device: Storage device (the model's device).

    Raises:
        ValueError: ``rows < 1``, or sizes the single-stream cache refuses.
        NotImplementedError: A model whose layers form more than one stream group (sliding-window
            layers, or several RoPEs).
    """

    def __init__(
        self, config: PretrainedConfig, rows: int, start_size: int = 4, recent_size: int = 2000,
        segment_capacity: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ):  # fmt: skip
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be an int >= 1 (number of streams), got {rows!r}.")
        self.config = getattr(config, "config", config)
        self.rows = rows
        self.start_size, self.recent_size, self.segment_capacity = start_size, recent_size, segment_capacity
        template = StreamingCache(self.config, start_size, recent_size, segment_capacity)
        if len(template.groups) != 1:
            raise NotImplementedError(
                "SlotCache serves models whose layers all share one window and RoPE (Llama, Qwen2, SmolLM2...); "
                f"this model ({template.spec.model_type}) has {len(template.groups)} layer groups. Use one "
                "StreamingCache per stream."
            )
        self.device, self.dtype = torch.device(device), dtype
        spec = template.spec
        g = template.groups[0]
        n_layers = len(g.layer_ids)
        kw = {"dtype": dtype, "device": self.device}
        shape = (n_layers, rows, spec.num_kv_heads)
        self.group = StreamGroup(g.window, g.rope, list(g.layer_ids), segment_capacity)
        self.group.keys = torch.zeros(*shape, g.slots, spec.head_dim, **kw)
        self.group.values = torch.zeros(*shape, g.slots, spec.head_dim, **kw)
        self.group.pinned = torch.zeros(*shape, g.ring_base, spec.head_dim, **kw)
        work = torch.promote_types(dtype, torch.float32)
        cos, sin = g.rope.cos_sin(torch.arange(g.table_rows), self.device)
        self._row_table = (cos.to(work), sin.to(work))  # what StreamGroup.allocate builds, shared by the rows
        # Signed table for the batched step: index = delta + _span.
        self._span = g.table_rows
        cos, sin = g.rope.cos_sin(torch.arange(-self._span, self._span + 1), self.device)
        self._table = (cos.to(work), sin.to(work))
        super().__init__(layers=[StreamingLayer(self.group, j) for j in range(n_layers)])
        self._rows: list[StreamingCache | None] = [None] * rows
        self.free: set[int] = set(range(rows))
        # Batched-step state (device buffers per bucket, see BatchedDecoder).
        self._n = 0
        self._dev: torch.Tensor | None = None  # (len(_FIELDS), rows) int64 on device
        self._mask: torch.Tensor | None = None  # (n, 1, 1, slots) bool, made by device_prepare()
        self._arange = torch.arange(rows, device=self.device)
        self._slot_range = torch.arange(g.slots, device=self.device)

    # -- rows ------------------------------------------------------------------------------------------
    @property
    def live(self) -> list[int]:
        """Assigned rows, in order."""
        return [b for b in range(self.rows) if b not in self.free]

    def row(self, b: int) -> StreamingCache:
        """The single-stream cache of row ``b``: its buffers are views of this cache's row ``b``.

        Raises:
            ValueError: ``b`` is out of range or not assigned.
        """
        self._check_row(b)
        if b in self.free:
            raise ValueError(f"Row {b} is not assigned; call assign({b}) first.")
        return self._rows[b]

    def assign(self, b: int | None = None, state: tuple[dict[str, torch.Tensor], dict] | None = None) -> int:
        """Give row ``b`` (default: the lowest free row) a new stream: fresh, or restored from ``state``
        (what :meth:`StreamingCache.state` returned, from a single-stream cache or another row).

        Returns:
            The row.

        Raises:
            RuntimeError: No free row.
            ValueError: ``b`` taken or out of range; a state saved with other sizes or another model.
        """
        if b is None:
            if not self.free:
                raise RuntimeError(f"All {self.rows} rows are taken; release one first.")
            b = min(self.free)
        self._check_row(b)
        if b not in self.free:
            raise ValueError(f"Row {b} already holds a stream; release({b}) it first.")
        view = self._make_view(b)
        if state is not None:
            self._restore(view, *state)
        self._rows[b] = view
        self.free.discard(b)
        return b

    def release(self, b: int) -> None:
        """Free row ``b`` (its storage is zeroed when it is assigned again)."""
        self._check_row(b)
        self._rows[b] = None
        self.free.add(b)

    def _check_row(self, b: int) -> None:
        if not isinstance(b, int) or not 0 <= b < self.rows:
            raise ValueError(f"Row {b!r} does not exist: this cache has rows 0..{self.rows - 1}.")

    def _make_view(self, b: int) -> StreamingCache:
        view = StreamingCache(self.config, self.start_size, self.recent_size, self.segment_capacity)
        g, s = view.groups[0], self.group
        for t in (s.keys, s.values, s.pinned):
            t[:, b].zero_()
        g.keys, g.values, g.pinned = s.keys[:, b : b + 1], s.values[:, b : b + 1], s.pinned[:, b : b + 1]
        g.slot_index = torch.zeros(1, dtype=torch.int64, device=self.device)
        g.rotation = torch.zeros(1, dtype=torch.int64, device=self.device)
        g._table = self._row_table
        return view

    def _restore(self, view: StreamingCache, tensors: dict[str, torch.Tensor], counters: dict) -> None:
        """Copy a saved single-stream state into ``view`` (same checks as ``StreamingCache.from_state``)."""
        sizes = (counters["start_size"], counters["recent_size"], counters["segment_capacity"])
        if sizes != (self.start_size, self.recent_size, self.segment_capacity):
            raise ValueError(
                f"This state was saved with (start_size, recent_size, segment_capacity) = {sizes}, but this "
                f"SlotCache uses {(self.start_size, self.recent_size, self.segment_capacity)}."
            )
        if len(counters["groups"]) != 1:
            raise ValueError(f"{len(counters['groups'])} layer groups saved, but this model has 1.")
        g, saved = view.groups[0], counters["groups"][0]
        keys, values, pinned = (tensors[f"groups.0.{name}"] for name in ("keys", "values", "pinned"))
        first = saved["first"]
        filled = first + keys.shape[-2]
        if (
            keys.dim() != 5 or keys.shape[:3] != g.keys.shape[:3] or first != g.sink_base - saved["segment_len"]
            or filled > g.slots or pinned.shape[-2] != g.ring_base - first
        ):  # fmt: skip
            raise ValueError("The saved tensors do not fit this model and these sizes (one stream, batch 1).")
        g.keys[..., first:filled, :] = keys
        g.values[..., first:filled, :] = values
        g.pinned[..., first : g.ring_base, :] = pinned
        g.seen, g.shift, g.segment_len, g.pinned_rotation = saved["seen"], saved["shift"], saved["segment_len"], None
        view.positions = counters.get("positions") or view.positions

    # -- sizes ------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by all rows (``rows`` x one stream's cache)."""
        return sum(t.numel() * t.element_size() for t in (self.group.keys, self.group.values, self.group.pinned))

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly (per row)

    def get_query_offset(self, layer_idx: int = 0) -> SlotMask:
        # Not an offset: the "streaming_llm" mask function hands it on as the mask of every layer.
        return SlotMask(self._mask)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, self.group.slots

    # -- the batched step ------------------------------------------------------------------------------
    def plan_batch(self, tokens: Mapping[int, int], n: int, host: torch.Tensor) -> None:
        """Host work of a batched step over rows ``0 .. n-1``: fill ``host`` ``(len(_FIELDS), >= n)`` int64
        with each row's step fields, re-frame rows that rebase, and advance the decoding rows.

        Raises:
            ValueError: A row that is not assigned, or outside ``0 .. n-1``.
        """
        s = self.group
        w = s.window
        idle = dict.fromkeys(_FIELDS, 0) | {"turn": self._span, "canon": self._span, "hi": 1}  # attends to slot 0
        columns = [list(idle.values()) for _ in range(n)]
        for b, token in tokens.items():
            if not 0 <= b < n:
                raise ValueError(f"Row {b} is outside this step's rows 0..{n - 1}.")
            g = self.row(b).groups[0]
            t = g.seen
            m = w.next_model_position(t, g.shift, g.segment_len)
            shift_in = t - m
            if g.shift is None:
                g.shift = shift_in
            if shift_in != g.shift:  # rebase: re-frame this row's ring once, eagerly (as StreamGroup.plan_step)
                ring = g.keys[..., g.ring_base :, :]
                ring.copy_(g.rope.rotate(ring, g.shift - shift_in))
                g.shift = shift_in
            sink = t < w.start_size
            e = m - w.in_cache_position(t, g.segment_len)
            if not (-self._span <= e <= self._span and (not sink or -self._span <= t - m <= self._span)):
                raise ValueError(f"Row {b}: rotation {e} is outside the table; positions were not chosen by the cache.")
            end = t + 1
            columns[b] = [
                int(token),
                m,
                g.sink_base + t if sink else g.ring_slot(t),
                g.sink_base + t if sink else 0,
                e + self._span,
                (t - m if sink else 0) + self._span,
                int(sink),
                1,
                g.sink_base - g.segment_len,
                g.sink_base + min(end, w.start_size),
                min(max(end - w.start_size, 0), g.ring_size),
            ]  # fmt: skip (order of _FIELDS)
            g.seen, g.pinned_rotation, g.plan = end, None, None
        host[:, :n] = torch.tensor(columns, dtype=torch.int64).T
        self._n = n

    def device_prepare(self) -> torch.Tensor:
        """Device work shared by all layers (reads only device tensors): turn every decoding row's
        pinned keys by its rotation; return the visibility mask ``(n, 1, 1, slots)`` (bool)."""
        s, n, d = self.group, self._n, self._dev
        f = {name: d[i, :n] for i, name in enumerate(_FIELDS)}
        active = f["active"].bool()
        if s.ring_base:
            cos = self._table[0].index_select(0, f["turn"])[:, None, None, :]  # (n, 1, 1, half)
            sin = self._table[1].index_select(0, f["turn"])[:, None, None, :]
            keys = s.keys[:, :n, :, : s.ring_base]
            turned = s.rope.apply(s.pinned[:, :n], cos, sin)
            keys.copy_(torch.where(active[None, :, None, None, None], turned, keys))
        j = self._slot_range[None, :]
        ring = (j >= s.ring_base) & (j < s.ring_base + f["fill"][:, None])
        mask = ((j >= f["lo"][:, None]) & (j < f["hi"][:, None])) | ring
        self._mask = mask[:, None, None, :]
        return self._mask

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write each decoding row's new key/value ``(n, kv_heads, 1, head_dim)`` into its slot (other rows:
        unchanged) and return the rows' whole buffers ``(n, kv_heads, slots, head_dim)``."""
        s, n, d = self.group, self._n, self._dev
        if key_states.shape[0] != n or key_states.shape[-2] != 1:
            raise ValueError(
                f"A batched step feeds one token to each of {n} rows, got keys of shape {tuple(key_states.shape)}. "
                "Use BatchedDecoder for batched steps and cache.row(b) for prefill."
            )
        f = {name: d[i, :n] for i, name in enumerate(_FIELDS)}
        active = f["active"].bool()[:, None, None, None]
        keys, values = s.keys[layer_idx, :n], s.values[layer_idx, :n]
        index = f["slot"][:, None, None, None].expand(-1, keys.shape[1], 1, keys.shape[3])
        for buffer, new in ((keys, key_states), (values, value_states)):
            old = buffer.gather(2, index)
            buffer.scatter_(2, index, torch.where(active, new, old))
        if s.ring_base:  # canonical copy of a new sink, rotated at its stream index
            pinned = s.pinned[layer_idx, :n]
            pin_index = f["pin_slot"][:, None, None, None].expand(-1, keys.shape[1], 1, keys.shape[3])
            cos = self._table[0].index_select(0, f["canon"])[:, None, None, :]
            sin = self._table[1].index_select(0, f["canon"])[:, None, None, :]
            canonical = s.rope.apply(key_states, cos, sin)
            write = active & f["sink"].bool()[:, None, None, None]
            pinned.scatter_(2, pin_index, torch.where(write, canonical, pinned.gather(2, pin_index)))
        return keys, values


class BatchedDecoder:
    """Feeds one token to each of several rows of a :class:`SlotCache` in one forward.

    On CUDA each bucket's step is captured once in a CUDA graph and replayed (the step reads only
    device tensors; host values reach the device through a pinned buffer copied without a sync).

    Args:
        model: A model switched to the streaming attention (``streaming_llm.install``).
        cache: The slot cache.
        cuda_graphs: Capture steps (default: on CUDA).

    Attributes:
        replays: Steps served by a graph replay.
        eager_steps: Steps run eagerly.
    """

    def __init__(self, model: PreTrainedModel, cache: SlotCache, cuda_graphs: bool | None = None):
        self.model, self.cache = model, cache
        on_cuda = cache.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.replays = self.eager_steps = 0
        shape = (len(_FIELDS), cache.rows)
        self._host = torch.zeros(shape, dtype=torch.int64, pin_memory=on_cuda)
        cache._dev = torch.zeros(shape, dtype=torch.int64, device=cache.device)
        self._copied: torch.cuda.Event | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    @torch.no_grad()
    def __call__(self, tokens: Mapping[int, int]) -> torch.Tensor:
        """Feed ``tokens[b]`` to row ``b`` for every row in ``tokens``; return logits ``(n, vocab)`` for rows
        ``0 .. n-1`` (rows not in ``tokens`` give meaningless logits). With graphs, the returned tensor is
        overwritten by the next step of the same bucket.

        Raises:
            ValueError: No tokens, or a row that is not assigned.
        """
        if not tokens:
            raise ValueError("Nothing to decode: give at least one row a token.")
        cache = self.cache
        n = bucket_for(max(tokens) + 1, cache.rows)
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has read the host buffer
        cache.plan_batch(tokens, n, self._host)
        cache._dev.copy_(self._host, non_blocking=True)
        if cache.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        if not self.cuda_graphs:
            self.eager_steps += 1
            return self._forward(n)
        entry = self._graphs.get(n)
        if entry is None:
            entry = self._graphs[n] = self._capture(n)
        graph, logits = entry
        graph.replay()
        self.replays += 1
        return logits

    def _forward(self, n: int) -> torch.Tensor:
        cache = self.cache
        cache._n = n
        cache.device_prepare()  # the mask reaches attention through cache.get_query_offset()
        d = cache._dev
        ids = d[_FIELDS.index("token"), :n, None]
        positions = d[_FIELDS.index("position"), :n, None]
        out = self.model(
            input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
            **cache_kwargs(self.model, cache),
        )  # fmt: skip
        return out.logits[:, -1]

    def _capture(self, n: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream, then capture; the step is idempotent (same slots, same values)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(n)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        began = time.perf_counter()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(n)
        self.capture_s = time.perf_counter() - began
        return graph, logits
