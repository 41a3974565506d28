"""Faults other engines had, checked by kind on every surface where the kind can occur (issue 21):

1. A saved state is a snapshot: later work on the stream, the row or the session cannot change it.
2. (tests/test_tokenize.py, tests/test_ingest.py) An ingested document gets the ids of the whole text.
3. One sampling rule: the repetition penalty looks at the last tokens of the *context*, prompt included,
   so every surface (stream_generate, sessions, the engine's rows, both server endpoints) samples the
   same tokens from the same context and seed.

Expectations are independent: the state a second, identical stream reaches; another surface's output.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

import streaming_llm
from streaming_llm import StreamingCache, StreamingSession, stream_generate
from streaming_llm.core.stepper import Stepper
from streaming_llm.runtime.engine import Engine, Request
from streaming_llm.runtime.sampling import Sampler, SamplingConfig

START, RECENT = 4, 12


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    return streaming_llm.install(tiny_llama())


# -- 1. snapshots -------------------------------------------------------------------------------------------
def fed(model, tokens: torch.Tensor) -> StreamingCache:
    cache = StreamingCache(model.config, START, RECENT, rows=1, dtype=torch.float32, device="cpu")
    Stepper(model, cache).prefill(0, tokens)
    return cache


def test_a_cache_state_is_a_snapshot(llama):
    """The issue's instance: feed 40 tokens, state(), feed 20 more, restore the state: as at the snapshot."""
    stream = ids(61, 1)
    cache = fed(llama, stream[:40])
    snap = cache.state()
    Stepper(llama, cache).prefill(0, stream[40:60])  # the stream goes on (and past the window)
    restored = StreamingCache.from_state(llama.config, *snap)
    expected = Stepper(llama, fed(llama, stream[:40])).decode({0: int(stream[60])})[0]
    got = Stepper(llama, restored).decode({0: int(stream[60])})[0]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_a_row_state_survives_the_row_being_reused(llama):
    """A row's state taken, then the row released and given to another stream: the state is unchanged."""
    cache = StreamingCache(llama.config, START, RECENT, rows=2, dtype=torch.float32, device="cpu")
    stepper = Stepper(llama, cache)
    stream, other = ids(30, 2), ids(50, 3)
    cache.assign(0)
    stepper.prefill(0, stream)
    snap = cache.row_state(0)
    copy = {k: v.clone() for k, v in snap[0].items()}
    cache.release(0)
    cache.assign(0)
    stepper.prefill(0, other)  # row 0 now holds another stream
    assert all(torch.equal(snap[0][k], copy[k]) for k in copy)
    row = cache.assign(1, state=snap)
    expected = Stepper(llama, fed(llama, stream)).decode({0: 7})[0]
    torch.testing.assert_close(stepper.decode({row: 7})[row], expected, atol=1e-6, rtol=0)


def test_a_session_state_is_a_snapshot(model, tokenizer):
    session = StreamingSession(model, tokenizer, "You are terse.", recent_size=40)
    session.chat("Hello there!", max_new_tokens=6)
    tensors, state = session.state()
    at_snapshot = StreamingSession.from_state(model, tokenizer, tensors, state)  # the expectation, made at once
    kept = {k: v.clone() for k, v in tensors.items()}, json.dumps(state)
    for turn in ("And then?", "Go on, please, for a while.", "More."):  # the session goes on, past its window
        session.chat(turn, max_new_tokens=8)
    assert all(torch.equal(tensors[k], v) for k, v in kept[0].items()) and json.dumps(state) == kept[1]
    later = StreamingSession.from_state(model, tokenizer, tensors, state)
    assert later.chat("What now?", max_new_tokens=8) == at_snapshot.chat("What now?", max_new_tokens=8)
    torch.testing.assert_close(later.last_logits, at_snapshot.last_logits, atol=0, rtol=0)


def test_a_spilled_stream_snapshot_is_a_copy(llama):
    """The engine's host snapshot of a stream (what spilling keeps) is not changed by handing it out."""
    cache = StreamingCache(llama.config, START, RECENT, rows=1, dtype=torch.float32, device="cpu")
    engine = Engine(llama, cache)
    a, b = engine.open("a"), engine.open("b")
    engine.run_to_end(engine.submit(Request(a, ids(20, 4).tolist(), 0)))
    engine.run_to_end(engine.submit(Request(b, ids(20, 5).tolist(), 0)))  # spills a
    first = engine.snapshot(a)
    first[0]["groups.0.keys"].zero_()  # a caller changing its copy ...
    second = engine.snapshot(a)
    assert second[0]["groups.0.keys"].abs().sum() > 0  # ... changes nothing of the stream


# -- 3. one sampling rule -----------------------------------------------------------------------------------
PENALTY = SamplingConfig(temperature=0.7, repetition_penalty=1.5, seed=3)
MESSAGE = "Repeat these words exactly: apple banana cherry apple banana cherry apple banana cherry."


def rendered(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": MESSAGE}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_penalty_window_holds_the_prompt_on_every_python_surface(model, tokenizer):
    """stream_generate on the rendered ids, a session's turn, and a row of a shared engine: the same tokens."""
    prompt = rendered(tokenizer)
    via_generate = [p.token_id for p in stream_generate(model, tokenizer, prompt, recent_size=256,
                                                        max_new_tokens=24, sampling=PENALTY) if p.token_id]  # fmt: skip
    session = StreamingSession(model, tokenizer, recent_size=256, sampling=PENALTY)
    request, text = session.turn_request([("user", MESSAGE)], 24)
    session.engine.run_to_end(session.engine.submit(request))
    assert session.engine.row_stats(session.stream).seen_tokens > len(prompt)
    via_session = [t for t in request.tokens if t not in session.stop_ids]
    assert via_session == via_generate
    # The same context on a shared engine's row, next to another stream.
    cache = StreamingCache(model.config, 4, 256, rows=2, dtype=torch.float32, device="cpu")
    engine = Engine(model, cache)
    mine = engine.open("mine", sampler=Sampler(PENALTY, tokenizer=tokenizer))
    other = engine.open("other", sampler=Sampler(SamplingConfig(), tokenizer=tokenizer))
    requests = [engine.submit(Request(mine, prompt, 24, session.stop_ids)),
                engine.submit(Request(other, prompt[:9], 24, session.stop_ids))]  # fmt: skip
    for r in requests:
        engine.run_to_end(r)
    assert [t for t in requests[0].tokens if t not in session.stop_ids] == via_generate


def test_on_the_real_model_the_rule_changes_the_reply_and_the_surfaces_agree(smollm):
    """The issue's instance on SmolLM2: the session equals stream_generate, and the old rule (the window sees
    generated tokens only) would have given another reply: the prompt really is in the penalty window."""
    model, tokenizer = smollm
    prompt, greedy = rendered(tokenizer), SamplingConfig(repetition_penalty=1.5)
    via_generate = [p.token_id for p in stream_generate(model, tokenizer, prompt, recent_size=256,
                                                        max_new_tokens=16, sampling=greedy) if p.token_id]  # fmt: skip
    session = StreamingSession(model, tokenizer, recent_size=256, sampling=greedy)
    request, _ = session.turn_request([("user", MESSAGE)], 16)
    session.engine.run_to_end(session.engine.submit(request))
    assert [t for t in request.tokens if t not in session.stop_ids] == via_generate
    old = without_prompt_window(model, tokenizer, prompt, 16, greedy)
    assert tokenizer.decode(old).startswith("Repeat these words exactly: apple banana cherry")  # the old rule copies
    assert via_generate != old and "apple banana cherry" not in tokenizer.decode(via_generate)


def test_the_cli_samples_like_the_python_surfaces(smollm):
    """``streaming-llm generate`` with a penalty prints what stream_generate gives on the same rendered context."""
    import subprocess
    import sys

    model, tokenizer = smollm
    greedy = SamplingConfig(repetition_penalty=1.5)
    expected = "".join(p.text for p in stream_generate(model, tokenizer, rendered(tokenizer), recent_size=256,
                                                       max_new_tokens=16, sampling=greedy))  # fmt: skip
    flags = ["--recent-size", "256", "--max-tokens", "16", "--device", "cpu", "--temperature", "0",
             "--repetition-penalty", "1.5", "--repeat-last-n", str(greedy.penalty_window),
             "--dry-multiplier", "0"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "streaming_llm.cli", "generate", MESSAGE, *flags],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.strip()


def without_prompt_window(model, tokenizer, prompt: list[int], n: int, config: SamplingConfig) -> list[int]:
    """What the old session rule gave: the penalty window sees generated tokens only."""
    cache = StreamingCache(model.config, 4, 256, rows=1, dtype=torch.float32, device="cpu")
    stepper = Stepper(model, cache)
    sampler = Sampler(config, tokenizer=tokenizer)
    logits, out = stepper.prefill(0, prompt), []
    for _ in range(n):
        token = sampler(logits)
        out.append(token)
        if token == tokenizer.eos_token_id:
            break
        sampler.observe([token])
        logits = stepper.decode({0: token})[0]
    return [t for t in out if t != tokenizer.eos_token_id]


def test_both_server_endpoints_sample_like_the_python_surfaces(model, tokenizer):
    """/v1/chat/completions and /v1/completions (the rendered prompt as text) give stream_generate's text."""
    from fastapi.testclient import TestClient

    from streaming_llm.serving.server import create_app

    prompt = rendered(tokenizer)
    expected = "".join(p.text for p in stream_generate(model, tokenizer, prompt, recent_size=256,
                                                       max_new_tokens=24, sampling=PENALTY))  # fmt: skip
    fields = {"temperature": PENALTY.temperature, "repetition_penalty": PENALTY.repetition_penalty,
              "seed": PENALTY.seed, "max_tokens": 24}  # fmt: skip
    app = create_app(
        model, tokenizer, recent_size=256, rows=2, web=False, sampling=SamplingConfig()
    )  # the request's fields decide (no other defaults)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": MESSAGE}], **fields})
        text = tokenizer.decode(prompt)
        completion = client.post("/v1/completions", json={"prompt": text, **fields})
    assert chat.status_code == completion.status_code == 200, (chat.text, completion.text)
    assert chat.json()["choices"][0]["message"]["content"] == expected
    assert completion.json()["choices"][0]["text"] == expected
