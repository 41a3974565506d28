#!/usr/bin/env bash
# The GPU run of issue 27 (quantized KV) in one device call: the quantized-KV tests, then the decode speed of
# bf16 / int8 / float8_e4m3 KV (benchmarks/kv_quant_gpu.py: Llama-3-8B shape, 4+4092, 1 and 32 rows).
#
#   run: bash benchmarks/device_kvquant.sh      (carry: .whl)
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
began=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_quant.py -k "not session and not follows" \
  > "$out/kvquant_tests.log" 2>&1
tail -3 "$out/kvquant_tests.log"
echo "tests: $(( $(date +%s) - began )) s"
timeout 360 python3 benchmarks/kv_quant_gpu.py --out "$out/kv_quant_gpu" 2>&1 | tee "$out/kv_quant_gpu.log"
echo "total: $(( $(date +%s) - began )) s"
