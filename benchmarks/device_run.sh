#!/usr/bin/env bash
# How the GPU results in docs/RESULTS.md and benchmarks/results/ were produced, on the lent H200
# (transformers 5.17, torch 2.11, no package index). The embedded GGUF is larger than what one
# call may carry, so it travels in two halves: .carry1/part1 (+ the Shakespeare text) in the first
# call, .carry2/part2 (+ the gguf wheel) in the next; the first call stashes its half in
# /tmp/stash, outside the checkout, which stays on the machine between calls while it is held.
#
#   stage "stash":   stash part 1 and the text
#   stage "decode":  the Llama-3-8B-shaped decode benchmark (needs no weights)
#   stage "eval-a":  rebuild the GGUF, convert it once, stability over all of Shakespeare + ppl by method
#   stage "eval-b":  sweeps + recall vs distance
set -euo pipefail
stage=$1
out=${OUT:-/tmp/out}
stash=/tmp/stash
mkdir -p "$out" $stash
export PYTHONPATH=/tmp/site:$PWD STREAMING_LLM_HOME=$stash/home STREAMING_LLM_DATA=$stash
log="$out/$stage.log"
exec > >(tee "$log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

model_dir() {
  if [ ! -f $stash/model.gguf ]; then cat $stash/part1 .carry2/part2 > $stash/model.tmp && mv $stash/model.tmp $stash/model.gguf; fi
  python -m pip install -q --no-index --no-deps --target /tmp/site .carry2/wheels/*.whl 2>/dev/null
  python -c "from streaming_llm.runtime.loading import resolve; print(resolve('$stash/model.gguf'))" | tail -1
}

eval_cli() { python -m streaming_llm.cli eval "$@" --device cuda --dtype float32 --no-progress; }

case "$stage" in
  stash)
    cp .carry1/part1 $stash/part1 && cp .carry1/shakespeare.txt $stash/shakespeare.txt && ls -la $stash
    ;;
  decode)
    python benchmarks/gpu_decode.py --contexts 4096 32768 131072 --out "$out/results/gpu_decode"
    ;;
  eval-a)
    model=$(model_dir)
    eval_cli stability --model "$model" --tokens 0 --window 65536 --chunk-size 4096 \
      --state-dir $stash/stability-state --resume --out "$out/results/stability"
    eval_cli ppl --model "$model" --tokens 65536 --stride 8 --recompute-batch 32 --chunk-size 4096 \
      --out "$out/results/ppl"
    ;;
  eval-b)
    model=$(model_dir)
    eval_cli sweep --model "$model" --tokens 65536 --chunk-size 4096 --out "$out/results/sweep"
    eval_cli recall --model "$model" --trials 20 --hybrid-windows 256 --hybrid-trials 5 --update-every 512 \
      --summary-tokens 96 --out "$out/results/recall"
    ;;
esac
tar -C "$out" -czf "$out/$stage.tar.gz" results 2>/dev/null || true
rm -rf "$out/results"
