"""An independent, slow StreamingLLM reference, written as the paper describes it.

Token by token; per layer it keeps the *raw* (pre-RoPE) keys of the kept tokens in a Python list,
evicts everything between the first ``start`` and the last ``recent`` tokens, and on every step
re-rotates every cached key at its slot index (and the query at the last slot) in float64 angles.

It shares no code with the package: the model runs with ``position_ids = 0`` (where RoPE is the
identity rotation, so the attention function receives raw queries and keys) and with this file's
own attention function, registered under its own name. Only the model's projections, norms and
MLPs are reused.

Layers the model itself trains as sliding-window layers keep their last ``sliding_window`` tokens
(no sinks), also at slot positions; soft-capped logits (Gemma 2) are capped as the model does.

Learned sink logits (gpt-oss's ``s_aux``, one per query head) are appended to every head's scores
before the softmax and their column is dropped after it, as the paper of that model describes; they
are the model's own and apply on top of the StreamingLLM sink tokens kept in the lists.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

NAME = "slow_streaming_reference"


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """rotate_half-style RoPE of x (..., n, d) at integer positions (n,), float64 angles."""
    rot = 2 * inv_freq.numel()
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = angles.cos(), angles.sin()
    x64 = x.double()
    x1, x2, tail = x64[..., : rot // 2], x64[..., rot // 2 : rot], x64[..., rot:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, tail), dim=-1)


class SlowStreamingReference:
    """Run ``model`` as StreamingLLM with ``start`` sinks and ``recent`` window, one token at a time."""

    def __init__(self, model, start: int, recent: int):
        self.model, self.start, self.recent = model, start, recent
        config = model.config
        types = getattr(config, "layer_types", None)
        if types is None:
            sliding = getattr(config, "sliding_window", None) is not None
            types = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
        buffers = dict(model.named_buffers())
        self.layers = []  # per layer: (inv_freq, kept sinks, kept recent)
        for layer_type in types:
            name = next(n for n in buffers if n.endswith(f"{layer_type}_inv_freq") or n.endswith("rotary_emb.inv_freq"))
            if layer_type == "sliding_attention":
                self.layers.append((buffers[name].double(), 0, config.sliding_window - 1))
            else:
                self.layers.append((buffers[name].double(), start, recent))
        self.keys: dict[int, list[torch.Tensor]] = {}
        self.values: dict[int, list[torch.Tensor]] = {}
        AttentionInterface.register(NAME, self._attention)

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert query.shape[-2] == 1, "the reference runs one token at a time"
        layer = module.layer_idx
        keys = self.keys.setdefault(layer, [])
        values = self.values.setdefault(layer, [])
        keys.append(key)
        values.append(value)
        inv_freq, start, recent = self.layers[layer]
        n = len(keys)
        slots = torch.arange(n)
        k = _rotate(torch.cat(keys, dim=-2), slots, inv_freq)
        v = torch.cat(values, dim=-2).double()
        q = _rotate(query, slots[-1:], inv_freq)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        scores = (q @ k.transpose(-1, -2)) * scale
        if kwargs.get("softcap") is not None:
            scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
        if kwargs.get("s_aux") is not None:  # one more logit per head, no value: softmax, then drop it
            sink = kwargs["s_aux"].double().reshape(1, -1, 1, 1)
            probs = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :-1]
        else:
            probs = scores.softmax(dim=-1)
        out = (probs @ v).to(query.dtype)
        if n > start + recent:  # evict: keep the first `start` and the latest `recent`
            del keys[start], values[start]
        return out.transpose(1, 2).contiguous(), None

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``input_ids`` (1, n) token by token; return logits (n, vocab) in float64."""
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(NAME)
        try:
            rows = []
            for i in range(input_ids.shape[1]):
                out = self.model(
                    input_ids=input_ids[:, i : i + 1],
                    position_ids=torch.zeros(1, 1, dtype=torch.long),
                    use_cache=False,
                )
                rows.append(out.logits[0, -1].double())
            return torch.stack(rows)
        finally:
            self.model.set_attn_implementation(previous)
