#!/usr/bin/env bash
# The GPU run of the one-engine work, in one device call (the H200 has transformers 5.17 and no package
# index: the wheels travel in .whl/, the SmolLM2 tokenizer in .tok/smollm2):
#   1. the decode kernel's CUDA tests (Triton: correctness, graph capture with new ranges, Llama-3-8B shapes);
#   2. the kernel microbenchmark (benchmarks/decode_attention.py);
#   3. the one-engine benchmark (benchmarks/engine_decode.py, with the float32 check and the server end to end).
# If the Triton kernel fails its tests, the benchmarks run on the masked-SDPA path (said in the log).
# SKIP_KERNEL=1 skips steps 1 and 2 (already run).
#
#   run: bash benchmarks/device_engine.sh      (carry: .whl .tok)
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
began=$(date +%s)
if [ "${SKIP_KERNEL:-0}" != 1 ]; then
timeout 240 python3 -m pytest -q -p no:cacheprovider -x -rs tests/test_decode_kernel.py > "$out/kernel_tests.log" 2>&1
status=$?
tail -5 "$out/kernel_tests.log"
if [ $status -ne 0 ]; then
  echo "decode kernel tests failed (status $status): benchmarks use STREAMING_LLM_DECODE_PATH=sdpa"
  export STREAMING_LLM_DECODE_PATH=sdpa
fi
echo "kernel tests: $(( $(date +%s) - began )) s"
timeout 150 python3 benchmarks/decode_attention.py --out "$out/decode_attention" > "$out/decode_attention.log" 2>&1
tail -30 "$out/decode_attention.log"
echo "kernel benchmark: $(( $(date +%s) - began )) s"
fi
timeout 420 python3 benchmarks/engine_decode.py --check --server --tokenizer .tok/smollm2 \
  --out "$out/engine_decode" 2>&1 | tee "$out/engine_decode.log" | grep -v '^{' 
echo "total: $(( $(date +%s) - began )) s"
# At most 8 files come back: the results in one archive, the two main logs beside it.
tar -C "$out" -czf "$out/results.tar.gz" --exclude results.tar.gz . && find "$out" -type f ! -name results.tar.gz \
  ! -name engine_decode.log ! -name kernel_tests.log -delete
