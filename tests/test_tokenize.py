"""Incremental tokenization (runtime/tokenize.py): the ids of a text fed in blocks are the ids of the whole text.

The expectation is always ``tokenizer(whole_text, add_special_tokens=False)``; block sizes are chosen to cut
words, line breaks and (byte-level BPE) characters that span several tokens.
"""

from __future__ import annotations

import random

import pytest

from streaming_llm.runtime.tokenize import stream_token_ids, stream_tokens


def whole(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def blocks(text: str, size: int):
    return (text[i : i + size] for i in range(0, len(text), size))


def streamed(tokenizer, text: str, size: int) -> list[int]:
    return [i for ids in stream_token_ids(tokenizer, blocks(text, size)) for i in ids]


@pytest.mark.parametrize("size", [65536, 4999, 997, 61])
def test_the_packaged_text_gives_the_ids_of_tokenizing_it_whole(tokenizer, shakespeare, size):
    text = shakespeare[:300_000]
    expected = whole(tokenizer, text)
    pieces = list(stream_tokens(tokenizer, blocks(text, size)))
    assert [i for p in pieces for i in p.ids] == expected
    assert "".join(p.text for p in pieces) == text
    assert all(whole(tokenizer, p.text) for p in pieces)  # every piece is real text with tokens
    if size == 65536:  # what tokenizing each block alone gives (the bug this replaces) is not that
        naive = [i for block in blocks(text, size) for i in whole(tokenizer, block)]
        assert naive != expected


CJK = "日本語の文章です中国人民共和国한국어텍스트東京大阪漢字仮名"


@pytest.mark.parametrize("size", [65536, 1000, 333, 7])
def test_text_without_spaces(tokenizer, size):
    rng = random.Random(0)
    text = "".join(rng.choice(CJK) for _ in range(40_000))  # no space, no punctuation: one long pre-token
    text += "。" + "".join(rng.choice(CJK + "、。") for _ in range(20_000))
    assert streamed(tokenizer, text, size) == whole(tokenizer, text)


def test_characters_split_into_byte_tokens_across_blocks(tokenizer):
    # Rare characters (emoji, combining marks) become several byte tokens; blocks cut between every pair.
    rng = random.Random(1)
    alphabet = ["🙂", "🚀", "e\u0301", "ß", "ΩΨ", "\U0001f9ec", " ", "\n", "word", "日"]
    text = "".join(rng.choice(alphabet) for _ in range(30_000))
    for size in (1, 2, 3, 1023):
        assert streamed(tokenizer, text, size) == whole(tokenizer, text)


def test_short_and_empty_texts(tokenizer):
    assert streamed(tokenizer, "", 10) == []
    assert list(stream_tokens(tokenizer, [])) == []
    for text in ("a", " war", "\n\n", "Hello,  world!\n"):
        assert streamed(tokenizer, text, 1) == whole(tokenizer, text)


def test_memory_stays_bounded_and_blocks_are_read_lazily(tokenizer, shakespeare):
    text = shakespeare[:400_000]
    read = [0]

    def counted():
        for block in blocks(text, 10_000):
            read[0] += len(block)
            yield block

    emitted = 0
    for piece in stream_tokens(tokenizer, counted()):
        emitted += len(piece.text)
        assert read[0] - emitted <= 10_000 + 4096 + 512 + 2  # one block, the gathering threshold and the margin
    assert emitted == len(text)


def test_a_sentencepiece_style_tokenizer(shakespeare):
    """Tokenizers that mark the start of a text (SentencePiece's '▁') are exact too, thanks to the left context."""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = shakespeare[:100_000]
    trainer = SentencePieceUnigramTokenizer()
    trainer.train_from_iterator(blocks(corpus, 1000), vocab_size=800, unk_token="<unk>", special_tokens=["<unk>"],
                                show_progress=False)  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer)
    text = shakespeare[100_000:160_000]
    for size in (5000, 997, 13):
        assert streamed(tokenizer, text, size) == whole(tokenizer, text)
