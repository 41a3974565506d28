"""Shared fixtures: tiny random models (most tests) and the real embedded SmolLM2 (a few)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import streaming_llm

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random 2-layer Llama (GQA 4/2 heads), fp32, eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def record_fed(engine, monkeypatch) -> list[int]:
    """Every token id the engine's stepper feeds from now on (prefill chunks and decode steps), in order."""
    fed: list[int] = []
    prefill, decode = engine.stepper.prefill, engine.stepper.decode

    def recording_prefill(b, ids):
        fed.extend(int(i) for i in ids)
        return prefill(b, ids)

    def recording_decode(tokens):
        fed.extend(int(t) for _, t in sorted(tokens.items()))
        return decode(tokens)

    monkeypatch.setattr(engine.stepper, "prefill", recording_prefill)
    monkeypatch.setattr(engine.stepper, "decode", recording_decode)
    return fed


@pytest.fixture(autouse=True)
def _quiet_small_window_warnings():
    # Tests use tiny windows on purpose; the warnings themselves are tested explicitly.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*recent_size=\d+ is very small.*")
        warnings.filterwarnings("ignore", message=r".*start_size=0 keeps no attention sinks.*")
        yield


@pytest.fixture
def llama():
    return streaming_llm.install(tiny_llama())


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    from streaming_llm.runtime.loading import resolve

    return AutoTokenizer.from_pretrained(resolve(None))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama over the SmolLM2 vocabulary, saved as a local model directory."""
    path = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def model(tokenizer):
    """A tiny random Llama over the real SmolLM2 vocabulary, switched to streaming attention."""
    return streaming_llm.install(tiny_llama(vocab_size=len(tokenizer)))


@pytest.fixture(scope="session")
def smollm():
    from streaming_llm.runtime.loading import load_model

    model, tokenizer = load_model(device="cpu", dtype="float32")
    return model, tokenizer


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The complete works of Shakespeare shipped with the package (streaming_llm/data)."""
    from streaming_llm.data import read_text

    return read_text()
