"""Turn boundaries, edge values of generation parameters, session files, and state that must not grow."""

from __future__ import annotations

import gc
import json
import os
import struct
import tracemalloc

import pytest
import torch
from conftest import record_fed, tiny_llama

import streaming_llm
from streaming_llm import SessionBrokenError, SessionFileError, StreamingSession, generate, stream_generate
from streaming_llm.runtime.sampling import Sampler
from streaming_llm.sessions.persistence import remove_stale_temporaries

SYSTEM = "You are a terse assistant."


class Scripted(Sampler):
    """A sampler that picks the given token ids in order (so a test decides how a reply ends)."""

    greedy = False  # not the argmax: the engine must call it

    def __init__(self, ids):
        super().__init__()
        self.script = list(ids)

    def __call__(self, logits):
        return self.script.pop(0)


def record(session, monkeypatch) -> list[int]:
    """Every id fed to the session's cache from now on (prompt chunks and decode steps)."""
    return record_fed(session.engine, monkeypatch)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_context(tokenizer, question, reply):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": reply}], tokenize=False
    )
    return rendered


@pytest.mark.parametrize("ending", ["eos", "length", "stop_inside_last_token", "closed_early"])
def test_after_any_turn_the_context_is_the_template_rendering(model, tokenizer, monkeypatch, ending):
    session = StreamingSession(model, tokenizer, None, recent_size=4000)
    fed = record(session, monkeypatch)
    words = ids(tokenizer, " Paris is the capital.")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    script = {"eos": [*words, eos], "length": words, "closed_early": [*words, *words]}.get(ending, [*words, eos])
    stop = ()
    if ending == "stop_inside_last_token":
        last = tokenizer.decode(words[-1:])  # e.g. "." : stop on it, inside the last sampled token
        stop = (last,)
    session.sampler = Scripted(script)
    stream = session.send("What is the capital of France?", max_new_tokens=len(words), stop=stop)
    if ending == "closed_early":
        pieces = [next(stream) for _ in range(3)]
        stream.close()
        reply = tokenizer.decode(words[:3])
        assert "".join(p.text for p in pieces) == reply
    else:
        reply = "".join(p.text for p in stream)
    if ending == "stop_inside_last_token":
        assert reply == tokenizer.decode(words[:-1])
    elif ending != "closed_early":
        assert reply == tokenizer.decode(words)
    full = expected_context(tokenizer, "What is the capital of France?", reply)
    assert tokenizer.decode(fed) == full  # nothing fed twice, nothing missing
    assert session.cache.seen_tokens == len(fed)


def test_an_error_inside_a_forward_breaks_the_session_clearly(model, tokenizer, monkeypatch):
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=64)
    session.chat("Hello", max_new_tokens=3)

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(session.engine.stepper, "decode", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        session.chat("Again", max_new_tokens=5)
    monkeypatch.undo()
    with pytest.raises(SessionBrokenError, match="cannot continue"):
        session.chat("And now?", max_new_tokens=2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_max_new_tokens_is_a_clear_value_error_on_every_python_surface(model, tokenizer, bad):
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=64)
    seen = session.cache.seen_tokens
    for call in (
        lambda: session.chat("Hi!", max_new_tokens=bad),
        lambda: session.send("Hi!", max_new_tokens=bad),
        lambda: list(stream_generate(model, tokenizer, "Hi", max_new_tokens=bad)),
        lambda: generate(model, tokenizer, "Hi", max_new_tokens=bad),
    ):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            call()
    assert session.cache.seen_tokens == seen and session.turns == 0  # nothing was fed


def test_empty_prompt_and_none_limits(model, tokenizer):
    with pytest.raises(ValueError, match="prompt is empty"):
        list(stream_generate(model, tokenizer, "", max_new_tokens=2))
    with pytest.raises(ValueError, match="finite max_new_tokens"):
        generate(model, tokenizer, "Hi", max_new_tokens=None)
    session = StreamingSession(model, tokenizer, None, recent_size=64)
    session.sampler = Scripted([*ids(tokenizer, " ok"), tokenizer.convert_tokens_to_ids("<|im_end|>")])
    assert session.chat("", max_new_tokens=None) == " ok"  # an empty message is still a turn; None: no limit


# -- session files ------------------------------------------------------------------------------------------
@pytest.fixture
def saved(model, tokenizer, tmp_path):
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=40)
    session.chat("Hello there, how are you?", max_new_tokens=6)
    return session, session.save(tmp_path / "good.safetensors")


def _header(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def _rewrite_header(data: bytes, edit) -> bytes:
    n, header = _header(data)
    text = edit(data[8 : 8 + n].decode())
    assert len(text.encode()) == n, "edits keep the header length (as an in-place edit would)"
    return data[:8] + text.encode() + data[8 + n :]


def test_every_malformed_session_file_raises_session_file_error(model, tokenizer, tmp_path, saved):
    session, good = saved
    data = good.read_bytes()
    _, header = _header(data)
    meta = json.loads(header["__metadata__"]["streaming_llm"])
    assert meta["state"]["turns"] == 1
    edits = {
        "turns": lambda t: t.replace('\\"turns\\": 1', '\\"turns\\": 7', 1),
        "renamed_key": lambda t: t.replace('\\"summary\\"', '\\"summarx\\"', 1),
        "system_prompt": lambda t: t.replace("terse", "tense", 1),
    }
    bad = {}
    for name, edit in edits.items():
        try:
            bad[name] = _rewrite_header(data, edit)
        except AssertionError:
            continue
    assert {"turns", "renamed_key", "system_prompt"} <= set(bad)
    n, _ = _header(data)
    for offset in torch.randint(0, len(data), (12,), generator=torch.Generator().manual_seed(0)).tolist() + [
        8 + n + 3, len(data) - 1, 2, 9,
    ]:  # fmt: skip
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        bad[f"bit_{offset}"] = bytes(flipped)
    bad["truncated"] = data[: len(data) // 2]
    bad["empty"] = b""
    bad["header_only"] = data[: 8 + n]
    for name, content in bad.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(SessionFileError):
            StreamingSession.load(path, model, tokenizer)
    # A model with the same config but other weights is refused too.
    other = streaming_llm.install(tiny_llama(seed=1, vocab_size=len(tokenizer)))
    with pytest.raises(SessionFileError, match="another model"):
        StreamingSession.load(good, other, tokenizer)
    restored = StreamingSession.load(good, model, tokenizer)
    assert restored.stats() == session.stats()


def test_stale_temporaries_are_removed(tmp_path, saved):
    session, good = saved
    dead = tmp_path / f".good.safetensors.{2**22 + 12345}.abcd.tmp"  # a pid that is not running
    dead.write_bytes(b"x" * 1000)
    mine = tmp_path / f".good.safetensors.{os.getpid()}.efgh.tmp"
    mine.write_bytes(b"y")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert mine.exists()
    dead.write_bytes(b"x")
    session.save(good)  # every save cleans its own target's stale temporaries
    assert not dead.exists()


# -- nothing grows with the stream ------------------------------------------------------------------------------
def test_a_thousand_turns_keep_file_size_and_heap_flat(model, tokenizer, tmp_path):
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=64)
    sizes, heaps = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: one thread is faster, and CI machines are shared
    try:
        for turn in range(1000):
            if turn == 100:  # warm-up done: trace Python allocations from here on
                gc.collect()
                tracemalloc.start()
            session.chat(f"Turn {turn}: tell me more.", max_new_tokens=1)
            if turn % 100 == 99:
                sizes.append(session.save(tmp_path / "soak.safetensors").stat().st_size)
                gc.collect()
                heaps.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
        torch.set_num_threads(threads)
    assert session.stats().evicted_tokens > 20 * 64
    assert len(session.pending_ids) == 0 and len(session.window_ids) == 0  # kept only with hybrid memory
    # After warm-up the file only varies by the few bytes of the last messages' text (it used to grow by 8 bytes
    # per evicted token: ~100 KiB over these turns).
    assert max(sizes[1:]) - min(sizes[1:]) < 512, sizes
    growth = max(heaps[2:]) - heaps[1]
    assert growth < 256 * 1024, f"Python heap grew by {growth} bytes over 800 turns: {heaps}"


@pytest.mark.parametrize(
    "bad", [{"temperature": float("nan")}, {"temperature": float("inf")}, {"top_p": float("nan")}, {"top_k": 1.5},
            {"temperature": -1}, {"top_p": 0}, {"repetition_penalty": 0}],
)  # fmt: skip
def test_bad_sampling_values_are_clear_value_errors(bad):
    from streaming_llm import SamplingConfig

    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)
