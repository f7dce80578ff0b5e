"""The README's two commands stay true: CI runs the test command verbatim, and the main job works."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from lrdeploy.cli.app import main

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    setup_and_tests = _commands()[1]
    assert setup_and_tests.endswith("pytest")
    assert setup_and_tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_main_job_runs(tmp_path, capsys):
    job = _commands()[0].split(" && ")[-1]
    argv = shlex.split(job)
    assert argv[:2] == ["lrdeploy", "compress"]
    args = [str(ROOT / a) if a.startswith("models/") else a for a in argv[2:]]
    output = tmp_path / "demo.lowrank.onnx"
    assert main(["compress", *args, "-o", str(output), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy 98.60% → 98.60%" in printed
    assert output.is_file()
