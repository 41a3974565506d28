"""Sessions: incremental chat template, ingest, pinned system prompt, hybrid memory, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import record_fed, tiny_llama

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core.compat import cache_kwargs
from streaming_llm.sessions.memory import HybridMemory, encode_segment
from streaming_llm.sessions.persistence import SessionFileError
from streaming_llm.sessions.session import StreamingSession

SYSTEM = "You are a terse assistant. Answer in one line."


def recording(session: StreamingSession, monkeypatch) -> list[int]:
    """Record every id that goes into the session's cache from now on (turns and generated tokens)."""
    return record_fed(session.engine, monkeypatch)


def test_incremental_template_equals_the_full_render(model, tokenizer, monkeypatch):
    session = StreamingSession(model, tokenizer, None, recent_size=4000)
    fed = recording(session, monkeypatch)
    messages = []
    for question in ["Hello there!", "What is 2 + 2?", "And in French?"]:
        reply = session.chat(question, max_new_tokens=12)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(fed) == full
    assert session.cache.seen_tokens == len(fed)
    assert session.turns == 3


def test_pinned_system_prompt_is_never_evicted(model, tokenizer, monkeypatch):
    session = StreamingSession(model, tokenizer, SYSTEM, start_size=4, recent_size=32)
    fed = recording(session, monkeypatch)
    opening = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}], tokenize=False)
    pinned = len(tokenizer(opening, add_special_tokens=False)["input_ids"])
    assert session.stats().pinned_tokens == pinned > 4
    keys = session.state()[0]["cache.groups.0.pinned"]  # the canonical pinned keys (a snapshot)
    assert keys.shape[-2] == pinned
    for _ in range(6):
        session.chat("Tell me something long.", max_new_tokens=20)
    stats = session.stats()
    assert stats.evicted_tokens > 0
    assert stats.cached_tokens == pinned + 32
    torch.testing.assert_close(session.state()[0]["cache.groups.0.pinned"], keys)  # still there, untouched
    assert session.cache.seen_tokens == pinned + len(fed)


def test_unpinned_system_prompt_keeps_only_the_sinks(model, tokenizer):
    session = StreamingSession(model, tokenizer, SYSTEM, start_size=4, recent_size=32, pin_system_prompt=False)
    assert session.stats().pinned_tokens == 4


DOCUMENT = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(30))


def test_ingest_in_chunks_equals_token_by_token(model, tokenizer, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOCUMENT)
    results = []
    for chunk in (1, 7, 64):
        session = StreamingSession(model, tokenizer, SYSTEM, start_size=4, recent_size=48)
        stats = session.ingest(path, chunk_size=chunk, progress=False)
        results.append((stats.tokens, session.cache.seen_tokens, session.last_logits.double()))
    assert results[0][0] > 3 * 48  # the document streams well past the window
    for tokens, seen, logits in results[1:]:
        assert (tokens, seen) == results[0][:2]
        torch.testing.assert_close(logits, results[0][2], atol=1e-4, rtol=0)


def test_ingest_accepts_text_and_rejects_missing_paths(model, tokenizer, tmp_path):
    session = StreamingSession(model, tokenizer, recent_size=64)
    assert session.ingest(DOCUMENT, progress=False).tokens > 100
    with pytest.raises(FileNotFoundError):
        session.ingest(tmp_path / "missing.txt", progress=False)


def test_endless_conversation_keeps_memory_flat(model, tokenizer):
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=24)
    sizes = set()
    for i in range(12):
        session.chat(f"Message number {i}.", max_new_tokens=8)
        sizes.add(session.stats().cache_bytes)
    assert session.stats().evicted_tokens > 10 * 24
    assert len(sizes) == 1


def test_save_and_load_continue_with_identical_logits(model, tokenizer, tmp_path):
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=40)
    for question in ["First question?", "Second, longer question about streaming caches?"]:
        session.chat(question, max_new_tokens=15)
    assert session.stats().evicted_tokens > 0
    path = session.save(tmp_path / "chat.safetensors")
    restored = StreamingSession.load(path, model, tokenizer)
    assert restored.stats() == session.stats()
    torch.testing.assert_close(restored.last_logits, session.last_logits, atol=0, rtol=0)
    a = session.chat("Third?", max_new_tokens=10)
    b = restored.chat("Third?", max_new_tokens=10)
    assert a == b
    torch.testing.assert_close(restored.last_logits, session.last_logits, atol=1e-6, rtol=0)


def test_session_file_is_sized_by_content(model, tokenizer, tmp_path):
    """A short chat on a large window saves what the cache holds, not its preallocated buffer."""
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=2000)
    while session.cache.seen_tokens < 150:
        session.chat("Tell me about caches.", max_new_tokens=20)
    seen = session.cache.seen_tokens
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # K and V, fp32
    path = session.save(tmp_path / "short.safetensors")
    # Fixed part: the JSON header (identity, counters, template and sampler state) and the saved next-token
    # logits (vocab floats, so a restored session continues exactly), whatever the stream length.
    header = 64 * 1024 + config.vocab_size * 4
    assert path.stat().st_size <= 2 * seen * per_token + header
    assert path.stat().st_size - header < session.cache.nbytes / 4  # the preallocated cache is far larger
    restored = StreamingSession.load(path, model, tokenizer)
    torch.testing.assert_close(restored.last_logits, session.last_logits, atol=0, rtol=0)
    ids = tokenizer("And then?", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(restored.feed(ids), session.feed(ids), atol=0, rtol=0)


def test_save_is_atomic(model, tokenizer, tmp_path, monkeypatch):
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=40)
    path = session.save(tmp_path / "chat.safetensors")
    before = path.read_bytes()
    session.chat("More.", max_new_tokens=4)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("streaming_llm.sessions.persistence.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        session.save(path)
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.safetensors"]  # no temporary left behind


def _bad_files(tmp_path, good):
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(flipped))
    text = tmp_path / "notes.txt"
    text.write_text("not a session")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, foreign)
    return {
        truncated: "truncated or corrupt", corrupt: "corrupt", text: "truncated or corrupt",
        foreign: "not a streaming-llm session",
    }  # fmt: skip


def test_bad_files_raise_clear_errors_and_leave_the_session_untouched(model, tokenizer, tmp_path):
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=40)
    session.chat("Hello?", max_new_tokens=6)
    good = session.save(tmp_path / "good.safetensors")
    stats, logits = session.stats(), session.last_logits.clone()
    for path, message in _bad_files(tmp_path, good).items():
        with pytest.raises(SessionFileError, match=message):
            session = _load_or_keep(session, path, model, tokenizer)
        assert session.stats() == stats
        torch.testing.assert_close(session.last_logits, logits, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError):
        StreamingSession.load(tmp_path / "missing.safetensors", model, tokenizer)
    other = streaming_llm.install(tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=3))
    with pytest.raises(SessionFileError, match="another model"):
        StreamingSession.load(good, other, tokenizer)


def _load_or_keep(current, path, model, tokenizer):
    """What the CLI's /load does: replace the session only if loading succeeds."""
    return StreamingSession.load(path, model, tokenizer)


def test_a_summary_segment_equals_pinning_those_tokens(model, tokenizer):
    """Installing a segment after the sinks is exactly pinning those tokens in the stream."""
    start, recent = 4, 24
    ids = torch.randint(0, 1000, (1, 120), generator=torch.Generator().manual_seed(0))
    summary = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        main = StreamingCache(model.config, start, recent, segment_capacity=16)
        model(input_ids=ids[:, :start], **cache_kwargs(model, main))
        keys, values = encode_segment(model, ids[0, :start].tolist(), summary[0].tolist())
        main.set_segment(keys, values)
        got = model(input_ids=ids[:, start:], **cache_kwargs(model, main)).logits
        plain = StreamingCache(model.config, start + 10, recent)
        model(input_ids=torch.cat([ids[:, :start], summary], dim=1), **cache_kwargs(model, plain))
        expected = model(input_ids=ids[:, start:], **cache_kwargs(model, plain)).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert main.cached_tokens == start + 10 + recent


def test_hybrid_memory_summarises_evicted_text(model, tokenizer):
    calls = []

    def summarizer(previous: str, evicted: str) -> str:
        calls.append(evicted)
        return (previous + " " + evicted[:20]).strip()

    memory = HybridMemory(summarizer, max_tokens=48, update_every=32)
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=40, memory=memory)
    session.ingest(DOCUMENT, progress=False)
    assert calls and all(text.strip() for text in calls)
    assert 0 < session.stats().summary_tokens <= 48
    assert calls[0].startswith("user\nLine 0:")  # the first text to leave the window is summarised first


def test_hybrid_memory_refuses_models_with_sliding_layers(tokenizer):
    import transformers as T

    config = T.MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8)  # fmt: skip
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(NotImplementedError, match="sliding-window layers"):
        StreamingSession(model, tokenizer, recent_size=64, memory=HybridMemory())
