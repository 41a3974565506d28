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
    "SUPPORTED": "core.architectures",
    "ModelSpec": "core.architectures",
    "describe": "core.architectures",
    "install": "core.attention",
    "uninstall": "core.attention",
    "StreamingCache": "core.cache",
    "StartRecentKVCache": "enable_streaming_llm",
    "enable_streaming_llm": "enable_streaming_llm",
    "GenerationChunk": "runtime.generation",
    "generate": "runtime.generation",
    "stream_generate": "runtime.generation",
    "load_model": "runtime.loading",
    "SamplingConfig": "runtime.sampling",
    "StreamingSession": "sessions.session",
    "SessionStats": "sessions.session",
    "SessionBrokenError": "sessions.session",
    "SessionFileError": "sessions.persistence",
    "HybridMemory": "sessions.memory",
    "Stepper": "core.stepper",
    "RowStats": "core.cache",
    "Engine": "runtime.engine",
    "Request": "runtime.engine",
    "Stream": "runtime.engine",
}

__all__ = [
    "SUPPORTED",
    "Engine",
    "GenerationChunk",
    "HybridMemory",
    "ModelSpec",
    "SamplingConfig",
    "Request",
    "RowStats",
    "SessionBrokenError",
    "SessionFileError",
    "SessionStats",
    "Stepper",
    "Stream",
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
    from .core.architectures import SUPPORTED, ModelSpec, describe
    from .core.attention import install, uninstall
    from .core.cache import RowStats, StreamingCache
    from .core.stepper import Stepper
    from .enable_streaming_llm import StartRecentKVCache, enable_streaming_llm
    from .runtime.engine import Engine, Request, Stream
    from .runtime.generation import GenerationChunk, generate, stream_generate
    from .runtime.loading import load_model
    from .runtime.sampling import SamplingConfig
    from .sessions.memory import HybridMemory
    from .sessions.persistence import SessionFileError
    from .sessions.session import SessionBrokenError, SessionStats, StreamingSession


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streaming_llm' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    importlib.import_module(".core.attention", __name__).register()  # idempotent
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
