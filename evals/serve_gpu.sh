#!/usr/bin/env bash
# The serving fast path on the GPU machine: the `gpu` engine tests (CUDA graphs + Triton == reference
# path == HF; the memory profile), then the benchmark suite -> $OUT/serve_gpu.md (+ .json, logs): the
# four models, HF baselines, online latency, and the grid of gemma-2-2b against its slimmed sibling on
# the default mix and on prompts of 32-1,800 tokens with 384 output tokens, at max_model_len 4096 and
# 8192, each with its decode graphs; then a fresh `compress serve` of the sibling at both lengths.
# Run from the repo root (RUN_TESTS=0 skips the tests):
#   OUT=evals/results bash evals/serve_gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-evals/results}
WORK=/dev/shm/bench_serve; mkdir -p $WORK 2>/dev/null || WORK=/tmp/bench_serve
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"
if [ "${RUN_TESTS:-1}" = 1 ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_fast_path.py \
    tests/test_memory_plan.py 2>&1 | tail -25 | tee $OUT/serve_gpu_test.log
fi
timeout ${BENCH_TIMEOUT:-560} python3 evals/bench_serve.py suite --model gemma-2-2b --model gemma-3-1b \
  --model gemma-3-4b --model gemma-3-270m --compare hf --hf-requests ${HF_REQUESTS:-32} --slim 0.6 --rate 8 \
  --online-requests 64 --mix 32:1800:384 --grid-max-model-len 4096 --grid-max-model-len 8192 --serve-check \
  --workdir $WORK --out $OUT/serve_gpu.md 2>&1 | grep -v "Loading weights\|it/s\]" | tee $OUT/serve_bench.log
