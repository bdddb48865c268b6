"""evals/bench_tp.py runs end to end at a tiny CPU setting (gloo, N = 1 and 2) and writes its report."""

import sys
from pathlib import Path

from serve_fixtures import gemma2_config, random_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))


def test_bench_tp_tiny_cpu(tmp_path):
    import bench_tp
    path = save_model(random_model(gemma2_config(num_layers=2), seed=1), tmp_path / "m")
    out = tmp_path / "serve_tp.md"
    argv = ["--model", str(path), "--sizes", "1,2", "--device", "cpu", "--num-requests", "3", "--min-prompt", "4",
            "--max-prompt", "9", "--output-len", "3", "--latency-prompt", "5", "--latency-output", "3",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "64", "--out", str(out)]
    assert bench_tp.main(argv) == 0
    text = out.read_text()
    assert text.startswith("`python evals/bench_tp.py --model")
    rows = [line for line in text.splitlines() if line.startswith(f"| {path} |")]
    assert len(rows) == 2 and all(line.endswith("|  |") for line in rows), text
    assert float(rows[1].split("|")[6].strip().rstrip("%")) > 0         # N=2 spends time in collectives
