"""Old vs new banded path on a long stream: logits agree within the dtype's tolerance.

Streams the same random tokens through two StreamingCaches, one with the ``explicit`` banded path
(the algorithm of the former ``attention._banded``: float32 scores per query block) and one with the
default fused path, and compares the last-token logits of every chunk.

    python benchmarks/ingest_equivalence.py --tokens 65536 --out benchmarks/results/ingest_equivalence
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_llm import StreamingCache, install  # noqa: E402
from streaming_llm.core.kernels import DEFAULT_PATH  # noqa: E402
from streaming_llm.eval.shapes import LLAMA3_8B, TINY  # noqa: E402
from streaming_llm.runtime.generation import prefill  # noqa: E402


@torch.no_grad()
def run(model, ids: torch.Tensor, chunk: int, start: int, recent: int, path: str | None) -> torch.Tensor:
    if path:
        os.environ["STREAMING_LLM_BANDED_PATH"] = path
    else:
        os.environ.pop("STREAMING_LLM_BANDED_PATH", None)
    cache = StreamingCache(model.config, start, recent)
    return torch.stack([prefill(model, cache, part, chunk).float() for part in ids.split(chunk)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--recent-size", type=int, default=4092)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (an fp32 check)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()
    install(model)
    ids = torch.randint(0, model.config.vocab_size, (args.tokens,), device=device)
    old = run(model, ids, args.chunk, 4, args.recent_size, "explicit")
    new = run(model, ids, args.chunk, 4, args.recent_size, os.environ.get("NEW_PATH"))
    diff = (old - new).abs().amax(-1)
    result = {
        "command": "python " + " ".join(sys.argv), "dtype": str(dtype), "tokens": args.tokens, "chunk": args.chunk,
        "layers": shape["num_hidden_layers"],
        "new_path": os.environ.get("NEW_PATH") or DEFAULT_PATH.get((device.type, False)),
        "max_abs_logit_diff": diff.max().item(),
        "median_abs_logit_diff": diff.median().item(), "logit_scale": old.abs().max().item(),
        "greedy_agreement": (old.argmax(-1) == new.argmax(-1)).float().mean().item(),
    }  # fmt: skip
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
