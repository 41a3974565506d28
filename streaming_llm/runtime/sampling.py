"""Choosing the next token: greedy, temperature, top-k, top-p, min-p, repetition controls, seeded.

Two repetition controls, both over a bounded window of the stream's recent context (so endless
generation stays in constant memory). What the window holds is one rule on every surface: the
tokens fed to the model, prompt, system prompt, ingested text and generated tokens alike
(llama.cpp's ``repeat_last_n``). A :class:`Sampler` only picks; the engine shows it every token it
feeds (:meth:`Sampler.observe`).

- ``repetition_penalty`` (llama.cpp's ``repeat_penalty`` / ``repeat_last_n``): divides the logits of
  tokens seen in the last ``penalty_window`` tokens. Tokens that are only whitespace or punctuation
  are never penalised when the sampler knows the tokenizer (pass ``tokenizer=``): punishing spaces,
  newlines and full stops pushes a small model into run-together words.
- DRY ("don't repeat yourself", as in llama.cpp / koboldcpp): when the last tokens repeat an
  earlier sequence of at least ``dry_allowed_length`` tokens, the token that continued that earlier
  sequence is penalised by ``dry_multiplier * dry_base ** (match - dry_allowed_length)``. It stops
  loops of whole phrases without touching single common tokens.
"""

from __future__ import annotations

import contextlib
import math
import string
from collections import deque
from dataclasses import dataclass

import torch

DRY_MAX_MATCH = 64  # longest repeated sequence DRY measures (bounds its cost and the penalty)


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens.

    Attributes:
        temperature: 0 means greedy (default). Higher is more random.
        top_k: Keep only the k most likely tokens (0: off).
        top_p: Keep the smallest set of tokens whose probability reaches top_p (1.0: off).
        min_p: Drop tokens less likely than ``min_p`` times the most likely one (0: off).
        repetition_penalty: >1 discourages tokens seen in the last ``penalty_window`` tokens (1.0: off).
        penalty_window: How many recent tokens the repetition penalty looks at (llama.cpp's
            ``repeat_last_n``).
        dry_multiplier: Strength of the DRY penalty on continuing a repeated sequence (0: off).
        dry_base: Growth of the DRY penalty per extra repeated token (> 1).
        dry_allowed_length: Repeated sequences up to this many tokens are free.
        dry_window: How many recent tokens DRY searches for repeats.
        suppress_ids: Token ids never picked (e.g. end-of-text, for a demo that must not stop).
        seed: Seed for reproducible sampling (None: nondeterministic).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    penalty_window: int = 64
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_window: int = 512
    suppress_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not isinstance(getattr(self, name), int | float) or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        object.__setattr__(self, "suppress_ids", tuple(int(i) for i in self.suppress_ids))  # lists from JSON
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.penalty_window < 1 or self.dry_window < 1:
            raise ValueError(
                f"penalty_window and dry_window must be >= 1, got {self.penalty_window}, {self.dry_window}"
            )
        if self.dry_multiplier < 0 or self.dry_base <= 1 or self.dry_allowed_length < 1:
            raise ValueError(
                "DRY needs dry_multiplier >= 0, dry_base > 1 and dry_allowed_length >= 1, got "
                f"{self.dry_multiplier}, {self.dry_base}, {self.dry_allowed_length}"
            )


_PUNCTUATION = set(string.punctuation) | set("\u2018\u2019\u201c\u201d\u2013\u2014\u2026")


def neutral_token_ids(tokenizer) -> frozenset[int]:
    """Ids of tokens whose text is only whitespace and/or punctuation (exempt from the repetition penalty)."""
    cached = getattr(tokenizer, "_streaming_llm_neutral_ids", None)
    if cached is not None:
        return cached
    ids = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text and all(ch.isspace() or ch in _PUNCTUATION for ch in text):
            ids.add(token_id)
    result = frozenset(ids)
    with contextlib.suppress(AttributeError):  # a tokenizer that refuses attributes just recomputes
        tokenizer._streaming_llm_neutral_ids = result
    return result


class Sampler:
    """Stateful token picker (remembers a bounded window of recent tokens for the repetition controls).

    Args:
        config: Sampling settings (greedy by default).
        device: Where the random generator lives (the logits' device).
        tokenizer: Optional; when given, whitespace/punctuation tokens are exempt from
            ``repetition_penalty``.
    """

    def __init__(self, config: SamplingConfig | None = None, device: torch.device | str = "cpu", tokenizer=None):
        self.config = config or SamplingConfig()
        self.device, self.tokenizer = device, tokenizer
        cfg = self.config
        self.recent: deque[int] = deque(maxlen=max(cfg.penalty_window, cfg.dry_window if cfg.dry_multiplier else 1))
        self.neutral = neutral_token_ids(tokenizer) if tokenizer is not None and cfg.repetition_penalty != 1 else ()
        self.generator = None
        if self.config.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.config.seed)

    @property
    def greedy(self) -> bool:
        """Picks the argmax of the logits with only ``suppress_ids`` masked (no temperature, penalty or DRY): a
        batch of such samplers is served by one argmax over the batch (:func:`greedy_picks`)."""
        cfg = self.config
        return cfg.temperature == 0 and cfg.repetition_penalty == 1.0 and not cfg.dry_multiplier

    def observe(self, token_ids: list[int]) -> None:
        """Remember tokens fed to the model, for the repetition controls."""
        self.recent.extend(token_ids)

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick a token from ``logits`` (vocab,); the token is remembered once it is fed (:meth:`observe`)."""
        cfg = self.config
        logits = logits.float().clone()
        if cfg.repetition_penalty != 1.0 and self.recent:
            window = list(self.recent)[-cfg.penalty_window :]
            seen = sorted(set(window).difference(self.neutral))
            if seen:
                seen = torch.tensor(seen, device=logits.device)
                picked = logits[seen]
                penalised = torch.where(picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty)
                logits[seen] = penalised
        if cfg.suppress_ids:
            logits[list(cfg.suppress_ids)] = float("-inf")
        if cfg.dry_multiplier:
            for token, penalty in self._dry_penalties().items():
                logits[token] -= penalty
        return int(logits.argmax()) if cfg.temperature == 0 else self._sample(logits / cfg.temperature)

    def _dry_penalties(self) -> dict[int, float]:
        """``{token: penalty}`` for tokens that would extend a repeat of an earlier sequence."""
        cfg = self.config
        tokens = list(self.recent)[-cfg.dry_window :]
        n = len(tokens)
        longest: dict[int, int] = {}
        if n < 2:
            return {}
        last = tokens[-1]
        for i in range(n - 2, -1, -1):  # i: end of an earlier occurrence of the current suffix
            if tokens[i] != last:
                continue
            match = 1
            while match < DRY_MAX_MATCH and i - match >= 0 and tokens[i - match] == tokens[n - 1 - match]:
                match += 1
            following = tokens[i + 1]
            if match > longest.get(following, 0):
                longest[following] = match
        return {
            token: cfg.dry_multiplier * cfg.dry_base ** (match - cfg.dry_allowed_length)
            for token, match in longest.items()
            if match >= cfg.dry_allowed_length
        }

    def _sample(self, logits: torch.Tensor) -> int:
        cfg = self.config
        # Narrow to the candidates first (top-k, else min-p), so top-p sorts a few tokens, not the vocabulary.
        if cfg.top_k:
            logits, candidates = logits.topk(min(cfg.top_k, logits.numel()))
        elif cfg.min_p:
            probs = logits.softmax(-1)
            candidates = (probs >= cfg.min_p * probs.max()).nonzero().squeeze(-1)
            logits = logits[candidates]
        else:
            candidates = None
        if cfg.min_p:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < cfg.min_p * probs.max(), float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p  # keep the token that crosses top_p
            logits = logits.scatter(0, order[drop], float("-inf"))
        choice = int(torch.multinomial(logits.softmax(-1), 1, generator=self.generator))
        return choice if candidates is None else int(candidates[choice])


def greedy_picks(samplers: list[Sampler], logits: list[torch.Tensor]) -> list[int]:
    """One argmax over the stacked ``logits`` (each ``(vocab,)``) of greedy samplers, each row's suppressed ids
    masked: one device read for the whole batch."""
    stacked = torch.stack(logits)
    for row, sampler in enumerate(samplers):
        if sampler.config.suppress_ids:
            stacked[row, list(sampler.config.suppress_ids)] = float("-inf")
    return stacked.argmax(-1).tolist()
