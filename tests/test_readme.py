"""The code in the README and docs/ runs, and the README's test command is the one CI runs."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", ["README.md", "docs/layer.md"])
def test_python_examples_run(page, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)  # what an example writes (a run directory) lands here
    for block in blocks:
        exec(compile(block, page, "exec"), {})


def test_ci_runs_the_readme_test_command():
    command = README.split("<!-- test-command -->", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    extracted = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == command and "pytest" in command
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
