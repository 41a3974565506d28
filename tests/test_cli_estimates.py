"""Long CLI work says up front roughly how long it will take: the work it counts is the work it does.

The expectation is the number of tokens that really go through the model, counted by a forward hook
during the real evaluation functions on a tiny random Llama.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_llama

from streaming_llm.cli import build_parser
from streaming_llm.cli.eval import announce, work_tokens
from streaming_llm.eval.perplexity import nll_by_method
from streaming_llm.eval.sweeps import recent_sweep, sink_sweep


def counted(model) -> list[int]:
    seen = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True)
    return seen


@pytest.mark.parametrize("methods", ["dense,window,recompute,streaming", "streaming", "recompute"])
def test_the_ppl_estimate_counts_the_tokens_the_run_feeds(methods):
    model = tiny_llama()
    args = build_parser().parse_args(["eval", "ppl", "--methods", methods, "--start-size", "4", "--recent-size", "28",
                                      "--stride", "5", "--recompute-batch", "3", "--chunk-size", "16"])  # fmt: skip
    ids = torch.randint(0, 128, (203,), generator=torch.Generator().manual_seed(0))
    seen = counted(model)
    nll_by_method(model, ids, tuple(methods.split(",")), 4, 28, 5, 16, False, 3)
    assert work_tokens("ppl", args, len(ids)) == sum(seen)


def test_the_sweep_estimate_counts_the_tokens_the_run_feeds():
    model = tiny_llama(max_position_embeddings=100)
    args = build_parser().parse_args(["eval", "sweep", "--sinks", "0,2,4", "--total", "32", "--recents", "16,60,200",
                                      "--start-size", "4", "--chunk-size", "16"])  # fmt: skip
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(1))
    seen = counted(model)
    sink_sweep(model, ids, [0, 2, 4], 32, 16)
    recent_sweep(model, ids, [16, 60, 200], 4, 16)  # 200 is beyond the model's 100 positions: skipped
    assert work_tokens("sweep", args, len(ids), model.config.max_position_embeddings) == sum(seen)


def test_the_estimate_line(capsys):
    model = tiny_llama()
    args = build_parser().parse_args(["eval", "stability", "--chunk-size", "64", "--recent-size", "60"])
    announce(args, model, 1_000_000)
    line = capsys.readouterr().err
    found = re.fullmatch(r"\[eval stability: about 1,000,000 tokens through the model; about ([\d.]+) (s|min|h) at "
                         r"([\d,]+) tok/s on cpu \(measured just now on a 64-token chunk\)\]\n", line)  # fmt: skip
    assert found, line
    rate = int(found[3].replace(",", ""))
    seconds = float(found[1]) * {"s": 1, "min": 60, "h": 3600}[found[2]]
    assert seconds == pytest.approx(1_000_000 / rate, rel=0.6)  # rounded to the unit shown
