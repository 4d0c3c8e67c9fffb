"""The README's promises: its commands are what CI runs, its example runs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the README's test command first, word for word and unconditionally (set -e: a failure
    ends the run); then only the Python range check."""
    test_command = _bash_blocks()[1].strip()
    assert "pytest" in test_command
    text = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in text.splitlines()
    ci_lines = [line for line in text.splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [test_command, ".ci/python-range"]


def test_python_range_check_starts_at_requires_python():
    oldest = re.search(r"^OLDEST=(\S+)", (ROOT / ".ci" / "python-range").read_text(), flags=re.M).group(1)
    requires = re.search(r'^requires-python = ">=(\S+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert requires and requires.group(1) == oldest


def test_readme_train_command_runs_nnfast_train():
    assert _bash_blocks()[0].strip().endswith("nnfast train")


def test_readme_example_runs(tmp_path, monkeypatch):
    (example,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    assert (tmp_path / "model.npz").exists()


def test_lowest_versions_are_the_declared_lower_bounds():
    """.ci/python-range installs .ci/lowest-versions.txt on the oldest Python: it must pin exactly the
    lower bounds of pyproject.toml (dependencies and the test extra), no more, no less."""
    text = (ROOT / "pyproject.toml").read_text()
    declared = re.findall(r'^\s*"([A-Za-z0-9_.-]+)>=([0-9.]+)"', text[text.index("dependencies = ["):
                                                                    text.index("bench = [")], flags=re.M)
    pinned = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / ".ci" / "lowest-versions.txt").read_text(),
                             flags=re.M))
    assert sorted(pinned) == sorted({name for name, _ in declared})
    for name, bound in declared:
        assert pinned[name] == bound or pinned[name].startswith(bound + "."), (name, bound, pinned[name])
