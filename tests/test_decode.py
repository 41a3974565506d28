"""The decode step with positions as device tensors (streaming_llm/decode.py, the cache's steady step).

A steady step reads only device tensors, so it compiles once and never recompiles (the property a
CUDA-graph capture needs), and it equals the slow reference across frame rebases.
"""

from __future__ import annotations

import torch
from conftest import tiny_llama
from reference import SlowStreamingReference
from torch._dynamo.testing import CompileCounter

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core.decode import Decoder
from streaming_llm.runtime.generation import prefill

START, RECENT = 4, 12


def stream_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_decoder_equals_reference_across_rebases():
    model = streaming_llm.install(tiny_llama())
    ids = stream_ids(200)
    ref = SlowStreamingReference(tiny_llama(), START, RECENT).logits(ids)
    cache = StreamingCache(model.config, START, RECENT)
    decoder = Decoder(model, cache)
    logits = [prefill(model, cache, ids[:, :5], 5)]
    shifts = set()
    for i in range(5, 200):
        logits.append(decoder(int(ids[0, i])).clone())
        shifts.add(cache.main.shift)
    assert len(shifts) >= 5  # several rebases happened
    assert cache.next_position() <= 2 * (START + RECENT)
    torch.testing.assert_close(torch.stack(logits).double(), ref[4:], atol=1e-4, rtol=0)


@torch.no_grad()
def test_steady_step_compiles_once_over_300_steps_and_matches_eager():
    """No host value in a steady step: one compiled graph serves every step, across rebases."""
    model = streaming_llm.install(tiny_llama())
    ids = stream_ids(340)
    eager_cache, compiled_cache = (StreamingCache(model.config, START, RECENT) for _ in range(2))
    for cache in (eager_cache, compiled_cache):
        prefill(model, cache, ids[:, :20], 20)
    eager = Decoder(model, eager_cache, cuda_graphs=False)
    token, position = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)

    def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return model(input_ids=token, position_ids=position, cache=compiled_cache, logits_to_keep=1).logits

    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=False)
    shifts = set()
    for i in range(20, 320):
        m = compiled_cache.next_position()
        assert compiled_cache.prepare_decode(m)  # steady: only device scalars change
        token.fill_(int(ids[0, i]))
        position.fill_(m)
        got = compiled(token, position)[0, -1]
        torch.testing.assert_close(got, eager(int(ids[0, i])), atol=1e-5, rtol=0)
        shifts.add(compiled_cache.main.shift)
    assert len(shifts) >= 10
    assert counter.frame_count == 1  # compiled once: no recompiles, no graph breaks (fullgraph)


def test_steady_steps_replace_only_device_scalars():
    """The plan of a steady step keeps its views fixed; only the slot and rotation tensors change."""
    model = streaming_llm.install(tiny_llama())
    cache = StreamingCache(model.config, START, RECENT)
    ids = stream_ids(70)
    prefill(model, cache, ids[:, :40], 40)
    decoder = Decoder(model, cache, cuda_graphs=False)
    layouts, slots = set(), []
    for i in range(40, 70):
        decoder(int(ids[0, i]))
        assert cache.main.plan.mode == "steady"
        layouts.add(cache.layout())
        slots.append(int(cache.main.slot_index))
    assert len(layouts) == 1
    assert sorted(set(slots)) == list(range(START, START + RECENT + 1))  # every ring slot in turn
