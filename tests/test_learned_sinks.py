"""Learned sink logits (gpt-oss's ``s_aux``) in every attention path, against float64 references.

A learned sink is one more softmax term per query head with no value: ``sum_j e^{x_j} v_j / (sum_j e^{x_j} +
e^{s_h})``. It must be applied wherever attention is computed: decode attention (triton, sdpa, explicit), the
banded chunk kernels (every path), the plain paths of the streaming attention, and the path for other caches.
Each reference here appends the logit to the scores written out in float64 and drops its column after the
softmax (the definition), independently of the kernels' own ways of adding the term.

The controls at the end show that the model-level tests would catch a path that forgot the sinks.
"""

from __future__ import annotations

import math

import pytest
import test_decode_kernel as dk
import torch
import transformers as T
from reference import SlowStreamingReference
from test_architectures import CASES
from test_decode_kernel import triton_mode  # noqa: F401  (fixture)

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core import attention
from streaming_llm.core.compat import cache_kwargs
from streaming_llm.core.kernels import banded, banded_attention, decode, decode_attention
from streaming_llm.core.stepper import Stepper

GPT_OSS = next(c for c in CASES if c.name == "gpt-oss")


def sink_logits(heads: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return (torch.rand(heads, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * scale


# -- decode attention ---------------------------------------------------------------------------------------
def decode_reference(query, keys, values, lo, hi, scaling, softcap=None, sinks=None):
    """Float64, row by row; the sink logit is appended to each head's logits and dropped after the softmax."""
    rows, heads = query.shape[:2]
    groups = heads // keys.shape[1]
    out = torch.empty(rows, heads, 1, values.shape[-1], dtype=torch.float64)
    for b in range(rows):
        first, last = int(lo[b]), int(hi[b])
        q = query[b, :, 0].double().cpu()
        k = keys[b, :, first:last].double().cpu().repeat_interleave(groups, dim=0)
        v = values[b, :, first:last].double().cpu().repeat_interleave(groups, dim=0)
        logits = torch.einsum("hd,hld->hl", q, k) * scaling
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = torch.cat((logits, sinks.double().cpu()[:, None]), dim=1)
        out[b, :, 0] = torch.einsum("hl,hld->hd", logits.softmax(dim=-1)[:, :-1], v)
    return out


@pytest.fixture(params=decode.PATHS)
def decode_path(request):
    if request.param == "triton":
        request.getfixturevalue("triton_mode")
    return request.param


@pytest.mark.parametrize("groups,dim,dim_v", [(1, 64, 64), (4, 64, 32), (8, 128, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_with_sinks(decode_path, groups, dim, dim_v, dtype):
    check_decode_sinks(decode_path, groups, dim, dim_v, dtype)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_triton_sinks_in_the_split_kernel_and_in_the_reduce(triton_mode, splits):  # noqa: F811
    """One split: the split kernel adds the term; several: the reduce kernel does."""
    check_decode_sinks("triton", 4, 64, 64, torch.float32, dk.TritonConfig(splits=splits, block_n=16))


def check_decode_sinks(path, groups, dim, dim_v, dtype, config=None):
    inputs = dk.make_case(3, rows=5, kv_heads=2, groups=groups, slots=300, dim=dim, dim_v=dim_v, dtype=dtype)
    sinks = sink_logits(2 * groups).to(dk.DEVICE)
    got = decode_attention(**inputs, path=path, config=config, sinks=sinks)
    expected = decode_reference(**inputs, sinks=sinks)
    dk.assert_matches(got, expected, inputs["values"], inputs["lo"], inputs["hi"], dtype)
    without = decode_attention(**inputs, path=path, config=config)
    assert (without.double().cpu() - expected).abs().max() > 1e-2  # the sinks weigh in this case


def test_decode_sinks_with_softcap_and_one_key(decode_path):
    """A sink is not soft-capped (only key logits are); one key per row (lo = hi - 1) and large sinks."""
    inputs = dk.make_case(4, rows=4, kv_heads=2, groups=3, slots=100, dim=64, dim_v=64, dtype=torch.float32,
                          ranges="last")  # fmt: skip
    sinks = sink_logits(6, seed=2, scale=6.0).to(dk.DEVICE)
    for softcap in (None,) if decode_path == "sdpa" else (None, 1.5):  # sdpa does not soft-cap
        got = decode_attention(**inputs, softcap=softcap, path=decode_path, sinks=sinks)
        expected = decode_reference(**inputs, softcap=softcap, sinks=sinks)
        dk.assert_matches(got, expected, inputs["values"], inputs["lo"], inputs["hi"], torch.float32)


def test_decode_sinks_are_checked():
    inputs = dk.make_case(0, rows=2, kv_heads=2, groups=2, slots=10, dim=16, dim_v=16, dtype=torch.float32,
                          device="cpu")  # fmt: skip
    with pytest.raises(ValueError, match=r"sinks must be a float tensor of shape \(4,\)"):
        decode_attention(**inputs, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="sinks must be a float tensor"):
        decode_attention(**inputs, sinks=torch.zeros(4, dtype=torch.int64))


# -- banded chunk attention ----------------------------------------------------------------------------------
def banded_reference(sinks, softcap=None, **inputs):
    """``test_kernels.reference_banded`` with the sink logit appended to every query's logits (float64)."""
    query, query_back, pin_k, rest_k = inputs["query"], inputs["query_back"], inputs["pin_k"], inputs["rest_k"]
    groups = query.shape[1] // rest_k.shape[1]

    def per_head(x):
        return x.double().repeat_interleave(groups, dim=1)

    t = torch.arange(inputs["query_first"], inputs["query_first"] + query.shape[2])[:, None]
    u = torch.arange(inputs["rest_first"], inputs["rest_first"] + rest_k.shape[2])[None, :]
    visible = torch.cat((inputs["pin_index"][None, :] <= t, (t - inputs["window"] <= u) & (u <= t)), dim=1)
    logits = torch.cat(
        (query_back.double() @ per_head(pin_k).transpose(-1, -2), query.double() @ per_head(rest_k).transpose(-1, -2)),
        dim=-1,
    ) * inputs["scaling"]  # fmt: skip
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~visible, -math.inf)
    column = sinks.double().reshape(1, -1, 1, 1).expand(*logits.shape[:3], 1)
    probs = torch.cat((logits, column), dim=-1).softmax(dim=-1)[..., :-1]
    return probs @ torch.cat((per_head(inputs["pin_v"]), per_head(inputs["rest_v"])), dim=2)


def banded_case(dtype=torch.float32, sinks_pinned=False, device="cpu", **overrides) -> dict:
    """Random inputs of ``banded_attention`` (as tests/test_kernels.py builds them): sinks at stream indices
    ``0..n_sinks-1``, then a segment; recent keys ``extra`` before the chunk, then the chunk's own."""
    c = dict(seed=0, batch=1, kv_heads=2, groups=2, q_len=12, extra=5, n_sinks=4, n_segment=2, window=6, dim=8,
             dim_v=8, query_first=40) | overrides  # fmt: skip
    g = torch.Generator().manual_seed(c["seed"])
    heads = c["kv_heads"] * c["groups"]
    rest_first = max(c["n_sinks"], c["query_first"] - c["window"]) if sinks_pinned else c["query_first"] - c["extra"]
    n_pin, n_rest = c["n_sinks"] + c["n_segment"], c["query_first"] + c["q_len"] - rest_first

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    return dict(
        query=rand(c["batch"], heads, c["q_len"], c["dim"]),
        query_back=rand(c["batch"], heads, c["q_len"], c["dim"]),
        pin_k=rand(c["batch"], c["kv_heads"], n_pin, c["dim"]),
        pin_v=rand(c["batch"], c["kv_heads"], n_pin, c["dim_v"]),
        pin_index=torch.cat((torch.arange(c["n_sinks"]), torch.full((c["n_segment"],), -1))).long().to(device),
        rest_k=rand(c["batch"], c["kv_heads"], n_rest, c["dim"]),
        rest_v=rand(c["batch"], c["kv_heads"], n_rest, c["dim_v"]),
        rest_first=rest_first,
        query_first=c["query_first"],
        window=c["window"],
        scaling=c["dim"] ** -0.5,
    )


EDGES = {
    "no pinned keys": dict(n_sinks=0, n_segment=0),
    "first chunk: its sinks are pinned, not recent": dict(query_first=0, q_len=12, sinks_pinned=True),
    "chunk longer than the window": dict(q_len=20, window=3),
    "segment only": dict(n_sinks=0, n_segment=3),
    "one query": dict(q_len=1, extra=7),
}


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    err = (actual.double().cpu() - expected).abs().max().item()
    assert err <= rtol * max(expected.abs().max().item(), 1.0), f"max abs error {err} (rtol {rtol})"


def run_banded(path, inputs, sinks, softcap=None, block=None):
    if path == "flex":  # GPU path; on CPU reachable only with eager FlexAttention, called directly
        band = banded._Band(inputs["rest_first"], inputs["query_first"], inputs["window"], inputs["rest_k"].shape[2],
                            inputs["query"].device)  # fmt: skip
        names = ("query", "query_back", "pin_k", "pin_v", "pin_index", "rest_k", "rest_v")
        return banded._flex(*(inputs[n] for n in names), band, inputs["scaling"], softcap, sinks)
    return banded_attention(**inputs, softcap=softcap, path=path, block=block, sinks=sinks)


@pytest.fixture(scope="module")
def eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(banded, "_flex_compiled", flex_attention)
        patch.setattr(banded, "_block_masks", {})
        yield


@pytest.mark.parametrize("path", banded.PATHS)
@pytest.mark.parametrize("edge", EDGES)
def test_banded_attention_with_sinks(eager_flex, path, edge):
    inputs = banded_case(**EDGES[edge])
    sinks = sink_logits(inputs["query"].shape[1], seed=1)
    softcaps = (None, 2.5) if path in ("explicit", "flex", "flex_concat") else (None,)
    for softcap in softcaps:
        expected = banded_reference(sinks, softcap, **inputs)
        close(run_banded(path, inputs, sinks, softcap, block=5), expected, 1e-5)
        without = run_banded(path, inputs, None, softcap, block=5)
        assert (without.double() - expected).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NOT RUN: needs a CUDA device")
@pytest.mark.parametrize("path", ["explicit", "sdpa_concat", "sdpa_lse", "flex", "flex_concat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_banded_sinks_on_cuda(path, dtype):
    """Every path on the GPU (compiled FlexAttention included), a chunk of 300 over a window of 100."""
    inputs = banded_case(dtype, device="cuda", q_len=300, extra=100, window=100, dim=64, dim_v=64, groups=4)
    sinks = sink_logits(inputs["query"].shape[1], seed=4).cuda()
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    got = banded_attention(**inputs, path=path, block=128, sinks=sinks)
    assert got.device.type == "cuda" and got.dtype == dtype
    close(got, banded_reference(sinks.cpu(), **cpu), 1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("path", ["explicit", "sdpa_concat", "sdpa_lse"])
def test_banded_sinks_in_bfloat16(path):
    inputs = banded_case(torch.bfloat16, q_len=30, extra=10, window=12, dim=16, dim_v=16)
    sinks = sink_logits(inputs["query"].shape[1], seed=3).to(torch.bfloat16)
    got = banded_attention(**inputs, path=path, block=8, sinks=sinks)
    assert got.dtype == torch.bfloat16
    close(got, banded_reference(sinks, **inputs), 2e-2)


def test_banded_sinks_are_checked():
    inputs = banded_case()
    with pytest.raises(ValueError, match="sinks must be a float tensor"):
        banded_attention(**inputs, sinks=torch.zeros(3))


# -- the attention function's paths --------------------------------------------------------------------------
def test_other_caches_match_transformers_eager_gpt_oss():
    """With a DynamicCache (or none) the switched model is transformers' eager gpt-oss, sinks included,
    padding included; and a prefill then decode with a DynamicCache matches too."""
    stock, switched = GPT_OSS.model(), streaming_llm.install(GPT_OSS.model())
    stock.set_attn_implementation("eager")
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        torch.testing.assert_close(switched(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-5, rtol=0)
        got = switched(input_ids=ids, attention_mask=mask).logits
        want = stock(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)
        for model in (stock, switched):
            cache = T.DynamicCache(config=model.config)
            model(input_ids=ids[:1, :12], past_key_values=cache)
            model.last = model(input_ids=ids[:1, 12:13], past_key_values=cache).logits
    torch.testing.assert_close(switched.last, stock.last, atol=1e-5, rtol=0)


def test_rows_stepped_together_equal_the_reference():
    """gpt-oss rows in different states decoded together (per-row decode attention, sliding group included)
    and a uniform bucket (plain path) both equal the slow reference."""
    model = streaming_llm.install(GPT_OSS.model())
    ids = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(10 + n)) for n in (70, 35, 30)]
    cache = StreamingCache(model.config, 4, 12, rows=3, dtype=torch.float32, device="cpu")
    for b in range(3):
        cache.assign(b)
    stepper = Stepper(model, cache)
    stepper.prefill(0, ids[0][:40])
    stepper.prefill(1, ids[1][:5])
    got: list[list[torch.Tensor]] = [[], [], []]
    for i in range(30):
        logits = stepper.decode({0: int(ids[0][40 + i]), 1: int(ids[1][5 + i]), 2: int(ids[2][i])})
        for b in range(3):
            got[b].append(logits[b].double())
    for b, first in enumerate((40, 5, 0)):
        ref = SlowStreamingReference(GPT_OSS.model(), 4, 12).logits(ids[b][None, : first + 30])[first:]
        torch.testing.assert_close(torch.stack(got[b]), ref, atol=1e-4, rtol=0, msg=lambda m, b=b: f"row {b}: {m}")


# -- controls: a path without the sinks fails the model-level comparison -----------------------------------------
def streamed(model, ids, size):
    cache = StreamingCache(model.config, GPT_OSS.start, GPT_OSS.recent)
    with torch.no_grad():
        chunks = [model(input_ids=c, **cache_kwargs(model, cache)).logits[0] for c in ids.split(size, 1)]
    return torch.cat(chunks).double()


def _sdpa_without(original):
    return lambda query, keys, values, lo, hi, scaling, sinks=None: original(query, keys, values, lo, hi, scaling)


def _causal_without(original):
    return lambda query, key, value, scaling, softcap=None, sinks=None: original(query, key, value, scaling, softcap)


def _with_sinks_without(original):
    return lambda pin_logits, pin_v, sinks: (pin_logits, pin_v)


@pytest.mark.parametrize(
    ("owner", "name", "without", "size"),
    [
        (decode, "_sdpa", _sdpa_without, 1),  # one token at a time: decode attention (sdpa, the CPU default)
        (banded, "_with_sinks", _with_sinks_without, 60),  # chunks crossing the eviction point: the banded kernel
        (attention, "_causal", _causal_without, 7),  # chunks before the first eviction: the plain causal path
    ],
    ids=["decode", "banded", "causal"],
)
def test_control_dropping_the_sinks_in_one_path_is_caught(monkeypatch, owner, name, without, size):
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(1))
    model = streaming_llm.install(GPT_OSS.model())
    reference = SlowStreamingReference(GPT_OSS.model(), GPT_OSS.start, GPT_OSS.recent).logits(ids)
    torch.testing.assert_close(streamed(model, ids, size), reference, atol=1e-4, rtol=0)
    monkeypatch.setattr(owner, name, without(getattr(owner, name)))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(streamed(model, ids, size), reference, atol=1e-4, rtol=0)


def test_control_a_reference_without_sinks_disagrees():
    """The reference's sink term is what the product is compared with: without it they differ."""
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    model = streaming_llm.install(GPT_OSS.model())
    plain = GPT_OSS.model()
    with torch.no_grad():
        for layer in plain.model.layers:
            layer.self_attn.sinks.fill_(-1e4)  # exp(-1e4) = 0: the term vanishes
    reference = SlowStreamingReference(plain, GPT_OSS.start, GPT_OSS.recent).logits(ids)
    assert (streamed(model, ids, 1) - reference).abs().max() > 1e-2
