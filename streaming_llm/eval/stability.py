"""Endless-stream stability: perplexity and memory over a very long text, in windows, resumably.

The text streams through one :class:`StreamingCache`; every ``window`` tokens the perplexity of
that slice and the memory in use are recorded. After each window the cache and the results are
saved to ``state_dir``, so a run can be stopped and continued (``resume=True``).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..core.attention import install
from ..core.cache import StreamingCache
from ..core.compat import cache_kwargs
from .benchmark import rss_mib
from .perplexity import _nll, perplexity


@torch.no_grad()
def stability_run(
    model: PreTrainedModel,
    ids: torch.Tensor,
    start_size: int = 4,
    recent_size: int = 1020,
    window: int = 65536,
    chunk_size: int = 1024,
    state_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Stream ``ids`` and report perplexity and memory per ``window`` tokens (see module doc)."""
    install(model)
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    rows, fed = [], 0
    cache = StreamingCache(model.config, start_size, recent_size)
    if resume and state_dir and (state_dir / "progress.json").exists():
        saved = json.loads((state_dir / "progress.json").read_text())
        rows, fed = saved["rows"], saved["fed"]
        tensors = {k: v.to(model.device) for k, v in load_file(str(state_dir / "cache.safetensors")).items()}
        cache = StreamingCache.from_state(model.config, tensors, saved["counters"])
    total = ids.shape[0] - 1
    cuda = model.device.type == "cuda"
    desc = f"stream {start_size}+{recent_size}"
    with tqdm(total=total, initial=fed, unit="tok", desc=desc, disable=not progress) as bar:
        while fed < total:
            began, nll = time.perf_counter(), []
            if cuda:
                torch.cuda.reset_peak_memory_stats(model.device)
            end = min(total, fed + window)
            for i in range(fed, end, chunk_size):
                j = min(end, i + chunk_size)
                chunk = ids[i:j][None].to(model.device)
                logits = model(input_ids=chunk, use_cache=True, **cache_kwargs(model, cache)).logits
                nll.append(_nll(logits[0], ids[i + 1 : j + 1].to(model.device)))
                bar.update(j - i)
            rows.append({
                "from_token": fed, "to_token": end, "ppl": perplexity(torch.cat(nll)),
                "seconds": time.perf_counter() - began, "cache_bytes": cache.nbytes, "rss_mib": rss_mib(),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "gpu_peak_mib": torch.cuda.max_memory_allocated(model.device) / 2**20 if cuda else None,
                "model_position": cache.get_seq_length(),
            })  # fmt: skip
            fed = end
            if state_dir:
                _checkpoint(state_dir, cache, rows, fed)
    return rows


def _checkpoint(state_dir: Path, cache: StreamingCache, rows: list[dict], fed: int) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors, counters = cache.state()
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(state_dir / "cache.safetensors.tmp"))
    os.replace(state_dir / "cache.safetensors.tmp", state_dir / "cache.safetensors")
    (state_dir / "progress.json.tmp").write_text(json.dumps({"rows": rows, "fed": fed, "counters": counters}))
    os.replace(state_dir / "progress.json.tmp", state_dir / "progress.json")
