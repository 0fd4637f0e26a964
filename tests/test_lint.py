"""The repository passes `ruff check` with the settings in pyproject.toml ([tool.ruff]): CI runs the test suite, so
this test is what makes CI enforce the linter. ruff is pinned in requirements.txt."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (pip install -r requirements.txt pins it)")
def test_ruff_check_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"ruff check found violations (fix them, or `ruff check --fix .`):\n{proc.stdout}" \
                                 f"{proc.stderr}"
