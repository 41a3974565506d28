"""StreamingCache + streaming attention against the independent slow reference (tests/reference.py).

Tiny random Llama, fp32, over more than 3x (start + recent) tokens: token by token, in chunks of
many sizes (including chunks longer than the window), through ``generate()``, and after ten
million simulated tokens.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_llama
from reference import SlowStreamingReference
from transformers import DynamicCache

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core.compat import cache_kwargs

ATOL = 1e-4
START, RECENT = 4, 28
N = 3 * (START + RECENT) + 11  # > 3x the cache


@functools.cache
def reference_logits(start: int, recent: int, n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, reference logits) for a tiny Llama; cached across tests."""
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    return ids, SlowStreamingReference(model, start, recent).logits(ids)


@torch.no_grad()
def stream(model, cache: StreamingCache, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Feed ids through model + cache in the given chunk sizes; return all logits (n, vocab)."""
    out, i = [], 0
    for size in chunks:
        if i >= ids.shape[1]:
            break
        out.append(model(input_ids=ids[:, i : i + size], past_key_values=cache, use_cache=True).logits[0])
        i += size
    assert i >= ids.shape[1]
    return torch.cat(out).double()


def chunks_of(size: int, n: int = N) -> list[int]:
    return [size] * (-(-n // size))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 31, 32, 33, 50, N])
def test_chunked_equals_reference(llama, size):
    ids, ref = reference_logits(START, RECENT)
    got = stream(llama, StreamingCache(llama.config, START, RECENT), ids, chunks_of(size))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_irregular_chunks_equal_reference(llama):
    ids, ref = reference_logits(START, RECENT)
    schedule = [1, 1, 5, 40, 1, 2, 33, 1, 1, 17, 3, 64]
    got = stream(llama, StreamingCache(llama.config, START, RECENT), ids, schedule)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("start", "recent"), [(0, 32), (1, 15), (8, 8), (4, 1)])
@pytest.mark.parametrize("size", [1, 9, 100])
def test_other_window_shapes(llama, start, recent, size):
    n = 3 * (start + recent) + 11
    ids, ref = reference_logits(start, recent, n)
    got = stream(llama, StreamingCache(llama.config, start, recent), ids, chunks_of(size, n))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_generate_greedy_matches_reference(llama):
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = StreamingCache(llama.config, START, RECENT)
    new = 10 * (START + RECENT)  # far past the window
    out = llama.generate(
        prompt, past_key_values=cache, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
        output_scores=True,
    )  # fmt: skip
    assert out.sequences.shape[1] == 40 + new
    ref = SlowStreamingReference(tiny_llama(), START, RECENT).logits(out.sequences[:, :-1])[39:]
    torch.testing.assert_close(torch.stack(out.scores)[:, 0].double(), ref, atol=ATOL, rtol=0)
    assert torch.equal(ref.argmax(-1), out.sequences[0, 40:])  # greedy tokens identical
    assert cache.seen_tokens == 40 + new - 1


def test_generate_accepts_the_new_cache_keyword(llama):
    prompt = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    a = llama.generate(prompt, past_key_values=StreamingCache(llama.config, 4, 8), max_new_tokens=30, do_sample=False)
    # `cache=` where the installed transformers has it (>= 5.24), `past_key_values=` before.
    b = llama.generate(
        prompt, **cache_kwargs(llama, StreamingCache(llama.config, 4, 8)), max_new_tokens=30, do_sample=False
    )
    assert torch.equal(a, b)


@pytest.mark.parametrize("size", [1, 13])
def test_exact_after_ten_million_tokens(llama, size):
    ids, ref = reference_logits(START, RECENT)
    # The model derives positions from get_seq_length(): "compact" keeps them small (what the seed API does).
    cache = StreamingCache(llama.config, START, RECENT, positions="compact")
    head = 2 * (START + RECENT)  # stream past the first eviction, then jump
    first = stream(llama, cache, ids[:, :head], chunks_of(1, head))
    # Pretend 10M more tokens streamed past and were evicted: every kept token keeps its slot and model
    # position, exactly the state a real stream of that many more tokens leaves (the kept tokens being the same).
    cache.fast_forward(10_000_000)
    shift = cache.main.rows[0].shift
    rest = stream(llama, cache, ids[:, head:], chunks_of(size, N - head))
    assert cache.seen_tokens > 10_000_000
    assert cache.main.rows[0].shift != shift  # the frame was rebased after the jump, at 10M
    assert cache.get_seq_length() <= 2 * (START + RECENT) + size
    torch.testing.assert_close(torch.cat([first, rest]), ref, atol=ATOL, rtol=0)


def test_positions_stay_small_and_memory_flat_over_ten_windows(llama):
    cache = StreamingCache(llama.config, START, RECENT, positions="compact")
    ids = torch.randint(0, 128, (1, 10 * (START + RECENT)), generator=torch.Generator().manual_seed(3))
    sizes, positions = set(), []
    with torch.no_grad():
        for i in range(ids.shape[1]):
            positions.append(cache.get_seq_length())
            llama(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            sizes.add(cache.nbytes)
    assert len(sizes) == 1  # allocated once, never grows
    per_token = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv_heads * head_dim * fp32 bytes
    # ring + sinks + one scratch slot, + the canonical sink keys
    assert sizes.pop() == per_token * (START + RECENT + 2) + 2 * 2 * 16 * 4 * START
    assert max(positions) <= 2 * (START + RECENT)
    assert cache.evicted_tokens == ids.shape[1] - (START + RECENT)


def test_batch_rows_are_independent_streams(llama):
    ids = torch.randint(0, 128, (2, N), generator=torch.Generator().manual_seed(4))
    got = []
    cache = StreamingCache(llama.config, START, RECENT)
    with torch.no_grad():
        for i in range(0, N, 10):
            got.append(llama(input_ids=ids[:, i : i + 10], past_key_values=cache).logits)
    got = torch.cat(got, dim=1).double()
    for row in range(2):
        ref = SlowStreamingReference(tiny_llama(), START, RECENT).logits(ids[row : row + 1])
        torch.testing.assert_close(got[row], ref, atol=ATOL, rtol=0)


def test_explicit_positions_in_a_new_frame(llama):
    """Positions chosen by the caller (e.g. absolute ones) are honoured: the ring is re-framed."""
    ids, ref = reference_logits(START, RECENT)
    cache = StreamingCache(llama.config, START, RECENT)
    first = stream(llama, cache, ids[:, :70], chunks_of(1, 70))
    with torch.no_grad():
        pos = torch.arange(5000, 5000 + N - 70)[None]  # an arbitrary, far frame
        rest = llama(input_ids=ids[:, 70:], position_ids=pos, past_key_values=cache).logits[0].double()
    torch.testing.assert_close(torch.cat([first, rest]), ref, atol=ATOL, rtol=0)


def test_non_contiguous_positions_are_rejected(llama):
    cache = StreamingCache(llama.config, START, RECENT)
    with pytest.raises(ValueError, match="contiguous position ids"):
        llama(input_ids=torch.tensor([[1, 2, 3]]), position_ids=torch.tensor([[0, 2, 5]]), past_key_values=cache)


def test_streaming_model_is_plain_sdpa_with_other_caches():
    """Install first, then use ordinary caches; and go back to an ordinary cache after streaming."""
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the ordinary path must honour it
    plain = tiny_llama()
    streaming = streaming_llm.install(tiny_llama())
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(streaming(input_ids=ids, attention_mask=mask).logits, expected)
        streaming(input_ids=ids[:1], past_key_values=StreamingCache(streaming.config, 4, 8))
        dynamic = DynamicCache(config=streaming.config)
        a = streaming(input_ids=ids[:, :12], attention_mask=mask[:, :12], past_key_values=dynamic).logits
        b = streaming(input_ids=ids[:, 12:], attention_mask=mask, past_key_values=dynamic).logits
        torch.testing.assert_close(torch.cat([a, b], dim=1), expected, atol=1e-5, rtol=0)
    out_plain = plain.generate(ids[:1], max_new_tokens=10, do_sample=False)
    assert torch.equal(streaming.generate(ids[:1], max_new_tokens=10, do_sample=False), out_plain)


def test_cache_on_a_model_without_streaming_attention_fails_before_touching_it():
    model = tiny_llama()  # not installed
    cache = StreamingCache(model.config, 4, 8)
    with pytest.raises(RuntimeError, match="needs the streaming attention"):
        model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache)
    assert cache.seen_tokens == 0
    streaming_llm.install(model)  # the other order: install after creating the cache
    model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache)
    assert cache.seen_tokens == 3


def test_cache_from_another_model_is_rejected(llama):
    with torch.no_grad():
        dynamic = llama(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True).past_key_values
    cache = StreamingCache.from_dynamic(llama.config, dynamic, 4, 8)  # holds 2 kv heads
    wider = streaming_llm.install(tiny_llama(num_key_value_heads=4))
    with pytest.raises(ValueError, match="belongs to one model"):
        wider(input_ids=torch.tensor([[1, 2]]), past_key_values=cache)
    assert cache.seen_tokens == 3
    with pytest.raises(ValueError, match="built for a model with 2 layers"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), layer_idx=5)


def test_unsupported_architecture_names_the_supported_list():
    from transformers import BloomConfig, GPT2Config

    with pytest.raises(NotImplementedError, match=r"gpt2.*learned absolute.*Supported: Llama \(llama\), Mistral"):
        StreamingCache(GPT2Config(), 4, 8)
    with pytest.raises(NotImplementedError, match=r"bloom.*ALiBi"):
        StreamingCache(BloomConfig(), 4, 8)


def test_unknown_layer_types_are_rejected():
    config = tiny_llama().config
    config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(NotImplementedError, match="layer types"):
        StreamingCache(config, 4, 8)


def test_from_dynamic_then_stream_equals_reference(llama):
    """A prompt processed by a plain forward, then streamed: exact while the prompt fits the cache."""
    ids, ref = reference_logits(START, RECENT)
    prompt = START + RECENT - 2
    with torch.no_grad():
        out = llama(input_ids=ids[:, :prompt], use_cache=True)
    cache = StreamingCache.from_dynamic(llama.config, out.past_key_values, START, RECENT)
    rest = stream(llama, cache, ids[:, prompt:], chunks_of(1, N - prompt))
    torch.testing.assert_close(torch.cat([out.logits[0].double(), rest]), ref, atol=ATOL, rtol=0)
