"""streaming-llm: read and talk forever in constant memory with attention sinks + a rolling window."""

from .architectures import SUPPORTED, ModelSpec, describe
from .attention import install, register, uninstall
from .cache import StreamingCache
from .enable_streaming_llm import StartRecentKVCache, enable_streaming_llm

register()

__all__ = [
    "SUPPORTED",
    "ModelSpec",
    "StartRecentKVCache",
    "StreamingCache",
    "describe",
    "enable_streaming_llm",
    "install",
    "register",
    "uninstall",
]
__version__ = "0.1.0"
