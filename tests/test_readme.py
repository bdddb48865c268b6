"""The README's fresh-machine commands: the test command is the one CI runs, the main job is evals/main_job.sh."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs():
    script = (REPO / ".ci" / "setup-and-test").read_text().strip().splitlines()
    command = script[-1].strip()
    assert command.startswith("python3 -m venv"), command
    assert command in (REPO / "README.md").read_text()


def test_ci_run_calls_the_test_script():
    assert "bash .ci/setup-and-test" in (REPO / ".ci" / "run").read_text()


def test_readme_main_job_is_the_script_and_its_prune_flags_exist():
    """The README's first command runs evals/main_job.sh; every flag its `compress prune` line passes is
    one `compress prune --help` lists, and the script it ends with is there."""
    assert "bash evals/main_job.sh" in (REPO / "README.md").read_text()
    script = (REPO / "evals" / "main_job.sh").read_text().replace("\\\n", " ")
    (prune,) = [line for line in script.splitlines() if "compress prune" in line]
    flags = set(re.findall(r"\s(--?[a-z][a-z0-9-]*)", prune.split("compress prune", 1)[1]))
    help_text = subprocess.run([sys.executable, "-m", "compress", "prune", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120).stdout
    assert flags and all(re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", help_text) for flag in flags), flags
    assert "python evals/ask.py runs/" in script and (REPO / "evals" / "ask.py").is_file()
