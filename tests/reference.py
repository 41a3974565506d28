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

Layouts, as each model's own RoPE function lays them out (read from its code, not from the package):
layers without RoPE (SmolLM3's ``no_rope_layers``, Cohere 2's global layers) rotate nothing;
Cohere, GLM and DeepSeek-V2 rotate interleaved pairs ``(2i, 2i + 1)``; latent attention (DeepSeek)
hands attention keys ``[no-RoPE part | RoPE part]``, of which only the last ``qk_rope_head_dim`` dims
are rotated, and values of another size.

Recurrent layers of hybrid models (gated delta-nets, short convolutions, Mamba) keep their state in a
transformers ``DynamicCache``, exactly as transformers runs them token by token; its attention layers'
keys are ignored here (this file's attention keeps its own lists), only the state matters.

Learned sink logits (gpt-oss's ``s_aux``, one per query head) are appended to every head's scores
before the softmax and their column is dropped after it, as the paper of that model describes; they
are the model's own and apply on top of the StreamingLLM sink tokens kept in the lists.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, DynamicCache

NAME = "slow_streaming_reference"


def _rotate(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, offset: int = 0, interleaved: bool = False
) -> torch.Tensor:
    """RoPE of x (..., n, d) at integer positions (n,), float64 angles, on dims offset .. offset + 2 * len(inv_freq).

    rotate_half style (dim i turns with dim i + half) unless ``interleaved`` (dim 2i with dim 2i + 1)."""
    rot = 2 * inv_freq.numel()
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = angles.cos(), angles.sin()
    x64 = x.double()
    head, part, tail = x64[..., :offset], x64[..., offset : offset + rot], x64[..., offset + rot :]
    if interleaved:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = part[..., : rot // 2], part[..., rot // 2 :]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((head, rotated, tail), dim=-1)


def _uses_rope(config, i: int, layer_type: str) -> bool:
    """Whether layer i applies RoPE at all (SmolLM3: ``no_rope_layers[i] == 0`` means none; Cohere 2: only
    its sliding layers)."""
    if config.model_type == "smollm3":
        return bool(config.no_rope_layers[i])
    if config.model_type == "cohere2":
        return layer_type == "sliding_attention"
    return True


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
        interleaved = config.model_type in ("cohere", "cohere2", "glm", "glm4", "deepseek_v2")
        offset = getattr(config, "qk_nope_head_dim", 0) if hasattr(config, "kv_lora_rank") else 0
        self.layers = []  # per layer: (inv_freq, kept sinks, kept recent)
        for i, layer_type in enumerate(types):
            name = next(n for n in buffers if n.endswith(f"{layer_type}_inv_freq") or n.endswith("rotary_emb.inv_freq"))
            inv_freq = buffers[name].double() if _uses_rope(config, i, layer_type) else torch.zeros(0).double()
            if layer_type == "sliding_attention":
                self.layers.append((inv_freq, 0, config.sliding_window - 1))
            else:
                self.layers.append((inv_freq, start, recent))
        self.layout = {"offset": offset, "interleaved": interleaved}
        self.keys: dict[int, list[torch.Tensor]] = {}
        self.values: dict[int, list[torch.Tensor]] = {}
        AttentionInterface.register(NAME, self._attention)

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert query.shape[-2] == 1, "the reference runs one token at a time"
        layer = module.layer_idx
        keys = self.keys.setdefault(layer, [])
        values = self.values.setdefault(layer, [])
        keys.append(key[:, :, -1:])  # with a DynamicCache (hybrid models) the cache's history is ignored
        values.append(value[:, :, -1:])
        inv_freq, start, recent = self.layers[layer]
        n = len(keys)
        slots = torch.arange(n)
        k = _rotate(torch.cat(keys, dim=-2), slots, inv_freq, **self.layout)
        v = torch.cat(values, dim=-2).double()
        q = _rotate(query, slots[-1:], inv_freq, **self.layout)
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
        types = getattr(self.model.config, "layer_types", None) or []
        recurrent = any(t in ("linear_attention", "conv", "mamba", "hybrid") for t in types)
        state = {"past_key_values": DynamicCache(config=self.model.config)} if recurrent else {}
        try:
            rows = []
            for i in range(input_ids.shape[1]):
                out = self.model(
                    input_ids=input_ids[:, i : i + 1],
                    position_ids=torch.zeros(1, 1, dtype=torch.long),
                    use_cache=bool(state),
                    **state,
                )
                rows.append(out.logits[0, -1].double())
            return torch.stack(rows)
        finally:
            self.model.set_attn_implementation(previous)
