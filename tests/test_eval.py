"""Evaluation suite on small slices (the full runs are produced by `streaming-llm eval` and committed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoTokenizer

import streaming_llm
from streaming_llm.eval.perplexity import (
    dense_nll,
    nll_by_method,
    paired_ratio,
    perplexity,
    recompute_nll,
    streaming_nll,
    windowed_perplexity,
)
from streaming_llm.eval.recall import accuracy_table, parse_methods, recall_vs_distance, wilson
from streaming_llm.eval.stability import stability_run
from streaming_llm.eval.sweeps import recent_sweep, sink_sweep
from streaming_llm.runtime.loading import resolve

IDS = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model():
    return streaming_llm.install(tiny_llama())


def test_streaming_eval_in_chunks_equals_token_by_token(model):
    one = streaming_nll(model, IDS, 4, 28, chunk_size=1)
    for chunk in (7, 64, 300):
        torch.testing.assert_close(streaming_nll(model, IDS, 4, 28, chunk_size=chunk), one, atol=1e-5, rtol=0)


def test_methods_agree_while_nothing_is_evicted(model):
    """With a cache larger than the text, every method is the same full attention."""
    ids = IDS[:100]
    dense = dense_nll(model, ids, chunk_size=33)
    torch.testing.assert_close(streaming_nll(model, ids, 4, 200), dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(streaming_nll(model, ids, 0, 200), dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(recompute_nll(model, ids, 200, batch_size=16), dense, atol=1e-5, rtol=0)


def test_recompute_reruns_the_last_window_from_scratch(model):
    window, stride = 16, 7
    nll = recompute_nll(model, IDS[:80], window, stride=stride, batch_size=4)
    scored = (~nll.isnan()).nonzero().flatten().tolist()
    assert scored == list(range(0, 79, stride))
    i = scored[-1]
    with torch.no_grad():
        logits = model(input_ids=IDS[i - window + 1 : i + 1][None]).logits[0, -1]
    expected = torch.nn.functional.cross_entropy(logits[None], IDS[i + 1 : i + 2])
    assert math.isclose(float(nll[i]), float(expected), abs_tol=1e-5)


def test_nll_by_method_runs_all_methods_on_the_same_tokens(model):
    out = nll_by_method(model, IDS, start_size=4, recent_size=28, stride=10, chunk_size=50)
    assert set(out) == {"dense", "window", "recompute", "streaming"}
    assert all(v.shape == (299,) for v in out.values())
    with pytest.raises(ValueError, match="Unknown methods"):
        nll_by_method(model, IDS, methods=("magic",))


def test_paired_ratio_is_the_perplexity_ratio_with_a_paired_interval():
    generator = torch.Generator().manual_seed(1)
    reference = torch.rand(2000, generator=generator) * 4
    noise = torch.randn(2000, generator=generator) * 0.1
    nll = reference + 0.05 + noise
    nll[::7] = float("nan")  # positions one method did not score are left out
    result = paired_ratio(nll, reference)
    both = ~nll.isnan()
    assert math.isclose(result["ratio"], perplexity(nll[both]) / perplexity(reference[both]), rel_tol=1e-9)
    diff = (nll[both] - reference[both]).double()
    half = 1.96 * float(diff.std()) / math.sqrt(int(both.sum()))  # the textbook normal interval of the mean
    assert math.isclose(math.log(result["ci_high"]) - math.log(result["ratio"]), half, rel_tol=1e-3)
    assert result["ci_low"] < math.exp(0.05) < result["ci_high"] and result["positions"] == int(both.sum())
    assert result["ci_high"] - result["ci_low"] < 0.02  # paired: far narrower than the spread of either


def test_perplexity_helpers():
    nll = torch.tensor([math.log(2.0)] * 4 + [float("nan")])
    assert math.isclose(perplexity(nll), 2.0, rel_tol=1e-6)
    assert windowed_perplexity(torch.log(torch.tensor([2.0, 2.0, 4.0, 4.0])), 2) == pytest.approx([2.0, 4.0])


def test_sweeps(model):
    sinks = sink_sweep(model, IDS, [0, 4], total=32)
    assert [(r["start_size"], r["recent_size"]) for r in sinks] == [(0, 32), (4, 28)]
    sizes = recent_sweep(model, IDS, [16, 32, 10**6], start_size=4)
    assert [r["cache_size"] for r in sizes] == [20, 36]  # sizes beyond the trained length are skipped


def test_stability_run_is_resumable(model, tmp_path):
    full = stability_run(model, IDS, 4, 28, window=64, chunk_size=20, progress=False)
    assert [r["to_token"] for r in full] == [64, 128, 192, 256, 299]
    assert len({r["cache_bytes"] for r in full}) == 1
    state = tmp_path / "state"
    stability_run(model, IDS[:129], 4, 28, window=64, chunk_size=20, state_dir=state, progress=False)
    resumed = stability_run(model, IDS, 4, 28, window=64, chunk_size=20, state_dir=state, resume=True, progress=False)
    assert [r["to_token"] for r in resumed] == [64, 128, 192, 256, 299]
    for a, b in zip(full[2:], resumed[2:], strict=True):
        assert math.isclose(a["ppl"], b["ppl"], rel_tol=1e-5)


def test_recall_trials_plant_the_fact_at_the_asked_distance(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(resolve(None))
    model = streaming_llm.install(tiny_llama(vocab_size=len(tokenizer)))
    filler = "The sea was calm and the night was long. " * 400
    methods = parse_methods("streaming:48,retrieval:48", dense_window=4000)
    jsonl = tmp_path / "trials.jsonl"
    kwargs = dict(jsonl=jsonl, progress=False, retrieval_settings={"budget": 96, "passage_tokens": 32})
    first = recall_vs_distance(model, tokenizer, filler, [32, 96], methods, trials=2, **kwargs)
    assert [t["template"] for t in first] == ["code", "date"]  # templates rotate
    rows = [row for trial in first for row in trial["rows"]]
    assert len(rows) == 8 and {r["distance"] for r in rows} == {32, 96}
    assert all(isinstance(r["correct"], bool) and r["turn_s"] > 0 for r in rows)
    # Resuming runs only the missing trials and keeps the finished ones.
    resumed = recall_vs_distance(model, tokenizer, filler, [32, 96], methods, trials=3, **kwargs)
    assert [t["trial"] for t in resumed] == [0, 1, 2] and resumed[:2] == first
    assert len(jsonl.read_text().splitlines()) == 3
    table = accuracy_table(resumed)
    assert [(t["method"], t["distance"], t["trials"]) for t in table] == [
        ("retrieval:48", 32, 3), ("retrieval:48", 96, 3), ("streaming:48", 32, 3), ("streaming:48", 96, 3)
    ]  # fmt: skip
    assert all(0 <= t["ci_low"] <= t["accuracy"] <= t["ci_high"] <= 1 for t in table)


def test_wilson_interval_matches_the_closed_form():
    # 8 of 10 at 95%: the textbook Wilson interval is (0.4902, 0.9433).
    low, high = wilson(8, 10)
    assert math.isclose(low, 0.4902, abs_tol=1e-4) and math.isclose(high, 0.9433, abs_tol=1e-4)
    assert math.isclose(wilson(0, 50)[0], 0, abs_tol=1e-12) and math.isclose(wilson(0, 50)[1], 0.0713, abs_tol=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_cli_eval_ppl_writes_results(tmp_path, shakespeare):
    text = tmp_path / "text.txt"
    text.write_text(shakespeare[100_000:110_000])
    command = [
        sys.executable, "-m", "streaming_llm.cli", "eval", "ppl", "--text", str(text), "--tokens", "400",
        "--methods", "window,streaming,recompute", "--recent-size", "60", "--stride", "40", "--slice", "100",
        "--out", str(tmp_path / "out"), "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "out" / "ppl.json").read_text())
    assert set(payload["summary"]) == {"window", "streaming", "recompute"}
    assert payload["meta"]["tokens"] == 400 and "command" in payload["meta"]
    assert (tmp_path / "out" / "ppl_running.png").stat().st_size > 0
    assert (tmp_path / "out" / "ppl.csv").read_text().startswith("to_token,window,streaming")


def test_eval_text_defaults_to_the_packaged_shakespeare(tmp_path):
    import gzip
    from importlib import resources

    from streaming_llm.cli import build_parser
    from streaming_llm.cli.eval import _text

    args = build_parser().parse_args(["eval", "ppl", "--offset-chars", "10"])
    assert args.text is None
    packaged = resources.files("streaming_llm.data") / "shakespeare.txt.gz"
    whole = gzip.decompress(packaged.read_bytes()).decode("utf-8")
    assert len(whole) == 5_057_282 and "To be, or not to be" in whole  # the complete works, not an excerpt
    assert _text(args) == whole[10:]
    small = tmp_path / "small.txt.gz"
    small.write_bytes(gzip.compress(b"a compressed text"))
    assert _text(build_parser().parse_args(["eval", "ppl", "--text", str(small)])) == "a compressed text"
    with pytest.raises(FileNotFoundError, match="--text"):
        _text(build_parser().parse_args(["eval", "ppl", "--text", str(tmp_path / "missing.txt")]))


def test_cli_eval_recall_runs_families_batched_and_hybrid_per_trial(tmp_path):
    """The real model, a few trials: batched cells for two families, one hybrid trial, one report over both."""
    out = tmp_path / "recall"
    command = [
        sys.executable, "-m", "streaming_llm.cli", "eval", "recall", "--families", "single,multikey", "--trials", "1",
        "--distances", "64,320", "--methods", "streaming:256,retrieval-sent:256,hybrid:256", "--hybrid-trials", "1",
        "--hybrid-max-distance", "64", "--offset-chars", "500000", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "recall.json").read_text())
    cells = {(r["family"], r["method"], r["distance"]): r["trials"] for r in payload["accuracy"]}
    for family in ("single", "multikey"):
        for method in ("streaming:256", "retrieval-sent:256"):
            assert cells[(family, method, 64)] == 1 and cells[(family, method, 320)] == 1
    assert cells[("single", "hybrid:256", 64)] == 1 and payload["hybrid_trials_finished"] == 1
    assert {c["stream"] for c in payload["stream_costs"]} >= {"single:256", "multikey:256"}
    assert "**multikey: accuracy (trials) [Wilson 95%]**" in (out / "recall.md").read_text()
    assert (out / "recall.png").stat().st_size > 0
    # Resumed: nothing is missing, so nothing runs again and the report is the same.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "recall.json").read_text())["accuracy"] == payload["accuracy"]
