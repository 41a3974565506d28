"""Which models StreamingLLM supports, described as data.

An architecture is a small description read from its config: how its layers apply rotary
position embeddings (inverse frequencies, rotated dims). Nothing of the model's forward is copied.
Anything that is not described here raises :class:`NotImplementedError` naming what is supported.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .positions import Rope

# model_type -> family name shown to users. Each entry is proven against the slow reference
# in tests/test_architectures.py.
SUPPORTED: dict[str, str] = {
    "llama": "Llama",
}

# Position schemes we know we cannot stream (yet), with the reason shown to users.
UNSUPPORTED: dict[str, str] = {
    "bloom": "ALiBi attention biases",
    "mpt": "ALiBi attention biases",
    "gpt2": "learned absolute position embeddings",
    "gpt_bigcode": "learned absolute position embeddings",
    "opt": "learned absolute position embeddings",
    "gptj": "interleaved (GPT-J style) rotary embeddings",
}

# RoPE types whose frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# Frequencies read from a model's own rotary buffers, per config object (see `bind_model`). The
# config describes which frequencies a layer uses; the model's buffers hold their exact values,
# which can differ from a CPU recomputation in the last bit (e.g. when computed on a GPU).
_MODEL_FREQUENCIES: dict[int, tuple[weakref.ref, list[torch.Tensor]]] = {}
MATCH_RTOL = 1e-2  # wide enough for buffers cast to bf16 by model.to(); variants differ far more


@dataclass(frozen=True)
class ModelSpec:
    """What the streaming cache needs to know about a model.

    Attributes:
        model_type: ``config.model_type``.
        num_layers: Number of decoder layers.
        num_kv_heads: Key/value heads per layer.
        head_dim: Size of one head.
        ropes: One :class:`Rope` per layer.
    """

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    ropes: tuple[Rope, ...]

    def identity(self) -> dict[str, object]:
        """Fields that must match for a cache to be reused with a model (also saved in sessions)."""
        rope = self.ropes[0]
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rotary_dim": rope.rotary_dim,
            "inv_freq_sum": round(float(rope.inv_freq.sum()), 4),
        }


def supported_list() -> str:
    """Human-readable list of supported families, for error messages."""
    return ", ".join(f"{name} ({key})" for key, name in SUPPORTED.items())


def describe(config: PretrainedConfig) -> ModelSpec:
    """Read a :class:`ModelSpec` from a model config.

    Args:
        config: A transformers config (or a model, whose ``.config`` is used).

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
    if getattr(config, "layer_types", None) and any(t != "full_attention" for t in config.layer_types):
        kinds = sorted(set(config.layer_types))
        raise NotImplementedError(f"'{model_type}' with layer types {kinds} is not supported yet.")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _exact(config, _rope(config, head_dim))
    num_layers = config.num_hidden_layers
    return ModelSpec(
        model_type=model_type,
        num_layers=num_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        ropes=(rope,) * num_layers,
    )


def bind_model(model) -> None:
    """Remember the exact frequencies of ``model``'s rotary buffers for its config.

    Raises:
        NotImplementedError: If a rotary buffer matches none of the frequencies the config describes.
    """
    described = {id(r): r for r in describe(model.config).ropes}.values()
    buffers = [
        m.inv_freq.detach().double().cpu()
        for m in model.modules()
        if isinstance(getattr(m, "inv_freq", None), torch.Tensor)
    ]  # noqa: E501
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
    for buffer in entry[1]:
        if _matches(buffer, rope.inv_freq):
            return replace(rope, inv_freq=buffer)
    return rope


def _rope(config: PretrainedConfig, head_dim: int) -> Rope:
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise NotImplementedError(
            f"RoPE type '{rope_type}' changes its frequencies with the sequence length; supported RoPE types: "
            f"{', '.join(STATIC_ROPE_TYPES)}."
        )
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)
    if rope_type == "default":
        # Same float32 computation as transformers' default RoPE initialisation.
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        inv_freq = 1.0 / (params["rope_theta"] ** exponents)
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return Rope(inv_freq=inv_freq.to(torch.float64), rotary_dim=rotary_dim)
