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
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .cache import StreamingCache
from .compat import cache_kwargs

if TYPE_CHECKING:
    from .session import StreamingSession

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
        update_every: Evicted tokens collected before the summary is updated.
        frame: How the summary is shown to the model.
    """

    summarizer: Summarizer | None = None
    max_tokens: int = 128
    update_every: int = 256
    frame: str = "(Summary of the earlier conversation: {summary})\n"

    def summarize(self, session: StreamingSession, previous: str, evicted: str) -> str:
        if self.summarizer is not None:
            return self.summarizer(previous, evicted)
        return summarize_with_model(session.model, session.tokenizer, previous, evicted, self.max_tokens)

    def encode(self, tokenizer: PreTrainedTokenizerBase, summary: str) -> list[int]:
        ids = tokenizer(self.frame.format(summary=summary), add_special_tokens=False)["input_ids"]
        return ids[: self.max_tokens]

    def install(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache: StreamingCache,
                summary: str) -> None:  # fmt: skip
        """Encode ``summary`` after the sinks and make it the cache's pinned segment."""
        keys, values = encode_segment(model, cache, self.encode(tokenizer, summary))
        cache.set_segment(keys, values)


@torch.no_grad()
def encode_segment(
    model: PreTrainedModel, cache: StreamingCache, ids: list[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys/values of ``ids`` placed right after ``cache``'s sinks, attending to the sinks and themselves."""
    start = cache.start_size
    scratch = StreamingCache(cache.config, start, max(len(ids), 256))
    for main, layer in zip(cache.layers, scratch.layers, strict=True):
        layer.lazy_initialization(main.keys, main.values)
        layer.keys[:, :, layer.sink_base : layer.sink_base + start] = main.pinned_keys[:, :, :start]
        layer.values[:, :, layer.sink_base : layer.sink_base + start] = main.values[
            :, :, main.sink_base : main.sink_base + start
        ]
        layer.pinned_keys[:, :, :start] = main.pinned_keys[:, :, :start]
        layer.seen, layer.shift, layer.pinned_rotation = start, 0, 0
    input_ids = torch.tensor([ids], device=model.device)
    model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, scratch))
    slots = slice(scratch.layers[0].ring_base, scratch.layers[0].ring_base + len(ids))
    return [layer.keys[:, :, slots] for layer in scratch.layers], [
        layer.values[:, :, slots] for layer in scratch.layers
    ]


def summarize_with_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, previous: str, evicted: str, max_tokens: int
) -> str:
    """Ask the model itself for an updated summary (on a separate, temporary cache)."""
    from .generation import generate

    prompt = SELF_SUMMARY_PROMPT.format(previous=previous or "(none)", evicted=evicted)
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return generate(model, tokenizer, prompt, max_new_tokens=max_tokens, recent_size=2000).strip()
