"""The stepper's decode step (streaming_llm/core/stepper.py): positions and slots as device tensors.

A decode step reads only device tensors, so it compiles once and never recompiles (the property a
CUDA-graph capture needs), its captured layout stays the same step after step, and it equals the
slow reference across frame rebases.
"""

from __future__ import annotations

import torch
from conftest import tiny_llama
from reference import SlowStreamingReference
from torch._dynamo.testing import CompileCounter

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core.stepper import Stepper, bucket_for, capturable_experts

START, RECENT = 4, 12


def stream_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def one_row(model) -> StreamingCache:
    return StreamingCache(model.config, START, RECENT, rows=1, dtype=torch.float32, device="cpu")


def test_decode_equals_reference_across_rebases():
    model = streaming_llm.install(tiny_llama())
    ids = stream_ids(200)
    ref = SlowStreamingReference(tiny_llama(), START, RECENT).logits(ids[None])
    cache = one_row(model)
    stepper = Stepper(model, cache)
    logits = [stepper.prefill(0, ids[:5])]
    positions = []
    for i in range(5, 200):
        logits.append(stepper.decode({0: int(ids[i])})[0].clone())
        positions.append(cache.next_position())
    assert sum(b < a for a, b in zip(positions, positions[1:], strict=False)) >= 5  # several rebases happened
    assert max(positions) <= 2 * (START + RECENT) + 1
    torch.testing.assert_close(torch.stack(logits).double(), ref[4:], atol=1e-4, rtol=0)


@torch.no_grad()
def test_decode_step_compiles_once_over_300_steps_and_matches_eager():
    """No host value in a decode step: one compiled graph serves every step, across rebases."""
    model = streaming_llm.install(tiny_llama())
    ids = stream_ids(340)
    eager_cache, compiled_cache = one_row(model), one_row(model)
    eager = Stepper(model, eager_cache, cuda_graphs=False)
    compiled = Stepper(model, compiled_cache, cuda_graphs=False)
    counter = CompileCounter()
    compiled._compiled = torch.compile(compiled._forward, backend=counter, fullgraph=True, dynamic=False)
    for stepper in (eager, compiled):
        stepper.prefill(0, ids[:20])
    positions = set()
    for i in range(20, 320):
        got = compiled.decode({0: int(ids[i])})[0]
        torch.testing.assert_close(got, eager.decode({0: int(ids[i])})[0], atol=1e-5, rtol=0)
        positions.add(compiled_cache.next_position())
    assert len(positions) < 300 // 10  # positions stayed small: many rebases
    assert counter.frame_count == 1  # compiled once: no recompiles, no graph breaks (fullgraph)


def test_decode_steps_keep_one_layout():
    """Once the ring is full, the plan's layout (what a captured graph depends on) is the same every step."""
    model = streaming_llm.install(tiny_llama())
    cache = one_row(model)
    ids = stream_ids(70)
    stepper = Stepper(model, cache)
    stepper.prefill(0, ids[:40])
    keys, slots = set(), []
    for i in range(40, 70):
        plan = cache.plan_decode({0: int(ids[i])}, 1)
        keys.add(plan.key)
        slots.append(int(cache._host[2, 0]))  # the write slot of row 0 (first group field)
        cache.end_step()
    assert len(keys) == 1
    assert sorted(set(slots)) == list(range(START, START + RECENT + 1))  # every ring slot in turn


def test_buckets():
    assert [bucket_for(n, 64) for n in (1, 2, 3, 5, 9, 17, 33, 64)] == [1, 2, 4, 8, 16, 32, 64, 64]
    assert bucket_for(3, 3) == 3 and bucket_for(300, 1000) == 512 and bucket_for(100, 100) == 100


def test_capture_runs_experts_through_a_capturable_forward_and_puts_the_model_s_back():
    """Mixture-of-experts layers are captured through transformers' batched_mm experts (their default grouped_mm
    reads the host outside bfloat16: seen on the H200), which computes the same MLP; the model keeps its own."""
    from test_architectures import CASES

    moe = next(c for c in CASES if c.name == "Qwen3-MoE").model()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = moe(input_ids=ids).logits
        with capturable_experts(moe):
            assert moe.get_experts_implementation() == {"": "batched_mm"}
            batched = moe(input_ids=ids).logits
    assert moe.get_experts_implementation() == {"": "grouped_mm"}
    torch.testing.assert_close(batched, own, atol=1e-5, rtol=0)
    with capturable_experts(moe.bfloat16()):  # grouped_mm captures in bfloat16: left as it is
        assert moe.get_experts_implementation() == {"": "grouped_mm"}
    dense = tiny_llama()
    with capturable_experts(dense):  # no experts: nothing to switch
        assert not type(dense)._can_set_experts_implementation()
