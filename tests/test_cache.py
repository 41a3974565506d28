"""Model-free tests of the ring buffer (cache.py's LayerGroup): slots, sinks, what each query sees, memory."""

from __future__ import annotations

import pytest
import torch

from streaming_llm.core.cache import DecodePlan, LayerGroup, check_sizes
from streaming_llm.core.positions import Rope, Window

ROPE = Rope(inv_freq=torch.ones(0, dtype=torch.float64), rotary_dim=0)  # no rotation: keys keep their ids


def tokens(first: int, count: int) -> torch.Tensor:
    """Keys/values (1, 1, count, 4) whose every entry is the token's stream index."""
    return torch.arange(first, first + count, dtype=torch.float32)[None, None, :, None].expand(1, 1, count, 4)


def group_of(start: int, recent: int, rows: int = 1, heads: int = 1, dim: int = 4) -> LayerGroup:
    group = LayerGroup(Window(start, recent), ROPE, [0], 0, start)
    group.allocate(rows, heads, dim, dim, torch.float32, "cpu")
    for b in range(rows):
        group.clear_row(b, Window(start, recent))
    return group


def feed(group: LayerGroup, t0: int, count: int, k: torch.Tensor | None = None):
    """One chunk of one layer on row 0, as StreamingCache.update drives it (model position == stream index)."""
    k = tokens(t0, count) if k is None else k
    plan = group.plan_chunk(range(0, 1), count, t0)
    keys, values = group.write_chunk(plan, 0, k, k)
    return plan, keys, values


def ids(x: torch.Tensor) -> list[int]:
    return x[0, 0, :, 0].long().tolist()


def expected_visible(t: int, start: int, recent: int) -> list[int]:
    """Stream indices token t attends to: the sinks and the window [t - recent, t]."""
    return sorted(set(range(min(start, t + 1))) | set(range(max(0, t - recent), t + 1)))


@pytest.mark.parametrize(("start", "recent"), [(4, 6), (0, 5), (1, 1), (3, 12)])
def test_token_by_token_each_query_sees_sinks_and_window(start, recent):
    group = group_of(start, recent)
    for t in range(5 * (start + recent) + 3):
        plan, keys, values = feed(group, t, 1)
        assert plan.mode == "view"
        assert sorted(ids(keys)) == expected_visible(t, start, recent)
        assert sorted(ids(values)) == expected_visible(t, start, recent)
    assert group.rows[0].seen == 5 * (start + recent) + 3


@pytest.mark.parametrize("chunk", [2, 5, 9, 23])
def test_chunks_return_a_working_set_covering_every_query(chunk):
    start, recent = 3, 8
    group = group_of(start, recent)
    t0 = 0
    while t0 < 60:
        step, keys, _ = feed(group, t0, chunk)
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
        _, keys, values = feed(group, t, 1)
        assert keys.data_ptr() == group.keys.data_ptr()  # a view of the ring, not a copy
        if t > 20:
            shapes.add(tuple(keys.shape))
    assert (group.keys.data_ptr(), group.values.data_ptr()) == pointers
    assert shapes == {(1, 1, 4 + 16 + 1, 4)}


def test_buffer_has_exactly_start_plus_recent_plus_one_slots_and_a_scratch_slot():
    group = group_of(4, 2000, rows=2, heads=3, dim=64)
    assert group.keys.shape == (1, 2, 3, 2005 + 1, 64) and group.slots == 2005


@pytest.mark.parametrize(("start", "recent"), [(4, 6), (0, 5), (2, 1)])
def test_decode_steps_write_each_ring_slot_and_see_exactly_sinks_and_window(start, recent):
    """Rows 0 and 1 decode one token per step (row 1 starts later); row 2 rides along and must not change."""
    group = group_of(start, recent, rows=3)
    for b in range(3):
        feed_row(group, b, 0, start)  # the pinned prefix comes in a chunk
    idle = (group.keys[0, 2].clone(), group.values[0, 2].clone())
    for t in range(start, 6 * (start + recent)):
        fields = [group.decode_fields(0, t), group.decode_fields(1, t - 1) if t > start else group.idle_fields(1),
                  group.idle_fields(2)]  # fmt: skip
        slot = torch.tensor([f[0] for f in fields])
        plan = DecodePlan(3, None, 0, torch.tensor([f[2] for f in fields]), torch.tensor([f[3] for f in fields]))
        new = torch.stack([tokens(t, 1)[0], tokens(t - 1, 1)[0], tokens(-7, 1)[0]])
        keys, _ = group.write_decode(plan, 0, slot, new, new)
        for b, u in ((0, t), (1, t - 1)):
            if b == 1 and t == start:
                continue
            lo, hi = fields[b][2], fields[b][3]
            assert sorted(keys[b, 0, lo:hi, 0].long().tolist()) == expected_visible(u, start, recent)
    assert torch.equal(group.keys[0, 2, :, : group.slots], idle[0][:, : group.slots])  # the idle row is untouched
    assert torch.equal(group.values[0, 2, :, : group.slots], idle[1][:, : group.slots])


def feed_row(group: LayerGroup, b: int, t0: int, count: int) -> None:
    if count:
        plan = group.plan_chunk(range(b, b + 1), count, t0)
        k = tokens(t0, count)
        group.write_chunk(plan, 0, k, k)


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
