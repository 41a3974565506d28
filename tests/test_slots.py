"""Batched independent streams (streaming_llm/slots.py, streaming_llm/scheduler.py).

Every row of a SlotCache, stepped together with rows in other states, must give exactly what its
stream gives alone (the slow reference, or a single-stream StreamingCache).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from reference import SlowStreamingReference

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core.decode import Decoder
from streaming_llm.core.slots import BatchedDecoder, SlotCache
from streaming_llm.runtime.generation import prefill
from streaming_llm.runtime.scheduler import Scheduler

START, RECENT = 4, 12


def stream(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def reference(ids: torch.Tensor) -> torch.Tensor:
    return SlowStreamingReference(tiny_llama(), START, RECENT).logits(ids)


@pytest.fixture(scope="module")
def model():
    return streaming_llm.install(tiny_llama())


def test_rows_in_different_states_stepped_together_equal_each_stream_alone(model):
    """Row 0 is past rebases, row 1 is filling its sinks, row 2 is fresh; row 3 ingests a prompt in
    chunks between the batched steps (it is in the bucket but does not decode: it must stay untouched)."""
    steps = 40
    ids = [stream(60 + steps, 1), stream(2 + steps, 2), stream(steps, 3), stream(70, 4)]
    cache = SlotCache(model.config, 4, START, RECENT)
    for _ in range(4):
        cache.assign()
    prefill(model, cache.row(0), ids[0][:, :60], 16)
    prefill(model, cache.row(1), ids[1][:, :2], 16)
    decoder = BatchedDecoder(model, cache)
    got: list[list[torch.Tensor]] = [[], [], []]
    shifts = set()
    for i in range(steps):
        tokens = {0: int(ids[0][0, 60 + i]), 1: int(ids[1][0, 2 + i]), 2: int(ids[2][0, i])}
        logits = decoder(tokens)
        assert logits.shape[0] == 4  # bucket 4: row 3 rides along without decoding
        for b in range(3):
            got[b].append(logits[b].clone())
        shifts.add(cache.row(0).main.shift)
        if i % 8 == 0:  # row 3: one prefill chunk between decode steps
            chunk = ids[3][:, (i // 8) * 10 : (i // 8 + 1) * 10]
            last3 = prefill(model, cache.row(3), chunk, 10)
    assert len(shifts) >= 2  # row 0 rebased during the batched steps
    torch.testing.assert_close(torch.stack(got[0]).double(), reference(ids[0])[60:], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack(got[1]).double(), reference(ids[1])[2:], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack(got[2]).double(), reference(ids[2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(last3.double(), reference(ids[3][:, :50])[-1], atol=1e-4, rtol=0)
    assert decoder.eager_steps == steps  # CPU: no graphs


def test_release_and_reassign_leaves_no_trace(model):
    cache = SlotCache(model.config, 2, START, RECENT)
    old, new, other = stream(50, 5), stream(30, 6), stream(30, 7)
    cache.assign(0), cache.assign(1)
    prefill(model, cache.row(0), old, 16)
    prefill(model, cache.row(1), other[:, :1], 1)
    cache.release(0)
    assert cache.assign() == 0  # the lowest free row
    assert all(bool((t[:, 0] == 0).all()) for t in (cache.group.keys, cache.group.values, cache.group.pinned))
    decoder = BatchedDecoder(model, cache)
    got = [decoder({0: int(new[0, i]), 1: int(other[0, i + 1])})[0].clone() for i in range(29)]
    torch.testing.assert_close(torch.stack(got).double(), reference(new[:, :29]), atol=1e-4, rtol=0)


def test_saved_row_restores_into_single_stream_cache_and_back(model):
    ids = stream(80, 8)
    cache = SlotCache(model.config, 3, START, RECENT)
    cache.assign(), cache.assign()
    decoder = BatchedDecoder(model, cache)
    prefill(model, cache.row(1), ids[:, :40], 16)
    for i in range(40, 70):  # row 1 decodes batched (next to a fresh row 0)
        decoder({1: int(ids[0, i]), 0: int(ids[0, i])})
    single = StreamingCache.from_state(model.config, *cache.row(1).state())
    batched_next = decoder({1: int(ids[0, 70])})[1].clone()
    single_next = Decoder(model, single)(int(ids[0, 70]))
    torch.testing.assert_close(batched_next, single_next, atol=1e-5, rtol=0)
    # ... and back: a single-stream state restored into a free row continues identically.
    more = Decoder(model, single)
    for i in range(71, 75):
        more(int(ids[0, i]))
    row = cache.assign(state=single.state())
    assert row == 2
    restored_next = decoder({row: int(ids[0, 75])})[row].clone()
    torch.testing.assert_close(restored_next, more(int(ids[0, 75])), atol=1e-5, rtol=0)
    torch.testing.assert_close(restored_next.double(), reference(ids[:, :76])[-1], atol=1e-4, rtol=0)


def test_memory_is_rows_times_one_stream(model):
    cache = SlotCache(model.config, 5, START, RECENT)
    single = StreamingCache(model.config, START, RECENT)
    prefill(model, single, stream(3, 9), 3)
    assert cache.nbytes == 5 * single.nbytes


def test_bad_rows_and_states_are_refused(model):
    cache = SlotCache(model.config, 2, START, RECENT)
    cache.assign(0)
    with pytest.raises(ValueError, match="already holds a stream"):
        cache.assign(0)
    with pytest.raises(ValueError, match="does not exist"):
        cache.row(5)
    with pytest.raises(ValueError, match="not assigned"):
        cache.row(1)
    other = StreamingCache(model.config, START, RECENT + 1)
    prefill(model, other, stream(5, 1), 5)
    with pytest.raises(ValueError, match="recent_size"):
        cache.assign(1, state=other.state())
    with pytest.raises(ValueError, match="rows must be"):
        SlotCache(model.config, 0, START, RECENT)
    cache.assign(1)
    with pytest.raises(RuntimeError, match="rows are taken"):
        cache.assign()


def greedy_alone(model, turns: list[tuple[list[int], int]]) -> list[list[int]]:
    """The expectation: one single-stream cache, fed turn by turn, greedy."""
    cache = StreamingCache(model.config, START, RECENT)
    decoder, out, pending = Decoder(model, cache), [], []
    for prompt, n in turns:
        logits = prefill(model, cache, pending + prompt, 7)
        tokens = [int(logits.argmax())]
        while len(tokens) < n:
            tokens.append(int(decoder(tokens[-1]).argmax()))
        out.append(tokens)
        pending = [tokens[-1]]
    return out


def test_scheduler_interleaves_sessions_with_the_tokens_of_each_alone(model):
    prompts = {s: stream(n, 20 + i)[0].tolist() for i, (s, n) in enumerate((("a", 30), ("b", 3), ("c", 17)))}
    follow = stream(9, 30)[0].tolist()
    scheduler = Scheduler(model, SlotCache(model.config, 3, START, RECENT), chunk_size=7)
    streamed: list[int] = []
    handles = {s: scheduler.submit(s, p, 25, on_token=streamed.append) for s, p in prompts.items()}
    scheduler.step()
    assert handles["a"].tokens == [] and scheduler.running  # "a" needs 5 chunks: others decode meanwhile
    first_b = list(handles["b"])  # iterating drives the scheduler
    scheduler.run()
    second_a = list(scheduler.submit("a", follow, 10))  # the session keeps its row and stream
    assert first_b == handles["b"].tokens and len(streamed) == 75
    assert [handles["a"].tokens, second_a] == greedy_alone(model, [(prompts["a"], 25), (follow, 10)])
    for s in ("b", "c"):
        assert [handles[s].tokens] == greedy_alone(model, [(prompts[s], 25)])
        assert handles[s].finish_reason == "length"


def test_scheduler_evicts_least_recently_used_session_and_cancels(model):
    scheduler = Scheduler(model, SlotCache(model.config, 2, START, RECENT), chunk_size=8)
    for s in ("a", "b"):
        scheduler.submit(s, stream(5, 40)[0].tolist(), 3)
    scheduler.run()
    row_a = scheduler.sessions["a"].row
    scheduler.submit("b", [1, 2], 2)  # "b" becomes the most recently used
    scheduler.run()
    handle = scheduler.submit("c", stream(4, 41)[0].tolist(), 50)
    scheduler.step()
    assert scheduler.sessions["a"].row is None and scheduler.sessions["c"].row == row_a
    scheduler.step()
    scheduler.cancel(handle)
    assert handle.done and handle.finish_reason == "cancelled" and not scheduler.running
    # The cancelled request's tokens stay in the stream: the next request continues after them.
    assert [list(scheduler.submit("c", [3], 4))] == greedy_alone(
        model, [(stream(4, 41)[0].tolist() + handle.tokens + [3], 4)]
    )


def test_rows_with_a_pinned_segment_equal_single_stream_caches(model):
    """A row with an injected segment (memory features) and one without, stepped together."""
    ids = stream(60, 12)
    gen = torch.Generator().manual_seed(3)
    seg_k = [torch.randn(1, 2, 3, 16, generator=gen) for _ in range(2)]
    seg_v = [torch.randn(1, 2, 3, 16, generator=gen) for _ in range(2)]
    cache = SlotCache(model.config, 2, START, RECENT, segment_capacity=3)
    singles = [StreamingCache(model.config, START, RECENT, segment_capacity=3) for _ in range(2)]
    for b, single in enumerate(singles):
        cache.assign(b)
        for c in (cache.row(b), single):
            prefill(model, c, ids[:, :10], 10)
            if b == 0:
                c.set_segment(seg_k, seg_v)
    decoders = [Decoder(model, c) for c in singles]
    batched = BatchedDecoder(model, cache)
    for i in range(10, 60):
        got = batched({0: int(ids[0, i]), 1: int(ids[0, i])})
        for b in range(2):
            torch.testing.assert_close(got[b], decoders[b](int(ids[0, i])), atol=1e-5, rtol=0)
    assert cache.row(0).segment_len == 3 and cache.row(0).main.shift != 0  # rebased with the segment in
