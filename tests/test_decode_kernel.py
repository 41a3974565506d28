"""Exactness of streaming_llm.core.kernels.decode_attention against a plain float64 reference.

Every path runs here: ``sdpa`` and ``explicit`` on the CPU (CUDA when present); ``triton`` on CUDA, or on the
CPU through Triton's interpreter (``TRITON_INTERPRET=1``) when the ``triton`` package can be imported (it is
not a dependency: ``pip install triton`` to run those tests on a CPU machine). Without either, the triton
tests are skipped with a reason saying they did not run. The CUDA graph tests need CUDA.

Tolerances. The reference takes the very inputs the kernels get (already rounded to their dtype) and
computes in float64, so only the kernels' own rounding counts. float32: products and softmax in float32,
a few units of 2^-24 per operation over at most a few thousand terms: ``2e-5`` relative to the larger of
the reference's and the values' magnitude. bfloat16/float16 (unit roundoff ``u`` = 2^-8 / 2^-11): the
output is rounded once (``<= u |out|``) and the probabilities are rounded to the value dtype before the
``p @ V`` product (``<= u * sum_j p_j |v_j| <= u max |v|``); so ``|out - ref| <= u (max|ref| + max|v|)``
plus float32 terms, which the test checks with a margin of 1.5 (SDPA on the CPU rounds the same way).
"""

from __future__ import annotations

import math

import pytest
import torch

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # e.g. the GPU machine without a package index: the fixed cases still run
    given = None

from streaming_llm.core.kernels import decode
from streaming_llm.core.kernels.decode import TritonConfig, check_decode_inputs, check_ranges, decode_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def reference(query, keys, values, lo, hi, scaling, softcap=None):
    """Float64 (on the inputs' device), row by row: head ``h`` scores kv head ``h // groups`` over slots
    ``lo[b] .. hi[b] - 1``; returned on the CPU."""
    rows, heads = query.shape[:2]
    groups = heads // keys.shape[1]
    out = torch.empty(rows, heads, 1, values.shape[-1], dtype=torch.float64)
    for b in range(rows):
        first, last = int(lo[b]), int(hi[b])
        q = query[b, :, 0].double()  # (H, D)
        k = keys[b, :, first:last].double().repeat_interleave(groups, dim=0)  # (H, L, D)
        v = values[b, :, first:last].double().repeat_interleave(groups, dim=0)  # (H, L, Dv)
        logits = torch.einsum("hd,hld->hl", q, k) * scaling
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        out[b, :, 0] = torch.einsum("hl,hld->hd", logits.softmax(dim=-1), v).cpu()
    return out


def assert_matches(actual, expected, values, lo, hi, dtype):
    """The bound of the module docstring: float32 ``2e-5``, 16-bit ``1.5 u (max|ref| + max|v in range|)``."""
    assert actual.shape == expected.shape and actual.dtype == dtype
    v_max = max(values[b, :, int(lo[b]) : int(hi[b])].abs().max().item() for b in range(values.shape[0]))
    scale = expected.abs().max().item() + v_max
    tol = 2e-5 * max(scale, 1.0) if dtype == torch.float32 else 1.5 * UNIT_ROUNDOFF[dtype] * scale + 1e-6
    err = (actual.double().cpu() - expected).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g} (scale {scale:.3g}, {dtype})"


@pytest.fixture(scope="module")
def triton_mode():
    """``"cuda"``, or ``"interpreter"`` with ``TRITON_INTERPRET=1`` set for the rest of this module (the kernels
    module is imported, so decorated, on first use: after this); skips, saying they did not run, without triton."""
    if not decode.triton_available():
        pytest.skip("NOT RUN: the triton path needs the triton package (on CPU: pip install triton, its interpreter)")
    if CUDA:
        yield "cuda"
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield "interpreter"


@pytest.fixture(params=decode.PATHS)
def path(request):
    if request.param == "triton":
        request.getfixturevalue("triton_mode")
    return request.param


def make_ranges(kind, rows, slots, g):
    """``(lo, hi)`` int64 of one kind for every row, or ``"mixed"``: row ``b`` takes kind ``b`` of the list."""
    kinds = ["full", "last", "random", "boundary", "one"]
    lo, hi = [], []
    for b in range(rows):
        k = kinds[b % len(kinds)] if kind == "mixed" else kind
        if k == "full":
            a, z = 0, slots
        elif k == "last":  # one key: lo = hi - 1
            z = int(torch.randint(1, slots + 1, (1,), generator=g))
            a = z - 1
        elif k == "one":  # the very first slot only
            a, z = 0, 1
        elif k == "boundary":  # both ends on or next to multiples of 16/64 (tile and chunk edges)
            edges = sorted({min(max(e + d, 0), slots) for e in range(0, slots + 1, 16) for d in (-1, 0, 1)})
            a = edges[int(torch.randint(0, len(edges), (1,), generator=g))]
            a = min(a, slots - 1)
            later = [e for e in edges if e > a] or [slots]
            z = later[int(torch.randint(0, len(later), (1,), generator=g))]
        else:
            a = int(torch.randint(0, slots, (1,), generator=g))
            z = int(torch.randint(a + 1, slots + 1, (1,), generator=g))
        lo.append(a)
        hi.append(z)
    return torch.tensor(lo), torch.tensor(hi)


def make_case(seed, rows, kv_heads, groups, slots, dim, dim_v, dtype, ranges="mixed", garbage=100.0,
              index_dtype=torch.int64, device=DEVICE):  # fmt: skip
    """Inputs laid out like the cache's: keys/values a view ``buffer[:rows, :, :slots]`` of a larger buffer
    (non-contiguous rows and slots), the query a transposed ``(rows, 1, Hq, D)`` projection. Slots outside
    each row's range hold ``garbage`` (large, so reading them would show)."""
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * groups

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    lo, hi = make_ranges(ranges, rows, slots, g)
    inside = decode.range_mask(lo, hi, slots)[:, None, :, None]
    keys = rand(rows + 1, kv_heads, slots + 3, dim)
    values = rand(rows + 1, kv_heads, slots + 3, dim_v)
    for t in (keys, values):
        t[:rows, :, :slots].masked_fill_(~inside, garbage)
    return dict(
        query=rand(rows, 1, heads, dim).transpose(1, 2).to(device),
        keys=keys.to(device)[:rows, :, :slots],
        values=values.to(device)[:rows, :, :slots],
        lo=lo.to(index_dtype).to(device),
        hi=hi.to(index_dtype).to(device),
        scaling=dim**-0.5,
    )


def run(path, inputs, softcap=None, config=None):
    return decode_attention(**inputs, softcap=softcap, path=path, config=config)


def check(path, inputs, softcap=None, config=None):
    actual = run(path, inputs, softcap, config)
    expected = reference(**inputs, softcap=softcap)
    assert_matches(actual, expected, inputs["values"], inputs["lo"], inputs["hi"], inputs["query"].dtype)
    return actual


# (groups, dim, dim_v): GQA 1/3/4/8, head dims 64 and 128, one Dv != D.
HEADS = [(1, 64, 64), (3, 64, 64), (4, 128, 128), (8, 128, 128), (4, 64, 32)]


@pytest.mark.parametrize("groups,dim,dim_v", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_layouts(path, groups, dim, dim_v, dtype):
    inputs = make_case(1, rows=5, kv_heads=2, groups=groups, slots=300, dim=dim, dim_v=dim_v, dtype=dtype)
    check(path, inputs)


@pytest.mark.parametrize("slots", [1, 2, 63, 64, 65, 1000, 2500])
@pytest.mark.parametrize("ranges", ["full", "last", "boundary", "random"])
def test_slot_counts_and_ranges(path, slots, ranges):
    inputs = make_case(slots, rows=3, kv_heads=2, groups=4, slots=slots, dim=64, dim_v=64, dtype=torch.float32,
                       ranges=ranges)  # fmt: skip
    check(path, inputs)


@pytest.mark.parametrize("softcap", [None, 1.5, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_softcap_and_dtypes(path, softcap, dtype):
    if path == "sdpa" and softcap is not None:
        pytest.skip("sdpa does not soft-cap (tested to raise below)")
    inputs = make_case(7, rows=4, kv_heads=2, groups=3, slots=700, dim=64, dim_v=64, dtype=dtype)
    inputs["query"] = inputs["query"] * 4  # logits well past the cap's knee
    check(path, inputs, softcap)


@pytest.mark.parametrize("splits", [1, 2, 5, 16])
@pytest.mark.parametrize("block_n", [16, 64])
def test_triton_split_counts(triton_mode, splits, block_n):
    """Chunks of whole tiles over each row's own range, any split count (incl. more chunks than tiles)."""
    inputs = make_case(splits, rows=5, kv_heads=2, groups=4, slots=400, dim=64, dim_v=64, dtype=torch.float32)
    check("triton", inputs, config=TritonConfig(block_n=block_n, splits=splits))


def test_triton_never_reads_outside_the_range(triton_mode):
    """NaN in every slot outside the ranges: the triton path does not touch them (sdpa/explicit would:
    a zero weight times NaN is NaN)."""
    inputs = make_case(3, rows=5, kv_heads=2, groups=4, slots=333, dim=64, dim_v=64, dtype=torch.bfloat16,
                       garbage=float("nan"))  # fmt: skip
    for splits in (1, 4):
        out = check("triton", inputs, config=TritonConfig(splits=splits))
        assert torch.isfinite(out).all()


def test_int32_bounds_and_out(path):
    inputs = make_case(5, rows=4, kv_heads=2, groups=2, slots=200, dim=64, dim_v=64, dtype=torch.bfloat16,
                       index_dtype=torch.int32)  # fmt: skip
    out = torch.full((8, 4, 1, 64), 7.0, dtype=torch.bfloat16, device=DEVICE)[::2]  # strided, preallocated
    got = decode_attention(**inputs, path=path, out=out)
    assert got is out
    assert_matches(out, reference(**inputs), inputs["values"], inputs["lo"], inputs["hi"], torch.bfloat16)


if given is not None:
    cases = st.fixed_dictionaries(
        dict(
            seed=st.integers(0, 2**16),
            rows=st.integers(1, 6),
            kv_heads=st.integers(1, 3),
            groups=st.sampled_from([1, 2, 3, 4, 8]),
            slots=st.integers(1, 1500),
            dim=st.sampled_from([16, 64, 80, 128]),
            dim_v=st.sampled_from([16, 64, 128]),
            dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
            ranges=st.sampled_from(["mixed", "random", "last", "boundary"]),
        )
    )

    @pytest.mark.parametrize("path", decode.PATHS)
    @given(case=cases, softcap=st.sampled_from([None, 5.0]), splits=st.sampled_from([None, 1, 3]))
    @settings(max_examples=30, deadline=None)
    def test_random_shapes(request, path, case, softcap, splits):
        if path == "triton":
            request.getfixturevalue("triton_mode")
        if path == "sdpa":
            softcap = None
        config = TritonConfig(splits=splits) if path == "triton" else None
        check(path, make_case(**case), softcap, config)

else:

    @pytest.mark.skip(reason="NOT RUN: hypothesis is not installed (random shapes)")
    def test_random_shapes():
        pass


def test_default_path_and_env(monkeypatch):
    monkeypatch.delenv(decode.ENV_PATH, raising=False)
    assert decode.default_path("cpu") == "sdpa" and decode.default_path("cpu", 2.0) == "explicit"
    if CUDA and decode.triton_available():
        assert decode.default_path("cuda") == "triton" and decode.default_path("cuda", 2.0) == "triton"
    monkeypatch.setenv(decode.ENV_PATH, "explicit")
    assert decode.default_path("cpu") == "explicit"
    inputs = make_case(0, rows=2, kv_heads=1, groups=2, slots=10, dim=16, dim_v=16, dtype=torch.float32)
    check(None, inputs)  # the env var picks the path


def test_errors():
    good = make_case(0, rows=2, kv_heads=2, groups=2, slots=10, dim=16, dim_v=16, dtype=torch.float32, device="cpu")
    check_decode_inputs(good["query"], good["keys"], good["values"], good["lo"], good["hi"])

    def bad(match, softcap=None, path=None, **changes):
        with pytest.raises(ValueError, match=match):
            decode_attention(**{**good, **changes}, softcap=softcap, path=path)

    bad("query must be", query=good["query"][:, :, :0])
    bad("float16, bfloat16 or float32", query=good["query"].double())
    bad("keys must be", keys=good["keys"][:1])
    bad("keys must have query's dtype", keys=good["keys"].half())
    bad("multiple of key/value heads", query=good["query"][:, :3])
    bad("head_dim", keys=good["keys"][..., :8])
    bad("values must be", values=good["values"][:, :, :5])
    bad("lo must be", lo=good["lo"].float())
    bad("hi must be", hi=good["hi"][:1])
    bad("softcap must be positive", softcap=-1.0)
    bad("Unknown decode attention path", path="flash")
    bad("cannot soft-cap", softcap=2.0, path="sdpa")
    bad("out must be", out=torch.empty(2, 4, 1, 8))
    if not decode._interpreting():
        bad("triton", path="triton")  # CPU tensors without the interpreter (or without triton)
    check_ranges(good["lo"], good["hi"], 10)
    with pytest.raises(ValueError, match="row 1"):
        check_ranges(torch.tensor([0, 4]), torch.tensor([3, 4]), 10)


def test_choose_splits():
    cfg = TritonConfig()
    cuda = torch.device("cuda", 0)
    if CUDA:
        sms = decode.sm_count(cuda)
        assert decode.choose_splits(1, 8, 4353, cuda, cfg) == min(math.ceil(2 * sms / 8), 64, 69)
        assert decode.choose_splits(64, 8, 4353, cuda, cfg) == 1
    assert decode.choose_splits(1, 8, 5, torch.device("cpu"), cfg) == 1  # never more chunks than tiles of S
    assert decode.choose_splits(3, 2, 10_000, torch.device("cpu"), TritonConfig(splits=7)) == 7


# ---------------------------------------------------------------- CUDA only: graphs, Llama-3-8B shapes

cuda_only = pytest.mark.skipif(not CUDA, reason="NOT RUN: needs a CUDA device (CUDA graph capture)")


@cuda_only
@pytest.mark.parametrize("splits", [None, 1])
def test_cuda_graph_replays_with_new_bounds(triton_mode, splits):
    """Captured once, replayed with new lo/hi copied into the static bound tensors: new, right results."""
    inputs = make_case(11, rows=8, kv_heads=8, groups=4, slots=4353, dim=128, dim_v=128, dtype=torch.bfloat16)
    config = TritonConfig(splits=splits)
    out = torch.empty(8, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
    decode_attention(**inputs, path="triton", out=out, config=config)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(**inputs, path="triton", out=out, config=config)
    g = torch.Generator().manual_seed(5)
    for kind in ("full", "mixed", "last", "random"):
        lo, hi = make_ranges(kind, 8, 4353, g)
        inputs["lo"].copy_(lo)
        inputs["hi"].copy_(hi)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_ranges(inputs["lo"], inputs["hi"], 4353)
        assert_matches(out, reference(**inputs), inputs["values"], lo, hi, torch.bfloat16)


@cuda_only
@pytest.mark.parametrize("rows,slots", [(1, 4353), (32, 4353), (4, 32768)])
def test_llama3_shapes(triton_mode, rows, slots):
    """The benchmark's shapes (Hq 32, Hkv 8, D 128, bf16), ragged ranges, default splits."""
    inputs = make_case(rows, rows=rows, kv_heads=8, groups=4, slots=slots, dim=128, dim_v=128,
                       dtype=torch.bfloat16)  # fmt: skip
    check("triton", inputs)
