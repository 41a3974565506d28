"""The StreamingLLM KV cache: attention sinks plus a rolling window in a preallocated ring.

Storage only. The cache writes what the model hands it and returns what attention must read;
every position decision lives in :mod:`streaming_llm.positions`, and the attention function in
:mod:`streaming_llm.attention` applies them (it is the one place that sees the model's position ids
in every supported transformers version).

Layout of one layer's buffer, shape ``(batch, kv_heads, slots, head_dim)``::

    [ segment (capacity Z) | sinks (S) | ring (W + 1) ]

* sinks: the first ``start_size`` stream tokens, never evicted;
* ring: the recent tokens; stream token ``u >= S`` lives in slot ``S + (u - S) mod (W + 1)``. One
  slot more than ``recent_size`` so a new token is written in place while the query still sees the
  ``recent_size`` tokens before it;
* segment: an optional injected pinned segment (hybrid memory), placed right-aligned before the
  sinks so that ``[segment | sinks | ring]`` is one contiguous view.

Appending a token writes one slot: nothing is copied and shapes are static once the ring is full.
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
STEP_ATTR = "_streaming_llm_step"


@dataclass
class Step:
    """What one ``update`` call wrote and returned, read by the attention function.

    ``inplace``: the returned keys are a view of the layer's buffer in an order where plain causal
    attention is exact (single query, or no eviction inside the chunk). ``banded``: the returned
    keys are a temporary ``[pinned | recent...]`` working set whose queries need per-query windows.
    """

    layer: StreamingLayer
    t0: int
    length: int
    mode: Literal["inplace", "banded"]
    new_keys: torch.Tensor
    ring_rows: slice  # rows of new_keys written to the ring ...
    ring_slots: slice | torch.Tensor | None  # ... and the ring slots they went to
    n_new_sinks: int
    n_pinned: int = 0  # banded: pinned keys at the start of the working set
    n_past: int = 0  # banded: past recent keys after them
    rest_start: int = 0  # banded: stream index of the first recent key


class StreamingLayer(CacheLayerMixin):
    """One decoder layer's sinks + ring buffer (see module docstring for the layout)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, window: Window, rope: Rope, segment_capacity: int = 0):
        super().__init__()
        self.window = window
        self.rope = rope
        self.segment_capacity = segment_capacity
        self.seen = 0  # stream tokens processed
        self.shift: int | None = None  # ring key for stream u is rotated at model position u - shift
        self.segment_len = 0
        self.pinned_keys: torch.Tensor | None = None  # canonical: sinks at 0..S-1, segment at S..
        self.pinned_rotation: int | None = None  # rotation currently applied to pinned slots of `keys`

    # -- layout -------------------------------------------------------------------------------
    @property
    def sink_base(self) -> int:
        return self.segment_capacity

    @property
    def ring_base(self) -> int:
        return self.segment_capacity + self.window.start_size

    @property
    def ring_size(self) -> int:
        return self.window.recent_size + 1

    def ring_slot(self, u: int | torch.Tensor) -> int | torch.Tensor:
        """Buffer slot of stream token ``u >= start_size``."""
        return self.ring_base + (u - self.window.start_size) % self.ring_size

    @property
    def num_sinks(self) -> int:
        return min(self.seen, self.window.start_size)

    # -- transformers' layer contract ---------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        slots = self.ring_base + self.ring_size
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.zeros(batch, heads, slots, dim, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(
            batch, heads, slots, value_states.shape[-1], dtype=value_states.dtype, device=value_states.device
        )
        pinned = self.window.start_size + self.segment_capacity
        self.pinned_keys = torch.zeros(batch, heads, pinned, dim, dtype=key_states.dtype, device=key_states.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key_states``/``value_states`` (``(batch, kv_heads, length, head_dim)``) and return
        what attention reads, tagged with a :class:`Step` for the streaming attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_shapes(key_states, value_states)
        t0, length = self.seen, key_states.shape[-2]
        if length == 1 or t0 + length - 1 <= self.window.capacity:
            keys, values, step = self._update_inplace(key_states, value_states, t0, length)
        else:
            keys, values, step = self._update_banded(key_states, value_states, t0, length)
        self.seen += length
        setattr(keys, STEP_ATTR, step)
        return keys, values

    def get_seq_length(self) -> int:
        """Position the model should give the next token (small and bounded; see positions)."""
        return self.window.next_model_position(self.seen, self.shift, self.segment_len)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The streaming attention builds its own window masks; transformers' mask only carries
        # padding, over the new tokens.
        return query_length, 0

    def get_max_length(self) -> int:
        return self.window.capacity

    def reset(self) -> None:
        self.seen, self.shift, self.segment_len, self.pinned_rotation = 0, None, 0, None
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.pinned_keys.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("A StreamingCache cannot be cropped: evicted tokens are gone.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys[indices.to(self.device)]
            self.values = self.values[indices.to(self.device)]
            self.pinned_keys = self.pinned_keys[indices.to(self.device)]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.pinned_keys = self.pinned_keys.repeat_interleave(repeats, dim=0)

    # -- writes -------------------------------------------------------------------------------------
    def _update_inplace(self, k: torch.Tensor, v: torch.Tensor, t0: int, length: int):
        """No query in this chunk misses a token: write into place and return a view."""
        s = self.window.start_size
        n_new_sinks = self._write_new_sinks(k, v, t0, length)
        ring_rows = slice(n_new_sinks, length)
        ring_slots = None
        if n_new_sinks < length:
            # One token, or a chunk that does not wrap around (t0 + length - 1 <= capacity).
            start = self.ring_slot(t0 + n_new_sinks)
            ring_slots = slice(start, start + length - n_new_sinks)
            self.keys[:, :, ring_slots] = k[:, :, ring_rows]
            self.values[:, :, ring_slots] = v[:, :, ring_rows]
        end = t0 + length
        last = self.sink_base + min(end, s) if end <= s else self.ring_base + min(end - s, self.ring_size)
        first_slot = self.sink_base - self.segment_len
        step = Step(self, t0, length, "inplace", k, ring_rows, ring_slots, n_new_sinks)
        return self.keys[:, :, first_slot:last], self.values[:, :, first_slot:last], step

    def _write_new_sinks(self, k: torch.Tensor, v: torch.Tensor, t0: int, length: int) -> int:
        """Store the chunk's tokens that are sinks (stream index < start_size); return how many."""
        n = max(0, min(self.window.start_size, t0 + length) - t0)
        if n:
            self.keys[:, :, self.sink_base + t0 : self.sink_base + t0 + n] = k[:, :, :n]
            self.values[:, :, self.sink_base + t0 : self.sink_base + t0 + n] = v[:, :, :n]
        return n

    def _update_banded(self, k: torch.Tensor, v: torch.Tensor, t0: int, length: int):
        """The chunk crosses the eviction point: return ``[pinned | past recent | new recent]``
        as a temporary working set, then keep only what survives the chunk."""
        s, w = self.window.start_size, self.window.recent_size
        n_old_sinks = min(t0, s)
        n_new_sinks = self._write_new_sinks(k, v, t0, length)  # the working set reads them from k
        rest_start = max(s, t0 - w)
        past = torch.arange(rest_start, t0, device=self.device) if t0 > rest_start else None
        seg = slice(self.sink_base - self.segment_len, self.sink_base)
        pieces_k = [self.pinned_keys[:, :, :n_old_sinks], k[:, :, :n_new_sinks]]
        pieces_v = [self.values[:, :, self.sink_base : self.sink_base + n_old_sinks], v[:, :, :n_new_sinks]]
        if self.segment_len:
            pieces_k.append(self.pinned_keys[:, :, s : s + self.segment_len])
            pieces_v.append(self.values[:, :, seg])
        n_past = 0
        if past is not None:
            slots = self.ring_slot(past)
            pieces_k.append(self.keys.index_select(2, slots))
            pieces_v.append(self.values.index_select(2, slots))
            n_past = past.numel()
        pieces_k.append(k[:, :, n_new_sinks:])
        pieces_v.append(v[:, :, n_new_sinks:])
        work_k, work_v = torch.cat(pieces_k, dim=2), torch.cat(pieces_v, dim=2)

        # Keep what survives: the new sinks, and the last ring_size recent tokens of the chunk.
        keep = min(length - n_new_sinks, self.ring_size)
        ring_rows = slice(length - keep, length)
        ring_slots = self.ring_slot(torch.arange(t0 + length - keep, t0 + length, device=self.device))
        self.keys.index_copy_(2, ring_slots, k[:, :, ring_rows])
        self.values.index_copy_(2, ring_slots, v[:, :, ring_rows])
        step = Step(
            self,
            t0,
            length,
            "banded",
            k,
            ring_rows,
            ring_slots,
            n_new_sinks,
            n_pinned=n_old_sinks + n_new_sinks + self.segment_len,
            n_past=n_past,
            rest_start=rest_start,
        )
        return work_k, work_v, step

    # -- called by the attention function, which knows the model positions -----------------------------
    def align(self, step: Step, m0: int, work_keys: torch.Tensor) -> None:
        """Bring stored keys into the frame of this step's model positions (first query at ``m0``).

        Re-rotates the ring when the frame changed (a rebase, or positions chosen by ``generate``),
        and stores the step's new sinks at their canonical positions.
        """
        shift_in = step.t0 - m0
        if self.shift is None:
            self.shift = shift_in
        delta = self.shift - shift_in
        if delta:
            ring = self.keys[:, :, self.ring_base :]
            ring.copy_(self.rope.rotate(ring, delta))
            if isinstance(step.ring_slots, slice):  # the step's own keys are already in the new frame
                self.keys[:, :, step.ring_slots] = step.new_keys[:, :, step.ring_rows]
            elif step.ring_slots is not None:
                self.keys.index_copy_(2, step.ring_slots, step.new_keys[:, :, step.ring_rows])
            if step.mode == "banded" and step.n_past:
                past = work_keys[:, :, step.n_pinned : step.n_pinned + step.n_past]
                past.copy_(self.rope.rotate(past, delta))
            self.shift = shift_in
        if step.n_new_sinks:
            canon = self.rope.rotate(step.new_keys[:, :, : step.n_new_sinks], shift_in)
            self.pinned_keys[:, :, step.t0 : step.t0 + step.n_new_sinks] = canon
            self.pinned_rotation = None
            if step.mode == "banded":
                first = min(step.t0, self.window.start_size)
                work_keys[:, :, first : first + step.n_new_sinks] = canon

    def rotate_pinned(self, e: int) -> None:
        """Write the pinned keys into the buffer turned by ``e`` positions (in-place steps)."""
        if self.pinned_rotation == e:
            return
        n = self.num_sinks
        self.keys[:, :, self.sink_base : self.sink_base + n] = self.rope.rotate(self.pinned_keys[:, :, :n], e)
        if self.segment_len:
            s = self.window.start_size
            seg = self.rope.rotate(self.pinned_keys[:, :, s : s + self.segment_len], e)
            self.keys[:, :, self.sink_base - self.segment_len : self.sink_base] = seg
        self.pinned_rotation = e

    def _check_shapes(self, k: torch.Tensor, v: torch.Tensor) -> None:
        expected = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3])
        got = (k.shape[0], k.shape[1], k.shape[3])
        if got != expected or k.dtype != self.keys.dtype or v.shape[-1] != self.values.shape[-1]:
            raise ValueError(
                f"This StreamingCache holds (batch, kv_heads, head_dim) = {expected} in {self.keys.dtype}, "
                f"but the model handed it {got} in {k.dtype}. A cache belongs to one model and one batch; "
                "create a new cache for this input."
            )

    @property
    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.pinned_keys))


class StreamingCache(Cache):
    """A transformers ``Cache`` that keeps attention sinks plus a rolling window, exactly.

    After a token is processed the cache holds the first ``start_size`` tokens and the latest
    ``recent_size`` tokens (that token included); the next token attends to those and itself, at
    positions inside the cache. Memory is fixed: ``start_size + recent_size + 1`` slots per layer.

    The model must run the streaming attention (``enable_streaming_llm(model)`` or
    :func:`streaming_llm.attention.install` sets it up); with it, a model still behaves exactly like
    ``sdpa`` with any other cache.

    Args:
        config: The model's config (or the model).
        start_size: Number of first tokens kept forever (attention sinks). Default 4.
        recent_size: Number of most recent tokens kept. Default 2000.

    Example:
        >>> cache = StreamingCache(model.config, start_size=4, recent_size=2000)
        >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=10_000)
    """

    def __init__(
        self, config: PretrainedConfig, start_size: int = 4, recent_size: int = 2000, segment_capacity: int = 0
    ):
        check_sizes(start_size, recent_size)
        if segment_capacity < 0:
            raise ValueError(f"segment_capacity must be >= 0, got {segment_capacity}")
        self.config = getattr(config, "config", config)
        self.spec: ModelSpec = describe(self.config)
        limit = self.spec.position_limit
        self.window = Window(start_size, recent_size, limit)
        if limit is not None and self.window.capacity + segment_capacity >= limit:
            raise ValueError(
                f"This model's RoPE changes frequencies past position {limit}, so the cache must stay well below it: "
                f"start_size + recent_size = {self.window.capacity} is too large; use at most {limit // 2}."
            )
        self.segment_capacity = segment_capacity
        layers = []
        for spec in self.spec.layers:
            if spec.sliding_window is None:  # full attention: sinks + window
                layers.append(StreamingLayer(self.window, spec.rope, segment_capacity))
            else:  # the model's own sliding window, kept as trained
                layers.append(StreamingLayer(Window(0, spec.sliding_window - 1, limit), spec.rope))
        super().__init__(layers=layers)
        # Positions follow the layer that holds the most (a full-attention layer when there is one).
        self.policy = max(
            range(len(layers)), key=lambda i: (layers[i].window is self.window, layers[i].window.capacity)
        )

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
        return self.layers[self.policy].seen

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
        return sum(layer.nbytes for layer in self.layers)

    @property
    def segment_len(self) -> int:
        """Tokens in the injected pinned segment (hybrid memory's summary), 0 without one."""
        return self.layers[self.policy].segment_len

    def set_segment(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Replace the pinned segment placed after the sinks.

        Args:
            keys: Per layer, ``(batch, kv_heads, n, head_dim)`` keys rotated at the canonical
                positions ``start_size .. start_size + n - 1`` (what a forward at those positions gives).
            values: Per layer, the matching values.
        """
        n = keys[0].shape[-2]
        if n > self.segment_capacity:
            raise ValueError(f"The segment holds at most {self.segment_capacity} tokens, got {n}.")
        if self.seen_tokens < self.start_size:
            raise ValueError("A pinned segment can only be set once all the sinks are in the cache.")
        s = self.start_size
        for layer, k, v in zip(self.layers, keys, values, strict=True):
            if not layer.segment_capacity:  # sliding layers keep their own window only
                continue
            layer._check_shapes(k, v)
            layer.pinned_keys[:, :, s : s + n] = k
            layer.values[:, :, layer.sink_base - n : layer.sink_base] = v
            layer.segment_len = n
            layer.pinned_rotation = None

    # -- state, for saving and restoring sessions ------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """All tensors and counters needed to rebuild this cache exactly."""
        tensors = {}
        for i, layer in enumerate(self.layers):
            if not layer.is_initialized:
                raise ValueError("The cache is empty: nothing to save yet.")
            tensors[f"layers.{i}.keys"] = layer.keys
            tensors[f"layers.{i}.values"] = layer.values
            tensors[f"layers.{i}.pinned_keys"] = layer.pinned_keys
        counters = {
            "start_size": self.start_size, "recent_size": self.recent_size, "segment_capacity": self.segment_capacity,
            "layers": [{"seen": ly.seen, "shift": ly.shift, "segment_len": ly.segment_len} for ly in self.layers],
        }  # fmt: skip
        return tensors, counters

    @classmethod
    def from_state(cls, config: PretrainedConfig, tensors: dict[str, torch.Tensor], counters: dict) -> StreamingCache:
        """Rebuild a cache saved with :meth:`state` (tensors are copied to the model's device by the caller)."""
        cache = cls(config, counters["start_size"], counters["recent_size"], counters["segment_capacity"])
        if len(counters["layers"]) != len(cache.layers):
            raise ValueError(f"{len(counters['layers'])} layers saved, but this model has {len(cache.layers)}.")
        for i, (layer, saved) in enumerate(zip(cache.layers, counters["layers"], strict=True)):
            keys, values = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]
            layer.lazy_initialization(keys, values)
            if layer.keys.shape != keys.shape or layer.pinned_keys.shape != tensors[f"layers.{i}.pinned_keys"].shape:
                raise ValueError(f"Layer {i} tensors do not have the shapes these sizes need.")
            layer.keys.copy_(keys)
            layer.values.copy_(values)
            layer.pinned_keys.copy_(tensors[f"layers.{i}.pinned_keys"])
            layer.seen, layer.shift, layer.segment_len = saved["seen"], saved["shift"], saved["segment_len"]
            layer.pinned_rotation = None
        return cache

    # -- transformers' Cache contract -------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
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
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Position the model should give the next token.

        Not the number of tokens seen (that is :attr:`seen_tokens`): positions stay below
        ``2 * (start_size + recent_size)`` so RoPE stays exact on endless streams. The same for
        every layer (they all see the same positions); ``layer_idx`` is accepted for compatibility.
        """
        return self.layers[self.policy].get_seq_length()

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    # -- conversions ---------------------------------------------------------------------------------
    @classmethod
    def from_dynamic(
        cls, config: PretrainedConfig, cache: DynamicCache, start_size: int = 4, recent_size: int = 2000
    ) -> StreamingCache:
        """Take over a ``DynamicCache`` filled by a plain forward at positions ``0..T-1``, keeping
        its first ``start_size`` and last ``recent_size`` tokens."""
        streaming = cls(config, start_size, recent_size)
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
            layer.lazy_initialization(keys, values)
            layer._check_shapes(keys, values)
            held = keys.shape[-2]  # a sliding layer of transformers holds only its last tokens
            start, recent = layer.window.start_size, layer.window.recent_size
            n_sinks = min(total, start)
            if n_sinks and held != total:
                raise ValueError("This DynamicCache has already dropped tokens; it cannot be taken over.")
            layer.keys[:, :, layer.sink_base : layer.sink_base + n_sinks] = keys[:, :, :n_sinks]
            layer.values[:, :, layer.sink_base : layer.sink_base + n_sinks] = values[:, :, :n_sinks]
            layer.pinned_keys[:, :, :n_sinks] = keys[:, :, :n_sinks]
            first = max(start, total - recent, total - held)
            if first < total:
                slots = layer.ring_slot(torch.arange(first, total, device=keys.device))
                layer.keys.index_copy_(2, slots, keys[:, :, first - total + held :])
                layer.values.index_copy_(2, slots, values[:, :, first - total + held :])
            layer.seen, layer.shift, layer.pinned_rotation = total, 0, 0
        return streaming


def check_sizes(start_size: int, recent_size: int) -> None:
    """Validate cache sizes: errors for impossible ones, warnings for ones that hurt quality."""
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
