"""Model-free tests of the position arithmetic (positions.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from streaming_llm.core.positions import REBASE_FACTOR, Rope, Window

INV_FREQ = 1.0 / (10_000 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
ROPE = Rope(inv_freq=INV_FREQ.double(), rotary_dim=16)


def hf_rotate(x: torch.Tensor, position: int) -> torch.Tensor:
    """Rotate with transformers' own Llama RoPE code (float32 angles, small positions only)."""
    freqs = torch.tensor([float(position)])[:, None] * INV_FREQ[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    q, _ = apply_rotary_pos_emb(x, x, emb.cos()[None], emb.sin()[None])
    return q


def test_rotate_matches_transformers_rope():
    x = torch.randn(1, 2, 1, 16)
    for p in (0, 1, 7, 123):
        torch.testing.assert_close(ROPE.rotate(x, p), hf_rotate(x, p), atol=2e-5, rtol=0)
    # transformers computes angles in float32 (~1e-4 rad off at position 4000); ours are float64.
    torch.testing.assert_close(ROPE.rotate(x, 4000), hf_rotate(x, 4000), atol=5e-4, rtol=0)


@given(a=st.integers(-(10**7), 10**7), b=st.integers(-(10**7), 10**7))
def test_rotations_compose_exactly(a, b):
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(ROPE.rotate(ROPE.rotate(x, a), b), ROPE.rotate(x, a + b), atol=1e-9, rtol=0)


def test_rotate_per_row_and_partial_dims():
    rope = Rope(inv_freq=INV_FREQ[:4].double(), rotary_dim=8)  # rotates 8 of 16 dims
    x = torch.randn(2, 3, 16)
    out = rope.rotate(x, torch.tensor([0, 5, -9]))
    torch.testing.assert_close(out[..., 8:], x[..., 8:])  # the tail is untouched
    torch.testing.assert_close(out[:, 0], x[:, 0])
    torch.testing.assert_close(out[:, 1:2], rope.rotate(x[:, 1:2], 5))
    torch.testing.assert_close(out[:, 2:3], rope.rotate(x[:, 2:3], -9))


def test_in_cache_position():
    w = Window(4, 10)
    assert [w.in_cache_position(t) for t in range(16)] == [*range(14), 14, 14]
    assert w.in_cache_position(10**7) == 14  # never beyond start + recent
    assert w.in_cache_position(10**7, extra_pinned=3) == 17


@given(t0=st.integers(0, 10**7), length=st.integers(1, 300), shift=st.integers(-50, 10**7))
def test_pin_offsets_equal_model_minus_in_cache_position(t0, length, shift):
    w = Window(4, 32)
    m0 = t0 - shift
    offsets = w.pin_offsets(t0, m0, length)
    expected = [(m0 + i) - w.in_cache_position(t0 + i) for i in range(length)]
    assert offsets.tolist() == expected


def test_next_model_position_stays_bounded_over_a_long_stream():
    w = Window(4, 60)
    seen, shift, highest = 0, 0, 0
    for step in range(50_000):
        m = w.next_model_position(seen, shift)
        shift = seen - m  # the frame the cache adopts when the model uses that position
        highest = max(highest, m)
        seen += 1 + (step % 7 == 0) * 20  # a mix of single tokens and chunks
    assert highest <= REBASE_FACTOR * w.capacity + 21
    assert w.next_model_position(10**7, 0) == w.capacity  # a far-away frame rebases


@pytest.mark.parametrize("seen", [0, 3, 64, 65, 10**7])
def test_next_model_position_keeps_frame_when_small(seen):
    w = Window(4, 60)
    shift = seen - 10 if seen >= 10 else 0
    assert w.next_model_position(seen, shift) == seen - shift
