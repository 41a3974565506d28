"""streaming-llm: read and talk forever in constant memory with attention sinks + a rolling window."""

from .architectures import SUPPORTED, ModelSpec, describe
from .attention import install, register, uninstall
from .cache import StreamingCache
from .enable_streaming_llm import StartRecentKVCache, enable_streaming_llm
from .generation import GenerationChunk, generate, stream_generate
from .loading import load_model
from .memory import HybridMemory
from .persistence import SessionFileError
from .sampling import SamplingConfig
from .session import SessionBrokenError, SessionStats, StreamingSession

register()  # makes the streaming attention known to transformers; not part of the public API

__all__ = [
    "SUPPORTED",
    "GenerationChunk",
    "HybridMemory",
    "ModelSpec",
    "SamplingConfig",
    "SessionBrokenError",
    "SessionFileError",
    "SessionStats",
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
__version__ = "0.1.0"
