"""Model shapes for random-weight benchmarks (speed does not depend on the weights); no torch import."""

from __future__ import annotations

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
)  # fmt: skip
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=8192,
)  # fmt: skip

# `streaming-llm bench --random NAME`
RANDOM_SHAPES = {"tiny": TINY, "smollm2-135m": SMOLLM2_135M, "llama3-8b": LLAMA3_8B}
