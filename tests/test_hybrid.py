"""Hybrid recurrent models (Qwen3-Next, LFM2, Falcon-H1): recurrent states kept per row next to streamed attention.

The recurrent layers' conv windows and recurrent states are constant in size; the cache keeps one slice per row
(streaming_llm/core/cache.py, ``RecurrentStates``) and streams only the attention layers. These tests check what
the architecture tests do not: a row riding along in a decode bucket keeps its state, rows spill and come back,
the seed API takes a DynamicCache's states over, memory stays constant, and controls (a state dropped, an idle
row not protected) make the comparison with the slow reference (tests/reference.py) fail.
"""

from __future__ import annotations

import pytest
import torch
from reference import SlowStreamingReference
from test_architectures import CASES, Case

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core import cache as cache_module
from streaming_llm.core.stepper import Stepper
from streaming_llm.enable_streaming_llm import enable_streaming_llm
from streaming_llm.runtime.engine import Engine, Request

ATOL = 1e-4
HYBRID = [c for c in CASES if c.notes.startswith("hybrid")]


def family(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def reference(case: Case, tokens: torch.Tensor) -> torch.Tensor:
    return SlowStreamingReference(case.model(), case.start, case.recent).logits(tokens[None])


def rows_cache(model, case: Case, rows: int) -> StreamingCache:
    return StreamingCache(model.config, case.start, case.recent, rows=rows, dtype=torch.float32, device="cpu")


def bucket_with_an_idle_row(case: Case) -> list[torch.Tensor]:
    """Rows 0-2 decode together in a bucket of 4 while row 3 rides along without decoding and is fed prompt chunks
    between the steps. Returns, per row, (logits got, logits expected) differences."""
    model = streaming_llm.install(case.model())
    streams = [ids(40 + 24, 1), ids(3 + 24, 2), ids(24, 3), ids(40, 4)]
    cache = rows_cache(model, case, 4)
    for b in range(4):
        cache.assign(b)
    stepper = Stepper(model, cache)
    stepper.prefill(0, streams[0][:40])
    stepper.prefill(1, streams[1][:3])
    got: list[list[torch.Tensor]] = [[], [], []]
    for i in range(24):
        logits = stepper.decode({0: int(streams[0][40 + i]), 1: int(streams[1][3 + i]), 2: int(streams[2][i])})
        assert logits.shape[0] == 4
        for b in range(3):
            got[b].append(logits[b].double())
        if i % 6 == 0:  # row 3 ingests its prompt in chunks between the decode steps it rides along in
            last3 = stepper.prefill(3, streams[3][(i // 6) * 10 : (i // 6 + 1) * 10])
    errors = [
        (torch.stack(got[b]) - reference(case, streams[b])[first:]).abs().max() for b, first in enumerate((40, 3, 0))
    ]
    errors.append((last3.double() - reference(case, streams[3])[-1]).abs().max())
    return errors


@pytest.mark.parametrize("case", HYBRID, ids=[c.name for c in HYBRID])
def test_a_row_riding_along_keeps_its_recurrent_state(case):
    errors = bucket_with_an_idle_row(case)
    assert max(errors) < ATOL, errors


@pytest.mark.parametrize("case", HYBRID, ids=[c.name for c in HYBRID])
def test_a_spilled_row_comes_back_with_its_recurrent_state(case):
    """Three streams on two rows: the idle one is spilled to host memory (its states with it) and continues
    exactly when it comes back; the saved row also restores into a one-row cache."""
    model = streaming_llm.install(case.model())
    engine = Engine(model, rows_cache(model, case, 2), chunk_size=8)
    streams = [engine.open(f"s{i}") for i in range(3)]
    prompts = [ids(30, 20 + i).tolist() for i in range(3)]
    first = [
        engine.run_to_end(engine.submit(Request(s, p, 6))).tokens for s, p in zip(streams, prompts[:2], strict=False)
    ]
    busy = engine.submit(Request(streams[1], [7, 8], 20))
    engine.step()
    engine.run_to_end(engine.submit(Request(streams[2], prompts[2], 6)))
    assert engine.spills == 1 and streams[0].row is None
    again = engine.run_to_end(engine.submit(Request(streams[0], [9], 5)))
    assert engine.restores == 1
    alone = Engine(model, rows_cache(model, case, 1))
    solo = alone.open("solo")
    assert first[0] == alone.run_to_end(alone.submit(Request(solo, prompts[0], 6))).tokens
    assert again.tokens == alone.run_to_end(alone.submit(Request(solo, [9], 5))).tokens
    engine.run_to_end(busy)


def test_saved_row_holds_the_states_and_restores_into_a_one_row_cache():
    case = family("Qwen3-Next")
    model = streaming_llm.install(case.model())
    cache = rows_cache(model, case, 2)
    cache.assign(0), cache.assign(1)
    stepper = Stepper(model, cache)
    stream = ids(60, 5)
    stepper.prefill(1, stream[:50])
    tensors, counters = cache.row_state(1)
    names = sorted(n for n in tensors if n.startswith("states."))
    assert names == sorted(f"states.{k}.{i}.0" for i in (0, 1, 2) for k in ("conv", "recurrent"))
    single = StreamingCache.from_state(model.config, tensors, counters)
    one = Stepper(model, single)
    for t in stream[50:]:
        got = one.decode({0: int(t)})[0]
    torch.testing.assert_close(got.double(), reference(case, stream)[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", HYBRID, ids=[c.name for c in HYBRID])
def test_seed_loop_takes_the_dynamic_cache_states_over(case):
    """The seed API's first call runs the prompt with a DynamicCache; the streaming cache takes its attention
    keys and its recurrent states over, and the loop continues exactly."""
    model = case.model()
    kv_cache = enable_streaming_llm(model, start_size=case.start, recent_size=case.recent)
    prompt = ids(10, 6)[None]
    past, tokens, logits = None, prompt[0].tolist(), []
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        for _ in range(40):
            out = model(**inputs, past_key_values=past, use_cache=True)
            past = kv_cache(out.past_key_values)
            logits.append(out.logits[0, -1].double())
            next_id = out.logits[:, -1:].argmax(dim=-1)
            tokens.append(int(next_id))
            inputs = {"input_ids": next_id, "attention_mask": torch.ones_like(next_id)}
    assert isinstance(past, StreamingCache)
    expected = reference(case, torch.tensor(tokens[:-1]))[9:]
    torch.testing.assert_close(torch.stack(logits), expected, atol=ATOL, rtol=0)


def test_memory_is_constant_over_an_endless_stream():
    case = family("Falcon-H1")
    model = streaming_llm.install(case.model())
    cache = rows_cache(model, case, 1)
    stepper = Stepper(model, cache)
    stream = ids(300, 7)
    stepper.prefill(0, stream[:10])
    sizes = set()
    for t in stream[10:]:
        stepper.decode({0: int(t)})
        sizes.add(cache.nbytes)
    assert len(sizes) == 1 and cache.states.nbytes > 0
    assert cache.seen_tokens == 300 and cache.evicted_tokens == 300 - case.start - case.recent


def test_session_file_carries_the_recurrent_states(tokenizer, tmp_path):
    """A chat session on a hybrid model saves and loads (the states travel in the file) and continues identically."""
    import transformers as T

    from streaming_llm import StreamingSession

    case = family("Qwen3-Next")
    torch.manual_seed(0)
    model = streaming_llm.install(
        T.AutoModelForCausalLM.from_config(case.config(**{**case.kwargs, "vocab_size": len(tokenizer)})).eval()
    )
    session = StreamingSession(model, tokenizer, "Be brief.", recent_size=40)
    for question in ["First question?", "Second, longer question about streaming caches?"]:
        session.chat(question, max_new_tokens=15)
    assert session.stats().evicted_tokens > 0
    assert sum(name.startswith("cache.states.recurrent.") for name in session.state()[0]) == 3
    restored = StreamingSession.load(session.save(tmp_path / "chat.safetensors"), model, tokenizer)
    torch.testing.assert_close(restored.last_logits, session.last_logits, atol=0, rtol=0)
    assert session.chat("Third?", max_new_tokens=10) == restored.chat("Third?", max_new_tokens=10)
    torch.testing.assert_close(restored.last_logits, session.last_logits, atol=1e-6, rtol=0)


def test_memory_segments_are_refused_clearly():
    from streaming_llm.sessions.memory import encode_segment

    case = family("LFM2")
    model = streaming_llm.install(case.model())
    with pytest.raises(NotImplementedError, match="not available for hybrid recurrent models"):
        encode_segment(model, [1, 2, 3, 4], [5, 6])
    cache = rows_cache(model, case, 1)
    with pytest.raises(NotImplementedError, match="not available for hybrid recurrent models"):
        cache.set_segment([torch.zeros(1, 2, 1, 16)] * 4, [torch.zeros(1, 2, 1, 16)] * 4)


# -- controls ------------------------------------------------------------------------------------------------
def test_control_a_dropped_recurrent_state_is_caught(monkeypatch):
    case = family("Qwen3-Next")
    assert max(bucket_with_an_idle_row(case)) < ATOL
    original = StreamingCache.update_recurrent_state

    def forgetful(self, recurrent_states, layer_idx, state_idx=0, **kwargs):
        return original(self, torch.zeros_like(recurrent_states), layer_idx, state_idx, **kwargs)

    monkeypatch.setattr(StreamingCache, "update_recurrent_state", forgetful)
    assert max(bucket_with_an_idle_row(case)) > 2 * ATOL


def test_control_an_idle_row_whose_state_moves_is_caught(monkeypatch):
    """Without the masked merge, rows riding along in a bucket have their states advanced by dummy tokens: row 3
    (idle between its prompt chunks), and rows 1 and 2 in their first steps (still filling their sinks, they are
    fed in one-token chunks after the batched step)."""
    case = family("Qwen3-Next")  # a lasting recurrent state (LFM2's 3-token conv window would heal by itself)
    original = cache_module.StreamingCache._begin_states

    def unprotected(self):
        original(self)
        self._state_merge = False

    monkeypatch.setattr(cache_module.StreamingCache, "_begin_states", unprotected)
    errors = bucket_with_an_idle_row(case)
    assert errors[0] < ATOL  # row 0 always decodes in the bucket: right
    assert min(errors[1:]) > 2 * ATOL
