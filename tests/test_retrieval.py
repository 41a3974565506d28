"""Retrieval memory: evicted text indexed in SQLite FTS5, best passages pinned before each user turn."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from streaming_llm.core.cache import StreamingCache
from streaming_llm.runtime.generation import prefill
from streaming_llm.sessions.retrieval import RetrievalMemory
from streaming_llm.sessions.session import StreamingSession

SYSTEM = "You are a helpful assistant."
FACT = "The pass code of the blue door is 4817."
FILLER = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "


def _rows(memory: RetrievalMemory) -> list[tuple]:
    return memory.db.execute("SELECT rowid, text, tokens FROM passages ORDER BY rowid").fetchall()


def _session(model, tokenizer, **memory_args) -> StreamingSession:
    memory = RetrievalMemory(**{"budget": 96, "passage_tokens": 32, "overlap": 8, **memory_args})
    return StreamingSession(model, tokenizer, SYSTEM, recent_size=48, memory=memory)


def test_evicted_text_is_indexed_and_the_matching_passage_is_pinned(model, tokenizer):
    session = _session(model, tokenizer)
    session.add_message("user", FILLER + FACT + " " + FILLER * 6)
    evicted = session.cache.evicted_tokens
    assert evicted > 100
    # Every evicted token (past the open buffer) is in exactly one passage's fresh part.
    step = session.memory.passage_tokens - session.memory.overlap
    assert len(session.memory) == (evicted - session.memory.overlap) // step
    hits = session.memory.search("What is the pass code of the blue door?")
    assert "4817" in hits[0][1]
    session.chat("What is the pass code of the blue door?", max_new_tokens=2)
    pinned = session.memory.last.passages
    assert any("4817" in p for p in pinned)
    assert session.memory.last.matched and session.memory.last.tokens == 96  # always exactly the budget
    assert session.stats().summary_tokens == session.memory.last.tokens
    # A message that matches nothing: the segment is replaced (never stacked) by the passages evicted last.
    session.chat("zzzz qqqq", max_new_tokens=2)
    last = session.memory.last
    assert not last.matched and session.cache.segment_len == 96
    assert _rows(session.memory)[-1][1].strip() in "\n".join(last.passages)


def test_query_text_is_never_fts_syntax(model, tokenizer):
    session = _session(model, tokenizer)
    session.add_message("user", FILLER * 4)
    for message in ['" OR NEAR(', "AND NOT *", "col:text ^x", "", "???"]:
        session.memory.search(message)  # no sqlite3.OperationalError


def test_empty_segment_capacity_changes_nothing(model):
    """A cache with room for a segment but none pinned predicts exactly like a plain one."""
    ids = torch.randint(0, model.config.vocab_size, (300,)).tolist()
    plain, roomy = StreamingCache(model.config, 4, 40), StreamingCache(model.config, 4, 40, segment_capacity=64)
    for start in range(0, len(ids), 50):
        a, b = prefill(model, plain, ids[start : start + 50], 50), prefill(model, roomy, ids[start : start + 50], 50)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_cache_bytes_are_constant_and_only_the_budget_is_added(model, tokenizer):
    plain = StreamingSession(model, tokenizer, SYSTEM, recent_size=48)
    session = _session(model, tokenizer)
    sizes = []
    for turn in range(6):
        for s in (plain, session):
            s.add_message("user", FILLER * 2 + f"Remember the number {turn}.")
        session.chat(f"What number is turn {turn}?", max_new_tokens=3)
        plain.chat(f"What number is turn {turn}?", max_new_tokens=3)
        sizes.append(session.cache.nbytes)
    assert len(set(sizes)) == 1
    # Independent expectation: the extra bytes are the budget's slots (keys, values, canonical keys) per layer.
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    slot_bytes = config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # fp32
    assert sizes[0] - plain.cache.nbytes == 3 * slot_bytes * session.memory.budget


def test_save_and_load_round_trip_the_index(model, tokenizer, tmp_path):
    session = _session(model, tokenizer)
    session.add_message("user", FILLER + FACT + " " + FILLER * 5)
    path = session.save(tmp_path / "s.safetensors")
    saved = _rows(session.memory)
    restored = StreamingSession.load(path, model, tokenizer)
    assert isinstance(restored.memory, RetrievalMemory)
    assert _rows(restored.memory) == _rows(session.memory) and len(_rows(session.memory)) > 3
    assert restored.memory.buffer == session.memory.buffer
    assert restored.memory.settings() == session.memory.settings()
    question = "What is the pass code of the blue door?"
    assert restored.chat(question, max_new_tokens=5) == session.chat(question, max_new_tokens=5)
    assert restored.memory.last.passages == session.memory.last.passages != []
    # Loading into a memory the caller made keeps its object but takes the saved index.
    mine = RetrievalMemory(budget=96, passage_tokens=32, overlap=8)
    again = StreamingSession.load(path, model, tokenizer, memory=mine)
    assert again.memory is mine and _rows(mine) == saved


def test_a_corrupt_index_is_refused(model, tokenizer):
    memory = RetrievalMemory()
    with pytest.raises(ValueError, match="unreadable"):
        memory.load_state({"index": torch.zeros(4096, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="budget"):
        RetrievalMemory(budget=40, passage_tokens=64)
    with pytest.raises(ValueError, match="overlap"):
        RetrievalMemory(passage_tokens=16, overlap=16)


def test_thousand_turn_soak_keeps_index_and_file_bounded(model, tokenizer, tmp_path):
    session = _session(model, tokenizer, max_passages=40)
    sizes = {}
    for turn in range(1, 1001):
        session.chat(f"Turn {turn}: the word of the day is w{turn}. {FILLER[: 40 + turn % 50]}", max_new_tokens=1)
        if turn % 250 == 0:
            path = session.save(tmp_path / "soak.safetensors")
            sizes[turn] = (path.stat().st_size, len(session.memory), session.cache.nbytes)
    assert session.cache.evicted_tokens > 40 * 32 * 5  # far more text than the index may keep
    assert all(count <= 40 for _, count, _ in sizes.values())
    files = [size for size, _, _ in sizes.values()]
    assert max(files) <= 1.1 * min(files), sizes  # the file plateaus (index bounded, cache fixed)
    assert len({nbytes for _, _, nbytes in sizes.values()}) == 1
    # Oldest-first pruning: the newest turns are findable, the first ones are gone.
    # (match the planted sentence only: the random model's replies may contain anything)
    # (whole sentences: a passage boundary can cut "w987." into "w9")
    turns = [int(n) for n in re.findall(r"day is w(\d+)\.", " ".join(text for _, text, _ in _rows(session.memory)))]
    assert turns and min(turns) > 900


def test_retrieval_copy_is_independent(model, tokenizer):
    """state()/from_state() gives an independent index (the server's session pool can rely on it)."""
    session = _session(model, tokenizer)
    session.add_message("user", FILLER * 5)
    twin = RetrievalMemory.from_state(*session.memory.state())
    twin.add("an extra passage", 3)
    assert len(twin) == len(session.memory) + 1
    assert copy.copy(session.memory.settings()) == twin.settings()


def test_real_model_answers_a_fact_20k_tokens_back_only_with_retrieval(smollm, shakespeare):
    from streaming_llm.eval.recall import fork

    model, tokenizer = smollm
    filler = shakespeare[300_000:400_000]
    assert len(tokenizer(filler)["input_ids"]) > 20_000
    memory = RetrievalMemory(budget=256, passage_tokens=64, overlap=16)
    session = StreamingSession(model, tokenizer, SYSTEM, recent_size=256, memory=memory)
    session.ingest(f"{FILLER}\n{FACT}\n{filler}", chunk_size=2048, progress=False)
    assert session.cache.evicted_tokens > 20_000  # the fact left the window ~20k tokens ago
    assert len(memory) > 20_000 // 64
    plain = fork(session)  # the same cache (no segment pinned while streaming), without memory
    question = "What is the pass code of the blue door? Answer with the number only."
    with_retrieval, without = session.chat(question, 24), plain.chat(question, 24)  # digits are one token each
    print(f"with retrieval: {with_retrieval!r}; without: {without!r}; pinned: {memory.last.passages}")
    assert "4817" in with_retrieval
    assert "4817" not in without
    assert not any("<|im_start|>" in passage for passage in memory.last.passages)  # no chat markup is pinned


class _Counters:
    """What RetrievalMemory.track reads from a cache: its sinks and how many tokens it has evicted."""

    def __init__(self, start_size: int, window: int):
        self.start_size, self.window, self.seen_tokens = start_size, window, 0

    @property
    def evicted_tokens(self) -> int:
        return max(0, self.seen_tokens - self.start_size - self.window)

    def feed(self, memory: RetrievalMemory, ids: list[int], states=None) -> None:
        self.seen_tokens += len(ids)
        memory.track(ids, self, states)


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_track_indexes_exactly_what_the_session_evicts(model, tokenizer):
    """track() (every fed token and the cache's eviction count) builds the index observe() builds from the
    session's own record of evicted ids."""
    session = _session(model, tokenizer)
    message = session.template.add("user", FILLER + FACT + " " + FILLER * 6)
    session.template.context.pop()  # add_message renders it again
    session.add_message("user", FILLER + FACT + " " + FILLER * 6)
    mine = RetrievalMemory(budget=96, passage_tokens=32, overlap=8)
    mine.tokenizer = tokenizer
    counters = _Counters(session.cache.start_size, session.cache.recent_size)
    counters.feed(mine, session.sink_ids)  # the system prompt, pinned
    for start in range(0, len(ids := _tokens(tokenizer, message)), 50):  # any chunking gives the same index
        counters.feed(mine, ids[start : start + 50])
    assert counters.seen_tokens == session.cache.seen_tokens and len(mine) > 3
    assert _rows(mine) == _rows(session.memory) and mine.buffer == session.memory.buffer


def test_sentence_passages_end_at_sentence_ends(tokenizer):
    from streaming_llm.sessions.retrieval import sentence_ends

    memory = RetrievalMemory(budget=96, passage_tokens=32, split="sentences")
    memory.tokenizer = tokenizer
    ids = _tokens(tokenizer, (FILLER + FACT + " Is it so? It is! ") * 12)
    counters = _Counters(4, 16)
    counters.feed(memory, [0, 0, 0, 0] + ids)
    stored = [memory._ids(row, text, None) for row, text, _ in _rows(memory)]
    assert b"".join(bytes(str(s), "utf8") for s in stored)  # something was indexed
    assert sum(stored, []) + memory.buffer == ids[: len(ids) - 16]  # no overlap: the passages tile the evicted text
    ends = sentence_ends(tokenizer)
    assert all(len(s) <= 32 and (s[-1] in ends or len(s) == 32) for s in stored)
    assert any(tokenizer.decode(s).strip() == FACT for s in stored) or any(FACT in tokenizer.decode(s) for s in stored)


def test_segment_is_always_the_budget_and_merges_neighbours(tokenizer):
    memory = RetrievalMemory(budget=200, passage_tokens=32, overlap=8)
    memory.tokenizer = tokenizer
    ids = _tokens(tokenizer, FILLER * 3 + FACT + " " + FILLER * 3)
    counters = _Counters(4, 8)
    counters.feed(memory, [0, 0, 0, 0] + ids)
    segment = memory.segment("What is the pass code of the blue door?", lambda t: _tokens(tokenizer, t))
    assert len(segment) == 200 and memory.last.matched
    newline = _tokens(tokenizer, "\n")[0]
    body = segment[next(i for i, t in enumerate(segment) if t != newline) :]
    text = tokenizer.decode(body)
    assert text.startswith("(Earlier text") and "4817" in text
    # Neighbouring passages are shown as one span: their shared 8 tokens are never shown twice.
    for span in memory.last.passages:
        assert span in tokenizer.decode(ids)
    # Nothing evicted yet: no segment at all.
    empty = RetrievalMemory(budget=200, passage_tokens=32, overlap=8)
    empty.tokenizer = tokenizer
    assert empty.segment("anything", lambda t: _tokens(tokenizer, t)) == []


def test_a_fact_evicted_but_not_yet_in_a_passage_is_found(tokenizer):
    memory = RetrievalMemory(budget=96, passage_tokens=64, overlap=16)
    memory.tokenizer = tokenizer
    counters = _Counters(4, 8)
    counters.feed(memory, [0, 0, 0, 0] + _tokens(tokenizer, FACT + " And then some more words came."))
    assert len(memory) == 0 and memory.buffer  # fewer evicted tokens than one passage
    memory.segment("What is the pass code of the blue door?", lambda t: _tokens(tokenizer, t))
    assert memory.last.matched and "4817" in memory.last.passages[0]
    assert len(memory) == 0  # the temporary passage is gone again


def test_dense_scorer_ranks_by_pooled_states_and_fused_keeps_both(tokenizer):
    torch.manual_seed(0)
    hidden = 16
    for scorer in ("dense", "fused"):
        memory = RetrievalMemory(budget=96, passage_tokens=32, overlap=0, scorer=scorer, dense_layer=0)
        memory.tokenizer = tokenizer
        ids = _tokens(tokenizer, FILLER * 20)[:320]
        states = torch.randn(len(ids), hidden) * 0.1
        target = torch.zeros(hidden)
        target[3] = 5.0
        states[160:192] += target  # passage 6 (tokens 160..191) points somewhere else than all the others
        counters = _Counters(0, 16)
        counters.feed(memory, ids, states)
        assert len(memory) == (320 - 16) // 32
        best = memory.rank("zzzz", query=target)  # no word matches: only the dense score can find it
        assert best[0] == 6
        with pytest.raises(ValueError, match="vector"):
            memory.rank("anything")
    with pytest.raises(ValueError, match="hidden state"):
        memory.track([1, 2, 3], counters, torch.zeros(2, hidden))


def test_layer_tap_keeps_only_its_cache_and_is_removed_on_close(model):
    from streaming_llm.sessions.retrieval import LayerTap, query_vectors

    # The reference: a layer's output is the next layer's input, as output_hidden_states reports it
    # (transformers then keeps hooks of its own on the layers: count ours on top of them).
    reference = model(torch.arange(10, 40)[None], output_hidden_states=True).hidden_states[1]
    layers = model.get_decoder().layers
    baseline = [len(layer._forward_hooks) for layer in layers]
    cache, other = StreamingCache(model.config, 4, 40), StreamingCache(model.config, 4, 40)
    taps = [LayerTap(model, 0, cache), LayerTap(model, 1, cache)]
    assert [len(layer._forward_hooks) for layer in layers] == [n + 1 for n in baseline]
    prefill(model, cache, list(range(10, 40)), 8)
    prefill(model, other, list(range(10, 40)), 8)  # another cache: ignored
    states = taps[0].take()
    assert states.shape == (1, 30, model.config.hidden_size) and taps[0].take() is None
    torch.testing.assert_close(states, reference, rtol=1e-4, atol=1e-4)
    assert taps[1].take().shape == (1, 30, model.config.hidden_size)
    for tap in taps:
        tap.close()
    assert [len(layer._forward_hooks) for layer in layers] == baseline
    # The message's vector is the mean of the same layer's states over its tokens, read after the sinks.
    vector = query_vectors(model, [10, 11, 12, 13], [list(range(14, 40))], 0)
    torch.testing.assert_close(vector[0], reference[0, 4:].mean(dim=0), rtol=1e-4, atol=1e-5)
    assert [len(layer._forward_hooks) for layer in layers] == baseline


def test_state_round_trip_continues_exactly(tokenizer):
    def fresh():
        memory = RetrievalMemory(budget=96, passage_tokens=32, overlap=8, scorer="fused", dense_layer=0)
        memory.tokenizer = tokenizer
        return memory

    ids = _tokens(tokenizer, FILLER * 10 + FACT + FILLER * 4)
    states = torch.randn(len(ids) + 4, 8, generator=torch.Generator().manual_seed(0))
    a, counters = fresh(), _Counters(4, 24)
    counters.feed(a, [0, 0, 0, 0] + ids[:150], states[:154])
    tensors, meta = a.state()
    b = RetrievalMemory.from_state(tensors, meta)
    b.tokenizer = tokenizer
    assert b.settings() == a.settings() and (b.seen, b.evicted, b.received) == (a.seen, a.evicted, a.received)
    twin = _Counters(4, 24)
    twin.seen_tokens = counters.seen_tokens
    counters.feed(a, ids[150:], states[154:])
    twin.feed(b, ids[150:], states[154:])
    assert _rows(a) == _rows(b) and a.buffer == b.buffer
    query = states[100]
    question = "What is the pass code of the blue door?"
    tokenize = lambda t: _tokens(tokenizer, t)  # noqa: E731
    assert a.segment(question, tokenize, query) == b.segment(question, tokenize, query) != []
