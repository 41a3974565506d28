"""Every position decision of StreamingLLM, in one place.

Three positions matter for a token:

* its *stream index* ``t``: how many tokens came before it, ever (grows without bound);
* its *in-cache position* ``K(t)``: where the method places it (the paper's positions inside
  the cache). Pinned tokens (the attention sinks, plus an optional injected segment) sit at
  ``0 .. n_pin-1``, the kept recent tokens follow them, and the query comes last, so no
  query-key distance ever exceeds ``start_size + recent_size``;
* its *model position* ``m``: the position the model's rotary embedding was applied at.
  Recent keys are stored exactly as the model rotated them. Within one *frame*
  ``m = t - shift``, so query-to-recent distances already equal in-cache distances and the
  recent window never needs re-rotation. Only the pinned tokens need a per-query correction:
  they are stored rotated at their canonical in-cache positions and, for a query, turned by
  ``e = m - K(t)`` (angles in float64), which puts them right before the oldest kept token.

To keep the model's float32 RoPE angles exact over endless streams, the position proposed for
the next token (:func:`next_model_position`) is brought back to its in-cache position whenever it
would exceed ``2 * (start_size + recent_size)``. The cache then re-rotates its recent keys once
by the frame change (:meth:`Rope.rotate`), so a key is re-rotated at most a couple of times in
its life and no error accumulates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A model position above this multiple of the cache capacity triggers a rebase (see module doc).
REBASE_FACTOR = 2


@dataclass(frozen=True)
class Rope:
    """How one layer applies rotary embeddings, enough to turn stored keys by a position delta.

    Attributes:
        inv_freq: The model's own inverse frequencies (float32 values, kept here as float64),
            shape ``(rotary_dim // 2,)``.
        rotary_dim: Number of head dimensions that are rotated (partial rotary models rotate
            fewer than ``head_dim``; 0: a layer without RoPE, whose rotations are the identity).
        offset: First rotated dimension: the rotated dims are ``offset .. offset + rotary_dim - 1``
            (0 for most models; latent attention's queries put their RoPE part after the others).
        interleaved: Pairs ``(2i, 2i + 1)`` turn together (Cohere, GLM-4, DeepSeek-V2 style) instead
            of ``(i, i + rotary_dim / 2)`` ("rotate_half" style); pair ``i`` turns by ``inv_freq[i]``.
    """

    inv_freq: torch.Tensor
    rotary_dim: int
    offset: int = 0
    interleaved: bool = False

    @property
    def key(self) -> tuple:
        """A hashable description (two layers with equal keys rotate identically)."""
        return (self.rotary_dim, self.offset, self.interleaved, tuple(self.inv_freq.tolist()))

    def rotate(self, x: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` by ``delta`` positions, the way the model's RoPE would have.

        Args:
            x: Tensor ``(..., seq, head_dim)`` laid out as this rope describes.
            delta: A Python int, or an integer tensor of shape ``(seq,)`` (one delta per row).

        Returns:
            A new tensor with the same dtype; ``x`` itself when ``delta`` is the integer 0.
        """
        if (isinstance(delta, int) and delta == 0) or self.rotary_dim == 0:
            return x
        work = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self.cos_sin(delta, x.device)  # (seq or 1, rotary_dim // 2), float64
        return self.apply(x, cos.to(work), sin.to(work))

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (``(..., seq, head_dim)``) by precomputed ``cos``/``sin`` (``(seq or 1, rotary_dim // 2)``,
        in the working dtype); returns a new tensor in ``x``'s dtype."""
        work = cos.dtype
        first, last = self.offset, self.offset + self.rotary_dim
        part = x[..., first:last].to(work)
        if self.interleaved:
            x1, x2 = part[..., 0::2], part[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)
        else:
            half = self.rotary_dim // 2
            x1, x2 = part[..., :half], part[..., half:]
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        if first == 0 and last == x.shape[-1]:
            return rotated
        return torch.cat((x[..., :first], rotated, x[..., last:]), dim=-1)

    def cos_sin(self, delta: int | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(device=device, dtype=torch.float64)
        if isinstance(delta, int):
            angles = (float(delta) * inv_freq)[None, :]
        else:
            angles = delta.to(device=device, dtype=torch.float64)[:, None] * inv_freq[None, :]
        return angles.cos(), angles.sin()


@dataclass(frozen=True)
class Window:
    """The shape of a streaming cache: what is kept, and where it sits.

    Attributes:
        start_size: Number of first stream tokens kept forever (attention sinks; a pinned
            system prompt makes this larger).
        recent_size: Number of most recent tokens kept.
        position_limit: Model positions must stay below this, or None.
    """

    start_size: int
    recent_size: int
    position_limit: int | None = None  # model positions must stay below this (see ModelSpec)

    @property
    def capacity(self) -> int:
        """Tokens kept after a token is processed (``start_size + recent_size``)."""
        return self.start_size + self.recent_size

    def in_cache_position(self, t: int, extra_pinned: int = 0) -> int:
        """In-cache position ``K(t)`` of the token with stream index ``t``.

        Args:
            t: Stream index of the token.
            extra_pinned: Tokens of an injected pinned segment placed after the sinks.
        """
        if t < self.start_size:
            return t
        return self.start_size + extra_pinned + min(t - self.start_size, self.recent_size)

    def pin_offsets(self, t0: int, m0: int, length: int, extra_pinned: int = 0) -> torch.Tensor:
        """Per-query rotation ``e = m - K(t)`` that moves the pinned keys next to the window.

        Args:
            t0: Stream index of the first query.
            m0: Model position of the first query (queries are contiguous).
            length: Number of queries.
            extra_pinned: Tokens of an injected pinned segment.

        Returns:
            Int64 tensor ``(length,)``.
        """
        t = torch.arange(t0, t0 + length, dtype=torch.int64)
        s, w = self.start_size, self.recent_size
        recent = (t - s).clamp(min=0).clamp(max=w)
        in_cache = torch.where(t < s, t, s + extra_pinned + recent)
        return (m0 - t0) + t - in_cache

    def next_model_position(self, seen: int, shift: int | None, extra_pinned: int = 0) -> int:
        """Position to give the next token: the current frame's, or its in-cache one after a rebase."""
        m = seen - (shift or 0)
        threshold = REBASE_FACTOR * (self.capacity + extra_pinned)
        if self.position_limit is not None:  # leave room below the limit for the coming chunk
            threshold = min(threshold, (self.position_limit + self.capacity + extra_pinned) // 2)
        if m <= threshold:
            return m
        return self.in_cache_position(seen, extra_pinned)
