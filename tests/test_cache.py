"""Model-free tests of the ring buffer (cache.py's StreamGroup): slots, sinks, what each query sees, memory."""

from __future__ import annotations

import pytest
import torch

from streaming_llm.core.cache import StreamGroup, check_sizes
from streaming_llm.core.positions import Rope, Window

ROPE = Rope(inv_freq=torch.ones(0, dtype=torch.float64), rotary_dim=0)  # no rotation: keys keep their ids


def tokens(first: int, count: int) -> torch.Tensor:
    """Keys/values (1, 1, count, 4) whose every entry is the token's stream index."""
    return torch.arange(first, first + count, dtype=torch.float32)[None, None, :, None].expand(1, 1, count, 4)


def group_of(start: int, recent: int) -> StreamGroup:
    return StreamGroup(Window(start, recent), ROPE, [0], 0)


def feed(group: StreamGroup, t0: int, count: int, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of one layer, as StreamingCache.update drives it (frame: model position == stream index)."""
    k = tokens(t0, count) if k is None else k
    if not group.initialized:
        group.allocate(k, k)
    plan = group.plan_step(count, t0)
    if plan.mode == "steady":
        group.turn_steady()
    keys, values = group.write(0, k, k)
    group.finish()
    return keys, values


def ids(x: torch.Tensor) -> list[int]:
    return x[0, 0, :, 0].long().tolist()


def expected_visible(t: int, start: int, recent: int) -> list[int]:
    """Stream indices token t attends to: the sinks and the window [t - recent, t]."""
    return sorted(set(range(min(start, t + 1))) | set(range(max(0, t - recent), t + 1)))


@pytest.mark.parametrize(("start", "recent"), [(4, 6), (0, 5), (1, 1), (3, 12)])
def test_token_by_token_each_query_sees_sinks_and_window(start, recent):
    group = group_of(start, recent)
    for t in range(5 * (start + recent) + 3):
        keys, values = feed(group, t, 1)
        assert group.plan.mode == ("steady" if t >= start + recent else "inplace")
        assert sorted(ids(keys)) == expected_visible(t, start, recent)
        assert sorted(ids(values)) == expected_visible(t, start, recent)
    assert group.seen == 5 * (start + recent) + 3


@pytest.mark.parametrize("chunk", [2, 5, 9, 23])
def test_chunks_return_a_working_set_covering_every_query(chunk):
    start, recent = 3, 8
    group = group_of(start, recent)
    t0 = 0
    while t0 < 60:
        keys, _ = feed(group, t0, chunk)
        step = group.plan
        got = ids(keys)
        for t in range(t0, t0 + chunk):  # every query finds all it needs in what was returned
            assert set(expected_visible(t, start, recent)) <= set(got)
        if step.mode == "banded":
            assert got[: step.n_pinned] == list(range(min(start, t0 + chunk)))
            assert got[step.n_pinned :] == list(range(step.rest_start, t0 + chunk))
        t0 += chunk


def test_after_any_chunking_the_buffer_holds_sinks_and_latest_tokens():
    start, recent = 2, 7
    group = group_of(start, recent)
    t0 = 0
    for chunk in [1, 3, 20, 1, 1, 8, 9, 2, 30, 1]:
        feed(group, t0, chunk)
        t0 += chunk
        kept = ids(group.keys[0])
        assert kept[: min(start, t0)] == [0, 1][:t0]
        latest = list(range(max(start, t0 - recent), t0))
        assert set(latest) <= set(kept[start:])  # the latest `recent` tokens are all there


def test_no_per_token_copy_and_static_shapes_once_full():
    group = group_of(4, 16)
    feed(group, 0, 1)
    pointers = (group.keys.data_ptr(), group.values.data_ptr())
    shapes = set()
    for t in range(1, 200):
        keys, values = feed(group, t, 1)
        assert keys.data_ptr() == group.keys.data_ptr()  # a view of the ring, not a copy
        if t > 20:
            shapes.add(tuple(keys.shape))
    assert (group.keys.data_ptr(), group.values.data_ptr()) == pointers
    assert shapes == {(1, 1, 4 + 16 + 1, 4)}


def test_buffer_has_exactly_start_plus_recent_plus_one_slots():
    group = group_of(4, 2000)
    feed(group, 0, 1, torch.zeros(2, 3, 1, 64))
    assert group.keys.shape == (1, 2, 3, 2005, 64)


@pytest.mark.parametrize(
    ("start", "recent", "error"),
    [(-1, 10, ValueError), (4, 0, ValueError), (4, -5, ValueError), (4.0, 10, TypeError), (4, "2000", TypeError)],
)
def test_bad_sizes(start, recent, error):
    with pytest.raises(error):
        check_sizes(start, recent)


def test_warnings_for_sizes_that_hurt_quality():
    with pytest.warns(UserWarning, match="no attention sinks"):
        check_sizes(0, 2000)
    with pytest.warns(UserWarning, match="very small"):
        check_sizes(4, 100)
