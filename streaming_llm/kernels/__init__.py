"""Attention kernels for streaming ingestion (see :mod:`streaming_llm.kernels.banded`)."""

from .banded import DEFAULT_PATH, PATHS, QUERY_BLOCK, banded_attention

__all__ = ["DEFAULT_PATH", "PATHS", "QUERY_BLOCK", "banded_attention"]
