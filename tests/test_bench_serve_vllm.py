"""`evals/bench_serve.py --compare vllm` on a tiny CPU model: where vLLM does not import, the run names
the import error in one line and still gives the runtime's rows; with a stand-in `vllm` package (it
records what it is asked and returns fixed-length outputs; it measures nothing), the peer gets our exact
prompts, limits and sampling, and both systems' rows land in one report with what the peer chose."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from serve_fixtures import gemma2_config, random_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))

STUB = '''
import json, os, sys
__version__ = "0.0.stub"
class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw
class _Out:
    def __init__(self, n):
        self.token_ids = list(range(n))
class _Request:
    def __init__(self, n):
        self.outputs = [_Out(n)]
class _NS:
    def __init__(self, **kw):
        self.__dict__.update(kw)
class LLM:
    def __init__(self, **kw):
        self.kw = kw
        print("Using FLASH_ATTN attention backend out of potential backends: ['FLASH_ATTN', 'TRITON_ATTN'].",
              file=sys.stderr)
        print("GPU KV cache size: 1,234 tokens", file=sys.stderr)
        self.llm_engine = _NS(vllm_config=_NS(
            cache_config=_NS(num_gpu_blocks=77, block_size=16, gpu_memory_utilization=0.9),
            compilation_config=_NS(cudagraph_mode="FULL_AND_PIECEWISE"),
            scheduler_config=_NS(enable_chunked_prefill=True), model_config=_NS(get_head_size=lambda: 16)))
    def generate(self, prompts, params, use_tqdm=True):
        with open(os.environ["STUB_RECORD"], "a") as f:
            f.write(json.dumps({"init": self.kw, "sampling": params.kw,
                                "prompts": [p["prompt_token_ids"] for p in prompts]}) + "\\n")
        return [_Request(params.kw["max_tokens"]) for _ in prompts]
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(random_model(gemma2_config(num_layers=2), seed=1), tmp_path_factory.mktemp("m") / "m")


def stub_vllm(root: Path, init: str = STUB) -> Path:
    (root / "vllm" / "entrypoints" / "openai").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text(init)
    (root / "vllm" / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n")
    for sub in ("entrypoints/__init__.py", "entrypoints/openai/__init__.py", "entrypoints/openai/api_server.py"):
        (root / "vllm" / sub).write_text("")
    return root


def run(model_dir: Path, tmp_path: Path, vllm_path: Path, *extra: str, mode: str = "offline") -> str:
    import bench_serve
    out = tmp_path / "serve_vs_vllm.md"
    argv = [mode, "--model", str(model_dir), "--compare", "vllm", "--vllm-path", str(vllm_path),
            "--num-requests", "3", "--min-prompt", "4", "--max-prompt", "9", "--output-len", "3",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "64",
            "--workload", f"{model_dir}:5:12:4:48:2", "--out", str(out), *extra]
    assert bench_serve.main(argv) == 0
    return out.read_text()


def test_missing_vllm_is_one_line_and_our_rows_remain(model_dir, tmp_path, capsys):
    text = run(model_dir, tmp_path, tmp_path / "empty", "--rate", "40", "--rate", "80", "--online-requests", "2",
               mode="suite")
    printed = capsys.readouterr().out
    reason = "ModuleNotFoundError: No module named 'vllm'"
    assert f"vLLM not run: {reason}\n" in printed and "Traceback" not in printed
    assert f"vLLM not run: {reason}." in text
    offline = text.split("## Against vLLM")[1].split("### Batch-1")[0]
    table = [line for line in offline.splitlines() if line.startswith("| ")]
    ours = [line for line in table if "| serve |" in line]
    theirs = [line for line in table if f"not run: {reason}" in line]
    assert len(ours) == 2 and len(theirs) == 2, text
    assert all(float(line.split("|")[6].replace(",", "")) > 0 for line in ours)       # output tok/s
    assert "| serve |" in text.split("### Batch-1")[1]
    online = [line for line in text.split("### Online")[1].splitlines() if line.startswith(f"| {model_dir} |")]
    assert [line.split("|")[2:4] for line in online] == [[" 40.0 ", " serve "], [" 40.0 ", " vLLM "],
                                                          [" 80.0 ", " serve "], [" 80.0 ", " vLLM "]], text
    assert all(f"not run: {reason}" in line for line in online[1::2])
    assert all(float(line.split("|")[5].split("/")[1]) > 0 for line in online[::2])    # TTFT p90 of ours
    assert "Failed steps" not in text


def test_a_compiled_part_that_does_not_load_is_named(model_dir, tmp_path, capsys):
    broken = stub_vllm(tmp_path / "broken", 'raise ImportError("libcuda.so.1: cannot open shared object file")\n')
    text = run(model_dir, tmp_path, broken)
    assert "vLLM not run: ImportError: libcuda.so.1: cannot open shared object file\n" in capsys.readouterr().out
    assert text.count("not run: ImportError: libcuda.so.1") == 3      # the heading and both workloads


def test_peer_gets_our_prompts_limits_and_sampling(model_dir, tmp_path, monkeypatch):
    import bench_serve
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("STUB_RECORD", str(record))
    text = run(model_dir, tmp_path, stub_vllm(tmp_path / "stub"))
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    vocab = bench_serve._vocab_size(str(model_dir))
    main_runs = [c for c in calls if c["init"]["max_model_len"] == 64]
    assert all(c["init"] == {"model": str(model_dir), "tokenizer": str(model_dir), "dtype": "bfloat16", "seed": 0,
                             "max_num_seqs": 4, "max_num_batched_tokens": 32, "max_model_len": 64,
                             "enable_prefix_caching": False} for c in main_runs)
    timed = [c for c in main_runs if c["sampling"]["max_tokens"] == 3]
    assert timed[0]["prompts"] == bench_serve.make_prompts(3, 4, 9, vocab, seed=0)
    assert timed[0]["sampling"] == {"temperature": 0, "max_tokens": 3, "ignore_eos": True}
    workload = [c for c in calls if c["init"]["max_model_len"] == 48 and c["sampling"]["max_tokens"] == 4]
    assert workload[0]["prompts"] == bench_serve.make_prompts(2, 5, 12, vocab, seed=0)
    section = text.split("## Against vLLM")[1]
    assert "vLLM 0.0.stub." in section and "| vLLM 0.0.stub | 3 |" in section and "| vLLM 0.0.stub | 2 |" in section
    assert section.count("x** / ") == 2                                  # serve / vLLM on both workloads
    assert "attention FLASH_ATTN" in section and "77 KV blocks of 16 tokens" in section and "| 1,234 |" in section
    batch1 = section.split("### Batch-1")[1]
    assert "| serve |" in batch1 and "| vLLM 0.0.stub |" in batch1
    logs = sorted((tmp_path / "vllm_logs").glob("offline_*.log"))
    assert len(logs) == 2 and all("GPU KV cache size: 1,234 tokens" in log.read_text() for log in logs)


def test_budget_stops_between_steps_and_resume_finishes_the_run(model_dir, tmp_path, capsys):
    first = run(model_dir, tmp_path, tmp_path / "empty", "--budget-s", "1e-9")
    printed = capsys.readouterr().out
    assert "run the same command with --resume" in printed and "all steps done" not in printed
    saved = json.loads((tmp_path / "serve_vs_vllm.json").read_text())
    assert saved["done"] == [f"offline {model_dir}"] and "2 x 5-12 -> 4" not in first
    text = run(model_dir, tmp_path, tmp_path / "empty", "--resume")
    assert "all steps done" in capsys.readouterr().out
    saved = json.loads((tmp_path / "serve_vs_vllm.json").read_text())
    assert saved["calls"] == 2 and len(saved["done"]) == 3 and len(saved["offline"]) == 1
    assert text.count("| serve |") == 3                      # two workloads and the batch-1 row, each once


def test_a_workload_without_a_peer_is_reported_on_its_own(model_dir, tmp_path):
    import bench_serve
    out = tmp_path / "serve.md"
    argv = ["offline", "--model", str(model_dir), "--num-requests", "2", "--min-prompt", "4", "--max-prompt", "6",
            "--output-len", "2", "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "32",
            "--workload", f"{model_dir}:5:12:4:48:2", "--out", str(out)]
    assert bench_serve.main(argv) == 0
    section = out.read_text().split("## More workloads")[1]
    assert "vLLM" not in section and f"| {model_dir}, 2 x 5-12 -> 4, len 48 | serve | 2 |" in section


def test_the_reason_is_the_root_cause_not_the_wrapper():
    from bench_serve_vllm import last_line
    log = """INFO 12-07 starting
Traceback (most recent call last):
  File "x.py", line 1, in <module>
ValueError: Free memory on device (7.1/79.2 GiB) on startup is less than desired GPU memory utilization
ERROR 12-07 EngineCore failed to start.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""
    assert last_line(log) == ("ValueError: Free memory on device (7.1/79.2 GiB) on startup is less than desired GPU "
                              "memory utilization")
    assert last_line("ModuleNotFoundError: No module named 'vllm'\n") == "ModuleNotFoundError: No module named 'vllm'"
    assert last_line("segfault\n\n") == "segfault" and last_line("") == "no output"
