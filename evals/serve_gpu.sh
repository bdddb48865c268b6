#!/usr/bin/env bash
# The serving fast path on the GPU machine: the `gpu` engine test (CUDA graphs + Triton == reference
# path == HF), then the benchmark suite -> $OUT/serve_gpu.md (+ .json, logs). Run from the repo root:
#   OUT=evals/results bash evals/serve_gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-evals/results}
WORK=/dev/shm/bench_serve; mkdir -p $WORK 2>/dev/null || WORK=/tmp/bench_serve
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout ${TEST_TIMEOUT:-180} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_fast_path.py 2>&1 \
  | tail -25 | tee $OUT/serve_gpu_test.log
timeout ${BENCH_TIMEOUT:-420} python3 evals/bench_serve.py suite --model gemma-2-2b --model gemma-3-1b \
  --model gemma-3-4b --model gemma-3-270m --compare hf --hf-requests ${HF_REQUESTS:-32} --slim 0.6 --rate 8 \
  --online-requests 64 --workdir $WORK --out $OUT/serve_gpu.md 2>&1 | grep -v "Loading weights\|it/s\]" \
  | tee $OUT/serve_bench.log
