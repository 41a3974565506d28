"""Choosing the next token: greedy, temperature, top-k, top-p, repetition penalty, seeded."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens.

    Attributes:
        temperature: 0 means greedy (default). Higher is more random.
        top_k: Keep only the k most likely tokens (0: off).
        top_p: Keep the smallest set of tokens whose probability reaches top_p (1.0: off).
        repetition_penalty: >1 discourages tokens seen in the last ``penalty_window`` tokens (1.0: off).
        penalty_window: How many recent tokens the repetition penalty looks at (bounded, so endless
            generation stays in constant memory).
        seed: Seed for reproducible sampling (None: nondeterministic).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    penalty_window: int = 256
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not isinstance(getattr(self, name), int | float) or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    """Stateful token picker (remembers recent tokens for the repetition penalty)."""

    def __init__(self, config: SamplingConfig | None = None, device: torch.device | str = "cpu"):
        self.config = config or SamplingConfig()
        self.recent: deque[int] = deque(maxlen=self.config.penalty_window)
        self.generator = None
        if self.config.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.config.seed)

    def observe(self, token_ids: list[int]) -> None:
        """Remember tokens (prompt or generated) for the repetition penalty."""
        self.recent.extend(token_ids)

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick a token from ``logits`` (vocab,)."""
        cfg = self.config
        logits = logits.float()
        if cfg.repetition_penalty != 1.0 and self.recent:
            seen = torch.tensor(sorted(set(self.recent)), device=logits.device)
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty)
        token = int(logits.argmax()) if cfg.temperature == 0 else self._sample(logits / cfg.temperature)
        self.recent.append(token)
        return token

    def _sample(self, logits: torch.Tensor) -> int:
        cfg = self.config
        if cfg.top_k:
            kth = logits.topk(min(cfg.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= cfg.top_p  # keep the token that crosses top_p
            logits = logits.scatter(0, order[drop], float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
