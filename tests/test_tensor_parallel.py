"""Tensor parallelism (transformers' tp_plan="auto"), checked on CPU with gloo: 2 processes.

Each rank holds only its KV heads in its own ring; positions and eviction are the same on every
rank, so results must equal the single-process run. (The 2-GPU run is in the README's notes.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_llama

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.compat import cache_kwargs
from streaming_llm.generation import decode_step, prefill

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

    streaming_llm.install(model)
    ids = torch.randint(0, 128, (1, 3 * (START + RECENT) + 11), generator=torch.Generator().manual_seed(0))
    cache = StreamingCache(model.config, START, RECENT)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=c, **cache_kwargs(model, cache)).logits[0] for c in ids.split(7, dim=1)])
        greedy = StreamingCache(model.config, START, RECENT)
        next_logits, tokens = prefill(model, greedy, ids[0, :10].tolist()), []
        for _ in range(3 * (START + RECENT)):
            tokens.append(int(next_logits.argmax()))
            next_logits = decode_step(model, greedy, tokens[-1])

    for rank in ranks:
        torch.testing.assert_close(rank["logits"], logits, atol=1e-5, rtol=0)
        assert rank["tokens"] == tokens
        assert rank["kv_heads"] == 1  # of the model's 2: each rank holds its own
        assert rank["nbytes"] * 2 == cache.nbytes  # per-rank cache memory is half


def test_bench_command_runs_tensor_parallel():
    command = [sys.executable, "-m", "streaming_llm.cli", "bench", "--random", "tiny", "--tp", "2", "--contexts", "64",
               "--decode", "4", "--chunk", "32", "--recent-size", "40", "--device", "cpu"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"tp": 2' in result.stdout and '"tokens_identical_on_all_ranks": true' in result.stdout
