"""The decode step: one token through the model on a :class:`~streaming_llm.core.cache.StreamingCache`.

Once the ring is full every decode step is *steady* (see :mod:`streaming_llm.core.cache`): its shapes
never change and everything that changes from step to step (token, position, ring slot, sink
rotation) lives in device tensors written before the step. On CUDA such a step is captured once in
a CUDA graph and replayed, as gpt-fast does, so a token costs one graph launch instead of
hundreds of kernel launches from Python. Steps that are not steady (the first ``start + recent``
tokens) run eagerly; a frame rebase runs its one eager re-rotation and then replays.

Switch: ``cuda_graphs=False`` (or ``STREAMING_LLM_CUDA_GRAPHS=0``) runs every step eagerly. On the CPU,
``compile=True`` runs steady steps through ``torch.compile`` (one graph, never recompiled; see
``tests/test_decode.py``); it pays only on long generations (compiling takes tens of seconds).
"""

from __future__ import annotations

import os
import sys
import time

import torch
from transformers import PreTrainedModel

from .cache import StreamingCache
from .compat import cache_kwargs


def graphs_enabled(model: PreTrainedModel, requested: bool | None = None) -> bool:
    """Whether decode steps are captured: on CUDA unless turned off (argument, or ``STREAMING_LLM_CUDA_GRAPHS=0``)."""
    if requested is not None:
        return requested and model.device.type == "cuda"
    return model.device.type == "cuda" and os.environ.get("STREAMING_LLM_CUDA_GRAPHS", "1") != "0"


class Decoder:
    """Feeds one token at a time through ``model`` on ``cache``; replays CUDA graphs when it can.

    Args:
        model: A model switched to the streaming attention.
        cache: The cache this decoder steps (graphs hold views of its buffers).
        cuda_graphs: Capture steady steps (default: on CUDA, unless ``STREAMING_LLM_CUDA_GRAPHS=0``).
        compile: Run steady steps that are not captured through ``torch.compile`` (CPU).

    Attributes:
        replays: Steps served by a graph replay.
        eager_steps: Steps run eagerly.
    """

    def __init__(
        self, model: PreTrainedModel, cache: StreamingCache, cuda_graphs: bool | None = None, compile: bool = False
    ):
        self.model, self.cache = model, cache
        self.cuda_graphs = graphs_enabled(model, cuda_graphs)
        self._compiled = torch.compile(self._forward, fullgraph=True, dynamic=False) if compile else None
        self.replays = self.eager_steps = 0
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        device = model.device
        self._ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self._positions = torch.zeros(1, 1, dtype=torch.long, device=device)

    @torch.no_grad()
    def __call__(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed ``token`` (an int, or a device tensor holding one id); return next-token logits ``(vocab,)``.

        The returned tensor is the decoder's own output buffer when a graph ran: it is overwritten by
        the next step, so use it (sample from it) before calling again.
        """
        m = self.cache.next_position()
        steady = self.cache.prepare_decode(m)
        if isinstance(token, torch.Tensor):
            self._ids.copy_(token.reshape(1, 1))
        else:
            self._ids.fill_(int(token))
        self._positions.fill_(m)
        if not (self.cuda_graphs and steady):
            self.eager_steps += 1
            if steady and self._compiled is not None:
                return self._compiled()[0, -1]
            return self._forward()[0, -1]
        key = self.cache.layout()
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture()
        graph, logits = entry
        graph.replay()
        for group in self.cache.groups:
            group.prepared = False
        self.replays += 1
        return logits[0, -1]

    def _forward(self) -> torch.Tensor:
        out = self.model(
            input_ids=self._ids, position_ids=self._positions, use_cache=True, logits_to_keep=1,
            **cache_kwargs(self.model, self.cache),
        )  # fmt: skip
        return out.logits

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the prepared steady step. It is run eagerly first (a warm-up on a side stream);
        a steady step is idempotent (same slot, same values), so running it again is harmless."""
        began = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream().wait_stream(side)
        for group in self.cache.groups:
            group.prepared = True  # the warm-up consumed the plans; the capture reuses them
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward()
        for group in self.cache.groups:
            group.prepared = True  # the replay that follows is the real step
        if not self._graphs:  # one line, once per decoder
            print(
                f"streaming-llm: decode steps replay a CUDA graph (captured in {time.perf_counter() - began:.2f} s; "
                "STREAMING_LLM_CUDA_GRAPHS=0 turns this off)",
                file=sys.stderr,
            )
        return graph, logits


def decoder_for(model: PreTrainedModel, cache: StreamingCache, cuda_graphs: bool | None = None) -> Decoder:
    """The :class:`Decoder` kept with ``cache`` for ``model`` (created on first use)."""
    decoder = getattr(cache, "_decoder", None)
    if (
        decoder is None
        or decoder.model is not model
        or (cuda_graphs is not None and decoder.cuda_graphs != (cuda_graphs and model.device.type == "cuda"))
    ):
        decoder = Decoder(model, cache, cuda_graphs)
        cache._decoder = decoder
    return decoder
