"""Exact KV memory of the streaming cache at total caches 512/1000/2000/4000, for SmolLM2-135M and Llama-3-8B.

Two numbers per cell: the K+V bytes of the tokens kept (2 x layers x kv_heads x head_dim x tokens x dtype bytes),
and what StreamingCache actually allocates (built on the meta device, so nothing is allocated; its ``nbytes``
counts every buffer, the one spare ring slot and the canonical sink keys included).
Run: python results/seed-table/kv_memory.py > results/seed-table/kv_memory.json
"""

import json

import torch
from transformers import LlamaConfig

from streaming_llm.core.cache import StreamingCache

MODELS = {
    "SmolLM2-135M (bf16)": LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                       hidden_size=576, head_dim=64, max_position_embeddings=8192),
    "Llama-3-8B (bf16, GQA 8 KV heads)": LlamaConfig(num_hidden_layers=32, num_attention_heads=32,
                                                     num_key_value_heads=8, hidden_size=4096, head_dim=128,
                                                     max_position_embeddings=8192),
}  # fmt: skip
rows = []
for name, config in MODELS.items():
    for total in (512, 1000, 2000, 4000):
        cache = StreamingCache(config, start_size=4, recent_size=total - 4)
        k = torch.empty(1, config.num_key_value_heads, 1, config.head_dim, dtype=torch.bfloat16, device="meta")
        for layer in cache.layers:
            layer.lazy_initialization(k, k)
        kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * total * 2
        rows.append({"model": name, "total_cache_tokens": total, "kv_bytes": kv, "kv_mib": round(kv / 2**20, 2),
                     "allocated_bytes": cache.nbytes, "allocated_mib": round(cache.nbytes / 2**20, 2)})  # fmt: skip
print(json.dumps(rows, indent=1))
