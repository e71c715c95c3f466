"""`ruff check .` passes: pyflakes, pycodestyle and import order, configured in pyproject.toml (one line
length, 120). Run by the test suite so that CI, which runs the README's test command, runs the linter."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ruff_check_passes():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert "No module named ruff" not in r.stderr, "ruff is not installed: pip install -r requirements.txt"
    assert r.returncode == 0, r.stdout + r.stderr
