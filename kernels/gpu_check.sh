#!/usr/bin/env bash
# One device-machine call: the full kernel test grid on the GPU, then the kernel benchmark (+ decode
# launch-config sweep). Run from the repo root on the GPU machine:
#   bash kernels/gpu_check.sh            (logs and kernels_gpu.md land in $OUT, else evals/results)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
dest=${OUT:-evals/results}
mkdir -p "$dest"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
# xdist spreads the ~130 Triton compilations of the full grid over the machine's cores
python3 -m pytest tests/test_kernels.py tests/test_kernels_misc.py -q -n 8 -p no:cacheprovider 2>&1 \
  | tee "$dest/kernels_tests.log" | tail -15
python3 evals/bench_kernels.py --sweep --out "$dest/kernels_gpu.md" "$@" 2>&1 | tee "$dest/kernels_bench.log" \
  | grep -v "^|" | tail -20
cat "$dest/kernels_gpu.md"
