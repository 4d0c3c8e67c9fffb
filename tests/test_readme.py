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
    test_command = _bash_blocks()[1].strip()
    assert "pytest" in test_command
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [test_command]


def test_readme_train_command_runs_nnfast_train():
    assert _bash_blocks()[0].strip().endswith("nnfast train")


def test_readme_example_runs(tmp_path, monkeypatch):
    """The training example runs; every other Python block (the GPU ones) at least compiles."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    for block in blocks:
        compile(block, "README.md", "exec")
    (example,) = [block for block in blocks if "nf.save(" in block]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    assert (tmp_path / "model.npz").exists()
