#!/usr/bin/env bash
# How results/h200-issue16/ was produced on the lent H200 (torch 2.11, transformers 5.17, no package index).
# The embedded GGUF (98 MB) is larger than one call may carry, so it travels in two halves:
#   call 1: .carry16/part_00 + shakespeare.txt  -> `bash .carry16/device_run.sh stash`  (kept in /tmp/stash16)
#   call 2: .carry16/part_01 + the code + gguf wheel -> `bash .carry16/device_run.sh run`
# "run" rebuilds and converts the model once, then in parallel on the one GPU: the seed table
# (perplexity streaming vs recompute at total caches 512/1000/2000/4000 over 64k tokens) and the
# recall evaluation in 6 worker processes (trial t goes to worker t % 6; each appends finished
# trials to its own JSONL, so an interrupted run resumes), then tabulates everything.
set -uo pipefail
stage=$1
stash=/tmp/stash16
out=${OUT:-/tmp/out16}
mkdir -p "$stash" "$out"
if [ "$stage" = stash ]; then
  cp .carry16/part_00 .carry16/shakespeare.txt "$stash"/ && ls -la "$stash"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  exit 0
fi
cd .carry16
cat "$stash"/part_00 part_01 > "$stash"/model.gguf
sha256sum -c sha --status || { echo "model halves do not match (fresh machine?)"; exit 3; }
python3 -m pip install -q --no-index --no-deps --target /tmp/site gguf-*.whl
export PYTHONPATH=/tmp/site:$PWD STREAMING_LLM_HOME=$stash/home OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
model=$(python3 -c "from streaming_llm.loading import resolve; print(resolve('$stash/model.gguf'))" 2>/dev/null | tail -1)
echo "model: $model"
text=$stash/shakespeare.txt
common="--model $model --text $text --device cuda --dtype float32 --no-progress"
(
  for W in 512 1000 2000 4000; do
    python3 -m streaming_llm.cli eval ppl $common --tokens 65536 --methods recompute,streaming \
      --start-size 4 --recent-size $((W - 4)) --stride 32 --recompute-batch 16 --chunk-size 4096 --out "$out/seed/w$W"
  done
) > "$out/seed.log" 2>&1 &
seed=$!
workers=6
for k in $(seq 0 $((workers - 1))); do
  python3 -m streaming_llm.cli eval recall $common --trials 50 --shard $k/$workers --max-seconds ${RECALL_SECONDS:-170} \
    --distances 64,256,1024,4096,16384,65536 \
    --methods dense,streaming:256,streaming:1024,retrieval:1024,hybrid:256 \
    --hybrid-max-distance 1024 --update-every 512 --summary-tokens 64 --budget 256 --passage-tokens 64 \
    --out "$out/recall" > "$out/recall.$k.log" 2>&1 &
done
wait $(jobs -p | grep -v "^$seed$") 2>/dev/null
python3 -m streaming_llm.cli eval recall --report-only --out "$out/recall" > "$out/recall.log" 2>&1
wait $seed
tail -3 "$out/seed.log"; tail -30 "$out/recall.log"
tar czf "$out/results.tgz" -C "$out" seed recall seed.log recall.*.log
rm -rf "$out/seed" "$out/recall" "$out"/recall.[0-9]*.log
ls -la "$out"
