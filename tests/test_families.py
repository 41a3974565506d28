"""The model families of tests/test_architectures.py as rows of one multi-stream cache, and a control per mechanism.

* Rows: for every family, three rows in different states (one far past the window, one still filling its
  sinks, one fresh) are decoded together by the :class:`~streaming_llm.core.stepper.Stepper`, and each row
  must equal the slow reference of its own stream (tests/reference.py).
* Mixture of experts: the tiny MoE models really route tokens to different experts (so the tests above
  exercise routing), and the cache is that of the attention around it.
* Captured decode: one family per mechanism, its decode step compiled with ``torch.compile(fullgraph=True)``
  compiles once over 60 steps (rebases included) and equals the eager step: nothing in it reads a host value,
  the property the CUDA-graph capture on a GPU needs (tests/test_families_cuda.py runs that).
* Controls: each mechanism's handling, switched off in the product, makes the comparison with the reference
  fail, so the tests would catch a mistake: NoPE layers rotated as if they had RoPE, interleaved RoPE turned
  "rotate_half" style, latent attention's queries turned back on the wrong dims. (Learned sinks have theirs in
  tests/test_learned_sinks.py.)
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from reference import SlowStreamingReference
from test_architectures import CASES, Case, N, reference, stream
from torch._dynamo.testing import CompileCounter

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core import architectures
from streaming_llm.core import cache as cache_module
from streaming_llm.core.stepper import Stepper

ATOL = 1e-4


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


@pytest.mark.parametrize("family", CASES, ids=[c.name for c in CASES])
def test_rows_in_different_states_decoded_together_equal_the_reference(family):
    model = streaming_llm.install(family.model())
    gen = torch.Generator().manual_seed(7)
    prefills, steps = (30, 2, 0), 18
    ids = [torch.randint(3, 128, (p + steps,), generator=gen) for p in prefills]
    cache = StreamingCache(model.config, family.start, family.recent, rows=3, dtype=torch.float32, device="cpu")
    for b in range(3):
        cache.assign(b)
    stepper = Stepper(model, cache)
    for b, p in enumerate(prefills):
        if p:
            stepper.prefill(b, ids[b][:p])
    got: list[list[torch.Tensor]] = [[], [], []]
    for i in range(steps):
        logits = stepper.decode({b: int(ids[b][prefills[b] + i]) for b in range(3)})
        for b in range(3):
            got[b].append(logits[b].double())
    assert stepper.max_batch >= 2  # rows were decoded together
    for b, p in enumerate(prefills):
        ref = SlowStreamingReference(family.model(), family.start, family.recent).logits(ids[b][None])[p:]
        torch.testing.assert_close(torch.stack(got[b]), ref, atol=ATOL, rtol=0, msg=lambda m, b=b: f"row {b}: {m}")


MOE = [c for c in CASES if "mixture of experts" in c.notes]


@pytest.mark.parametrize("family", MOE, ids=[c.name for c in MOE])
def test_mixture_of_experts_models_route_tokens_to_different_experts(family):
    """Every MoE layer picks more than one distinct set of experts over the test stream, the same ones whether
    the stream is fed token by token or in chunks (routing is per token; the cache never sees it)."""
    model = streaming_llm.install(family.model())
    ids, _ = reference(family.name)
    routes: dict[str, list[torch.Tensor]] = {}

    def record(name):
        def hook(module, args):
            index = args[1]  # experts(hidden_states, top_k_index, top_k_weights)
            routes.setdefault(name, []).append(index.sort(dim=-1).values)

        return hook

    experts = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Experts")]
    handles = [m.register_forward_pre_hook(record(n)) for n, m in experts]
    assert handles, "no experts module found"
    by_size = {}
    for size in (1, 7):
        routes.clear()
        stream(model, StreamingCache(model.config, family.start, family.recent), ids, size)
        by_size[size] = {name: torch.cat(chosen) for name, chosen in routes.items()}
    for handle in handles:
        handle.remove()
    for name, chosen in by_size[1].items():
        assert chosen.shape[0] == N
        assert len({tuple(row.tolist()) for row in chosen}) > 1, f"{name} always picks the same experts"
        assert torch.equal(chosen, by_size[7][name])


@pytest.mark.parametrize("name", ["gpt-oss", "DeepSeek-V3", "DeepSeek-V2", "SmolLM3", "Cohere 2 (Command R7B)"])
@torch.no_grad()
def test_seed_loop_takes_a_dynamic_cache_over(name):
    """The original loop: the prompt runs on a DynamicCache (latent attention: latents and RoPE keys), which the
    seed API's kv_cache takes over; greedy decoding then continues exactly as the reference."""
    from streaming_llm.enable_streaming_llm import enable_streaming_llm

    family = case(name)
    model = family.model()
    kv_cache = enable_streaming_llm(model, start_size=family.start, recent_size=family.recent)
    prompt = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    past, tokens, logits = None, prompt[0].tolist(), []
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    for _ in range(40):
        out = model(**inputs, past_key_values=past, use_cache=True)
        past = kv_cache(out.past_key_values)
        logits.append(out.logits[0, -1].double())
        next_id = out.logits[:, -1:].argmax(dim=-1)
        tokens.append(int(next_id))
        inputs = {"input_ids": next_id, "attention_mask": torch.ones_like(next_id)}
    assert isinstance(past, StreamingCache) and past.evicted_tokens > 0
    expected = SlowStreamingReference(family.model(), family.start, family.recent).logits(torch.tensor([tokens[:-1]]))
    torch.testing.assert_close(torch.stack(logits), expected[9:], atol=ATOL, rtol=0)


CAPTURED = ["gpt-oss", "Mixtral (sliding window)", "SmolLM3", "DeepSeek-V3", "Qwen3-Next", "LFM2", "Falcon-H1"]


@pytest.mark.parametrize("name", CAPTURED)
@torch.no_grad()
def test_decode_step_compiles_once_and_matches_eager(name):
    family = case(name)
    model = streaming_llm.install(family.model())
    ids = torch.randint(3, 128, (80,), generator=torch.Generator().manual_seed(0))
    caches = [StreamingCache(model.config, family.start, family.recent, rows=1, dtype=torch.float32, device="cpu")
              for _ in range(2)]  # fmt: skip
    eager, compiled = (Stepper(model, c, cuda_graphs=False) for c in caches)
    counter = CompileCounter()
    compiled._compiled = torch.compile(compiled._forward, backend=counter, fullgraph=True, dynamic=False)
    for stepper in (eager, compiled):
        stepper.prefill(0, ids[:20])
    positions = set()
    for t in ids[20:]:
        torch.testing.assert_close(compiled.decode({0: int(t)})[0], eager.decode({0: int(t)})[0], atol=1e-5, rtol=0)
        positions.add(caches[1].next_position())
    assert max(positions) < 60  # rebased on the way
    assert counter.frame_count == 1


# -- controls --------------------------------------------------------------------------------------------------
def differs_from_reference(family: Case, size: int) -> float:
    """Largest logit difference from the reference, fed in chunks of ``size`` (absolute positions, no rebase)."""
    ids, ref = reference(family.name)
    model = streaming_llm.install(family.model())
    got = stream(model, StreamingCache(model.config, family.start, family.recent), ids, size)
    return float((got - ref).abs().max())


def stepped_differs_from_reference(family: Case) -> float:
    """The same, fed by the stepper (small positions: the frame is rebased, re-rotating every kept key)."""
    ids, ref = reference(family.name)
    model = streaming_llm.install(family.model())
    cache = StreamingCache(model.config, family.start, family.recent, rows=1, dtype=torch.float32, device="cpu")
    stepper = Stepper(model, cache)
    got = [stepper.prefill(0, ids[0, :5])]
    got += [stepper.decode({0: int(t)})[0].clone() for t in ids[0, 5:]]
    assert cache.next_position() < N - 1  # rebased
    return float((torch.stack(got).double() - ref[4:]).abs().max())


@pytest.mark.parametrize("size", [1, 60])
def test_control_nope_layers_rotated_as_if_they_had_rope_is_caught(monkeypatch, size):
    family = case("SmolLM3")
    assert differs_from_reference(family, size) < ATOL
    monkeypatch.setattr(architectures, "_no_rope_layers", lambda config, model_type, types: set())
    assert differs_from_reference(family, size) > 2 * ATOL


def test_control_interleaved_rope_turned_rotate_half_style_is_caught(monkeypatch):
    """GLM-4 turns its pinned keys (chunks of 60); Cohere 2's RoPE layers are sliding layers, whose keys turn only
    when the frame is rebased (the stepper)."""
    glm, cohere = case("GLM-4"), case("Cohere 2 (Command R7B)")
    assert differs_from_reference(glm, 60) < ATOL and stepped_differs_from_reference(cohere) < ATOL
    monkeypatch.setattr(architectures, "INTERLEAVED_ROPE", ())
    assert differs_from_reference(glm, 60) > 2 * ATOL
    assert stepped_differs_from_reference(cohere) > 2 * ATOL


@pytest.mark.parametrize("name", ["DeepSeek-V3", "DeepSeek-V2"])
def test_control_latent_queries_turned_back_on_the_wrong_dims_is_caught(monkeypatch, name):
    """Chunks crossing the eviction point turn each query back for the pinned keys: on its RoPE dims, which in
    latent attention come after the no-RoPE dims. Turning the first dims instead must fail."""
    family = case(name)
    assert differs_from_reference(family, 60) < ATOL
    describe = cache_module.describe

    def wrong_offset(config):
        spec = describe(config)
        return replace(spec, layers=tuple(replace(layer, query_rope=None) for layer in spec.layers))

    monkeypatch.setattr(cache_module, "describe", wrong_offset)
    assert differs_from_reference(family, 60) > 2 * ATOL


def test_latent_attention_cache_holds_the_latent_and_the_rope_key_only():
    """The cache stores, per layer and token, one latent of kv_lora_rank and one RoPE key of qk_rope_head_dim,
    not the expanded keys and values of every head."""
    family = case("DeepSeek-V3")
    model = streaming_llm.install(family.model())
    cache = StreamingCache(model.config, family.start, family.recent)
    stream(model, cache, reference(family.name)[0][:, :20], 7)
    config = model.config
    group = cache.groups[0]
    assert group.keys.shape[2:] == (1, group.slots + 1, config.qk_rope_head_dim)
    assert group.values.shape[2:] == (1, group.slots + 1, config.kv_lora_rank)
    per_token = 2 * (group.slots + 1) * (config.qk_rope_head_dim + config.kv_lora_rank) * 4  # both layers, fp32
    pinned = 2 * group.ring_base * config.qk_rope_head_dim * 4  # canonical pinned RoPE keys
    assert cache.nbytes == per_token + pinned
