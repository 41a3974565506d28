"""Batched recall evaluation: a row of the batch is exactly one session's document and question."""

from __future__ import annotations

import json

import pytest
import torch

from streaming_llm.core.cache import StreamingCache
from streaming_llm.eval.recall import fork
from streaming_llm.eval.recall_batch import (
    FAMILIES,
    Prompt,
    Runner,
    Unit,
    build_rows,
    cell_table,
    copy_cache,
    load_records,
    parse_methods,
    plan_units,
    run_batched,
    vocabulary,
)
from streaming_llm.runtime.generation import prefill
from streaming_llm.sessions.retrieval import RetrievalMemory
from streaming_llm.sessions.session import StreamingSession

SETTINGS = {"budget": 96, "passage_tokens": 32, "overlap": 8}


@pytest.fixture(scope="module")
def filler_ids(tokenizer) -> list[int]:
    from streaming_llm.data import read_text

    return tokenizer(read_text()[200_000:260_000], add_special_tokens=False)["input_ids"]


def _session_answer(model, tokenizer, row, window, distance, variant_settings=None, tokens=24, stop=("\n",)):
    """The same trial through the public session path: ingest the document, fork, ask."""
    memory = RetrievalMemory(**{**SETTINGS, **variant_settings}) if variant_settings is not None else None
    session = StreamingSession(model, tokenizer, "You are a helpful assistant.", recent_size=window, memory=memory)
    before, after = session.template.split("user")
    session.feed(session._tokens(before) + row.block)
    session.feed(row.body[:distance])
    clone = fork(session)
    clone.feed(session._tokens(after))
    if memory is not None:
        memory.recall(clone, row.question)
    answer = clone.chat(row.question, tokens, stop=stop).strip()
    return answer, (memory.last.passages if memory is not None else None)


@pytest.mark.parametrize("variant", ["streaming", "retrieval", "retrieval-sent", "retrieval-dense"])
def test_a_batch_row_answers_as_the_session_does(model, tokenizer, filler_ids, tmp_path, variant):
    rows = build_rows("single", 9, 0, tokenizer, filler_ids, 160)[::3]  # one template: questions of one length
    runner = Runner(model, tokenizer, tmp_path / "cells.jsonl", dict(SETTINGS), chunk_tokens=3 * 50)
    method = parse_methods(f"{variant}:40", 4000)
    runner.run(Unit("single", rows, 40, method), [160])
    cells = [r for r in load_records(tmp_path / "cells.jsonl") if r["kind"] == "cell"]
    assert [c["trial"] for c in cells] == [0, 3, 6] and {c["distance"] for c in cells} == {160}
    settings = {"streaming": None, "retrieval": {}, "retrieval-sent": {"split": "sentences"},
                "retrieval-dense": {"scorer": "dense", "dense_layer": 1}}[variant]  # fmt: skip
    for row, cell in zip(rows, cells, strict=True):
        answer, passages = _session_answer(model, tokenizer, row, 40, 160, settings)
        assert cell["answer"] == answer
        if passages is not None:  # the same passages were pinned (the fact was evicted ~140 tokens ago)
            assert cell["segment_tokens"] == SETTINGS["budget"] and passages
            assert cell["retrieved"] == row.fact.judge("\n".join(passages))


def test_multivalue_answers_are_not_cut_at_a_line_break(model, tokenizer, filler_ids, tmp_path):
    rows = build_rows("multivalue", 2, 0, tokenizer, filler_ids, 100)
    runner = Runner(model, tokenizer, tmp_path / "cells.jsonl", chunk_tokens=2 * 400)
    runner.run(Unit("multivalue", rows, 40, parse_methods("streaming:40", 4000)), [100])
    cells = [r for r in load_records(tmp_path / "cells.jsonl") if r["kind"] == "cell"]
    for row, cell in zip(rows, cells, strict=True):
        assert cell["answer"] == _session_answer(model, tokenizer, row, 40, 100, tokens=64, stop=())[0]


def test_greedy_answers_stop_at_end_of_turn_and_optionally_at_a_line_break(tokenizer):
    from types import SimpleNamespace

    from streaming_llm.eval.recall_batch import greedy_answers

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [ids("Yes") + ids("\n") + ids("1234") + [eos], ids("No") + ids(" way") + [eos]]
    rows[1] += [eos] * (len(rows[0]) - len(rows[1]))
    steps = list(zip(*rows, strict=True))  # the token each row picks at each step

    class Scripted:  # a "model" that picks the scripted tokens
        generation_config = SimpleNamespace(eos_token_id=eos)

        def __init__(self):
            self.step = 0

        def forward(self, input_ids=None, position_ids=None, use_cache=None, logits_to_keep=None, cache=None):
            self.step += 1
            return SimpleNamespace(logits=_onehot(steps[self.step])[:, None])

        __call__ = forward

    def _onehot(tokens):
        logits = torch.zeros(len(tokens), len(tokenizer))
        logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
        return logits

    cache = SimpleNamespace(position_ids=lambda n, device=None: torch.arange(n)[None])

    def answers(tokens, one_line=True):
        return greedy_answers(Scripted(), tokenizer, cache, _onehot(steps[0]), tokens, one_line)

    assert answers(10) == ["Yes", "No way"]  # cut at the line break; end-of-turn is never part of a reply
    assert answers(10, one_line=False) == ["Yes\n1234", "No way"]
    assert answers(2, one_line=False) == ["Yes", "No way"]  # at most 2 tokens


def test_rows_of_a_family_share_lengths_and_plant_the_needles(tokenizer, filler_ids):
    for family in FAMILIES:
        rows = build_rows(family, 6, 0, tokenizer, filler_ids, 500)
        assert len({len(r.block) for r in rows}) == 1 and all(len(r.body) == 500 for r in rows)
        for row in rows:
            text = tokenizer.decode(row.block)
            assert text.rstrip().endswith(row.fact.sentence)  # the target is last: its distance is exact
            assert all(needle in text for needle in row.fact.others)
            assert all(piece in row.fact.sentence + " ".join(row.fact.others) for piece in row.fact.expected)
    assert [r.fact.template for r in build_rows("single", 4, 0, tokenizer, filler_ids, 10)] == [
        "code", "date", "name", "code"
    ]  # fmt: skip
    # Questions of a family have one token length per template (so each template is one batch).
    prompt = Prompt.build(tokenizer)
    rows = build_rows("multikey", 20, 1, tokenizer, filler_ids, 10)
    assert len({len(prompt.question(tokenizer, r.question)) for r in rows}) == 1
    assert all(len(words) >= 5 for words in vocabulary(tokenizer).values())


def test_units_are_grouped_and_ordered(tokenizer, filler_ids):
    methods = parse_methods("dense,streaming:256,streaming:1024,retrieval:1024", 8184)
    units = plan_units(["single", "multikey"], 9, methods, [64, 1024], tokenizer, filler_ids, batch_rows=2)
    order = list(dict.fromkeys((u.window, u.family) for u in units))
    assert order == [(1024, "single"), (1024, "multikey"), (8184, "single"), (8184, "multikey"), (256, "single"),
                     (256, "multikey")]  # the memory's window first, then dense, then the baselines  # fmt: skip
    single_1024 = [u for u in units if u.family == "single" and u.window == 1024]
    assert sum(len(u.rows) for u in single_1024) == 9 and max(len(u.rows) for u in single_1024) == 2
    assert all(len({r.fact.template for r in u.rows}) == 1 for u in units)
    assert [u.timed for u in single_1024].count(True) == 1 and not any(u.timed for u in units if u.family != "single")
    # The dense unit's cache (and its copy) is rows x window slots: bounded by max_slots.
    wide = plan_units(["multikey"], 9, methods, [64], tokenizer, filler_ids, batch_rows=64, max_slots=3 * 8184)
    assert [len(u.rows) for u in wide if u.window == 8184] == [3, 3, 3]
    assert [len(u.rows) for u in wide if u.window == 1024] == [9]
    with pytest.raises(ValueError, match="hybrid"):
        parse_methods("hybrid:256", 8184)


@torch.no_grad()
def test_a_copied_row_continues_exactly_like_its_batch_row(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 90))
    cache = StreamingCache(model.config, 4, 40)
    prefill_rows = model(input_ids=ids, position_ids=cache.position_ids(90), use_cache=True, past_key_values=cache)
    assert prefill_rows.logits.shape[0] == 3
    alone = copy_cache(model, cache, [1])
    assert alone.seen_tokens == cache.seen_tokens
    step = torch.randint(0, model.config.vocab_size, (3, 7))
    batch = model(input_ids=step, position_ids=cache.position_ids(7), use_cache=True, past_key_values=cache).logits
    one = model(input_ids=step[1:2], position_ids=alone.position_ids(7), use_cache=True, past_key_values=alone).logits
    torch.testing.assert_close(one[0], batch[1], rtol=0, atol=1e-5)
    # And a batch row equals the same tokens streamed alone from the start.
    single = StreamingCache(model.config, 4, 40)
    prefill(model, single, ids[1].tolist(), 30)
    last = prefill(model, single, step[1].tolist(), 7)
    torch.testing.assert_close(last, batch[1, -1], rtol=0, atol=1e-4)


def test_run_resumes_and_stops_on_time(model, tokenizer, tmp_path):
    from streaming_llm.data import read_text

    filler = read_text()[300_000:340_000]
    methods = parse_methods("streaming:40,retrieval:40", 4000)
    jsonl = tmp_path / "cells.jsonl"
    kwargs = dict(jsonl=jsonl, retrieval_settings=SETTINGS, chunk_tokens=256, log=lambda _: None)
    ticks = iter([0.0, 0.0])  # the start, the check before the first unit; then the time is up
    stopped = run_batched(model, tokenizer, filler, ["single"], [32, 96], methods, trials=3, max_seconds=10,
                          clock=lambda: next(ticks, 1e9), **kwargs)  # fmt: skip
    assert len(stopped) == 1  # the first unit starts and stops after its first distance; no other starts
    first = load_records(jsonl)
    assert {c["distance"] for c in first if c["kind"] == "cell"} == {32}
    records = run_batched(model, tokenizer, filler, ["single"], [32, 96], methods, trials=3, **kwargs)
    assert len(records) == 3  # every unit ran again, for the distance it missed
    cells = [r for r in load_records(jsonl) if r["kind"] == "cell"]
    table = cell_table(load_records(jsonl))
    assert [(t["method"], t["distance"], t["trials"]) for t in table] == [
        ("retrieval:40", 32, 3), ("retrieval:40", 96, 3), ("streaming:40", 32, 3), ("streaming:40", 96, 3)
    ]  # fmt: skip
    assert len(cells) == 3 * 2 * 2  # trials x methods x distances: nothing measured twice
    assert all(t["turn_ms"] is not None for t in table)  # the single family times one session's turn
    again = run_batched(model, tokenizer, filler, ["single"], [32, 96], methods, trials=3, **kwargs)
    assert again == []  # nothing missing: nothing runs
    assert all(json.loads(line)["kind"] in ("cell", "turn", "stream") for line in jsonl.read_text().splitlines())
