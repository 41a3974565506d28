"""Tensor parallelism (transformers' tp_plan="auto"), checked on CPU with gloo: 2 processes.

Each rank holds only its KV heads in its own ring; positions and eviction are the same on every
rank, so results must equal the single-process run. (The 2-GPU run is in the README's notes.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_llama
from tp_worker import stream_and_decode

START, RECENT = 4, 12


def test_two_rank_streaming_equals_one_process(tmp_path):
    model = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp_path / "model")
    worker = Path(__file__).with_name("tp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(worker), str(tmp_path / "model"), str(tmp_path / "out"), str(START), str(RECENT)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"out.rank{r}") for r in range(2)]

    single = stream_and_decode(model, START, RECENT)
    for rank in ranks:
        torch.testing.assert_close(rank["logits"], single["logits"], atol=1e-5, rtol=0)
        assert rank["tokens"] == single["tokens"]
        assert rank["kv_heads"] == 1 and single["kv_heads"] == 2  # each rank holds its own of the 2 heads
        assert rank["nbytes"] * 2 == single["nbytes"]  # per-rank cache memory is half


def test_bench_command_runs_tensor_parallel():
    command = [sys.executable, "-m", "streaming_llm.cli", "bench", "--random", "tiny", "--tp", "2", "--contexts", "64",
               "--decode", "4", "--chunk", "32", "--recent-size", "40", "--device", "cpu"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"tp": 2' in result.stdout and '"tokens_identical_on_all_ranks": true' in result.stdout
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    single = [r for r in rows if r["tp"] == 1]  # the single-device row of the same run, beside the 2-rank one
    assert len(single) == 1 and single[0]["cache_mib"] == 2 * next(r for r in rows if r["tp"] == 2)["cache_mib"]


def test_bench_random_model_runs_on_one_device():
    """A saved random model has no tokenizer; the single-device bench must not ask for one."""
    command = [sys.executable, "-m", "streaming_llm.cli", "bench", "--random", "tiny", "--contexts", "64",
               "--decode", "4", "--chunk", "32", "--recent-size", "40", "--device", "cpu"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"tp": 1' in result.stdout
