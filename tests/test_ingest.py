"""Ingesting long documents: the exact tokens of the same text sent as a message, and progress that moves.

The expected ids are the tokenizer's rendering of one user message holding the whole document
(``apply_chat_template`` + ``tokenizer``), never what ingest computed; the model is a tiny random Llama over
the SmolLM2 vocabulary, its forwards slowed down where the progress is under test.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO, tiny_llama

from streaming_llm import StreamingSession
from streaming_llm.sessions import documents


def message_ids(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` sent as the first user message (no system prompt: the template adds its default)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def recorded(session: StreamingSession) -> list[list[int]]:
    """Every ``feed`` call's ids from now on (the calls still run)."""
    calls, feed = [], session.feed
    session.feed = lambda ids: (calls.append(list(ids)), feed(ids))[1]
    return calls


def fed_document(model, tokenizer, source, **kwargs) -> tuple[list[int], list[list[int]], object]:
    session = StreamingSession(model, tokenizer, recent_size=64)
    calls = recorded(session)
    stats = session.ingest(source, progress=False, **kwargs)
    return [i for c in calls for i in c], calls, stats


@pytest.mark.parametrize("block", [65536, 999])
def test_a_file_is_fed_as_the_tokens_of_the_same_text_sent_as_a_message(model, tokenizer, shakespeare, tmp_path,
                                                                       monkeypatch, block):  # fmt: skip
    monkeypatch.setattr(documents, "BLOCK_BYTES", block)
    text = shakespeare[:70_000]
    path = tmp_path / "plays.txt"
    path.write_text(text, encoding="utf-8")
    ids, calls, stats = fed_document(model, tokenizer, path, chunk_size=512)
    assert ids == message_ids(tokenizer, text)
    assert stats.tokens == len(ids) and stats.characters == len(text)
    assert max(map(len, calls)) <= 512  # fed chunk by chunk


def test_a_string_without_spaces_is_fed_exactly(model, tokenizer, monkeypatch):
    monkeypatch.setattr(documents, "BLOCK_CHARS", 777)
    rng = random.Random(2)
    text = "".join(rng.choice("日本語の文章です中国人民共和国한국어텍스트") for _ in range(6000))
    ids, _, _ = fed_document(model, tokenizer, text)
    assert ids == message_ids(tokenizer, text)


def test_a_block_boundary_inside_a_multibyte_character(model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "BLOCK_BYTES", 1000)
    rng = random.Random(3)
    text = "".join(rng.choice(["日本", "🙂", "é", " mot", "\n", "Ω"]) for _ in range(3000))
    raw = text.encode("utf-8")
    cuts = [k for k in range(1000, len(raw), 1000)]
    inside = [k for k in cuts if (raw[k] & 0xC0) == 0x80]  # a continuation byte: the cut splits a character
    assert len(inside) > len(cuts) // 3
    path = tmp_path / "mixed.txt"
    path.write_bytes(raw)
    ids, _, stats = fed_document(model, tokenizer, path)
    assert ids == message_ids(tokenizer, text) and stats.characters == len(text)


def test_a_missing_file_changes_nothing(model, tokenizer, tmp_path):
    session = StreamingSession(model, tokenizer, "Be brief.", recent_size=64)
    seen, context = session.cache.seen_tokens, list(session.template.context)
    with pytest.raises(FileNotFoundError):
        session.ingest(tmp_path / "missing.txt", progress=False)
    assert (session.cache.seen_tokens, session.template.context) == (seen, context)


def slow(model, seconds: float):
    return model.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def test_progress_moves_every_chunk_with_characters_tokens_and_rate(model, tokenizer, shakespeare):
    text = shakespeare[:20_000]
    reports = []
    session = StreamingSession(model, tokenizer, recent_size=64)
    hook = slow(model, 0.02)
    try:
        began = time.perf_counter()
        stats = session.ingest(text, chunk_size=64, progress=lambda p: reports.append((time.perf_counter(), p)))
    finally:
        hook.remove()
    tokens = [p.tokens for _, p in reports]
    assert tokens[-1] == stats.tokens == len(message_ids(tokenizer, text))
    assert tokens[0] <= 64 and max(b - a for a, b in zip(tokens, tokens[1:], strict=False)) <= 64  # every chunk
    assert reports[0][0] - began < 1.0  # the first report within the first seconds
    done = [p.done for _, p in reports]
    chars = [p.characters for _, p in reports]
    assert done == sorted(done) and chars == sorted(chars) and done[-1] == len(text) == chars[-1]
    assert all(p.unit == "char" and p.total == len(text) for _, p in reports)
    middle = reports[len(reports) // 2][1]
    assert 0.3 < middle.done / middle.total < 0.7 and middle.tokens_per_second > 0  # moves with the tokens


def test_the_bar_shows_characters_tokens_rate_time_left_and_an_estimate(model, tokenizer, shakespeare, tmp_path,
                                                                        capsys):  # fmt: skip
    path = tmp_path / "doc.txt"
    path.write_text(shakespeare[:12_000], encoding="utf-8")
    session = StreamingSession(model, tokenizer, recent_size=64)
    hook = slow(model, 0.03)
    try:
        stats = session.ingest(path, chunk_size=48, progress=True)
    finally:
        hook.remove()
    err = capsys.readouterr().err
    states = re.findall(r"ingest:\s+(\d+)%\|[^|]*\| [\d.]+k?/[\d.]+k \[[\d:]+<([\d:?]+), [^,\]]+B/s, ([\d,]+) chars, "
                        r"([\d,]+) tokens, ([\d,]+) tok/s\]", err)  # fmt: skip
    assert states, err
    assert any(0 < int(s[0]) < 100 and s[1] != "?" for s in states), err  # time left while it runs
    assert states[-1][0] == "100" and int(states[-1][3].replace(",", "")) == stats.tokens
    estimate = re.search(r"ingest: about ([\d,]+) tokens; about \d+ (s|min) at ([\d,]+) tok/s on cpu", err)
    assert estimate, err
    assert abs(int(estimate[1].replace(",", "")) / stats.tokens - 1) < 0.25  # roughly right, said up front


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-ingest-model")
    model = tiny_llama(vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_the_cli_feeds_the_tokens_of_the_whole_text(tiny_dir, tokenizer, shakespeare, tmp_path):
    # The real 64 KiB read block ends inside a multi-byte character.
    head = shakespeare[:65_535].encode("utf-8")[:65_535].decode("utf-8", "ignore")
    head += "x" * (65_535 - len(head.encode("utf-8")))
    text = head + "日本語" + shakespeare[65_535:80_000]
    assert (text.encode("utf-8")[65_536] & 0xC0) == 0x80
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    command = [sys.executable, "-m", "streaming_llm.cli", "ingest", str(path), "--model", str(tiny_dir), "--device",
               "cpu", "--recent-size", "64", "--chunk-size", "512", "-q", "Who?", "--max-tokens", "2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    fed = re.search(r"\[ingested ([\d,]+) tokens \(([\d,]+) characters\)", result.stderr)
    assert fed, result.stderr
    assert int(fed[1].replace(",", "")) == len(message_ids(tokenizer, text))
    assert int(fed[2].replace(",", "")) == len(text)
