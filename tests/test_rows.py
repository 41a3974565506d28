"""Rows of one StreamingCache (streaming_llm/core/cache.py) stepped together by the Stepper (core/stepper.py).

Every row, stepped together with rows in other states (other pinned prefixes, a memory segment, one
past rebases, one filling its sinks, one fresh, one riding along without decoding), must give
exactly what its stream gives alone: the slow reference, or a one-row cache.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from reference import SlowStreamingReference

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core.stepper import Stepper
from streaming_llm.runtime.engine import Engine, Request

START, RECENT = 4, 12
ATOL = 1e-4


def stream(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def reference(ids: torch.Tensor, start: int = START) -> torch.Tensor:
    return SlowStreamingReference(tiny_llama(), start, RECENT).logits(ids[None]).double()


def rows_cache(model, rows: int, pinned: int = START, segment: int = 0) -> StreamingCache:
    return StreamingCache(model.config, START, RECENT, segment, rows=rows, pinned_capacity=pinned,
                          dtype=torch.float32, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return streaming_llm.install(tiny_llama())


def test_rows_in_different_states_stepped_together_equal_each_stream_alone(model):
    """Row 0 is past rebases, row 1 is filling its sinks, row 2 is fresh, row 3 ingests a prompt in chunks
    between the decode steps (it is in the bucket but does not decode: it must stay untouched)."""
    steps = 40
    ids = [stream(60 + steps, 1), stream(2 + steps, 2), stream(steps, 3), stream(70, 4)]
    cache = rows_cache(model, 4)
    for b in range(4):
        cache.assign(b)
    stepper = Stepper(model, cache)
    stepper.prefill(0, ids[0][:60])
    stepper.prefill(1, ids[1][:2])
    got: list[list[torch.Tensor]] = [[], [], []]
    positions = []
    for i in range(steps):
        logits = stepper.decode({0: int(ids[0][60 + i]), 1: int(ids[1][2 + i]), 2: int(ids[2][i])})
        assert logits.shape[0] == 4  # bucket 4: row 3 rides along without decoding
        for b in range(3):
            got[b].append(logits[b].clone())
        positions.append(cache.next_position(0))
        if i % 8 == 0:  # row 3: one prefill chunk between decode steps
            last3 = stepper.prefill(3, ids[3][(i // 8) * 10 : (i // 8 + 1) * 10])
    assert any(b < a for a, b in zip(positions, positions[1:], strict=False))  # row 0 rebased during the steps
    torch.testing.assert_close(torch.stack(got[0]).double(), reference(ids[0])[60:], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(got[1]).double(), reference(ids[1])[2:], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(got[2]).double(), reference(ids[2]), atol=ATOL, rtol=0)
    torch.testing.assert_close(last3.double(), reference(ids[3][:50])[-1], atol=ATOL, rtol=0)
    assert stepper.eager_steps >= steps - 3 and stepper.max_batch == 3  # CPU: no graphs


def test_rows_with_different_pinned_prefixes_and_a_segment_equal_one_row_caches(model):
    """Pinned prefixes of 4, 9 and 0 tokens (a system prompt, a plain window) and a memory segment, in one bucket."""
    ids = stream(90, 12)
    gen = torch.Generator().manual_seed(3)
    seg_k = [torch.randn(1, 2, 3, 16, generator=gen) for _ in range(2)]
    seg_v = [torch.randn(1, 2, 3, 16, generator=gen) for _ in range(2)]
    pinned = [4, 9, 0, 4]
    cache = rows_cache(model, 4, pinned=9, segment=3)
    for b, p in enumerate(pinned):
        cache.assign(b, start_size=p)
    alone = [StreamingCache(model.config, p, RECENT, 3, rows=1, dtype=torch.float32, device="cpu") for p in pinned]
    steppers = [Stepper(model, c) for c in alone]
    batched = Stepper(model, cache)
    for b in range(4):
        batched.prefill(b, ids[:12])
        steppers[b].prefill(0, ids[:12])
    cache.set_segment(seg_k, seg_v, b=3)
    alone[3].set_segment(seg_k, seg_v)
    for i in range(12, 90):
        got = batched.decode(dict.fromkeys(range(4), int(ids[i])))
        for b in range(4):
            torch.testing.assert_close(got[b], steppers[b].decode({0: int(ids[i])})[0], atol=1e-5, rtol=0)
    assert cache.row(3).segment_tokens == 3 and cache.row(1).pinned_tokens == 9
    # The one-row caches are exact (the reference supports any number of sinks, not segments).
    final = steppers[1].decode({0: 5})[0].double()
    torch.testing.assert_close(final, reference(torch.cat([ids, torch.tensor([5])]), start=9)[-1], atol=ATOL, rtol=0)


def test_release_and_reassign_leaves_no_trace(model):
    cache = rows_cache(model, 2)
    old, new, other = stream(50, 5), stream(30, 6), stream(30, 7)
    cache.assign(0), cache.assign(1)
    stepper = Stepper(model, cache)
    stepper.prefill(0, old)
    stepper.prefill(1, other[:1])
    cache.release(0)
    assert cache.assign() == 0  # the lowest free row
    got = [stepper.decode({0: int(new[i]), 1: int(other[i + 1])})[0].clone() for i in range(29)]
    torch.testing.assert_close(torch.stack(got).double(), reference(new[:29]), atol=ATOL, rtol=0)


def test_saved_row_restores_across_rows_and_one_row_caches(model):
    ids = stream(80, 8)
    cache = rows_cache(model, 3)
    cache.assign(0), cache.assign(1)
    stepper = Stepper(model, cache)
    stepper.prefill(1, ids[:40])
    for i in range(40, 70):  # row 1 decodes batched (next to a fresh row 0)
        stepper.decode({1: int(ids[i]), 0: int(ids[i])})
    snapshot = cache.row_state(1)
    single = StreamingCache.from_state(model.config, *snapshot)
    batched_next = stepper.decode({1: int(ids[70])})[1].clone()
    single_next = Stepper(model, single).decode({0: int(ids[70])})[0]
    torch.testing.assert_close(batched_next, single_next, atol=1e-5, rtol=0)
    # The snapshot is a copy: the steps since did not change it. Restored into another row it continues the same.
    row = cache.assign(state=snapshot)
    assert row == 2
    torch.testing.assert_close(stepper.decode({row: int(ids[70])})[row], batched_next, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched_next.double(), reference(ids[:71])[-1], atol=ATOL, rtol=0)


def test_a_spilled_row_comes_back_with_identical_logits(model):
    """Three streams on two rows: the least recently used idle stream is spilled to host memory while another
    decodes, and continues exactly when it comes back."""
    engine = Engine(model, rows_cache(model, 2), chunk_size=8)
    streams = [engine.open(f"s{i}") for i in range(3)]
    prompts = [stream(30, 20 + i).tolist() for i in range(3)]
    first = [
        engine.run_to_end(engine.submit(Request(s, p, 6))).tokens for s, p in zip(streams, prompts[:2], strict=False)
    ]
    assert engine.spills == 0
    busy = engine.submit(Request(streams[1], [7, 8], 40))  # stream 1 decodes ...
    engine.step()
    third = engine.submit(Request(streams[2], prompts[2], 6))  # ... while stream 0 (idle) is spilled for stream 2
    engine.run_to_end(third)
    assert engine.spills == 1 and streams[0].row is None and not busy.done
    again = engine.run_to_end(engine.submit(Request(streams[0], [9], 5)))  # back from host memory
    assert engine.restores == 1
    alone = Engine(model, rows_cache(model, 1))
    solo = alone.open("solo")
    expected = alone.run_to_end(alone.submit(Request(solo, prompts[0], 6))).tokens
    assert first[0] == expected
    assert again.tokens == alone.run_to_end(alone.submit(Request(solo, [9], 5))).tokens  # owed token fed first
    engine.run_to_end(busy)


def test_memory_is_rows_times_one_stream(model):
    cache = rows_cache(model, 5)
    single = rows_cache(model, 1)
    assert cache.nbytes == 5 * single.nbytes == 5 * cache.row_bytes


def test_bad_rows_and_states_are_refused(model):
    cache = rows_cache(model, 2, pinned=6)
    cache.assign(0)
    with pytest.raises(ValueError, match="already holds a stream"):
        cache.assign(0)
    with pytest.raises(ValueError, match="does not exist"):
        cache.row(5)
    with pytest.raises(ValueError, match="not assigned"):
        cache.row(1)
    with pytest.raises(ValueError, match="pinned prefix"):
        cache.assign(1, start_size=7)  # over the pinned capacity
    other = StreamingCache(model.config, START, RECENT + 1, rows=1, dtype=torch.float32, device="cpu")
    Stepper(model, other).prefill(0, stream(5, 1))
    with pytest.raises(ValueError, match="recent tokens"):
        cache.assign(1, state=other.row_state(0))
    assert 1 in cache.free  # a refused state changes nothing
    with pytest.raises(ValueError, match="rows must be"):
        StreamingCache(model.config, START, RECENT, rows=0)
    cache.assign(1)
    with pytest.raises(RuntimeError, match="rows are taken"):
        cache.assign()
    stepper = Stepper(model, cache)
    with pytest.raises(ValueError, match="outside this step"):
        cache.plan_decode({3: 1}, 2)
    with pytest.raises(ValueError, match="pinned prefix is not complete"):
        cache.plan_decode({0: 1}, 2)  # row 0 has seen nothing yet: its first tokens are sinks
    assert stepper.decode({0: 1}).shape[0] == 1  # the stepper feeds such a row in a one-token chunk instead
