"""The original StreamingLLM entry point, kept so its loop runs unchanged::

    from streaming_llm.enable_streaming_llm import enable_streaming_llm

    kv_cache = enable_streaming_llm(model, start_size=4, recent_size=2000)
    past_key_values = None
    for ...:
        outputs = model(**inputs, past_key_values=past_key_values, use_cache=True)
        past_key_values = kv_cache(outputs.past_key_values)

Differences from the original, all in the user's favour: eviction happens exactly per token while
a chunk is processed (so ``evict_for_space`` has nothing left to do), positions stay exact over
endless streams, and no model code is patched (the model is switched to the registered
``"streaming_llm"`` attention, which behaves like ``sdpa`` with any other cache).
"""

from __future__ import annotations

from transformers import DynamicCache, PreTrainedModel

from .core.architectures import describe
from .core.attention import install
from .core.cache import StreamingCache, check_sizes


class StartRecentKVCache:
    """Turns whatever cache the model returned into a :class:`StreamingCache` (the seed API).

    Args:
        model: The model, already switched to the streaming attention.
        start_size: Attention-sink tokens kept forever.
        recent_size: Most recent tokens kept.
    """

    def __init__(self, model: PreTrainedModel, start_size: int = 4, recent_size: int = 2000):
        check_sizes(start_size, recent_size)
        self.config = model.config
        self._identity = describe(model.config).identity()
        self.start_size = start_size
        self.recent_size = recent_size
        self._streamed = False

    @property
    def cache_size(self) -> int:
        """Tokens kept after each step (``start_size + recent_size``)."""
        return self.start_size + self.recent_size

    def new_cache(self) -> StreamingCache:
        """An empty cache: pass it as the first ``past_key_values`` to stream the prompt exactly too."""
        self._streamed = True
        return StreamingCache(self.config, self.start_size, self.recent_size, positions="compact")

    def __call__(self, past_key_values: StreamingCache | DynamicCache | None) -> StreamingCache | None:
        """Return the cache to feed the next step (evicted down to sinks + window).

        Accepts the ``DynamicCache`` a model returns when it was called with ``past_key_values=None``
        (its tokens were processed as one dense block, as in the original implementation).
        """
        if past_key_values is None:
            return None
        if isinstance(past_key_values, StreamingCache):
            self._check_compatible(past_key_values)
            self._streamed = True
            return past_key_values
        if isinstance(past_key_values, DynamicCache):
            if self._streamed:
                raise ValueError(
                    "Got a plain DynamicCache after streaming began: the model was called with "
                    "past_key_values=None (or a new DynamicCache) mid-stream, which starts a new, unrelated "
                    "sequence. Pass the cache returned by the previous kv_cache(...) call, or call "
                    "kv_cache.reset() to start a new stream on purpose."
                )
            self._streamed = True
            return StreamingCache.from_dynamic(
                self.config, past_key_values, self.start_size, self.recent_size, positions="compact"
            )
        raise TypeError(
            f"kv_cache(...) expects the cache returned by the model (StreamingCache or DynamicCache), got "
            f"{type(past_key_values).__name__}."
        )

    def evict_for_space(
        self, past_key_values: StreamingCache | DynamicCache | None, num_coming: int
    ) -> StreamingCache | None:
        """Prepare the cache for a block of ``num_coming`` tokens.

        The streaming cache evicts exactly, token by token, while the block is processed, so this
        only converts and validates; it evicts nothing ahead of time.
        """
        if not isinstance(num_coming, int) or num_coming < 0:
            raise ValueError(f"num_coming must be a non-negative int, got {num_coming!r}.")
        return self(past_key_values)

    def reset(self) -> None:
        """Forget the current stream, so the next call may start from a fresh ``DynamicCache``."""
        self._streamed = False

    def _check_compatible(self, cache: StreamingCache) -> None:
        if (cache.start_size, cache.recent_size) != (self.start_size, self.recent_size):
            raise ValueError(
                f"This StreamingCache keeps {cache.start_size}+{cache.recent_size} tokens, but kv_cache was set up "
                f"for {self.start_size}+{self.recent_size}. Use the cache this kv_cache created."
            )
        if cache.spec.identity() != self._identity:
            raise ValueError(
                "This StreamingCache was built for another model config "
                f"({cache.spec.identity()}); build the cache from the model that uses it."
            )


def enable_streaming_llm(model: PreTrainedModel, start_size: int = 4, recent_size: int = 2000) -> StartRecentKVCache:
    """Switch ``model`` to streaming attention and return the ``kv_cache`` callable of the seed API.

    Args:
        model: A Hugging Face causal LM of a supported architecture.
        start_size: Attention-sink tokens kept forever (default 4).
        recent_size: Most recent tokens kept (default 2000).

    Raises:
        NotImplementedError: The architecture cannot be streamed (message lists the supported ones).
        ValueError: Impossible sizes.
    """
    kv_cache = StartRecentKVCache(model, start_size, recent_size)  # validates before touching the model
    install(model)
    return kv_cache
