"""Differences between the supported transformers versions (>= 5.17), in one place."""

from __future__ import annotations

import functools
import inspect

from transformers import Cache, PreTrainedModel


@functools.cache
def _cache_keyword(model_class: type) -> str:
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name still works,
    # with a deprecation warning); 5.17 only knows `past_key_values`.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model: PreTrainedModel, cache: Cache) -> dict[str, Cache]:
    """``{name: cache}`` with the keyword this model's forward expects."""
    return {_cache_keyword(type(model)): cache}
