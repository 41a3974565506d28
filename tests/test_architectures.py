"""Every supported family, proven exact against the slow reference (tests/reference.py).

Each case is a tiny random config built with transformers' own config class (fp32, CPU), checked
over more than 3x (start + recent) tokens: token by token, in chunks (one longer than the whole
cache), and through ``generate()``. The README's support matrix is generated from CASES
(``python tests/support_matrix.py``), and a test keeps it in sync.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import transformers as T
from reference import SlowStreamingReference

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core.compat import cache_kwargs

START, RECENT = 4, 12
N = 3 * (START + RECENT) + 13
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Latent attention, small: 4 heads of 16 no-RoPE + 8 RoPE dims, values of 12, a latent of 16, queries via rank 24.
MLA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
           topk_group=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
           qk_nope_head_dim=16, v_head_dim=12)  # fmt: skip


@dataclass(frozen=True)
class Case:
    name: str
    config: type
    kwargs: dict = field(default_factory=dict)
    notes: str = ""
    start: int = START
    recent: int = RECENT
    chunks: tuple[int, ...] = (1, 7, 60)
    generate: bool = True
    prepare: Callable | None = None  # adjusts the random model (e.g. learned sinks large enough to matter)

    def model(self):
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(self.config(**self.kwargs)).eval()
        if self.prepare is not None:
            self.prepare(model)
        return model


def learned_sinks(model) -> None:
    """gpt-oss initialises its sink logits near 0; spread them over [-2, 2] so that they weigh in every softmax."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("self_attn.sinks"):
                param.copy_(torch.rand(param.shape, generator=gen) * 4 - 2)


CASES = [
    Case("Llama", T.LlamaConfig, dict(BASE, head_dim=16)),
    Case(
        "Llama 3 (rope scaling)",
        T.LlamaConfig,
        dict(
            BASE,
            head_dim=16,
            max_position_embeddings=512,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        notes="`llama3` RoPE scaling",
    ),  # fmt: skip
    Case("Mistral", T.MistralConfig, dict(BASE, head_dim=16, sliding_window=None)),
    Case(
        "Mistral (sliding window)",
        T.MistralConfig,
        dict(BASE, head_dim=16, sliding_window=8),
        notes="all layers sliding: each keeps its trained 8-token window, no sinks",
    ),  # fmt: skip
    Case("Qwen2", T.Qwen2Config, dict(BASE)),
    Case(
        "Qwen2 (sliding layers)",
        T.Qwen2Config,
        dict(BASE, use_sliding_window=True, sliding_window=8, max_window_layers=1),
        notes="mixed: full layer streams, sliding layer keeps its window",
    ),  # fmt: skip
    Case("Qwen3", T.Qwen3Config, dict(BASE, head_dim=16), notes="q/k norms before RoPE"),
    Case("Phi-3", T.Phi3Config, dict(BASE, **TOKENS)),
    Case(
        "Phi-3 (longrope)",
        T.Phi3Config,
        dict(
            BASE,
            **TOKENS,
            max_position_embeddings=256,
            original_max_position_embeddings=32,
            rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[1.0 + i for i in range(8)]),
        ),
        start=2,
        recent=12,
        chunks=(1, 7),
        generate=False,
        notes="positions kept below `original_max_position_embeddings` (short factors); not with `generate()`",
    ),  # fmt: skip
    Case(
        "GPT-NeoX / Pythia",
        T.GPTNeoXConfig,
        dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.25,
        ),
        notes="partial rotary (25% of dims)",
    ),  # fmt: skip
    Case("Gemma", T.GemmaConfig, dict(BASE, head_dim=16)),
    Case(
        "Gemma 2",
        T.Gemma2Config,
        # Larger weights and a small cap, so the soft-capping really bends the logits (checked).
        dict(
            BASE,
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=1.0,
            initializer_range=0.3,
        ),  # fmt: skip
        notes="local layers keep their window; logit soft-capping",
    ),  # fmt: skip
    Case(
        "Gemma 3 (text)",
        T.Gemma3TextConfig,
        dict(
            BASE,
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
            rope_scaling=dict(rope_type="linear", factor=8.0),
        ),
        notes="local/global layers with their own RoPE; q/k norms",
    ),  # fmt: skip
    Case("OLMo", T.OlmoConfig, dict(BASE, **TOKENS, clip_qkv=8.0), notes="qkv clipping"),
    Case("OLMo 2", T.Olmo2Config, dict(BASE, **TOKENS), notes="q/k norms before RoPE"),
    Case(
        "gpt-oss",
        T.GptOssConfig,
        dict(
            BASE,
            intermediate_size=64,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
        prepare=learned_sinks,
        notes="learned sink logits per head in every softmax (besides the 4 sink tokens); sliding layer keeps its "
        "window; mixture of experts; YaRN RoPE",
    ),  # fmt: skip
    # Mixture of experts: routing is per token, the cache is that of the attention around it.
    Case(
        "Qwen3-MoE",
        T.Qwen3MoeConfig,
        dict(BASE, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
        notes="mixture of experts; q/k norms",
    ),
    Case(
        "Qwen2-MoE",
        T.Qwen2MoeConfig,
        dict(BASE, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
        notes="mixture of experts with a shared expert",
    ),
    Case(
        "Mixtral (sliding window)",
        T.MixtralConfig,
        dict(BASE, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
        notes="mixture of experts; all layers sliding: each keeps its trained 8-token window, no sinks",
    ),
    Case(
        "Mixtral",
        T.MixtralConfig,
        dict(BASE, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        notes="mixture of experts",
    ),
    Case(
        "OLMoE", T.OlmoeConfig, dict(BASE, **TOKENS, num_experts=4, num_experts_per_tok=2), notes="mixture of experts"
    ),
    Case(
        "GLM-4-MoE",
        T.Glm4MoeConfig,
        dict(
            BASE,
            **TOKENS,
            head_dim=16,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            use_qk_norm=True,
        ),
        notes="mixture of experts (first layer dense); partial rotary (50% of dims); q/k norms",
    ),  # fmt: skip
    Case(
        "Phi-MoE",
        T.PhimoeConfig,
        dict(BASE, **TOKENS, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        notes="mixture of experts",
    ),
    Case(
        "Granite-MoE",
        T.GraniteMoeConfig,
        dict(
            BASE,
            **TOKENS,
            num_local_experts=4,
            num_experts_per_tok=2,
            attention_multiplier=0.2,
            embedding_multiplier=2.0,
            logits_scaling=4.0,
            residual_multiplier=0.5,
        ),
        notes="mixture of experts; attention multiplier as the softmax scale",
    ),  # fmt: skip
    # Layers without RoPE (NoPE): nothing to rotate; their window and sinks apply.
    Case(
        "SmolLM3",
        T.SmolLM3Config,
        dict(BASE, **TOKENS, num_hidden_layers=4, head_dim=16),
        notes="NoPE: every 4th layer has no RoPE (sinks + window, nothing rotated)",
    ),
    Case(
        "Cohere 2 (Command R7B)",
        T.Cohere2Config,
        dict(BASE, **TOKENS, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
        notes="NoPE global layers (sinks + window); sliding layers keep their window; interleaved RoPE",
    ),
    Case("Cohere (Command R)", T.CohereConfig, dict(BASE, **TOKENS), notes="interleaved RoPE; parallel block"),
    Case("GLM", T.GlmConfig, dict(BASE, **TOKENS, head_dim=16), notes="interleaved partial RoPE (50% of dims)"),
    Case("GLM-4", T.Glm4Config, dict(BASE, **TOKENS, head_dim=16), notes="interleaved partial RoPE (50% of dims)"),
    # Multi-head latent attention: the cache holds the compressed latent and the decoupled RoPE key.
    Case(
        "DeepSeek-V3",
        T.DeepseekV3Config,
        dict(MLA, **TOKENS),
        notes="latent attention: cache holds the latent (16) + RoPE key (8), only the RoPE key rotated; "
        "mixture of experts",
    ),
    Case(
        "DeepSeek-V2",
        T.DeepseekV2Config,
        dict(MLA, **TOKENS),
        notes="latent attention (latent + RoPE key cached); interleaved complex RoPE; mixture of experts",
    ),
    # Hybrid recurrent models: the recurrent layers keep their own constant state, the attention layers stream.
    Case(
        "Qwen3-Next",
        T.Qwen3NextConfig,
        dict(
            BASE,
            **TOKENS,
            num_hidden_layers=4,
            head_dim=16,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
        ),
        notes="hybrid: 3 gated delta-net layers keep their recurrent + conv state, 1 gated attention layer streams "
        "(partial rotary 25%); mixture of experts",
    ),  # fmt: skip
    Case(
        "LFM2",
        T.Lfm2Config,
        dict(BASE, **TOKENS, num_hidden_layers=4, full_attn_idxs=[1, 3]),
        notes="hybrid: short-convolution layers keep their conv window, attention layers stream; q/k norms",
    ),
    Case(
        "Falcon-H1",
        T.FalconH1Config,
        dict(
            BASE,
            **TOKENS,
            head_dim=16,
            mamba_d_ssm=64,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_chunk_size=8,
        ),
        notes="hybrid: every layer runs attention (streams) beside Mamba-2 (keeps its SSM + conv state)",
    ),  # fmt: skip
]


@functools.cache
def reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    case = next(c for c in CASES if c.name == name)
    ids = torch.randint(3, 128, (1, N), generator=torch.Generator().manual_seed(1))
    return ids, SlowStreamingReference(case.model(), case.start, case.recent).logits(ids)


@torch.no_grad()
def stream(model, cache, ids: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([model(input_ids=c, **cache_kwargs(model, cache)).logits[0] for c in ids.split(size, 1)]).double()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_streaming_equals_the_reference(case):
    ids, ref = reference(case.name)
    model = streaming_llm.install(case.model())
    for size in case.chunks:
        got = stream(model, StreamingCache(model.config, case.start, case.recent), ids, size)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0, msg=lambda m, s=size: f"chunks of {s}: {m}")


@pytest.mark.parametrize("case", [c for c in CASES if c.generate], ids=[c.name for c in CASES if c.generate])
def test_generate_equals_the_reference(case):
    model = streaming_llm.install(case.model())
    model.generation_config.eos_token_id = None
    prompt = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    cache = StreamingCache(model.config, case.start, case.recent)
    new = 3 * (case.start + case.recent)
    out = model.generate(prompt, **cache_kwargs(model, cache), max_new_tokens=new, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)  # fmt: skip
    ref = SlowStreamingReference(case.model(), case.start, case.recent).logits(out.sequences[:, :-1])[19:]
    torch.testing.assert_close(torch.stack(out.scores)[:, 0].double(), ref, atol=1e-4, rtol=0)
    assert torch.equal(ref.argmax(-1), out.sequences[0, 20:])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_switched_model_still_matches_the_stock_model_with_other_caches(case):
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    stock, switched = case.model(), streaming_llm.install(case.model())
    stock.set_attn_implementation("eager")  # transformers' reference path (its sdpa refuses soft-capping)
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        got = switched(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # padded query positions are meaningless in any implementation
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_phi3_longrope_refuses_positions_past_the_short_factors():
    case = next(c for c in CASES if "longrope" in c.name)
    model = streaming_llm.install(case.model())
    with pytest.raises(ValueError, match="too large"):
        StreamingCache(model.config, 4, 28)
    cache = StreamingCache(model.config, case.start, case.recent)
    with pytest.raises(ValueError, match="switches to other frequencies"):
        model(input_ids=torch.randint(3, 128, (1, 40)), **cache_kwargs(model, cache))


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (T.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4), "ALiBi"),
        (T.MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=64), "ALiBi"),
        (
            T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=False),
            "AttentionInterface",
        ),  # fmt: skip
        (T.GPT2Config(n_layer=1, n_embd=32, n_head=2), "learned absolute"),
        (T.JambaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4), "initial state"),
        (T.Llama4TextConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4), "chunked"),
    ],
)
def test_unsupported_families_raise_a_clear_error(config, reason):
    with pytest.raises(NotImplementedError, match=reason) as error:
        StreamingCache(config, 4, 12)
    assert "Supported: Llama" in str(error.value)


def test_support_matrix_in_readme_is_generated_from_these_cases():
    from support_matrix import render, section_in_readme

    assert section_in_readme() == render(), "run `python tests/support_matrix.py` to regenerate the README table"
