"""The README's fresh-machine test command is the one CI runs."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs():
    script = (REPO / ".ci" / "setup-and-test").read_text().strip().splitlines()
    command = script[-1].strip()
    assert command.startswith("python3 -m venv"), command
    assert command in (REPO / "README.md").read_text()


def test_ci_run_calls_the_test_script():
    assert "bash .ci/setup-and-test" in (REPO / ".ci" / "run").read_text()
