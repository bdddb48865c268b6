"""The engine on the Triton attention backend (kernels/, run by the Triton interpreter on CPU) gives the
same greedy tokens as on the plain-torch reference backend, with chunked prefill, decode and a window.

Runs in a subprocess because TRITON_INTERPRET must be set before the kernels are first imported.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from serve_fixtures import gemma2_config, random_model, random_prompts, save_model
from serve import LLM, SamplingParams
path = save_model(random_model(gemma2_config(num_layers=2), seed=3), {path!r})
prompts = random_prompts([3, 13, 20])
params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
def run(backend):
    llm = LLM(path, block_size=16, max_num_batched_tokens=16, attention_backend=backend)
    assert llm.engine.runner.backend.name == backend
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
reference, triton = run("reference"), run("triton")
assert reference == triton, (reference, triton)
print("same tokens", triton)
"""


def test_triton_backend_matches_reference(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("compress.kernels.dispatch")
    script = SCRIPT.format(tests=str(Path(__file__).parent), path=str(tmp_path / "m"))
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same tokens" in proc.stdout
