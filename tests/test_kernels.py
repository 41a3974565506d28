"""Exactness of streaming_llm.core.kernels.banded_attention against a naive float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming_llm.core.kernels import banded, banded_attention


def reference_banded(query, query_back, pin_k, pin_v, pin_index, rest_k, rest_v, rest_first, query_first, window,
                     scaling, softcap=None):  # fmt: skip
    """Float64, all keys at once with the visibility written from the definition (tiny sizes only)."""
    groups = query.shape[1] // rest_k.shape[1]

    def per_head(x):  # (B, Hkv, n, d) -> (B, H, n, d) float64: head h uses kv head h // groups
        return x.double().repeat_interleave(groups, dim=1)

    t = torch.arange(query_first, query_first + query.shape[2])[:, None]
    u = torch.arange(rest_first, rest_first + rest_k.shape[2])[None, :]
    visible = torch.cat((pin_index[None, :] <= t, (t - window <= u) & (u <= t)), dim=1)
    logits = (
        torch.cat(
            (
                query_back.double() @ per_head(pin_k).transpose(-1, -2),
                query.double() @ per_head(rest_k).transpose(-1, -2),
            ),
            dim=-1,
        )
        * scaling
    )
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    probs = logits.masked_fill(~visible, -math.inf).softmax(dim=-1)
    return probs @ torch.cat((per_head(pin_v), per_head(rest_v)), dim=2)


def make_case(seed, batch, kv_heads, groups, q_len, extra, n_sinks, n_segment, window, dim, dim_v, query_first,
              dtype=torch.float32, sinks_pinned=False):  # fmt: skip
    """Random inputs; sinks at stream indices ``0..n_sinks-1``, then ``n_segment`` segment keys.

    Recent keys: ``extra`` before the chunk, then the chunk's own. With ``sinks_pinned`` the layout is the
    cache's at the start of a stream: the chunk's first tokens are sinks, held only as pinned keys, and the
    recent keys start after the sinks (``rest_first = max(n_sinks, query_first - window)``).
    """
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * groups
    rest_first = max(n_sinks, query_first - window) if sinks_pinned else query_first - extra
    n_pin, n_rest = n_sinks + n_segment, query_first + q_len - rest_first

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    pin_index = torch.cat((torch.arange(n_sinks), torch.full((n_segment,), -1))).long()
    return dict(
        query=rand(batch, heads, q_len, dim),
        query_back=rand(batch, heads, q_len, dim),
        pin_k=rand(batch, kv_heads, n_pin, dim),
        pin_v=rand(batch, kv_heads, n_pin, dim_v),
        pin_index=pin_index,
        rest_k=rand(batch, kv_heads, n_rest, dim),
        rest_v=rand(batch, kv_heads, n_rest, dim_v),
        rest_first=rest_first,
        query_first=query_first,
        window=window,
        scaling=dim**-0.5,
    )


def assert_close(actual, expected, rtol):
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * max(scale, 1.0), f"max abs error {err} vs scale {scale} (rtol {rtol})"


cases = st.fixed_dictionaries(
    dict(
        seed=st.integers(0, 2**16),
        batch=st.integers(1, 2),
        kv_heads=st.integers(1, 2),
        groups=st.sampled_from([1, 2, 4]),
        q_len=st.integers(1, 24),
        extra=st.integers(0, 12),
        n_sinks=st.integers(0, 4),
        n_segment=st.integers(0, 3),
        window=st.integers(1, 16),
        dim=st.sampled_from([8, 16]),
        dim_v=st.sampled_from([8, 16]),
        query_first=st.integers(0, 30),
        sinks_pinned=st.booleans(),
    )
)


def realistic(case):
    """Stream indices start at 0; pinned-sink layout only with sinks (a query must see a key), and no more
    sinks than tokens seen by the chunk's end."""
    case["query_first"] = max(case["query_first"], case["extra"])
    if case["sinks_pinned"]:
        case["n_sinks"] = max(case["n_sinks"], 1)
        case["query_first"] = min(case["query_first"], case["n_sinks"] + case["window"])
        # Only tokens seen so far can be sinks: a chunk that ends inside the sinks holds fewer.
        case["n_sinks"] = min(case["n_sinks"], case["query_first"] + case["q_len"])
    return case


def fixed_case(**overrides):
    case = dict(seed=0, batch=1, kv_heads=2, groups=2, q_len=12, extra=5, n_sinks=4, n_segment=2, window=6, dim=8,
                dim_v=8, query_first=40)  # fmt: skip
    case.update(overrides)
    return make_case(**case)


@pytest.fixture(scope="module")
def eager_flex():
    """FlexAttention without torch.compile: same math, no minute-long CPU compilation in tests."""
    from torch.nn.attention.flex_attention import flex_attention

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(banded, "_flex_compiled", flex_attention)
        patch.setattr(banded, "_block_masks", {})
        yield


def run_path(path, inputs, softcap=None, block=None):
    if path == "flex":  # the GPU path; on CPU only reachable with eager FlexAttention, so call it directly
        band = banded._Band(inputs["rest_first"], inputs["query_first"], inputs["window"], inputs["rest_k"].shape[2],
                            inputs["query"].device)  # fmt: skip
        names = ("query", "query_back", "pin_k", "pin_v", "pin_index", "rest_k", "rest_v")
        return banded._flex(*(inputs[n] for n in names), band, inputs["scaling"], softcap)
    return banded_attention(**inputs, softcap=softcap, path=path, block=block)


def test_reference_agrees_with_a_per_query_loop():
    """The vectorised reference against the definition written as loops (one case, float64)."""
    inputs = fixed_case(q_len=9, extra=3, query_first=2, window=4)
    expected = reference_banded(**inputs, softcap=3.0)
    q, qb, groups = inputs["query"].double(), inputs["query_back"].double(), 2
    for h in range(q.shape[1]):
        kv = h // groups
        for i in range(q.shape[2]):
            t = inputs["query_first"] + i
            logits, values = [], []
            for j, index in enumerate(inputs["pin_index"].tolist()):
                if index <= t:
                    logits.append(qb[0, h, i] @ inputs["pin_k"][0, kv, j].double())
                    values.append(inputs["pin_v"][0, kv, j].double())
            for r in range(inputs["rest_k"].shape[2]):
                if t - inputs["window"] <= inputs["rest_first"] + r <= t:
                    logits.append(q[0, h, i] @ inputs["rest_k"][0, kv, r].double())
                    values.append(inputs["rest_v"][0, kv, r].double())
            x = torch.stack(logits) * inputs["scaling"]
            probs = (3.0 * torch.tanh(x / 3.0)).softmax(dim=0)
            torch.testing.assert_close(probs @ torch.stack(values), expected[0, h, i], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["explicit", "sdpa_concat", "sdpa_lse"])
@given(case=cases, softcap=st.sampled_from([None, 2.0]), block=st.integers(1, 9))
@settings(max_examples=25, deadline=None)
def test_blocked_paths_match_reference(path, case, softcap, block):
    case = realistic(case)
    if path != "explicit":
        softcap = None
    inputs = make_case(**case)
    expected = reference_banded(**inputs, softcap=softcap)
    actual = run_path(path, inputs, softcap, block)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    assert_close(actual, expected, 1e-5)


@pytest.mark.parametrize("path", ["flex", "flex_concat"])
@given(case=cases, softcap=st.sampled_from([None, 2.0]))
@settings(max_examples=6, deadline=None)
def test_flex_paths_match_reference(eager_flex, path, case, softcap):
    inputs = make_case(**realistic(case))
    assert_close(run_path(path, inputs, softcap), reference_banded(**inputs, softcap=softcap), 1e-5)


EDGE_CASES = {
    "no pinned keys": dict(n_sinks=0, n_segment=0),
    "sinks in the future of early queries": dict(query_first=1, extra=1, n_segment=0),
    "windows reaching before rest_first": dict(extra=2, window=9),
    "chunk longer than the window": dict(q_len=20, window=3),
    "one query": dict(q_len=1, extra=7),
    "segment only": dict(n_sinks=0, n_segment=3),
    "window 0": dict(window=0),
    "first chunk: its sinks are pinned, not recent": dict(query_first=0, q_len=12, sinks_pinned=True),
    "chunk of sinks only": dict(query_first=1, q_len=3, n_sinks=4, sinks_pinned=True),
    "second chunk starts inside the sinks": dict(query_first=2, q_len=9, n_sinks=4, sinks_pinned=True),
}


@pytest.mark.parametrize("path", banded.PATHS)
@pytest.mark.parametrize("edge", EDGE_CASES)
def test_edge_cases(eager_flex, path, edge):
    inputs = fixed_case(**EDGE_CASES[edge])
    softcap = 2.5 if path in ("explicit", "flex", "flex_concat") else None
    assert_close(run_path(path, inputs, softcap, block=5), reference_banded(**inputs, softcap=softcap), 1e-5)


@pytest.mark.parametrize("path", ["explicit", "sdpa_concat", "sdpa_lse", "flex", "flex_concat"])
def test_bfloat16_within_bf16_tolerance(eager_flex, path):
    inputs = fixed_case(dtype=torch.bfloat16, q_len=30, extra=10, window=12, dim=16, dim_v=16)
    actual = run_path(path, inputs, block=8)
    assert actual.dtype == torch.bfloat16
    assert_close(actual, reference_banded(**inputs), 2e-2)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_default_path_is_exact(softcap):
    inputs = fixed_case(q_len=40, extra=12, window=15, groups=4)
    assert_close(banded_attention(**inputs, softcap=softcap), reference_banded(**inputs, softcap=softcap), 1e-5)


def test_noncontiguous_inputs():
    inputs = fixed_case()
    for name in ("query", "query_back", "rest_k", "rest_v"):  # same values, head-major strides
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    expected = reference_banded(**inputs)
    for path in ("explicit", "sdpa_concat", "sdpa_lse"):
        assert_close(banded_attention(**inputs, path=path), expected, 1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(rest_first=0), "must end with the chunk's last key"),
        (dict(query_back=torch.zeros(1, 4, 3, 8)), "query_back must have"),
        (dict(pin_index=torch.arange(6, dtype=torch.int32)), "int64"),
        (dict(window=-1), "window must be"),
        (dict(rest_k=torch.zeros(1, 3, 17, 8), rest_v=torch.zeros(1, 3, 17, 8)), "multiple of key/value heads"),
        (dict(pin_v=torch.zeros(1, 2, 6, 4)), "share the value dim"),
        (dict(path="nope"), "Unknown banded attention path"),
        (dict(path="sdpa_lse", softcap=2.0), "cannot soft-cap"),
        (dict(path="flex"), "flex_concat"),
        (dict(block=0), "block must be"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    inputs = fixed_case()
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        banded_attention(**inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", banded.PATHS)
@pytest.mark.parametrize("layout", ["steady", "sinks_pinned"])
def test_cuda_paths_match_reference(path, dtype, layout):
    """Every path on the GPU (compiled FlexAttention included) against the float64 reference."""
    if layout == "steady":
        case = fixed_case(q_len=300, extra=100, window=100, dim=64, dim_v=64, groups=4, dtype=dtype)
    else:
        case = fixed_case(q_len=300, query_first=2, window=100, dim=64, dim_v=64, groups=4, dtype=dtype,
                          sinks_pinned=True)  # fmt: skip
    cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    for softcap in (None, 3.0) if path in ("explicit", "flex", "flex_concat") else (None,):
        expected = reference_banded(**case, softcap=softcap)
        actual = banded_attention(**cuda, softcap=softcap, path=path, block=128)
        assert actual.device.type == "cuda" and actual.dtype == dtype
        # fp32: 1e-4, as GPU kernels may round float32 products through TF32-like paths.
        assert_close(actual.cpu(), expected, 1e-4 if dtype == torch.float32 else 2e-2)
