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
#   stage "issue29": the seed table (W = 4000/2000/1000/512) and the batched recall evaluation together, within
#                    $BUDGET seconds (default 480, model conversion included); resumable, run it again to go on.
#                    Sizes can be shrunk for a dry run on a CPU (DEVICE=cpu TRIALS=1 DISTANCES=64,300 ...).
set -euo pipefail
stage=$1
out=${OUT:-/tmp/out}
stash=${STASH:-/tmp/stash}
mkdir -p "$out" $stash
export PYTHONPATH=/tmp/site:$PWD STREAMING_LLM_HOME=$stash/home STREAMING_LLM_DATA=$stash
log="$out/$stage.log"
exec > >(tee "$log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

model_dir() {
  if [ ! -f $stash/model.gguf ]; then cat $stash/part1 .carry2/part2 > $stash/model.tmp && mv $stash/model.tmp $stash/model.gguf; fi
  python -m pip install -q --no-index --no-deps --target /tmp/site .carry2/wheels/*.whl 2>/dev/null
  python -c "from streaming_llm.runtime.loading import resolve; print(resolve('$stash/model.gguf'))" | tail -1
}

eval_cli() { python -m streaming_llm.cli eval "$@" --device cuda --dtype float32 --no-progress; }

case "$stage" in
  stash)
    cp .carry1/part1 $stash/part1 && ls -la $stash  # the text travels inside the package (streaming_llm/data)
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
  issue29)
    began=$(date +%s)
    budget=${BUDGET:-480} device=${DEVICE:-cuda} trials=${TRIALS:-50} families=${FAMILIES:-single,multikey,multivalue}
    distances=${DISTANCES:-64,256,1024,4096,16384,65536}
    left() { echo $(( budget - ($(date +%s) - began) )); }
    model=$(model_dir)
    echo "model ready after $(( $(date +%s) - began )) s"
    r=$stash/r29
    logs=$r/logs/$(date +%H%M%S)
    mkdir -p $r/recall $r/seed "$logs"
    # What earlier calls brought back (committed under results/h200-issue29, travelling with the tree), unless
    # this machine still holds newer copies.
    if [ -d results/h200-issue29 ]; then cp -rn results/h200-issue29/. $r/ || true; fi
    export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
    (
      for W in ${SEED_WINDOWS:-4000 2000 1000 512}; do
        if [ -f $r/seed/w$W/ppl.json ]; then echo "seed W=$W: done earlier"; continue; fi
        need=$(( W / 16 + 30 ))  # rough seconds on the shared GPU (4000 -> 280)
        if [ "$(left)" -lt $need ]; then echo "seed W=$W: not started, $(left) s left"; continue; fi
        echo "seed W=$W: start at $(( $(date +%s) - began )) s"
        timeout "$(left)" python -m streaming_llm.cli eval ppl --model "$model" --tokens "${SEED_TOKENS:-65536}" \
          --methods recompute,streaming --start-size 4 --recent-size $((W - 4)) --stride 32 --recompute-batch 16 \
          --chunk-size 4096 --device "$device" --dtype float32 --no-progress --out $r/seed/w$W || echo "seed W=$W: stopped"
        echo "seed W=$W: end at $(( $(date +%s) - began )) s"
      done
    ) > "$logs/seed.log" 2>&1 &
    pids=$!
    stop=$(( $(left) - 45 ))  # room for the report and the tarball
    methods=dense,streaming:256,streaming:1024,retrieval:1024,retrieval-sent:1024,retrieval-dense:1024,retrieval-fused:1024
    for k in 0 1; do
      timeout "$(left)" python -m streaming_llm.cli eval recall --model "$model" --families "$families" \
        --methods $methods --trials "$trials" --distances "$distances" --dense-layer 15 --tf32 \
        --shard $k/2 --max-seconds $stop --device "$device" --dtype float32 --no-progress --out $r/recall \
        > "$logs/recall.$k.log" 2>&1 &
      pids="$pids $!"
    done
    timeout "$(left)" python -m streaming_llm.cli eval recall --model "$model" --methods hybrid:256 \
      --trials "${HYBRID_TRIALS:-50}" --distances 64,256,1024 --hybrid-max-distance 1024 --update-every 512 \
      --summary-tokens 96 --max-seconds $stop --device "$device" --dtype float32 --no-progress --out $r/recall \
      > "$logs/hybrid.log" 2>&1 &
    pids="$pids $!"
    wait $pids || true  # (not a bare `wait`: it would wait for the log's tee too)
    echo "all workers done at $(( $(date +%s) - began )) s"
    python -m streaming_llm.cli eval recall --report-only --out $r/recall > "$logs/report.log" 2>&1 || true
    python benchmarks/seed_table.py $r/seed > "$logs/seed_table.log" 2>&1 || true
    tail -n 4 "$logs"/recall.[01].log "$logs/hybrid.log"; cat "$logs/seed.log" "$logs/seed_table.log"
    tar -C $stash -czf "$out/r29.tar.gz" r29
    echo "stage done at $(( $(date +%s) - began )) s"
    ;;
esac
[ "$stage" = issue29 ] || tar -C "$out" -czf "$out/$stage.tar.gz" results 2>/dev/null || true
rm -rf "$out/results"
