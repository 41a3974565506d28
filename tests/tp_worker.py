"""Streaming run shared by tests/test_tensor_parallel.py: run under torchrun it streams with a
tensor-parallel model; imported, the test runs the same function in one process."""

from __future__ import annotations

import sys
import warnings

import torch

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core.compat import cache_kwargs
from streaming_llm.core.stepper import Stepper


@torch.no_grad()
def stream_and_decode(model, start: int, recent: int) -> dict:
    """Logits of 3x-the-cache tokens streamed in chunks of 7, greedy tokens, and the cache's shape."""
    streaming_llm.install(model)
    length = 3 * (start + recent) + 11
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    cache = StreamingCache(model.config, start, recent)
    logits = torch.cat([model(input_ids=c, **cache_kwargs(model, cache)).logits[0] for c in ids.split(7, dim=1)])
    greedy = Stepper(model, StreamingCache(model.config, start, recent))  # sized by the rank's own heads
    next_logits, tokens = greedy.prefill(0, ids[0, :10]), []
    for _ in range(3 * (start + recent)):
        tokens.append(int(next_logits.argmax()))
        next_logits = greedy.decode({0: tokens[-1]})[0]
    return {"logits": logits, "tokens": tokens, "nbytes": cache.nbytes, "kv_heads": cache.layers[0].keys.shape[1]}


if __name__ == "__main__":
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    warnings.simplefilter("ignore")
    model_dir, out, start, recent = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    torch.save(stream_and_decode(model, start, recent), f"{out}.rank{dist.get_rank()}")
    dist.destroy_process_group()
