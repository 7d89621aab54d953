"""The repository passes its own ruff configuration (pyproject.toml): `ruff check` and `ruff format --check`."""

import subprocess

import pytest

from utils import REPO

ruff = pytest.importorskip("ruff", reason="ruff is installed in the tf5 environment (scripts/setup_envs.sh)")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    from ruff.__main__ import find_ruff_bin

    result = subprocess.run([find_ruff_bin(), *command, "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ruff {' '.join(command)} found problems:\n{result.stdout[-6000:]}{result.stderr}"
