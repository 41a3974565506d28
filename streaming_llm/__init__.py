"""streaming-llm: read and talk forever in constant memory with attention sinks + a rolling window.

The public API is imported lazily (PEP 562): ``import streaming_llm`` costs nothing, and torch and
transformers are imported only when a name below is first used, so ``streaming-llm --help`` is
instant. Using any of them also registers the ``"streaming_llm"`` attention with transformers
(:func:`install` does that too), so a model can be switched with ``set_attn_implementation``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SUPPORTED": "architectures",
    "ModelSpec": "architectures",
    "describe": "architectures",
    "install": "attention",
    "uninstall": "attention",
    "StreamingCache": "cache",
    "StartRecentKVCache": "enable_streaming_llm",
    "enable_streaming_llm": "enable_streaming_llm",
    "GenerationChunk": "generation",
    "generate": "generation",
    "stream_generate": "generation",
    "load_model": "loading",
    "SamplingConfig": "sampling",
    "StreamingSession": "session",
    "SessionStats": "session",
    "SessionBrokenError": "session",
    "SessionFileError": "persistence",
    "HybridMemory": "memory",
    "Decoder": "decode",
    "SlotCache": "slots",
    "Scheduler": "scheduler",
}

__all__ = [
    "SUPPORTED",
    "Decoder",
    "GenerationChunk",
    "HybridMemory",
    "ModelSpec",
    "SamplingConfig",
    "Scheduler",
    "SessionBrokenError",
    "SessionFileError",
    "SessionStats",
    "SlotCache",
    "StartRecentKVCache",
    "StreamingCache",
    "StreamingSession",
    "describe",
    "enable_streaming_llm",
    "generate",
    "install",
    "load_model",
    "stream_generate",
    "uninstall",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .architectures import SUPPORTED, ModelSpec, describe
    from .attention import install, uninstall
    from .cache import StreamingCache
    from .decode import Decoder
    from .enable_streaming_llm import StartRecentKVCache, enable_streaming_llm
    from .generation import GenerationChunk, generate, stream_generate
    from .loading import load_model
    from .memory import HybridMemory
    from .persistence import SessionFileError
    from .sampling import SamplingConfig
    from .scheduler import Scheduler
    from .session import SessionBrokenError, SessionStats, StreamingSession
    from .slots import SlotCache


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streaming_llm' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    importlib.import_module(".attention", __name__).register()  # idempotent
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
