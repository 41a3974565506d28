"""The original StreamingLLM loop runs unchanged (enable_streaming_llm.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from reference import SlowStreamingReference
from transformers import DynamicCache

from streaming_llm import StreamingCache
from streaming_llm.enable_streaming_llm import enable_streaming_llm

START, RECENT = 4, 28


@torch.no_grad()
def seed_loop(model, kv_cache, prompt: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor, object]:
    """The loop from the original work's README, verbatim apart from the bookkeeping."""
    past_key_values = None
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    tokens, logits = prompt[0].tolist(), []
    for _ in range(steps):
        outputs = model(**inputs, past_key_values=past_key_values, use_cache=True)
        past_key_values = kv_cache(outputs.past_key_values)
        logits.append(outputs.logits[0, -1])
        next_id = outputs.logits[:, -1:].argmax(dim=-1)
        tokens.append(next_id.item())
        inputs = {"input_ids": next_id, "attention_mask": torch.ones_like(next_id)}
    return tokens, torch.stack(logits).double(), past_key_values


def test_seed_loop_runs_unchanged_and_is_exact():
    model = tiny_llama()
    kv_cache = enable_streaming_llm(model, start_size=START, recent_size=RECENT)
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    steps = 4 * (START + RECENT)
    tokens, logits, past = seed_loop(model, kv_cache, prompt, steps)
    assert isinstance(past, StreamingCache)
    assert past.cached_tokens == START + RECENT
    ref = SlowStreamingReference(tiny_llama(), START, RECENT).logits(torch.tensor([tokens[:-1]]))
    torch.testing.assert_close(logits, ref[11:], atol=1e-4, rtol=0)


def test_a_long_first_prompt_is_cut_to_sinks_and_window():
    model = tiny_llama()
    kv_cache = enable_streaming_llm(model, start_size=START, recent_size=RECENT)
    prompt = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1))
    _, _, past = seed_loop(model, kv_cache, prompt, 3)
    assert past.seen_tokens == 102 and past.cached_tokens == START + RECENT


def test_evict_for_space_before_a_block():
    model = tiny_llama()
    kv_cache = enable_streaming_llm(model, start_size=START, recent_size=RECENT)
    past = kv_cache.new_cache()
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for block in ids.split(25, dim=1):
            past = kv_cache.evict_for_space(past, block.shape[1])
            past = kv_cache(model(input_ids=block, past_key_values=past, use_cache=True).past_key_values)
    assert past.seen_tokens == 100
    with pytest.raises(ValueError, match="num_coming"):
        kv_cache.evict_for_space(past, -1)


def test_dynamic_cache_after_streaming_began_is_an_error():
    model = tiny_llama()
    kv_cache = enable_streaming_llm(model, start_size=START, recent_size=RECENT)
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        kv_cache(model(input_ids=prompt, use_cache=True).past_key_values)
        fresh = model(input_ids=prompt, use_cache=True).past_key_values  # past_key_values=None by mistake
    assert isinstance(fresh, DynamicCache)
    with pytest.raises(ValueError, match="after streaming began"):
        kv_cache(fresh)
    kv_cache.reset()  # starting a new stream on purpose is fine
    assert isinstance(kv_cache(fresh), StreamingCache)


def test_cache_from_another_setup_is_an_error():
    model = tiny_llama()
    kv_cache = enable_streaming_llm(model, start_size=START, recent_size=RECENT)
    with pytest.raises(ValueError, match="keeps 4\\+8 tokens"):
        kv_cache(StreamingCache(model.config, 4, 8))
    other = tiny_llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match="another model config"):
        kv_cache(StreamingCache(other.config, START, RECENT))
    with pytest.raises(TypeError, match="expects the cache returned by the model"):
        kv_cache([("k", "v")])


@pytest.mark.parametrize(("start", "recent"), [(-1, 2000), (4, 0)])
def test_bad_sizes_leave_the_model_untouched(start, recent):
    model = tiny_llama()
    with pytest.raises(ValueError):
        enable_streaming_llm(model, start_size=start, recent_size=recent)
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_model_raises_and_is_untouched():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match="learned absolute position embeddings"):
        enable_streaming_llm(model)
    assert model.config._attn_implementation != "streaming_llm"
