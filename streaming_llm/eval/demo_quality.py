"""How well does a long generation read? Sampling recipes x seeds, streaming vs a full cache.

Each recipe generates ``tokens`` tokens from the demo prompt for several seeds at once (one batch row
per seed, each with its own seeded :class:`~streaming_llm.runtime.sampling.Sampler`), once with the demo's
small streaming window and once with a cache large enough that nothing is evicted (what the model
does with its full context). Text quality is scored per token range with measures that need no
reference:

- ``distinct2``: distinct word bigrams / word bigrams (low: loops);
- ``longest_word``: longest whitespace-separated word in characters (high: run-together words);
- ``long_words``: words over :data:`LONG_WORD` characters;
- ``self_ppl``: the model's own perplexity of the chosen tokens under its raw distribution
  (temperature 1, no penalties), given what it had in its cache (high: word salad).
"""

from __future__ import annotations

import math
import time

import torch

from ..core.attention import install
from ..core.cache import StreamingCache
from ..core.compat import cache_kwargs
from ..runtime.generation import eos_ids
from ..runtime.sampling import Sampler, SamplingConfig

LONG_WORD = 25

RECIPES: dict[str, dict] = {
    # The demo's previous defaults: a strong penalty on every token seen in the last 256, spaces included.
    "old": dict(temperature=0.8, top_p=0.95, repetition_penalty=1.15, penalty_window=256),
    # llama.cpp-like: top-k 40, top-p 0.95, min-p 0.05, a mild penalty over the last 64 tokens that
    # spares whitespace and punctuation.
    "llama": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1, penalty_window=64),
    # min-p with DRY: no per-token penalty at all, only on continuing an already repeated sequence.
    "dry": dict(temperature=0.8, min_p=0.05, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2),
}


def words(text: str) -> list[str]:
    return text.split()


def text_scores(text: str) -> dict:
    """Reference-free scores of ``text`` (see the module docstring)."""
    ws = words(text)
    bigrams = list(zip(ws, ws[1:], strict=False))
    return {
        "words": len(ws),
        "distinct2": round(len(set(bigrams)) / len(bigrams), 4) if bigrams else float("nan"),
        "longest_word": max((len(w) for w in ws), default=0),
        "long_words": sum(len(w) > LONG_WORD for w in ws),
    }


@torch.no_grad()
def generate_batch(
    model, tokenizer, prompt_ids: list[int], recipe: dict, seeds: list[int], tokens: int, start_size: int,
    recent_size: int,
) -> tuple[list[list[int]], list[list[float]], float]:  # fmt: skip
    """Generate ``tokens`` tokens per seed (EOS suppressed, as in the demo).

    Returns:
        ``(ids per seed, raw log-prob of each chosen token per seed, seconds)``.
    """
    install(model)
    suppress = tuple(sorted(eos_ids(model, tokenizer)))
    samplers = []
    for seed in seeds:
        sampler = Sampler(SamplingConfig(**recipe, suppress_ids=suppress, seed=seed), tokenizer=tokenizer)
        sampler.observe(prompt_ids)
        samplers.append(sampler)
    cache = StreamingCache(model.config, start_size, recent_size)
    began = time.perf_counter()
    ids = torch.tensor([prompt_ids] * len(seeds), device=model.device)
    logits = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]
    out: list[list[int]] = [[] for _ in seeds]
    logps: list[list[float]] = [[] for _ in seeds]
    for step in range(tokens):
        raw = logits.float().log_softmax(-1)
        picked = [sampler(logits[row]) for row, sampler in enumerate(samplers)]
        for row, token in enumerate(picked):
            out[row].append(token)
            logps[row].append(float(raw[row, token]))
            samplers[row].observe([token])  # fed next: the repetition controls see it
        if step + 1 < tokens:
            step_ids = torch.tensor(picked, device=model.device).reshape(-1, 1)
            logits = model(input_ids=step_ids, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
    return out, logps, time.perf_counter() - began


def score_ranges(tokenizer, ids: list[int], logps: list[float], span: int) -> list[dict]:
    """Scores of each ``span``-token range of one generation."""
    rows = []
    for lo in range(0, len(ids), span):
        hi = min(lo + span, len(ids))
        scores = text_scores(tokenizer.decode(ids[lo:hi]))
        scores["self_ppl"] = round(math.exp(-sum(logps[lo:hi]) / (hi - lo)), 3)
        rows.append({"from_token": lo, "to_token": hi, **scores})
    return rows
