"""`.ci/run` runs exactly the README's set-up and test commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no Quick start bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_setup_and_test_commands_verbatim():
    setup, _main_job, test = _quick_start_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert setup in ci_lines
    assert test in ci_lines
    assert ci_lines.index(setup) < ci_lines.index(test)
    assert "python -m pip install -q torch==2.13.0" in ci_lines


def test_readme_main_job_is_quasid_run():
    assert _quick_start_commands()[1].startswith("quasid run")
