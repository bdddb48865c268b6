#!/usr/bin/env bash
# The runtime against vLLM 0.26.0 on the GPU machine -> $OUT/serve_vs_vllm.md (+ .json): the Gemma-2-2B
# workload of evals/serve_gpu.sh (256 prompts of 128-1,024 tokens -> 256, max_model_len 2048) offline,
# batch-1 and online at 4 and 16 requests/s; a second mix (512 prompts of 32-2,048 tokens -> 384); and
# Gemma-3-4B with prompts of 8k-16k tokens (64 prompts -> 256). Each system alone on the GPU in turn.
# vLLM first: evals/peers/README.md (6 calls that stage and install it in /root/vllm-site).
# One call of the GPU machine runs at most 10 minutes: the run stops starting steps after BUDGET seconds,
# keeps its state in $STATE (outside the repository copy), and the same command, called again while the
# machine is warm, resumes where it stopped; each call copies the report so far to $OUT. At the time
# limit the run gets SIGINT, so the vLLM process of the step under way is stopped with it:
#   FRESH=1 OUT=evals/results bash evals/serve_vs_vllm.sh    # first call
#   OUT=evals/results bash evals/serve_vs_vllm.sh            # again until it prints "all steps done"
# VLLM_MEM=0.85 sets vLLM's share of GPU memory where its default (0.9) finds too little free.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-evals/results}
STATE=${STATE:-/root/serve_vs_vllm}; mkdir -p $STATE       # outside the repository copy: kept while warm
WORK=/dev/shm/bench_serve; mkdir -p $WORK 2>/dev/null || WORK=/tmp/bench_serve
[ "${FRESH:-0}" = 1 ] && rm -rf $STATE/serve_vs_vllm.* $STATE/vllm_logs
RESUME=""; [ -f $STATE/serve_vs_vllm.json ] && RESUME=--resume
timeout -s INT -k 30 ${BENCH_TIMEOUT:-540} python3 evals/bench_serve.py suite --model gemma-2-2b --compare vllm \
  --vllm-path ${VLLM_PATH:-/root/vllm-site} ${VLLM_MEM:+--vllm-gpu-memory-utilization $VLLM_MEM} \
  --rate 4 --rate 16 --online-requests 128 \
  --workload gemma-2-2b:32:2048:384:4096:512 --workload gemma-3-4b:8192:16384:256:16640:64 \
  --budget-s ${BUDGET:-240} $RESUME --workdir $WORK --out $STATE/serve_vs_vllm.md 2>&1 \
  | grep -v "Loading weights\|it/s\]" | tee -a $STATE/serve_vs_vllm.log
cp $STATE/serve_vs_vllm.* $OUT/; [ -d $STATE/vllm_logs ] && cp -r $STATE/vllm_logs $OUT/
