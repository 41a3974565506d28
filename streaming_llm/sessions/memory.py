"""Hybrid memory (beyond the original method): a running summary of evicted text, pinned after the sinks.

Plain StreamingLLM forgets whatever leaves the window. With :class:`HybridMemory` a session collects
the evicted tokens; every ``update_every`` of them it asks a summariser (the same model, or any
callable) to fold them into a running summary, encodes the summary's tokens once at the positions
right after the sinks, and swaps them into the cache's pinned segment. Every later token attends to
the summary as it attends to the sinks.

Cost per update: the summariser (with the model itself: a prefill of the previous summary plus the
evicted text, and up to ``max_tokens`` decode steps, on a separate temporary cache) plus one forward
over the summary's tokens. Memory: ``max_tokens`` more cache slots, allocated up front.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..core.architectures import describe
from ..core.cache import HYBRID_SEGMENTS
from ..core.compat import cache_kwargs

if TYPE_CHECKING:
    from ..runtime.engine import CacheView

Summarizer = Callable[[str, str], str]
"""``summarizer(previous_summary, newly_evicted_text) -> new_summary``."""

SELF_SUMMARY_PROMPT = (
    "Update the running summary of a long text. Keep every name, number, code and fact; be brief.\n\n"
    "Summary so far:\n{previous}\n\nNew text:\n{evicted}\n\nUpdated summary:"
)


@dataclass
class HybridMemory:
    """Settings for summarising evicted text into a pinned slot.

    Attributes:
        summarizer: ``(previous_summary, evicted_text) -> summary``; None uses the session's own model.
        max_tokens: Largest summary kept (tokens); the pinned slot is this big.
        update_every: Evicted tokens collected before the summary is updated (so at most this many
            evicted token ids are held at any time).
        frame: How the summary is shown to the model.
    """

    summarizer: Summarizer | None = None
    max_tokens: int = 128
    update_every: int = 256
    frame: str = "(Summary of the earlier conversation: {summary})\n"

    def __post_init__(self):
        if self.max_tokens < 1 or self.update_every < 1:
            raise ValueError(f"max_tokens and update_every must be >= 1, got {self.max_tokens}, {self.update_every}")

    def summarize(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, previous: str,
                  evicted: str) -> str:  # fmt: skip
        """The updated summary: the configured summariser's, or the model's own."""
        if self.summarizer is not None:
            return self.summarizer(previous, evicted)
        return summarize_with_model(model, tokenizer, previous, evicted, self.max_tokens)

    def encode(self, tokenizer: PreTrainedTokenizerBase, summary: str) -> list[int]:
        ids = tokenizer(self.frame.format(summary=summary), add_special_tokens=False)["input_ids"]
        return ids[: self.max_tokens]

    def install(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache: CacheView,
                sink_ids: list[int], summary: str) -> None:  # fmt: skip
        """Encode ``summary`` right after the sinks (whose ids are ``sink_ids``) and make it the pinned segment of
        a session's cache row (``cache.set_segment``)."""
        keys, values = encode_segment(model, sink_ids, self.encode(tokenizer, summary))
        cache.set_segment(keys, values)


@torch.no_grad()
def encode_segment(
    model: PreTrainedModel, sink_ids: list[int], ids: list[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, keys/values ``(1, kv_heads, len(ids), head_dim)`` of ``ids`` placed right after the
    sinks ``sink_ids`` (positions ``len(sink_ids) ..``), attending to the sinks and themselves.

    The sinks are re-encoded on a scratch ``DynamicCache`` (a few tokens), so nothing of the main
    cache's internals is read or written.
    """
    if describe(model.config).recurrent_layers:
        raise NotImplementedError(HYBRID_SEGMENTS)
    scratch = DynamicCache(config=model.config)
    input_ids = torch.tensor([list(sink_ids) + list(ids)], device=model.device)
    model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, scratch))
    start = len(sink_ids)
    keys = [layer.keys[:, :, start:] for layer in scratch.layers]
    values = [layer.values[:, :, start:] for layer in scratch.layers]
    return keys, values


def summarize_with_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, previous: str, evicted: str, max_tokens: int
) -> str:
    """Ask the model itself for an updated summary (on a separate, temporary cache)."""
    from ..runtime.generation import generate

    prompt = SELF_SUMMARY_PROMPT.format(previous=previous or "(none)", evicted=evicted)
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return generate(model, tokenizer, prompt, max_new_tokens=max_tokens, recent_size=2000).strip()
