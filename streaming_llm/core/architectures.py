"""Which models StreamingLLM supports, described as data.

An architecture is a small description read from its config: for every layer, how it applies
rotary position embeddings (inverse frequencies, rotated dims) and whether it is a full-attention
layer or one of the model's own sliding-window (local) layers. Nothing of a model's forward is
copied. Anything not described here raises :class:`NotImplementedError` naming what is supported.

What streaming means per layer type:

* ``full_attention`` layers get StreamingLLM: ``start_size`` sinks + the ``recent_size`` window, at
  positions inside the cache.
* ``sliding_attention`` layers (Mistral/Qwen2 with a sliding window, Phi-3 with ``sliding_window``,
  the local layers of Gemma2/Gemma3) keep exactly what the model was trained to see: the last
  ``sliding_window`` tokens, no sinks. That is already bounded, so they stream as they are.
* Layers without RoPE (NoPE: every 4th SmolLM3 layer, Cohere 2's global layers) have no positions
  to rotate (``rotary_dim == 0``); their window and sinks apply as to any other layer of their type.
* Latent attention (DeepSeek-V2/V3): transformers hands the cache the compressed latent (one head of
  ``kv_lora_rank``, never rotated) as the "keys" and the decoupled RoPE key (one head of
  ``qk_rope_head_dim``) as the "values". The cache stores exactly those two, rotating only the RoPE
  key; the attention function sees them expanded by the model (queries with their RoPE part after
  the ``qk_nope_head_dim`` others: :attr:`LayerSpec.query_rope`).
* Mixture-of-experts MLPs (Mixtral, Qwen-MoE, OLMoE, GLM-4-MoE, gpt-oss, DeepSeek) do not touch the
  cache: routing is per token.
* Recurrent layers of hybrid models (Qwen3-Next's gated delta-net, LFM2's short convolutions, the
  Mamba-2 half of every Falcon-H1 layer) already carry a constant-size state. The cache keeps it as
  transformers' own cache does (conv windows and recurrent states, one per row) and streams only the
  attention layers, so the whole model runs endlessly in constant memory.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .positions import Rope

# model_type -> family name shown to users. Each entry is proven against the slow reference in
# tests/test_architectures.py; the README's support matrix is generated from that test list.
SUPPORTED: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "gpt_neox": "GPT-NeoX / Pythia",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "olmo": "OLMo",
    "olmo2": "OLMo 2",
    "gpt_oss": "gpt-oss",
    "qwen3_moe": "Qwen3-MoE",
    "qwen2_moe": "Qwen2-MoE",
    "mixtral": "Mixtral",
    "olmoe": "OLMoE",
    "glm4_moe": "GLM-4-MoE",
    "phimoe": "Phi-MoE",
    "granitemoe": "Granite-MoE",
    "smollm3": "SmolLM3",
    "cohere": "Cohere (Command R)",
    "cohere2": "Cohere 2 (Command R7B)",
    "glm": "GLM",
    "glm4": "GLM-4",
    "deepseek_v2": "DeepSeek-V2",
    "deepseek_v3": "DeepSeek-V3",
    "qwen3_next": "Qwen3-Next",
    "lfm2": "LFM2",
    "falcon_h1": "Falcon-H1",
}

# Families whose RoPE turns interleaved pairs (2i, 2i + 1) in the keys the cache stores.
INTERLEAVED_ROPE = ("cohere", "cohere2", "glm", "glm4", "deepseek_v2")
# Multi-head latent attention: the cache gets (latent, RoPE key) instead of (keys, values).
LATENT_ATTENTION = ("deepseek_v2", "deepseek_v3")

# Position schemes we know we cannot stream (yet), with the reason shown to users.
UNSUPPORTED: dict[str, str] = {
    "bloom": "ALiBi attention biases (not a rotary position scheme)",
    "mpt": "ALiBi attention biases (not a rotary position scheme)",
    "falcon": "its attention does not go through transformers' AttentionInterface, so it cannot be switched "
    "without patching its forward",
    "gpt2": "learned absolute position embeddings",
    "gpt_bigcode": "learned absolute position embeddings",
    "opt": "learned absolute position embeddings",
    "gptj": "its attention does not go through transformers' AttentionInterface (and rotates interleaved pairs)",
    "jamba": "transformers' Jamba ignores the recurrent state in multi-token forwards (its selective scan has no "
    "initial state), so no chunked ingestion of a continuing stream can be exact",
    "llama4_text": "chunked local attention at absolute chunk boundaries, interleaved complex RoPE and NoPE layers "
    "whose query temperature grows with the absolute position: none of it is expressible at in-cache positions",
}

# RoPE types whose frequencies do not depend on the sequence length ("longrope" is handled apart).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention", "conv", "hybrid")
# Layer types with a recurrent state and no attention, and with both (Falcon-H1: attention and Mamba side by side).
RECURRENT_TYPES = ("linear_attention", "conv")
HYBRID_TYPES = ("hybrid",)

# Frequencies read from a model's own rotary buffers, per config object (see `bind_model`). The
# config describes which frequencies a layer uses; the model's buffers hold their exact values,
# which can differ from a CPU recomputation in the last bits (computed on a GPU, or cast to bf16).
_MODEL_FREQUENCIES: dict[int, tuple[weakref.ref, list[torch.Tensor]]] = {}
MATCH_RTOL = 1e-2  # wide enough for buffers cast to bf16 by model.to(); variants differ far more


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer, as the streaming cache sees it.

    Attributes:
        rope: How the layer rotates the keys it stores (``rotary_dim == 0``: a layer without RoPE).
        sliding_window: None for a full-attention layer (sinks + window); ``w`` for a layer that
            natively attends to its last ``w`` tokens only.
        query_rope: How its queries are rotated, when that differs from the stored keys (latent
            attention: the RoPE part of a query comes after its ``qk_nope_head_dim`` other dims).
        attention: The layer has attention (keys and values in the streaming cache).
        recurrent: The layer has a recurrent state (conv window, SSM or delta-rule state), kept per row.
    """

    rope: Rope
    sliding_window: int | None = None
    query_rope: Rope | None = None
    attention: bool = True
    recurrent: bool = False

    @property
    def queries(self) -> Rope:
        """The rotation of this layer's queries (what attention turns back for the pinned keys)."""
        return self.query_rope or self.rope


@dataclass(frozen=True)
class ModelSpec:
    """What the streaming cache needs to know about a model.

    Attributes:
        model_type: ``config.model_type``.
        num_kv_heads: Key/value heads per layer, as the cache stores them (1 for latent attention).
        head_dim: Size of one stored key head (latent attention: the RoPE key).
        layers: One :class:`LayerSpec` per decoder layer.
        position_limit: Model positions must stay below this (Phi-3 "longrope" switches to other
            frequencies past ``original_max_position_embeddings``); None when unbounded.
        value_dim: Size of one stored value head (default ``head_dim``; latent attention: the latent).
        latent: Latent attention: the model hands the cache ``(latent, RoPE key)``; the cache stores
            the RoPE key where other models' keys go (rotated) and the latent where values go.
    """

    model_type: str
    num_kv_heads: int
    head_dim: int
    layers: tuple[LayerSpec, ...]
    position_limit: int | None = None
    value_dim: int | None = None
    latent: bool = False

    @property
    def value_size(self) -> int:
        return self.value_dim or self.head_dim

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def ropes(self) -> tuple[Rope, ...]:
        return tuple(layer.rope for layer in self.layers if layer.attention)

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        """Model layers that carry a recurrent state."""
        return tuple(i for i, layer in enumerate(self.layers) if layer.recurrent)

    def identity(self) -> dict[str, object]:
        """Fields that must match for a cache to be reused with a model (also saved in sessions)."""
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            **({"value_dim": self.value_dim, "latent": True} if self.latent else {}),
            "rotary_dims": sorted({rope.rotary_dim for rope in self.ropes}),
            "inv_freq_sums": sorted({round(float(rope.inv_freq.sum()), 4) for rope in self.ropes}),
            "sliding_windows": [layer.sliding_window for layer in self.layers],
            **({"recurrent_layers": list(self.recurrent_layers)} if self.recurrent_layers else {}),
        }


def supported_list() -> str:
    """Human-readable list of supported families, for error messages."""
    return ", ".join(f"{name} ({key})" for key, name in SUPPORTED.items())


def describe(config: PretrainedConfig) -> ModelSpec:
    """Read a :class:`ModelSpec` from a model config (or a model).

    Raises:
        NotImplementedError: For architectures or position schemes that cannot be streamed exactly.
    """
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", type(config).__name__)
    if model_type not in SUPPORTED:
        reason = UNSUPPORTED.get(model_type, "not described and tested yet")
        raise NotImplementedError(
            f"StreamingLLM does not support model_type '{model_type}' ({reason}). Supported: {supported_list()}."
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise NotImplementedError(f"'{model_type}' with bidirectional attention cannot stream.")
    latent = model_type in LATENT_ATTENTION
    if latent:  # stored keys: the RoPE key, one head; values: the latent
        head_dim, heads, value_dim = config.qk_rope_head_dim, 1, config.kv_lora_rank
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads, value_dim = getattr(config, "num_key_value_heads", None) or config.num_attention_heads, None
    types = _layer_types(config, model_type)
    nope = _no_rope_layers(config, model_type, types)
    layers, limit = [], None
    for i, layer_type in enumerate(types):
        if layer_type in RECURRENT_TYPES:  # no attention: nothing positional, only its own state
            none = Rope(inv_freq=torch.zeros(0, dtype=torch.float64), rotary_dim=0)
            layers.append(LayerSpec(none, attention=False, recurrent=True))
            continue
        rope, layer_limit = _rope(config, head_dim, layer_type)
        limit = layer_limit if limit is None else min(limit, layer_limit or limit)
        window = config.sliding_window if layer_type == "sliding_attention" else None
        rope = replace(_exact(config, rope), interleaved=model_type in INTERLEAVED_ROPE)
        if i in nope:
            rope = Rope(inv_freq=torch.zeros(0, dtype=torch.float64), rotary_dim=0)
        query_rope = replace(rope, offset=config.qk_nope_head_dim) if latent else None
        layers.append(LayerSpec(rope, window, query_rope, recurrent=layer_type in HYBRID_TYPES))
    return ModelSpec(
        model_type=model_type,
        num_kv_heads=heads,
        head_dim=head_dim,
        layers=tuple(layers),
        position_limit=limit,
        value_dim=value_dim,
        latent=latent,
    )


def _no_rope_layers(config: PretrainedConfig, model_type: str, types: list[str]) -> set[int]:
    """Layers that apply no rotary embedding, as the model's own attention decides it."""
    if model_type == "smollm3":  # no_rope_layers[i] == 1 means "uses RoPE"
        return {i for i, use in enumerate(config.no_rope_layers) if not use}
    if model_type == "cohere2":  # only the sliding layers rotate
        return {i for i, layer_type in enumerate(types) if layer_type != "sliding_attention"}
    return set()


def _layer_types(config: PretrainedConfig, model_type: str) -> list[str]:
    """The attention type of every layer, decided as transformers' own caches decide it."""
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
        types = [kind] * config.num_hidden_layers
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise NotImplementedError(f"'{model_type}' has layer types {unknown}; supported: {', '.join(LAYER_TYPES)}.")
    return list(types)


def _rope_parameters(config: PretrainedConfig, layer_type: str) -> tuple[dict, str | None]:
    """The RoPE parameters of a layer type (Gemma 3 keeps one set per layer type)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type in params and isinstance(params[layer_type], dict):
        return dict(params[layer_type]), layer_type
    return params, None


def _rope(config: PretrainedConfig, head_dim: int, layer_type: str) -> tuple[Rope, int | None]:
    params, keyed_type = _rope_parameters(config, layer_type)
    rope_type = params.get("rope_type", "default")
    limit = None
    if rope_type == "longrope":
        # Frequencies switch from the short to the long factors once a forward's largest position
        # passes original_max_position_embeddings; keeping positions below it keeps one set.
        limit = params.get("original_max_position_embeddings") or config.original_max_position_embeddings
    elif rope_type not in STATIC_ROPE_TYPES:
        raise NotImplementedError(
            f"RoPE type '{rope_type}' changes its frequencies with the sequence length; supported RoPE types: "
            f"{', '.join((*STATIC_ROPE_TYPES, 'longrope'))}."
        )
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    rotary_dim = int(head_dim * partial)
    if rope_type == "default":
        # Same float32 computation as transformers' default RoPE initialisation.
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
        inv_freq = 1.0 / (params["rope_theta"] ** exponents)
    elif rope_type == "longrope":
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=0)  # the short factors
    elif keyed_type is not None:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=keyed_type)
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return Rope(inv_freq=inv_freq.to("cpu", torch.float64), rotary_dim=rotary_dim), limit


def bind_model(model) -> None:
    """Remember the exact frequencies of ``model``'s rotary buffers for its config.

    Raises:
        NotImplementedError: If the architecture is unsupported, or a rotary buffer matches none of
            the frequencies its config describes (an unknown RoPE variant).
    """
    described = describe(model.config).ropes
    buffers = [
        buffer.detach().double().cpu()
        for name, buffer in model.named_buffers()
        if name.endswith("inv_freq") and "original" not in name.rsplit(".", 1)[-1]
    ]
    for buffer in buffers:
        if not any(_matches(buffer, rope.inv_freq) for rope in described):
            raise NotImplementedError(
                "The model's rotary frequencies differ from the ones its config describes; this RoPE variant is "
                "not supported."
            )
    config = model.config
    _MODEL_FREQUENCIES[id(config)] = (weakref.ref(config), buffers)
    weakref.finalize(config, _MODEL_FREQUENCIES.pop, id(config), None)


def _matches(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=MATCH_RTOL, atol=0)


def _exact(config: PretrainedConfig, rope: Rope) -> Rope:
    """``rope`` with the bound model's exact frequencies, when a model was bound to this config."""
    entry = _MODEL_FREQUENCIES.get(id(config))
    if entry is None or entry[0]() is not config:
        return rope
    candidates = [b for b in entry[1] if _matches(b, rope.inv_freq)]
    if not candidates:
        return rope
    best = min(candidates, key=lambda b: float((b - rope.inv_freq).abs().max()))
    return replace(rope, inv_freq=best)
