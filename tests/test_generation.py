"""Generation: sampling, incremental detokenization, stop strings, EOS, endless constant memory."""

from __future__ import annotations

import pytest
import torch

from streaming_llm import StreamingCache
from streaming_llm.runtime.detokenize import IncrementalDetokenizer, StopMatcher
from streaming_llm.runtime.generation import generate, stream_generate
from streaming_llm.runtime.sampling import Sampler, SamplingConfig, neutral_token_ids

TEXTS = [
    "Hello, world!  Two spaces, then\ttab and\nnewline.",
    "Ünïcödé façade — naïve café, 東京タワー, emoji 🤖🚀 and 👩‍👩‍👧.",
    "   leading spaces and trailing   ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_reproduces_the_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # never a broken character on screen
    assert len(detok.tokens) == 0


def test_detokenizer_memory_stays_bounded(tokenizer):
    ids = tokenizer("word " * 2000, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    longest = 0
    for i in ids:
        detok.add(i)
        longest = max(longest, len(detok.tokens))
    assert longest <= 4


def test_stop_matcher_holds_back_possible_stops():
    m = StopMatcher(["STOP", "\n\n"])
    assert m.push("abc S") == ("abc ", False)
    assert m.push("T") == ("", False)
    assert m.push("x") == ("STx", False)
    assert m.push("yy\n") == ("yy", False)
    assert m.push("\nlater") == ("", True)
    m = StopMatcher(["STOP"])
    assert m.push("aSTOPb") == ("a", True)
    with pytest.raises(ValueError):
        StopMatcher([""])


def test_sampler_greedy_topk_topp_and_seed():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler()(logits) == 1
    assert Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=0))(logits) == 1
    assert Sampler(SamplingConfig(temperature=1.0, top_p=0.01, seed=0))(logits) == 1
    draws = [Sampler(SamplingConfig(temperature=1.0, seed=7))(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    spread = Sampler(SamplingConfig(temperature=5.0, seed=1))
    assert len({spread(logits) for _ in range(200)}) == 4  # all tokens reachable when hot


def test_repetition_penalty_discourages_seen_tokens():
    sampler = Sampler(SamplingConfig(repetition_penalty=2.0))
    sampler.observe([1])
    assert sampler(torch.tensor([0.1, 3.0, 2.9, -1.0])) == 2


def test_min_p_drops_unlikely_tokens():
    probs = torch.tensor([0.50, 0.30, 0.15, 0.04, 0.01])
    logits = probs.log()
    kept = Sampler(SamplingConfig(temperature=1.0, min_p=0.1, seed=0))
    assert {kept(logits) for _ in range(300)} == {0, 1, 2}  # 0.04 and 0.01 are below 0.1 * 0.5
    every = Sampler(SamplingConfig(temperature=1.0, seed=0))
    assert {every(logits) for _ in range(2000)} == {0, 1, 2, 3, 4}


def test_top_k_and_top_p_sample_among_the_right_tokens():
    logits = torch.tensor([0.40, 0.30, 0.20, 0.10]).log()
    top_k = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=0))
    assert {top_k(logits) for _ in range(300)} == {0, 1}
    top_p = Sampler(SamplingConfig(temperature=1.0, top_p=0.75, seed=0))  # 0.4 + 0.3 < 0.75: keeps 3
    assert {top_p(logits) for _ in range(300)} == {0, 1, 2}


def test_suppressed_tokens_are_never_picked():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingConfig(suppress_ids=(1,)))(logits) == 2


def test_dry_penalises_continuing_a_repeated_sequence():
    config = SamplingConfig(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    sampler = Sampler(config)
    sampler.observe([5, 6, 7, 8, 1, 2, 9, 5, 6, 7])  # "5 6 7" repeats; it was followed by 8
    assert sampler._dry_penalties() == {8: pytest.approx(0.8 * 1.75 ** (3 - 2))}
    logits = torch.zeros(10)
    logits[8], logits[1] = 1.0, 0.0  # 8 wins without DRY, loses by 1.4 - 1.0 with it
    assert Sampler(SamplingConfig())(logits) == 8
    assert sampler(logits) != 8
    short = Sampler(config)
    short.observe([3, 4, 1, 3])  # a repeat of one token is allowed
    assert short._dry_penalties() == {}


def test_repetition_penalty_spares_whitespace_and_punctuation(tokenizer):
    neutral = neutral_token_ids(tokenizer)
    comma, newline, space, the, a = (tokenizer.convert_tokens_to_ids(t) for t in (",", "Ċ", "Ġ", "Ġthe", "Ġa"))
    assert {comma, newline, space} <= neutral and the not in neutral and a not in neutral
    config = SamplingConfig(repetition_penalty=2.0)
    for seen in (comma, the):  # seen at logit 2.0 (halved to 1.0 if penalised); an unseen word at 1.5
        logits = torch.zeros(len(tokenizer))
        logits[seen], logits[a] = 2.0, 1.5
        blind, aware = Sampler(config), Sampler(config, tokenizer=tokenizer)
        blind.observe([seen])
        aware.observe([seen])
        assert blind(logits) == a  # without the tokenizer every seen token is penalised
        assert aware(logits) == (comma if seen == comma else a)  # words still are, punctuation is not


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"repetition_penalty": 0}])
def test_bad_sampling_settings(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def test_stream_generate_equals_transformers_generate(model, tokenizer):
    prompt = tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    pieces = list(stream_generate(model, tokenizer, prompt, start_size=4, recent_size=16, max_new_tokens=60))
    ours = [p.token_id for p in pieces if p.token_id is not None]
    model.generation_config.eos_token_id = None  # generate() must not stop early either
    ref = model.generate(
        torch.tensor([prompt]), past_key_values=StreamingCache(model.config, 4, 16), max_new_tokens=60, do_sample=False
    )[0, len(prompt) :].tolist()
    assert ours == ref
    assert pieces[-1].finish_reason == "length"
    assert "".join(p.text for p in pieces) == tokenizer.decode(ref)


def test_eos_ends_generation(model, tokenizer):
    prompt = "Once upon a time"
    first = [p.token_id for p in stream_generate(model, tokenizer, prompt, max_new_tokens=5)][:5]
    model.generation_config.eos_token_id = first[3]  # make the 4th greedy token the end
    pieces = list(stream_generate(model, tokenizer, prompt, max_new_tokens=50))
    assert pieces[-1].finish_reason == "eos"
    assert pieces[-1].generated == 4


def test_stop_string_ends_generation_and_is_not_shown(model, tokenizer):
    full = generate(model, tokenizer, "Once upon a time", max_new_tokens=40)
    stop = full[10:14]
    pieces = list(stream_generate(model, tokenizer, "Once upon a time", max_new_tokens=40, stop=[stop]))
    assert pieces[-1].finish_reason == "stop"
    assert "".join(p.text for p in pieces) == full[: full.index(stop)]


def test_endless_generation_keeps_memory_flat(model, tokenizer):
    window = 16
    sizes, seen = set(), 0
    stream = stream_generate(
        model, tokenizer, "Hi", start_size=4, recent_size=window, max_new_tokens=None,
        sampling=SamplingConfig(temperature=1.0, seed=0),
    )  # fmt: skip
    model.generation_config.eos_token_id = None
    for piece in stream:
        sizes.add(piece.cache_bytes)
        seen = piece.seen_tokens
        if piece.generated >= 12 * (4 + window):
            break
    assert seen > 10 * (4 + window)
    assert len(sizes) == 1


def test_generate_rejects_bad_lengths(model, tokenizer):
    with pytest.raises(ValueError, match="finite max_new_tokens"):
        generate(model, tokenizer, "x", max_new_tokens=None)
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        next(stream_generate(model, tokenizer, "x", max_new_tokens=0))
