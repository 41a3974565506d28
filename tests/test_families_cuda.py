"""The new model families on a GPU: captured decode (CUDA graphs) of rows in different states against the slow
reference, and learned sinks in the Triton decode kernel inside a replayed graph.

Skipped, saying so, without CUDA. On the GPU (fp32, TF32 off), per family: four rows of one cache (one far past
the window, one filling its sinks, one fresh, one riding along idle while it ingests its prompt in chunks between
the steps) decoded by the :class:`~streaming_llm.core.stepper.Stepper` with CUDA graphs, each row compared with
the slow reference on the CPU (tests/reference.py), and with the same steps run eagerly on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from reference import SlowStreamingReference
from test_architectures import CASES, Case

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.core.kernels import decode_attention
from streaming_llm.core.stepper import Stepper

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="NOT RUN: needs a CUDA device")

FAMILIES = ["gpt-oss", "Qwen3-MoE", "Mixtral (sliding window)", "GLM-4-MoE", "SmolLM3", "Cohere 2 (Command R7B)",
            "GLM-4", "DeepSeek-V3", "DeepSeek-V2", "Qwen3-Next", "LFM2", "Falcon-H1"]  # fmt: skip
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _exact_float32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # conv1d of hybrids: no TF32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def run_rows(family: Case, cuda_graphs: bool) -> tuple[list[torch.Tensor], torch.Tensor, Stepper]:
    model = streaming_llm.install(family.model().cuda())
    streams = [ids(40 + 20, 1), ids(2 + 20, 2), ids(20, 3), ids(40, 4)]
    cache = StreamingCache(model.config, family.start, family.recent, rows=4, dtype=torch.float32, device="cuda")
    for b in range(4):
        cache.assign(b)
    stepper = Stepper(model, cache, cuda_graphs=cuda_graphs)
    stepper.prefill(0, streams[0][:40])
    stepper.prefill(1, streams[1][:2])
    got: list[list[torch.Tensor]] = [[], [], []]
    for i in range(20):
        logits = stepper.decode({0: int(streams[0][40 + i]), 1: int(streams[1][2 + i]), 2: int(streams[2][i])})
        for b in range(3):
            got[b].append(logits[b].double().cpu())
        if i % 5 == 0:
            last3 = stepper.prefill(3, streams[3][(i // 5) * 10 : (i // 5 + 1) * 10]).double().cpu()
    return [torch.stack(g) for g in got], last3, stepper


@pytest.mark.parametrize("name", FAMILIES)
def test_captured_decode_of_rows_equals_the_reference(name):
    family = case(name)
    got, last3, stepper = run_rows(family, cuda_graphs=True)
    assert stepper.replays > 0  # steps were replayed from captured graphs
    eager, eager3, _ = run_rows(family, cuda_graphs=False)
    streams = [ids(40 + 20, 1), ids(2 + 20, 2), ids(20, 3), ids(40, 4)]
    for b, first in enumerate((40, 2, 0)):
        ref = SlowStreamingReference(family.model(), family.start, family.recent).logits(streams[b][None])[first:]
        torch.testing.assert_close(got[b], ref, atol=ATOL, rtol=0, msg=lambda m, b=b: f"row {b}: {m}")
        torch.testing.assert_close(got[b], eager[b], atol=1e-5, rtol=0)
    ref3 = SlowStreamingReference(family.model(), family.start, family.recent).logits(streams[3][None])[-1]
    torch.testing.assert_close(last3, ref3, atol=ATOL, rtol=0)
    torch.testing.assert_close(last3, eager3, atol=1e-5, rtol=0)


def test_triton_decode_with_sinks_replays_in_a_graph():
    """Llama-3-8B-like shapes in bf16 with gpt-oss sink logits: captured once, replayed with new bounds."""
    g = torch.Generator().manual_seed(0)
    rows, kv_heads, groups, slots, dim = 8, 8, 8, 4353, 64
    query = torch.randn(rows, kv_heads * groups, 1, dim, generator=g).bfloat16().cuda()
    keys = torch.randn(rows, kv_heads, slots, dim, generator=g).bfloat16().cuda()
    values = torch.randn(rows, kv_heads, slots, dim, generator=g).bfloat16().cuda()
    sinks = (torch.rand(kv_heads * groups, generator=g) * 4 - 2).cuda()
    lo, hi = torch.zeros(rows, dtype=torch.int64, device="cuda"), torch.full((rows,), slots, device="cuda")
    out = torch.empty(rows, kv_heads * groups, 1, dim, dtype=torch.bfloat16, device="cuda")
    decode_attention(query, keys, values, lo, hi, dim**-0.5, path="triton", out=out, sinks=sinks)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(query, keys, values, lo, hi, dim**-0.5, path="triton", out=out, sinks=sinks)
    for first, last in ((0, slots), (100, 2000), (4000, 4001)):
        lo.fill_(first)
        hi.fill_(last)
        graph.replay()
        expected = decode_attention(query, keys, values, lo, hi, dim**-0.5, path="explicit", sinks=sinks)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)
