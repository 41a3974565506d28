"""The opt-in int4 CPU weights (runtime/cpu_weights.py), against independent fp32 expectations."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from torch.nn import functional as F

from streaming_llm.runtime import cpu_weights
from streaming_llm.runtime.cpu_weights import Int4Linear, Int8Linear, dequantize_int4, quantize_int4, quantize_model

pytestmark = pytest.mark.skipif(not cpu_weights.available(), reason="this PyTorch has no CPU int4 kernels")


@pytest.mark.parametrize("group_size", [32, 64])
def test_quantisation_error_is_at_most_half_a_step(group_size):
    torch.manual_seed(0)
    w = torch.randn(96, 256) * torch.rand(96, 1) * 3
    q, scale, minimum = quantize_int4(w, group_size)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    # Independent expectation: each group's 16 levels span [min, max] of that group.
    groups = w.reshape(96, -1, group_size)
    assert torch.allclose(minimum, groups.amin(-1))
    assert torch.allclose(scale * 15, groups.amax(-1) - groups.amin(-1), rtol=1e-5, atol=1e-6)
    error = (dequantize_int4(q, scale, minimum) - w).reshape(96, -1, group_size).abs()
    assert bool((error <= scale[..., None] / 2 + 1e-5).all())


@pytest.mark.parametrize("rows", [1, 3, cpu_weights.CHUNK_ROWS + 1, 100])
def test_int4_linear_equals_a_dequantised_fp32_matmul(rows):
    """Both paths (int4 kernel for few rows, unpacked GEMM for chunks) multiply by the dequantised weight."""
    torch.manual_seed(1)
    linear = nn.Linear(256, 192, bias=True)
    layer = Int4Linear(linear, group_size=32)
    q, scale, minimum = quantize_int4(linear.weight.detach(), 32)
    x = torch.randn(2, rows, 256)
    expected = F.linear(x, dequantize_int4(q, scale, minimum), linear.bias.detach())
    got = layer(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    if rows * 2 > cpu_weights.CHUNK_ROWS:  # fp32 GEMM on the unpacked weight: exact up to summation order
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    else:  # activations rounded to bf16 in the kernel: ~3 significant digits
        rel = (got - expected).norm() / expected.norm()
        assert float(rel) < 1e-2


def test_unpacked_weight_matches_quantiser():
    torch.manual_seed(2)
    linear = nn.Linear(128, 64, bias=False)
    q, scale, minimum = quantize_int4(linear.weight.detach(), 64)
    torch.testing.assert_close(Int4Linear(linear, 64).dequantized(), dequantize_int4(q, scale, minimum))


def test_quantize_model_replaces_every_linear_and_matches_dequantised_model():
    model = tiny_llama(seed=3)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # the reference: the same int4 weights, dequantised into ordinary fp32 layers
        for module in reference.model.modules():
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(dequantize_int4(*quantize_int4(module.weight, 32)))
        w = reference.lm_head.weight  # the head: int8, one scale per row (written out independently)
        scale = w.abs().amax(1, keepdim=True) / 127
        reference.lm_head.weight = nn.Parameter((w / scale).round() * scale)
    quantize_model(model, "int4", group_size=32)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [], "every nn.Linear should be quantised"
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 2 * 7
    assert isinstance(model.lm_head, Int8Linear)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)  # GEMM path
        one = model(ids[:, :1]).logits  # one token: the int4 kernel
        ref = reference(ids[:, :1]).logits
        assert float((one - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="int8"), "Unknown quantize mode"),
    (dict(group_size=48), "group_size"),
])  # fmt: skip
def test_quantize_model_rejects_bad_settings_and_leaves_the_model(kwargs, message):
    model = tiny_llama(seed=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        quantize_model(model, **kwargs)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="cuda", quantize="int4"), "CPU only"),
    (dict(device="cpu", quantize="nf4"), "Unknown quantize mode"),
])  # fmt: skip
def test_load_model_rejects_bad_quantize_before_loading(kwargs, message, tmp_path):
    from streaming_llm.runtime.loading import load_model

    # A model path that does not exist: the check must come first (a clear error, nothing loaded).
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "missing", **kwargs)


def test_smollm_int4_perplexity_close_to_fp32(smollm, shakespeare):
    """Perplexity sanity on the real model (a short text; the 16k-token figure is in the benchmark)."""
    from streaming_llm.eval.perplexity import perplexity, streaming_nll

    model, tokenizer = smollm
    ids = torch.tensor(tokenizer(shakespeare[:6000])["input_ids"][:1024])
    fp32 = perplexity(streaming_nll(model, ids, 4, 1020))
    quantised = quantize_model(copy.deepcopy(model))
    int4 = perplexity(streaming_nll(quantised, ids, 4, 1020))
    assert 0.99 < int4 / fp32 < 1.02, (fp32, int4)
    # The decode path (int4 kernel, bf16 activations) agrees with the chunk path on the next token.
    from streaming_llm import StreamingCache
    from streaming_llm.core.stepper import Stepper

    cache = StreamingCache(quantised.config, 4, 1020)
    stepper = Stepper(quantised, cache)
    stepper.prefill(0, ids[:200])
    agree, steps = 0, 8
    for i in range(steps):
        with torch.no_grad():
            logits = stepper.decode({0: int(ids[200 + i])})[0]
            check = quantised(input_ids=ids[None, : 201 + i]).logits[0, -1]  # the same weights, GEMM path
        agree += int(logits.argmax()) == int(check.argmax())
    assert agree >= steps - 1
