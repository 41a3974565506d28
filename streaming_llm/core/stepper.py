"""Forwards on a :class:`~streaming_llm.core.cache.StreamingCache`: a chunk of one row, or a token for each of many.

The decode step of a bucket of rows ``0 .. n-1`` reads only device tensors: tokens, model positions,
write slots, pinned rotations and attended slot ranges are written into one host buffer by the
cache's plan and copied to the device before the step, without a sync. So on CUDA the step is
captured once per bucket (and per layout of the pinned slots) in a CUDA graph and replayed, as
gpt-fast does: a token costs one graph launch instead of hundreds of kernel launches from Python.
One row is the single-stream case (bucket 1). Chunks (prefill, ingestion) run eagerly.

Switches: ``cuda_graphs=False`` (or ``STREAMING_LLM_CUDA_GRAPHS=0``) runs every step eagerly; on the
CPU, ``compile=True`` runs decode steps through ``torch.compile`` (one graph per layout, never
recompiled across steps; see ``tests/test_stepper.py``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from .attention import install
from .cache import StepPlan, StreamingCache
from .compat import cache_kwargs

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(n: int, rows: int) -> int:
    """Smallest bucket (1, 2, 4, ... 256, then multiples of 256) holding ``n`` rows, at most ``rows``."""
    for b in BUCKETS:
        if b >= n:
            return min(b, rows)
    return min(-(-n // 256) * 256, rows)


def graphs_enabled(model: PreTrainedModel, requested: bool | None = None) -> bool:
    """Whether decode steps are captured: on CUDA unless turned off (argument, or ``STREAMING_LLM_CUDA_GRAPHS=0``)."""
    if requested is not None:
        return requested and model.device.type == "cuda"
    return model.device.type == "cuda" and os.environ.get("STREAMING_LLM_CUDA_GRAPHS", "1") != "0"


@contextmanager
def capturable_experts(model: PreTrainedModel) -> Iterator[None]:
    """Run a mixture-of-experts model's experts through transformers' ``batched_mm`` while a step is captured,
    when the model's own experts forward would read the device from the host.

    transformers picks the experts forward through its experts registry (``config._experts_implementation``).
    Its ``eager`` one loops over the experts hit (a host read of the routing) and its default ``grouped_mm``
    copies the group offsets to the host for any dtype but bfloat16 (seen on an H200, torch 2.11); neither can
    be captured in a CUDA graph. ``batched_mm`` gathers each token's experts and reads only device tensors. The
    model's setting is put back afterwards: prefill chunks keep the model's own experts forward.
    Models without experts are left alone.
    """
    get = getattr(model, "get_experts_implementation", None)
    if get is None or not model._can_set_experts_implementation():
        yield
        return
    before = get()
    capturable = {"batched_mm"} if model.dtype != torch.bfloat16 else {"batched_mm", "grouped_mm"}
    if all(impl in capturable for impl in before.values() if impl is not None):
        yield
        return
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(before)


class Stepper:
    """Runs the model on a cache: :meth:`prefill` (a chunk of one row) and :meth:`decode` (one token per row).

    Args:
        model: A supported causal LM (switched to the streaming attention here).
        cache: The cache it steps (captured graphs hold views of its buffers).
        cuda_graphs: Capture decode steps (default: on CUDA, unless ``STREAMING_LLM_CUDA_GRAPHS=0``).
        compile: Run decode steps that are not captured through ``torch.compile`` (CPU).

    Attributes:
        replays: Decode steps served by a graph replay.
        eager_steps: Decode steps run eagerly.
        batched_rows: Row-tokens fed by batched decode steps (replayed or eager).
        max_batch: Most rows one decode step has fed.
    """

    def __init__(
        self, model: PreTrainedModel, cache: StreamingCache, cuda_graphs: bool | None = None, compile: bool = False
    ):
        install(model)
        self.model, self.cache = model, cache
        self.cuda_graphs = graphs_enabled(model, cuda_graphs)
        self._compiled = torch.compile(self._forward, fullgraph=True, dynamic=False) if compile else None
        self.replays = self.eager_steps = self.batched_rows = self.max_batch = 0
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._copied: torch.cuda.Event | None = None
        self._kwargs = cache_kwargs(model, cache)

    @torch.no_grad()
    def prefill(self, b: int, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` (one chunk) to row ``b``; return the next-token logits ``(vocab,)``.

        Raises:
            ValueError: No tokens, or ``b`` is not assigned.
        """
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(self.model.device)
        if ids.shape[1] == 0:
            raise ValueError("Nothing to feed: the token list is empty.")
        m0 = self.cache.plan_chunk(b, ids.shape[1])
        positions = torch.arange(m0, m0 + ids.shape[1], device=ids.device)[None]
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1, **self._kwargs)
        self.cache.finish_forward()
        return out.logits[0, -1]

    @torch.no_grad()
    def decode(self, tokens: Mapping[int, int]) -> torch.Tensor:
        """Feed ``tokens[b]`` to row ``b`` for every row given; return logits ``(n, vocab)`` whose row ``b`` is
        row ``b``'s next-token logits (rows not given: meaningless). With graphs the tensor is overwritten by
        the next step of the same bucket: use it before stepping again.

        Rows whose pinned prefix is not complete yet take their token in a one-token chunk instead.

        Raises:
            ValueError: No tokens, or a row that is not assigned.
        """
        if not tokens:
            raise ValueError("Nothing to decode: give at least one row a token.")
        cache = self.cache
        n = bucket_for(max(tokens) + 1, cache.rows)
        batched = {b: t for b, t in tokens.items() if cache.decodable(b)}
        logits = None
        if batched:
            if self._copied is not None:
                self._copied.synchronize()  # the previous copy has read the host buffer
            plan = cache.plan_decode(batched, n)
            ids, positions = cache.stage(plan)
            if ids.device.type == "cuda":
                self._copied = torch.cuda.Event()
                self._copied.record()
            logits = self._run(plan, ids, positions)
            self.batched_rows += len(batched)
            self.max_batch = max(self.max_batch, len(batched))
        for b in sorted(set(tokens) - set(batched)):
            row_logits = self.prefill(b, [int(tokens[b])])
            if logits is None:
                logits = row_logits.new_zeros(n, row_logits.shape[-1])
            logits[b] = row_logits
        return logits

    def _run(self, plan: StepPlan, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graphs:
            self.eager_steps += 1
            forward = self._compiled or self._forward
            return forward(ids, positions)
        entry = self._graphs.get(plan.key)
        if entry is None:
            entry = self._graphs[plan.key] = self._capture(plan, ids, positions)
        graph, logits = entry
        graph.replay()
        self.cache.end_step()
        self.replays += 1
        return logits

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1, **self._kwargs)
        self.cache.finish_forward()  # rows riding along keep their recurrent states (hybrid models)
        return out.logits[:, -1]

    def _capture(self, plan: StepPlan, ids: torch.Tensor, positions: torch.Tensor):
        """Capture the planned step. It runs eagerly first (a warm-up on a side stream); its attention part is
        idempotent (same slots, same values) and its recurrent states are put back, so the replay that follows
        runs the step for real."""
        with capturable_experts(self.model):
            return self._capture_step(plan, ids, positions)

    def _capture_step(self, plan: StepPlan, ids: torch.Tensor, positions: torch.Tensor):
        began = time.perf_counter()
        states = self.cache.snapshot_states()  # recurrent states advance on every run: undo the warm-up's
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(ids, positions)
        torch.cuda.current_stream().wait_stream(side)
        self.cache.restore_states(states)
        self.cache.prepared(plan)  # the warm-up consumed the plan; the capture reuses it
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(ids, positions)
        self.cache.prepared(plan)  # for the replay that follows
        if not self._graphs:  # one line, once per stepper
            print(
                f"streaming-llm: decode steps replay CUDA graphs (first captured in {time.perf_counter() - began:.2f} "
                "s; STREAMING_LLM_CUDA_GRAPHS=0 turns this off)",
                file=sys.stderr,
            )
        return graph, logits
