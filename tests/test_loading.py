"""Offline model loading: embedded model, local directories, GGUF files, device and dtype."""

from __future__ import annotations

import pytest
import torch

from streaming_llm.runtime.loading import embedded_gguf, pick_device, pick_dtype, resolve


def test_default_is_the_embedded_model_converted_once():
    directory = resolve(None)
    assert (directory / "config.json").exists() and (directory / "model.safetensors").exists()
    assert resolve(None) == directory  # converted once, then reused
    assert resolve(directory) == directory  # a local HF directory is used as is


def test_a_gguf_file_is_converted_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMING_LLM_HOME", str(tmp_path))
    directory = resolve(embedded_gguf())
    assert directory.parent == tmp_path and (directory / "config.json").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        resolve(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="Hugging Face model directory"):
        resolve("some-org/some-hub-model")


def test_device_and_dtype_defaults_and_overrides():
    cpu = torch.device("cpu")
    assert pick_dtype(None, cpu) == torch.float32
    assert pick_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("bf16", cpu) == torch.bfloat16
    assert pick_device("cpu") == cpu
    with pytest.raises(ValueError, match="Unknown dtype"):
        pick_dtype("int3", cpu)


def test_loading_shows_no_weight_loading_bar(tmp_path, capfd):
    from conftest import tiny_llama
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from streaming_llm.runtime.loading import load_model

    tiny_llama(vocab_size=49152).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(resolve(None)).save_pretrained(tmp_path)
    capfd.readouterr()
    model, _ = load_model(str(tmp_path), device="cpu")
    assert model.config.num_hidden_layers == 2
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # switched back on afterwards
