"""What a StreamingCache tells transformers, on every path that asks (issue: faults 1 and 4).

* ``generate()`` continuing a conversation on one cache feeds exactly the new tokens and stays exact;
* a call with nothing new, a padded batch, or a roll-back (assisted decoding) gets a clear error and
  leaves the cache as it was;
* loops that let the model derive positions keep them small only in ``"compact"`` mode (the seed
  API), and our own loops pass small positions explicitly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from reference import SlowStreamingReference

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.enable_streaming_llm import enable_streaming_llm
from streaming_llm.runtime.generation import stream_generate

START, RECENT = 4, 12


def test_generate_continues_a_conversation_feeding_only_new_tokens():
    model = streaming_llm.install(tiny_llama(num_hidden_layers=4))
    cache = StreamingCache(model.config, START, RECENT)
    rng = torch.Generator().manual_seed(0)
    history = torch.zeros(1, 0, dtype=torch.long)
    turns = []
    for _ in range(4):
        prompt = torch.cat([history, torch.randint(0, 128, (1, 5), generator=rng)], dim=1)
        before = cache.seen_tokens
        out = model.generate(
            prompt, past_key_values=cache, max_new_tokens=15, do_sample=False, return_dict_in_generate=True,
            output_scores=True,
        )  # fmt: skip
        # The previous turn's last token (never fed), the 5 new ones, and 14 of the 15 generated.
        assert cache.seen_tokens - before == prompt.shape[1] - max(history.shape[1] - 1, 0) + 14
        assert cache.seen_tokens == out.sequences.shape[1] - 1
        turns.append((prompt.shape[1], torch.stack(out.scores)[:, 0]))
        history = out.sequences
    assert history.shape[1] > 3 * (START + RECENT)  # far past the window
    ref = SlowStreamingReference(tiny_llama(num_hidden_layers=4), START, RECENT).logits(history[:, :-1])
    for length, scores in turns:
        torch.testing.assert_close(scores.double(), ref[length - 1 : length - 1 + 15], atol=1e-4, rtol=0)


def test_generate_with_only_the_new_tokens_is_a_clear_error():
    model = streaming_llm.install(tiny_llama())
    cache = StreamingCache(model.config, START, RECENT)
    model.generate(torch.randint(0, 128, (1, 8)), past_key_values=cache, max_new_tokens=10, do_sample=False)
    seen = cache.seen_tokens
    with pytest.raises(ValueError, match="whole conversation"):
        model.generate(torch.randint(0, 128, (1, 5)), past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert cache.seen_tokens == seen


def test_padded_batch_through_a_plain_forward_is_refused_before_anything_is_written():
    model = streaming_llm.install(tiny_llama())
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    cache = StreamingCache(model.config, START, RECENT)
    with pytest.raises(ValueError, match="padded"):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    assert cache.seen_tokens == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="padded"):
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3)
    # An all-ones mask is no padding: it works and equals no mask at all.
    a = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache).logits
    b = model(input_ids=ids, past_key_values=StreamingCache(model.config, START, RECENT)).logits
    torch.testing.assert_close(a, b)


def test_roll_back_and_beam_search_are_clear_errors():
    model = streaming_llm.install(tiny_llama())
    cache = StreamingCache(model.config, START, RECENT)
    model(input_ids=torch.randint(0, 128, (1, 6)), past_key_values=cache)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)
    with pytest.raises(NotImplementedError, match="one StreamingCache per sequence"):
        model.generate(torch.randint(0, 128, (1, 6)), num_beams=2, past_key_values=StreamingCache(model.config, 4, 8))


@torch.no_grad()
def test_positions_model_derived_absolute_by_default_compact_for_the_seed_api():
    model = streaming_llm.install(tiny_llama())
    ids = torch.randint(0, 128, (1, 6 * (START + RECENT)), generator=torch.Generator().manual_seed(2))
    plain = StreamingCache(model.config, START, RECENT)
    kv_cache = enable_streaming_llm(model, START, RECENT)
    seed = kv_cache.new_cache()
    seen_positions = []
    for i in range(ids.shape[1]):
        model(input_ids=ids[:, i : i + 1], past_key_values=plain)
        seen_positions.append(seed.get_seq_length())
        seed = kv_cache(model(input_ids=ids[:, i : i + 1], past_key_values=seed).past_key_values)
    assert plain.get_seq_length() == plain.seen_tokens == ids.shape[1]  # the truth, for generate()
    assert seed.seen_tokens == ids.shape[1]
    assert max(seen_positions) <= 2 * (START + RECENT)  # small, for endless seed loops


def test_stream_generate_keeps_positions_small(tokenizer, model):
    cache = StreamingCache(model.config, START, RECENT)
    for _ in stream_generate(model, tokenizer, "Once upon a time", cache=cache, max_new_tokens=5 * (START + RECENT)):
        assert cache.next_position() <= 2 * (START + RECENT) + 1
    assert cache.get_seq_length() == cache.seen_tokens
